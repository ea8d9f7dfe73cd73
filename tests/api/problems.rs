//! Every error is an RFC 9457 problem, also those raised outside the handlers: the request
//! timeout and path segments that are not UTF-8. And a request cut off by its timeout still
//! completes the write it started (SPEC 2.8). The contract: every body the edge sends
//! validates against the `Problem` schema of the OpenAPI document, every code is sent by some
//! error and documented in `docs/errors.md` with its status.

use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use orderly::http::error::{ApiError, ProblemCode};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::{Connection, MySqlConnection};

use crate::helpers::TestApp;

async fn problem_of(resp: reqwest::Response) -> (StatusCode, serde_json::Value) {
    let status = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    assert_eq!(ct, "application/problem+json", "{status} {body}");
    (status, body)
}

#[tokio::test]
async fn a_path_id_that_is_not_utf8_is_a_404_problem() {
    let app = TestApp::spawn().await;
    let token = app.user_token(7);
    for path in [
        "/v1/orders/%FF%FE",
        "/v1/orders/%C3%28/cancel",
        "/v1/users/%80",
        "/v1/products/%FF",
    ] {
        let resp = app
            .client
            .get(format!("{}{path}", app.base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let (status, body) = problem_of(resp).await;
        // A POST-only route answers 405 for GET; every other one 404.
        assert!(
            status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED,
            "{path}: {status} {body}"
        );
    }
    let resp = app
        .client
        .post(format!("{}/v1/orders/%FF/cancel", app.base))
        .bearer_auth(&token)
        .json(&serde_json::json!({"expected_version": 1}))
        .send()
        .await
        .unwrap();
    let (status, body) = problem_of(resp).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["code"], "not_found");
}

#[tokio::test]
async fn a_request_cut_off_by_its_timeout_is_a_503_problem_and_its_write_completes() {
    let app = TestApp::spawn_with(|s| s.server.request_timeout_ms = 300).await;
    let catalog = app.catalog(&[100]).await;
    let product = catalog.products[0].clone();
    // Another transaction holds the product row, so every create waits on its reservation
    // past the request timeout.
    let mut blocker = MySqlConnection::connect(&app.settings.commerce.url)
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("SELECT stock FROM products WHERE id = ? FOR UPDATE")
        .bind(product.parse::<i64>().unwrap())
        .fetch_one(&mut blocker)
        .await
        .unwrap();
    let user = 31;
    let mut timed_out = Vec::new();
    for _ in 0..3 {
        let id = app.new_order_id(user).await;
        let resp = app
            .client
            .post(format!("{}/v1/orders", app.base))
            .bearer_auth(app.user_token(user))
            .json(&TestApp::order_body(&id, &[(&product, 1)]))
            .send()
            .await
            .unwrap();
        let (status, body) = problem_of(resp).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["code"], "timeout");
        timed_out.push(id);
    }
    assert_eq!(app.count_shard_rows("orders").await, 0);
    sqlx::raw_sql("COMMIT").execute(&mut blocker).await.unwrap();
    // The creates ran on: each order appears, with its stock taken exactly once.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let written = app.count_shard_rows("orders").await;
        if written == timed_out.len() as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{written} of {} cut-off creates were written",
            timed_out.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.stock_of(&product).await, 100 - timed_out.len() as i64);
    for id in &timed_out {
        let (s, o) = app.get_order(user, id).await;
        assert_eq!(s, StatusCode::OK, "{o}");
    }
}

// ---------------------------------------------------------------- the contract

/// `value` against `schema`, a JSON Schema of the OpenAPI 3.1 document `doc`, as far as the
/// document's schemas go: `$ref`, `oneOf`/`anyOf`/`allOf`, `type` (one or a list), `enum`,
/// `properties`, `required`, `items`, `minimum`. Every failure, as a path into `value`.
fn validate(doc: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    if let Some(r) = schema["$ref"].as_str() {
        let target = doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("{r} does not resolve"));
        return validate(doc, target, value, at, errors);
    }
    for (key, all) in [("oneOf", false), ("anyOf", false), ("allOf", true)] {
        if let Some(options) = schema[key].as_array() {
            let passing = options
                .iter()
                .filter(|s| {
                    let mut e = Vec::new();
                    validate(doc, s, value, at, &mut e);
                    e.is_empty()
                })
                .count();
            let ok = match (key, all) {
                (_, true) => passing == options.len(),
                ("oneOf", _) => passing == 1,
                _ => passing >= 1,
            };
            if !ok {
                errors.push(format!("{at}: {value} fails {key} {}", schema[key]));
            }
        }
    }
    let type_of = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let actual = type_of(value);
    let allowed =
        types.is_empty() || types.contains(&actual) || (actual == "integer" && types.contains(&"number"));
    if !allowed {
        errors.push(format!("{at}: {value} is not of type {}", schema["type"]));
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            errors.push(format!("{at}: {value} is not one of {}", schema["enum"]));
        }
    }
    if let (Some(min), Some(n)) = (schema["minimum"].as_f64(), value.as_f64()) {
        if n < min {
            errors.push(format!("{at}: {value} is below {min}"));
        }
    }
    if let (Some(items), Value::Array(values)) = (schema.get("items"), value) {
        for (i, v) in values.iter().enumerate() {
            validate(doc, items, v, &format!("{at}/{i}"), errors);
        }
    }
    if let Value::Object(members) = value {
        let properties = schema["properties"].as_object();
        for key in schema["required"].as_array().into_iter().flatten() {
            let key = key.as_str().unwrap();
            if !members.contains_key(key) {
                errors.push(format!("{at}: required {key} is missing"));
            }
        }
        if let Some(properties) = properties {
            for (key, v) in members {
                match properties.get(key) {
                    Some(s) => validate(doc, s, v, &format!("{at}/{key}"), errors),
                    None => errors.push(format!("{at}/{key} is not in the schema")),
                }
            }
        }
    }
}

fn generated_document() -> Value {
    serde_json::to_value(orderly::http::api().into_openapi()).unwrap()
}

async fn body_of(response: axum::response::Response) -> Value {
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Every body the edge sends is valid against the `Problem` schema of the document (every
/// member a property of it, of its type; every required one there), and every code is sent
/// by some error; the document's code list is exactly the codes.
#[tokio::test]
async fn every_problem_body_validates_against_the_documented_problem_schema() {
    let doc = generated_document();
    let schema = &doc["components"]["schemas"]["Problem"];
    assert!(schema["properties"].is_object(), "{schema}");
    let documented: Vec<Value> = doc["components"]["schemas"]["ProblemCode"]["enum"]
        .as_array()
        .expect("ProblemCode is an enum in the document")
        .clone();
    let codes: Vec<Value> = ProblemCode::ALL.iter().map(|c| json!(c.as_str())).collect();
    assert_eq!(documented, codes);
    let mut sent = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    for e in ApiError::every_kind() {
        let what = format!("{e:?}");
        let response = e.into_response();
        let status = response.status();
        let body = body_of(response).await;
        validate(&doc, schema, &body, &what, &mut failures);
        let code = ProblemCode::ALL
            .into_iter()
            .find(|c| body["code"] == c.as_str())
            .unwrap_or_else(|| panic!("{what}: {body}"));
        assert_eq!(status, code.status(), "{what}");
        sent.insert(code.as_str());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let never: Vec<&str> = ProblemCode::ALL
        .iter()
        .map(|c| c.as_str())
        .filter(|c| !sent.contains(c))
        .collect();
    assert!(never.is_empty(), "no error sends {never:?}");
    // The validator itself refuses what the schema does not allow.
    for bad in [
        json!({"type": "t", "title": "t", "status": 409, "detail": "d", "code": "no_such_code"}),
        json!({"type": "t", "title": "t", "status": 409, "detail": "d", "code": "archived", "extra": 1}),
        json!({"type": "t", "title": "t", "status": 409, "detail": "d", "code": "out_of_stock", "product_id": 17}),
        json!({"type": "t", "title": "t", "status": 409, "code": "archived"}),
    ] {
        let mut e = Vec::new();
        validate(&doc, schema, &bad, "bad", &mut e);
        assert!(!e.is_empty(), "{bad} passed");
    }
}

/// `docs/errors.md` has one section per code, `## \`code\``, saying its status; and none
/// for a code the service does not send.
#[test]
fn every_problem_code_has_a_section_in_docs_errors_md_with_its_status() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/errors.md")).unwrap();
    let mut sections = std::collections::BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(code) = line.strip_prefix("## `").and_then(|l| l.strip_suffix('`')) {
            assert!(sections.insert(code.to_owned(), None).is_none(), "{code} twice");
            current = Some(code.to_owned());
        } else if let (Some(code), Some(status)) = (&current, line.strip_prefix("- **Status:** ")) {
            sections.insert(code.clone(), Some(status.trim().parse::<u16>().unwrap()));
        }
    }
    for code in ProblemCode::ALL {
        match sections.remove(code.as_str()) {
            None => panic!("docs/errors.md has no section for {}", code.as_str()),
            Some(status) => assert_eq!(
                status,
                Some(code.status().as_u16()),
                "docs/errors.md: the status of {}",
                code.as_str()
            ),
        }
    }
    assert!(sections.is_empty(), "sections of no code: {sections:?}");
}
