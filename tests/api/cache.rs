//! SPEC 2.5: the cache is never behind a committed write. A forced stale-fill race, a
//! consistency checker over many writers and readers (in the spirit of Meta's Polaris), the
//! three classic failures (penetration, breakdown, avalanche's stampede bound) counted on
//! the database server, and Redis killed, restarted empty and restarted with old data.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use futures::future::join_all;
use orderly::domain::ids::{IdParts, OrderId, UserId};
use orderly::domain::shard::Gene;
use orderly::redis::cache::order_key;
use orderly::redis::cache::CacheHealth;
use orderly_testkit::cluster::{ClusterSpec, LocalCluster};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::MySqlPool;

use crate::helpers::{own_redis, TestApp};

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("redis")
}

/// The raw cached value of an order (`<version>:<tag>:<bytes>`), if any.
async fn cached_version(app: &TestApp, id: &str) -> Option<i64> {
    let mut r = redis_conn(&app.settings.redis.url).await;
    let key = order_key(&app.settings.redis.key_prefix, OrderId::parse(id).unwrap());
    let v: Option<Vec<u8>> = redis::cmd("GET").arg(key).query_async(&mut r).await.unwrap();
    let v = v?;
    let end = v.iter().position(|&b| b == b':')?;
    std::str::from_utf8(&v[..end]).ok()?.parse().ok()
}

async fn patch_remark(app: &TestApp, user: i64, id: &str, version: i64, remark: &str) -> (StatusCode, Value) {
    app.call(
        "PATCH",
        &format!("/v1/orders/{id}"),
        Some(&app.user_token(user)),
        Some(json!({"expected_version": version, "remark": remark})),
    )
    .await
}

/// Counts the order loads (`load_order`'s main query) that reached this server, from its
/// general query log. Turned on at creation; `reset` empties it.
struct QueryLog {
    admin: MySqlPool,
}

impl QueryLog {
    async fn start(cluster: &LocalCluster) -> QueryLog {
        let admin = MySqlPool::connect(&cluster.mariadb(0).admin_url()).await.unwrap();
        for sql in [
            "SET GLOBAL log_output = 'TABLE'",
            "SET GLOBAL general_log = 1",
            "TRUNCATE mysql.general_log",
        ] {
            sqlx::query(sql).execute(&admin).await.unwrap();
        }
        QueryLog { admin }
    }

    async fn reset(&self) {
        sqlx::query("TRUNCATE mysql.general_log")
            .execute(&self.admin)
            .await
            .unwrap();
    }

    /// Order loads of `id` since the last reset.
    async fn order_loads(&self, id: OrderId) -> i64 {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM mysql.general_log
             WHERE command_type IN ('Query', 'Execute')
               AND argument LIKE '%receiver_name%FROM orders%WHERE order_id = %'
               AND argument LIKE CONCAT('%order_id = ', ?, '%')",
        )
        .bind(id.get().to_string())
        .fetch_one(&self.admin)
        .await
        .unwrap()
    }

    /// Order loads of any id since the last reset.
    async fn all_order_loads(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM mysql.general_log
             WHERE command_type IN ('Query', 'Execute')
               AND argument LIKE '%receiver_name%FROM orders%WHERE order_id = %'",
        )
        .fetch_one(&self.admin)
        .await
        .unwrap()
    }
}

/// A cluster of the test's own (one MariaDB server and Redis), so what reaches the server is
/// this test's alone.
async fn own_cluster() -> LocalCluster {
    LocalCluster::start(ClusterSpec {
        mariadb_servers: 1,
        with_redis: true,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster")
}

/// The stale-fill race, forced: a reader loads v1 from MySQL and is held before its fill; a
/// write of v2 commits and is acknowledged; then the fill goes on. It must not put v1 back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_stale_fill_never_lands_after_a_newer_write() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let user = 7001;
    let o = app.place_order(user, &[(&cat.products[0], 1)]).await;
    let id = o["order_id"].as_str().unwrap().to_owned();
    let oid = OrderId::parse(&id).unwrap();
    // The create left v1 in the cache: drop it so the next read is a miss that fills.
    let mut r = redis_conn(&app.settings.redis.url).await;
    let key = order_key(&app.settings.redis.key_prefix, oid);
    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut r).await.unwrap();

    let gate = app.app.orders.cache().fill_gate().expect("the cache is on");
    let paused = gate.pause_next_order_fill(oid);
    let reader = {
        let base = app.base.clone();
        let token = app.user_token(user);
        let id = id.clone();
        tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .get(format!("{base}/v1/orders/{id}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            resp.json::<Value>().await.unwrap()
        })
    };
    tokio::time::timeout(Duration::from_secs(10), paused.loaded())
        .await
        .expect("the read missed the cache and loaded v1 from MySQL");

    let (s, b) = patch_remark(&app, user, &id, 1, "newer").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["version"], 2);
    paused.release();
    let first = reader.await.unwrap();
    assert_eq!(first["version"], 1, "the held read started before the write");

    for _ in 0..20 {
        let (s, b) = app.get_order(user, &id).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(b["version"], 2, "a read after the acknowledged write saw {b}");
        assert_eq!(b["remark"], "newer");
    }
    assert_ne!(
        cached_version(&app, &id).await,
        Some(1),
        "v1 went back into the cache"
    );
}

/// The consistency checker: 8 writers and 32 readers on 200 hot orders, over two service
/// processes on a cluster with a GTID replica, while Redis loses every key (`FLUSHALL`) every
/// few hundred milliseconds. Each writer owns 25 orders and changes them with `PATCH` through
/// process A (no conflicts between writers); after each 200 it raises the order's
/// acknowledged version. Half the readers read through A, half through B. A read that starts
/// after an acknowledgement must see that version or a newer one: by order id, through
/// `?include=user`, and in the owner's first page of orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow group: .ci/run runs it (cargo test --test api -- --ignored)"]
async fn cache_is_never_behind_an_acknowledged_write() {
    const WRITERS: usize = 8;
    const READERS: usize = 32;
    const USERS: usize = 20;
    const PER_USER: usize = 10;
    const WRITES: u64 = 10_000;
    let cluster = LocalCluster::start(ClusterSpec {
        replicas_per_server: 1,
        ..ClusterSpec::default()
    })
    .await
    .unwrap();
    let app = Arc::new(TestApp::spawn_on(&cluster, |_| {}).await);
    let twin = Arc::new(app.twin().await);
    let cat = app.catalog(&[100_000]).await;
    let product = cat.products[0].clone();
    let admin = app.admin_token();
    let mut orders: Vec<(i64, String)> = Vec::new();
    for u in 0..USERS {
        let user = 7200 + u as i64;
        let (s, b) = app
            .call(
                "POST",
                "/v1/users",
                Some(&admin),
                Some(json!({"user_id": user.to_string(), "name": format!("buyer {u}"), "level": 1})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        let items = [(product.as_str(), 1)];
        let placed = join_all((0..PER_USER).map(|_| app.place_order(user, &items))).await;
        orders.extend(
            placed
                .iter()
                .map(|o| (user, o["order_id"].as_str().unwrap().to_owned())),
        );
    }
    let orders = Arc::new(orders);
    let acked: Arc<Vec<AtomicI64>> = Arc::new((0..orders.len()).map(|_| AtomicI64::new(1)).collect());
    let writes = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let checked = Arc::new(AtomicU64::new(0));
    let violations = Arc::new(AtomicU64::new(0));

    let writers = (0..WRITERS).map(|w| {
        let (app, orders, acked, writes) = (app.clone(), orders.clone(), acked.clone(), writes.clone());
        tokio::spawn(async move {
            let mine: Vec<usize> = (w..orders.len()).step_by(WRITERS).collect();
            let mut versions = vec![1i64; orders.len()];
            let mut n = 0usize;
            while writes.load(Ordering::SeqCst) < WRITES {
                let i = mine[n % mine.len()];
                n += 1;
                let (user, id) = &orders[i];
                let (s, b) = patch_remark(&app, *user, id, versions[i], &format!("w{n}")).await;
                assert_eq!(s, StatusCode::OK, "{b}");
                versions[i] = b["version"].as_i64().unwrap();
                acked[i].fetch_max(versions[i], Ordering::SeqCst);
                writes.fetch_add(1, Ordering::SeqCst);
            }
        })
    });
    let writers: Vec<_> = writers.collect();
    let flushes = Arc::new(AtomicU64::new(0));
    let loss = {
        let (url, done, flushes) = (app.settings.redis.url.clone(), done.clone(), flushes.clone());
        tokio::spawn(async move {
            let mut con = redis_conn(&url).await;
            while !done.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if redis::cmd("FLUSHALL").query_async::<()>(&mut con).await.is_ok() {
                    flushes.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };

    let readers = (0..READERS).map(|r| {
        let (app, orders, acked, done, checked, violations) = (
            if r % 2 == 0 { app.clone() } else { twin.clone() },
            orders.clone(),
            acked.clone(),
            done.clone(),
            checked.clone(),
            violations.clone(),
        );
        tokio::spawn(async move {
            let mut k = r;
            while !done.load(Ordering::SeqCst) {
                k = k
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let i = (k >> 33) % orders.len();
                let (user, id) = &orders[i];
                match k % 4 {
                    // The first page of the owner's orders: every order in it.
                    0 => {
                        let mine: Vec<usize> = (0..orders.len()).filter(|&j| orders[j].0 == *user).collect();
                        let floors: Vec<i64> =
                            mine.iter().map(|&j| acked[j].load(Ordering::SeqCst)).collect();
                        let (s, b) = app
                            .call("GET", "/v1/orders", Some(&app.user_token(*user)), None)
                            .await;
                        assert_eq!(s, StatusCode::OK, "{b}");
                        for (j, floor) in mine.iter().zip(floors) {
                            let listed = b["orders"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .find(|o| o["order_id"] == orders[*j].1.as_str())
                                .expect("every order of the user is on the first page");
                            checked.fetch_add(1, Ordering::Relaxed);
                            if listed["version"].as_i64().unwrap() < floor {
                                eprintln!(
                                    "violation: first page of {user} listed {} at {} after {floor}",
                                    orders[*j].1, listed["version"]
                                );
                                violations.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                    other => {
                        let floor = acked[i].load(Ordering::SeqCst);
                        let path = if other == 1 {
                            format!("/v1/orders/{id}?include=user")
                        } else {
                            format!("/v1/orders/{id}")
                        };
                        let (s, b) = app.call("GET", &path, Some(&app.user_token(*user)), None).await;
                        assert_eq!(s, StatusCode::OK, "{b}");
                        checked.fetch_add(1, Ordering::Relaxed);
                        if other == 1 {
                            assert_eq!(b["user"]["user_id"], user.to_string(), "{b}");
                        }
                        if b["version"].as_i64().unwrap() < floor {
                            eprintln!(
                                "violation: {path} answered version {} after {floor}",
                                b["version"]
                            );
                            violations.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            }
        })
    });
    let readers: Vec<_> = readers.collect();
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    for r in readers {
        r.await.unwrap();
    }
    loss.await.unwrap();
    assert!(
        flushes.load(Ordering::SeqCst) >= 3,
        "Redis lost its keys during the run"
    );
    let (writes, checked, violations) = (
        writes.load(Ordering::SeqCst),
        checked.load(Ordering::SeqCst),
        violations.load(Ordering::SeqCst),
    );
    eprintln!(
        "consistency checker: {writes} acknowledged writes, {checked} reads checked, {violations} violations"
    );
    assert!(writes >= WRITES);
    assert!(checked >= 10_000, "only {checked} reads checked");
    assert_eq!(violations, 0, "reads older than an acknowledged write");
}

/// Penetration: 10 000 reads of ids with no order reach MySQL a handful of times (absent ids
/// are cached as absent); ids that cannot exist never reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_penetration_absent_ids_barely_reach_mysql() {
    let cluster = own_cluster().await;
    let app = TestApp::spawn_on(&cluster, |_| {}).await;
    let log = QueryLog::start(&cluster).await;
    let user = 7301;
    // Issued but never used: valid ids of this user with no order.
    let mut absent = Vec::new();
    for _ in 0..5 {
        absent.push(app.new_order_id(user).await);
    }
    // Ids that cannot exist: another buyer's gene, or a time in the future.
    let others_id = app.new_order_id(7302).await;
    let future = OrderId::compose(IdParts {
        unix_ms: (Utc::now() + TimeDelta::days(1)).timestamp_millis(),
        gene: Gene::of_user(UserId::new(user).unwrap()),
        worker: 1,
        seq: 1,
    })
    .to_string();
    log.reset().await;

    let mut paths: Vec<String> = Vec::new();
    for i in 0..10_000 {
        paths.push(match i % 20 {
            18 => others_id.clone(),
            19 => future.clone(),
            k => absent[k % absent.len()].clone(),
        });
    }
    let token = app.user_token(user);
    for chunk in paths.chunks(50) {
        let answers = join_all(chunk.iter().map(|id| {
            let path = format!("/v1/orders/{id}");
            let token = &token;
            let app = &app;
            async move { app.call("GET", &path, Some(token), None).await }
        }))
        .await;
        for (s, b) in answers {
            assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
        }
    }
    let loads = log.all_order_loads().await;
    eprintln!("penetration: 10000 reads of absent ids, {loads} order loads on the server");
    assert!(loads <= 10, "{loads} order loads for 5 absent ids");
    assert_eq!(log.order_loads(OrderId::parse(&others_id).unwrap()).await, 0);
    assert_eq!(log.order_loads(OrderId::parse(&future).unwrap()).await, 0);

    // Creating one of them clears its "absent" at once.
    let cat = app.catalog(&[10]).await;
    let (s, b) = app
        .create_order(user, TestApp::order_body(&absent[0], &[(&cat.products[0], 1)]))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, b) = app.get_order(user, &absent[0]).await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

/// Breakdown: 200 concurrent reads of one cold key make one database read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_breakdown_one_cold_key_is_loaded_once() {
    let cluster = own_cluster().await;
    let app = TestApp::spawn_on(&cluster, |_| {}).await;
    let cat = app.catalog(&[10]).await;
    let user = 7401;
    let o = app.place_order(user, &[(&cat.products[0], 1)]).await;
    let id = o["order_id"].as_str().unwrap().to_owned();
    let mut r = redis_conn(&app.settings.redis.url).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut r).await.unwrap();
    let log = QueryLog::start(&cluster).await;

    let token = app.user_token(user);
    let path = format!("/v1/orders/{id}");
    let answers = join_all((0..200).map(|_| app.call("GET", &path, Some(&token), None))).await;
    for (s, b) in answers {
        assert_eq!(s, StatusCode::OK, "{b}");
        assert_eq!(b["order_id"], id.as_str());
    }
    let loads = log.order_loads(OrderId::parse(&id).unwrap()).await;
    eprintln!("breakdown: 200 concurrent reads of a cold key, {loads} order loads on the server");
    assert_eq!(loads, 1);
}

/// Redis killed mid-run: every request still succeeds (reads from MySQL, writes commit, ids
/// are issued). Restarted empty: hits resume. Restarted from a snapshot older than a
/// delivered invalidation, or frozen while a write could not invalidate: no stale entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_redis_down_is_slower_not_failing_and_never_stale_after() {
    let redis = own_redis().await;
    let url = redis.redis_url().unwrap();
    let app = TestApp::spawn_with(|s| {
        s.redis.url = url.clone();
        s.cache.probe_interval_ms = 100;
    })
    .await;
    let cat = app.catalog(&[1000]).await;
    let user = 7501;
    let o = app.place_order(user, &[(&cat.products[0], 1)]).await;
    let id = o["order_id"].as_str().unwrap().to_owned();
    let mut version = 1;
    assert_eq!(cached_version(&app, &id).await, Some(1));

    // Killed: everything keeps answering.
    redis.kill_redis().unwrap();
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while tokio::time::Instant::now() < until {
        let (s, b) = app.get_order(user, &id).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert_eq!(b["version"], version);
        let (s, b) = patch_remark(&app, user, &id, version, "while down").await;
        assert_eq!(s, StatusCode::OK, "{b}");
        version = b["version"].as_i64().unwrap();
        let placed = app.place_order(user, &[(&cat.products[0], 1)]).await;
        let (s, _) = app.get_order(user, placed["order_id"].as_str().unwrap()).await;
        assert_eq!(s, StatusCode::OK);
        let (s, b) = app
            .call("GET", "/v1/orders", Some(&app.user_token(user)), None)
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    let (s, b) = app.call("GET", "/readyz", None, None).await;
    assert_eq!(s, StatusCode::OK, "Redis down is not unready: {b}");
    assert_eq!(b["checks"]["cache"], "degraded");
    assert_eq!(app.app.orders.cache().health(), CacheHealth::Degraded);

    // Restarted empty: reads are right at once and fill the cache again.
    redis.start_redis_empty().await.unwrap();
    let mut filled = false;
    for _ in 0..50 {
        let (s, b) = app.get_order(user, &id).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(b["version"], version);
        if cached_version(&app, &id).await == Some(version) {
            filled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(filled, "the cache fills again after Redis came back");
    assert_eq!(app.app.orders.cache().health(), CacheHealth::Up);

    // Restarted from an old snapshot: the snapshot holds this version; a later write's
    // invalidation reached Redis, then Redis died and came back with the snapshot.
    redis.save_redis().await.unwrap();
    let (s, b) = patch_remark(&app, user, &id, version, "after the snapshot").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    version = b["version"].as_i64().unwrap();
    redis.kill_redis().unwrap();
    redis.start_redis().await.unwrap();
    for _ in 0..20 {
        let (s, b) = app.get_order(user, &id).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            b["version"], version,
            "a stale entry from the old snapshot was served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Frozen while a write commits: its invalidation cannot be delivered in time.
    let (s, b) = app.get_order(user, &id).await;
    assert_eq!((s, b["version"].as_i64()), (StatusCode::OK, Some(version)));
    redis.pause_redis().unwrap();
    let (s, b) = patch_remark(&app, user, &id, version, "while frozen").await;
    redis.resume_redis().unwrap();
    assert_eq!(s, StatusCode::OK, "{b}");
    version = b["version"].as_i64().unwrap();
    for _ in 0..20 {
        let (s, b) = app.get_order(user, &id).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(b["version"], version, "an entry the frozen Redis kept was served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The payment-timeout closer writes through the same commit point: a cached order it
/// closes reads as closed at once.
#[tokio::test]
async fn cache_closer_invalidates_the_orders_it_closes() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let user = 7601;
    let o = app.place_order(user, &[(&cat.products[0], 2)]).await;
    let id = o["order_id"].as_str().unwrap().to_owned();
    let (s, b) = app.get_order(user, &id).await;
    assert_eq!(
        (s, b["status"].as_str()),
        (StatusCode::OK, Some("pending_payment"))
    );
    assert_eq!(cached_version(&app, &id).await, Some(1), "the order is cached");

    let later = Utc::now() + TimeDelta::seconds(app.settings.orders.payment_timeout_secs as i64 + 60);
    let out = app.app.orders.close_expired_once(later, 100).await.unwrap();
    assert_eq!(out.closed, 1, "{out:?}");
    let (s, b) = app.get_order(user, &id).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["status"], "closed", "{b}");
    assert_eq!(b["version"], 2);
    assert_eq!(app.stock_of(&cat.products[0]).await, 10);
}
