//! Worker-id leases in the commerce database: two live processes never share a worker id,
//! and a new holder of a worker id never issues an id at or below one of an earlier holder.
//!
//! The table `worker_leases` (commerce migration v2, see its comment) has one row per worker
//! id, seeded once. Rows are never inserted here:
//!
//! - **Take**: one `UPDATE` of an expired row (`expires_at < NOW(6)`, the database's clock, so
//!   the skew of our clock does not matter) that sets our random `holder` token, `expires_at =
//!   NOW(6) + ttl` and `generation + 1`. `rows_affected == 1` means it is ours. (`NOW(6)` is
//!   in the session time zone, UTC on every sqlx connection, so all holders compare in one
//!   clock.) Candidates are the expired rows, tried from a random one on; the `UPDATE` also
//!   requires the `generation` and `issued_below_ms` we read, so the floor we read is the
//!   floor we got. A row that vanished is a worker id nobody can take (never one two
//!   processes share).
//! - **Local deadline**: our local time when the take or renewal was *sent*, plus the TTL.
//!   The database's expiry is set after that moment, so it is always later in real time: we
//!   stop issuing before anybody else can take the row. The id generator refuses every id
//!   whose millisecond is at or past the deadline (`IdSourceError::LeaseLost`, a 503). The
//!   same deadline is also kept on the monotonic clock, so a wall clock that steps back
//!   while renewals fail cannot stretch the hold past the database's expiry.
//! - **Floor**: `issued_below_ms` is the bound under which the holder may have issued ids.
//!   The take and every renewal raise it to the new deadline *before* we may issue under it;
//!   a clean release lowers it to our last issued millisecond + 1. A new holder reads it as
//!   the floor of its generator, so a clock stepped back across a restart is refused like a
//!   step back within one process.
//! - **Renew** every third of the TTL (`WHERE worker_id = ? AND holder = ?`), by
//!   [`crate::jobs::lease_keeper`]. If the row is no longer ours (expired and taken, or
//!   deleted) the source stops issuing at once and tries to take back the *same* worker id
//!   whenever it is free (the generator keeps its worker id for life, so it can never mix
//!   two); until then ids answer 503 and an error is logged. A
//!   renewal that fails on a database error leaves the deadline of the last success standing.
//! - **Release** on shutdown: first close the generator (no id after this), then give the row
//!   back with `expires_at` in the past and the exact floor for the next holder.
//!
//! Redis plays no part: its outage cannot stop ids or creates.

use crate::storage::Db;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use sqlx::Row;

use crate::domain::ids::{Clock, IdError, IdGenerator, OrderId, SystemClock, UserId, WorkerId, MAX_WORKERS};

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("no free worker id: all {MAX_WORKERS} are leased by live processes (or their rows are gone)")]
    Exhausted,
}

/// The id generator of this process, usable only while its worker id is held.
pub struct IdSource {
    generator: IdGenerator,
    /// The lease deadline on the monotonic clock, in nanoseconds after `base`
    /// (`u64::MAX` for a fixed worker id, 0 when not held).
    base: Instant,
    mono_until_ns: AtomicU64,
}

/// Until when a take or renewal holds the row, on both clocks, from the moment it was sent.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    wall_ms: i64,
    mono: Instant,
}

impl Deadline {
    fn from_now(ttl: Duration) -> Deadline {
        Deadline {
            wall_ms: SystemClock.now_ms() + ttl.as_millis() as i64,
            mono: Instant::now() + ttl,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdSourceError {
    #[error("this process's worker-id lease is lost; not issuing ids until it is back")]
    LeaseLost,
    #[error(transparent)]
    Clock(IdError),
}

impl From<IdError> for IdSourceError {
    fn from(e: IdError) -> Self {
        match e {
            IdError::NotHeld => IdSourceError::LeaseLost,
            e => IdSourceError::Clock(e),
        }
    }
}

impl IdSource {
    /// A source with a fixed worker id from settings (no lease, no deadline).
    pub fn fixed(worker: WorkerId) -> Arc<IdSource> {
        Arc::new(IdSource {
            generator: IdGenerator::new(worker),
            base: Instant::now(),
            mono_until_ns: AtomicU64::new(u64::MAX),
        })
    }

    fn leased(generator: IdGenerator) -> IdSource {
        IdSource {
            generator,
            base: Instant::now(),
            mono_until_ns: AtomicU64::new(0),
        }
    }

    fn hold_until(&self, d: Deadline) {
        let ns = d.mono.saturating_duration_since(self.base).as_nanos();
        self.mono_until_ns
            .store(u64::try_from(ns).unwrap_or(u64::MAX), Ordering::Release);
        self.generator.set_until(d.wall_ms);
    }

    fn stop(&self) {
        self.generator.set_until(i64::MIN);
        self.mono_until_ns.store(0, Ordering::Release);
    }

    pub fn worker(&self) -> WorkerId {
        self.generator.worker()
    }

    pub fn next_for(&self, user: UserId) -> Result<OrderId, IdSourceError> {
        if !self.is_held() {
            return Err(IdSourceError::LeaseLost);
        }
        Ok(self.generator.next_for(user)?)
    }

    /// Whether the worker id is held now (always, for a fixed one): ids can be issued. What
    /// `orderly_lease_valid` and the readiness check `lease` report.
    pub fn is_held(&self) -> bool {
        let elapsed = self.base.elapsed().as_nanos();
        u64::try_from(elapsed).unwrap_or(u64::MAX) < self.mono_until_ns.load(Ordering::Acquire)
    }
}

/// A few rounds of "list the free rows, try to take one": another process starting at the
/// same moment may take the row we picked; more rounds than this means there is none left.
const TAKE_ROUNDS: usize = 3;
/// `expires_at` of a released row: long past in any clock (the seed uses the same).
const RELEASED_AT: &str = "1970-01-01 00:00:01";

/// One row that was free when we looked.
#[derive(Debug, Clone, Copy)]
struct Free {
    worker: u16,
    issued_below_ms: i64,
    generation: i64,
}

/// Our hold on one row of `worker_leases`.
pub struct Lease {
    pool: Db,
    worker: u16,
    holder: String,
    ttl: Duration,
}

impl Lease {
    fn ttl_us(&self) -> i64 {
        self.ttl.as_micros() as i64
    }

    /// Takes `free` if it is still as we saw it. Returns the local deadline.
    async fn take(&self, free: Free) -> Result<Option<Deadline>, sqlx::Error> {
        let deadline = Deadline::from_now(self.ttl);
        let done = sqlx::query(
            "UPDATE worker_leases
             SET holder = ?, expires_at = NOW(6) + INTERVAL ? MICROSECOND,
                 generation = generation + 1, issued_below_ms = GREATEST(issued_below_ms, ?),
                 updated_at = NOW(6)
             WHERE worker_id = ? AND expires_at < NOW(6) AND generation = ? AND issued_below_ms = ?",
        )
        .bind(&self.holder)
        .bind(self.ttl_us())
        .bind(deadline.wall_ms)
        .bind(free.worker)
        .bind(free.generation)
        .bind(free.issued_below_ms)
        .execute(&self.pool)
        .await?;
        Ok((done.rows_affected() == 1).then_some(deadline))
    }

    /// Extends our hold. `None`: the row is not ours any more (or is gone).
    async fn renew(&self) -> Result<Option<Deadline>, sqlx::Error> {
        let deadline = Deadline::from_now(self.ttl);
        let done = sqlx::query(
            "UPDATE worker_leases
             SET expires_at = NOW(6) + INTERVAL ? MICROSECOND,
                 issued_below_ms = GREATEST(issued_below_ms, ?), updated_at = NOW(6)
             WHERE worker_id = ? AND holder = ?",
        )
        .bind(self.ttl_us())
        .bind(deadline.wall_ms)
        .bind(self.worker)
        .bind(&self.holder)
        .execute(&self.pool)
        .await?;
        Ok((done.rows_affected() == 1).then_some(deadline))
    }

    /// Gives the row back: expired now, and the next holder's floor is `issued_below_ms`.
    pub(crate) async fn release(&self, issued_below_ms: i64) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE worker_leases
             SET holder = NULL, expires_at = ?, issued_below_ms = ?, updated_at = NOW(6)
             WHERE worker_id = ? AND holder = ?",
        )
        .bind(RELEASED_AT)
        .bind(issued_below_ms)
        .bind(self.worker)
        .bind(&self.holder)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// The rows that are free now (all of them, or only `worker`'s).
async fn free_rows(pool: &Db, worker: Option<u16>) -> Result<Vec<Free>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT worker_id, issued_below_ms, generation FROM worker_leases
         WHERE expires_at < NOW(6) AND (? IS NULL OR worker_id = ?) ORDER BY worker_id",
    )
    .bind(worker)
    .bind(worker)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Free {
                worker: r.try_get::<i16, _>(0)? as u16,
                issued_below_ms: r.try_get(1)?,
                generation: r.try_get(2)?,
            })
        })
        .collect()
}

/// Opens the generator of a taken row: floor from the row, deadline from the take. The
/// floor goes first, so no id is ever issued under the deadline but below the floor.
fn open(source: &IdSource, free: Free, deadline: Deadline) {
    source.generator.raise_floor(free.issued_below_ms);
    source.hold_until(deadline);
}

/// Leases a free worker id (a random one of the free rows) in the commerce database `pool`.
/// The lease must then be kept: [`crate::jobs::lease_keeper`] renews it until shutdown and
/// releases it then.
pub async fn take_worker(pool: Db, ttl: Duration) -> Result<(Arc<IdSource>, Lease), LeaseError> {
    let holder = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
    for _ in 0..TAKE_ROUNDS {
        let free = free_rows(&pool, None).await?;
        if free.is_empty() {
            break;
        }
        let start = rand::thread_rng().gen_range(0..free.len());
        for i in 0..free.len() {
            let candidate = free[(start + i) % free.len()];
            let Some(worker) = WorkerId::new(candidate.worker) else {
                continue;
            };
            let lease = Lease {
                pool: pool.clone(),
                worker: candidate.worker,
                holder: holder.clone(),
                ttl,
            };
            let Some(deadline) = lease.take(candidate).await? else {
                continue;
            };
            let source = IdSource::leased(IdGenerator::new(worker));
            open(&source, candidate, deadline);
            tracing::info!(
                worker = candidate.worker,
                generation = candidate.generation + 1,
                floor_ms = candidate.issued_below_ms,
                "leased worker id"
            );
            return Ok((Arc::new(source), lease));
        }
    }
    Err(LeaseError::Exhausted)
}

/// The steps of keeping a lease, for [`crate::jobs::lease_keeper`].
impl Lease {
    /// The worker id held.
    pub(crate) fn worker(&self) -> u16 {
        self.worker
    }

    /// The lease's time to live.
    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Renews the hold of `source`: `true` while it is ours (the deadline moves on), `false`
    /// when the row is not ours any more (the source stops issuing at once). A database
    /// error leaves the deadline of the last success standing.
    pub(crate) async fn renew_for(&self, source: &IdSource) -> Result<bool, sqlx::Error> {
        match self.renew().await? {
            Some(deadline) => {
                source.hold_until(deadline);
                Ok(true)
            }
            None => {
                source.stop();
                Ok(false)
            }
        }
    }

    /// Takes the same row back for `source` if it is free: `true` when it issues again.
    pub(crate) async fn take_back(&self, source: &IdSource) -> Result<bool, sqlx::Error> {
        for free in free_rows(&self.pool, Some(self.worker)).await? {
            if let Some(deadline) = self.take(free).await? {
                open(source, free, deadline);
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Closes `source` for good (no id after this) and answers the floor for the next holder:
    /// exactly our last issued millisecond + 1. Then [`Self::release`] gives the row back.
    pub(crate) fn close(&self, source: &IdSource) -> i64 {
        source.mono_until_ns.store(0, Ordering::Release);
        source.generator.revoke()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wall-clock deadline alone would let a clock stepped back stretch the hold; the
    /// monotonic one ends it on time.
    #[test]
    fn the_monotonic_deadline_ends_the_hold_whatever_the_wall_clock_says() {
        let source = IdSource::leased(IdGenerator::new(WorkerId::new(5).unwrap()));
        let user = UserId::new(42).unwrap();
        assert!(matches!(source.next_for(user), Err(IdSourceError::LeaseLost)));
        assert!(!source.is_held());
        let far = SystemClock.now_ms() + 3_600_000;
        source.hold_until(Deadline {
            wall_ms: far,
            mono: Instant::now() + Duration::from_secs(60),
        });
        assert!(source.next_for(user).is_ok());
        assert!(source.is_held());
        source.hold_until(Deadline {
            wall_ms: far,
            mono: Instant::now(),
        });
        assert!(!source.is_held());
        assert!(matches!(source.next_for(user), Err(IdSourceError::LeaseLost)));
        source.hold_until(Deadline {
            wall_ms: far,
            mono: Instant::now() + Duration::from_secs(60),
        });
        source.stop();
        assert!(matches!(source.next_for(user), Err(IdSourceError::LeaseLost)));
    }
}
