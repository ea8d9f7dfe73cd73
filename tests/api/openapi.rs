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

/// Every operation lists the problems any route can answer (405, 500) as references to the
/// shared responses; the routes with per-user rate limits list 429, and each of them answers
/// 429 `rate_limited` once a buyer goes over.
#[tokio::test]
async fn openapi_every_operation_lists_405_and_500_and_the_limited_ones_429() {
    let app = TestApp::spawn_with(|s| {
        s.limits = orderly::config::LimitSettings {
            create_per_user_per_sec: 1,
            create_burst: 1,
            ids_per_user_per_sec: 1,
            ids_burst: 1,
            ..orderly::config::LimitSettings::off()
        }
    })
    .await;
    let doc = fetch_document(&app).await;
    let mut limited = Vec::new();
    for (method, path, op) in operations(&doc) {
        let responses = &op["responses"];
        assert_eq!(
            responses["405"]["$ref"], "#/components/responses/MethodNotAllowed",
            "{method} {path}"
        );
        assert_eq!(
            responses["500"]["$ref"], "#/components/responses/InternalError",
            "{method} {path}"
        );
        if let Some(r) = responses.get("429") {
            assert_eq!(
                r["$ref"], "#/components/responses/TooManyRequests",
                "{method} {path}"
            );
            limited.push((method, path));
        }
    }
    limited.sort();
    assert_eq!(
        limited,
        [
            ("post".to_owned(), "/v1/order-ids".to_owned()),
            ("post".to_owned(), "/v1/orders".to_owned())
        ]
    );
    let too_many = &doc["components"]["responses"]["TooManyRequests"];
    assert!(too_many["headers"]["Retry-After"].is_object(), "{too_many}");
    let token = app.user_token(4_200);
    for (method, path) in &limited {
        let mut last = None;
        for _ in 0..3 {
            let (status, answer) = app
                .call(&method.to_uppercase(), path, Some(&token), Some(json!({})))
                .await;
            last = Some((status, answer));
        }
        let (status, answer) = last.unwrap();
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{method} {path}: {answer}");
        assert_eq!(answer["code"], "rate_limited");
        assert!(answer["retry_after_secs"].as_u64().is_some(), "{answer}");
    }
}

/// Each shared problem response names every code of its status, and only those.
#[tokio::test]
async fn openapi_each_problem_response_names_the_codes_of_its_status() {
    use orderly::http::error::ProblemCode;
    let doc = serde_json::to_value(orderly::http::api().into_openapi()).unwrap();
    let responses = doc["components"]["responses"].as_object().unwrap();
    // The status each shared response is listed under, from the operations.
    let mut status_of = std::collections::BTreeMap::new();
    for (_, _, op) in operations(&doc) {
        for (status, r) in op["responses"].as_object().unwrap() {
            if let Some(name) = r["$ref"]
                .as_str()
                .and_then(|r| r.strip_prefix("#/components/responses/"))
            {
                let previous = status_of.insert(name.to_owned(), status.clone());
                assert!(previous.is_none_or(|p| &p == status), "{name} under two statuses");
            }
        }
    }
    for (name, response) in responses {
        let status = status_of
            .get(name)
            .unwrap_or_else(|| panic!("{name} is listed by no operation"));
        let description = response["description"].as_str().unwrap();
        for code in ProblemCode::ALL {
            let named = description.contains(&format!("`{}`", code.as_str()));
            let of_status = code.status().as_str() == status;
            assert_eq!(named, of_status, "{name} ({status}): `{}`", code.as_str());
        }
    }
}

/// The query parameters of the list and search routes are typed in the document: each has
/// a schema, `limit` an integer range, the times RFC 3339 date-times, ids id strings.
#[tokio::test]
async fn openapi_query_parameters_of_lists_and_searches_are_typed() {
    let doc = serde_json::to_value(orderly::http::api().into_openapi()).unwrap();
    let ops = operations(&doc);
    for (method, path) in [
        ("get", "/v1/orders"),
        ("get", "/v1/search/orders"),
        ("get", "/v1/shops/{shop_id}/orders"),
        ("get", "/v1/shops/{shop_id}/reports/daily"),
    ] {
        let (_, _, op) = ops
            .iter()
            .find(|(m, p, _)| m == method && p == path)
            .unwrap_or_else(|| panic!("{method} {path}"));
        let query: Vec<&Value> = op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["in"] == "query")
            .collect();
        assert!(!query.is_empty(), "{method} {path}");
        for p in query {
            let name = p["name"].as_str().unwrap();
            let schema = &p["schema"];
            let typed = schema["type"].is_string() || schema["type"].is_array() || schema["$ref"].is_string();
            assert!(typed, "{method} {path}: {name} has no type: {p}");
            match name {
                "limit" => {
                    assert!(schema["type"].to_string().contains("integer"), "{path}: {p}");
                    assert_eq!(
                        (schema["minimum"].as_i64(), schema["maximum"].as_i64()),
                        (Some(1), Some(100)),
                        "{path}: {p}"
                    );
                }
                "created_from" | "created_to" => assert_eq!(schema["format"], "date-time", "{path}: {p}"),
                "user_id" => assert!(schema.to_string().contains("UserId"), "{path}: {p}"),
                _ => {}
            }
        }
    }
}

/// `server.swagger_ui`: Swagger UI at `/docs` over `/openapi.json` when on; `/docs` is no
/// route when off (the default).
#[tokio::test]
async fn openapi_swagger_ui_is_served_at_docs_only_when_enabled() {
    let on = TestApp::spawn_with(|s| s.server.swagger_ui = true).await;
    let page = on.client.get(format!("{}/docs", on.base)).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.url().path().starts_with("/docs"), "{}", page.url());
    let content_type = page.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert!(page.text().await.unwrap().contains("swagger-ui"));
    // Its configuration points at this service's document, which is still served as before.
    let config = on
        .client
        .get(format!("{}/docs/swagger-initializer.js", on.base))
        .send()
        .await
        .unwrap();
    assert_eq!(config.status(), StatusCode::OK);
    assert!(config.text().await.unwrap().contains("/openapi.json"));
    fetch_document(&on).await;

    let off = TestApp::spawn().await;
    assert!(!off.settings.server.swagger_ui, "off by default");
    let (status, _, body) = off.call_full("GET", "/docs", None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["code"], "not_found");
    let (status, _, _) = off.call_full("GET", "/docs/", None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
