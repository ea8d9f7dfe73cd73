//! SPEC 2.8, 2.5 and 2.11 end to end, against the real `orderly serve` binary (a child
//! process) under a create-and-pay load: the service killed with SIGKILL and started again,
//! Redis killed and restarted, NATS killed and restarted, the shard primary killed and
//! restarted. Afterwards every acknowledged create and payment is readable as acknowledged,
//! and once the sweeper ran the stock is conserved. No answer is ever a 500; while Redis or
//! NATS is down none is a 5xx at all (slower, not failing); while the shard server is down a
//! refusal is a 503.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use chrono::Utc;
use orderly_testkit::cluster::{ClusterSpec, LocalCluster};
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::TestApp;

/// What the cluster is going through while an answer arrives.
/// Ordered by what a refusal may be while it lasts (the later, the more is allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
enum Phase {
    Steady = 0,
    ServeKilled = 1,
    RedisDown = 2,
    NatsDown = 3,
    DatabaseDown = 4,
}

impl Phase {
    fn from(n: u8) -> Phase {
        match n {
            1 => Phase::ServeKilled,
            2 => Phase::RedisDown,
            3 => Phase::NatsDown,
            4 => Phase::DatabaseDown,
            _ => Phase::Steady,
        }
    }
}

struct Serve {
    child: Child,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `orderly serve` on `port` with the settings file `config`, once it answers `/healthz`.
async fn start_serve(config: &Path, port: u16, log: &Path) -> Serve {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_orderly"))
        .arg("--config")
        .arg(config)
        .arg("serve")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("orderly serve starts");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "orderly serve did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Serve { child }
}

#[derive(Default)]
struct Tally {
    created: Mutex<Vec<(i64, String)>>,
    paid: Mutex<Vec<String>>,
    /// Every 5xx answer: (phase, status, body).
    failures: Mutex<Vec<(Phase, u16, String)>>,
}

/// The pause of a client after a refusal or a connection that failed.
const PAUSE: Duration = Duration::from_millis(50);

/// A load client: posts, and notes every 5xx with the phase it counts under.
struct Poster {
    client: reqwest::Client,
    base: String,
    phase: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
}

impl Poster {
    fn phase(&self) -> Phase {
        Phase::from(self.phase.load(Ordering::SeqCst))
    }

    /// The answer (`None`: no answer, the connection failed). A 5xx counts under the phase it
    /// was asked in, or the one it arrived in if that allows more (a refusal of a dependency
    /// that went down meanwhile).
    async fn post(
        &self,
        path: &str,
        token: &str,
        body: Option<&serde_json::Value>,
    ) -> Option<(StatusCode, serde_json::Value)> {
        let asked = self.phase();
        let mut req = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(body) = body {
            req = req.json(body);
        }
        let r = req.send().await.ok()?;
        let at = std::cmp::max(asked, self.phase());
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        if status.is_server_error() {
            self.tally
                .failures
                .lock()
                .unwrap()
                .push((at, status.as_u16(), body.to_string()));
        }
        Some((status, body))
    }

    /// Posts until a 2xx (its body) or a 4xx (`None`), as a client retrying the same request
    /// would; gives up after 40 attempts or when the load stops.
    async fn until_answered(
        &self,
        path: &str,
        token: &str,
        body: &serde_json::Value,
    ) -> Option<serde_json::Value> {
        for _ in 0..40 {
            match self.post(path, token, Some(body)).await {
                Some((s, answer)) if s.is_success() => return Some(answer),
                Some((s, _)) if s.is_client_error() => return None,
                _ => {}
            }
            if self.stop.load(Ordering::SeqCst) {
                return None;
            }
            tokio::time::sleep(PAUSE).await;
        }
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow group: .ci/run runs it (cargo test --test api -- --ignored)"]
async fn acknowledged_writes_survive_the_service_and_its_dependencies_killed_under_load() {
    let cluster = LocalCluster::start(ClusterSpec::default()).await.unwrap();
    let app = TestApp::spawn_on(&cluster, |_| {}).await;
    const STOCK: i64 = 1_000_000;
    let cat = app.catalog(&[STOCK]).await;
    let product = cat.products[0].clone();

    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut settings = app.settings.clone();
    settings.server.listen = ([127, 0, 0, 1], port).into();
    settings.search.enabled = false;
    let config = dir.path().join("serve.toml");
    std::fs::write(&config, toml::to_string(&settings).unwrap()).unwrap();
    let log = dir.path().join("serve.log");
    let mut serve = Some(start_serve(&config, port, &log).await);
    let base = format!("http://127.0.0.1:{port}");

    let phase = Arc::new(AtomicU8::new(Phase::Steady as u8));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut workers = Vec::new();
    for w in 0..8_i64 {
        let poster = Poster {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .unwrap(),
            base: base.clone(),
            phase: phase.clone(),
            stop: stop.clone(),
            tally: tally.clone(),
        };
        let product = product.clone();
        let (user, user_token, service_token) = (97_000 + w, app.user_token(97_000 + w), app.service_token());
        workers.push(tokio::spawn(async move {
            while !poster.stop.load(Ordering::SeqCst) {
                let Some((_, ids)) = poster.post("/v1/order-ids", &user_token, None).await else {
                    tokio::time::sleep(PAUSE).await;
                    continue;
                };
                let Some(id) = ids["order_id"].as_str().map(str::to_owned) else {
                    tokio::time::sleep(PAUSE).await;
                    continue;
                };
                // The create, retried with its id until it is answered (a client's retry).
                let create = TestApp::order_body(&id, &[(&product, 1)]);
                let Some(order) = poster.until_answered("/v1/orders", &user_token, &create).await else {
                    continue;
                };
                poster.tally.created.lock().unwrap().push((user, id.clone()));
                let pay = json!({"transaction_no": format!("tx-{id}"), "channel": "alipay", "amount": order["pay_amount"]});
                let path = format!("/v1/orders/{id}/payments");
                if poster.until_answered(&path, &service_token, &pay).await.is_some() {
                    poster.tally.paid.lock().unwrap().push(id.clone());
                }
            }
        }));
    }
    let set = |p: Phase| phase.store(p as u8, Ordering::SeqCst);
    let run = |secs: u64| tokio::time::sleep(Duration::from_millis(secs * 1000));

    run(2).await;
    // The service itself, killed with SIGKILL mid-load and started again.
    set(Phase::ServeKilled);
    drop(serve.take());
    serve = Some(start_serve(&config, port, &log).await);
    run(2).await;
    set(Phase::Steady);
    run(1).await;
    // Redis: slower, not failing.
    set(Phase::RedisDown);
    cluster.kill_redis().unwrap();
    run(2).await;
    cluster.start_redis_empty().await.unwrap();
    run(1).await;
    set(Phase::Steady);
    run(1).await;
    // NATS: the outbox grows, nothing waits for it.
    set(Phase::NatsDown);
    cluster.kill_nats().unwrap();
    run(2).await;
    cluster.start_nats().await.unwrap();
    run(1).await;
    set(Phase::Steady);
    run(1).await;
    // The shard server (which holds the commerce database too): 503s, then recovery.
    set(Phase::DatabaseDown);
    cluster.kill_mariadb(0).unwrap();
    run(2).await;
    cluster.start_mariadb(0).await.unwrap();
    run(4).await;
    set(Phase::Steady);
    run(2).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }

    let failures = tally.failures.lock().unwrap().clone();
    let log_tail = std::fs::read_to_string(&log).unwrap_or_default();
    for (at, status, body) in &failures {
        assert_ne!(*status, 500, "a 500 while {at:?}: {body}");
        assert!(
            !matches!(at, Phase::RedisDown | Phase::NatsDown | Phase::Steady),
            "a {status} while {at:?}: {body}"
        );
        assert!(
            *at == Phase::ServeKilled || *status == 503,
            "a {status} while {at:?}: {body}"
        );
    }
    let created = tally.created.lock().unwrap().clone();
    let paid = tally.paid.lock().unwrap().clone();
    // The test's own pools met the database's restart too: each failed use drops a dead
    // connection.
    for _ in 0..20 {
        let _ = sqlx::query("SELECT 1").execute(&app.commerce).await;
        let _ = app.call("GET", "/readyz", None, None).await;
        let _ = app
            .app
            .orders
            .sweep_once(Utc::now(), Duration::from_secs(3600), 1)
            .await;
    }
    eprintln!(
        "chaos: {} creates and {} payments acknowledged, {} answers 5xx (all allowed)",
        created.len(),
        paid.len(),
        failures.len()
    );
    assert!(
        created.len() > 50,
        "too little load went through: {} creates",
        created.len()
    );
    // Every acknowledged create and payment reads as acknowledged, from the primary.
    for (user, id) in &created {
        let (s, o) = app
            .call(
                "GET",
                &format!("/v1/orders/{id}?consistency=strong"),
                Some(&app.user_token(*user)),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "acknowledged create {id}: {o}");
        if paid.contains(id) {
            assert_eq!(
                o["status"], "awaiting_shipment",
                "acknowledged payment of {id}: {o}"
            );
        }
    }
    // Once the sweeper settled the claims of creates that never wrote their order, every
    // unit is in a standing order or back in stock.
    let out = app
        .app
        .orders
        .sweep_once(
            Utc::now() + chrono::TimeDelta::minutes(5),
            Duration::ZERO,
            100_000,
        )
        .await
        .unwrap();
    assert_eq!(out.failed, 0, "{out:?}");
    let orders = app.count_shard_rows("orders").await;
    assert_eq!(
        app.stock_of(&product).await + orders,
        STOCK,
        "stock conserved: every unit in one of the {orders} orders or back ({out:?}); serve's log:\n{}",
        &log_tail[log_tail.len().saturating_sub(4000)..]
    );
    drop(serve);
}
