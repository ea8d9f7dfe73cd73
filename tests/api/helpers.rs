//! The test harness lives in the testkit ([`orderly_testkit::test_app`]): one local cluster
//! per test binary, and a `TestApp` per test with its own databases, Redis key prefix and
//! server bound on port 0.

pub use orderly_testkit::test_app::*;
