//! Background steps: the reservation sweeper and the payment-timeout closer.
//!
//! The sweeper gives stock and coupons back when a create died half-way or a close could not
//! finish its release. Two kinds of leftovers, both found by an index:
//! - claims still `reserved` and untouched for the grace period: if the order is on its
//!   shard the claim is confirmed, otherwise the reservation is returned (guarded by the
//!   claim's attempt token, so a create that touched it since is left alone);
//! - closed or invalidated orders still marked `release_pending`: the release is finished
//!   (exactly once, guarded by the claim state).
//!
//! The closer moves unpaid orders past their payment deadline to `closed` (SPEC 0→4 on
//! timeout) with the same compare-and-set as a cancel, so a payment racing it has exactly
//! one winner, and gives their stock back.
//!
//! [`OrderService::sweep_once`] and [`OrderService::close_expired_once`] are single steps
//! (tests call them directly with a chosen time); [`run`] loops until its token is
//! cancelled. A failure on one claim or shard is logged and the step goes on with the rest.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio_util::sync::CancellationToken;

use crate::domain::ids::OrderId;
use crate::domain::status::{Command, OrderStatus};
use crate::storage::commerce::{self, StaleClaim};
use crate::storage::orders::{self, StatusChange};
use crate::storage::shards::Shard;
use crate::storage::StorageError;

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
    /// Claims or shards that failed and are left for the next step.
    pub failed: usize,
}

/// What one payment-timeout step did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CloseOutcome {
    /// Unpaid orders past their deadline that were closed.
    pub closed: usize,
    /// Orders that changed under us (paid or cancelled meanwhile): left as they are.
    pub raced: usize,
    pub failed: usize,
}

impl OrderService {
    /// One sweep at time `at`: looks at claims untouched since `at - grace`, up to `batch`.
    pub async fn sweep_once(&self, at: DateTime<Utc>, grace: Duration, batch: u32) -> Result<SweepOutcome> {
        let before = at - TimeDelta::from_std(grace).unwrap_or(TimeDelta::zero());
        let mut out = SweepOutcome::default();
        for claim in commerce::stale_claims(self.commerce(), before, batch).await? {
            match self.settle_claim(claim).await {
                Ok(Settled::Confirmed) => out.confirmed += 1,
                Ok(Settled::Returned) => out.returned += 1,
                Ok(Settled::Untouched) => {}
                Err(e) => {
                    tracing::warn!(order_id = %claim.order_id, error = %e, "sweep: claim left for the next step");
                    out.failed += 1;
                }
            }
        }
        for shard in self.shards().all() {
            match self.finish_releases(shard, before, batch).await {
                Ok(n) => out.released += n,
                Err(e) => {
                    tracing::warn!(shard = %shard.index, error = %e, "sweep: shard left for the next step");
                    out.failed += 1;
                }
            }
        }
        Ok(out)
    }

    async fn settle_claim(&self, claim: StaleClaim) -> Result<Settled, StorageError> {
        let shard = self.shards().of_order(claim.order_id);
        let mut conn = self.shards().primary(shard).acquire().await?;
        if orders::request_hash_of(&mut conn, &shard.tables, claim.order_id)
            .await?
            .is_some()
        {
            commerce::confirm_claim(self.commerce(), claim.order_id).await?;
            return Ok(Settled::Confirmed);
        }
        let mut c = self.commerce().acquire().await?;
        if commerce::abandon_claim(&mut c, claim.order_id, claim.attempt, false, now()).await? {
            tracing::info!(order_id = %claim.order_id, "returned the reservation of an order that never appeared");
            return Ok(Settled::Returned);
        }
        Ok(Settled::Untouched)
    }

    async fn finish_releases(
        &self,
        shard: &Shard,
        before: DateTime<Utc>,
        batch: u32,
    ) -> Result<usize, StorageError> {
        let mut conn = self.shards().primary(shard).acquire().await?;
        let ids = orders::release_pending(&mut conn, &shard.tables, before, batch).await?;
        for &id in &ids {
            self.release_stock(&mut conn, shard, id).await;
        }
        Ok(ids.len())
    }

    /// Closes unpaid orders whose payment deadline is before `at`, up to `batch` per shard.
    pub async fn close_expired_once(&self, at: DateTime<Utc>, batch: u32) -> Result<CloseOutcome> {
        let mut out = CloseOutcome::default();
        for shard in self.shards().all() {
            if let Err(e) = self.close_expired_in(shard, at, batch, &mut out).await {
                tracing::warn!(shard = %shard.index, error = %e, "close expired: shard left for the next step");
                out.failed += 1;
            }
        }
        Ok(out)
    }

    async fn close_expired_in(
        &self,
        shard: &Shard,
        at: DateTime<Utc>,
        batch: u32,
        out: &mut CloseOutcome,
    ) -> Result<(), StorageError> {
        let mut conn = self.shards().primary(shard).acquire().await?;
        let expired: Vec<(OrderId, i64)> =
            orders::expired_unpaid(&mut conn, &shard.tables, at, batch).await?;
        let to = crate::domain::status::transition(OrderStatus::PendingPayment, Command::TimeoutClose)
            .unwrap_or(OrderStatus::Closed);
        let change = StatusChange {
            close_reason: Some("payment timeout".into()),
            ..Default::default()
        };
        for (id, version) in expired {
            let won = orders::cas_status(
                &mut conn,
                &shard.tables,
                id,
                version,
                OrderStatus::PendingPayment,
                to,
                &change,
                now(),
            )
            .await?;
            if won {
                self.release_stock(&mut conn, shard, id).await;
                out.closed += 1;
            } else {
                out.raced += 1;
            }
        }
        Ok(())
    }
}

enum Settled {
    Confirmed,
    Returned,
    Untouched,
}

/// Sweeps and closes expired orders every `interval` until `shutdown` fires; stops between
/// steps.
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
        if shutdown.is_cancelled() {
            return;
        }
        match service.close_expired_once(Utc::now(), batch).await {
            Ok(out) if out != CloseOutcome::default() => tracing::info!(?out, "closed expired orders"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "closing expired orders failed; retrying next interval"),
        }
    }
}
