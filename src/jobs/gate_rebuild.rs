//! The flash gate rebuild: every live sale's gate in Redis is rebuilt from what the
//! database holds (the use case is [`FlashSales::rebuild_all_once`]; see
//! [`crate::service::flash`] for why the database is the truth and the gate its fast copy),
//! on start and every `flash.gate_rebuild_interval_secs`.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::service::flash::FlashSales;

/// Rebuilds every live sale's gate on start and every `flash.gate_rebuild_interval_secs`
/// until `shutdown` fires.
pub async fn run(sales: Arc<FlashSales>, shutdown: CancellationToken) {
    // At least a second: an interval of 0 in settings must not spin.
    let every = Duration::from_secs(sales.settings().gate_rebuild_interval_secs.max(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        step(&sales).await;
    }
}

/// One rebuild of every live sale's gate, logged. A failure is retried at the next interval.
pub async fn step(sales: &FlashSales) {
    match sales.rebuild_all_once().await {
        Ok(n) if n > 0 => tracing::debug!(gates = n, "flash gates rebuilt"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "flash gates not rebuilt; next interval"),
    }
}
