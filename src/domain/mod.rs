//! The pure order domain: ids, shard routing, money, the status machine, request validation
//! and pricing. No I/O and no async here; everything above depends on this, it on nothing.

pub mod actor;
pub mod ids;
pub mod money;
pub mod order;
pub mod shard;
pub mod status;
