//! SPEC 6: every order change leaves one event in the outbox of its shard, in the same
//! transaction; the relay publishes each to NATS JetStream once (deduplicated by event id),
//! whatever dies in between.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use orderly::cluster::{ClusterSpec, LocalCluster};
use orderly::domain::events::{EventKind, OrderEvent};
use orderly::events::relay;
use orderly::events::Broker;
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
    assert_eq!(orders.len(), 3, "no event of another order");

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
    for db in app.app.orders.shards().databases() {
        let mut conn = db.write().acquire().await.unwrap().detach();
        assert!(relay::try_lock(&mut conn).await.unwrap());
        // The relay publishes, the broker acknowledges, and the relay dies before deleting.
        let (acked, duplicates) = relay::publish_pending(&mut conn, &broker, 100).await.unwrap();
        assert_eq!(duplicates, 0);
        published += acked.len();
        drop(conn);
    }
    assert_eq!(published, 8);
    assert_eq!(app.outbox_rows().await, 8, "nothing was deleted");

    // The next relay publishes them all again; the stream drops every copy.
    let mut again = relay::Relayed::default();
    for db in app.app.orders.shards().databases() {
        let mut conn = db.write().acquire().await.unwrap().detach();
        assert!(relay::try_lock(&mut conn).await.unwrap());
        let r = relay::relay_once(&mut conn, &broker, 100).await.unwrap();
        again.published += r.published;
        again.duplicates += r.duplicates;
    }
    assert_eq!(
        again,
        relay::Relayed {
            published: 8,
            duplicates: 8
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
    let db = &app.app.orders.shards().databases()[0];
    let mut first = db.write().acquire().await.unwrap().detach();
    let mut second = db.write().acquire().await.unwrap().detach();
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

#[tokio::test]
async fn every_acknowledged_order_reaches_the_stream_when_nats_dies_mid_burst() {
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
            s.events.publish_timeout_ms = 1000;
        })
        .await,
    );
    let cat = app.catalog(&[10_000]).await;
    let product = cat.products[0].clone();

    // Eight buyers place orders and pay every other one, while the broker dies and returns.
    const PER_BUYER: usize = 25;
    let mut buyers = Vec::new();
    for user in 1..=8i64 {
        let app = app.clone();
        let product = product.clone();
        buyers.push(tokio::spawn(async move {
            let mut acked: HashMap<String, i64> = HashMap::new();
            for n in 0..PER_BUYER {
                let o = app.place_order(user, &[(&product, 1)]).await;
                let id = o["order_id"].as_str().unwrap().to_owned();
                let mut version = o["version"].as_i64().unwrap();
                if n % 2 == 0 {
                    let (s, paid) = app.pay(&o).await;
                    assert_eq!(s, StatusCode::OK, "{paid}");
                    version = paid["version"].as_i64().unwrap();
                }
                acked.insert(id, version);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    own.kill_nats().unwrap();
    // Orders go on while the broker is gone; their events wait in the outboxes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        app.outbox_rows().await > 0,
        "events wait in the outbox while NATS is down"
    );
    own.start_nats().await.unwrap();

    let mut acked = HashMap::new();
    for b in buyers {
        acked.extend(b.await.unwrap());
    }
    assert_eq!(acked.len(), 8 * PER_BUYER);
    app.wait_outbox_drained(Duration::from_secs(60)).await;
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
    app.wait_copy(&want, Duration::from_secs(60)).await;
}
