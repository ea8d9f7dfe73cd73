//! `GET /healthz` (the process is up) and `GET /readyz` (every database answers; the cache's
//! Redis is reported, `up`, `degraded` or `disabled`, but never makes the service unready),
//! and `GET /metrics` (Prometheus text; the series are described in [`crate::telemetry`]).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// The Prometheus text exposition format, version 0.0.4.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], state.metrics.render())
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let mut checks = serde_json::Map::new();
    let mut ready = true;
    let commerce = sqlx::query("SELECT 1")
        .execute(state.orders.commerce())
        .await
        .is_ok();
    ready &= commerce;
    checks.insert("commerce".into(), commerce.into());
    for db in state.orders.shards().databases() {
        let ok = sqlx::query("SELECT 1").execute(&db.primary).await.is_ok();
        ready &= ok;
        checks.insert(format!("shards:{}", db.name), ok.into());
    }
    // Redis down makes the service slower, not unready: reported as `degraded`.
    let cache = serde_json::to_value(state.orders.cache().health()).unwrap_or_default();
    checks.insert("cache".into(), cache);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": ready, "checks": checks})))
}
