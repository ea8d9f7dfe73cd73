//! The order use cases: create exactly once, read, list, and every life-cycle change as a
//! compare-and-set.
//!
//! # Create, step by step (SPEC 2.1)
//! 1. Parse: a [`NewOrder`] is valid and its id carries the user's gene.
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

use std::sync::Arc;

use tokio_util::task::TaskTracker;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use sqlx::pool::PoolConnection;
use sqlx::{MySql, MySqlConnection, MySqlPool};

use crate::cache::{Cache, FIRST_PAGE};
use crate::config::{ArchiveSettings, CartSettings, FlashSettings, OrderSettings};
use crate::domain::actor::Caller;
use crate::domain::consistency::{Consistency, Gtid, Watermark};
use crate::domain::flash::FlashSale;
use crate::domain::ids::{FlashSaleId, OrderId, ProductId, UserId};
use crate::domain::money::Money;
use crate::domain::order::{
    check_text, parse_preview, price_order, Address, CreateOrderRequest, FieldErrors, NewLine, NewOrder,
    Order, PaymentKind, PreviewRequest, Pricing, MAX_CARRIER_CHARS, MAX_REASON_CHARS, MAX_REMARK_CHARS,
    MAX_TRACKING_CHARS,
};
use crate::domain::patch_rules::{patchable_in, PatchFields, PatchRefusal};
use crate::domain::shard::Gene;
use crate::domain::status::{transition, Command, OrderStatus};
use crate::events::RelayWakers;
use crate::storage::commerce::{self, FlashLine, Reservation, ReserveOutcome};
use crate::storage::orders::{
    self, ArchiveWrite, Committed, FieldChanges, IdState, ListQuery, MoneyMovement, NotWritten, OrderDoor,
    OrderWrite, StatusChange,
};
use crate::storage::replicas::{self, Database, Read, ReadQuery};
use crate::storage::shards::{Shard, ShardMap};
use crate::storage::StorageError;

use super::cart::CartService;
use super::flash::{Admission, FlashSales};
use super::watermarks::{LocalWatermarks, WatermarkOf};
use super::{retry_deadlocks, Error, Result};

/// The default of `replicas.watermark_ttl_ms`, for services built without settings.
const DEFAULT_WATERMARK_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// How long the `orders::after_write` failpoint holds a write between its COMMIT and its
/// `after_commit` (tests cut the caller off meanwhile).
#[cfg(feature = "failpoints")]
pub const COMMIT_FAILPOINT_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// The largest page of `GET /v1/orders`.
pub const MAX_PAGE: u32 = 100;
pub const DEFAULT_PAGE: u32 = 20;

#[derive(Clone)]
pub struct OrderService {
    shards: ShardMap,
    commerce: MySqlPool,
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

/// What the archive did for a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FromArchive {
    /// Not asked (the page does not reach back that far, or the buyer has no archived
    /// orders), or it had nothing for the page.
    Nothing,
    /// It added orders to the page.
    Added,
    /// It failed or did not answer in time: the page is the hot store's part only.
    Unavailable,
}

/// What a list read on the shard found: the page, and whether the buyer has archived
/// orders, read after it on its connection (`None`: not asked, the page does not reach the
/// archive).
struct HotPage {
    orders: Vec<Order>,
    archived: Option<bool>,
}

/// [`HotPage::archived`] of a cache-aside read, set when its loader ran (`None` otherwise).
#[derive(Default)]
struct ArchivedCell(std::sync::atomic::AtomicU8);

impl ArchivedCell {
    fn set(&self, archived: Option<bool>) {
        let v = match archived {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        };
        self.0.store(v, std::sync::atomic::Ordering::Relaxed);
    }

    fn get(&self) -> Option<bool> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            1 => Some(false),
            2 => Some(true),
            _ => None,
        }
    }
}

/// Every archived order was created before this: its id is older than its pass's cutoff
/// (at least `min_age` ago), and an order is created within a day of its id.
fn archive_horizon(min_age: TimeDelta) -> DateTime<Utc> {
    Utc::now() - min_age + ID_MAX_AGE + ID_MAX_SKEW
}

/// Whether `page`, the shard's answer to `q`, may lack archived orders: unless it is full of
/// orders too young to be archived, or `q` asks only for such.
fn reaches_archive(page: &[Order], q: &ListQuery, horizon: DateTime<Utc>) -> bool {
    let want = q.limit as usize;
    let full_of_young = want > 0 && page.len() >= want && page[want - 1].created_at >= horizon;
    !full_of_young && q.created_from.is_none_or(|from| from < horizon)
}

/// How a read must be served: its consistency, and the token of a write the client wants to
/// see (from the `Consistency-Token` header of an earlier answer, on any connection).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOptions {
    pub consistency: Consistency,
    pub token: Option<Watermark>,
}

/// Which part of the system answered a read (the `Served-By` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    Cache,
    Primary,
    Replica,
    /// The archive of old orders (the order is no longer in its shard).
    Archive,
}

impl Served {
    pub fn name(self) -> &'static str {
        match self {
            Served::Cache => "cache",
            Served::Primary => "primary",
            Served::Replica => "replica",
            Served::Archive => "archive",
        }
    }

    fn of<T>(read: &Read<T>) -> Served {
        match read.served {
            replicas::Served::Primary => Served::Primary,
            replicas::Served::Replica => Served::Replica,
        }
    }
}

/// Where a cache-aside read was served from: the cache unless its loader ran.
#[derive(Default)]
struct ServedCell(std::sync::atomic::AtomicU8);

impl ServedCell {
    fn set(&self, s: Served) {
        self.0.store(s as u8 + 1, std::sync::atomic::Ordering::Relaxed);
    }

    fn get(&self) -> Served {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            2 => Served::Primary,
            3 => Served::Replica,
            4 => Served::Archive,
            _ => Served::Cache,
        }
    }
}

/// What a payment or refund answers: the order at its new version, and whether it was
/// recorded against the archived order (which is then flagged `refund_required`).
#[derive(Debug)]
pub struct MoneyAnswer {
    pub order: Order,
    pub archived: bool,
}

/// A page of `GET /v1/orders`.
#[derive(Debug)]
pub struct OrderPage {
    pub orders: Vec<Order>,
    pub next_cursor: Option<String>,
    pub served: Served,
    /// The page reaches back into the archive, which failed or did not answer in time: it
    /// holds the hot store's orders only.
    pub archive_unavailable: bool,
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

/// Database time has microseconds; so do the times we hand out, so that an order built in
/// memory and the same order read back are equal.
pub(crate) fn now() -> DateTime<Utc> {
    let t = Utc::now();
    t.duration_trunc(TimeDelta::microseconds(1)).unwrap_or(t)
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

/// A keyset position in a list, newest first: `(created_at, order_id)` of the last order seen.
pub(crate) type Keyset = (DateTime<Utc>, OrderId);

/// The filters and the page of every order list (a buyer's, a shop's), already parsed.
#[derive(Debug, Clone, Default)]
pub struct ListFilters {
    pub status: Option<OrderStatus>,
    pub created_from: Option<DateTime<Utc>>,
    pub created_to: Option<DateTime<Utc>>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

impl ListFilters {
    /// The page size (default [`DEFAULT_PAGE`], at most [`MAX_PAGE`]) and the keyset position
    /// the cursor names: orders strictly older than it.
    pub(crate) fn page(&self) -> Result<(u32, Option<Keyset>)> {
        let limit = self.limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(FieldErrors::single("limit", format!("must be between 1 and {MAX_PAGE}")).into());
        }
        let before = match &self.cursor {
            None => None,
            Some(c) => Some(
                decode_cursor(c)
                    .ok_or_else(|| FieldErrors::single("cursor", "is not a cursor this service issued"))?,
            ),
        };
        Ok((limit, before))
    }
}

/// `GET /v1/orders`: whose orders (administrators name a user), and the filters.
#[derive(Debug, Clone, Default)]
pub struct ListParams {
    pub user_id: Option<UserId>,
    pub filters: ListFilters,
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

fn check_amount(errors: &mut FieldErrors, field: &str, amount: i64) -> Money {
    match Money::new(amount) {
        Some(m) if m > Money::ZERO => m,
        _ => {
            errors.push(field, "must be a positive amount in minor units, at most 10^15");
            Money::ZERO
        }
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

const CURSOR_PREFIX: &str = "v1.";

pub(crate) fn encode_cursor(o: &Order) -> String {
    use base64::Engine;
    let raw = format!(
        "{CURSOR_PREFIX}{}.{}",
        o.created_at.timestamp_micros(),
        o.order_id.get()
    );
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

fn decode_cursor(s: &str) -> Option<(DateTime<Utc>, OrderId)> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let rest = raw.strip_prefix(CURSOR_PREFIX)?;
    let (micros, id) = rest.split_once('.')?;
    let at = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
    if !crate::domain::order::is_storable_time(&at) {
        return None;
    }
    Some((at, OrderId::parse(id)?))
}

/// Whether `id` cannot be an order `caller` may see, without asking any store (cache
/// penetration): an id from the future cannot exist yet, and a buyer's orders all carry the
/// buyer's gene. (An id's time cannot precede the id epoch: the field is unsigned.)
fn cannot_exist(caller: Caller, id: OrderId, now: DateTime<Utc>) -> bool {
    if id.created_at() > now + ID_MAX_SKEW {
        return true;
    }
    matches!(caller, Caller::User(u) if id.gene() != Gene::of_user(u))
}

impl OrderService {
    pub fn new(shards: ShardMap, commerce: MySqlPool, cache: Cache, settings: OrderSettings) -> Self {
        OrderService {
            shards,
            commerce: commerce.clone(),
            cache: cache.clone(),
            settings: Arc::new(settings),
            max_unpaid_units: None,
            watermarks: Arc::new(LocalWatermarks::new(DEFAULT_WATERMARK_TTL)),
            flash: Arc::new(FlashSales::new(
                commerce.clone(),
                cache.clone(),
                FlashSettings::default(),
            )),
            carts: Arc::new(CartService::new(
                commerce.clone(),
                cache.clone(),
                CartSettings::default(),
            )),
            relay_wakers: RelayWakers::default(),
            archive: None,
            writes: TaskTracker::new(),
        }
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

    /// The archive if `id` is old enough to be in it: an order younger than
    /// `archive.min_age_days` is never moved, so its absence from the shard is final.
    fn archive_for(&self, id: OrderId) -> Option<&ArchiveReads> {
        self.archive
            .as_ref()
            .filter(|a| id.created_at() < Utc::now() - a.min_age)
    }

    /// The archived order `id`, read on the archive's primary (it has no replicas) within
    /// `archive.read_timeout_ms`. Asked only after the shard answered "no such order": an
    /// order moves into the archive before it leaves the shard, so one of the two reads
    /// finds it.
    async fn archived(&self, id: OrderId) -> Result<Option<Order>> {
        let Some(a) = self.archive_for(id) else {
            return Ok(None);
        };
        a.read(|c| -> ReadQuery<'_, Option<Order>> { Box::pin(crate::storage::archive::load(c, id)) })
            .await
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
    /// 0: no cap). See [`commerce`]'s module docs for how they are counted.
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

    /// The consistency token of the newest write of `order` this process committed (what a
    /// write answers in its `Consistency-Token` header; recorded before the write returned).
    pub fn consistency_token(&self, order: OrderId) -> Option<Watermark> {
        self.watermarks.get(WatermarkOf::Order(order))
    }

    /// The newest write on `db` a `session` read of `of` is known to need: the later of this
    /// process's watermark and the client's token, those of `db` only. It only raises the
    /// read's fence ([`Database::read`]), which already holds every acknowledged write; the
    /// token is what the client proves it saw.
    fn watermark(&self, db: &Database, of: WatermarkOf, token: Option<Watermark>) -> Option<Gtid> {
        if !db.has_replicas() {
            return None;
        }
        [self.watermarks.get(of), token]
            .into_iter()
            .flatten()
            .filter(|w| w.database == db.reference())
            .reduce(Watermark::max)
            .map(|w| w.gtid)
    }

    /// The order `id` from the server `read` calls for (a `session` read waits for
    /// `watermark`); a `session` read that a replica answers with "no such order" asks the
    /// primary (the create may not have arrived there yet, and an absence must never be
    /// cached from a lagging copy). An order old enough to be archived that the shard does
    /// not have is then looked for in the archive.
    async fn load_order(
        &self,
        shard: &Shard,
        id: OrderId,
        consistency: Consistency,
        watermark: Option<Gtid>,
    ) -> Result<(Option<Order>, Served)> {
        let db = self.shards.database(shard);
        let tables = shard.tables.clone();
        let query = replicas::query(move |c| -> ReadQuery<'_, Option<Order>> {
            let t = tables.clone();
            Box::pin(async move { orders::load_order(c, &t, id).await })
        });
        let mut found = db.read(consistency, watermark.as_ref(), &query).await?;
        if found.value.is_none()
            && found.served == replicas::Served::Replica
            && consistency == Consistency::Session
        {
            found = db.read(Consistency::Strong, None, &query).await?;
        }
        let served = Served::of(&found);
        if found.value.is_some() {
            return Ok((found.value, served));
        }
        Ok(match self.archived(id).await? {
            Some(o) => (Some(o), Served::Archive),
            None => (None, served),
        })
    }

    /// The service's shard map, with its pools: inside the crate only (health, jobs); the
    /// harness reads rows through pools of its own.
    pub(crate) fn shards(&self) -> &ShardMap {
        &self.shards
    }

    pub(crate) fn commerce(&self) -> &MySqlPool {
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

    async fn conn(&self, shard: &Shard) -> Result<PoolConnection<MySql>> {
        Ok(self
            .shards
            .primary(shard)
            .acquire()
            .await
            .map_err(StorageError::from)?)
    }

    // ------------------------------------------------------------------ create

    #[tracing::instrument(skip_all, fields(order_id = tracing::field::Empty, shard = tracing::field::Empty, caller = ?caller))]
    pub async fn create(&self, caller: Caller, req: CreateOrderRequest) -> Result<(Order, Created)> {
        let Caller::User(user) = caller else {
            return Err(Error::Forbidden("only a buyer creates orders"));
        };
        if !req.from_cart {
            let new = NewOrder::parse(user, req)?;
            return self.create_new(user, new).await;
        }
        self.create_from_cart(user, req).await
    }

    /// A create of what the cart holds (`from_cart: true`). The order's content is the cart's
    /// lines as they were when it was created, so:
    /// - the cart is read *before* the order id is checked: a replay that reads a cart the
    ///   first attempt already emptied finds that attempt's order;
    /// - a replay of an order that exists is compared with the order's own lines (the cart
    ///   has changed since), and answered as it was;
    /// - only the attempt that wrote the order removes the purchased lines, once per order id
    ///   (the cart records it), each line by the ordered quantity: what was added since stays.
    async fn create_from_cart(&self, user: UserId, req: CreateOrderRequest) -> Result<(Order, Created)> {
        let cart = self.carts.load(user).await?;
        let lines = cart.cart.order_lines();
        if let Some(id) = OrderId::parse(&req.order_id).filter(|id| id.gene() == Gene::of_user(user)) {
            let shard = self.shards.of_order(id);
            let mut conn = self.conn(shard).await?;
            if let IdState::Taken(stored) = orders::id_state(&mut conn, &shard.tables, id).await? {
                let order = orders::load_order(&mut conn, &shard.tables, id)
                    .await?
                    .ok_or(Error::NotFound)?;
                let bought: Vec<NewLine> = order
                    .items
                    .iter()
                    .map(|l| NewLine {
                        product_id: l.product_id,
                        quantity: l.quantity,
                    })
                    .collect();
                let new = NewOrder::parse_from_cart(user, req, &bought)?;
                return self
                    .replay(&mut conn, shard, id, &stored, &new.request_hash())
                    .await;
            }
        }
        let new = NewOrder::parse_from_cart(user, req, &lines)?;
        let (order, created) = self.create_new(user, new.clone()).await?;
        if created == Created::New {
            if let Err(e) = self.carts.check_out(user, order.order_id, &new.lines).await {
                // The order stands; its lines stay in the cart, where the buyer sees them.
                tracing::warn!(order_id = %order.order_id, error = %e, "order created; its lines could not be removed from the cart");
            }
        }
        Ok((order, created))
    }

    async fn create_new(&self, user: UserId, new: NewOrder) -> Result<(Order, Created)> {
        let hash = new.request_hash();
        let shard = self.shards.of_order(new.order_id);
        tracing::Span::current()
            .record("order_id", tracing::field::display(new.order_id))
            .record("shard", shard.index.get());
        // Flash lines ask their sale's gate first, before any SQL: most buyers of a sold-out
        // sale end here. (An order id the sale has seen before is let through to the
        // database, so a replay is answered as it was.) `bounds` holds the database path's
        // places while a gate cannot answer.
        let priced_at = Utc::now();
        let products: Vec<_> = new.lines.iter().map(|l| l.product_id).collect();
        let sales = self.flash.live_for(&products, priced_at).await?;
        let mut gated = Vec::new();
        let mut bounds = Vec::new();
        for sale in &sales {
            let units: i64 = new
                .lines
                .iter()
                .filter(|l| l.product_id == sale.product_id)
                .map(|l| l.quantity)
                .sum();
            let refusal = match self.flash.take(sale, new.order_id, user, units).await {
                Admission::Took => {
                    gated.push(sale.sale_id);
                    continue;
                }
                Admission::Already | Admission::Known => continue,
                Admission::Fallback(place) => {
                    bounds.push(place);
                    continue;
                }
                Admission::Busy => Error::Unavailable("the flash sale's queue is full; retry".into()),
                Admission::SoldOut => Error::OutOfStock {
                    product_id: sale.product_id,
                },
                Admission::OverLimit { limit } => Error::FlashLimit {
                    sale_id: sale.sale_id,
                    limit,
                },
            };
            self.flash.give_back(new.order_id, &gated).await;
            return Err(refusal);
        }
        // From here until the reservation answers, every way out gives the gates' units back.
        let before_reserve = async {
            let mut conn = self.conn(shard).await?;
            match orders::id_state(&mut conn, &shard.tables, new.order_id).await? {
                IdState::Taken(stored) => {
                    return Ok(Err(self
                        .replay(&mut conn, shard, new.order_id, &stored, &hash)
                        .await))
                }
                IdState::Voided => return Err(voided_id()),
                IdState::Free => {}
            }
            drop(conn);
            check_id_is_fresh(new.order_id, Utc::now())?;
            let pricing = self
                .price_with(
                    user,
                    Some(new.order_id),
                    &new.lines,
                    &new.coupon_ids,
                    priced_at,
                    &sales,
                )
                .await?;
            Ok(Ok(pricing))
        }
        .await;
        let mut pricing = match before_reserve {
            Ok(Ok(pricing)) => pricing,
            Ok(Err(replayed)) => {
                self.flash.give_back(new.order_id, &gated).await;
                return replayed;
            }
            Err(e) => {
                self.flash.give_back(new.order_id, &gated).await;
                return Err(e);
            }
        };
        let flash_lines: Vec<FlashLine> = sales
            .iter()
            .map(|s| FlashLine {
                product_id: s.product_id,
                sale_id: s.sale_id,
                per_user_limit: s.per_user_limit,
            })
            .collect();
        let attempt: i64 = rand::random();
        let unit_prices: Vec<(ProductId, i64)> = pricing
            .items
            .iter()
            .map(|l| (l.product_id, l.unit_price.minor()))
            .collect();
        let reservation = Reservation {
            order_id: new.order_id,
            user_id: user,
            request_hash: &hash,
            attempt,
            lines: &new.lines,
            coupons: &new.coupon_ids,
            max_held_units: self.max_unpaid_units,
            flash: &flash_lines,
            priced_at,
            unit_prices: &unit_prices,
        };
        let reserved = async {
            let mut outcome = ReserveOutcome::Vanished;
            for _ in 0..3 {
                outcome = retry_deadlocks(|| async {
                    let mut c = self.commerce.acquire().await?;
                    commerce::reserve(&mut c, &reservation, now()).await
                })
                .await?;
                if outcome != ReserveOutcome::Vanished {
                    break;
                }
            }
            Ok::<_, StorageError>(outcome)
        }
        .await;
        drop(bounds);
        if !matches!(
            reserved,
            Ok(ReserveOutcome::Reserved | ReserveOutcome::AlreadyReserved)
        ) {
            // Nothing was reserved for this order (or the outcome is unknown, and the gate
            // may then be one unit optimistic: MySQL refuses what it lets through): what its
            // gates took goes back.
            self.flash.give_back(new.order_id, &gated).await;
        }
        let outcome = reserved?;
        let counted = match outcome {
            ReserveOutcome::Reserved => "reserved",
            ReserveOutcome::AlreadyReserved => "already_reserved",
            ReserveOutcome::Vanished => "vanished",
            ReserveOutcome::Conflict => "conflict",
            ReserveOutcome::OutOfStock(_) => "out_of_stock",
            ReserveOutcome::CouponUnavailable(_) => "coupon_unavailable",
            ReserveOutcome::LimitExceeded { .. } | ReserveOutcome::FlashLimit { .. } => "limit_exceeded",
        };
        metrics::counter!("orderly_reservations_total", "outcome" => counted).increment(1);
        let mut sales = sales;
        match outcome {
            ReserveOutcome::Reserved => {}
            ReserveOutcome::AlreadyReserved => {
                // An earlier attempt reserved this order at its own terms (perhaps inside a
                // flash sale that has ended since, or before one began): the order is
                // written at exactly those, and what this attempt took at a gate goes back.
                let terms = self.claimed_terms(new.order_id, &new, &gated).await?;
                if let Some((claimed_pricing, claimed_sales)) = terms {
                    pricing = claimed_pricing;
                    sales = claimed_sales;
                }
            }
            ReserveOutcome::Vanished => {
                return Err(Error::Unavailable("the order's claim keeps changing".into()))
            }
            ReserveOutcome::Conflict => return Err(Error::IdempotencyConflict),
            ReserveOutcome::OutOfStock(product_id) => return Err(Error::OutOfStock { product_id }),
            ReserveOutcome::CouponUnavailable(coupon_id) => {
                return Err(Error::CouponUnavailable { coupon_id })
            }
            ReserveOutcome::LimitExceeded { held } => {
                return Err(Error::LimitExceeded {
                    held,
                    max: self.max_unpaid_units.unwrap_or_default(),
                })
            }
            ReserveOutcome::FlashLimit { sale, limit, .. } => {
                return Err(Error::FlashLimit { sale_id: sale, limit })
            }
        }

        // Tests stop a create here, reserved but not written (as a process that died between
        // the two commits would): `return(<order id>)`.
        #[cfg(feature = "failpoints")]
        if let Some(Some(arg)) = fail::eval("orders::after_reserve", |arg| arg) {
            if arg == new.order_id.to_string() {
                return Err(Error::Unavailable("failpoint orders::after_reserve".into()));
            }
        }
        let created = now();
        // An order of a flash sale gets the sale's payment timeout (the shortest, with two).
        let timeout = sales
            .iter()
            .map(FlashSale::payment_timeout)
            .min()
            .unwrap_or(TimeDelta::seconds(self.settings.payment_timeout_secs as i64));
        let deadline = created + timeout;
        let order = Order::from_new(&new, pricing.clone(), created, deadline);
        // A deadlock with the sweeper's void transaction is retried: the retry either writes
        // the order or finds the void.
        let write = OrderWrite::Create {
            order: &new,
            pricing: &pricing,
            request_hash: &hash,
            now: created,
            pay_deadline: deadline,
        };
        let written = self.commit(shard, write, Snapshot::Known(Box::new(order))).await;
        // No claim confirmation here: it would be a third commit on every create. The sweeper
        // confirms the claims whose order it finds.
        match written {
            Ok(Ok((_, Some(order)))) => Ok((order, Created::New)),
            Ok(Ok((_, None))) => Err(Error::Unavailable("a new order without its snapshot".into())),
            Ok(Err(_)) => {
                self.abandon(shard, new.order_id, attempt).await;
                Err(voided_id())
            }
            Err(StorageError::Duplicate(_)) => {
                let mut conn = self.conn(shard).await?;
                let stored = orders::request_hash_of(&mut conn, &shard.tables, new.order_id)
                    .await?
                    .ok_or_else(|| Error::Unavailable("order vanished after a duplicate key".into()))?;
                self.replay(&mut conn, shard, new.order_id, &stored, &hash).await
            }
            // A lost connection leaves the outcome unknown (the commit may have happened):
            // only the sweeper, after the grace period, may decide.
            Err(e) if e.is_connection_failure() => Err(e.into()),
            Err(e) => {
                self.abandon(shard, new.order_id, attempt).await;
                Err(e.into())
            }
        }
    }

    /// The pricing and flash sales an earlier attempt of `id` reserved at (see
    /// [`commerce::claim_terms`]), after giving back what this attempt took at gates of sales
    /// those terms do not name. `None`: the claim records no terms (made before they were
    /// recorded); the order is priced anew, as it was then.
    async fn claimed_terms(
        &self,
        id: OrderId,
        new: &NewOrder,
        gated: &[FlashSaleId],
    ) -> Result<Option<(Pricing, Vec<FlashSale>)>> {
        let terms = {
            let mut c = self.commerce.acquire().await.map_err(StorageError::from)?;
            commerce::claim_terms(&mut c, id).await?
        };
        let Some(terms) = terms else {
            return Ok(None);
        };
        let mut sales = Vec::new();
        for sale in terms.lines.iter().filter_map(|(_, _, sale)| *sale) {
            if let Some(s) = crate::storage::flash::load_sale(&self.commerce, sale).await? {
                sales.push(s);
            }
        }
        let not_claimed: Vec<FlashSaleId> = gated
            .iter()
            .copied()
            .filter(|g| !sales.iter().any(|s| s.sale_id == *g))
            .collect();
        self.flash.give_back(id, &not_claimed).await;
        let claimed_price = |p: ProductId| {
            terms
                .lines
                .iter()
                .find(|(q, _, _)| *q == p)
                .and_then(|(_, price, _)| Money::new(*price))
        };
        let pricing = self
            .price_at(
                new.user_id,
                Some(id),
                &new.lines,
                &new.coupon_ids,
                terms.priced_at,
                claimed_price,
            )
            .await?;
        Ok(Some((pricing, sales)))
    }

    async fn replay(
        &self,
        conn: &mut PoolConnection<MySql>,
        shard: &Shard,
        id: OrderId,
        stored_hash: &[u8],
        hash: &[u8; 32],
    ) -> Result<(Order, Created)> {
        if stored_hash != hash.as_slice() {
            return Err(Error::IdempotencyConflict);
        }
        let order = orders::load_order(conn, &shard.tables, id)
            .await?
            .ok_or(Error::NotFound)?;
        self.after_replay(&order).await;
        Ok((order, Created::Replay))
    }

    /// What a replayed write owes the readers: the first attempt may have committed and then
    /// lost its [`Self::after_commit`] (its process killed, its step cut off between COMMIT
    /// and the notice), so a replay, which read the order from the primary, notifies the
    /// cache of it as the write would have. A notice of a version the cache already has
    /// changes nothing.
    async fn after_replay(&self, order: &Order) {
        metrics::counter!("orderly_order_replays_total").increment(1);
        self.cache
            .order_written(order.order_id, order.user_id, order.version, Some(order))
            .await;
    }

    /// The order write failed or found its id void: give the reservation back now if the
    /// order is surely not there and this was the only attempt ever. Anything uncertain is
    /// left to the sweeper (which voids the id before it gives back).
    async fn abandon(&self, shard: &Shard, id: OrderId, attempt: i64) {
        let absent = match self.conn(shard).await {
            Ok(mut c) => matches!(orders::request_hash_of(&mut c, &shard.tables, id).await, Ok(None)),
            Err(_) => false,
        };
        if !absent {
            return;
        }
        let result = async {
            let mut c = self.commerce.acquire().await?;
            commerce::abandon_claim(&mut c, id, attempt, true, now()).await
        }
        .await;
        match result {
            Ok(given) => {
                self.flash.give_back(id, given.flash_sales()).await;
                tracing::info!(order_id = %id, gave_back = given.done(), "create failed; reservation abandoned")
            }
            Err(e) => {
                tracing::warn!(order_id = %id, error = %e, "create failed; sweeper will return the reservation")
            }
        }
    }

    /// Prices `lines` at `at`: a product of a flash sale live then at the sale price. Also
    /// answers those sales.
    async fn price(
        &self,
        user: UserId,
        order: Option<OrderId>,
        lines: &[crate::domain::order::NewLine],
        coupons: &[crate::domain::ids::CouponId],
        at: DateTime<Utc>,
    ) -> Result<(Pricing, Vec<FlashSale>)> {
        let ids: Vec<_> = lines.iter().map(|l| l.product_id).collect();
        let sales = self.flash.live_for(&ids, at).await?;
        let pricing = self.price_with(user, order, lines, coupons, at, &sales).await?;
        Ok((pricing, sales))
    }

    /// Prices `lines` at `at` with `sales` (the flash sales live then for its products).
    async fn price_with(
        &self,
        user: UserId,
        order: Option<OrderId>,
        lines: &[crate::domain::order::NewLine],
        coupons: &[crate::domain::ids::CouponId],
        at: DateTime<Utc>,
        sales: &[FlashSale],
    ) -> Result<Pricing> {
        let sale_price = |p: ProductId| sales.iter().find(|s| s.product_id == p).map(|s| s.sale_price);
        self.price_at(user, order, lines, coupons, at, sale_price).await
    }

    /// Prices `lines` at `at`, each product at `price_of` it where that names a price, else at
    /// the catalog's.
    async fn price_at(
        &self,
        user: UserId,
        order: Option<OrderId>,
        lines: &[crate::domain::order::NewLine],
        coupons: &[crate::domain::ids::CouponId],
        at: DateTime<Utc>,
        price_of: impl Fn(ProductId) -> Option<Money>,
    ) -> Result<Pricing> {
        let ids: Vec<_> = lines.iter().map(|l| l.product_id).collect();
        let products: Vec<_> = commerce::load_products(&self.commerce, &ids)
            .await?
            .iter()
            .map(|p| {
                let mut snapshot = p.snapshot();
                if let Some(price) = price_of(p.product_id) {
                    snapshot.price = price;
                }
                snapshot
            })
            .collect();
        let coupon_rows = commerce::load_coupons(&self.commerce, coupons).await?;
        Ok(price_order(
            user,
            order,
            lines,
            coupons,
            &products,
            &coupon_rows,
            at,
        )?)
    }

    pub async fn preview(&self, caller: Caller, req: PreviewRequest) -> Result<Pricing> {
        let Caller::User(user) = caller else {
            return Err(Error::Forbidden("only a buyer previews orders"));
        };
        let cart = if req.from_cart {
            Some(self.carts.load(user).await?.cart.order_lines())
        } else {
            None
        };
        let (lines, coupons) = parse_preview(&req, cart.as_deref())?;
        Ok(self.price(user, None, &lines, &coupons, Utc::now()).await?.0)
    }

    // ------------------------------------------------------------------ read

    /// The order if `caller` may see it; another party's order is `NotFound`.
    #[tracing::instrument(skip_all, fields(order_id = %id, shard = self.shards.of_order(id).index.get(), caller = ?caller))]
    ///
    /// `session` (the default) reads through the cache, whose loader reads a replica that has
    /// the order's latest write; `eventual` takes a cache hit or any replica's copy and never
    /// fills the cache; `strong` reads the primary.
    pub async fn get(&self, caller: Caller, id: OrderId, read: ReadOptions) -> Result<(Order, Served)> {
        if caller == Caller::Service {
            return Err(Error::Forbidden("the payment channel reads no orders"));
        }
        if cannot_exist(caller, id, Utc::now()) {
            return Err(Error::NotFound);
        }
        let shard = self.shards.of_order(id);
        let served = &ServedCell::default();
        let db = self.shards.database(shard);
        let of = WatermarkOf::Order(id);
        let order = match read.consistency {
            Consistency::Session => {
                self.cache
                    .order(id, db.reference(), || async move {
                        let watermark = self.watermark(db, of, read.token);
                        let (found, from) = self
                            .load_order(shard, id, Consistency::Session, watermark)
                            .await?;
                        served.set(from);
                        Ok::<_, Error>(found)
                    })
                    .await?
            }
            Consistency::Eventual => match self.cache.order_hit(id).await {
                Some(hit) => hit,
                None => {
                    let (found, from) = self.load_order(shard, id, Consistency::Eventual, None).await?;
                    served.set(from);
                    found
                }
            },
            Consistency::Strong => {
                let (found, from) = self.load_order(shard, id, Consistency::Strong, None).await?;
                served.set(from);
                found
            }
        };
        match order {
            Some(o) if caller.can_see(&o) => Ok((o, served.get())),
            _ => Err(Error::NotFound),
        }
    }

    async fn load_visible(
        &self,
        conn: &mut PoolConnection<MySql>,
        shard: &Shard,
        caller: Caller,
        id: OrderId,
    ) -> Result<Order> {
        match orders::load_order(conn, &shard.tables, id).await? {
            Some(o) if caller.can_see(&o) => Ok(o),
            Some(_) => Err(Error::NotFound),
            None => Err(self.absent(caller, id).await),
        }
    }

    /// Why a change of `id`, which its shard does not hold, is refused: `archived` if the
    /// caller may see it in the archive, else `not_found`.
    async fn absent(&self, caller: Caller, id: OrderId) -> Error {
        match self.archived(id).await {
            Ok(Some(o)) if caller.can_see(&o) => Error::Archived,
            Ok(_) => Error::NotFound,
            Err(e) => e,
        }
    }

    #[tracing::instrument(skip_all, fields(user_id = tracing::field::Empty, shard = tracing::field::Empty, caller = ?caller))]
    ///
    /// Read like [`Self::get`]: the cached first page in `session` mode, else the server
    /// `read` calls for, with the user's watermark (the newest write of any of their orders).
    pub async fn list(&self, caller: Caller, p: ListParams, read: ReadOptions) -> Result<OrderPage> {
        let user = match (caller, p.user_id) {
            (Caller::User(u), None) => u,
            (Caller::User(u), Some(asked)) if asked == u => u,
            (Caller::User(_), Some(_)) => {
                return Err(FieldErrors::single("user_id", "a buyer lists only their own orders").into())
            }
            (Caller::Admin(_), Some(u)) => u,
            (Caller::Admin(_), None) => {
                return Err(FieldErrors::single("user_id", "required for administrators").into())
            }
            (Caller::Merchant { .. } | Caller::Service, _) => {
                return Err(Error::Forbidden("only buyers and administrators list orders"))
            }
        };
        let (limit, before) = p.filters.page()?;
        let p = p.filters;
        let shard = self.shards.of_user(user);
        tracing::Span::current()
            .record("user_id", tracing::field::display(user))
            .record("shard", shard.index.get());
        let db = self.shards.database(shard);
        let of = WatermarkOf::User(user);
        let unfiltered = p.status.is_none() && p.created_from.is_none() && p.created_to.is_none();
        let cached = unfiltered && before.is_none() && (limit as usize) < FIRST_PAGE;
        let query = ListQuery {
            user_id: user,
            status: p.status,
            created_from: p.created_from,
            created_to: p.created_to,
            before,
            limit: if cached { FIRST_PAGE as u32 } else { limit + 1 },
        };
        let archive_query = ListQuery {
            limit: limit + 1,
            ..query.clone()
        };
        // Once for the read and the merge: they agree on whether the page reaches the
        // archive (the read asks for at least as many orders as the merge wants).
        let horizon = self.archive.as_ref().map(|a| archive_horizon(a.min_age));
        let tables = shard.tables.clone();
        let list = replicas::query(move |c| -> ReadQuery<'_, HotPage> {
            let (t, q) = (tables.clone(), query.clone());
            Box::pin(async move {
                let orders = orders::list_user_orders(c, &t, &q).await?;
                // After the list, on its connection: see `merge_archived`.
                let archived = match horizon {
                    Some(h) if reaches_archive(&orders, &q, h) => {
                        Some(orders::has_archived_orders(c, &t, q.user_id).await?)
                    }
                    _ => None,
                };
                Ok(HotPage { orders, archived })
            })
        });
        let served = ServedCell::default();
        let loaded = ArchivedCell::default();
        let list = &list;
        let (served, loaded) = (&served, &loaded);
        let (mut page, archived) = if cached && read.consistency == Consistency::Session {
            let page = self
                .cache
                .first_page(user, db.reference(), || async move {
                    let watermark = self.watermark(db, of, read.token);
                    let found = db.read(read.consistency, watermark.as_ref(), list).await?;
                    served.set(Served::of(&found));
                    loaded.set(found.value.archived);
                    Ok::<_, Error>(found.value.orders)
                })
                .await?;
            // A page from Redis (or another request's load) comes without it.
            (page, loaded.get())
        } else {
            let watermark = match read.consistency {
                Consistency::Session => self.watermark(db, of, read.token),
                _ => None,
            };
            let found = db.read(read.consistency, watermark.as_ref(), list).await?;
            served.set(Served::of(&found));
            (found.value.orders, found.value.archived)
        };
        let from_archive = match horizon {
            Some(h) => {
                self.merge_archived(&mut page, &archive_query, h, shard, archived)
                    .await
            }
            None => FromArchive::Nothing,
        };
        if from_archive == FromArchive::Added {
            served.set(Served::Archive);
        }
        let next = if page.len() > limit as usize {
            page.truncate(limit as usize);
            page.last().map(encode_cursor)
        } else {
            None
        };
        Ok(OrderPage {
            orders: page,
            next_cursor: next,
            served: served.get(),
            archive_unavailable: from_archive == FromArchive::Unavailable,
        })
    }

    /// Whether the shard records archived orders of `user`, read on its primary: for a page
    /// read without it (from the cache), which may come from a newer copy than a replica.
    /// If the primary cannot say, assumed (the archive is asked).
    async fn archive_recorded(&self, shard: &Shard, user: UserId) -> bool {
        let db = self.shards.database(shard);
        let tables = shard.tables.clone();
        let query = replicas::query(move |c| -> ReadQuery<'_, bool> {
            let t = tables.clone();
            Box::pin(async move { orders::has_archived_orders(c, &t, user).await })
        });
        match db.read(Consistency::Strong, None, &query).await {
            Ok(found) => found.value,
            Err(e) => {
                tracing::warn!(error = %e, %user, "cannot read whether the buyer has archived orders; asking the archive");
                true
            }
        }
    }

    /// Adds the user's archived orders that belong in `page` (the shard's, newest first, read
    /// before this), unless the page is full of orders too young to be archived (before
    /// `horizon`), or the shard has no record of archived orders of the buyer: `archived`,
    /// read after the page on its connection, or (`None`) now on the shard's primary. The
    /// shard is read first, the archive second: an order moving meanwhile is in the archive
    /// before it leaves the shard, and the transaction that deletes it there records its
    /// buyer, so the page misses none; one in both places is shown once, as the shard has it.
    /// An archive that fails or does not answer within `archive.read_timeout_ms` leaves the
    /// page as the shard has it ([`FromArchive::Unavailable`]): never a failed list.
    async fn merge_archived(
        &self,
        page: &mut Vec<Order>,
        q: &ListQuery,
        horizon: DateTime<Utc>,
        shard: &Shard,
        archived: Option<bool>,
    ) -> FromArchive {
        let Some(a) = &self.archive else {
            return FromArchive::Nothing;
        };
        if !reaches_archive(page, q, horizon) {
            return FromArchive::Nothing;
        }
        let recorded = match archived {
            Some(known) => known,
            None => self.archive_recorded(shard, q.user_id).await,
        };
        if !recorded {
            return FromArchive::Nothing;
        }
        let query = q.clone();
        let found = a
            .read(move |c| -> ReadQuery<'_, Vec<Order>> {
                Box::pin(async move { crate::storage::archive::list_user_orders(c, &query).await })
            })
            .await;
        let mut older: std::collections::HashMap<i64, Order> = match found {
            Ok(orders) => orders.into_iter().map(|o| (o.order_id.get(), o)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, user = %q.user_id, "the archive did not answer; the list is its hot part");
                return FromArchive::Unavailable;
            }
        };
        // In both places mid-move, or a lagging replica's copy of an order that has since
        // moved and taken money in the archive: the newer version is the order.
        for o in page.iter_mut() {
            if let Some(newer) = older.remove(&o.order_id.get()).filter(|x| x.version > o.version) {
                *o = newer;
            }
        }
        let hot: std::collections::HashSet<i64> = page.iter().map(|o| o.order_id.get()).collect();
        let before = page.len();
        page.extend(older.into_values());
        if page.len() == before {
            return FromArchive::Nothing;
        }
        page.sort_by_key(|o| std::cmp::Reverse((o.created_at, o.order_id.get())));
        page.truncate((q.limit as usize).max(before));
        match page.iter().any(|o| !hot.contains(&o.order_id.get())) {
            true => FromArchive::Added,
            false => FromArchive::Nothing,
        }
    }

    // ------------------------------------------------------------------ life cycle

    /// Loads the order for a versioned change by `caller`, checks the version and the move.
    async fn status_change(
        &self,
        caller: Caller,
        id: OrderId,
        expected_version: i64,
        command: Command,
        change: impl FnOnce(&Order) -> StatusChange,
        allowed: impl Fn(Caller, &Order) -> bool,
    ) -> Result<Order> {
        let shard = self.shards.of_order(id);
        let mut conn = self.conn(shard).await?;
        let order = self.load_visible(&mut conn, shard, caller, id).await?;
        if !allowed(caller, &order) {
            return Err(Error::Forbidden("this party may not do this to the order"));
        }
        if order.version != expected_version {
            return Err(Error::VersionConflict {
                current_version: order.version,
            });
        }
        let to =
            transition(order.status, command).map_err(|e| Error::InvalidTransition { status: e.from })?;
        let change = change(&order);
        drop(conn);
        let write = OrderWrite::Status {
            id,
            expected_version,
            from: order.status,
            to,
            change: &change,
            now: now(),
        };
        let snapshot = if to.releases_stock() {
            // The release below writes again; the answer is reloaded after it.
            Snapshot::None
        } else {
            Snapshot::Reload
        };
        match self.commit(shard, write, snapshot).await? {
            Ok((_, Some(order))) => return Ok(order),
            Ok((_, None)) => {}
            Err(_) => {
                let mut conn = self.conn(shard).await?;
                return Err(self
                    .explain_lost_race(&mut conn, shard, id, expected_version)
                    .await);
            }
        }
        if to.releases_stock() {
            self.release_stock(shard, id).await;
        }
        let mut conn = self.conn(shard).await?;
        orders::load_order(&mut conn, &shard.tables, id)
            .await?
            .ok_or(Error::NotFound)
    }

    /// A compare-and-set matched nothing: say whether the version or the status moved.
    async fn explain_lost_race(
        &self,
        conn: &mut PoolConnection<MySql>,
        shard: &Shard,
        id: OrderId,
        expected: i64,
    ) -> Error {
        match orders::load_order(conn, &shard.tables, id).await {
            Ok(Some(o)) if o.version != expected => Error::VersionConflict {
                current_version: o.version,
            },
            Ok(Some(o)) => Error::InvalidTransition { status: o.status },
            // Moved to the archive since it was read (the caller could see it then).
            Ok(None) => match self.archived(id).await {
                Ok(Some(_)) => Error::Archived,
                Ok(None) => Error::NotFound,
                Err(e) => e,
            },
            Err(e) => e.into(),
        }
    }

    /// A paid order's units stop counting against its buyer's unpaid cap (idempotent). A
    /// failure is logged: the payment stands, and the channel's retry of it, or the order's
    /// release if it is closed later, clears the units.
    async fn unhold(&self, id: OrderId) {
        let done = retry_deadlocks(|| async {
            let mut c = self.commerce.acquire().await?;
            commerce::unhold_claim(&mut c, id).await
        })
        .await;
        if let Err(e) = done {
            tracing::warn!(order_id = %id, error = %e, "could not free the units of a paid order");
        }
    }

    /// Gives back the stock and coupons of a closed or invalidated order. Exactly once: the
    /// claim's state change guards it. If this fails, the order stays `release_pending` and
    /// the sweeper finishes the job.
    pub(crate) async fn release_stock(&self, shard: &Shard, id: OrderId) {
        let released = async {
            let given = retry_deadlocks(|| async {
                let mut c = self.commerce.acquire().await?;
                commerce::release_claim(&mut c, id, now()).await
            })
            .await?;
            self.flash.give_back(id, given.flash_sales()).await;
            self.commit(shard, OrderWrite::StockReleased { id }, Snapshot::None)
                .await
        }
        .await;
        if let Err(e) = released {
            tracing::warn!(order_id = %id, error = %e, "stock release deferred to the sweeper");
        }
    }

    #[tracing::instrument(skip_all, fields(order_id = %id, shard = self.shards.of_order(id).index.get(), caller = ?caller))]
    pub async fn patch(&self, caller: Caller, id: OrderId, req: PatchRequest) -> Result<Order> {
        let mut errors = FieldErrors::default();
        check_version(&mut errors, req.expected_version);
        if let Some(a) = &req.address {
            a.check(&mut errors, "address");
        }
        if let Some(r) = &req.remark {
            check_text(&mut errors, "remark", r, MAX_REMARK_CHARS, false);
        }
        if let Some(t) = &req.tracking_number {
            check_reference(&mut errors, "tracking_number", t, MAX_TRACKING_CHARS);
        }
        if let Some(c) = &req.carrier {
            check_text(&mut errors, "carrier", c, MAX_CARRIER_CHARS, true);
        }
        let buyer_fields = req.address.is_some() || req.remark.is_some();
        let shop_fields = req.tracking_number.is_some() || req.carrier.is_some();
        if !buyer_fields && !shop_fields {
            errors.push("body", "names no field to change");
        }
        errors.into_result(())?;
        let fields = match (buyer_fields, shop_fields) {
            (true, true) => PatchFields::Both,
            (true, false) => PatchFields::Buyer,
            _ => PatchFields::Shop,
        };
        let allowed = patchable_in(caller.role(), fields).map_err(|r| match r {
            PatchRefusal::Forbidden(why) => Error::Forbidden(why),
            PatchRefusal::NotNow => Error::Forbidden("not allowed"),
        })?;
        let shard = self.shards.of_order(id);
        let mut conn = self.conn(shard).await?;
        let order = self.load_visible(&mut conn, shard, caller, id).await?;
        drop(conn);
        if order.version != req.expected_version {
            return Err(Error::VersionConflict {
                current_version: order.version,
            });
        }
        if !allowed.contains(&order.status) {
            return Err(Error::InvalidTransition { status: order.status });
        }
        let changes = FieldChanges {
            address: req.address,
            remark: req.remark,
            tracking_number: req.tracking_number,
            carrier: req.carrier,
        };
        let write = OrderWrite::Fields {
            id,
            expected_version: req.expected_version,
            status: order.status,
            changes: &changes,
            now: now(),
        };
        match self.commit(shard, write, Snapshot::Reload).await? {
            Ok((_, Some(order))) => Ok(order),
            Ok((_, None)) => {
                let mut conn = self.conn(shard).await?;
                orders::load_order(&mut conn, &shard.tables, id)
                    .await?
                    .ok_or(Error::NotFound)
            }
            Err(_) => {
                let mut conn = self.conn(shard).await?;
                Err(self
                    .explain_lost_race(&mut conn, shard, id, req.expected_version)
                    .await)
            }
        }
    }

    #[tracing::instrument(skip_all, fields(order_id = %id, shard = self.shards.of_order(id).index.get(), caller = ?caller))]
    pub async fn ship(&self, caller: Caller, id: OrderId, req: ShipmentRequest) -> Result<Order> {
        if !matches!(caller, Caller::Merchant { .. }) {
            return Err(Error::Forbidden("only the shop ships"));
        }
        let mut errors = FieldErrors::default();
        check_version(&mut errors, req.expected_version);
        check_reference(
            &mut errors,
            "tracking_number",
            &req.tracking_number,
            MAX_TRACKING_CHARS,
        );
        check_text(&mut errors, "carrier", &req.carrier, MAX_CARRIER_CHARS, true);
        errors.into_result(())?;
        let change = StatusChange {
            carrier: Some(req.carrier),
            tracking_number: Some(req.tracking_number),
            ..Default::default()
        };
        self.status_change(
            caller,
            id,
            req.expected_version,
            Command::Ship,
            |_| change,
            |c, o| c.is_shop_of(o),
        )
        .await
    }

    #[tracing::instrument(skip_all, fields(order_id = %id, shard = self.shards.of_order(id).index.get(), caller = ?caller))]
    pub async fn confirm(&self, caller: Caller, id: OrderId, req: VersionedRequest) -> Result<Order> {
        if !matches!(caller, Caller::User(_)) {
            return Err(Error::Forbidden("only the buyer confirms receipt"));
        }
        self.versioned_checks(&req)?;
        self.status_change(
            caller,
            id,
            req.expected_version,
            Command::Confirm,
            |_| StatusChange::default(),
            |c, o| c.is_owner(o),
        )
        .await
    }

    #[tracing::instrument(skip_all, fields(order_id = %id, shard = self.shards.of_order(id).index.get(), caller = ?caller))]
    pub async fn cancel(&self, caller: Caller, id: OrderId, req: VersionedRequest) -> Result<Order> {
        if !matches!(caller, Caller::User(_) | Caller::Admin(_)) {
            return Err(Error::Forbidden("only the buyer or an administrator cancels"));
        }
        self.versioned_checks(&req)?;
        let change = StatusChange {
            close_reason: Some(if req.reason.is_empty() {
                "cancelled".into()
            } else {
                req.reason
            }),
            ..Default::default()
        };
        self.status_change(
            caller,
            id,
            req.expected_version,
            Command::Cancel,
            |_| change,
            |c, o| c.is_owner(o) || c.is_admin(),
        )
        .await
    }

    #[tracing::instrument(skip_all, fields(order_id = %id, shard = self.shards.of_order(id).index.get(), caller = ?caller))]
    pub async fn invalidate(&self, caller: Caller, id: OrderId, req: VersionedRequest) -> Result<Order> {
        if !caller.is_admin() {
            return Err(Error::Forbidden("only an administrator invalidates orders"));
        }
        self.versioned_checks(&req)?;
        let reason = if req.reason.is_empty() {
            "invalidated".into()
        } else {
            req.reason
        };
        let change = |current: &Order| StatusChange {
            close_reason: Some(reason),
            // Money already received must go back to the buyer.
            refund_required: current.net_paid() > 0,
            ..Default::default()
        };
        self.status_change(
            caller,
            id,
            req.expected_version,
            Command::Invalidate,
            change,
            |c, _| c.is_admin(),
        )
        .await
    }

    fn versioned_checks(&self, req: &VersionedRequest) -> Result<()> {
        let mut errors = FieldErrors::default();
        check_version(&mut errors, req.expected_version);
        check_text(&mut errors, "reason", &req.reason, MAX_REASON_CHARS, false);
        Ok(errors.into_result(())?)
    }

    #[tracing::instrument(skip_all, fields(order_id = %id, shard = self.shards.of_order(id).index.get(), caller = ?caller))]
    pub async fn pay(&self, caller: Caller, id: OrderId, req: PaymentRequest) -> Result<MoneyAnswer> {
        if caller != Caller::Service {
            return Err(Error::Forbidden("only the payment channel reports payments"));
        }
        let mut errors = FieldErrors::default();
        check_reference(&mut errors, "transaction_no", &req.transaction_no, 64);
        check_reference(&mut errors, "channel", &req.channel, 32);
        let amount = check_amount(&mut errors, "amount", req.amount);
        errors.into_result(())?;
        let movement = MoneyMovement {
            kind: PaymentKind::Payment,
            transaction_no: req.transaction_no,
            channel: req.channel,
            amount,
            reason: String::new(),
        };
        self.move_money(caller, id, movement).await
    }

    #[tracing::instrument(skip_all, fields(order_id = %id, shard = self.shards.of_order(id).index.get(), caller = ?caller))]
    pub async fn refund(&self, caller: Caller, id: OrderId, req: RefundRequest) -> Result<MoneyAnswer> {
        if !matches!(caller, Caller::Service | Caller::Admin(_)) {
            return Err(Error::Forbidden(
                "only the payment channel or an administrator refunds",
            ));
        }
        let mut errors = FieldErrors::default();
        check_reference(&mut errors, "refund_no", &req.refund_no, 64);
        check_text(&mut errors, "reason", &req.reason, MAX_REASON_CHARS, false);
        let amount = check_amount(&mut errors, "amount", req.amount);
        errors.into_result(())?;
        let movement = MoneyMovement {
            kind: PaymentKind::Refund,
            transaction_no: req.refund_no,
            channel: "refund".into(),
            amount,
            reason: req.reason,
        };
        self.move_money(caller, id, movement).await
    }

    /// Records a payment or refund. The number is first claimed in the commerce database,
    /// so one number can pay or refund only one order across every shard; the shard then
    /// records it (idempotent by number on its own). A number the shard refused for good is
    /// given back by the call that holds the claim, so it is not burned.
    async fn move_money(&self, caller: Caller, id: OrderId, m: MoneyMovement) -> Result<MoneyAnswer> {
        let number = commerce::PaymentNumber {
            transaction_no: &m.transaction_no,
            kind: m.kind,
            order_id: id,
            channel: &m.channel,
            amount: m.amount,
            attempt: rand::random(),
        };
        let mut claim = commerce::NumberClaim::Vanished;
        for _ in 0..3 {
            claim =
                retry_deadlocks(|| commerce::claim_payment_number(&self.commerce, &number, now())).await?;
            if claim != commerce::NumberClaim::Vanished {
                break;
            }
        }
        match claim {
            commerce::NumberClaim::Claimed | commerce::NumberClaim::Same => {}
            commerce::NumberClaim::Conflict => return Err(Error::IdempotencyConflict),
            commerce::NumberClaim::Vanished => {
                return Err(Error::Unavailable(
                    "the payment number's claim keeps changing".into(),
                ))
            }
        };

        let shard = self.shards.of_order(id);
        let write = OrderWrite::Money {
            id,
            movement: &m,
            now: now(),
        };
        // Reloaded after the commit: the cache gets the new version, and so does the answer.
        let mut recorded = self.commit(shard, write, Snapshot::Reload).await;
        // Not in its shard: an archived order's money is recorded against its document.
        let mut archived = false;
        if matches!(recorded, Ok(Err(NotWritten::NotFound))) {
            if let Some(a) = self.archive_for(id).cloned() {
                recorded = self.commit_archived_money(shard, &a, id, &m).await;
                archived = !matches!(recorded, Ok(Err(NotWritten::NotFound)));
            }
        }
        // Refused for good, with nothing recorded under the number. (A shard-level conflict
        // or duplicate means the number *is* recorded there, for another order: its claim
        // stays.)
        let refused = matches!(
            recorded,
            Ok(Err(NotWritten::Mismatch { .. }
                | NotWritten::NotNow(_)
                | NotWritten::NotFound))
        );
        if refused {
            if let Err(e) =
                retry_deadlocks(|| commerce::release_payment_number(&self.commerce, &number)).await
            {
                // The number stays claimed for this order: a retry with the same content
                // still goes through; only its reuse elsewhere is refused.
                tracing::warn!(order_id = %id, error = %e, "could not give a refused payment number back");
            }
        }
        let mut answer = None;
        let replayed = matches!(recorded, Ok(Err(NotWritten::Replay)));
        match recorded {
            Ok(Ok((c, snapshot))) => {
                if c.status.releases_stock() && !c.previous.releases_stock() {
                    self.release_stock(shard, id).await;
                }
                if m.kind == PaymentKind::Payment {
                    self.unhold(id).await;
                }
                // The release bookkeeping leaves the version (and the order as shown) alone.
                answer = snapshot;
            }
            // A replay repairs an unhold that failed the first time.
            Ok(Err(NotWritten::Replay)) if m.kind == PaymentKind::Payment => self.unhold(id).await,
            Ok(Err(NotWritten::Replay)) => {}
            Ok(Err(NotWritten::Conflict)) | Err(StorageError::Duplicate(_)) => {
                return Err(Error::IdempotencyConflict)
            }
            Ok(Err(NotWritten::Mismatch { due })) => {
                return Err(Error::PaymentMismatch {
                    detail: format!("amount {} against {due} due", m.amount),
                })
            }
            Ok(Err(NotWritten::NotNow(status))) => return Err(Error::InvalidTransition { status }),
            Ok(Err(_)) => return Err(Error::NotFound),
            Err(e) => return Err(e.into()),
        }
        let order = match answer {
            Some(order) => order,
            None if archived => self.archived(id).await?.ok_or(Error::NotFound)?,
            None => {
                let mut conn = self.conn(shard).await?;
                orders::load_order(&mut conn, &shard.tables, id)
                    .await?
                    .ok_or(Error::NotFound)?
            }
        };
        if replayed && !archived {
            self.after_replay(&order).await;
        }
        if !caller.can_see(&order) {
            return Err(Error::NotFound);
        }
        Ok(MoneyAnswer { order, archived })
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
            now: now(),
        };
        let committed = match through_door(&mut conn, OrderDoor::Archive(write)).await? {
            Ok(c) => Committed { gtid: gone_at, ..c },
            Err(not) => return Ok(Err(not)),
        };
        let order = crate::storage::archive::load(&mut conn, id).await.ok().flatten();
        drop(conn);
        metrics::counter!("orderly_archived_money_total").increment(1);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let at = DateTime::from_timestamp_micros(1_760_000_000_123_456).unwrap();
        let id = OrderId::new(123456789).unwrap();
        let raw = format!("{CURSOR_PREFIX}{}.{}", at.timestamp_micros(), id.get());
        use base64::Engine;
        let c = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        assert_eq!(decode_cursor(&c), Some((at, id)));
        for bad in ["", "!!", "djEuMTIz", "eDEuMS4y"] {
            assert_eq!(decode_cursor(bad), None, "{bad}");
        }
    }
}
