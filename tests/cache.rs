//! The Redis cache against a real Redis (started by `LocalCluster`, no MariaDB): loaders are
//! closures that count their calls, so every test sees exactly when the "database" is read.
//!
//! Each test has its own Redis, so tests that kill, pause or restart it run in parallel.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use orderly::config::{CacheSettings, RedisSettings};
use orderly::domain::consistency::DatabaseRef;
use orderly::domain::ids::{OrderId, UserId};
use orderly::redis::cache::codec::sample_order;
use orderly::redis::cache::{order_key, CacheHealth, RedisCache};
use orderly::redis::gate::FlashGate;
use orderly::redis::Redis;
use orderly_testkit::cluster::{ClusterSpec, LocalCluster};

/// The database every entry of these tests is loaded from (it only picks the fill bound).
const DB: DatabaseRef = DatabaseRef::Shards(0);
use orderly::domain::order::Order;
use orderly::domain::user::User;

const PREFIX: &str = "test:";
const OWNER: i64 = 77;

fn settings() -> CacheSettings {
    CacheSettings {
        enabled: true,
        ttl_secs: 300,
        list_ttl_secs: 60,
        absent_ttl_secs: 30,
        ttl_jitter_percent: 20,
        write_marker_ms: 10_000,
        fill_lease_ms: 5_000,
        // Generous for a debug build on a busy 2-core machine; still far below a test's
        // patience when Redis is frozen.
        timeout_ms: 250,
        connect_timeout_ms: 500,
        failures_to_open: 3,
        probe_interval_ms: 200,
        max_concurrent_fills: 32,
        max_pending_invalidations: 1_000,
    }
}

struct Fixture {
    cluster: LocalCluster,
    cache: RedisCache,
    /// Over the cache's connection, as in the server.
    gate: FlashGate,
}

async fn fixture_with(cache: CacheSettings) -> Fixture {
    let cluster = LocalCluster::start(ClusterSpec {
        mariadb_servers: 0,
        with_redis: true,
        with_nats: false,
        ..ClusterSpec::default()
    })
    .await
    .expect("start redis");
    let redis = RedisSettings {
        url: cluster.redis_url().expect("redis url"),
        key_prefix: PREFIX.into(),
        tls_ca_file: Default::default(),
    };
    let conn = Redis::connect(&redis, &cache).await.expect("connect");
    let gate = FlashGate::new(conn.clone());
    let cache = RedisCache::new(conn, &cache);
    Fixture { cluster, cache, gate }
}

async fn fixture() -> Fixture {
    fixture_with(settings()).await
}

impl Fixture {
    async fn raw(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.cluster.redis_url().unwrap())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    async fn raw_order(&self, id: OrderId) -> Option<Vec<u8>> {
        let mut con = self.raw().await;
        redis::cmd("GET")
            .arg(order_key(PREFIX, id))
            .query_async(&mut con)
            .await
            .unwrap()
    }
}

/// The "database": one order (or none) and a count of loads.
#[derive(Default)]
struct Db {
    order: Mutex<Option<Order>>,
    loads: AtomicUsize,
}

impl Db {
    fn with(order: Option<Order>) -> Db {
        Db {
            order: Mutex::new(order),
            loads: AtomicUsize::new(0),
        }
    }

    fn set(&self, order: Option<Order>) {
        *self.order.lock().unwrap() = order;
    }

    fn loads(&self) -> usize {
        self.loads.load(Ordering::SeqCst)
    }

    async fn load(&self) -> Result<Option<Order>, Infallible> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        Ok(self.order.lock().unwrap().clone())
    }

    async fn load_slowly(&self) -> Result<Option<Order>, Infallible> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(self.order.lock().unwrap().clone())
    }

    async fn load_page(&self) -> Result<Vec<Order>, Infallible> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        Ok(self.order.lock().unwrap().iter().cloned().collect())
    }
}

fn order_id(n: i64) -> OrderId {
    OrderId::new(n).unwrap()
}

fn owner() -> UserId {
    UserId::new(OWNER).unwrap()
}

fn order(n: i64, version: i64) -> Order {
    sample_order(n, OWNER, version)
}

fn version(o: &Option<Order>) -> Option<i64> {
    o.as_ref().map(|o| o.version)
}

/// Reads `id` until a read is answered by Redis (the loader is not called), asserting every
/// answer on the way; gives up after 10 s.
async fn read_until_hit(f: &Fixture, db: &Db, id: OrderId, expect: Option<i64>) {
    let began = Instant::now();
    loop {
        let before = db.loads();
        let got = f.cache.order(id, DB, || db.load()).await.unwrap();
        assert_eq!(version(&got), expect, "a read answered a stale order");
        if db.loads() == before {
            return;
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "reads never hit the cache again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_filled_entry_is_a_hit_that_touches_no_database() {
    let f = fixture().await;
    let id = order_id(1);
    let db = Db::with(Some(order(1, 3)));
    assert_eq!(
        f.cache.order(id, DB, || db.load()).await.unwrap(),
        Some(order(1, 3))
    );
    assert_eq!(db.loads(), 1);
    for _ in 0..3 {
        assert_eq!(
            f.cache.order(id, DB, || db.load()).await.unwrap(),
            Some(order(1, 3))
        );
    }
    assert_eq!(db.loads(), 1);
    assert!(f.raw_order(id).await.unwrap().starts_with(b"3:"));
    assert_eq!(f.cache.health(), CacheHealth::Up);

    // Users and first pages too.
    let user = User {
        user_id: owner(),
        name: "王芳".into(),
        level: 2,
        created_at: order(1, 1).created_at,
    };
    let users = AtomicUsize::new(0);
    let load_user = || async {
        users.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Infallible>(Some(user.clone()))
    };
    assert_eq!(
        f.cache.user(owner(), DB, load_user).await.unwrap(),
        Some(user.clone())
    );
    assert_eq!(
        f.cache.user(owner(), DB, load_user).await.unwrap(),
        Some(user.clone())
    );
    assert_eq!(users.load(Ordering::SeqCst), 1);

    let pages = Db::with(Some(order(1, 3)));
    assert_eq!(
        f.cache
            .first_page(owner(), DB, || pages.load_page())
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        f.cache
            .first_page(owner(), DB, || pages.load_page())
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(pages.loads(), 1);
}

#[tokio::test]
async fn a_fill_loaded_before_a_newer_write_is_refused() {
    let f = fixture().await;
    let id = order_id(2);
    let db = std::sync::Arc::new(Db::with(Some(order(2, 1))));
    let paused = f.cache.fill_gate().pause_next_order_fill(id);
    let reader = {
        let (db, cache) = (db.clone(), &f.cache);
        async move { cache.order(id, DB, || db.load()).await.unwrap() }
    };
    let writer = async {
        paused.loaded().await;
        // The write commits v2 and its notice arrives while the reader holds v1.
        db.set(Some(order(2, 2)));
        f.cache.order_written(id, owner(), 2, None).await;
        paused.release();
    };
    let (read, ()) = tokio::join!(reader, writer);
    assert_eq!(version(&read), Some(1), "the slow reader answers what it loaded");
    assert_eq!(f.raw_order(id).await, None, "the marker refused the stale fill");
    let loads = db.loads();
    assert_eq!(
        version(&f.cache.order(id, DB, || db.load()).await.unwrap()),
        Some(2)
    );
    assert_eq!(db.loads(), loads + 1);
    read_until_hit(&f, &db, id, Some(2)).await;
}

#[tokio::test]
async fn a_fill_loaded_before_a_write_with_a_snapshot_is_refused() {
    let f = fixture().await;
    let id = order_id(3);
    let db = Db::with(Some(order(3, 1)));
    let paused = f.cache.fill_gate().pause_next_order_fill(id);
    let reader = f.cache.order(id, DB, || db.load());
    let writer = async {
        paused.loaded().await;
        db.set(Some(order(3, 2)));
        f.cache.order_written(id, owner(), 2, Some(&order(3, 2))).await;
        paused.release();
    };
    let (read, ()) = tokio::join!(reader, writer);
    assert_eq!(version(&read.unwrap()), Some(1));
    // The snapshot stands; the next read is a hit at v2.
    let loads = db.loads();
    assert_eq!(
        version(&f.cache.order(id, DB, || db.load()).await.unwrap()),
        Some(2)
    );
    assert_eq!(db.loads(), loads);
}

#[tokio::test]
async fn a_page_loaded_before_a_write_is_not_filled_after_it() {
    let f = fixture().await;
    let id = order_id(4);
    let db = Db::with(None);
    let paused = f.cache.fill_gate().pause_next_page_fill(owner());
    let reader = f.cache.first_page(owner(), DB, || db.load_page());
    let writer = async {
        paused.loaded().await;
        db.set(Some(order(4, 1)));
        f.cache.order_written(id, owner(), 1, Some(&order(4, 1))).await;
        paused.release();
    };
    let (read, ()) = tokio::join!(reader, writer);
    assert!(read.unwrap().is_empty());
    // The generation moved: the empty page was not cached.
    let page = f.cache.first_page(owner(), DB, || db.load_page()).await.unwrap();
    assert_eq!(page, vec![order(4, 1)]);
    assert_eq!(db.loads(), 2);
    f.cache.first_page(owner(), DB, || db.load_page()).await.unwrap();
    assert_eq!(db.loads(), 2, "a page filled after the write is a hit");
}

#[tokio::test]
async fn an_absent_order_is_cached_and_cleared_by_its_creation() {
    let f = fixture().await;
    let id = order_id(5);
    let db = Db::with(None);
    assert_eq!(f.cache.order(id, DB, || db.load()).await.unwrap(), None);
    assert_eq!(f.cache.order(id, DB, || db.load()).await.unwrap(), None);
    assert_eq!(db.loads(), 1, "absence is cached");
    db.set(Some(order(5, 1)));
    f.cache.order_written(id, owner(), 1, None).await;
    assert_eq!(
        version(&f.cache.order(id, DB, || db.load()).await.unwrap()),
        Some(1)
    );
    assert_eq!(db.loads(), 2);
    read_until_hit(&f, &db, id, Some(1)).await;

    // The same with the creation's snapshot: no load at all.
    let id = order_id(6);
    let db = Db::with(None);
    assert_eq!(f.cache.order(id, DB, || db.load()).await.unwrap(), None);
    f.cache.order_written(id, owner(), 1, Some(&order(6, 1))).await;
    assert_eq!(
        version(&f.cache.order(id, DB, || db.load()).await.unwrap()),
        Some(1)
    );
    assert_eq!(db.loads(), 1);

    // And a user profile.
    let uid = UserId::new(99).unwrap();
    let user = User {
        user_id: uid,
        name: "n".into(),
        level: 1,
        created_at: order(1, 1).created_at,
    };
    let none = || async { Ok::<Option<User>, Infallible>(None) };
    assert_eq!(f.cache.user(uid, DB, none).await.unwrap(), None);
    f.cache.user_written(&user).await;
    let unused = || async { panic!("a hit must not load") };
    assert_eq!(
        f.cache.user::<Infallible, _, _>(uid, DB, unused).await.unwrap(),
        Some(user)
    );
}

#[tokio::test]
async fn concurrent_misses_of_one_key_share_one_load() {
    let f = fixture().await;
    let id = order_id(7);
    let db = Db::with(Some(order(7, 1)));
    let reads = (0..200).map(|_| f.cache.order(id, DB, || db.load_slowly()));
    let answers = futures::future::join_all(reads).await;
    assert!(answers.iter().all(|a| version(a.as_ref().unwrap()) == Some(1)));
    assert_eq!(db.loads(), 1);
}

#[tokio::test]
async fn reads_and_writes_survive_a_killed_redis_and_hits_resume_after_it_restarts() {
    let f = fixture().await;
    let id = order_id(8);
    let db = Db::with(Some(order(8, 1)));
    read_until_hit(&f, &db, id, Some(1)).await;

    f.cluster.kill_redis().unwrap();
    for _ in 0..5 {
        assert_eq!(
            version(&f.cache.order(id, DB, || db.load()).await.unwrap()),
            Some(1)
        );
    }
    assert_eq!(f.cache.health(), CacheHealth::Degraded);
    db.set(Some(order(8, 2)));
    let began = Instant::now();
    f.cache.order_written(id, owner(), 2, None).await;
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "a write notice does not wait for Redis"
    );
    assert_eq!(
        version(&f.cache.order(id, DB, || db.load()).await.unwrap()),
        Some(2)
    );

    f.cluster.start_redis().await.unwrap();
    read_until_hit(&f, &db, id, Some(2)).await;
    assert_eq!(f.cache.health(), CacheHealth::Up);
}

#[tokio::test]
async fn a_notice_that_timed_out_is_replayed_before_the_entry_is_read_again() {
    let f = fixture().await;
    let id = order_id(9);
    let db = Db::with(Some(order(9, 1)));
    read_until_hit(&f, &db, id, Some(1)).await;

    f.cluster.pause_redis().unwrap();
    db.set(Some(order(9, 2)));
    f.cache.order_written(id, owner(), 2, None).await;
    f.cluster.resume_redis().unwrap();
    read_until_hit(&f, &db, id, Some(2)).await;
}

#[tokio::test]
async fn a_notice_skipped_while_the_breaker_is_open_is_replayed_before_the_entry_is_read() {
    // A long probe interval so that the notice below surely finds the breaker open and is
    // never sent: only the replay can remove v1.
    let f = fixture_with(CacheSettings {
        probe_interval_ms: 2_000,
        ..settings()
    })
    .await;
    let id = order_id(10);
    let db = Db::with(Some(order(10, 1)));
    read_until_hit(&f, &db, id, Some(1)).await;

    f.cluster.pause_redis().unwrap();
    let other = Db::with(None);
    while f.cache.health() == CacheHealth::Up {
        f.cache.order(order_id(11), DB, || other.load()).await.unwrap();
    }
    db.set(Some(order(10, 2)));
    f.cache.order_written(id, owner(), 2, None).await;
    f.cluster.resume_redis().unwrap();
    assert!(
        f.raw_order(id).await.unwrap().starts_with(b"1:"),
        "v1 is still in Redis"
    );
    read_until_hit(&f, &db, id, Some(2)).await;
    assert!(f.raw_order(id).await.unwrap().starts_with(b"2:"));
}

#[tokio::test]
async fn entries_of_a_redis_restarted_from_an_old_snapshot_are_misses() {
    let f = fixture().await;
    let id = order_id(12);
    let db = Db::with(Some(order(12, 1)));
    read_until_hit(&f, &db, id, Some(1)).await;
    let mut raw = f.raw().await;
    let _: () = redis::cmd("SAVE").query_async(&mut raw).await.unwrap();

    db.set(Some(order(12, 2)));
    f.cache.order_written(id, owner(), 2, None).await;
    assert_eq!(f.raw_order(id).await, None, "the notice was delivered");

    f.cluster.kill_redis().unwrap();
    f.cluster.start_redis().await.unwrap();
    assert!(
        f.raw_order(id).await.unwrap().starts_with(b"1:"),
        "Redis came back with v1 from its snapshot"
    );
    read_until_hit(&f, &db, id, Some(2)).await;
    assert!(f.raw_order(id).await.unwrap().starts_with(b"2:"));
}

#[tokio::test]
async fn a_cache_whose_redis_is_down_at_start_is_degraded_and_recovers() {
    let cluster = LocalCluster::start(ClusterSpec {
        mariadb_servers: 0,
        with_redis: true,
        with_nats: false,
        ..ClusterSpec::default()
    })
    .await
    .unwrap();
    cluster.kill_redis().unwrap();
    let redis = RedisSettings {
        url: cluster.redis_url().unwrap(),
        key_prefix: PREFIX.into(),
        tls_ca_file: Default::default(),
    };
    let conn = Redis::connect(&redis, &settings()).await.unwrap();
    let gate = FlashGate::new(conn.clone());
    let cache = RedisCache::new(conn, &settings());
    assert_eq!(cache.health(), CacheHealth::Degraded);
    let db = Db::with(Some(order(13, 1)));
    assert!(cache
        .order(order_id(13), DB, || db.load())
        .await
        .unwrap()
        .is_some());
    cluster.start_redis().await.unwrap();
    let f = Fixture { cluster, cache, gate };
    read_until_hit(&f, &db, order_id(13), Some(1)).await;
}

#[tokio::test]
async fn too_many_undelivered_notices_purge_every_entry_before_the_cache_is_read_again() {
    let f = fixture_with(CacheSettings {
        probe_interval_ms: 2_000,
        max_pending_invalidations: 1,
        ..settings()
    })
    .await;
    let (a, b) = (order_id(14), order_id(15));
    let (db_a, db_b) = (Db::with(Some(order(14, 1))), Db::with(Some(order(15, 1))));
    read_until_hit(&f, &db_a, a, Some(1)).await;
    read_until_hit(&f, &db_b, b, Some(1)).await;

    f.cluster.pause_redis().unwrap();
    let other = Db::with(None);
    while f.cache.health() == CacheHealth::Up {
        f.cache.order(order_id(16), DB, || other.load()).await.unwrap();
    }
    // Two orders and a page: more than the set holds, so it turns into a purge.
    db_a.set(Some(order(14, 2)));
    f.cache.order_written(a, owner(), 2, None).await;
    f.cluster.resume_redis().unwrap();
    assert!(f.raw_order(a).await.unwrap().starts_with(b"1:"));
    read_until_hit(&f, &db_a, a, Some(2)).await;
    assert_eq!(f.raw_order(b).await, None, "the purge removed every entry");
    assert_eq!(
        version(&f.cache.order(b, DB, || db_b.load()).await.unwrap()),
        Some(1)
    );
}

/// The flash-sale gate: takes within the units and each buyer's limit, once per order;
/// gives back once; a rebuild replaces it; no gate answers `Missing`.
#[tokio::test]
async fn flash_gate_takes_once_per_order_and_gives_back_once() {
    use orderly::domain::flash::FlashSale;
    use orderly::domain::ids::{FlashSaleId, ProductId, ShopId, UserId};
    use orderly::redis::gate::GateAnswer;
    let f = fixture().await;
    let now = chrono::Utc::now();
    let sale = FlashSale {
        sale_id: FlashSaleId::new(9).unwrap(),
        product_id: ProductId::new(1).unwrap(),
        shop_id: ShopId::new(1).unwrap(),
        units: 2,
        sold: 0,
        sale_price: orderly::domain::money::Money::new(1).unwrap(),
        per_user_limit: 1,
        starts_at: now - chrono::TimeDelta::seconds(5),
        ends_at: now + chrono::TimeDelta::hours(1),
        payment_timeout_secs: 60,
        ended_at: None,
    };
    let (a, b, c) = (
        UserId::new(1).unwrap(),
        UserId::new(2).unwrap(),
        UserId::new(3).unwrap(),
    );
    let order = |n: i64| OrderId::new(n).unwrap();
    assert_eq!(
        f.gate.take(sale.sale_id, order(1), a, 1).await,
        GateAnswer::Missing
    );
    assert!(f.gate.rebuild(&sale, 2, &[], &[], &[]).await);
    assert_eq!(f.gate.take(sale.sale_id, order(1), a, 1).await, GateAnswer::Took);
    assert_eq!(
        f.gate.take(sale.sale_id, order(1), a, 1).await,
        GateAnswer::Already
    );
    assert_eq!(
        f.gate.take(sale.sale_id, order(2), a, 1).await,
        GateAnswer::OverLimit
    );
    assert_eq!(f.gate.take(sale.sale_id, order(3), b, 1).await, GateAnswer::Took);
    assert_eq!(
        f.gate.take(sale.sale_id, order(4), c, 1).await,
        GateAnswer::SoldOut
    );
    assert_eq!(f.gate.give_back(sale.sale_id, order(3)).await, Some(true));
    assert_eq!(
        f.gate.give_back(sale.sale_id, order(3)).await,
        Some(false),
        "once"
    );
    assert_eq!(f.gate.take(sale.sale_id, order(4), c, 1).await, GateAnswer::Took);
    // A rebuild from the database's state replaces everything.
    assert!(
        f.gate
            .rebuild(&sale, 1, &[(a, 1)], &[(order(1), a, 1)], &[])
            .await
    );
    assert_eq!(
        f.gate.take(sale.sale_id, order(1), a, 1).await,
        GateAnswer::Already
    );
    assert_eq!(f.gate.take(sale.sale_id, order(5), b, 1).await, GateAnswer::Took);
    assert_eq!(
        f.gate.take(sale.sale_id, order(6), c, 1).await,
        GateAnswer::SoldOut
    );
    let mut over = sale.clone();
    over.ends_at = now - chrono::TimeDelta::seconds(1);
    over.starts_at = now - chrono::TimeDelta::hours(1);
    assert!(f.gate.rebuild(&over, 5, &[], &[], &[order(9)]).await);
    assert_eq!(
        f.gate.take(sale.sale_id, order(7), c, 1).await,
        GateAnswer::Closed
    );
}
