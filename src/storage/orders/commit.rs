//! The one door: every write of an order row or an order event, and nothing else.
//!
//! # The rule
//! This is the only file of the crate holding SQL that inserts, updates or deletes rows of
//! the order tables (`orders_NN`, `order_items_NN`, `order_payments_NN`,
//! `order_discounts_NN`, `order_voids_NN`, the archive's `archived_orders`) or inserts an
//! order event (`order_outbox`, on a shard database or the archive's). The other files of
//! [`super`] read and build what to write (plans and values); here each write runs as one
//! statement or one short transaction and answers what committed ([`Committed`]: ids,
//! version, status, GTID) or why nothing did ([`NotWritten`]).
//!
//! The entries are [`commit`] ([`OrderDoor`]: a hot order's [`OrderWrite`] on its shard or an
//! archived order's [`ArchiveWrite`] on the archive), [`write_order`] (a hot order), and the
//! writes that move no version: the sweeper's [`void_unless_written`] and the archiver's
//! [`delete_archived`], [`store_batch`] and [`remove_stale`]. All are `pub(crate)`; the
//! service runs the first two with one retry loop and one `after_commit` step for hot and
//! archived orders alike.
//!
//! Not order writes, so not here: schema migrations and backfills (`storage::schema`), the
//! merchant copy (`storage::merchant`, a read model the events keep), and the relay's
//! consuming of events already written (`storage::outbox`: deleting relayed rows, parking and
//! unparking them). The test `tests/one_door.rs` scans every file under `src/` and fails,
//! naming file and line, on an order-table write or an event insert anywhere but here.
//!
//! Every write that moves an order's version writes its event into the outbox in the same
//! transaction ([`record_event`]), so the event commits with the change or not at all.
//!
//! Cancellation: each write is one statement or one transaction whose `COMMIT` is its last
//! step; a future dropped before that leaves nothing committed (and the pool guard closes a
//! connection left inside the transaction).

use chrono::{DateTime, Utc};
use sqlx::AssertSqlSafe;
use sqlx::{MySqlConnection, Row};

use crate::domain::events::{EventKind, OrderSnapshot};
use crate::domain::ids::{OrderId, ShopId, UserId};
use crate::domain::order::{NewOrder, Order, PaymentKind, Pricing};
use crate::domain::status::OrderStatus;
use crate::storage::archive::{write_checkpoint, ArchivedDoc, Checkpoint};
use crate::storage::outbox::{self, event_row};
use crate::storage::shards::ShardTables;
use crate::storage::{corrupt, pool, ts, Result, StorageError};

use super::archive_move::{plan_delete, Deleted};
use super::changes::{timestamp_column, FieldChanges, StatusChange, BY_PRIMARY};
use super::money::{plan_archived_money, plan_money, ArchivedMoneyPlan, MoneyMovement, MoneyPlan};
use super::voids::{is_void_locked, written_hash_locked, VoidOutcome};

// ---------------------------------------------------------------- the entries

/// Every change of a hot order, as the door's entry [`write_order`] takes it. The SQL of
/// each is private to this file, so no write path can commit around the entry.
#[derive(Debug, Clone, Copy)]
pub enum OrderWrite<'a> {
    /// A new order with its lines and discounts (version 1), unless its id is void.
    Create {
        order: &'a NewOrder,
        pricing: &'a Pricing,
        request_hash: &'a [u8; 32],
        now: DateTime<Utc>,
        pay_deadline: DateTime<Utc>,
    },
    /// A status change, compare-and-set on version and status.
    Status {
        id: OrderId,
        expected_version: i64,
        from: OrderStatus,
        to: OrderStatus,
        change: &'a StatusChange,
        now: DateTime<Utc>,
    },
    /// Field changes of `PATCH`, compare-and-set on version; `status` is the order's status
    /// at `expected_version` (the caller checked the fields may change in it).
    Fields {
        id: OrderId,
        expected_version: i64,
        status: OrderStatus,
        changes: &'a FieldChanges,
        now: DateTime<Utc>,
    },
    /// A payment or refund, with whatever status move
    /// [`money_rule`](crate::domain::payment_rules::money_rule) says.
    Money {
        id: OrderId,
        movement: &'a MoneyMovement,
        now: DateTime<Utc>,
    },
    /// The stock and coupons of a closed order went back: bookkeeping the client does not
    /// see (the version stays), but a write of the order all the same.
    StockReleased { id: OrderId },
}

/// What a committed order write left behind: everything the service's `after_commit` step
/// (cache, replica watermarks, metrics, events) needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub shop_id: ShopId,
    /// The order's version after this write (unchanged by [`OrderWrite::StockReleased`]).
    pub version: i64,
    pub status: OrderStatus,
    /// The status before this write.
    pub previous: OrderStatus,
    /// The GTID of the transaction (`@@last_gtid`, e.g. `0-1-42`); `None` when the server
    /// keeps no binary log.
    pub gtid: Option<String>,
}

/// Why [`write_order`] committed nothing. None of these leaves anything behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotWritten {
    /// A compare-and-set matched no row: the version or the status moved, or there is no
    /// such order. The caller reloads to say which.
    Lost,
    /// Create: the sweeper voided this id and gave its reservation back.
    Voided,
    /// Money: this transaction number was recorded for this order before, with this content.
    Replay,
    /// Money: this transaction number belongs to another order or kind.
    Conflict,
    /// Money: the amount is not what is due (payment) or more than was paid (refund).
    Mismatch { due: i64 },
    /// Money: the order cannot take this now (e.g. a refund of an unpaid order).
    NotNow(OrderStatus),
    /// Money: there is no such order.
    NotFound,
    /// Stock release: already recorded.
    AlreadyReleased,
}

/// The door for a hot order: runs one order write in its own short transaction (or one autocommit
/// statement) on `conn` and answers what committed, read on the same session right after the
/// commit. A duplicate order id fails with [`crate::storage::StorageError::Duplicate`].
///
/// Cancellation: each write is one statement or one transaction whose `COMMIT` is its last
/// step; a future dropped before that leaves nothing committed (and the pool guard closes a
/// connection left inside the transaction). Callers run it on a task that is not dropped with
/// the request, so a commit is always followed by its `after_commit`.
pub(crate) async fn write_order(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    write: OrderWrite<'_>,
) -> Result<std::result::Result<Committed, NotWritten>> {
    // (order, version after, status after, status before); `None`: read back below.
    let (id, version, status, previous) = match write {
        OrderWrite::Create {
            order,
            pricing,
            request_hash,
            now,
            pay_deadline,
        } => {
            // Everything the answer needs is known: the create reads nothing back.
            return Ok(
                match insert_order(conn, t, order, pricing, request_hash, now, pay_deadline).await? {
                    Inserted::Voided => Err(NotWritten::Voided),
                    Inserted::Written { gtid } => Ok(Committed {
                        order_id: order.order_id,
                        user_id: order.user_id,
                        shop_id: pricing.shop_id,
                        version: 1,
                        status: OrderStatus::PendingPayment,
                        previous: OrderStatus::PendingPayment,
                        gtid,
                    }),
                },
            );
        }
        OrderWrite::Status {
            id,
            expected_version,
            from,
            to,
            change,
            now,
        } => {
            let mut tx = crate::storage::pool::begin(&mut *conn).await?;
            if !cas_status(&mut tx, t, id, expected_version, from, to, change, now).await? {
                tx.rollback().await?;
                return Ok(Err(NotWritten::Lost));
            }
            record_event(&mut tx, t, id, EventKind::of_move(from, to), now).await?;
            tx.commit().await?;
            (id, Some(expected_version + 1), Some(to), Some(from))
        }
        OrderWrite::Fields {
            id,
            expected_version,
            status,
            changes,
            now,
        } => {
            let mut tx = crate::storage::pool::begin(&mut *conn).await?;
            if !cas_fields(&mut tx, t, id, expected_version, status, changes, now).await? {
                tx.rollback().await?;
                return Ok(Err(NotWritten::Lost));
            }
            record_event(&mut tx, t, id, EventKind::Changed, now).await?;
            tx.commit().await?;
            (id, Some(expected_version + 1), Some(status), Some(status))
        }
        OrderWrite::Money { id, movement, now } => match record_money(conn, t, id, movement, now).await? {
            Ok((from, to, version)) => (id, Some(version), Some(to), Some(from)),
            Err(not) => return Ok(Err(not)),
        },
        OrderWrite::StockReleased { id } => {
            if !clear_release_pending(conn, t, id).await? {
                return Ok(Err(NotWritten::AlreadyReleased));
            }
            (id, None, None, None)
        }
    };
    // One round trip after the commit: this session's last GTID (ours: nothing ran since)
    // and the order's owner and shop, which never change. Its version and status are read
    // only where the write itself did not fix them: a later write may already have moved
    // them, and this write's own values are what committed.
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT @@last_gtid, user_id, shop_id, version, status FROM {} WHERE order_id = ?",
        t.orders
    )))
    .bind(id.get())
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| corrupt("order gone right after its write", id))?;
    let gtid: String = row.try_get(0)?;
    let user: i64 = row.try_get(1)?;
    let shop: i64 = row.try_get(2)?;
    let read_version: i64 = row.try_get(3)?;
    let code: i8 = row.try_get(4)?;
    let read_status = OrderStatus::from_code(i64::from(code)).ok_or_else(|| corrupt("status", code))?;
    let status = status.unwrap_or(read_status);
    Ok(Ok(Committed {
        order_id: id,
        user_id: UserId::new(user).ok_or_else(|| corrupt("user_id", user))?,
        shop_id: ShopId::new(shop).ok_or_else(|| corrupt("shop_id", shop))?,
        version: version.unwrap_or(read_version),
        status,
        previous: previous.unwrap_or(status),
        gtid: (!gtid.is_empty()).then_some(gtid),
    }))
}

/// Every change of an archived order, as the door's entry takes it: only money reaches an
/// order the archiver moved out of its shard.
#[derive(Debug, Clone, Copy)]
pub enum ArchiveWrite<'a> {
    /// A payment or refund, by the same rule as on a shard (see [`super::money`]); the order
    /// stays in its final status.
    Money {
        id: OrderId,
        movement: &'a MoneyMovement,
        now: DateTime<Utc>,
    },
}

/// Where an order write lands: a hot order on its shard (with the shard's tables) or an
/// archived order on the archive's database. The connection [`commit`] is given must be
/// that database's primary.
#[derive(Debug, Clone, Copy)]
pub enum OrderDoor<'a> {
    Shard(&'a ShardTables, OrderWrite<'a>),
    Archive(ArchiveWrite<'a>),
}

/// The door: runs one order write, hot or archived, and answers what committed. An archived
/// order's [`Committed`] has no GTID (the archive has no replicas: no watermark to keep).
pub(crate) async fn commit(
    conn: &mut MySqlConnection,
    door: OrderDoor<'_>,
) -> Result<std::result::Result<Committed, NotWritten>> {
    match door {
        OrderDoor::Shard(t, write) => write_order(conn, t, write).await,
        OrderDoor::Archive(ArchiveWrite::Money { id, movement, now }) => {
            record_archived_money(conn, id, movement, now).await
        }
    }
}

// ---------------------------------------------------------------- the statements

/// What [`insert_order`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Inserted {
    /// The order is committed, in the transaction of this GTID (`None`: no binary log).
    Written { gtid: Option<String> },
    /// The sweeper voided this id (and gave its reservation back): nothing was written.
    Voided,
}

/// Writes a new order with its lines and discounts in one transaction, unless the id is void
/// (see [`super::voids`]: the order row first, then the void check). A second create of the
/// same id fails with [`crate::storage::StorageError::Duplicate`] and writes nothing.
///
/// Round trips: `BEGIN`, the order, its lines (its discounts), the void check, the event, and
/// `COMMIT` with the read of its GTID. The event's snapshot is built in the process from the
/// values inserted ([`OrderSnapshot::of`]): the database would build the same from the rows
/// (the events test compares the two).
async fn insert_order(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    order: &NewOrder,
    pricing: &Pricing,
    request_hash: &[u8; 32],
    now: DateTime<Utc>,
    pay_deadline: DateTime<Utc>,
) -> Result<Inserted> {
    pool::begin_raw(&mut *conn).await?;
    // The statements, which end the transaction on success.
    let written: Result<Inserted> = async {
        let tx = &mut *conn;
        let a = &order.address;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (order_id, user_id, shop_id, status, version, currency, total_amount,
                discount_amount, pay_amount, receiver_name, receiver_phone, receiver_region,
                receiver_detail, remark, request_hash, created_at, updated_at, pay_deadline)
             VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            t.orders
        )))
        .bind(order.order_id.get())
        .bind(order.user_id.get())
        .bind(pricing.shop_id.get())
        .bind(OrderStatus::PendingPayment.code())
        .bind(pricing.currency.as_str())
        .bind(pricing.total_amount.minor())
        .bind(pricing.discount_amount.minor())
        .bind(pricing.pay_amount.minor())
        .bind(&a.name)
        .bind(&a.phone)
        .bind(&a.region)
        .bind(&a.detail)
        .bind(&order.remark)
        .bind(&request_hash[..])
        .bind(ts(now))
        .bind(ts(now))
        .bind(ts(pay_deadline))
        .execute(&mut *tx)
        .await?;

        let placeholders = vec!["(?, ?, ?, ?, ?, ?, ?)"; pricing.items.len()].join(", ");
        let sql = format!(
            "INSERT INTO {} (order_id, line_no, product_id, product_name, unit_price, quantity, line_total) VALUES {placeholders}",
            t.items
        );
        let mut q = sqlx::query(AssertSqlSafe(&*sql));
        for l in &pricing.items {
            q = q
                .bind(order.order_id.get())
                .bind(l.line_no)
                .bind(l.product_id.get())
                .bind(&l.product_name)
                .bind(l.unit_price.minor())
                .bind(l.quantity)
                .bind(l.line_total.minor());
        }
        q.execute(&mut *tx).await?;

        if !pricing.discounts.is_empty() {
            let placeholders = vec!["(?, ?, ?, ?, ?, ?)"; pricing.discounts.len()].join(", ");
            let sql = format!(
                "INSERT INTO {} (order_id, line_no, coupon_id, kind, amount, description) VALUES {placeholders}",
                t.discounts
            );
            let mut q = sqlx::query(AssertSqlSafe(&*sql));
            for d in &pricing.discounts {
                q = q
                    .bind(order.order_id.get())
                    .bind(d.line_no)
                    .bind(d.coupon_id.map(|c| c.get()))
                    .bind(&d.kind)
                    .bind(d.amount.minor())
                    .bind(&d.description);
            }
            q.execute(&mut *tx).await?;
        }
        // After the order row, never before: see `voids`.
        if is_void_locked(&mut *tx, t, order.order_id).await? {
            pool::rollback_raw(tx).await?;
            return Ok(Inserted::Voided);
        }
        let snapshot = OrderSnapshot::of(&Order::from_new(order, pricing.clone(), now, pay_deadline));
        let payload = serde_json::to_string(&snapshot).map_err(|e| corrupt("the created order's snapshot", e))?;
        insert_event(
            &mut *tx,
            order.order_id,
            1,
            pricing.shop_id.get(),
            EventKind::Created,
            &payload,
            now,
        )
        .await?;
        let row = pool::commit_with(tx, "SELECT @@last_gtid").await?;
        let gtid: Option<String> = row.map(|r| r.try_get(0)).transpose()?;
        Ok(Inserted::Written {
            gtid: gtid.filter(|g| !g.is_empty()),
        })
    }
    .await;
    if written.is_err() {
        // A duplicate id (a replay) or a failed statement: end the transaction here, so the
        // connection goes back to the pool (one left inside it would be closed).
        let _ = pool::rollback_raw(conn).await;
    }
    written
}

/// Moves `id` from `from` to `to` if it is still at `expected_version` and `from`.
/// Closing or invalidating marks the order `release_pending` in the same statement, so the
/// stock and coupons are given back even if the process dies right after.
#[allow(clippy::too_many_arguments)]
async fn cas_status(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    id: OrderId,
    expected_version: i64,
    from: OrderStatus,
    to: OrderStatus,
    change: &StatusChange,
    now: DateTime<Utc>,
) -> Result<bool> {
    let sql = format!(
        "UPDATE {} {BY_PRIMARY} SET status = ?, version = version + 1, updated_at = ?, {} = ?,
            carrier = COALESCE(?, carrier), tracking_number = COALESCE(?, tracking_number),
            close_reason = COALESCE(?, close_reason),
            refund_required = refund_required OR ?,
            release_pending = release_pending OR ?
         WHERE order_id = ? AND version = ? AND status = ?",
        t.orders,
        timestamp_column(to)
    );
    let done = sqlx::query(AssertSqlSafe(&*sql))
        .bind(to.code())
        .bind(ts(now))
        .bind(ts(now))
        .bind(&change.carrier)
        .bind(&change.tracking_number)
        .bind(&change.close_reason)
        .bind(change.refund_required)
        .bind(to.releases_stock())
        .bind(id.get())
        .bind(expected_version)
        .bind(from.code())
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Applies `changes` if the order is still at `expected_version` (and so still in `status`,
/// the status it had at that version: every change moves the version).
async fn cas_fields(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    id: OrderId,
    expected_version: i64,
    status: OrderStatus,
    changes: &FieldChanges,
    now: DateTime<Utc>,
) -> Result<bool> {
    let sql = format!(
        "UPDATE {} {BY_PRIMARY} SET receiver_name = COALESCE(?, receiver_name),
            receiver_phone = COALESCE(?, receiver_phone),
            receiver_region = COALESCE(?, receiver_region),
            receiver_detail = COALESCE(?, receiver_detail),
            remark = COALESCE(?, remark),
            tracking_number = COALESCE(?, tracking_number),
            carrier = COALESCE(?, carrier),
            version = version + 1, updated_at = ?
         WHERE order_id = ? AND version = ? AND status = ?",
        t.orders
    );
    let a = changes.address.as_ref();
    let done = sqlx::query(AssertSqlSafe(&*sql))
        .bind(a.map(|a| &a.name))
        .bind(a.map(|a| &a.phone))
        .bind(a.map(|a| &a.region))
        .bind(a.map(|a| &a.detail))
        .bind(&changes.remark)
        .bind(&changes.tracking_number)
        .bind(&changes.carrier)
        .bind(ts(now))
        .bind(id.get())
        .bind(expected_version)
        .bind(status.code())
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Marks the stock of a closed order as given back. Touches no version: it is bookkeeping,
/// not a change the client sees.
async fn clear_release_pending(conn: &mut MySqlConnection, t: &ShardTables, id: OrderId) -> Result<bool> {
    let done = sqlx::query(AssertSqlSafe(format!(
        "UPDATE {} SET release_pending = 0 WHERE order_id = ? AND release_pending = 1",
        t.orders
    )))
    .bind(id.get())
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Declares `id` dead unless its order is written, in one transaction (the sweeper's half of
/// the handshake in [`super::voids`]: the void row first, then the locking read of the order).
/// A lock-wait timeout here is an order whose commit is in flight: the caller must leave the
/// claim alone.
pub(crate) async fn void_unless_written(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    id: OrderId,
    now: DateTime<Utc>,
) -> Result<VoidOutcome> {
    let mut tx = crate::storage::pool::begin(conn).await?;
    let inserted = sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (order_id, voided_at) VALUES (?, ?)",
        t.voids
    )))
    .bind(id.get())
    .bind(ts(now))
    .execute(&mut *tx)
    .await;
    match inserted.map_err(StorageError::from) {
        // Already void: an earlier sweep committed it and then failed to give back.
        Ok(_) | Err(StorageError::Duplicate(_)) => {}
        Err(e) => return Err(e),
    }
    if let Some(hash) = written_hash_locked(&mut tx, t, id).await? {
        tx.rollback().await?;
        return Ok(VoidOutcome::Written(hash));
    }
    tx.commit().await?;
    Ok(VoidOutcome::Voided)
}

/// Deletes archived orders from the four hot tables, each only if it is still at the version
/// the archive holds, in one short transaction over the chunk, by primary key, in id order
/// (`orders` rows locked first, so it serialises with every write of these orders).
/// Touches no version and writes no event: the order itself is unchanged, only moved. The
/// same transaction records their buyers in `archived_users` (see
/// [`super::has_archived_orders`]): whoever sees an order gone from the shard sees its buyer there.
pub(crate) async fn delete_archived(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    chunk: &[(OrderId, i64)],
) -> Result<Deleted> {
    if chunk.is_empty() {
        return Ok(Deleted::default());
    }
    let mut ids: Vec<(OrderId, i64)> = chunk.to_vec();
    ids.sort_by_key(|(id, _)| id.get());
    let mut tx = crate::storage::pool::begin(conn).await?;
    let (out, users) = plan_delete(&mut tx, t, &ids).await?;
    if !users.is_empty() {
        let sql = format!(
            "INSERT IGNORE INTO {} (user_id, since) VALUES {}",
            t.archived_users,
            vec!["(?, UTC_TIMESTAMP(6))"; users.len()].join(", ")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for user in &users {
            q = q.bind(*user);
        }
        q.execute(&mut *tx).await?;
    }
    if !out.deleted.is_empty() {
        let list = vec!["?"; out.deleted.len()].join(", ");
        for table in [&t.items, &t.payments, &t.discounts, &t.orders] {
            let sql = format!("DELETE FROM {table} WHERE order_id IN ({list})");
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for id in &out.deleted {
                q = q.bind(id.get());
            }
            q.execute(&mut *tx).await?;
        }
    }
    tx.commit().await?;
    Ok(out)
}

/// Records a payment or refund and moves the status, in one transaction with the order row
/// locked, so it serialises with every other change of the order: the plan read under the
/// lock ([`plan_money`]), then the payment row, the order's move and its event. Answers
/// (status before, status after, version after).
async fn record_money(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    id: OrderId,
    m: &MoneyMovement,
    now: DateTime<Utc>,
) -> Result<std::result::Result<(OrderStatus, OrderStatus, i64), NotWritten>> {
    let mut tx = crate::storage::pool::begin(conn).await?;
    let MoneyPlan {
        from: status,
        to,
        version,
        closes,
        refund_required: set_refund_flag,
    } = match plan_money(&mut tx, t, id, m).await? {
        Ok(plan) => plan,
        Err(not) => return Ok(Err(not)),
    };

    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (order_id, kind, transaction_no, channel, amount, reason, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
        t.payments
    )))
    .bind(id.get())
    .bind(m.kind as i8)
    .bind(&m.transaction_no)
    .bind(&m.channel)
    .bind(m.amount.minor())
    .bind(&m.reason)
    .bind(ts(now))
    .execute(&mut *tx)
    .await?;

    let mut sql = format!("UPDATE {} SET version = version + 1, updated_at = ?", t.orders);
    if to != status {
        sql.push_str(&format!(", status = {}, {} = ?", to.code(), timestamp_column(to)));
    }
    if closes {
        sql.push_str(", release_pending = 1, close_reason = COALESCE(?, close_reason)");
    }
    if let Some(flag) = set_refund_flag {
        sql.push_str(if flag {
            ", refund_required = 1"
        } else {
            ", refund_required = 0"
        });
    }
    sql.push_str(" WHERE order_id = ?");
    let mut q = sqlx::query(AssertSqlSafe(&*sql)).bind(ts(now));
    if to != status {
        q = q.bind(ts(now));
    }
    if closes {
        let reason: String = format!("full refund: {}", m.reason).chars().take(500).collect();
        q = q.bind(reason);
    }
    q.bind(id.get()).execute(&mut *tx).await?;
    let kind = EventKind::of_money(m.kind == PaymentKind::Refund, status, to);
    record_event(&mut tx, t, id, kind, now).await?;
    tx.commit().await?;
    Ok(Ok((status, to, version + 1)))
}

/// A payment or refund for an archived order, in one transaction on the archive: the plan
/// read with the document locked ([`plan_archived_money`]), then the new document and its
/// event in the archive's outbox.
async fn record_archived_money(
    conn: &mut MySqlConnection,
    id: OrderId,
    m: &MoneyMovement,
    now: DateTime<Utc>,
) -> Result<std::result::Result<Committed, NotWritten>> {
    let mut tx = crate::storage::pool::begin(&mut *conn).await?;
    let ArchivedMoneyPlan {
        snapshot: s,
        payload,
        status,
        now,
    } = match plan_archived_money(&mut tx, id, m, now).await? {
        Ok(plan) => plan,
        Err(not) => return Ok(Err(not)),
    };
    sqlx::query("UPDATE archived_orders SET doc = ?, version = ? WHERE order_id = ?")
        .bind(&payload)
        .bind(s.version)
        .bind(id.get())
        .execute(&mut *tx)
        .await?;
    let event = EventKind::of_money(m.kind == PaymentKind::Refund, status, status);
    insert_event(&mut tx, id, s.version, s.shop_id, event, &payload, now).await?;
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

/// Writes the event of `id`'s current row (its version is the one just written) into the
/// outbox, in the caller's transaction.
async fn record_event(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    id: OrderId,
    kind: EventKind,
    now: DateTime<Utc>,
) -> Result<()> {
    // Read, then a plain INSERT: an `INSERT … SELECT` would hold the table's AUTO-INC lock
    // for the whole statement (`innodb_autoinc_lock_mode` 1, the default), serialising every
    // concurrent order write on this database behind the snapshot's subqueries.
    let (version, shop, payload) = event_row(&mut *conn, t, id).await?;
    insert_event(conn, id, version, shop, kind, &payload, now).await
}

/// The outbox row of one order event, in the caller's transaction (a shard's outbox or the
/// archive's: the same table).
async fn insert_event(
    conn: &mut MySqlConnection,
    id: OrderId,
    version: i64,
    shop: i64,
    kind: EventKind,
    payload: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (order_id, version, shop_id, kind, payload, created_at)
         VALUES (?, ?, ?, ?, ?, ?)",
        outbox::TABLE
    )))
    .bind(id.get())
    .bind(version)
    .bind(shop)
    .bind(kind.name())
    .bind(payload)
    .bind(ts(now))
    .execute(conn)
    .await?;
    Ok(())
}

// ---------------------------------------------------------------- the archive's rows

/// Rows per INSERT: 8 placeholders each.
const INSERT_CHUNK: usize = 500;

/// Writes a batch's documents and the shard's checkpoint in one transaction. A document
/// already archived is replaced only by a higher version: a batch run twice (after a crash
/// between this commit and the deletes) changes nothing.
pub(crate) async fn store_batch(
    conn: &mut MySqlConnection,
    shard: u32,
    docs: &[ArchivedDoc],
    checkpoint: &Checkpoint,
    now: DateTime<Utc>,
) -> Result<()> {
    let mut tx = crate::storage::pool::begin(conn).await?;
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

/// Deletes archived documents that turned out stale: the hot order moved on (a payment
/// arrived between the batch's snapshot and its delete) and stays hot, so the archive must
/// not keep a second, older copy. Only the version archived is removed.
pub(crate) async fn remove_stale(conn: &mut MySqlConnection, stale: &[(OrderId, i64)]) -> Result<u64> {
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

// ---------------------------------------------------------------- outside callers

/// The door without the service's `after_commit` (no cache notice, no watermark, no relay
/// wake-up): for the testkit's fixtures (orders written at old times), the bench's raw
/// baselines (the service's SQL without the service) and the fault tests' hand-made late
/// creates. Compiled only with the `testkit`
/// feature, which only `orderly-testkit` turns on: the server is never built with it, and
/// inside the crate every write goes through `OrderService::commit`.
#[cfg(feature = "testkit")]
pub async fn commit_without_after_commit(
    conn: &mut MySqlConnection,
    door: OrderDoor<'_>,
) -> Result<std::result::Result<Committed, NotWritten>> {
    commit(conn, door).await
}
