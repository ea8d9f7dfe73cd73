//! The cart (SPEC 6, issue 13): Redis write-behind with a bounded loss window. Concurrent
//! writers then a flush (MySQL equals Redis, a change racing the flush stays dirty), Redis
//! restarted empty (only the unflushed changes are lost), Redis down and partitioned (MySQL
//! directly, never an older copy served after), two flushers at once (nothing regresses),
//! concurrent first changes of fresh carts in MySQL (none lost), checkout from the cart
//! replayed (one order, the lines removed once), and bad input.
//!
//! The flusher loop of these apps runs once an hour: the tests drive `flush_once` themselves.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use orderly::config::Settings;
use orderly::domain::ids::UserId;
use orderly::redis::cart::{bucket_of, cart_key, dirty_key};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{own_redis, TestApp};

/// Carts as the tests compare them: product id → quantity.
type Lines = BTreeMap<i64, i64>;

fn quiet_flusher(s: &mut Settings) {
    s.cart.loss_window_ms = 3_600_000;
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("redis")
}

/// The cart Redis holds for `user`: (version, lines), `None` when there is none.
async fn in_redis(app: &TestApp, user: i64) -> Option<(i64, Lines)> {
    let mut r = redis_conn(&app.settings.redis.url).await;
    let key = cart_key(&app.settings.redis.key_prefix, UserId::new(user).unwrap());
    let h: BTreeMap<String, String> = redis::cmd("HGETALL").arg(key).query_async(&mut r).await.ok()?;
    let version = h.get("_v")?.parse().unwrap();
    let lines = h
        .iter()
        .filter(|(k, _)| !k.starts_with('_'))
        .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
        .collect();
    Some((version, lines))
}

/// The user's score in the dirty set (`None`: not dirty).
async fn dirty_score(app: &TestApp, user: i64) -> Option<i64> {
    let mut r = redis_conn(&app.settings.redis.url).await;
    let u = UserId::new(user).unwrap();
    let key = dirty_key(&app.settings.redis.key_prefix, bucket_of(u));
    let s: Option<f64> = redis::cmd("ZSCORE")
        .arg(key)
        .arg(user)
        .query_async(&mut r)
        .await
        .unwrap();
    s.map(|s| s as i64)
}

/// The cart MySQL holds for `user`: (version, lines); (0, empty) when none.
async fn in_mysql(app: &TestApp, user: i64) -> (i64, Lines) {
    let c = orderly::storage::carts::load(&app.commerce, UserId::new(user).unwrap())
        .await
        .unwrap();
    let lines = c.cart.lines.iter().map(|(p, q)| (p.get(), *q)).collect();
    (c.version, lines)
}

async fn put(app: &TestApp, user: i64, product: &str, quantity: i64) -> (StatusCode, Value) {
    app.call(
        "PUT",
        &format!("/v1/cart/items/{product}"),
        Some(&app.user_token(user)),
        Some(json!({ "quantity": quantity })),
    )
    .await
}

async fn put_ok(app: &TestApp, user: i64, product: &str, quantity: i64) {
    let (s, b) = put(app, user, product, quantity).await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

/// `GET /v1/cart` as lines (asserts 200).
async fn get_lines(app: &TestApp, user: i64) -> Lines {
    let (s, b) = app
        .call("GET", "/v1/cart", Some(&app.user_token(user)), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["product_id"].as_str().unwrap().parse().unwrap(),
                i["quantity"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn lines(pairs: &[(&str, i64)]) -> Lines {
    pairs.iter().map(|(p, q)| (p.parse().unwrap(), *q)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cart_concurrent_writers_then_a_flush_mysql_equals_redis_and_a_racing_change_stays_dirty() {
    let app = TestApp::spawn_with(quiet_flusher).await;
    let cat = app.catalog(&[10; 16]).await;
    let user = 8101;
    let writers = (0..64).map(|i| {
        let (app, cat) = (&app, &cat);
        async move {
            for j in 0..5usize {
                let product = &cat.products[(i * 7 + j * 3) % 16];
                put_ok(app, user, product, ((i + j) % 4) as i64).await;
            }
        }
    });
    join_all(writers).await;
    let (version, redis_lines) = in_redis(&app, user).await.expect("the cart is in Redis");
    assert_eq!(
        dirty_score(&app, user).await,
        Some(version),
        "dirty at its last version"
    );
    assert_eq!(
        in_mysql(&app, user).await,
        (0, Lines::new()),
        "nothing written yet"
    );

    let carts = app.app.orders.carts().clone();
    let out = carts.flush_once().await.unwrap();
    assert_eq!(out.written, 1, "{out:?}");
    assert_eq!(
        in_mysql(&app, user).await,
        (version, redis_lines.clone()),
        "MySQL equals Redis"
    );
    assert_eq!(dirty_score(&app, user).await, None, "flushed: no longer dirty");
    assert_eq!(get_lines(&app, user).await, redis_lines);

    // A change between the flush's read of Redis and its write of MySQL.
    let racing = &cat.products[0];
    let out = carts
        .flush_once_paused(async {
            put_ok(&app, user, racing, 9).await;
        })
        .await
        .unwrap();
    assert_eq!(out.written, 0, "nothing was dirty when the flush read: {out:?}");
    let out = carts
        .flush_once_paused(async {
            put_ok(&app, user, racing, 7).await;
        })
        .await
        .unwrap();
    assert_eq!(out.written, 1, "{out:?}");
    let (version, now) = in_redis(&app, user).await.unwrap();
    assert_eq!(now[&racing.parse::<i64>().unwrap()], 7);
    assert_eq!(
        dirty_score(&app, user).await,
        Some(version),
        "the change that raced the flush stays dirty"
    );
    assert_ne!(in_mysql(&app, user).await, (version, now.clone()));
    carts.flush_once().await.unwrap();
    assert_eq!(
        in_mysql(&app, user).await,
        (version, now),
        "the next flush writes it"
    );
    assert_eq!(dirty_score(&app, user).await, None);

    // An emptied cart is flushed as empty, not skipped.
    let (s, b) = app
        .call("DELETE", "/v1/cart", Some(&app.user_token(user)), None)
        .await;
    assert_eq!(
        (s, b["items"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(0)),
        "{b}"
    );
    carts.flush_once().await.unwrap();
    let (v, l) = in_mysql(&app, user).await;
    assert_eq!((v, l), (version + 1, Lines::new()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cart_redis_restarted_empty_loses_exactly_the_unflushed_changes_and_down_goes_to_mysql() {
    let redis = own_redis().await;
    let url = redis.redis_url().unwrap();
    let app = TestApp::spawn_with(|s| {
        quiet_flusher(s);
        s.redis.url = url.clone();
        s.cache.probe_interval_ms = 100;
    })
    .await;
    let cat = app.catalog(&[10; 6]).await;
    let p = |i: usize| cat.products[i].as_str();
    let user = 8201;
    let carts = app.app.orders.carts().clone();
    put_ok(&app, user, p(0), 1).await;
    put_ok(&app, user, p(1), 2).await;
    put_ok(&app, user, p(2), 3).await;
    carts.flush_once().await.unwrap();
    let flushed = lines(&[(p(0), 1), (p(1), 2), (p(2), 3)]);
    // Within the loss window: not flushed.
    put_ok(&app, user, p(1), 5).await;
    put_ok(&app, user, p(3), 4).await;
    put_ok(&app, user, p(2), 0).await;
    assert_eq!(
        get_lines(&app, user).await,
        lines(&[(p(0), 1), (p(1), 5), (p(3), 4)])
    );

    redis.kill_redis().unwrap();
    redis.start_redis_empty().await.unwrap();
    // Exactly the flushed cart comes back: the three unflushed changes are the ones lost.
    let mut back = false;
    for _ in 0..50 {
        assert_eq!(get_lines(&app, user).await, flushed);
        if in_redis(&app, user).await.map(|(_, l)| l) == Some(flushed.clone()) {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "the cart is read back from MySQL into Redis");
    // A change after the restart starts from the cart read back, not from a blank one.
    put_ok(&app, user, p(4), 1).await;
    let mut expect = flushed.clone();
    expect.insert(p(4).parse().unwrap(), 1);
    assert_eq!(get_lines(&app, user).await, expect);
    carts.flush_once().await.unwrap();
    assert_eq!(in_mysql(&app, user).await.1, expect);

    // Redis down: reads and changes go to MySQL directly, slower, not failing.
    redis.kill_redis().unwrap();
    put_ok(&app, user, p(5), 2).await;
    expect.insert(p(5).parse().unwrap(), 2);
    assert_eq!(get_lines(&app, user).await, expect);
    assert_eq!(in_mysql(&app, user).await.1, expect, "written to MySQL at once");
    redis.start_redis_empty().await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        get_lines(&app, user).await,
        expect,
        "read back after Redis returned"
    );

    // Partitioned (frozen, not restarted): Redis keeps its older copy while a change goes to
    // MySQL; once it answers again, the older copy is never served.
    for _ in 0..50 {
        if in_redis(&app, user).await.is_some() {
            break;
        }
        get_lines(&app, user).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(in_redis(&app, user).await.map(|(_, l)| l), Some(expect.clone()));
    // A change Redis holds unflushed when it stops answering: the older copy is ahead of
    // MySQL by it. The change made in MySQL meanwhile wins; this one is lost with the copy.
    put_ok(&app, user, p(2), 7).await;
    redis.pause_redis().unwrap();
    put_ok(&app, user, p(0), 6).await;
    redis.resume_redis().unwrap();
    expect.insert(p(0).parse().unwrap(), 6);
    // Another process's flusher, which never wrote to MySQL itself, meets the older copy
    // dirty: it does not write it over MySQL's, and drops it.
    let twin = app.twin().await;
    twin.app.orders.carts().flush_once().await.unwrap();
    assert_eq!(
        in_mysql(&app, user).await.1,
        expect,
        "the older copy was flushed over MySQL's"
    );
    assert_eq!(
        in_redis(&app, user).await,
        None,
        "the older copy is still in Redis"
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    for _ in 0..10 {
        assert_eq!(
            get_lines(&app, user).await,
            expect,
            "an older Redis copy was served"
        );
        assert_eq!(
            get_lines(&twin, user).await,
            expect,
            "another process served the older copy"
        );
    }
    put_ok(&twin, user, p(1), 1).await;
    expect.insert(p(1).parse().unwrap(), 1);
    carts.flush_once().await.unwrap();
    assert_eq!(
        in_mysql(&app, user).await.1,
        expect,
        "a change after the partition is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cart_two_flushers_at_once_write_every_cart_and_never_regress() {
    let app = TestApp::spawn_with(quiet_flusher).await;
    let twin = app.twin().await;
    let cat = app.catalog(&[10; 4]).await;
    let (a, b) = (app.app.orders.carts().clone(), twin.app.orders.carts().clone());

    // Flusher A reads version 1, another change and flusher B write version 2, then A
    // writes what it read: refused, MySQL stays at 2.
    let user = 8301;
    put_ok(&app, user, &cat.products[0], 1).await;
    let out = a
        .flush_once_paused(async {
            put_ok(&app, user, &cat.products[0], 2).await;
            b.flush_once().await.unwrap();
        })
        .await
        .unwrap();
    assert_eq!(out.written, 1, "{out:?}");
    assert_eq!(
        in_mysql(&app, user).await,
        (2, lines(&[(&cat.products[0], 2)])),
        "a slow flusher put an older cart back"
    );
    assert_eq!(dirty_score(&app, user).await, None);

    // Many carts changing while both flushers run in loops; MySQL's versions never go
    // down, and after a last flush every cart in MySQL equals Redis.
    let users: Vec<i64> = (8400..8460).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let flusher = |c: Arc<orderly::service::cart::CartService>, stop: Arc<AtomicBool>| async move {
        while !stop.load(Ordering::Relaxed) {
            c.flush_once().await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let fa = tokio::spawn(flusher(a.clone(), stop.clone()));
    let fb = tokio::spawn(flusher(b.clone(), stop.clone()));
    let monitor = {
        let (commerce, stop) = (app.commerce.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen: BTreeMap<i64, i64> = BTreeMap::new();
            let mut samples = 0;
            while !stop.load(Ordering::Relaxed) {
                let rows: Vec<(i64, i64)> =
                    sqlx::query_as("SELECT user_id, version FROM carts WHERE user_id BETWEEN 8400 AND 8459")
                        .fetch_all(&commerce)
                        .await
                        .unwrap();
                for (u, v) in rows {
                    let before = seen.insert(u, v).unwrap_or(0);
                    assert!(
                        v >= before,
                        "user {u}: MySQL went from version {before} back to {v}"
                    );
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            samples
        })
    };
    let writers = users.iter().map(|&u| {
        let (app, twin, cat) = (&app, &twin, &cat);
        async move {
            for j in 0..8usize {
                let via = if j % 2 == 0 { app } else { twin };
                put_ok(via, u, &cat.products[j % 4], (j as i64 + u) % 5).await;
            }
        }
    });
    join_all(writers).await;
    stop.store(true, Ordering::Relaxed);
    fa.await.unwrap();
    fb.await.unwrap();
    let samples = monitor.await.unwrap();
    assert!(samples > 3, "the monitor sampled MySQL {samples} times");
    let (x, y) = tokio::join!(a.flush_once(), b.flush_once());
    x.unwrap();
    y.unwrap();
    for &u in &users {
        let redis = in_redis(&app, u).await.expect("cart in Redis");
        assert_eq!(in_mysql(&app, u).await, redis, "user {u}");
        assert_eq!(dirty_score(&app, u).await, None, "user {u} still dirty");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cart_concurrent_first_changes_in_mysql_lose_no_line() {
    // No Redis: every change is a read-modify-write of the MySQL row, and a fresh cart has
    // no row yet for the first changes to lock.
    let app = TestApp::spawn_with(|s| s.cache.enabled = false).await;
    const PRODUCTS: usize = 6;
    let cat = app.catalog(&[10; PRODUCTS]).await;
    let users: Vec<i64> = (8501..8531).collect();
    // Every product is known to the service before the race, so the changes start together.
    put_ok(&app, 8500, &cat.products[0], 1).await;
    for p in &cat.products {
        put_ok(&app, 8500, p, 1).await;
    }
    let changes = users.iter().flat_map(|&user| {
        cat.products
            .iter()
            .enumerate()
            .map(move |(i, p)| (user, p, i as i64 + 1))
    });
    join_all(changes.map(|(user, p, q)| {
        let app = &app;
        async move { put_ok(app, user, p, q).await }
    }))
    .await;
    let want: Lines = cat
        .products
        .iter()
        .enumerate()
        .map(|(i, p)| (p.parse().unwrap(), i as i64 + 1))
        .collect();
    let mut lost = Vec::new();
    for &user in &users {
        let (version, stored) = in_mysql(&app, user).await;
        if stored != want || version != PRODUCTS as i64 {
            lost.push((user, version, stored.len()));
        }
    }
    assert_eq!(
        lost,
        Vec::<(i64, i64, usize)>::new(),
        "carts (user, version, lines) that lost a change; each should hold {PRODUCTS} lines at version {PRODUCTS}"
    );
    assert_eq!(get_lines(&app, users[0]).await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cart_checkout_replayed_ten_times_is_one_order_and_removes_the_lines_once() {
    let app = TestApp::spawn_with(quiet_flusher).await;
    let cat = app.catalog(&[100, 100, 100]).await;
    let p = |i: usize| cat.products[i].as_str();
    let user = 8501;
    let token = app.user_token(user);
    put_ok(&app, user, p(0), 3).await;
    put_ok(&app, user, p(1), 1).await;
    put_ok(&app, user, p(2), 2).await;

    let (s, priced) = app
        .call(
            "POST",
            "/v1/orders/preview",
            Some(&token),
            Some(json!({"from_cart": true})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{priced}");
    assert_eq!(priced["total_amount"], 6000);

    let id = app.new_order_id(user).await;
    let body = json!({
        "order_id": id, "from_cart": true,
        "address": {"name": "Li Lei", "phone": "13800000000", "detail": "1 Century Avenue"},
    });
    let answers = join_all((0..10).map(|_| app.create_order(user, body.clone()))).await;
    let created = answers.iter().filter(|(s, _)| *s == StatusCode::CREATED).count();
    assert_eq!(created, 1, "{answers:?}");
    for (s, o) in &answers {
        assert!(s.is_success(), "{s} {o}");
        assert_eq!(o["order_id"], id.as_str());
        let items: Lines = o["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["product_id"].as_str().unwrap().parse().unwrap(),
                    i["quantity"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(items, lines(&[(p(0), 3), (p(1), 1), (p(2), 2)]));
    }
    assert_eq!(app.count_shard_rows("orders").await, 1);
    assert_eq!(
        get_lines(&app, user).await,
        Lines::new(),
        "the purchased lines are removed"
    );
    assert_eq!(
        [
            app.stock_of(p(0)).await,
            app.stock_of(p(1)).await,
            app.stock_of(p(2)).await
        ],
        [97, 99, 98]
    );

    // The buyer adds to the cart again; later replays answer the order and remove nothing.
    put_ok(&app, user, p(0), 2).await;
    for _ in 0..10 {
        let (s, o) = app.create_order(user, body.clone()).await;
        assert_eq!(s, StatusCode::OK, "{o}");
    }
    assert_eq!(get_lines(&app, user).await, lines(&[(p(0), 2)]));
    app.app.orders.carts().flush_once().await.unwrap();
    assert_eq!(in_mysql(&app, user).await.1, lines(&[(p(0), 2)]));
    assert_eq!(app.count_shard_rows("orders").await, 1);

    // The same id with other content is still a conflict, not a replay.
    let mut other = body.clone();
    other["remark"] = json!("another");
    let (s, b) = app.create_order(user, other).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::CONFLICT, Some("idempotency_conflict")),
        "{b}"
    );
}

#[tokio::test]
async fn cart_bad_input_is_a_clear_4xx_and_changes_nothing() {
    let app = TestApp::spawn_with(quiet_flusher).await;
    let cat = app.catalog(&[1; 101]).await;
    let user = 8601;
    let token = app.user_token(user);
    for (i, product) in cat.products.iter().take(100).enumerate() {
        put_ok(&app, user, product, i as i64 % 3 + 1).await;
    }
    let before = in_redis(&app, user).await.unwrap();
    let p0 = &cat.products[0];
    for (path, body) in [
        (format!("/v1/cart/items/{p0}"), json!({"quantity": -1})),
        (format!("/v1/cart/items/{p0}"), json!({"quantity": 10_001})),
        (format!("/v1/cart/items/{p0}"), json!({"quantity": "1"})),
        (format!("/v1/cart/items/{p0}"), json!({"quantity": 1, "price": 1})),
        (format!("/v1/cart/items/{p0}"), json!({})),
        ("/v1/cart/items/99999999".to_owned(), json!({"quantity": 1})),
        ("/v1/cart/items/abc".to_owned(), json!({"quantity": 1})),
        ("/v1/cart/items/-1".to_owned(), json!({"quantity": 1})),
        // A 101st line.
        (
            format!("/v1/cart/items/{}", cat.products[100]),
            json!({"quantity": 1}),
        ),
    ] {
        let (s, b) = app.call("PUT", &path, Some(&token), Some(body.clone())).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{path} {body}: {b}");
        assert_eq!(b["code"], "validation_failed", "{b}");
    }
    let (s, b) = app
        .call_raw(
            "PUT",
            &format!("/v1/cart/items/{p0}"),
            &token,
            "{".into(),
            "application/json",
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert_eq!(in_redis(&app, user).await.unwrap(), before, "nothing changed");
    assert_eq!(dirty_score(&app, user).await, Some(before.0));

    // Checkout: items and from_cart together, and an empty cart, are refused.
    let id = app.new_order_id(user).await;
    let mut both = TestApp::order_body(&id, &[(p0, 1)]);
    both["from_cart"] = json!(true);
    let (s, b) = app.create_order(user, both).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    let empty = 8602;
    let id = app.new_order_id(empty).await;
    let body = json!({"order_id": id, "from_cart": true,
                      "address": {"name": "Li Lei", "phone": "13800000000", "detail": "1 Century Avenue"}});
    let (s, b) = app.create_order(empty, body).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["errors"][0]["field"], "from_cart", "{b}");
    let (s, b) = app
        .call(
            "POST",
            "/v1/orders/preview",
            Some(&app.user_token(empty)),
            Some(json!({"from_cart": true})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(app.count_shard_rows("orders").await, 0);
    assert_eq!(app.count_commerce_rows("order_claims").await, 0);
}
