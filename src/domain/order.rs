//! Orders: the create request as parsed at the edge, pricing against a catalog snapshot, and
//! the order as stored and read.
//!
//! Invariants kept here:
//! - A [`NewOrder`] is valid by construction: 1..=100 lines, distinct products, quantities in
//!   1..=[`MAX_QUANTITY`], bounded strings, an order id whose gene is the user's.
//! - Prices come from the catalog, never from the client; every sum is checked.
//! - The request hash covers exactly the client's content, so a replay is recognised and a
//!   changed request with the same id is not.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::ids::{CouponId, OrderId, ProductId, ShopId, UserId};
use super::money::{Currency, Money};
use super::shard::Gene;
use super::status::OrderStatus;

pub const MAX_LINES: usize = 100;
/// Per line; nobody buys more than ten thousand of one item in one order, and the bound keeps
/// `price * quantity` far from overflow.
pub const MAX_QUANTITY: i64 = 10_000;
pub const MAX_COUPONS: usize = 5;
pub const MAX_REMARK_CHARS: usize = 500;
pub const MAX_ADDRESS_FIELD_CHARS: usize = 200;
pub const MAX_REASON_CHARS: usize = 500;
pub const MAX_TRACKING_CHARS: usize = 64;
pub const MAX_CARRIER_CHARS: usize = 64;

/// Times we store: years 1970 to 9999 (what DATETIME and the id epoch can hold), and no
/// leap second. Anything else in a request is a validation failure, never a database error.
/// (chrono reads `23:59:60` as a nanosecond count past 10^9; DATETIME has no such second,
/// and the server stores it as the zero date, which no later read can decode.)
pub fn is_storable_time(t: &DateTime<Utc>) -> bool {
    use chrono::{Datelike, Timelike};
    (1970..=9999).contains(&t.year()) && t.nanosecond() < 1_000_000_000
}

/// One failing field of a request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The failing fields of a request (422 `validation_failed`).
#[derive(Debug, Clone, PartialEq, Eq, Default, thiserror::Error)]
#[error("validation failed: {0:?}")]
pub struct FieldErrors(pub Vec<FieldError>);

impl FieldErrors {
    pub fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(field, message));
    }

    pub fn single(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldErrors(vec![FieldError::new(field, message)])
    }

    pub fn into_result<T>(self, ok: T) -> Result<T, FieldErrors> {
        if self.0.is_empty() {
            Ok(ok)
        } else {
            Err(self)
        }
    }
}

/// Checks a free-text field: at most `max` characters and no control characters.
pub fn check_text(errors: &mut FieldErrors, field: &str, value: &str, max: usize, required: bool) {
    if required && value.trim().is_empty() {
        errors.push(field, "must not be empty");
    } else if value.chars().count() > max {
        errors.push(field, format!("must be at most {max} characters"));
    } else if value.chars().any(|c| c.is_control() && c != '\n') {
        errors.push(field, "must not contain control characters");
    }
}

/// The receiver address as the client sends it. Personal data: its `Debug` shows none of it,
/// so no log line, span field or panic message that prints an order (or a request holding an
/// address) carries a name, phone number or place.
#[derive(Clone, PartialEq, Eq, Deserialize, serde::Serialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Address {
    pub name: String,
    pub phone: String,
    #[serde(default)]
    pub region: String,
    pub detail: String,
}

impl std::fmt::Debug for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Address(<redacted>)")
    }
}

impl Address {
    pub fn check(&self, errors: &mut FieldErrors, prefix: &str) {
        let max = MAX_ADDRESS_FIELD_CHARS;
        check_text(errors, &format!("{prefix}.name"), &self.name, max, true);
        check_text(errors, &format!("{prefix}.phone"), &self.phone, 32, true);
        check_text(errors, &format!("{prefix}.region"), &self.region, max, false);
        check_text(errors, &format!("{prefix}.detail"), &self.detail, max, true);
    }
}

/// `POST /v1/orders` body, before validation.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrderRequest {
    /// From `POST /v1/order-ids`; the idempotency key of the create.
    #[schema(value_type = OrderId)]
    pub order_id: String,
    /// The lines; absent (or empty) with `from_cart: true`.
    #[serde(default)]
    #[schema(max_items = 100)]
    pub items: Vec<LineRequest>,
    /// Order what the buyer's cart holds instead of `items`; a new order removes exactly
    /// the purchased lines from the cart (a replay removes nothing).
    #[serde(default)]
    pub from_cart: bool,
    #[serde(default)]
    #[schema(value_type = Vec<CouponId>)]
    pub coupon_ids: Vec<String>,
    pub address: Address,
    #[serde(default)]
    pub remark: String,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LineRequest {
    #[schema(value_type = ProductId)]
    pub product_id: String,
    #[schema(minimum = 1)]
    pub quantity: i64,
}

/// `POST /v1/orders/preview` body: the same without an order id.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreviewRequest {
    /// The lines; absent (or empty) with `from_cart: true`.
    #[serde(default)]
    #[schema(max_items = 100)]
    pub items: Vec<LineRequest>,
    /// Price what the buyer's cart holds instead of `items`.
    #[serde(default)]
    pub from_cart: bool,
    #[serde(default)]
    #[schema(value_type = Vec<CouponId>)]
    pub coupon_ids: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewLine {
    pub product_id: ProductId,
    pub quantity: i64,
}

/// A create request that passed every check that needs no database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub lines: Vec<NewLine>,
    pub coupon_ids: Vec<CouponId>,
    pub address: Address,
    pub remark: String,
}

fn parse_lines(items: &[LineRequest], errors: &mut FieldErrors) -> Vec<NewLine> {
    if items.is_empty() {
        errors.push("items", "must hold at least one line");
    } else if items.len() > MAX_LINES {
        errors.push("items", format!("must hold at most {MAX_LINES} lines"));
        return Vec::new();
    }
    let mut lines: Vec<NewLine> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let pid = ProductId::parse(&item.product_id);
        if pid.is_none() {
            errors.push(
                format!("items[{i}].product_id"),
                "must be a positive decimal id string",
            );
        }
        if !(1..=MAX_QUANTITY).contains(&item.quantity) {
            errors.push(
                format!("items[{i}].quantity"),
                format!("must be between 1 and {MAX_QUANTITY}"),
            );
        }
        if let Some(product_id) = pid {
            if lines.iter().any(|l| l.product_id == product_id) {
                errors.push(format!("items[{i}].product_id"), "appears on two lines");
            }
            lines.push(NewLine {
                product_id,
                quantity: item.quantity,
            });
        }
    }
    lines
}

fn parse_coupons(ids: &[String], errors: &mut FieldErrors) -> Vec<CouponId> {
    if ids.len() > MAX_COUPONS {
        errors.push("coupon_ids", format!("at most {MAX_COUPONS} coupons per order"));
        return Vec::new();
    }
    let mut out: Vec<CouponId> = Vec::new();
    for (i, s) in ids.iter().enumerate() {
        match CouponId::parse(s) {
            Some(c) if out.contains(&c) => errors.push(format!("coupon_ids[{i}]"), "listed twice"),
            Some(c) => out.push(c),
            None => errors.push(format!("coupon_ids[{i}]"), "must be a positive decimal id string"),
        }
    }
    out
}

/// The lines of a request that asks for the cart's: `cart` (the cart's lines, in product id
/// order), refused when the request names items too or the cart is empty.
fn cart_lines(items: &[LineRequest], cart: &[NewLine], errors: &mut FieldErrors) -> Vec<NewLine> {
    if !items.is_empty() {
        errors.push("items", "must be absent with from_cart: true");
    } else if cart.is_empty() {
        errors.push("from_cart", "the cart is empty");
    }
    cart.to_vec()
}

impl NewOrder {
    /// Parses a create request that names its items (`from_cart` is refused here: see
    /// [`NewOrder::parse_from_cart`]).
    pub fn parse(user_id: UserId, req: CreateOrderRequest) -> Result<NewOrder, FieldErrors> {
        Self::parse_with(user_id, req, None)
    }

    /// Parses a `from_cart: true` create request whose lines are `cart`'s (already valid: a
    /// cart keeps the limits of an order).
    pub fn parse_from_cart(
        user_id: UserId,
        req: CreateOrderRequest,
        cart: &[NewLine],
    ) -> Result<NewOrder, FieldErrors> {
        Self::parse_with(user_id, req, Some(cart))
    }

    fn parse_with(
        user_id: UserId,
        req: CreateOrderRequest,
        cart: Option<&[NewLine]>,
    ) -> Result<NewOrder, FieldErrors> {
        let mut errors = FieldErrors::default();
        let order_id = OrderId::parse(&req.order_id);
        match order_id {
            None => errors.push("order_id", "must be a positive decimal id string"),
            Some(id) if id.gene() != Gene::of_user(user_id) => errors.push(
                "order_id",
                "was not issued for this user (its shard bits do not match); ask POST /v1/order-ids",
            ),
            Some(_) => {}
        }
        let lines = match (req.from_cart, cart) {
            (false, _) => parse_lines(&req.items, &mut errors),
            (true, Some(cart)) => cart_lines(&req.items, cart, &mut errors),
            (true, None) => {
                errors.push("from_cart", "is not served here");
                Vec::new()
            }
        };
        let coupon_ids = parse_coupons(&req.coupon_ids, &mut errors);
        req.address.check(&mut errors, "address");
        check_text(&mut errors, "remark", &req.remark, MAX_REMARK_CHARS, false);
        match order_id {
            Some(order_id) if errors.0.is_empty() => Ok(NewOrder {
                order_id,
                user_id,
                lines,
                coupon_ids,
                address: req.address,
                remark: req.remark,
            }),
            _ => Err(errors),
        }
    }

    /// SHA-256 over the client's content in a fixed encoding. Coupon order does not matter;
    /// line order does (it is the order of the lines on the receipt).
    pub fn request_hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        };
        field(&self.order_id.get().to_be_bytes());
        field(&self.user_id.get().to_be_bytes());
        for l in &self.lines {
            field(&l.product_id.get().to_be_bytes());
            field(&l.quantity.to_be_bytes());
        }
        field(b"coupons");
        let mut coupons: Vec<i64> = self.coupon_ids.iter().map(|c| c.get()).collect();
        coupons.sort_unstable();
        for c in coupons {
            field(&c.to_be_bytes());
        }
        let a = &self.address;
        for s in [&a.name, &a.phone, &a.region, &a.detail, &self.remark] {
            field(s.as_bytes());
        }
        h.finalize().into()
    }
}

/// Parses a preview body into lines and coupons; `cart` holds the cart's lines when the body
/// asks for them (`from_cart: true`).
pub fn parse_preview(
    req: &PreviewRequest,
    cart: Option<&[NewLine]>,
) -> Result<(Vec<NewLine>, Vec<CouponId>), FieldErrors> {
    let mut errors = FieldErrors::default();
    let lines = match (req.from_cart, cart) {
        (false, _) => parse_lines(&req.items, &mut errors),
        (true, Some(cart)) => cart_lines(&req.items, cart, &mut errors),
        (true, None) => {
            errors.push("from_cart", "is not served here");
            Vec::new()
        }
    };
    let coupons = parse_coupons(&req.coupon_ids, &mut errors);
    errors.into_result((lines, coupons))
}

/// A product as the catalog holds it when an order is priced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductSnapshot {
    pub id: ProductId,
    pub shop_id: ShopId,
    pub name: String,
    pub price: Money,
    pub currency: Currency,
}

/// A coupon as the catalog holds it when an order is priced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CouponSnapshot {
    pub id: CouponId,
    pub user_id: UserId,
    pub shop_id: Option<ShopId>,
    pub amount: Money,
    /// In `currency`.
    pub min_spend: Money,
    /// The coupon applies only to orders in this currency.
    pub currency: Currency,
    pub valid_from: DateTime<Utc>,
    pub valid_to: DateTime<Utc>,
    pub redeemed_order_id: Option<OrderId>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct OrderLine {
    pub line_no: u32,
    pub product_id: ProductId,
    pub product_name: String,
    pub unit_price: Money,
    pub quantity: i64,
    pub line_total: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct OrderDiscount {
    pub line_no: u32,
    pub coupon_id: Option<CouponId>,
    pub kind: String,
    pub amount: Money,
    pub description: String,
}

/// The priced order: what the buyer pays and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Pricing {
    pub shop_id: ShopId,
    pub currency: Currency,
    pub items: Vec<OrderLine>,
    pub discounts: Vec<OrderDiscount>,
    pub total_amount: Money,
    pub discount_amount: Money,
    pub pay_amount: Money,
}

/// Prices `lines` for `user` against the catalog snapshot. `order_id` is the order the
/// coupons may already be redeemed by (a replayed create); `None` for a preview.
pub fn price_order(
    user: UserId,
    order_id: Option<OrderId>,
    lines: &[NewLine],
    coupon_ids: &[CouponId],
    products: &[ProductSnapshot],
    coupons: &[CouponSnapshot],
    now: DateTime<Utc>,
) -> Result<Pricing, FieldErrors> {
    let mut errors = FieldErrors::default();
    let mut items = Vec::with_capacity(lines.len());
    let mut total = Money::ZERO;
    let mut shop: Option<ShopId> = None;
    let mut currency: Option<Currency> = None;
    for (i, line) in lines.iter().enumerate() {
        let field = format!("items[{i}].product_id");
        let Some(p) = products.iter().find(|p| p.id == line.product_id) else {
            errors.push(field, "no such product");
            continue;
        };
        if *shop.get_or_insert(p.shop_id) != p.shop_id {
            errors.push(
                field,
                "comes from another shop; an order holds one shop's products",
            );
            continue;
        }
        if *currency.get_or_insert(p.currency) != p.currency {
            errors.push(field, "is priced in another currency");
            continue;
        }
        let Some(line_total) = p.price.checked_mul(line.quantity) else {
            errors.push(format!("items[{i}].quantity"), "line total overflows");
            continue;
        };
        let Some(t) = total.checked_add(line_total) else {
            errors.push("items", "order total overflows");
            continue;
        };
        total = t;
        items.push(OrderLine {
            line_no: i as u32 + 1,
            product_id: p.id,
            product_name: p.name.clone(),
            unit_price: p.price,
            quantity: line.quantity,
            line_total,
        });
    }
    let (Some(shop_id), Some(currency)) = (shop, currency) else {
        return Err(errors);
    };
    let mut discounts = Vec::new();
    let mut discount = Money::ZERO;
    for (i, cid) in coupon_ids.iter().enumerate() {
        let field = format!("coupon_ids[{i}]");
        let Some(c) = coupons.iter().find(|c| c.id == *cid && c.user_id == user) else {
            errors.push(field, "no such coupon");
            continue;
        };
        let problem = if c.shop_id.is_some_and(|s| s != shop_id) {
            Some("is for another shop")
        } else if c.currency != currency {
            Some("is in another currency than the order")
        } else if c.redeemed_order_id.is_some() && c.redeemed_order_id != order_id {
            Some("has already been used")
        } else if now < c.valid_from || now >= c.valid_to {
            Some("is not valid now")
        } else if total < c.min_spend {
            Some("needs a higher order total")
        } else {
            None
        };
        if let Some(msg) = problem {
            errors.push(field, msg);
            continue;
        }
        // A discount never takes the amount to pay below one minor unit: an order must be
        // paid to move on, and a payment of zero is no payment.
        let left = total
            .saturating_sub(discount)
            .saturating_sub(Money::new(1).unwrap_or_default());
        let amount = c.amount.min(left);
        if amount == Money::ZERO {
            errors.push(field, "gives no discount on this order");
            continue;
        }
        discount = discount.checked_add(amount).unwrap_or(total);
        discounts.push(OrderDiscount {
            line_no: discounts.len() as u32 + 1,
            coupon_id: Some(c.id),
            kind: "coupon".into(),
            amount,
            description: format!("coupon {} (-{})", c.id, c.amount),
        });
    }
    errors.into_result(Pricing {
        shop_id,
        currency,
        items,
        discounts,
        total_amount: total,
        discount_amount: discount,
        pay_amount: total.saturating_sub(discount),
    })
}

/// A payment or a refund recorded on an order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Payment {
    pub kind: PaymentKind,
    pub transaction_no: String,
    pub channel: String,
    pub amount: Money,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PaymentKind {
    Payment = 0,
    Refund = 1,
}

/// An order as stored, with its lines, payments and discounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub shop_id: ShopId,
    pub status: OrderStatus,
    pub version: i64,
    pub currency: Currency,
    pub total_amount: Money,
    pub discount_amount: Money,
    pub pay_amount: Money,
    pub address: Address,
    pub remark: String,
    pub tracking_number: Option<String>,
    pub carrier: Option<String>,
    pub close_reason: Option<String>,
    pub refund_required: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub pay_deadline: DateTime<Utc>,
    pub paid_at: Option<DateTime<Utc>>,
    pub shipped_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
    pub invalidated_at: Option<DateTime<Utc>>,
    pub items: Vec<OrderLine>,
    pub payments: Vec<Payment>,
    pub discounts: Vec<OrderDiscount>,
}

impl Order {
    /// Money received minus money refunded.
    pub fn net_paid(&self) -> i64 {
        self.payments
            .iter()
            .map(|p| match p.kind {
                PaymentKind::Payment => p.amount.minor(),
                PaymentKind::Refund => -p.amount.minor(),
            })
            .sum()
    }
}

impl Order {
    /// The order exactly as `insert_order` wrote it, without reading it back.
    pub fn from_new(
        new: &NewOrder,
        pricing: Pricing,
        created: DateTime<Utc>,
        pay_deadline: DateTime<Utc>,
    ) -> Order {
        Order {
            order_id: new.order_id,
            user_id: new.user_id,
            shop_id: pricing.shop_id,
            status: OrderStatus::PendingPayment,
            version: 1,
            currency: pricing.currency,
            total_amount: pricing.total_amount,
            discount_amount: pricing.discount_amount,
            pay_amount: pricing.pay_amount,
            address: new.address.clone(),
            remark: new.remark.clone(),
            tracking_number: None,
            carrier: None,
            close_reason: None,
            refund_required: false,
            created_at: created,
            updated_at: created,
            pay_deadline,
            paid_at: None,
            shipped_at: None,
            completed_at: None,
            closed_at: None,
            invalidated_at: None,
            items: pricing.items,
            payments: Vec::new(),
            discounts: pricing.discounts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::{IdGenerator, WorkerId};

    #[test]
    fn storable_times_are_1970_to_9999_without_leap_seconds() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        assert!(is_storable_time(&t("1970-01-01T00:00:00Z")));
        assert!(is_storable_time(&t("9999-12-31T23:59:59.999999999Z")));
        assert!(!is_storable_time(&t("1969-12-31T23:59:59Z")));
        assert!(!is_storable_time(&t("9999-12-31T23:30:00-01:00")));
        assert!(!is_storable_time(&t("2030-06-30T23:59:60Z")));
        assert!(!is_storable_time(&t("2030-06-30T23:59:60.5Z")));
    }

    fn user() -> UserId {
        UserId::new(7).unwrap()
    }

    fn request(order_id: OrderId) -> CreateOrderRequest {
        CreateOrderRequest {
            order_id: order_id.to_string(),
            items: vec![LineRequest {
                product_id: "11".into(),
                quantity: 2,
            }],
            coupon_ids: vec![],
            address: Address {
                name: "Li".into(),
                phone: "138".into(),
                region: String::new(),
                detail: "1 Road".into(),
            },
            remark: String::new(),
            from_cart: false,
        }
    }

    fn product(id: i64, shop: i64, price: i64) -> ProductSnapshot {
        ProductSnapshot {
            id: ProductId::new(id).unwrap(),
            shop_id: ShopId::new(shop).unwrap(),
            name: format!("p{id}"),
            price: Money::new(price).unwrap(),
            currency: Currency::CNY,
        }
    }

    #[test]
    fn gene_of_the_id_must_be_the_users() {
        let gen = IdGenerator::new(WorkerId::new(0).unwrap());
        let own = gen.next_for(user()).unwrap();
        assert!(NewOrder::parse(user(), request(own)).is_ok());
        let other = (1..)
            .map(|u| gen.next_for(UserId::new(u).unwrap()).unwrap())
            .find(|id| id.gene() != Gene::of_user(user()))
            .unwrap();
        let err = NewOrder::parse(user(), request(other)).unwrap_err();
        assert_eq!(err.0[0].field, "order_id");
    }

    #[test]
    fn hash_changes_with_content_and_not_with_coupon_order() {
        let gen = IdGenerator::new(WorkerId::new(0).unwrap());
        let id = gen.next_for(user()).unwrap();
        let a = NewOrder::parse(user(), request(id)).unwrap();
        let mut b = a.clone();
        b.lines[0].quantity = 3;
        assert_ne!(a.request_hash(), b.request_hash());
        let mut c1 = a.clone();
        c1.coupon_ids = vec![CouponId::new(1).unwrap(), CouponId::new(2).unwrap()];
        let mut c2 = a.clone();
        c2.coupon_ids = vec![CouponId::new(2).unwrap(), CouponId::new(1).unwrap()];
        assert_eq!(c1.request_hash(), c2.request_hash());
    }

    #[test]
    fn debug_output_carries_no_part_of_the_address() {
        let gen = IdGenerator::new(WorkerId::new(0).unwrap());
        let mut req = request(gen.next_for(user()).unwrap());
        req.address = Address {
            name: "Zhang Wei".into(),
            phone: "13800001111".into(),
            region: "Haidian".into(),
            detail: "7 Quiet Lane".into(),
        };
        let new = NewOrder::parse(user(), req.clone()).unwrap();
        let lines = [NewLine {
            product_id: ProductId::new(11).unwrap(),
            quantity: 2,
        }];
        let pricing = price_order(
            user(),
            Some(new.order_id),
            &lines,
            &[],
            &[product(11, 1, 100)],
            &[],
            Utc::now(),
        )
        .unwrap();
        let order = Order::from_new(&new, pricing, Utc::now(), Utc::now());
        for printed in [
            format!("{order:?}"),
            format!("{order:#?}"),
            format!("{new:?}"),
            format!("{req:?}"),
        ] {
            assert!(printed.contains("Address(<redacted>)"), "{printed}");
            for secret in ["Zhang", "Wei", "13800001111", "1111", "Haidian", "Quiet", "Lane"] {
                assert!(!printed.contains(secret), "{secret} in {printed}");
            }
        }
    }

    #[test]
    fn pricing_refuses_two_shops_and_overflow() {
        let lines = [
            NewLine {
                product_id: ProductId::new(1).unwrap(),
                quantity: 1,
            },
            NewLine {
                product_id: ProductId::new(2).unwrap(),
                quantity: 1,
            },
        ];
        let products = [product(1, 1, 100), product(2, 2, 100)];
        let err = price_order(user(), None, &lines, &[], &products, &[], Utc::now()).unwrap_err();
        assert_eq!(err.0[0].field, "items[1].product_id");

        let huge = [product(1, 1, crate::domain::money::MAX_AMOUNT)];
        let lines = [NewLine {
            product_id: ProductId::new(1).unwrap(),
            quantity: 2,
        }];
        assert!(price_order(user(), None, &lines, &[], &huge, &[], Utc::now()).is_err());
    }

    #[test]
    fn coupons_are_checked_and_capped() {
        let now = Utc::now();
        let coupon = CouponSnapshot {
            id: CouponId::new(5).unwrap(),
            user_id: user(),
            shop_id: None,
            amount: Money::new(500).unwrap(),
            min_spend: Money::new(100).unwrap(),
            currency: Currency::CNY,
            valid_from: now - chrono::Duration::days(1),
            valid_to: now + chrono::Duration::days(1),
            redeemed_order_id: None,
        };
        let lines = [NewLine {
            product_id: ProductId::new(1).unwrap(),
            quantity: 3,
        }];
        let products = [product(1, 1, 100)];
        let p = price_order(
            user(),
            None,
            &lines,
            &[coupon.id],
            &products,
            std::slice::from_ref(&coupon),
            now,
        )
        .unwrap();
        assert_eq!(
            (
                p.total_amount.minor(),
                p.discount_amount.minor(),
                p.pay_amount.minor()
            ),
            (300, 299, 1)
        );

        let used = CouponSnapshot {
            redeemed_order_id: OrderId::new(9),
            ..coupon.clone()
        };
        assert!(price_order(user(), None, &lines, &[coupon.id], &products, &[used], now).is_err());
        let other_owner = CouponSnapshot {
            user_id: UserId::new(8).unwrap(),
            ..coupon
        };
        assert!(price_order(
            user(),
            None,
            &lines,
            &[other_owner.id],
            &products,
            &[other_owner],
            now
        )
        .is_err());
    }

    #[test]
    fn coupons_apply_only_in_their_currency() {
        let now = Utc::now();
        let coupon = CouponSnapshot {
            id: CouponId::new(5).unwrap(),
            user_id: user(),
            shop_id: None,
            amount: Money::new(50).unwrap(),
            min_spend: Money::ZERO,
            currency: Currency::parse("USD").unwrap(),
            valid_from: now - chrono::Duration::days(1),
            valid_to: now + chrono::Duration::days(1),
            redeemed_order_id: None,
        };
        let lines = [NewLine {
            product_id: ProductId::new(1).unwrap(),
            quantity: 1,
        }];
        let cny = [product(1, 1, 100)];
        let err = price_order(
            user(),
            None,
            &lines,
            &[coupon.id],
            &cny,
            std::slice::from_ref(&coupon),
            now,
        )
        .unwrap_err();
        assert_eq!(err.0[0].field, "coupon_ids[0]");
        let usd = [ProductSnapshot {
            currency: Currency::parse("USD").unwrap(),
            ..product(1, 1, 100)
        }];
        let p = price_order(user(), None, &lines, &[coupon.id], &usd, &[coupon], now).unwrap();
        assert_eq!(p.pay_amount.minor(), 50);
    }
}
