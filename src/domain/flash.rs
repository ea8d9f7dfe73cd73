//! Flash sales: a number of units of one product at a sale price, for a time window, with a
//! limit per buyer (SPEC 2.6).
//!
//! Inside its window (`starts_at <= t < ends_at`, and not ended early) a sale's product is
//! priced at the sale price and its units are taken through the sale (a Redis gate in front,
//! the database as the truth: see `redis::gate` and `storage::commerce`); outside it the
//! product sells normally at its list price. An order of the sale gets the sale's payment
//! timeout.

use chrono::{DateTime, TimeDelta, Utc};
use serde::Deserialize;

use super::ids::{FlashSaleId, ProductId, ShopId};
use super::money::Money;
use super::order::{is_storable_time, FieldErrors};

/// The most units one sale may allot: far beyond any real allotment, far from overflowing.
pub const MAX_SALE_UNITS: i64 = 10_000_000;
/// The most units one buyer may be allowed.
pub const MAX_PER_USER_LIMIT: i64 = 1_000;
/// The longest window a sale may have: a flash sale lasts hours, not months.
pub const MAX_SALE_DAYS: i64 = 31;
/// Payment timeouts a sale may set: at least a minute (a buyer needs time to pay), at most a
/// day (the default timeout of normal orders is half an hour).
pub const PAYMENT_TIMEOUT_SECS: std::ops::RangeInclusive<i64> = 60..=86_400;

/// A flash sale as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct FlashSale {
    #[schema(value_type = String)]
    pub sale_id: FlashSaleId,
    #[schema(value_type = String)]
    pub product_id: ProductId,
    #[schema(value_type = String)]
    pub shop_id: ShopId,
    /// Units allotted to the sale.
    pub units: i64,
    /// Units in live orders of the sale (the database's count).
    pub sold: i64,
    #[schema(value_type = i64)]
    pub sale_price: Money,
    pub per_user_limit: i64,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub payment_timeout_secs: i64,
    /// Set when the sale was ended early.
    pub ended_at: Option<DateTime<Utc>>,
}

impl FlashSale {
    /// Whether the sale sells at `t`.
    pub fn is_live(&self, t: DateTime<Utc>) -> bool {
        self.ended_at.is_none() && self.starts_at <= t && t < self.ends_at
    }

    pub fn payment_timeout(&self) -> TimeDelta {
        TimeDelta::seconds(self.payment_timeout_secs)
    }
}

/// `POST /v1/flash-sales`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewFlashSaleRequest {
    #[schema(value_type = String)]
    pub product_id: String,
    pub units: i64,
    pub sale_price: i64,
    pub per_user_limit: i64,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub payment_timeout_secs: i64,
}

/// A valid new sale (its shop is the product's, found by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewFlashSale {
    pub product_id: ProductId,
    pub units: i64,
    pub sale_price: Money,
    pub per_user_limit: i64,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub payment_timeout_secs: i64,
}

impl NewFlashSale {
    /// Every field checked at once; `now` bounds the window (a sale may not end in the past).
    pub fn parse(req: &NewFlashSaleRequest, now: DateTime<Utc>) -> Result<NewFlashSale, FieldErrors> {
        let mut errors = FieldErrors::default();
        let product_id = ProductId::parse(&req.product_id);
        if product_id.is_none() {
            errors.push("product_id", "must be a positive decimal id string");
        }
        if !(1..=MAX_SALE_UNITS).contains(&req.units) {
            errors.push("units", format!("must be between 1 and {MAX_SALE_UNITS}"));
        }
        // A free order could never be paid (a payment needs a positive amount): it would
        // hold its units until its payment timeout and then close, every time.
        let sale_price = Money::new(req.sale_price).filter(|p| p.minor() > 0);
        if sale_price.is_none() {
            errors.push("sale_price", "must be between 1 and 10^15 minor units");
        }
        if !(1..=MAX_PER_USER_LIMIT).contains(&req.per_user_limit) {
            errors.push(
                "per_user_limit",
                format!("must be between 1 and {MAX_PER_USER_LIMIT}"),
            );
        }
        for (field, t) in [("starts_at", &req.starts_at), ("ends_at", &req.ends_at)] {
            if !is_storable_time(t) {
                errors.push(field, "must be an RFC 3339 time between the years 1970 and 9999");
            }
        }
        if req.ends_at <= req.starts_at {
            errors.push("ends_at", "must be after starts_at");
        } else if req.ends_at - req.starts_at > TimeDelta::days(MAX_SALE_DAYS) {
            errors.push("ends_at", format!("a sale lasts at most {MAX_SALE_DAYS} days"));
        }
        if req.ends_at <= now {
            errors.push("ends_at", "must be in the future");
        }
        if !PAYMENT_TIMEOUT_SECS.contains(&req.payment_timeout_secs) {
            errors.push(
                "payment_timeout_secs",
                format!(
                    "must be between {} and {}",
                    PAYMENT_TIMEOUT_SECS.start(),
                    PAYMENT_TIMEOUT_SECS.end()
                ),
            );
        }
        let (Some(product_id), Some(sale_price)) = (product_id, sale_price) else {
            return Err(errors);
        };
        errors.into_result(NewFlashSale {
            product_id,
            units: req.units,
            sale_price,
            per_user_limit: req.per_user_limit,
            starts_at: req.starts_at,
            ends_at: req.ends_at,
            payment_timeout_secs: req.payment_timeout_secs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> NewFlashSaleRequest {
        let now = Utc::now();
        NewFlashSaleRequest {
            product_id: "7".into(),
            units: 200,
            sale_price: 999,
            per_user_limit: 1,
            starts_at: now,
            ends_at: now + TimeDelta::hours(2),
            payment_timeout_secs: 300,
        }
    }

    #[test]
    fn a_valid_sale_parses_and_every_bad_field_is_named() {
        let now = Utc::now();
        let sale = NewFlashSale::parse(&request(), now).unwrap();
        assert_eq!((sale.units, sale.per_user_limit), (200, 1));
        let mut bad = request();
        bad.product_id = "x".into();
        bad.units = 0;
        bad.sale_price = -1;
        bad.per_user_limit = 0;
        bad.ends_at = bad.starts_at;
        bad.payment_timeout_secs = 10;
        let errors = NewFlashSale::parse(&bad, now).unwrap_err();
        let fields: Vec<_> = errors.0.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "product_id",
            "units",
            "sale_price",
            "per_user_limit",
            "ends_at",
            "payment_timeout_secs",
        ] {
            assert!(fields.contains(&f), "{f} not named in {fields:?}");
        }
        let mut free = request();
        free.sale_price = 0;
        let errors = NewFlashSale::parse(&free, now).unwrap_err();
        assert_eq!(
            errors.0[0].field, "sale_price",
            "a sale at price 0 could never be paid"
        );
        let mut past = request();
        past.starts_at = now - TimeDelta::hours(3);
        past.ends_at = now - TimeDelta::hours(1);
        assert!(NewFlashSale::parse(&past, now).is_err());
        let mut long = request();
        long.ends_at = long.starts_at + TimeDelta::days(MAX_SALE_DAYS + 1);
        assert!(NewFlashSale::parse(&long, now).is_err());
    }

    #[test]
    fn a_sale_is_live_inside_its_window_until_ended() {
        let now = Utc::now();
        let mut sale = FlashSale {
            sale_id: FlashSaleId::new(1).unwrap(),
            product_id: ProductId::new(7).unwrap(),
            shop_id: ShopId::new(1).unwrap(),
            units: 10,
            sold: 0,
            sale_price: Money::new(1).unwrap(),
            per_user_limit: 1,
            starts_at: now,
            ends_at: now + TimeDelta::hours(1),
            payment_timeout_secs: 60,
            ended_at: None,
        };
        assert!(sale.is_live(now));
        assert!(!sale.is_live(now - TimeDelta::seconds(1)));
        assert!(!sale.is_live(now + TimeDelta::hours(1)), "the end is exclusive");
        sale.ended_at = Some(now);
        assert!(!sale.is_live(now));
    }
}
