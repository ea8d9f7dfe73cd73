//! Operations of every long-running process: the admin listener (`server.admin_listen`) of a
//! relay running on its own, readiness that names what fails within its timeout, the two
//! phases of `serve`'s shutdown (unready first, still serving; then stop), and the projection
//! lag read from JetStream.

use std::time::{Duration, Instant};

use chrono::Utc;
use orderly::app::{Application, RelayProcess};
use orderly::events::consumer::{self, StartAt};
use orderly::events::merchant::MerchantCopy;
use orderly::events::Broker;
use orderly::storage::merchant::MerchantMap;
use reqwest::StatusCode;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::helpers::{app_with_own_archive, free_port, orderly_command, TestApp};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn get_json(url: &str) -> (StatusCode, Value) {
    let r = client().get(url).send().await.expect("request");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn scrape(base: &str) -> String {
    let r = client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(r.status(), StatusCode::OK);
    r.text().await.unwrap()
}

/// The value of the sample of `series` whose labels contain `label` (`None`: no such line).
fn value(text: &str, series: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{series}{{")) || l.starts_with(&format!("{series} ")))
        .find(|l| l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The databases a relay of `app` relays: every shard database, then the archive.
fn relayed(app: &TestApp) -> Vec<String> {
    app.settings
        .shards
        .databases
        .iter()
        .map(|d| d.name.clone())
        .chain(["archive".to_owned()])
        .collect()
}

/// `orderly relay` as its own process, the way it runs in production: the recorder is its
/// own, so its relay gauges, its build info and its process series are on its admin
/// listener or nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_a_relay_on_its_own_is_scraped_and_probed_on_its_admin_listener() {
    // The app serves without a relay: the process under test is the only one.
    let app = TestApp::spawn_with(|s| s.events.relay = false).await;
    let cat = app.catalog(&[100]).await;
    for user in 1..=3 {
        app.place_order(user, &[(&cat.products[0], 1)]).await;
    }
    assert_eq!(app.outbox_rows().await, 3);
    let mut settings = app.settings.clone();
    let port = free_port();
    settings.server.admin_listen = Some(([127, 0, 0, 1], port).into());
    let (mut command, _dir) = orderly_command(&settings);
    let mut child = command.arg("relay").spawn().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let up = Instant::now();
    while client().get(format!("{base}/livez")).send().await.is_err() {
        assert!(
            up.elapsed() < Duration::from_secs(30),
            "orderly relay's admin listener did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.wait_outbox_drained(Duration::from_secs(30)).await;

    // Every relayed database's lock held here, its outbox drained to 0.
    let databases = relayed(&app);
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = scrape(&base).await;
        let settled = databases.iter().all(|db| {
            let label = format!("database=\"{db}\"");
            value(&text, "orderly_relay_active", &label) == Some(1.0)
                && value(&text, "orderly_outbox_backlog_events", &label) == Some(0.0)
        });
        if settled {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the relay's gauges of {databases:?} never settled:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    assert_eq!(value(&text, "orderly_build_info", &version), Some(1.0), "{text}");
    assert!(
        value(&text, "process_resident_memory_bytes", "").is_some_and(|b| b > 0.0),
        "no process series:\n{text}"
    );
    assert!(
        value(&text, "orderly_events_published_total", "database=").is_some(),
        "{text}"
    );

    let (s, ready) = get_json(&format!("{base}/readyz")).await;
    assert_eq!(s, StatusCode::OK, "{ready}");
    assert_eq!(ready["status"], "ready");
    for check in ["nats", "archive", "shards:orders0", "shards:orders1"] {
        assert_eq!(ready["checks"][check], true, "{check}: {ready}");
    }
    let (s, live) = get_json(&format!("{base}/healthz")).await;
    assert_eq!((s, live["status"].as_str()), (StatusCode::OK, Some("ok")));

    let pid = child.id().unwrap() as i32;
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("orderly relay did not exit after SIGTERM")
        .unwrap();
    let mut log = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut log).await;
    }
    assert!(status.success(), "exit {status:?}; log:\n{log}");
}

/// A relay's readiness: a database that hangs (its server frozen) is named `timed_out` and
/// the probe answers within about the timeout, the others still pass; NATS that does not
/// answer is named `failed`. The process stays live throughout, and ready again once the
/// database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_readiness_names_the_check_that_hangs_or_fails_within_its_timeout() {
    const TIMEOUT_MS: u64 = 500;
    let (own, app) = app_with_own_archive(|s| s.events.relay = false).await;
    let mut settings = app.settings.clone();
    settings.server.admin_listen = Some(([127, 0, 0, 1], 0).into());
    settings.server.readiness_timeout_ms = TIMEOUT_MS;
    let token = CancellationToken::new();
    let relay = RelayProcess::build(&settings, token.clone())
        .await
        .expect("relay");
    let base = format!("http://{}", relay.admin_address().expect("an admin listener"));
    let running = tokio::spawn(relay.run());

    let (s, ready) = get_json(&format!("{base}/readyz")).await;
    assert_eq!(s, StatusCode::OK, "{ready}");
    assert_eq!(ready["checks"]["archive"], true);

    own.pause_mariadb(0).unwrap();
    // Probes share a verdict for 100 ms (a flood of them costs one round of checks).
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    let (s, unready) = get_json(&format!("{base}/readyz")).await;
    let took = started.elapsed();
    let (live, _) = get_json(&format!("{base}/livez")).await;
    own.resume_mariadb(0).unwrap();
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{unready}");
    assert_eq!(unready["status"], "unready");
    assert_eq!(unready["failing"], serde_json::json!(["archive"]), "{unready}");
    assert_eq!(unready["checks"]["archive"], "timed_out");
    assert_eq!(unready["checks"]["shards:orders0"], true, "{unready}");
    assert_eq!(unready["checks"]["nats"], true, "{unready}");
    assert!(
        took >= Duration::from_millis(TIMEOUT_MS) && took < Duration::from_millis(TIMEOUT_MS + 1000),
        "the probe took {took:?} with a timeout of {TIMEOUT_MS} ms"
    );
    assert_eq!(live, StatusCode::OK, "liveness looks at no dependency");

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, ready) = get_json(&format!("{base}/readyz")).await;
        if s == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "never ready again: {ready}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A relay whose NATS does not answer.
    let mut no_nats = settings.clone();
    no_nats.events.nats_url = format!("nats://127.0.0.1:{}", free_port());
    let other = RelayProcess::build(&no_nats, token.clone())
        .await
        .expect("relay without NATS");
    let other_base = format!("http://{}", other.admin_address().expect("an admin listener"));
    let other_running = tokio::spawn(other.run());
    let (s, unready) = get_json(&format!("{other_base}/readyz")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{unready}");
    assert_eq!(unready["failing"], serde_json::json!(["nats"]), "{unready}");
    assert_ne!(unready["checks"]["nats"], true);

    token.cancel();
    for run in [running, other_running] {
        tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("the relay stops at the token")
            .unwrap()
            .unwrap();
    }
}

/// SIGTERM (the token) first turns `/readyz` to 503 `shutting_down`, on the API port and the
/// admin listener, while requests are still served (ids too: the worker id is still held);
/// only after `server.shutdown_delay_ms` does the listener stop accepting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_shutdown_turns_unready_first_and_serves_on_for_the_delay() {
    const DELAY: Duration = Duration::from_millis(3000);
    let app = TestApp::spawn().await;
    let mut settings = app.settings.clone();
    settings.server.listen = ([127, 0, 0, 1], 0).into();
    settings.server.admin_listen = Some(([127, 0, 0, 1], 0).into());
    settings.server.shutdown_delay_ms = DELAY.as_millis() as u64;
    let token = CancellationToken::new();
    let second = Application::build(settings, token.clone())
        .await
        .expect("second process");
    let base = format!("http://{}", second.address());
    let admin = format!("http://{}", second.admin_address().expect("an admin listener"));
    let running = tokio::spawn(second.run());

    for b in [&base, &admin] {
        let (s, ready) = get_json(&format!("{b}/readyz")).await;
        assert_eq!(s, StatusCode::OK, "{b}: {ready}");
        assert_eq!(ready["checks"]["lease"], true, "{ready}");
    }
    let (s, _) = get_json(&format!("{admin}/livez")).await;
    assert_eq!(s, StatusCode::OK);
    let text = scrape(&admin).await;
    for series in [
        "orderly_build_info",
        "orderly_lease_valid",
        "orderly_http_requests_in_flight",
        "process_cpu_seconds_total",
    ] {
        assert!(value(&text, series, "").is_some(), "no {series} in:\n{text}");
    }
    // The API port keeps its probes and its scrape.
    assert!(scrape(&base).await.contains("orderly_build_info"));

    let asked = Instant::now();
    token.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for b in [&base, &admin] {
        let (s, body) = get_json(&format!("{b}/readyz")).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}: {body}");
        assert_eq!(body["status"], "shutting_down");
    }
    let id = client()
        .post(format!("{base}/v1/order-ids"))
        .bearer_auth(app.user_token(7))
        .send()
        .await
        .expect("still accepting during the delay");
    assert_eq!(id.status(), StatusCode::CREATED, "ids are still issued");
    let (s, _) = get_json(&format!("{base}/healthz")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        asked.elapsed() < DELAY,
        "the checks above outlasted the delay: inconclusive"
    );

    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("serve stops after the delay and the drain")
        .unwrap()
        .unwrap();
    assert!(asked.elapsed() >= DELAY, "stopped after {:?}", asked.elapsed());
    assert!(
        client().get(format!("{base}/healthz")).send().await.is_err(),
        "the listener is closed once serve returned"
    );
}

/// `orderly_projection_lag_seconds` reads the oldest event a projection's durable consumer
/// has not acknowledged, from JetStream: none before anything happened, the order's event
/// (by its commit time) while nobody applies it, none again once it is applied.
#[tokio::test]
async fn admin_projection_lag_is_the_age_of_the_oldest_event_not_applied() {
    // Nobody consumes the merchant copy but the test.
    let app = TestApp::spawn_with(|s| s.merchant.consume = false).await;
    let broker = Broker::connect(&app.settings.events).await.expect("nats");
    let name = orderly::storage::merchant::PROJECTION;
    let durable = consumer::durable(&broker, name, StartAt::Beginning)
        .await
        .unwrap();
    assert_eq!(consumer::oldest_unapplied(&broker, name).await.unwrap(), None);

    let cat = app.catalog(&[10]).await;
    let before = Utc::now();
    app.place_order(1, &[(&cat.products[0], 1)]).await;
    let placed = Utc::now();
    app.wait_outbox_drained(Duration::from_secs(20)).await;
    let oldest = consumer::oldest_unapplied(&broker, name)
        .await
        .unwrap()
        .expect("the order's event waits");
    assert!(
        oldest >= before - chrono::TimeDelta::seconds(1) && oldest <= placed,
        "{oldest} is not the order's commit time ({before} .. {placed})"
    );

    let map = MerchantMap::connect(&app.settings.merchant, &app.settings.database)
        .await
        .unwrap();
    let applied = consumer::drain(&durable, &MerchantCopy::new(map), 100)
        .await
        .unwrap();
    assert_eq!(applied, 1);
    assert_eq!(consumer::oldest_unapplied(&broker, name).await.unwrap(), None);
}
