//! The order life cycle through the API: every move, money handling, and stock and coupons
//! given back exactly once.

use chrono::Utc;
use reqwest::StatusCode;
use serde_json::json;
use sqlx::AssertSqlSafe;

use crate::helpers::TestApp;

#[tokio::test]
async fn lifecycle_create_pay_ship_confirm() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let user = 700;
    let token = app.user_token(user);
    let order = app.place_order(user, &[(&cat.products[0], 2)]).await;
    let id = order["order_id"].as_str().unwrap();
    assert_eq!(
        (
            order["status"].as_str(),
            order["status_code"].as_i64(),
            order["version"].as_i64()
        ),
        (Some("pending_payment"), Some(0), Some(1))
    );
    assert_eq!(order["pay_amount"], 2000);
    assert_eq!(order["items"][0]["line_total"], 2000);
    assert_eq!(order["currency"], "CNY");

    let (s, paid) = app.pay(&order).await;
    assert_eq!(s, StatusCode::OK, "{paid}");
    assert_eq!(
        (paid["status"].as_str(), paid["version"].as_i64()),
        (Some("awaiting_shipment"), Some(2))
    );
    assert!(paid["paid_at"].is_string());
    // The channel calls back twice: same answer, one payment.
    let (s, again) = app.pay(&order).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again, paid);
    assert_eq!(again["payments"].as_array().unwrap().len(), 1);

    // Confirm before shipment is not a move of the machine.
    let (s, p) = app
        .call(
            "POST",
            &format!("/v1/orders/{id}/confirm"),
            Some(&token),
            Some(json!({"expected_version": 2})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(
        (p["code"].as_str(), p["current_status"].as_str()),
        (Some("invalid_transition"), Some("awaiting_shipment"))
    );

    let merchant = app.merchant_token(cat.shop);
    let (s, shipped) = app
        .call(
            "POST",
            &format!("/v1/orders/{id}/shipment"),
            Some(&merchant),
            Some(json!({"expected_version": 2, "carrier": "SF", "tracking_number": "SF001"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{shipped}");
    assert_eq!(
        (
            shipped["status"].as_str(),
            shipped["tracking_number"].as_str(),
            shipped["version"].as_i64()
        ),
        (Some("shipped"), Some("SF001"), Some(3))
    );

    // The buyer cannot change the address once shipped.
    let (s, p) = app
        .call(
            "PATCH",
            &format!("/v1/orders/{id}"),
            Some(&token),
            Some(json!({"expected_version": 3, "remark": "late"})),
        )
        .await;
    assert_eq!(
        (s, p["code"].as_str()),
        (StatusCode::CONFLICT, Some("invalid_transition"))
    );

    let (s, done) = app
        .call(
            "POST",
            &format!("/v1/orders/{id}/confirm"),
            Some(&token),
            Some(json!({"expected_version": 3})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (
            done["status"].as_str(),
            done["status_code"].as_i64(),
            done["version"].as_i64()
        ),
        (Some("completed"), Some(3), Some(4))
    );
    assert!(done["completed_at"].is_string());
    assert_eq!(
        app.stock_of(&cat.products[0]).await,
        8,
        "a completed order keeps its stock"
    );
}

#[tokio::test]
async fn lifecycle_cancel_gives_stock_and_coupon_back_once() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let user = 701;
    let coupon = app.coupon(user, 300, 0).await;
    let id = app.new_order_id(user).await;
    let mut body = TestApp::order_body(&id, &[(&cat.products[0], 4)]);
    body["coupon_ids"] = json!([coupon]);
    let (s, order) = app.create_order(user, body).await;
    assert_eq!(s, StatusCode::CREATED, "{order}");
    assert_eq!(app.stock_of(&cat.products[0]).await, 6);

    let token = app.user_token(user);
    let (s, closed) = app
        .call(
            "POST",
            &format!("/v1/orders/{id}/cancel"),
            Some(&token),
            Some(json!({"expected_version": 1, "reason": "changed my mind"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{closed}");
    assert_eq!(
        (closed["status"].as_str(), closed["close_reason"].as_str()),
        (Some("closed"), Some("changed my mind"))
    );
    assert_eq!(app.stock_of(&cat.products[0]).await, 10);
    // Cancelling again changes nothing.
    let (s, _) = app
        .call(
            "POST",
            &format!("/v1/orders/{id}/cancel"),
            Some(&token),
            Some(json!({"expected_version": 2})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    // A sweep does not release twice.
    app.app
        .orders
        .sweep_once(
            Utc::now() + chrono::TimeDelta::hours(1),
            std::time::Duration::from_secs(60),
            100,
        )
        .await
        .unwrap();
    assert_eq!(app.stock_of(&cat.products[0]).await, 10);
    // The coupon can be used again.
    let id2 = app.new_order_id(user).await;
    let mut body2 = TestApp::order_body(&id2, &[(&cat.products[0], 1)]);
    body2["coupon_ids"] = json!([coupon]);
    let (s, o2) = app.create_order(user, body2).await;
    assert_eq!(s, StatusCode::CREATED, "{o2}");
    assert_eq!(o2["discount_amount"], 300);
}

#[tokio::test]
async fn lifecycle_sweeper_finishes_a_release_the_close_could_not() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let order = app.place_order(702, &[(&cat.products[0], 3)]).await;
    let id: i64 = order["order_id"].as_str().unwrap().parse().unwrap();
    // As if the process died between closing the order and giving the stock back.
    let shard = app
        .raw
        .of_order(orderly::domain::ids::OrderId::new(id).unwrap())
        .clone();
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {} SET status = 4, version = version + 1, release_pending = 1 WHERE order_id = ?",
        shard.tables.orders
    )))
    .bind(id)
    .execute(app.raw.primary(&shard))
    .await
    .unwrap();
    assert_eq!(app.stock_of(&cat.products[0]).await, 7);
    let later = Utc::now() + chrono::TimeDelta::hours(1);
    let out = app
        .app
        .orders
        .sweep_once(later, std::time::Duration::from_secs(60), 100)
        .await
        .unwrap();
    assert_eq!(out.released, 1);
    assert_eq!(app.stock_of(&cat.products[0]).await, 10);
    let out = app
        .app
        .orders
        .sweep_once(later, std::time::Duration::from_secs(60), 100)
        .await
        .unwrap();
    assert_eq!(out.released, 0);
    assert_eq!(app.stock_of(&cat.products[0]).await, 10);
}

#[tokio::test]
async fn lifecycle_refunds_and_invalidation() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let user = 703;
    let service = app.service_token();
    let admin = app.admin_token();

    // Partial then full refund of a paid order: closed, stock back.
    let order = app.place_order(user, &[(&cat.products[0], 2)]).await;
    let id = order["order_id"].as_str().unwrap();
    app.pay(&order).await;
    let refunds = format!("/v1/orders/{id}/refunds");
    let (s, part) = app
        .call(
            "POST",
            &refunds,
            Some(&service),
            Some(json!({"refund_no": "rf-a", "amount": 500, "reason": "broken"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{part}");
    assert_eq!(part["status"], "awaiting_shipment");
    let (s, too_much) = app
        .call(
            "POST",
            &refunds,
            Some(&service),
            Some(json!({"refund_no": "rf-b", "amount": 1600})),
        )
        .await;
    assert_eq!(
        (s, too_much["code"].as_str()),
        (StatusCode::CONFLICT, Some("payment_mismatch"))
    );
    let (s, full) = app
        .call(
            "POST",
            &refunds,
            Some(&service),
            Some(json!({"refund_no": "rf-c", "amount": 1500})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{full}");
    assert_eq!(full["status"], "closed");
    assert_eq!(app.stock_of(&cat.products[0]).await, 10);
    // Replay of a refund: same answer.
    let (s, again) = app
        .call(
            "POST",
            &refunds,
            Some(&service),
            Some(json!({"refund_no": "rf-c", "amount": 1500})),
        )
        .await;
    assert_eq!(
        (s, again["version"].clone()),
        (StatusCode::OK, full["version"].clone())
    );

    // Invalidating a paid order: invalid, flagged for refund, stock back.
    let order = app.place_order(user, &[(&cat.products[0], 1)]).await;
    let id = order["order_id"].as_str().unwrap();
    let (_, paid) = app.pay(&order).await;
    let (s, inv) = app
        .call(
            "POST",
            &format!("/v1/orders/{id}/invalidate"),
            Some(&admin),
            Some(json!({"expected_version": paid["version"], "reason": "fraud"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{inv}");
    assert_eq!(
        (
            inv["status"].as_str(),
            inv["status_code"].as_i64(),
            inv["refund_required"].as_bool()
        ),
        (Some("invalid"), Some(5), Some(true))
    );
    assert_eq!(app.stock_of(&cat.products[0]).await, 10);
    // Refunding it settles the flag.
    let (s, settled) = app
        .call(
            "POST",
            &format!("/v1/orders/{id}/refunds"),
            Some(&service),
            Some(json!({"refund_no": "rf-d", "amount": 1000})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{settled}");
    assert_eq!(settled["refund_required"], false);

    // A transaction number belongs to one order.
    let other = app.place_order(user, &[(&cat.products[0], 1)]).await;
    let oid = other["order_id"].as_str().unwrap();
    let (s, p) = app
        .call(
            "POST",
            &format!("/v1/orders/{oid}/payments"),
            Some(&service),
            Some(json!({"transaction_no": format!("tx-{id}"), "channel": "alipay", "amount": 1000})),
        )
        .await;
    assert_eq!(
        (s, p["code"].as_str()),
        (StatusCode::CONFLICT, Some("idempotency_conflict"))
    );
}

#[tokio::test]
async fn lifecycle_preview_prices_without_side_effects() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10, 10]).await;
    let user = 704;
    let coupon = app.coupon(user, 700, 2000).await;
    let (s, price) = app
        .call(
            "POST",
            "/v1/orders/preview",
            Some(&app.user_token(user)),
            Some(json!({"items": [{"product_id": cat.products[0], "quantity": 2}, {"product_id": cat.products[1], "quantity": 1}], "coupon_ids": [coupon]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{price}");
    assert_eq!(
        (
            price["total_amount"].as_i64(),
            price["discount_amount"].as_i64(),
            price["pay_amount"].as_i64()
        ),
        (Some(3000), Some(700), Some(2300))
    );
    assert_eq!(app.stock_of(&cat.products[0]).await, 10);
    assert_eq!(app.count_commerce_rows("order_claims").await, 0);
    let redeemed: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM coupons WHERE redeemed_order_id IS NOT NULL")
            .fetch_one(&app.commerce)
            .await
            .unwrap();
    assert_eq!(redeemed, 0);
}

#[tokio::test]
async fn lifecycle_user_profile_and_include() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let user = 705;
    let (s, _) = app
        .call(
            "POST",
            "/v1/users",
            Some(&app.admin_token()),
            Some(json!({"user_id": user.to_string(), "name": "Wang", "level": 2})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, me) = app
        .call(
            "GET",
            &format!("/v1/users/{user}"),
            Some(&app.user_token(user)),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (me["name"].as_str(), me["level"].as_i64()),
        (Some("Wang"), Some(2))
    );
    let order = app.place_order(user, &[(&cat.products[0], 1)]).await;
    let id = order["order_id"].as_str().unwrap();
    let (s, with_user) = app
        .call(
            "GET",
            &format!("/v1/orders/{id}?include=user"),
            Some(&app.user_token(user)),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(with_user["user"]["name"], "Wang");
    let (s, ready) = app.call("GET", "/readyz", None, None).await;
    assert_eq!(s, StatusCode::OK, "{ready}");
}

#[tokio::test]
async fn lifecycle_unpaid_orders_close_at_their_payment_deadline() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let user = 706;
    let late = app.place_order(user, &[(&cat.products[0], 2)]).await;
    let paid = app.place_order(user, &[(&cat.products[0], 1)]).await;
    app.pay(&paid).await;
    assert_eq!(app.stock_of(&cat.products[0]).await, 7);

    // Before the deadline nothing happens.
    let out = app.app.orders.close_expired_once(Utc::now(), 100).await.unwrap();
    assert_eq!(out.closed, 0);
    // After it, the unpaid order closes and gives its stock back; the paid one stays.
    let after = Utc::now() + chrono::TimeDelta::seconds(app.settings.orders.payment_timeout_secs as i64 + 1);
    let out = app.app.orders.close_expired_once(after, 100).await.unwrap();
    assert_eq!(out.closed, 1);
    let id = late["order_id"].as_str().unwrap();
    let (_, closed) = app.get_order(user, id).await;
    assert_eq!(
        (closed["status"].as_str(), closed["close_reason"].as_str()),
        (Some("closed"), Some("payment timeout"))
    );
    assert_eq!(app.stock_of(&cat.products[0]).await, 9);
    let out = app.app.orders.close_expired_once(after, 100).await.unwrap();
    assert_eq!(out.closed, 0);

    // A payment arriving after the close is recorded and flagged for refund.
    let (s, flagged) = app.pay(&late).await;
    assert_eq!(s, StatusCode::OK, "{flagged}");
    assert_eq!(
        (flagged["status"].as_str(), flagged["refund_required"].as_bool()),
        (Some("closed"), Some(true))
    );
    // The same transaction number with another amount is not a retry.
    let (s, p) = app
        .call(
            "POST",
            &format!("/v1/orders/{id}/payments"),
            Some(&app.service_token()),
            Some(json!({"transaction_no": format!("tx-{id}"), "channel": "alipay", "amount": 1})),
        )
        .await;
    assert_eq!(
        (s, p["code"].as_str()),
        (StatusCode::CONFLICT, Some("idempotency_conflict"))
    );
    assert_eq!(app.stock_of(&cat.products[0]).await, 9);
}

#[tokio::test]
async fn lifecycle_coupons_never_make_an_order_free() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let user = 707;
    let big = app.coupon(user, 5_000, 0).await;
    let id = app.new_order_id(user).await;
    let mut body = TestApp::order_body(&id, &[(&cat.products[0], 1)]);
    body["coupon_ids"] = json!([big]);
    let (s, o) = app.create_order(user, body).await;
    assert_eq!(s, StatusCode::CREATED, "{o}");
    assert_eq!(
        (o["discount_amount"].as_i64(), o["pay_amount"].as_i64()),
        (Some(999), Some(1))
    );
    let (s, paid) = app.pay(&o).await;
    assert_eq!(
        (s, paid["status"].as_str()),
        (StatusCode::OK, Some("awaiting_shipment"))
    );
}
