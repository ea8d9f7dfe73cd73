//! Order rows: the columns an order is read with, their decoding into [`Order`], and the
//! children (lines, payments, discounts) loaded for a batch of orders in one query each.
//! Reads only; every name of a table comes from [`ShardTables`].

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::mysql::MySqlRow;
use sqlx::AssertSqlSafe;
use sqlx::{MySqlConnection, Row};

use crate::domain::ids::{CouponId, OrderId, ProductId, ShopId, UserId};
use crate::domain::money::{Currency, Money};
use crate::domain::order::{Address, Order, OrderDiscount, OrderLine, Payment, PaymentKind};
use crate::domain::status::OrderStatus;
use crate::storage::shards::ShardTables;
use crate::storage::{corrupt, Result};

pub(super) const ORDER_COLUMNS: &str =
    "order_id, user_id, shop_id, status, version, currency, total_amount, \
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

pub(super) fn order_from_row(row: &MySqlRow) -> Result<Order> {
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

/// Runs `sql`, whose `IN (…)` has one placeholder per order, for these orders.
async fn rows_of(conn: &mut MySqlConnection, sql: &str, orders: &[Order]) -> Result<Vec<MySqlRow>> {
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for o in orders {
        q = q.bind(o.order_id.get());
    }
    Ok(q.fetch_all(conn).await?)
}

pub(super) async fn load_children(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    orders: &mut [Order],
) -> Result<()> {
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
