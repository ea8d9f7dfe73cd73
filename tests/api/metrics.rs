//! Operations: `GET /metrics` (Prometheus text) and the `X-Request-Id` round trip.

use reqwest::StatusCode;

use crate::helpers::TestApp;

async fn scrape(app: &TestApp) -> String {
    let resp = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::OK);
    let kind = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(kind.starts_with("text/plain"), "{kind}");
    resp.text().await.unwrap()
}

/// The sample lines of `series` whose labels include every one of `labels`.
fn samples<'a>(text: &'a str, series: &str, labels: &[&str]) -> Vec<&'a str> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{series}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .collect()
}

#[tokio::test]
async fn metrics_count_requests_by_route_template_and_order_writes() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let order = app.place_order(1, &[(&cat.products[0], 1)]).await;
    let id = order["order_id"].as_str().unwrap();
    let (s, _) = app.get_order(1, id).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = app.call("GET", "/no/such/route", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let text = scrape(&app).await;
    let read = [r#"method="GET""#, r#"route="/v1/orders/{id}""#, r#"status="200""#];
    assert!(
        !samples(&text, "orderly_http_requests_total", &read).is_empty(),
        "no request counter for the read in:\n{text}"
    );
    assert!(
        !samples(&text, "orderly_http_request_duration_seconds_bucket", &read).is_empty(),
        "no latency histogram for the read in:\n{text}"
    );
    let create = [r#"method="POST""#, r#"route="/v1/orders""#, r#"status="201""#];
    assert!(!samples(&text, "orderly_http_requests_total", &create).is_empty());
    let unmatched = [r#"route="unmatched""#, r#"status="404""#];
    assert!(!samples(&text, "orderly_http_requests_total", &unmatched).is_empty());
    assert!(
        !samples(
            &text,
            "orderly_order_writes_total",
            &[r#"status="pending_payment""#]
        )
        .is_empty(),
        "no order write counter in:\n{text}"
    );
    // Routes are templates: no order id and no raw path ever becomes a label.
    assert!(!text.contains(id), "an order id in the metrics");
    assert!(!text.contains("/no/such/route"));
}

#[tokio::test]
async fn request_ids_are_echoed_or_made_up() {
    let app = TestApp::spawn().await;
    let healthz = format!("{}/healthz", app.base);
    let echoed = |resp: &reqwest::Response| {
        resp.headers()
            .get("x-request-id")
            .expect("a request id on every response")
            .to_str()
            .unwrap()
            .to_owned()
    };

    let resp = app
        .client
        .get(&healthz)
        .header("X-Request-Id", "abc-1")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed(&resp), "abc-1");

    let resp = app.client.get(&healthz).send().await.unwrap();
    let made = echoed(&resp);
    assert!(uuid::Uuid::parse_str(&made).is_ok(), "{made}");

    // One that could break a log line or is too long is replaced, never echoed.
    for bad in ["a b", "x/y", &"x".repeat(65)] {
        let resp = app
            .client
            .get(&healthz)
            .header("X-Request-Id", bad)
            .send()
            .await
            .unwrap();
        let id = echoed(&resp);
        assert_ne!(id, bad);
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    }

    // Problems carry it too (the 404 of an unknown route).
    let resp = app
        .client
        .get(format!("{}/nowhere", app.base))
        .header("X-Request-Id", "req.42_z")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(echoed(&resp), "req.42_z");
}
