//! Cache value encoding: orders (with their lines, payments and discounts), user profiles and
//! first pages of orders, as compact records behind a one-byte format version.
//!
//! Invariants kept here:
//! - Decoding never panics: garbage, a truncated value, a value of another format version or a
//!   record that no longer passes the domain constructors is `None`, which callers treat as a
//!   miss.
//! - The records mirror the domain types field for field (times as i64 microseconds since the
//!   Unix epoch, ids and money as i64, status as its u8 code, currency as its 3-letter code), so
//!   a round trip gives back an equal value for any time with microsecond precision (what
//!   MariaDB's `DATETIME(6)` stores).
//! - [`FORMAT`] is the first byte of every encoded value: change a record, bump it, and every
//!   entry written by an older build reads as a miss instead of as a wrong value.
//!
//! # Choice of codec
//! `benches/cache_codec.rs` encodes the same realistic order (3 lines, 1 payment, 1 discount,
//! an address in Chinese) with each candidate, from record to bytes and back (criterion
//! medians, release build, a busy 2-core machine):
//!
//! | codec                                          | bytes | ns per encode + decode |
//! |------------------------------------------------|------:|-----------------------:|
//! | JSON (`serde_json`, field names)               |  1142 |                   4230 |
//! | MessagePack with names (`rmp_serde::to_vec_named`) | 870 |                 3520 |
//! | MessagePack compact (`rmp_serde::to_vec`)      |   422 |                   1760 |
//! | bincode 1, fixed-width integers (`serialize`)  |   645 |                    810 |
//! | bincode 1, varint (`DefaultOptions`)           |   420 |                   1200 |
//! | postcard 1 (varint), run of 2026-12-06         |   395 |                   1480 |
//!
//! A compact binary codec with variable-length integers: the smallest (every hit carries the
//! value over the network and every entry sits in Redis's memory), and faster than
//! MessagePack. Field names are not needed: the format byte versions the layout. bincode 1
//! was the choice until RUSTSEC-2025-0141 flagged it unmaintained; postcard (format 2) has
//! the same varint layout ideas, a stable wire format and maintainers; in that run MessagePack
//! compact took 1851 ns, so postcard is both the smallest and the fastest. The bincode rows
//! are from the run that chose it, kept for comparison. With the conversion from and to the
//! domain types and the format byte, an order costs 396 bytes and 2.0 µs per round trip.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::ids::{CouponId, OrderId, ProductId, ShopId, UserId};
use crate::domain::money::{Currency, Money};
use crate::domain::order::{Address, Order, OrderDiscount, OrderLine, Payment, PaymentKind};
use crate::domain::status::OrderStatus;
use crate::domain::user::User;

/// First byte of every encoded value. Bump it whenever a record below changes shape or the
/// codec changes (2: postcard instead of bincode 1, whose layout differs for the same
/// record, so a value of a build before is a miss).
pub const FORMAT: u8 = 2;

/// An order as cached. Public (hidden) only so the codec bench can feed it to each candidate.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderRecord {
    id: i64,
    user: i64,
    shop: i64,
    status: u8,
    version: i64,
    currency: String,
    total: i64,
    discount: i64,
    pay: i64,
    name: String,
    phone: String,
    region: String,
    detail: String,
    remark: String,
    tracking: Option<String>,
    carrier: Option<String>,
    close_reason: Option<String>,
    refund_required: bool,
    created: i64,
    updated: i64,
    pay_deadline: i64,
    paid: Option<i64>,
    shipped: Option<i64>,
    completed: Option<i64>,
    closed: Option<i64>,
    invalidated: Option<i64>,
    items: Vec<LineRecord>,
    payments: Vec<PaymentRecord>,
    discounts: Vec<DiscountRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LineRecord {
    line_no: u32,
    product: i64,
    name: String,
    unit_price: i64,
    quantity: i64,
    total: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PaymentRecord {
    kind: u8,
    transaction_no: String,
    channel: String,
    amount: i64,
    at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DiscountRecord {
    line_no: u32,
    coupon: Option<i64>,
    kind: String,
    amount: i64,
    description: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct UserRecord {
    id: i64,
    name: String,
    level: i32,
    created: i64,
}

fn micros(t: &DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn time(us: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(us)
}

/// `None` stays `None`; a present but invalid time fails the whole record.
fn opt_time(us: Option<i64>) -> Option<Option<DateTime<Utc>>> {
    match us {
        None => Some(None),
        Some(us) => time(us).map(Some),
    }
}

impl From<&Order> for OrderRecord {
    fn from(o: &Order) -> Self {
        OrderRecord {
            id: o.order_id.get(),
            user: o.user_id.get(),
            shop: o.shop_id.get(),
            status: o.status.code(),
            version: o.version,
            currency: o.currency.as_str().to_owned(),
            total: o.total_amount.minor(),
            discount: o.discount_amount.minor(),
            pay: o.pay_amount.minor(),
            name: o.address.name.clone(),
            phone: o.address.phone.clone(),
            region: o.address.region.clone(),
            detail: o.address.detail.clone(),
            remark: o.remark.clone(),
            tracking: o.tracking_number.clone(),
            carrier: o.carrier.clone(),
            close_reason: o.close_reason.clone(),
            refund_required: o.refund_required,
            created: micros(&o.created_at),
            updated: micros(&o.updated_at),
            pay_deadline: micros(&o.pay_deadline),
            paid: o.paid_at.as_ref().map(micros),
            shipped: o.shipped_at.as_ref().map(micros),
            completed: o.completed_at.as_ref().map(micros),
            closed: o.closed_at.as_ref().map(micros),
            invalidated: o.invalidated_at.as_ref().map(micros),
            items: o
                .items
                .iter()
                .map(|l| LineRecord {
                    line_no: l.line_no,
                    product: l.product_id.get(),
                    name: l.product_name.clone(),
                    unit_price: l.unit_price.minor(),
                    quantity: l.quantity,
                    total: l.line_total.minor(),
                })
                .collect(),
            payments: o
                .payments
                .iter()
                .map(|p| PaymentRecord {
                    kind: p.kind as u8,
                    transaction_no: p.transaction_no.clone(),
                    channel: p.channel.clone(),
                    amount: p.amount.minor(),
                    at: micros(&p.created_at),
                })
                .collect(),
            discounts: o
                .discounts
                .iter()
                .map(|d| DiscountRecord {
                    line_no: d.line_no,
                    coupon: d.coupon_id.map(CouponId::get),
                    kind: d.kind.clone(),
                    amount: d.amount.minor(),
                    description: d.description.clone(),
                })
                .collect(),
        }
    }
}

impl LineRecord {
    fn into_line(self) -> Option<OrderLine> {
        Some(OrderLine {
            line_no: self.line_no,
            product_id: ProductId::new(self.product)?,
            product_name: self.name,
            unit_price: Money::new(self.unit_price)?,
            quantity: self.quantity,
            line_total: Money::new(self.total)?,
        })
    }
}

impl PaymentRecord {
    fn into_payment(self) -> Option<Payment> {
        let kind = match self.kind {
            0 => PaymentKind::Payment,
            1 => PaymentKind::Refund,
            _ => return None,
        };
        Some(Payment {
            kind,
            transaction_no: self.transaction_no,
            channel: self.channel,
            amount: Money::new(self.amount)?,
            created_at: time(self.at)?,
        })
    }
}

impl DiscountRecord {
    fn into_discount(self) -> Option<OrderDiscount> {
        let coupon_id = match self.coupon {
            None => None,
            Some(c) => Some(CouponId::new(c)?),
        };
        Some(OrderDiscount {
            line_no: self.line_no,
            coupon_id,
            kind: self.kind,
            amount: Money::new(self.amount)?,
            description: self.description,
        })
    }
}

impl OrderRecord {
    /// The domain order, or `None` when a field no longer passes its constructor.
    pub fn into_order(self) -> Option<Order> {
        Some(Order {
            order_id: OrderId::new(self.id)?,
            user_id: UserId::new(self.user)?,
            shop_id: ShopId::new(self.shop)?,
            status: OrderStatus::from_code(i64::from(self.status))?,
            version: self.version,
            currency: Currency::parse(&self.currency)?,
            total_amount: Money::new(self.total)?,
            discount_amount: Money::new(self.discount)?,
            pay_amount: Money::new(self.pay)?,
            address: Address {
                name: self.name,
                phone: self.phone,
                region: self.region,
                detail: self.detail,
            },
            remark: self.remark,
            tracking_number: self.tracking,
            carrier: self.carrier,
            close_reason: self.close_reason,
            refund_required: self.refund_required,
            created_at: time(self.created)?,
            updated_at: time(self.updated)?,
            pay_deadline: time(self.pay_deadline)?,
            paid_at: opt_time(self.paid)?,
            shipped_at: opt_time(self.shipped)?,
            completed_at: opt_time(self.completed)?,
            closed_at: opt_time(self.closed)?,
            invalidated_at: opt_time(self.invalidated)?,
            items: self
                .items
                .into_iter()
                .map(LineRecord::into_line)
                .collect::<Option<_>>()?,
            payments: self
                .payments
                .into_iter()
                .map(PaymentRecord::into_payment)
                .collect::<Option<_>>()?,
            discounts: self
                .discounts
                .into_iter()
                .map(DiscountRecord::into_discount)
                .collect::<Option<_>>()?,
        })
    }
}

impl From<&User> for UserRecord {
    fn from(u: &User) -> Self {
        UserRecord {
            id: u.user_id.get(),
            name: u.name.clone(),
            level: u.level,
            created: micros(&u.created_at),
        }
    }
}

impl UserRecord {
    fn into_user(self) -> Option<User> {
        Some(User {
            user_id: UserId::new(self.id)?,
            name: self.name,
            level: self.level,
            created_at: time(self.created)?,
        })
    }
}

/// `FORMAT` followed by the record in postcard (variable-length integers).
fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Serialising plain structs of integers, strings and vectors into a Vec cannot fail; an
    // empty payload after the format byte would decode as a miss anyway.
    postcard::to_extend(record, vec![FORMAT]).unwrap_or_else(|_| vec![FORMAT])
}

/// No trailing bytes accepted: a value with more bytes than its record is not a value we
/// wrote.
fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Option<T> {
    match bytes.split_first() {
        Some((&FORMAT, body)) => match postcard::take_from_bytes(body) {
            Ok((record, [])) => Some(record),
            _ => None,
        },
        _ => None,
    }
}

pub fn encode_order(order: &Order) -> Vec<u8> {
    encode(&OrderRecord::from(order))
}

pub fn decode_order(bytes: &[u8]) -> Option<Order> {
    decode::<OrderRecord>(bytes)?.into_order()
}

pub fn encode_user(user: &User) -> Vec<u8> {
    encode(&UserRecord::from(user))
}

pub fn decode_user(bytes: &[u8]) -> Option<User> {
    decode::<UserRecord>(bytes)?.into_user()
}

pub fn encode_page(orders: &[Order]) -> Vec<u8> {
    encode(&orders.iter().map(OrderRecord::from).collect::<Vec<_>>())
}

pub fn decode_page(bytes: &[u8]) -> Option<Vec<Order>> {
    decode::<Vec<OrderRecord>>(bytes)?
        .into_iter()
        .map(OrderRecord::into_order)
        .collect()
}

/// A realistic order for tests and the codec bench: 3 lines, 1 payment, 1 discount, an
/// address in Chinese, every time at microsecond precision.
#[doc(hidden)]
pub fn sample_order(id: i64, user: i64, version: i64) -> Order {
    let at = |us: i64| DateTime::from_timestamp_micros(1_767_225_600_000_000 + us).unwrap_or_default();
    let money = |m: i64| Money::new(m).unwrap_or_default();
    let line = |n: u32, product: i64, name: &str, price: i64, qty: i64| OrderLine {
        line_no: n,
        product_id: ProductId::new(product).expect("sample ids are positive"),
        product_name: name.to_owned(),
        unit_price: money(price),
        quantity: qty,
        line_total: money(price * qty),
    };
    Order {
        order_id: OrderId::new(id).expect("sample ids are positive"),
        user_id: UserId::new(user).expect("sample ids are positive"),
        shop_id: ShopId::new(42).expect("42 is positive"),
        status: OrderStatus::AwaitingShipment,
        version,
        currency: Currency::CNY,
        total_amount: money(45_700),
        discount_amount: money(2_000),
        pay_amount: money(43_700),
        address: Address {
            name: "张伟".into(),
            phone: "13800138000".into(),
            region: "浙江省杭州市西湖区".into(),
            detail: "文三路 478 号华星时代广场 A 座 1203 室".into(),
        },
        remark: "工作日送货，请提前电话联系".into(),
        tracking_number: None,
        carrier: None,
        close_reason: None,
        refund_required: false,
        created_at: at(1),
        updated_at: at(120_000_001),
        pay_deadline: at(1_800_000_001),
        paid_at: Some(at(120_000_001)),
        shipped_at: None,
        completed_at: None,
        closed_at: None,
        invalidated_at: None,
        items: vec![
            line(1, 1_001, "无线蓝牙耳机 降噪版", 29_900, 1),
            line(2, 1_002, "USB-C 快充数据线 1m", 3_900, 2),
            line(3, 1_003, "硅胶保护套（黑色）", 8_000, 1),
        ],
        payments: vec![Payment {
            kind: PaymentKind::Payment,
            transaction_no: "4200001234202601011234567890".into(),
            channel: "wechat".into(),
            amount: money(43_700),
            created_at: at(120_000_001),
        }],
        discounts: vec![OrderDiscount {
            line_no: 1,
            coupon_id: CouponId::new(777),
            kind: "coupon".into(),
            amount: money(2_000),
            description: "coupon 777 (-2000)".into(),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User {
            user_id: UserId::new(9).unwrap(),
            name: "李娜".into(),
            level: 3,
            created_at: DateTime::from_timestamp_micros(1_767_225_600_123_456).unwrap(),
        }
    }

    #[test]
    fn an_order_round_trips() {
        let o = sample_order(123_456_789, 9, 4);
        assert_eq!(decode_order(&encode_order(&o)), Some(o));
    }

    #[test]
    fn an_order_with_every_optional_field_round_trips() {
        let mut o = sample_order(5, 9, 7);
        o.tracking_number = Some("SF1234567890".into());
        o.carrier = Some("顺丰".into());
        o.close_reason = Some("refund".into());
        o.refund_required = true;
        o.status = OrderStatus::Closed;
        o.shipped_at = Some(o.updated_at);
        o.completed_at = Some(o.updated_at);
        o.closed_at = Some(o.updated_at);
        o.invalidated_at = Some(o.updated_at);
        o.discounts[0].coupon_id = None;
        o.payments.push(Payment {
            kind: PaymentKind::Refund,
            transaction_no: "r1".into(),
            channel: "wechat".into(),
            amount: Money::new(100).unwrap(),
            created_at: o.updated_at,
        });
        assert_eq!(decode_order(&encode_order(&o)), Some(o));
    }

    #[test]
    fn a_user_round_trips() {
        assert_eq!(decode_user(&encode_user(&user())), Some(user()));
    }

    #[test]
    fn a_page_round_trips() {
        let page: Vec<Order> = (1..=21).map(|i| sample_order(i, 9, i)).collect();
        assert_eq!(decode_page(&encode_page(&page)), Some(page));
        assert_eq!(decode_page(&encode_page(&[])), Some(vec![]));
    }

    #[test]
    fn garbage_decodes_to_none() {
        assert_eq!(decode_order(&[]), None);
        assert_eq!(decode_order(&[FORMAT]), None);
        assert_eq!(decode_order(&[FORMAT, 0xff, 0x00, 0x13]), None);
        assert_eq!(decode_user(b"\x01not a record at all"), None);
        let full = encode_order(&sample_order(1, 9, 1));
        for cut in 0..full.len() {
            assert_eq!(decode_order(&full[..cut]), None, "cut at {cut}");
        }
        // A user is not an order, nor the other way round.
        assert_eq!(decode_order(&encode_user(&user())), None);
        assert_eq!(decode_user(&full), None);
    }

    #[test]
    fn another_format_byte_decodes_to_none() {
        let mut bytes = encode_order(&sample_order(1, 9, 1));
        bytes[0] = FORMAT + 1;
        assert_eq!(decode_order(&bytes), None);
        let mut bytes = encode_user(&user());
        bytes[0] = 0;
        assert_eq!(decode_user(&bytes), None);
    }

    #[test]
    fn a_record_that_fails_a_domain_constructor_decodes_to_none() {
        let mut r = OrderRecord::from(&sample_order(1, 9, 1));
        r.status = 99;
        assert_eq!(decode_order(&encode(&r)), None);
        let mut r = OrderRecord::from(&sample_order(1, 9, 1));
        r.currency = "yuan".into();
        assert_eq!(decode_order(&encode(&r)), None);
        let mut r = OrderRecord::from(&sample_order(1, 9, 1));
        r.pay = -1;
        assert_eq!(decode_order(&encode(&r)), None);
    }
}
