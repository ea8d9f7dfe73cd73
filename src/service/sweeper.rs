//! The reservation sweeper: gives stock and coupons back when a create died half-way or a
//! close could not finish its release.
//!
//! Two kinds of leftovers, both found by an index:
//! - claims still `reserved` and untouched for the grace period: if the order is on its
//!   shard the claim is confirmed, otherwise the reservation is returned (guarded by the
//!   claim's attempt token, so a create that touched it since is left alone);
//! - closed or invalidated orders still marked `release_pending`: the release is finished
//!   (exactly once, guarded by the claim state).
//!
//! [`OrderService::sweep_once`] is one step (tests call it directly); [`run`] loops until its
//! token is cancelled.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio_util::sync::CancellationToken;

use crate::storage::{commerce, orders, StorageError};

use super::orders::{now, OrderService};
use super::Result;

/// What one sweep step did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepOutcome {
    /// Claims whose order was found and which are now confirmed.
    pub confirmed: usize,
    /// Reservations of orders that never appeared, given back.
    pub returned: usize,
    /// Closed or invalidated orders whose stock release was finished.
    pub released: usize,
}

impl OrderService {
    /// One sweep at time `at`: looks at claims untouched since `at - grace`, up to `batch`.
    pub async fn sweep_once(&self, at: DateTime<Utc>, grace: Duration, batch: u32) -> Result<SweepOutcome> {
        let before = at - TimeDelta::from_std(grace).unwrap_or(TimeDelta::zero());
        let mut out = SweepOutcome::default();
        for claim in commerce::stale_claims(self.commerce(), before, batch).await? {
            let shard = self.shards().of_order(claim.order_id);
            let mut conn = self
                .shards()
                .primary(shard)
                .acquire()
                .await
                .map_err(StorageError::from)?;
            if orders::request_hash_of(&mut conn, &shard.tables, claim.order_id)
                .await?
                .is_some()
            {
                commerce::confirm_claim(self.commerce(), claim.order_id).await?;
                out.confirmed += 1;
                continue;
            }
            let mut c = self.commerce().acquire().await.map_err(StorageError::from)?;
            if commerce::abandon_claim(&mut c, claim.order_id, claim.attempt, now()).await? {
                tracing::info!(order_id = %claim.order_id, "returned the reservation of an order that never appeared");
                out.returned += 1;
            }
        }
        for shard in self.shards().all() {
            let mut conn = self
                .shards()
                .primary(shard)
                .acquire()
                .await
                .map_err(StorageError::from)?;
            for id in orders::release_pending(&mut conn, &shard.tables, before, batch).await? {
                self.release_stock(&mut conn, shard, id).await;
                out.released += 1;
            }
        }
        Ok(out)
    }
}

/// Sweeps every `interval` until `shutdown` fires; stops between steps.
pub async fn run(
    service: OrderService,
    grace: Duration,
    interval: Duration,
    batch: u32,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        match service.sweep_once(Utc::now(), grace, batch).await {
            Ok(out) if out != SweepOutcome::default() => tracing::info!(?out, "sweep"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweep failed; retrying next interval"),
        }
    }
}
