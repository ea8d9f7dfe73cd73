//! The reservation sweeper's loop: settles stale claims and finishes releases (the use case
//! is [`OrderService::sweep_once`], see [`crate::service::sweeper`] for the void handshake),
//! then runs the [closer](super::closer) and the [completer](super::completer) steps, every
//! `sweeper.interval_secs`, until the shutdown token fires.
//!
//! The three share one loop and one task, in this order: a sweep that catches up delays the
//! other two by at most one interval, and `serve`'s shutdown waits for (or, past the grace
//! period, aborts) that one task.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::service::orders::OrderService;
use crate::service::sweeper::SweepOutcome;

/// The pause between two batches of one sweep that is catching up. A batch takes a few
/// milliseconds per database; with this pause the sweeper settles up to ten batches (5 000
/// claims at the default batch size) a second, above any create rate one service process
/// reaches, while leaving the databases to live requests most of the time. Without it, a
/// backlog (after a restart, or the first grace period of a load) was worked off in one
/// burst that doubled the latency of the requests running beside it.
const CATCH_UP_PAUSE: Duration = Duration::from_millis(100);

/// Sweeps, closes expired orders and completes orders shipped more than `auto_complete`
/// ago, every `interval` until `shutdown` fires.
///
/// Creates leave their claims for the sweeper to confirm, so under load a step finds a full
/// batch: the sweep repeats, after a short pause (`CATCH_UP_PAUSE`), while its batches come
/// back full and make progress, for up to one interval, so the sweeper keeps up with the
/// create rate. Shutdown stops a step between its writes: each order's move runs to its end
/// (commit, cache notice, stock) on a write task that `serve` waits for.
pub async fn run(
    service: OrderService,
    grace: Duration,
    auto_complete: Duration,
    interval: Duration,
    batch: u32,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if !catch_up(&service, grace, interval, batch, &shutdown).await {
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = super::closer::step(&service, service.clock().now(), batch) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = super::completer::step(&service, service.clock().now(), auto_complete, batch) => {}
        }
    }
}

/// Sweeps while the batches come back full and make progress, for up to `interval`, with
/// [`CATCH_UP_PAUSE`] between two batches. `false`: the token fired.
async fn catch_up(
    service: &OrderService,
    grace: Duration,
    interval: Duration,
    batch: u32,
    shutdown: &CancellationToken,
) -> bool {
    let busy_until = tokio::time::Instant::now() + interval;
    loop {
        let step = tokio::select! {
            _ = shutdown.cancelled() => return false,
            step = step(service, grace, batch) => step,
        };
        let Some(out) = step else {
            return true;
        };
        let full = out.examined >= batch as usize && out.confirmed + out.returned > 0;
        if !full || tokio::time::Instant::now() >= busy_until {
            return true;
        }
        // A breath between batches so that catching up never crowds out live requests.
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(CATCH_UP_PAUSE) => {}
        }
    }
}

/// One sweep step now, for claims untouched for `grace`, counted and logged. `None`: it
/// failed (logged; the next interval retries).
pub async fn step(service: &OrderService, grace: Duration, batch: u32) -> Option<SweepOutcome> {
    match service.sweep_once(service.clock().now(), grace, batch).await {
        Ok(out) => {
            count_sweep(&out);
            if out != SweepOutcome::default() {
                tracing::info!(?out, "sweep");
            }
            Some(out)
        }
        Err(e) => {
            tracing::warn!(error = %e, "sweep failed; retrying next interval");
            None
        }
    }
}

/// Adds a sweep step to `orderly_sweeper_claims_total` (zeros too, so every series exists
/// from the first step on).
fn count_sweep(out: &SweepOutcome) {
    for (outcome, n) in [
        ("confirmed", out.confirmed),
        ("returned", out.returned),
        ("released", out.released),
        ("failed", out.failed),
    ] {
        metrics::counter!("orderly_sweeper_claims_total", "outcome" => outcome).increment(n as u64);
    }
}
