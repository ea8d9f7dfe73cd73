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

use std::future::Future;

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio_util::task::TaskTracker;
use tower_http::catch_panic::CatchPanicLayer;
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
    /// The write tasks in flight (see [`write`]); shutdown waits for them.
    pub writes: TaskTracker,
}

/// Runs a mutating use case to completion on its own task and awaits its answer.
///
/// A request future is dropped at whatever `.await` it is on when its client goes away or
/// its timeout fires. A write that has started must not stop half-way (a reservation without
/// its order, a transaction left open on a pooled connection), so the use case runs on a
/// task that does not belong to the request: dropping the request only stops the waiting.
/// Every such task is tracked so that a graceful shutdown waits for it.
pub async fn write<T, F>(state: &AppState, use_case: F) -> Result<T, ApiError>
where
    F: Future<Output = Result<T, crate::service::Error>> + Send + 'static,
    T: Send + 'static,
{
    match state.writes.spawn(use_case).await {
        Ok(answer) => answer.map_err(ApiError::from),
        Err(e) => Err(ApiError::Internal(format!("write task failed: {e}"))),
    }
}

/// Cuts a request off after `timeout` with a 503 problem. Only the waiting stops: a write
/// started by the request runs on (see [`write`]).
async fn time_limit(timeout: Duration, req: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

/// A panic in a handler is a bug: answered as a 500 problem, never a dropped connection.
fn panic_problem(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::Internal("a handler panicked".into()).into_response()
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
        .layer(middleware::from_fn(move |req, next| {
            time_limit(timeout, req, next)
        }))
        .layer(CatchPanicLayer::custom(panic_problem))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
