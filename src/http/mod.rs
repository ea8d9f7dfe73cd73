//! HTTP: the JSON API of SPEC section 3 on axum. One `router()` per feature, one state, one
//! error type ([`error::ApiError`]) mapped to RFC 9457 problems.
//!
//! Around every route, outermost first: the request id (`X-Request-Id`, taken from the client
//! when sane, else made up, and echoed), the request span and its log line, the request
//! metrics, the panic catcher, the body reader (every body read whole, up to the body limit,
//! before anything else answers, so that a keep-alive connection survives every answer), the
//! in-flight bound, the time limit, the body limit and the per-user rate limits (see
//! [`limits`]). Routes are labelled by
//! their template (`/v1/orders/{id}`), never by the raw path, so ids cannot multiply series.

pub mod auth;
pub mod cart;
pub mod catalog;
pub mod error;
pub mod extract;
pub mod flash;
pub mod health;
pub mod limits;
pub mod merchant;
pub mod openapi;
pub mod orders;
pub mod search;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::task::TaskTracker;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;
use tracing::{Instrument, Span};

use crate::config::ServerSettings;
use crate::lease::IdSource;
use crate::service::catalog::CatalogService;
use crate::service::merchant::MerchantService;
use crate::service::orders::OrderService;

use self::auth::AuthKeys;
use self::error::ApiError;

/// Everything a handler needs, behind one `Arc`: axum clones the state for every request
/// (its extractor, and every middleware that has state), and a clone of the services
/// themselves, field by field, cost a fifth of a cached read's CPU. A clone is one count.
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl AppState {
    pub fn new(services: Services) -> AppState {
        AppState(Arc::new(services))
    }
}

impl std::ops::Deref for AppState {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.0
    }
}

/// The services of [`AppState`].
pub struct Services {
    pub orders: OrderService,
    pub catalog: CatalogService,
    /// The merchant copy and reports (reads only; the stream writes them).
    pub merchant: MerchantService,
    pub ids: Arc<IdSource>,
    pub auth: Arc<AuthKeys>,
    /// The write tasks in flight (see [`write`]); shutdown waits for them.
    pub writes: TaskTracker,
    /// What `GET /metrics` renders (see [`crate::telemetry::metrics`]).
    pub metrics: PrometheusHandle,
    /// This process's per-user rate limits (see [`limits`]).
    pub limits: Arc<limits::UserLimits>,
    /// The order search index; `None` when `[search] enabled = false` (searches answer 503).
    pub search: Option<Arc<dyn crate::search::OrderIndex>>,
    /// What `GET /readyz` checks (see [`health`]).
    pub readiness: Arc<health::Readiness>,
    /// The requests served at once, bounded by `server.max_in_flight` (see [`limits`]).
    pub in_flight: limits::InFlight,
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
    // The task carries the request's span, so its logs keep the request id.
    match state.writes.spawn(use_case.instrument(Span::current())).await {
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

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest request id taken from a client; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 64;

/// A client's request id is kept if it could not break a log line or a header: 1 to 64
/// characters of `[A-Za-z0-9._-]`.
fn is_sane_request_id(id: &str) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Gives every request an id: the client's `X-Request-Id` when sane, else a fresh UUID v4.
/// The request goes on with the id in its header (the span reads it there) and the response
/// carries it back.
async fn request_id(mut req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(&REQUEST_ID)
        .filter(|v| v.to_str().is_ok_and(is_sane_request_id))
        .cloned();
    let id = match given {
        Some(v) => v,
        // A UUID's text is always a valid header value.
        None => HeaderValue::try_from(uuid::Uuid::new_v4().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("invalid")),
    };
    req.headers_mut().insert(REQUEST_ID, id.clone());
    let mut response = next.run(req).await;
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

/// The route template a request matched, or `unmatched` (the fallback): a bounded label.
fn route_of(req: &Request) -> &str {
    req.extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
}

/// The method as a label: the standard ones by name, anything else `other`, so that made-up
/// methods cannot multiply series.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The span every request runs in; its log lines carry these fields.
fn request_span(req: &Request) -> Span {
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    tracing::info_span!(
        "request",
        method = %req.method(),
        route = route_of(req),
        request_id = id,
    )
}

/// The access log line of a request, with `status` and `latency_ms` as numbers (a log
/// collector sums and plots them as they are): at DEBUG, or at ERROR for a 5xx. A 503
/// `overloaded` refusal is logged by the in-flight bound, at WARN and sampled
/// ([`limits::Shed`]): a saturated process must not also flood its log.
fn log_response<B>(response: &Response<B>, latency: Duration, _span: &Span) {
    let status = response.status();
    let latency_ms = latency.as_secs_f64() * 1000.0;
    if !status.is_server_error() {
        tracing::debug!(status = status.as_u16(), latency_ms, "response");
    } else if response.extensions().get::<limits::Shed>().is_none() {
        tracing::error!(status = status.as_u16(), latency_ms, "response failed");
    }
}

/// Counts each request and times it, by method, route template and status
/// (`orderly_http_requests_total`, `orderly_http_request_duration_seconds`). Outside the panic
/// catcher and the time limit, so their 500s and 503s are counted too.
async fn record_metrics(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_label(req.method());
    let route = route_of(&req).to_owned();
    let response = next.run(req).await;
    let labels = [
        ("method", method.to_owned()),
        ("route", route),
        ("status", response.status().as_str().to_owned()),
    ];
    metrics::counter!("orderly_http_requests_total", &labels).increment(1);
    metrics::histogram!("orderly_http_request_duration_seconds", &labels)
        .record(start.elapsed().as_secs_f64());
    response
}

/// Every route of every feature, with the OpenAPI document they make: the router serves
/// exactly what the document describes (see [`openapi`]).
pub fn api() -> utoipa_axum::router::OpenApiRouter<AppState> {
    use utoipa::OpenApi;
    let mut api = utoipa_axum::router::OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(orders::router())
        .merge(cart::router())
        .merge(catalog::router())
        .merge(flash::router())
        .merge(merchant::router())
        .merge(search::router())
        .merge(health::router())
        .merge(openapi::router());
    openapi::add_shared_problems(api.get_openapi_mut());
    api
}

/// The whole API.
pub fn router(state: AppState, server: &ServerSettings) -> Router {
    let timeout = Duration::from_millis(server.request_timeout_ms);
    let (routes, doc) = api().split_for_parts();
    let routes = routes.layer(Extension(openapi::Document(Arc::new(doc))));
    // A page for people over the document, not a route of the API (see `openapi`).
    let routes = match server.swagger_ui {
        true => routes.merge(openapi::swagger_ui()),
        false => routes,
    };
    let routes = routes
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            limits::per_user_limits,
        ))
        // The body reader enforces the limit first (see [`limits::read_body`]); the JSON
        // extractor would answer a longer body with the same 413 problem.
        .layer(axum::extract::DefaultBodyLimit::max(server.body_limit_bytes))
        .layer(middleware::from_fn(move |req, next| {
            time_limit(timeout, req, next)
        }));
    let body_limit = server.body_limit_bytes;
    // Inside the metrics, so that refusals are counted.
    limits::bound_in_flight(routes, state.in_flight.clone())
        // Outside the in-flight bound, so that its refusals find the body read too, and a
        // client slow to send a body holds no place. Bounded by the request timeout: the
        // body is the client's part, and the time limit of the handler starts once it is in.
        .layer(middleware::from_fn(move |req, next| {
            limits::read_body(body_limit, timeout, req, next)
        }))
        .layer(CatchPanicLayer::custom(panic_problem))
        .layer(middleware::from_fn(record_metrics))
        .layer(
            // One line per request at DEBUG (an access log: `RUST_LOG=…,orderly::http=debug`);
            // at INFO it cost a formatted line per request on the hot path. Failures (5xx)
            // log at ERROR, except load shedding (see [`log_response`]).
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_response(log_response)
                .on_failure(()),
        )
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::is_sane_request_id;

    #[test]
    fn only_short_plain_request_ids_are_taken_from_clients() {
        for ok in [
            "abc-1",
            "A.b_C-9",
            &"x".repeat(64),
            "0af7651916cd43dd8448eb211c80319c",
        ] {
            assert!(is_sane_request_id(ok), "{ok}");
        }
        for bad in ["", &"x".repeat(65), "a b", "a\nb", "a/b", "é", "a\"b", "a%0Ab"] {
            assert!(!is_sane_request_id(bad), "{bad:?}");
        }
    }
}
