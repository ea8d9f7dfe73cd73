//! The authorization matrix: every operation of the OpenAPI document × every role,
//! including another user's and another shop's order (404: existence does not leak). The
//! operations come from `GET /openapi.json`, and an operation without a row in [`table`]
//! fails the test, so a new route cannot be left out of the matrix.

use std::collections::BTreeSet;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::TestApp;
use crate::openapi::{fetch_document, operations};
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
    /// Passed authorization: any answer but 401, 403, 404 (and never a 5xx).
    Allowed,
    Hidden,
    Forbidden,
    Unauthorized,
}

const OWNER: i64 = 501;
const OTHER: i64 = 502;

/// The roles, in the order of the expectation columns of [`table`].
const ALL: [Who; 7] = [
    Who::Anonymous,
    Who::Owner,
    Who::OtherUser,
    Who::Shop,
    Who::OtherShop,
    Who::Service,
    Who::Admin,
];

/// Per operation id: a plausible body (`Null` for none) and what each role of [`ALL`] gets.
/// An operation may have several rows (PATCH: the buyer's fields, the shop's fields).
/// `{product}`, `{shop}`, `{owner}` and `{order_id}` in a body are filled in per cell.
fn table() -> Vec<(&'static str, Value, [Expect; 7])> {
    use Expect::*;
    const PUBLIC: [Expect; 7] = [Allowed; 7];
    vec![
        // Orders.
        (
            "new_order_id",
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
            "preview_order",
            json!({"items": [{"product_id": "{product}", "quantity": 1}]}),
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
            // Another user sending the owner's order id is refused as bad input (the id's
            // shard bits name the owner): past authorization, so `Allowed`.
            "create_order",
            json!({"order_id": "{order_id}", "items": [{"product_id": "{product}", "quantity": 1}],
                   "address": {"name": "Li Lei", "phone": "13800000000", "detail": "1 Century Avenue"}}),
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
            "list_orders",
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
        // The merchant copy and reports.
        (
            "list_shop_orders",
            Value::Null,
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
            "shop_daily_reports",
            Value::Null,
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
            "get_order",
            Value::Null,
            [Unauthorized, Allowed, Hidden, Allowed, Hidden, Forbidden, Allowed],
        ),
        (
            "patch_order",
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
            "patch_order",
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
            "pay_order",
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
            "ship_order",
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
            "confirm_order",
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
            "cancel_order",
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
            "refund_order",
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
            "invalidate_order",
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
        (
            // Another shop's merchant and another user find nothing of the owner's: 200.
            "search_orders",
            Value::Null,
            [
                Unauthorized,
                Allowed,
                Allowed,
                Allowed,
                Allowed,
                Forbidden,
                Allowed,
            ],
        ),
        // Catalog.
        (
            "create_user",
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
        (
            "get_user",
            Value::Null,
            [Unauthorized, Allowed, Hidden, Hidden, Hidden, Forbidden, Allowed],
        ),
        (
            "create_shop",
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
            "create_product",
            json!({"shop_id": "{shop}", "name": "p", "price": 1, "stock": 1}),
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
            "get_product",
            Value::Null,
            [Unauthorized, Allowed, Allowed, Allowed, Allowed, Allowed, Allowed],
        ),
        (
            "add_stock",
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
            "issue_coupon",
            json!({"user_id": "{owner}", "shop_id": "{shop}", "amount": 1, "valid_to": "2099-01-01T00:00:00Z"}),
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
        // The cart: a buyer's own (there is no other's cart to address).
        (
            "get_cart",
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
            "set_cart_item",
            json!({"quantity": 1}),
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
            "clear_cart",
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
        // Flash sales.
        (
            "create_flash_sale",
            json!({"product_id": "{product}", "units": 5, "sale_price": 1, "per_user_limit": 1,
                   "starts_at": "2099-01-01T00:00:00Z", "ends_at": "2099-01-01T01:00:00Z",
                   "payment_timeout_secs": 300}),
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
            "get_flash_sale",
            Value::Null,
            [Unauthorized, Hidden, Hidden, Allowed, Hidden, Hidden, Allowed],
        ),
        (
            "end_flash_sale",
            Value::Null,
            [Unauthorized, Hidden, Hidden, Allowed, Hidden, Hidden, Allowed],
        ),
        // Service routes: public.
        ("healthz", Value::Null, PUBLIC),
        ("readyz", Value::Null, PUBLIC),
        ("metrics", Value::Null, PUBLIC),
        ("openapi", Value::Null, PUBLIC),
    ]
}

/// `body` with every `"{name}"` string replaced by `fill(name)`.
fn fill_body(body: &Value, fill: &dyn Fn(&str) -> String) -> Value {
    match body {
        Value::String(s) => match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(name) => Value::String(fill(name)),
            None => body.clone(),
        },
        Value::Array(a) => Value::Array(a.iter().map(|v| fill_body(v, fill)).collect()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), fill_body(v, fill))).collect()),
        other => other.clone(),
    }
}

#[tokio::test]
async fn authorization_matrix_every_endpoint_and_role() {
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
    // The buyer must exist for GET /v1/users/{id}.
    let (s, _) = app
        .call(
            "POST",
            "/v1/users",
            Some(&app.admin_token()),
            Some(json!({"user_id": OWNER.to_string(), "name": "owner"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);

    // A flash sale of the shop, for the flash-sale paths.
    let far = chrono::DateTime::parse_from_rfc3339("2098-01-01T00:00:00Z")
        .unwrap()
        .to_utc();
    let sale = app.flash_sale(&cat.products[0], 5, 1, 1, far, 300).await;
    let sale_id = sale["sale_id"].as_str().unwrap().to_owned();

    let doc = fetch_document(&app).await;
    let table = table();
    let mut failures = Vec::new();
    let documented: BTreeSet<String> = operations(&doc)
        .iter()
        .map(|(_, _, op)| op["operationId"].as_str().unwrap_or_default().to_owned())
        .collect();
    for (id, _, _) in &table {
        if !documented.contains(*id) {
            failures.push(format!("{id} is in the table but not in the document"));
        }
    }
    for (method, path, op) in operations(&doc) {
        let op_id = op["operationId"].as_str().unwrap_or_default();
        let rows: Vec<_> = table.iter().filter(|(id, _, _)| *id == op_id).collect();
        if rows.is_empty() {
            failures.push(format!(
                "{method} {path} ({op_id}) has no row in the authorization table"
            ));
            continue;
        }
        // The document and the table agree on which operations need no token.
        let public = op["security"]
            .as_array()
            .is_some_and(|s| s.iter().all(|r| r.as_object().is_some_and(|r| r.is_empty())));
        for (_, _, expects) in &rows {
            if public != (expects[0] == Expect::Allowed) {
                failures.push(format!(
                    "{op_id}: the document says public = {public}, the table says {:?} for anonymous callers",
                    expects[0]
                ));
            }
        }
        for (_, body, expects) in rows {
            for (who, expect) in ALL.iter().zip(expects) {
                // A fresh order per cell, so an allowed change does not disturb the next cell.
                let order = if path.starts_with("/v1/orders/{id}") {
                    Some(app.place_order(OWNER, &[(&cat.products[0], 1)]).await)
                } else {
                    None
                };
                let fresh_id = if op_id == "create_order" {
                    app.new_order_id(OWNER).await
                } else {
                    String::new()
                };
                let fill = |name: &str| -> String {
                    match name {
                        "product" => cat.products[0].clone(),
                        "shop" => cat.shop.to_string(),
                        "owner" => OWNER.to_string(),
                        "order_id" => fresh_id.clone(),
                        other => panic!("no value for {{{other}}}"),
                    }
                };
                let url = if let Some(order) = &order {
                    path.replace("{id}", order["order_id"].as_str().unwrap())
                } else if path.starts_with("/v1/users/") {
                    path.replace("{id}", &OWNER.to_string())
                } else if path.starts_with("/v1/products/") {
                    path.replace("{id}", &cat.products[0])
                } else if path.starts_with("/v1/cart/items/") {
                    path.replace("{product_id}", &cat.products[0])
                } else if path.starts_with("/v1/flash-sales/") {
                    path.replace("{id}", &sale_id)
                } else if path.starts_with("/v1/shops/{shop_id}/") {
                    path.replace("{shop_id}", &cat.shop.to_string())
                } else {
                    assert!(!path.contains('{'), "{path}: teach this test its parameter");
                    path.clone()
                };
                let body = (!body.is_null()).then(|| fill_body(body, &fill));
                let (status, answer) = app
                    .call(&method.to_uppercase(), &url, token(*who).as_deref(), body)
                    .await;
                if !matches_expect(status, *expect) {
                    failures.push(format!(
                        "{method} {path} ({op_id}) as {who:?}: expected {expect:?}, got {status} {answer}"
                    ));
                }
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
