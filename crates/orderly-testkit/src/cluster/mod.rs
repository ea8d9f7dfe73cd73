//! A throwaway local cluster of real servers (MariaDB, Redis and NATS), started from the
//! binaries on `PATH`, for the playground, the benches and the integration-test harness.
//!
//! # Layout
//! This file holds [`LocalCluster`], [`ClusterSpec`] and [`ClusterError`]; one file per
//! server kind holds its server (`mariadb.rs`: options, bootstrap, GTID replicas;
//! `redis.rs`; `nats.rs`), and `process.rs` what they share: spawning on the spawner
//! thread, readiness, free ports, signals, the sweep of stale directories.
//!
//! # What it starts
//!
//! [`LocalCluster::start`] creates one directory named `orderly-cluster-XXXXXX` (under
//! `/dev/shm` when it is usable — every server file then lives in RAM — else under the system
//! temporary directory, or under [`ClusterSpec::base_dir`]; a [`ClusterSpec::durable`]
//! cluster never uses `/dev/shm`) and starts inside it:
//!
//! * `mariadb_servers` MariaDB servers (`mariadb-<i>/`), each on its own free TCP port on
//!   127.0.0.1 with its own socket, pid file, error log and datadir. `mariadb-install-db` runs
//!   once; the fresh datadir is copied for the other servers (a copy on tmpfs costs a few
//!   milliseconds, a bootstrap about half a second). Every server has the binary log on with a
//!   unique `server_id` (`1..=n`), GTID strict mode, `log_slave_updates` and row-based logging,
//!   so a replica can later be attached with real GTID replication. Each server has the user
//!   `orderly`@`%` / `orderly`@`localhost`, password `orderly`, with every privilege; see
//!   [`MariaDbServer::url`].
//! * [`ClusterSpec::replicas_per_server`] read-only replicas of every one of those servers
//!   (`mariadb-<i>-r<r>/`), attached with real GTID replication (`MASTER_USE_GTID=slave_pos`)
//!   as soon as every server serves. A replica's `server_id` is `1000 + 100 × i + r + 1`,
//!   never one of a primary's. A replica refuses writes, even `orderly`'s (a write there would
//!   break its replication for good). See [`LocalCluster::replicas`].
//! * optionally one Redis server (`redis/`), without any persistence.
//! * optionally one NATS server with JetStream (`nats/`, its stream files in `nats/js/`), for
//!   the order event stream.
//!
//! `start` returns only once every MariaDB server accepts a login as `orderly` over TCP, every
//! replica's replication threads run, and Redis and NATS answer `PING`.
//!
//! # Invariants
//!
//! * **Servers never outlive their owner.** Three layers guarantee it:
//!   1. `Drop` for [`LocalCluster`] stops every server (SIGTERM, a short grace period, then
//!      SIGKILL), reaps it and removes the directory.
//!   2. Every server is spawned with `PR_SET_PDEATHSIG = SIGKILL`, so the kernel kills it when
//!      the owning process dies, however it dies. The kernel fires that signal when the *thread*
//!      that forked the child exits, not the process; the Rust test harness runs every test on
//!      its own short-lived thread while one cluster is shared by all the tests of a binary. So
//!      every `fork` happens on a single dedicated spawner thread, started once per process,
//!      that never exits: the signal then fires exactly when the process dies.
//!   3. A cluster kept in a `static` is never dropped, so an `atexit` hook kills the servers of
//!      every cluster still alive when the process exits normally and removes their directories.
//!      And a crashed owner (SIGKILL, abort) leaves a directory behind: every `start` first sweeps
//!      sibling `orderly-cluster-*` directories whose `owner.pid` names a dead process, killing
//!      any server still recorded in them (`child.pid`, checked against `/proc/<pid>/cwd` so an
//!      unrelated process that reused the pid is never touched) and removing them.
//! * **No runtime-bound state.** A cluster holds only plain child processes and paths, no sqlx
//!   connection or tokio resource, so one cluster started on one tokio runtime can be used from
//!   any other (each `#[tokio::test]` has its own runtime). [`LocalCluster::start_blocking`]
//!   starts one from synchronous code, e.g. a `OnceLock` initialiser, even inside a runtime.
//! * **Nothing is durable** (unless [`ClusterSpec::durable`]). Durability settings are those of
//!   a throwaway cluster on tmpfs, but chosen so that killing a *server process* (SIGKILL)
//!   loses no committed transaction: fault tests see the same data a crashed production server
//!   would recover. A durable cluster (`orderly-dev bench --durable`) keeps its files on disk and
//!   syncs like a production server ([`DURABLE_MARIADB_OPTIONS`]), so that a benchmark pays
//!   the real price of every commit.
//! * The system MariaDB and Redis services (3306, 6379) are never used or touched: every server
//!   is started with `--no-defaults` (MariaDB) or without a configuration file (Redis).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard, Once, OnceLock, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use sqlx::mysql::MySqlConnection;
use sqlx::{Connection, Row};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

mod mariadb;
mod nats;
mod process;
mod redis;
mod tls;

pub use mariadb::*;
pub use nats::*;
use process::*;
pub use redis::*;
pub use tls::TlsFiles;

/// The MariaDB user every server of the cluster has, with every privilege.
pub const USER: &str = "orderly";
/// The password of [`USER`].
pub const PASSWORD: &str = "orderly";

/// Prefix of every cluster directory; the stale-directory sweep only looks at these.
const DIR_PREFIX: &str = "orderly-cluster-";
/// File in a cluster directory holding the pid of the owning process.
const OWNER_PID_FILE: &str = "owner.pid";
/// File in each server directory holding the pid of the server process we spawned.
const CHILD_PID_FILE: &str = "child.pid";

/// How long a server may take to accept connections. A healthy server on tmpfs takes well
/// under a second; the margin is for loaded CI machines running several test binaries at once.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Readiness polling interval: short, because startup time is paid by every test binary.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Upper bound for one readiness probe, so a server that accepts TCP but never answers (e.g.
/// paused) cannot stall the poll loop past [`READY_TIMEOUT`].
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Grace period after SIGTERM in `Drop` before SIGKILL. A throwaway server has nothing worth a
/// long clean shutdown (MariaDB on tmpfs shuts down in ~20 ms); `Drop` must stay quick.
const DROP_GRACE: Duration = Duration::from_secs(2);
/// Grace period of an explicit `stop`: a clean shutdown is what the caller asked for.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often a server is re-spawned on a fresh port when its port was taken between our probe
/// and its `bind` (the probe releases the port before the server binds it).
const PORT_ATTEMPTS: usize = 3;
/// A cluster directory without `owner.pid` may be one being created right now by another
/// process; only one older than this is considered abandoned.
const ORPHAN_MIN_AGE: Duration = Duration::from_secs(60);
/// Lines of a server log quoted in an error.
const LOG_TAIL_LINES: usize = 40;
/// Upper bound for one administrative round trip to a server (connecting, a replication
/// statement, a status query), so a paused server fails the call instead of hanging it. Far
/// above what a healthy server needs (milliseconds), for loaded CI machines.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// `server_id` of replica `r` of primary `i` is `REPLICA_SERVER_ID_BASE + i ×
/// REPLICA_SERVER_ID_STRIDE + r + 1`: above every primary's `1..=n` (n stays far below 1000:
/// every server needs ~100 MB of memory) and readable at a glance in logs (`1102` = primary 1,
/// replica 1). Replication silently skips events carrying the replica's own id, so ids must
/// never collide.
const REPLICA_SERVER_ID_BASE: usize = 1000;
/// See [`REPLICA_SERVER_ID_BASE`]: room for 99 replicas per primary.
const REPLICA_SERVER_ID_STRIDE: usize = 100;

/// Errors of starting or controlling a [`LocalCluster`].
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A server binary is neither on `PATH` nor in the usual bin/sbin directories.
    #[error("{binary} not found on PATH: install the Debian package {package} (apt-get install {package})")]
    MissingBinary {
        binary: &'static str,
        package: &'static str,
    },
    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// `mariadb-install-db` exited with an error; `output` is the tail of what it printed.
    #[error("mariadb-install-db failed for {datadir} ({status}):\n{output}")]
    InstallDb {
        datadir: PathBuf,
        status: ExitStatus,
        output: String,
    },
    /// A server exited or did not answer in time; `tail` is the end of its log for this run
    /// (the log itself disappears with the cluster directory when `start` fails).
    #[error("{server} did not become ready: {reason}\n--- last lines of {} ---\n{tail}", log.display())]
    NotReady {
        server: String,
        reason: String,
        log: PathBuf,
        tail: String,
    },
    /// The kernel handed out no usable ephemeral port.
    #[error("no free TCP port on 127.0.0.1: {0}")]
    NoFreePort(#[source] io::Error),
    /// A MariaDB server index out of range.
    #[error("no MariaDB server with index {index}: the cluster has {count}")]
    NoSuchServer { index: usize, count: usize },
    /// A replica index out of range for an existing primary.
    #[error("MariaDB server {primary} has no replica {replica}: it has {count}")]
    NoSuchReplica {
        primary: usize,
        replica: usize,
        count: usize,
    },
    /// A [`ClusterSpec`] the cluster cannot honour.
    #[error("invalid cluster spec: {0}")]
    InvalidSpec(String),
    /// A statement (or the login before it) on a MariaDB server failed.
    #[error("{server}: {action}: {source}")]
    Sql {
        server: String,
        action: String,
        #[source]
        source: sqlx::Error,
    },
    /// A replica did not reach the replication state asked for (threads running, a GTID
    /// position applied) in time, or a server did not answer an administrative statement in
    /// time.
    #[error("{server}: {reason}")]
    Replication { server: String, reason: String },
    /// A Redis operation on a cluster started without Redis.
    #[error("the cluster was started without Redis")]
    NoRedis,
    /// A NATS operation on a cluster started without NATS.
    #[error("the cluster was started without NATS")]
    NoNats,
    /// Pausing or resuming a server that is not running.
    #[error("{0} is not running")]
    NotRunning(String),
    /// The process-wide spawner thread could not be started.
    #[error("the process spawner thread is unavailable")]
    SpawnerUnavailable,
}

impl ClusterError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        ClusterError::Io {
            context: context.into(),
            source,
        }
    }
}

/// What [`LocalCluster::start`] starts.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Number of independent MariaDB servers (shards), each with a unique `server_id`.
    pub mariadb_servers: usize,
    /// Whether to start a Redis server.
    pub with_redis: bool,
    /// Whether to start a NATS server with JetStream (`nats-server -js`).
    pub with_nats: bool,
    /// Directory in which the `orderly-cluster-XXXXXX` directory is created; `None` picks
    /// `/dev/shm` when usable (never for a durable cluster), else the system temporary
    /// directory.
    pub base_dir: Option<PathBuf>,
    /// Production durability: data on disk, redo log and binary log synced at every commit,
    /// doublewrite on ([`DURABLE_MARIADB_OPTIONS`]). Off for tests and the playground.
    pub durable: bool,
    /// Number of read-only GTID replicas of every MariaDB server (0 to 99), each a server of its
    /// own. 0, the default, starts none.
    pub replicas_per_server: usize,
    /// TLS everywhere it is tested: a CA and a server certificate ([`TlsFiles`]); every
    /// MariaDB server requires secure transport (`require_secure_transport=ON`) and its URLs
    /// verify the full identity; Redis listens for TLS on a second port
    /// ([`RedisServer::tls_url`]); NATS requires TLS (`tls://` URL). Off by default. Not with
    /// replicas.
    pub tls: bool,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            mariadb_servers: 1,
            with_redis: true,
            with_nats: true,
            base_dir: None,
            durable: false,
            replicas_per_server: 0,
            tls: false,
        }
    }
}

impl ClusterSpec {
    /// Rejects specs whose replica server ids would collide (see [`REPLICA_SERVER_ID_BASE`]).
    fn validate(&self) -> Result<(), ClusterError> {
        if self.replicas_per_server == 0 {
            return Ok(());
        }
        if self.tls {
            return Err(ClusterError::InvalidSpec("a TLS cluster has no replicas".into()));
        }
        if self.replicas_per_server >= REPLICA_SERVER_ID_STRIDE {
            return Err(ClusterError::InvalidSpec(format!(
                "{} replicas per server: at most {}",
                self.replicas_per_server,
                REPLICA_SERVER_ID_STRIDE - 1
            )));
        }
        if self.mariadb_servers >= REPLICA_SERVER_ID_BASE {
            return Err(ClusterError::InvalidSpec(format!(
                "{} MariaDB servers with replicas: at most {}",
                self.mariadb_servers,
                REPLICA_SERVER_ID_BASE - 1
            )));
        }
        Ok(())
    }
}

/// A running throwaway cluster. Dropping it stops every server and removes its directory.
#[derive(Debug)]
pub struct LocalCluster {
    /// `None` only while dropping.
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    mariadb: Vec<MariaDbServer>,
    /// `replicas[i]`: the replicas of `mariadb[i]` (empty vectors when there are none).
    replicas: Vec<Vec<MariaDbServer>>,
    redis: Option<RedisServer>,
    nats: Option<NatsServer>,
    startup_time: Duration,
    tls: Option<TlsFiles>,
}

impl LocalCluster {
    /// Starts the servers described by `spec` and waits until all of them serve.
    ///
    /// On error everything started so far is stopped and the directory removed.
    pub async fn start(spec: ClusterSpec) -> Result<LocalCluster, ClusterError> {
        let began = Instant::now();
        spec.validate()?;
        let binaries = Binaries::find(&spec)?;
        let (dir, path) = create_cluster_dir(spec.base_dir.as_deref(), spec.durable)?;
        // From here on an early return drops `cluster`, which cleans up whatever was started.
        let mut cluster = LocalCluster {
            dir: Some(dir),
            path,
            mariadb: Vec::new(),
            replicas: Vec::new(),
            redis: None,
            nats: None,
            startup_time: Duration::ZERO,
            tls: None,
        };
        let mut ports = PortPicker::default();
        if spec.tls {
            cluster.tls = Some(TlsFiles::create(&cluster.path)?);
        }

        // Redis first: it boots while MariaDB bootstraps.
        if let Some(binary) = binaries.redis {
            let mut redis = RedisServer::new(&cluster.path, binary, ports.pick()?)?;
            if let Some(tls) = &cluster.tls {
                redis.tls = Some((tls.clone(), ports.pick()?));
            }
            redis.spawn().await?;
            cluster.redis = Some(redis);
        }
        if let Some(binary) = binaries.nats {
            let mut nats = NatsServer::new(&cluster.path, binary, ports.pick()?)?;
            nats.tls = cluster.tls.clone();
            nats.spawn().await?;
            cluster.nats = Some(nats);
        }

        if let Some((mariadbd, install_db)) = binaries.mariadb {
            let init_file = cluster.path.join("init.sql");
            fs::write(&init_file, INIT_SQL)
                .map_err(|e| ClusterError::io(format!("writing {}", init_file.display()), e))?;
            let replica_init_file = cluster.path.join("init-replica.sql");
            if spec.replicas_per_server > 0 {
                // Still one statement per line, still out of the binary log.
                fs::write(&replica_init_file, format!("{INIT_SQL}{REPLICA_INIT_SQL}"))
                    .map_err(|e| ClusterError::io(format!("writing {}", replica_init_file.display()), e))?;
            }
            for index in 0..spec.mariadb_servers {
                let mut primary = MariaDbServer::new(
                    &cluster.path,
                    index,
                    None,
                    mariadbd.clone(),
                    init_file.clone(),
                    ports.pick()?,
                    spec.durable,
                )?;
                primary.tls = cluster.tls.clone();
                cluster.mariadb.push(primary);
                let mut replicas = Vec::with_capacity(spec.replicas_per_server);
                for r in 0..spec.replicas_per_server {
                    replicas.push(MariaDbServer::new(
                        &cluster.path,
                        r,
                        Some(index),
                        mariadbd.clone(),
                        replica_init_file.clone(),
                        ports.pick()?,
                        spec.durable,
                    )?);
                }
                cluster.replicas.push(replicas);
            }
            // One bootstrap for primaries and replicas alike: every other datadir is a copy.
            let datadirs: Vec<PathBuf> = cluster.all_mariadb().map(MariaDbServer::datadir).collect();
            install_datadirs(install_db, datadirs).await?;
            for server in cluster.all_mariadb() {
                server.spawn(false).await?;
            }
            for server in cluster
                .mariadb
                .iter_mut()
                .chain(cluster.replicas.iter_mut().flatten())
            {
                server.await_first_start(&mut ports).await?;
            }
            // Only now are the primaries' ports final (a first start may move to another port).
            for (primary, replicas) in cluster.mariadb.iter().zip(&cluster.replicas) {
                for replica in replicas {
                    replica.attach_to(primary).await?;
                }
            }
        }

        if let Some(redis) = &mut cluster.redis {
            redis.await_first_start(&mut ports).await?;
        }
        if let Some(nats) = &mut cluster.nats {
            nats.await_first_start(&mut ports).await?;
        }

        cluster.startup_time = began.elapsed();
        tracing::info!(
            dir = %cluster.path.display(),
            mariadb_ports = ?cluster.mariadb.iter().map(|s| s.port).collect::<Vec<_>>(),
            replica_ports = ?cluster
                .replicas
                .iter()
                .map(|replicas| replicas.iter().map(|s| s.port).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
            redis_port = ?cluster.redis.as_ref().map(|r| r.port),
            nats_port = ?cluster.nats.as_ref().map(|n| n.port),
            startup_ms = cluster.startup_time.as_millis() as u64,
            "local cluster started"
        );
        Ok(cluster)
    }

    /// [`LocalCluster::start`] for synchronous code (e.g. a `OnceLock` initialiser in a test
    /// harness). Runs on a fresh thread with its own runtime, so it also works when called from
    /// inside a tokio runtime (blocking that runtime's thread meanwhile).
    pub fn start_blocking(spec: ClusterSpec) -> Result<LocalCluster, ClusterError> {
        let worker = std::thread::Builder::new()
            .name("orderly-cluster-start".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| ClusterError::io("building a runtime to start the cluster", e))?;
                runtime.block_on(LocalCluster::start(spec))
            })
            .map_err(|e| ClusterError::io("spawning the cluster start thread", e))?;
        match worker.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// The cluster directory (removed when the cluster is dropped).
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// How long [`LocalCluster::start`] took.
    /// The CA and certificate of a cluster started with [`ClusterSpec::tls`].
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    pub fn startup_time(&self) -> Duration {
        self.startup_time
    }

    /// The MariaDB server with index `index`.
    ///
    /// # Panics
    ///
    /// If `index >= mariadb_servers().len()`, like slice indexing.
    pub fn mariadb(&self, index: usize) -> &MariaDbServer {
        &self.mariadb[index]
    }

    /// Every primary MariaDB server (shard), by index; their replicas are in
    /// [`replicas`](Self::replicas).
    pub fn mariadb_servers(&self) -> &[MariaDbServer] {
        &self.mariadb
    }

    /// Base URL of every MariaDB server, `mysql://orderly:orderly@127.0.0.1:PORT`, with no
    /// database path and no parameters: callers append `/dbname?ssl-mode=disabled` themselves
    /// (the servers have no TLS). [`MariaDbServer::url`] builds the full URL.
    pub fn mariadb_urls(&self) -> Vec<String> {
        self.mariadb.iter().map(MariaDbServer::base_url).collect()
    }

    /// The replicas of MariaDB server `primary`, by replica index; empty when it has none or
    /// there is no such server.
    pub fn replicas(&self, primary: usize) -> &[MariaDbServer] {
        self.replicas.get(primary).map_or(&[], Vec::as_slice)
    }

    /// Replica `replica` of MariaDB server `primary`. Connect to it with its
    /// [`url`](MariaDbServer::url) like to any server, to read: it refuses writes, even
    /// `orderly`'s.
    pub fn replica(&self, primary: usize, replica: usize) -> Result<&MariaDbServer, ClusterError> {
        self.server(primary)?;
        let replicas = self.replicas(primary);
        replicas.get(replica).ok_or(ClusterError::NoSuchReplica {
            primary,
            replica,
            count: replicas.len(),
        })
    }

    /// Every MariaDB server, primaries and replicas.
    fn all_mariadb(&self) -> impl Iterator<Item = &MariaDbServer> {
        self.mariadb.iter().chain(self.replicas.iter().flatten())
    }

    /// The Redis server, if the cluster has one.
    pub fn redis(&self) -> Option<&RedisServer> {
        self.redis.as_ref()
    }

    /// `redis://127.0.0.1:PORT`, if the cluster has Redis.
    pub fn redis_url(&self) -> Option<String> {
        self.redis.as_ref().map(RedisServer::url)
    }

    /// The NATS server, if the cluster has one.
    pub fn nats(&self) -> Option<&NatsServer> {
        self.nats.as_ref()
    }

    /// `nats://127.0.0.1:PORT`, if the cluster has NATS.
    pub fn nats_url(&self) -> Option<String> {
        self.nats.as_ref().map(NatsServer::url)
    }

    fn nats_server(&self) -> Result<&NatsServer, ClusterError> {
        self.nats.as_ref().ok_or(ClusterError::NoNats)
    }

    /// Kills NATS with SIGKILL, as a crash would. JetStream's files survive: a restart
    /// recovers every stored message.
    pub fn kill_nats(&self) -> Result<(), ClusterError> {
        self.nats_server()?.kill()
    }

    /// (Re)starts NATS on its port and JetStream directory and waits until it answers `PING`.
    pub async fn start_nats(&self) -> Result<(), ClusterError> {
        self.nats_server()?.start().await
    }

    fn server(&self, index: usize) -> Result<&MariaDbServer, ClusterError> {
        self.mariadb.get(index).ok_or(ClusterError::NoSuchServer {
            index,
            count: self.mariadb.len(),
        })
    }

    fn redis_server(&self) -> Result<&RedisServer, ClusterError> {
        self.redis.as_ref().ok_or(ClusterError::NoRedis)
    }

    /// Shuts MariaDB server `index` down cleanly (SIGTERM; SIGKILL after 10 s).
    pub async fn stop_mariadb(&self, index: usize) -> Result<(), ClusterError> {
        self.server(index)?.stop().await
    }

    /// Kills MariaDB server `index` with SIGKILL, as a crash would.
    pub fn kill_mariadb(&self, index: usize) -> Result<(), ClusterError> {
        self.server(index)?.kill()
    }

    /// (Re)starts MariaDB server `index` on its port and datadir and waits until it serves.
    pub async fn start_mariadb(&self, index: usize) -> Result<(), ClusterError> {
        self.server(index)?.start().await
    }

    /// Freezes MariaDB server `index` (SIGSTOP): connections hang instead of failing.
    pub fn pause_mariadb(&self, index: usize) -> Result<(), ClusterError> {
        self.server(index)?.pause()
    }

    /// Unfreezes MariaDB server `index` (SIGCONT).
    pub fn resume_mariadb(&self, index: usize) -> Result<(), ClusterError> {
        self.server(index)?.resume()
    }

    /// Stops applying on replica `replica` of `primary` (`STOP SLAVE SQL_THREAD`): it keeps
    /// receiving the primary's binary log into its relay log but applies none of it, so reads
    /// on it lag behind the primary until [`start_replica_sql`](Self::start_replica_sql) (or a
    /// restart of the replica, which starts both replication threads).
    pub async fn stop_replica_sql(&self, primary: usize, replica: usize) -> Result<(), ClusterError> {
        self.replica(primary, replica)?
            .execute_admin("stopping the SQL thread", sqlx::raw_sql("STOP SLAVE SQL_THREAD"))
            .await
    }

    /// Resumes applying on replica `replica` of `primary` (`START SLAVE SQL_THREAD`) and waits
    /// until its SQL thread runs. It then catches up on its own; see
    /// [`wait_replicas_caught_up`](Self::wait_replicas_caught_up).
    pub async fn start_replica_sql(&self, primary: usize, replica: usize) -> Result<(), ClusterError> {
        let server = self.replica(primary, replica)?;
        server
            .execute_admin("starting the SQL thread", sqlx::raw_sql("START SLAVE SQL_THREAD"))
            .await?;
        server.wait_replicating(IoThread::MayBeConnecting).await
    }

    /// Kills replica `replica` of `primary` with SIGKILL, as a crash would. Does nothing when
    /// it is stopped.
    pub fn kill_replica(&self, primary: usize, replica: usize) -> Result<(), ClusterError> {
        self.replica(primary, replica)?.kill()
    }

    /// Shuts replica `replica` of `primary` down cleanly (SIGTERM; SIGKILL after 10 s). Does
    /// nothing when it is stopped.
    pub async fn stop_replica(&self, primary: usize, replica: usize) -> Result<(), ClusterError> {
        self.replica(primary, replica)?.stop().await
    }

    /// (Re)starts replica `replica` of `primary` on its port and datadir and waits until it
    /// serves and both its replication threads run again. Does nothing when it already runs.
    ///
    /// The replica resumes replication by itself from the position it recorded in
    /// `mysql.gtid_slave_pos` (transactionally, with the data it applied), so neither a clean
    /// stop nor a SIGKILL loses or repeats a transaction. While its primary is stopped the
    /// receiving thread cannot connect; it then only has to be trying to (`Connecting`) and
    /// reconnects within a second of the primary's return. A paused primary makes this time out.
    pub async fn start_replica(&self, primary: usize, replica: usize) -> Result<(), ClusterError> {
        let server = self.replica(primary, replica)?;
        if server.is_running() {
            return Ok(());
        }
        server.start().await?;
        let io = if self.server(primary)?.is_running() {
            IoThread::Connected
        } else {
            IoThread::MayBeConnecting
        };
        server.wait_replicating(io).await
    }

    /// Waits until every running replica has applied everything its primary had logged when
    /// the call began (`@@gtid_binlog_pos` of the primary, `MASTER_GTID_WAIT` on the replica),
    /// `timeout` in all; fails with [`ClusterError::Replication`] when one has not by then.
    /// Replicas of a stopped primary are skipped: there is no position to read. A replica whose
    /// SQL thread is stopped never catches up. A server that does not answer at all (paused)
    /// fails the call after at most 10 s more per server.
    pub async fn wait_replicas_caught_up(&self, timeout: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        for (primary, replicas) in self.mariadb.iter().zip(&self.replicas) {
            if !primary.is_running() || !replicas.iter().any(MariaDbServer::is_running) {
                continue;
            }
            let position = primary.gtid_binlog_pos().await?;
            if position.is_empty() {
                continue;
            }
            for replica in replicas.iter().filter(|r| r.is_running()) {
                let left = deadline.saturating_duration_since(Instant::now());
                replica.wait_for_gtid(&position, left).await?;
            }
        }
        Ok(())
    }

    /// Shuts Redis down cleanly (SIGTERM; SIGKILL after 10 s).
    pub async fn stop_redis(&self) -> Result<(), ClusterError> {
        self.redis_server()?.stop().await
    }

    /// Kills Redis with SIGKILL; what it held since the last [`save_redis`](Self::save_redis)
    /// is lost (it persists nothing by itself).
    pub fn kill_redis(&self) -> Result<(), ClusterError> {
        self.redis_server()?.kill()
    }

    /// Snapshots Redis's data to its `dump.rdb` (`SAVE`), for a later
    /// [`start_redis`](Self::start_redis) to load.
    pub async fn save_redis(&self) -> Result<(), ClusterError> {
        self.redis_server()?.save().await
    }

    /// (Re)starts Redis on its port with the data of its last [`save_redis`](Self::save_redis)
    /// (empty if there was none) and waits until it answers `PING`.
    pub async fn start_redis(&self) -> Result<(), ClusterError> {
        self.redis_server()?.start().await
    }

    /// (Re)starts Redis on its port empty, whatever was saved, and waits until it answers
    /// `PING`.
    pub async fn start_redis_empty(&self) -> Result<(), ClusterError> {
        self.redis_server()?.start_empty().await
    }

    /// Freezes Redis (SIGSTOP).
    pub fn pause_redis(&self) -> Result<(), ClusterError> {
        self.redis_server()?.pause()
    }

    /// Unfreezes Redis (SIGCONT).
    pub fn resume_redis(&self) -> Result<(), ClusterError> {
        self.redis_server()?.resume()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let processes: Vec<&ServerProcess> = self
            .all_mariadb()
            .map(|s| &s.process)
            .chain(self.redis.iter().map(|r| &r.process))
            .chain(self.nats.iter().map(|n| &n.process))
            .collect();
        for process in &processes {
            process.terminate();
        }
        let deadline = Instant::now() + DROP_GRACE;
        while processes.iter().any(|p| !p.reap()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for process in &processes {
            process.kill();
        }
        unregister_live_dir(&self.path);
        if let Some(dir) = self.dir.take() {
            if let Err(e) = dir.close() {
                tracing::warn!(dir = %self.path.display(), error = %e, "cannot remove cluster directory");
            }
        }
    }
}
