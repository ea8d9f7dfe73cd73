//! The payment-timeout closer: unpaid orders past their payment deadline move to `closed`
//! (SPEC 0→4 on timeout) with the same compare-and-set as a cancel, so a payment racing it
//! has exactly one winner, and their stock goes back. The step's use case is
//! [`OrderService::close_expired_once`]; its loop is the sweeper's ([`super::sweeper::run`]),
//! which runs it after each sweep.

use chrono::{DateTime, Utc};

use crate::service::orders::OrderService;
use crate::service::sweeper::CloseOutcome;

/// One close step at `at`, at most `batch` orders per shard database, counted and logged.
/// A failure is logged; the next interval retries.
pub async fn step(service: &OrderService, at: DateTime<Utc>, batch: u32) {
    let closed = service.close_expired_once(at, batch).await;
    if let Ok(out) = &closed {
        count_close(out);
    }
    match closed {
        Ok(out) if out != CloseOutcome::default() => tracing::info!(?out, "closed expired orders"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "closing expired orders failed; retrying next interval"),
    }
}

/// Adds a close step to `orderly_closer_orders_total`.
fn count_close(out: &CloseOutcome) {
    for (outcome, n) in [
        ("closed", out.closed),
        ("raced", out.raced),
        ("failed", out.failed),
    ] {
        metrics::counter!("orderly_closer_orders_total", "outcome" => outcome).increment(n as u64);
    }
}
