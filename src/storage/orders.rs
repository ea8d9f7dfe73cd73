//! SQL of the order tables of a shard.
//!
//! Every function names the shard's tables it touches through [`ShardTables`]; the id and
//! user routing happened before.
//!
//! # One commit point
//! Every change of an order goes through [`write_order`] ([`OrderWrite`] names them all): it
//! runs the write as one statement or one short transaction and answers what committed
//! ([`Committed`]: ids, version, status, GTID) or why nothing did ([`NotWritten`]). The SQL of
//! each write is private to this module, so a write path cannot commit around it. Changes
//! are compare-and-set statements on `version` and `status`; a caller that lost reloads to
//! say why. Every write that moves the version writes its event into the outbox in the same
//! transaction ([`super::outbox::record`]); the stock-release bookkeeping moves no version
//! and tells the outside nothing, so it writes none.
//!
//! # Void order ids: a late create never lands after its stock went back
//! The sweeper may give back the reservation of an order it did not find; a create whose
//! shard commit is merely slow must then never commit. Both sides use the shard's void table
//! in a Dekker-style handshake, each writing its own row first and then reading the other's
//! with a locking read, inside one shard transaction:
//! - [`insert_order`] inserts the order row (and its lines), then reads the void row `LOCK IN
//!   SHARE MODE`; if the id is void it rolls back ([`Inserted::Voided`]).
//! - [`void_unless_written`] inserts the void row, then reads the order row `FOR UPDATE`; if
//!   the order is there it rolls back, otherwise it commits the void.
//!
//! Whichever read comes second waits for the other transaction's row lock, so it sees the
//! other side's outcome: either the order commits and the sweeper finds it, or the void
//! commits and the create finds it; never both absent, never both present. (Racing reads
//! that wait on each other are a deadlock: InnoDB rolls one side back, and either outcome
//! is safe.) The sweeper's session has short lock-wait timeouts ([`sweeper_connection`]),
//! so an order whose commit is stalled makes it skip the claim, never return it.

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::mysql::MySqlRow;
use sqlx::AssertSqlSafe;
use sqlx::{MySqlConnection, Row};

use crate::domain::events::EventKind;
use crate::domain::ids::{CouponId, OrderId, ProductId, ShopId, UserId};
use crate::domain::money::{Currency, Money};
use crate::domain::order::{
    Address, NewOrder, Order, OrderDiscount, OrderLine, Payment, PaymentKind, Pricing,
};
use crate::domain::payment_rules::{money_rule, MoneyEffect, MoneyRefusal};
use crate::domain::status::OrderStatus;

use super::outbox;
use super::shards::ShardTables;
use super::{corrupt, ts, Result};

const ORDER_COLUMNS: &str = "order_id, user_id, shop_id, status, version, currency, total_amount, \
    discount_amount, pay_amount, receiver_name, receiver_phone, receiver_region, receiver_detail, \
    remark, tracking_number, carrier, close_reason, refund_required, created_at, updated_at, \
    pay_deadline, paid_at, shipped_at, completed_at, closed_at, invalidated_at";

fn money(row: &MySqlRow, col: &str) -> Result<Money> {
    let v: i64 = row.try_get(col)?;
    Money::new(v).ok_or_else(|| corrupt(col, v))
}

fn opt_time(row: &MySqlRow, col: &str) -> Result<Option<DateTime<Utc>>> {
    let v: Option<NaiveDateTime> = row.try_get(col)?;
    Ok(v.map(|t| t.and_utc()))
}

fn time(row: &MySqlRow, col: &str) -> Result<DateTime<Utc>> {
    let v: NaiveDateTime = row.try_get(col)?;
    Ok(v.and_utc())
}

fn order_from_row(row: &MySqlRow) -> Result<Order> {
    let id: i64 = row.try_get("order_id")?;
    let user: i64 = row.try_get("user_id")?;
    let shop: i64 = row.try_get("shop_id")?;
    let status: i8 = row.try_get("status")?;
    let currency: String = row.try_get("currency")?;
    let refund_required: i8 = row.try_get("refund_required")?;
    Ok(Order {
        order_id: OrderId::new(id).ok_or_else(|| corrupt("order_id", id))?,
        user_id: UserId::new(user).ok_or_else(|| corrupt("user_id", user))?,
        shop_id: ShopId::new(shop).ok_or_else(|| corrupt("shop_id", shop))?,
        status: OrderStatus::from_code(i64::from(status)).ok_or_else(|| corrupt("status", status))?,
        version: row.try_get("version")?,
        currency: Currency::parse(&currency).ok_or_else(|| corrupt("currency", &currency))?,
        total_amount: money(row, "total_amount")?,
        discount_amount: money(row, "discount_amount")?,
        pay_amount: money(row, "pay_amount")?,
        address: Address {
            name: row.try_get("receiver_name")?,
            phone: row.try_get("receiver_phone")?,
            region: row.try_get("receiver_region")?,
            detail: row.try_get("receiver_detail")?,
        },
        remark: row.try_get("remark")?,
        tracking_number: row.try_get("tracking_number")?,
        carrier: row.try_get("carrier")?,
        close_reason: row.try_get("close_reason")?,
        refund_required: refund_required != 0,
        created_at: time(row, "created_at")?,
        updated_at: time(row, "updated_at")?,
        pay_deadline: time(row, "pay_deadline")?,
        paid_at: opt_time(row, "paid_at")?,
        shipped_at: opt_time(row, "shipped_at")?,
        completed_at: opt_time(row, "completed_at")?,
        closed_at: opt_time(row, "closed_at")?,
        invalidated_at: opt_time(row, "invalidated_at")?,
        items: Vec::new(),
        payments: Vec::new(),
        discounts: Vec::new(),
    })
}

/// What [`insert_order`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inserted {
    /// The order is committed.
    Written,
    /// The sweeper voided this id (and gave its reservation back): nothing was written.
    Voided,
}

/// Writes a new order with its lines and discounts in one transaction, unless the id is void
/// (see the module docs: the order row first, then the void check). A second create of the
/// same id fails with [`super::StorageError::Duplicate`] and writes nothing.
async fn insert_order(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    order: &NewOrder,
    pricing: &Pricing,
    request_hash: &[u8; 32],
    now: DateTime<Utc>,
    pay_deadline: DateTime<Utc>,
) -> Result<Inserted> {
    let mut tx = sqlx::Connection::begin(conn).await?;
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
    // After the order row, never before: see the module docs.
    let void = sqlx::query(AssertSqlSafe(format!(
        "SELECT 1 FROM {} WHERE order_id = ? LOCK IN SHARE MODE",
        t.voids
    )))
    .bind(order.order_id.get())
    .fetch_optional(&mut *tx)
    .await?;
    if void.is_some() {
        tx.rollback().await?;
        return Ok(Inserted::Voided);
    }
    outbox::record(&mut tx, t, order.order_id, EventKind::Created, now).await?;
    tx.commit().await?;
    Ok(Inserted::Written)
}

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

/// How long the sweeper waits for a row lock (InnoDB) or a metadata or backup lock (the
/// server) before it gives up on a claim. An order insert holding the row is a create whose
/// commit is in flight; normally that takes milliseconds, so seconds mean the shard server
/// is stalled, and the claim is better left for the next step than waited on (the server
/// default is 50 s for row locks and a year for the others).
pub const SWEEPER_LOCK_WAIT_SECS: u32 = 5;

/// A connection of its own for the sweeper's void transactions, with short lock waits. It is
/// detached from the pool, so its session settings never reach another request; it closes
/// when dropped.
pub async fn sweeper_connection(pool: &sqlx::MySqlPool) -> Result<MySqlConnection> {
    let mut conn = pool.acquire().await?.detach();
    sqlx::query(AssertSqlSafe(format!(
        "SET SESSION innodb_lock_wait_timeout = {SWEEPER_LOCK_WAIT_SECS},
                     lock_wait_timeout = {SWEEPER_LOCK_WAIT_SECS}"
    )))
    .execute(&mut conn)
    .await?;
    Ok(conn)
}

/// What [`void_unless_written`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoidOutcome {
    /// The id is void (now or before): no order will ever be written under it.
    Voided,
    /// The order is committed, with this request hash; nothing was voided.
    Written(Vec<u8>),
}

/// Declares `id` dead unless its order is written, in one transaction (the sweeper's half of
/// the handshake in the module docs: the void row first, then the locking read of the order).
/// A lock-wait timeout here is an order whose commit is in flight: the caller must leave the
/// claim alone.
pub async fn void_unless_written(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    id: OrderId,
    now: DateTime<Utc>,
) -> Result<VoidOutcome> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    let inserted = sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (order_id, voided_at) VALUES (?, ?)",
        t.voids
    )))
    .bind(id.get())
    .bind(ts(now))
    .execute(&mut *tx)
    .await;
    match inserted.map_err(super::StorageError::from) {
        // Already void: an earlier sweep committed it and then failed to give back.
        Ok(_) | Err(super::StorageError::Duplicate(_)) => {}
        Err(e) => return Err(e),
    }
    let order = sqlx::query(AssertSqlSafe(format!(
        "SELECT request_hash FROM {} WHERE order_id = ? FOR UPDATE",
        t.orders
    )))
    .bind(id.get())
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(row) = order {
        tx.rollback().await?;
        return Ok(VoidOutcome::Written(row.try_get(0)?));
    }
    tx.commit().await?;
    Ok(VoidOutcome::Voided)
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

/// Runs `sql`, whose `IN (…)` has one placeholder per order, for these orders.
async fn rows_of(conn: &mut MySqlConnection, sql: &str, orders: &[Order]) -> Result<Vec<MySqlRow>> {
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for o in orders {
        q = q.bind(o.order_id.get());
    }
    Ok(q.fetch_all(conn).await?)
}

async fn load_children(conn: &mut MySqlConnection, t: &ShardTables, orders: &mut [Order]) -> Result<()> {
    if orders.is_empty() {
        return Ok(());
    }
    let ids = vec!["?"; orders.len()].join(", ");
    let pos = |orders: &[Order], id: i64| orders.iter().position(|o| o.order_id.get() == id);

    let sql = format!(
        "SELECT order_id, line_no, product_id, product_name, unit_price, quantity, line_total
         FROM {} WHERE order_id IN ({ids}) ORDER BY order_id, line_no",
        t.items
    );
    for row in rows_of(conn, &sql, orders).await? {
        let Some(i) = pos(orders, row.try_get("order_id")?) else {
            continue;
        };
        let pid: i64 = row.try_get("product_id")?;
        let line_no: i16 = row.try_get("line_no")?;
        let quantity: i32 = row.try_get("quantity")?;
        orders[i].items.push(OrderLine {
            line_no: line_no as u32,
            product_id: ProductId::new(pid).ok_or_else(|| corrupt("product_id", pid))?,
            product_name: row.try_get("product_name")?,
            unit_price: money(&row, "unit_price")?,
            quantity: i64::from(quantity),
            line_total: money(&row, "line_total")?,
        });
    }

    let sql = format!(
        "SELECT order_id, kind, transaction_no, channel, amount, created_at
         FROM {} WHERE order_id IN ({ids}) ORDER BY id",
        t.payments
    );
    for row in rows_of(conn, &sql, orders).await? {
        let Some(i) = pos(orders, row.try_get("order_id")?) else {
            continue;
        };
        let kind: i8 = row.try_get("kind")?;
        orders[i].payments.push(Payment {
            kind: if kind == 0 {
                PaymentKind::Payment
            } else {
                PaymentKind::Refund
            },
            transaction_no: row.try_get("transaction_no")?,
            channel: row.try_get("channel")?,
            amount: money(&row, "amount")?,
            created_at: time(&row, "created_at")?,
        });
    }

    let sql = format!(
        "SELECT order_id, line_no, coupon_id, kind, amount, description
         FROM {} WHERE order_id IN ({ids}) ORDER BY order_id, line_no",
        t.discounts
    );
    for row in rows_of(conn, &sql, orders).await? {
        let Some(i) = pos(orders, row.try_get("order_id")?) else {
            continue;
        };
        let line_no: i16 = row.try_get("line_no")?;
        let coupon: Option<i64> = row.try_get("coupon_id")?;
        orders[i].discounts.push(OrderDiscount {
            line_no: line_no as u32,
            coupon_id: coupon.and_then(CouponId::new),
            kind: row.try_get("kind")?,
            amount: money(&row, "amount")?,
            description: row.try_get("description")?,
        });
    }
    Ok(())
}

/// The whole order, or `None`.
pub async fn load_order(conn: &mut MySqlConnection, t: &ShardTables, id: OrderId) -> Result<Option<Order>> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT {ORDER_COLUMNS} FROM {} WHERE order_id = ?",
        t.orders
    )))
    .bind(id.get())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let mut orders = [order_from_row(&row)?];
    load_children(conn, t, &mut orders).await?;
    let [order] = orders;
    Ok(Some(order))
}

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
pub(super) fn user_list_sql(select: &str, q: &ListQuery) -> String {
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
pub(super) fn bind_user_list<'q>(
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

/// A status change as a compare-and-set on (version, status).
#[derive(Debug, Clone, Default)]
pub struct StatusChange {
    pub carrier: Option<String>,
    pub tracking_number: Option<String>,
    pub close_reason: Option<String>,
    /// Money was received that must go back (invalidating a paid order).
    pub refund_required: bool,
}

fn timestamp_column(to: OrderStatus) -> &'static str {
    match to {
        OrderStatus::PendingPayment => "updated_at",
        OrderStatus::AwaitingShipment => "paid_at",
        OrderStatus::Shipped => "shipped_at",
        OrderStatus::Completed => "completed_at",
        OrderStatus::Closed => "closed_at",
        OrderStatus::Invalid => "invalidated_at",
    }
}

/// `FORCE INDEX (PRIMARY)` on every compare-and-set: with `status = ?` in the condition the
/// optimizer may read through `idx_status_deadline` and lock that index entry before the
/// row, the opposite order of a transaction that locked the row first (`FOR UPDATE`) and then
/// changes the status: a deadlock between a payment and a cancel.
const BY_PRIMARY: &str = "FORCE INDEX (PRIMARY)";

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

/// Field changes of `PATCH`; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldChanges {
    pub address: Option<Address>,
    pub remark: Option<String>,
    pub tracking_number: Option<String>,
    pub carrier: Option<String>,
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

/// A payment or refund callback from the channel.
#[derive(Debug, Clone)]
pub struct MoneyMovement {
    pub kind: PaymentKind,
    pub transaction_no: String,
    pub channel: String,
    pub amount: Money,
    pub reason: String,
}

/// What recording a payment or refund did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MoneyOutcome {
    /// Recorded; the order moved from the first status to the second (maybe the same), and
    /// its version from the given one to the next.
    Recorded {
        from: OrderStatus,
        to: OrderStatus,
        version: i64,
    },
    /// This transaction number was recorded before for this order: nothing changed.
    Replay,
    /// This transaction number belongs to another order or kind.
    Conflict,
    /// The amount is not what is due (payment) or more than was paid (refund).
    Mismatch {
        due: i64,
    },
    /// The order cannot take this (e.g. a refund of an unpaid order).
    InvalidTransition(OrderStatus),
    NotFound,
}

/// Records a payment or refund and moves the status, in one transaction with the order row
/// locked, so it serialises with every other change of the order. What it does is
/// [`money_rule`]'s answer for the status, amount due and net paid read here.
///
/// The transaction number is unique per shard here; across shards the service claims it in
/// the commerce database first (`commerce::claim_payment_number`).
async fn record_money(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    id: OrderId,
    m: &MoneyMovement,
    now: DateTime<Utc>,
) -> Result<MoneyOutcome> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT status, pay_amount, version FROM {} WHERE order_id = ? FOR UPDATE",
        t.orders
    )))
    .bind(id.get())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(MoneyOutcome::NotFound);
    };
    let code: i8 = row.try_get("status")?;
    let status = OrderStatus::from_code(i64::from(code)).ok_or_else(|| corrupt("status", code))?;
    let pay_amount: i64 = row.try_get("pay_amount")?;
    let version: i64 = row.try_get("version")?;

    let existing = sqlx::query(AssertSqlSafe(format!(
        "SELECT order_id, kind, amount, channel FROM {} WHERE transaction_no = ?",
        t.payments
    )))
    .bind(&m.transaction_no)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(e) = existing {
        let (oid, kind, amount, channel): (i64, i8, i64, String) =
            (e.try_get(0)?, e.try_get(1)?, e.try_get(2)?, e.try_get(3)?);
        // The same callback again answers the same; the same number with other content is
        // not a retry.
        let same =
            oid == id.get() && kind == m.kind as i8 && amount == m.amount.minor() && channel == m.channel;
        return Ok(if same {
            MoneyOutcome::Replay
        } else {
            MoneyOutcome::Conflict
        });
    }
    let net: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT CAST(COALESCE(SUM(IF(kind = 0, amount, -amount)), 0) AS SIGNED) FROM {} WHERE order_id = ?",
        t.payments
    )))
    .bind(id.get())
    .fetch_one(&mut *tx)
    .await?;
    let MoneyEffect {
        to,
        refund_required: set_refund_flag,
        closes,
    } = match money_rule(status, m.kind, m.amount.minor(), pay_amount, net) {
        Ok(e) => e,
        Err(MoneyRefusal::WrongAmount { limit }) => return Ok(MoneyOutcome::Mismatch { due: limit }),
        Err(MoneyRefusal::NotNow) => return Ok(MoneyOutcome::InvalidTransition(status)),
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
    outbox::record(&mut tx, t, id, kind, now).await?;
    tx.commit().await?;
    Ok(MoneyOutcome::Recorded {
        from: status,
        to,
        version: version + 1,
    })
}

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
    super::id_versions(&rows)
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

// ---------------------------------------------------------------- the archive's move

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
) -> Result<std::collections::HashMap<OrderId, i64>> {
    let mut out = std::collections::HashMap::new();
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

/// Deletes archived orders from the four hot tables, each only if it is still at the version
/// the archive holds, in one short transaction over the chunk, by primary key, in id order
/// (`orders` rows locked first, so it serialises with every write of these orders).
/// Touches no version and writes no event: the order itself is unchanged, only moved. The
/// same transaction records their buyers in `archived_users` (see
/// [`has_archived_orders`]): whoever sees an order gone from the shard sees its buyer there.
pub async fn delete_archived(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    chunk: &[(OrderId, i64)],
) -> Result<Deleted> {
    let mut out = Deleted::default();
    if chunk.is_empty() {
        return Ok(out);
    }
    let mut ids: Vec<(OrderId, i64)> = chunk.to_vec();
    ids.sort_by_key(|(id, _)| id.get());
    let list = vec!["?"; ids.len()].join(", ");
    let mut tx = sqlx::Connection::begin(conn).await?;
    let sql = format!(
        "SELECT order_id, version, user_id FROM {} WHERE order_id IN ({list}) ORDER BY order_id FOR UPDATE",
        t.orders
    );
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for (id, _) in &ids {
        q = q.bind(id.get());
    }
    let mut current = std::collections::HashMap::new();
    for row in q.fetch_all(&mut *tx).await? {
        let (id, version, user): (i64, i64, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        current.insert(id, (version, user));
    }
    // Buyers of the orders deleted now (one gone already was recorded with its delete).
    let mut users = std::collections::BTreeSet::new();
    for (id, archived) in &ids {
        match current.get(&id.get()) {
            Some((v, _)) if v != archived => out.moved_on.push((*id, *v)),
            Some((_, user)) => {
                users.insert(*user);
                out.deleted.push(*id);
            }
            None => out.deleted.push(*id),
        }
    }
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

// ---------------------------------------------------------------- the commit point

/// Every change of an order, as the one storage entry [`write_order`] takes it. The SQL of
/// each stays private to this module, so no write path can commit around the entry.
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
    /// A payment or refund, with whatever status move [`money_rule`] says.
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

/// The commit point: runs one order write in its own short transaction (or one autocommit
/// statement) on `conn` and answers what committed, read on the same session right after the
/// commit. A duplicate order id fails with [`super::StorageError::Duplicate`].
///
/// Cancellation: each write is one statement or one transaction whose `COMMIT` is its last
/// step; a future dropped before that leaves nothing committed (and the pool guard closes a
/// connection left inside the transaction). Callers run it on a task that is not dropped with
/// the request, so a commit is always followed by its `after_commit`.
pub async fn write_order(
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
        } => match insert_order(conn, t, order, pricing, request_hash, now, pay_deadline).await? {
            Inserted::Voided => return Ok(Err(NotWritten::Voided)),
            Inserted::Written => (
                order.order_id,
                Some(1),
                Some(OrderStatus::PendingPayment),
                Some(OrderStatus::PendingPayment),
            ),
        },
        OrderWrite::Status {
            id,
            expected_version,
            from,
            to,
            change,
            now,
        } => {
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            if !cas_status(&mut tx, t, id, expected_version, from, to, change, now).await? {
                tx.rollback().await?;
                return Ok(Err(NotWritten::Lost));
            }
            outbox::record(&mut tx, t, id, EventKind::of_move(from, to), now).await?;
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
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            if !cas_fields(&mut tx, t, id, expected_version, status, changes, now).await? {
                tx.rollback().await?;
                return Ok(Err(NotWritten::Lost));
            }
            outbox::record(&mut tx, t, id, EventKind::Changed, now).await?;
            tx.commit().await?;
            (id, Some(expected_version + 1), Some(status), Some(status))
        }
        OrderWrite::Money { id, movement, now } => match record_money(conn, t, id, movement, now).await? {
            MoneyOutcome::Recorded { from, to, version } => (id, Some(version), Some(to), Some(from)),
            MoneyOutcome::Replay => return Ok(Err(NotWritten::Replay)),
            MoneyOutcome::Conflict => return Ok(Err(NotWritten::Conflict)),
            MoneyOutcome::Mismatch { due } => return Ok(Err(NotWritten::Mismatch { due })),
            MoneyOutcome::InvalidTransition(s) => return Ok(Err(NotWritten::NotNow(s))),
            MoneyOutcome::NotFound => return Ok(Err(NotWritten::NotFound)),
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
