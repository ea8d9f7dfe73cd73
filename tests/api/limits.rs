//! Limits: per-user rate limits on creates and ids (429, nothing written), and the cap on
//! units held by a user's unpaid orders (409 `limit_exceeded`), under concurrency and through
//! every way units are freed. The in-flight bound is tested on its middleware
//! (`http::limits` unit tests): a slow endpoint to fill it deterministically exists only there.

use std::time::Duration;

use chrono::Utc;
use futures::future::join_all;
use orderly::config::LimitSettings;
use orderly::domain::ids::{OrderId, ProductId, UserId};
use orderly::domain::order::NewLine;
use orderly::storage::commerce::{self, Reservation, ReserveOutcome};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::TestApp;

fn retry_after(headers: &reqwest::header::HeaderMap) -> u64 {
    headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After of whole seconds")
}

async fn held(app: &TestApp, user: i64) -> i64 {
    commerce::held_units(&app.commerce, UserId::new(user).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_a_burst_of_creates_from_one_user_is_refused_with_429_and_writes_nothing() {
    let app = TestApp::spawn_with(|s| {
        s.limits = LimitSettings {
            create_per_user_per_sec: 1,
            create_burst: 3,
            ..LimitSettings::off()
        }
    })
    .await;
    let cat = app.catalog(&[100]).await;
    let product = cat.products[0].clone();
    let user = 4_100;
    let token = app.user_token(user);
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(app.new_order_id(user).await);
    }
    let answers = join_all(ids.iter().map(|id| {
        let body = TestApp::order_body(id, &[(&product, 1)]);
        let token = token.clone();
        let app = &app;
        async move {
            app.call_full("POST", "/v1/orders", Some(&token), Some(body))
                .await
        }
    }))
    .await;
    let created: Vec<&String> = ids
        .iter()
        .zip(&answers)
        .filter(|(_, (s, _, _))| *s == StatusCode::CREATED)
        .map(|(id, _)| id)
        .collect();
    let refused: Vec<&String> = ids
        .iter()
        .zip(&answers)
        .filter(|(_, (s, _, b))| *s == StatusCode::TOO_MANY_REQUESTS && b["code"] == "rate_limited")
        .map(|(id, _)| id)
        .collect();
    assert_eq!(created.len() + refused.len(), 10, "{answers:?}");
    // The burst, and at most one token refilled while the ten were on their way.
    assert!((3..=4).contains(&created.len()), "{answers:?}");
    for (s, headers, body) in &answers {
        if *s == StatusCode::TOO_MANY_REQUESTS {
            let secs = retry_after(headers);
            assert!((1..=2).contains(&secs), "{secs}");
            assert_eq!(body["retry_after_secs"], secs);
        }
    }
    // Nothing written for a refused create: no order, no claim, no stock taken.
    let n = created.len() as i64;
    assert_eq!(app.count_shard_rows("orders").await, n);
    assert_eq!(app.count_commerce_rows("order_claims").await, n);
    assert_eq!(app.stock_of(&product).await, 100 - n);
    let (s, _) = app.get_order(user, refused[0]).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Another buyer has a bucket of their own.
    app.place_order(4_101, &[(&product, 1)]).await;
    // Others are not limited: an administrator's create is refused for its role, not its rate.
    for _ in 0..5 {
        let (s, p) = app
            .call(
                "POST",
                "/v1/orders",
                Some(&app.admin_token()),
                Some(TestApp::order_body(&ids[0], &[(&product, 1)])),
            )
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{p}");
    }
    // Once the bucket refills, the buyer gets through again (a refused id is still good).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, o) = app
        .create_order(user, TestApp::order_body(refused[0], &[(&product, 1)]))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{o}");
}

#[tokio::test]
async fn limits_order_ids_are_rate_limited_per_user() {
    let app = TestApp::spawn_with(|s| {
        s.limits = LimitSettings {
            ids_per_user_per_sec: 1,
            ids_burst: 2,
            ..LimitSettings::off()
        }
    })
    .await;
    let token = app.user_token(4_200);
    let answers = join_all((0..6).map(|_| app.call_full("POST", "/v1/order-ids", Some(&token), None))).await;
    let issued = answers
        .iter()
        .filter(|(s, _, _)| *s == StatusCode::CREATED)
        .count();
    assert!((2..=3).contains(&issued), "{answers:?}");
    for (s, headers, body) in &answers {
        if *s != StatusCode::CREATED {
            assert_eq!(*s, StatusCode::TOO_MANY_REQUESTS, "{body}");
            assert_eq!(body["code"], "rate_limited");
            assert!(retry_after(headers) >= 1);
        }
    }
    // Another buyer is unaffected; a merchant is refused for its role, never rate limited.
    app.new_order_id(4_201).await;
    let merchant = app.merchant_token(orderly::domain::ids::ShopId::new(1).unwrap());
    for _ in 0..4 {
        let (s, _) = app.call("POST", "/v1/order-ids", Some(&merchant), None).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
    }
}

async fn cancel(app: &TestApp, user: i64, order: &Value) -> (StatusCode, Value) {
    let id = order["order_id"].as_str().unwrap();
    app.call(
        "POST",
        &format!("/v1/orders/{id}/cancel"),
        Some(&app.user_token(user)),
        Some(json!({"expected_version": order["version"]})),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_unpaid_units_never_exceed_the_cap_and_paying_or_cancelling_frees_them() {
    const CAP: i64 = 10;
    let app = TestApp::spawn_with(|s| s.limits.max_unpaid_units_per_user = CAP as u32).await;
    let cat = app.catalog(&[1000]).await;
    let product = cat.products[0].clone();
    let user = 4_300;
    let mut ids = Vec::new();
    for _ in 0..50 {
        ids.push(app.new_order_id(user).await);
    }
    let answers = join_all(ids.iter().map(|id| {
        let app = &app;
        let body = TestApp::order_body(id, &[(&product, 1)]);
        async move { app.create_order(user, body).await }
    }))
    .await;
    let created: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .map(|(_, o)| o)
        .collect();
    let refused = answers
        .iter()
        .filter(|(s, p)| *s == StatusCode::CONFLICT && p["code"] == "limit_exceeded")
        .count();
    assert_eq!(
        (created.len(), refused),
        (CAP as usize, 50 - CAP as usize),
        "{:?}",
        answers
            .iter()
            .find(|(s, _)| !s.is_success() && *s != StatusCode::CONFLICT)
    );
    assert_eq!(held(&app, user).await, CAP);
    assert_eq!(app.stock_of(&product).await, 1000 - CAP);
    assert_eq!(app.count_commerce_rows("order_claims").await, CAP);
    let (_, p) = answers.iter().find(|(s, _)| *s == StatusCode::CONFLICT).unwrap();
    assert_eq!(
        (p["held_units"].as_i64(), p["max_unpaid_units"].as_i64()),
        (Some(CAP), Some(CAP))
    );

    // A replay of an accepted create counts nothing twice.
    let first = created[0]["order_id"].as_str().unwrap();
    let (s, _) = app
        .create_order(user, TestApp::order_body(first, &[(&product, 1)]))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(held(&app, user).await, CAP);

    // Paying frees the order's units, once (the channel's retry frees nothing more).
    let (s, paid) = app.pay(created[0]).await;
    assert_eq!(s, StatusCode::OK, "{paid}");
    let (s, _) = app.pay(created[0]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(held(&app, user).await, CAP - 1);
    let again = app.place_order(user, &[(&product, 1)]).await;
    assert_eq!(held(&app, user).await, CAP);
    let fresh = app.new_order_id(user).await;
    let (s, p) = app
        .create_order(user, TestApp::order_body(&fresh, &[(&product, 1)]))
        .await;
    assert_eq!(
        (s, p["code"].as_str()),
        (StatusCode::CONFLICT, Some("limit_exceeded"))
    );

    // Cancelling frees them too; a refund of the paid order frees nothing more.
    let (s, c) = cancel(&app, user, &again).await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(held(&app, user).await, CAP - 1);
    let (s, r) = app
        .call(
            "POST",
            &format!("/v1/orders/{}/refunds", first),
            Some(&app.service_token()),
            Some(json!({"refund_no": format!("rf-{first}"), "amount": paid["pay_amount"]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(held(&app, user).await, CAP - 1);

    // An order alone above the cap is refused, whatever is held.
    let id = app.new_order_id(4_301).await;
    let (s, p) = app
        .create_order(4_301, TestApp::order_body(&id, &[(&product, CAP + 1)]))
        .await;
    assert_eq!(
        (s, p["code"].as_str(), p["held_units"].as_i64()),
        (StatusCode::CONFLICT, Some("limit_exceeded"), Some(0))
    );
    assert_eq!(held(&app, 4_301).await, 0);

    // The payment timeout frees what is left.
    let later = Utc::now() + chrono::TimeDelta::days(1);
    let out = app.app.orders.close_expired_once(later, 100).await.unwrap();
    assert_eq!(out.closed, CAP as usize - 1);
    assert_eq!(held(&app, user).await, 0);
    assert_eq!(app.stock_of(&product).await, 1000);
}

/// A reservation whose order never appears holds units until the sweeper gives it back.
#[tokio::test]
async fn limits_units_of_an_abandoned_reservation_are_freed_by_the_sweeper() {
    let app = TestApp::spawn_with(|s| s.limits.max_unpaid_units_per_user = 5).await;
    let cat = app.catalog(&[10]).await;
    let user = 4_400;
    let id = OrderId::parse(&app.new_order_id(user).await).unwrap();
    let lines = [NewLine {
        product_id: ProductId::new(cat.products[0].parse().unwrap()).unwrap(),
        quantity: 4,
    }];
    let r = Reservation {
        order_id: id,
        user_id: UserId::new(user).unwrap(),
        request_hash: &[9u8; 32],
        attempt: 1,
        lines: &lines,
        coupons: &[],
        max_held_units: Some(5),
        flash: &[],
        priced_at: chrono::Utc::now(),
        unit_prices: &[],
    };
    let mut conn = app.commerce.acquire().await.unwrap();
    assert_eq!(
        commerce::reserve(&mut conn, &r, Utc::now()).await.unwrap(),
        ReserveOutcome::Reserved
    );
    // The same attempt again (a retry) counts nothing more.
    assert_eq!(
        commerce::reserve(&mut conn, &r, Utc::now()).await.unwrap(),
        ReserveOutcome::AlreadyReserved
    );
    assert_eq!(held(&app, user).await, 4);
    let (s, p) = app
        .create_order(
            user,
            TestApp::order_body(&app.new_order_id(user).await, &[(&cat.products[0], 2)]),
        )
        .await;
    assert_eq!(
        (s, p["code"].as_str()),
        (StatusCode::CONFLICT, Some("limit_exceeded"))
    );

    let later = Utc::now() + chrono::TimeDelta::seconds(61);
    let out = app
        .app
        .orders
        .sweep_once(later, Duration::from_secs(60), 100)
        .await
        .unwrap();
    assert_eq!(out.returned, 1);
    assert_eq!(held(&app, user).await, 0);
    app.place_order(user, &[(&cat.products[0], 5)]).await;
    assert_eq!(held(&app, user).await, 5);
}
