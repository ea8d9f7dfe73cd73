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

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, MySqlConnection, Row};

use super::orders::{Committed, ListQuery, MoneyMovement, NotWritten};
use super::outbox;
use super::{corrupt, ts, Result};
use crate::domain::events::{EventKind, OrderSnapshot, PaymentSnapshot};
use crate::domain::ids::{OrderId, ShopId, UserId};
use crate::domain::order::{Order, PaymentKind};
use crate::domain::payment_rules::{money_rule, MoneyRefusal};
use crate::domain::status::OrderStatus;

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
    /// The document of a snapshot the shard's database built ([`outbox::snapshots_where`]).
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

async fn write_checkpoint(
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

/// Rows per INSERT: 8 placeholders each.
const INSERT_CHUNK: usize = 500;

/// Writes a batch's documents and the shard's checkpoint in one transaction. A document
/// already archived is replaced only by a higher version: a batch run twice (after a crash
/// between this commit and the deletes) changes nothing.
pub async fn store_batch(
    conn: &mut MySqlConnection,
    shard: u32,
    docs: &[ArchivedDoc],
    checkpoint: &Checkpoint,
    now: DateTime<Utc>,
) -> Result<()> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    for chunk in docs.chunks(INSERT_CHUNK) {
        let sql = format!(
            "INSERT INTO archived_orders
                (order_id, user_id, shop_id, status, version, created_at, archived_at, doc)
             VALUES {}
             ON DUPLICATE KEY UPDATE
                doc = IF(VALUES(version) > version, VALUES(doc), doc),
                status = IF(VALUES(version) > version, VALUES(status), status),
                version = GREATEST(version, VALUES(version))",
            vec!["(?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for d in chunk {
            q = q
                .bind(d.order_id.get())
                .bind(d.user_id.get())
                .bind(d.shop_id.get())
                .bind(d.status.code())
                .bind(d.version)
                .bind(ts(d.created_at))
                .bind(ts(now))
                .bind(&d.doc);
        }
        q.execute(&mut *tx).await?;
    }
    write_checkpoint(&mut tx, shard, checkpoint, now).await?;
    tx.commit().await?;
    Ok(())
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

/// Deletes archived documents that turned out stale: the hot order moved on (a payment
/// arrived between the batch's snapshot and its delete) and stays hot, so the archive must
/// not keep a second, older copy. Only the version archived is removed.
pub async fn remove_stale(conn: &mut MySqlConnection, stale: &[(OrderId, i64)]) -> Result<u64> {
    let mut removed = 0;
    for (id, version) in stale {
        removed += sqlx::query("DELETE FROM archived_orders WHERE order_id = ? AND version = ?")
            .bind(id.get())
            .bind(version)
            .execute(&mut *conn)
            .await?
            .rows_affected();
    }
    Ok(removed)
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

/// The archive's commit point: a payment or refund for an archived order, by the same rule as
/// on a shard ([`money_rule`]): a payment is never refused (it is appended to the document
/// and flags the order `refund_required`: money arriving for an order that is over must go
/// back); a refund may return only the excess, and clears the flag once it has. In one
/// transaction with the order's event in the archive's outbox. Idempotent by number like the
/// shard's: the same number with the same content is a [`NotWritten::Replay`], with other
/// content a [`NotWritten::Conflict`]. An archived order is final and stays in its status.
pub async fn record_money(
    conn: &mut MySqlConnection,
    id: OrderId,
    m: &MoneyMovement,
    now: DateTime<Utc>,
) -> Result<std::result::Result<Committed, NotWritten>> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let doc: Option<String> =
        sqlx::query_scalar("SELECT doc FROM archived_orders WHERE order_id = ? FOR UPDATE")
            .bind(id.get())
            .fetch_optional(&mut *tx)
            .await?;
    let Some(doc) = doc else {
        return Ok(Err(NotWritten::NotFound));
    };
    let mut s: OrderSnapshot =
        serde_json::from_str(&doc).map_err(|e| corrupt("archived order document", e))?;
    let kind = i64::from(m.kind == PaymentKind::Refund);
    if let Some(p) = s.payments.iter().find(|p| p.transaction_no == m.transaction_no) {
        let same = p.kind == kind && p.amount == m.amount.minor() && p.channel == m.channel;
        return Ok(Err(if same {
            NotWritten::Replay
        } else {
            NotWritten::Conflict
        }));
    }
    let status = s
        .status()
        .ok_or_else(|| corrupt("archived order status", s.status))?;
    let net: i64 = s
        .payments
        .iter()
        .map(|p| if p.kind == 0 { p.amount } else { -p.amount })
        .sum();
    let effect = match money_rule(status, m.kind, m.amount.minor(), s.pay_amount, net) {
        // Final statuses take money without moving (the rule never closes them again).
        Ok(e) if e.to == status && !e.closes => e,
        Ok(_) | Err(MoneyRefusal::NotNow) => return Ok(Err(NotWritten::NotNow(status))),
        Err(MoneyRefusal::WrongAmount { limit }) => return Ok(Err(NotWritten::Mismatch { due: limit })),
    };
    // Stored times have microseconds, as the shards' DATETIME(6) columns do.
    let now = DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
    s.payments.push(PaymentSnapshot {
        kind,
        transaction_no: m.transaction_no.clone(),
        channel: m.channel.clone(),
        amount: m.amount.minor(),
        created_at: now,
    });
    if let Some(flag) = effect.refund_required {
        s.refund_required = flag;
    }
    s.version += 1;
    s.updated_at = now;
    let payload = serde_json::to_string(&s).map_err(|e| corrupt("archived order document", e))?;
    sqlx::query("UPDATE archived_orders SET doc = ?, version = ? WHERE order_id = ?")
        .bind(&payload)
        .bind(s.version)
        .bind(id.get())
        .execute(&mut *tx)
        .await?;
    let event = EventKind::of_money(m.kind == PaymentKind::Refund, status, status);
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (order_id, version, shop_id, kind, payload, created_at)
         VALUES (?, ?, ?, ?, ?, ?)",
        outbox::TABLE
    )))
    .bind(id.get())
    .bind(s.version)
    .bind(s.shop_id)
    .bind(event.name())
    .bind(&payload)
    .bind(ts(now))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Ok(Committed {
        order_id: id,
        user_id: UserId::new(s.user_id).ok_or_else(|| corrupt("user_id", s.user_id))?,
        shop_id: ShopId::new(s.shop_id).ok_or_else(|| corrupt("shop_id", s.shop_id))?,
        version: s.version,
        status,
        previous: status,
        // The archive has no replicas: no watermark to keep.
        gtid: None,
    }))
}

/// How many orders the archive holds, and their documents' bytes (uncompressed).
pub async fn totals(conn: &mut MySqlConnection) -> Result<(i64, i64)> {
    let row =
        sqlx::query("SELECT COUNT(*), CAST(COALESCE(SUM(LENGTH(doc)), 0) AS SIGNED) FROM archived_orders")
            .fetch_one(conn)
            .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}
