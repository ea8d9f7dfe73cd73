//! SPEC 2.6 on 11.11: a flash sale of one hot product behind a Redis gate sells exactly its
//! allotment to many times more buyers, within each buyer's limit, whatever happens to Redis;
//! units of orders that fail or close come back exactly once.

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use orderly_testkit::cluster::{ClusterSpec, LocalCluster};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::AssertSqlSafe;
use tokio::sync::Semaphore;

use crate::helpers::TestApp;

/// Creates a sale of `product` live now: `units` at `price`, `limit` per buyer.
async fn start_sale(
    app: &TestApp,
    product: &str,
    units: i64,
    price: i64,
    limit: i64,
    timeout_secs: i64,
) -> Value {
    let starts = Utc::now() - TimeDelta::seconds(5);
    app.flash_sale(product, units, price, limit, starts, timeout_secs)
        .await
}

/// The units the sale's gate has left (`None`: no gate in Redis).
async fn gate_left(app: &TestApp, sale: &Value) -> Option<i64> {
    let client = redis::Client::open(app.settings.redis.url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.ok()?;
    let key = format!(
        "{}{{fs:{}}}:left",
        app.settings.redis.key_prefix,
        sale["sale_id"].as_str().unwrap()
    );
    redis::cmd("GET")
        .arg(&key)
        .query_async::<Option<i64>>(&mut con)
        .await
        .ok()?
}

/// (units sold, buyers with more than `limit` units) by the database.
async fn sold_in_db(app: &TestApp, sale: &Value, limit: i64) -> (i64, i64) {
    let id: i64 = sale["sale_id"].as_str().unwrap().parse().unwrap();
    let sold: i64 = sqlx::query_scalar("SELECT sold FROM flash_sales WHERE id = ?")
        .bind(id)
        .fetch_one(&app.commerce)
        .await
        .unwrap();
    let over: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM flash_sale_buyers WHERE sale_id = ? AND units > ?")
            .bind(id)
            .bind(limit)
            .fetch_one(&app.commerce)
            .await
            .unwrap();
    (sold, over)
}

#[derive(Debug, Default)]
struct Tally {
    created: u64,
    out_of_stock: u64,
    limit_exceeded: u64,
    other: Vec<String>,
}

/// `attempts` buys of one unit by `buyers` distinct users (round robin), 64 at a time.
async fn rush(app: &Arc<TestApp>, product: &str, first_user: i64, buyers: i64, attempts: i64) -> Tally {
    let bound = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..attempts {
        let (app, product, bound) = (app.clone(), product.to_owned(), bound.clone());
        tasks.push(tokio::spawn(async move {
            let _place = bound.acquire().await.unwrap();
            let user = first_user + i % buyers;
            let id = app.new_order_id(user).await;
            let (s, body) = app
                .create_order(user, TestApp::order_body(&id, &[(&product, 1)]))
                .await;
            (s, body)
        }));
    }
    let mut t = Tally::default();
    for task in tasks {
        let (s, body) = task.await.unwrap();
        match (s, body["code"].as_str()) {
            (StatusCode::CREATED, _) => t.created += 1,
            (StatusCode::CONFLICT, Some("out_of_stock")) => t.out_of_stock += 1,
            (StatusCode::CONFLICT, Some("limit_exceeded")) => t.limit_exceeded += 1,
            _ => t.other.push(format!("{s} {body}")),
        }
    }
    t
}

/// 2 000 buys by 1 000 buyers (two each) of a sale of 200 units, one per buyer: exactly 200
/// orders, no buyer with two, the database and the gate agree, and the product's stock went
/// down by exactly the sale's units.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_oversell_flash_sale_sells_exactly_its_units_within_each_buyers_limit() {
    let app = Arc::new(TestApp::spawn().await);
    let catalog = app.catalog(&[1_000]).await;
    let product = &catalog.products[0];
    let sale = start_sale(&app, product, 200, 500, 1, 900).await;
    assert_eq!(
        gate_left(&app, &sale).await,
        Some(200),
        "the gate is built when the sale is created"
    );

    let tally = rush(&app, product, 300_000, 1_000, 2_000).await;
    assert!(
        tally.other.is_empty(),
        "unexpected answers: {:?}",
        &tally.other[..tally.other.len().min(5)]
    );
    assert_eq!(tally.created, 200, "{tally:?}");
    assert_eq!(tally.created + tally.out_of_stock + tally.limit_exceeded, 2_000);
    let (sold, over_limit) = sold_in_db(&app, &sale, 1).await;
    assert_eq!((sold, over_limit), (200, 0));
    assert_eq!(gate_left(&app, &sale).await, Some(0), "gate and database agree");
    assert_eq!(app.stock_of(product).await, 800);
    assert_eq!(app.count_shard_rows("orders").await, 200);
    // Orders carry the sale price.
    let (s, one) = app
        .call("GET", "/v1/orders?limit=1", Some(&app.user_token(300_000)), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    if let Some(o) = one["orders"].as_array().and_then(|a| a.first()) {
        assert_eq!(o["total_amount"], 500, "{o}");
    }
}

/// Redis killed in the middle of a sale, then restarted empty: buyers keep being served
/// (the database path while the gate is gone), exactly the allotment is sold, and the gate
/// is rebuilt from the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_oversell_flash_sale_survives_redis_killed_and_restarted_empty() {
    let cluster = LocalCluster::start(ClusterSpec {
        mariadb_servers: 1,
        with_redis: true,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let app = Arc::new(TestApp::spawn_on(&cluster, |_| {}).await);
    let catalog = app.catalog(&[1_000]).await;
    let product = &catalog.products[0];
    let sale = start_sale(&app, product, 150, 500, 1, 900).await;

    let first = rush(&app, product, 400_000, 100, 100).await;
    assert!(first.other.is_empty(), "{:?}", first.other);
    assert_eq!(first.created, 100);

    cluster.kill_redis().unwrap();
    let second = rush(&app, product, 500_000, 100, 100).await;
    assert!(
        second.other.is_empty(),
        "Redis down must not fail a buyer: {:?}",
        second.other
    );
    assert_eq!(
        second.created, 50,
        "the database path sells what is left, no more"
    );

    cluster.start_redis_empty().await.unwrap();
    let third = rush(&app, product, 600_000, 100, 100).await;
    assert!(third.other.is_empty(), "{:?}", third.other);
    assert_eq!(third.created, 0, "sold out stays sold out with an empty Redis");

    let (sold, over_limit) = sold_in_db(&app, &sale, 1).await;
    assert_eq!((sold, over_limit), (150, 0));
    assert_eq!(app.stock_of(product).await, 850);
    // The gate is back, rebuilt from the database (once the cache has found Redis again).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while gate_left(&app, &sale).await.is_none() && std::time::Instant::now() < deadline {
        app.app.orders.flash().rebuild_all_once().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(gate_left(&app, &sale).await, Some(0));
}

/// A create that fails after the gate took its unit (the order write fails: a constraint
/// injected on the shard's items table) gives the unit back exactly once, to the database
/// and to the gate; the same order id then buys it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flash_units_come_back_once_when_the_create_fails_after_the_gate() {
    let app = TestApp::spawn().await;
    let catalog = app.catalog(&[100]).await;
    let product = &catalog.products[0];
    let sale = start_sale(&app, product, 5, 500, 2, 900).await;
    let user = 700_001;
    let id = app.new_order_id(user).await;
    let order_id = orderly::domain::ids::OrderId::parse(&id).unwrap();
    let shard = app.raw.of_order(order_id);
    let pool = app.raw.primary(shard);
    let items = shard.tables.items.clone();
    sqlx::query(AssertSqlSafe(format!(
        "ALTER TABLE {items} ADD CONSTRAINT injected_failure CHECK (quantity < 0)"
    )))
    .execute(pool)
    .await
    .unwrap();
    for _ in 0..2 {
        let (s, body) = app
            .create_order(user, TestApp::order_body(&id, &[(product, 1)]))
            .await;
        assert!(s.is_server_error(), "the injected failure: {s} {body}");
        assert_eq!(
            sold_in_db(&app, &sale, 2).await.0,
            0,
            "the database got its unit back"
        );
        assert_eq!(
            gate_left(&app, &sale).await,
            Some(5),
            "the gate got its unit back, once"
        );
        assert_eq!(app.stock_of(product).await, 100);
    }
    sqlx::query(AssertSqlSafe(format!(
        "ALTER TABLE {items} DROP CONSTRAINT injected_failure"
    )))
    .execute(pool)
    .await
    .unwrap();
    let (s, body) = app
        .create_order(user, TestApp::order_body(&id, &[(product, 1)]))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(sold_in_db(&app, &sale, 2).await.0, 1);
    assert_eq!(gate_left(&app, &sale).await, Some(4));
    // A replay takes nothing more.
    let (s, _) = app
        .create_order(user, TestApp::order_body(&id, &[(product, 1)]))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(gate_left(&app, &sale).await, Some(4));
}

/// A sale of one unit: the first buyer's order is closed by the sale's payment timeout, and
/// the unit is sold again to the next buyer (refused while it was held).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flash_order_closed_by_the_payment_timeout_is_sold_again() {
    let app = TestApp::spawn().await;
    let catalog = app.catalog(&[100]).await;
    let product = &catalog.products[0];
    let sale = start_sale(&app, product, 1, 300, 1, 120).await;
    let first = app.place_order(800_001, &[(product, 1)]).await;
    assert_eq!(first["total_amount"], 300, "the sale price");
    let created = chrono::DateTime::parse_from_rfc3339(first["created_at"].as_str().unwrap()).unwrap();
    let deadline = chrono::DateTime::parse_from_rfc3339(first["pay_deadline"].as_str().unwrap()).unwrap();
    assert_eq!(
        deadline - created,
        TimeDelta::seconds(120),
        "the sale's payment timeout"
    );
    let id = app.new_order_id(800_002).await;
    let (s, body) = app
        .create_order(800_002, TestApp::order_body(&id, &[(product, 1)]))
        .await;
    assert_eq!(
        (s, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("out_of_stock"))
    );

    // Past the sale's timeout (not the default half hour) the closer takes it back.
    let out = app
        .app
        .orders
        .close_expired_once(Utc::now() + TimeDelta::seconds(121), 100)
        .await
        .unwrap();
    assert_eq!(out.closed, 1);
    assert_eq!(gate_left(&app, &sale).await, Some(1));
    assert_eq!(sold_in_db(&app, &sale, 1).await.0, 0);
    let (s, body) = app
        .create_order(800_002, TestApp::order_body(&id, &[(product, 1)]))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(gate_left(&app, &sale).await, Some(0));
    assert_eq!(app.stock_of(product).await, 99, "one unit out, once");
}

/// Outside its window a product sells at its list price, and a sale cannot overlap another.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flash_sales_price_only_inside_their_window_and_do_not_overlap() {
    let app = TestApp::spawn().await;
    let catalog = app.catalog(&[100]).await;
    let product = &catalog.products[0];
    let later = Utc::now() + TimeDelta::days(1);
    let body = |start: chrono::DateTime<Utc>| {
        json!({"product_id": product, "units": 5, "sale_price": 1, "per_user_limit": 1,
               "starts_at": start.to_rfc3339(), "ends_at": (start + TimeDelta::hours(1)).to_rfc3339(),
               "payment_timeout_secs": 300})
    };
    let admin = app.admin_token();
    let (s, sale) = app
        .call("POST", "/v1/flash-sales", Some(&admin), Some(body(later)))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{sale}");
    let (s, refused) = app
        .call(
            "POST",
            "/v1/flash-sales",
            Some(&admin),
            Some(body(later + TimeDelta::minutes(30))),
        )
        .await;
    assert_eq!(
        (s, refused["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("validation_failed"))
    );
    let order = app.place_order(800_100, &[(product, 1)]).await;
    assert_eq!(order["total_amount"], 1000, "list price before the sale");
    let id = sale["sale_id"].as_str().unwrap();
    let (s, ended) = app
        .call("POST", &format!("/v1/flash-sales/{id}/end"), Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(ended["ended_at"].is_string(), "{ended}");
}

/// The first attempt of a create dies between its reservation and its order write (the
/// failpoint `orders::after_reserve`), as in a process killed there.
#[cfg(feature = "failpoints")]
async fn reserve_without_writing(app: &TestApp, user: i64, id: &str, body: &Value) {
    let scenario = fail::FailScenario::setup();
    fail::cfg("orders::after_reserve", &format!("return({id})")).unwrap();
    let (s, first) = app.create_order(user, body.clone()).await;
    fail::remove("orders::after_reserve");
    drop(scenario);
    assert_eq!(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "reserved, not written: {first}"
    );
}

/// A create reserved inside a sale and retried after the sale ended (its first attempt died
/// between the reservation and the order write): the order is written at the sale's price,
/// and counted against the sale once.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_create_retried_after_its_flash_sale_ended_keeps_the_sale_terms() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[100]).await;
    let product = &cat.products[0];
    let sale = start_sale(&app, product, 10, 300, 2, 600).await;
    let sale_id = sale["sale_id"].as_str().unwrap().to_owned();
    let user = 9_401;
    let id = app.new_order_id(user).await;
    let body = TestApp::order_body(&id, &[(product, 1)]);

    reserve_without_writing(&app, user, &id, &body).await;

    let (s, ended) = app
        .call(
            "POST",
            &format!("/v1/flash-sales/{sale_id}/end"),
            Some(&app.admin_token()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{ended}");
    let (s, order) = app.create_order(user, body).await;
    assert!(s.is_success(), "{order}");
    assert_eq!(
        (
            order["items"][0]["unit_price"].as_i64(),
            order["pay_amount"].as_i64()
        ),
        (Some(300), Some(300)),
        "the retry writes the terms the reservation took: {order}"
    );
    let (_, sale) = app
        .call(
            "GET",
            &format!("/v1/flash-sales/{sale_id}"),
            Some(&app.admin_token()),
            None,
        )
        .await;
    assert_eq!(sale["sold"], 1, "counted against the sale once: {sale}");
    assert_eq!(app.stock_of(product).await, 99);
}

/// A create reserved at the regular price and retried after a sale of its product began: the
/// order is written at the regular price, and the sale (its units, the buyer's limit, its
/// gate) does not count it.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_create_retried_after_a_flash_sale_began_keeps_the_regular_terms() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[100]).await;
    let product = &cat.products[0];
    let starts = Utc::now() + TimeDelta::seconds(3);
    let sale = app.flash_sale(product, 10, 300, 1, starts, 600).await;
    let sale_id = sale["sale_id"].as_str().unwrap().to_owned();
    let user = 9_402;
    let id = app.new_order_id(user).await;
    let body = TestApp::order_body(&id, &[(product, 1)]);

    reserve_without_writing(&app, user, &id, &body).await;

    let wait = (starts - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(500);
    tokio::time::sleep(wait).await;
    let (s, order) = app.create_order(user, body).await;
    assert!(s.is_success(), "{order}");
    assert_eq!(
        order["items"][0]["unit_price"].as_i64(),
        Some(1000),
        "the retry writes the terms the reservation took: {order}"
    );
    let (_, sale) = app
        .call(
            "GET",
            &format!("/v1/flash-sales/{sale_id}"),
            Some(&app.admin_token()),
            None,
        )
        .await;
    assert_eq!(sale["sold"], 0, "the sale does not count it: {sale}");
    // The buyer's limit (1) is untouched: they can still buy the sale's unit.
    let bought = app.place_order(user, &[(product, 1)]).await;
    assert_eq!(bought["items"][0]["unit_price"], 300, "{bought}");
    assert_eq!(
        gate_left(&app, &sale).await,
        Some(9),
        "the retry gave back what it took at the gate"
    );
}
