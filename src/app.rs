//! `Application::build` wires settings into a running service: weighs its database pools
//! against each server's `max_connections` (a warning when they cannot fit, see
//! [`crate::storage::budget`]), connects the databases,
//! obtains a worker id (fixed in settings, or leased in the commerce database: see
//! [`crate::lease`]; Redis is never needed for it), binds the listener (port 0 works), and serves until a
//! [`CancellationToken`] fires. Background loops take the same token.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::config::{DatabaseSettings, Settings};
use crate::domain::consistency::DatabaseRef;
use crate::domain::ids::WorkerId;
use crate::events::merchant::MerchantCopy;
use crate::events::{consumer, rebuild, relay, Broker, RelayWakers};
use crate::http::auth::AuthKeys;
use crate::http::limits::{self, UserLimits};
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
use crate::storage::{self, schema};
use crate::telemetry;

/// How often the pool and cache gauges are sampled. Prometheus scrapes every 15 to 60 s; a
/// sample every 5 s is fresh for any of those, and costs a few atomic reads.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// A built, bound, not yet serving application.
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    state: AppState,
    settings: Settings,
    shutdown: CancellationToken,
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
        let archive_db = connect_archive(&settings).await?;
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
        let mut background = Vec::new();
        let ids: Arc<IdSource> = match settings.ids.worker_id {
            Some(w) => IdSource::fixed(
                WorkerId::new(w).ok_or_else(|| anyhow::anyhow!("worker id {w} out of range"))?,
            ),
            None => {
                let (source, keeper) = lease_worker_from(&settings, shutdown.clone()).await?;
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
        let merchant_map = MerchantMap::connect(&settings.merchant, &settings.database).await?;
        // Opened (not written) here: a process that cannot open its index should not start.
        let search = match settings.search.enabled {
            true => Some(Arc::new(TantivyIndex::open(&settings.search)?)),
            false => None,
        };
        // With an identity provider, its keys are fetched here (a failure is logged, not
        // fatal: see `AuthKeys::start`) and refreshed in the background.
        let (auth, jwks_refresh) = AuthKeys::start(&settings.auth, shutdown.clone()).await?;
        background.extend(jwks_refresh);
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
        });
        Ok(Application {
            listener,
            addr,
            state,
            settings,
            shutdown,
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

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until the shutdown token fires, with the sweeper and the cart flusher running
    /// beside it.
    ///
    /// Shutdown (Ctrl-C, SIGTERM, or the token): stop accepting, let requests in flight
    /// finish and every write task complete, all within `server.shutdown_grace_ms`; then
    /// stop the background loops. A write cut off by the end of the grace period is one the
    /// client never got a 2xx for, and the sweeper repairs what it leaves.
    pub async fn run(self) -> anyhow::Result<()> {
        let s = &self.settings;
        let sweeper = tokio::spawn(jobs::sweeper::run(
            self.state.orders.clone(),
            Duration::from_secs(s.orders.reservation_grace_secs),
            s.orders.auto_complete_after(),
            Duration::from_secs(s.sweeper.interval_secs),
            s.sweeper.batch_size,
            self.shutdown.clone(),
        ));
        let gauges = tokio::spawn(sample_gauges(self.state.clone(), self.shutdown.clone()));
        let gates = tokio::spawn(jobs::gate_rebuild::run(
            self.state.orders.flash().clone(),
            self.shutdown.clone(),
        ));
        let probes = tokio::spawn(replicas::run_probes(
            self.databases.clone(),
            Duration::from_millis(s.replicas.probe_interval_ms),
            self.shutdown.clone(),
        ));
        let flusher = tokio::spawn(jobs::cart_flusher::run(
            self.state.orders.carts().clone(),
            self.shutdown.clone(),
        ));
        let relays = s.events.relay.then(|| {
            tokio::spawn(relay::run(
                relay_databases(self.state.orders.shards(), &self.archive_db),
                s.events.clone(),
                self.relay_wakers.clone(),
                self.shutdown.clone(),
            ))
        });
        let copy = s.merchant.consume.then(|| {
            tokio::spawn(consumer::run(
                s.events.clone(),
                Arc::new(MerchantCopy::new(self.state.merchant.map().clone())),
                self.shutdown.clone(),
            ))
        });
        let searcher = self.search.clone().map(|index| {
            tokio::spawn(search::run(
                s.events.clone(),
                index,
                self.state.orders.commerce().clone(),
                self.shutdown.clone(),
            ))
        });
        let archiver = s
            .archive
            .run_in_serve
            .then(|| tokio::spawn(jobs::archiver::run(self.archiver.clone(), self.shutdown.clone())));
        let cleanup = tokio::spawn(limits::run_cleanup(
            self.state.limits.clone(),
            self.shutdown.clone(),
        ));
        let writes = self.state.writes.clone();
        let app = router(self.state, &s.server);
        let token = self.shutdown.clone();
        let grace = Duration::from_millis(s.server.shutdown_grace_ms);
        let server = axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { token.cancelled().await })
            .into_future();
        tokio::pin!(server);
        // The grace period starts when shutdown is asked for, not when serving starts.
        let served = tokio::select! {
            r = &mut server => Some(r),
            _ = self.shutdown.cancelled() => None,
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
        for task in [relays, copy, searcher, archiver].into_iter().flatten() {
            let _ = task.await;
        }
        served?;
        Ok(())
    }
}

/// Samples the gauges every [`GAUGE_INTERVAL`] until `shutdown` fires: the connections of
/// every pool (`orderly_db_pool_connections`) and whether the cache's Redis answers
/// (`orderly_cache_up`). Also drains histogram samples into their buckets, so a process that
/// nobody scrapes does not pile them up.
async fn sample_gauges(state: AppState, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(GAUGE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
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
        state.metrics.run_upkeep();
    }
}

/// The connections of the worker-id lease's pool: one renewal at a time, plus one for the
/// release racing a last renewal.
const LEASE_POOL_CONNECTIONS: u32 = 2;

/// Every pool a `serve` process of `settings` opens (see [`Application::build`] and
/// [`Application::run`]), with the most connections each may hold: the primary and replica
/// pools of every shard database and of the commerce database, the archive's and the merchant
/// copy's pools, the worker-id lease's pool, and the connection each outbox relay holds
/// outside its database's pool. What [`budget::check`] weighs against the servers.
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

/// `orderly migrate`: creates every table on every database of the settings.
pub async fn migrate(settings: &Settings) -> anyhow::Result<schema::MigrateReport> {
    let shards = ShardMap::connect(settings).await?;
    let commerce = storage::connect(&settings.commerce.url, &settings.database).await?;
    let mut report = schema::migrate(&commerce, &shards).await?;
    let merchant = MerchantMap::connect(&settings.merchant, &settings.database).await?;
    let m = schema::migrate_merchant(&merchant).await?;
    report.applied.extend(m.applied);
    report.already += m.already;
    let archive = storage::connect(&settings.archive.url, &settings.database).await?;
    let a = schema::migrate_archive(&archive).await?;
    report.applied.extend(a.applied);
    report.already += a.already;
    schema::backfill_archived_users(&archive, &shards, &report).await?;
    Ok(report)
}

/// `orderly relay`: the outbox relays of every shard database, without the API, until
/// `shutdown` (one relay per database is active at a time, whichever process holds it).
pub async fn relay(settings: &Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let shards = ShardMap::connect(settings).await?;
    let archive = connect_archive(settings).await?;
    let databases = relay_databases(&shards, &archive);
    let wakers = RelayWakers::new(databases.len());
    relay::run(databases, settings.events.clone(), wakers, shutdown).await;
    Ok(())
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
