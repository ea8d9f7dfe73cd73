//! orderly: an e-commerce order service on sharded MariaDB and Redis.
//!
//! # Layout, in reading order
//! - [`domain`] — the pure order domain — ids and their layout, shard routing, money, the
//!   status machine, request validation and pricing, the payment and refund rules, who may
//!   see what. No I/O.
//! - [`clock`] — the time services read: the system's, or a manual one tests set and move.
//! - [`config`] — settings from `config.default.toml`, a user file and `ORDERLY_*` variables.
//! - [`storage`] — MariaDB: the shard map (each database with its read replicas), the schema,
//!   the SQL of order shards, commerce, flash sales and the archive, and the pool guard (no
//!   connection goes back to a pool inside a transaction). `storage/orders/commit.rs` is the
//!   one door: the only file that writes an order row or an order event (`tests/one_door.rs`
//!   fails on any other).
//! - [`redis`] — one shared connection (run tag, timeouts, circuit breaker, key prefix,
//!   scripts) and, beside each other over it: [`redis::cache`], cache-aside for orders, user
//!   profiles and first pages, never behind a committed write (a disabled variant when
//!   `[cache] enabled = false`); [`redis::gate`], the flash-sale gate; [`redis::cart`], the
//!   cart store.
//! - [`lease`] — worker-id leases in the commerce database: processes never share an id space.
//! - [`events`] — the order event stream: the outbox relay to NATS JetStream (one active
//!   relay per shard database), durable consumers and the read models they feed (the
//!   merchant copy by shop, its reports), rebuilds from the shards.
//! - [`service`] — the use cases — create exactly once, the life cycle, reads that respect
//!   their consistency (replicas, read-your-writes watermarks), flash sales behind a Redis
//!   gate, the catalog, the cart (Redis write-behind, read back from MySQL, checkout), the
//!   single steps of the background work (`sweep_once`, `close_expired_once`, …), and the
//!   archiver's pass that moves old final orders out of the hot shards.
//! - [`jobs`] — the background loops, each a step plus a loop that stops at the shutdown
//!   token: sweeper, payment-timeout closer, completer, cart flusher, flash gate rebuild,
//!   archiver, worker-id lease keeper.
//! - [`search`] — order search: an embedded tantivy index of every order's latest version
//!   behind one small trait, fed by the stream (consumer `search`), read by the search route.
//! - [`http`] — the JSON API on axum, auth, and problem responses. Every write runs to
//!   completion on a tracked task of its own, whatever happens to its request. Every request
//!   gets an id, a span and its metrics; per-user rate limits and an in-flight bound guard
//!   the edge. The OpenAPI document (`GET /openapi.json`) is generated from the same route
//!   lists the router is built from.
//! - [`app`] — `Application::build` and `run`, wiring it all together.
//! - [`telemetry`] — logs (JSON for `serve`, text elsewhere) and the Prometheus recorder
//!   behind `GET /metrics`, with every metric series described in one place.
//!
//! The local cluster, the test harness, the playground and the benches live in the
//! `orderly-testkit` crate (`crates/orderly-testkit`), not here.

/// `fail::fail_point!` with the feature `failpoints` (the crash tests drive these); without
/// it, nothing: the `fail` crate is then not even a dependency. Defined before the modules,
/// so every module can use it as `fail_point!`.
#[cfg(feature = "failpoints")]
macro_rules! fail_point {
    ($($t:tt)*) => {
        fail::fail_point!($($t)*)
    };
}
#[cfg(not(feature = "failpoints"))]
macro_rules! fail_point {
    ($($t:tt)*) => {};
}

pub mod app;
pub mod clock;
pub mod config;
pub mod domain;
pub mod events;
pub mod http;
pub mod jobs;
pub mod lease;
pub mod redis;
pub mod search;
pub mod service;
pub mod storage;
pub mod telemetry;
