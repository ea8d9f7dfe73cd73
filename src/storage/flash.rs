//! SQL of flash sales in the commerce database: the sales themselves, the sales live now, and
//! what a sale's Redis gate is rebuilt from.
//!
//! The units of a sale are taken and given back inside the reservation's own transaction (see
//! [`super::commerce::reserve`] and `give_back`): the database alone never sells more than a
//! sale's allotment or more than a buyer's limit, whatever the gate in front of it says.

use crate::storage::Db;
use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::mysql::MySqlRow;
use sqlx::Row;

use crate::domain::flash::{FlashSale, NewFlashSale};
use crate::domain::ids::{FlashSaleId, OrderId, ProductId, ShopId, UserId};
use crate::domain::money::Money;

use super::{corrupt, ts, Result};

const COLUMNS: &str =
    "id, product_id, shop_id, units, sold, sale_price, per_user_limit, starts_at, ends_at, \
                       payment_timeout_secs, ended_at";

fn sale_from_row(r: &MySqlRow) -> Result<FlashSale> {
    let id: i64 = r.try_get("id")?;
    let product: i64 = r.try_get("product_id")?;
    let shop: i64 = r.try_get("shop_id")?;
    let price: i64 = r.try_get("sale_price")?;
    let limit: i32 = r.try_get("per_user_limit")?;
    let timeout: i32 = r.try_get("payment_timeout_secs")?;
    Ok(FlashSale {
        sale_id: FlashSaleId::new(id).ok_or_else(|| corrupt("flash sale id", id))?,
        product_id: ProductId::new(product).ok_or_else(|| corrupt("product id", product))?,
        shop_id: ShopId::new(shop).ok_or_else(|| corrupt("shop id", shop))?,
        units: r.try_get("units")?,
        sold: r.try_get("sold")?,
        sale_price: Money::new(price).ok_or_else(|| corrupt("sale price", price))?,
        per_user_limit: i64::from(limit),
        starts_at: r.try_get::<NaiveDateTime, _>("starts_at")?.and_utc(),
        ends_at: r.try_get::<NaiveDateTime, _>("ends_at")?.and_utc(),
        payment_timeout_secs: i64::from(timeout),
        ended_at: r
            .try_get::<Option<NaiveDateTime>, _>("ended_at")?
            .map(|t| t.and_utc()),
    })
}

/// Why a sale was not created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotCreated {
    /// Another sale of the product overlaps this one's window.
    Overlaps(FlashSaleId),
}

/// Creates a sale of `shop`'s product, unless another sale of the product (not ended) overlaps
/// its window. The product's row is locked meanwhile, so two overlapping creates cannot both
/// pass the check.
pub async fn insert_sale(
    pool: &Db,
    shop: ShopId,
    s: &NewFlashSale,
    now: DateTime<Utc>,
) -> Result<std::result::Result<FlashSale, NotCreated>> {
    let mut conn = pool.acquire().await?;
    let mut tx = crate::storage::pool::begin(&mut conn).await?;
    sqlx::query("SELECT id FROM products WHERE id = ? FOR UPDATE")
        .bind(s.product_id.get())
        .fetch_optional(&mut *tx)
        .await?;
    let overlap: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM flash_sales
         WHERE product_id = ? AND ended_at IS NULL AND starts_at < ? AND ends_at > ? LIMIT 1",
    )
    .bind(s.product_id.get())
    .bind(ts(s.ends_at))
    .bind(ts(s.starts_at))
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(other) = overlap.and_then(FlashSaleId::new) {
        tx.rollback().await?;
        return Ok(Err(NotCreated::Overlaps(other)));
    }
    let done = sqlx::query(
        "INSERT INTO flash_sales (product_id, shop_id, units, sale_price, per_user_limit, starts_at, ends_at,
                                  payment_timeout_secs, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(s.product_id.get())
    .bind(shop.get())
    .bind(s.units)
    .bind(s.sale_price.minor())
    .bind(s.per_user_limit)
    .bind(ts(s.starts_at))
    .bind(ts(s.ends_at))
    .bind(s.payment_timeout_secs)
    .bind(ts(now))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let id = done.last_insert_id() as i64;
    let sale = load_sale(
        pool,
        FlashSaleId::new(id).ok_or_else(|| corrupt("flash sale id", id))?,
    )
    .await?
    .ok_or_else(|| corrupt("flash sale gone after its insert", id))?;
    Ok(Ok(sale))
}

pub async fn load_sale(pool: &Db, id: FlashSaleId) -> Result<Option<FlashSale>> {
    let sql = format!("SELECT {COLUMNS} FROM flash_sales WHERE id = ?");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.get())
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(sale_from_row)
        .transpose()
}

/// Ends a sale now (it stops selling; orders already made stay). Returns whether it was
/// running or still to come.
pub async fn end_sale(pool: &Db, id: FlashSaleId, now: DateTime<Utc>) -> Result<bool> {
    let done = sqlx::query("UPDATE flash_sales SET ended_at = ? WHERE id = ? AND ended_at IS NULL")
        .bind(ts(now))
        .bind(id.get())
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Sales not ended whose window contains some time in `from..to`: what the service keeps in
/// memory to price orders and what the gates are rebuilt for.
pub async fn sales_between(pool: &Db, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Vec<FlashSale>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM flash_sales WHERE ended_at IS NULL AND ends_at > ? AND starts_at < ? ORDER BY id"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(ts(from))
        .bind(ts(to))
        .fetch_all(pool)
        .await?
        .iter()
        .map(sale_from_row)
        .collect()
}

/// What a sale's gate holds, read from the database: the units left, each buyer's units, and
/// each live order's buyer and units.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GateState {
    pub left: i64,
    pub buyers: Vec<(UserId, i64)>,
    pub orders: Vec<(OrderId, UserId, i64)>,
    /// Orders that reserved units of the sale and gave them back (closed, abandoned...).
    pub released: Vec<OrderId>,
}

/// The gate state of `sale`, in one consistent read (a snapshot transaction).
pub async fn gate_state(pool: &Db, sale: &FlashSale) -> Result<GateState> {
    let mut conn = pool.acquire().await?;
    // The pool's sessions read committed; the next transaction alone reads one snapshot.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *conn)
        .await?;
    let mut tx = crate::storage::pool::begin(&mut conn).await?;
    let sold: i64 = sqlx::query_scalar("SELECT sold FROM flash_sales WHERE id = ?")
        .bind(sale.sale_id.get())
        .fetch_one(&mut *tx)
        .await?;
    let buyers = sqlx::query("SELECT user_id, units FROM flash_sale_buyers WHERE sale_id = ? AND units > 0")
        .bind(sale.sale_id.get())
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| {
            let (u, n): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
            Ok((UserId::new(u).ok_or_else(|| corrupt("user id", u))?, n))
        })
        .collect::<Result<Vec<_>>>()?;
    let orders = sqlx::query(
        "SELECT r.order_id, c.user_id, r.quantity FROM stock_reservations r
         JOIN order_claims c ON c.order_id = r.order_id
         WHERE r.flash_sale_id = ? AND r.state <> 2",
    )
    .bind(sale.sale_id.get())
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(|r| {
        let (o, u, n): (i64, i64, i64) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        Ok((
            OrderId::new(o).ok_or_else(|| corrupt("order id", o))?,
            UserId::new(u).ok_or_else(|| corrupt("user id", u))?,
            n,
        ))
    })
    .collect::<Result<Vec<_>>>()?;
    let released = sqlx::query_scalar::<_, i64>(
        "SELECT order_id FROM stock_reservations WHERE flash_sale_id = ? AND state = 2",
    )
    .bind(sale.sale_id.get())
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|o| OrderId::new(o).ok_or_else(|| corrupt("order id", o)))
    .collect::<Result<Vec<_>>>()?;
    tx.commit().await?;
    Ok(GateState {
        left: sale.units - sold,
        buyers,
        orders,
        released,
    })
}
