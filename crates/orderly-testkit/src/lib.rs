//! orderly-testkit: everything around the service that is not the service, kept out of the
//! `orderly` crate so the server binary ships only the product.
//!
//! # Layout, in reading order
//! - [`cluster`] — a throwaway local cluster (MariaDB with GTID replicas, Redis, NATS) from
//!   the binaries on PATH; servers never outlive their owner.
//! - [`stack`] — the one start-up sequence: cluster, databases, settings, migrations, used by
//!   the tests, the playground and every bench.
//! - [`raw`] — raw SQL of the harness's own (its own pools, from the settings' URLs): the
//!   benches' raw baselines and the tests' row checks, never the service's internals.
//! - [`fixtures`] — data the API cannot write (old orders).
//! - [`test_app`] — `TestApp`: a service bound on port 0 over its own databases and Redis key
//!   prefix, with typed helpers; the cluster shared by a test binary.
//! - [`playground`] — `orderly-dev playground` (`cargo playground`).
//! - [`bench`] — `orderly-dev bench`, `bench-events`, `bench-archive`: load scenarios with raw
//!   baselines and correctness checks.

pub mod bench;
pub mod cluster;
pub mod fixtures;
pub mod playground;
pub mod raw;
pub mod stack;
pub mod test_app;
