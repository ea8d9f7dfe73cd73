//! `GET /healthz` (the process is up) and `GET /readyz` (every database and Redis answer).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
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
    if let Some(mut r) = state.redis.clone() {
        let ok = redis::cmd("PING").query_async::<String>(&mut r).await.is_ok();
        // Redis is not required to serve (nothing depends on it yet), so it is
        // reported but does not make the service unready.
        checks.insert("redis".into(), ok.into());
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": ready, "checks": checks})))
}
