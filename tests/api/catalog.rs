//! The catalog API: explicit user ids stay in range, coupons carry a currency.

use chrono::{TimeDelta, Utc};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::TestApp;

fn fields(problem: &Value) -> Vec<&str> {
    problem["errors"]
        .as_array()
        .map(|e| e.iter().filter_map(|f| f["field"].as_str()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn catalog_explicit_user_ids_cannot_exhaust_auto_increment() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token();
    let create = |body: Value| app.call("POST", "/v1/users", Some(&admin), Some(body));
    for id in [i64::MAX, 1 << 62, (1 << 53) + 1] {
        let (s, p) = create(json!({"user_id": id.to_string(), "name": "big"})).await;
        assert_eq!(
            (s, p["code"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("validation_failed")),
            "{id}: {p}"
        );
        assert_eq!(fields(&p), ["user_id"]);
    }
    let (s, u) = create(json!({"user_id": (1i64 << 53).to_string(), "name": "largest"})).await;
    assert_eq!(s, StatusCode::CREATED, "{u}");
    // The counter continues above the largest explicit id and still has room.
    let (s, u) = create(json!({"name": "next"})).await;
    assert_eq!(s, StatusCode::CREATED, "{u}");
    assert_eq!(u["user_id"], ((1i64 << 53) + 1).to_string());
}

#[tokio::test]
async fn catalog_coupons_apply_only_in_their_currency() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let user = 830;
    let admin = app.admin_token();
    let issue = |currency: Option<&str>| {
        let mut body = json!({"user_id": user.to_string(), "amount": 100,
                              "valid_to": (Utc::now() + TimeDelta::days(1)).to_rfc3339()});
        if let Some(c) = currency {
            body["currency"] = json!(c);
        }
        app.call("POST", "/v1/coupons", Some(&admin), Some(body))
    };
    let (s, p) = issue(Some("usd")).await;
    assert_eq!(
        (s, fields(&p)),
        (StatusCode::UNPROCESSABLE_ENTITY, vec!["currency"]),
        "{p}"
    );
    let (s, usd) = issue(Some("USD")).await;
    assert_eq!(
        (s, usd["currency"].as_str()),
        (StatusCode::CREATED, Some("USD")),
        "{usd}"
    );
    let (s, cny) = issue(None).await;
    assert_eq!(
        (s, cny["currency"].as_str()),
        (StatusCode::CREATED, Some("CNY")),
        "{cny}"
    );

    // The catalog's products are priced in CNY: the USD coupon does not apply.
    let id = app.new_order_id(user).await;
    let mut body = TestApp::order_body(&id, &[(&cat.products[0], 1)]);
    body["coupon_ids"] = json!([usd["coupon_id"]]);
    let (s, p) = app.create_order(user, body.clone()).await;
    assert_eq!(
        (s, p["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("validation_failed")),
        "{p}"
    );
    assert_eq!(fields(&p), ["coupon_ids[0]"]);
    assert_eq!(app.stock_of(&cat.products[0]).await, 10, "nothing reserved");

    body["coupon_ids"] = json!([cny["coupon_id"]]);
    let (s, o) = app.create_order(user, body).await;
    assert_eq!(
        (s, o["discount_amount"].as_i64()),
        (StatusCode::CREATED, Some(100)),
        "{o}"
    );
}
