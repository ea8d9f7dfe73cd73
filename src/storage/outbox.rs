//! The transactional outbox of order events (SPEC 6).
//!
//! One table, `order_outbox`, per shard database (every table shard of a server writes into
//! it), so one relay per database drains it; the archive's database has one too, for money
//! recorded against archived orders.
//!
//! # Who writes an event
//! Only the door, [`super::orders`]'s `commit.rs`, inserts into the outbox: inside the order
//! write's own transaction, so the event commits with the change or not at all, and no write
//! path can commit a change without its event. This module only reads what the door inserts
//! ([`event_row`]: the snapshot, built by the database from the rows the transaction just
//! wrote, `SELECT JSON_OBJECT(…)` in the same transaction, then a plain `INSERT` in the door):
//! exactly what commits, whatever the write was. `(order_id, version)` is unique: a version
//! is written once, and so is its event. The test `tests/one_door.rs` fails on an insert of
//! an event anywhere but the door.
//!
//! What stays here is consuming events already written, which is not writing them: the
//! relay's reads, its deletes of relayed rows ([`delete`]), and the moves of a row between the
//! outbox and its parking table ([`park`], [`unpark_all`]: the same row, id and payload, in
//! exactly one of the two tables at any time). The one-door test knows these moves.
//!
//! Rows are read in id order and deleted only after the broker acknowledged them
//! ([`crate::events::relay`]). Auto-increment ids are taken at insert, not at commit, so a
//! lower id may become visible after a higher one; the relay never keeps a high-water mark
//! and simply reads what is left, so a late row is picked up by the next batch. Two events of
//! one order can never be in that race: the second version's write waits for the first's
//! commit (the row lock and the compare-and-set on version).
//!
//! A row JetStream refuses for what it is (too large) would hold back every row behind it
//! forever: the relay [`park`]s it after `events.max_publish_attempts` refusals, moving it
//! whole into `order_outbox_parked`, and [`unpark_all`] moves parked rows back, under their
//! old ids, for an operator who fixed the cause (`orderly relay --republish-parked`). A row is
//! in exactly one of the two tables at any time: each move is one transaction.

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, MySqlConnection, Row};

use super::shards::ShardTables;
use super::{corrupt, Result};
use crate::domain::events::EventKind;
use crate::domain::ids::OrderId;

/// The outbox table of a shard database (shared by its table shards).
pub const TABLE: &str = "order_outbox";

/// Where the relay moves rows JetStream keeps refusing (see [`park`]).
pub const PARKED: &str = "order_outbox_parked";

/// The columns an outbox row keeps when it is parked and put back.
const COLUMNS: &str = "id, order_id, version, shop_id, kind, payload, created_at";

/// Dates in the snapshot: RFC 3339 in UTC with microseconds, as every stored time is.
const RFC3339: &str = "'%Y-%m-%dT%H:%i:%s.%fZ'";

/// The event row of `id`'s current row (its version, shop and snapshot), read in the
/// caller's transaction right after the order write: what the door inserts into [`TABLE`].
pub(super) async fn event_row(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    id: OrderId,
) -> Result<(i64, i64, String)> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT o.version, o.shop_id, {} FROM {} o WHERE o.order_id = ?",
        snapshot_json(t),
        t.orders
    )))
    .bind(id.get())
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| corrupt("outbox: no order row for the event of", id))?;
    Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
}

/// The SQL expression of an order's snapshot (the JSON of
/// [`crate::domain::events::OrderSnapshot`]), over the order row aliased `o`. A read, public
/// so that the testkit's raw baseline builds its events with the very same expression.
pub fn snapshot_json(t: &ShardTables) -> String {
    let time = |col: &str| format!("DATE_FORMAT({col}, {RFC3339})");
    format!(
        "JSON_OBJECT(
            'order_id', o.order_id, 'user_id', o.user_id, 'shop_id', o.shop_id,
            'status', o.status, 'version', o.version, 'currency', o.currency,
            'total_amount', o.total_amount, 'discount_amount', o.discount_amount,
            'pay_amount', o.pay_amount,
            'receiver_name', o.receiver_name, 'receiver_phone', o.receiver_phone,
            'receiver_region', o.receiver_region, 'receiver_detail', o.receiver_detail,
            'remark', o.remark, 'tracking_number', o.tracking_number, 'carrier', o.carrier,
            'close_reason', o.close_reason, 'refund_required', o.refund_required <> 0,
            'pay_deadline', {deadline},
            'created_at', {created}, 'updated_at', {updated}, 'paid_at', {paid},
            'shipped_at', {shipped}, 'completed_at', {completed}, 'closed_at', {closed},
            'invalidated_at', {invalidated},
            'items', (SELECT JSON_ARRAYAGG(JSON_OBJECT('line_no', i.line_no,
                    'product_id', i.product_id, 'product_name', i.product_name,
                    'unit_price', i.unit_price, 'quantity', i.quantity,
                    'line_total', i.line_total) ORDER BY i.line_no)
                FROM {items} i WHERE i.order_id = o.order_id),
            'payments', (SELECT JSON_ARRAYAGG(JSON_OBJECT('kind', p.kind,
                    'transaction_no', p.transaction_no, 'channel', p.channel,
                    'amount', p.amount, 'created_at', {p_created}) ORDER BY p.id)
                FROM {payments} p WHERE p.order_id = o.order_id),
            'discounts', (SELECT JSON_ARRAYAGG(JSON_OBJECT('line_no', d.line_no,
                    'coupon_id', d.coupon_id, 'kind', d.kind, 'amount', d.amount,
                    'description', d.description)
                    ORDER BY d.line_no)
                FROM {discounts} d WHERE d.order_id = o.order_id)
         )",
        created = time("o.created_at"),
        updated = time("o.updated_at"),
        deadline = time("o.pay_deadline"),
        paid = time("o.paid_at"),
        shipped = time("o.shipped_at"),
        completed = time("o.completed_at"),
        closed = time("o.closed_at"),
        invalidated = time("o.invalidated_at"),
        p_created = time("p.created_at"),
        items = t.items,
        payments = t.payments,
        discounts = t.discounts,
    )
}

/// The snapshots of up to `limit` orders of a shard with ids above `after`, in id order,
/// each with its id: what a read model's rebuild starts from.
pub async fn snapshots(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    after: i64,
    limit: u32,
) -> Result<Vec<(i64, String)>> {
    let sql = format!(
        "SELECT o.order_id, {} FROM {} o WHERE o.order_id > ? ORDER BY o.order_id LIMIT ?",
        snapshot_json(t),
        t.orders
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(after)
        .bind(limit)
        .fetch_all(conn)
        .await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
}

/// The snapshots of the orders of a shard with ids in `(after, upto]` that may be archived:
/// final (completed, closed, invalid), their stock given back (`release_pending` clear) and
/// no refund outstanding, in id order. What the archive stores (one consistent read).
pub async fn archivable_snapshots(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    after: i64,
    upto: i64,
) -> Result<Vec<String>> {
    let sql = format!(
        "SELECT {} FROM {} o WHERE o.order_id > ? AND o.order_id <= ?
            AND o.status IN (3, 4, 5) AND o.release_pending = 0 AND o.refund_required = 0
         ORDER BY o.order_id",
        snapshot_json(t),
        t.orders
    );
    Ok(sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(after)
        .bind(upto)
        .fetch_all(conn)
        .await?)
}

/// One outbox row waiting for the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub id: i64,
    pub order_id: OrderId,
    pub version: i64,
    pub shop_id: i64,
    pub kind: EventKind,
    /// The order snapshot, JSON.
    pub payload: String,
    pub created_at: DateTime<Utc>,
}

/// The oldest `limit` rows of the outbox, in id order.
pub async fn pending(conn: &mut MySqlConnection, limit: u32) -> Result<Vec<Pending>> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT id, order_id, version, shop_id, kind, payload, created_at
         FROM {TABLE} ORDER BY id LIMIT ?"
    )))
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            let order: i64 = r.try_get("order_id")?;
            let kind: String = r.try_get("kind")?;
            let created: chrono::NaiveDateTime = r.try_get("created_at")?;
            Ok(Pending {
                id: r.try_get("id")?,
                order_id: OrderId::new(order).ok_or_else(|| corrupt("outbox order_id", order))?,
                version: r.try_get("version")?,
                shop_id: r.try_get("shop_id")?,
                kind: EventKind::parse(&kind).ok_or_else(|| corrupt("outbox kind", &kind))?,
                payload: r.try_get("payload")?,
                created_at: created.and_utc(),
            })
        })
        .collect()
}

/// Deletes relayed rows (acknowledged by the broker).
pub async fn delete(conn: &mut MySqlConnection, ids: &[i64]) -> Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    let placeholders = vec!["?"; ids.len()].join(", ");
    let sql = format!("DELETE FROM {TABLE} WHERE id IN ({placeholders})");
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for id in ids {
        q = q.bind(id);
    }
    Ok(q.execute(conn).await?.rows_affected())
}

/// Rows waiting in the outbox (an estimate is not enough: the metric alerts on growth).
pub async fn backlog(conn: &mut MySqlConnection) -> Result<u64> {
    let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT COUNT(*) FROM {TABLE}")))
        .fetch_one(conn)
        .await?;
    Ok(n.max(0) as u64)
}

/// Moves outbox row `id` into [`PARKED`], with the number of refusals and the last one, in
/// one transaction; false when the row was not there (another relay moved it).
pub async fn park(conn: &mut MySqlConnection, id: i64, attempts: u32, reason: &str) -> Result<bool> {
    let mut tx = crate::storage::pool::begin(conn).await?;
    // The column holds 512 characters; the reason is for a person, its start is enough.
    let reason: String = reason.chars().take(512).collect();
    let moved = sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {PARKED} ({COLUMNS}, attempts, reason, parked_at)
         SELECT {COLUMNS}, ?, ?, NOW(6) FROM {TABLE} WHERE id = ?"
    )))
    .bind(attempts)
    .bind(reason)
    .bind(id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query(AssertSqlSafe(format!("DELETE FROM {TABLE} WHERE id = ?")))
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(moved == 1)
}

/// Moves every parked row back into the outbox under its old id, in one transaction, so the
/// relay publishes it again in its place; answers how many.
pub async fn unpark_all(conn: &mut MySqlConnection) -> Result<u64> {
    let mut tx = crate::storage::pool::begin(conn).await?;
    // What is parked now; the INSERT's locking read then holds the range until the commit,
    // so the DELETE removes exactly the rows it copied.
    let last: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!("SELECT MAX(id) FROM {PARKED}")))
        .fetch_one(&mut *tx)
        .await?;
    let Some(last) = last else {
        tx.commit().await?;
        return Ok(0);
    };
    let moved = sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {TABLE} ({COLUMNS}) SELECT {COLUMNS} FROM {PARKED} WHERE id <= ? ORDER BY id"
    )))
    .bind(last)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query(AssertSqlSafe(format!("DELETE FROM {PARKED} WHERE id <= ?")))
        .bind(last)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(moved)
}

/// Rows waiting in [`PARKED`] for an operator.
pub async fn parked(conn: &mut MySqlConnection) -> Result<u64> {
    let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT COUNT(*) FROM {PARKED}")))
        .fetch_one(conn)
        .await?;
    Ok(n.max(0) as u64)
}
