//! The catalog of the commerce database: users, shops, products (with their stock) and
//! coupons, as orders price and reserve them.

use crate::storage::Db;
use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::mysql::MySqlRow;
use sqlx::AssertSqlSafe;
use sqlx::Row;

use crate::domain::ids::{CouponId, OrderId, ProductId, ShopId, UserId};
use crate::domain::money::{Currency, Money};
use crate::domain::order::{CouponSnapshot, ProductSnapshot};

use crate::storage::{corrupt, ts, Result};

// ---------------------------------------------------------------- users and shops

pub use crate::domain::user::User;

/// Creates a user; with `id` given, under that id (Duplicate if taken).
pub async fn insert_user(
    pool: &Db,
    id: Option<UserId>,
    name: &str,
    level: i32,
    now: DateTime<Utc>,
) -> Result<UserId> {
    let done = sqlx::query("INSERT INTO users (id, name, level, created_at) VALUES (?, ?, ?, ?)")
        .bind(id.map(|u| u.get()))
        .bind(name)
        .bind(level)
        .bind(ts(now))
        .execute(pool)
        .await?;
    let v = id.map(|u| u.get()).unwrap_or(done.last_insert_id() as i64);
    UserId::new(v).ok_or_else(|| corrupt("user id", v))
}

pub async fn load_user(conn: &mut sqlx::MySqlConnection, id: UserId) -> Result<Option<User>> {
    let row = sqlx::query("SELECT id, name, level, created_at FROM users WHERE id = ?")
        .bind(id.get())
        .fetch_optional(conn)
        .await?;
    row.map(|r| {
        Ok(User {
            user_id: id,
            name: r.try_get("name")?,
            level: r.try_get("level")?,
            created_at: r.try_get::<NaiveDateTime, _>("created_at")?.and_utc(),
        })
    })
    .transpose()
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Shop {
    pub shop_id: ShopId,
    pub name: String,
}

pub async fn insert_shop(pool: &Db, name: &str, now: DateTime<Utc>) -> Result<ShopId> {
    let done = sqlx::query("INSERT INTO shops (name, created_at) VALUES (?, ?)")
        .bind(name)
        .bind(ts(now))
        .execute(pool)
        .await?;
    let v = done.last_insert_id() as i64;
    ShopId::new(v).ok_or_else(|| corrupt("shop id", v))
}

pub async fn shop_exists(pool: &Db, id: ShopId) -> Result<bool> {
    Ok(sqlx::query("SELECT 1 FROM shops WHERE id = ?")
        .bind(id.get())
        .fetch_optional(pool)
        .await?
        .is_some())
}

// ---------------------------------------------------------------- products

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Product {
    pub product_id: ProductId,
    pub shop_id: ShopId,
    pub name: String,
    pub price: Money,
    pub currency: Currency,
    pub stock: i64,
}

impl Product {
    pub fn snapshot(&self) -> ProductSnapshot {
        ProductSnapshot {
            id: self.product_id,
            shop_id: self.shop_id,
            name: self.name.clone(),
            price: self.price,
            currency: self.currency,
        }
    }
}

fn product_from_row(r: &MySqlRow) -> Result<Product> {
    let id: i64 = r.try_get("id")?;
    let shop: i64 = r.try_get("shop_id")?;
    let price: i64 = r.try_get("price")?;
    let currency: String = r.try_get("currency")?;
    Ok(Product {
        product_id: ProductId::new(id).ok_or_else(|| corrupt("product id", id))?,
        shop_id: ShopId::new(shop).ok_or_else(|| corrupt("shop id", shop))?,
        name: r.try_get("name")?,
        price: Money::new(price).ok_or_else(|| corrupt("price", price))?,
        currency: Currency::parse(&currency).ok_or_else(|| corrupt("currency", &currency))?,
        stock: r.try_get("stock")?,
    })
}

pub async fn insert_product(
    pool: &Db,
    shop: ShopId,
    name: &str,
    price: Money,
    currency: Currency,
    stock: i64,
    now: DateTime<Utc>,
) -> Result<ProductId> {
    let done = sqlx::query(
        "INSERT INTO products (shop_id, name, price, currency, stock, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(shop.get())
    .bind(name)
    .bind(price.minor())
    .bind(currency.as_str())
    .bind(stock)
    .bind(ts(now))
    .bind(ts(now))
    .execute(pool)
    .await?;
    let v = done.last_insert_id() as i64;
    ProductId::new(v).ok_or_else(|| corrupt("product id", v))
}

pub async fn load_product(pool: &Db, id: ProductId) -> Result<Option<Product>> {
    let row = sqlx::query("SELECT id, shop_id, name, price, currency, stock FROM products WHERE id = ?")
        .bind(id.get())
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(product_from_row).transpose()
}

pub async fn load_products(pool: &Db, ids: &[ProductId]) -> Result<Vec<Product>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT id, shop_id, name, price, currency, stock FROM products WHERE id IN ({})",
        vec!["?"; ids.len()].join(", ")
    );
    let mut q = sqlx::query(AssertSqlSafe(&*sql));
    for id in ids {
        q = q.bind(id.get());
    }
    q.fetch_all(pool).await?.iter().map(product_from_row).collect()
}

/// Adds `quantity` units of stock unless that would exceed `max`; `false` if it would (or
/// there is no such product).
pub async fn add_stock(
    pool: &Db,
    id: ProductId,
    quantity: i64,
    max: i64,
    now: DateTime<Utc>,
) -> Result<bool> {
    let done =
        sqlx::query("UPDATE products SET stock = stock + ?, updated_at = ? WHERE id = ? AND stock <= ?")
            .bind(quantity)
            .bind(ts(now))
            .bind(id.get())
            .bind(max - quantity)
            .execute(pool)
            .await?;
    Ok(done.rows_affected() == 1)
}

// ---------------------------------------------------------------- coupons

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct NewCoupon {
    pub user_id: UserId,
    pub shop_id: Option<ShopId>,
    pub amount: Money,
    pub min_spend: Money,
    pub valid_from: DateTime<Utc>,
    pub valid_to: DateTime<Utc>,
    pub currency: Currency,
}

pub async fn insert_coupon(pool: &Db, c: &NewCoupon, now: DateTime<Utc>) -> Result<CouponId> {
    let done = sqlx::query(
        "INSERT INTO coupons (user_id, shop_id, amount, min_spend, currency, valid_from, valid_to, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(c.user_id.get())
    .bind(c.shop_id.map(|s| s.get()))
    .bind(c.amount.minor())
    .bind(c.min_spend.minor())
    .bind(c.currency.as_str())
    .bind(ts(c.valid_from))
    .bind(ts(c.valid_to))
    .bind(ts(now))
    .execute(pool)
    .await?;
    let v = done.last_insert_id() as i64;
    CouponId::new(v).ok_or_else(|| corrupt("coupon id", v))
}

fn coupon_from_row(r: &MySqlRow) -> Result<CouponSnapshot> {
    let id: i64 = r.try_get("id")?;
    let user: i64 = r.try_get("user_id")?;
    let shop: Option<i64> = r.try_get("shop_id")?;
    let amount: i64 = r.try_get("amount")?;
    let min_spend: i64 = r.try_get("min_spend")?;
    let redeemed: Option<i64> = r.try_get("redeemed_order_id")?;
    let currency: String = r.try_get("currency")?;
    Ok(CouponSnapshot {
        id: CouponId::new(id).ok_or_else(|| corrupt("coupon id", id))?,
        user_id: UserId::new(user).ok_or_else(|| corrupt("user id", user))?,
        shop_id: shop.and_then(ShopId::new),
        amount: Money::new(amount).ok_or_else(|| corrupt("amount", amount))?,
        min_spend: Money::new(min_spend).ok_or_else(|| corrupt("min_spend", min_spend))?,
        currency: Currency::parse(&currency).ok_or_else(|| corrupt("currency", &currency))?,
        valid_from: r.try_get::<NaiveDateTime, _>("valid_from")?.and_utc(),
        valid_to: r.try_get::<NaiveDateTime, _>("valid_to")?.and_utc(),
        redeemed_order_id: redeemed.and_then(OrderId::new),
    })
}

pub async fn load_coupons(pool: &Db, ids: &[CouponId]) -> Result<Vec<CouponSnapshot>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT id, user_id, shop_id, amount, min_spend, currency, valid_from, valid_to, redeemed_order_id
         FROM coupons WHERE id IN ({})",
        vec!["?"; ids.len()].join(", ")
    );
    let mut q = sqlx::query(AssertSqlSafe(&*sql));
    for id in ids {
        q = q.bind(id.get());
    }
    q.fetch_all(pool).await?.iter().map(coupon_from_row).collect()
}
