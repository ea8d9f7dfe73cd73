//! SQL of the commerce database, one concern per file:
//! - [`catalog`]: users, shops, products and coupons;
//! - [`claims`]: the claim and stock reservations each order id takes before its order is
//!   written, and their confirmation, release and give-back (reserving exactly once, a
//!   claim's life, units held by unpaid orders: see its docs);
//! - [`payment_numbers`]: transaction numbers claimed once across shards.
//!
//! The paths of the items stay `storage::commerce::…` through the re-exports below.

mod catalog;
mod claims;
mod payment_numbers;

pub use catalog::*;
pub use claims::*;
pub use payment_numbers::*;
