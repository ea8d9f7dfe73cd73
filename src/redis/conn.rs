//! The one connection to Redis that the cache, the flash gate and the cart store share.
//!
//! [`Redis`] is a cheap handle (clone it into each user) on one multiplexed connection, the
//! run tag of the server it talks to, the per-call timeout, the circuit breaker and the key
//! prefix. Invariants kept here:
//! - Every call has the per-call timeout; a failure or a timeout counts against the breaker
//!   and drops the connection (the next caller reconnects through the breaker's one probe),
//!   so a Redis that is down makes callers slower, never stuck.
//! - One breaker for the three users: a Redis that times out the cache is skipped by the gate
//!   and the carts too, and any user's successful probe closes it for all.
//! - A connection's run tag is fixed for its life (a restarted server means a broken
//!   connection and a new one), and every script is loaded on the server before the
//!   connection is handed out (`EVALSHA` then never meets an empty script cache, except
//!   after a flush or a restart, which fails the call and reconnects).
//! - Users that keep state about Redis (the cache's undelivered notices) hear about every
//!   new connection ([`Redis::on_connect`]), whichever user's call made it.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Cmd, FromRedisValue, Pipeline};

use super::breaker::{Breaker, State};
use crate::config::{CacheSettings, RedisSettings};

/// Characters of the server's 40-character `run_id` kept in every value: 48 random bits make
/// two runs sharing a tag practically impossible, at 12 bytes per value.
pub const TAG_LEN: usize = 12;

/// A connection and the run tag of the server it talks to (fixed for its life: a restarted
/// server means a broken connection and a new one).
pub(crate) struct Conn {
    con: MultiplexedConnection,
    pub(crate) tag: String,
}

/// Called after every new connection.
type OnConnect = Box<dyn Fn() + Send + Sync>;

/// The shared Redis connection; see the module docs. Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Shared>,
}

struct Shared {
    prefix: String,
    client: redis::Client,
    conn: RwLock<Option<Arc<Conn>>>,
    breaker: Breaker,
    timeout: Duration,
    connect_timeout: Duration,
    on_connect: Mutex<Vec<OnConnect>>,
}

/// The client for `redis.url`: with the CA of `redis.tls_ca_file` for a `rediss://` URL
/// when set, the system's roots otherwise.
fn client(redis: &RedisSettings) -> anyhow::Result<redis::Client> {
    let invalid = || format!("invalid Redis URL {:?}", crate::config::redact_url(&redis.url));
    if redis.tls_ca_file.as_os_str().is_empty() {
        return redis::Client::open(redis.url.as_str()).with_context(invalid);
    }
    let ca = std::fs::read(&redis.tls_ca_file)
        .with_context(|| format!("reading redis.tls_ca_file {}", redis.tls_ca_file.display()))?;
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca),
    };
    redis::Client::build_with_tls(redis.url.as_str(), certificates).with_context(invalid)
}

impl Redis {
    /// The Redis the settings ask for: `None` when `[cache] enabled = false` (no cache, no
    /// flash gate, carts in MySQL only). See [`Redis::connect`].
    pub async fn from_settings(
        redis: &RedisSettings,
        cache: &CacheSettings,
    ) -> anyhow::Result<Option<Redis>> {
        if !cache.enabled {
            return Ok(None);
        }
        Ok(Some(Redis::connect(redis, cache).await?))
    }

    /// Never fails for an unreachable Redis (it starts with the breaker open and probes it
    /// later); only an unparsable URL is an error. The timeouts and the breaker's tunables
    /// are the `[cache]` settings.
    pub async fn connect(redis: &RedisSettings, cache: &CacheSettings) -> anyhow::Result<Redis> {
        let client = client(redis)?;
        let r = Redis {
            inner: Arc::new(Shared {
                prefix: redis.key_prefix.clone(),
                client,
                conn: RwLock::new(None),
                breaker: Breaker::new(
                    cache.failures_to_open,
                    Duration::from_millis(cache.probe_interval_ms),
                ),
                timeout: Duration::from_millis(cache.timeout_ms),
                connect_timeout: Duration::from_millis(cache.connect_timeout_ms),
                on_connect: Mutex::new(Vec::new()),
            }),
        };
        if r.probe().await.is_none() {
            tracing::warn!(url = %crate::config::redact_url(&redis.url), "Redis does not answer: the cache starts degraded");
            r.inner.breaker.trip();
        }
        Ok(r)
    }

    /// The configured key prefix: every key of the three users starts with it.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Whether the breaker is closed (Redis answers, as far as we know).
    pub fn is_up(&self) -> bool {
        self.inner.breaker.is_closed()
    }

    /// Whether the breaker is open and no probe is due yet: Redis is skipped now.
    pub(crate) fn is_skipped(&self) -> bool {
        self.inner.breaker.state() == State::Open
    }

    /// Calls `hook` after every new connection (made by any user of this handle).
    pub(crate) fn on_connect(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.inner
            .on_connect
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(hook));
    }

    /// The current connection, without connecting.
    pub(crate) fn current(&self) -> Option<Arc<Conn>> {
        self.inner.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forgets `conn` if it is still the current connection.
    fn drop_conn(&self, conn: &Arc<Conn>) {
        let mut current = self.inner.conn.write().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *current = None;
        }
    }

    /// The connection to use now, or `None` to skip Redis. Reconnects through the breaker's
    /// single probe when there is no connection (and the breaker allows a probe).
    pub(crate) async fn conn(&self) -> Option<Arc<Conn>> {
        match self.inner.breaker.state() {
            State::Open => None,
            State::Closed => match self.current() {
                Some(c) => Some(c),
                None => self.probe().await,
            },
            State::ProbeDue => self.probe().await,
        }
    }

    /// Connects, if no other caller is connecting; closes the breaker on success.
    async fn probe(&self) -> Option<Arc<Conn>> {
        let inner = &self.inner;
        if !inner.breaker.try_begin_probe() {
            return None;
        }
        let wait = inner.connect_timeout + inner.timeout;
        match tokio::time::timeout(wait, self.open_conn()).await {
            Ok(Ok(conn)) => {
                let conn = Arc::new(conn);
                *inner.conn.write().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
                inner.breaker.end_probe(true);
                tracing::debug!(tag = %conn.tag, "connected to Redis");
                for hook in inner.on_connect.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                    hook();
                }
                Some(conn)
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot connect to Redis");
                inner.breaker.end_probe(false);
                None
            }
            Err(_) => {
                tracing::debug!("connecting to Redis timed out");
                inner.breaker.end_probe(false);
                None
            }
        }
    }

    /// A new connection, its run tag, and every script loaded on its server.
    async fn open_conn(&self) -> redis::RedisResult<Conn> {
        let inner = &self.inner;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(inner.connect_timeout)
            .set_response_timeout(inner.timeout);
        let mut con = inner
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let mut pipe = redis::pipe();
        pipe.cmd("INFO").arg("server");
        for code in super::scripts() {
            pipe.cmd("SCRIPT").arg("LOAD").arg(code).ignore();
        }
        let (info,): (String,) = pipe.query_async(&mut con).await?;
        let run_id = info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(str::trim)
            .filter(|id| id.len() >= TAG_LEN && id.is_ascii())
            .ok_or_else(|| {
                redis::RedisError::from((redis::ErrorKind::ResponseError, "INFO server has no run_id"))
            })?;
        Ok(Conn {
            con,
            tag: run_id[..TAG_LEN].to_owned(),
        })
    }

    /// Runs one command with the per-call timeout. `None`: it failed, and the failure has
    /// been counted and the connection dropped.
    pub(crate) async fn query<T: FromRedisValue>(&self, conn: &Arc<Conn>, cmd: &Cmd) -> Option<T> {
        let mut con = conn.con.clone();
        let result = tokio::time::timeout(self.inner.timeout, cmd.query_async(&mut con)).await;
        self.outcome(conn, result)
    }

    pub(crate) async fn query_pipe<T: FromRedisValue>(&self, conn: &Arc<Conn>, pipe: &Pipeline) -> Option<T> {
        let mut con = conn.con.clone();
        let result = tokio::time::timeout(self.inner.timeout, pipe.query_async(&mut con)).await;
        self.outcome(conn, result)
    }

    fn outcome<T>(
        &self,
        conn: &Arc<Conn>,
        result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Option<T> {
        let breaker = &self.inner.breaker;
        match result {
            Ok(Ok(v)) => {
                breaker.success();
                Some(v)
            }
            Ok(Err(e)) => {
                // Any error: I/O, a server that lost our scripts (NOSCRIPT after a restart or
                // a flush), a protocol surprise. A new connection reloads the scripts.
                tracing::debug!(error = %e, "Redis call failed");
                // The metric keeps its first name (dashboards): it counts every user's calls.
                metrics::counter!("orderly_cache_redis_errors_total", "kind" => "error").increment(1);
                breaker.failure();
                self.drop_conn(conn);
                None
            }
            Err(_) => {
                tracing::debug!(
                    timeout_ms = self.inner.timeout.as_millis() as u64,
                    "Redis call timed out"
                );
                metrics::counter!("orderly_cache_redis_errors_total", "kind" => "timeout").increment(1);
                breaker.failure();
                self.drop_conn(conn);
                None
            }
        }
    }
}
