//! The merchant copy: every order again, sharded by shop instead of by user (SPEC 6), and the
//! per-shop daily reports, both kept by the event stream ([`crate::events::merchant`]).
//!
//! # Layout
//! `merchant.tables` tables `merchant_orders_NN` (a hash of the shop id picks the table),
//! spread over the databases of `[merchant]`; each database also holds `merchant_reports`
//! (one row per shop and day) for the shops of its tables and `projection_state` (how far
//! its copy got). One order lives in one table and its report row in the same database, so
//! one local transaction applies an event to both.
//!
//! # Invariants
//! - **Idempotent by version.** An event is applied only if its version is above the stored
//!   one, read under the row's lock, so a redelivery, a replay or an older event after a
//!   newer one changes nothing: neither the copy nor the reports. The row is made to exist
//!   before it is read (a new order's row is inserted at version 0, which no event has):
//!   under READ COMMITTED a locking read of a missing row locks nothing, and two appliers at
//!   once (two `serve` processes, a rebuild beside one) would both take the order for new.
//! - **Reports are the sum of the copy.** An applied event adds to its order's report row the
//!   difference between the order's new contribution and that of the row it replaced
//!   (nothing, for an order new to the copy), in the same transaction as the copy's row. So
//!   a report row always equals the sums over the copy's orders of that shop and day.
//! - **One lock order.** A transaction locks its copy rows by order id, then its report rows
//!   by shop and day, whatever the order of its events: two appliers wait for each other
//!   instead of deadlocking.

use crate::storage::Db;
use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use sqlx::mysql::MySqlRow;
use sqlx::{AssertSqlSafe, MySqlConnection, Row};

use super::{ts, Result};
use crate::config::{DatabaseSettings, MerchantSettings};
use crate::domain::events::{OrderEvent, OrderSnapshot};
use crate::domain::ids::ShopId;
use crate::domain::shard::mix64;
use crate::domain::status::OrderStatus;

/// The projection's name: its durable consumer and its `projection_state` row.
pub const PROJECTION: &str = "merchant";

/// One table of the copy.
#[derive(Debug, Clone)]
pub struct MerchantTable {
    pub index: u32,
    pub name: String,
    /// Index into [`MerchantMap::pools`].
    pub database: usize,
}

/// The copy's tables and databases. Cheap to clone.
#[derive(Debug, Clone)]
pub struct MerchantMap(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    tables: Vec<MerchantTable>,
    pools: Vec<Db>,
    utc_offset: TimeDelta,
}

impl MerchantMap {
    /// Opens a pool per database of `[merchant]`.
    pub async fn connect(settings: &MerchantSettings, db: &DatabaseSettings) -> Result<MerchantMap> {
        let mut pools = Vec::new();
        let mut tables = Vec::new();
        for (i, d) in settings.databases.iter().enumerate() {
            pools.push(super::connect(&d.url, db).await?);
            for t in d.first_table..=d.last_table {
                tables.push(MerchantTable {
                    index: t,
                    name: format!("merchant_orders_{t:02}"),
                    database: i,
                });
            }
        }
        tables.sort_by_key(|t| t.index);
        Ok(MerchantMap(Arc::new(Inner {
            tables,
            pools,
            utc_offset: TimeDelta::minutes(i64::from(settings.report_utc_offset_minutes)),
        })))
    }

    /// The table of `shop`'s orders (a hash, so consecutive shop ids spread evenly).
    pub fn table_of(&self, shop: i64) -> &MerchantTable {
        let n = self.0.tables.len() as u64;
        &self.0.tables[(mix64(shop as u64) % n) as usize]
    }

    pub fn tables(&self) -> &[MerchantTable] {
        &self.0.tables
    }

    pub fn pools(&self) -> &[Db] {
        &self.0.pools
    }

    pub fn pool(&self, table: &MerchantTable) -> &Db {
        &self.0.pools[table.database]
    }

    /// The report day of an order created at `at`.
    pub fn day_of(&self, at: DateTime<Utc>) -> NaiveDate {
        (at + self.0.utc_offset).date_naive()
    }
}

/// What one order adds to its shop's report row of its day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Contribution {
    units: i64,
    gross: i64,
    discounts: i64,
    paid: i64,
    refunded: i64,
    status: Option<i64>,
}

impl Contribution {
    fn of(o: &OrderSnapshot) -> Self {
        let (paid, refunded) = o.paid_and_refunded();
        Contribution {
            units: o.units(),
            gross: o.total_amount,
            discounts: o.discount_amount,
            paid,
            refunded,
            status: Some(o.status),
        }
    }

    fn stored(row: &MySqlRow) -> Result<Self> {
        let status: i8 = row.try_get("status")?;
        Ok(Contribution {
            units: row.try_get("units")?,
            gross: row.try_get("gross")?,
            discounts: row.try_get("discounts")?,
            paid: row.try_get("paid")?,
            refunded: row.try_get("refunded")?,
            status: Some(i64::from(status)),
        })
    }
}

/// What applying events did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub applied: usize,
    /// Events at or below the stored version (replays, older events): nothing changed.
    pub stale: usize,
}

/// What applied events change in one report row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ReportDelta {
    orders: i64,
    units: i64,
    gross: i64,
    discounts: i64,
    paid: i64,
    refunded: i64,
    by_status: [i64; 6],
}

impl ReportDelta {
    /// The change from `old` (`None`: the order is new to the copy) to `new`.
    fn between(old: Option<Contribution>, new: Contribution) -> Self {
        let orders = i64::from(old.is_none());
        let old = old.unwrap_or_default();
        let mut by_status = [0i64; 6];
        for (s, sign) in [(old.status, -1), (new.status, 1)] {
            if let Some(s) = s.and_then(|s| usize::try_from(s).ok()).filter(|s| *s < 6) {
                by_status[s] += sign;
            }
        }
        ReportDelta {
            orders,
            units: new.units - old.units,
            gross: new.gross - old.gross,
            discounts: new.discounts - old.discounts,
            paid: new.paid - old.paid,
            refunded: new.refunded - old.refunded,
            by_status,
        }
    }

    fn add(&mut self, d: &ReportDelta) {
        self.orders += d.orders;
        self.units += d.units;
        self.gross += d.gross;
        self.discounts += d.discounts;
        self.paid += d.paid;
        self.refunded += d.refunded;
        for (s, x) in self.by_status.iter_mut().zip(d.by_status) {
            *s += x;
        }
    }
}

/// How far a batch of the stream got, as `projection_state` records it in every database of
/// the copy: the events still pending behind it, and the commit time of its newest event.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub pending: u64,
    pub newest: Option<DateTime<Utc>>,
}

/// Applies `events` (all of tables in database `database`) in one transaction: first every
/// copy row, in order id order (an order's events by version), then the report rows they
/// changed, by shop and day (see "One lock order"), then the batch's `progress` in this
/// database's `projection_state` (one commit for the three, not two).
pub async fn apply(
    map: &MerchantMap,
    database: usize,
    events: &[&OrderEvent],
    progress: Progress,
) -> Result<Applied> {
    let mut events = events.to_vec();
    events.sort_by_key(|e| (e.order.order_id, e.order.version));
    let mut conn = map.0.pools[database].acquire().await?;
    let mut tx = crate::storage::pool::begin(&mut conn).await?;
    let mut done = Applied::default();
    let mut reports: BTreeMap<(i64, NaiveDate), ReportDelta> = BTreeMap::new();
    for e in events {
        match apply_one(&mut tx, map, e).await? {
            Some(delta) => {
                done.applied += 1;
                reports
                    .entry((e.order.shop_id, map.day_of(e.order.created_at)))
                    .or_default()
                    .add(&delta);
            }
            None => done.stale += 1,
        }
    }
    for ((shop, day), d) in reports {
        add_to_report(&mut tx, shop, day, &d).await?;
    }
    write_progress(&mut tx, progress).await?;
    tx.commit().await?;
    Ok(done)
}

/// Applies one event to its order's row of the copy, that row locked; answers what it
/// changes in the order's report row, `None` if the event is not newer than the row (nothing
/// changed).
async fn apply_one(
    conn: &mut MySqlConnection,
    map: &MerchantMap,
    e: &OrderEvent,
) -> Result<Option<ReportDelta>> {
    let o = &e.order;
    let t = &map.table_of(o.shop_id).name;
    let new = Contribution::of(o);
    let day = map.day_of(o.created_at);
    let doc = serde_json::to_string(o).map_err(|e| super::corrupt("snapshot", e))?;
    // A row to lock first (see "Idempotent by version"): a new order's at version 0, which
    // the update below moves to the event's. `ON DUPLICATE KEY UPDATE` locks an existing row
    // exclusively; a plain insert's duplicate-key error would take a shared lock, which two
    // appliers could not both upgrade to write.
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {t} (order_id, shop_id, user_id, status, created_at, day, units, gross,
            discounts, paid, refunded, doc, version)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)
         ON DUPLICATE KEY UPDATE order_id = order_id"
    )))
    .bind(o.order_id)
    .bind(o.shop_id)
    .bind(o.user_id)
    .bind(o.status)
    .bind(ts(o.created_at))
    .bind(day)
    .bind(new.units)
    .bind(new.gross)
    .bind(new.discounts)
    .bind(new.paid)
    .bind(new.refunded)
    .bind(&doc)
    .execute(&mut *conn)
    .await?;
    let stored = sqlx::query(AssertSqlSafe(format!(
        "SELECT version, status, units, gross, discounts, paid, refunded FROM {t}
         WHERE order_id = ? FOR UPDATE"
    )))
    .bind(o.order_id)
    .fetch_one(&mut *conn)
    .await?;
    let version: i64 = stored.try_get("version")?;
    if version >= o.version {
        return Ok(None);
    }
    let old = if version == 0 {
        None
    } else {
        Some(Contribution::stored(&stored)?)
    };
    // Guarded by the version read: the report follows only a row that really moved.
    let moved = sqlx::query(AssertSqlSafe(format!(
        "UPDATE {t} SET status = ?, units = ?, gross = ?, discounts = ?, paid = ?, refunded = ?,
            doc = ?, version = ?
         WHERE order_id = ? AND version = ?"
    )))
    .bind(o.status)
    .bind(new.units)
    .bind(new.gross)
    .bind(new.discounts)
    .bind(new.paid)
    .bind(new.refunded)
    .bind(&doc)
    .bind(o.version)
    .bind(o.order_id)
    .bind(version)
    .execute(&mut *conn)
    .await?;
    if moved.rows_affected() != 1 {
        // Not while the row is locked; an error rolls back rather than count a row that did
        // not move (or commit a new order's row at version 0).
        return Err(super::corrupt(
            "merchant copy row moved under its lock",
            o.order_id,
        ));
    }
    Ok(Some(ReportDelta::between(old, new)))
}

/// Adds `d` to the report row of `shop` and `day` (created if absent).
async fn add_to_report(conn: &mut MySqlConnection, shop: i64, day: NaiveDate, d: &ReportDelta) -> Result<()> {
    sqlx::query(
        "INSERT INTO merchant_reports (shop_id, day, orders, units, gross, discounts, paid, refunded,
            status_0, status_1, status_2, status_3, status_4, status_5)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON DUPLICATE KEY UPDATE orders = orders + VALUES(orders), units = units + VALUES(units),
            gross = gross + VALUES(gross), discounts = discounts + VALUES(discounts),
            paid = paid + VALUES(paid), refunded = refunded + VALUES(refunded),
            status_0 = status_0 + VALUES(status_0), status_1 = status_1 + VALUES(status_1),
            status_2 = status_2 + VALUES(status_2), status_3 = status_3 + VALUES(status_3),
            status_4 = status_4 + VALUES(status_4), status_5 = status_5 + VALUES(status_5)",
    )
    .bind(shop)
    .bind(day)
    .bind(d.orders)
    .bind(d.units)
    .bind(d.gross)
    .bind(d.discounts)
    .bind(d.paid)
    .bind(d.refunded)
    .bind(d.by_status[0])
    .bind(d.by_status[1])
    .bind(d.by_status[2])
    .bind(d.by_status[3])
    .bind(d.by_status[4])
    .bind(d.by_status[5])
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// How far the copy got, as its consumer last recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyState {
    /// Stream messages not yet applied when the last batch was applied (0: caught up then).
    pub pending: i64,
    /// Commit time of the newest event applied.
    pub applied_through: Option<DateTime<Utc>>,
    /// When the last batch was applied.
    pub updated_at: DateTime<Utc>,
}

/// Records a batch's progress in the databases of the copy that [`apply`] did not write it
/// in (`done`: those it applied events to).
pub async fn record_progress(map: &MerchantMap, progress: Progress, done: &[usize]) -> Result<()> {
    for (database, pool) in map.pools().iter().enumerate() {
        if done.contains(&database) {
            continue;
        }
        let mut conn = pool.acquire().await?;
        write_progress(&mut conn, progress).await?;
    }
    Ok(())
}

async fn write_progress(conn: &mut MySqlConnection, progress: Progress) -> Result<()> {
    sqlx::query(
        "INSERT INTO projection_state (name, pending, applied_through, updated_at)
         VALUES (?, ?, ?, ?)
         ON DUPLICATE KEY UPDATE pending = VALUES(pending),
            applied_through = GREATEST(COALESCE(applied_through, VALUES(applied_through)),
                                       COALESCE(VALUES(applied_through), applied_through)),
            updated_at = VALUES(updated_at)",
    )
    .bind(PROJECTION)
    .bind(i64::try_from(progress.pending).unwrap_or(i64::MAX))
    .bind(progress.newest.map(ts))
    .bind(ts(Utc::now()))
    .execute(conn)
    .await?;
    Ok(())
}

/// The copy's state in the database of `shop`'s table; `None` before its first batch.
pub async fn state(map: &MerchantMap, shop: ShopId) -> Result<Option<CopyState>> {
    let pool = map.pool(map.table_of(shop.get()));
    let row = sqlx::query("SELECT pending, applied_through, updated_at FROM projection_state WHERE name = ?")
        .bind(PROJECTION)
        .fetch_optional(pool)
        .await?;
    row.map(|r| {
        let through: Option<chrono::NaiveDateTime> = r.try_get("applied_through")?;
        let updated: chrono::NaiveDateTime = r.try_get("updated_at")?;
        Ok(CopyState {
            pending: r.try_get("pending")?,
            applied_through: through.map(|t| t.and_utc()),
            updated_at: updated.and_utc(),
        })
    })
    .transpose()
}

/// A page query of one shop's copy, newest first.
#[derive(Debug, Clone)]
pub struct ShopQuery {
    pub shop: ShopId,
    pub status: Option<OrderStatus>,
    pub created_from: Option<DateTime<Utc>>,
    pub created_to: Option<DateTime<Utc>>,
    /// Keyset cursor: orders strictly older than this (created_at, order_id).
    pub before: Option<(DateTime<Utc>, i64)>,
    pub limit: u32,
}

/// The snapshots of a page of `q.shop`'s orders, newest first.
pub async fn list(map: &MerchantMap, q: &ShopQuery) -> Result<Vec<OrderSnapshot>> {
    let table = map.table_of(q.shop.get());
    let mut sql = format!("SELECT doc FROM {} WHERE shop_id = ?", table.name);
    if q.status.is_some() {
        sql.push_str(" AND status = ?");
    }
    if q.created_from.is_some() {
        sql.push_str(" AND created_at >= ?");
    }
    if q.created_to.is_some() {
        sql.push_str(" AND created_at < ?");
    }
    if q.before.is_some() {
        sql.push_str(" AND (created_at < ? OR (created_at = ? AND order_id < ?))");
    }
    sql.push_str(" ORDER BY created_at DESC, order_id DESC LIMIT ?");
    let mut query = sqlx::query(AssertSqlSafe(sql)).bind(q.shop.get());
    if let Some(s) = q.status {
        query = query.bind(s.code());
    }
    if let Some(t) = q.created_from {
        query = query.bind(ts(t));
    }
    if let Some(t) = q.created_to {
        query = query.bind(ts(t));
    }
    if let Some((at, id)) = q.before {
        query = query.bind(ts(at)).bind(ts(at)).bind(id);
    }
    let rows = query.bind(q.limit).fetch_all(map.pool(table)).await?;
    rows.iter()
        .map(|r| {
            let doc: String = r.try_get(0)?;
            serde_json::from_str(&doc).map_err(|e| super::corrupt("merchant copy doc", e))
        })
        .collect()
}

/// One shop's figures of one day.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DailyReport {
    pub day: NaiveDate,
    pub orders: i64,
    pub units: i64,
    pub gross: i64,
    pub discounts: i64,
    pub paid: i64,
    pub refunded: i64,
    /// Orders by status code (0..=5) as they are now.
    pub by_status: [i64; 6],
}

/// `shop`'s report rows from `from` to `to` (inclusive), by day; days without orders have no
/// row.
pub async fn daily_reports(
    map: &MerchantMap,
    shop: ShopId,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<Vec<DailyReport>> {
    let pool = map.pool(map.table_of(shop.get()));
    let rows = sqlx::query(
        "SELECT day, orders, units, gross, discounts, paid, refunded,
            status_0, status_1, status_2, status_3, status_4, status_5
         FROM merchant_reports WHERE shop_id = ? AND day BETWEEN ? AND ? ORDER BY day",
    )
    .bind(shop.get())
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let mut by_status = [0i64; 6];
            for (i, s) in by_status.iter_mut().enumerate() {
                *s = r.try_get(7 + i)?;
            }
            Ok(DailyReport {
                day: r.try_get("day")?,
                orders: r.try_get("orders")?,
                units: r.try_get("units")?,
                gross: r.try_get("gross")?,
                discounts: r.try_get("discounts")?,
                paid: r.try_get("paid")?,
                refunded: r.try_get("refunded")?,
                by_status,
            })
        })
        .collect()
}

/// Empties the copy, its reports and its state (a rebuild's first step), one database at a
/// time, each in one transaction under REPEATABLE READ: its deletes then lock every row and
/// every gap of the tables, so an applier running meanwhile (a `serve` beside the rebuild)
/// either commits before them (its rows go, copy and report rows alike) or waits until they
/// committed (its rows stay, alike). Under READ COMMITTED it could insert a new row behind
/// the deletes and have its report row deleted, or the reverse.
pub async fn reset(map: &MerchantMap) -> Result<()> {
    for database in 0..map.pools().len() {
        let mut tries = 0;
        loop {
            match reset_database(map, database).await {
                Ok(()) => break,
                // An applier holding rows the deletes need, and waiting for one they hold.
                Err(e) if e.is_retryable() && tries < super::DEADLOCK_RETRIES => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

async fn reset_database(map: &MerchantMap, database: usize) -> Result<()> {
    let mut conn = map.pools()[database].acquire().await?;
    // The next transaction only: the connection stays READ COMMITTED after it.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *conn)
        .await?;
    let mut tx = crate::storage::pool::begin(&mut conn).await?;
    for t in map.tables().iter().filter(|t| t.database == database) {
        sqlx::query(AssertSqlSafe(format!("DELETE FROM {}", t.name)))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("DELETE FROM merchant_reports")
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM projection_state WHERE name = ?")
        .bind(PROJECTION)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}
