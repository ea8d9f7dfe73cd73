//! The NATS server of the local cluster, with JetStream for the order event stream.

use super::*;

/// The NATS server of a [`LocalCluster`], with JetStream, its files in the cluster directory.
#[derive(Debug)]
pub struct NatsServer {
    pub(super) port: u16,
    pub(super) binary: PathBuf,
    pub(super) process: ServerProcess,
    /// A TLS cluster's certificate: the server then requires TLS of every client.
    pub(super) tls: Option<TlsFiles>,
}

impl NatsServer {
    pub(super) fn new(cluster_dir: &Path, binary: PathBuf, port: u16) -> Result<Self, ClusterError> {
        let dir = cluster_dir.join("nats");
        fs::create_dir(&dir).map_err(|e| ClusterError::io(format!("creating {}", dir.display()), e))?;
        Ok(NatsServer {
            port,
            binary,
            process: ServerProcess::new("nats".into(), dir.clone(), dir.join("nats.log")),
            tls: None,
        })
    }

    /// Its TCP port on 127.0.0.1 (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:PORT`, or `tls://127.0.0.1:PORT` in a TLS cluster.
    pub fn url(&self) -> String {
        match self.tls {
            None => format!("nats://127.0.0.1:{}", self.port),
            Some(_) => format!("tls://127.0.0.1:{}", self.port),
        }
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

    pub(super) async fn spawn(&self) -> Result<u64, ClusterError> {
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
        if let Some(tls) = &self.tls {
            command
                .arg("--tls")
                .arg("--tlscert")
                .arg(&tls.cert)
                .arg("--tlskey")
                .arg(&tls.key);
        }
        self.process.spawn(command).await
    }

    pub(super) async fn await_first_start(&mut self, ports: &mut PortPicker) -> Result<(), ClusterError> {
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

    pub(super) async fn wait_ready(&self) -> Result<(), Failure> {
        let port = self.port;
        let tls = self.tls.is_some();
        self.process.wait_ready(|| nats_ping(port, tls)).await
    }
}

/// Speaks the start of the NATS protocol on `port`: the server's `INFO`, then `CONNECT` and
/// `PING`, expecting `PONG`. A server that requires TLS (`tls`) is ready once its `INFO` says
/// so: the harness does not speak TLS.
pub(super) async fn nats_ping(port: u16, tls: bool) -> Result<(), String> {
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
            if tls {
                return match text.contains("\"tls_required\":true") {
                    true => Ok(()),
                    false => Err(format!("TLS not required: {text:?}")),
                };
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
