//! The archiver's side of the order tables: which orders a pass scans next, how many it
//! would move, their versions, and the plan of its move out of the hot shard (which rows it
//! deletes, read under their locks). The delete itself runs in the door
//! ([`super::delete_archived`]); the archive's own tables are in [`crate::storage::archive`].

use std::collections::{BTreeSet, HashMap};

use sqlx::AssertSqlSafe;
use sqlx::{MySqlConnection, Row};

use crate::domain::ids::OrderId;
use crate::storage::shards::ShardTables;
use crate::storage::{corrupt, Result};

/// The id of the last of the next `limit` orders of a shard with ids in `(after, bound)`, in
/// id order (the primary key), or `None` when there are none: one batch of a pass, bounded
/// by what it scans rather than by what it finds (most old orders may not be final).
pub async fn archive_scan_end(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    after: i64,
    bound: i64,
    limit: u32,
) -> Result<Option<i64>> {
    let last: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT MAX(order_id) FROM (SELECT order_id FROM {} WHERE order_id > ? AND order_id < ?
            ORDER BY order_id LIMIT ?) batch",
        t.orders
    )))
    .bind(after)
    .bind(bound)
    .bind(limit)
    .fetch_one(conn)
    .await?;
    Ok(last)
}

/// How many orders of a shard with ids in `(after, upto]` a pass would move now, and how
/// many it would leave because they are not final yet (`orderly archive --dry-run`; a
/// consistent read, no locks).
pub async fn archive_counts(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    after: i64,
    upto: i64,
) -> Result<(u64, u64)> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT CAST(COALESCE(SUM(movable), 0) AS SIGNED), CAST(COALESCE(SUM(1 - movable), 0) AS SIGNED)
         FROM (SELECT (status IN (3, 4, 5) AND release_pending = 0 AND refund_required = 0) AS movable
               FROM {} WHERE order_id > ? AND order_id <= ?) o",
        t.orders
    )))
    .bind(after)
    .bind(upto)
    .fetch_one(conn)
    .await?;
    let (movable, left): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    Ok((movable.max(0) as u64, left.max(0) as u64))
}

/// The versions of those of `ids` this shard holds.
pub async fn versions_of(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    ids: &[OrderId],
) -> Result<HashMap<OrderId, i64>> {
    let mut out = HashMap::new();
    for chunk in ids.chunks(1000) {
        let sql = format!(
            "SELECT order_id, version FROM {} WHERE order_id IN ({})",
            t.orders,
            vec!["?"; chunk.len()].join(", ")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for id in chunk {
            q = q.bind(id.get());
        }
        for row in q.fetch_all(&mut *conn).await? {
            let id: i64 = row.try_get(0)?;
            out.insert(
                OrderId::new(id).ok_or_else(|| corrupt("order_id", id))?,
                row.try_get(1)?,
            );
        }
    }
    Ok(out)
}

/// The last GTID this server logged in its own replication domain (`None` without a binary
/// log): a read of a replica that has it sees every transaction committed here before this
/// call, such as the archiver's delete of an order.
pub async fn last_logged_gtid(conn: &mut MySqlConnection) -> Result<Option<String>> {
    let row = sqlx::query("SELECT @@gtid_binlog_pos, @@gtid_domain_id")
        .fetch_one(conn)
        .await?;
    let (position, domain): (String, u32) = (row.try_get(0)?, row.try_get(1)?);
    let own = format!("{domain}-");
    Ok(position
        .split(',')
        .map(str::trim)
        .find(|g| g.starts_with(&own))
        .map(str::to_owned))
}

/// What deleting an archived chunk from the hot tables did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deleted {
    /// Gone from the hot tables (or gone already: a re-run after a crash).
    pub deleted: Vec<OrderId>,
    /// Still hot at a newer version than the one archived (money arrived in between): kept
    /// here; its archived copy is stale.
    pub moved_on: Vec<(OrderId, i64)>,
}

/// Which orders of `ids` (sorted by id, each with the version the archive holds) a move
/// deletes now, read with their `orders` rows locked (`FOR UPDATE`, in id order, in the
/// caller's transaction): those still at the archived version, and those gone already (a
/// re-run after a crash); the others moved on. Also answers the buyers of the orders deleted
/// now (one gone already was recorded with its delete).
pub(super) async fn plan_delete(
    tx: &mut MySqlConnection,
    t: &ShardTables,
    ids: &[(OrderId, i64)],
) -> Result<(Deleted, BTreeSet<i64>)> {
    let mut out = Deleted::default();
    let list = vec!["?"; ids.len()].join(", ");
    let sql = format!(
        "SELECT order_id, version, user_id FROM {} WHERE order_id IN ({list}) ORDER BY order_id FOR UPDATE",
        t.orders
    );
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for (id, _) in ids {
        q = q.bind(id.get());
    }
    let mut current = HashMap::new();
    for row in q.fetch_all(&mut *tx).await? {
        let (id, version, user): (i64, i64, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        current.insert(id, (version, user));
    }
    let mut users = BTreeSet::new();
    for (id, archived) in ids {
        match current.get(&id.get()) {
            Some((v, _)) if v != archived => out.moved_on.push((*id, *v)),
            Some((_, user)) => {
                users.insert(*user);
                out.deleted.push(*id);
            }
            None => out.deleted.push(*id),
        }
    }
    Ok((out, users))
}
