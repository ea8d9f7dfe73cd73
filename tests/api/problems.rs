//! Every error is an RFC 9457 problem, also those raised outside the handlers: the request
//! timeout and path segments that are not UTF-8. And a request cut off by its timeout still
//! completes the write it started (SPEC 2.8).

use std::time::{Duration, Instant};

use reqwest::StatusCode;
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
