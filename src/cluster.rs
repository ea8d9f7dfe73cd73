//! A throwaway local cluster of real servers (MariaDB and Redis), started from the binaries on
//! `PATH`, for `orderly playground` and the integration-test harness.
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
//!   would recover. A durable cluster (`orderly bench --durable`) keeps its files on disk and
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

/// `mariadbd` options shared by `mariadb-install-db` (which passes unknown options on to its
/// bootstrap `mariadbd`) and every server start, so the bootstrap creates the InnoDB files with
/// the geometry the server then uses unchanged.
const SHARED_MARIADB_OPTIONS: &[&str] = &[
    // Write the redo log to the OS at every commit but never fsync it: nothing on tmpfs is
    // durable anyway, and unlike `=0` a SIGKILLed server (fault tests) still recovers every
    // committed transaction, as a crashed production server would.
    "--innodb-flush-log-at-trx-commit=2",
    // The doublewrite buffer protects against torn pages on power loss, which a throwaway
    // cluster never sees; a killed process cannot tear a page. Halves page writes.
    "--innodb-doublewrite=0",
    // Enough for the test data sets; small so several clusters (one per test binary, run in
    // parallel) fit in memory. Pages live on tmpfs, so a miss is cheap.
    "--innodb-buffer-pool-size=128M",
    // Moderate redo log: large enough that test bursts do not force checkpoint flushing, small
    // because it is allocated in full on tmpfs (RAM) per server (the default is 96M).
    "--innodb-log-file-size=32M",
    // Instrumentation costs memory (~100M per server) and startup time; no test reads it.
    "--performance-schema=0",
    // No DNS: the machine may have no resolver, and a lookup per connection is pure latency.
    // Also keeps `mariadb-install-db` from resolving the host name.
    "--skip-name-resolve",
    // `--no-defaults` drops Debian's packaged configuration, whose charset is utf8mb4, and the
    // compiled-in default is latin1: restore what a packaged server uses.
    "--character-set-server=utf8mb4",
    "--collation-server=utf8mb4_general_ci",
];

/// `max_connections` of every server: tests open pools from many threads against every
/// shard, plus fault-test reconnect storms. What the bench and the playground size their
/// pools to fit (see [`crate::storage::budget`]).
pub const MAX_CONNECTIONS: u32 = 500;

/// `mariadbd` options for serving (not for the bootstrap).
const SERVER_MARIADB_OPTIONS: &[&str] = &[
    // Binary log with fixed file names (the default is derived from the host name), so a
    // replica can be attached later.
    "--log-bin=mariadb-bin",
    "--relay-log=relay-bin",
    // Row-based replication, as in production: deterministic for any statement.
    "--binlog-format=ROW",
    // Replicas must refuse out-of-order GTIDs instead of silently diverging.
    "--gtid-strict-mode=1",
    // A replica re-logs what it applies, so it can be promoted or chained.
    "--log-slave-updates",
    // Never fsync the binary log: it is still written to the OS at commit, so a SIGKILLed server
    // loses nothing, and tmpfs has nothing to sync to.
    "--sync-binlog=0",
    // Every connection keeps its prepared statements (one per shard table and statement):
    // hundreds of connections × hundreds of statements exceed the default of 16382.
    "--max-prepared-stmt-count=1048576",
    "--thread-handling=pool-of-threads",
    // No host cache: fault tests abort connections mid-handshake, and after
    // `max_connect_errors` of those the cache would block 127.0.0.1 for good.
    "--host-cache-size=0",
    // Nothing worth warming in a throwaway server; dumping at shutdown only slows `stop`.
    "--innodb-buffer-pool-dump-at-shutdown=0",
    "--innodb-buffer-pool-load-at-startup=0",
];

/// `mariadbd` options of a [`ClusterSpec::durable`] cluster, given after the others (the last
/// occurrence of an option wins): what a production server that must not lose an
/// acknowledged write on power loss runs with.
pub const DURABLE_MARIADB_OPTIONS: &[&str] = &[
    // fsync the redo log at every commit (group commit shares one fsync among the
    // transactions committing together).
    "--innodb-flush-log-at-trx-commit=1",
    // fsync the binary log at every commit group, so a replica never holds a transaction the
    // primary lost.
    "--sync-binlog=1",
    // Torn-page protection for data pages written during a power loss.
    "--innodb-doublewrite=1",
];

/// `mariadbd` options of a replica, given after the others.
const REPLICA_MARIADB_OPTIONS: &[&str] = &[
    // Clients cannot write by mistake, `orderly` included (see `REPLICA_INIT_SQL`); the
    // replication thread still applies the primary's events.
    "--read-only=1",
];

/// SQL run by every MariaDB server at every start (`--init-file`): one statement per line, no
/// comments (the init-file parser is minimal). `IF NOT EXISTS` makes restarts work. The
/// statements are kept out of the binary log: otherwise each server would log GTIDs of its own
/// (`0-<server_id>-1..4`), and a replica attached later in GTID strict mode would refuse the
/// primary's lower-numbered GTIDs of the same domain as out of order.
const INIT_SQL: &str = "SET SESSION sql_log_bin = 0;
CREATE USER IF NOT EXISTS 'orderly'@'%' IDENTIFIED BY 'orderly';
CREATE USER IF NOT EXISTS 'orderly'@'localhost' IDENTIFIED BY 'orderly';
GRANT ALL PRIVILEGES ON *.* TO 'orderly'@'%' WITH GRANT OPTION;
GRANT ALL PRIVILEGES ON *.* TO 'orderly'@'localhost' WITH GRANT OPTION;
";

/// [`INIT_SQL`] of a replica: `orderly` loses `READ ONLY ADMIN`, the one privilege that exempts
/// a user from `--read-only`, so a write through it fails instead of being applied. A write on a
/// replica would log a GTID of the replica's own, which GTID strict mode then refuses to follow
/// with the primary's: replication would stop for good. (It keeps `REPLICATION SLAVE ADMIN`,
/// for the harness's replication statements; the replication thread itself ignores
/// `read_only`.)
const REPLICA_INIT_SQL: &str = "REVOKE READ_ONLY ADMIN ON *.* FROM 'orderly'@'%';
REVOKE READ_ONLY ADMIN ON *.* FROM 'orderly'@'localhost';
";

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
        }
    }
}

impl ClusterSpec {
    /// Rejects specs whose replica server ids would collide (see [`REPLICA_SERVER_ID_BASE`]).
    fn validate(&self) -> Result<(), ClusterError> {
        if self.replicas_per_server == 0 {
            return Ok(());
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
        };
        let mut ports = PortPicker::default();

        // Redis first: it boots while MariaDB bootstraps.
        if let Some(binary) = binaries.redis {
            let redis = RedisServer::new(&cluster.path, binary, ports.pick()?)?;
            redis.spawn().await?;
            cluster.redis = Some(redis);
        }
        if let Some(binary) = binaries.nats {
            let nats = NatsServer::new(&cluster.path, binary, ports.pick()?)?;
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
                cluster.mariadb.push(MariaDbServer::new(
                    &cluster.path,
                    index,
                    None,
                    mariadbd.clone(),
                    init_file.clone(),
                    ports.pick()?,
                    spec.durable,
                )?);
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

/// One MariaDB server of a [`LocalCluster`]: a primary (a shard) or a read-only replica of one.
#[derive(Debug)]
pub struct MariaDbServer {
    index: usize,
    /// Index of the primary this server replicates; `None` for a primary.
    replica_of: Option<usize>,
    server_id: u32,
    port: u16,
    durable: bool,
    mariadbd: PathBuf,
    init_file: PathBuf,
    process: ServerProcess,
}

impl MariaDbServer {
    /// A primary with index `index` when `replica_of` is `None`, else replica `index` of
    /// primary `replica_of`.
    fn new(
        cluster_dir: &Path,
        index: usize,
        replica_of: Option<usize>,
        mariadbd: PathBuf,
        init_file: PathBuf,
        port: u16,
        durable: bool,
    ) -> Result<Self, ClusterError> {
        let (name, server_id) = match replica_of {
            None => (format!("mariadb-{index}"), index + 1),
            Some(primary) => (
                format!("mariadb-{primary}-r{index}"),
                REPLICA_SERVER_ID_BASE + primary * REPLICA_SERVER_ID_STRIDE + index + 1,
            ),
        };
        let dir = cluster_dir.join(&name);
        fs::create_dir(&dir).map_err(|e| ClusterError::io(format!("creating {}", dir.display()), e))?;
        // Cannot saturate: every server needs ~100 MB of memory, so n stays far below u32::MAX,
        // and `ClusterSpec::validate` bounds the replica ids.
        let server_id = u32::try_from(server_id).unwrap_or(u32::MAX);
        Ok(MariaDbServer {
            index,
            replica_of,
            server_id,
            port,
            durable,
            mariadbd,
            init_file,
            process: ServerProcess::new(name, dir.clone(), dir.join("error.log")),
        })
    }

    /// Index of this server: for a primary its index in the cluster
    /// ([`LocalCluster::mariadb`]), for a replica its index among its primary's replicas
    /// ([`LocalCluster::replica`]).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Index of the primary this server replicates, `None` for a primary.
    pub fn replica_of(&self) -> Option<usize> {
        self.replica_of
    }

    /// Its name in logs and errors, which is also its directory's: `mariadb-<i>` for primary
    /// `i`, `mariadb-<i>-r<r>` for replica `r` of primary `i`.
    pub fn name(&self) -> &str {
        &self.process.name
    }

    /// Its `server_id`: `index + 1` for a primary (`1..=n`), `1000 + 100 × primary + index + 1`
    /// for a replica (replica 0 of primary 0 is 1001, replica 1 of primary 2 is 1202).
    pub fn server_id(&self) -> u32 {
        self.server_id
    }

    /// Its TCP port on 127.0.0.1 (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mysql://orderly:orderly@127.0.0.1:PORT`: no database, no parameters.
    pub fn base_url(&self) -> String {
        format!("mysql://{USER}:{PASSWORD}@127.0.0.1:{}", self.port)
    }

    /// `mysql://orderly:orderly@127.0.0.1:PORT/{db}?ssl-mode=disabled` (the servers have no TLS).
    pub fn url(&self, db: &str) -> String {
        format!("{}/{db}?ssl-mode=disabled", self.base_url())
    }

    /// `mysql://orderly:orderly@127.0.0.1:PORT/?ssl-mode=disabled`: no default database, for
    /// `CREATE DATABASE` and server-wide statements.
    pub fn admin_url(&self) -> String {
        self.url("")
    }

    /// Its Unix socket.
    pub fn socket(&self) -> PathBuf {
        self.process.dir.join("mariadbd.sock")
    }

    /// Its datadir.
    pub fn datadir(&self) -> PathBuf {
        self.process.dir.join("data")
    }

    /// Its error log (which also receives the server's stdout and stderr).
    pub fn error_log(&self) -> &Path {
        &self.process.log
    }

    /// Pid of the running server, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Whether the server process is alive (paused counts as alive).
    pub fn is_running(&self) -> bool {
        self.process.pid().is_some()
    }

    /// (Re)starts the server on the same port and datadir and waits until it serves. Does
    /// nothing when it already runs. A replica restarts its replication threads by itself;
    /// [`LocalCluster::start_replica`] also waits until they run.
    pub async fn start(&self) -> Result<(), ClusterError> {
        if self.is_running() {
            return Ok(());
        }
        let log_offset = self.spawn(true).await?;
        self.wait_ready()
            .await
            .map_err(|f| self.process.not_ready(f, log_offset))
    }

    /// Shuts the server down cleanly (SIGTERM; SIGKILL after 10 s). Does nothing when stopped.
    pub async fn stop(&self) -> Result<(), ClusterError> {
        self.process.stop(STOP_GRACE).await;
        Ok(())
    }

    /// Kills the server with SIGKILL, as a crash would. Does nothing when stopped.
    pub fn kill(&self) -> Result<(), ClusterError> {
        self.process.kill();
        Ok(())
    }

    /// Freezes the server (SIGSTOP).
    pub fn pause(&self) -> Result<(), ClusterError> {
        self.process.signal(libc::SIGSTOP)
    }

    /// Unfreezes the server (SIGCONT).
    pub fn resume(&self) -> Result<(), ClusterError> {
        self.process.signal(libc::SIGCONT)
    }

    /// Spawns `mariadbd`; returns the error-log offset where this run's output starts.
    async fn spawn(&self, restart: bool) -> Result<u64, ClusterError> {
        let dir = &self.process.dir;
        let mut command = Command::new(&self.mariadbd);
        // `--no-defaults` must come first: no option file (the system server's) is read.
        command.arg("--no-defaults");
        if running_as_root() {
            // mariadbd refuses to run as root unless told to.
            command.arg("--user=root");
        }
        command
            .arg(path_arg("--datadir=", &self.datadir()))
            .arg(path_arg("--socket=", &self.socket()))
            .arg(path_arg("--pid-file=", &dir.join("mariadbd.pid")))
            .arg(path_arg("--log-error=", &self.process.log))
            .arg(path_arg("--init-file=", &self.init_file))
            // Temporary tables and files stay inside the cluster directory (and on tmpfs).
            .arg(path_arg("--tmpdir=", dir))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--port={}", self.port))
            .arg(format!("--server-id={}", self.server_id))
            .args(SHARED_MARIADB_OPTIONS)
            .args(SERVER_MARIADB_OPTIONS)
            .arg(format!("--max-connections={MAX_CONNECTIONS}"));
        if self.durable {
            command.args(DURABLE_MARIADB_OPTIONS);
        }
        if self.replica_of.is_some() {
            command.args(REPLICA_MARIADB_OPTIONS);
        }
        if restart {
            // A restart must get the same port back; connections of the previous run may hold
            // it briefly. mariadbd retries the bind once a second for this long.
            command.arg("--port-open-timeout=10");
        }
        self.process.spawn(command).await
    }

    /// Waits for the first start, moving to a fresh port when the chosen one was taken.
    async fn await_first_start(&mut self, ports: &mut PortPicker) -> Result<(), ClusterError> {
        let mut log_offset = 0;
        for attempt in 1..=PORT_ATTEMPTS {
            match self.wait_ready().await {
                Ok(()) => return Ok(()),
                Err(failure) if attempt < PORT_ATTEMPTS && self.process.lost_port(&failure, log_offset) => {
                    tracing::debug!(server = %self.process.name, port = self.port, "port taken, retrying");
                    self.port = ports.pick()?;
                    log_offset = self.spawn(false).await?;
                }
                Err(failure) => return Err(self.process.not_ready(failure, log_offset)),
            }
        }
        Err(self
            .process
            .not_ready(Failure::TimedOut("no attempt left".into()), log_offset))
    }

    async fn wait_ready(&self) -> Result<(), Failure> {
        let url = self.admin_url();
        self.process
            .wait_ready(|| async {
                let mut conn = MySqlConnection::connect(&url).await.map_err(|e| e.to_string())?;
                conn.ping().await.map_err(|e| e.to_string())?;
                // Closing politely keeps "aborted connection" noise out of the error log.
                let _ = conn.close().await;
                Ok(())
            })
            .await
    }

    /// Makes this (replica) server replicate `primary` with GTIDs and waits until both
    /// replication threads run.
    async fn attach_to(&self, primary: &MariaDbServer) -> Result<(), ClusterError> {
        // CHANGE MASTER takes no bound parameters; the port is a number we chose and the user
        // and password are constants, so nothing foreign reaches the statement. `slave_pos`:
        // start from the replica's own `mysql.gtid_slave_pos` (empty: the primary's first
        // GTID), and keep resuming from it after every restart. A 1 s retry brings a replica
        // back within a second of its primary's restart (the default is a minute).
        let change_master = format!(
            "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={}, MASTER_USER='{USER}', \
             MASTER_PASSWORD='{PASSWORD}', MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1",
            primary.port
        );
        self.execute_admin(
            "configuring replication",
            sqlx::raw_sql(sqlx::AssertSqlSafe(change_master)),
        )
        .await?;
        self.execute_admin("starting replication", sqlx::raw_sql("START SLAVE"))
            .await?;
        self.wait_replicating(IoThread::Connected).await
    }

    /// Logs in as `orderly`, within [`ADMIN_TIMEOUT`].
    async fn admin_connection(&self) -> Result<MySqlConnection, ClusterError> {
        let url = self.admin_url();
        self.bounded("logging in", ADMIN_TIMEOUT, MySqlConnection::connect(&url))
            .await
    }

    /// Runs `work` within `limit`, naming this server and `action` in its error.
    async fn bounded<T>(
        &self,
        action: &str,
        limit: Duration,
        work: impl std::future::Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, ClusterError> {
        match tokio::time::timeout(limit, work).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(ClusterError::Sql {
                server: self.process.name.clone(),
                action: action.into(),
                source,
            }),
            Err(_) => Err(ClusterError::Replication {
                server: self.process.name.clone(),
                reason: format!("{action}: no answer within {limit:?}"),
            }),
        }
    }

    /// Runs one administrative statement on a fresh connection. `sql` is sent as plain text:
    /// the replication statements cannot be prepared.
    async fn execute_admin(&self, action: &str, sql: sqlx::RawSql) -> Result<(), ClusterError> {
        let mut conn = self.admin_connection().await?;
        self.bounded(action, ADMIN_TIMEOUT, sql.execute(&mut conn))
            .await?;
        let _ = conn.close().await;
        Ok(())
    }

    /// `SHOW SLAVE STATUS` on `conn` (a connection to this server); `None` when replication
    /// was never configured.
    async fn replication_status(
        &self,
        conn: &mut MySqlConnection,
    ) -> Result<Option<ReplicationStatus>, ClusterError> {
        let action = "reading SHOW SLAVE STATUS";
        let Some(row) = self
            .bounded(
                action,
                ADMIN_TIMEOUT,
                sqlx::raw_sql("SHOW SLAVE STATUS").fetch_optional(&mut *conn),
            )
            .await?
        else {
            return Ok(None);
        };
        let column = |name: &str| {
            row.try_get::<String, _>(name)
                .map_err(|source| ClusterError::Sql {
                    server: self.process.name.clone(),
                    action: format!("{action}: column {name}"),
                    source,
                })
        };
        Ok(Some(ReplicationStatus {
            io_running: column("Slave_IO_Running")?,
            sql_running: column("Slave_SQL_Running")?,
            io_error: column("Last_IO_Error")?,
            sql_error: column("Last_SQL_Error")?,
        }))
    }

    /// Waits until this replica's SQL thread runs and its IO thread is as `io` asks, within
    /// [`READY_TIMEOUT`]. Fails at once when a thread stopped on an error: it would not
    /// restart by itself.
    async fn wait_replicating(&self, io: IoThread) -> Result<(), ClusterError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut conn = self.admin_connection().await?;
        loop {
            let status = self.replication_status(&mut conn).await?;
            let failed = |reason: String| ClusterError::Replication {
                server: self.process.name.clone(),
                reason,
            };
            match &status {
                None => return Err(failed("replication is not configured".into())),
                Some(s) if s.sql_running == "Yes" && io.accepts(&s.io_running) => {
                    let _ = conn.close().await;
                    return Ok(());
                }
                Some(s) if s.sql_running == "No" && !s.sql_error.is_empty() => {
                    return Err(failed(format!("the SQL thread stopped: {}", s.sql_error)));
                }
                Some(s) if s.io_running == "No" && !s.io_error.is_empty() => {
                    return Err(failed(format!("the IO thread stopped: {}", s.io_error)));
                }
                Some(s) if Instant::now() >= deadline => {
                    return Err(failed(format!(
                        "replication threads not running after {READY_TIMEOUT:?}: {s}"
                    )));
                }
                Some(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    /// `@@gtid_binlog_pos`: the last GTID this server logged in every replication domain
    /// (empty when it logged none).
    async fn gtid_binlog_pos(&self) -> Result<String, ClusterError> {
        let mut conn = self.admin_connection().await?;
        let position: String = self
            .bounded(
                "reading @@gtid_binlog_pos",
                ADMIN_TIMEOUT,
                sqlx::query_scalar("SELECT @@gtid_binlog_pos").fetch_one(&mut conn),
            )
            .await?;
        let _ = conn.close().await;
        Ok(position)
    }

    /// Waits up to `timeout` until this replica has applied `position`
    /// (`MASTER_GTID_WAIT`).
    async fn wait_for_gtid(&self, position: &str, timeout: Duration) -> Result<(), ClusterError> {
        let mut conn = self.admin_connection().await?;
        // The server enforces `timeout`; the margin only bounds a server that stops answering.
        let outcome: Option<i64> = self
            .bounded(
                "waiting for a GTID position",
                timeout + ADMIN_TIMEOUT,
                sqlx::query_scalar("SELECT MASTER_GTID_WAIT(?, ?)")
                    .bind(position)
                    .bind(timeout.as_secs_f64())
                    .fetch_one(&mut conn),
            )
            .await?;
        let _ = conn.close().await;
        match outcome {
            Some(0) => Ok(()),
            Some(-1) => Err(ClusterError::Replication {
                server: self.process.name.clone(),
                reason: format!("did not apply the primary's GTIDs {position} within {timeout:?}"),
            }),
            other => Err(ClusterError::Replication {
                server: self.process.name.clone(),
                reason: format!("MASTER_GTID_WAIT('{position}') answered {other:?}"),
            }),
        }
    }
}

/// The state of a replica's IO (receiving) thread that [`MariaDbServer::wait_replicating`]
/// accepts.
#[derive(Debug, Clone, Copy)]
enum IoThread {
    /// Connected to the primary (`Yes`).
    Connected,
    /// Running, connected or still trying to connect (`Yes` or `Connecting`): its primary may
    /// be down, or it was not asked about.
    MayBeConnecting,
}

impl IoThread {
    fn accepts(self, state: &str) -> bool {
        match self {
            IoThread::Connected => state == "Yes",
            IoThread::MayBeConnecting => state == "Yes" || state == "Connecting",
        }
    }
}

/// The parts of `SHOW SLAVE STATUS` the harness looks at.
#[derive(Debug)]
struct ReplicationStatus {
    /// `Slave_IO_Running`: `Yes`, `Connecting` or `No`.
    io_running: String,
    /// `Slave_SQL_Running`: `Yes` or `No`.
    sql_running: String,
    io_error: String,
    sql_error: String,
}

impl std::fmt::Display for ReplicationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Slave_IO_Running={}, Slave_SQL_Running={}, Last_IO_Error={:?}, Last_SQL_Error={:?}",
            self.io_running, self.sql_running, self.io_error, self.sql_error
        )
    }
}

/// The Redis server of a [`LocalCluster`].
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    binary: PathBuf,
    process: ServerProcess,
}

impl RedisServer {
    fn new(cluster_dir: &Path, binary: PathBuf, port: u16) -> Result<Self, ClusterError> {
        let dir = cluster_dir.join("redis");
        fs::create_dir(&dir).map_err(|e| ClusterError::io(format!("creating {}", dir.display()), e))?;
        Ok(RedisServer {
            port,
            binary,
            process: ServerProcess::new("redis".into(), dir.clone(), dir.join("redis.log")),
        })
    }

    /// Its TCP port on 127.0.0.1 (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its log (the server's stdout and stderr).
    pub fn log(&self) -> &Path {
        &self.process.log
    }

    /// Pid of the running server, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Whether the server process is alive (paused counts as alive).
    pub fn is_running(&self) -> bool {
        self.process.pid().is_some()
    }

    /// (Re)starts Redis on the same port and waits until it answers `PING`. Does nothing when
    /// it already runs.
    ///
    /// It comes back with whatever its `dump.rdb` holds: the data of the last
    /// [`save`](Self::save), however long ago, or nothing if it was never saved. Nothing else is
    /// persisted (no save points, no AOF): writes after the last `SAVE` are gone. For a
    /// restart that is empty for sure, use [`start_empty`](Self::start_empty).
    pub async fn start(&self) -> Result<(), ClusterError> {
        if self.is_running() {
            return Ok(());
        }
        let log_offset = self.spawn().await?;
        self.wait_ready()
            .await
            .map_err(|f| self.process.not_ready(f, log_offset))
    }

    /// (Re)starts Redis empty: removes its `dump.rdb`, then [`start`](Self::start)s it. Does
    /// nothing when it already runs (a running server keeps its data).
    pub async fn start_empty(&self) -> Result<(), ClusterError> {
        if self.is_running() {
            return Ok(());
        }
        let dump = self.dump_file();
        match fs::remove_file(&dump) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ClusterError::io(format!("removing {}", dump.display()), e)),
        }
        self.start().await
    }

    /// Writes a snapshot of the data to `dump.rdb` in its directory (`SAVE`, which works
    /// without save points) and waits for it; the next [`start`](Self::start) loads it.
    pub async fn save(&self) -> Result<(), ClusterError> {
        if !self.is_running() {
            return Err(ClusterError::NotRunning(self.process.name.clone()));
        }
        // A test's data saves in milliseconds; the bound is for a paused server, which would
        // otherwise hold the caller forever.
        match tokio::time::timeout(Duration::from_secs(30), redis_command(self.port, "SAVE", "+OK")).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ClusterError::io("redis SAVE", io::Error::other(e))),
            Err(_) => Err(ClusterError::io(
                "redis SAVE",
                io::Error::new(io::ErrorKind::TimedOut, "no reply within 30 s"),
            )),
        }
    }

    /// The snapshot [`save`](Self::save) writes and [`start`](Self::start) loads.
    fn dump_file(&self) -> PathBuf {
        // Redis's default `dbfilename`, in the `--dir` it is started with.
        self.process.dir.join("dump.rdb")
    }

    /// Shuts Redis down (SIGTERM; SIGKILL after 10 s). Does nothing when stopped.
    pub async fn stop(&self) -> Result<(), ClusterError> {
        self.process.stop(STOP_GRACE).await;
        Ok(())
    }

    /// Kills Redis with SIGKILL. Does nothing when stopped.
    pub fn kill(&self) -> Result<(), ClusterError> {
        self.process.kill();
        Ok(())
    }

    /// Freezes Redis (SIGSTOP).
    pub fn pause(&self) -> Result<(), ClusterError> {
        self.process.signal(libc::SIGSTOP)
    }

    /// Unfreezes Redis (SIGCONT).
    pub fn resume(&self) -> Result<(), ClusterError> {
        self.process.signal(libc::SIGCONT)
    }

    async fn spawn(&self) -> Result<u64, ClusterError> {
        let mut command = Command::new(&self.binary);
        command
            .arg("--port")
            .arg(self.port.to_string())
            // Loopback only: nothing outside this machine may reach a password-less server.
            .arg("--bind")
            .arg("127.0.0.1")
            // No RDB snapshots and no AOF: a throwaway cache, and fork-for-save would only cost
            // memory and latency spikes.
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            // Anything Redis might still write goes into the cluster directory: the
            // `dump.rdb` of an explicit `SAVE` (see `save`), which the next start loads.
            .arg("--dir")
            .arg(&self.process.dir)
            // In the foreground, so it stays our child: we signal and reap it directly.
            .arg("--daemonize")
            .arg("no");
        self.process.spawn(command).await
    }

    async fn await_first_start(&mut self, ports: &mut PortPicker) -> Result<(), ClusterError> {
        let mut log_offset = 0;
        for attempt in 1..=PORT_ATTEMPTS {
            match self.wait_ready().await {
                Ok(()) => return Ok(()),
                Err(failure) if attempt < PORT_ATTEMPTS && self.process.lost_port(&failure, log_offset) => {
                    tracing::debug!(port = self.port, "redis port taken, retrying");
                    self.port = ports.pick()?;
                    log_offset = self.spawn().await?;
                }
                Err(failure) => return Err(self.process.not_ready(failure, log_offset)),
            }
        }
        Err(self
            .process
            .not_ready(Failure::TimedOut("no attempt left".into()), log_offset))
    }

    async fn wait_ready(&self) -> Result<(), Failure> {
        let port = self.port;
        self.process.wait_ready(|| redis_ping(port)).await
    }
}

/// Sends `PING` to the Redis server on `port` over a raw connection and expects `+PONG`.
async fn redis_ping(port: u16) -> Result<(), String> {
    redis_command(port, "PING", "+PONG").await
}

/// Sends the argument-less `command` to the Redis server on `port` over a raw connection and
/// expects a reply starting with `expected` (a status reply such as `+OK`).
async fn redis_command(port: u16, command: &str, expected: &str) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("*1\r\n${}\r\n{command}\r\n", command.len()).as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 64];
    while !reply.ends_with(b"\r\n") {
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before a reply".into());
        }
        reply.extend_from_slice(&buf[..n]);
    }
    if reply.starts_with(expected.as_bytes()) {
        Ok(())
    } else {
        Err(format!("unexpected reply {:?}", String::from_utf8_lossy(&reply)))
    }
}

/// The NATS server of a [`LocalCluster`], with JetStream, its files in the cluster directory.
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    binary: PathBuf,
    process: ServerProcess,
}

impl NatsServer {
    fn new(cluster_dir: &Path, binary: PathBuf, port: u16) -> Result<Self, ClusterError> {
        let dir = cluster_dir.join("nats");
        fs::create_dir(&dir).map_err(|e| ClusterError::io(format!("creating {}", dir.display()), e))?;
        Ok(NatsServer {
            port,
            binary,
            process: ServerProcess::new("nats".into(), dir.clone(), dir.join("nats.log")),
        })
    }

    /// Its TCP port on 127.0.0.1 (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its log (the server's stdout and stderr).
    pub fn log(&self) -> &Path {
        &self.process.log
    }

    /// Whether the server process is alive.
    pub fn is_running(&self) -> bool {
        self.process.pid().is_some()
    }

    /// (Re)starts NATS on the same port and JetStream directory (every stream comes back) and
    /// waits until it answers `PING`. Does nothing when it already runs.
    pub async fn start(&self) -> Result<(), ClusterError> {
        if self.is_running() {
            return Ok(());
        }
        let log_offset = self.spawn().await?;
        self.wait_ready()
            .await
            .map_err(|f| self.process.not_ready(f, log_offset))
    }

    /// Shuts NATS down (SIGTERM; SIGKILL after 10 s). Does nothing when stopped.
    pub async fn stop(&self) -> Result<(), ClusterError> {
        self.process.stop(STOP_GRACE).await;
        Ok(())
    }

    /// Kills NATS with SIGKILL. Does nothing when stopped.
    pub fn kill(&self) -> Result<(), ClusterError> {
        self.process.kill();
        Ok(())
    }

    async fn spawn(&self) -> Result<u64, ClusterError> {
        let mut command = Command::new(&self.binary);
        command
            // Loopback only, like every server of the cluster.
            .arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-js")
            // JetStream's files in the cluster directory: they survive a kill and a restart
            // (a broker crash loses nothing it acknowledged), and go with the cluster.
            .arg("-sd")
            .arg(self.process.dir.join("js"));
        self.process.spawn(command).await
    }

    async fn await_first_start(&mut self, ports: &mut PortPicker) -> Result<(), ClusterError> {
        let mut log_offset = 0;
        for attempt in 1..=PORT_ATTEMPTS {
            match self.wait_ready().await {
                Ok(()) => return Ok(()),
                Err(failure) if attempt < PORT_ATTEMPTS && self.process.lost_port(&failure, log_offset) => {
                    tracing::debug!(port = self.port, "nats port taken, retrying");
                    self.port = ports.pick()?;
                    log_offset = self.spawn().await?;
                }
                Err(failure) => return Err(self.process.not_ready(failure, log_offset)),
            }
        }
        Err(self
            .process
            .not_ready(Failure::TimedOut("no attempt left".into()), log_offset))
    }

    async fn wait_ready(&self) -> Result<(), Failure> {
        let port = self.port;
        self.process.wait_ready(|| nats_ping(port)).await
    }
}

/// Speaks the start of the NATS protocol on `port`: the server's `INFO`, then `CONNECT` and
/// `PING`, expecting `PONG`.
async fn nats_ping(port: u16) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .map_err(|e| e.to_string())?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let mut sent = false;
    loop {
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before PONG".into());
        }
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        if !sent && text.contains("\r\n") {
            if !text.starts_with("INFO ") {
                return Err(format!("unexpected greeting {:?}", text));
            }
            stream
                .write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n")
                .await
                .map_err(|e| e.to_string())?;
            sent = true;
        }
        if text.contains("PONG\r\n") {
            return Ok(());
        }
        if text.contains("-ERR") {
            return Err(format!("server refused: {text:?}"));
        }
    }
}

/// Why a server did not become ready.
#[derive(Debug)]
enum Failure {
    Exited(String),
    TimedOut(String),
}

/// A server child process: spawning, signals, reaping, its log.
#[derive(Debug)]
struct ServerProcess {
    name: String,
    /// The server's own directory: its working directory and the home of `child.pid`.
    dir: PathBuf,
    /// Receives the child's stdout and stderr.
    log: PathBuf,
    /// The current child; `None` before the first spawn and once reaped.
    child: Mutex<Option<Child>>,
}

impl ServerProcess {
    fn new(name: String, dir: PathBuf, log: PathBuf) -> Self {
        ServerProcess {
            name,
            dir,
            log,
            child: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Spawns `command` (on the spawner thread, with stdio to the log) as this server's child
    /// and records its pid; returns the log offset where its output starts.
    async fn spawn(&self, mut command: Command) -> Result<u64, ClusterError> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| ClusterError::io(format!("opening {}", self.log.display()), e))?;
        let log_offset = log
            .metadata()
            .map_err(|e| ClusterError::io(format!("reading {}", self.log.display()), e))?
            .len();
        let stderr = log
            .try_clone()
            .map_err(|e| ClusterError::io(format!("duplicating {}", self.log.display()), e))?;
        command
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        let program = command.get_program().to_string_lossy().into_owned();
        let child = spawn_on_spawner_thread(command)
            .await?
            .map_err(|e| ClusterError::io(format!("spawning {program} for {}", self.name), e))?;
        let pid_file = self.dir.join(CHILD_PID_FILE);
        let pid = child.id();
        *self.lock() = Some(child);
        fs::write(&pid_file, format!("{pid}\n"))
            .map_err(|e| ClusterError::io(format!("writing {}", pid_file.display()), e))?;
        Ok(log_offset)
    }

    /// Pid of the child if it is still alive; reaps it otherwise.
    fn pid(&self) -> Option<u32> {
        let mut guard = self.lock();
        let alive = match guard.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            // Exited, or not waitable any more: either way it is gone.
            Some(Ok(Some(_)) | Err(_)) | None => false,
        };
        if alive {
            guard.as_ref().map(Child::id)
        } else {
            *guard = None;
            None
        }
    }

    /// Reaps the child if it exited; true when no child is left.
    fn reap(&self) -> bool {
        self.pid().is_none()
    }

    /// Sends `signal` to the running child.
    fn signal(&self, signal: libc::c_int) -> Result<(), ClusterError> {
        let pid = self
            .pid()
            .ok_or_else(|| ClusterError::NotRunning(self.name.clone()))?;
        send_signal(pid, signal).map_err(|e| ClusterError::io(format!("signalling {}", self.name), e))
    }

    /// SIGTERM, plus SIGCONT so that a paused child can act on it.
    fn terminate(&self) {
        if let Some(pid) = self.pid() {
            let _ = send_signal(pid, libc::SIGTERM);
            let _ = send_signal(pid, libc::SIGCONT);
        }
    }

    /// SIGKILL and reap. Infallible in practice: SIGKILL cannot be ignored, and the wait
    /// returns as soon as the kernel tore the process down.
    fn kill(&self) {
        let mut guard = self.lock();
        if let Some(mut child) = guard.take() {
            if let Ok(None) = child.try_wait() {
                if let Err(e) = child.kill() {
                    tracing::warn!(server = %self.name, error = %e, "cannot kill server");
                }
                let _ = child.wait();
            }
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL.
    async fn stop(&self, grace: Duration) {
        self.terminate();
        let deadline = Instant::now() + grace;
        while !self.reap() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.kill();
    }

    /// Polls `probe` until it succeeds, the child exits, or [`READY_TIMEOUT`] passes.
    async fn wait_ready<F, Fut>(&self, probe: F) -> Result<(), Failure>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            {
                let mut guard = self.lock();
                match guard.as_mut().map(Child::try_wait) {
                    Some(Ok(None)) => {}
                    Some(Ok(Some(status))) => {
                        *guard = None;
                        return Err(Failure::Exited(format!("exited during startup ({status})")));
                    }
                    Some(Err(e)) => return Err(Failure::Exited(format!("cannot wait for it: {e}"))),
                    None => return Err(Failure::Exited("not running".into())),
                }
            }
            let last_error = match tokio::time::timeout(PROBE_TIMEOUT, probe()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => e,
                Err(_) => format!("probe timed out after {PROBE_TIMEOUT:?}"),
            };
            if Instant::now() >= deadline {
                return Err(Failure::TimedOut(format!(
                    "not ready after {READY_TIMEOUT:?}; last probe error: {last_error}"
                )));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Whether the child exited because its port was taken (retry on another port).
    fn lost_port(&self, failure: &Failure, log_offset: u64) -> bool {
        // MariaDB and Redis say "Address already in use", NATS "address already in use".
        matches!(failure, Failure::Exited(_))
            && self
                .log_tail(log_offset)
                .to_ascii_lowercase()
                .contains("address already in use")
    }

    fn not_ready(&self, failure: Failure, log_offset: u64) -> ClusterError {
        let reason = match failure {
            Failure::Exited(reason) | Failure::TimedOut(reason) => reason,
        };
        ClusterError::NotReady {
            server: self.name.clone(),
            reason,
            log: self.log.clone(),
            tail: self.log_tail(log_offset),
        }
    }

    /// The last lines written to the log since `offset`.
    fn log_tail(&self, offset: u64) -> String {
        let read = || -> io::Result<Vec<u8>> {
            let mut file = fs::File::open(&self.log)?;
            file.seek(SeekFrom::Start(offset))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            Ok(bytes)
        };
        match read() {
            Ok(bytes) => tail_lines(&String::from_utf8_lossy(&bytes), LOG_TAIL_LINES),
            Err(e) => format!("(cannot read the log: {e})"),
        }
    }
}

fn tail_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The server binaries a spec needs.
struct Binaries {
    /// `(mariadbd, mariadb-install-db)` when MariaDB servers are wanted.
    mariadb: Option<(PathBuf, PathBuf)>,
    redis: Option<PathBuf>,
    nats: Option<PathBuf>,
}

impl Binaries {
    fn find(spec: &ClusterSpec) -> Result<Self, ClusterError> {
        let require = |binary: &'static str, package: &'static str| {
            find_binary(binary).ok_or(ClusterError::MissingBinary { binary, package })
        };
        let mariadb = if spec.mariadb_servers > 0 {
            Some((
                require("mariadbd", "mariadb-server")?,
                require("mariadb-install-db", "mariadb-server")?,
            ))
        } else {
            None
        };
        let redis = if spec.with_redis {
            Some(require("redis-server", "redis-server")?)
        } else {
            None
        };
        let nats = if spec.with_nats {
            Some(require("nats-server", "nats-server")?)
        } else {
            None
        };
        Ok(Binaries { mariadb, redis, nats })
    }
}

/// Looks `name` up on `PATH`, then in the sbin/bin directories: `mariadbd` lives in `/usr/sbin`,
/// which is not on a non-root user's `PATH`.
fn find_binary(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    dirs.extend(
        ["/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"]
            .iter()
            .map(PathBuf::from),
    );
    dirs.into_iter().map(|dir| dir.join(name)).find(|candidate| {
        fs::metadata(candidate)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// Creates the cluster directory (after sweeping stale siblings) and records its owner.
fn create_cluster_dir(
    base_dir: Option<&Path>,
    durable: bool,
) -> Result<(tempfile::TempDir, PathBuf), ClusterError> {
    let candidates: Vec<PathBuf> = match base_dir {
        Some(dir) => vec![dir.to_path_buf()],
        // Durable data must be on a disk: tmpfs would make every fsync free.
        None if durable => vec![std::env::temp_dir()],
        None => vec![PathBuf::from("/dev/shm"), std::env::temp_dir()],
    };
    let mut last_error = None;
    for parent in candidates {
        // Canonical, so the paths we record match what the kernel reports in /proc.
        let Ok(parent) = parent.canonicalize() else {
            continue;
        };
        sweep_stale_dirs(&parent);
        match tempfile::Builder::new().prefix(DIR_PREFIX).tempdir_in(&parent) {
            Ok(dir) => {
                let path = dir.path().to_path_buf();
                let owner = path.join(OWNER_PID_FILE);
                fs::write(&owner, format!("{}\n", std::process::id()))
                    .map_err(|e| ClusterError::io(format!("writing {}", owner.display()), e))?;
                register_live_dir(&path);
                return Ok((dir, path));
            }
            Err(e) => last_error = Some((parent, e)),
        }
    }
    Err(match last_error {
        Some((parent, e)) => {
            ClusterError::io(format!("creating a cluster directory in {}", parent.display()), e)
        }
        None => ClusterError::io(
            "finding a directory for the cluster",
            io::Error::new(io::ErrorKind::NotFound, "no usable base directory"),
        ),
    })
}

/// Bootstraps the first datadir with `mariadb-install-db` and copies it to the others.
async fn install_datadirs(install_db: PathBuf, datadirs: Vec<PathBuf>) -> Result<(), ClusterError> {
    let Some(first) = datadirs.first().cloned() else {
        return Ok(());
    };
    let mut command = Command::new(&install_db);
    command
        .arg("--no-defaults")
        .arg(path_arg("--datadir=", &first))
        // root@localhost without a password: the cluster's own tooling may use it.
        .arg("--auth-root-authentication-method=normal")
        .arg("--skip-test-db")
        .args(SHARED_MARIADB_OPTIONS)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(parent) = first.parent() {
        command.current_dir(parent);
        // The bootstrap's temporary tables stay in the cluster directory: two bootstraps
        // sharing /tmp have been seen to lose each other's temporary files.
        command.arg(path_arg("--tmpdir=", parent));
    }
    if running_as_root() {
        command.arg("--user=root");
    }
    let child = spawn_on_spawner_thread(command)
        .await?
        .map_err(|e| ClusterError::io(format!("spawning {}", install_db.display()), e))?;
    tokio::task::spawn_blocking(move || -> Result<(), ClusterError> {
        let output = child
            .wait_with_output()
            .map_err(|e| ClusterError::io("waiting for mariadb-install-db", e))?;
        if !output.status.success() {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            return Err(ClusterError::InstallDb {
                datadir: first,
                status: output.status,
                output: tail_lines(&text, LOG_TAIL_LINES),
            });
        }
        for other in &datadirs[1..] {
            copy_dir(&first, other).map_err(|e| {
                ClusterError::io(format!("copying {} to {}", first.display(), other.display()), e)
            })?;
        }
        Ok(())
    })
    .await
    .map_err(|e| ClusterError::io("bootstrapping MariaDB", io::Error::other(e)))?
}

fn copy_dir(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn path_arg(flag: &str, path: &Path) -> std::ffi::OsString {
    let mut arg = std::ffi::OsString::from(flag);
    arg.push(path);
    arg
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn send_signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn pid_alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    exists || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Free ports on 127.0.0.1, never the same twice within one cluster.
#[derive(Default)]
struct PortPicker {
    handed_out: HashSet<u16>,
}

impl PortPicker {
    /// Binds port 0 and releases it. Racy by nature (another process may take the port before
    /// the server binds it); the callers retry on another port when the server cannot bind.
    fn pick(&mut self) -> Result<u16, ClusterError> {
        for _ in 0..32 {
            let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
                .map_err(ClusterError::NoFreePort)?;
            let port = listener.local_addr().map_err(ClusterError::NoFreePort)?.port();
            if self.handed_out.insert(port) {
                return Ok(port);
            }
        }
        Err(ClusterError::NoFreePort(io::Error::new(
            io::ErrorKind::AddrInUse,
            "the kernel keeps handing out ports already chosen",
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// The spawner thread.

struct SpawnRequest {
    command: Command,
    reply: oneshot::Sender<io::Result<Child>>,
}

/// Spawns `command` on the process-wide spawner thread, dying with this process.
async fn spawn_on_spawner_thread(mut command: Command) -> Result<io::Result<Child>, ClusterError> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, inbox) = mpsc::channel::<SpawnRequest>();
        // The sender lives in this static for the whole process, so the loop never ends and
        // the thread never exits: PR_SET_PDEATHSIG fires only when the process dies.
        std::thread::Builder::new()
            .name("orderly-cluster-spawner".into())
            .spawn(move || {
                for mut request in inbox {
                    let _ = request.reply.send(request.command.spawn());
                }
            })
            .ok()
            .map(|_| requests)
    });
    let spawner = spawner.as_ref().ok_or(ClusterError::SpawnerUnavailable)?;
    die_with_this_process(&mut command);
    let (reply, result) = oneshot::channel();
    spawner
        .send(SpawnRequest { command, reply })
        .map_err(|_| ClusterError::SpawnerUnavailable)?;
    result.await.map_err(|_| ClusterError::SpawnerUnavailable)
}

/// Makes the kernel SIGKILL the child when the thread that forks it exits (see module docs).
fn die_with_this_process(command: &mut Command) {
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (prctl, getppid) and builds an io::Error without allocating.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent died between fork and prctl: the signal was never going to come.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Leftovers: live clusters at exit, stale clusters of dead owners.

/// Directories of the clusters alive in this process, for the `atexit` hook.
static LIVE_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn register_live_dir(dir: &Path) {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // SAFETY: registering a plain `extern "C" fn` that never unwinds.
        if unsafe { libc::atexit(clean_live_dirs_at_exit) } != 0 {
            tracing::warn!("cannot register the cluster exit hook; a later start sweeps leftovers");
        }
    });
    LIVE_DIRS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(dir.to_path_buf());
}

fn unregister_live_dir(dir: &Path) {
    LIVE_DIRS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .retain(|live| live != dir);
}

/// Kills the servers of clusters never dropped (e.g. kept in a `static` by a test harness) and
/// removes their directories. Must not panic: it runs inside `exit`.
extern "C" fn clean_live_dirs_at_exit() {
    let dirs = match LIVE_DIRS.try_lock() {
        Ok(guard) => guard.clone(),
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner().clone(),
        // Another thread is mid-start or mid-drop; the next start sweeps what is left.
        Err(TryLockError::WouldBlock) => return,
    };
    for dir in dirs {
        kill_recorded_servers(&dir);
        let _ = fs::remove_dir_all(&dir);
    }
}

/// Removes `orderly-cluster-*` directories in `parent` whose owner process is gone, killing
/// servers still recorded in them. Best effort: failures only leave the directory behind.
fn sweep_stale_dirs(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.as_bytes().starts_with(DIR_PREFIX.as_bytes()) {
            continue;
        }
        let dir = entry.path();
        let Ok(meta) = fs::symlink_metadata(&dir) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let owner = fs::read_to_string(dir.join(OWNER_PID_FILE))
            .ok()
            .and_then(|text| text.trim().parse::<libc::pid_t>().ok());
        match owner {
            Some(pid) if pid_alive(pid) => continue,
            Some(_) => {}
            None => {
                let young = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .is_none_or(|age| age < ORPHAN_MIN_AGE);
                if young {
                    continue;
                }
            }
        }
        tracing::info!(dir = %dir.display(), "removing a stale cluster directory");
        kill_recorded_servers(&dir);
        if let Err(e) = fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a stale cluster directory");
        }
    }
}

/// SIGKILLs every server recorded by a `child.pid` in `cluster_dir`'s server directories,
/// provided the process really runs in (or names) that directory, so a pid reused by an
/// unrelated process is left alone.
fn kill_recorded_servers(cluster_dir: &Path) {
    let Ok(entries) = fs::read_dir(cluster_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let server_dir = entry.path();
        let Some(pid) = fs::read_to_string(server_dir.join(CHILD_PID_FILE))
            .ok()
            .and_then(|text| text.trim().parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if pid > 0 && process_belongs_to(pid, cluster_dir) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn process_belongs_to(pid: libc::pid_t, cluster_dir: &Path) -> bool {
    // Servers run with their working directory inside the cluster directory (mariadbd moves to
    // its datadir, Redis to its --dir); a deleted one reads as "<path> (deleted)".
    if let Ok(cwd) = fs::read_link(format!("/proc/{pid}/cwd")) {
        if cwd.starts_with(cluster_dir) {
            return true;
        }
    }
    let needle: &OsStr = cluster_dir.as_os_str();
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| cmdline.windows(needle.len()).any(|w| w == needle.as_bytes()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn two_mariadb_servers_and_redis_start_serve_and_vanish_on_drop() {
        let began = Instant::now();
        let cluster = LocalCluster::start(ClusterSpec {
            mariadb_servers: 2,
            with_redis: true,
            with_nats: false,
            base_dir: None,
            durable: false,
            replicas_per_server: 0,
        })
        .await
        .expect("the cluster starts");
        eprintln!(
            "local cluster (2 MariaDB + Redis) started in {:?} in {}",
            began.elapsed(),
            cluster.dir().display()
        );

        let mut server_ids = Vec::new();
        for server in cluster.mariadb_servers() {
            let mut conn = MySqlConnection::connect(&server.admin_url())
                .await
                .expect("orderly can log in");
            let row = sqlx::query("SELECT @@server_id, @@log_bin, @@gtid_strict_mode")
                .fetch_one(&mut conn)
                .await
                .expect("query runs");
            let server_id: u64 = row.get(0);
            let log_bin: i64 = row.get(1);
            let gtid_strict_mode: i64 = row.get(2);
            assert_eq!(server_id, u64::from(server.server_id()));
            assert_eq!(log_bin, 1, "binary log is on");
            assert_eq!(gtid_strict_mode, 1, "GTID strict mode is on");
            server_ids.push(server_id);
            conn.close().await.expect("close");
        }
        assert_ne!(server_ids[0], server_ids[1], "server ids are distinct");
        assert!(cluster.mariadb_urls()[0].starts_with("mysql://orderly:orderly@127.0.0.1:"));

        let redis = cluster.redis().expect("redis is part of the cluster");
        redis_ping(redis.port()).await.expect("redis answers PING");
        assert_eq!(
            cluster.redis_url(),
            Some(format!("redis://127.0.0.1:{}", redis.port()))
        );

        let dir = cluster.dir().to_path_buf();
        let pids: Vec<u32> = cluster
            .mariadb_servers()
            .iter()
            .filter_map(MariaDbServer::pid)
            .chain(redis.pid())
            .collect();
        assert_eq!(pids.len(), 3);
        drop(cluster);
        assert!(!dir.exists(), "{} is removed", dir.display());
        for pid in pids {
            let pid = libc::pid_t::try_from(pid).expect("pid fits");
            assert!(!pid_alive(pid), "server {pid} is dead");
        }
    }

    #[tokio::test]
    async fn a_durable_cluster_lives_on_disk_and_syncs_every_commit() {
        let cluster = LocalCluster::start(ClusterSpec {
            mariadb_servers: 1,
            with_redis: false,
            with_nats: false,
            base_dir: None,
            durable: true,
            replicas_per_server: 0,
        })
        .await
        .expect("the cluster starts");
        assert!(
            !cluster.dir().starts_with("/dev/shm"),
            "{}",
            cluster.dir().display()
        );
        let mut conn = MySqlConnection::connect(&cluster.mariadb(0).admin_url())
            .await
            .expect("login");
        let row = sqlx::query(
            "SELECT @@innodb_flush_log_at_trx_commit, @@sync_binlog, @@innodb_doublewrite, @@log_bin",
        )
        .fetch_one(&mut conn)
        .await
        .expect("query runs");
        let flush: u64 = row.get(0);
        let sync: u64 = row.get(1);
        let doublewrite: i64 = row.get(2);
        let log_bin: i64 = row.get(3);
        assert_eq!((flush, sync, doublewrite, log_bin), (1, 1, 1, 1));
        conn.close().await.expect("close");
    }

    #[tokio::test]
    async fn killed_or_paused_servers_come_back_with_their_data() {
        let cluster = LocalCluster::start(ClusterSpec {
            mariadb_servers: 1,
            with_redis: true,
            with_nats: false,
            base_dir: None,
            durable: false,
            replicas_per_server: 0,
        })
        .await
        .expect("the cluster starts");
        let server = cluster.mariadb(0);
        let port = server.port();
        let mut conn = MySqlConnection::connect(&server.admin_url())
            .await
            .expect("connect");
        sqlx::query("CREATE DATABASE survivor")
            .execute(&mut conn)
            .await
            .expect("create");
        drop(conn);

        cluster.kill_mariadb(0).expect("kill");
        assert!(!server.is_running());
        assert!(MySqlConnection::connect(&server.admin_url()).await.is_err());
        cluster.start_mariadb(0).await.expect("restart after kill");
        assert_eq!(server.port(), port);
        let conn = MySqlConnection::connect(&server.url("survivor"))
            .await
            .expect("the committed database survived the kill");
        conn.close().await.expect("close");

        cluster.pause_redis().expect("pause");
        let port = cluster.redis().map(RedisServer::port).expect("redis");
        let paused = tokio::time::timeout(Duration::from_millis(200), redis_ping(port)).await;
        assert!(paused.is_err(), "a paused redis does not answer");
        cluster.resume_redis().expect("resume");
        redis_ping(port).await.expect("a resumed redis answers");

        cluster.stop_mariadb(0).await.expect("stop");
        cluster.stop_redis().await.expect("stop");
        assert!(matches!(cluster.pause_redis(), Err(ClusterError::NotRunning(_))));
        cluster.start_redis().await.expect("restart redis");
        redis_ping(port).await.expect("restarted redis answers");
        assert!(matches!(
            cluster.kill_mariadb(7),
            Err(ClusterError::NoSuchServer { index: 7, count: 1 })
        ));
    }

    #[tokio::test]
    async fn redis_restarts_with_its_saved_data_or_empty() {
        let cluster = LocalCluster::start(ClusterSpec {
            mariadb_servers: 1,
            with_redis: true,
            with_nats: false,
            base_dir: None,
            durable: false,
            replicas_per_server: 0,
        })
        .await
        .expect("the cluster starts");
        let url = cluster.redis_url().expect("redis");
        let client = redis::Client::open(url.as_str()).expect("client");
        let get = || async {
            let mut c = client.get_multiplexed_async_connection().await.expect("connect");
            redis::cmd("GET")
                .arg("survivor")
                .query_async::<Option<String>>(&mut c)
                .await
                .expect("GET")
        };
        let mut c = client.get_multiplexed_async_connection().await.expect("connect");
        redis::cmd("SET")
            .arg("survivor")
            .arg("yes")
            .query_async::<()>(&mut c)
            .await
            .expect("SET");
        drop(c);

        cluster.save_redis().await.expect("SAVE");
        cluster.kill_redis().expect("kill");
        cluster.start_redis().await.expect("start with the saved data");
        assert_eq!(get().await.as_deref(), Some("yes"), "start loads dump.rdb");

        cluster.kill_redis().expect("kill");
        cluster.start_redis_empty().await.expect("start empty");
        assert_eq!(get().await, None, "start_empty forgets what was saved");

        cluster.kill_redis().expect("kill");
        cluster.start_redis().await.expect("start again");
        assert_eq!(get().await, None, "the saved data is gone for good");
    }

    /// Starts `primaries` MariaDB servers with one replica each, without Redis.
    async fn cluster_with_replicas(primaries: usize) -> LocalCluster {
        LocalCluster::start(ClusterSpec {
            mariadb_servers: primaries,
            with_redis: false,
            with_nats: false,
            base_dir: None,
            durable: false,
            replicas_per_server: 1,
        })
        .await
        .expect("the cluster starts")
    }

    /// Runs `sql` on `server`, in database `db` ("" for none).
    async fn execute(server: &MariaDbServer, db: &str, sql: &'static str) {
        let mut conn = MySqlConnection::connect(&server.url(db)).await.expect("connect");
        sqlx::query(sql).execute(&mut conn).await.expect(sql);
        conn.close().await.expect("close");
    }

    /// Creates database `replicated` with table `t` on `primary`.
    async fn create_table(primary: &MariaDbServer) {
        execute(primary, "", "CREATE DATABASE replicated").await;
        execute(primary, "replicated", "CREATE TABLE t (id INT PRIMARY KEY)").await;
    }

    /// Inserts row `id` into `replicated.t` on `primary`.
    async fn insert(primary: &MariaDbServer, id: i32) {
        let mut conn = MySqlConnection::connect(&primary.url("replicated"))
            .await
            .expect("connect");
        sqlx::query("INSERT INTO t (id) VALUES (?)")
            .bind(id)
            .execute(&mut conn)
            .await
            .expect("insert");
        conn.close().await.expect("close");
    }

    /// The ids in `replicated.t` on `server`, ascending.
    async fn ids(server: &MariaDbServer) -> Vec<i32> {
        let mut conn = MySqlConnection::connect(&server.url("replicated"))
            .await
            .expect("connect");
        let ids = sqlx::query_scalar("SELECT id FROM t ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .expect("select");
        conn.close().await.expect("close");
        ids
    }

    /// Caught up within this in a healthy cluster: replication on one machine takes
    /// milliseconds.
    const CATCH_UP: Duration = Duration::from_secs(20);

    #[tokio::test]
    async fn replicas_apply_their_primarys_writes_are_read_only_and_vanish_on_drop() {
        let began = Instant::now();
        let cluster = cluster_with_replicas(2).await;
        eprintln!(
            "local cluster (2 MariaDB + 2 replicas) started in {:?}",
            began.elapsed()
        );
        let (primary, replica) = (cluster.mariadb(0), cluster.replica(0, 0).expect("replica"));
        let other = cluster.replica(1, 0).expect("replica of server 1");
        assert_eq!((replica.index(), replica.replica_of()), (0, Some(0)));
        assert_eq!((other.index(), other.replica_of()), (0, Some(1)));
        assert_eq!(primary.replica_of(), None);
        assert_eq!((replica.server_id(), other.server_id()), (1001, 1101));
        assert_eq!((replica.name(), other.name()), ("mariadb-0-r0", "mariadb-1-r0"));
        assert!(replica.datadir().starts_with(cluster.dir().join("mariadb-0-r0")));
        assert_eq!(cluster.replicas(1).len(), 1);
        assert!(cluster.replicas(2).is_empty());
        assert!(matches!(
            cluster.replica(0, 1),
            Err(ClusterError::NoSuchReplica {
                primary: 0,
                replica: 1,
                count: 1
            })
        ));
        assert!(matches!(
            cluster.replica(2, 0),
            Err(ClusterError::NoSuchServer { index: 2, count: 2 })
        ));

        for (server, read_only) in [(primary, 0), (replica, 1), (other, 1)] {
            let mut conn = MySqlConnection::connect(&server.admin_url())
                .await
                .expect("login");
            let row = sqlx::query("SELECT @@server_id, @@read_only")
                .fetch_one(&mut conn)
                .await
                .expect("query runs");
            assert_eq!(row.get::<u64, _>(0), u64::from(server.server_id()));
            assert_eq!(
                row.get::<i64, _>(1),
                read_only,
                "@@read_only of {}",
                server.name()
            );
            conn.close().await.expect("close");
        }

        let mut conn = MySqlConnection::connect(&replica.admin_url())
            .await
            .expect("login");
        let refused = sqlx::query("CREATE DATABASE written_on_a_replica")
            .execute(&mut conn)
            .await
            .expect_err("a replica refuses writes, even orderly's");
        // ER_OPTION_PREVENTS_STATEMENT: "running with the --read-only option".
        assert_eq!(
            refused.as_database_error().and_then(|e| e.code()).as_deref(),
            Some("HY000")
        );
        assert!(refused.to_string().contains("read-only"), "{refused}");
        conn.close().await.expect("close");

        create_table(primary).await;
        insert(primary, 1).await;
        cluster
            .wait_replicas_caught_up(CATCH_UP)
            .await
            .expect("caught up");
        assert_eq!(ids(replica).await, [1], "the replica has the primary's row");
        let mut conn = MySqlConnection::connect(&other.admin_url()).await.expect("login");
        let databases: Vec<String> =
            sqlx::query_scalar("SELECT schema_name FROM information_schema.schemata")
                .fetch_all(&mut conn)
                .await
                .expect("show");
        assert!(
            !databases.iter().any(|d| d == "replicated"),
            "server 1's replica has only server 1's data: {databases:?}"
        );
        conn.close().await.expect("close");

        let dir = cluster.dir().to_path_buf();
        let pids: Vec<u32> = cluster
            .mariadb_servers()
            .iter()
            .chain(cluster.replicas(0))
            .chain(cluster.replicas(1))
            .filter_map(MariaDbServer::pid)
            .collect();
        assert_eq!(pids.len(), 4);
        drop(cluster);
        assert!(!dir.exists(), "{} is removed", dir.display());
        for pid in pids {
            let pid = libc::pid_t::try_from(pid).expect("pid fits");
            assert!(!pid_alive(pid), "server {pid} is dead");
        }
    }

    #[tokio::test]
    async fn a_replica_whose_sql_thread_is_stopped_lags_until_it_is_started() {
        let cluster = cluster_with_replicas(1).await;
        let (primary, replica) = (cluster.mariadb(0), cluster.replica(0, 0).expect("replica"));
        create_table(primary).await;
        insert(primary, 1).await;
        cluster
            .wait_replicas_caught_up(CATCH_UP)
            .await
            .expect("caught up");

        cluster
            .stop_replica_sql(0, 0)
            .await
            .expect("STOP SLAVE SQL_THREAD");
        insert(primary, 2).await;
        assert!(matches!(
            cluster.wait_replicas_caught_up(Duration::from_millis(200)).await,
            Err(ClusterError::Replication { .. })
        ));
        assert_eq!(ids(replica).await, [1], "the replica does not apply");

        cluster
            .start_replica_sql(0, 0)
            .await
            .expect("START SLAVE SQL_THREAD");
        cluster
            .wait_replicas_caught_up(CATCH_UP)
            .await
            .expect("caught up");
        assert_eq!(ids(replica).await, [1, 2], "the replica caught up");
    }

    #[tokio::test]
    async fn a_killed_or_stopped_replica_resumes_where_it_left_off() {
        let cluster = cluster_with_replicas(1).await;
        let (primary, replica) = (cluster.mariadb(0), cluster.replica(0, 0).expect("replica"));
        let port = replica.port();
        create_table(primary).await;
        insert(primary, 1).await;
        cluster
            .wait_replicas_caught_up(CATCH_UP)
            .await
            .expect("caught up");

        // Killed: it resumes from mysql.gtid_slave_pos; a transaction applied twice would stop
        // its SQL thread on a duplicate key, which `start_replica` reports.
        cluster.kill_replica(0, 0).expect("kill");
        assert!(!replica.is_running());
        insert(primary, 2).await;
        cluster
            .wait_replicas_caught_up(CATCH_UP)
            .await
            .expect("nothing to wait for");
        cluster.start_replica(0, 0).await.expect("restart after kill");
        assert_eq!(replica.port(), port);
        cluster
            .wait_replicas_caught_up(CATCH_UP)
            .await
            .expect("caught up");
        assert_eq!(ids(replica).await, [1, 2]);

        cluster.stop_replica(0, 0).await.expect("clean stop");
        insert(primary, 3).await;
        cluster.start_replica(0, 0).await.expect("restart after stop");
        cluster
            .wait_replicas_caught_up(CATCH_UP)
            .await
            .expect("caught up");
        assert_eq!(ids(replica).await, [1, 2, 3]);

        // Its primary killed and restarted: the replica reconnects by itself.
        cluster.kill_mariadb(0).expect("kill the primary");
        cluster.start_mariadb(0).await.expect("restart the primary");
        insert(primary, 4).await;
        cluster
            .wait_replicas_caught_up(CATCH_UP)
            .await
            .expect("caught up");
        assert_eq!(ids(replica).await, [1, 2, 3, 4]);
    }
}
