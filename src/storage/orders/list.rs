//! A buyer's list of orders: the filters and keyset position of a page ([`ListQuery`]), the
//! SQL shared by the shard's list and the archive's, and whether the archive must be asked.

use chrono::{DateTime, Utc};
use sqlx::AssertSqlSafe;
use sqlx::MySqlConnection;

use crate::domain::ids::{OrderId, UserId};
use crate::domain::order::Order;
use crate::domain::status::OrderStatus;
use crate::storage::shards::ShardTables;
use crate::storage::{ts, Result};

use super::rows::{load_children, order_from_row, ORDER_COLUMNS};

/// One page of a user's orders, newest first.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub user_id: UserId,
    pub status: Option<OrderStatus>,
    pub created_from: Option<DateTime<Utc>>,
    pub created_to: Option<DateTime<Utc>>,
    /// Keyset position: strictly older than this (created_at, order_id).
    pub before: Option<(DateTime<Utc>, OrderId)>,
    pub limit: u32,
}

pub async fn list_user_orders(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    q: &ListQuery,
) -> Result<Vec<Order>> {
    let sql = user_list_sql(&format!("SELECT {ORDER_COLUMNS} FROM {}", t.orders), q);
    let rows = bind_user_list(sqlx::query(AssertSqlSafe(sql)), q)
        .fetch_all(&mut *conn)
        .await?;
    let mut orders = rows.iter().map(order_from_row).collect::<Result<Vec<_>>>()?;
    load_children(conn, t, &mut orders).await?;
    Ok(orders)
}

/// Whether the archiver moved orders of `user` out of this shard (a primary-key lookup). Its
/// record commits with the delete of the first such order, so a statement after a list on
/// the same connection answers `true` whenever the list missed an order for the archive.
pub async fn has_archived_orders(conn: &mut MySqlConnection, t: &ShardTables, user: UserId) -> Result<bool> {
    let sql = format!("SELECT 1 FROM {} WHERE user_id = ?", t.archived_users);
    let found = sqlx::query(AssertSqlSafe(sql))
        .bind(user.get())
        .fetch_optional(conn)
        .await?;
    Ok(found.is_some())
}

/// `select` (`SELECT … FROM table`, the table with `user_id`, `status` and `created_at`
/// columns) with the filters, keyset position, order and limit of `q`; bind them with
/// [`bind_user_list`]. The shard's list and the archive's share it.
pub(in crate::storage) fn user_list_sql(select: &str, q: &ListQuery) -> String {
    let mut sql = format!("{select} WHERE user_id = ?");
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
        sql.push_str(" AND (created_at, order_id) < (?, ?)");
    }
    sql.push_str(" ORDER BY created_at DESC, order_id DESC LIMIT ?");
    sql
}

/// Binds the placeholders of [`user_list_sql`].
pub(in crate::storage) fn bind_user_list<'q>(
    query: sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments>,
    q: &ListQuery,
) -> sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments> {
    let mut query = query.bind(q.user_id.get());
    if let Some(s) = q.status {
        query = query.bind(s.code());
    }
    if let Some(f) = q.created_from {
        query = query.bind(ts(f));
    }
    if let Some(to) = q.created_to {
        query = query.bind(ts(to));
    }
    if let Some((at, id)) = q.before {
        query = query.bind(ts(at)).bind(id.get());
    }
    query.bind(q.limit)
}
