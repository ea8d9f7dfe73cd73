//! The authorization matrix: every endpoint × every role, including another user's and
//! another shop's order (404: existence does not leak).

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::TestApp;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Anonymous,
    Owner,
    OtherUser,
    Shop,
    OtherShop,
    Service,
    Admin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Passed authorization: any answer but 401, 403, 404.
    Allowed,
    Hidden,
    Forbidden,
    Unauthorized,
}

const OWNER: i64 = 501;
const OTHER: i64 = 502;

#[tokio::test]
async fn authorization_matrix_every_endpoint_and_role() {
    use Expect::*;
    use Who::*;
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10_000]).await;
    let other_shop = app.catalog(&[10]).await.shop;
    let token = |who: Who| -> Option<String> {
        match who {
            Anonymous => None,
            Owner => Some(app.user_token(OWNER)),
            OtherUser => Some(app.user_token(OTHER)),
            Shop => Some(app.merchant_token(cat.shop)),
            OtherShop => Some(app.merchant_token(other_shop)),
            Service => Some(app.service_token()),
            Admin => Some(app.admin_token()),
        }
    };
    let all = [Anonymous, Owner, OtherUser, Shop, OtherShop, Service, Admin];
    // (method, path suffix after /v1/orders/{id}, body, expectations in the order of `all`)
    let order_endpoints: Vec<(&str, &str, Value, [Expect; 7])> = vec![
        (
            "GET",
            "",
            Value::Null,
            [Unauthorized, Allowed, Hidden, Allowed, Hidden, Forbidden, Allowed],
        ),
        (
            "PATCH",
            "",
            json!({"expected_version": 1, "remark": "x"}),
            [
                Unauthorized,
                Allowed,
                Hidden,
                Forbidden,
                Forbidden,
                Forbidden,
                Allowed,
            ],
        ),
        (
            "PATCH",
            "",
            json!({"expected_version": 1, "tracking_number": "T1"}),
            [
                Unauthorized,
                Forbidden,
                Forbidden,
                Allowed,
                Hidden,
                Forbidden,
                Allowed,
            ],
        ),
        (
            "POST",
            "/payments",
            json!({"transaction_no": "tx1", "channel": "alipay", "amount": 1000}),
            [
                Unauthorized,
                Forbidden,
                Forbidden,
                Forbidden,
                Forbidden,
                Allowed,
                Forbidden,
            ],
        ),
        (
            "POST",
            "/shipment",
            json!({"expected_version": 1, "carrier": "SF", "tracking_number": "T1"}),
            [
                Unauthorized,
                Forbidden,
                Forbidden,
                Allowed,
                Hidden,
                Forbidden,
                Forbidden,
            ],
        ),
        (
            "POST",
            "/confirm",
            json!({"expected_version": 1}),
            [
                Unauthorized,
                Allowed,
                Hidden,
                Forbidden,
                Forbidden,
                Forbidden,
                Forbidden,
            ],
        ),
        (
            "POST",
            "/cancel",
            json!({"expected_version": 1}),
            [
                Unauthorized,
                Allowed,
                Hidden,
                Forbidden,
                Forbidden,
                Forbidden,
                Allowed,
            ],
        ),
        (
            "POST",
            "/refunds",
            json!({"refund_no": "rf1", "amount": 1}),
            [
                Unauthorized,
                Forbidden,
                Forbidden,
                Forbidden,
                Forbidden,
                Allowed,
                Allowed,
            ],
        ),
        (
            "POST",
            "/invalidate",
            json!({"expected_version": 1}),
            [
                Unauthorized,
                Forbidden,
                Forbidden,
                Forbidden,
                Forbidden,
                Forbidden,
                Allowed,
            ],
        ),
    ];
    let mut failures = Vec::new();
    for (method, suffix, body, expects) in &order_endpoints {
        for (who, expect) in all.iter().zip(expects) {
            // A fresh order per cell, so an allowed change does not disturb the next cell.
            let order = app.place_order(OWNER, &[(&cat.products[0], 1)]).await;
            let id = order["order_id"].as_str().unwrap();
            let body = (!body.is_null()).then(|| body.clone());
            let (status, answer) = app
                .call(
                    method,
                    &format!("/v1/orders/{id}{suffix}"),
                    token(*who).as_deref(),
                    body,
                )
                .await;
            if !matches_expect(status, *expect) {
                failures.push(format!("{method} /v1/orders/{{id}}{suffix} as {who:?}: expected {expect:?}, got {status} {answer}"));
            }
        }
    }

    let product = cat.products[0].clone();
    let other_endpoints: Vec<(&str, String, Value, [Expect; 7])> = vec![
        (
            "POST",
            "/v1/order-ids".into(),
            Value::Null,
            [
                Unauthorized,
                Allowed,
                Allowed,
                Forbidden,
                Forbidden,
                Forbidden,
                Forbidden,
            ],
        ),
        (
            "GET",
            "/v1/orders".into(),
            Value::Null,
            [
                Unauthorized,
                Allowed,
                Allowed,
                Forbidden,
                Forbidden,
                Forbidden,
                Allowed,
            ],
        ),
        (
            "POST",
            "/v1/orders/preview".into(),
            json!({"items": [{"product_id": product, "quantity": 1}]}),
            [
                Unauthorized,
                Allowed,
                Allowed,
                Forbidden,
                Forbidden,
                Forbidden,
                Forbidden,
            ],
        ),
        (
            "GET",
            format!("/v1/users/{OWNER}"),
            Value::Null,
            [Unauthorized, Allowed, Hidden, Hidden, Hidden, Forbidden, Allowed],
        ),
        (
            "POST",
            "/v1/shops".into(),
            json!({"name": "s"}),
            [
                Unauthorized,
                Forbidden,
                Forbidden,
                Forbidden,
                Forbidden,
                Forbidden,
                Allowed,
            ],
        ),
        (
            "POST",
            "/v1/products".into(),
            json!({"shop_id": cat.shop.to_string(), "name": "p", "price": 1, "stock": 1}),
            [
                Unauthorized,
                Forbidden,
                Forbidden,
                Allowed,
                Hidden,
                Forbidden,
                Allowed,
            ],
        ),
        (
            "GET",
            format!("/v1/products/{product}"),
            Value::Null,
            [Unauthorized, Allowed, Allowed, Allowed, Allowed, Allowed, Allowed],
        ),
        (
            "POST",
            format!("/v1/products/{product}/stock"),
            json!({"quantity": 1}),
            [
                Unauthorized,
                Forbidden,
                Forbidden,
                Allowed,
                Hidden,
                Forbidden,
                Allowed,
            ],
        ),
        (
            "POST",
            "/v1/coupons".into(),
            json!({"user_id": OWNER.to_string(), "shop_id": cat.shop.to_string(), "amount": 1, "valid_to": "2099-01-01T00:00:00Z"}),
            [
                Unauthorized,
                Forbidden,
                Forbidden,
                Allowed,
                Allowed,
                Forbidden,
                Allowed,
            ],
        ),
        (
            "POST",
            "/v1/users".into(),
            json!({"name": "n"}),
            [
                Unauthorized,
                Forbidden,
                Forbidden,
                Forbidden,
                Forbidden,
                Forbidden,
                Allowed,
            ],
        ),
    ];
    // The buyer must exist for GET /v1/users.
    let (s, _) = app
        .call(
            "POST",
            "/v1/users",
            Some(&app.admin_token()),
            Some(json!({"user_id": OWNER.to_string(), "name": "owner"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    for (method, path, body, expects) in &other_endpoints {
        for (who, expect) in all.iter().zip(expects) {
            let body = (!body.is_null()).then(|| body.clone());
            let (status, answer) = app.call(method, path, token(*who).as_deref(), body).await;
            if !matches_expect(status, *expect) {
                failures.push(format!(
                    "{method} {path} as {who:?}: expected {expect:?}, got {status} {answer}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} cells failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn matches_expect(status: StatusCode, expect: Expect) -> bool {
    match expect {
        Expect::Allowed => {
            ![
                StatusCode::UNAUTHORIZED,
                StatusCode::FORBIDDEN,
                StatusCode::NOT_FOUND,
            ]
            .contains(&status)
                && !status.is_server_error()
        }
        Expect::Hidden => status == StatusCode::NOT_FOUND,
        Expect::Forbidden => status == StatusCode::FORBIDDEN,
        Expect::Unauthorized => status == StatusCode::UNAUTHORIZED,
    }
}

#[tokio::test]
async fn authorization_rejects_forged_tokens() {
    let app = TestApp::spawn().await;
    let other = orderly::http::auth::AuthKeys::new(&orderly::config::AuthSettings {
        jwt_secret: "another-secret-another-secret-another!".into(),
        ..app.settings.auth.clone()
    });
    let forged = other.issue(
        "5",
        orderly::domain::actor::Role::Admin,
        None,
        std::time::Duration::from_secs(60),
    );
    let (s, p) = app.call("POST", "/v1/order-ids", Some(&forged), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(p["code"], "unauthorized");
    let (s, _) = app.call("POST", "/v1/order-ids", Some("not.a.token"), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}
