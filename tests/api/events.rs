//! SPEC 6: every order change leaves one event in the outbox of its shard, in the same
//! transaction; the relay publishes each to NATS JetStream once (deduplicated by event id),
//! whatever dies in between.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use orderly::domain::events::{EventKind, OrderEvent};
use orderly::events::relay;
use orderly::events::Broker;
use orderly_testkit::cluster::{ClusterSpec, LocalCluster};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::TestApp;

/// Events by order id, in stream order.
fn by_order(events: &[OrderEvent]) -> BTreeMap<i64, Vec<&OrderEvent>> {
    let mut m: BTreeMap<i64, Vec<&OrderEvent>> = BTreeMap::new();
    for e in events {
        m.entry(e.order.order_id).or_default().push(e);
    }
    m
}

fn assert_unique(events: &[OrderEvent]) {
    let mut seen = HashSet::new();
    for e in events {
        assert!(
            seen.insert(&e.event_id),
            "event {} in the stream twice",
            e.event_id
        );
    }
}

async fn post(app: &TestApp, path: &str, token: &str, body: Value) -> Value {
    let (s, b) = app.call("POST", path, Some(token), Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{path}: {b}");
    b
}

#[tokio::test]
async fn every_order_write_leaves_one_event_that_the_relay_publishes_once() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[100, 100]).await;
    let user = 4242;
    let token = app.user_token(user);
    let merchant = app.merchant_token(cat.shop);
    let service = app.service_token();

    // Created, paid, shipped, completed.
    let a = app
        .place_order(user, &[(&cat.products[0], 2), (&cat.products[1], 1)])
        .await;
    let a_id = a["order_id"].as_str().unwrap().to_owned();
    assert_eq!(app.pay(&a).await.0, StatusCode::OK);
    post(
        &app,
        &format!("/v1/orders/{a_id}/shipment"),
        &merchant,
        json!({"expected_version": 2, "carrier": "SF", "tracking_number": "SF777"}),
    )
    .await;
    post(
        &app,
        &format!("/v1/orders/{a_id}/confirm"),
        &token,
        json!({"expected_version": 3}),
    )
    .await;

    // Created, changed, closed.
    let b = app.place_order(user, &[(&cat.products[0], 1)]).await;
    let b_id = b["order_id"].as_str().unwrap().to_owned();
    let (s, _) = app
        .call(
            "PATCH",
            &format!("/v1/orders/{b_id}"),
            Some(&token),
            Some(json!({"expected_version": 1, "remark": "ring twice"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    post(
        &app,
        &format!("/v1/orders/{b_id}/cancel"),
        &token,
        json!({"expected_version": 2, "reason": "changed my mind"}),
    )
    .await;

    // Created, paid, refunded (in full: closed).
    let c = app.place_order(user, &[(&cat.products[1], 3)]).await;
    let c_id = c["order_id"].as_str().unwrap().to_owned();
    assert_eq!(app.pay(&c).await.0, StatusCode::OK);
    post(
        &app,
        &format!("/v1/orders/{c_id}/refunds"),
        &service,
        json!({"refund_no": format!("rf-{c_id}"), "amount": c["pay_amount"], "reason": "broken"}),
    )
    .await;

    // A write that commits nothing leaves no event: a stale version.
    let (s, _) = app
        .call(
            "POST",
            &format!("/v1/orders/{a_id}/confirm"),
            Some(&token),
            Some(json!({"expected_version": 3})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);

    // Created only, with text that JSON escapes.
    let d = app
        .place_order(user, &[(&cat.products[0], 1), (&cat.products[1], 2)])
        .await;
    let d_id = d["order_id"].as_str().unwrap().to_owned();

    app.wait_outbox_drained(Duration::from_secs(20)).await;
    let events = app.stream_events().await;
    assert_unique(&events);
    let orders = by_order(&events);
    let kinds = |id: &str| -> Vec<(i64, EventKind)> {
        orders[&id.parse::<i64>().unwrap()]
            .iter()
            .map(|e| (e.order.version, e.kind))
            .collect()
    };
    use EventKind::*;
    assert_eq!(
        kinds(&a_id),
        vec![(1, Created), (2, Paid), (3, Shipped), (4, Completed)]
    );
    assert_eq!(kinds(&b_id), vec![(1, Created), (2, Changed), (3, Closed)]);
    assert_eq!(kinds(&c_id), vec![(1, Created), (2, Paid), (3, Refunded)]);
    assert_eq!(kinds(&d_id), vec![(1, Created)]);
    assert_eq!(orders.len(), 4, "no event of another order");

    // A create's event is built in the process from what it inserted: it is the snapshot
    // the database builds from the order's rows.
    let d_order: i64 = d_id.parse().unwrap();
    let shard = app
        .raw
        .of_order(orderly::domain::ids::OrderId::new(d_order).unwrap());
    let built: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT {} FROM {} o WHERE o.order_id = ?",
        orderly::storage::outbox::snapshot_json(&shard.tables),
        shard.tables.orders
    )))
    .bind(d_order)
    .fetch_one(app.raw.primary(shard))
    .await
    .unwrap();
    let built: orderly::domain::events::OrderSnapshot = serde_json::from_str(&built).unwrap();
    assert_eq!(orders[&d_order][0].order, built);

    // Each snapshot is the order as it committed at that version.
    let a_events = &orders[&a_id.parse::<i64>().unwrap()];
    let created = &a_events[0].order;
    assert_eq!((created.status, created.shop_id), (0, cat.shop.get()));
    assert_eq!(created.units(), 3);
    assert_eq!(created.items.len(), 2);
    assert!(created.payments.is_empty() && created.tracking_number.is_none());
    let last = &a_events[3].order;
    assert_eq!(last.tracking_number.as_deref(), Some("SF777"));
    assert_eq!(last.paid_and_refunded(), (a["pay_amount"].as_i64().unwrap(), 0));
    assert!(last.completed_at.is_some());
    let (_, now) = app.get_order(user, &a_id).await;
    assert_eq!(last.version, now["version"].as_i64().unwrap());
    assert_eq!(last.status, now["status_code"].as_i64().unwrap());
    let b_last = &orders[&b_id.parse::<i64>().unwrap()][2].order;
    assert_eq!((b_last.status, b_last.remark.as_str()), (4, "ring twice"));
    let c_last = &orders[&c_id.parse::<i64>().unwrap()][2].order;
    let paid = c["pay_amount"].as_i64().unwrap();
    assert_eq!((c_last.status, c_last.paid_and_refunded()), (4, (paid, paid)));
}

#[tokio::test]
async fn a_relay_killed_after_publishing_and_before_deleting_duplicates_nothing() {
    let app = TestApp::spawn_with(|s| s.events.relay = false).await;
    let cat = app.catalog(&[100]).await;
    let mut placed = Vec::new();
    for user in 1..=6 {
        placed.push(app.place_order(user, &[(&cat.products[0], 1)]).await);
    }
    for o in &placed[..2] {
        assert_eq!(app.pay(o).await.0, StatusCode::OK);
    }
    assert_eq!(app.outbox_rows().await, 8);

    let broker = Broker::connect(&app.settings.events).await.expect("nats");
    let mut published = 0;
    for db in app.raw.databases() {
        let mut conn = db.acquire().await.unwrap().detach();
        assert!(relay::try_lock(&mut conn).await.unwrap());
        // The relay publishes, the broker acknowledges, and the relay dies before deleting.
        let (acked, r) = relay::publish_pending(&mut conn, &broker, 100).await.unwrap();
        assert_eq!((r.duplicates, r.failed), (0, None));
        published += acked.len();
        drop(conn);
    }
    assert_eq!(published, 8);
    assert_eq!(app.outbox_rows().await, 8, "nothing was deleted");

    // The next relay publishes them all again; the stream drops every copy.
    let mut again = relay::Relayed::default();
    for db in app.raw.databases() {
        let mut conn = db.acquire().await.unwrap().detach();
        assert!(relay::try_lock(&mut conn).await.unwrap());
        let r = relay::relay_once(&mut conn, &broker, 100).await.unwrap();
        assert_eq!(r.failed, None);
        again.published += r.published;
        again.duplicates += r.duplicates;
    }
    assert_eq!(
        again,
        relay::Relayed {
            published: 8,
            duplicates: 8,
            failed: None,
        }
    );
    assert_eq!(app.outbox_rows().await, 0);
    let events = app.stream_events().await;
    assert_unique(&events);
    assert_eq!(events.len(), 8);

    // The merchant copy and the reports counted each order and payment once.
    let want: HashMap<i64, i64> = placed
        .iter()
        .enumerate()
        .map(|(i, o)| {
            (
                o["order_id"].as_str().unwrap().parse().unwrap(),
                if i < 2 { 2 } else { 1 },
            )
        })
        .collect();
    app.wait_copy(&want, Duration::from_secs(20)).await;
    let paid: i64 = placed[..2]
        .iter()
        .map(|o| o["pay_amount"].as_i64().unwrap())
        .sum();
    let reports = app.merchant_reports().await;
    assert_eq!(reports.len(), 1, "{reports:?}");
    let figures: Vec<i64> = reports[0]
        .split(',')
        .skip(2)
        .map(|f| f.parse().unwrap())
        .collect();
    // orders, units, gross, discounts, paid, refunded, then by status.
    assert_eq!((figures[0], figures[1], figures[4], figures[5]), (6, 6, paid, 0));
    assert_eq!((figures[6], figures[7]), (4, 2), "4 unpaid, 2 paid");

    // The search index holds each order once, at its latest version.
    let admin = app.admin_token();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (s, found) = app
            .call("GET", "/v1/search/orders?q=product&limit=100", Some(&admin), None)
            .await;
        assert_eq!(s, StatusCode::OK, "{found}");
        let got: HashMap<i64, i64> = found["orders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["order_id"].as_str().unwrap().parse().unwrap(),
                    o["version"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            found["orders"].as_array().unwrap().len(),
            got.len(),
            "an order twice: {found}"
        );
        if got == want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the index never matched: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn one_relay_per_database_holds_the_lock() {
    let app = TestApp::spawn_with(|s| s.events.relay = false).await;
    let db = &app.raw.databases()[0];
    let mut first = db.acquire().await.unwrap().detach();
    let mut second = db.acquire().await.unwrap().detach();
    assert!(relay::try_lock(&mut first).await.unwrap());
    assert!(
        !relay::try_lock(&mut second).await.unwrap(),
        "a second relay waits"
    );
    // The holder's session ends (its process died): the next relay takes over.
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !relay::try_lock(&mut second).await.unwrap() {
        assert!(std::time::Instant::now() < deadline, "the lock was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sum of the samples of `series` in the app's `GET /metrics` whose labels hold every one
/// of `labels` (0 when there is none).
async fn metric(app: &TestApp, series: &str, labels: &[&str]) -> f64 {
    let text = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{series}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// Polls `metric` until `done` holds for it, at most `within`; answers the last value.
async fn wait_metric(
    app: &TestApp,
    series: &str,
    labels: &[&str],
    within: Duration,
    what: &str,
    done: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = std::time::Instant::now() + within;
    loop {
        let v = metric(app, series, labels).await;
        if done(v) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {series}{labels:?} is {v} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Renames the app's shard databases with `tag`: metric labels carry the database name, and
/// every app of this test process renders the same recorder.
fn tag_databases(s: &mut orderly::config::Settings, tag: &str) {
    for d in &mut s.shards.databases {
        d.name = format!("{tag}_{}", d.name);
    }
}

#[tokio::test]
async fn orders_go_on_through_a_long_nats_outage_whose_backlog_shows_and_no_event_is_lost() {
    // A broker of the test's own: killing the shared one would stall the other tests' relays.
    let own = LocalCluster::start(ClusterSpec {
        mariadb_servers: 0,
        with_redis: false,
        with_nats: true,
        ..ClusterSpec::default()
    })
    .await
    .expect("nats");
    let nats_url = own.nats_url().unwrap();
    let app = Arc::new(
        TestApp::spawn_with(|s| {
            s.events.nats_url = nats_url;
            s.events.retry_ms = 100;
            s.events.publish_timeout_ms = 500;
            tag_databases(s, "outage");
        })
        .await,
    );
    let ours = r#"database="outage_"#;
    let cat = app.catalog(&[1_000_000]).await;
    let product = cat.products[0].clone();

    // Eight buyers place orders and pay every other one, until told to stop, while the broker
    // dies and stays away long enough for the NATS client's own buffer to fill.
    const AT_LEAST: usize = 10;
    let stop = Arc::new(AtomicBool::new(false));
    let down = Arc::new(AtomicBool::new(false));
    let mut buyers = Vec::new();
    for user in 1..=8i64 {
        let (app, product, stop, down) = (app.clone(), product.clone(), stop.clone(), down.clone());
        buyers.push(tokio::spawn(async move {
            let mut acked: HashMap<String, i64> = HashMap::new();
            let mut while_down = 0;
            let mut n = 0;
            while n < AT_LEAST || !stop.load(Ordering::SeqCst) {
                let o = app.place_order(user, &[(&product, 1)]).await;
                let id = o["order_id"].as_str().unwrap().to_owned();
                let mut version = o["version"].as_i64().unwrap();
                if n % 2 == 0 {
                    let (s, paid) = app.pay(&o).await;
                    assert_eq!(s, StatusCode::OK, "{paid}");
                    version = paid["version"].as_i64().unwrap();
                }
                if down.load(Ordering::SeqCst) {
                    while_down += 1;
                }
                acked.insert(id, version);
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (acked, while_down)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    own.kill_nats().unwrap();
    down.store(true, Ordering::SeqCst);

    // The relay counts what it could not publish, by reason, until the client's buffer is full
    // and publishes time out before they are even sent.
    let failures = "orderly_relay_publish_failures_total";
    wait_metric(
        &app,
        failures,
        &[ours, r#"reason="send_timeout""#],
        Duration::from_secs(90),
        "no publish timed out at send while NATS was down",
        |v| v > 0.0,
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut acked = HashMap::new();
    let mut placed_while_down = 0;
    for b in buyers {
        let (orders, while_down) = b.await.unwrap();
        acked.extend(orders);
        placed_while_down += while_down;
    }
    assert!(
        placed_while_down >= 8,
        "orders were created and paid while NATS was down ({placed_while_down})"
    );

    // NATS is still down: the events wait, the backlog gauge shows every one of them, and the
    // relay never reports itself caught up.
    let waiting = app.outbox_rows().await;
    assert!(waiting > 0, "events wait in the outbox while NATS is down");
    let backlog = "orderly_outbox_backlog_events";
    wait_metric(
        &app,
        backlog,
        &[ours],
        Duration::from_secs(10),
        "the backlog gauge never showed the outbox",
        |v| v == waiting as f64,
    )
    .await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            metric(&app, backlog, &[ours]).await,
            waiting as f64,
            "the relay claimed a smaller backlog while NATS was down"
        );
    }
    assert!(metric(&app, failures, &[ours]).await > 0.0);

    own.start_nats().await.unwrap();
    assert_eq!(acked.len(), acked.keys().collect::<HashSet<_>>().len());
    app.wait_outbox_drained(Duration::from_secs(90)).await;
    wait_metric(
        &app,
        backlog,
        &[ours],
        Duration::from_secs(10),
        "the backlog gauge never went back to 0",
        |v| v == 0.0,
    )
    .await;
    let events = app.stream_events().await;
    assert_unique(&events);
    let orders = by_order(&events);
    for (id, version) in &acked {
        let got = orders
            .get(&id.parse::<i64>().unwrap())
            .unwrap_or_else(|| panic!("no event of acknowledged order {id}"));
        let versions: Vec<i64> = got.iter().map(|e| e.order.version).collect();
        let want: Vec<i64> = (1..=*version).collect();
        assert_eq!(versions, want, "order {id}: every version once, in order");
    }
    assert_eq!(orders.len(), acked.len());
    // The merchant copy holds every acknowledged order once, at its final version.
    let want: HashMap<i64, i64> = acked.iter().map(|(id, v)| (id.parse().unwrap(), *v)).collect();
    app.wait_copy(&want, Duration::from_secs(90)).await;
}

#[tokio::test]
async fn a_row_jetstream_refuses_is_parked_after_its_attempts_and_the_rows_behind_it_flow() {
    let app = TestApp::spawn_with(|s| {
        s.events.retry_ms = 100;
        tag_databases(s, "poison");
    })
    .await;
    let ours = r#"database="poison_"#;
    // The stream takes messages up to 2.5 KB: a plain order's event is about 1 KB, one with
    // a long remark and address well over 3 KB. JetStream refuses those, every time.
    let broker = Broker::connect(&app.settings.events).await.expect("nats");
    let js = broker.jetstream();
    let mut config = js
        .get_stream(&app.settings.events.stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    config.max_message_size = 2500;
    js.update_stream(config.clone()).await.unwrap();

    let cat = app.catalog(&[100]).await;
    let user = 77;
    let before = app.place_order(user, &[(&cat.products[0], 1)]).await;
    let id = app.new_order_id(user).await;
    let mut body = TestApp::order_body(&id, &[(&cat.products[0], 1)]);
    body["remark"] = json!("订".repeat(500));
    body["address"]["detail"] = json!("路".repeat(200));
    let (s, poison) = app.create_order(user, body).await;
    assert_eq!(s, StatusCode::CREATED, "{poison}");
    let poison_id: i64 = poison["order_id"].as_str().unwrap().parse().unwrap();
    // The same buyer, the same shard database: these queue behind the refused row.
    let after = app.place_order(user, &[(&cat.products[0], 2)]).await;
    assert_eq!(app.pay(&after).await.0, StatusCode::OK);
    let last = app.place_order(user, &[(&cat.products[0], 3)]).await;

    // The refused row is moved aside, and the rows behind it are published.
    app.wait_outbox_drained(Duration::from_secs(30)).await;
    let id_of = |o: &Value| o["order_id"].as_str().unwrap().parse::<i64>().unwrap();
    let want: HashMap<i64, i64> = [(id_of(&before), 1), (id_of(&after), 2), (id_of(&last), 1)]
        .into_iter()
        .collect();
    app.wait_copy(&want, Duration::from_secs(30)).await;
    let events = app.stream_events().await;
    assert!(
        events.iter().all(|e| e.order.order_id != poison_id),
        "JetStream took the refused event"
    );
    assert_eq!(events.len(), 4, "every event but the refused one");

    // Parked after events.max_publish_attempts refusals, counted, and kept whole.
    assert_eq!(metric(&app, "orderly_outbox_parked_events", &[ours]).await, 1.0);
    let attempts = app.settings.events.max_publish_attempts;
    assert_eq!(
        metric(
            &app,
            "orderly_relay_publish_failures_total",
            &[ours, r#"reason="refused""#]
        )
        .await,
        f64::from(attempts)
    );
    let mut parked = Vec::new();
    for db in app.raw.databases() {
        let rows: Vec<(i64, i64, i64)> =
            sqlx::query_as("SELECT order_id, version, attempts FROM order_outbox_parked")
                .fetch_all(db)
                .await
                .unwrap();
        parked.extend(rows);
    }
    assert_eq!(parked, vec![(poison_id, 1, i64::from(attempts))]);

    // The operator lifts the limit and republishes the parked rows.
    config.max_message_size = -1;
    js.update_stream(config).await.unwrap();
    let moved = orderly::app::republish_parked(&app.settings).await.unwrap();
    assert_eq!(moved, 1);
    app.wait_outbox_drained(Duration::from_secs(30)).await;
    let events = app.stream_events().await;
    assert_unique(&events);
    assert_eq!(events.len(), 5);
    assert!(events.iter().any(|e| e.order.order_id == poison_id));
    wait_metric(
        &app,
        "orderly_outbox_parked_events",
        &[ours],
        Duration::from_secs(10),
        "the parked gauge never went back to 0",
        |v| v == 0.0,
    )
    .await;
}

#[tokio::test]
async fn the_stream_is_set_up_by_many_processes_at_once_without_error() {
    let nats_url = crate::helpers::cluster().nats_url().expect("nats");
    let mut settings = orderly::config::EventSettings {
        nats_url,
        ..Default::default()
    };
    settings.stream = format!("RACE_{}", std::process::id());
    settings.subject_prefix = format!("race{}", std::process::id());
    // Processes starting together (a relay and two consumers per instance, instances of two
    // releases during a rolling deploy, one of them keeping events a day longer) all look for
    // the stream, find none, and create it: the failpoint holds each between its look and its
    // create, so every one but the first creates a stream that is there by then.
    let scenario = fail::FailScenario::setup();
    fail::cfg("events::before_stream_create", "return(300)").unwrap();
    let setups: Vec<_> = (0..6)
        .map(|i| {
            let mut settings = settings.clone();
            if i % 2 == 1 {
                settings.retention_days += 1;
            }
            tokio::spawn(async move { Broker::connect(&settings).await.map(|_| ()) })
        })
        .collect();
    let mut failed = Vec::new();
    for s in setups {
        if let Err(e) = s.await.unwrap() {
            failed.push(e.to_string());
        }
    }
    fail::remove("events::before_stream_create");
    scenario.teardown();
    assert!(failed.is_empty(), "concurrent stream setups failed: {failed:?}");
    // One stream, capturing our subjects.
    let broker = Broker::connect(&settings).await.unwrap();
    let mut stream = broker.jetstream().get_stream(&settings.stream).await.unwrap();
    let subjects = stream.info().await.unwrap().config.subjects.clone();
    assert_eq!(subjects, vec![format!("{}.orders.>", settings.subject_prefix)]);
    broker.jetstream().delete_stream(&settings.stream).await.unwrap();
}
