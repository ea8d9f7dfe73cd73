//! The order status machine (SPEC section 1).
//!
//! A pure function from (status, command) to the next status or a refusal. Storage applies
//! the result as a compare-and-set on the status it read, so two racing commands have exactly
//! one winner.

use std::fmt;

use serde::Serialize;

/// Stored as the integer code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    PendingPayment = 0,
    AwaitingShipment = 1,
    Shipped = 2,
    Completed = 3,
    Closed = 4,
    Invalid = 5,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 6] = [
        OrderStatus::PendingPayment,
        OrderStatus::AwaitingShipment,
        OrderStatus::Shipped,
        OrderStatus::Completed,
        OrderStatus::Closed,
        OrderStatus::Invalid,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|s| i64::from(s.code()) == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            OrderStatus::PendingPayment => "pending_payment",
            OrderStatus::AwaitingShipment => "awaiting_shipment",
            OrderStatus::Shipped => "shipped",
            OrderStatus::Completed => "completed",
            OrderStatus::Closed => "closed",
            OrderStatus::Invalid => "invalid",
        }
    }

    /// Parses either the name or the integer code (query filters accept both).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .or_else(|| s.parse::<i64>().ok().and_then(Self::from_code))
    }

    /// Final states: nothing moves out of them.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            OrderStatus::Completed | OrderStatus::Closed | OrderStatus::Invalid
        )
    }

    /// Closed and invalid orders hold no stock and no coupon.
    pub fn releases_stock(self) -> bool {
        matches!(self, OrderStatus::Closed | OrderStatus::Invalid)
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What someone asks an order to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Pay,
    Cancel,
    TimeoutClose,
    Ship,
    FullRefund,
    Confirm,
    Invalidate,
    /// The system confirms receipt of an order shipped long enough ago
    /// (`orders.auto_complete_days`): the same move as [`Command::Confirm`], without the buyer.
    AutoComplete,
}

impl Command {
    pub const ALL: [Command; 8] = [
        Command::Pay,
        Command::Cancel,
        Command::TimeoutClose,
        Command::Ship,
        Command::FullRefund,
        Command::Confirm,
        Command::Invalidate,
        Command::AutoComplete,
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {command:?} an order that is {from}")]
pub struct InvalidTransition {
    pub from: OrderStatus,
    pub command: Command,
}

/// The status machine: the allowed moves of SPEC section 1 and nothing else.
pub fn transition(from: OrderStatus, command: Command) -> Result<OrderStatus, InvalidTransition> {
    use Command::*;
    use OrderStatus::*;
    let to = match (from, command) {
        (PendingPayment, Pay) => AwaitingShipment,
        (PendingPayment, Cancel | TimeoutClose) => Closed,
        (AwaitingShipment, Ship) => Shipped,
        (AwaitingShipment, FullRefund) => Closed,
        (Shipped, Confirm | AutoComplete) => Completed,
        (PendingPayment | AwaitingShipment, Invalidate) => Invalid,
        _ => return Err(InvalidTransition { from, command }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Command::*;
    use OrderStatus::*;

    #[test]
    fn every_pair_of_status_and_command() {
        // The whole table, written out: a change to the machine must change this test.
        let allowed = [
            (PendingPayment, Pay, AwaitingShipment),
            (PendingPayment, Cancel, Closed),
            (PendingPayment, TimeoutClose, Closed),
            (PendingPayment, Invalidate, Invalid),
            (AwaitingShipment, Ship, Shipped),
            (AwaitingShipment, FullRefund, Closed),
            (AwaitingShipment, Invalidate, Invalid),
            (Shipped, Confirm, Completed),
            (Shipped, AutoComplete, Completed),
        ];
        for from in OrderStatus::ALL {
            for cmd in Command::ALL {
                let expected = allowed
                    .iter()
                    .find(|(f, c, _)| *f == from && *c == cmd)
                    .map(|(_, _, to)| *to);
                match (transition(from, cmd), expected) {
                    (Ok(to), Some(exp)) => assert_eq!(to, exp, "{from:?} {cmd:?}"),
                    (Err(e), None) => assert_eq!(e.from, from),
                    (got, exp) => panic!("{from:?} {cmd:?}: got {got:?}, expected {exp:?}"),
                }
            }
        }
    }

    #[test]
    fn final_states_have_no_way_out() {
        for from in OrderStatus::ALL.into_iter().filter(|s| s.is_final()) {
            for cmd in Command::ALL {
                assert!(transition(from, cmd).is_err());
            }
        }
    }

    #[test]
    fn codes_and_names_round_trip() {
        for s in OrderStatus::ALL {
            assert_eq!(OrderStatus::from_code(i64::from(s.code())), Some(s));
            assert_eq!(OrderStatus::parse(s.name()), Some(s));
        }
        assert_eq!(OrderStatus::from_code(6), None);
        assert_eq!(OrderStatus::parse("paid"), None);
    }
}
