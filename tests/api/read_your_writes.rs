//! SPEC 2.4: reads go to real MariaDB replicas (GTID replication), and no read of an order or
//! of its owner's list returns the state from before an acknowledged write, whatever the
//! replica lag; a lagging or dead replica costs latency, never staleness or an error.
//!
//! Every test here stops, lags or kills a replica, so each runs on a cluster of its own:
//! one primary (every shard and the commerce database) with one replica, and Redis.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orderly::config::Settings;
use orderly_testkit::cluster::{ClusterSpec, LocalCluster};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::TestApp;

async fn replicated_cluster() -> LocalCluster {
    LocalCluster::start(ClusterSpec {
        mariadb_servers: 1,
        replicas_per_server: 1,
        with_redis: true,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster with a replica")
}

/// A replica may stay stopped for the whole test without leaving the rotation, so that an
/// `eventual` read shows what it holds (the bounds keep their order: see `Settings::validate`).
fn tolerate_long_lag(s: &mut Settings) {
    s.replicas.max_lag_ms = 120_000;
    s.replicas.watermark_ttl_ms = 300_000;
    s.cache.write_marker_ms = 300_000;
}

/// Waits until `/readyz` reports every replica in rotation.
async fn until_replicas_in_rotation(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = app.call("GET", "/readyz", None, None).await;
        let checks = body["checks"].as_object().cloned().unwrap_or_default();
        let rotations: Vec<&str> = checks
            .iter()
            .filter(|(k, _)| k.starts_with("replicas:"))
            .filter_map(|(_, v)| v.as_str())
            .collect();
        let all_in = |r: &&str| r.split_once('/').is_some_and(|(n, m)| n == m);
        if !rotations.is_empty() && rotations.iter().all(all_in) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replicas never joined the rotation: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET with headers: (status, Served-By, body).
async fn read(
    app: &TestApp,
    token: &str,
    path: &str,
    consistency_token: Option<&str>,
) -> (StatusCode, String, Value) {
    let mut req = app.client.get(format!("{}{path}", app.base)).bearer_auth(token);
    if let Some(t) = consistency_token {
        req = req.header("Consistency-Token", t);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let served = resp
        .headers()
        .get("served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, served, body)
}

fn token_of(headers: &reqwest::header::HeaderMap) -> String {
    headers
        .get("consistency-token")
        .expect("every write answers a Consistency-Token")
        .to_str()
        .unwrap()
        .to_owned()
}

async fn pay_with_token(app: &TestApp, order: &Value) -> String {
    let id = order["order_id"].as_str().unwrap();
    let (s, headers, body) = app
        .call_full(
            "POST",
            &format!("/v1/orders/{id}/payments"),
            Some(&app.service_token()),
            Some(json!({"transaction_no": format!("tx-{id}"), "channel": "alipay", "amount": order["pay_amount"]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    token_of(&headers)
}

/// Runs `command` (`EXISTS`, `DEL`) on the cache entry of order `id`; answers its count.
async fn on_cache_entry(app: &TestApp, command: &str, id: &str) -> i64 {
    let client = redis::Client::open(app.settings.redis.url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let key = orderly::redis::cache::order_key(
        &app.settings.redis.key_prefix,
        orderly::domain::ids::OrderId::parse(id).unwrap(),
    );
    redis::cmd(command)
        .arg(&key)
        .query_async::<i64>(&mut con)
        .await
        .unwrap()
}

async fn cache_holds(app: &TestApp, id: &str) -> bool {
    on_cache_entry(app, "EXISTS", id).await == 1
}

async fn evict(app: &TestApp, id: &str) {
    on_cache_entry(app, "DEL", id).await;
}

/// The replica's applier stopped: a paid order reads as paid at once (the read waits for the
/// write's GTID, then goes to the primary), in detail and in the owner's list, through the
/// cache's loader too; `eventual` reads of the same replica show the unpaid state, which
/// proves the setup lags, and never put it into the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_your_writes_holds_while_the_replica_stops_applying() {
    let cluster = replicated_cluster().await;
    let app = TestApp::spawn_on(&cluster, tolerate_long_lag).await;
    until_replicas_in_rotation(&app).await;
    let catalog = app.catalog(&[100]).await;
    let user = 4242;
    let token = app.user_token(user);
    let order = app.place_order(user, &[(&catalog.products[0], 1)]).await;
    let id = order["order_id"].as_str().unwrap().to_owned();
    cluster
        .wait_replicas_caught_up(Duration::from_secs(20))
        .await
        .unwrap();
    // Before the write, the replica answers (no watermark to wait for beyond what it has).
    evict(&app, &id).await;
    let (s, served, o) = read(&app, &token, &format!("/v1/orders/{id}"), None).await;
    assert_eq!(
        (s, served.as_str(), o["status"].as_str()),
        (StatusCode::OK, "replica", Some("pending_payment"))
    );

    cluster.stop_replica_sql(0, 0).await.unwrap();
    pay_with_token(&app, &order).await;

    for round in 0..3 {
        // Session reads (the default), the cache entry evicted so the loader runs.
        evict(&app, &id).await;
        let (s, served, o) = read(&app, &token, &format!("/v1/orders/{id}"), None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            o["status"], "awaiting_shipment",
            "round {round}: session read served by {served}"
        );
        assert_eq!(
            served, "primary",
            "the replica lacks the write: the primary answers"
        );
        assert!(cache_holds(&app, &id).await, "a fresh read fills the cache");
        let (s, _, list) = read(&app, &token, "/v1/orders", None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            list["orders"][0]["status"], "awaiting_shipment",
            "round {round}: the owner's list"
        );
        let (_, _, list) = read(&app, &token, "/v1/orders?limit=50", None).await;
        assert_eq!(
            list["orders"][0]["status"], "awaiting_shipment",
            "round {round}: an uncached page"
        );

        // Eventual reads of the same replica show the state before the payment.
        evict(&app, &id).await;
        let (s, served, o) = read(
            &app,
            &token,
            &format!("/v1/orders/{id}?consistency=eventual"),
            None,
        )
        .await;
        assert_eq!((s, served.as_str()), (StatusCode::OK, "replica"));
        assert_eq!(
            o["status"], "pending_payment",
            "round {round}: the replica lags, so eventual is stale"
        );
        assert!(
            !cache_holds(&app, &id).await,
            "an eventual read never fills the cache"
        );
        let (_, served, list) = read(&app, &token, "/v1/orders?consistency=eventual", None).await;
        assert_eq!(
            (served.as_str(), list["orders"][0]["status"].as_str()),
            ("replica", Some("pending_payment"))
        );
        // Strong reads go to the primary.
        let (_, served, o) = read(&app, &token, &format!("/v1/orders/{id}?consistency=strong"), None).await;
        assert_eq!(
            (served.as_str(), o["status"].as_str()),
            ("primary", Some("awaiting_shipment"))
        );
    }

    cluster.start_replica_sql(0, 0).await.unwrap();
    cluster
        .wait_replicas_caught_up(Duration::from_secs(20))
        .await
        .unwrap();
    evict(&app, &id).await;
    let (_, served, o) = read(&app, &token, &format!("/v1/orders/{id}"), None).await;
    assert_eq!(
        (served.as_str(), o["status"].as_str()),
        ("replica", Some("awaiting_shipment")),
        "caught up: the replica answers again"
    );
}

/// A replicated cluster, a writing service process and a reading one, and an order of one
/// buyer that the replica has applied.
struct TwoProcesses {
    cluster: LocalCluster,
    writer: TestApp,
    reader: TestApp,
    /// The buyer's bearer token.
    token: String,
    order: Value,
    id: String,
}

async fn two_processes_and_an_order(user: i64) -> TwoProcesses {
    let cluster = replicated_cluster().await;
    let writer = TestApp::spawn_on(&cluster, tolerate_long_lag).await;
    let reader = writer.twin().await;
    until_replicas_in_rotation(&reader).await;
    let catalog = writer.catalog(&[100]).await;
    let token = writer.user_token(user);
    let order = writer.place_order(user, &[(&catalog.products[0], 1)]).await;
    let id = order["order_id"].as_str().unwrap().to_owned();
    cluster
        .wait_replicas_caught_up(Duration::from_secs(20))
        .await
        .unwrap();
    TwoProcesses {
        cluster,
        writer,
        reader,
        token,
        order,
        id,
    }
}

/// Another service process, Redis stopped (nothing shared) and the replica's applier
/// stopped: the reader's reads see the write, with the client's `Consistency-Token` and
/// without it (the read's fence is the primary's position, which no Redis outage hides).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_your_writes_from_another_process_with_redis_stopped() {
    let TwoProcesses {
        cluster,
        writer,
        reader,
        token,
        order,
        id,
    } = two_processes_and_an_order(5151).await;

    cluster.stop_redis().await.unwrap();
    cluster.stop_replica_sql(0, 0).await.unwrap();
    let consistency = pay_with_token(&writer, &order).await;
    assert!(consistency.starts_with("o0:"), "{consistency}");

    let path = format!("/v1/orders/{id}");
    for with_token in [Some(consistency.as_str()), None] {
        let (s, served, o) = read(&reader, &token, &path, with_token).await;
        assert_eq!(s, StatusCode::OK, "{o}");
        assert_eq!(
            (o["status"].as_str(), served.as_str()),
            (Some("awaiting_shipment"), "primary"),
            "token {with_token:?}"
        );
        for list_path in ["/v1/orders", "/v1/orders?limit=50"] {
            let (_, _, list) = read(&reader, &token, list_path, with_token).await;
            assert_eq!(
                list["orders"][0]["status"], "awaiting_shipment",
                "{list_path}, token {with_token:?}"
            );
        }
    }
    // The replica does lag: an eventual read of it shows the unpaid order.
    let (_, served, o) = read(&reader, &token, &format!("{path}?consistency=eventual"), None).await;
    assert_eq!(
        (o["status"].as_str(), served.as_str()),
        (Some("pending_payment"), "replica"),
        "the setup lags"
    );
    // A token this service did not write is a 422, not a 5xx.
    let (s, _, problem) = read(&reader, &token, &path, Some("o0:not-a-gtid")).await;
    assert_eq!(
        (s, problem["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("validation_failed"))
    );

    cluster.start_replica_sql(0, 0).await.unwrap();
    cluster
        .wait_replicas_caught_up(Duration::from_secs(20))
        .await
        .unwrap();
    let (_, served, o) = read(&reader, &token, &path, Some(&consistency)).await;
    assert_eq!(
        (o["status"].as_str(), served.as_str()),
        (Some("awaiting_shipment"), "replica")
    );
    cluster.start_redis().await.unwrap();
}

/// How Redis loses what it held.
#[derive(Debug, Clone, Copy)]
enum RedisLoss {
    FlushAll,
    RestartEmpty,
}

async fn lose_redis_keys(cluster: &LocalCluster, app: &TestApp, loss: RedisLoss) {
    match loss {
        RedisLoss::FlushAll => {
            let client = redis::Client::open(app.settings.redis.url.as_str()).unwrap();
            let mut con = client.get_multiplexed_async_connection().await.unwrap();
            redis::cmd("FLUSHALL").query_async::<()>(&mut con).await.unwrap();
        }
        RedisLoss::RestartEmpty => {
            cluster.stop_redis().await.unwrap();
            cluster.start_redis_empty().await.unwrap();
        }
    }
}

/// SPEC 2.5 with two processes and a lagging replica: the order is paid through A while the
/// replica's applier is stopped, then Redis loses every key (markers, entries, generations).
/// B's miss must not read the lagging replica into the cache; afterwards A and B, with and
/// without the payment's token, in detail and on the first page, never answer the unpaid
/// version.
async fn cache_survives_redis_losing_its_keys(user: i64, loss: RedisLoss) {
    let TwoProcesses {
        cluster,
        writer,
        reader,
        token,
        order,
        id,
    } = two_processes_and_an_order(user).await;
    let path = format!("/v1/orders/{id}");
    // Both processes have the unpaid order and page cached.
    for app in [&writer, &reader] {
        let (_, _, o) = read(app, &token, &path, None).await;
        assert_eq!(o["status"], "pending_payment");
        let (_, _, list) = read(app, &token, "/v1/orders", None).await;
        assert_eq!(list["orders"][0]["status"], "pending_payment");
    }

    cluster.stop_replica_sql(0, 0).await.unwrap();
    let consistency = pay_with_token(&writer, &order).await;
    lose_redis_keys(&cluster, &writer, loss).await;

    // B first: its misses are the fills that could put the old version back.
    let (s, _, o) = read(&reader, &token, &path, None).await;
    assert_eq!(s, StatusCode::OK, "{o}");
    assert_eq!(o["status"], "awaiting_shipment", "B's miss after {loss:?}");
    let (_, _, list) = read(&reader, &token, "/v1/orders", None).await;
    assert_eq!(
        list["orders"][0]["status"], "awaiting_shipment",
        "B's first page after {loss:?}"
    );
    // Whatever is cached now is what everyone reads.
    for (name, app) in [("A", &writer), ("B", &reader)] {
        for with_token in [None, Some(consistency.as_str())] {
            let (_, served, o) = read(app, &token, &path, with_token).await;
            assert_eq!(
                o["status"], "awaiting_shipment",
                "{name}'s detail (served by {served}), token {with_token:?}, after {loss:?}"
            );
            assert_eq!(o["version"], 2, "{name}");
            let (_, served, list) = read(app, &token, "/v1/orders", with_token).await;
            assert_eq!(
                list["orders"][0]["status"], "awaiting_shipment",
                "{name}'s first page (served by {served}), token {with_token:?}, after {loss:?}"
            );
        }
    }
    // The setup does lag: the replica still holds the unpaid order.
    let (_, served, list) = read(&reader, &token, "/v1/orders?consistency=eventual", None).await;
    assert_eq!(
        (list["orders"][0]["status"].as_str(), served.as_str()),
        (Some("pending_payment"), "replica")
    );
    cluster.start_replica_sql(0, 0).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_is_never_behind_an_acknowledged_write_after_redis_flushall() {
    cache_survives_redis_losing_its_keys(5353, RedisLoss::FlushAll).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_is_never_behind_an_acknowledged_write_after_redis_restarts_empty() {
    cache_survives_redis_losing_its_keys(5454, RedisLoss::RestartEmpty).await;
}

/// Another service process, Redis up, no token: the other process's reads (a cache miss of
/// the order, of the owner's first page, and an uncached page) see the write although the
/// replica lacks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_your_writes_across_processes_without_a_token() {
    let TwoProcesses {
        cluster,
        writer,
        reader,
        token,
        order,
        id,
    } = two_processes_and_an_order(5252).await;
    // The reader caches the first page while the order is unpaid.
    let (_, _, list) = read(&reader, &token, "/v1/orders", None).await;
    assert_eq!(list["orders"][0]["status"], "pending_payment");

    cluster.stop_replica_sql(0, 0).await.unwrap();
    pay_with_token(&writer, &order).await;
    evict(&writer, &id).await;
    let (s, served, o) = read(&reader, &token, &format!("/v1/orders/{id}"), None).await;
    assert_eq!(s, StatusCode::OK, "{o}");
    assert_eq!(
        (o["status"].as_str(), served.as_str()),
        (Some("awaiting_shipment"), "primary")
    );
    let (_, served, list) = read(&reader, &token, "/v1/orders", None).await;
    assert_eq!(
        (list["orders"][0]["status"].as_str(), served.as_str()),
        (Some("awaiting_shipment"), "primary")
    );
    let (_, served, list) = read(&reader, &token, "/v1/orders?limit=50", None).await;
    assert_eq!(
        (list["orders"][0]["status"].as_str(), served.as_str()),
        (Some("awaiting_shipment"), "primary")
    );
    // The replica does lag: an eventual read of it shows the unpaid order.
    let (_, served, list) = read(&reader, &token, "/v1/orders?consistency=eventual", None).await;
    assert_eq!(
        (list["orders"][0]["status"].as_str(), served.as_str()),
        (Some("pending_payment"), "replica")
    );
    cluster.start_replica_sql(0, 0).await.unwrap();
}

/// Readers on many connections while the replica is killed and restarted: no read fails;
/// before the kill the replica serves the reads (the split is real), during it the primary,
/// and after its restart it takes reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_replica_costs_no_failed_read_and_takes_reads_again() {
    let cluster = replicated_cluster().await;
    let app = Arc::new(
        TestApp::spawn_on(&cluster, |s| {
            // Every read reaches a database.
            s.cache.enabled = false;
        })
        .await,
    );
    until_replicas_in_rotation(&app).await;
    let catalog = app.catalog(&[10_000]).await;
    let user = 6161;
    let mut ids = Vec::new();
    for _ in 0..10 {
        let o = app.place_order(user, &[(&catalog.products[0], 1)]).await;
        ids.push(o["order_id"].as_str().unwrap().to_owned());
    }
    cluster
        .wait_replicas_caught_up(Duration::from_secs(20))
        .await
        .unwrap();

    // Phase 1: nothing written lately, every read on the replica.
    let counts = read_load(&app, user, &ids, Duration::from_secs(2), None).await;
    assert_eq!(counts.failed, 0);
    assert!(counts.replica > 50, "reads served by the replica: {counts:?}");
    assert_eq!(counts.primary, 0, "{counts:?}");

    // Phase 2: the replica is killed in the middle of the load.
    let kill = (&cluster, Duration::from_millis(700));
    let counts = read_load(&app, user, &ids, Duration::from_secs(3), Some(kill)).await;
    assert!(!cluster.replicas(0)[0].is_running());
    assert_eq!(counts.failed, 0, "a dead replica must cost no read: {counts:?}");
    assert!(counts.primary > 50, "the primary took over: {counts:?}");

    // Phase 3: restarted, it catches up and rejoins the rotation.
    cluster.start_replica(0, 0).await.unwrap();
    cluster
        .wait_replicas_caught_up(Duration::from_secs(20))
        .await
        .unwrap();
    until_replicas_in_rotation(&app).await;
    let counts = read_load(&app, user, &ids, Duration::from_secs(2), None).await;
    assert_eq!(counts.failed, 0);
    assert!(
        counts.replica > 50,
        "the restarted replica takes reads again: {counts:?}"
    );
}

#[derive(Debug, Default)]
struct Counts {
    replica: u64,
    primary: u64,
    failed: u64,
}

/// 8 readers, each on its own connection, reading orders and the list for `span`. With
/// `kill`, the replica is killed that long after the start.
async fn read_load(
    app: &Arc<TestApp>,
    user: i64,
    ids: &[String],
    span: Duration,
    kill: Option<(&LocalCluster, Duration)>,
) -> Counts {
    let (replica, primary, failed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let until = Instant::now() + span;
    let mut readers = Vec::new();
    for r in 0..8 {
        let (app, ids) = (app.clone(), ids.to_vec());
        let (replica, primary, failed) = (replica.clone(), primary.clone(), failed.clone());
        readers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let token = app.user_token(user);
            let mut i = r;
            while Instant::now() < until {
                let path = if i % 4 == 0 {
                    "/v1/orders".to_owned()
                } else {
                    format!("/v1/orders/{}", ids[i % ids.len()])
                };
                i += 1;
                let resp = client
                    .get(format!("{}{path}", app.base))
                    .bearer_auth(&token)
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status() == StatusCode::OK => {
                        match r.headers().get("served-by").and_then(|v| v.to_str().ok()) {
                            Some("replica") => replica.fetch_add(1, Ordering::Relaxed),
                            _ => primary.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    if let Some((cluster, after)) = kill {
        tokio::time::sleep(after).await;
        cluster.kill_replica(0, 0).unwrap();
    }
    for r in readers {
        r.await.unwrap();
    }
    Counts {
        replica: replica.load(Ordering::Relaxed),
        primary: primary.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
    }
}

/// Writers move orders through their life while the replica's applier is stopped and started
/// in bursts; after every acknowledged write, a read on another connection (detail and list)
/// must show at least that version. Zero stale reads, with the number of reads checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_your_writes_holds_under_bursts_of_replica_delay() {
    let cluster = Arc::new(replicated_cluster().await);
    let app = Arc::new(
        TestApp::spawn_on(&cluster, |s| {
            // Every read reaches a database: the replica path is what is under test.
            s.cache.enabled = false;
        })
        .await,
    );
    until_replicas_in_rotation(&app).await;
    let catalog = Arc::new(app.catalog(&[100_000]).await);
    let stop = Arc::new(AtomicBool::new(false));
    let burster = {
        let (cluster, stop) = (cluster.clone(), stop.clone());
        tokio::spawn(async move {
            let mut bursts = 0;
            while !stop.load(Ordering::SeqCst) {
                cluster.stop_replica_sql(0, 0).await.unwrap();
                tokio::time::sleep(Duration::from_millis(150)).await;
                cluster.start_replica_sql(0, 0).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
                bursts += 1;
            }
            bursts
        })
    };
    let (reads, stale, replica_reads) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut writers = Vec::new();
    for w in 0..4 {
        let (app, catalog) = (app.clone(), catalog.clone());
        let (reads, stale, replica_reads) = (reads.clone(), stale.clone(), replica_reads.clone());
        writers.push(tokio::spawn(async move {
            let user = 7000 + w;
            let token = app.user_token(user);
            let reader = reqwest::Client::new();
            let check = |version: i64, id: String| {
                let (app, token, reader) = (app.clone(), token.clone(), reader.clone());
                let (reads, stale, replica_reads) = (reads.clone(), stale.clone(), replica_reads.clone());
                async move {
                    for path in [format!("/v1/orders/{id}"), "/v1/orders?limit=50".to_owned()] {
                        let r = reader.get(format!("{}{path}", app.base)).bearer_auth(&token).send().await.unwrap();
                        assert_eq!(r.status(), StatusCode::OK);
                        if r.headers().get("served-by").is_some_and(|v| v == "replica") {
                            replica_reads.fetch_add(1, Ordering::Relaxed);
                        }
                        let body: Value = r.json().await.unwrap();
                        let seen = if path.contains("limit") {
                            body["orders"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .find(|o| o["order_id"] == id.as_str())
                                .map_or(0, |o| o["version"].as_i64().unwrap())
                        } else {
                            body["version"].as_i64().unwrap()
                        };
                        reads.fetch_add(1, Ordering::Relaxed);
                        if seen < version {
                            stale.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            };
            for _ in 0..6 {
                let order = app.place_order(user, &[(&catalog.products[0], 1)]).await;
                let id = order["order_id"].as_str().unwrap().to_owned();
                check(order["version"].as_i64().unwrap(), id.clone()).await;
                let (s, paid) = app.pay(&order).await;
                assert_eq!(s, StatusCode::OK, "{paid}");
                check(paid["version"].as_i64().unwrap(), id.clone()).await;
                let (s, shipped) = app
                    .call(
                        "POST",
                        &format!("/v1/orders/{id}/shipment"),
                        Some(&app.merchant_token(catalog.shop)),
                        Some(json!({"expected_version": paid["version"], "carrier": "SF", "tracking_number": "SF1"})),
                    )
                    .await;
                assert_eq!(s, StatusCode::OK, "{shipped}");
                check(shipped["version"].as_i64().unwrap(), id.clone()).await;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let bursts = burster.await.unwrap();
    cluster.start_replica_sql(0, 0).await.unwrap();
    let (reads, stale) = (reads.load(Ordering::Relaxed), stale.load(Ordering::Relaxed));
    assert_eq!(reads, 4 * 6 * 3 * 2, "every check ran");
    assert_eq!(stale, 0, "stale reads out of {reads}");
    assert!(bursts >= 2, "the replica was delayed in bursts ({bursts})");
    assert!(
        replica_reads.load(Ordering::Relaxed) > 0,
        "some reads were served by the replica (else the test proves nothing)"
    );
}

/// Reads on a replica that stopped answering (SIGSTOP: connections open, statements never
/// answered) are bounded: none waits longer than the replica's timeout plus a primary read,
/// and the reads of the other server's shards (each with its own replica, misses that need
/// the cache's fill permits) are not held up by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_replica_costs_a_bounded_wait_and_never_stalls_other_shards() {
    let cluster = LocalCluster::start(ClusterSpec {
        mariadb_servers: 2,
        replicas_per_server: 1,
        with_redis: true,
        ..ClusterSpec::default()
    })
    .await
    .expect("two servers with a replica each");
    const READ_TIMEOUT_MS: u64 = 500;
    let app = Arc::new(
        TestApp::spawn_on(&cluster, |s| {
            s.replicas.read_timeout_ms = READ_TIMEOUT_MS;
            // Fewer permits than the readers of the frozen server's orders: one shared bound
            // would be held entirely by their loads.
            s.cache.max_concurrent_fills = 4;
        })
        .await,
    );
    until_replicas_in_rotation(&app).await;
    let catalog = app.catalog(&[10_000]).await;
    let on = |database: usize, from: i64| {
        (from..)
            .find(|&u| {
                app.raw
                    .of_user(orderly::domain::ids::UserId::new(u).unwrap())
                    .database
                    == database
            })
            .unwrap()
    };
    let (frozen_user, other_user) = (on(0, 7100), on(1, 7100));
    let mut orders = std::collections::HashMap::new();
    for user in [frozen_user, other_user] {
        let mut ids = Vec::new();
        for _ in 0..16 {
            let o = app.place_order(user, &[(&catalog.products[0], 1)]).await;
            ids.push(o["order_id"].as_str().unwrap().to_owned());
        }
        orders.insert(user, ids);
    }
    cluster
        .wait_replicas_caught_up(Duration::from_secs(20))
        .await
        .unwrap();
    // Warm connections to both replicas (lists are never cached beyond the first page), so
    // the freeze meets open connections, not new ones (which the acquire timeout bounds).
    for user in [frozen_user, other_user] {
        for _ in 0..8 {
            let (_, served, _) = read(&app, &app.user_token(user), "/v1/orders?limit=50", None).await;
            assert_eq!(served, "replica");
        }
    }

    cluster.replica(0, 0).unwrap().pause().unwrap();
    let bound = Duration::from_millis(READ_TIMEOUT_MS + 50) + Duration::from_secs(3);
    let mut readers = Vec::new();
    for r in 0..32usize {
        let user = if r % 2 == 0 { frozen_user } else { other_user };
        let (app, id) = (app.clone(), orders[&user][r / 2].clone());
        readers.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap();
            let token = app.user_token(user);
            let mut slowest = Duration::ZERO;
            // A miss of an order nobody read yet (it needs a fill permit), then the list.
            for path in [format!("/v1/orders/{id}"), "/v1/orders?limit=50".to_owned()] {
                let began = Instant::now();
                let resp = client
                    .get(format!("{}{path}", app.base))
                    .bearer_auth(&token)
                    .send()
                    .await;
                let status = resp.map(|r| r.status()).map_err(|e| e.to_string());
                assert_eq!(status, Ok(StatusCode::OK), "{path}");
                slowest = slowest.max(began.elapsed());
            }
            (user, slowest)
        }));
    }
    let mut slowest = std::collections::HashMap::new();
    for r in readers {
        let (user, took) = r.await.expect("a reader failed");
        let s = slowest.entry(user).or_insert(Duration::ZERO);
        *s = (*s).max(took);
    }
    cluster.replica(0, 0).unwrap().resume().unwrap();
    assert!(
        slowest[&frozen_user] < bound,
        "a read of the frozen replica's server waited {:?}",
        slowest[&frozen_user]
    );
    assert!(
        slowest[&other_user] < Duration::from_secs(3),
        "a read of the other server waited {:?}",
        slowest[&other_user]
    );
}

/// A replica's lag is known only from the primary's position: when the primary's position
/// cannot be read, the replica leaves the rotation (unknown lag is not small lag); and the
/// probe reads it over a connection of its own, so a request pool exhausted by writes does
/// not blind it (a replica that stopped applying is then seen lagging and leaves).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_whose_lag_cannot_be_measured_leaves_the_rotation() {
    use orderly::domain::consistency::DatabaseRef;
    use orderly::storage::replicas::Database;
    use sqlx::Connection;
    let cluster = replicated_cluster().await;
    let primary = cluster.mariadb(0);
    let replica = cluster.replica(0, 0).unwrap();
    let mut settings = Settings::defaults();
    settings.database.max_connections = 2;
    settings.database.acquire_timeout_ms = 5_000;
    settings.replicas.max_lag_ms = 300;
    settings.replicas.probe_timeout_ms = 300;
    let db = Database::connect(
        "probe-test",
        DatabaseRef::Shards(0),
        &primary.url("mysql"),
        &[replica.url("mysql")],
        &settings.database,
        &settings.replicas,
    )
    .await
    .unwrap();
    db.probe().await;
    assert_eq!(db.replicas_in_rotation(), 1, "a healthy replica is in rotation");

    // Every request connection of the primary is busy, the replica stops applying, and the
    // primary keeps writing (from outside this process).
    let held = [
        db.write().acquire().await.unwrap(),
        db.write().acquire().await.unwrap(),
    ];
    cluster.stop_replica_sql(0, 0).await.unwrap();
    let mut admin = sqlx::MySqlConnection::connect(&primary.admin_url())
        .await
        .unwrap();
    sqlx::query("CREATE DATABASE IF NOT EXISTS probe_writes")
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE IF NOT EXISTS probe_writes.t (n INT)")
        .execute(&mut admin)
        .await
        .unwrap();
    for _ in 0..5 {
        sqlx::query("INSERT INTO probe_writes.t VALUES (1)")
            .execute(&mut admin)
            .await
            .unwrap();
        db.probe().await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    db.probe().await;
    assert_eq!(
        db.replicas_in_rotation(),
        0,
        "a replica that stopped applying leaves, although the request pool is exhausted"
    );
    drop(held);
    cluster.start_replica_sql(0, 0).await.unwrap();
    cluster
        .wait_replicas_caught_up(Duration::from_secs(20))
        .await
        .unwrap();
    db.probe().await;
    assert_eq!(db.replicas_in_rotation(), 1, "caught up: back in rotation");

    // The primary stops answering: the replica's lag cannot be measured any more.
    primary.pause().unwrap();
    db.probe().await;
    let in_rotation = db.replicas_in_rotation();
    primary.resume().unwrap();
    assert_eq!(in_rotation, 0, "unknown lag must not keep a replica in rotation");
}
