//! `GET /healthz` (the process is up) and `GET /readyz` (every database answers; the cache's
//! Redis is reported, `up`, `degraded` or `disabled`, but never makes the service unready),
//! and `GET /metrics` (Prometheus text; the series are described in [`crate::telemetry`]).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

/// The Prometheus text exposition format, version 0.0.4.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "service",
    security(()),
    responses((status = 200, description = "Prometheus text exposition format 0.0.4", body = String, content_type = "text/plain; version=0.0.4"))
)]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], state.metrics.render())
}

#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "service",
    security(()),
    responses((status = 200, description = "The process is up: `{\"status\": \"ok\"}`", body = Object))
)]
async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "service",
    security(()),
    responses(
        (status = 200, description = "Every database answers: `{\"ready\": true, \"checks\": {…}}`; the cache is reported, never decisive", body = Object),
        (status = 503, description = "A database does not answer: `{\"ready\": false, \"checks\": {…}}`", body = Object),
    )
)]
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
        let ok = sqlx::query("SELECT 1").execute(db.write()).await.is_ok();
        ready &= ok;
        checks.insert(format!("shards:{}", db.name()), ok.into());
    }
    // Replicas down or lagging make reads move to the primary, never unready: reported as
    // "in rotation/configured".
    for db in state
        .orders
        .shards()
        .databases()
        .iter()
        .chain([state.catalog.profiles()])
    {
        if db.has_replicas() {
            let rotation = format!("{}/{}", db.replicas_in_rotation(), db.replica_count());
            checks.insert(format!("replicas:{}", db.name()), rotation.into());
        }
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
