//! SPEC 2.1 and 2.6 under a slow shard: the sweeper never gives back the stock of an order
//! whose shard commit is in flight, a create that arrives after its id was voided writes
//! nothing, and a create commits twice (the sweeper confirms claims later, in batches).

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use futures::future::join_all;
use orderly::domain::ids::{OrderId, UserId};
use orderly::domain::order::{price_order, CreateOrderRequest, NewOrder};
use orderly::storage::commerce::{self, Reservation, ReserveOutcome};
use orderly::storage::orders::{self, NotWritten, OrderDoor};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::{AssertSqlSafe, Connection, MySqlConnection};

use orderly_testkit::cluster::{ClusterSpec, LocalCluster};

use crate::helpers::{cluster, TestApp};

const GRACE: Duration = Duration::from_secs(60);

/// The shard server that does not hold the commerce database (see `cluster_settings`).
const ORDERS_ONLY_SERVER: usize = 1;

/// A user whose orders live on shard database `database`.
fn user_on(app: &TestApp, database: usize, from: i64) -> i64 {
    (from..)
        .find(|&u| app.raw.of_user(UserId::new(u).unwrap()).database == database)
        .unwrap()
}

/// The name of shard database `database` of this test app.
fn database_name(app: &TestApp, database: usize) -> String {
    let url = &app.settings.shards.databases[database].primary;
    let rest = url.rsplit_once('/').unwrap().1;
    rest.split('?').next().unwrap().to_owned()
}

async fn admin(server: usize) -> MySqlConnection {
    MySqlConnection::connect(&cluster().mariadb(server).admin_url())
        .await
        .unwrap()
}

/// A test app whose second shard database lives on a MariaDB server of its own, so that
/// stalling that server's commits does not stall the tests running beside this one. Bind it
/// as `let (private, app)`: locals drop in reverse order, so the app stops before its server.
async fn spawn_with_private_orders_server(request_timeout_ms: u64) -> (LocalCluster, TestApp) {
    let private = LocalCluster::start(ClusterSpec {
        mariadb_servers: 1,
        with_redis: false,
        ..ClusterSpec::default()
    })
    .await
    .expect("private MariaDB server");
    let server = private.mariadb(0).base_url();
    let app = TestApp::spawn_with(|s| {
        s.server.request_timeout_ms = request_timeout_ms;
        let db = &mut s.shards.databases[ORDERS_ONLY_SERVER];
        let name = db.primary.rsplit_once('/').unwrap().1.to_owned();
        db.primary = format!("{server}/{name}");
    })
    .await;
    (private, app)
}

/// Waits until a session on `db` matches `condition` (over `information_schema.processlist
/// p`: what a session is executing and waiting for).
async fn wait_for_session(admin: &mut MySqlConnection, db: &str, condition: &str) {
    let sql = format!("SELECT COUNT(*) FROM information_schema.processlist p WHERE p.db = ? AND {condition}");
    for _ in 0..400 {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(&*sql))
            .bind(db)
            .fetch_one(&mut *admin)
            .await
            .unwrap();
        if n > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let sessions: Vec<(Option<String>, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT db, state, info FROM information_schema.processlist")
            .fetch_all(&mut *admin)
            .await
            .unwrap();
    panic!("no session on {db} with {condition}: {sessions:?}");
}

async fn claim_state(app: &TestApp, id: &str) -> Option<i8> {
    sqlx::query_scalar("SELECT state FROM order_claims WHERE order_id = ?")
        .bind(id.parse::<i64>().unwrap())
        .fetch_optional(&app.commerce)
        .await
        .unwrap()
}

async fn coupon_holder(app: &TestApp, coupon: &str) -> Option<i64> {
    sqlx::query_scalar("SELECT redeemed_order_id FROM coupons WHERE id = ?")
        .bind(coupon.parse::<i64>().unwrap())
        .fetch_one(&app.commerce)
        .await
        .unwrap()
}

async fn is_void(app: &TestApp, id: &str) -> bool {
    let oid = OrderId::parse(id).unwrap();
    let shard = app.raw.of_order(oid);
    let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM {} WHERE order_id = ?",
        shard.tables.voids
    )))
    .bind(oid.get())
    .fetch_one(app.raw.primary(shard))
    .await
    .unwrap();
    n == 1
}

/// A create posted on its own task, so the test can act while it is blocked.
fn spawn_create(app: &TestApp, user: i64, body: Value) -> tokio::task::JoinHandle<(StatusCode, Value)> {
    let request = app
        .client
        .post(format!("{}/v1/orders", app.base))
        .bearer_auth(app.user_token(user))
        .json(&body);
    tokio::spawn(async move {
        let resp = request.send().await.expect("request");
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_commit_is_never_swept() {
    // The create below waits out the sweeper's lock timeout: give it time to answer.
    let (private, app) = spawn_with_private_orders_server(40_000).await;
    let cat = app.catalog(&[10]).await;
    let user = user_on(&app, ORDERS_ONLY_SERVER, 5000);
    let coupon = app.coupon(user, 300, 0).await;
    let id = app.new_order_id(user).await;
    let mut body = TestApp::order_body(&id, &[(&cat.products[0], 2)]);
    body["coupon_ids"] = json!([coupon]);
    let db = database_name(&app, ORDERS_ONLY_SERVER);

    // Commits on the order's server stall; everything else goes on.
    let mut backup = MySqlConnection::connect(&private.mariadb(0).admin_url())
        .await
        .unwrap();
    sqlx::raw_sql("BACKUP STAGE START")
        .execute(&mut backup)
        .await
        .unwrap();
    sqlx::raw_sql("BACKUP STAGE BLOCK_COMMIT")
        .execute(&mut backup)
        .await
        .unwrap();
    let create = spawn_create(&app, user, body);
    // Reserved, inserted, waiting for its COMMIT.
    wait_for_session(
        &mut backup,
        &db,
        "p.info = 'COMMIT' AND p.state = 'Waiting for backup lock'",
    )
    .await;
    assert_eq!(app.stock_of(&cat.products[0]).await, 8);

    // Long past the grace period, the sweeper must leave it alone.
    let later = Utc::now() + TimeDelta::from_std(GRACE * 2).unwrap();
    let out = app.app.orders.sweep_once(later, GRACE, 500).await.unwrap();
    assert_eq!((out.returned, out.confirmed), (0, 0), "{out:?}");
    assert!(out.failed >= 1, "the in-flight claim is left for later: {out:?}");
    assert_eq!(app.stock_of(&cat.products[0]).await, 8, "stock still held");
    assert_eq!(claim_state(&app, &id).await, Some(commerce::CLAIM_RESERVED));
    assert_eq!(coupon_holder(&app, &coupon).await, Some(id.parse().unwrap()));

    sqlx::raw_sql("BACKUP STAGE END")
        .execute(&mut backup)
        .await
        .unwrap();
    let (s, order) = create.await.unwrap();
    assert_eq!(s, StatusCode::CREATED, "{order}");
    assert_eq!(order["discount_amount"], 300);
    assert!(!is_void(&app, &id).await, "the sweeper's void rolled back");
    assert_eq!(app.count_shard_rows("orders").await, 1);
    assert_eq!(app.stock_of(&cat.products[0]).await, 8);
    assert_eq!(coupon_holder(&app, &coupon).await, Some(id.parse().unwrap()));

    // The next sweep finds the order and confirms its claim.
    let out = app.app.orders.sweep_once(later, GRACE, 500).await.unwrap();
    assert_eq!((out.confirmed, out.returned, out.failed), (1, 0, 0), "{out:?}");
    assert_eq!(claim_state(&app, &id).await, Some(commerce::CLAIM_CONFIRMED));
    assert_eq!(app.stock_of(&cat.products[0]).await, 8);
    let (s, got) = app.get_order(user, &id).await;
    assert_eq!(
        (s, got["status"].as_str()),
        (StatusCode::OK, Some("pending_payment"))
    );
}

/// The first half of a create by hand: the parsed order, its pricing, and its reservation.
async fn reserve_by_hand(
    app: &TestApp,
    user: i64,
    body: &Value,
) -> (NewOrder, orderly::domain::order::Pricing) {
    let uid = UserId::new(user).unwrap();
    let req: CreateOrderRequest = serde_json::from_value(body.clone()).unwrap();
    let new = NewOrder::parse(uid, req).unwrap();
    let ids: Vec<_> = new.lines.iter().map(|l| l.product_id).collect();
    let products: Vec<_> = commerce::load_products(&app.commerce, &ids)
        .await
        .unwrap()
        .iter()
        .map(|p| p.snapshot())
        .collect();
    let coupons = commerce::load_coupons(&app.commerce, &new.coupon_ids)
        .await
        .unwrap();
    let pricing = price_order(
        uid,
        Some(new.order_id),
        &new.lines,
        &new.coupon_ids,
        &products,
        &coupons,
        Utc::now(),
    )
    .unwrap();
    let hash = new.request_hash();
    let r = Reservation {
        order_id: new.order_id,
        user_id: uid,
        request_hash: &hash,
        attempt: 1,
        lines: &new.lines,
        coupons: &new.coupon_ids,
        max_held_units: None,
        flash: &[],
        priced_at: chrono::Utc::now(),
        unit_prices: &[],
    };
    let mut conn = app.commerce.acquire().await.unwrap();
    let reserved = commerce::reserve(&mut conn, &r, Utc::now()).await.unwrap();
    assert_eq!(reserved, ReserveOutcome::Reserved);
    (new, pricing)
}

/// The same without BACKUP STAGE (which also holds back the sweeper's own commit): the
/// create's shard transaction has written the order and is simply not committed yet, while
/// the rest of the server runs freely. Only the sweeper's locking read of the order stands
/// between it and returning stock that a moment later belongs to a live order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_commit_open_order_transaction_is_never_swept() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let user = 6001;
    let id = app.new_order_id(user).await;
    let body = TestApp::order_body(&id, &[(&cat.products[0], 4)]);
    let (new, pricing) = reserve_by_hand(&app, user, &body).await;
    let shard = app.raw.of_order(new.order_id).clone();

    // insert_order's statements, up to (not including) its COMMIT.
    let mut conn = app.raw.primary(&shard).acquire().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (order_id, user_id, shop_id, status, version, currency, total_amount,
            discount_amount, pay_amount, receiver_name, receiver_phone, receiver_region,
            receiver_detail, remark, request_hash, created_at, updated_at, pay_deadline)
         VALUES (?, ?, ?, 0, 1, 'CNY', ?, 0, ?, 'n', 'p', 'r', 'd', '', ?,
                 UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), UTC_TIMESTAMP(6) + INTERVAL 1 HOUR)",
        shard.tables.orders
    )))
    .bind(new.order_id.get())
    .bind(user)
    .bind(pricing.shop_id.get())
    .bind(pricing.total_amount.minor())
    .bind(pricing.pay_amount.minor())
    .bind(&new.request_hash()[..])
    .execute(&mut *tx)
    .await
    .unwrap();
    let void: Option<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT 1 FROM {} WHERE order_id = ? LOCK IN SHARE MODE",
        shard.tables.voids
    )))
    .bind(new.order_id.get())
    .fetch_optional(&mut *tx)
    .await
    .unwrap();
    assert_eq!(void, None);

    let later = Utc::now() + TimeDelta::from_std(GRACE * 2).unwrap();
    let out = app.app.orders.sweep_once(later, GRACE, 500).await.unwrap();
    assert_eq!((out.returned, out.confirmed, out.failed), (0, 0, 1), "{out:?}");
    assert_eq!(app.stock_of(&cat.products[0]).await, 6, "stock still held");
    assert!(!is_void(&app, &id).await);

    tx.commit().await.unwrap();
    let out = app.app.orders.sweep_once(later, GRACE, 500).await.unwrap();
    assert_eq!((out.returned, out.confirmed, out.failed), (0, 1, 0), "{out:?}");
    assert_eq!(claim_state(&app, &id).await, Some(commerce::CLAIM_CONFIRMED));
    assert_eq!(app.stock_of(&cat.products[0]).await, 6);
}

// The late shard write goes through the door without `after_commit` (the testkit's entry).
#[tokio::test]
async fn stalled_commit_late_insert_after_a_void_writes_nothing() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let user = 6101;
    let coupon = app.coupon(user, 200, 0).await;
    let id = app.new_order_id(user).await;
    let mut body = TestApp::order_body(&id, &[(&cat.products[0], 2)]);
    body["coupon_ids"] = json!([coupon]);
    let (new, pricing) = reserve_by_hand(&app, user, &body).await;
    assert_eq!(app.stock_of(&cat.products[0]).await, 8);

    // The create "stalls" past the grace period: the sweeper voids the id and gives back.
    let later = Utc::now() + TimeDelta::from_std(GRACE * 2).unwrap();
    let out = app.app.orders.sweep_once(later, GRACE, 500).await.unwrap();
    assert_eq!((out.returned, out.confirmed, out.failed), (1, 0, 0), "{out:?}");
    assert!(is_void(&app, &id).await);
    assert_eq!(app.stock_of(&cat.products[0]).await, 10);
    assert_eq!(coupon_holder(&app, &coupon).await, None);

    // Then its shard write arrives: refused, nothing written.
    let shard = app.raw.of_order(new.order_id);
    let mut conn = app.raw.primary(shard).acquire().await.unwrap();
    let now = Utc::now();
    let write = orders::OrderWrite::Create {
        order: &new,
        pricing: &pricing,
        request_hash: &new.request_hash(),
        now,
        pay_deadline: now + TimeDelta::hours(1),
    };
    let written = orders::commit_without_after_commit(&mut conn, OrderDoor::Shard(&shard.tables, write))
        .await
        .unwrap();
    assert_eq!(written, Err(NotWritten::Voided));
    assert_eq!(app.count_shard_rows("orders").await, 0);
    assert_eq!(app.count_shard_rows("order_items").await, 0);
    assert_eq!(app.count_shard_rows("order_discounts").await, 0);

    // A retry through the API is told to start over, and reserves nothing.
    let (s, p) = app.create_order(user, body).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
    assert_eq!(p["code"], "validation_failed");
    assert_eq!(p["errors"][0]["field"], "order_id", "{p}");
    assert_eq!(app.stock_of(&cat.products[0]).await, 10);
    assert_eq!(app.count_commerce_rows("order_claims").await, 0);
    assert_eq!(app.count_shard_rows("orders").await, 0);
    // Nothing left for the sweeper either.
    let out = app.app.orders.sweep_once(later, GRACE, 500).await.unwrap();
    assert_eq!(out, Default::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_commit_void_landing_during_a_create_refuses_it_and_gives_back() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let user = user_on(&app, ORDERS_ONLY_SERVER, 6200);
    let coupon = app.coupon(user, 200, 0).await;
    let id = app.new_order_id(user).await;
    let mut body = TestApp::order_body(&id, &[(&cat.products[0], 3)]);
    body["coupon_ids"] = json!([coupon]);
    let oid = OrderId::parse(&id).unwrap();
    let shard = app.raw.of_order(oid).clone();

    // A sweeper's void, not yet committed: the create's early check does not see it, its
    // insert goes in, and its void check waits for this transaction.
    let mut sweeper = app.raw.primary(&shard).acquire().await.unwrap();
    let mut tx = sweeper.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (order_id, voided_at) VALUES (?, UTC_TIMESTAMP(6))",
        shard.tables.voids
    )))
    .bind(oid.get())
    .execute(&mut *tx)
    .await
    .unwrap();
    let create = spawn_create(&app, user, body.clone());
    let mut watch = admin(ORDERS_ONLY_SERVER).await;
    let db = database_name(&app, ORDERS_ONLY_SERVER);
    wait_for_session(
        &mut watch,
        &db,
        "p.info LIKE 'SELECT 1 FROM order_voids%LOCK IN SHARE MODE'",
    )
    .await;
    assert_eq!(app.stock_of(&cat.products[0]).await, 7, "reserved, waiting");
    tx.commit().await.unwrap();

    let (s, p) = create.await.unwrap();
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
    assert_eq!(p["errors"][0]["field"], "order_id", "{p}");
    // Its only attempt gave its reservation back at once.
    assert_eq!(app.stock_of(&cat.products[0]).await, 10);
    assert_eq!(coupon_holder(&app, &coupon).await, None);
    assert_eq!(app.count_commerce_rows("order_claims").await, 0);
    assert_eq!(app.count_shard_rows("orders").await, 0);
    let (s, _) = app.create_order(user, body).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_commit_claims_are_confirmed_lazily_in_batches() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[100]).await;
    // Users on both shard servers.
    let users: Vec<i64> = (0..20)
        .map(|i| user_on(&app, i % 2, 7000 + 100 * i as i64))
        .collect();
    let line: [(&str, i64); 1] = [(&cat.products[0], 1)];
    let orders = join_all(users.iter().map(|&u| app.place_order(u, &line))).await;
    let ids: Vec<String> = orders
        .iter()
        .map(|o| o["order_id"].as_str().unwrap().to_owned())
        .collect();
    // Two commits per create: the reservation and the order. The claim is not confirmed.
    for id in &ids {
        assert_eq!(
            claim_state(&app, id).await,
            Some(commerce::CLAIM_RESERVED),
            "{id}"
        );
    }
    assert_eq!(app.stock_of(&cat.products[0]).await, 80);

    // Within the grace period nothing happens.
    let out = app.app.orders.sweep_once(Utc::now(), GRACE, 500).await.unwrap();
    assert_eq!(out, Default::default());

    let later = Utc::now() + TimeDelta::from_std(GRACE * 2).unwrap();
    let out = app.app.orders.sweep_once(later, GRACE, 500).await.unwrap();
    assert_eq!((out.confirmed, out.returned, out.failed), (20, 0, 0), "{out:?}");
    for id in &ids {
        assert_eq!(
            claim_state(&app, id).await,
            Some(commerce::CLAIM_CONFIRMED),
            "{id}"
        );
        assert!(!is_void(&app, id).await);
    }
    assert_eq!(app.stock_of(&cat.products[0]).await, 80);
    let out = app.app.orders.sweep_once(later, GRACE, 500).await.unwrap();
    assert_eq!(out, Default::default());

    // A confirmed claim still releases when its order is cancelled.
    let (s, closed) = app
        .call(
            "POST",
            &format!("/v1/orders/{}/cancel", ids[0]),
            Some(&app.user_token(users[0])),
            Some(json!({"expected_version": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{closed}");
    assert_eq!(app.stock_of(&cat.products[0]).await, 81);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_commit_a_down_shard_server_does_not_hold_up_the_others() {
    let (private, app) = spawn_with_private_orders_server(10_000).await;
    let cat = app.catalog(&[100]).await;
    let line: [(&str, i64); 1] = [(&cat.products[0], 1)];
    let mut per_server = [Vec::new(), Vec::new()];
    for (i, server) in [0, 1, 0, 1, 0, 1].into_iter().enumerate() {
        let user = user_on(&app, server, 8000 + 100 * i as i64);
        let o = app.place_order(user, &line).await;
        per_server[server].push(o["order_id"].as_str().unwrap().to_owned());
    }

    private.stop_mariadb(0).await.unwrap();
    let later = Utc::now() + TimeDelta::from_std(GRACE * 2).unwrap();
    let out = app.app.orders.sweep_once(later, GRACE, 500).await.unwrap();
    assert_eq!((out.confirmed, out.returned), (3, 0), "{out:?}");
    assert!(out.failed >= 3, "{out:?}");
    for id in &per_server[0] {
        assert_eq!(claim_state(&app, id).await, Some(commerce::CLAIM_CONFIRMED));
    }
    for id in &per_server[1] {
        assert_eq!(claim_state(&app, id).await, Some(commerce::CLAIM_RESERVED));
    }
    assert_eq!(app.stock_of(&cat.products[0]).await, 94);

    // Back up, the next steps settle the rest (the first may still meet dead connections).
    private.start_mariadb(0).await.unwrap();
    let mut confirmed = 0;
    for _ in 0..5 {
        let out = app.app.orders.sweep_once(later, GRACE, 500).await.unwrap();
        assert_eq!(out.returned, 0, "{out:?}");
        confirmed += out.confirmed;
        if confirmed == 3 {
            break;
        }
    }
    assert_eq!(confirmed, 3);
    assert_eq!(app.stock_of(&cat.products[0]).await, 94);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_commit_claims_of_a_down_server_do_not_hold_the_head_of_the_queue() {
    let (private, app) = spawn_with_private_orders_server(10_000).await;
    let cat = app.catalog(&[100]).await;
    let line: [(&str, i64); 1] = [(&cat.products[0], 1)];
    // The oldest claims belong to the server that goes down.
    let mut healthy = Vec::new();
    for (i, server) in [1, 1, 1, 0, 0, 0].into_iter().enumerate() {
        let user = user_on(&app, server, 7000 + 100 * i as i64);
        let o = app.place_order(user, &line).await;
        if server == 0 {
            healthy.push(o["order_id"].as_str().unwrap().to_owned());
        }
        // Distinct touch times, so "oldest first" is well defined.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    private.stop_mariadb(0).await.unwrap();
    let later = Utc::now() + TimeDelta::from_std(GRACE * 2).unwrap();
    // A batch of three: the first step takes the down server's claims and cannot settle them.
    let out = app.app.orders.sweep_once(later, GRACE, 3).await.unwrap();
    assert_eq!((out.examined, out.confirmed, out.returned), (3, 0, 0), "{out:?}");
    // They went to the back of the queue: the next step reaches the healthy server's.
    let out = app.app.orders.sweep_once(later, GRACE, 3).await.unwrap();
    assert_eq!((out.confirmed, out.returned), (3, 0), "{out:?}");
    for id in &healthy {
        assert_eq!(claim_state(&app, id).await, Some(commerce::CLAIM_CONFIRMED));
    }
    assert_eq!(app.stock_of(&cat.products[0]).await, 94);
    private.start_mariadb(0).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_commit_a_frozen_shard_server_does_not_hold_up_the_others() {
    let (private, app) = spawn_with_private_orders_server(10_000).await;
    let cat = app.catalog(&[100]).await;
    let line: [(&str, i64); 1] = [(&cat.products[0], 1)];
    let mut per_server = [Vec::new(), Vec::new()];
    for (i, server) in [1, 0, 1, 0].into_iter().enumerate() {
        let user = user_on(&app, server, 9000 + 100 * i as i64);
        let o = app.place_order(user, &line).await;
        per_server[server].push(o["order_id"].as_str().unwrap().to_owned());
    }

    // Frozen: its connections hang instead of failing.
    private.pause_mariadb(0).unwrap();
    let later = Utc::now() + TimeDelta::from_std(GRACE * 2).unwrap();
    let orders = app.app.orders.clone();
    let sweep = tokio::spawn(async move { orders.sweep_once(later, GRACE, 500).await });
    // The other server's claims are settled while the frozen one still holds its part.
    let mut settled = false;
    for _ in 0..200 {
        let mut states = Vec::new();
        for id in &per_server[0] {
            states.push(claim_state(&app, id).await);
        }
        if states.iter().all(|s| *s == Some(commerce::CLAIM_CONFIRMED)) {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let still_running = !sweep.is_finished();
    private.resume_mariadb(0).unwrap();
    assert!(
        settled,
        "the healthy server's claims were confirmed during the stall"
    );
    assert!(
        still_running,
        "the frozen server did hold its own part of the step"
    );
    let out = sweep.await.unwrap().unwrap();
    assert_eq!(out.returned, 0, "{out:?}");
    let out = app.app.orders.sweep_once(later, GRACE, 500).await.unwrap();
    assert_eq!(out.returned, 0, "{out:?}");
    for id in per_server.iter().flatten() {
        assert_eq!(
            claim_state(&app, id).await,
            Some(commerce::CLAIM_CONFIRMED),
            "{id}"
        );
    }
    assert_eq!(app.stock_of(&cat.products[0]).await, 96);
}
