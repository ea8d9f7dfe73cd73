//! SQL of the archive: old final orders moved out of the hot shards (SPEC 2.7).
//!
//! One database of its own (`[archive] url`), possibly on a cheaper server, with three
//! tables (scope `archive` of `orderly migrate`):
//! - `archived_orders`: one row per order, the whole order as one JSON document (`doc`, the
//!   [`OrderSnapshot`] the outbox uses, built by the shard's database from its rows) with
//!   the columns its queries need (user, shop, creation time, status, version). The table is
//!   `ROW_FORMAT=COMPRESSED`: documents are text and old orders are read rarely.
//! - `archive_checkpoints`: a row per table shard, where an interrupted pass resumes.
//! - `order_outbox`: the events of money recorded against archived orders, drained by the
//!   relay like every shard database's outbox.
//!
//! A batch's documents and its checkpoint commit in one transaction ([`store_batch`]); a
//! document is only ever replaced by a higher version, so running a batch twice changes
//! nothing. The hot rows are deleted only after [`verify`] found the batch here.
//!
//! Every statement writing `archived_orders` or the archive's `order_outbox` (the batch,
//! the removal of stale copies, money recorded against an archived order) runs in the one
//! door, [`super::orders`]'s `commit.rs` (`OrderDoor::Archive`); this module reads, and
//! keeps the checkpoints.

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, MySqlConnection, Row};

use super::orders::ListQuery;
use super::{corrupt, ts, Result};
use crate::domain::events::OrderSnapshot;
use crate::domain::ids::{OrderId, ShopId, UserId};
use crate::domain::order::Order;
use crate::domain::status::OrderStatus;

/// The writes of `archived_orders` run in the one door (`storage/orders/commit.rs`).
pub(crate) use super::orders::{remove_stale, store_batch};

/// The archive's tables (scope `archive`).
pub(crate) const ARCHIVE_V1: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS archived_orders (
        order_id BIGINT NOT NULL PRIMARY KEY,
        user_id BIGINT NOT NULL,
        shop_id BIGINT NOT NULL,
        status TINYINT NOT NULL,
        version BIGINT NOT NULL,
        created_at DATETIME(6) NOT NULL,
        archived_at DATETIME(6) NOT NULL,
        doc LONGTEXT NOT NULL,
        KEY idx_user_created (user_id, created_at, order_id),
        KEY idx_shop_created (shop_id, created_at)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 ROW_FORMAT=COMPRESSED KEY_BLOCK_SIZE=8",
    // bound: the pass's exclusive upper order id (`OrderId::lower_bound_at(cutoff)`);
    // resume_after: every order of the shard at or below it was moved or skipped by this
    // pass; batch_last: the last id of the batch being moved (a resumed pass cleans up to
    // it); done: the pass reached its bound, the next one starts from the lowest id.
    "CREATE TABLE IF NOT EXISTS archive_checkpoints (
        shard INT NOT NULL PRIMARY KEY,
        bound BIGINT NOT NULL,
        resume_after BIGINT NOT NULL,
        batch_last BIGINT NOT NULL,
        done TINYINT NOT NULL,
        moved BIGINT NOT NULL,
        updated_at DATETIME(6) NOT NULL
    ) ENGINE=InnoDB",
];

/// One order as the archive keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedDoc {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub shop_id: ShopId,
    pub status: OrderStatus,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    /// The [`OrderSnapshot`] JSON.
    pub doc: String,
}

impl ArchivedDoc {
    /// The document of a snapshot the shard's database built ([`super::outbox::archivable_snapshots`]).
    pub fn from_json(doc: String) -> Result<ArchivedDoc> {
        let s: OrderSnapshot =
            serde_json::from_str(&doc).map_err(|e| corrupt("archived order document", e))?;
        let order = s
            .to_order()
            .ok_or_else(|| corrupt("archived order document out of domain", s.order_id))?;
        Ok(ArchivedDoc {
            order_id: order.order_id,
            user_id: order.user_id,
            shop_id: order.shop_id,
            status: order.status,
            version: order.version,
            created_at: order.created_at,
            doc,
        })
    }

    pub fn to_order(&self) -> Result<Order> {
        order_of(&self.doc)
    }
}

fn order_of(doc: &str) -> Result<Order> {
    let s: OrderSnapshot = serde_json::from_str(doc).map_err(|e| corrupt("archived order document", e))?;
    s.to_order()
        .ok_or_else(|| corrupt("archived order document out of domain", s.order_id))
}

/// Where a shard's pass stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub bound: i64,
    pub resume_after: i64,
    pub batch_last: i64,
    pub done: bool,
    pub moved: i64,
}

pub async fn checkpoint(conn: &mut MySqlConnection, shard: u32) -> Result<Option<Checkpoint>> {
    let row = sqlx::query(
        "SELECT bound, resume_after, done, moved, batch_last FROM archive_checkpoints WHERE shard = ?",
    )
    .bind(shard)
    .fetch_optional(conn)
    .await?;
    row.map(|r| {
        let done: i8 = r.try_get(2)?;
        Ok(Checkpoint {
            bound: r.try_get(0)?,
            resume_after: r.try_get(1)?,
            done: done != 0,
            moved: r.try_get(3)?,
            batch_last: r.try_get(4)?,
        })
    })
    .transpose()
}

pub(in crate::storage) async fn write_checkpoint(
    conn: &mut MySqlConnection,
    shard: u32,
    c: &Checkpoint,
    now: DateTime<Utc>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO archive_checkpoints
            (shard, bound, resume_after, batch_last, done, moved, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?)
         ON DUPLICATE KEY UPDATE bound = VALUES(bound), resume_after = VALUES(resume_after),
            batch_last = VALUES(batch_last), done = VALUES(done), moved = VALUES(moved),
            updated_at = VALUES(updated_at)",
    )
    .bind(shard)
    .bind(c.bound)
    .bind(c.resume_after)
    .bind(c.batch_last)
    .bind(c.done)
    .bind(c.moved)
    .bind(ts(now))
    .execute(conn)
    .await?;
    Ok(())
}

/// Records where a shard's pass stands, alone (a pass's start and end).
pub async fn set_checkpoint(
    conn: &mut MySqlConnection,
    shard: u32,
    c: &Checkpoint,
    now: DateTime<Utc>,
) -> Result<()> {
    write_checkpoint(conn, shard, c, now).await
}

/// Whether the archive holds exactly this batch: as many of its ids, with the same id
/// checksum (XOR) and the same sum of versions. Read on the archive's primary after the
/// batch committed.
pub async fn verify(conn: &mut MySqlConnection, docs: &[ArchivedDoc]) -> Result<bool> {
    if docs.is_empty() {
        return Ok(true);
    }
    let sql = format!(
        "SELECT COUNT(*), CAST(BIT_XOR(order_id) AS SIGNED), CAST(COALESCE(SUM(version), 0) AS SIGNED)
         FROM archived_orders WHERE order_id IN ({})",
        vec!["?"; docs.len()].join(", ")
    );
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for d in docs {
        q = q.bind(d.order_id.get());
    }
    let row = q.fetch_one(conn).await?;
    let (count, xor, versions): (i64, i64, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    let want_xor = docs.iter().fold(0i64, |x, d| x ^ d.order_id.get());
    let want_versions: i64 = docs.iter().map(|d| d.version).sum();
    Ok(count == docs.len() as i64 && xor == want_xor && versions == want_versions)
}

/// The archived orders with ids in `(after, upto]`, with their versions (every shard's:
/// the caller keeps its own).
pub async fn versions_between(
    conn: &mut MySqlConnection,
    after: i64,
    upto: i64,
) -> Result<Vec<(OrderId, i64)>> {
    let rows =
        sqlx::query("SELECT order_id, version FROM archived_orders WHERE order_id > ? AND order_id <= ?")
            .bind(after)
            .bind(upto)
            .fetch_all(conn)
            .await?;
    super::id_versions(&rows)
}

/// The archived order `id`, or `None`.
pub async fn load(conn: &mut MySqlConnection, id: OrderId) -> Result<Option<Order>> {
    let doc: Option<String> = sqlx::query_scalar("SELECT doc FROM archived_orders WHERE order_id = ?")
        .bind(id.get())
        .fetch_optional(conn)
        .await?;
    doc.as_deref().map(order_of).transpose()
}

/// A page of a user's archived orders, newest first, with the filters and keyset position
/// of the hot shard's list ([`super::orders::list_user_orders`]).
pub async fn list_user_orders(conn: &mut MySqlConnection, q: &ListQuery) -> Result<Vec<Order>> {
    let sql = super::orders::user_list_sql("SELECT doc FROM archived_orders", q);
    let rows = super::orders::bind_user_list(sqlx::query(AssertSqlSafe(sql)), q)
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|r| order_of(&r.try_get::<String, _>(0)?))
        .collect()
}

/// Up to `limit` archived documents with ids above `after`, in id order: what a read
/// model's rebuild reads besides the shards.
pub async fn documents(conn: &mut MySqlConnection, after: i64, limit: u32) -> Result<Vec<(i64, String)>> {
    let rows =
        sqlx::query("SELECT order_id, doc FROM archived_orders WHERE order_id > ? ORDER BY order_id LIMIT ?")
            .bind(after)
            .bind(limit)
            .fetch_all(conn)
            .await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
}

/// How many orders the archive holds, and their documents' bytes (uncompressed).
pub async fn totals(conn: &mut MySqlConnection) -> Result<(i64, i64)> {
    let row =
        sqlx::query("SELECT COUNT(*), CAST(COALESCE(SUM(LENGTH(doc)), 0) AS SIGNED) FROM archived_orders")
            .fetch_one(conn)
            .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}
