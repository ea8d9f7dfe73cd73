//! What the background steps move next: the sweeper's orders whose stock is still to go
//! back, the closer's unpaid orders past their deadline, the completer's orders shipped long
//! ago. Reads only; the moves go through the door.

use chrono::{DateTime, Utc};
use sqlx::AssertSqlSafe;
use sqlx::{MySqlConnection, Row};

use crate::domain::ids::OrderId;
use crate::domain::status::OrderStatus;
use crate::storage::shards::ShardTables;
use crate::storage::{corrupt, ts, Result};

/// Orders of this shard that were closed or invalidated but whose stock and coupons have
/// not been confirmed as given back, last touched before `before`.
pub async fn release_pending(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    before: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<OrderId>> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT order_id FROM {} WHERE release_pending = 1 AND updated_at < ? LIMIT ?",
        t.orders
    )))
    .bind(ts(before))
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            let v: i64 = r.try_get(0)?;
            OrderId::new(v).ok_or_else(|| corrupt("order_id", v))
        })
        .collect()
}

/// Unpaid orders whose payment deadline passed before `at`, with their versions
/// (`idx_status_deadline` serves this).
pub async fn expired_unpaid(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    at: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<(OrderId, i64)>> {
    orders_due(conn, t, OrderStatus::PendingPayment, "pay_deadline", at, limit).await
}

/// Shipped orders whose shipment is older than `cutoff`, oldest first, with their versions
/// (`idx_status_shipped` serves this).
pub async fn shipped_before(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    cutoff: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<(OrderId, i64)>> {
    orders_due(conn, t, OrderStatus::Shipped, "shipped_at", cutoff, limit).await
}

/// Orders in `status` whose time `column` (a column name of this file, never input) is
/// before `before`, oldest first, with their versions: what a background step moves next.
async fn orders_due(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    status: OrderStatus,
    column: &'static str,
    before: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<(OrderId, i64)>> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT order_id, version FROM {} WHERE status = ? AND {column} < ? ORDER BY {column} LIMIT ?",
        t.orders
    )))
    .bind(status.code())
    .bind(ts(before))
    .bind(limit)
    .fetch_all(conn)
    .await?;
    crate::storage::id_versions(&rows)
}
