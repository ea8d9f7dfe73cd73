//! One database server with its read replicas: the read/write split.
//!
//! A [`Database`] has one writer (the primary pool, [`Database::write`]) and any number of
//! readers. Replica pools never leave this module: a read names its [`Consistency`] and gets a
//! connection only for the query it passes to [`Database::read`], and replica connections are
//! opened `READ ONLY` besides, so nothing can write through them.
//!
//! # Which server answers a read
//! - `strong`: the primary.
//! - `eventual`: a replica in rotation, however far behind (within the lag bound); the primary
//!   when none is.
//! - `session` (read-your-writes): a replica in rotation that has applied the read's *fence*:
//!   the primary's `@@gtid_binlog_pos` read after the read began ([`Database::fence`]), so it
//!   holds every write acknowledged before the read, whichever process made it and whatever
//!   Redis has lost. One the probe (or an earlier wait) already saw past it answers at once;
//!   otherwise it is asked to wait for it ([`wait_for_position`], at most
//!   `replicas.gtid_wait_ms`), and on timeout the primary answers. Concurrent session reads
//!   share one fence read (a read that began before a fence read was sent may use its
//!   answer), so under load a fence costs far less than a round trip per read. A primary
//!   whose position cannot be read answers the read itself: never a replica on a guess.
//!
//! A replica that fails (unreachable, no free connection in time, an error, or no answer
//! within `replicas.read_timeout_ms`: a frozen server) leaves the rotation at once and the
//! read moves on to the next one, then to the primary: a dead or frozen replica costs a read
//! latency, never an error and never more than its timeout.
//!
//! # Rotation
//! A probe per database ([`Database::probe`], every `replicas.probe_interval_ms`) reads the
//! primary's `@@gtid_binlog_pos` and each replica's `@@gtid_slave_pos`. A replica's lag is the
//! age of the oldest primary position it has not applied; a replica that answers and lags at
//! most `replicas.max_lag_ms` is in rotation, any other is out until a probe finds it healthy.
//! Measuring lag by positions (not `Seconds_Behind_Master`) counts a stopped applier too. A
//! probe that cannot read the primary's position cannot measure lag: every replica leaves the
//! rotation until one can (unknown lag is not small lag). The probe and the fences read the
//! primary over a small pool of their own ([`CONTROL_CONNECTIONS`]), so a request pool
//! exhausted by heavy writes never blinds them.

use crate::storage::Db;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::MySqlConnection;
use tokio_util::sync::CancellationToken;

use crate::config::{DatabaseSettings, ReplicaSettings};
use crate::domain::consistency::{Consistency, DatabaseRef, Gtid, GtidPosition};
use tokio::sync::Mutex as AsyncMutex;

use super::{connect, Result, StorageError};

/// A query run by [`Database::read`] on the connection it picked: a boxed future that borrows
/// only the connection (it owns what else it needs), so the read can run it again elsewhere.
pub type ReadQuery<'c, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'c>>;

/// Gives a query closure the signature [`Database::read`] takes (a closure stored in a
/// variable first does not get its higher-ranked signature inferred by itself).
pub fn query<T, F>(f: F) -> F
where
    F: for<'c> Fn(&'c mut MySqlConnection) -> ReadQuery<'c, T>,
{
    f
}

/// Which server answered a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    Primary,
    Replica,
}

/// What a read answered, and from where.
#[derive(Debug)]
pub struct Read<T> {
    pub value: T,
    pub served: Served,
}

/// Primary positions older than this are dropped from the probe history: a replica behind
/// the oldest one kept is known to lag at least this much, which is out of rotation anyway.
const HISTORY_SPAN_FACTOR: u32 = 4;
/// At most this many primary positions are kept (one per probe).
const HISTORY_MAX: usize = 512;
/// Connections of the control pool (probe and fences) per primary: one fence read at a time
/// (they are shared, see [`Database::fence`]) plus the probe's.
pub const CONTROL_CONNECTIONS: u32 = 2;

struct Replica {
    /// `<database>/r<index>`: a metric label, never a URL (it could hold credentials).
    name: String,
    pool: Db,
    in_rotation: AtomicBool,
    /// The last position a probe read (what it had applied then, at least).
    position: RwLock<GtidPosition>,
    lag_ms: AtomicU64,
}

impl Replica {
    fn leave_rotation(&self, why: &'static str, error: Option<&StorageError>) {
        if self.in_rotation.swap(false, Ordering::AcqRel) {
            tracing::warn!(replica = %self.name, why, error = ?error, "replica leaves the rotation");
        }
        metrics::counter!("orderly_replica_failovers_total", "replica" => self.name.clone(), "reason" => why)
            .increment(1);
    }

    fn has_applied(&self, fence: &GtidPosition) -> bool {
        self.position
            .read()
            .map(|p| p.includes_all(fence))
            .unwrap_or(false)
    }
}

/// The last fence read of a database: when its query was sent, and what it answered.
#[derive(Default)]
struct LastFence {
    sent: Option<Instant>,
    position: GtidPosition,
}

/// One database server: its primary and its replicas (see the module docs).
pub struct Database {
    name: String,
    reference: DatabaseRef,
    primary: Db,
    /// The probe's and the fences' own connections to the primary.
    control: Db,
    /// Held while a fence is read; the answer serves every read that began before it was sent.
    fence: AsyncMutex<LastFence>,
    replicas: Vec<Replica>,
    /// Round robin over the replicas.
    next: AtomicUsize,
    /// The primary's position at each probe, oldest first: what lag is measured against.
    history: Mutex<VecDeque<(Instant, GtidPosition)>>,
    gtid_wait: Duration,
    max_lag: Duration,
    probe_timeout: Duration,
    read_timeout: Duration,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("name", &self.name)
            .field("replicas", &self.replicas.len())
            .finish()
    }
}

impl Database {
    /// Connects the primary (which must answer) and opens the replica pools lazily (a replica
    /// that is down at start is out of rotation until it answers a probe).
    pub async fn connect(
        name: &str,
        reference: DatabaseRef,
        primary: &str,
        replicas: &[String],
        database: &DatabaseSettings,
        settings: &ReplicaSettings,
    ) -> Result<Database> {
        let control = connect_control(primary, settings)?;
        let primary = connect(primary, database).await?;
        let mut pools = Vec::with_capacity(replicas.len());
        for (i, url) in replicas.iter().enumerate() {
            pools.push(Replica {
                name: format!("{name}/r{i}"),
                pool: connect_replica(url, database, settings)?,
                in_rotation: AtomicBool::new(false),
                position: RwLock::new(GtidPosition::default()),
                lag_ms: AtomicU64::new(0),
            });
        }
        Ok(Database {
            name: name.to_owned(),
            reference,
            primary,
            control,
            fence: AsyncMutex::new(LastFence::default()),
            replicas: pools,
            next: AtomicUsize::new(0),
            history: Mutex::new(VecDeque::new()),
            gtid_wait: Duration::from_millis(settings.gtid_wait_ms),
            max_lag: Duration::from_millis(settings.max_lag_ms),
            probe_timeout: Duration::from_millis(settings.probe_timeout_ms),
            read_timeout: Duration::from_millis(settings.read_timeout_ms),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// How watermarks and tokens name this database.
    pub fn reference(&self) -> DatabaseRef {
        self.reference
    }

    /// The primary: the only handle that writes, and the one `strong` reads use.
    pub fn write(&self) -> &Db {
        &self.primary
    }

    pub fn has_replicas(&self) -> bool {
        !self.replicas.is_empty()
    }

    pub fn replica_count(&self) -> usize {
        self.replicas.len()
    }

    /// Replicas in rotation now.
    pub fn replicas_in_rotation(&self) -> usize {
        self.replicas
            .iter()
            .filter(|r| r.in_rotation.load(Ordering::Acquire))
            .count()
    }

    /// The largest lag the last probe measured over this database's replicas, in rotation or
    /// not (zero without replicas).
    pub fn max_replica_lag(&self) -> Duration {
        let ms = self
            .replicas
            .iter()
            .map(|r| r.lag_ms.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        Duration::from_millis(ms)
    }

    /// Runs `query` on the server `consistency` calls for (see the module docs). `known`
    /// (the newest write this reader knows of: a client's token, this process's own writes)
    /// only counts for `session` reads, and only raises their fence.
    pub async fn read<T, Q>(
        &self,
        consistency: Consistency,
        known: Option<&Gtid>,
        query: Q,
    ) -> Result<Read<T>>
    where
        Q: for<'c> Fn(&'c mut MySqlConnection) -> ReadQuery<'c, T>,
    {
        if consistency != Consistency::Strong && !self.replicas.is_empty() {
            let fence = match consistency {
                Consistency::Session => match self.fence().await {
                    Ok(mut fence) => {
                        if let Some(g) = known {
                            fence.raise(*g);
                        }
                        Some(fence)
                    }
                    // Whether a replica has every acknowledged write is unknown: the primary
                    // answers (and fails the read if it is down).
                    Err(_) => return self.read_primary(query).await,
                },
                _ => None,
            };
            let start = self.next.fetch_add(1, Ordering::Relaxed);
            let n = self.replicas.len();
            for replica in (0..n).map(|i| &self.replicas[(start + i) % n]) {
                if !replica.in_rotation.load(Ordering::Acquire) {
                    continue;
                }
                match self.read_replica(replica, fence.as_ref(), &query).await {
                    Ok(Some(value)) => {
                        metrics::counter!("orderly_db_reads_total", "database" => self.name.clone(), "server" => "replica")
                            .increment(1);
                        return Ok(Read {
                            value,
                            served: Served::Replica,
                        });
                    }
                    // The fence did not arrive in time: the primary has it.
                    Ok(None) => break,
                    Err(StorageError::Corrupt(m)) => return Err(StorageError::Corrupt(m)),
                    Err(e) => replica.leave_rotation("read_failed", Some(&e)),
                }
            }
        }
        self.read_primary(query).await
    }

    async fn read_primary<T, Q>(&self, query: Q) -> Result<Read<T>>
    where
        Q: for<'c> Fn(&'c mut MySqlConnection) -> ReadQuery<'c, T>,
    {
        let mut conn = self.primary.acquire().await?;
        let value = query(&mut conn).await?;
        metrics::counter!("orderly_db_reads_total", "database" => self.name.clone(), "server" => "primary")
            .increment(1);
        Ok(Read {
            value,
            served: Served::Primary,
        })
    }

    /// The fence of a `session` read that begins now: the primary's position, read after
    /// this call began, so it holds every write acknowledged before. Reads that arrive while
    /// a fence read is under way wait for the next one, which one of them sends: under load
    /// one round trip serves every read that began before it was sent.
    pub async fn fence(&self) -> Result<GtidPosition> {
        let began = Instant::now();
        let mut last = tokio::time::timeout(self.probe_timeout, self.fence.lock())
            .await
            .map_err(|_| StorageError::Db(sqlx::Error::PoolTimedOut))?;
        if last.sent.is_some_and(|sent| sent >= began) {
            metrics::counter!("orderly_replica_fences_total", "database" => self.name.clone(), "outcome" => "shared")
                .increment(1);
            return Ok(last.position.clone());
        }
        let sent = Instant::now();
        let read = tokio::time::timeout(
            self.probe_timeout,
            position(&self.control, "SELECT @@gtid_binlog_pos"),
        )
        .await;
        let outcome = match read {
            Ok(Ok(position)) => {
                *last = LastFence {
                    sent: Some(sent),
                    position: position.clone(),
                };
                Ok(position)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StorageError::Db(sqlx::Error::PoolTimedOut)),
        };
        let label = if outcome.is_ok() { "read" } else { "failed" };
        metrics::counter!("orderly_replica_fences_total", "database" => self.name.clone(), "outcome" => label)
            .increment(1);
        outcome
    }

    /// `Ok(None)`: the replica did not apply `fence` within the wait. The wait and the query
    /// together take at most `gtid_wait_ms + read_timeout_ms`: a replica that does not answer
    /// by then (frozen, overloaded) has its connection closed and leaves the rotation.
    async fn read_replica<T, Q>(
        &self,
        replica: &Replica,
        fence: Option<&GtidPosition>,
        query: &Q,
    ) -> Result<Option<T>>
    where
        Q: for<'c> Fn(&'c mut MySqlConnection) -> ReadQuery<'c, T>,
    {
        let mut conn = replica.pool.acquire().await?;
        let fence = fence.filter(|f| !f.is_empty() && !replica.has_applied(f));
        let bound = self.read_timeout
            + if fence.is_some() {
                self.gtid_wait
            } else {
                Duration::ZERO
            };
        let work = async {
            if let Some(fence) = fence {
                let began = Instant::now();
                let arrived = wait_for_position(&mut conn, fence, self.gtid_wait).await?;
                metrics::histogram!("orderly_replica_gtid_wait_seconds")
                    .record(began.elapsed().as_secs_f64());
                if !arrived {
                    metrics::counter!("orderly_replica_gtid_wait_timeouts_total", "replica" => replica.name.clone())
                        .increment(1);
                    return Ok(None);
                }
                // What it applied it keeps: later reads of this fence or older need no wait.
                if let Ok(mut p) = replica.position.write() {
                    for g in fence.gtids() {
                        p.raise(*g);
                    }
                }
            }
            Ok(Some(query(&mut conn).await?))
        };
        match tokio::time::timeout(bound, work).await {
            Ok(answer) => answer,
            Err(_) => {
                // The statement may still be running (or the server frozen): this connection
                // must never serve another read.
                conn.close_on_drop();
                metrics::counter!("orderly_replica_read_timeouts_total", "replica" => replica.name.clone())
                    .increment(1);
                Err(StorageError::Db(sqlx::Error::PoolTimedOut))
            }
        }
    }

    /// One probe of every replica (see the module docs): updates positions, lag and
    /// rotation. Callable on its own (tests, start-up); [`run_probes`] loops it.
    pub async fn probe(&self) {
        if self.replicas.is_empty() {
            return;
        }
        let now = Instant::now();
        let primary = tokio::time::timeout(
            self.probe_timeout,
            position(&self.control, "SELECT @@gtid_binlog_pos"),
        )
        .await;
        let history = match primary {
            Ok(Ok(pos)) => {
                let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
                let span = self.max_lag * HISTORY_SPAN_FACTOR;
                while h.len() >= HISTORY_MAX || h.front().is_some_and(|(t, _)| now.duration_since(*t) > span)
                {
                    h.pop_front();
                }
                h.push_back((now, pos));
                Some(h.clone())
            }
            // The primary does not answer: reachability is still probed, lag is not known.
            _ => None,
        };
        for replica in &self.replicas {
            let answer = tokio::time::timeout(
                self.probe_timeout,
                position(&replica.pool, "SELECT @@gtid_slave_pos"),
            )
            .await;
            let pos = match answer {
                Ok(Ok(pos)) => pos,
                Ok(Err(e)) => {
                    replica.leave_rotation("probe_failed", Some(&e));
                    continue;
                }
                Err(_) => {
                    replica.leave_rotation("probe_timed_out", None);
                    continue;
                }
            };
            let lag = history.as_ref().map(|h| lag_of(&pos, h, now));
            if let Ok(mut p) = replica.position.write() {
                *p = pos;
            }
            let Some(lag) = lag else {
                // Reachable, but how far behind is unknown: not in rotation until it is known.
                replica.leave_rotation("lag_unknown", None);
                continue;
            };
            replica.lag_ms.store(lag.as_millis() as u64, Ordering::Relaxed);
            metrics::gauge!("orderly_replica_lag_seconds", "replica" => replica.name.clone())
                .set(lag.as_secs_f64());
            if lag > self.max_lag {
                replica.leave_rotation("lagging", None);
            } else if !replica.in_rotation.swap(true, Ordering::AcqRel) {
                tracing::info!(replica = %replica.name, lag_ms = lag.as_millis() as u64, "replica joins the rotation");
            }
        }
        for replica in &self.replicas {
            let up = replica.in_rotation.load(Ordering::Acquire);
            metrics::gauge!("orderly_replica_in_rotation", "replica" => replica.name.clone())
                .set(f64::from(u8::from(up)));
        }
    }

    /// The pools of this database by label: the primary's under the database's name, each
    /// replica's under its own (for the pool gauges).
    pub fn pools(&self) -> impl Iterator<Item = (&str, &Db)> {
        std::iter::once((self.name.as_str(), &self.primary))
            .chain(self.replicas.iter().map(|r| (r.name.as_str(), &r.pool)))
    }
}

/// Lag of a replica at `pos`: the age of the oldest primary position in `history` it has not
/// applied (zero when it has applied the newest).
fn lag_of(pos: &GtidPosition, history: &VecDeque<(Instant, GtidPosition)>, now: Instant) -> Duration {
    history
        .iter()
        .find(|(_, p)| !pos.includes_all(p))
        .map_or(Duration::ZERO, |(t, _)| now.duration_since(*t))
}

/// `sql` reads one GTID position variable.
async fn position(pool: &Db, sql: &'static str) -> Result<GtidPosition> {
    let raw: String = sqlx::query_scalar(sql).fetch_one(pool).await?;
    GtidPosition::parse(&raw).ok_or_else(|| super::corrupt("GTID position", raw))
}

/// Waits until the server behind `conn` has applied every GTID of `position`, at most
/// `timeout`; `false` when it has not by then.
///
/// MariaDB: `MASTER_GTID_WAIT(position, seconds)` answers 0 once the replica's
/// `gtid_slave_pos` holds it, -1 on timeout. (MySQL 8 spells this
/// `WAIT_FOR_EXECUTED_GTID_SET(set, seconds)`, 0 or 1, with UUID-based GTID sets: the one
/// function to change there.)
pub async fn wait_for_position(
    conn: &mut MySqlConnection,
    position: &GtidPosition,
    timeout: Duration,
) -> Result<bool> {
    let answer: Option<i64> = sqlx::query_scalar("SELECT MASTER_GTID_WAIT(?, ?)")
        .bind(position.to_string())
        .bind(timeout.as_secs_f64())
        .fetch_one(conn)
        .await?;
    Ok(answer == Some(0))
}

/// [`wait_for_position`] for one GTID.
pub async fn wait_for_gtid(conn: &mut MySqlConnection, gtid: &Gtid, timeout: Duration) -> Result<bool> {
    let mut position = GtidPosition::default();
    position.raise(*gtid);
    wait_for_position(conn, &position, timeout).await
}

/// The control pool of a primary: the probe and the fences, [`CONTROL_CONNECTIONS`] at
/// most, opened lazily, each statement bounded by the probe's timeout.
fn connect_control(url: &str, settings: &ReplicaSettings) -> Result<Db> {
    let opts: MySqlConnectOptions = url.parse().map_err(StorageError::Db)?;
    let pool = MySqlPoolOptions::new()
        .max_connections(CONTROL_CONNECTIONS)
        .min_connections(0)
        .acquire_timeout(Duration::from_millis(settings.probe_timeout_ms))
        .test_before_acquire(false)
        .connect_lazy_with(opts);
    Ok(Db::new(pool, "control"))
}

/// A replica pool: opened lazily, read-only sessions, and a short acquire timeout so that a
/// dead replica costs a read `replicas.acquire_timeout_ms` at most before it moves on.
fn connect_replica(url: &str, database: &DatabaseSettings, settings: &ReplicaSettings) -> Result<Db> {
    let opts: MySqlConnectOptions = url.parse().map_err(StorageError::Db)?;
    let opts = opts.statement_cache_capacity(super::STATEMENT_CACHE);
    let name = opts.get_database().unwrap_or("-").to_owned();
    let pool = MySqlPoolOptions::new()
        .max_connections(database.max_connections)
        .min_connections(0)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
        .test_before_acquire(false)
        // No release guard: nothing begins a transaction on a read-only replica session.
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED, READ ONLY")
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            })
        })
        .connect_lazy_with(opts);
    Ok(Db::new(pool, &name))
}

/// Probes every database's replicas every `interval` until `shutdown` fires.
pub async fn run_probes(
    databases: Vec<std::sync::Arc<Database>>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    if databases.iter().all(|d| !d.has_replicas()) {
        return;
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // All databases at once: a hung server delays only its own probe.
        let mut probes = tokio::task::JoinSet::new();
        for d in &databases {
            let d = d.clone();
            probes.spawn(async move { d.probe().await });
        }
        while probes.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_age_of_the_oldest_position_not_applied() {
        let t0 = Instant::now();
        let p = |s: &str| GtidPosition::parse(s).unwrap();
        let history: VecDeque<_> = [
            (t0, p("0-1-10")),
            (t0 + Duration::from_secs(1), p("0-1-20")),
            (t0 + Duration::from_secs(2), p("0-1-30")),
        ]
        .into();
        let now = t0 + Duration::from_secs(3);
        assert_eq!(lag_of(&p("0-1-30"), &history, now), Duration::ZERO);
        assert_eq!(lag_of(&p("0-1-25"), &history, now), Duration::from_secs(1));
        assert_eq!(lag_of(&p("0-1-5"), &history, now), Duration::from_secs(3));
        assert_eq!(lag_of(&p(""), &history, now), Duration::from_secs(3));
        assert_eq!(lag_of(&p(""), &VecDeque::new(), now), Duration::ZERO);
    }
}
