//! Settings: `config.default.toml` (compiled in), then an optional user file, then
//! `ORDERLY_<SECTION>__<KEY>` environment variables. Validated once, at load; after that the
//! rest of the code trusts them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::domain::ids::WorkerId;
use crate::domain::shard::ShardCount;

pub const DEFAULT_TOML: &str = include_str!("../config.default.toml");

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub auth: AuthSettings,
    pub ids: IdSettings,
    pub shards: ShardSettings,
    pub commerce: CommerceSettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub cache: CacheSettings,
    pub orders: OrderSettings,
    pub sweeper: SweeperSettings,
    pub limits: LimitSettings,
    pub replicas: ReplicaSettings,
    pub flash: FlashSettings,
    pub cart: CartSettings,
    pub events: EventSettings,
    pub merchant: MerchantSettings,
    pub search: SearchSettings,
    pub archive: ArchiveSettings,
}

/// The archive of old orders (see [`crate::service::archive`]); every tunable is explained
/// in `config.default.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveSettings {
    pub url: String,
    pub older_than_days: u32,
    pub min_age_days: u32,
    pub batch_size: u32,
    pub pause_ms: u64,
    pub delete_chunk: u32,
    pub max_replica_lag_ms: u64,
    pub max_slowdown: u32,
    pub max_busy_percent: u32,
    pub run_in_serve: bool,
    pub interval_secs: u64,
    pub read_timeout_ms: u64,
}

impl Default for ArchiveSettings {
    /// `config.default.toml`'s values.
    fn default() -> Self {
        Settings::defaults().archive
    }
}

impl ArchiveSettings {
    /// No archived order is younger than this, measured at any time after its move.
    pub fn min_age(&self) -> chrono::TimeDelta {
        chrono::TimeDelta::days(i64::from(self.min_age_days))
    }
}

/// Carts (see [`crate::service::cart`]); every tunable is explained in `config.default.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CartSettings {
    pub loss_window_ms: u64,
    pub flush_batch: usize,
}

impl Default for CartSettings {
    /// `config.default.toml`'s values.
    fn default() -> Self {
        Settings::defaults().cart
    }
}

/// The merchant copy sharded by shop, with its reports (see [`crate::storage::merchant`]);
/// every tunable is explained in `config.default.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantSettings {
    pub consume: bool,
    pub tables: u32,
    pub report_utc_offset_minutes: i32,
    pub databases: Vec<MerchantDatabase>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantDatabase {
    pub url: String,
    pub first_table: u32,
    pub last_table: u32,
}

/// The order event stream: the outbox relay to NATS JetStream (see [`crate::events`]); every
/// tunable is explained in `config.default.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    pub nats_url: String,
    /// A NATS `.creds` file; empty: none.
    #[serde(default)]
    pub nats_credentials_file: PathBuf,
    /// PEM CA of the NATS server's certificate (TLS then required); empty: none.
    #[serde(default)]
    pub nats_tls_ca_file: PathBuf,
    pub relay: bool,
    pub stream: String,
    pub subject_prefix: String,
    pub duplicate_window_secs: u64,
    pub retention_days: u64,
    pub relay_batch: u32,
    pub relay_poll_ms: u64,
    pub publish_timeout_ms: u64,
    pub retry_ms: u64,
    pub max_publish_attempts: u32,
}

impl Default for EventSettings {
    /// `config.default.toml`'s values.
    fn default() -> Self {
        Settings::defaults().events
    }
}

/// The order search index (see [`crate::search`]); every tunable is explained in
/// `config.default.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSettings {
    pub enabled: bool,
    pub data_dir: PathBuf,
    pub writer_memory_mb: usize,
}

impl Default for SearchSettings {
    /// `config.default.toml`'s values.
    fn default() -> Self {
        Settings::defaults().search
    }
}

/// Flash sales (see [`crate::service::flash`]); every tunable is explained in
/// `config.default.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FlashSettings {
    pub gate_rebuild_interval_secs: u64,
    pub fallback_concurrency: usize,
    pub fallback_queue: usize,
    pub refresh_ms: u64,
}

impl Default for FlashSettings {
    /// `config.default.toml`'s values (services built without settings: tools, tests).
    fn default() -> Self {
        Settings::defaults().flash
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub body_limit_bytes: usize,
    pub request_timeout_ms: u64,
    pub shutdown_grace_ms: u64,
    /// Requests served at once; beyond, refused at once with 503 (`overloaded`).
    pub max_in_flight: usize,
    /// Swagger UI at `/docs` over `/openapi.json`.
    pub swagger_ui: bool,
    /// Where `/metrics`, `/healthz`, `/readyz` and `/livez` are served for operators, apart
    /// from the API (see [`crate::http::health`]); `None` (unset or empty): no admin
    /// listener.
    #[serde(default, deserialize_with = "empty_as_none")]
    pub admin_listen: Option<SocketAddr>,
    /// On SIGTERM or Ctrl-C, `serve` answers `/readyz` 503 and keeps serving this long before
    /// it stops accepting.
    pub shutdown_delay_ms: u64,
    /// The longest every readiness check together may take; a check still running then fails.
    pub readiness_timeout_ms: u64,
}

/// An address that may be given as an empty string (an environment variable set to nothing,
/// to turn off a listener a settings file turned on): empty is `None`.
fn empty_as_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.trim().is_empty() => Ok(None),
        Some(s) => s.trim().parse().map(Some).map_err(serde::de::Error::custom),
    }
}

/// How bearer tokens are verified (see [`crate::http::auth`]); every key is explained in
/// `config.default.toml`. Secrets are [`SecretString`]s: `Debug` (and so every log of the
/// settings) shows `[REDACTED]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// The first HS256 key (no `kid`); empty: none.
    #[serde(serialize_with = "serialize_secret")]
    pub jwt_secret: SecretString,
    /// More HS256 keys, after `jwt_secret` (rotation).
    pub keys: Vec<HmacKey>,
    /// An identity provider's JWKS (`https://…/.well-known/jwks.json`); empty: none.
    pub jwks_url: String,
    /// The JWKS is fetched again this often.
    pub jwks_refresh_secs: u64,
    /// At most one fetch of the JWKS in this long, whatever asks for it.
    pub jwks_min_refresh_secs: u64,
    /// A fetch of the JWKS that takes longer fails.
    pub jwks_timeout_ms: u64,
    /// The `alg` a token header may name; any other is refused.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// JSON pointers (RFC 6901) into the claims: the user id, the role, a merchant's shop.
    pub user_claim: String,
    pub role_claim: String,
    pub shop_claim: String,
    /// Required `iss` of every token; empty: not checked.
    pub issuer: String,
    /// Required `aud` of every token; empty: not checked.
    pub audience: String,
    /// The longest a token may live (`exp - iat`).
    pub max_token_lifetime_secs: u64,
}

/// One HS256 secret of `auth.keys`; a token naming `kid` in its header is checked against
/// the key of that `kid` only.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HmacKey {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(serialize_with = "serialize_secret")]
    pub secret: SecretString,
}

/// Settings are written back out only for a child process (tests, the playground), which
/// needs the secret itself.
fn serialize_secret<S: serde::Serializer>(secret: &SecretString, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(secret.expose_secret())
}

/// HS256 secrets shorter than this are refused: RFC 7518 3.2 asks for a key at least as long
/// as the hash (256 bits).
const MIN_HMAC_SECRET_BYTES: usize = 32;

impl AuthSettings {
    /// The HS256 secrets in order: `jwt_secret` (when set) first, then `keys`. Tokens are
    /// minted with the first.
    pub fn hmac_keys(&self) -> Vec<HmacKey> {
        let first = (!self.jwt_secret.expose_secret().is_empty()).then(|| HmacKey {
            kid: None,
            secret: self.jwt_secret.clone(),
        });
        first.into_iter().chain(self.keys.iter().cloned()).collect()
    }

    fn check(&self) -> Result<(), String> {
        use jsonwebtoken::Algorithm;
        let keys = self.hmac_keys();
        if keys.is_empty() && self.jwks_url.is_empty() {
            return Err("auth: no key to verify tokens with: set auth.jwt_secret \
                        (ORDERLY_AUTH__JWT_SECRET), auth.keys or auth.jwks_url"
                .into());
        }
        if !self.jwt_secret.expose_secret().is_empty()
            && self.jwt_secret.expose_secret().len() < MIN_HMAC_SECRET_BYTES
        {
            return Err(format!(
                "auth.jwt_secret must be at least {MIN_HMAC_SECRET_BYTES} bytes (set ORDERLY_AUTH__JWT_SECRET)"
            ));
        }
        let mut kids = std::collections::BTreeSet::new();
        for (i, key) in self.keys.iter().enumerate() {
            if key.secret.expose_secret().len() < MIN_HMAC_SECRET_BYTES {
                return Err(format!(
                    "auth.keys[{i}].secret must be at least {MIN_HMAC_SECRET_BYTES} bytes"
                ));
            }
            if let Some(kid) = &key.kid {
                if kid.is_empty() || !kids.insert(kid) {
                    return Err(format!(
                        "auth.keys[{i}].kid must be non-empty and unique, got {kid:?}"
                    ));
                }
            }
        }
        if !self.jwks_url.is_empty() {
            let url = reqwest::Url::parse(&self.jwks_url)
                .map_err(|e| format!("auth.jwks_url is not a URL: {e}"))?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err("auth.jwks_url must be an http:// or https:// URL".into());
            }
        }
        if self.jwks_refresh_secs == 0 || self.jwks_min_refresh_secs == 0 || self.jwks_timeout_ms == 0 {
            return Err("auth.jwks_refresh_secs, auth.jwks_min_refresh_secs and auth.jwks_timeout_ms must be positive".into());
        }
        if self.algorithms.is_empty() {
            return Err("auth.algorithms must name at least one algorithm".into());
        }
        if let Some(a) = self
            .algorithms
            .iter()
            .find(|a| matches!(a, Algorithm::HS384 | Algorithm::HS512))
        {
            return Err(format!(
                "auth.algorithms: {a:?} is not supported (the shared secrets are HS256 keys)"
            ));
        }
        for (name, pointer) in [
            ("user_claim", &self.user_claim),
            ("role_claim", &self.role_claim),
            ("shop_claim", &self.shop_claim),
        ] {
            if !pointer.starts_with('/') {
                return Err(format!(
                    "auth.{name} must be a JSON pointer (RFC 6901) starting with '/', got {pointer:?}"
                ));
            }
        }
        if self.max_token_lifetime_secs == 0 {
            return Err("auth.max_token_lifetime_secs must be positive".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdSettings {
    /// A fixed worker id; `None` leases one in the commerce database.
    pub worker_id: Option<u16>,
    /// Lease TTL; renewed every third of it.
    pub lease_ttl_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShardSettings {
    pub count: u32,
    pub databases: Vec<ShardDatabase>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShardDatabase {
    pub name: String,
    pub primary: String,
    /// Read replicas of `primary` (GTID replication); reads of orders and lists go to them.
    #[serde(default)]
    pub replicas: Vec<String>,
    pub first_shard: u32,
    pub last_shard: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CommerceSettings {
    pub url: String,
    /// Read replicas of the commerce database: only user profiles are read there; pricing,
    /// stock, reservations and claims stay on the primary.
    #[serde(default)]
    pub replicas: Vec<String>,
}

/// Read replicas: the GTID wait of read-your-writes, the health probe and rotation (see
/// [`crate::storage::replicas`]); every tunable is explained in `config.default.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSettings {
    pub gtid_wait_ms: u64,
    pub max_lag_ms: u64,
    pub probe_interval_ms: u64,
    pub probe_timeout_ms: u64,
    pub acquire_timeout_ms: u64,
    pub read_timeout_ms: u64,
    pub watermark_ttl_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    pub url: String,
    pub key_prefix: String,
    /// PEM CA of a `rediss://` server's certificate; empty: the system's roots.
    #[serde(default)]
    pub tls_ca_file: PathBuf,
}

/// The Redis cache of orders, user profiles and first pages of "my orders" (see
/// [`crate::cache`]); every tunable is explained in `config.default.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    pub enabled: bool,
    pub ttl_secs: u64,
    pub list_ttl_secs: u64,
    pub absent_ttl_secs: u64,
    pub ttl_jitter_percent: u32,
    pub write_marker_ms: u64,
    pub fill_lease_ms: u64,
    pub timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub failures_to_open: u32,
    pub probe_interval_ms: u64,
    pub max_concurrent_fills: usize,
    pub max_pending_invalidations: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OrderSettings {
    pub payment_timeout_secs: u64,
    pub reservation_grace_secs: u64,
    /// Days after shipment when the completer confirms receipt for the buyer.
    pub auto_complete_days: u64,
}

impl OrderSettings {
    /// `auto_complete_days` as a duration (saturating: a silly value means "never", not a
    /// panic).
    pub fn auto_complete_after(&self) -> Duration {
        Duration::from_secs(self.auto_complete_days.saturating_mul(86_400))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SweeperSettings {
    pub interval_secs: u64,
    pub batch_size: u32,
}

/// Per-user limits (see [`crate::http::limits`]); 0 turns a limit off.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    pub create_per_user_per_sec: u32,
    pub create_burst: u32,
    pub ids_per_user_per_sec: u32,
    pub ids_burst: u32,
    pub max_unpaid_units_per_user: u32,
}

impl LimitSettings {
    /// Every limit off (tests that are not about limits, tools).
    pub fn off() -> Self {
        LimitSettings {
            create_per_user_per_sec: 0,
            create_burst: 0,
            ids_per_user_per_sec: 0,
            ids_burst: 0,
            max_unpaid_units_per_user: 0,
        }
    }
}

/// The settings whose value may also be read from a file, named by an environment variable
/// `ORDERLY_<SECTION>__<KEY>_FILE` (e.g. `ORDERLY_AUTH__JWT_SECRET_FILE=/run/secrets/jwt`):
/// the secret itself, and the URLs that carry a password. The file's content is the value, a
/// trailing newline removed.
pub const SECRET_KEYS: &[&str] = &[
    "auth.jwt_secret",
    "commerce.url",
    "archive.url",
    "redis.url",
    "events.nats_url",
];

/// `url` with its password, if any, replaced by `***`: database, Redis and NATS URLs may carry
/// one, and an error or log line must not.
pub fn redact_url(url: &str) -> String {
    redact_urls_in(url)
}

/// `text` with the password (or lone token) of every URL in it replaced by `***`: for
/// messages that may quote a setting's value, such as a settings file's parse error.
pub fn redact_urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '/' | '?' | '#' | '"' | '\'' | '`'))
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                match userinfo.split_once(':') {
                    Some((user, _password)) => out.push_str(&format!("{user}:***@")),
                    // A lone token (`nats://TOKEN@host`) is the secret itself.
                    None => out.push_str("***@"),
                }
                out.push_str(host);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Variables with the `ORDERLY_` prefix that are not settings: the binary's `--config`.
const NOT_SETTINGS: &[&str] = &["CONFIG"];

/// Whether `key` (an `ORDERLY_` variable without its prefix) is one of the variables
/// Kubernetes sets for a Service named `orderly…` (`ORDERLY_SERVICE_HOST`,
/// `ORDERLY_SEARCH_PORT_80_TCP_ADDR`, …): not a setting, and no setting looks like one (they
/// have no `__`).
fn is_service_link(key: &str) -> bool {
    if key.contains("__") {
        return false;
    }
    let parts: Vec<&str> = key.split('_').collect();
    let service = parts
        .windows(2)
        .any(|w| w[0] == "SERVICE" && (w[1] == "HOST" || w[1] == "PORT"));
    let port = parts.iter().enumerate().any(|(i, p)| {
        *p == "PORT"
            && (i + 1 == parts.len()
                || (parts[i + 1].bytes().all(|b| b.is_ascii_digit())
                    && matches!(parts.get(i + 2), Some(&("TCP" | "UDP" | "SCTP")))))
    });
    service || port
}

/// The `ORDERLY_` variables as settings, and the secrets read from the files that the
/// `…_FILE` variables of [`SECRET_KEYS`] name.
fn environment() -> Result<(Env, Vec<(String, String)>), ConfigError> {
    let mut secrets = Vec::new();
    let mut from_files = Vec::new();
    for key in SECRET_KEYS {
        let var = format!("ORDERLY_{}_FILE", key.replace('.', "__").to_uppercase());
        let Some(path) = std::env::var_os(&var) else {
            continue;
        };
        let plain = &var[..var.len() - "_FILE".len()];
        if std::env::var_os(plain).is_some() {
            return Err(ConfigError::Invalid(format!("set {plain} or {var}, not both")));
        }
        let value = std::fs::read_to_string(&path).map_err(|e| {
            ConfigError::Invalid(format!("{var}: cannot read {}: {e}", Path::new(&path).display()))
        })?;
        let value = value.strip_suffix('\n').unwrap_or(&value);
        let value = value.strip_suffix('\r').unwrap_or(value);
        secrets.push((key.to_string(), value.to_string()));
        from_files.push(var["ORDERLY_".len()..].to_string());
    }
    let env = Env::prefixed("ORDERLY_")
        .filter(move |k| {
            let k = k.as_str().to_ascii_uppercase();
            !NOT_SETTINGS.contains(&k.as_str()) && !from_files.contains(&k) && !is_service_link(&k)
        })
        .split("__");
    Ok((env, secrets))
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        ConfigError::Load(redact_urls_in(&e.to_string()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that does not parse, or a key that is not one. The parser's message, with the
    /// passwords of URLs it quotes masked (kept as text: the parser's error, as a source,
    /// would print them again).
    #[error("cannot read settings: {0}")]
    Load(String),
    /// Every broken rule, one per line.
    #[error("invalid settings:\n  - {0}")]
    Invalid(String),
}

impl Settings {
    /// Defaults, then `file` if given, then the environment: `ORDERLY_<SECTION>__<KEY>`, and
    /// for the keys in [`SECRET_KEYS`] also `ORDERLY_<SECTION>__<KEY>_FILE`, the path of a
    /// file holding the value (a mounted Kubernetes or Docker secret). A key this version
    /// does not know, in the file or the environment, is an error that names it: a typo
    /// (`ORDERLY_SERVER_LISTEN` with one underscore) must not be ignored silently.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut fig = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(f) = file {
            fig = fig.merge(Toml::file_exact(f));
        }
        let (env, secrets) = environment()?;
        fig = fig.merge(env);
        for (key, value) in secrets {
            fig = fig.merge(Serialized::default(&key, value));
        }
        let settings: Settings = fig.extract().map_err(ConfigError::from)?;
        settings.validate()?;
        Ok(settings)
    }

    /// The compiled-in defaults alone (tests and the playground start from these).
    pub fn defaults() -> Settings {
        Figment::from(Toml::string(DEFAULT_TOML))
            .extract()
            .expect("config.default.toml is valid")
    }

    /// Checks every rule and reports every broken one at once (one per line), so that a
    /// deployment is not fixed one restart at a time.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors: Vec<String> = Vec::new();
        let count = ShardCount::new(self.shards.count).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Err(e) = self.auth.check() {
            errors.push(e);
        }
        if let Some(w) = self.ids.worker_id {
            if WorkerId::new(w).is_none() {
                errors.push(format!("ids.worker_id must be below 64, got {w}"));
            }
        }
        // Renewal runs every third of the TTL: below a second that is a statement every few
        // hundred ms for nothing (tests use 1-2 s to see a lost lease quickly).
        if self.ids.lease_ttl_secs < 1 {
            errors.push("ids.lease_ttl_secs must be at least 1".into());
        }
        let mut owner = vec![None::<&str>; count.get() as usize];
        for db in &self.shards.databases {
            if db.first_shard > db.last_shard || db.last_shard >= count.get() {
                errors.push(format!(
                    "shard database {}: range {}..={} is not within 0..{}",
                    db.name,
                    db.first_shard,
                    db.last_shard,
                    count.get()
                ));
                continue;
            }
            for s in db.first_shard..=db.last_shard {
                if let Some(other) = owner[s as usize].replace(&db.name) {
                    errors.push(format!("shard {s} is held by both {other} and {}", db.name));
                }
            }
        }
        if let Some(s) = owner.iter().position(Option::is_none) {
            errors.push(format!("shard {s} is held by no database"));
        }
        if self.server.body_limit_bytes < 1024 {
            errors.push("server.body_limit_bytes must be at least 1024".into());
        }
        // 0 would complete orders the moment they ship, before any parcel could arrive.
        if self.orders.auto_complete_days < 1 {
            errors.push("orders.auto_complete_days must be at least 1".into());
        }
        if self.orders.reservation_grace_secs * 1000 <= self.server.request_timeout_ms {
            errors.push("orders.reservation_grace_secs must exceed server.request_timeout_ms".into());
        }
        if self.database.max_connections == 0 || self.sweeper.batch_size == 0 {
            errors.push("database.max_connections and sweeper.batch_size must be positive".into());
        }
        let c = &self.cache;
        if c.ttl_secs == 0 || c.list_ttl_secs == 0 || c.absent_ttl_secs == 0 {
            errors.push("cache TTLs must be positive".into());
        }
        if c.ttl_jitter_percent > 50 {
            errors.push("cache.ttl_jitter_percent must be at most 50".into());
        }
        // A fill may only land while the marker of a write it missed still stands.
        if c.fill_lease_ms == 0 || c.fill_lease_ms * 2 > c.write_marker_ms {
            errors.push(
                "cache.fill_lease_ms must be positive and at most half of cache.write_marker_ms".into(),
            );
        }
        if c.timeout_ms == 0 || c.timeout_ms >= c.fill_lease_ms {
            errors.push("cache.timeout_ms must be positive and below cache.fill_lease_ms".into());
        }
        if c.max_concurrent_fills == 0 || c.failures_to_open == 0 {
            errors.push("cache.max_concurrent_fills and cache.failures_to_open must be positive".into());
        }
        if self.server.max_in_flight == 0 {
            errors.push("server.max_in_flight must be positive".into());
        }
        if self.server.readiness_timeout_ms == 0 {
            errors.push("server.readiness_timeout_ms must be positive".into());
        }
        if self
            .server
            .admin_listen
            .is_some_and(|a| a == self.server.listen && a.port() != 0)
        {
            errors.push("server.admin_listen must differ from server.listen".into());
        }
        self.validate_replicas(&mut errors);
        let f = &self.flash;
        if f.gate_rebuild_interval_secs == 0 || f.fallback_concurrency == 0 || f.refresh_ms == 0 {
            errors.push(
                "flash: gate_rebuild_interval_secs, fallback_concurrency and refresh_ms must be positive"
                    .into(),
            );
        }
        if self.cart.loss_window_ms == 0 || self.cart.flush_batch == 0 {
            errors.push("cart.loss_window_ms and cart.flush_batch must be positive".into());
        }
        self.validate_merchant(&mut errors);
        self.validate_archive(&mut errors);
        let e = &self.events;
        if e.relay_batch == 0
            || e.relay_poll_ms == 0
            || e.publish_timeout_ms == 0
            || e.retry_ms == 0
            || e.duplicate_window_secs == 0
            || e.retention_days == 0
            || e.max_publish_attempts == 0
        {
            errors.push("events: relay_batch, relay_poll_ms, publish_timeout_ms, retry_ms, duplicate_window_secs, retention_days and max_publish_attempts must be positive".into());
        }
        let token = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !token(&e.stream) || !e.subject_prefix.split('.').all(token) {
            errors.push("events.stream must be letters, digits, _ or -; events.subject_prefix such tokens joined by dots".into());
        }
        // Tantivy refuses a writer arena below 15 MB, or of 4 GB and more.
        if !(15..4000).contains(&self.search.writer_memory_mb) {
            errors.push("search.writer_memory_mb must be at least 15 and below 4000".into());
        }
        if self.search.data_dir.as_os_str().is_empty() {
            errors.push("search.data_dir must name a directory".into());
        }
        if !self.redis.tls_ca_file.as_os_str().is_empty() && !self.redis.url.starts_with("rediss://") {
            errors.push("redis.tls_ca_file is set but redis.url is not a rediss:// (TLS) URL".into());
        }
        let l = &self.limits;
        if (l.create_per_user_per_sec > 0 && l.create_burst == 0)
            || (l.ids_per_user_per_sec > 0 && l.ids_burst == 0)
        {
            errors
                .push("limits.create_burst and limits.ids_burst must be positive when their rate is".into());
        }
        match errors.is_empty() {
            true => Ok(()),
            false => Err(ConfigError::Invalid(errors.join("\n  - "))),
        }
    }

    fn validate_archive(&self, errors: &mut Vec<String>) {
        let a = &self.archive;
        if a.url.parse::<sqlx::mysql::MySqlConnectOptions>().is_err() {
            errors.push("archive.url is not a mysql:// URL".into());
        }
        if a.min_age_days < 2 {
            errors.push("archive.min_age_days must be at least 2 (creates are retried for a day)".into());
        }
        if a.older_than_days < a.min_age_days {
            errors.push("archive.older_than_days must be at least archive.min_age_days".into());
        }
        if !(1..=10_000).contains(&a.batch_size) || !(1..=1_000).contains(&a.delete_chunk) {
            errors.push("archive.batch_size must be 1..=10000 and archive.delete_chunk 1..=1000".into());
        }
        if !(1..=100).contains(&a.max_busy_percent) {
            errors.push("archive.max_busy_percent must be 1..=100".into());
        }
        if a.max_slowdown == 0 || a.interval_secs == 0 || a.read_timeout_ms == 0 {
            errors.push(
                "archive.max_slowdown, archive.interval_secs and archive.read_timeout_ms must be positive"
                    .into(),
            );
        }
    }

    fn validate_merchant(&self, errors: &mut Vec<String>) {
        let m = &self.merchant;
        if !(1..=1024).contains(&m.tables) {
            errors.push("merchant.tables must be between 1 and 1024".into());
        }
        if m.report_utc_offset_minutes.abs() > 14 * 60 {
            errors.push("merchant.report_utc_offset_minutes must be within ±840 (±14 h)".into());
        }
        let mut owner = vec![false; m.tables as usize];
        for (i, db) in m.databases.iter().enumerate() {
            if db.url.parse::<sqlx::mysql::MySqlConnectOptions>().is_err() {
                errors.push(format!("merchant database {i} is not a mysql:// URL"));
            }
            if db.first_table > db.last_table || db.last_table >= m.tables {
                errors.push(format!(
                    "merchant database {i}: tables {}..={} are not within 0..{}",
                    db.first_table, db.last_table, m.tables
                ));
                continue;
            }
            for t in db.first_table..=db.last_table {
                if std::mem::replace(&mut owner[t as usize], true) {
                    errors.push(format!("merchant table {t} is held by two databases"));
                }
            }
        }
        if let Some(t) = owner.iter().position(|held| !held) {
            errors.push(format!("merchant table {t} is held by no database"));
        }
    }

    fn validate_replicas(&self, errors: &mut Vec<String>) {
        let lists = self
            .shards
            .databases
            .iter()
            .map(|d| (d.name.as_str(), &d.primary, &d.replicas))
            .chain([("commerce", &self.commerce.url, &self.commerce.replicas)]);
        for (name, primary, replicas) in lists {
            for (i, url) in replicas.iter().enumerate() {
                if url.parse::<sqlx::mysql::MySqlConnectOptions>().is_err() {
                    errors.push(format!("replica {i} of {name} is not a mysql:// URL"));
                }
                if url == primary || replicas[..i].contains(url) {
                    errors.push(format!(
                        "replica {i} of {name} repeats its primary or another replica"
                    ));
                }
            }
        }
        let r = &self.replicas;
        if r.gtid_wait_ms == 0
            || r.probe_interval_ms == 0
            || r.probe_timeout_ms == 0
            || r.acquire_timeout_ms == 0
            || r.read_timeout_ms == 0
        {
            errors.push("replicas: gtid_wait_ms, probe_interval_ms, probe_timeout_ms, acquire_timeout_ms and read_timeout_ms must be positive".into());
        }
        // A replica may be this far behind and still in rotation: up to max_lag_ms, plus one
        // probe interval before the probe sees it.
        let worst_lag = r.max_lag_ms + r.probe_interval_ms + r.probe_timeout_ms;
        // A read with no watermark trusts the replica; that is safe only once every write whose
        // watermark is gone has reached every replica in rotation.
        if r.watermark_ttl_ms <= worst_lag {
            errors.push(
                "replicas.watermark_ttl_ms must exceed max_lag_ms + probe_interval_ms + probe_timeout_ms"
                    .into(),
            );
        }
        // The cache fills from replicas: a fill that missed a write must still meet its marker.
        if self.cache.enabled && self.cache.write_marker_ms <= worst_lag {
            errors.push("cache.write_marker_ms must exceed replicas.max_lag_ms + probe_interval_ms + probe_timeout_ms".into());
        }
    }

    pub fn shard_count(&self) -> ShardCount {
        ShardCount::new(self.shards.count).expect("validated at load")
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.server.request_timeout_ms)
    }
}

#[cfg(test)]
// `figment::Jail`'s closures return its large error type; only tests use them.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    fn valid() -> Settings {
        let mut s = Settings::defaults();
        s.auth.jwt_secret = "x".repeat(32).into();
        s
    }

    #[test]
    fn defaults_are_valid_once_a_secret_is_set() {
        assert!(Settings::defaults().validate().is_err());
        valid().validate().unwrap();
    }

    #[test]
    fn auth_defaults_check_no_issuer_and_bound_token_lifetime() {
        let s = valid();
        assert_eq!((s.auth.issuer.as_str(), s.auth.audience.as_str()), ("", ""));
        assert_eq!(s.auth.max_token_lifetime_secs, 86400);
        let mut s = valid();
        s.auth.max_token_lifetime_secs = 0;
        assert!(s.validate().is_err());
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn an_unknown_key_in_the_environment_is_refused_and_named() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("ORDERLY_AUTH__JWT_SECRET", SECRET);
            jail.set_env("ORDERLY_CONFIG", "ignored.toml");
            Settings::load(None).expect("ORDERLY_CONFIG is the binary's, not a setting");
            // What Kubernetes sets for the Services `orderly` and `orderly-search`: not settings.
            for k in [
                "ORDERLY_SERVICE_HOST",
                "ORDERLY_SERVICE_PORT",
                "ORDERLY_SERVICE_PORT_HTTP",
                "ORDERLY_PORT",
                "ORDERLY_PORT_80_TCP_ADDR",
                "ORDERLY_SEARCH_SERVICE_HOST",
                "ORDERLY_SEARCH_PORT_80_TCP",
            ] {
                jail.set_env(k, "10.0.0.1");
            }
            Settings::load(None).expect("Kubernetes service links are not settings");
            // A value that does not parse is quoted, its password masked (here and in the
            // error's chain).
            jail.set_env("ORDERLY_COMMERCE__REPLICAS", "mysql://orderly:s3cret@db:3306/c");
            let e = Settings::load(None).unwrap_err();
            let text = format!("{e} {:?}", std::error::Error::source(&e));
            assert!(
                text.contains("orderly:***@db") && !text.contains("s3cret"),
                "{text}"
            );
            jail.set_env("ORDERLY_COMMERCE__REPLICAS", "[]");
            // One underscore instead of two: a top-level key `server_listen`.
            jail.set_env("ORDERLY_SERVER_LISTEN", "0.0.0.0:9000");
            let e = Settings::load(None).unwrap_err().to_string();
            assert!(e.contains("server_listen"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn an_unknown_key_in_the_file_is_refused_and_named() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("ORDERLY_AUTH__JWT_SECRET", SECRET);
            jail.create_file("o.toml", "[server]\nlisten = \"127.0.0.1:1\"\nmax_inflight = 3\n")?;
            let e = Settings::load(Some(Path::new("o.toml"))).unwrap_err().to_string();
            assert!(e.contains("max_inflight"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn a_secret_is_read_from_the_file_its_file_variable_names() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("jwt", &format!("{SECRET}\n"))?;
            jail.create_file("redis", "redis://:pw@127.0.0.1:6390/\n")?;
            jail.set_env("ORDERLY_AUTH__JWT_SECRET_FILE", "jwt");
            jail.set_env("ORDERLY_REDIS__URL_FILE", "redis");
            let s = Settings::load(None).expect("settings");
            assert_eq!(secrecy::ExposeSecret::expose_secret(&s.auth.jwt_secret), SECRET);
            assert_eq!(s.redis.url, "redis://:pw@127.0.0.1:6390/");
            // Both ways at once is ambiguous.
            jail.set_env("ORDERLY_AUTH__JWT_SECRET", SECRET);
            let e = Settings::load(None).unwrap_err().to_string();
            assert!(e.contains("not both"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn a_redacted_url_keeps_everything_but_the_password() {
        assert_eq!(
            redact_url("mysql://orderly:s3cret@db:3306/orders?ssl-mode=VERIFY_IDENTITY"),
            "mysql://orderly:***@db:3306/orders?ssl-mode=VERIFY_IDENTITY"
        );
        assert_eq!(
            redact_url("rediss://:pw@cache:6380/0"),
            "rediss://:***@cache:6380/0"
        );
        assert_eq!(redact_url("redis://cache:6379"), "redis://cache:6379");
        assert_eq!(redact_url("nats://s3cr3t@n:4222"), "nats://***@n:4222");
        assert_eq!(
            redact_urls_in("invalid type: found string \"mysql://a:pw@h/x, redis://:t@r\""),
            "invalid type: found string \"mysql://a:***@h/x, redis://:***@r\""
        );
    }

    #[test]
    fn every_broken_rule_is_reported_at_once() {
        let mut s = Settings::defaults();
        s.server.max_in_flight = 0;
        s.archive.min_age_days = 1;
        s.shards.databases[0].last_shard = 99;
        let e = s.validate().unwrap_err().to_string();
        for part in [
            "jwt_secret",
            "max_in_flight",
            "min_age_days",
            "0..32",
            "held by no database",
        ] {
            assert!(e.contains(part), "{part:?} missing from {e}");
        }
    }

    #[test]
    fn auth_needs_a_key_source_and_checks_each_one() {
        let key = |kid: Option<&str>, secret: &str| HmacKey {
            kid: kid.map(str::to_owned),
            secret: secret.into(),
        };
        let mut s = Settings::defaults();
        s.auth.jwks_url = "https://idp.example/.well-known/jwks.json".into();
        s.validate().unwrap();
        s.auth.jwks_url = "ftp://idp.example/jwks.json".into();
        assert!(s.validate().is_err());
        s.auth.jwks_url = "idp.example/jwks.json".into();
        assert!(s.validate().is_err());
        let mut s = Settings::defaults();
        s.auth.keys = vec![key(Some("a"), &"y".repeat(32)), key(None, &"z".repeat(32))];
        s.validate().unwrap();
        s.auth.keys.push(key(Some("a"), &"w".repeat(32)));
        assert!(s.validate().is_err(), "duplicate kid");
        s.auth.keys = vec![key(None, &"y".repeat(31))];
        assert!(s.validate().is_err(), "short secret");
        let mut s = valid();
        s.auth.jwt_secret = "x".repeat(31).into();
        assert!(s.validate().is_err());
    }

    #[test]
    fn auth_algorithms_and_claim_pointers_are_checked() {
        use jsonwebtoken::Algorithm;
        let s = valid();
        assert_eq!(
            s.auth.algorithms,
            [
                Algorithm::HS256,
                Algorithm::RS256,
                Algorithm::ES256,
                Algorithm::EdDSA
            ]
        );
        assert_eq!(
            (
                s.auth.user_claim.as_str(),
                s.auth.role_claim.as_str(),
                s.auth.shop_claim.as_str()
            ),
            ("/sub", "/role", "/shop_id")
        );
        let mut s = valid();
        s.auth.algorithms = vec![Algorithm::HS512];
        assert!(s.validate().is_err());
        s.auth.algorithms = vec![];
        assert!(s.validate().is_err());
        let mut s = valid();
        s.auth.role_claim = "role".into();
        assert!(s.validate().is_err());
        let unknown = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Toml::string("[auth]\nalgorithms = [\"none\"]"))
            .extract::<Settings>();
        assert!(unknown.is_err(), "`none` is no algorithm");
    }

    #[test]
    fn secrets_stay_out_of_debug_output_but_reach_a_child_process() {
        let mut s = valid();
        s.auth.jwt_secret = "first-secret-first-secret-first-secret".into();
        s.auth.keys = vec![HmacKey {
            kid: Some("k2".into()),
            secret: "second-secret-second-secret-second".into(),
        }];
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("first-secret") && !debug.contains("second-secret"),
            "{debug}"
        );
        let written = toml::to_string(&s).unwrap();
        let back: Settings = Figment::from(Toml::string(&written)).extract().unwrap();
        assert_eq!(
            back.auth.jwt_secret.expose_secret(),
            s.auth.jwt_secret.expose_secret()
        );
        assert_eq!(
            back.auth.keys[0].secret.expose_secret(),
            "second-secret-second-secret-second"
        );
    }

    #[test]
    fn cache_fills_must_end_before_the_write_markers_they_could_miss() {
        let mut s = valid();
        s.cache.fill_lease_ms = s.cache.write_marker_ms / 2 + 1;
        assert!(s.validate().is_err());
        let mut s = valid();
        s.cache.timeout_ms = s.cache.fill_lease_ms;
        assert!(s.validate().is_err());
        let mut s = valid();
        s.cache.ttl_jitter_percent = 51;
        assert!(s.validate().is_err());
    }

    /// Every `section.key` of `config.default.toml`, commented-out ones (`# worker_id = 0`)
    /// included; keys of an array of tables count as one, `section.table[]`.
    fn default_toml_keys() -> std::collections::BTreeSet<String> {
        let mut keys = std::collections::BTreeSet::new();
        let mut section: Option<String> = None;
        for line in DEFAULT_TOML.lines().map(str::trim) {
            if let Some(array) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
                keys.insert(format!("{array}[]"));
                section = None;
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = Some(name.to_owned());
                continue;
            }
            let Some(section) = &section else { continue };
            let assignment = line.strip_prefix('#').map_or(line, str::trim_start);
            if let Some((key, _)) = assignment.split_once(" = ") {
                if !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                    keys.insert(format!("{section}.{key}"));
                }
            }
        }
        keys
    }

    /// Every key named in the first column of the Keys table of docs/configuration.md.
    fn documented_keys() -> std::collections::BTreeSet<String> {
        let doc = include_str!("../docs/configuration.md");
        let table = doc
            .split("\n## Keys\n")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("docs/configuration.md has a Keys section");
        let mut keys = std::collections::BTreeSet::new();
        for row in table.lines().filter(|l| l.starts_with("| `")) {
            let first = row.split('|').nth(1).unwrap_or_default();
            keys.extend(first.split('`').skip(1).step_by(2).map(str::to_owned));
        }
        keys
    }

    #[test]
    fn the_configuration_doc_names_every_key_and_no_other() {
        let toml = default_toml_keys();
        let documented = documented_keys();
        assert!(toml.contains("ids.worker_id") && toml.contains("shards.databases[]"));
        let missing: Vec<_> = toml.difference(&documented).collect();
        let stale: Vec<_> = documented.difference(&toml).collect();
        assert!(
            missing.is_empty(),
            "keys of config.default.toml not in docs/configuration.md: {missing:?}"
        );
        assert!(
            stale.is_empty(),
            "docs/configuration.md names keys config.default.toml lacks: {stale:?}"
        );
    }

    #[test]
    fn the_admin_listener_is_off_unless_an_address_is_given() {
        let with = |toml: &str| {
            Figment::from(Toml::string(DEFAULT_TOML))
                .merge(Toml::string(toml))
                .extract::<Settings>()
                .map_err(Box::new)
        };
        assert_eq!(valid().server.admin_listen, None, "off by default");
        let s = with("[server]\nadmin_listen = \"\"").unwrap();
        assert_eq!(s.server.admin_listen, None, "empty turns it off");
        let s = with("[server]\nadmin_listen = \"127.0.0.1:9090\"").unwrap();
        assert_eq!(s.server.admin_listen, Some(([127, 0, 0, 1], 9090).into()));
        assert!(with("[server]\nadmin_listen = \"nine\"").is_err());
        let mut s = valid();
        s.server.admin_listen = Some(s.server.listen);
        assert!(s.validate().is_err(), "the API's own address");
        let mut s = valid();
        s.server.readiness_timeout_ms = 0;
        assert!(s.validate().is_err());
    }

    #[test]
    fn limits_need_a_burst_and_the_in_flight_bound_is_positive() {
        let mut s = valid();
        s.limits.create_burst = 0;
        assert!(s.validate().is_err());
        let mut s = valid();
        s.limits.create_per_user_per_sec = 0;
        s.limits.create_burst = 0;
        s.validate().unwrap();
        let mut s = valid();
        s.server.max_in_flight = 0;
        assert!(s.validate().is_err());
    }

    #[test]
    fn shipped_orders_wait_at_least_a_day_before_they_complete_themselves() {
        let s = valid();
        assert_eq!(s.orders.auto_complete_days, 10);
        assert_eq!(s.orders.auto_complete_after(), Duration::from_secs(10 * 86_400));
        let mut s = valid();
        s.orders.auto_complete_days = 0;
        assert!(s.validate().is_err());
        s.orders.auto_complete_days = 1;
        s.validate().unwrap();
        s.orders.auto_complete_days = u64::MAX;
        assert_eq!(s.orders.auto_complete_after(), Duration::from_secs(u64::MAX));
    }

    #[test]
    fn the_archive_never_moves_orders_a_retried_create_could_still_look_for() {
        let s = valid();
        assert_eq!((s.archive.older_than_days, s.archive.min_age_days), (90, 30));
        let mut s = valid();
        s.archive.min_age_days = 1;
        s.archive.older_than_days = 1;
        assert!(s.validate().is_err(), "ids are retried for a day");
        let mut s = valid();
        s.archive.older_than_days = 29;
        assert!(s.validate().is_err(), "older_than below the floor reads rely on");
        let mut s = valid();
        s.archive.batch_size = 0;
        assert!(s.validate().is_err());
        let mut s = valid();
        s.archive.url = "not a url".into();
        assert!(s.validate().is_err());
    }

    #[test]
    fn shard_ranges_must_cover_every_shard_once() {
        let mut s = valid();
        s.shards.databases[0].last_shard = 30;
        assert!(s.validate().is_err());
        let mut s = valid();
        let mut second = s.shards.databases[0].clone();
        second.name = "b".into();
        second.first_shard = 31;
        s.shards.databases.push(second);
        assert!(s.validate().is_err());
        let mut s = valid();
        s.shards.count = 48;
        assert!(s.validate().is_err());
    }
}
