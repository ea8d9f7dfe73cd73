//! The worker-id lease keeper: renews this process's lease every third of its TTL, stops
//! issuing ids at once when the row is lost and takes the same row back when it is free,
//! and at shutdown closes the id source and releases the row with the exact floor for the
//! next holder. The lease itself (its SQL, the deadlines on two clocks, the floor) is
//! [`crate::lease`]'s; this is its loop.

use crate::storage::Db;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::lease::{take_worker, IdSource, Lease, LeaseError};

/// How long the release at shutdown may take; after that the row simply expires.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Leases a free worker id (a random one of the free rows) in the commerce database `pool`
/// and keeps it renewed until `shutdown`, then releases it. The keeper is the returned task.
pub async fn lease_worker(
    pool: Db,
    ttl: Duration,
    shutdown: CancellationToken,
) -> Result<(Arc<IdSource>, JoinHandle<()>), LeaseError> {
    let (source, lease) = take_worker(pool, ttl).await?;
    let keeper = tokio::spawn(run(lease, source.clone(), shutdown));
    Ok((source, keeper))
}

/// Renews every third of the TTL (a renewal may then fail twice before the hold ends);
/// takes the same row back after a loss; releases on shutdown.
pub async fn run(lease: Lease, source: Arc<IdSource>, shutdown: CancellationToken) {
    let mut held = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(lease.ttl() / 3) => {}
        }
        held = step(&lease, &source, held).await;
    }
    release(&lease, &source).await;
}

/// One step: renew while `held`, else try to take the row back. Answers whether the lease
/// is held after it.
pub async fn step(lease: &Lease, source: &IdSource, held: bool) -> bool {
    let worker = lease.worker();
    if held {
        // A renewal slower than the TTL is useless: the deadline it would set has passed.
        match tokio::time::timeout(lease.ttl(), lease.renew_for(source)).await {
            Ok(Ok(true)) => return true,
            Ok(Ok(false)) => {
                tracing::error!(worker, "worker-id lease lost; not issuing ids");
            }
            Ok(Err(e)) => {
                tracing::warn!(worker, error = %e, "cannot renew the worker-id lease");
                return true;
            }
            Err(_) => {
                tracing::warn!(worker, "renewing the worker-id lease timed out");
                return true;
            }
        }
    }
    // Not held: take the same row back if it is free.
    match tokio::time::timeout(lease.ttl(), lease.take_back(source)).await {
        Ok(Ok(true)) => {
            tracing::warn!(worker, "worker-id lease taken back; issuing ids again");
            true
        }
        Ok(Ok(false)) => {
            tracing::error!(
                worker,
                "worker id is held by another process or its lease row is gone; not issuing ids"
            );
            false
        }
        Ok(Err(e)) => {
            tracing::warn!(worker, error = %e, "cannot take the worker id back");
            false
        }
        Err(_) => {
            tracing::warn!(worker, "taking the worker id back timed out");
            false
        }
    }
}

/// Shutdown: no id after the source closes, then the next holder's floor is exactly our last
/// id.
async fn release(lease: &Lease, source: &IdSource) {
    let worker = lease.worker();
    let issued_below = lease.close(source);
    match tokio::time::timeout(RELEASE_TIMEOUT, lease.release(issued_below)).await {
        Ok(Ok(true)) => tracing::info!(worker, issued_below, "released worker id"),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => {
            tracing::warn!(worker, error = %e, "cannot release the worker id; it expires")
        }
        Err(_) => tracing::warn!(worker, "releasing the worker id timed out; it expires"),
    }
}
