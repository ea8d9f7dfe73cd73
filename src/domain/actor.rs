//! Who is calling: the authenticated party of a request, and what it may see.
//!
//! Visibility is the rule "another party's order does not exist for you": a user sees only
//! their own orders, a merchant only its shop's, an administrator all. The `service` role
//! (the payment channel) acts on orders by id but reads nothing else.

use super::ids::{ShopId, UserId};
use super::order::Order;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Merchant,
    Service,
    Admin,
}

/// The authenticated caller. Built only from a verified token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    User(UserId),
    Merchant { user: UserId, shop: ShopId },
    Service,
    Admin(UserId),
}

impl Caller {
    pub fn role(self) -> Role {
        match self {
            Caller::User(_) => Role::User,
            Caller::Merchant { .. } => Role::Merchant,
            Caller::Service => Role::Service,
            Caller::Admin(_) => Role::Admin,
        }
    }

    /// Whether this caller may know that `order` exists.
    pub fn can_see(self, order: &Order) -> bool {
        match self {
            Caller::User(u) => order.user_id == u,
            Caller::Merchant { shop, .. } => order.shop_id == shop,
            Caller::Service | Caller::Admin(_) => true,
        }
    }

    pub fn is_owner(self, order: &Order) -> bool {
        matches!(self, Caller::User(u) if order.user_id == u)
    }

    pub fn is_shop_of(self, order: &Order) -> bool {
        matches!(self, Caller::Merchant { shop, .. } if order.shop_id == shop)
    }

    pub fn is_admin(self) -> bool {
        matches!(self, Caller::Admin(_))
    }

    /// Whether this caller runs `shop`'s catalog: an administrator, or the shop's merchant.
    pub fn manages_shop(self, shop: ShopId) -> bool {
        match self {
            Caller::Admin(_) => true,
            Caller::Merchant { shop: own, .. } => own == shop,
            Caller::User(_) | Caller::Service => false,
        }
    }
}
