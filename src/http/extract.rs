//! Request extractors that answer bad input with problem responses: JSON bodies (malformed,
//! unknown fields, wrong types, too large) and the bearer token.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::domain::order::FieldErrors;

use super::auth::{Auth, AuthError};
use super::error::ApiError;
use super::AppState;

/// A JSON body; every way it can be wrong is a 4xx problem.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(JsonRejection::JsonDataError(e)) => {
                // Wrong types, unknown or missing fields, overflowing numbers. The message
                // names the path of the failing field.
                let msg = e.body_text();
                let detail = msg.rsplit_once("target type: ").map(|(_, d)| d).unwrap_or(&msg);
                let field = detail.split_once(": ").map(|(f, _)| f).unwrap_or("body");
                Err(FieldErrors::single(field, detail).into())
            }
            Err(JsonRejection::JsonSyntaxError(e)) => Err(ApiError::MalformedJson(e.body_text())),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::UnsupportedMediaType),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::PayloadTooLarge),
            Err(e) => Err(ApiError::MalformedJson(e.body_text())),
        }
    }
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        // Verified already by a middleware that needed the caller first (the rate limits).
        if let Some(verified) = parts.extensions.get::<Verified>() {
            return Ok(Auth(verified.0));
        }
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or(ApiError::Unauthorized(AuthError::Missing))?;
        // The scheme name is case-insensitive (RFC 9110 11.1).
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or(ApiError::Unauthorized(AuthError::NotBearer))?;
        state
            .auth
            .verify(token)
            .await
            .map(Auth)
            .map_err(ApiError::Unauthorized)
    }
}

/// A caller whose token was verified earlier in this request (a request extension: only
/// this service's middleware puts it there, never the client).
#[derive(Debug, Clone, Copy)]
pub struct Verified(pub crate::domain::actor::Caller);

/// One path segment as text. A segment that is not UTF-8 (or missing) names nothing this
/// service holds: a 404 problem, like any other id that does not parse.
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(PathParam(v)),
            Err(_) => Err(ApiError::NoRoute),
        }
    }
}

/// The query string as name/value pairs; one that does not decode is a 422 problem.
pub struct QueryMap(pub std::collections::HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for QueryMap {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(QueryMap(v)),
            Err(e) => Err(FieldErrors::single("query", e.body_text()).into()),
        }
    }
}

/// The `Consistency-Token` request header: the token of an earlier write (its `Consistency-Token`
/// answer header) that this read must see, from any connection or process. Absent: none. One
/// this service did not write is a 422 problem.
pub struct TokenHeader(pub Option<crate::domain::consistency::Watermark>);

/// The header of a write's answer and of a read that must see that write.
pub const CONSISTENCY_TOKEN: axum::http::HeaderName =
    axum::http::HeaderName::from_static("consistency-token");

impl<S: Send + Sync> FromRequestParts<S> for TokenHeader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let Some(raw) = parts.headers.get(CONSISTENCY_TOKEN) else {
            return Ok(TokenHeader(None));
        };
        raw.to_str()
            .ok()
            .and_then(crate::domain::consistency::Watermark::parse)
            .map(|w| TokenHeader(Some(w)))
            .ok_or_else(|| {
                FieldErrors::single("Consistency-Token", "is not a token this service issued").into()
            })
    }
}
