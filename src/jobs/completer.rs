//! The completer: shipped orders whose shipment is older than `orders.auto_complete_days`
//! move to `completed` (SPEC 2→3, "auto-confirmed") with the same compare-and-set as a
//! buyer's confirm, so a buyer confirming at the same moment, or another process running
//! the same step, has exactly one winner, and the loser counts as `raced`. The step's use
//! case is [`OrderService::complete_shipped_once`]; its loop is the sweeper's
//! ([`super::sweeper::run`]), which runs it after each close step.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::service::orders::OrderService;
use crate::service::sweeper::CompleteOutcome;

/// One completer step at `at` for orders shipped more than `auto_complete` before it, at
/// most `batch` per shard database, counted and logged. A failure is logged; the next
/// interval retries.
pub async fn step(service: &OrderService, at: DateTime<Utc>, auto_complete: Duration, batch: u32) {
    let completed = service.complete_shipped_once(at, auto_complete, batch).await;
    if let Ok(out) = &completed {
        count_complete(out);
    }
    match completed {
        Ok(out) if out != CompleteOutcome::default() => tracing::info!(?out, "completed shipped orders"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "completing shipped orders failed; retrying next interval"),
    }
}

/// Adds a completer step to `orderly_completer_orders_total`.
fn count_complete(out: &CompleteOutcome) {
    for (outcome, n) in [
        ("completed", out.completed),
        ("raced", out.raced),
        ("failed", out.failed),
    ] {
        metrics::counter!("orderly_completer_orders_total", "outcome" => outcome).increment(n as u64);
    }
}
