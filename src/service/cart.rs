//! The cart: Redis write-behind with a bounded loss window (SPEC 6, "Cart").
//!
//! # Where a cart lives
//! A buyer's cart is a Redis hash (see [`crate::redis::cart`]); every change runs one
//! Lua script that changes it, bumps its version and marks the buyer dirty, scored by that
//! version. The flusher ([`CartService::flush_once`], run by [`crate::jobs::cart_flusher`]
//! every `cart.loss_window_ms` in every `serve` process) reads the dirty carts, writes them to `carts` in MySQL in batches,
//! each row only if its version is newer than the stored one, and unmarks a buyer only if the
//! score is still the version it wrote. So a change racing a flush stays dirty, two flushers
//! at once write each cart and never an older one over a newer one, and an empty cart (after
//! `DELETE /v1/cart`) is flushed like any other.
//!
//! # What can be lost
//! Redis dying loses the changes not yet flushed: those of the last loss window, plus those
//! made during a flush that was under way (while MySQL refuses or stalls the flushes,
//! everything since the last flush that went through). A Redis call slower than
//! `cache.timeout_ms` counts as Redis not answering, with the same bound. Everything flushed before is read back from MySQL
//! when a cart is missing from Redis (read-through: evicted, expired, Redis restarted empty);
//! a change to a missing cart loads it first, so it never starts from a blank one.
//!
//! # Redis down
//! Reads and changes go to MySQL directly (a read-modify-write of the row in one short
//! transaction), behind the shared Redis connection's breaker and timeouts: slower, not failing. Such a change
//! raises the row's version by [`OUTAGE_STEP`], far above any version Redis could have reached
//! meanwhile, so the flusher never writes the older Redis copy over it, and drops that copy
//! instead (a later read loads MySQL's). This process also remembers the carts it wrote so
//! and drops their Redis copies once Redis answers again, before it uses them, and at the
//! start of every flush. What the older Redis copy held that MySQL did not (its unflushed
//! changes) is lost then: the change made during the outage wins.
//!
//! # Not covered
//! - A Redis restarted from an older snapshot (not empty) serves that snapshot's carts until
//!   they change; a changed one is older than MySQL's, so its flush drops it with the change.
//! - During a partition, a process that still reaches Redis may change the older copy; that
//!   change is dropped the same way when the copy is found older than MySQL's.
//! - Redis Cluster: a cart and its bucket's dirty set share a hash tag, but the flusher's
//!   pipelines of all buckets would have to go to each bucket's node.

use crate::storage::Db;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Mutex;

use crate::clock::Clock;
use crate::config::CartSettings;
use crate::domain::actor::Caller;
use crate::domain::cart::{Cart, CartQuantity, Refusal, StoredCart};
use crate::domain::ids::{OrderId, ProductId, UserId};
use crate::domain::order::{FieldErrors, NewLine, MAX_LINES};
use crate::redis::cart::{CartStore, CartWrite};
use crate::storage::carts;
use crate::storage::commerce::{self, Product};

use super::{retry_deadlocks, Error, Result};

/// How much a change made in MySQL directly (Redis not answering) raises the cart's version.
/// The Redis copy can only be ahead of MySQL by the changes of one outage's unflushed window;
/// a million of them to one cart is out of reach, and 2^53 / 2^20 leaves billions of outages
/// before the version (a Redis sorted-set score, a double) loses precision.
pub const OUTAGE_STEP: i64 = 1 << 20;

/// Carts this process wrote to MySQL directly and whose Redis copies it has yet to drop.
/// Beyond this many, the oldest are forgotten: the flusher still drops a stale copy when it
/// meets it dirty, and an outage that touches this many carts in one process is a long one.
const MAX_DIRECT: usize = 100_000;

/// Redis copies dropped per round trip after an outage: a few hundred small scripts run in
/// well under a millisecond, far inside the per-call timeout.
const DROP_BATCH: usize = 256;

/// Product ids known to exist. Products are never deleted, so a positive answer never goes
/// stale; the bound only caps memory (a catalog larger than this costs a point read per
/// change of a product beyond it).
const MAX_KNOWN_PRODUCTS: usize = 200_000;

/// A change to a cart.
#[derive(Debug, Clone)]
enum Change {
    Set(ProductId, CartQuantity),
    Clear,
    CheckOut(OrderId, Vec<NewLine>),
}

impl Change {
    fn apply(&self, cart: &mut Cart) -> std::result::Result<bool, Refusal> {
        match self {
            Change::Set(p, q) => cart.set(*p, *q),
            Change::Clear => Ok(cart.clear()),
            Change::CheckOut(order, lines) => Ok(cart.check_out(*order, lines)),
        }
    }

    async fn in_redis(&self, r: &CartStore, user: UserId) -> Option<CartWrite> {
        match self {
            Change::Set(p, q) => r.set(user, *p, q.get()).await,
            Change::Clear => r.clear(user).await,
            Change::CheckOut(order, lines) => r.check_out(user, *order, lines).await,
        }
    }
}

/// What one flush did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushOutcome {
    /// Carts written, or found written at a newer version by another flusher.
    pub written: usize,
    /// Carts whose Redis copy was older than MySQL's (changed in MySQL during an outage): the
    /// copy was dropped.
    pub stale: usize,
    /// Dirty carts no longer in Redis (evicted or expired before their flush).
    pub gone: usize,
    /// Batches read from Redis.
    pub rounds: usize,
}

pub struct CartService {
    commerce: Db,
    /// `None`: no Redis (`[cache] enabled = false`), carts live in MySQL only.
    store: Option<CartStore>,
    settings: CartSettings,
    /// See [`MAX_KNOWN_PRODUCTS`].
    known: Mutex<HashSet<ProductId>>,
    /// User → the version of the cart this process wrote to MySQL while Redis did not
    /// answer; its Redis copy, if older, is dropped before Redis is used for it again.
    direct: Mutex<HashMap<UserId, i64>>,
    clock: Clock,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn buyer(caller: Caller) -> Result<UserId> {
    match caller {
        Caller::User(u) => Ok(u),
        _ => Err(Error::Forbidden("only a buyer has a cart")),
    }
}

fn too_many_lines() -> Error {
    FieldErrors::single(
        "product_id",
        format!("the cart holds {MAX_LINES} lines already; remove one first"),
    )
    .into()
}

impl CartService {
    pub fn new(commerce: Db, store: Option<CartStore>, settings: CartSettings) -> CartService {
        CartService {
            commerce,
            store,
            settings,
            known: Mutex::new(HashSet::new()),
            direct: Mutex::new(HashMap::new()),
            clock: Clock::system(),
        }
    }

    /// The clock changes are stamped with (the system's by default).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Whether carts live in Redis (write-behind, flushed by
    /// [`crate::jobs::cart_flusher`]); without Redis they live in MySQL only.
    pub fn has_redis(&self) -> bool {
        self.store.is_some()
    }

    pub fn settings(&self) -> &CartSettings {
        &self.settings
    }

    // ------------------------------------------------------------------ reads

    /// The caller's cart and the catalog's current products of its lines.
    pub async fn get(&self, caller: Caller) -> Result<(StoredCart, Vec<Product>)> {
        let user = buyer(caller)?;
        let cart = self.load(user).await?;
        let ids: Vec<ProductId> = cart.cart.lines.keys().copied().collect();
        let products = commerce::load_products(&self.commerce, &ids).await?;
        Ok((cart, products))
    }

    /// `user`'s cart: from Redis, read back from MySQL when Redis has none (and put there),
    /// from MySQL when Redis does not answer.
    pub async fn load(&self, user: UserId) -> Result<StoredCart> {
        if let Some(r) = self.redis_for(user).await {
            match r.get(user).await {
                Some(Some(c)) => return Ok(c),
                Some(None) => {
                    let stored = carts::load(&self.commerce, user).await?;
                    // A fill that fails or finds a cart there changes nothing we answer: the
                    // one there is as new as MySQL's or newer, and the next read sees it.
                    let _ = r.fill(user, &stored).await;
                    return Ok(stored);
                }
                None => {}
            }
        }
        Ok(carts::load(&self.commerce, user).await?)
    }

    /// Redis for `user`'s cart, once any copy older than a change this process made in MySQL
    /// is dropped; `None`: no Redis, or it does not answer.
    async fn redis_for(&self, user: UserId) -> Option<&CartStore> {
        let r = self.store.as_ref()?;
        let pending = {
            let direct = lock(&self.direct);
            if direct.is_empty() {
                None
            } else {
                direct.get(&user).copied()
            }
        };
        if let Some(v) = pending {
            r.drop_older(user, v).await?;
            let mut direct = lock(&self.direct);
            if direct.get(&user) == Some(&v) {
                direct.remove(&user);
            }
        }
        Some(r)
    }

    // ------------------------------------------------------------------ changes

    /// Sets the quantity of one product in the caller's cart (0 removes the line). An unknown
    /// product or a 101st line is refused (422), and nothing changes.
    pub async fn set(
        &self,
        caller: Caller,
        product: ProductId,
        quantity: CartQuantity,
    ) -> Result<StoredCart> {
        let user = buyer(caller)?;
        if quantity.get() > 0 {
            self.check_product(product).await?;
        }
        self.change(user, Change::Set(product, quantity)).await
    }

    /// Empties the caller's cart.
    pub async fn clear(&self, caller: Caller) -> Result<StoredCart> {
        let user = buyer(caller)?;
        self.change(user, Change::Clear).await
    }

    /// Removes what `order` bought from `user`'s cart, once per order (called by the create
    /// that wrote the order).
    pub async fn check_out(&self, user: UserId, order: OrderId, bought: &[NewLine]) -> Result<StoredCart> {
        self.change(user, Change::CheckOut(order, bought.to_vec())).await
    }

    async fn check_product(&self, product: ProductId) -> Result<()> {
        if lock(&self.known).contains(&product) {
            return Ok(());
        }
        if commerce::load_product(&self.commerce, product).await?.is_none() {
            return Err(FieldErrors::single("product_id", "no such product").into());
        }
        let mut known = lock(&self.known);
        if known.len() >= MAX_KNOWN_PRODUCTS {
            known.clear();
        }
        known.insert(product);
        Ok(())
    }

    async fn change(&self, user: UserId, change: Change) -> Result<StoredCart> {
        if let Some(r) = self.redis_for(user).await {
            // Missing: read back from MySQL, fill, and run the change again. Twice is enough
            // (a fill only fails to fill when a cart is there); after that, MySQL directly.
            for _ in 0..3 {
                match change.in_redis(r, user).await {
                    None => break,
                    Some(CartWrite::Done(c)) => {
                        metrics::counter!("orderly_cart_writes_total", "path" => "redis").increment(1);
                        return Ok(c);
                    }
                    Some(CartWrite::TooManyLines) => return Err(too_many_lines()),
                    Some(CartWrite::Missing) => {
                        let stored = carts::load(&self.commerce, user).await?;
                        if r.fill(user, &stored).await.is_none() {
                            break;
                        }
                    }
                }
            }
        }
        let step = if self.store.is_some() { OUTAGE_STEP } else { 1 };
        let changed = retry_deadlocks(|| async {
            carts::change(&self.commerce, user, step, self.clock.now(), |c| change.apply(c)).await
        })
        .await?;
        let (stored, changed) = changed.map_err(|Refusal::TooManyLines| too_many_lines())?;
        metrics::counter!("orderly_cart_writes_total", "path" => "mysql").increment(1);
        if changed && self.store.is_some() {
            let mut direct = lock(&self.direct);
            if direct.len() >= MAX_DIRECT {
                direct.clear();
            }
            direct.insert(user, stored.version);
        }
        Ok(stored)
    }

    // ------------------------------------------------------------------ the flusher

    /// One flush: every dirty cart of every bucket, in batches of `cart.flush_batch` per
    /// bucket, written to MySQL (newer versions only) and unmarked if unchanged since.
    /// Safe with any number of flushers at once. An error leaves the rest dirty for the next.
    pub async fn flush_once(&self) -> Result<FlushOutcome> {
        self.flush_once_paused(async {}).await
    }

    /// [`Self::flush_once`] that awaits `during` after its first read of Redis and before it
    /// writes MySQL: tests race changes (and other flushers) against a flush with it.
    #[doc(hidden)]
    pub async fn flush_once_paused(&self, during: impl Future<Output = ()>) -> Result<FlushOutcome> {
        let mut out = FlushOutcome::default();
        let Some(r) = self.store.as_ref() else {
            during.await;
            return Ok(out);
        };
        self.drop_direct_copies(r).await;
        let batch = self.settings.flush_batch.max(1);
        let mut during = Some(during);
        loop {
            // Redis not answering: what is dirty is in Redis, so there is nothing to flush.
            let Some(buckets) = r.dirty(batch).await else {
                return Ok(out);
            };
            let full = buckets.iter().any(|b| b.len() >= batch);
            let dirty: Vec<_> = buckets.into_iter().flatten().collect();
            if let Some(d) = during.take() {
                d.await;
            }
            if dirty.is_empty() {
                break;
            }
            out.rounds += 1;
            let rows: Vec<(UserId, StoredCart)> = dirty
                .iter()
                .filter_map(|d| d.cart.clone().map(|c| (d.user, c)))
                .collect();
            carts::upsert_newer(&self.commerce, &rows, self.clock.now()).await?;
            let users: Vec<UserId> = rows.iter().map(|(u, _)| *u).collect();
            let stored: HashMap<UserId, i64> = carts::versions(&self.commerce, &users)
                .await?
                .into_iter()
                .collect();
            let mut done = Vec::with_capacity(dirty.len());
            let mut stale = Vec::new();
            for d in dirty {
                match d.cart {
                    None => {
                        out.gone += 1;
                        done.push((d.user, d.score));
                    }
                    Some(c) => match stored.get(&d.user) {
                        Some(&v) if v > c.version => stale.push((d.user, v)),
                        _ => {
                            out.written += 1;
                            done.push((d.user, c.version));
                        }
                    },
                }
            }
            if r.clean(&done).await.is_none() {
                // Written, still marked: the next flush writes them again (a no-op).
                return Ok(out);
            }
            // MySQL newer: written by a change while Redis did not answer (the Redis copy is
            // older and goes), or by another flusher that read a newer copy (kept).
            let Some(dropped) = r.drop_older_many(&stale).await else {
                return Ok(out);
            };
            for d in dropped {
                if d {
                    out.stale += 1;
                } else {
                    out.written += 1;
                }
            }
            if !full {
                break;
            }
        }
        for (outcome, n) in [("written", out.written), ("stale", out.stale), ("gone", out.gone)] {
            if n > 0 {
                metrics::counter!("orderly_cart_flushed_total", "outcome" => outcome).increment(n as u64);
            }
        }
        Ok(out)
    }

    /// Drops the Redis copies of the carts this process changed in MySQL directly, where they
    /// are older.
    async fn drop_direct_copies(&self, r: &CartStore) {
        let pending: Vec<(UserId, i64)> = lock(&self.direct).iter().map(|(u, v)| (*u, *v)).collect();
        for chunk in pending.chunks(DROP_BATCH) {
            if r.drop_older_many(chunk).await.is_none() {
                return;
            }
            let mut direct = lock(&self.direct);
            for (user, v) in chunk {
                if direct.get(user) == Some(v) {
                    direct.remove(user);
                }
            }
        }
    }
}
