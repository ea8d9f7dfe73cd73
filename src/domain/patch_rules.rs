//! Who may change which fields of an order, in which status (`PATCH /v1/orders/{id}`): a pure
//! rule, like the status machine, with a table test over every role, field set and status.
//!
//! - The buyer's fields (address, remark) change only before shipment: in `pending_payment`
//!   and `awaiting_shipment`, by the buyer or an administrator.
//! - The shop's fields (tracking number, carrier) change once paid and until delivery: in
//!   `awaiting_shipment` and `shipped`, by the shop or an administrator.
//! - Both at once (administrators only) where both may change: `awaiting_shipment`.
//! - The payment channel changes no fields.

use super::actor::Role;
use super::status::OrderStatus;

/// Which fields a `PATCH` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchFields {
    /// Address and/or remark.
    Buyer,
    /// Tracking number and/or carrier.
    Shop,
    Both,
}

/// Why a `PATCH` is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchRefusal {
    /// This role may never change these fields (403).
    Forbidden(&'static str),
    /// Not in the order's current status (409 `invalid_transition`).
    NotNow,
}

/// The statuses in which `role` may change `fields`.
pub fn patchable_in(role: Role, fields: PatchFields) -> Result<&'static [OrderStatus], PatchRefusal> {
    use OrderStatus::{AwaitingShipment, PendingPayment, Shipped};
    match (role, fields) {
        (Role::Service, _) => Err(PatchRefusal::Forbidden("the payment channel changes no fields")),
        (Role::User, PatchFields::Shop | PatchFields::Both) => {
            Err(PatchRefusal::Forbidden("a buyer cannot set shipping fields"))
        }
        (Role::Merchant, PatchFields::Buyer | PatchFields::Both) => Err(PatchRefusal::Forbidden(
            "a merchant cannot change the buyer's address or remark",
        )),
        (Role::User | Role::Admin, PatchFields::Buyer) => Ok(&[PendingPayment, AwaitingShipment]),
        (Role::Merchant | Role::Admin, PatchFields::Shop) => Ok(&[AwaitingShipment, Shipped]),
        (Role::Admin, PatchFields::Both) => Ok(&[AwaitingShipment]),
    }
}

/// Whether `role` may change `fields` of an order in `status`.
pub fn may_patch(role: Role, fields: PatchFields, status: OrderStatus) -> Result<(), PatchRefusal> {
    if patchable_in(role, fields)?.contains(&status) {
        Ok(())
    } else {
        Err(PatchRefusal::NotNow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OrderStatus::*;

    /// Every (role, fields, status): `true` allowed, `false` refused in that status; a role
    /// that may never change the fields is `None` for every status.
    #[test]
    fn the_patch_table() {
        let statuses = [
            PendingPayment,
            AwaitingShipment,
            Shipped,
            Completed,
            Closed,
            Invalid,
        ];
        #[rustfmt::skip]
        let table: &[(Role, PatchFields, Option<[bool; 6]>)] = &[
            //                                     pend   await  ship   compl  closed invalid
            (Role::User,     PatchFields::Buyer, Some([true,  true,  false, false, false, false])),
            (Role::User,     PatchFields::Shop,  None),
            (Role::User,     PatchFields::Both,  None),
            (Role::Merchant, PatchFields::Buyer, None),
            (Role::Merchant, PatchFields::Shop,  Some([false, true,  true,  false, false, false])),
            (Role::Merchant, PatchFields::Both,  None),
            (Role::Admin,    PatchFields::Buyer, Some([true,  true,  false, false, false, false])),
            (Role::Admin,    PatchFields::Shop,  Some([false, true,  true,  false, false, false])),
            (Role::Admin,    PatchFields::Both,  Some([false, true,  false, false, false, false])),
            (Role::Service,  PatchFields::Buyer, None),
            (Role::Service,  PatchFields::Shop,  None),
            (Role::Service,  PatchFields::Both,  None),
        ];
        assert_eq!(table.len(), 4 * 3, "every role and field set");
        for (role, fields, expected) in table {
            for (i, status) in statuses.iter().enumerate() {
                let got = may_patch(*role, *fields, *status);
                match expected {
                    None => assert!(
                        matches!(got, Err(PatchRefusal::Forbidden(_))),
                        "{role:?} {fields:?} {status:?}: {got:?}"
                    ),
                    Some(row) if row[i] => assert_eq!(got, Ok(()), "{role:?} {fields:?} {status:?}"),
                    Some(_) => assert_eq!(got, Err(PatchRefusal::NotNow), "{role:?} {fields:?} {status:?}"),
                }
            }
        }
    }
}
