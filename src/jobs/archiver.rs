//! `serve`'s background archiver (`archive.run_in_serve`): a pass every
//! `archive.interval_secs` moves old final orders from the shards into the archive. The pass
//! itself ([`Archiver::pass`], also run by `orderly archive`) is
//! [`crate::service::archive`]'s; this is its loop.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::service::archive::{Archiver, PassOptions};

/// A pass with the settings' defaults every `archive.interval_secs`, until `shutdown`.
/// Shards another process is archiving are skipped (their lock is taken); a failed pass is
/// logged and retried at the next interval.
pub async fn run(archiver: Archiver, shutdown: CancellationToken) {
    let interval = Duration::from_secs(archiver.settings().interval_secs);
    let opts = PassOptions {
        stop: shutdown.clone(),
        ..PassOptions::from_settings(archiver.settings())
    };
    while !shutdown.is_cancelled() {
        step(&archiver, &opts).await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// One pass, logged. The pass stops between two batches at `opts.stop`: never in the middle
/// of one.
pub async fn step(archiver: &Archiver, opts: &PassOptions) {
    match archiver.pass(opts).await {
        Ok(s) => tracing::info!(
            moved = s.moved(),
            bytes = s.bytes(),
            elapsed_ms = s.elapsed.as_millis() as u64,
            "archive pass"
        ),
        Err(e) => tracing::warn!(error = %e, "archive pass failed; retrying at the next interval"),
    }
}
