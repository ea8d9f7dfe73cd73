//! Server processes of the local cluster: spawning on one never-exiting spawner thread
//! (`PR_SET_PDEATHSIG`), waiting for readiness, free ports, signals, and the sweep of
//! directories left by dead owners.

use super::*;

/// Why a server did not become ready.
#[derive(Debug)]
pub(super) enum Failure {
    Exited(String),
    TimedOut(String),
}

/// A server child process: spawning, signals, reaping, its log.
#[derive(Debug)]
pub(super) struct ServerProcess {
    pub(super) name: String,
    /// The server's own directory: its working directory and the home of `child.pid`.
    pub(super) dir: PathBuf,
    /// Receives the child's stdout and stderr.
    pub(super) log: PathBuf,
    /// The current child; `None` before the first spawn and once reaped.
    pub(super) child: Mutex<Option<Child>>,
}

impl ServerProcess {
    pub(super) fn new(name: String, dir: PathBuf, log: PathBuf) -> Self {
        ServerProcess {
            name,
            dir,
            log,
            child: Mutex::new(None),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Spawns `command` (on the spawner thread, with stdio to the log) as this server's child
    /// and records its pid; returns the log offset where its output starts.
    pub(super) async fn spawn(&self, mut command: Command) -> Result<u64, ClusterError> {
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
    pub(super) fn pid(&self) -> Option<u32> {
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
    pub(super) fn reap(&self) -> bool {
        self.pid().is_none()
    }

    /// Sends `signal` to the running child.
    pub(super) fn signal(&self, signal: libc::c_int) -> Result<(), ClusterError> {
        let pid = self
            .pid()
            .ok_or_else(|| ClusterError::NotRunning(self.name.clone()))?;
        send_signal(pid, signal).map_err(|e| ClusterError::io(format!("signalling {}", self.name), e))
    }

    /// SIGSTOP, and returns only once every thread of the child is stopped. `kill` returns
    /// when the signal is queued; on a busy machine a thread of the server can still answer
    /// a query for a moment after it, and a test that pauses a server and then checks what a
    /// client sees would race it.
    pub(super) fn pause(&self) -> Result<(), ClusterError> {
        self.signal(libc::SIGSTOP)?;
        let Some(pid) = self.pid() else {
            return Err(ClusterError::NotRunning(self.name.clone()));
        };
        let deadline = Instant::now() + PAUSE_WAIT;
        while !all_threads_stopped(pid) {
            if Instant::now() > deadline {
                return Err(ClusterError::io(
                    format!("pausing {}", self.name),
                    io::Error::new(io::ErrorKind::TimedOut, "threads still running after SIGSTOP"),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// SIGTERM, plus SIGCONT so that a paused child can act on it.
    pub(super) fn terminate(&self) {
        if let Some(pid) = self.pid() {
            let _ = send_signal(pid, libc::SIGTERM);
            let _ = send_signal(pid, libc::SIGCONT);
        }
    }

    /// SIGKILL and reap. Infallible in practice: SIGKILL cannot be ignored, and the wait
    /// returns as soon as the kernel tore the process down.
    pub(super) fn kill(&self) {
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
    pub(super) async fn stop(&self, grace: Duration) {
        self.terminate();
        let deadline = Instant::now() + grace;
        while !self.reap() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.kill();
    }

    /// Polls `probe` until it succeeds, the child exits, or [`READY_TIMEOUT`] passes.
    pub(super) async fn wait_ready<F, Fut>(&self, probe: F) -> Result<(), Failure>
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
    pub(super) fn lost_port(&self, failure: &Failure, log_offset: u64) -> bool {
        // MariaDB and Redis say "Address already in use", NATS "address already in use".
        matches!(failure, Failure::Exited(_))
            && self
                .log_tail(log_offset)
                .to_ascii_lowercase()
                .contains("address already in use")
    }

    pub(super) fn not_ready(&self, failure: Failure, log_offset: u64) -> ClusterError {
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
    pub(super) fn log_tail(&self, offset: u64) -> String {
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

pub(super) fn tail_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The server binaries a spec needs.
pub(super) struct Binaries {
    /// `(mariadbd, mariadb-install-db)` when MariaDB servers are wanted.
    pub(super) mariadb: Option<(PathBuf, PathBuf)>,
    pub(super) redis: Option<PathBuf>,
    pub(super) nats: Option<PathBuf>,
}

impl Binaries {
    pub(super) fn find(spec: &ClusterSpec) -> Result<Self, ClusterError> {
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
pub(super) fn find_binary(name: &str) -> Option<PathBuf> {
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
pub(super) fn create_cluster_dir(
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

pub(super) fn path_arg(flag: &str, path: &Path) -> std::ffi::OsString {
    let mut arg = std::ffi::OsString::from(flag);
    arg.push(path);
    arg
}

pub(super) fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub(super) fn send_signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(super) fn pid_alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    exists || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Free ports on 127.0.0.1, never the same twice within one cluster.
#[derive(Default)]
pub(super) struct PortPicker {
    pub(super) handed_out: HashSet<u16>,
}

impl PortPicker {
    /// Binds port 0 and releases it. Racy by nature (another process may take the port before
    /// the server binds it); the callers retry on another port when the server cannot bind.
    pub(super) fn pick(&mut self) -> Result<u16, ClusterError> {
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

pub(super) struct SpawnRequest {
    pub(super) command: Command,
    pub(super) reply: oneshot::Sender<io::Result<Child>>,
}

/// Spawns `command` on the process-wide spawner thread, dying with this process.
pub(super) async fn spawn_on_spawner_thread(mut command: Command) -> Result<io::Result<Child>, ClusterError> {
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
pub(super) fn die_with_this_process(command: &mut Command) {
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
pub(super) static LIVE_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

pub(super) fn register_live_dir(dir: &Path) {
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

pub(super) fn unregister_live_dir(dir: &Path) {
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
pub(super) fn sweep_stale_dirs(parent: &Path) {
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
pub(super) fn kill_recorded_servers(cluster_dir: &Path) {
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

pub(super) fn process_belongs_to(pid: libc::pid_t, cluster_dir: &Path) -> bool {
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

/// How long [`ServerProcess::pause`] waits for every thread of a server to stop: a group stop
/// takes microseconds; seconds only on a machine starved of CPU.
const PAUSE_WAIT: Duration = Duration::from_secs(5);

/// Whether every thread of `pid` is stopped (state `T` or `t` in `/proc/<pid>/task/*/stat`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with(['T', 't']))
            })
            // A thread that exited meanwhile is not running.
            .unwrap_or(true)
    })
}
