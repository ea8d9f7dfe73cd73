//! The one error type at the HTTP edge, and its RFC 9457 problem responses.
//!
//! Every refusal carries a stable machine `code` ([`ProblemCode`], one HTTP status each, one
//! section each in `docs/errors.md`), and every body is a [`Problem`] serialised: the type
//! the OpenAPI document's schema is generated from, so the two cannot drift. Internal causes (database errors, broken
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
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::ids::{CouponId, FlashSaleId, ProductId};
use crate::domain::order::{FieldError, FieldErrors};
use crate::service::Error;
use crate::storage::StorageError;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// The stable `code` of a problem: one per kind of refusal, each with one HTTP status
/// ([`ProblemCode::status`]) and a section in `docs/errors.md` (a test holds the three
/// together). Clients branch on it; the `detail` is for people and may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProblemCode {
    MalformedJson,
    UnreadableBody,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    BodyTimeout,
    VersionConflict,
    InvalidTransition,
    IdempotencyConflict,
    Archived,
    OutOfStock,
    CouponUnavailable,
    LimitExceeded,
    PaymentMismatch,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
    RateLimited,
    Internal,
    Unavailable,
    Overloaded,
    Timeout,
}

impl ProblemCode {
    /// Every code, in the order of `docs/errors.md` (by status).
    pub const ALL: [ProblemCode; 23] = [
        ProblemCode::MalformedJson,
        ProblemCode::UnreadableBody,
        ProblemCode::Unauthorized,
        ProblemCode::Forbidden,
        ProblemCode::NotFound,
        ProblemCode::MethodNotAllowed,
        ProblemCode::BodyTimeout,
        ProblemCode::VersionConflict,
        ProblemCode::InvalidTransition,
        ProblemCode::IdempotencyConflict,
        ProblemCode::Archived,
        ProblemCode::OutOfStock,
        ProblemCode::CouponUnavailable,
        ProblemCode::LimitExceeded,
        ProblemCode::PaymentMismatch,
        ProblemCode::PayloadTooLarge,
        ProblemCode::UnsupportedMediaType,
        ProblemCode::ValidationFailed,
        ProblemCode::RateLimited,
        ProblemCode::Internal,
        ProblemCode::Unavailable,
        ProblemCode::Overloaded,
        ProblemCode::Timeout,
    ];

    /// The code as it is sent (what serde writes).
    pub fn as_str(self) -> &'static str {
        use ProblemCode as C;
        match self {
            C::MalformedJson => "malformed_json",
            C::UnreadableBody => "unreadable_body",
            C::Unauthorized => "unauthorized",
            C::Forbidden => "forbidden",
            C::NotFound => "not_found",
            C::MethodNotAllowed => "method_not_allowed",
            C::BodyTimeout => "body_timeout",
            C::VersionConflict => "version_conflict",
            C::InvalidTransition => "invalid_transition",
            C::IdempotencyConflict => "idempotency_conflict",
            C::Archived => "archived",
            C::OutOfStock => "out_of_stock",
            C::CouponUnavailable => "coupon_unavailable",
            C::LimitExceeded => "limit_exceeded",
            C::PaymentMismatch => "payment_mismatch",
            C::PayloadTooLarge => "payload_too_large",
            C::UnsupportedMediaType => "unsupported_media_type",
            C::ValidationFailed => "validation_failed",
            C::RateLimited => "rate_limited",
            C::Internal => "internal",
            C::Unavailable => "unavailable",
            C::Overloaded => "overloaded",
            C::Timeout => "timeout",
        }
    }

    /// The one HTTP status a problem of this code has.
    pub fn status(self) -> StatusCode {
        use ProblemCode as C;
        use StatusCode as S;
        match self {
            C::MalformedJson | C::UnreadableBody => S::BAD_REQUEST,
            C::Unauthorized => S::UNAUTHORIZED,
            C::Forbidden => S::FORBIDDEN,
            C::NotFound => S::NOT_FOUND,
            C::MethodNotAllowed => S::METHOD_NOT_ALLOWED,
            C::BodyTimeout => S::REQUEST_TIMEOUT,
            C::VersionConflict
            | C::InvalidTransition
            | C::IdempotencyConflict
            | C::Archived
            | C::OutOfStock
            | C::CouponUnavailable
            | C::LimitExceeded
            | C::PaymentMismatch => S::CONFLICT,
            C::PayloadTooLarge => S::PAYLOAD_TOO_LARGE,
            C::UnsupportedMediaType => S::UNSUPPORTED_MEDIA_TYPE,
            C::ValidationFailed => S::UNPROCESSABLE_ENTITY,
            C::RateLimited => S::TOO_MANY_REQUESTS,
            C::Internal => S::INTERNAL_SERVER_ERROR,
            C::Unavailable | C::Overloaded | C::Timeout => S::SERVICE_UNAVAILABLE,
        }
    }
}

/// The body of every problem response (RFC 9457), and its schema in the OpenAPI document:
/// every body is this type serialised, so the two cannot drift. The five members every
/// problem has, then the extension members of some codes, left out when absent.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Problem {
    /// `urn:orderly:problem:<code>`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The HTTP status's reason phrase.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// For people; may change. Never carries internal causes.
    pub detail: String,
    /// Stable, for programs (see `docs/errors.md`).
    pub code: ProblemCode,
    /// `validation_failed`: the failing fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
    /// `version_conflict`: the order's version now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_version: Option<i64>,
    /// `invalid_transition`: the order's status now (RFC 9457 reserves `status`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_status: Option<String>,
    /// `out_of_stock`: the product that ran out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_id: Option<ProductId>,
    /// `coupon_unavailable`: the coupon another order used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coupon_id: Option<CouponId>,
    /// `rate_limited` and every 503: the `Retry-After` header's seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
    /// `limit_exceeded` (unpaid units): the units the buyer's unpaid orders hold now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_units: Option<i64>,
    /// `limit_exceeded` (unpaid units): the most units unpaid orders may hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_unpaid_units: Option<i64>,
    /// `limit_exceeded` (flash sale): the sale whose per-buyer limit this order passes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flash_sale_id: Option<FlashSaleId>,
    /// `limit_exceeded` (flash sale): the most units of the sale one buyer may hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_user_limit: Option<i64>,
}

impl Problem {
    /// A problem of `code` (its status, title and type follow from it), no extension members.
    pub fn new(code: ProblemCode, detail: impl Into<String>) -> Problem {
        let status = code.status();
        Problem {
            type_: format!("urn:orderly:problem:{}", code.as_str()),
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            code,
            errors: None,
            current_version: None,
            current_status: None,
            product_id: None,
            coupon_id: None,
            retry_after_secs: None,
            held_units: None,
            max_unpaid_units: None,
            flash_sale_id: None,
            per_user_limit: None,
        }
    }
}

/// `application/problem+json`, with `Retry-After` when the problem says when to retry.
impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.code.status();
        let retry_after = self.retry_after_secs;
        let mut response = match serde_json::to_vec(&self) {
            Ok(body) => (status, [(header::CONTENT_TYPE, PROBLEM_JSON)], body).into_response(),
            // Strings, numbers and ids only: never happens.
            Err(_) => status.into_response(),
        };
        if let Some(secs) = retry_after {
            // RFC 9110 10.2.3: the delay in whole seconds.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// A problem response of `code` without extension members.
pub fn problem(code: ProblemCode, detail: impl Into<String>) -> Response {
    Problem::new(code, detail).into_response()
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

impl ApiError {
    /// Every error the edge maps, one or more per code: every code is answered by one. For
    /// the contract's tests (here and in `tests/api/problems.rs`), not for serving.
    #[doc(hidden)]
    pub fn every_kind() -> Vec<ApiError> {
        use crate::domain::ids::{CouponId, FlashSaleId, ProductId};
        use crate::domain::status::OrderStatus;
        use crate::service::Error;
        vec![
            ApiError::Unauthorized(super::auth::AuthError::Missing),
            ApiError::MalformedJson("x".into()),
            ApiError::UnsupportedMediaType,
            ApiError::PayloadTooLarge,
            ApiError::UnreadableBody,
            ApiError::BodyTimeout,
            ApiError::NoRoute,
            ApiError::MethodNotAllowed,
            ApiError::Timeout,
            ApiError::RateLimited { retry_after_secs: 3 },
            ApiError::Overloaded,
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
            Error::LimitExceeded { held: 9, max: 10 }.into(),
            Error::FlashLimit {
                sale_id: FlashSaleId::new(5).unwrap(),
                limit: 2,
            }
            .into(),
            Error::PaymentMismatch { detail: "x".into() }.into(),
            Error::Unavailable("x".into()).into(),
            crate::storage::StorageError::Db(sqlx::Error::PoolTimedOut).into(),
            crate::storage::StorageError::Corrupt("x".into()).into(),
        ]
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        use ProblemCode as C;
        match self {
            ApiError::Unauthorized(why) => {
                // RFC 6750 3: every 401 says how to authenticate, and why a token failed.
                let mut response = problem(C::Unauthorized, why.detail());
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, why.challenge());
                response
            }
            ApiError::MalformedJson(why) => problem(C::MalformedJson, why),
            ApiError::UnsupportedMediaType => {
                problem(C::UnsupportedMediaType, "send the body as application/json")
            }
            ApiError::PayloadTooLarge => problem(C::PayloadTooLarge, "the body is too large"),
            ApiError::UnreadableBody => {
                problem(C::UnreadableBody, "the request body could not be read to its end")
            }
            ApiError::BodyTimeout => problem(C::BodyTimeout, "the request body did not arrive in time"),
            ApiError::NoRoute => problem(C::NotFound, "no such resource"),
            ApiError::MethodNotAllowed => problem(C::MethodNotAllowed, "method not allowed here"),
            ApiError::Timeout => service_unavailable(
                C::Timeout,
                "the request took too long; a change it started may still complete, so retry it \
                 with the same ids",
            ),
            ApiError::RateLimited { retry_after_secs } => Problem {
                retry_after_secs: Some(retry_after_secs),
                ..Problem::new(
                    C::RateLimited,
                    "too many requests of this kind from you; retry after the time in Retry-After",
                )
            }
            .into_response(),
            ApiError::Overloaded => service_unavailable(
                C::Overloaded,
                "the service is serving as many requests as it can; retry shortly",
            ),
            ApiError::Internal(why) => {
                tracing::error!(%why, "internal error");
                problem(C::Internal, "internal error")
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

/// A 503 problem with `Retry-After` (and `retry_after_secs`): every 503 problem is built
/// here. (`/readyz`'s 503 is a probe's report, not a refusal.)
pub fn service_unavailable(code: ProblemCode, detail: &str) -> Response {
    Problem {
        retry_after_secs: Some(UNAVAILABLE_RETRY_AFTER_SECS),
        ..Problem::new(code, detail)
    }
    .into_response()
}

fn service_problem(e: Error) -> Response {
    use ProblemCode as C;
    match e {
        Error::Validation(f) => Problem {
            errors: Some(f.0),
            ..Problem::new(C::ValidationFailed, "the request has invalid fields")
        }
        .into_response(),
        Error::NotFound => problem(C::NotFound, "no such resource"),
        Error::Forbidden(why) => problem(C::Forbidden, why),
        Error::VersionConflict { current_version } => Problem {
            current_version: Some(current_version),
            ..Problem::new(
                C::VersionConflict,
                "the order changed since you read it; read it again",
            )
        }
        .into_response(),
        // RFC 9457 reserves `status` for the HTTP status, so the order's status is
        // `current_status`.
        Error::InvalidTransition { status } => Problem {
            current_status: Some(status.name().into()),
            ..Problem::new(
                C::InvalidTransition,
                format!("not allowed while the order is {status}"),
            )
        }
        .into_response(),
        Error::IdempotencyConflict => problem(
            C::IdempotencyConflict,
            "this id was already used with different content",
        ),
        Error::Archived => problem(
            C::Archived,
            "the order is archived: it can be read, and money for it is still recorded, but it changes no more",
        ),
        Error::OutOfStock { product_id } => Problem {
            product_id: Some(product_id),
            ..Problem::new(C::OutOfStock, "not enough stock")
        }
        .into_response(),
        Error::CouponUnavailable { coupon_id } => Problem {
            coupon_id: Some(coupon_id),
            ..Problem::new(C::CouponUnavailable, "the coupon was used by another order")
        }
        .into_response(),
        Error::LimitExceeded { held, max } => Problem {
            held_units: Some(held),
            max_unpaid_units: Some(max),
            ..Problem::new(
                C::LimitExceeded,
                "your unpaid orders hold too many units; pay or cancel some first",
            )
        }
        .into_response(),
        Error::FlashLimit { sale_id, limit } => Problem {
            flash_sale_id: Some(sale_id),
            per_user_limit: Some(limit),
            ..Problem::new(
                C::LimitExceeded,
                "this flash sale allows no more units to you",
            )
        }
        .into_response(),
        Error::PaymentMismatch { detail } => problem(C::PaymentMismatch, detail),
        Error::Unavailable(why) => {
            tracing::warn!(%why, "service unavailable");
            service_unavailable(C::Unavailable, "temporarily unavailable; retry")
        }
        // A dependency's bad moment (refused or lost connections, an exhausted pool, a
        // deadlock) is a 503 to retry; anything else a database says is a bug of ours.
        Error::Storage(e) if e.is_transient() => {
            tracing::warn!(error = %cause_chain(&e), "database unavailable");
            service_unavailable(C::Unavailable, "a database is unavailable; retry")
        }
        Error::Storage(e) => {
            tracing::error!(error = %cause_chain(&e), "storage failure");
            problem(C::Internal, "internal error")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::cause_chain;
    use super::{ApiError, Problem, ProblemCode};
    use crate::service::Error;
    use axum::response::IntoResponse;
    use utoipa::openapi::schema::Schema;
    use utoipa::openapi::RefOr;
    use utoipa::PartialSchema;

    /// Every body carries the members the schema requires and only members it has; its
    /// status and type follow from its code; every code is answered by some error.
    #[tokio::test]
    async fn every_problem_body_matches_the_documented_schema() {
        let RefOr::T(Schema::Object(schema)) = Problem::schema() else {
            panic!("Problem is an object schema");
        };
        let mut codes = std::collections::HashSet::new();
        for e in ApiError::every_kind() {
            let text = format!("{e:?}");
            let response = e.into_response();
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
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
            let code = ProblemCode::ALL
                .into_iter()
                .find(|c| body["code"] == c.as_str())
                .unwrap_or_else(|| panic!("{text}: unknown code {}", body["code"]));
            assert_eq!(status, code.status(), "{text}");
            assert_eq!(body["status"], status.as_u16(), "{text}");
            assert_eq!(
                body["type"],
                format!("urn:orderly:problem:{}", code.as_str()),
                "{text}"
            );
            codes.insert(code);
        }
        let unanswered: Vec<_> = ProblemCode::ALL
            .into_iter()
            .filter(|c| !codes.contains(c))
            .collect();
        assert!(unanswered.is_empty(), "no error answers {unanswered:?}");
    }

    /// `ALL` lists every variant (the derived schema's enum is the variants), each once and
    /// named as serde sends it.
    #[test]
    fn every_code_is_listed_once_under_its_sent_name() {
        let RefOr::T(Schema::Object(schema)) = ProblemCode::schema() else {
            panic!("ProblemCode is an enum schema");
        };
        let variants: Vec<serde_json::Value> = schema.enum_values.unwrap();
        let listed: Vec<serde_json::Value> = ProblemCode::ALL
            .into_iter()
            .map(|c| serde_json::to_value(c).unwrap())
            .collect();
        assert_eq!(listed, variants);
        for c in ProblemCode::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
    }

    /// Where a problem says when to retry, the header says the same.
    #[tokio::test]
    async fn retry_after_header_and_member_agree() {
        for e in ApiError::every_kind() {
            let text = format!("{e:?}");
            let response = e.into_response();
            let header = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let member = body.get("retry_after_secs").map(|v| v.to_string());
            assert_eq!(header, member, "{text}");
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
