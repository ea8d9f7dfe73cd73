//! The cart flusher: writes the dirty carts from Redis to MySQL (the use case is
//! [`CartService::flush_once`]; see [`crate::service::cart`] for the loss window and what a
//! flush guarantees), every `cart.loss_window_ms`, in every `serve` process.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::service::cart::CartService;

/// A flush every `cart.loss_window_ms` until `shutdown`, and one last flush then, so that a
/// graceful stop loses no cart change. Without Redis there is nothing to flush (carts live
/// in MySQL only) and the loop ends at once.
pub async fn run(carts: Arc<CartService>, shutdown: CancellationToken) {
    if !carts.has_redis() {
        return;
    }
    // The loss window is the flush interval: a Redis crash loses at most one of them. A
    // flush slower than that delays the next rather than piling ticks up.
    let mut tick = tokio::time::interval(Duration::from_millis(carts.settings().loss_window_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stop = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tick.tick() => false,
        };
        step(&carts).await;
        if stop {
            return;
        }
    }
}

/// One flush, logged. An error leaves the carts dirty for the next.
pub async fn step(carts: &CartService) {
    match carts.flush_once().await {
        Ok(out) if out.rounds > 0 => tracing::debug!(?out, "carts flushed"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cart flush failed; the carts stay dirty"),
    }
}
