//! The pure order domain: ids, shard routing, money, the status machine, request validation,
//! pricing, the payment/refund rule and read consistency (GTID watermarks). No I/O and no
//! async here; everything above depends on this, it on nothing.

pub mod actor;
pub mod cart;
pub mod consistency;
pub mod events;
pub mod flash;
pub mod ids;
pub mod money;
pub mod order;
pub mod patch_rules;
pub mod payment_rules;
pub mod shard;
pub mod status;
pub mod user;
