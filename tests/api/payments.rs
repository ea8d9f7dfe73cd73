//! Payments and refunds: channel numbers are unique across every shard, refused numbers are
//! not burned, and the payment channel's answers carry no buyer data.

use reqwest::StatusCode;
use serde_json::{json, Value};

use orderly::domain::ids::UserId;

use crate::helpers::TestApp;

/// A user whose orders live on another database server than `user`'s.
fn user_on_other_server(app: &TestApp, user: i64) -> i64 {
    let shards = &app.raw;
    let db = |u: i64| shards.of_user(UserId::new(u).unwrap()).database;
    (user + 1..).find(|u| db(*u) != db(user)).expect("two servers")
}

async fn pay_with(app: &TestApp, order: &Value, transaction_no: &str, amount: i64) -> (StatusCode, Value) {
    let id = order["order_id"].as_str().unwrap();
    app.call(
        "POST",
        &format!("/v1/orders/{id}/payments"),
        Some(&app.service_token()),
        Some(json!({"transaction_no": transaction_no, "channel": "alipay", "amount": amount})),
    )
    .await
}

#[tokio::test]
async fn payment_numbers_are_unique_across_shards() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let (a, b) = (810, user_on_other_server(&app, 810));
    let order_a = app.place_order(a, &[(&cat.products[0], 1)]).await;
    let order_b = app.place_order(b, &[(&cat.products[0], 1)]).await;

    let (s, paid) = pay_with(&app, &order_a, "tx-shared", 1000).await;
    assert_eq!(s, StatusCode::OK, "{paid}");
    assert_eq!(paid["status"], "awaiting_shipment");

    // The same number for another order on another shard is not a second payment.
    let (s, p) = pay_with(&app, &order_b, "tx-shared", 1000).await;
    assert_eq!(
        (s, p["code"].as_str()),
        (StatusCode::CONFLICT, Some("idempotency_conflict")),
        "{p}"
    );
    let (s, still) = app.get_order(b, order_b["order_id"].as_str().unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (still["status"].as_str(), still["version"].as_i64()),
        (Some("pending_payment"), Some(1))
    );
    assert_eq!(still["payments"], json!([]));
    assert_eq!(app.count_shard_rows("order_payments").await, 1);

    // The first order's callback replays fine.
    let (s, again) = pay_with(&app, &order_a, "tx-shared", 1000).await;
    assert_eq!(s, StatusCode::OK, "{again}");
    assert_eq!(again, paid);

    // A refund number cannot reuse a payment number either.
    let id_a = order_a["order_id"].as_str().unwrap();
    let (s, p) = app
        .call(
            "POST",
            &format!("/v1/orders/{id_a}/refunds"),
            Some(&app.service_token()),
            Some(json!({"refund_no": "tx-shared", "amount": 1000})),
        )
        .await;
    assert_eq!(
        (s, p["code"].as_str()),
        (StatusCode::CONFLICT, Some("idempotency_conflict")),
        "{p}"
    );
}

#[tokio::test]
async fn payment_numbers_refused_by_the_order_are_not_burned() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let user = 820;
    let order = app.place_order(user, &[(&cat.products[0], 1)]).await;

    let (s, p) = pay_with(&app, &order, "tx-retry", 999).await;
    assert_eq!(
        (s, p["code"].as_str()),
        (StatusCode::CONFLICT, Some("payment_mismatch")),
        "{p}"
    );
    assert_eq!(app.count_commerce_rows("payment_numbers").await, 0);
    // The channel corrects the amount under the same number.
    let (s, paid) = pay_with(&app, &order, "tx-retry", 1000).await;
    assert_eq!(s, StatusCode::OK, "{paid}");
    assert_eq!(app.count_commerce_rows("payment_numbers").await, 1);
}

#[tokio::test]
async fn payment_numbers_differing_only_in_case_are_two_payments() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let user = 830;
    let order = app.place_order(user, &[(&cat.products[0], 1)]).await;
    let (s, paid) = pay_with(&app, &order, "TX-AbC", 1000).await;
    assert_eq!(s, StatusCode::OK, "{paid}");
    // Another payment whose number differs only in case: money received twice, recorded
    // and flagged for refund, never taken for a replay and dropped.
    let (s, twice) = pay_with(&app, &order, "tx-abc", 1000).await;
    assert_eq!(s, StatusCode::OK, "{twice}");
    assert_eq!(twice["payments"].as_array().map(Vec::len), Some(2), "{twice}");
    assert_eq!(twice["refund_required"], true);
    assert_eq!(app.count_commerce_rows("payment_numbers").await, 2);
}

/// A call that was refused must not give back a number that a retry took over meanwhile and
/// may be recording: only the latest holder of the claim releases it.
#[tokio::test]
async fn payment_numbers_taken_over_by_a_retry_are_not_given_back_by_the_first_call() {
    use orderly::domain::ids::OrderId;
    use orderly::domain::money::Money;
    use orderly::domain::order::PaymentKind;
    use orderly::storage::commerce::{self, NumberClaim, PaymentNumber};

    let app = TestApp::spawn().await;
    let pool = &app.commerce;
    let number = |order: i64, attempt: i64| PaymentNumber {
        transaction_no: "tx-race",
        kind: PaymentKind::Refund,
        order_id: OrderId::new(order).unwrap(),
        channel: "refund",
        amount: Money::new(500).unwrap(),
        attempt,
    };
    let now = chrono::Utc::now();
    let first = number(7, 1);
    let retry = number(7, 2);
    assert_eq!(
        commerce::claim_payment_number(pool, &first, now).await.unwrap(),
        NumberClaim::Claimed
    );
    assert_eq!(
        commerce::claim_payment_number(pool, &retry, now).await.unwrap(),
        NumberClaim::Same
    );
    // The first call's shard step was refused; the retry's was recorded. The first call's
    // give-back must be a no-op.
    commerce::release_payment_number(pool, &first).await.unwrap();
    assert_eq!(
        commerce::claim_payment_number(pool, &number(8, 3), now)
            .await
            .unwrap(),
        NumberClaim::Conflict,
        "the number was freed while a retry held it"
    );
    // The holder itself may give it back.
    commerce::release_payment_number(pool, &retry).await.unwrap();
    assert_eq!(
        commerce::claim_payment_number(pool, &number(8, 3), now)
            .await
            .unwrap(),
        NumberClaim::Claimed
    );
}

/// Numbers recorded before the cross-shard table existed are claimed by the migration that
/// creates it, so they cannot pay another order afterwards.
#[tokio::test]
async fn payment_numbers_recorded_before_the_upgrade_are_backfilled() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let (a, b) = (840, user_on_other_server(&app, 840));
    let order_a = app.place_order(a, &[(&cat.products[0], 1)]).await;
    let order_b = app.place_order(b, &[(&cat.products[0], 1)]).await;
    let (s, paid) = pay_with(&app, &order_a, "tx-old", 1000).await;
    assert_eq!(s, StatusCode::OK, "{paid}");
    // As if recorded by a version without the table.
    sqlx::query("DELETE FROM payment_numbers")
        .execute(&app.commerce)
        .await
        .unwrap();
    let claimed = orderly::storage::schema::backfill_payment_numbers(&app.commerce, &app.shard_map().await)
        .await
        .unwrap();
    assert_eq!(claimed, 1);
    let (s, p) = pay_with(&app, &order_b, "tx-old", 1000).await;
    assert_eq!(
        (s, p["code"].as_str()),
        (StatusCode::CONFLICT, Some("idempotency_conflict")),
        "{p}"
    );
    // The first order's callback still replays.
    let (s, again) = pay_with(&app, &order_a, "tx-old", 1000).await;
    assert_eq!(s, StatusCode::OK, "{again}");
}

#[tokio::test]
async fn payment_channel_answers_carry_no_buyer_data() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let user = 840;
    let order = app.place_order(user, &[(&cat.products[0], 1)]).await;
    let id = order["order_id"].as_str().unwrap();
    let phone = order["address"]["phone"].as_str().unwrap().to_owned();
    let name = order["address"]["name"].as_str().unwrap().to_owned();
    let leaks = |answer: &Value| {
        let text = answer.to_string();
        answer.get("address").is_some()
            || answer.get("remark").is_some()
            || text.contains(&phone)
            || text.contains(&name)
    };

    let (s, paid) = pay_with(&app, &order, "tx-private", 1000).await;
    assert_eq!(
        (s, paid["status"].as_str()),
        (StatusCode::OK, Some("awaiting_shipment")),
        "{paid}"
    );
    assert!(!leaks(&paid), "{paid}");
    // A replay answers the same, redacted too.
    let (_, again) = pay_with(&app, &order, "tx-private", 1000).await;
    assert!(!leaks(&again), "{again}");

    let (s, refunded) = app
        .call(
            "POST",
            &format!("/v1/orders/{id}/refunds"),
            Some(&app.service_token()),
            Some(json!({"refund_no": "rf-private", "amount": 100})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{refunded}");
    assert!(!leaks(&refunded), "{refunded}");

    // The buyer still sees the whole order.
    let (s, own) = app.get_order(user, id).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(own["address"]["phone"].as_str(), Some(phone.as_str()));
    assert_eq!(own["address"]["name"].as_str(), Some(name.as_str()));
    assert_eq!(own["remark"], "");
}
