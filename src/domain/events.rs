//! Order events: what one committed order write tells the rest of the world.
//!
//! Every write of an order that moves its version leaves exactly one event in the shard's
//! transactional outbox, in the same transaction as the change (see
//! [`crate::storage::outbox`]). An event is identified by `(order_id, version)`: a version is
//! committed once, so the id is stable across relays, retries and rebuilds, and it is what
//! JetStream deduplicates on (`Nats-Msg-Id`) and what every read model keeps to stay
//! idempotent. An event carries the whole order at that version (its snapshot), so a consumer
//! never needs an earlier event to apply a later one: it keeps the highest version it saw.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ids::{CouponId, OrderId, ProductId, ShopId, UserId};
use super::money::{Currency, Money};
use super::order::{Address, Order, OrderDiscount, OrderLine, Payment, PaymentKind};
use super::status::OrderStatus;

/// What kind of change an event records. The snapshot says the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Created,
    Paid,
    Shipped,
    Completed,
    Closed,
    Invalidated,
    /// Fields changed (address, remark, tracking), or money arrived that changed no status
    /// (a payment for a closed order, flagged for refund).
    Changed,
    Refunded,
}

impl EventKind {
    pub const ALL: [EventKind; 8] = [
        EventKind::Created,
        EventKind::Paid,
        EventKind::Shipped,
        EventKind::Completed,
        EventKind::Closed,
        EventKind::Invalidated,
        EventKind::Changed,
        EventKind::Refunded,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Paid => "paid",
            EventKind::Shipped => "shipped",
            EventKind::Completed => "completed",
            EventKind::Closed => "closed",
            EventKind::Invalidated => "invalidated",
            EventKind::Changed => "changed",
            EventKind::Refunded => "refunded",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// The event of a status move (`from` → `to`, the same status for field changes).
    pub fn of_move(from: OrderStatus, to: OrderStatus) -> EventKind {
        if from == to {
            return EventKind::Changed;
        }
        match to {
            OrderStatus::PendingPayment => EventKind::Changed,
            OrderStatus::AwaitingShipment => EventKind::Paid,
            OrderStatus::Shipped => EventKind::Shipped,
            OrderStatus::Completed => EventKind::Completed,
            OrderStatus::Closed => EventKind::Closed,
            OrderStatus::Invalid => EventKind::Invalidated,
        }
    }

    /// The event of a payment (`refund` false) or a refund that moved `from` → `to`.
    pub fn of_money(refund: bool, from: OrderStatus, to: OrderStatus) -> EventKind {
        match (refund, from == to) {
            (true, _) => EventKind::Refunded,
            (false, false) => EventKind::of_move(from, to),
            (false, true) => EventKind::Changed,
        }
    }
}

/// The stable id of the event of `order` at `version`: `"<order_id>.<version>"`.
pub fn event_id(order: OrderId, version: i64) -> String {
    format!("{}.{version}", order.get())
}

/// An order line at the event's version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineSnapshot {
    pub line_no: i64,
    pub product_id: i64,
    pub product_name: String,
    pub unit_price: i64,
    pub quantity: i64,
    pub line_total: i64,
}

/// A payment (`kind` 0) or refund (`kind` 1) at the event's version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentSnapshot {
    pub kind: i64,
    pub transaction_no: String,
    pub channel: String,
    pub amount: i64,
    pub created_at: DateTime<Utc>,
}

/// A discount at the event's version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscountSnapshot {
    pub line_no: i64,
    pub coupon_id: Option<i64>,
    pub kind: String,
    pub amount: i64,
    #[serde(default)]
    pub description: String,
}

/// The whole order at one version, as the outbox stored it (built by the database in the
/// write's own transaction, so it is exactly what committed). Ids are numbers here: the
/// event stream is read by our own consumers, not by JavaScript.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderSnapshot {
    pub order_id: i64,
    pub user_id: i64,
    pub shop_id: i64,
    /// The status code (SPEC 1).
    pub status: i64,
    pub version: i64,
    pub currency: String,
    pub total_amount: i64,
    pub discount_amount: i64,
    pub pay_amount: i64,
    pub receiver_name: String,
    pub receiver_phone: String,
    pub receiver_region: String,
    pub receiver_detail: String,
    pub remark: String,
    pub tracking_number: Option<String>,
    pub carrier: Option<String>,
    #[serde(default)]
    pub close_reason: Option<String>,
    pub refund_required: bool,
    pub created_at: DateTime<Utc>,
    pub pay_deadline: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub paid_at: Option<DateTime<Utc>>,
    pub shipped_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
    pub invalidated_at: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub items: Vec<LineSnapshot>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub payments: Vec<PaymentSnapshot>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub discounts: Vec<DiscountSnapshot>,
}

/// The database aggregates no rows into `null`, not `[]`.
fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

impl OrderSnapshot {
    pub fn status(&self) -> Option<OrderStatus> {
        OrderStatus::from_code(self.status)
    }

    /// Units over every line.
    pub fn units(&self) -> i64 {
        self.items.iter().map(|l| l.quantity).sum()
    }

    /// The snapshot of `order`: what the database builds from its rows
    /// (`storage::outbox::snapshot_json`), built in the process from an order it just wrote
    /// (the create's event, which then needs no read of what it inserted).
    /// [`OrderSnapshot::to_order`] gives `order` back.
    pub fn of(order: &Order) -> OrderSnapshot {
        OrderSnapshot {
            order_id: order.order_id.get(),
            user_id: order.user_id.get(),
            shop_id: order.shop_id.get(),
            status: i64::from(order.status.code()),
            version: order.version,
            currency: order.currency.as_str().to_owned(),
            total_amount: order.total_amount.minor(),
            discount_amount: order.discount_amount.minor(),
            pay_amount: order.pay_amount.minor(),
            receiver_name: order.address.name.clone(),
            receiver_phone: order.address.phone.clone(),
            receiver_region: order.address.region.clone(),
            receiver_detail: order.address.detail.clone(),
            remark: order.remark.clone(),
            tracking_number: order.tracking_number.clone(),
            carrier: order.carrier.clone(),
            close_reason: order.close_reason.clone(),
            refund_required: order.refund_required,
            created_at: order.created_at,
            pay_deadline: order.pay_deadline,
            updated_at: order.updated_at,
            paid_at: order.paid_at,
            shipped_at: order.shipped_at,
            completed_at: order.completed_at,
            closed_at: order.closed_at,
            invalidated_at: order.invalidated_at,
            items: order
                .items
                .iter()
                .map(|l| LineSnapshot {
                    line_no: i64::from(l.line_no),
                    product_id: l.product_id.get(),
                    product_name: l.product_name.clone(),
                    unit_price: l.unit_price.minor(),
                    quantity: l.quantity,
                    line_total: l.line_total.minor(),
                })
                .collect(),
            payments: order
                .payments
                .iter()
                .map(|p| PaymentSnapshot {
                    kind: match p.kind {
                        PaymentKind::Payment => 0,
                        PaymentKind::Refund => 1,
                    },
                    transaction_no: p.transaction_no.clone(),
                    channel: p.channel.clone(),
                    amount: p.amount.minor(),
                    created_at: p.created_at,
                })
                .collect(),
            discounts: order
                .discounts
                .iter()
                .map(|d| DiscountSnapshot {
                    line_no: i64::from(d.line_no),
                    coupon_id: d.coupon_id.map(|c| c.get()),
                    kind: d.kind.clone(),
                    amount: d.amount.minor(),
                    description: d.description.clone(),
                })
                .collect(),
        }
    }

    /// The order this snapshot describes, as the API shows orders; `None` if a field is out
    /// of its domain (no snapshot the database built can be).
    pub fn to_order(&self) -> Option<Order> {
        let money = Money::new;
        Some(Order {
            order_id: OrderId::new(self.order_id)?,
            user_id: UserId::new(self.user_id)?,
            shop_id: ShopId::new(self.shop_id)?,
            status: self.status()?,
            version: self.version,
            currency: Currency::parse(&self.currency)?,
            total_amount: money(self.total_amount)?,
            discount_amount: money(self.discount_amount)?,
            pay_amount: money(self.pay_amount)?,
            address: Address {
                name: self.receiver_name.clone(),
                phone: self.receiver_phone.clone(),
                region: self.receiver_region.clone(),
                detail: self.receiver_detail.clone(),
            },
            remark: self.remark.clone(),
            tracking_number: self.tracking_number.clone(),
            carrier: self.carrier.clone(),
            close_reason: self.close_reason.clone(),
            refund_required: self.refund_required,
            created_at: self.created_at,
            updated_at: self.updated_at,
            pay_deadline: self.pay_deadline,
            paid_at: self.paid_at,
            shipped_at: self.shipped_at,
            completed_at: self.completed_at,
            closed_at: self.closed_at,
            invalidated_at: self.invalidated_at,
            items: self
                .items
                .iter()
                .map(|l| {
                    Some(OrderLine {
                        line_no: u32::try_from(l.line_no).ok()?,
                        product_id: ProductId::new(l.product_id)?,
                        product_name: l.product_name.clone(),
                        unit_price: money(l.unit_price)?,
                        quantity: l.quantity,
                        line_total: money(l.line_total)?,
                    })
                })
                .collect::<Option<_>>()?,
            payments: self
                .payments
                .iter()
                .map(|p| {
                    Some(Payment {
                        kind: match p.kind {
                            0 => PaymentKind::Payment,
                            1 => PaymentKind::Refund,
                            _ => return None,
                        },
                        transaction_no: p.transaction_no.clone(),
                        channel: p.channel.clone(),
                        amount: money(p.amount)?,
                        created_at: p.created_at,
                    })
                })
                .collect::<Option<_>>()?,
            discounts: self
                .discounts
                .iter()
                .map(|d| {
                    Some(OrderDiscount {
                        line_no: u32::try_from(d.line_no).ok()?,
                        coupon_id: match d.coupon_id {
                            Some(c) => Some(CouponId::new(c)?),
                            None => None,
                        },
                        kind: d.kind.clone(),
                        amount: money(d.amount)?,
                        description: d.description.clone(),
                    })
                })
                .collect::<Option<_>>()?,
        })
    }

    /// Money received (payments), and money given back (refunds).
    pub fn paid_and_refunded(&self) -> (i64, i64) {
        self.payments.iter().fold((0, 0), |(paid, refunded), p| {
            if p.kind == 0 {
                (paid + p.amount, refunded)
            } else {
                (paid, refunded + p.amount)
            }
        })
    }
}

/// One event as it travels on the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderEvent {
    /// [`event_id`] of the order and version.
    pub event_id: String,
    pub kind: EventKind,
    /// When the write committed (the outbox row's time).
    pub occurred_at: DateTime<Utc>,
    pub order: OrderSnapshot,
}

impl OrderEvent {
    pub fn order_id(&self) -> Option<OrderId> {
        OrderId::new(self.order.order_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OrderStatus::*;

    #[test]
    fn every_kind_has_a_name_that_parses_back() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.name()), Some(k));
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.name()));
        }
        assert_eq!(EventKind::parse("nope"), None);
    }

    #[test]
    fn kinds_follow_the_status_moves() {
        let table = [
            (PendingPayment, AwaitingShipment, EventKind::Paid),
            (AwaitingShipment, Shipped, EventKind::Shipped),
            (Shipped, Completed, EventKind::Completed),
            (PendingPayment, Closed, EventKind::Closed),
            (AwaitingShipment, Closed, EventKind::Closed),
            (PendingPayment, Invalid, EventKind::Invalidated),
            (AwaitingShipment, Invalid, EventKind::Invalidated),
            (Shipped, Shipped, EventKind::Changed),
        ];
        for (from, to, kind) in table {
            assert_eq!(EventKind::of_move(from, to), kind, "{from:?} -> {to:?}");
        }
        assert_eq!(
            EventKind::of_money(false, PendingPayment, AwaitingShipment),
            EventKind::Paid
        );
        assert_eq!(EventKind::of_money(false, Closed, Closed), EventKind::Changed);
        assert_eq!(
            EventKind::of_money(true, AwaitingShipment, Closed),
            EventKind::Refunded
        );
        assert_eq!(EventKind::of_money(true, Shipped, Shipped), EventKind::Refunded);
    }
}
