//! Worker-id leases in Redis: two live processes never share a worker id.
//!
//! A process claims `{prefix}worker:{n}` with `SET NX PX ttl` for the first free `n` in
//! `0..64` and renews it every third of the TTL with a compare-and-extend script (only the
//! holder's token extends it). If a renewal finds the lease gone or taken (Redis lost it, the
//! process was paused past the TTL), the id source stops issuing ids — answering 503 is
//! better than risking a duplicate — until it holds a lease again. The id source checks a
//! deadline on every id: the time the last successful renewal *started* plus the TTL, so
//! even a keeper stuck on a slow Redis never issues an id under an expired lease.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;

use crate::domain::ids::{Clock, IdError, IdGenerator, OrderId, SystemClock, UserId, WorkerId, MAX_WORKERS};

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("all {MAX_WORKERS} worker ids are leased by live processes")]
    Exhausted,
}

/// Extends the lease only if we still hold it.
const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                       return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
/// Deletes the lease only if we still hold it.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                         return redis.call('DEL', KEYS[1]) else return 0 end";

/// The id generator of this process, usable only while its worker id is held.
pub struct IdSource {
    generator: IdGenerator,
    /// Wall-clock ms until which the worker id is surely ours (`i64::MAX` when fixed).
    valid_until_ms: AtomicI64,
}

#[derive(Debug, thiserror::Error)]
pub enum IdSourceError {
    #[error("this process's worker-id lease is lost; not issuing ids until it is back")]
    LeaseLost,
    #[error(transparent)]
    Clock(#[from] IdError),
}

impl IdSource {
    /// A source with a fixed worker id from settings (no lease).
    pub fn fixed(worker: WorkerId) -> Arc<IdSource> {
        Arc::new(IdSource {
            generator: IdGenerator::new(worker),
            valid_until_ms: AtomicI64::new(i64::MAX),
        })
    }

    pub fn worker(&self) -> WorkerId {
        self.generator.worker()
    }

    pub fn next_for(&self, user: UserId) -> Result<OrderId, IdSourceError> {
        if SystemClock.now_ms() >= self.valid_until_ms.load(Ordering::Acquire) {
            return Err(IdSourceError::LeaseLost);
        }
        Ok(self.generator.next_for(user)?)
    }
}

fn key(prefix: &str, w: u16) -> String {
    format!("{prefix}worker:{w}")
}

/// Leases the first free worker id and keeps it renewed until `shutdown`, then releases it.
pub async fn lease_worker(
    mut redis: ConnectionManager,
    prefix: String,
    ttl: Duration,
    shutdown: CancellationToken,
) -> Result<(Arc<IdSource>, tokio::task::JoinHandle<()>), LeaseError> {
    let token = uuid::Uuid::new_v4().to_string();
    let ttl_ms = ttl.as_millis() as u64;
    let started = SystemClock.now_ms();
    let start: u16 = rand::random::<u16>() % MAX_WORKERS;
    let mut held = None;
    for i in 0..MAX_WORKERS {
        let w = (start + i) % MAX_WORKERS;
        let ok: Option<String> = redis::cmd("SET")
            .arg(key(&prefix, w))
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut redis)
            .await?;
        if ok.is_some() {
            held = Some(w);
            break;
        }
    }
    let w = held.ok_or(LeaseError::Exhausted)?;
    let worker = WorkerId::new(w).ok_or(LeaseError::Exhausted)?;
    tracing::info!(worker = w, "leased worker id");
    let source = Arc::new(IdSource {
        generator: IdGenerator::new(worker),
        valid_until_ms: AtomicI64::new(started + ttl_ms as i64),
    });
    let keeper = tokio::spawn(keep(redis, key(&prefix, w), token, ttl, source.clone(), shutdown));
    Ok((source, keeper))
}

async fn keep(
    mut redis: ConnectionManager,
    key: String,
    token: String,
    ttl: Duration,
    source: Arc<IdSource>,
    shutdown: CancellationToken,
) {
    let ttl_ms = ttl.as_millis() as u64;
    let renew = redis::Script::new(RENEW);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        let started = SystemClock.now_ms();
        let extended: Result<i64, _> = renew
            .key(&key)
            .arg(&token)
            .arg(ttl_ms)
            .invoke_async(&mut redis)
            .await;
        let held = match extended {
            Ok(1) => true,
            Ok(_) => {
                // Gone: take it back if it is free, otherwise stay invalid.
                let again: Result<Option<String>, _> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async(&mut redis)
                    .await;
                matches!(again, Ok(Some(_)))
            }
            // Redis unreachable: the deadline of the last renewal stands.
            Err(e) => {
                tracing::warn!(%key, error = %e, "cannot renew the worker-id lease");
                continue;
            }
        };
        let until = if held { started + ttl_ms as i64 } else { 0 };
        let before = source.valid_until_ms.swap(until, Ordering::AcqRel);
        if (before > 0) != held {
            tracing::warn!(%key, held, "worker-id lease changed");
        }
    }
    let _: Result<i64, _> = redis::Script::new(RELEASE)
        .key(&key)
        .arg(&token)
        .invoke_async(&mut redis)
        .await;
}
