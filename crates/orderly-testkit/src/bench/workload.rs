//! One operation of each scenario, over HTTP (the service, and its cache-off and primary-only
//! twins when there are) and raw (the same SQL through the same storage functions, no HTTP, no
//! service; for `get-hot` a Redis `GET` of the cached order), plus the catalog and the order
//! pools the operations draw from, the flash sales of the `flash` scenario, and the GTID wait
//! measurement on a replica.

use orderly::storage::Db;
use sqlx::AssertSqlSafe;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use rand::Rng;
use serde_json::{json, Value};
use sqlx::mysql::MySqlConnectOptions;
use sqlx::{ConnectOptions, MySqlConnection};

use crate::cluster::LocalCluster;
use crate::raw::RawDb;
use orderly::config::Settings;
use orderly::domain::actor::{Caller, Role};
use orderly::domain::consistency::Gtid;
use orderly::domain::flash::MAX_PER_USER_LIMIT;
use orderly::domain::ids::{OrderId, ProductId, ShopId, UserId};
use orderly::domain::money::{Currency, Money};
use orderly::domain::order::{price_order, Address, NewLine, NewOrder, PaymentKind, ProductSnapshot};
use orderly::domain::status::OrderStatus;
use orderly::http::auth::AuthKeys;
use orderly::http::AppState;
use orderly::lease::IdSource;
use orderly::redis::cache::order_key;
use orderly::service::Error as ServiceError;
use orderly::storage::commerce::{self, Reservation, ReserveOutcome};
use orderly::storage::orders::{self, ListQuery, MoneyMovement, OrderDoor, StatusChange};
use orderly::storage::replicas::wait_for_gtid;
use orderly::storage::shards::ShardTables;
use orderly::storage::{self, StorageError};

mod cart;
mod floor;
mod http_floor;

use super::checks::{self, Check};
use super::{
    drive, new_histogram, Baseline, BenchOptions, GtidWaitLevel, Phase, Run, Scenario, ServedBy,
    ServerCounters,
};

/// The durability settings of one MariaDB server, as it reports them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerSettings {
    /// `host:port`.
    pub server: String,
    pub innodb_flush_log_at_trx_commit: i64,
    pub sync_binlog: i64,
    pub innodb_doublewrite: bool,
    pub log_bin: bool,
}

/// How one operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// An expected business refusal (a flash sale selling out).
    Refused(String),
    Error(String),
}

impl From<StorageError> for Outcome {
    fn from(e: StorageError) -> Self {
        Outcome::Error(match e {
            StorageError::Duplicate(_) => "duplicate".into(),
            e if e.is_retryable() => "deadlock".into(),
            e if e.is_connection_failure() => "connection".into(),
            _ => "database".into(),
        })
    }
}

impl From<sqlx::Error> for Outcome {
    fn from(e: sqlx::Error) -> Self {
        StorageError::from(e).into()
    }
}

/// Orders the read scenarios draw from: (index of the buyer, order id).
type Pool = Arc<Vec<(usize, OrderId)>>;

/// Counters of Redis `INFO stats`: lookups of a key that existed, and of one that did not.
#[derive(Debug, Clone, Copy)]
pub struct Keyspace {
    pub hits: u64,
    pub misses: u64,
}

/// How many answers of one service phase named each server in `Served-By`.
#[derive(Default)]
struct ServedCounter {
    cache: AtomicU64,
    replica: AtomicU64,
    primary: AtomicU64,
    /// Successful answers without a `Served-By` header we know.
    other: AtomicU64,
}

impl ServedCounter {
    /// The counter of an answer whose `Served-By` header is `served`.
    fn counter(&self, served: Option<&[u8]>) -> &AtomicU64 {
        match served {
            Some(b"cache") => &self.cache,
            Some(b"replica") => &self.replica,
            Some(b"primary") => &self.primary,
            _ => &self.other,
        }
    }

    /// The counts so far, and zero again.
    fn take(&self, phase: Phase) -> ServedBy {
        ServedBy::new(
            phase,
            self.cache.swap(0, Ordering::Relaxed),
            self.replica.swap(0, Ordering::Relaxed),
            self.primary.swap(0, Ordering::Relaxed),
            self.other.swap(0, Ordering::Relaxed),
        )
    }
}

/// A flash sale the bench created for the service phase of `flash` that sells it.
#[derive(Debug, Clone)]
pub struct FlashSaleMade {
    /// The service phase that sells it (the service, behind its gate; the cache-off twin, on
    /// the database path).
    pub phase: Phase,
    /// The sale's id, as the service answered it.
    pub sale_id: String,
    pub product_id: ProductId,
    pub units: i64,
    /// Stock loaded on the product's shelf (more than the sale's units: the sale is the limit).
    pub loaded: i64,
}

/// The service phases whose answers' `Served-By` is counted (get-cold and list).
const COUNTED_PHASES: [Phase; 3] = [Phase::Service, Phase::ServiceCacheOff, Phase::ServicePrimaryOnly];

/// Everything the operations share.
pub struct Workload {
    base: String,
    /// The second instance of the service, on the same databases and Redis with its cache
    /// off (self-started runs only).
    base_cache_off: Option<String>,
    /// The third instance, on the same databases and Redis with its cache as the service's,
    /// that reads every database's primary: no replica at all (self-started runs with
    /// replicas only).
    base_primary_only: Option<String>,
    /// `Served-By` of the answers of each of [`COUNTED_PHASES`] in get-cold and list.
    served: [ServedCounter; 3],
    /// The self-started cluster, to wait for its replicas to catch up before reads.
    cluster: Option<Arc<LocalCluster>>,
    client: reqwest::Client,
    /// The service's application state (self-started runs only), for get-hot's in-process
    /// reads.
    app: Option<AppState>,
    /// The service's Redis, for the hit counters and get-hot's pipelined baseline (every
    /// client on this one multiplexed connection); `None` when the service runs without a
    /// cache or Redis did not answer (get-hot then has the SQL baseline only).
    redis: Option<redis::aio::ConnectionManager>,
    /// The same Redis, to open get-hot's per-client connections.
    redis_client: Option<redis::Client>,
    /// get-hot's baseline connections, one per client (opened when get-hot is prepared): a
    /// client issues one `GET` at a time on its own, as each HTTP client does on its own
    /// keep-alive connection, so no client's GET rides in another's pipeline.
    redis_per_client: Mutex<Arc<Vec<redis::aio::MultiplexedConnection>>>,
    key_prefix: String,
    /// The base URL of get-hot's HTTP floor (see `workload/http_floor.rs`), when get-hot runs
    /// with Redis.
    http_floor: Option<String>,
    /// The bench's own pools on every shard primary, for the raw baselines and the checks.
    shards: RawDb,
    commerce: Db,
    ids: Arc<IdSource>,
    /// Stops the keeper of the raw phase's worker id; the guard also when the workload is
    /// dropped.
    lease_stop: tokio_util::sync::CancellationToken,
    _lease_guard: tokio_util::sync::DropGuard,
    lease_keeper: Mutex<Option<tokio::task::JoinHandle<()>>>,
    users: Vec<UserId>,
    tokens: Vec<String>,
    merchant: String,
    service_token: String,
    /// An administrator's token: the bench creates the flash sales.
    admin: String,
    /// `[cache] enabled` of the service under test: whether its flash sales have the gate.
    cache_enabled: bool,
    /// `flash.fallback_concurrency` of the service under test.
    fallback_concurrency: usize,
    products: Vec<ProductSnapshot>,
    /// The flash products of the service's runs (a sale each, behind the gate when the
    /// service caches): one per half of the ABBA order, or the first alone.
    hot: [ProductSnapshot; 2],
    /// The flash products of the cache-off twin's runs (a sale each, on the database path).
    hot_off: [ProductSnapshot; 2],
    /// The flash product of the raw phase (no sale: the shelf is the limit).
    hot_raw: ProductSnapshot,
    /// The flash sales made (once per run of the bench), one per service phase of `flash`.
    flash_sales: Mutex<Vec<FlashSaleMade>>,
    /// Order ids issued before each service run of `flash` (by its slot in the schedule), one
    /// per operation: the run times the create alone.
    flash_ids: Mutex<HashMap<usize, Arc<Vec<OrderId>>>>,
    address: Address,
    pay_timeout: TimeDelta,
    /// The service's `limits.max_unpaid_units_per_user`, so the raw baseline runs the same
    /// SQL as the service's create (the per-user lock and count included).
    max_held_units: Option<i64>,
    /// Stock loaded per product: what "units sold + stock left" must add up to.
    loaded: HashMap<ProductId, i64>,
    /// Order ids acknowledged (2xx, or written raw) in the current scenario.
    acked: Mutex<Vec<OrderId>>,
    /// Every order the bench made, for the read scenarios.
    made: Mutex<Vec<(usize, OrderId)>>,
    hot_pool: Mutex<Pool>,
    /// Whether warming the hot set through the service left every entry in Redis (get-hot
    /// with the Redis baseline only).
    hot_cached: Mutex<Option<Check>>,
    cold_pool: Mutex<Pool>,
    list_users: Mutex<Arc<Vec<usize>>>,
    /// `cart`: the buyers whose carts the service phases changed (by buyer index).
    cart_touched: Vec<std::sync::atomic::AtomicBool>,
    /// The settings the bench was given (the cart flusher's measurement builds a cart service
    /// of its own from them).
    settings: Settings,
}

/// Products of the catalog hold this much stock: no normal scenario sells out.
const NORMAL_STOCK: i64 = 100_000_000;

/// The per-user limit of the bench's flash sales: the most the API allows. Each buyer asks for
/// one unit at a time, `ceil(10 × flash_stock / users)` times per phase, which
/// [`BenchOptions::validate`] keeps within it: the limit never refuses anyone.
pub const FLASH_PER_USER_LIMIT: i64 = MAX_PER_USER_LIMIT;

/// Creates of normal products per client through each flash instance before the runs.
const FLASH_WARM_UP_PER_CLIENT: u64 = 4;

/// How many times an order id is asked for again after a 429 before `flash` gives up.
const ID_RATE_LIMIT_RETRIES: usize = 60;

/// How long the bench waits for Redis to accept a connection: the service gives it the same.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Orders the hot set of `get-hot` holds: few enough to stay cached, enough to spread over
/// shards.
const HOT_ORDERS: usize = 10;

impl Workload {
    /// Connects to the databases of `settings`, loads the catalog (users, a shop, products,
    /// five flash products: two for the service's runs, two for the cache-off twin's, one for
    /// the raw phase) and mints tokens. A service run's product gets a flash sale of its
    /// share of `flash_stock` units when `flash` is prepared, on a shelf of twice
    /// `flash_stock`, so that the sale is what sells out; the raw phase's product has
    /// `flash_stock` on its shelf and no sale.
    pub async fn setup(settings: &Settings, base: &str, opts: &BenchOptions) -> anyhow::Result<Workload> {
        // The raw baseline gets the same pool sizes as the service under test.
        let shards = RawDb::connect(settings).await?;
        let commerce = storage::connect(&settings.commerce.url, &settings.database).await?;
        // The raw phase issues ids as the service does: under a worker id of its own, leased
        // in the commerce database, released when the workload is dropped.
        let lease_stop = tokio_util::sync::CancellationToken::new();
        let (ids, keeper) = orderly::app::lease_worker_from(settings, lease_stop.clone()).await?;
        let now = Utc::now().naive_utc();
        let shop: i64 = sqlx::query("INSERT INTO shops (name, created_at) VALUES ('bench shop', ?)")
            .bind(now)
            .execute(&commerce)
            .await?
            .last_insert_id() as i64;
        let shop = ShopId::new(shop).ok_or_else(|| anyhow::anyhow!("bad shop id"))?;

        // Buyers: ids far above anything else, so repeated runs against one database do not
        // collide.
        let first_user: i64 = sqlx::query_scalar("SELECT CAST(COALESCE(MAX(id), 0) AS SIGNED) FROM users")
            .fetch_one(&commerce)
            .await?;
        let first_user = first_user.max(1_000_000) + 1;
        let users: Vec<UserId> = (0..i64::from(opts.users))
            .filter_map(|i| UserId::new(first_user + i))
            .collect();
        for chunk in users.chunks(1000) {
            let sql = format!(
                "INSERT INTO users (id, name, level, created_at) VALUES {}",
                vec!["(?, ?, 1, ?)"; chunk.len()].join(", ")
            );
            let mut q = sqlx::query(AssertSqlSafe(&*sql));
            for u in chunk {
                q = q.bind(u.get()).bind(format!("buyer {u}")).bind(now);
            }
            q.execute(&commerce).await?;
        }

        let mut products = Vec::new();
        let mut loaded = HashMap::new();
        for i in 0..opts.products + 5 {
            let (name, stock) = if i == opts.products + 4 {
                (format!("flash {i}"), opts.flash_stock)
            } else if i >= opts.products {
                (format!("flash {i}"), 2 * opts.flash_stock)
            } else {
                (format!("product {i}"), NORMAL_STOCK)
            };
            let price = Money::new(1000 + i64::from(i % 50) * 100).unwrap_or(Money::ZERO);
            let id =
                commerce::insert_product(&commerce, shop, &name, price, Currency::CNY, stock, Utc::now())
                    .await?;
            loaded.insert(id, stock);
            products.push(ProductSnapshot {
                id,
                shop_id: shop,
                name,
                price,
                currency: Currency::CNY,
            });
        }
        let mut flash_product = || products.pop().ok_or_else(|| anyhow::anyhow!("no products"));
        let hot_raw = flash_product()?;
        let hot_off = [flash_product()?, flash_product()?];
        let hot = [flash_product()?, flash_product()?];

        let keys = AuthKeys::new(&settings.auth);
        let day = Duration::from_secs(24 * 3600);
        let tokens = users
            .iter()
            .map(|u| keys.issue(&u.to_string(), Role::User, None, day))
            .collect();
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(opts.concurrency)
            .timeout(Duration::from_secs(30))
            .build()?;
        let needs_redis = opts.scenarios.contains(&Scenario::GetHot)
            || opts.scenarios.contains(&Scenario::GetCold)
            || opts.scenarios.contains(&Scenario::Cart);
        let (redis_client, redis) = if settings.cache.enabled && needs_redis {
            match connect_redis(&settings.redis.url).await {
                Some((client, conn)) => (Some(client), Some(conn)),
                None => (None, None),
            }
        } else {
            (None, None)
        };
        let http_floor = match (&redis, opts.scenarios.contains(&Scenario::GetHot)) {
            (Some(redis), true) => Some(
                http_floor::start(
                    AuthKeys::new(&settings.auth),
                    redis.clone(),
                    settings.redis.key_prefix.clone(),
                )
                .await?,
            ),
            _ => None,
        };
        Ok(Workload {
            base: base.trim_end_matches('/').to_owned(),
            http_floor,
            base_cache_off: None,
            base_primary_only: None,
            served: Default::default(),
            cluster: None,
            client,
            app: None,
            redis,
            redis_client,
            redis_per_client: Mutex::new(Arc::new(Vec::new())),
            key_prefix: settings.redis.key_prefix.clone(),
            shards,
            commerce,
            ids,
            _lease_guard: lease_stop.clone().drop_guard(),
            lease_stop,
            lease_keeper: Mutex::new(Some(keeper)),
            users,
            tokens,
            merchant: keys.issue("1", Role::Merchant, Some(shop), day),
            service_token: keys.issue("0", Role::Service, None, day),
            admin: keys.issue("1", Role::Admin, None, day),
            cache_enabled: settings.cache.enabled,
            fallback_concurrency: settings.flash.fallback_concurrency,
            products,
            hot,
            hot_off,
            hot_raw,
            flash_sales: Mutex::new(Vec::new()),
            flash_ids: Mutex::new(HashMap::new()),
            address: Address {
                name: "Bench Buyer".into(),
                phone: "13800000000".into(),
                region: "Shanghai".into(),
                detail: "11 November Road".into(),
            },
            pay_timeout: TimeDelta::seconds(settings.orders.payment_timeout_secs as i64),
            max_held_units: Some(i64::from(settings.limits.max_unpaid_units_per_user)).filter(|&m| m > 0),
            loaded,
            acked: Mutex::new(Vec::new()),
            made: Mutex::new(Vec::new()),
            hot_pool: Mutex::new(Arc::new(Vec::new())),
            hot_cached: Mutex::new(None),
            cold_pool: Mutex::new(Arc::new(Vec::new())),
            list_users: Mutex::new(Arc::new(Vec::new())),
            cart_touched: (0..opts.users).map(|_| Default::default()).collect(),
            settings: settings.clone(),
        })
    }

    /// Adds the service instance at `base` (same databases and Redis, cache off): `create`,
    /// `get-cold` and `list` then also run against it.
    pub fn with_cache_off_service(mut self, base: &str) -> Workload {
        self.base_cache_off = Some(base.trim_end_matches('/').to_owned());
        self
    }

    /// Adds the service instance at `base` (same databases, Redis and cache, no replicas):
    /// `get-cold` and `list` then also run against it.
    pub fn with_primary_only_service(mut self, base: &str) -> Workload {
        self.base_primary_only = Some(base.trim_end_matches('/').to_owned());
        self
    }

    /// Adds the self-started cluster: before get-cold and list read, its replicas are waited
    /// for (the seeded orders applied, every replica back in the service's rotation).
    pub fn with_cluster(mut self, cluster: Arc<LocalCluster>) -> Workload {
        self.cluster = Some(cluster);
        self
    }

    /// Adds the service's application state (the service under test, in this process):
    /// get-hot then also reads through its read path without HTTP.
    pub fn with_app_state(mut self, app: AppState) -> Workload {
        self.app = Some(app);
        self
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the raw phase of `scenario` issues: a Redis `GET` of the cached order for
    /// `get-hot` when the service caches (and Redis answers), the service's SQL otherwise.
    pub fn baseline(&self, scenario: Scenario) -> Baseline {
        if scenario == Scenario::GetHot && self.redis.is_some() {
            Baseline::RedisGet
        } else if scenario == Scenario::Cart && self.redis.is_some() {
            Baseline::RedisCart
        } else {
            Baseline::Sql
        }
    }

    /// The runs of `scenario`, in the order they run. The service first; when it has twins for
    /// `scenario` (the cache-off twin for create, get-cold and list, which the cache changes
    /// most: create pays invalidation, get-cold fills, list reads a cached first page; the
    /// primary-only twin for get-cold and list, the reads that go to replicas), the service and
    /// its twins as halves in a mirrored order: A B C C B A (A B B A with one twin), so that each
    /// side's two halves sit at the same mean position and a drift that is linear in time
    /// weighs on every side alike. For get-hot, the in-process read path when the bench has
    /// the service's state. Then the raw baseline; for get-hot against Redis, the pipelined
    /// GETs and the SQL read it replaced as further baselines. `flash` runs whole phases, not
    /// halves (a sale sells out once): the service (its sale behind the gate), the cache-off
    /// twin when there is one (its own sale, on the database path), raw.
    pub fn schedule(&self, scenario: Scenario) -> Vec<Run> {
        let full = |phase| Run { phase, halves: 2 };
        let half = |phase| Run { phase, halves: 1 };
        let mut sides = vec![Phase::Service];
        if self.base_cache_off.is_some()
            && matches!(scenario, Scenario::Create | Scenario::GetCold | Scenario::List)
        {
            sides.push(Phase::ServiceCacheOff);
        }
        // A flash sale sells out once, so each run sells a sale of its own from full: with
        // the twin, the gate and the database path as halves in ABBA order (half the units and
        // half the demand each), so that what the first run pays (it follows the warm-up and
        // the sweeper's catching up) falls on both sides alike.
        if scenario == Scenario::Flash {
            let mut runs = if self.base_cache_off.is_some() {
                [
                    Phase::Service,
                    Phase::ServiceCacheOff,
                    Phase::ServiceCacheOff,
                    Phase::Service,
                ]
                .map(half)
                .to_vec()
            } else {
                vec![full(Phase::Service)]
            };
            runs.push(full(Phase::Raw));
            return runs;
        }
        if self.base_primary_only.is_some() && matches!(scenario, Scenario::GetCold | Scenario::List) {
            sides.push(Phase::ServicePrimaryOnly);
        }
        let mut runs: Vec<Run> = if sides.len() > 1 {
            sides.iter().chain(sides.iter().rev()).map(|&p| half(p)).collect()
        } else {
            vec![full(Phase::Service)]
        };
        if matches!(scenario, Scenario::GetHot | Scenario::Cart) && self.app.is_some() {
            runs.push(full(Phase::InProcess));
        }
        runs.push(full(Phase::Raw));
        if scenario == Scenario::Create {
            runs.push(full(Phase::Floor));
        }
        if scenario == Scenario::GetHot && self.http_floor.is_some() {
            runs.push(full(Phase::HttpFloor));
        }
        if self.baseline(scenario) == Baseline::RedisGet {
            runs.push(full(Phase::RawPipelined));
            runs.push(full(Phase::RawSql));
        }
        runs
    }

    /// Redis's keyspace hit and miss counters; `None` without Redis or when it cannot be read.
    pub async fn keyspace(&self) -> Option<Keyspace> {
        let mut redis = self.redis.clone()?;
        let info = match redis::cmd("INFO")
            .arg("stats")
            .query_async::<String>(&mut redis)
            .await
        {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read redis INFO stats: no hit ratio");
                return None;
            }
        };
        let counter = |name: &str| {
            info.lines().find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(':')?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        };
        Some(Keyspace {
            hits: counter("keyspace_hits")?,
            misses: counter("keyspace_misses")?,
        })
    }

    /// Gets the order pools ready for `scenario` (seeding orders raw where too few exist).
    pub async fn prepare(self: &Arc<Self>, scenario: Scenario, opts: &BenchOptions) -> anyhow::Result<()> {
        Self::lock(&self.acked).clear();
        let have = Self::lock(&self.made).len();
        let want = match scenario {
            Scenario::GetHot => HOT_ORDERS,
            // Each run reads its own share of the pool, each order once: per half of the
            // duration up to 500 reads a second, at most 5 000 (10 000 per whole phase).
            Scenario::GetCold => {
                self.cold_halves() * (opts.duration.as_secs().max(1) as usize * 500).clamp(50, 5_000)
            }
            Scenario::List => 1_000,
            _ => 0,
        };
        // List seeds go to a few buyers, so that their first page is a full page.
        let seed_buyers = if scenario == Scenario::List {
            40.min(self.users.len())
        } else {
            self.users.len()
        };
        if have < want {
            let w = self.clone();
            let seeded = drive(
                "seeding orders",
                opts.concurrency.min(32),
                Duration::from_secs(600),
                Some((want - have) as u64),
                opts.progress,
                move |_, i| {
                    let w = w.clone();
                    async move {
                        let product = w.products[i as usize % w.products.len()].clone();
                        match w.raw_create(i as usize % seed_buyers, &product, 1).await {
                            Ok(_) => Outcome::Ok,
                            Err(o) => o,
                        }
                    }
                },
            )
            .await;
            anyhow::ensure!(
                seeded.errors.is_empty(),
                "seeding orders failed: {:?}",
                seeded.errors
            );
        }
        let made = Self::lock(&self.made).clone();
        anyhow::ensure!(!made.is_empty() || want == 0, "no orders to read");
        let mut shuffled = made.clone();
        {
            use rand::seq::SliceRandom;
            shuffled.shuffle(&mut rand::thread_rng());
        }
        *Self::lock(&self.hot_pool) = Arc::new(shuffled.iter().take(HOT_ORDERS).copied().collect());
        *Self::lock(&self.cold_pool) = Arc::new(shuffled);
        // Buyers with a full first page if there are any, otherwise everyone with an order.
        let mut per_buyer: HashMap<usize, usize> = HashMap::new();
        for (u, _) in &made {
            *per_buyer.entry(*u).or_default() += 1;
        }
        let full: Vec<usize> = per_buyer
            .iter()
            .filter(|(_, n)| **n >= 20)
            .map(|(u, _)| *u)
            .collect();
        let listers = if full.is_empty() {
            per_buyer.into_keys().collect()
        } else {
            full
        };
        *Self::lock(&self.list_users) = Arc::new(listers);
        Self::lock(&self.acked).clear();
        for counter in &self.served {
            counter.take(Phase::Service);
        }
        if matches!(scenario, Scenario::GetCold | Scenario::List) {
            self.wait_for_replicas().await?;
        }
        if matches!(scenario, Scenario::GetHot | Scenario::GetCold | Scenario::List) {
            self.warm_buffer_pool().await?;
        }
        if scenario == Scenario::List {
            self.warm_first_pages(opts).await;
        }
        if scenario == Scenario::GetCold {
            self.evict_cold_pool().await?;
        }
        if self.baseline(scenario) == Baseline::RedisCart {
            self.open_redis_per_client(opts.concurrency).await?;
        }
        if self.baseline(scenario) == Baseline::RedisGet {
            self.open_redis_per_client(opts.concurrency).await?;
            let check = self.warm_hot_set().await;
            if !check.ok {
                eprintln!("get-hot: {}", check.detail);
            }
            *Self::lock(&self.hot_cached) = Some(check);
        }
        if scenario == Scenario::Flash {
            self.prepare_flash(opts).await?;
        }
        Ok(())
    }

    /// The instance a service phase runs against.
    fn base_of(&self, phase: Phase) -> Option<&str> {
        match phase {
            Phase::Service => Some(&self.base),
            Phase::ServiceCacheOff => self.base_cache_off.as_deref(),
            Phase::ServicePrimaryOnly => self.base_primary_only.as_deref(),
            _ => None,
        }
    }

    /// The flash product the run in `slot` of `flash`'s schedule buys: a product of its own
    /// for each service run (the first or second of its side), the raw product otherwise.
    fn flash_product(&self, slot: usize) -> &ProductSnapshot {
        let schedule = self.schedule(Scenario::Flash);
        let Some(run) = schedule.get(slot) else {
            return &self.hot_raw;
        };
        let nth = schedule[..slot]
            .iter()
            .filter(|r| r.phase == run.phase)
            .count()
            .min(1);
        match run.phase {
            Phase::ServiceCacheOff => &self.hot_off[nth],
            Phase::Service | Phase::ServicePrimaryOnly => &self.hot[nth],
            _ => &self.hot_raw,
        }
    }

    /// The units the run in `slot` of `flash` sells: `flash_stock` for a whole run, its half
    /// for a half (the second half gets the odd unit).
    pub fn flash_units(&self, slot: usize, flash_stock: i64) -> i64 {
        let schedule = self.schedule(Scenario::Flash);
        match schedule.get(slot) {
            Some(run) if run.halves == 1 => {
                let nth = schedule[..slot].iter().filter(|r| r.phase == run.phase).count();
                if nth == 0 {
                    flash_stock / 2
                } else {
                    flash_stock - flash_stock / 2
                }
            }
            _ => flash_stock,
        }
    }

    /// Whether the instance of a service phase answers flash buyers at the Redis gate.
    pub fn has_gate(&self, phase: Phase) -> bool {
        phase == Phase::Service && self.cache_enabled
    }

    /// `flash.fallback_concurrency` of the service under test (its database path's bound per
    /// sale).
    pub fn service_fallback_concurrency(&self) -> usize {
        self.fallback_concurrency
    }

    /// The flash sales made so far.
    pub fn flash_sales(&self) -> Vec<FlashSaleMade> {
        Self::lock(&self.flash_sales).clone()
    }

    /// Before `flash`: a sale of each service phase's product (once per run of the bench),
    /// created through the instance that sells it (the cache-off twin builds no gate), live
    /// from a minute ago for an hour, `flash_stock` units, a per-user limit that refuses
    /// nobody, payment within 30 minutes; a few creates of normal products through each of
    /// those instances, so that neither side's first buyers pay for opening its connection
    /// pools; then the order ids of every service run, one per operation, for the buyer that
    /// operation's index names (as the run will): the runs time the create alone.
    async fn prepare_flash(self: &Arc<Self>, opts: &BenchOptions) -> anyhow::Result<()> {
        let schedule = self.schedule(Scenario::Flash);
        let service_phases: Vec<(usize, Phase)> = schedule
            .iter()
            .enumerate()
            .map(|(slot, r)| (slot, r.phase))
            .filter(|(_, p)| matches!(p, Phase::Service | Phase::ServiceCacheOff))
            .collect();
        if Self::lock(&self.flash_sales).is_empty() {
            let mut made = Vec::new();
            for &(slot, phase) in &service_phases {
                let base = self
                    .base_of(phase)
                    .ok_or_else(|| anyhow::anyhow!("no instance for {phase:?}"))?;
                let product = self.flash_product(slot).clone();
                let units = self.flash_units(slot, opts.flash_stock);
                made.push(self.create_sale(base, phase, &product, units).await?);
            }
            *Self::lock(&self.flash_sales) = made;
        }
        for &(_, phase) in &service_phases {
            let base = self
                .base_of(phase)
                .ok_or_else(|| anyhow::anyhow!("no instance for {phase:?}"))?
                .to_owned();
            let w = self.clone();
            let warmed = drive(
                &format!("warming {}", phase.label()),
                opts.concurrency,
                Duration::from_secs(60),
                Some(FLASH_WARM_UP_PER_CLIENT * opts.concurrency as u64),
                opts.progress,
                move |_, _| {
                    let (w, base) = (w.clone(), base.clone());
                    async move {
                        let user = rand::thread_rng().gen_range(0..w.users.len());
                        let (p, q) = w.random_line();
                        w.http_create(&base, user, p, q)
                            .await
                            .err()
                            .unwrap_or(Outcome::Ok)
                    }
                },
            )
            .await;
            if !warmed.errors.is_empty() {
                tracing::warn!(errors = ?warmed.errors, phase = phase.label(), "flash: some warm-up creates failed");
            }
        }
        let mut ids = HashMap::new();
        for &(slot, phase) in &service_phases {
            let demand = 10 * self.flash_units(slot, opts.flash_stock) as u64;
            let base = self
                .base_of(phase)
                .ok_or_else(|| anyhow::anyhow!("no instance for {phase:?}"))?;
            if opts.progress {
                eprintln!(
                    "flash: issuing {demand} order ids for the {} run ...",
                    phase.label()
                );
            }
            ids.insert(slot, self.issue_ids(base, demand, opts.concurrency).await?);
        }
        *Self::lock(&self.flash_ids) = ids;
        Ok(())
    }

    /// `POST /v1/flash-sales` of `units` of `product` at half its price through `base`.
    async fn create_sale(
        &self,
        base: &str,
        phase: Phase,
        product: &ProductSnapshot,
        units: i64,
    ) -> anyhow::Result<FlashSaleMade> {
        let now = Utc::now();
        let body = json!({
            "product_id": product.id.to_string(),
            "units": units,
            "sale_price": product.price.minor() / 2,
            "per_user_limit": FLASH_PER_USER_LIMIT,
            "starts_at": (now - TimeDelta::minutes(1)).to_rfc3339(),
            "ends_at": (now + TimeDelta::hours(1)).to_rfc3339(),
            "payment_timeout_secs": 1800,
        });
        let sale = self
            .call(
                base,
                reqwest::Method::POST,
                "/v1/flash-sales",
                &self.admin,
                Some(body),
            )
            .await
            .map_err(|o| anyhow::anyhow!("creating the flash sale of product {}: {o:?}", product.id))?;
        let sale_id = sale["sale_id"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("the new flash sale has no sale_id: {sale}"))?
            .to_owned();
        Ok(FlashSaleMade {
            phase,
            sale_id,
            product_id: product.id,
            units,
            loaded: self.loaded.get(&product.id).copied().unwrap_or(0),
        })
    }

    /// `n` order ids from `base`, the `i`-th for buyer `i % users`, `concurrency` requests at a
    /// time (at most 32); a 429 is waited out and asked again.
    async fn issue_ids(
        self: &Arc<Self>,
        base: &str,
        n: u64,
        concurrency: usize,
    ) -> anyhow::Result<Arc<Vec<OrderId>>> {
        let next = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..concurrency.clamp(1, 32))
            .map(|_| {
                let (w, base, next) = (self.clone(), base.to_owned(), next.clone());
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok::<_, anyhow::Error>(got);
                        }
                        let user = i as usize % w.users.len();
                        let mut tries = 0;
                        let id = loop {
                            match w.issue_id(&base, user).await {
                                Ok(id) => break id,
                                Err(Outcome::Error(code))
                                    if code == "rate_limited" && tries < ID_RATE_LIMIT_RETRIES =>
                                {
                                    tries += 1;
                                    tokio::time::sleep(Duration::from_secs(1)).await;
                                }
                                Err(o) => anyhow::bail!("issuing an order id for flash: {o:?}"),
                            }
                        };
                        got.push((i as usize, id));
                    }
                })
            })
            .collect();
        let mut ids = vec![None; n as usize];
        for task in tasks {
            for (i, id) in task.await?? {
                ids[i] = Some(id);
            }
        }
        let ids: Option<Vec<OrderId>> = ids.into_iter().collect();
        Ok(Arc::new(ids.ok_or_else(|| {
            anyhow::anyhow!("flash: an order id is missing")
        })?))
    }

    /// Before get-cold and list read (self-started runs with replicas): waits until every
    /// replica has applied what its primary logged (the orders just seeded raw leave no
    /// watermark, so a replica that had not applied one would answer 404), then until the
    /// service has every replica in its rotation again (seeding may have pushed one out for
    /// lag): the reads then measure the read/write split, not its fallback.
    async fn wait_for_replicas(&self) -> anyhow::Result<()> {
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        cluster.wait_replicas_caught_up(Duration::from_secs(60)).await?;
        let Some(app) = &self.app else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out: Vec<String> = app
                .orders
                .replica_rotation()
                .into_iter()
                .filter(|(_, in_rotation, configured)| in_rotation < configured)
                .map(|(name, _, _)| name)
                .collect();
            if out.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::warn!(databases = ?out, "replicas still out of the service's rotation: reads go to the primary");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `Served-By` of the answers in get-cold and list since the scenario was prepared, per
    /// service phase that answered any.
    pub fn take_served(&self) -> Vec<ServedBy> {
        COUNTED_PHASES
            .iter()
            .zip(&self.served)
            .map(|(&phase, counter)| counter.take(phase))
            .filter(|s| s.answers() > 0)
            .collect()
    }

    /// Reads every lister's first page once through the service, so that its cache holds
    /// them before list runs. Otherwise the first cache-on run of list pays every fill and the
    /// second, reading the same buyers again, finds them all: an ABBA comparison assumes a
    /// drift that is even over time, not a step in its first run. (Within the page TTL, both
    /// cache-on runs then read a cached page.)
    async fn warm_first_pages(self: &Arc<Self>, opts: &BenchOptions) {
        let listers = Self::lock(&self.list_users).clone();
        let w = self.clone();
        let warmed = drive(
            "warming first pages",
            opts.concurrency,
            Duration::from_secs(600),
            Some(listers.len() as u64),
            opts.progress,
            move |_, i| {
                let (w, listers) = (w.clone(), listers.clone());
                async move {
                    let user = listers[i as usize % listers.len()];
                    w.get(&w.base, "/v1/orders?limit=20", &w.tokens[user])
                        .await
                        .err()
                        .unwrap_or(Outcome::Ok)
                }
            },
        )
        .await;
        if !warmed.errors.is_empty() {
            tracing::warn!(errors = ?warmed.errors, "list: some first pages were not warmed");
        }
    }

    /// Opens get-hot's baseline connections to Redis, one per client (once per run of the
    /// bench).
    /// Drops the cached entries of get-cold's orders: orders made through the service earlier
    /// in the run (the `create` scenario) were cached as they were created, and a cold read
    /// must miss.
    async fn evict_cold_pool(&self) -> anyhow::Result<()> {
        let Some(mut redis) = self.redis.clone() else {
            return Ok(());
        };
        let pool = Self::lock(&self.cold_pool).clone();
        for chunk in pool.chunks(1_000) {
            let mut pipe = redis::pipe();
            for (_, id) in chunk {
                pipe.cmd("DEL").arg(order_key(&self.key_prefix, *id)).ignore();
            }
            pipe.query_async::<()>(&mut redis).await?;
        }
        Ok(())
    }

    async fn open_redis_per_client(&self, concurrency: usize) -> anyhow::Result<()> {
        let Some(client) = &self.redis_client else {
            return Ok(());
        };
        if Self::lock(&self.redis_per_client).len() >= concurrency {
            return Ok(());
        }
        let mut conns = Vec::with_capacity(concurrency);
        for _ in 0..concurrency {
            let conn = tokio::time::timeout(REDIS_CONNECT_TIMEOUT, client.get_multiplexed_async_connection())
                .await
                .map_err(|_| anyhow::anyhow!("redis: no connection within 3 s for get-hot's baseline"))??;
            conns.push(conn);
        }
        *Self::lock(&self.redis_per_client) = Arc::new(conns);
        Ok(())
    }

    /// Reads every hot order once through the service, so that its cache holds them, and
    /// checks that Redis does: the raw `GET`s of get-hot must find what the service serves.
    async fn warm_hot_set(&self) -> Check {
        let hot = Self::lock(&self.hot_pool).clone();
        let mut problems = Vec::new();
        for &(user, id) in hot.iter() {
            if let Err(o) = self
                .get(&self.base, &format!("/v1/orders/{id}"), &self.tokens[user])
                .await
            {
                problems.push(format!("reading order {id} through the service: {o:?}"));
            }
        }
        for &(_, id) in hot.iter() {
            match self.redis_get_shared(id).await {
                Ok(()) => {}
                Err(Outcome::Error(code)) if code == "not_cached" => problems.push(format!(
                    "order {id} is not in Redis at {} after a read through the service",
                    order_key(&self.key_prefix, id)
                )),
                Err(o) => problems.push(format!("reading order {id} from Redis: {o:?}")),
            }
        }
        let n = problems.len();
        if n > 0 {
            problems.insert(
                0,
                format!(
                    "{n} of {} hot reads found no cache entry: is the cache implemented, and does \
                     the bench's key match the cache's?",
                    hot.len()
                ),
            );
        }
        checks::named(
            "hot_set_cached",
            problems,
            &format!(
                "all {} hot orders in Redis after one read through the service",
                hot.len()
            ),
        )
    }

    /// Reads every order table once, so that both phases of a read scenario find the
    /// database's buffer pool equally warm. "Cold" in `get-cold` means a miss of the
    /// service's cache, not a page read: otherwise whichever phase runs first pays for
    /// loading pages that the second one then finds in memory.
    async fn warm_buffer_pool(&self) -> anyhow::Result<()> {
        for shard in self.shards.all() {
            let t = &shard.tables;
            let pool = self.shards.primary(shard);
            // Each counts a column outside every secondary index, which scans the clustered
            // index; the payments lookup goes through its order index.
            for sql in [
                format!("SELECT COUNT(remark) FROM {}", t.orders),
                format!("SELECT COUNT(*) FROM {} FORCE INDEX (idx_user_created)", t.orders),
                format!("SELECT COUNT(product_name) FROM {}", t.items),
                format!("SELECT COUNT(channel) FROM {}", t.payments),
                format!(
                    "SELECT COUNT(*) FROM {} FORCE INDEX (idx_payments_order)",
                    t.payments
                ),
                format!("SELECT COUNT(description) FROM {}", t.discounts),
            ] {
                sqlx::query(AssertSqlSafe(&*sql)).execute(pool).await?;
            }
        }
        Ok(())
    }

    /// Every distinct MariaDB server the service writes to (commerce and shard primaries; a
    /// server holding several of them counts once), keyed by host name and port.
    async fn servers(&self) -> anyhow::Result<Vec<(String, &Db)>> {
        let mut seen = Vec::new();
        let pools = std::iter::once(&self.commerce).chain(self.shards.databases().iter());
        for pool in pools {
            let (host, port): (String, i64) = sqlx::query_as("SELECT @@hostname, CAST(@@port AS SIGNED)")
                .fetch_one(pool)
                .await?;
            let key = format!("{host}:{port}");
            if !seen.iter().any(|(k, _)| *k == key) {
                seen.push((key, pool));
            }
        }
        Ok(seen)
    }

    /// The durability settings every server runs with (what the run measured).
    pub async fn server_settings(&self) -> anyhow::Result<Vec<ServerSettings>> {
        let mut out = Vec::new();
        for (server, pool) in self.servers().await? {
            let (flush, sync, doublewrite, log_bin): (i64, i64, i64, i64) = sqlx::query_as(
                "SELECT CAST(@@innodb_flush_log_at_trx_commit AS SIGNED), CAST(@@sync_binlog AS SIGNED),
                        CAST(@@innodb_doublewrite AS SIGNED), CAST(@@log_bin AS SIGNED)",
            )
            .fetch_one(pool)
            .await?;
            out.push(ServerSettings {
                server,
                innodb_flush_log_at_trx_commit: flush,
                sync_binlog: sync,
                innodb_doublewrite: doublewrite == 1,
                log_bin: log_bin == 1,
            });
        }
        Ok(out)
    }

    /// Transactions committed to the binary log so far, summed over every server
    /// (`Binlog_commits`); `None` if a server has its binary log off (nothing to count).
    pub async fn binlog_commits(&self) -> anyhow::Result<Option<u64>> {
        let mut total = 0;
        for (_, pool) in self.servers().await? {
            let log_bin: i64 = sqlx::query_scalar("SELECT CAST(@@log_bin AS SIGNED)")
                .fetch_one(pool)
                .await?;
            if log_bin != 1 {
                return Ok(None);
            }
            let (_, value): (String, String) = sqlx::query_as("SHOW GLOBAL STATUS LIKE 'Binlog_commits'")
                .fetch_one(pool)
                .await?;
            total += value.parse::<u64>()?;
        }
        Ok(Some(total))
    }

    /// Waits until the event stream has caught up: every shard database's outbox empty (the
    /// relay published every event) and no message pending for any consumer of the stream
    /// (the merchant copy, the search index); at most `within`, and no longer than 5 s without
    /// progress (a service without a relay never drains its outbox).
    pub async fn wait_outbox_drained(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut last = (i64::MAX, Instant::now());
        let broker = orderly::events::Broker::open(&self.settings.events).await.ok();
        loop {
            let mut left = 0i64;
            for db in self.shards.databases() {
                left += sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM order_outbox")
                    .fetch_one(db)
                    .await
                    .unwrap_or(0);
            }
            if let Some(broker) = &broker {
                left += consumers_pending(broker, &self.settings.events.stream).await;
            }
            if left < last.0 {
                last = (left, Instant::now());
            }
            let stuck = last.1.elapsed() > Duration::from_secs(5);
            if left == 0 || stuck || Instant::now() >= deadline {
                if left > 0 {
                    tracing::warn!(left, "the outbox did not drain before the next scenario");
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    /// The servers' counters of [`ServerCounters::NAMES`], summed over every server.
    pub async fn server_counters(&self) -> anyhow::Result<ServerCounters> {
        let mut total = ServerCounters::default();
        let names = ServerCounters::NAMES.map(|n| format!("'{n}'")).join(", ");
        for (_, pool) in self.servers().await? {
            let rows: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe(format!(
                "SHOW GLOBAL STATUS WHERE Variable_name IN ({names})"
            )))
            .fetch_all(pool)
            .await?;
            let mut one = ServerCounters::default();
            for (name, value) in rows {
                one.set(&name, value.parse()?);
            }
            total = total.plus(&one);
        }
        Ok(total)
    }

    /// Gives the raw phase's worker id back and waits until it is released (or expires).
    pub async fn release_lease(&self) {
        self.lease_stop.cancel();
        let keeper = self.lease_keeper.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(keeper) = keeper {
            let _ = keeper.await;
        }
    }

    /// get-cold's runs in halves of the duration: the cold pool is cut into this many equal
    /// parts.
    fn cold_halves(&self) -> usize {
        self.schedule(Scenario::GetCold)
            .iter()
            .map(|r| r.halves as usize)
            .sum()
    }

    /// The positions in the cold pool that run `slot` of get-cold reads, each once: as many
    /// parts of the pool as the run has halves of the duration, after the earlier runs' parts.
    pub fn cold_share(&self, slot: usize) -> std::ops::Range<usize> {
        let schedule = self.schedule(Scenario::GetCold);
        let part = Self::lock(&self.cold_pool).len() / self.cold_halves().max(1);
        let start: usize = schedule[..slot].iter().map(|r| r.halves as usize).sum();
        let halves = schedule.get(slot).map_or(0, |r| r.halves as usize);
        start * part..(start + halves) * part
    }

    pub async fn check(&self, scenario: Scenario, opts: &BenchOptions) -> anyhow::Result<Vec<Check>> {
        let acked = Self::lock(&self.acked).clone();
        let mut out = checks::run(&self.shards, &self.commerce, &self.loaded, &acked).await?;
        if scenario == Scenario::Flash {
            for sale in self.flash_sales() {
                let name = match sale.phase {
                    Phase::ServiceCacheOff => "flash_sale_sold_exactly_cache_off",
                    _ => "flash_sale_sold_exactly_service",
                };
                out.push(checks::flash_sale_sold_exactly(&self.shards, &self.commerce, name, &sale).await?);
            }
            out.push(checks::sold_exactly(&self.commerce, self.hot_raw.id, opts.flash_stock).await?);
        }
        if scenario == Scenario::GetHot {
            out.extend(Self::lock(&self.hot_cached).take());
        }
        if scenario == Scenario::Cart {
            out.push(self.check_carts().await);
        }
        Ok(out)
    }

    fn record(&self, user: usize, id: OrderId) {
        Self::lock(&self.acked).push(id);
        Self::lock(&self.made).push((user, id));
    }

    fn random_line(&self) -> (&ProductSnapshot, i64) {
        let mut rng = rand::thread_rng();
        (
            &self.products[rng.gen_range(0..self.products.len())],
            rng.gen_range(1..=3),
        )
    }

    // ------------------------------------------------------------------ service (HTTP)

    /// One request; the body of a success is parsed only when the caller needs it (`parse`),
    /// so the client's own work does not weigh on the service's figure.
    async fn request(
        &self,
        base: &str,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
        parse: bool,
    ) -> Result<Value, Outcome> {
        self.request_served(base, method, path, token, body, parse, None)
            .await
    }

    /// [`Self::request`], and a success's `Served-By` counted in `served`.
    #[allow(clippy::too_many_arguments)]
    async fn request_served(
        &self,
        base: &str,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
        parse: bool,
        served: Option<&ServedCounter>,
    ) -> Result<Value, Outcome> {
        let mut req = self
            .client
            .request(method, format!("{base}{path}"))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|_| Outcome::Error("transport".into()))?;
        let status = resp.status();
        let served_by = served.map(|c| c.counter(resp.headers().get("served-by").map(|v| v.as_bytes())));
        let bytes = resp
            .bytes()
            .await
            .map_err(|_| Outcome::Error("transport".into()))?;
        if status.is_success() {
            if let Some(counter) = served_by {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(if parse {
                serde_json::from_slice(&bytes).unwrap_or(Value::Null)
            } else {
                Value::Null
            });
        }
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let code = body["code"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("http_{}", status.as_u16()));
        Err(if code == "out_of_stock" {
            Outcome::Refused(code)
        } else {
            Outcome::Error(code)
        })
    }

    async fn call(
        &self,
        base: &str,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Result<Value, Outcome> {
        self.request(base, method, path, token, body, true).await
    }

    async fn get(&self, base: &str, path: &str, token: &str) -> Result<(), Outcome> {
        self.get_counted(base, path, token, None).await
    }

    /// [`Self::get`], with the answer's `Served-By` counted in `served`.
    async fn get_counted(
        &self,
        base: &str,
        path: &str,
        token: &str,
        served: Option<&ServedCounter>,
    ) -> Result<(), Outcome> {
        self.request_served(base, reqwest::Method::GET, path, token, None, false, served)
            .await
            .map(drop)
    }

    async fn http_create(
        &self,
        base: &str,
        user: usize,
        product: &ProductSnapshot,
        quantity: i64,
    ) -> Result<Value, Outcome> {
        let id = self.issue_id(base, user).await?;
        self.http_create_with_id(base, user, id, product, quantity).await
    }

    /// `POST /v1/order-ids` for buyer `user`.
    async fn issue_id(&self, base: &str, user: usize) -> Result<OrderId, Outcome> {
        let issued = self
            .call(
                base,
                reqwest::Method::POST,
                "/v1/order-ids",
                &self.tokens[user],
                None,
            )
            .await?;
        issued["order_id"]
            .as_str()
            .and_then(OrderId::parse)
            .ok_or_else(|| Outcome::Error("bad_order_id".into()))
    }

    /// `POST /v1/orders` of order `id` (issued for `user`).
    async fn http_create_with_id(
        &self,
        base: &str,
        user: usize,
        id: OrderId,
        product: &ProductSnapshot,
        quantity: i64,
    ) -> Result<Value, Outcome> {
        let token = &self.tokens[user];
        let body = json!({
            "order_id": id.to_string(),
            "items": [{"product_id": product.id.to_string(), "quantity": quantity}],
            "address": self.address,
        });
        let order = self
            .call(base, reqwest::Method::POST, "/v1/orders", token, Some(body))
            .await?;
        // Acknowledged is what we sent and the service answered 2xx for; an answer about
        // another order is an error of its own.
        self.record(user, id);
        if order["order_id"].as_str() != Some(id.to_string().as_str()) {
            return Err(Outcome::Error("wrong_order_in_answer".into()));
        }
        Ok(order)
    }

    /// Operation `i` of the run in `slot` of `scenario`'s schedule (a run of `phase`), by
    /// client number `client`.
    pub async fn op(&self, scenario: Scenario, phase: Phase, slot: usize, client: usize, i: u64) -> Outcome {
        match phase {
            Phase::Service => self.service_op(&self.base, phase, scenario, slot, i).await,
            Phase::ServiceCacheOff => match &self.base_cache_off {
                Some(base) => self.service_op(base, phase, scenario, slot, i).await,
                None => Outcome::Error("no_cache_off_service".into()),
            },
            Phase::ServicePrimaryOnly => match &self.base_primary_only {
                Some(base) => self.service_op(base, phase, scenario, slot, i).await,
                None => Outcome::Error("no_primary_only_service".into()),
            },
            Phase::InProcess if scenario == Scenario::Cart => {
                self.in_process_cart_put(i).await.err().unwrap_or(Outcome::Ok)
            }
            Phase::Raw if self.baseline(scenario) == Baseline::RedisCart => {
                self.raw_cart_put(client, i).await.err().unwrap_or(Outcome::Ok)
            }
            Phase::InProcess => {
                let (user, id) = self.read_target(scenario, slot, i);
                self.in_process_get(user, id).await.err().unwrap_or(Outcome::Ok)
            }
            Phase::Raw if self.baseline(scenario) == Baseline::RedisGet => {
                let (_, id) = self.read_target(scenario, slot, i);
                let conns = Self::lock(&self.redis_per_client).clone();
                let result = match conns.get(client) {
                    Some(conn) => self.redis_get(&mut conn.clone(), id).await,
                    None => Err(Outcome::Error("no_redis_connection".into())),
                };
                result.err().unwrap_or(Outcome::Ok)
            }
            Phase::RawPipelined => {
                let (_, id) = self.read_target(scenario, slot, i);
                self.redis_get_shared(id).await.err().unwrap_or(Outcome::Ok)
            }
            Phase::Raw | Phase::RawSql => self.raw_op(scenario, slot, i).await,
            Phase::HttpFloor => match &self.http_floor {
                Some(base) => {
                    let (user, id) = self.read_target(scenario, slot, i);
                    self.get(base, &format!("/v1/orders/{id}"), &self.tokens[user])
                        .await
                        .err()
                        .unwrap_or(Outcome::Ok)
                }
                None => Outcome::Error("no_http_floor".into()),
            },
            Phase::Floor => {
                let user = rand::thread_rng().gen_range(0..self.users.len());
                let (p, q) = self.random_line();
                let p = p.clone();
                self.floor_create(user, &p, q).await.err().unwrap_or(Outcome::Ok)
            }
        }
    }

    /// The service's read of order `id` by its buyer, called in this process: the cache's
    /// read path and the visibility rule, without HTTP, tokens or JSON.
    async fn in_process_get(&self, user: usize, id: OrderId) -> Result<(), Outcome> {
        let Some(app) = &self.app else {
            return Err(Outcome::Error("no_app_state".into()));
        };
        match app
            .orders
            .get(Caller::User(self.users[user]), id, Default::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(ServiceError::NotFound) => Err(Outcome::Error("not_found".into())),
            Err(ServiceError::Unavailable(_)) => Err(Outcome::Error("unavailable".into())),
            Err(ServiceError::Storage(e)) => Err(e.into()),
            Err(_) => Err(Outcome::Error("service".into())),
        }
    }

    /// Operation `i` of `scenario` against the instance at `base` (which runs as `phase`); the
    /// reads of get-cold and list count their answers' `Served-By`.
    async fn service_op(&self, base: &str, phase: Phase, scenario: Scenario, slot: usize, i: u64) -> Outcome {
        let served = COUNTED_PHASES
            .iter()
            .position(|&p| p == phase)
            .map(|at| &self.served[at]);
        let result = match scenario {
            Scenario::Create => {
                let user = rand::thread_rng().gen_range(0..self.users.len());
                let (p, q) = self.random_line();
                self.http_create(base, user, p, q).await.map(drop)
            }
            Scenario::Flash => {
                // The id was issued before the run (see `prepare_flash`): the create alone.
                let ids = Self::lock(&self.flash_ids).get(&slot).cloned();
                match ids.as_ref().and_then(|ids| ids.get(i as usize)) {
                    Some(&id) => self
                        .http_create_with_id(
                            base,
                            i as usize % self.users.len(),
                            id,
                            self.flash_product(slot),
                            1,
                        )
                        .await
                        .map(drop),
                    None => Err(Outcome::Error("no_flash_order_id".into())),
                }
            }
            Scenario::GetHot => {
                let (user, id) = self.read_target(scenario, slot, i);
                self.get(base, &format!("/v1/orders/{id}"), &self.tokens[user])
                    .await
            }
            Scenario::GetCold => {
                let (user, id) = self.read_target(scenario, slot, i);
                self.get_counted(base, &format!("/v1/orders/{id}"), &self.tokens[user], served)
                    .await
            }
            Scenario::List => {
                let users = Self::lock(&self.list_users).clone();
                let user = users[i as usize % users.len()];
                self.get_counted(base, "/v1/orders?limit=20", &self.tokens[user], served)
                    .await
            }
            Scenario::Lifecycle => self.http_lifecycle(base).await,
            Scenario::Cart => self.http_cart_put(base, i).await,
        };
        result.err().unwrap_or(Outcome::Ok)
    }

    async fn http_lifecycle(&self, base: &str) -> Result<(), Outcome> {
        let user = rand::thread_rng().gen_range(0..self.users.len());
        let (p, q) = self.random_line();
        let order = self.http_create(base, user, p, q).await?;
        let id = order["order_id"].as_str().unwrap_or_default().to_owned();
        let pay = json!({"transaction_no": format!("bench-{id}"), "channel": "bench", "amount": order["pay_amount"]});
        let post = reqwest::Method::POST;
        self.request(
            base,
            post.clone(),
            &format!("/v1/orders/{id}/payments"),
            &self.service_token,
            Some(pay),
            false,
        )
        .await?;
        let ship = json!({"expected_version": 2, "carrier": "SF", "tracking_number": format!("SF{id}")});
        self.request(
            base,
            post.clone(),
            &format!("/v1/orders/{id}/shipment"),
            &self.merchant,
            Some(ship),
            false,
        )
        .await?;
        let confirm = json!({"expected_version": 3});
        self.request(
            base,
            post,
            &format!("/v1/orders/{id}/confirm"),
            &self.tokens[user],
            Some(confirm),
            false,
        )
        .await?;
        Ok(())
    }

    // ------------------------------------------------------------------ raw (same SQL)

    /// A new order of buyer `user` with one line, under a fresh id: what the raw phase and
    /// the floor write.
    fn one_line_order(
        &self,
        user: usize,
        product: &ProductSnapshot,
        quantity: i64,
    ) -> Result<NewOrder, Outcome> {
        let user_id = self.users[user];
        let id = self
            .ids
            .next_for(user_id)
            .map_err(|_| Outcome::Error("ids".into()))?;
        Ok(NewOrder {
            order_id: id,
            user_id,
            lines: vec![NewLine {
                product_id: product.id,
                quantity,
            }],
            coupon_ids: Vec::new(),
            address: self.address.clone(),
            remark: String::new(),
        })
    }

    /// The SQL of a create, in the service's order: replay check, product read,
    /// reservation, order write, claim confirmation.
    async fn raw_create(
        &self,
        user: usize,
        product: &ProductSnapshot,
        quantity: i64,
    ) -> Result<(OrderId, Money), Outcome> {
        let new = self.one_line_order(user, product, quantity)?;
        let (id, user_id) = (new.order_id, new.user_id);
        let hash = new.request_hash();
        let shard = self.shards.of_order(id);
        let pool = self.shards.primary(shard);
        let mut conn = pool.acquire().await?;
        orders::request_hash_of(&mut conn, &shard.tables, id).await?;
        drop(conn);
        let snapshots: Vec<_> = commerce::load_products(&self.commerce, &[product.id])
            .await?
            .iter()
            .map(|p| p.snapshot())
            .collect();
        let priced_at = Utc::now();
        let pricing = price_order(user_id, Some(id), &new.lines, &[], &snapshots, &[], priced_at)
            .map_err(|_| Outcome::Error("pricing".into()))?;
        let unit_prices: Vec<_> = pricing
            .items
            .iter()
            .map(|l| (l.product_id, l.unit_price.minor()))
            .collect();
        let reservation = Reservation {
            order_id: id,
            user_id,
            request_hash: &hash,
            attempt: rand::random(),
            lines: &new.lines,
            coupons: &[],
            max_held_units: self.max_held_units,
            flash: &[],
            priced_at,
            unit_prices: &unit_prices,
        };
        let mut c = self.commerce.acquire().await?;
        match commerce::reserve(&mut c, &reservation, Utc::now()).await? {
            ReserveOutcome::Reserved => {}
            ReserveOutcome::OutOfStock(_) => return Err(Outcome::Refused("out_of_stock".into())),
            other => return Err(Outcome::Error(format!("{other:?}"))),
        }
        drop(c);
        let now = Utc::now();
        let mut conn = pool.acquire().await?;
        // Like the service, no claim confirmation: two commits per create.
        // The storage commit point, without the service's after_commit (no cache).
        let write = orders::OrderWrite::Create {
            order: &new,
            pricing: &pricing,
            request_hash: &hash,
            now,
            pay_deadline: now + self.pay_timeout,
        };
        if let Err(not) =
            orders::commit_without_after_commit(&mut conn, OrderDoor::Shard(&shard.tables, write)).await?
        {
            return Err(Outcome::Error(format!("{not:?}")));
        }
        self.record(user, id);
        Ok((id, pricing.pay_amount))
    }

    async fn raw_op(&self, scenario: Scenario, slot: usize, i: u64) -> Outcome {
        let result = match scenario {
            Scenario::Create => {
                let user = rand::thread_rng().gen_range(0..self.users.len());
                let (p, q) = self.random_line();
                let p = p.clone();
                self.raw_create(user, &p, q).await.map(drop)
            }
            Scenario::Flash => self
                .raw_create(i as usize % self.users.len(), &self.hot_raw.clone(), 1)
                .await
                .map(drop),
            Scenario::GetHot | Scenario::GetCold => {
                let (_, id) = self.read_target(scenario, slot, i);
                self.raw_get(id).await
            }
            Scenario::List => {
                let users = Self::lock(&self.list_users).clone();
                let user = self.users[users[i as usize % users.len()]];
                self.raw_list(user).await
            }
            Scenario::Lifecycle => self.raw_lifecycle().await,
            Scenario::Cart => self.raw_cart_sql(i).await,
        };
        result.err().unwrap_or(Outcome::Ok)
    }

    /// The `i`-th order a read scenario reads: from the hot pool, or for get-cold from the
    /// share of the cold pool of the run in `slot` (see [`Workload::cold_share`]), so that each
    /// run stops when its share is used up and no order is read twice.
    fn read_target(&self, scenario: Scenario, slot: usize, i: u64) -> (usize, OrderId) {
        if scenario == Scenario::GetCold {
            let share = self.cold_share(slot);
            let pool = Self::lock(&self.cold_pool).clone();
            let at = share.start + i as usize % share.len().max(1);
            return pool[at % pool.len()];
        }
        let pool = Self::lock(&self.hot_pool).clone();
        pool[i as usize % pool.len()]
    }

    /// `GET` of the cached order `id` on the connection every client shares.
    async fn redis_get_shared(&self, id: OrderId) -> Result<(), Outcome> {
        let Some(mut redis) = self.redis.clone() else {
            return Err(Outcome::Error("no_redis".into()));
        };
        self.redis_get(&mut redis, id).await
    }

    /// `GET` of the cached order `id`, straight from Redis on `conn`: an empty or absent value
    /// is `not_cached`.
    async fn redis_get<C>(&self, conn: &mut C, id: OrderId) -> Result<(), Outcome>
    where
        C: redis::aio::ConnectionLike + Send,
    {
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(order_key(&self.key_prefix, id))
            .query_async(conn)
            .await
            .map_err(|_| Outcome::Error("redis".into()))?;
        match value {
            Some(v) if !v.is_empty() => Ok(()),
            _ => Err(Outcome::Error("not_cached".into())),
        }
    }

    async fn raw_get(&self, id: OrderId) -> Result<(), Outcome> {
        let shard = self.shards.of_order(id);
        let mut conn = self.shards.primary(shard).acquire().await?;
        orders::load_order(&mut conn, &shard.tables, id).await?;
        Ok(())
    }

    async fn raw_list(&self, user: UserId) -> Result<(), Outcome> {
        let shard = self.shards.of_user(user);
        let mut conn = self.shards.primary(shard).acquire().await?;
        let q = ListQuery {
            user_id: user,
            status: None,
            created_from: None,
            created_to: None,
            before: None,
            limit: 21,
        };
        orders::list_user_orders(&mut conn, &shard.tables, &q).await?;
        Ok(())
    }

    /// Create, then the service's SQL of pay, ship and confirm. A payment is recorded and
    /// the order read back (the answer); ship and confirm read the order first (authorisation,
    /// version), then compare-and-set, then read it back. The amount to pay comes from the
    /// create, as the HTTP client takes it from the create's answer.
    async fn raw_lifecycle(&self) -> Result<(), Outcome> {
        let user = rand::thread_rng().gen_range(0..self.users.len());
        let (p, q) = self.random_line();
        let p = p.clone();
        let (id, pay_amount) = self.raw_create(user, &p, q).await?;
        let shard = self.shards.of_order(id);
        let t = &shard.tables;
        let mut conn = self.shards.primary(shard).acquire().await?;
        let pay = MoneyMovement {
            kind: PaymentKind::Payment,
            transaction_no: format!("raw-{id}"),
            channel: "bench".into(),
            amount: pay_amount,
            reason: String::new(),
        };
        // As the service does: the number is claimed across shards first.
        let number = commerce::PaymentNumber {
            transaction_no: &pay.transaction_no,
            kind: pay.kind,
            order_id: id,
            channel: &pay.channel,
            amount: pay.amount,
            attempt: rand::random(),
        };
        commerce::claim_payment_number(&self.commerce, &number, Utc::now()).await?;
        let write = orders::OrderWrite::Money {
            id,
            movement: &pay,
            now: Utc::now(),
        };
        if let Err(not) = orders::commit_without_after_commit(&mut conn, OrderDoor::Shard(t, write)).await? {
            return Err(Outcome::Error(format!("{not:?}")));
        }
        orders::load_order(&mut conn, t, id).await?;
        let steps = [
            (2, OrderStatus::AwaitingShipment, OrderStatus::Shipped),
            (3, OrderStatus::Shipped, OrderStatus::Completed),
        ];
        for (version, from, to) in steps {
            orders::load_order(&mut conn, t, id).await?;
            let change = StatusChange {
                carrier: (to == OrderStatus::Shipped).then(|| "SF".into()),
                tracking_number: (to == OrderStatus::Shipped).then(|| format!("SF{id}")),
                ..Default::default()
            };
            let write = orders::OrderWrite::Status {
                id,
                expected_version: version,
                from,
                to,
                change: &change,
                now: Utc::now(),
            };
            if orders::commit_without_after_commit(&mut conn, OrderDoor::Shard(t, write))
                .await?
                .is_err()
            {
                return Err(Outcome::Error("lost_race".into()));
            }
            orders::load_order(&mut conn, t, id).await?;
        }
        Ok(())
    }
}

/// Operations of one mode before a GTID-wait client switches to the other.
const GTID_BLOCK: u64 = 50;

/// What the GTID wait measurement passes to [`wait_for_gtid`]: the service's default
/// `replicas.gtid_wait_ms`. A caught-up replica answers long before it.
const GTID_WAIT_TIMEOUT: Duration = Duration::from_millis(50);

/// Orders the GTID wait measurement reads, each with its shard's tables.
pub type ReplicaOrders = Arc<Vec<(OrderId, Arc<ShardTables>)>>;

impl Workload {
    /// Up to `max` orders the bench made that live in shard database `database`.
    pub fn orders_in_database(&self, database: usize, max: usize) -> ReplicaOrders {
        let made = Self::lock(&self.made).clone();
        Arc::new(
            made.iter()
                .map(|&(_, id)| (id, self.shards.of_order(id)))
                .filter(|(_, shard)| shard.database == database)
                .take(max)
                .map(|(id, shard)| (id, shard.tables.clone()))
                .collect(),
        )
    }
}

/// A connection to the replica at `url`, set up as the service's replica sessions are (read
/// committed, read only).
async fn replica_connection(url: &str) -> anyhow::Result<MySqlConnection> {
    let opts: MySqlConnectOptions = url.parse()?;
    let mut conn = opts
        .statement_cache_capacity(storage::STATEMENT_CACHE)
        .connect()
        .await?;
    sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED, READ ONLY")
        .execute(&mut conn)
        .await?;
    Ok(conn)
}

/// The GTID of domain 0 in the replica's `@@gtid_slave_pos`: a GTID it has applied.
pub async fn applied_gtid(url: &str) -> anyhow::Result<Gtid> {
    let mut conn = replica_connection(url).await?;
    let pos: String = sqlx::query_scalar("SELECT @@gtid_slave_pos")
        .fetch_one(&mut conn)
        .await?;
    pos.split(',')
        .filter_map(|g| Gtid::parse(g.trim()))
        .find(|g| g.domain == 0)
        .ok_or_else(|| anyhow::anyhow!("the replica's gtid_slave_pos has no GTID of domain 0: {pos:?}"))
}

/// What the GTID wait costs a read on a caught-up replica, at `concurrency` clients, each on a
/// connection of its own to the replica at `url`: every client alternates blocks of
/// [`GTID_BLOCK`] point reads of `orders` (`orders::load_order`, the service's read) with
/// blocks of `MASTER_GTID_WAIT(gtid)` ([`wait_for_gtid`], as the service issues it) followed by
/// the same read, until each side has `per_side` operations over all clients or `max_time`
/// passed. Clients start on alternate sides, so both sides always run side by side.
pub async fn measure_gtid_wait(
    url: &str,
    gtid: Gtid,
    orders: ReplicaOrders,
    concurrency: usize,
    per_side: u64,
    max_time: Duration,
) -> anyhow::Result<GtidWaitLevel> {
    anyhow::ensure!(!orders.is_empty(), "no order of the replica's database to read");
    let quota = per_side.div_ceil(concurrency as u64).max(GTID_BLOCK);
    let mut conns = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        conns.push(replica_connection(url).await?);
    }
    let deadline = Instant::now() + max_time;
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(client, mut conn)| {
            let orders = orders.clone();
            tokio::spawn(async move {
                let (mut read, mut waited, mut wait) = (new_histogram(), new_histogram(), new_histogram());
                let (mut timeouts, mut missing) = (0u64, 0u64);
                let mut next = client * 7_919;
                let mut block = client as u64;
                while Instant::now() < deadline && (read.len() < quota || waited.len() < quota) {
                    let with_wait = block % 2 == 1;
                    block += 1;
                    for _ in 0..GTID_BLOCK {
                        let (id, tables) = &orders[next % orders.len()];
                        next += 1;
                        let began = Instant::now();
                        if with_wait {
                            if !wait_for_gtid(&mut conn, &gtid, GTID_WAIT_TIMEOUT).await? {
                                timeouts += 1;
                            }
                            let _ = wait.record(micros(began));
                        }
                        if orders::load_order(&mut conn, tables, *id).await?.is_none() {
                            missing += 1;
                        }
                        let _ = if with_wait { &mut waited } else { &mut read }.record(micros(began));
                    }
                }
                Ok::<_, StorageError>((read, waited, wait, timeouts, missing))
            })
        })
        .collect();
    let (mut read, mut waited, mut wait) = (new_histogram(), new_histogram(), new_histogram());
    let (mut timeouts, mut missing) = (0, 0);
    for task in tasks {
        let (r, w, g, t, m) = task.await??;
        read.add(&r)?;
        waited.add(&w)?;
        wait.add(&g)?;
        timeouts += t;
        missing += m;
    }
    Ok(GtidWaitLevel::new(
        concurrency,
        &read,
        &waited,
        &wait,
        timeouts,
        missing,
    ))
}

/// Microseconds since `t`, within the histograms' bounds.
fn micros(t: Instant) -> u64 {
    (t.elapsed().as_micros() as u64).clamp(1, 60_000_000)
}

/// The service's Redis and a connection to it, or `None` (with a warning) when it does not
/// answer.
async fn connect_redis(url: &str) -> Option<(redis::Client, redis::aio::ConnectionManager)> {
    let connected = match redis::Client::open(url) {
        Ok(client) => tokio::time::timeout(REDIS_CONNECT_TIMEOUT, client.get_connection_manager())
            .await
            .map_err(|_| "no answer within 3 s".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map(|conn| (client, conn)),
        Err(e) => Err(e.to_string()),
    };
    match connected {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "redis unavailable: get-hot measured against SQL only, no hit ratio");
            None
        }
    }
}

/// Messages not yet delivered or not yet acknowledged, over every consumer of `stream` (0 when
/// it cannot be read).
async fn consumers_pending(broker: &orderly::events::Broker, stream: &str) -> i64 {
    use futures::TryStreamExt;
    let Ok(stream) = broker.jetstream().get_stream(stream).await else {
        return 0;
    };
    let names: Vec<String> = match stream.consumer_names().try_collect().await {
        Ok(names) => names,
        Err(_) => return 0,
    };
    let mut pending = 0i64;
    for name in names {
        if let Ok(info) = stream.consumer_info(&name).await {
            pending += info.num_pending as i64 + info.num_ack_pending as i64;
        }
    }
    pending
}
