//! The Redis server of the local cluster: no persistence, no configuration file.

use super::*;

/// The Redis server of a [`LocalCluster`].
#[derive(Debug)]
pub struct RedisServer {
    pub(super) port: u16,
    pub(super) binary: PathBuf,
    pub(super) process: ServerProcess,
    /// A TLS cluster's certificate and the port Redis takes TLS connections on (besides the
    /// plain port, which the harness keeps for its own probes).
    pub(super) tls: Option<(TlsFiles, u16)>,
}

impl RedisServer {
    pub(super) fn new(cluster_dir: &Path, binary: PathBuf, port: u16) -> Result<Self, ClusterError> {
        let dir = cluster_dir.join("redis");
        fs::create_dir(&dir).map_err(|e| ClusterError::io(format!("creating {}", dir.display()), e))?;
        Ok(RedisServer {
            port,
            binary,
            process: ServerProcess::new("redis".into(), dir.clone(), dir.join("redis.log")),
            tls: None,
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

    /// `rediss://127.0.0.1:TLS_PORT` in a TLS cluster.
    pub fn tls_url(&self) -> Option<String> {
        self.tls
            .as_ref()
            .map(|(_, port)| format!("rediss://127.0.0.1:{port}"))
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
    pub(super) fn dump_file(&self) -> PathBuf {
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
        self.process.pause()
    }

    /// Unfreezes Redis (SIGCONT).
    pub fn resume(&self) -> Result<(), ClusterError> {
        self.process.signal(libc::SIGCONT)
    }

    pub(super) async fn spawn(&self) -> Result<u64, ClusterError> {
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
        if let Some((tls, port)) = &self.tls {
            command
                .arg("--tls-port")
                .arg(port.to_string())
                .arg("--tls-cert-file")
                .arg(&tls.cert)
                .arg("--tls-key-file")
                .arg(&tls.key)
                .arg("--tls-ca-cert-file")
                .arg(&tls.ca)
                .args(["--tls-auth-clients", "no"]);
        }
        self.process.spawn(command).await
    }

    pub(super) async fn await_first_start(&mut self, ports: &mut PortPicker) -> Result<(), ClusterError> {
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

    pub(super) async fn wait_ready(&self) -> Result<(), Failure> {
        let port = self.port;
        self.process.wait_ready(|| redis_ping(port)).await
    }
}

/// Sends `PING` to the Redis server on `port` over a raw connection and expects `+PONG`.
pub async fn redis_ping(port: u16) -> Result<(), String> {
    redis_command(port, "PING", "+PONG").await
}

/// Sends the argument-less `command` to the Redis server on `port` over a raw connection and
/// expects a reply starting with `expected` (a status reply such as `+OK`).
pub(super) async fn redis_command(port: u16, command: &str, expected: &str) -> Result<(), String> {
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
