//! MariaDB servers of the local cluster: their options, bootstrap (`mariadb-install-db`
//! once, the datadir copied for the others), start, readiness, and GTID replicas.

use super::*;

/// `mariadbd` options shared by `mariadb-install-db` (which passes unknown options on to its
/// bootstrap `mariadbd`) and every server start, so the bootstrap creates the InnoDB files with
/// the geometry the server then uses unchanged.
pub const SHARED_MARIADB_OPTIONS: &[&str] = &[
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
/// pools to fit (see [`orderly::storage::budget`]).
pub const MAX_CONNECTIONS: u32 = 500;

/// `mariadbd` options for serving (not for the bootstrap).
pub const SERVER_MARIADB_OPTIONS: &[&str] = &[
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
pub const REPLICA_MARIADB_OPTIONS: &[&str] = &[
    // Clients cannot write by mistake, `orderly` included (see `REPLICA_INIT_SQL`); the
    // replication thread still applies the primary's events.
    "--read-only=1",
];

/// SQL run by every MariaDB server at every start (`--init-file`): one statement per line, no
/// comments (the init-file parser is minimal). `IF NOT EXISTS` makes restarts work. The
/// statements are kept out of the binary log: otherwise each server would log GTIDs of its own
/// (`0-<server_id>-1..4`), and a replica attached later in GTID strict mode would refuse the
/// primary's lower-numbered GTIDs of the same domain as out of order.
pub(super) const INIT_SQL: &str = "SET SESSION sql_log_bin = 0;
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
pub(super) const REPLICA_INIT_SQL: &str = "REVOKE READ_ONLY ADMIN ON *.* FROM 'orderly'@'%';
REVOKE READ_ONLY ADMIN ON *.* FROM 'orderly'@'localhost';
";

/// One MariaDB server of a [`LocalCluster`]: a primary (a shard) or a read-only replica of one.
#[derive(Debug)]
pub struct MariaDbServer {
    pub(super) index: usize,
    /// Index of the primary this server replicates; `None` for a primary.
    pub(super) replica_of: Option<usize>,
    pub(super) server_id: u32,
    pub(super) port: u16,
    pub(super) durable: bool,
    pub(super) mariadbd: PathBuf,
    pub(super) init_file: PathBuf,
    pub(super) process: ServerProcess,
    /// Set for a TLS cluster: the server requires secure transport.
    pub(super) tls: Option<TlsFiles>,
}

impl MariaDbServer {
    /// A primary with index `index` when `replica_of` is `None`, else replica `index` of
    /// primary `replica_of`.
    pub(super) fn new(
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
            tls: None,
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

    /// `mysql://orderly:orderly@127.0.0.1:PORT/{db}?ssl-mode=disabled`, or for a TLS cluster
    /// `…?ssl-mode=VERIFY_IDENTITY&ssl-ca=CA`: the certificate and the host name checked.
    pub fn url(&self, db: &str) -> String {
        match &self.tls {
            None => format!("{}/{db}?ssl-mode=disabled", self.base_url()),
            Some(tls) => format!(
                "{}/{db}?ssl-mode=VERIFY_IDENTITY&ssl-ca={}",
                self.base_url(),
                tls.ca.display()
            ),
        }
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
        self.process.pause()
    }

    /// Unfreezes the server (SIGCONT).
    pub fn resume(&self) -> Result<(), ClusterError> {
        self.process.signal(libc::SIGCONT)
    }

    /// Spawns `mariadbd`; returns the error-log offset where this run's output starts.
    pub(super) async fn spawn(&self, restart: bool) -> Result<u64, ClusterError> {
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
        if let Some(tls) = &self.tls {
            command
                .arg(path_arg("--ssl-ca=", &tls.ca))
                .arg(path_arg("--ssl-cert=", &tls.cert))
                .arg(path_arg("--ssl-key=", &tls.key))
                .arg("--require-secure-transport=ON");
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
    pub(super) async fn await_first_start(&mut self, ports: &mut PortPicker) -> Result<(), ClusterError> {
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

    pub(super) async fn wait_ready(&self) -> Result<(), Failure> {
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
    pub(super) async fn attach_to(&self, primary: &MariaDbServer) -> Result<(), ClusterError> {
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
    pub(super) async fn admin_connection(&self) -> Result<MySqlConnection, ClusterError> {
        let url = self.admin_url();
        self.bounded("logging in", ADMIN_TIMEOUT, MySqlConnection::connect(&url))
            .await
    }

    /// Runs `work` within `limit`, naming this server and `action` in its error.
    pub(super) async fn bounded<T>(
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
    pub(super) async fn execute_admin(&self, action: &str, sql: sqlx::RawSql) -> Result<(), ClusterError> {
        let mut conn = self.admin_connection().await?;
        self.bounded(action, ADMIN_TIMEOUT, sql.execute(&mut conn))
            .await?;
        let _ = conn.close().await;
        Ok(())
    }

    /// `SHOW SLAVE STATUS` on `conn` (a connection to this server); `None` when replication
    /// was never configured.
    pub(super) async fn replication_status(
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
    pub(super) async fn wait_replicating(&self, io: IoThread) -> Result<(), ClusterError> {
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
    pub(super) async fn gtid_binlog_pos(&self) -> Result<String, ClusterError> {
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
    pub(super) async fn wait_for_gtid(&self, position: &str, timeout: Duration) -> Result<(), ClusterError> {
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
pub(super) enum IoThread {
    /// Connected to the primary (`Yes`).
    Connected,
    /// Running, connected or still trying to connect (`Yes` or `Connecting`): its primary may
    /// be down, or it was not asked about.
    MayBeConnecting,
}

impl IoThread {
    pub(super) fn accepts(self, state: &str) -> bool {
        match self {
            IoThread::Connected => state == "Yes",
            IoThread::MayBeConnecting => state == "Yes" || state == "Connecting",
        }
    }
}

/// The parts of `SHOW SLAVE STATUS` the harness looks at.
#[derive(Debug)]
pub(super) struct ReplicationStatus {
    /// `Slave_IO_Running`: `Yes`, `Connecting` or `No`.
    pub(super) io_running: String,
    /// `Slave_SQL_Running`: `Yes` or `No`.
    pub(super) sql_running: String,
    pub(super) io_error: String,
    pub(super) sql_error: String,
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

/// Bootstraps the first datadir with `mariadb-install-db` and copies it to the others.
pub(super) async fn install_datadirs(
    install_db: PathBuf,
    datadirs: Vec<PathBuf>,
) -> Result<(), ClusterError> {
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

pub(super) fn copy_dir(from: &Path, to: &Path) -> io::Result<()> {
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
