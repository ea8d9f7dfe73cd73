//! The one error type at the HTTP edge, and its RFC 9457 problem responses.
//!
//! Every refusal carries a stable machine `code`. Internal causes (database errors, broken
//! invariants) are logged with their chain and never sent to the client: a 5xx says only
//! that it is our fault or a dependency's.
//!
//! Every 503 carries `Retry-After` ([`service_unavailable`] is the one way to answer it): an
//! overloaded process, a request past its time, and a dependency that is down or refuses
//! connections (a database's "Too many connections", an exhausted pool: every storage error
//! [`StorageError::is_transient`] calls so, decided there in one place). A 500 is a bug of
//! ours, never a dependency's bad moment (SPEC 2.11).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::domain::ids::{CouponId, ProductId};
use crate::domain::order::{FieldError, FieldErrors};
use crate::service::Error;
use crate::storage::StorageError;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// The body of every problem response as the OpenAPI document describes it: what [`problem`]
/// writes (the five members every problem has), then the extension members of some refusals.
/// A unit test holds the two together.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// `urn:orderly:problem:<code>`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The HTTP status's reason phrase.
    pub title: String,
    pub status: u16,
    /// For people; may change. Never carries internal causes.
    pub detail: String,
    /// Stable, for programs: `validation_failed`, `not_found`, `version_conflict`, …
    pub code: String,
    /// `validation_failed`: the failing fields.
    pub errors: Option<Vec<FieldError>>,
    /// `version_conflict`: the order's version now.
    pub current_version: Option<i64>,
    /// `invalid_transition`: the order's status now (RFC 9457 reserves `status`).
    pub current_status: Option<String>,
    /// `out_of_stock`: the product that ran out.
    pub product_id: Option<ProductId>,
    /// `coupon_unavailable`: the coupon another order used.
    pub coupon_id: Option<CouponId>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Service(#[from] Error),
    #[error("unauthorized: {0}")]
    Unauthorized(super::auth::AuthError),
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("payload too large")]
    PayloadTooLarge,
    /// The request body could not be read to its end (a broken chunked encoding, the client
    /// went away).
    #[error("unreadable request body")]
    UnreadableBody,
    /// The request body did not arrive within `server.request_timeout_ms` (see
    /// [`super::limits::read_body`]).
    #[error("request body too slow")]
    BodyTimeout,
    #[error("no such route")]
    NoRoute,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request ran past `server.request_timeout_ms`. A write it started still runs to
    /// completion (see [`super::write`]), so the outcome is unknown to the client: a retry
    /// with the same ids is safe.
    #[error("request timed out")]
    Timeout,
    /// The caller went over a per-user rate limit (see [`super::limits`]); a retry after
    /// this many seconds gets a token.
    #[error("rate limited")]
    RateLimited { retry_after_secs: u64 },
    /// `server.max_in_flight` requests are being served already: refused at once.
    #[error("overloaded")]
    Overloaded,
    /// A bug: a handler or a write task panicked. Logged; the client learns nothing more.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<FieldErrors> for ApiError {
    fn from(e: FieldErrors) -> Self {
        ApiError::Service(Error::Validation(e))
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        ApiError::Service(Error::Storage(e))
    }
}

/// Builds a problem response: `status`, stable `code`, human `detail`, extra members.
pub fn problem(status: StatusCode, code: &str, detail: &str, extra: Map<String, Value>) -> Response {
    let mut body = json!({
        "type": format!("urn:orderly:problem:{code}"),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "code": code,
        "detail": detail,
    });
    if let Value::Object(m) = &mut body {
        m.extend(extra);
    }
    (status, [(header::CONTENT_TYPE, PROBLEM_JSON)], body.to_string()).into_response()
}

/// An error and every cause under it, outermost first: `a: b: c`. What a log line needs to
/// tell a connection refused from a lock wait timeout under the same storage error.
pub fn cause_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // thiserror's `{0}` with `#[source]` often repeats the cause in the outer text.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn one(key: &str, v: Value) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(key.into(), v);
    m
}

fn field_errors(errors: &[FieldError]) -> Map<String, Value> {
    one("errors", serde_json::to_value(errors).unwrap_or(Value::Null))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        use StatusCode as S;
        let none = Map::new();
        match self {
            ApiError::Unauthorized(why) => {
                // RFC 6750 3: every 401 says how to authenticate, and why a token failed.
                let mut response = problem(S::UNAUTHORIZED, "unauthorized", why.detail(), none);
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, why.challenge());
                response
            }
            ApiError::MalformedJson(why) => problem(S::BAD_REQUEST, "malformed_json", &why, none),
            ApiError::UnsupportedMediaType => problem(
                S::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as application/json",
                none,
            ),
            ApiError::PayloadTooLarge => problem(
                S::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the body is too large",
                none,
            ),
            ApiError::UnreadableBody => problem(
                S::BAD_REQUEST,
                "unreadable_body",
                "the request body could not be read to its end",
                none,
            ),
            ApiError::BodyTimeout => problem(
                S::REQUEST_TIMEOUT,
                "body_timeout",
                "the request body did not arrive in time",
                none,
            ),
            ApiError::NoRoute => problem(S::NOT_FOUND, "not_found", "no such resource", none),
            ApiError::MethodNotAllowed => problem(
                S::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed here",
                none,
            ),
            ApiError::Timeout => service_unavailable(
                "timeout",
                "the request took too long; a change it started may still complete, so retry it \
                 with the same ids",
            ),
            ApiError::RateLimited { retry_after_secs } => with_retry_after(
                problem(
                    S::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "too many requests of this kind from you; retry after the time in Retry-After",
                    one("retry_after_secs", retry_after_secs.into()),
                ),
                retry_after_secs,
            ),
            ApiError::Overloaded => service_unavailable(
                "overloaded",
                "the service is serving as many requests as it can; retry shortly",
            ),
            ApiError::Internal(why) => {
                tracing::error!(%why, "internal error");
                problem(S::INTERNAL_SERVER_ERROR, "internal", "internal error", none)
            }
            ApiError::Service(e) => service_problem(e),
        }
    }
}

/// The `Retry-After` of every 503. Whatever makes us answer one (a full in-flight bound, a
/// database out of connections, a deadlock, a replica failing over) passes in well under a
/// second, or a retry a second later is refused just as cheaply; whole seconds are all the
/// header can say, so one is the shortest honest answer.
pub const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 1;

/// A 503 problem with `Retry-After`: every 503 problem is built here. (`/readyz`'s 503 is a
/// probe's report, not a refusal.)
pub fn service_unavailable(code: &str, detail: &str) -> Response {
    with_retry_after(
        problem(StatusCode::SERVICE_UNAVAILABLE, code, detail, Map::new()),
        UNAVAILABLE_RETRY_AFTER_SECS,
    )
}

/// Adds `Retry-After: secs` (RFC 9110 10.2.3: delay in whole seconds).
fn with_retry_after(mut response: Response, secs: u64) -> Response {
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    response
}

fn service_problem(e: Error) -> Response {
    use StatusCode as S;
    let none = Map::new();
    match e {
        Error::Validation(f) => problem(
            S::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "the request has invalid fields",
            field_errors(&f.0),
        ),
        Error::NotFound => problem(S::NOT_FOUND, "not_found", "no such resource", none),
        Error::Forbidden(why) => problem(S::FORBIDDEN, "forbidden", why, none),
        Error::VersionConflict { current_version } => problem(
            S::CONFLICT,
            "version_conflict",
            "the order changed since you read it; read it again",
            one("current_version", current_version.into()),
        ),
        // RFC 9457 reserves `status` for the HTTP status, so the order's status is
        // `current_status`.
        Error::InvalidTransition { status } => problem(
            S::CONFLICT,
            "invalid_transition",
            &format!("not allowed while the order is {status}"),
            one("current_status", status.name().into()),
        ),
        Error::IdempotencyConflict => problem(
            S::CONFLICT,
            "idempotency_conflict",
            "this id was already used with different content",
            none,
        ),
        Error::Archived => problem(
            S::CONFLICT,
            "archived",
            "the order is archived: it can be read, and money for it is still recorded, but it changes no more",
            none,
        ),
        Error::OutOfStock { product_id } => problem(
            S::CONFLICT,
            "out_of_stock",
            "not enough stock",
            one("product_id", product_id.to_string().into()),
        ),
        Error::CouponUnavailable { coupon_id } => problem(
            S::CONFLICT,
            "coupon_unavailable",
            "the coupon was used by another order",
            one("coupon_id", coupon_id.to_string().into()),
        ),
        Error::LimitExceeded { held, max } => {
            let mut extra = one("held_units", held.into());
            extra.insert("max_unpaid_units".into(), max.into());
            problem(
                S::CONFLICT,
                "limit_exceeded",
                "your unpaid orders hold too many units; pay or cancel some first",
                extra,
            )
        }
        Error::FlashLimit { sale_id, limit } => {
            let mut extra = one("flash_sale_id", sale_id.to_string().into());
            extra.insert("per_user_limit".into(), limit.into());
            problem(
                S::CONFLICT,
                "limit_exceeded",
                "this flash sale allows no more units to you",
                extra,
            )
        }
        Error::PaymentMismatch { detail } => problem(S::CONFLICT, "payment_mismatch", &detail, none),
        Error::Unavailable(why) => {
            tracing::warn!(%why, "service unavailable");
            service_unavailable("unavailable", "temporarily unavailable; retry")
        }
        // A dependency's bad moment (refused or lost connections, an exhausted pool, a
        // deadlock) is a 503 to retry; anything else a database says is a bug of ours.
        Error::Storage(e) if e.is_transient() => {
            tracing::warn!(error = %cause_chain(&e), "database unavailable");
            service_unavailable("unavailable", "a database is unavailable; retry")
        }
        Error::Storage(e) => {
            tracing::error!(error = %cause_chain(&e), "storage failure");
            problem(S::INTERNAL_SERVER_ERROR, "internal", "internal error", none)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::cause_chain;
    use super::{ApiError, Problem};
    use crate::domain::ids::{CouponId, ProductId};
    use crate::domain::order::FieldErrors;
    use crate::domain::status::OrderStatus;
    use crate::service::Error;
    use axum::response::IntoResponse;
    use utoipa::openapi::schema::Schema;
    use utoipa::openapi::RefOr;
    use utoipa::PartialSchema;

    /// Every member a problem carries is a property of the documented `Problem` schema, and
    /// every required one is there.
    #[tokio::test]
    async fn every_problem_body_matches_the_documented_schema() {
        let RefOr::T(Schema::Object(schema)) = Problem::schema() else {
            panic!("Problem is an object schema");
        };
        let errors = [
            ApiError::Unauthorized(super::super::auth::AuthError::Missing),
            ApiError::MalformedJson("x".into()),
            ApiError::UnsupportedMediaType,
            ApiError::PayloadTooLarge,
            ApiError::UnreadableBody,
            ApiError::BodyTimeout,
            ApiError::NoRoute,
            ApiError::MethodNotAllowed,
            ApiError::Timeout,
            ApiError::Internal("x".into()),
            FieldErrors::single("f", "m").into(),
            Error::NotFound.into(),
            Error::Forbidden("x").into(),
            Error::VersionConflict { current_version: 3 }.into(),
            Error::InvalidTransition {
                status: OrderStatus::Shipped,
            }
            .into(),
            Error::IdempotencyConflict.into(),
            Error::Archived.into(),
            Error::OutOfStock {
                product_id: ProductId::new(7).unwrap(),
            }
            .into(),
            Error::CouponUnavailable {
                coupon_id: CouponId::new(7).unwrap(),
            }
            .into(),
            Error::PaymentMismatch { detail: "x".into() }.into(),
            Error::Unavailable("x".into()).into(),
        ];
        for e in errors {
            let text = format!("{e:?}");
            let body = axum::body::to_bytes(e.into_response().into_body(), 1 << 16)
                .await
                .unwrap();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let members = body.as_object().unwrap();
            for key in members.keys() {
                assert!(
                    schema.properties.contains_key(key),
                    "{text}: {key} is undocumented"
                );
            }
            for key in &schema.required {
                assert!(members.contains_key(key), "{text}: {key} is missing");
            }
        }
    }

    /// Every 503 says when to retry; a storage error is a 503 exactly when it is transient.
    #[test]
    fn every_503_carries_retry_after_and_transient_storage_errors_are_503() {
        use crate::storage::StorageError;
        let unavailable: [ApiError; 5] = [
            ApiError::Timeout,
            ApiError::Overloaded,
            Error::Unavailable("x".into()).into(),
            StorageError::Db(sqlx::Error::PoolTimedOut).into(),
            StorageError::Db(sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into())).into(),
        ];
        for e in unavailable {
            let text = format!("{e:?}");
            let response = e.into_response();
            assert_eq!(response.status(), 503, "{text}");
            assert_eq!(response.headers()["retry-after"], "1", "{text}");
        }
        let ours: ApiError = StorageError::Corrupt("x".into()).into();
        let response = ours.into_response();
        assert_eq!(response.status(), 500);
        assert!(!response.headers().contains_key("retry-after"));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("storage failed")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("query failed: {0}")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn the_log_line_of_an_error_carries_every_cause() {
        let e = Outer(Middle(std::io::Error::other("connection refused")));
        assert_eq!(
            cause_chain(&e),
            "storage failed: query failed: connection refused"
        );
    }
}
