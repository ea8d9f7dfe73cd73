//! Status moves and `PATCH` field changes: what each writes ([`StatusChange`],
//! [`FieldChanges`]), the time column a status move stamps, and the index hint every
//! compare-and-set carries. The compare-and-set statements run in the door
//! ([`super::commit`], `OrderWrite::Status` and `OrderWrite::Fields`).

use crate::domain::order::Address;
use crate::domain::status::OrderStatus;

/// A status change as a compare-and-set on (version, status).
#[derive(Debug, Clone, Default)]
pub struct StatusChange {
    pub carrier: Option<String>,
    pub tracking_number: Option<String>,
    pub close_reason: Option<String>,
    /// Money was received that must go back (invalidating a paid order).
    pub refund_required: bool,
}

/// The time column a move to `to` stamps.
pub(super) fn timestamp_column(to: OrderStatus) -> &'static str {
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
pub(super) const BY_PRIMARY: &str = "FORCE INDEX (PRIMARY)";

/// Field changes of `PATCH`; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldChanges {
    pub address: Option<Address>,
    pub remark: Option<String>,
    pub tracking_number: Option<String>,
    pub carrier: Option<String>,
}
