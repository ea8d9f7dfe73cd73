//! Money: an integer number of minor units (fen, cents) and an ISO-4217 currency code.
//!
//! Amounts are never floats. Every sum and product is checked: an overflow is a refusal of
//! the input, never a wrapped number.

use std::fmt;

use serde::{Serialize, Serializer};

/// A non-negative amount in minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(i64);

/// The largest amount we accept anywhere: 10^15 minor units (10 trillion yuan). Far below
/// `i64::MAX`, so a sum of 100 lines of maximal amounts still cannot overflow storage.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000;

impl Money {
    pub const ZERO: Money = Money(0);

    pub fn new(minor: i64) -> Option<Self> {
        (0..=MAX_AMOUNT).contains(&minor).then_some(Money(minor))
    }

    pub fn minor(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).and_then(Money::new)
    }

    pub fn checked_mul(self, n: i64) -> Option<Money> {
        self.0.checked_mul(n).and_then(Money::new)
    }

    /// `self - other`, floored at zero (a discount never makes an amount negative).
    pub fn saturating_sub(self, other: Money) -> Money {
        Money((self.0 - other.0).max(0))
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(self.0)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An ISO-4217 code: three upper-case ASCII letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency([u8; 3]);

impl Currency {
    pub const CNY: Currency = Currency(*b"CNY");

    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        (b.len() == 3 && b.iter().all(|c| c.is_ascii_uppercase())).then(|| Currency([b[0], b[1], b[2]]))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII upper-case letters are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

impl Default for Currency {
    fn default() -> Self {
        Currency::CNY
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_bounded_and_checked() {
        assert!(Money::new(-1).is_none());
        assert!(Money::new(MAX_AMOUNT + 1).is_none());
        let m = Money::new(MAX_AMOUNT).unwrap();
        assert!(m.checked_add(Money::new(1).unwrap()).is_none());
        assert!(Money::new(i64::MAX / 2).is_none());
        assert!(Money::new(10).unwrap().checked_mul(i64::MAX).is_none());
        assert_eq!(
            Money::new(5).unwrap().saturating_sub(Money::new(9).unwrap()),
            Money::ZERO
        );
    }

    #[test]
    fn currency_codes() {
        assert_eq!(Currency::parse("USD").unwrap().as_str(), "USD");
        for bad in ["usd", "US", "USDX", "U$D", ""] {
            assert!(Currency::parse(bad).is_none(), "{bad}");
        }
    }
}
