//! SPEC 6, order search: an embedded index fed by the order stream. A shipped order is found
//! by a product word, its id and its tracking number; a search never shows an order the
//! caller may not see; replays leave one document per order at its latest version; a wiped
//! index is rebuilt from the shards.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orderly::domain::ids::ShopId;
use orderly::events::consumer::{self, Batch, Projection, StartAt};
use orderly::events::rebuild::rebuild;
use orderly::events::Broker;
use orderly::search::index::TantivyIndex;
use orderly::search::projection::{Search, NAME};
use orderly::search::{OrderIndex, Scope, SearchQuery};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::TestApp;

/// How long the stream may take to carry a write into the index (relay, then consumer).
const WITHIN: Duration = Duration::from_secs(20);

/// A shop of its own with one product per name (stock 1000, price 1000); the product ids.
async fn shop_with(app: &TestApp, names: &[&str]) -> (ShopId, Vec<String>) {
    let admin = app.admin_token();
    let (s, shop) = app
        .call(
            "POST",
            "/v1/shops",
            Some(&admin),
            Some(json!({"name": "search shop"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{shop}");
    let shop_id = ShopId::parse(shop["shop_id"].as_str().unwrap()).unwrap();
    let mut products = Vec::new();
    for name in names {
        let (s, p) = app
            .call(
                "POST",
                "/v1/products",
                Some(&admin),
                Some(json!({"shop_id": shop_id.to_string(), "name": name, "price": 1000, "stock": 1000})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{p}");
        products.push(p["product_id"].as_str().unwrap().to_owned());
    }
    (shop_id, products)
}

async fn search(app: &TestApp, token: &str, query: &str) -> (StatusCode, Value) {
    app.call("GET", &format!("/v1/search/orders?{query}"), Some(token), None)
        .await
}

/// The order ids of a 200 answer, in its order.
fn ids(body: &Value) -> Vec<String> {
    body["orders"]
        .as_array()
        .unwrap_or_else(|| panic!("not a search answer: {body}"))
        .iter()
        .map(|o| o["order_id"].as_str().unwrap().to_owned())
        .collect()
}

fn id_set(body: &Value) -> BTreeSet<String> {
    ids(body).into_iter().collect()
}

/// Polls the search until `done` holds for its answer, at most [`WITHIN`]; the answer.
async fn eventually(app: &TestApp, token: &str, query: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WITHIN;
    loop {
        let (s, body) = search(app, token, query).await;
        assert_eq!(s, StatusCode::OK, "{query}: {body}");
        if done(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{query}: still {body} after {WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ship(app: &TestApp, shop: ShopId, order: &str, version: i64, tracking: &str) -> Value {
    let (s, b) = app
        .call(
            "POST",
            &format!("/v1/orders/{order}/shipment"),
            Some(&app.merchant_token(shop)),
            Some(json!({"expected_version": version, "carrier": "SF", "tracking_number": tracking})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b
}

#[tokio::test]
async fn a_shipped_order_is_found_by_product_word_order_id_and_tracking_number() {
    let app = TestApp::spawn().await;
    let (shop, products) = shop_with(&app, &["Crimson Kettle", "Walnut Tray"]).await;
    let user = 7101;
    let token = app.user_token(user);
    let order = app
        .place_order(user, &[(&products[0], 1), (&products[1], 2)])
        .await;
    let id = order["order_id"].as_str().unwrap().to_owned();
    let (s, paid) = app.pay(&order).await;
    assert_eq!(s, StatusCode::OK, "{paid}");
    ship(&app, shop, &id, 2, "SF-SEARCH-0001").await;

    // Found by a product word (any case), by its id, by its tracking number: shipped, at v3.
    for query in [
        "q=kettle".to_owned(),
        "q=WALNUT%20tray".to_owned(),
        format!("q={id}"),
        "q=SF-SEARCH-0001".to_owned(),
    ] {
        let body = eventually(&app, &token, &query, |b| b["orders"][0]["status"] == "shipped").await;
        assert_eq!(ids(&body), vec![id.clone()], "{query}: {body}");
        let o = &body["orders"][0];
        assert_eq!(o["version"], 3, "{query}: {o}");
        assert_eq!(o["tracking_number"], "SF-SEARCH-0001");
        assert_eq!(o["items"].as_array().unwrap().len(), 2);
        // The order as `GET /v1/orders/{id}` shows it to its owner.
        assert_eq!(o["address"]["name"], "Li Lei");
    }
    let (_, now) = app.get_order(user, &id).await;
    let (_, found) = search(&app, &token, &format!("q={id}")).await;
    let mut now = now;
    let mut found = found["orders"][0].clone();
    // Only what the two reads add beside the order differs.
    for v in [&mut now, &mut found] {
        v.as_object_mut().unwrap().retain(|k, _| k != "user");
    }
    assert_eq!(found, now, "the search answers the order as the API shows it");

    // What does not match: another word, part of the tracking number, the wrong filters.
    for query in [
        "q=teapot",
        "q=SF-SEARCH",
        "q=kettle&status=pending_payment",
        "q=kettle&created_from=2099-01-01T00:00:00Z",
        "q=kettle&created_to=2025-01-01T00:00:00Z",
    ] {
        let (s, body) = search(&app, &token, query).await;
        assert_eq!(s, StatusCode::OK, "{query}: {body}");
        assert_eq!(ids(&body), Vec::<String>::new(), "{query}");
    }
    // And the filters that do.
    for query in [
        "q=kettle&status=shipped".to_owned(),
        "status=2".to_owned(),
        format!(
            "q=kettle&created_from=2025-01-01T00:00:00Z&created_to={}",
            (chrono::Utc::now() + chrono::TimeDelta::hours(1))
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
    ] {
        let (s, body) = search(&app, &token, &query).await;
        assert_eq!(s, StatusCode::OK, "{query}: {body}");
        assert_eq!(ids(&body), vec![id.clone()], "{query}");
    }
}

#[tokio::test]
async fn a_search_never_shows_an_order_the_caller_may_not_see() {
    let app = TestApp::spawn().await;
    let (shop_a, a) = shop_with(&app, &["Amber Lamp"]).await;
    let (shop_b, b) = shop_with(&app, &["Amber Lamp"]).await;
    let (shop_c, _) = shop_with(&app, &["Slate Bowl"]).await;
    let (alice, bob) = (7201, 7202);
    // Alice's order is the oldest: a search that filtered after its limit would miss it.
    let o1 = app.place_order(alice, &[(&a[0], 1)]).await;
    let o2 = app.place_order(bob, &[(&a[0], 1)]).await;
    let o3 = app.place_order(bob, &[(&b[0], 1)]).await;
    let [o1, o2, o3] = [&o1, &o2, &o3].map(|o| o["order_id"].as_str().unwrap().to_owned());
    let admin = app.admin_token();
    let all: BTreeSet<String> = [&o1, &o2, &o3].into_iter().cloned().collect();
    eventually(&app, &admin, "q=amber", |body| id_set(body) == all).await;

    let set = |v: &[&String]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    let alice_t = app.user_token(alice);
    let bob_t = app.user_token(bob);
    let cases: Vec<(&str, String, String, BTreeSet<String>)> = vec![
        ("alice", alice_t.clone(), "q=amber".into(), set(&[&o1])),
        (
            "alice, limit 1",
            alice_t.clone(),
            "q=amber&limit=1".into(),
            set(&[&o1]),
        ),
        ("alice, no q", alice_t.clone(), String::new(), set(&[&o1])),
        ("alice, bob's id", alice_t.clone(), format!("q={o2}"), set(&[])),
        ("bob", bob_t.clone(), "q=amber".into(), set(&[&o2, &o3])),
        ("bob, alice's id", bob_t.clone(), format!("q={o1}"), set(&[])),
        (
            "shop a",
            app.merchant_token(shop_a),
            "q=amber".into(),
            set(&[&o1, &o2]),
        ),
        (
            "shop a, limit 1",
            app.merchant_token(shop_a),
            "q=amber&limit=1".into(),
            set(&[&o2]),
        ),
        (
            "shop b",
            app.merchant_token(shop_b),
            "q=amber".into(),
            set(&[&o3]),
        ),
        (
            "shop b, shop a's order",
            app.merchant_token(shop_b),
            format!("q={o1}"),
            set(&[]),
        ),
        ("shop c", app.merchant_token(shop_c), "q=amber".into(), set(&[])),
        (
            "shop c, no q",
            app.merchant_token(shop_c),
            String::new(),
            set(&[]),
        ),
        ("admin", admin.clone(), "q=amber".into(), all.clone()),
        (
            "admin, limit 2",
            admin.clone(),
            "q=amber&limit=2".into(),
            set(&[&o2, &o3]),
        ),
    ];
    for (who, token, query, want) in cases {
        let (s, body) = search(&app, &token, &query).await;
        assert_eq!(s, StatusCode::OK, "{who}: {body}");
        assert_eq!(id_set(&body), want, "{who} ({query})");
        for o in body["orders"].as_array().unwrap() {
            assert!(o["address"].is_object(), "{who}: the address is theirs to see");
        }
    }
    // Newest first.
    let (_, body) = search(&app, &admin, "q=amber").await;
    assert_eq!(ids(&body), vec![o3.clone(), o2.clone(), o1.clone()]);

    // The payment channel searches nothing; no token is 401.
    let (s, body) = search(&app, &app.service_token(), "q=amber").await;
    assert_eq!(
        (s, body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    let (s, _) = app.call("GET", "/v1/search/orders?q=amber", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // Bad input is a 422 problem naming the parameter.
    for (query, field) in [
        ("q=", "q"),
        ("q=%20%20", "q"),
        (&*format!("q={}", "x".repeat(201)), "q"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("status=lost", "status"),
        ("created_from=yesterday", "created_from"),
        ("created_to=2025-13-01T00:00:00Z", "created_to"),
        ("user_id=7202", "user_id"),
    ] {
        let (s, body) = search(&app, &alice_t, query).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {body}");
        assert_eq!(body["code"], "validation_failed", "{query}");
        assert_eq!(body["errors"][0]["field"], field, "{query}: {body}");
    }
}

/// Places orders in several states and waits until the relay has put every event on the
/// stream; the latest version of each order, by id.
async fn orders_in_every_state(app: &TestApp) -> BTreeMap<i64, i64> {
    let (shop, products) = shop_with(app, &["Linen Apron"]).await;
    let user = 7301;
    let token = app.user_token(user);
    let mut ids = Vec::new();
    // Shipped (v3), cancelled (v2), paid (v2), placed (v1).
    let shipped = app.place_order(user, &[(&products[0], 1)]).await;
    let shipped_id = shipped["order_id"].as_str().unwrap().to_owned();
    assert_eq!(app.pay(&shipped).await.0, StatusCode::OK);
    ship(app, shop, &shipped_id, 2, "SF-REPLAY-1").await;
    ids.push(shipped_id);
    let cancelled = app.place_order(user, &[(&products[0], 1)]).await;
    let cancelled_id = cancelled["order_id"].as_str().unwrap().to_owned();
    let (s, b) = app
        .call(
            "POST",
            &format!("/v1/orders/{cancelled_id}/cancel"),
            Some(&token),
            Some(json!({"expected_version": 1, "reason": "changed my mind"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    ids.push(cancelled_id);
    let paid = app.place_order(user, &[(&products[0], 2)]).await;
    assert_eq!(app.pay(&paid).await.0, StatusCode::OK);
    ids.push(paid["order_id"].as_str().unwrap().to_owned());
    let placed = app.place_order(user, &[(&products[0], 3)]).await;
    ids.push(placed["order_id"].as_str().unwrap().to_owned());
    app.wait_outbox_drained(WITHIN).await;
    let mut latest = BTreeMap::new();
    for id in ids {
        let (s, o) = app.get_order(user, &id).await;
        assert_eq!(s, StatusCode::OK);
        latest.insert(id.parse().unwrap(), o["version"].as_i64().unwrap());
    }
    latest
}

/// Every order of `latest` has exactly one document, at its latest version, and there is no
/// other document.
fn assert_latest_only(index: &TantivyIndex, latest: &BTreeMap<i64, i64>, when: &str) {
    for (id, version) in latest {
        assert_eq!(
            index.versions_of(*id).unwrap(),
            vec![*version],
            "{when}: order {id} must have one document, at v{version}"
        );
    }
    assert_eq!(index.len(), latest.len() as u64, "{when}: no other document");
    let found = index.search(&SearchQuery::new(Scope::All)).unwrap();
    let got: BTreeMap<i64, i64> = found.iter().map(|s| (s.order_id, s.version)).collect();
    assert_eq!(&got, latest, "{when}: the search answers the latest snapshots");
}

/// An index of the test's own, fed by the test: the app runs no search consumer, so
/// nothing but the steps of the test writes it.
fn own_index() -> (tempfile::TempDir, Arc<TantivyIndex>, Search) {
    let dir = tempfile::tempdir().unwrap();
    let index = Arc::new(TantivyIndex::open_in(dir.path(), 15).unwrap());
    let search = Search::new(index.clone());
    (dir, index, search)
}

#[tokio::test]
async fn replaying_the_stream_leaves_one_document_per_order_at_its_latest_version() {
    let app = TestApp::spawn_with(|s| s.search.enabled = false).await;
    let latest = orders_in_every_state(&app).await;
    let (_dir, index, search) = own_index();
    let broker = Broker::connect(&app.settings.events).await.unwrap();

    // The consumer delivers every version in stream order, one batch each (as a stream
    // that trickles does): each newer version replaces the document of the one before.
    let c = consumer::durable(&broker, NAME, StartAt::Beginning)
        .await
        .unwrap();
    let applied = consumer::drain(&c, &search, 1).await.unwrap();
    assert_eq!(applied, latest.values().sum::<i64>() as usize);
    assert_latest_only(&index, &latest, "after the first pass");

    // The whole stream again, through a fresh consumer from the beginning.
    consumer::delete(&broker, NAME).await.unwrap();
    let c = consumer::durable(&broker, NAME, StartAt::Beginning)
        .await
        .unwrap();
    assert!(consumer::drain(&c, &search, 100).await.unwrap() > 0);
    assert_latest_only(&index, &latest, "after a replay");

    // Every event once more, newest first, one batch each: older versions after newer ones.
    let mut events = app.stream_events().await;
    events.reverse();
    for e in &events {
        search
            .apply(&Batch {
                events: vec![e.clone()],
                pending: 0,
            })
            .await
            .unwrap();
    }
    assert_latest_only(&index, &latest, "after older events arrived after newer ones");
    // And all of them in one batch, newest first.
    search.apply(&Batch { events, pending: 0 }).await.unwrap();
    assert_latest_only(&index, &latest, "after a batch of every version, newest first");
}

#[tokio::test]
async fn a_wiped_index_is_rebuilt_with_every_order_at_its_latest_version() {
    let app = TestApp::spawn_with(|s| s.search.enabled = false).await;
    let mut latest = orders_in_every_state(&app).await;
    let (_dir, index, search) = own_index();
    let broker = Broker::connect(&app.settings.events).await.unwrap();
    let c = consumer::durable(&broker, NAME, StartAt::Beginning)
        .await
        .unwrap();
    consumer::drain(&c, &search, 100).await.unwrap();
    assert_latest_only(&index, &latest, "before the rebuild");

    search.reset().await.unwrap();
    assert!(index.is_empty(), "wiped");
    let shards = app.shard_map().await;
    let archive = app.archive_pool().await;
    let rebuilt = rebuild(&broker, &shards, &archive, &search, search.reset(), false)
        .await
        .unwrap();
    assert_eq!(rebuilt.orders, latest.len() as u64);
    assert_latest_only(&index, &latest, "after the rebuild");

    // The consumer follows the stream from where the backfill started: nothing before it is
    // delivered again, and a write after it is.
    let c = consumer::durable(&broker, NAME, StartAt::Beginning)
        .await
        .unwrap();
    assert_eq!(consumer::drain(&c, &search, 100).await.unwrap(), 0);
    let (&placed, _) = latest.iter().find(|(_, v)| **v == 1).unwrap();
    let order = json!({"order_id": placed.to_string(), "pay_amount": 3000});
    let (s, paid) = app.pay(&order).await;
    assert_eq!(s, StatusCode::OK, "{paid}");
    latest.insert(placed, 2);
    app.wait_outbox_drained(WITHIN).await;
    assert_eq!(consumer::drain(&c, &search, 100).await.unwrap(), 1);
    assert_latest_only(&index, &latest, "after a write that followed the rebuild");

    // `orderly project rebuild search` on the app's own data directory, where a stale index
    // was left: it takes the writer, so this test's index lets go of it first.
    drop((index, search));
    let dir = &app.settings.search.data_dir;
    {
        let stale = TantivyIndex::open_in(dir, 15).unwrap();
        let old = stale.search(&SearchQuery::new(Scope::All)).unwrap();
        assert!(old.is_empty(), "the app runs no consumer on it");
        let mut snapshot = app.stream_events().await.remove(0).order;
        snapshot.order_id = 1;
        stale.upsert(&[snapshot]).unwrap();
    }
    let rebuilt = orderly::app::rebuild_search(&app.settings, false).await.unwrap();
    assert_eq!(rebuilt.orders, latest.len() as u64);
    let index = TantivyIndex::open_in(dir, 15).unwrap();
    assert_latest_only(&index, &latest, "after `project rebuild search`");
}

#[tokio::test]
async fn a_second_process_on_the_data_directory_serves_searches_while_one_writes() {
    let app = TestApp::spawn().await;
    let twin = app.twin().await;
    let (_, products) = shop_with(&app, &["Copper Ladle"]).await;
    let user = 7401;
    let order = twin.place_order(user, &[(&products[0], 1)]).await;
    let id = order["order_id"].as_str().unwrap().to_owned();
    let token = app.user_token(user);
    // One of the two holds the writer and runs the consumer; both find the order.
    for process in [&app, &twin] {
        let body = eventually(process, &token, "q=ladle", |b| !ids(b).is_empty()).await;
        assert_eq!(ids(&body), vec![id.clone()]);
    }
}

/// Two hosts with search enabled, each with its own index directory: one is elected the
/// deployment's search writer and finds every order; the other consumes nothing (the stream
/// is not split between two indexes) and refuses searches with a 503 that says why, rather
/// than answering from an index the stream does not feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_search_writer_per_deployment_and_other_hosts_refuse() {
    let app = TestApp::spawn().await;
    let other = app.twin_on_another_host().await;
    let (_, products) = shop_with(&app, &["election kettle"]).await;
    let user = 9_901;
    let token = app.user_token(user);
    let mut placed = BTreeSet::new();
    for _ in 0..6 {
        let o = app.place_order(user, &[(&products[0], 1)]).await;
        placed.insert(o["order_id"].as_str().unwrap().to_owned());
    }
    let found = eventually(&app, &token, "q=kettle", |b| id_set(b) == placed).await;
    assert_eq!(id_set(&found), placed, "the elected writer indexed every order");
    let (s, refused) = search(&other, &token, "q=kettle").await;
    assert_eq!(
        (s, refused["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable")),
        "the other host must not answer from its own index: {refused}"
    );
}
