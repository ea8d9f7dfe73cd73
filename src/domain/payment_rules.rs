//! What a payment or a refund does to an order: a pure rule over the order's status, the
//! amount due and the net amount paid so far. Storage reads those inside its transaction
//! (order row locked), asks [`money_rule`], and writes what it answers.
//!
//! Invariants kept here:
//! - Money received is never dropped: a payment for an order that cannot take it any more
//!   (paid already, closed, invalidated) is accepted and flags the order `refund_required`.
//! - Money beyond what the order is worth must go back: the flag stays until refunds have
//!   brought the net paid down to what is due (to zero for a closed or invalid order).
//! - A refund never exceeds what may go back.

use super::order::PaymentKind;
use super::status::{transition, Command, OrderStatus};

/// What an accepted payment or refund does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoneyEffect {
    /// The status after it (maybe the same).
    pub to: OrderStatus,
    /// The `refund_required` flag to set, or `None` to leave it.
    pub refund_required: Option<bool>,
    /// A full refund closed the order: its stock and coupons go back.
    pub closes: bool,
}

/// Why a payment or refund is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoneyRefusal {
    /// The amount is wrong: `limit` is the amount due (payment) or the most that can be
    /// refunded.
    WrongAmount { limit: i64 },
    /// The order cannot take it at all (e.g. a refund of an unpaid order).
    NotNow,
}

fn effect(to: OrderStatus, refund_required: Option<bool>, closes: bool) -> MoneyEffect {
    MoneyEffect {
        to,
        refund_required,
        closes,
    }
}

/// The rule: `amount` of `kind` arrives for an order in `status` that costs `due` and has
/// `net` paid so far (payments minus refunds).
pub fn money_rule(
    status: OrderStatus,
    kind: PaymentKind,
    amount: i64,
    due: i64,
    net: i64,
) -> Result<MoneyEffect, MoneyRefusal> {
    use OrderStatus::*;
    let wrong = |limit| Err(MoneyRefusal::WrongAmount { limit });
    // What the order keeps once settled: nothing for a closed or invalid order.
    let keeps = |s: OrderStatus| if s.releases_stock() { 0 } else { due };
    match (kind, status) {
        (PaymentKind::Payment, PendingPayment) if amount != due => wrong(due),
        (PaymentKind::Payment, PendingPayment) => Ok(effect(AwaitingShipment, None, false)),
        (PaymentKind::Payment, _) => Ok(effect(status, Some(true), false)),
        (PaymentKind::Refund, PendingPayment) => Err(MoneyRefusal::NotNow),
        // A paid, unshipped order can be refunded in full (closing it) or in part.
        (PaymentKind::Refund, AwaitingShipment) if amount > net => wrong(net),
        (PaymentKind::Refund, AwaitingShipment) if amount == net => {
            let to = transition(status, Command::FullRefund).map_err(|_| MoneyRefusal::NotNow)?;
            Ok(effect(to, Some(false), true))
        }
        (PaymentKind::Refund, AwaitingShipment) => Ok(effect(status, Some(net - amount > due), false)),
        // Otherwise only the excess goes back.
        (PaymentKind::Refund, _) => {
            let excess = net - keeps(status);
            if excess <= 0 {
                Err(MoneyRefusal::NotNow)
            } else if amount > excess {
                wrong(excess)
            } else {
                Ok(effect(status, Some(excess - amount > 0), false))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OrderStatus::*;
    use PaymentKind::{Payment as Pay, Refund};

    #[test]
    fn money_rules() {
        let ok = |to, flag, closes| Ok(effect(to, flag, closes));
        let wrong = |limit| Err(MoneyRefusal::WrongAmount { limit });
        let not_now = Err(MoneyRefusal::NotNow);
        // (status, kind, amount, due, net) -> expected
        type Case = (
            OrderStatus,
            PaymentKind,
            i64,
            i64,
            i64,
            Result<MoneyEffect, MoneyRefusal>,
        );
        let cases: &[Case] = &[
            (
                PendingPayment,
                Pay,
                100,
                100,
                0,
                ok(AwaitingShipment, None, false),
            ),
            (PendingPayment, Pay, 99, 100, 0, wrong(100)),
            (
                AwaitingShipment,
                Pay,
                100,
                100,
                100,
                ok(AwaitingShipment, Some(true), false),
            ),
            (Closed, Pay, 100, 100, 0, ok(Closed, Some(true), false)),
            (PendingPayment, Refund, 1, 100, 0, not_now),
            (
                AwaitingShipment,
                Refund,
                100,
                100,
                100,
                ok(Closed, Some(false), true),
            ),
            (
                AwaitingShipment,
                Refund,
                40,
                100,
                100,
                ok(AwaitingShipment, Some(false), false),
            ),
            (AwaitingShipment, Refund, 101, 100, 100, wrong(100)),
            // Paid twice, the duplicate refunded: the flag clears, the order stays paid.
            (
                AwaitingShipment,
                Refund,
                100,
                100,
                200,
                ok(AwaitingShipment, Some(false), false),
            ),
            // Shipped: only the excess can go back.
            (Shipped, Refund, 100, 100, 100, not_now),
            (Shipped, Refund, 150, 100, 200, wrong(100)),
            (
                Completed,
                Refund,
                100,
                100,
                200,
                ok(Completed, Some(false), false),
            ),
            (Closed, Refund, 60, 100, 100, ok(Closed, Some(true), false)),
            (Invalid, Refund, 100, 100, 100, ok(Invalid, Some(false), false)),
        ];
        for (status, kind, amount, due, net, expected) in cases {
            assert_eq!(
                &money_rule(*status, *kind, *amount, *due, *net),
                expected,
                "{status:?} {kind:?} {amount}"
            );
        }
    }
}
