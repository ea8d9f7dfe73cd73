//! `Application::build` wires settings into a running service: weighs its database pools
//! against each server's `max_connections` (a warning when they cannot fit, see
//! [`crate::storage::budget`]), connects the databases,
//! obtains a worker id (fixed in settings, or leased in the commerce database: see
//! [`crate::lease`]; Redis is never needed for it), binds the listener (port 0 works), and serves until a
//! [`CancellationToken`] fires.
//!
//! # Shutdown in two phases
//! The token the caller passes asks for shutdown (SIGTERM, Ctrl-C, a test). First `/readyz`
//! answers 503 `shutting_down` while everything goes on serving for
//! `server.shutdown_delay_ms`, so a load balancer stops sending requests before connections
//! are refused; then an inner *stop* token fires: the listener stops accepting, requests and
//! writes in flight finish within `server.shutdown_grace_ms`, and every background loop
//! (which takes the stop token, the worker-id lease keeper too: ids keep being issued while
//! the delay lasts) stops between steps.
//!
//! # Every long-running process
//! `serve`, [`RelayProcess`] (`orderly relay`), [`ArchiveLoop`] (`orderly archive --loop`) and
//! [`rebuild_admin`] (`orderly project rebuild`, while it runs) install the Prometheus
//! recorder, sample their gauges every [`GAUGE_INTERVAL`], and serve `/metrics`, `/healthz`,
//! `/livez` and `/readyz` on `server.admin_listen` when it is set (see
//! [`crate::http::health`]). Readiness checks reach each database over a pool of their own
//! ([`READINESS_POOL_CONNECTIONS`]), so a busy process is not called unready for being busy.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::config::{DatabaseSettings, EventSettings, Settings};
use crate::domain::consistency::DatabaseRef;
use crate::domain::ids::WorkerId;
use crate::events::merchant::MerchantCopy;
use crate::events::{consumer, rebuild, relay, Broker, RelayWakers};
use crate::http::auth::AuthKeys;
use crate::http::health::{self, Check, Readiness};
use crate::http::limits::{self, InFlight, UserLimits};
use crate::http::{router, AppState, Services};
use crate::jobs;
use crate::lease::IdSource;
use crate::redis::cache::{Cache, CacheHealth};
use crate::redis::cart::CartStore;
use crate::redis::gate::FlashGate;
use crate::redis::Redis;
use crate::search::index::TantivyIndex;
use crate::search::{projection as search, IndexError, OrderIndex};
use crate::service::archive::{self, Archiver, PassOptions};
use crate::service::cart::CartService;
use crate::service::catalog::CatalogService;
use crate::service::flash::FlashSales;
use crate::service::merchant::MerchantService;
use crate::service::orders::OrderService;
use crate::storage::budget::{self, PlannedPool};
use crate::storage::merchant::MerchantMap;
use crate::storage::replicas::{self, Database};
use crate::storage::shards::ShardMap;
use crate::storage::{self, schema, Db, StorageError};
use crate::telemetry;
use metrics_exporter_prometheus::PrometheusHandle;

/// How often the pool and cache gauges are sampled. Prometheus scrapes every 15 to 60 s; a
/// sample every 5 s is fresh for any of those, and costs a few atomic reads.
pub const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// The connections of a readiness check's pool (one per database a process checks): one
/// probe at a time is plenty (probes come every few seconds), and the one connection is
/// what `serve`'s budget counts.
pub const READINESS_POOL_CONNECTIONS: u32 = 1;

/// A built, bound, not yet serving application.
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    /// The admin listener, when `server.admin_listen` is set.
    admin: Option<AdminListener>,
    state: AppState,
    settings: Settings,
    /// Fires after the shutdown delay (see the module docs): what the listener and every
    /// background loop stop at.
    stop: CancellationToken,
    /// Turns the caller's shutdown into the two phases.
    drain: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
    /// Every database, for the replica probes.
    databases: Vec<Arc<Database>>,
    relay_wakers: RelayWakers,
    /// The search index when `[search] enabled`: its consumer runs beside the relays.
    search: Option<Arc<TantivyIndex>>,
    /// The archive's database: its outbox has a relay too.
    archive_db: Arc<Database>,
    /// Runs in the background with `archive.run_in_serve`.
    archiver: Archiver,
}

impl Application {
    /// Connects everything and binds `server.listen`.
    pub async fn build(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Application> {
        Self::build_with_clock(settings, shutdown, Clock::system()).await
    }

    /// [`Self::build`] with the services reading `clock` (a test's manual clock).
    pub async fn build_with_clock(
        settings: Settings,
        shutdown: CancellationToken,
        clock: Clock,
    ) -> anyhow::Result<Application> {
        // Warns, before any pool opens, when they cannot fit into a server's max_connections.
        budget::check(
            &serve_pools(&settings),
            Duration::from_millis(settings.database.acquire_timeout_ms),
        )
        .await;
        let shards = ShardMap::connect(&settings).await?;
        let commerce_db = Arc::new(
            Database::connect(
                "commerce",
                DatabaseRef::Commerce,
                &settings.commerce.url,
                &settings.commerce.replicas,
                &settings.database,
                &settings.replicas,
            )
            .await?,
        );
        let commerce = commerce_db.write().clone();
        let profiles = commerce_db.clone();
        let archive_db = connect_archive(&settings).await?;
        let merchant_map = MerchantMap::connect(&settings.merchant, &settings.database).await?;
        // Code on a schema behind it would fail in the middle of requests: refuse to start.
        // Readiness checks it again (a database restored from an old backup under a running
        // process).
        let schemas = Arc::new(schema::Databases::new(
            &commerce,
            &shards,
            &merchant_map,
            archive_db.write(),
        ));
        schemas.refuse_pending().await?;
        // One probe before serving, so replicas that answer take reads from the first request.
        let databases: Vec<Arc<Database>> = shards
            .databases()
            .iter()
            .cloned()
            .chain([commerce_db.clone()])
            .collect();
        for db in &databases {
            db.probe().await;
        }
        // Never fails for a Redis that is down: it starts degraded and probes it. One
        // connection (and breaker) for the cache, the flash gate and the cart store.
        let redis = Redis::from_settings(&settings.redis, &settings.cache).await?;
        let cache = Cache::new(redis.as_ref(), &settings.cache);
        // Bound before the lease, so a taken port does not cost a worker id.
        let listener = TcpListener::bind(settings.server.listen).await?;
        let addr = listener.local_addr()?;
        let admin = match settings.server.admin_listen {
            Some(a) => Some(AdminListener::bind(a).await?),
            None => None,
        };
        // Everything stops at `stop`, which fires after the shutdown delay.
        let stop = CancellationToken::new();
        let mut background = Vec::new();
        let ids: Arc<IdSource> = match settings.ids.worker_id {
            Some(w) => IdSource::fixed(
                WorkerId::new(w).ok_or_else(|| anyhow::anyhow!("worker id {w} out of range"))?,
            ),
            None => {
                let (source, keeper) = lease_worker_from(&settings, stop.clone()).await?;
                background.push(keeper);
                source
            }
        };
        let flash = Arc::new(
            FlashSales::new(
                commerce.clone(),
                redis.clone().map(FlashGate::new),
                settings.flash.clone(),
            )
            .with_clock(clock.clone()),
        );
        let carts = Arc::new(
            CartService::new(commerce.clone(), redis.map(CartStore::new), settings.cart.clone())
                .with_clock(clock.clone()),
        );
        // One relay per shard database, then the archive's.
        let relay_wakers = RelayWakers::new(shards.databases().len() + 1);
        let archive_relay = shards.databases().len();
        let archiver = Archiver::new(
            shards.clone(),
            archive_db.clone(),
            commerce.clone(),
            settings.archive.clone(),
        );
        let writes = TaskTracker::new();
        let orders = OrderService::new(shards, commerce.clone(), cache.clone(), settings.orders.clone())
            .with_write_tracker(writes.clone())
            .with_archive(archive_db.clone(), &settings.archive, archive_relay)
            .with_relay_wakers(relay_wakers.clone())
            .with_flash(flash)
            .with_carts(carts)
            .with_max_unpaid_units(settings.limits.max_unpaid_units_per_user)
            .with_watermark_ttl(Duration::from_millis(settings.replicas.watermark_ttl_ms))
            .with_clock(clock.clone());
        // Opened (not written) here: a process that cannot open its index should not start.
        let search = match settings.search.enabled {
            true => Some(Arc::new(TantivyIndex::open(&settings.search)?)),
            false => None,
        };
        // With an identity provider, its keys are fetched here (a failure is logged, not
        // fatal: see `AuthKeys::start`) and refreshed in the background.
        let (auth, jwks_refresh) = AuthKeys::start(&settings.auth, stop.clone()).await?;
        background.extend(jwks_refresh);
        let (schema_check, schema_watch) = watch_schema(schemas, stop.clone());
        background.push(schema_watch);
        let readiness = Arc::new(
            serve_readiness(&settings, orders.shards(), &profiles, ids.clone(), cache.clone())
                .await?
                .with(schema_check),
        );
        let drain = tokio::spawn(drain_then_stop(
            shutdown,
            stop.clone(),
            readiness.clone(),
            Duration::from_millis(settings.server.shutdown_delay_ms),
        ));
        let state = AppState::new(Services {
            orders,
            catalog: CatalogService::new(commerce_db, cache).with_clock(clock),
            merchant: MerchantService::new(merchant_map),
            ids,
            auth: Arc::new(auth),
            writes,
            metrics: telemetry::metrics(),
            limits: Arc::new(UserLimits::new(&settings.limits)),
            search: search.clone().map(|i| i as Arc<dyn OrderIndex>),
            readiness,
            in_flight: InFlight::new(settings.server.max_in_flight),
        });
        Ok(Application {
            listener,
            addr,
            admin,
            state,
            settings,
            stop,
            drain,
            background,
            databases,
            relay_wakers,
            search,
            archive_db,
            archiver,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's address, when `server.admin_listen` is set.
    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminListener::address)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until the shutdown token fires, with the sweeper and the cart flusher running
    /// beside it.
    ///
    /// Shutdown (Ctrl-C, SIGTERM, or the token): `/readyz` answers 503 while everything
    /// serves on for `server.shutdown_delay_ms`; then stop accepting, let requests in flight
    /// finish and every write task complete, all within `server.shutdown_grace_ms`; then
    /// stop the background loops. A write cut off by the end of the grace period is one the
    /// client never got a 2xx for, and the sweeper repairs what it leaves. The admin
    /// listener serves until the end.
    pub async fn run(self) -> anyhow::Result<()> {
        let s = &self.settings;
        let sweeper = tokio::spawn(jobs::sweeper::run(
            self.state.orders.clone(),
            Duration::from_secs(s.orders.reservation_grace_secs),
            s.orders.auto_complete_after(),
            Duration::from_secs(s.sweeper.interval_secs),
            s.sweeper.batch_size,
            self.stop.clone(),
        ));
        let gauges = tokio::spawn(sample_gauges(
            self.state.metrics.clone(),
            serve_gauges(self.state.clone()),
            self.stop.clone(),
        ));
        let projections: Vec<&'static str> = [
            s.merchant.consume.then_some(crate::storage::merchant::PROJECTION),
            self.search.as_ref().map(|_| crate::search::projection::NAME),
        ]
        .into_iter()
        .flatten()
        .collect();
        let lag = (!projections.is_empty()).then(|| {
            tokio::spawn(sample_projection_lag(
                s.events.clone(),
                projections,
                self.stop.clone(),
            ))
        });
        // The admin listener outlives the drain: scrapes and probes see the whole shutdown.
        let done = CancellationToken::new();
        let admin = self
            .admin
            .map(|a| tokio::spawn(a.serve(self.state.readiness.clone(), done.clone())));
        let gates = tokio::spawn(jobs::gate_rebuild::run(
            self.state.orders.flash().clone(),
            self.stop.clone(),
        ));
        let probes = tokio::spawn(replicas::run_probes(
            self.databases.clone(),
            Duration::from_millis(s.replicas.probe_interval_ms),
            self.stop.clone(),
        ));
        let flusher = tokio::spawn(jobs::cart_flusher::run(
            self.state.orders.carts().clone(),
            self.stop.clone(),
        ));
        let relays = s.events.relay.then(|| {
            tokio::spawn(relay::run(
                relay_databases(self.state.orders.shards(), &self.archive_db),
                s.events.clone(),
                self.relay_wakers.clone(),
                self.stop.clone(),
            ))
        });
        let copy = s.merchant.consume.then(|| {
            tokio::spawn(consumer::run(
                s.events.clone(),
                Arc::new(MerchantCopy::new(self.state.merchant.map().clone())),
                self.stop.clone(),
            ))
        });
        let searcher = self.search.clone().map(|index| {
            tokio::spawn(search::run(
                s.events.clone(),
                index,
                self.state.orders.commerce().clone(),
                self.stop.clone(),
            ))
        });
        let archiver = s
            .archive
            .run_in_serve
            .then(|| tokio::spawn(jobs::archiver::run(self.archiver.clone(), self.stop.clone())));
        let cleanup = tokio::spawn(limits::run_cleanup(self.state.limits.clone(), self.stop.clone()));
        let writes = self.state.writes.clone();
        let app = router(self.state, &s.server);
        let token = self.stop.clone();
        let grace = Duration::from_millis(s.server.shutdown_grace_ms);
        let server = axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { token.cancelled().await })
            .into_future();
        tokio::pin!(server);
        // The grace period starts when the listener stops accepting (after the shutdown
        // delay), not when serving starts.
        let served = tokio::select! {
            r = &mut server => Some(r),
            _ = self.stop.cancelled() => None,
        };
        let deadline = tokio::time::Instant::now() + grace;
        let served = match served {
            Some(r) => r,
            None => match tokio::time::timeout_at(deadline, &mut server).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(?grace, "requests still in flight at the end of the grace period");
                    Ok(())
                }
            },
        };
        // Stopped by the token, or (a listener error) on its own: either way everything
        // else stops now, or the loops below would wait for a token nobody fires.
        self.stop.cancel();
        writes.close();
        if tokio::time::timeout_at(deadline, writes.wait()).await.is_err() {
            tracing::warn!(
                in_flight = writes.len(),
                "write tasks still running at the end of the grace period"
            );
        }
        // The sweeper stops at the token too; a step stuck on a hung database is cut off at
        // the end of the grace period (each of its writes is one transaction).
        let sweeper_abort = sweeper.abort_handle();
        if tokio::time::timeout_at(deadline, sweeper).await.is_err() {
            sweeper_abort.abort();
        }
        for h in self.background {
            let _ = h.await;
        }
        let _ = gauges.await;
        let _ = probes.await;
        let _ = gates.await;
        let _ = cleanup.await;
        let _ = flusher.await;
        // The consumers stop between batches at the token; a batch being applied commits
        // first (it is short).
        for task in [relays, copy, searcher, archiver, lag].into_iter().flatten() {
            let _ = task.await;
        }
        // The drain ends at `stop` too (cancelled above).
        let _ = self.drain.await;
        done.cancel();
        if let Some(admin) = admin {
            if let Ok(Err(e)) = admin.await {
                tracing::warn!(error = %e, "the admin listener failed");
            }
        }
        served?;
        Ok(())
    }
}

/// Turns the caller's `shutdown` into the two phases of the module docs: `readiness` answers
/// `shutting_down` at once, and `stop` fires `delay` later (at once if `stop` fires first).
async fn drain_then_stop(
    shutdown: CancellationToken,
    stop: CancellationToken,
    readiness: Arc<Readiness>,
    delay: Duration,
) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = stop.cancelled() => return,
    }
    readiness.start_draining();
    if !delay.is_zero() {
        tracing::info!(
            ?delay,
            "shutting down: unready now, still serving until the delay ends"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => {}
        }
    }
    stop.cancel();
}

/// Calls `sample` every [`GAUGE_INTERVAL`] until `shutdown` fires, and drains histogram
/// samples into their buckets, so a process that nobody scrapes does not pile them up.
async fn sample_gauges(
    metrics: PrometheusHandle,
    sample: impl Fn() + Send + 'static,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(GAUGE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        sample();
        metrics.run_upkeep();
    }
}

/// The gauges of `serve`: the connections of every pool (`orderly_db_pool_connections`),
/// whether the cache's Redis answers (`orderly_cache_up`), the requests in flight
/// (`orderly_http_requests_in_flight`) and whether the worker id is held
/// (`orderly_lease_valid`).
fn serve_gauges(state: AppState) -> impl Fn() + Send + 'static {
    move || {
        let orders = &state.orders;
        telemetry::record_pool("commerce", orders.commerce());
        for db in orders.shards().databases() {
            for (name, pool) in db.pools() {
                telemetry::record_pool(name, pool);
            }
        }
        match orders.cache().health() {
            CacheHealth::Up => metrics::gauge!("orderly_cache_up").set(1.0),
            CacheHealth::Degraded => metrics::gauge!("orderly_cache_up").set(0.0),
            CacheHealth::Disabled => {}
        }
        state.in_flight.record();
        metrics::gauge!("orderly_lease_valid").set(if state.ids.is_held() { 1.0 } else { 0.0 });
    }
}

/// The connections of every pool of `databases`, for the gauge sampler of a process without
/// the API.
fn database_pools(databases: &[Arc<Database>]) -> Vec<(String, Db)> {
    databases
        .iter()
        .flat_map(|db| db.pools().map(|(name, pool)| (name.to_owned(), pool.clone())))
        .collect()
}

/// Samples `orderly_projection_lag_seconds` of each of `projections` every
/// [`GAUGE_INTERVAL`] until `shutdown`, from JetStream (see
/// [`consumer::oldest_unapplied`]), over a NATS connection of its own opened when it can be.
/// A projection that cannot be looked at keeps its last value (NATS away: the relay's and
/// the consumers' own series say so).
async fn sample_projection_lag(
    events: EventSettings,
    projections: Vec<&'static str>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(GAUGE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut broker: Option<Broker> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let step = async {
            if broker.is_none() {
                match Broker::open(&events).await {
                    Ok(b) => broker = Some(b),
                    Err(e) => tracing::debug!(error = %e, "projection lag: NATS unavailable"),
                }
            }
            let Some(b) = &broker else { return };
            for name in &projections {
                match consumer::oldest_unapplied(b, name).await {
                    Ok(oldest) => {
                        let lag = oldest.map_or(0.0, |t| {
                            (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
                        });
                        metrics::gauge!("orderly_projection_lag_seconds", "projection" => *name).set(lag);
                    }
                    Err(e) => tracing::debug!(projection = name, error = %e, "projection lag not sampled"),
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = step => {}
        }
    }
}

/// A pool of its own for the readiness check of the database at `url`
/// ([`READINESS_POOL_CONNECTIONS`]): a probe never waits behind request traffic for a
/// connection. It waits for its connection at most `server.readiness_timeout_ms`.
async fn readiness_pool(url: &str, settings: &Settings) -> anyhow::Result<Db> {
    let mut pool = settings.database.clone();
    pool.max_connections = READINESS_POOL_CONNECTIONS;
    pool.acquire_timeout_ms = settings.server.readiness_timeout_ms;
    Ok(storage::connect(url, &pool).await?)
}

/// The readiness checks of the databases `targets` (`(check name, URL)`), each over a pool of
/// its own: `SELECT 1` answers.
async fn database_checks(settings: &Settings, targets: Vec<(String, String)>) -> anyhow::Result<Vec<Check>> {
    let mut checks = Vec::with_capacity(targets.len());
    for (name, url) in targets {
        let pool = readiness_pool(&url, settings).await?;
        checks.push(Check::new(name, move || {
            let pool = pool.clone();
            async move {
                sqlx::query("SELECT 1")
                    .execute(&pool)
                    .await
                    .map(drop)
                    .map_err(|e| StorageError::from(e).to_string())
            }
        }));
    }
    Ok(checks)
}

/// The check targets of every shard database's primary: `shards:<name>`.
fn shard_targets(settings: &Settings) -> Vec<(String, String)> {
    settings
        .shards
        .databases
        .iter()
        .map(|d| (format!("shards:{}", d.name), d.primary.clone()))
        .collect()
}

/// The readiness check `lease`: this process holds its worker id (or has a fixed one), so it
/// can issue order ids; without it every create answers 503.
fn lease_check(ids: Arc<IdSource>) -> Check {
    Check::new("lease", move || {
        let held = ids.is_held();
        async move {
            match held {
                true => Ok(()),
                false => Err("the worker-id lease is lost: ids and creates answer 503".to_owned()),
            }
        }
    })
}

/// The readiness check `nats`: NATS answers and the stream is there, over a connection of
/// the check's own, opened on the first probe that can.
fn nats_check(events: EventSettings) -> Check {
    let broker = Arc::new(tokio::sync::Mutex::new(None::<Broker>));
    Check::new("nats", move || {
        let (broker, events) = (broker.clone(), events.clone());
        async move {
            let mut held = broker.lock().await;
            let b = match held.take() {
                Some(b) => b,
                None => Broker::open(&events).await.map_err(|e| e.to_string())?,
            };
            let found = b.jetstream().get_stream(&events.stream).await;
            *held = Some(b);
            found.map(drop).map_err(|e| e.to_string())
        }
    })
}

/// The readiness of `serve`: the commerce database and every shard database answer (each on
/// a pool of its own), and the worker id is held. Replicas in rotation per database and the
/// cache are reported, never decisive: replicas down move reads to the primary, Redis down
/// makes the service slower. Another check joins with one more `.with(Check::new(name, ..))`
/// (a schema check: the databases are at the migrations this binary expects).
async fn serve_readiness(
    settings: &Settings,
    shards: &ShardMap,
    commerce: &Arc<Database>,
    ids: Arc<IdSource>,
    cache: Cache,
) -> anyhow::Result<Readiness> {
    let mut targets = vec![("commerce".to_owned(), settings.commerce.url.clone())];
    targets.extend(shard_targets(settings));
    let mut readiness = Readiness::new(Duration::from_millis(settings.server.readiness_timeout_ms))
        .with_all(database_checks(settings, targets).await?)
        .with(lease_check(ids));
    for db in shards.databases().iter().chain([commerce]) {
        if db.has_replicas() {
            let db = db.clone();
            readiness = readiness.with_report(format!("replicas:{}", db.name()), move || {
                format!("{}/{}", db.replicas_in_rotation(), db.replica_count()).into()
            });
        }
    }
    Ok(readiness.with_report("cache", move || {
        serde_json::to_value(cache.health()).unwrap_or_default()
    }))
}

/// How often a running `serve` reads the migrations' bookkeeping again for its readiness: a
/// database restored from an old backup, or an older release's database swapped in, shows
/// within this long. Off the probe's path: a probe reads the last finding.
const SCHEMA_RECHECK: Duration = Duration::from_secs(30);

/// Readiness check `schema` (no database has a migration pending), and the task that keeps
/// its finding fresh until `stop`. A database that cannot be read keeps the last finding:
/// its own check (or the request path) reports it, and an archive or merchant database
/// being down must not make every `serve` unready.
fn watch_schema(schemas: Arc<schema::Databases>, stop: CancellationToken) -> (Check, JoinHandle<()>) {
    // `serve` refused to start with anything pending: nothing is behind at first.
    let behind = Arc::new(std::sync::Mutex::new(None::<String>));
    let found = behind.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(SCHEMA_RECHECK) => {}
            }
            match schemas.status().await {
                Ok(status) => {
                    let pending: Vec<String> = status
                        .iter()
                        .filter(|s| !s.pending.is_empty())
                        .map(|s| format!("{}: {} pending", s.database, s.pending.len()))
                        .collect();
                    *found.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                        (!pending.is_empty()).then(|| format!("{}; run orderly migrate", pending.join(", ")));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the migrations' bookkeeping; readiness keeps the last finding")
                }
            }
        }
    });
    let check = Check::new("schema", move || {
        let finding = behind
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        async move { finding.map_or(Ok(()), Err) }
    });
    (check, task)
}

/// The admin listener of a process (`server.admin_listen`), bound: `/metrics`, `/healthz`,
/// `/livez`, `/readyz` (see [`health::admin_router`]).
pub struct AdminListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl AdminListener {
    async fn bind(addr: SocketAddr) -> anyhow::Result<AdminListener> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("server.admin_listen {addr}: {e}"))?;
        let addr = listener.local_addr()?;
        Ok(AdminListener { listener, addr })
    }

    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `stop` fires; installs the Prometheus recorder if it is not yet.
    async fn serve(self, readiness: Arc<Readiness>, stop: CancellationToken) -> std::io::Result<()> {
        let routes = health::admin_router(readiness, telemetry::metrics());
        axum::serve(self.listener, routes)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    }
}

/// Runs the admin side of a process that serves no API until `stop`: the admin listener with
/// `readiness`, and the gauge sampler over `pools`.
fn spawn_admin(
    admin: AdminListener,
    readiness: Readiness,
    pools: Vec<(String, Db)>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let metrics = telemetry::metrics();
    let sample = move || {
        for (name, pool) in &pools {
            telemetry::record_pool(name, pool);
        }
    };
    tokio::spawn(async move {
        let (served, ()) = tokio::join!(
            admin.serve(Arc::new(readiness), stop.clone()),
            sample_gauges(metrics, sample, stop.clone())
        );
        if let Err(e) = served {
            tracing::warn!(error = %e, "the admin listener failed");
        }
    })
}

/// The connections of the worker-id lease's pool: one renewal at a time, plus one for the
/// release racing a last renewal.
const LEASE_POOL_CONNECTIONS: u32 = 2;

/// Every pool a `serve` process of `settings` opens (see [`Application::build`] and
/// [`Application::run`]), with the most connections each may hold: the primary and replica
/// pools of every shard database and of the commerce database, the archive's and the merchant
/// copy's pools, the worker-id lease's pool, the readiness checks' pools, and the connection
/// each outbox relay holds outside its database's pool. What [`budget::check`] weighs
/// against the servers.
pub fn serve_pools(settings: &Settings) -> Vec<PlannedPool> {
    let size = settings.database.max_connections;
    let pool = |name: String, url: &str, connections: u32| PlannedPool {
        name,
        url: url.to_owned(),
        connections,
    };
    let with_replicas = |name: &str, primary: &str, replicas: &[String]| -> Vec<PlannedPool> {
        let mut pools = vec![pool(name.to_owned(), primary, size)];
        for (i, url) in replicas.iter().enumerate() {
            pools.push(pool(format!("{name}/r{i}"), url, size));
        }
        if !replicas.is_empty() {
            // The replica probe's and the session reads' fences (see storage::replicas).
            pools.push(pool(
                format!("{name} control"),
                primary,
                crate::storage::replicas::CONTROL_CONNECTIONS,
            ));
        }
        pools
    };
    let mut pools = Vec::new();
    for d in &settings.shards.databases {
        pools.extend(with_replicas(&d.name, &d.primary, &d.replicas));
    }
    pools.extend(with_replicas(
        "commerce",
        &settings.commerce.url,
        &settings.commerce.replicas,
    ));
    pools.push(pool("archive".into(), &settings.archive.url, size));
    for (i, d) in settings.merchant.databases.iter().enumerate() {
        pools.push(pool(format!("merchant{i}"), &d.url, size));
    }
    // The readiness checks' (see `serve_readiness`).
    pools.push(pool(
        "commerce readiness".into(),
        &settings.commerce.url,
        READINESS_POOL_CONNECTIONS,
    ));
    for d in &settings.shards.databases {
        pools.push(pool(
            format!("{} readiness", d.name),
            &d.primary,
            READINESS_POOL_CONNECTIONS,
        ));
    }
    if settings.ids.worker_id.is_none() {
        pools.push(pool(
            "lease".into(),
            &settings.commerce.url,
            LEASE_POOL_CONNECTIONS,
        ));
    }
    if settings.events.relay {
        // A relay detaches one connection from its database's pool (its GET_LOCK lives on
        // it), and the pool may open another in its place.
        for d in &settings.shards.databases {
            pools.push(pool(format!("{} relay", d.name), &d.primary, 1));
        }
        pools.push(pool("archive relay".into(), &settings.archive.url, 1));
    }
    if settings.search.enabled {
        // The search writer's election lock, detached from the commerce pool likewise.
        pools.push(pool("search writer".into(), &settings.commerce.url, 1));
    }
    pools
}

/// `database.max_connections` for `processes` processes like `serve` on `settings`, started
/// together against servers that allow `max_connections` each: `wanted`, or fewer so that
/// their pools fit together into every server (the bench's and the playground's processes).
pub fn fitting_pool_size(settings: &Settings, processes: u32, max_connections: u32, wanted: u32) -> u32 {
    budget::fitting_pool_size(wanted, processes, max_connections, |size| {
        let mut s = settings.clone();
        s.database.max_connections = size;
        serve_pools(&s)
    })
}

/// Leases a worker id in the commerce database of `settings` (see [`crate::lease`]), on a
/// pool of its own: a renewal never queues behind request traffic for a connection, so a
/// busy service does not lose its lease (and answer 503) for lack of one.
pub async fn lease_worker_from(
    settings: &Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<(Arc<IdSource>, JoinHandle<()>)> {
    let pool = storage::connect(
        &settings.commerce.url,
        &DatabaseSettings {
            max_connections: LEASE_POOL_CONNECTIONS,
            ..settings.database.clone()
        },
    )
    .await?;
    let ttl = Duration::from_secs(settings.ids.lease_ttl_secs);
    Ok(jobs::lease_keeper::lease_worker(pool, ttl, shutdown).await?)
}

/// The archive's database (no replicas: archived orders are read rarely, on its primary).
async fn connect_archive(settings: &Settings) -> anyhow::Result<Arc<Database>> {
    Ok(Arc::new(
        Database::connect(
            "archive",
            DatabaseRef::Archive,
            &settings.archive.url,
            &[],
            &settings.database,
            &settings.replicas,
        )
        .await?,
    ))
}

/// The databases whose outboxes are relayed: every shard database, then the archive (the
/// index order of [`RelayWakers`]).
fn relay_databases(shards: &ShardMap, archive: &Arc<Database>) -> Vec<Arc<Database>> {
    shards
        .databases()
        .iter()
        .cloned()
        .chain([archive.clone()])
        .collect()
}

/// The archiver of `settings`' databases, for `orderly archive`.
pub async fn archiver(settings: &Settings) -> anyhow::Result<Archiver> {
    let shards = ShardMap::connect(settings).await?;
    let commerce = storage::connect(&settings.commerce.url, &settings.database).await?;
    let archive_db = connect_archive(settings).await?;
    Ok(Archiver::new(
        shards,
        archive_db,
        commerce,
        settings.archive.clone(),
    ))
}

/// One pass of the archiver of `settings` with `opts`.
pub async fn archive_pass(settings: &Settings, opts: &PassOptions) -> anyhow::Result<archive::PassSummary> {
    Ok(archiver(settings).await?.pass(opts).await?)
}

/// `orderly migrate`: creates every table on every database of the settings (see
/// [`schema::Databases::migrate`]).
pub async fn migrate(settings: &Settings) -> anyhow::Result<schema::MigrateReport> {
    let databases = schema::Databases::connect(settings).await?;
    Ok(databases.migrate(schema::DEFAULT_LOCK_WAIT).await?)
}

/// `orderly relay`: the outbox relays of every shard database, without the API, until
/// `shutdown` (one relay per database is active at a time, whichever process holds it).
pub async fn relay(settings: &Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    RelayProcess::build(settings, shutdown).await?.run().await
}

/// `orderly relay`, built: its databases connected and its admin listener, if any, bound
/// (port 0 works: see [`Self::admin_address`]).
pub struct RelayProcess {
    databases: Vec<Arc<Database>>,
    events: EventSettings,
    admin: Option<(AdminListener, Readiness)>,
    shutdown: CancellationToken,
}

impl RelayProcess {
    /// Connects every relayed database (each shard database, then the archive) and binds
    /// `server.admin_listen` when set. Its readiness: every relayed database and NATS answer.
    pub async fn build(settings: &Settings, shutdown: CancellationToken) -> anyhow::Result<RelayProcess> {
        // As `serve`: not on a schema behind the code.
        schema::Databases::connect(settings)
            .await?
            .refuse_pending()
            .await?;
        let shards = ShardMap::connect(settings).await?;
        let archive = connect_archive(settings).await?;
        let databases = relay_databases(&shards, &archive);
        let admin = match settings.server.admin_listen {
            Some(addr) => {
                let mut targets = shard_targets(settings);
                targets.push(("archive".to_owned(), settings.archive.url.clone()));
                let readiness = Readiness::new(Duration::from_millis(settings.server.readiness_timeout_ms))
                    .with_all(database_checks(settings, targets).await?)
                    .with(nats_check(settings.events.clone()));
                Some((AdminListener::bind(addr).await?, readiness))
            }
            None => None,
        };
        Ok(RelayProcess {
            databases,
            events: settings.events.clone(),
            admin,
            shutdown,
        })
    }

    /// The admin listener's address, when `server.admin_listen` is set.
    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(a, _)| a.address())
    }

    /// Relays until the shutdown token fires; the admin listener and the gauges (the
    /// relayed databases' pools; the relays set `orderly_outbox_backlog_events` and
    /// `orderly_relay_active` themselves) run beside.
    pub async fn run(self) -> anyhow::Result<()> {
        let admin = self.admin.map(|(admin, readiness)| {
            spawn_admin(
                admin,
                readiness,
                database_pools(&self.databases),
                self.shutdown.clone(),
            )
        });
        let wakers = RelayWakers::new(self.databases.len());
        relay::run(self.databases, self.events, wakers, self.shutdown.clone()).await;
        // The relays return only at shutdown, which stops the admin side too.
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        Ok(())
    }
}

/// `orderly archive --loop`, built: its databases connected and its admin listener, if any,
/// bound.
pub struct ArchiveLoop {
    archiver: Archiver,
    interval: Duration,
    pools: Vec<(String, Db)>,
    admin: Option<(AdminListener, Readiness)>,
}

impl ArchiveLoop {
    /// Connects the archiver's databases and binds `server.admin_listen` when set. Its
    /// readiness: every shard database, the commerce database and the archive answer.
    pub async fn build(settings: &Settings) -> anyhow::Result<ArchiveLoop> {
        let shards = ShardMap::connect(settings).await?;
        let commerce = storage::connect(&settings.commerce.url, &settings.database).await?;
        let archive_db = connect_archive(settings).await?;
        let mut pools = database_pools(&relay_databases(&shards, &archive_db));
        pools.push(("commerce".to_owned(), commerce.clone()));
        let admin = match settings.server.admin_listen {
            Some(addr) => {
                let mut targets = shard_targets(settings);
                targets.push(("commerce".to_owned(), settings.commerce.url.clone()));
                targets.push(("archive".to_owned(), settings.archive.url.clone()));
                let readiness = Readiness::new(Duration::from_millis(settings.server.readiness_timeout_ms))
                    .with_all(database_checks(settings, targets).await?);
                Some((AdminListener::bind(addr).await?, readiness))
            }
            None => None,
        };
        Ok(ArchiveLoop {
            archiver: Archiver::new(shards, archive_db, commerce, settings.archive.clone()),
            interval: Duration::from_secs(settings.archive.interval_secs),
            pools,
            admin,
        })
    }

    /// The admin listener's address, when `server.admin_listen` is set.
    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(a, _)| a.address())
    }

    /// A pass with `opts` every `archive.interval_secs`, each summary handed to `report`,
    /// until `shutdown` fires (a pass stops between batches at `opts.stop`) or a pass fails.
    pub async fn run(
        self,
        opts: &PassOptions,
        shutdown: CancellationToken,
        mut report: impl FnMut(&archive::PassSummary),
    ) -> anyhow::Result<()> {
        let stop = shutdown.child_token();
        let admin = self
            .admin
            .map(|(admin, readiness)| spawn_admin(admin, readiness, self.pools, stop.clone()));
        let archiver = self.archiver;
        let passes = async {
            loop {
                report(&archiver.pass(opts).await?);
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(self.interval) => {}
                }
            }
        };
        let ran: anyhow::Result<()> = passes.await;
        stop.cancel();
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        ran
    }
}

/// The admin listener of `orderly project rebuild` while it runs, until `stop`: liveness,
/// metrics, and readiness (every shard database, the archive and NATS, which every rebuild
/// reads). `None` without `server.admin_listen`; an address that cannot be bound is a warning
/// here, not a failure: a rebuild run by hand beside a `serve` that holds it goes on.
pub async fn rebuild_admin(settings: &Settings, stop: CancellationToken) -> Option<JoinHandle<()>> {
    let addr = settings.server.admin_listen?;
    let built = async {
        let mut targets = shard_targets(settings);
        targets.push(("archive".to_owned(), settings.archive.url.clone()));
        let readiness = Readiness::new(Duration::from_millis(settings.server.readiness_timeout_ms))
            .with_all(database_checks(settings, targets).await?)
            .with(nats_check(settings.events.clone()));
        Ok::<_, anyhow::Error>((AdminListener::bind(addr).await?, readiness))
    }
    .await;
    match built {
        Ok((admin, readiness)) => {
            tracing::info!(address = %admin.address(), "admin listener");
            Some(spawn_admin(admin, readiness, Vec::new(), stop))
        }
        Err(e) => {
            tracing::warn!(error = %e, "no admin listener for this rebuild");
            None
        }
    }
}

/// `orderly relay --republish-parked`: moves every parked outbox row (see
/// [`crate::storage::outbox::park`]) of every relayed database back into its outbox, under
/// its old id, for the relays to publish again; answers how many. Run it once the cause is
/// fixed (a larger `max_msg_size` on the stream or the server), or they are parked again.
pub async fn republish_parked(settings: &Settings) -> anyhow::Result<u64> {
    let shards = ShardMap::connect(settings).await?;
    let archive = connect_archive(settings).await?;
    let mut moved = 0;
    for db in relay_databases(&shards, &archive) {
        let mut conn = db.write().acquire().await?;
        let n = storage::outbox::unpark_all(&mut conn).await?;
        if n > 0 {
            tracing::info!(database = %db.name(), rows = n, "parked outbox rows put back");
        }
        moved += n;
    }
    Ok(moved)
}

/// `orderly project rebuild merchant` (and `reports`, which live in the same transactions):
/// the copy and its reports rebuilt from the shards, then followed from the stream.
pub async fn rebuild_merchant(settings: &Settings, progress: bool) -> anyhow::Result<rebuild::Rebuilt> {
    let shards = ShardMap::connect(settings).await?;
    let map = MerchantMap::connect(&settings.merchant, &settings.database).await?;
    let broker = Broker::connect(&settings.events).await?;
    let copy = MerchantCopy::new(map.clone());
    let reset = async move {
        storage::merchant::reset(&map)
            .await
            .map_err(consumer::ProjectionError::new)
    };
    let archive = storage::connect(&settings.archive.url, &settings.database).await?;
    Ok(rebuild::rebuild(&broker, &shards, &archive, &copy, reset, progress).await?)
}

/// `orderly report`: a shop's daily report rows from the merchant copy.
pub async fn daily_report(
    settings: &Settings,
    shop: crate::domain::ids::ShopId,
    from: chrono::NaiveDate,
    to: chrono::NaiveDate,
) -> anyhow::Result<Vec<storage::merchant::DailyReport>> {
    let map = MerchantMap::connect(&settings.merchant, &settings.database).await?;
    Ok(storage::merchant::daily_reports(&map, shop, from, to).await?)
}

/// `orderly project rebuild search`: empties the search index of `settings`, fills it from
/// every shard and leaves its consumer to follow the stream after the backfill's start (see
/// [`crate::events::rebuild`]). Takes the index's writer: it fails while a `serve` on the same
/// data directory holds it.
pub async fn rebuild_search(settings: &Settings, progress: bool) -> anyhow::Result<rebuild::Rebuilt> {
    let shards = ShardMap::connect(settings).await?;
    let broker = Broker::connect(&settings.events).await?;
    let index = Arc::new(TantivyIndex::open(&settings.search)?);
    let taker = index.clone();
    tokio::task::spawn_blocking(move || taker.take_writer())
        .await?
        .map_err(|e| match e {
            IndexError::Locked => anyhow::anyhow!(
                "{e}: stop the `serve` that runs the search consumer on {}",
                settings.search.data_dir.display()
            ),
            e => e.into(),
        })?;
    let projection = search::Search::new(index);
    let archive = storage::connect(&settings.archive.url, &settings.database).await?;
    Ok(rebuild::rebuild(
        &broker,
        &shards,
        &archive,
        &projection,
        projection.reset(),
        progress,
    )
    .await?)
}
