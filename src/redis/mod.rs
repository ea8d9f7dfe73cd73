//! Redis: one shared connection, and the three things orderly keeps there, side by side.
//!
//! - [`conn`]: [`Redis`], the connection handle the three share: the multiplexed connection
//!   and the run tag of its server, per-call timeouts, one circuit breaker ([`breaker`]), the
//!   key prefix, and the scripts every new connection loads.
//! - [`cache`]: the cache-aside entries of orders, user profiles and first pages, never
//!   behind a committed write ([`cache::Cache`], what the services read through).
//! - [`gate`]: the flash-sale gate ([`gate::FlashGate`]), which answers most buyers of a
//!   sold-out sale without MySQL.
//! - [`cart`]: the cart store ([`cart::CartStore`]), carts written behind to MySQL.
//!
//! # Keys
//! Every key starts with the configured prefix and carries a hash tag, so that every script
//! touches the keys of one tag only (Redis Cluster ready). Each family's table is in its
//! module: `{o:…}` and `{u:…}` in [`cache`]'s, `{fs:…}` in [`gate`], `{ct:…}` in [`cart`].
//!
//! None of the three exists with `[cache] enabled = false`: no cache (reads go to MySQL), no
//! gate (the database decides every flash order), carts in MySQL only.

mod breaker;
pub mod cache;
pub mod cart;
mod conn;
pub mod gate;

use redis::{Cmd, Script};

pub use self::conn::{Redis, TAG_LEN};

/// Every script of the three users, loaded on each new connection before it is used.
fn scripts() -> impl Iterator<Item = &'static str> {
    cache::SCRIPTS
        .iter()
        .chain(gate::SCRIPTS.iter())
        .chain(cart::SCRIPTS.iter())
        .copied()
}

/// `EVALSHA` of a script loaded when the connection was made; arguments follow.
fn evalsha(script: &Script, keys: &[&str]) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len());
    for k in keys {
        cmd.arg(*k);
    }
    cmd
}
