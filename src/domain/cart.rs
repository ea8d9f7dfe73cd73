//! The cart: which products a buyer means to buy, and how many of each. No prices: a cart
//! shows the catalog's current prices when it is read, and an order prices itself at create.
//!
//! Invariants kept here:
//! - At most [`MAX_LINES`] lines, each product once, quantities in 1..=[`MAX_QUANTITY`]
//!   (the limits of an order, so any cart can be checked out as one order's lines).
//! - A cart remembers the last [`KEPT_CHECKOUTS`] orders checked out of it, so removing an
//!   order's lines happens once per order id whatever retries the removal sees.
//! - Every change bumps [`StoredCart::version`]; a change that changes nothing does not.

use std::collections::BTreeMap;

use super::ids::{OrderId, ProductId};
use super::order::{FieldErrors, NewLine, MAX_LINES, MAX_QUANTITY};

/// Orders a cart remembers having removed lines for. Only a retry of one removal (a Redis
/// call that timed out and went to MySQL) can repeat it, seconds later; eight orders in
/// between is far more than one buyer checks out in that time.
pub const KEPT_CHECKOUTS: usize = 8;

/// A cart's content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cart {
    /// Product → quantity (1..=MAX_QUANTITY), in product id order.
    pub lines: BTreeMap<ProductId, i64>,
    /// The last orders checked out of this cart, oldest first.
    pub checkouts: Vec<OrderId>,
}

/// A cart and its version (0: never written).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredCart {
    pub version: i64,
    pub cart: Cart,
}

/// Why a change was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooManyLines,
}

/// A quantity for `PUT /v1/cart/items/{product_id}`: 0 removes the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CartQuantity(i64);

impl CartQuantity {
    pub fn parse(q: i64) -> Result<CartQuantity, FieldErrors> {
        if (0..=MAX_QUANTITY).contains(&q) {
            Ok(CartQuantity(q))
        } else {
            Err(FieldErrors::single(
                "quantity",
                format!("must be between 0 (removes the line) and {MAX_QUANTITY}"),
            ))
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl Cart {
    /// Sets a line (0 removes it). `Ok(true)`: the cart changed.
    pub fn set(&mut self, product: ProductId, q: CartQuantity) -> Result<bool, Refusal> {
        let q = q.get();
        if q == 0 {
            return Ok(self.lines.remove(&product).is_some());
        }
        match self.lines.get(&product) {
            Some(&cur) if cur == q => Ok(false),
            Some(_) => {
                self.lines.insert(product, q);
                Ok(true)
            }
            None if self.lines.len() >= MAX_LINES => Err(Refusal::TooManyLines),
            None => {
                self.lines.insert(product, q);
                Ok(true)
            }
        }
    }

    /// Empties the cart (the checkouts it remembers stay). `true`: it held lines.
    pub fn clear(&mut self) -> bool {
        let had = !self.lines.is_empty();
        self.lines.clear();
        had
    }

    /// Removes what `order` bought: each line's quantity goes down by the ordered quantity
    /// (a line left at 0 or below goes; more in the cart than ordered stays). Once per order:
    /// `false` when this order's lines were removed before.
    pub fn check_out(&mut self, order: OrderId, bought: &[NewLine]) -> bool {
        if self.checkouts.contains(&order) {
            return false;
        }
        for l in bought {
            if let Some(cur) = self.lines.get(&l.product_id).copied() {
                if cur > l.quantity {
                    self.lines.insert(l.product_id, cur - l.quantity);
                } else {
                    self.lines.remove(&l.product_id);
                }
            }
        }
        self.checkouts.push(order);
        let extra = self.checkouts.len().saturating_sub(KEPT_CHECKOUTS);
        self.checkouts.drain(..extra);
        true
    }

    /// The lines as an order's lines, in product id order.
    pub fn order_lines(&self) -> Vec<NewLine> {
        self.lines
            .iter()
            .map(|(&product_id, &quantity)| NewLine { product_id, quantity })
            .collect()
    }

    /// The lines as stored in MySQL: a JSON array of `[product_id, quantity]` pairs.
    pub fn lines_json(&self) -> String {
        let pairs: Vec<[i64; 2]> = self.lines.iter().map(|(p, q)| [p.get(), *q]).collect();
        serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".into())
    }

    /// The checkouts as stored (in MySQL and Redis): order ids separated by commas.
    pub fn checkouts_text(&self) -> String {
        let ids: Vec<String> = self.checkouts.iter().map(|o| o.get().to_string()).collect();
        ids.join(",")
    }

    /// The inverse of [`Cart::lines_json`] and [`Cart::checkouts_text`]; `None`: malformed.
    pub fn from_stored(lines_json: &str, checkouts: &str) -> Option<Cart> {
        let pairs: Vec<[i64; 2]> = serde_json::from_str(lines_json).ok()?;
        let mut lines = BTreeMap::new();
        for [p, q] in pairs {
            if !(1..=MAX_QUANTITY).contains(&q) {
                return None;
            }
            lines.insert(ProductId::new(p)?, q);
        }
        Some(Cart {
            lines,
            checkouts: parse_checkouts(checkouts)?,
        })
    }
}

/// Order ids separated by commas (empty: none).
pub fn parse_checkouts(s: &str) -> Option<Vec<OrderId>> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(OrderId::parse)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i64) -> ProductId {
        ProductId::new(n).unwrap()
    }

    fn q(n: i64) -> CartQuantity {
        CartQuantity::parse(n).unwrap()
    }

    #[test]
    fn quantities_are_bounded_like_order_lines() {
        assert!(CartQuantity::parse(-1).is_err());
        assert!(CartQuantity::parse(MAX_QUANTITY + 1).is_err());
        assert_eq!(CartQuantity::parse(0).unwrap().get(), 0);
        assert_eq!(CartQuantity::parse(MAX_QUANTITY).unwrap().get(), MAX_QUANTITY);
    }

    #[test]
    fn set_changes_only_what_differs_and_stops_at_the_line_limit() {
        let mut c = Cart::default();
        assert_eq!(c.set(p(1), q(2)), Ok(true));
        assert_eq!(c.set(p(1), q(2)), Ok(false));
        assert_eq!(c.set(p(1), q(0)), Ok(true));
        assert_eq!(c.set(p(1), q(0)), Ok(false));
        for i in 1..=MAX_LINES as i64 {
            assert_eq!(c.set(p(i), q(1)), Ok(true));
        }
        assert_eq!(c.set(p(1000), q(1)), Err(Refusal::TooManyLines));
        assert_eq!(c.set(p(1), q(3)), Ok(true), "an existing line may still change");
        assert!(c.clear());
        assert!(!c.clear());
    }

    #[test]
    fn a_checkout_removes_the_ordered_quantities_once() {
        let mut c = Cart::default();
        c.set(p(1), q(5)).unwrap();
        c.set(p(2), q(1)).unwrap();
        let order = OrderId::new(77).unwrap();
        let bought = [
            NewLine {
                product_id: p(1),
                quantity: 3,
            },
            NewLine {
                product_id: p(2),
                quantity: 1,
            },
        ];
        assert!(c.check_out(order, &bought));
        assert_eq!(c.lines.into_iter().collect::<Vec<_>>(), vec![(p(1), 2)]);
        let mut again = Cart {
            checkouts: vec![order],
            ..Cart::default()
        };
        again.set(p(1), q(5)).unwrap();
        assert!(
            !again.check_out(order, &bought),
            "the same order removes nothing twice"
        );
        assert_eq!(again.lines[&p(1)], 5);
    }

    #[test]
    fn only_the_last_checkouts_are_kept() {
        let mut c = Cart::default();
        for i in 1..=20 {
            c.check_out(OrderId::new(i).unwrap(), &[]);
        }
        assert_eq!(c.checkouts.len(), KEPT_CHECKOUTS);
        assert_eq!(c.checkouts[0].get(), 20 - KEPT_CHECKOUTS as i64 + 1);
    }

    #[test]
    fn stored_form_round_trips() {
        let mut c = Cart::default();
        c.set(p(3), q(4)).unwrap();
        c.set(p(1), q(1)).unwrap();
        c.check_out(OrderId::new(9).unwrap(), &[]);
        assert_eq!(c.lines_json(), "[[1,1],[3,4]]");
        assert_eq!(Cart::from_stored(&c.lines_json(), &c.checkouts_text()), Some(c));
        assert_eq!(Cart::from_stored("[[1,0]]", ""), None);
        assert_eq!(Cart::from_stored("nope", ""), None);
    }
}
