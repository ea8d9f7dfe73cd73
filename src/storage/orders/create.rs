//! What a create reads before it writes: whether its id is free, taken (by which request)
//! or void. The create's write itself (the order, its lines and discounts, and the void
//! check after them) runs in the door ([`super::commit`], `OrderWrite::Create`).

use sqlx::AssertSqlSafe;
use sqlx::{MySqlConnection, Row};

use crate::domain::ids::OrderId;
use crate::storage::shards::ShardTables;
use crate::storage::{corrupt, Result};

/// What a create finds for its id before reserving anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdState {
    Free,
    /// An order exists, with this request hash.
    Taken(Vec<u8>),
    /// The sweeper voided the id: no order will ever be written under it.
    Voided,
}

/// The order's request hash or the void mark of `id`, in one read (not locking: the insert
/// itself decides; this only spares a doomed create its reservation).
pub async fn id_state(conn: &mut MySqlConnection, t: &ShardTables, id: OrderId) -> Result<IdState> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT (SELECT request_hash FROM {} WHERE order_id = ?),
                EXISTS (SELECT 1 FROM {} WHERE order_id = ?)",
        t.orders, t.voids
    )))
    .bind(id.get())
    .bind(id.get())
    .fetch_one(conn)
    .await?;
    let hash: Option<Vec<u8>> = row.try_get(0)?;
    let voided: i64 = row.try_get(1)?;
    Ok(match hash {
        Some(h) => IdState::Taken(h),
        None if voided != 0 => IdState::Voided,
        None => IdState::Free,
    })
}

/// The request hashes of those of `ids` whose order is committed on this shard, in one
/// non-locking read (an order whose commit is in flight is simply not there yet).
pub async fn request_hashes(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    ids: &[OrderId],
) -> Result<Vec<(OrderId, Vec<u8>)>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT order_id, request_hash FROM {} WHERE order_id IN ({})",
        t.orders,
        vec!["?"; ids.len()].join(", ")
    );
    let mut q = sqlx::query(AssertSqlSafe(&*sql));
    for id in ids {
        q = q.bind(id.get());
    }
    q.fetch_all(conn)
        .await?
        .iter()
        .map(|r| {
            let id: i64 = r.try_get(0)?;
            Ok((
                OrderId::new(id).ok_or_else(|| corrupt("order_id", id))?,
                r.try_get(1)?,
            ))
        })
        .collect()
}

/// The create-request hash of a stored order, or `None` if there is no such order.
pub async fn request_hash_of(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    id: OrderId,
) -> Result<Option<Vec<u8>>> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT request_hash FROM {} WHERE order_id = ?",
        t.orders
    )))
    .bind(id.get())
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}
