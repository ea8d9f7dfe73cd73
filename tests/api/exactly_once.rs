//! SPEC 2.1: exactly-once creation.

use sqlx::AssertSqlSafe;
use std::time::Duration;

use chrono::Utc;
use futures::future::join_all;
use orderly::domain::ids::{OrderId, UserId};
use orderly::domain::order::NewLine;
use orderly::storage::commerce::{self, Reservation};
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_creation_under_50_concurrent_identical_submits() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[100, 100]).await;
    let user = 4242;
    let id = app.new_order_id(user).await;
    let body = TestApp::order_body(&id, &[(&cat.products[0], 3), (&cat.products[1], 1)]);

    let answers = join_all((0..50).map(|_| app.create_order(user, body.clone()))).await;
    let created = answers.iter().filter(|(s, _)| *s == StatusCode::CREATED).count();
    assert_eq!(
        created,
        1,
        "exactly one 201: {:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    for (status, b) in &answers {
        assert!(
            *status == StatusCode::CREATED || *status == StatusCode::OK,
            "{status}: {b}"
        );
        assert_eq!(b, &answers[0].1, "every answer carries the same order");
    }
    assert_eq!(app.count_shard_rows("orders").await, 1);
    assert_eq!(app.count_shard_rows("order_items").await, 2);
    assert_eq!(app.count_commerce_rows("stock_reservations").await, 2);
    assert_eq!(app.stock_of(&cat.products[0]).await, 97);
    assert_eq!(app.stock_of(&cat.products[1]).await, 99);

    // A replay after success: 200 with the same body.
    let (s, again) = app.create_order(user, body.clone()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again, answers[0].1);

    // Same id, other content: refused, nothing taken.
    let changed = TestApp::order_body(&id, &[(&cat.products[0], 4)]);
    let (s, p) = app.create_order(user, changed).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(p["code"], "idempotency_conflict");
    assert_eq!(app.stock_of(&cat.products[0]).await, 97);
    assert_eq!(app.count_shard_rows("orders").await, 1);
}

#[tokio::test]
async fn exactly_once_creation_with_different_content_racing() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[100, 100]).await;
    let user = 77;
    let id = app.new_order_id(user).await;
    let a = TestApp::order_body(&id, &[(&cat.products[0], 1)]);
    let b = TestApp::order_body(&id, &[(&cat.products[1], 2)]);
    let answers =
        join_all((0..10).map(|i| app.create_order(user, if i % 2 == 0 { a.clone() } else { b.clone() })))
            .await;
    let won: Vec<_> = answers.iter().filter(|(s, _)| s.is_success()).collect();
    let refused = answers
        .iter()
        .filter(|(s, p)| *s == StatusCode::CONFLICT && p["code"] == "idempotency_conflict")
        .count();
    assert_eq!(won.len() + refused, 10);
    // Only the winning content took stock.
    let taken = (100 - app.stock_of(&cat.products[0]).await) + (100 - app.stock_of(&cat.products[1]).await);
    let winner_units: i64 = won[0].1["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["quantity"].as_i64().unwrap())
        .sum();
    assert_eq!(taken, winner_units);
    assert_eq!(app.count_shard_rows("orders").await, 1);
}

#[tokio::test]
async fn exactly_once_creation_gives_stock_back_when_the_order_write_fails() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let user = 31;
    let id = app.new_order_id(user).await;
    // Break the user's shard table so the order write fails after the reservation.
    let shard = app.raw.of_order(OrderId::parse(&id).unwrap()).clone();
    let pool = app.raw.primary(&shard).clone();
    let t = &shard.tables.orders;
    sqlx::query(AssertSqlSafe(format!("RENAME TABLE {t} TO {t}_away")))
        .execute(&pool)
        .await
        .unwrap();
    let (s, p) = app
        .create_order(user, TestApp::order_body(&id, &[(&cat.products[0], 4)]))
        .await;
    assert!(s.is_server_error(), "{s} {p}");
    assert_eq!(
        app.stock_of(&cat.products[0]).await,
        10,
        "the failed create gave its stock back"
    );
    assert_eq!(app.count_commerce_rows("order_claims").await, 0);

    // Repaired, the retry of the same request succeeds and takes the stock once.
    sqlx::query(AssertSqlSafe(format!("RENAME TABLE {t}_away TO {t}")))
        .execute(&pool)
        .await
        .unwrap();
    let (s, _) = app
        .create_order(user, TestApp::order_body(&id, &[(&cat.products[0], 4)]))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(app.stock_of(&cat.products[0]).await, 6);
}

#[tokio::test]
async fn exactly_once_creation_sweeper_returns_stock_after_a_crash() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let admin = app.admin_token();
    let coupon = app.coupon(55, 100, 0).await;
    let user = UserId::new(55).unwrap();
    let id = OrderId::parse(&app.new_order_id(55).await).unwrap();
    // The first half of a create, then the process "dies": stock and coupon taken, no order.
    let lines = [NewLine {
        product_id: cat.products[0]
            .parse()
            .ok()
            .and_then(orderly::domain::ids::ProductId::new)
            .unwrap(),
        quantity: 3,
    }];
    let coupons = [orderly::domain::ids::CouponId::parse(&coupon).unwrap()];
    let hash = [7u8; 32];
    let mut conn = app.commerce.acquire().await.unwrap();
    let r = Reservation {
        order_id: id,
        user_id: user,
        request_hash: &hash,
        attempt: 1,
        lines: &lines,
        coupons: &coupons,
        max_held_units: None,
        flash: &[],
        priced_at: chrono::Utc::now(),
        unit_prices: &[],
    };
    commerce::reserve(&mut conn, &r, Utc::now()).await.unwrap();
    assert_eq!(app.stock_of(&cat.products[0]).await, 7);

    // Within the grace period the sweeper leaves it alone (the create may still be running).
    let grace = Duration::from_secs(60);
    let out = app.app.orders.sweep_once(Utc::now(), grace, 100).await.unwrap();
    assert_eq!(out.returned, 0);
    assert_eq!(app.stock_of(&cat.products[0]).await, 7);

    // After it, the stock and the coupon come back, once.
    let later = Utc::now() + chrono::TimeDelta::seconds(61);
    let out = app.app.orders.sweep_once(later, grace, 100).await.unwrap();
    assert_eq!(out.returned, 1);
    assert_eq!(app.stock_of(&cat.products[0]).await, 10);
    let out = app.app.orders.sweep_once(later, grace, 100).await.unwrap();
    assert_eq!(out.returned, 0);
    assert_eq!(app.stock_of(&cat.products[0]).await, 10);
    let redeemed: Option<i64> = sqlx::query_scalar("SELECT redeemed_order_id FROM coupons WHERE id = ?")
        .bind(coupon.parse::<i64>().unwrap())
        .fetch_one(&app.commerce)
        .await
        .unwrap();
    assert_eq!(redeemed, None);
    let _ = admin;

    // The abandoned id is void: the late create is refused and reserves nothing.
    let late = TestApp::order_body(&id.to_string(), &[(&cat.products[0], 3)]);
    let (s, p) = app.create_order(55, late).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
    assert_eq!(p["errors"][0]["field"], "order_id", "{p}");
    assert_eq!(app.stock_of(&cat.products[0]).await, 10);

    // A claim whose order exists (creates leave it reserved) is confirmed, not returned.
    let o = app.place_order(56, &[(&cat.products[0], 1)]).await;
    let claim_state = || async {
        sqlx::query_scalar::<_, i8>("SELECT state FROM order_claims WHERE order_id = ?")
            .bind(o["order_id"].as_str().unwrap().parse::<i64>().unwrap())
            .fetch_one(&app.commerce)
            .await
            .unwrap()
    };
    assert_eq!(claim_state().await, commerce::CLAIM_RESERVED);
    let out = app.app.orders.sweep_once(later, grace, 100).await.unwrap();
    assert_eq!((out.confirmed, out.returned), (1, 0));
    assert_eq!(claim_state().await, commerce::CLAIM_CONFIRMED);
    assert_eq!(app.stock_of(&cat.products[0]).await, 9);
}

#[tokio::test]
async fn exactly_once_creation_takes_a_coupon_once() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let coupon = app.coupon(8, 500, 1000).await;
    let id = app.new_order_id(8).await;
    let mut body = TestApp::order_body(&id, &[(&cat.products[0], 2)]);
    body["coupon_ids"] = json!([coupon]);
    let (s, o) = app.create_order(8, body.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{o}");
    assert_eq!(
        (
            o["total_amount"].as_i64(),
            o["discount_amount"].as_i64(),
            o["pay_amount"].as_i64()
        ),
        (Some(2000), Some(500), Some(1500))
    );
    let (s, _) = app.create_order(8, body).await;
    assert_eq!(s, StatusCode::OK);
    // A second order cannot use it.
    let id2 = app.new_order_id(8).await;
    let mut body2 = TestApp::order_body(&id2, &[(&cat.products[0], 2)]);
    body2["coupon_ids"] = json!([coupon]);
    let (s, p) = app.create_order(8, body2).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
    assert_eq!(app.stock_of(&cat.products[0]).await, 8);
}
