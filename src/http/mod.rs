//! HTTP: the JSON API of SPEC section 3 on axum. One `router()` per feature, one state, one
//! error type ([`error::ApiError`]) mapped to RFC 9457 problems.

pub mod auth;
pub mod catalog;
pub mod error;
pub mod extract;
pub mod health;
pub mod orders;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::Router;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::lease::IdSource;
use crate::service::catalog::CatalogService;
use crate::service::orders::OrderService;

use self::auth::AuthKeys;
use self::error::ApiError;

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub orders: OrderService,
    pub catalog: CatalogService,
    pub ids: Arc<IdSource>,
    pub auth: Arc<AuthKeys>,
    pub redis: Option<redis::aio::ConnectionManager>,
}

/// The whole API.
pub fn router(state: AppState, body_limit: usize, timeout: Duration) -> Router {
    Router::new()
        .merge(orders::router())
        .merge(catalog::router())
        .merge(health::router())
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // Enforced by the JSON extractor, which answers with a 413 problem.
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            timeout,
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
