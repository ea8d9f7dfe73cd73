//! Catalog use cases: enough to set up a shop — users, shops, products with price and stock,
//! stock top-ups, coupons. Administrators do everything; a merchant manages its own shop.

use crate::storage::Db;
use chrono::{DateTime, Utc};

use std::sync::Arc;

use crate::clock::Clock;
use crate::domain::actor::Caller;
use crate::domain::consistency::Consistency;
use crate::domain::ids::{ProductId, ShopId, UserId};
use crate::domain::money::{Currency, Money};
use crate::domain::order::{check_text, is_storable_time, FieldErrors};
use crate::redis::cache::Cache;
use crate::storage::commerce::{self, NewCoupon, Product, Shop, User};
use crate::storage::replicas::{self, Database, ReadQuery};
use crate::storage::StorageError;

use super::{Error, Result};

/// The most stock one call adds, and the most a product holds: far from overflowing
/// `BIGINT`, far beyond any real warehouse.
pub const MAX_STOCK_STEP: i64 = 1_000_000_000;
pub const MAX_STOCK: i64 = 1_000_000_000_000;

/// The largest id an administrator may give a user explicitly. `users.id` is an
/// AUTO_INCREMENT `BIGINT`: after an explicit id the counter continues above it, so an id
/// near `i64::MAX` would make every later create without an id fail on overflow (a 500).
/// 2^53 leaves the counter 2^63 - 2^53 ids of room, and is also the largest integer a
/// JavaScript client can hold exactly, so no imported id needs more.
pub const MAX_EXPLICIT_USER_ID: i64 = 1 << 53;

#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUserRequest {
    /// Optional explicit id (e.g. imported from an account system), decimal string.
    #[schema(value_type = Option<UserId>)]
    pub user_id: Option<String>,
    pub name: String,
    #[serde(default)]
    pub level: i32,
}

#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewShopRequest {
    pub name: String,
}

#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProductRequest {
    #[schema(value_type = ShopId)]
    pub shop_id: String,
    pub name: String,
    pub price: i64,
    pub currency: Option<String>,
    pub stock: i64,
}

#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddStockRequest {
    pub quantity: i64,
}

#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCouponRequest {
    #[schema(value_type = UserId)]
    pub user_id: String,
    #[schema(value_type = Option<ShopId>)]
    pub shop_id: Option<String>,
    pub amount: i64,
    #[serde(default)]
    pub min_spend: i64,
    pub valid_from: Option<DateTime<Utc>>,
    pub valid_to: DateTime<Utc>,
    /// ISO-4217; the coupon applies only to orders in it. Default CNY.
    pub currency: Option<String>,
}

/// An issued coupon: its id and what it grants.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct CouponView {
    pub coupon_id: crate::domain::ids::CouponId,
    #[serde(flatten)]
    pub coupon: NewCoupon,
}

#[derive(Clone)]
pub struct CatalogService {
    /// The commerce primary: every catalog write and read but profiles.
    commerce: Db,
    /// The commerce database with its replicas, for user profiles.
    profiles: Arc<Database>,
    cache: Cache,
    clock: Clock,
}

fn money_field(errors: &mut FieldErrors, field: &str, v: i64) -> Money {
    Money::new(v).unwrap_or_else(|| {
        errors.push(field, "must be between 0 and 10^15 minor units");
        Money::ZERO
    })
}

/// An optional ISO-4217 code; CNY when absent.
fn currency_field(errors: &mut FieldErrors, v: Option<&str>) -> Currency {
    match v {
        None => Currency::CNY,
        Some(c) => Currency::parse(c).unwrap_or_else(|| {
            errors.push("currency", "must be an ISO-4217 code like CNY");
            Currency::CNY
        }),
    }
}

impl CatalogService {
    pub fn new(commerce: Arc<Database>, cache: Cache) -> Self {
        CatalogService {
            commerce: commerce.write().clone(),
            profiles: commerce,
            cache,
            clock: Clock::system(),
        }
    }

    /// The clock catalog writes are stamped with (the system's by default).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The commerce database with its replicas.
    pub fn profiles(&self) -> &Arc<Database> {
        &self.profiles
    }

    pub async fn create_user(&self, caller: Caller, req: NewUserRequest) -> Result<User> {
        if !caller.is_admin() {
            return Err(Error::Forbidden("only an administrator creates users"));
        }
        let mut errors = FieldErrors::default();
        check_text(&mut errors, "name", &req.name, 100, true);
        let id = match &req.user_id {
            None => None,
            Some(s) => {
                let id = UserId::parse(s).filter(|u| u.get() <= MAX_EXPLICIT_USER_ID);
                if id.is_none() {
                    errors.push(
                        "user_id",
                        format!("must be a positive decimal id string, at most {MAX_EXPLICIT_USER_ID}"),
                    );
                }
                id
            }
        };
        if !(0..=100).contains(&req.level) {
            errors.push("level", "must be between 0 and 100");
        }
        errors.into_result(())?;
        let created = self.clock.now();
        let user_id = match commerce::insert_user(&self.commerce, id, &req.name, req.level, created).await {
            Err(StorageError::Duplicate(_)) => return Err(FieldErrors::single("user_id", "is taken").into()),
            other => other?,
        };
        let user = User {
            user_id,
            name: req.name,
            level: req.level,
            created_at: created,
        };
        // A profile is written once; a cached "no such user" must go.
        self.cache.user_written(&user).await;
        Ok(user)
    }

    /// The profile `id`, through the cache, read on a commerce replica. Profiles never
    /// change once created, so a replica's copy is current unless it is missing: "no such
    /// user" from a replica is asked again of the primary (the profile may be new).
    async fn load_user(&self, id: UserId) -> Result<Option<User>> {
        self.cache
            .user(id, self.profiles.reference(), || async {
                let query = replicas::query(move |c| -> ReadQuery<'_, Option<User>> {
                    Box::pin(commerce::load_user(c, id))
                });
                let db = &self.profiles;
                let found = db.read(Consistency::Eventual, None, &query).await?;
                if found.value.is_none() && found.served == replicas::Served::Replica {
                    return Ok(db.read(Consistency::Strong, None, &query).await?.value);
                }
                Ok(found.value)
            })
            .await
    }

    /// The buyer's profile, for `?include=user`: whoever may see an order may see who
    /// placed it (a shop ships to them). `None` when no profile was ever created.
    pub async fn buyer_of(&self, order: &crate::domain::order::Order) -> Result<Option<User>> {
        self.load_user(order.user_id).await
    }

    pub async fn get_user(&self, caller: Caller, id: UserId) -> Result<User> {
        let allowed = match caller {
            Caller::User(u) | Caller::Merchant { user: u, .. } => u == id,
            Caller::Admin(_) => true,
            Caller::Service => return Err(Error::Forbidden("the payment channel reads no users")),
        };
        if !allowed {
            return Err(Error::NotFound);
        }
        self.load_user(id).await?.ok_or(Error::NotFound)
    }

    pub async fn create_shop(&self, caller: Caller, req: NewShopRequest) -> Result<Shop> {
        if !caller.is_admin() {
            return Err(Error::Forbidden("only an administrator creates shops"));
        }
        let mut errors = FieldErrors::default();
        check_text(&mut errors, "name", &req.name, 100, true);
        errors.into_result(())?;
        let shop_id = commerce::insert_shop(&self.commerce, &req.name, self.clock.now()).await?;
        Ok(Shop {
            shop_id,
            name: req.name,
        })
    }

    /// Administrators manage every shop, a merchant only its own; for anyone else the shop
    /// does not exist.
    fn manages(caller: Caller, shop: ShopId) -> Result<()> {
        match caller {
            Caller::Admin(_) => Ok(()),
            Caller::Merchant { shop: own, .. } if own == shop => Ok(()),
            Caller::Merchant { .. } => Err(Error::NotFound),
            _ => Err(Error::Forbidden(
                "only a merchant or an administrator manages a catalog",
            )),
        }
    }

    pub async fn create_product(&self, caller: Caller, req: NewProductRequest) -> Result<Product> {
        let mut errors = FieldErrors::default();
        let shop = ShopId::parse(&req.shop_id);
        if shop.is_none() {
            errors.push("shop_id", "must be a positive decimal id string");
        }
        check_text(&mut errors, "name", &req.name, 200, true);
        let price = money_field(&mut errors, "price", req.price);
        let currency = currency_field(&mut errors, req.currency.as_deref());
        if !(0..=MAX_STOCK_STEP).contains(&req.stock) {
            errors.push("stock", format!("must be between 0 and {MAX_STOCK_STEP}"));
        }
        let shop = errors.into_result(shop)?.ok_or(Error::NotFound)?;
        Self::manages(caller, shop)?;
        if !commerce::shop_exists(&self.commerce, shop).await? {
            return Err(FieldErrors::single("shop_id", "no such shop").into());
        }
        let id = commerce::insert_product(
            &self.commerce,
            shop,
            &req.name,
            price,
            currency,
            req.stock,
            self.clock.now(),
        )
        .await?;
        Ok(Product {
            product_id: id,
            shop_id: shop,
            name: req.name,
            price,
            currency,
            stock: req.stock,
        })
    }

    pub async fn get_product(&self, id: ProductId) -> Result<Product> {
        commerce::load_product(&self.commerce, id)
            .await?
            .ok_or(Error::NotFound)
    }

    pub async fn add_stock(&self, caller: Caller, id: ProductId, req: AddStockRequest) -> Result<Product> {
        if !(1..=MAX_STOCK_STEP).contains(&req.quantity) {
            return Err(
                FieldErrors::single("quantity", format!("must be between 1 and {MAX_STOCK_STEP}")).into(),
            );
        }
        let product = self.get_product(id).await?;
        Self::manages(caller, product.shop_id)?;
        if !commerce::add_stock(&self.commerce, id, req.quantity, MAX_STOCK, self.clock.now()).await? {
            return Err(FieldErrors::single("quantity", format!("stock would exceed {MAX_STOCK}")).into());
        }
        self.get_product(id).await
    }

    pub async fn issue_coupon(&self, caller: Caller, req: NewCouponRequest) -> Result<CouponView> {
        let mut errors = FieldErrors::default();
        let user = UserId::parse(&req.user_id);
        if user.is_none() {
            errors.push("user_id", "must be a positive decimal id string");
        }
        let shop = match &req.shop_id {
            None => None,
            Some(s) => {
                let shop = ShopId::parse(s);
                if shop.is_none() {
                    errors.push("shop_id", "must be a positive decimal id string");
                }
                shop
            }
        };
        let amount = money_field(&mut errors, "amount", req.amount);
        if amount == Money::ZERO {
            errors.push("amount", "must be positive");
        }
        let min_spend = money_field(&mut errors, "min_spend", req.min_spend);
        let currency = currency_field(&mut errors, req.currency.as_deref());
        let valid_from = req.valid_from.unwrap_or_else(|| self.clock.now());
        if !is_storable_time(&valid_from) {
            errors.push("valid_from", "must be between the years 1970 and 9999");
        }
        if !is_storable_time(&req.valid_to) {
            errors.push("valid_to", "must be between the years 1970 and 9999");
        } else if req.valid_to <= valid_from {
            errors.push("valid_to", "must be after valid_from");
        }
        let user = errors.into_result(user)?.ok_or(Error::NotFound)?;
        match (caller, shop) {
            (Caller::Admin(_), _) => {}
            (Caller::Merchant { shop: own, .. }, Some(s)) if s == own => {}
            (Caller::Merchant { .. }, _) => {
                return Err(
                    FieldErrors::single("shop_id", "a merchant issues coupons for its own shop only").into(),
                )
            }
            _ => {
                return Err(Error::Forbidden(
                    "only a merchant or an administrator issues coupons",
                ))
            }
        }
        let coupon = NewCoupon {
            user_id: user,
            shop_id: shop,
            amount,
            min_spend,
            valid_from,
            valid_to: req.valid_to,
            currency,
        };
        let coupon_id = commerce::insert_coupon(&self.commerce, &coupon, self.clock.now()).await?;
        Ok(CouponView { coupon_id, coupon })
    }
}
