//! `GET /openapi.json`: the document is OpenAPI 3.1, sound (every operation answers
//! something, every `$ref` resolves), and it matches the live server both ways: every
//! documented operation is served, and every route SPEC section 3 names is documented. (The
//! router cannot add an undocumented route: it is built from the same `routes!` lists as the
//! document, and a unit test in `http::openapi` refuses any other way of adding one.)

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::TestApp;

/// The routes SPEC section 3 names (catalog routes as `TestApp` uses them).
const SPEC_ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/order-ids"),
    ("post", "/v1/orders/preview"),
    ("post", "/v1/orders"),
    ("get", "/v1/orders/{id}"),
    ("get", "/v1/orders"),
    ("get", "/v1/search/orders"),
    ("patch", "/v1/orders/{id}"),
    ("post", "/v1/orders/{id}/payments"),
    ("post", "/v1/orders/{id}/shipment"),
    ("post", "/v1/orders/{id}/confirm"),
    ("post", "/v1/orders/{id}/cancel"),
    ("post", "/v1/orders/{id}/refunds"),
    ("post", "/v1/orders/{id}/invalidate"),
    ("get", "/v1/users/{id}"),
    ("post", "/v1/users"),
    ("post", "/v1/shops"),
    ("post", "/v1/products"),
    ("get", "/v1/products/{id}"),
    ("post", "/v1/products/{id}/stock"),
    ("post", "/v1/coupons"),
    ("get", "/v1/cart"),
    ("put", "/v1/cart/items/{product_id}"),
    ("delete", "/v1/cart"),
    // SPEC section 6.
    ("get", "/v1/shops/{shop_id}/orders"),
    ("get", "/v1/shops/{shop_id}/reports/daily"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// The document as the live server serves it, without a token.
pub async fn fetch_document(app: &TestApp) -> Value {
    let (status, headers, doc) = app.call_full("GET", "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    assert_eq!(headers["content-type"], "application/json");
    doc
}

/// Every (method, path template, operation) of the document.
pub fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            if METHODS.contains(&method.as_str()) {
                ops.push((method.clone(), path.clone(), op.clone()));
            }
        }
    }
    ops
}

fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r),
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn openapi_document_is_3_1_and_sound() {
    let app = TestApp::spawn().await;
    let doc = fetch_document(&app).await;
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    let ops = operations(&doc);
    assert!(!ops.is_empty());
    for (method, path, op) in &ops {
        let responses = op["responses"].as_object();
        assert!(
            responses.is_some_and(|r| !r.is_empty()),
            "{method} {path} documents no response"
        );
        assert!(
            op["operationId"].is_string(),
            "{method} {path} has no operationId"
        );
        // Every `{param}` of the template is a documented path parameter.
        for param in path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
        {
            let documented = op["parameters"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["name"] == param && p["in"] == "path"));
            assert!(
                documented,
                "{method} {path}: path parameter {param} is undocumented"
            );
        }
    }
    let mut found = Vec::new();
    refs(&doc, &mut found);
    for r in found {
        let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("external $ref {r}"));
        assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
    }
    // Ids are decimal strings, in every schema that names one.
    for id in ["OrderId", "UserId", "ShopId", "ProductId", "CouponId"] {
        let schema = &doc["components"]["schemas"][id];
        assert_eq!(schema["type"], "string", "{id}: {schema}");
        assert!(schema["pattern"].is_string(), "{id}: {schema}");
    }
}

#[tokio::test]
async fn openapi_document_and_live_routes_agree() {
    let app = TestApp::spawn().await;
    let doc = fetch_document(&app).await;
    let ops = operations(&doc);

    // Every route SPEC section 3 names is documented.
    for (method, path) in SPEC_ROUTES {
        assert!(
            ops.iter().any(|(m, p, _)| m == method && p == path),
            "{method} {path} is not in the document"
        );
    }

    // Real ids for the path parameters, so that a 404 can only mean "no such route".
    let cat = app.catalog(&[100]).await;
    let user = 801;
    let (s, u) = app
        .call(
            "POST",
            "/v1/users",
            Some(&app.admin_token()),
            Some(json!({"user_id": user.to_string(), "name": "buyer"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{u}");
    let order = app.place_order(user, &[(&cat.products[0], 1)]).await;
    let far = chrono::DateTime::parse_from_rfc3339("2098-01-01T00:00:00Z")
        .unwrap()
        .to_utc();
    let sale = app.flash_sale(&cat.products[0], 5, 1, 1, far, 300).await;
    let fill = |path: &str| -> String {
        if path.starts_with("/v1/cart/items/") {
            return path.replace("{product_id}", &cat.products[0]);
        }
        if path.starts_with("/v1/shops/{shop_id}/") {
            return path.replace("{shop_id}", &cat.shop.to_string());
        }
        let id = if path.starts_with("/v1/orders/") {
            order["order_id"].as_str().unwrap().to_owned()
        } else if path.starts_with("/v1/users/") {
            user.to_string()
        } else if path.starts_with("/v1/products/") {
            cat.products[0].clone()
        } else if path.starts_with("/v1/flash-sales/") {
            sale["sale_id"].as_str().unwrap().to_owned()
        } else {
            panic!("no id for {path}: teach this test the new path parameter")
        };
        path.replace("{id}", &id)
    };

    // Every documented operation is served: no 404 or 405, and never a 5xx.
    let admin = app.admin_token();
    let mut failures = Vec::new();
    for (method, path, op) in &ops {
        let url = if path.contains('{') {
            fill(path)
        } else {
            path.clone()
        };
        let body = op.get("requestBody").map(|_| json!({}));
        let (status, answer) = app.call(&method.to_uppercase(), &url, Some(&admin), body).await;
        if status == StatusCode::NOT_FOUND
            || status == StatusCode::METHOD_NOT_ALLOWED
            || status.is_server_error()
        {
            failures.push(format!("{method} {path}: {status} {answer}"));
        }
    }

    // No undocumented method is served on a documented path.
    let paths: std::collections::BTreeSet<&String> = ops.iter().map(|(_, p, _)| p).collect();
    for path in paths {
        let url = if path.contains('{') {
            fill(path)
        } else {
            path.clone()
        };
        for method in ["get", "post", "put", "patch", "delete"] {
            if ops.iter().any(|(m, p, _)| m == method && p == path) {
                continue;
            }
            let (status, answer) = app.call(&method.to_uppercase(), &url, Some(&admin), None).await;
            if status != StatusCode::METHOD_NOT_ALLOWED {
                failures.push(format!(
                    "{method} {path} is not documented but answers {status} {answer}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
