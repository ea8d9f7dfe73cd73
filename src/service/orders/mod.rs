//! The order use cases: create exactly once, read, list, and every life-cycle change as a
//! compare-and-set.
//!
//! # Create, step by step (SPEC 2.1)
//! 1. Parse: a [`NewOrder`](crate::domain::order::NewOrder) is valid and its id carries the user's gene.
//! 2. Replay check on the shard: an existing order with the same request hash is answered
//!    as it is (200); with another hash, `idempotency_conflict`; an id the sweeper voided is
//!    refused (422 on `order_id`: the client asks for a fresh id).
//! 3. Price from the catalog (server-side prices, coupons checked).
//! 4. Reserve stock and coupons in the commerce database, keyed by order id (a retry
//!    reserves nothing twice). With `limits.max_unpaid_units_per_user`, the same transaction
//!    counts the order's units against the buyer's unpaid units, or refuses the create
//!    (`limit_exceeded`) before taking anything; a payment frees them after its shard commit,
//!    a close or invalidation with the stock (see [`crate::storage::commerce`]). Commit one.
//! 5. Write order, items and discounts in one transaction on the shard, which also checks
//!    that the id is not void (see [`crate::storage::orders`] for the handshake with the
//!    sweeper). Commit two, and the last: the claim stays `reserved` and the sweeper
//!    confirms it later, in batches, when it finds the order. A duplicate key here means a
//!    racing identical submit won: answer its order. A void id means the sweeper gave the
//!    reservation back already: refused like step 2.
//! 6. If the write failed, give the reservation back at once when no later attempt holds
//!    it; otherwise (or after a crash) the sweeper returns it after the grace period.
//!
//! # Layout
//! - this module: [`OrderService`], its builders, the commit point every order write goes
//!   through (`OrderService::commit`, then `after_commit`) and its twin for money against
//!   an archived order, and the types the use cases share.
//! - `create`: create (the steps above, one method each) and preview.
//! - `read`: get, list, pages and cursors, the archive's part of reads, `Served`.
//! - `lifecycle`: patch, ship, confirm, cancel, invalidate, and the release of stock.
//! - `payments`: pay and refund.

use crate::storage::Db;
use std::sync::Arc;

use tokio_util::task::TaskTracker;

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::MySqlConnection;

use crate::clock::Clock;
use crate::config::{ArchiveSettings, CartSettings, FlashSettings, OrderSettings};
use crate::domain::consistency::{Gtid, Watermark};
use crate::domain::ids::OrderId;
use crate::domain::order::{Address, FieldErrors, Order};
use crate::events::RelayWakers;
use crate::redis::cache::Cache;
use crate::storage::orders::{
    self, ArchiveWrite, Committed, MoneyMovement, NotWritten, OrderDoor, OrderWrite,
};
use crate::storage::replicas::{Database, ReadQuery};
use crate::storage::shards::{Shard, ShardMap};
use crate::storage::StorageError;

use crate::service::cart::CartService;
use crate::service::flash::FlashSales;
use crate::service::watermarks::{LocalWatermarks, WatermarkOf};
use crate::service::{Error, Result};

mod create;
mod lifecycle;
mod payments;
mod read;

pub use payments::MoneyAnswer;
pub(crate) use read::encode_cursor;
pub use read::{ListFilters, ListParams, OrderPage, ReadOptions, Served, DEFAULT_PAGE, MAX_PAGE};

/// The default of `replicas.watermark_ttl_ms`, for services built without settings.
const DEFAULT_WATERMARK_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// How long the `orders::after_write` failpoint holds a write between its COMMIT and its
/// `after_commit` (tests cut the caller off meanwhile).
#[cfg(feature = "failpoints")]
pub const COMMIT_FAILPOINT_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Clone)]
pub struct OrderService {
    shards: ShardMap,
    commerce: Db,
    cache: Cache,
    settings: Arc<OrderSettings>,
    /// `limits.max_unpaid_units_per_user`; `None`: off.
    max_unpaid_units: Option<i64>,
    /// Read-your-writes watermarks of this process's writes (see [`super::watermarks`]).
    watermarks: Arc<LocalWatermarks>,
    /// Flash sales: live sales for pricing, their gates (see [`super::flash`]).
    flash: Arc<FlashSales>,
    /// Carts, for creates and previews `from_cart` (see [`super::cart`]).
    carts: Arc<CartService>,
    /// Wakes the event relay of a database after a commit there (see [`crate::events`]).
    relay_wakers: RelayWakers,
    /// Where archived orders are read, and money for them recorded (see
    /// [`super::archive`]); `None`: no archive (tools and benches built without one).
    archive: Option<ArchiveReads>,
    /// The tasks background steps write on ([`Self::uncut`]); `serve` hands in the tracker
    /// of its request writes, so a shutdown waits for both.
    writes: TaskTracker,
    /// The time the use cases stamp and decide with (see [`crate::clock`]).
    clock: Clock,
}

/// The archive as the order use cases see it.
#[derive(Clone)]
struct ArchiveReads {
    db: Arc<Database>,
    /// No archived order is younger than this (`archive.min_age_days`): reads of anything
    /// newer never ask the archive.
    min_age: TimeDelta,
    /// The archive's relay, after a commit of money there.
    relay: usize,
    /// `archive.read_timeout_ms`: what a read of the archive may cost at most.
    read_timeout: std::time::Duration,
}

impl ArchiveReads {
    /// `query` on the archive's primary (it has no replicas) within `archive.read_timeout_ms`,
    /// the connection's acquisition included. A read cut off there closes its connection
    /// (its statement may still run, or the server be frozen) and answers `Unavailable`.
    async fn read<T, Q>(&self, query: Q) -> Result<T>
    where
        Q: for<'c> FnOnce(&'c mut MySqlConnection) -> ReadQuery<'c, T>,
    {
        let deadline = tokio::time::Instant::now() + self.read_timeout;
        let late = || Error::Unavailable("the archive did not answer within archive.read_timeout_ms".into());
        let answer = match tokio::time::timeout_at(deadline, self.db.write().acquire()).await {
            Err(_) => Err(late()),
            Ok(Err(e)) => Err(StorageError::from(e).into()),
            Ok(Ok(mut conn)) => match tokio::time::timeout_at(deadline, query(&mut conn)).await {
                Ok(answer) => answer.map_err(Error::from),
                Err(_) => {
                    conn.close_on_drop();
                    Err(late())
                }
            },
        };
        if answer.is_err() {
            metrics::counter!("orderly_archive_read_failures_total").increment(1);
        }
        answer
    }
}

/// What [`OrderService::commit`] hands to `after_commit` besides what committed: the order
/// at the committed version, so the cache entry is replaced rather than deleted.
pub(crate) enum Snapshot {
    /// Reload the order after the commit (the caller answers with it).
    Reload,
    /// The caller built it already (a new order).
    Known(Box<Order>),
    /// Not needed (a background writer): the entry is deleted.
    None,
}

/// Whether a create wrote a new order or answered an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New,
    Replay,
}

/// `PATCH` body, parsed.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchRequest {
    pub expected_version: i64,
    pub address: Option<Address>,
    pub remark: Option<String>,
    pub tracking_number: Option<String>,
    pub carrier: Option<String>,
}

#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentRequest {
    pub transaction_no: String,
    pub channel: String,
    pub amount: i64,
}

#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest {
    pub refund_no: String,
    pub amount: i64,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShipmentRequest {
    pub expected_version: i64,
    pub carrier: String,
    pub tracking_number: String,
}

/// Body of confirm, cancel and invalidate.
#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VersionedRequest {
    pub expected_version: i64,
    #[serde(default)]
    pub reason: String,
}

/// Channel numbers are opaque to us but bounded: letters, digits, `-` and `_`.
fn check_reference(errors: &mut FieldErrors, field: &str, v: &str, max: usize) {
    if v.is_empty()
        || v.len() > max
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        errors.push(field, format!("must be 1 to {max} letters, digits, '-' or '_'"));
    }
}

fn check_version(errors: &mut FieldErrors, v: i64) {
    if v < 1 {
        errors.push("expected_version", "must be the positive version you read");
    }
}

/// A new order's id must have been issued recently: ids are time-ordered and archive and
/// range queries rely on it, so an id from the future or long ago is refused. A day covers
/// any client that fetched an id and retries later; a minute covers clock skew between
/// service processes.
const ID_MAX_AGE: TimeDelta = TimeDelta::days(1);
const ID_MAX_SKEW: TimeDelta = TimeDelta::minutes(1);

fn check_id_is_fresh(id: OrderId, now: DateTime<Utc>) -> Result<(), FieldErrors> {
    let at = id.created_at();
    if at > now + ID_MAX_SKEW || at < now - ID_MAX_AGE {
        return Err(FieldErrors::single(
            "order_id",
            "was not issued recently; ask POST /v1/order-ids for a fresh one",
        ));
    }
    Ok(())
}

/// The sweeper gave this id's reservation back and voided it: no order can ever be written
/// under it, so the client must start over with a new id.
fn voided_id() -> Error {
    FieldErrors::single(
        "order_id",
        "was abandoned after a failure; ask POST /v1/order-ids for a fresh one",
    )
    .into()
}

impl OrderService {
    /// Flash sales without a gate and carts without a store (the database alone) until
    /// [`Self::with_flash`] and [`Self::with_carts`] hand in the ones over Redis.
    pub fn new(shards: ShardMap, commerce: Db, cache: Cache, settings: OrderSettings) -> Self {
        OrderService {
            shards,
            commerce: commerce.clone(),
            cache,
            settings: Arc::new(settings),
            max_unpaid_units: None,
            watermarks: Arc::new(LocalWatermarks::new(DEFAULT_WATERMARK_TTL)),
            flash: Arc::new(FlashSales::new(commerce.clone(), None, FlashSettings::default())),
            carts: Arc::new(CartService::new(commerce.clone(), None, CartSettings::default())),
            relay_wakers: RelayWakers::default(),
            archive: None,
            writes: TaskTracker::new(),
            clock: Clock::system(),
        }
    }

    /// The clock the use cases read (the system's by default). The flash sales and carts
    /// handed in with [`Self::with_flash`] and [`Self::with_carts`] bring their own: `app`
    /// gives all of them the same.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Reads fall back to this archive, and money for archived orders is recorded there;
    /// `relay` is the index of its outbox's relay among [`Self::relay_wakers`].
    pub fn with_archive(mut self, db: Arc<Database>, settings: &ArchiveSettings, relay: usize) -> Self {
        self.archive = Some(ArchiveReads {
            db,
            min_age: settings.min_age(),
            relay,
            read_timeout: std::time::Duration::from_millis(settings.read_timeout_ms),
        });
        self
    }

    /// The wakers of this process's relays.
    pub fn relay_wakers(&self) -> &RelayWakers {
        &self.relay_wakers
    }

    /// The carts creates and previews `from_cart` read and check out of.
    pub fn with_carts(mut self, carts: Arc<CartService>) -> Self {
        self.carts = carts;
        self
    }

    pub fn carts(&self) -> &Arc<CartService> {
        &self.carts
    }

    /// Wakes these relays after each commit (the relays of the same process).
    /// The tracker background writes run on (`serve`'s, which its shutdown waits for).
    pub fn with_write_tracker(mut self, writes: TaskTracker) -> Self {
        self.writes = writes;
        self
    }

    pub fn with_relay_wakers(mut self, wakers: RelayWakers) -> Self {
        self.relay_wakers = wakers;
        self
    }

    /// The flash sales this service sells through (built from `[flash]` settings).
    pub fn with_flash(mut self, flash: Arc<FlashSales>) -> Self {
        self.flash = flash;
        self
    }

    pub fn flash(&self) -> &Arc<FlashSales> {
        &self.flash
    }

    /// How long watermarks are kept (`replicas.watermark_ttl_ms`).
    pub fn with_watermark_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.watermarks = Arc::new(LocalWatermarks::new(ttl));
        self
    }

    /// Caps the units a user's unpaid orders may hold (`limits.max_unpaid_units_per_user`;
    /// 0: no cap). See [`crate::storage::commerce`]'s module docs for how they are counted.
    pub fn with_max_unpaid_units(mut self, max: u32) -> Self {
        self.max_unpaid_units = (max > 0).then_some(i64::from(max));
        self
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    // ------------------------------------------------------------------ the commit point

    /// Runs `work` on this service's write tracker (the one `serve` waits for at shutdown),
    /// so that dropping the caller (a background step's timeout, shutdown) stops only the
    /// waiting: a write is never cut between its COMMIT and its `after_commit`.
    /// A task that panicked is an error of its own kind (`JoinError`).
    pub(crate) async fn uncut<T, Fut>(&self, work: Fut) -> std::result::Result<T, tokio::task::JoinError>
    where
        Fut: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        self.writes.spawn(work).await
    }

    /// The one door every order write goes through: [`orders::commit`] (retried on a
    /// deadlock: a deadlocked statement committed nothing, see [`through_door`]), then
    /// [`Self::after_commit`] with what committed. Runs on a write task (see
    /// [`crate::http::write`]), so a commit is never separated from its `after_commit` by a
    /// dropped request.
    pub(crate) async fn commit(
        &self,
        shard: &Shard,
        write: OrderWrite<'_>,
        snapshot: Snapshot,
    ) -> Result<std::result::Result<(Committed, Option<Order>), NotWritten>, StorageError> {
        let pool = self.shards.primary(shard);
        let mut conn = pool.acquire().await?;
        let committed = match through_door(&mut conn, OrderDoor::Shard(&shard.tables, write)).await? {
            Ok(c) => c,
            Err(not) => return Ok(Err(not)),
        };
        // Tests stand here between COMMIT and `after_commit` (a step cut off, a process
        // killed): `return(<order id>)` delays that order's write by `COMMIT_FAILPOINT_DELAY`,
        // `return(panic:<order id>)` makes it die here.
        #[cfg(feature = "failpoints")]
        if let Some(Some(arg)) = fail::eval("orders::after_write", |arg| arg) {
            let id = committed.order_id.to_string();
            if arg == format!("panic:{id}") {
                panic!("failpoint orders::after_write: the write of {id} dies after its commit");
            }
            if arg == id {
                tokio::time::sleep(COMMIT_FAILPOINT_DELAY).await;
            }
        }
        let order = match snapshot {
            Snapshot::Known(o) => Some(*o),
            // A reload that fails leaves the answer to the caller's own reload; the cache
            // entry is deleted instead of replaced.
            Snapshot::Reload => orders::load_order(&mut conn, &shard.tables, committed.order_id)
                .await
                .ok()
                .flatten(),
            Snapshot::None => None,
        };
        drop(conn);
        self.relay_wakers.wake(shard.database);
        self.after_commit(self.shards.database(shard), &committed, order.as_ref())
            .await;
        Ok(Ok((committed, order)))
    }

    /// Everything that must follow a committed order write, before its answer leaves: the
    /// read-your-writes watermarks of the order and its owner in this process (its
    /// `Consistency-Token`), the cache (replaced with the order at the committed version, or
    /// invalidated) and metrics. (The event itself committed with
    /// the write, in the outbox; its relay was woken before this.)
    async fn after_commit(&self, db: &Database, c: &Committed, order: Option<&Order>) {
        metrics::counter!("orderly_order_writes_total", "status" => c.status.name()).increment(1);
        let watermark = c.gtid.as_deref().and_then(Gtid::parse).map(|gtid| Watermark {
            database: db.reference(),
            gtid,
        });
        if let Some(w) = watermark {
            self.watermarks
                .record(&[WatermarkOf::Order(c.order_id), WatermarkOf::User(c.user_id)], w);
        }
        let snapshot = order.filter(|o| o.version == c.version);
        self.cache
            .order_written(c.order_id, c.user_id, c.version, snapshot)
            .await;
    }

    /// The service's shard map, with its pools: inside the crate only (health, jobs); the
    /// harness reads rows through pools of its own.
    pub(crate) fn shards(&self) -> &ShardMap {
        &self.shards
    }

    pub(crate) fn commerce(&self) -> &Db {
        &self.commerce
    }

    /// Per shard database with replicas: `(name, replicas in the read rotation, replicas
    /// configured)`. What `/readyz` reports, for callers in the same process (the bench waits
    /// on it before it measures replica reads).
    pub fn replica_rotation(&self) -> Vec<(String, usize, usize)> {
        self.shards
            .databases()
            .iter()
            .filter(|d| d.has_replicas())
            .map(|d| (d.name().to_owned(), d.replicas_in_rotation(), d.replica_count()))
            .collect()
    }

    /// Connections of the service's own pools (commerce and every shard primary) that sit idle
    /// in their pool inside an open transaction: always 0 unless the pool guard is broken. It
    /// takes every idle connection (waiting at most `wait` for each), asks it
    /// `@@in_transaction`, and gives them all back. For the cancellation tests.
    pub async fn pooled_in_transaction(&self, wait: std::time::Duration) -> usize {
        let mut inside = 0;
        let pools = std::iter::once(&self.commerce).chain(self.shards.databases().iter().map(|d| d.write()));
        for pool in pools {
            let mut held = Vec::new();
            for _ in 0..pool.size() {
                let Ok(Ok(mut c)) = tokio::time::timeout(wait, pool.acquire()).await else {
                    break;
                };
                let v: u64 = sqlx::query_scalar("SELECT @@in_transaction")
                    .fetch_one(&mut *c)
                    .await
                    .unwrap_or(0);
                inside += v as usize;
                held.push(c);
            }
        }
        inside
    }

    async fn conn(&self, shard: &Shard) -> Result<crate::storage::Conn> {
        Ok(self
            .shards
            .primary(shard)
            .acquire()
            .await
            .map_err(StorageError::from)?)
    }

    /// [`Self::commit`] for money against an archived order: the same door and retry loop
    /// ([`through_door`] with [`OrderDoor::Archive`]), then the same `after_commit`, with the
    /// watermark of the order's shard: its primary's last GTID, read after the shard said the
    /// order is gone, so a read that waits for it sees the delete on any replica and goes on
    /// to the archive, never to the order's last hot version.
    async fn commit_archived_money(
        &self,
        shard: &Shard,
        a: &ArchiveReads,
        id: OrderId,
        m: &MoneyMovement,
    ) -> Result<std::result::Result<(Committed, Option<Order>), NotWritten>, StorageError> {
        let gone_at = {
            let mut conn = self.shards.primary(shard).acquire().await?;
            orders::last_logged_gtid(&mut conn).await?
        };
        let mut conn = a.db.write().acquire().await?;
        let write = ArchiveWrite::Money {
            id,
            movement: m,
            now: self.clock.now(),
        };
        let committed = match through_door(&mut conn, OrderDoor::Archive(write)).await? {
            Ok(c) => Committed { gtid: gone_at, ..c },
            Err(not) => return Ok(Err(not)),
        };
        let order = crate::storage::archive::load(&mut conn, id).await.ok().flatten();
        drop(conn);
        metrics::counter!("orderly_archived_money_records_total").increment(1);
        tracing::warn!(order_id = %id, transaction_no = %m.transaction_no, "money recorded for an archived order; flagged refund_required");
        self.relay_wakers.wake(a.relay);
        self.after_commit(self.shards.database(shard), &committed, order.as_ref())
            .await;
        Ok(Ok((committed, order)))
    }
}

/// The one retry loop of an order write, hot or archived: [`orders::commit`] again after a
/// deadlock or lock-wait timeout (which committed nothing).
async fn through_door(
    conn: &mut sqlx::MySqlConnection,
    door: OrderDoor<'_>,
) -> std::result::Result<std::result::Result<Committed, NotWritten>, StorageError> {
    let mut outcome = orders::commit(conn, door).await;
    for _ in 0..crate::storage::DEADLOCK_RETRIES {
        match &outcome {
            Err(e) if e.is_retryable() => outcome = orders::commit(conn, door).await,
            _ => break,
        }
    }
    outcome
}
