//! The OpenAPI 3.1 document of the API, served at `GET /openapi.json`.
//!
//! Generated from the code: every handler carries `#[utoipa::path]` (body, parameters, success
//! schema and the problem statuses it can answer), and each feature's `router()` is a
//! `utoipa_axum` [`OpenApiRouter`] filled with `routes!`, so the router that serves requests
//! and the document are built from the same list: a served route is a documented route.
//!
//! What lives here is the frame: the document's info, the bearer JWT scheme, the reusable
//! problem responses (RFC 9457, schema [`Problem`], whose `code` is a [`ProblemCode`]), the
//! problems every operation can answer ([`add_shared_problems`]: 405, 500, and 429 on the
//! rate-limited routes) and the schemas of the domain's newtypes, which serialize as decimal
//! strings (ids), integers (money) or currency codes. And, behind `server.swagger_ui`, Swagger
//! UI at `/docs` ([`swagger_ui`]): a page over this document for people, not a route of the
//! API, so not in it.

use std::sync::Arc;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, PartialSchema, ToResponse, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::domain::ids::{CouponId, FlashSaleId, OrderId, ProductId, ShopId, UserId};
use crate::domain::money::{Currency, Money};
use crate::domain::order::FieldError;

use super::error::{ApiError, Problem, ProblemCode, PROBLEM_JSON};
use super::AppState;

/// The document's frame; the paths and their schemas come from the feature routers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "orderly",
        description = "An e-commerce order service: exactly-once creation, versioned life cycle, \
                       sharded MariaDB, Redis. Ids are decimal strings; amounts are integers in \
                       the currency's minor unit; errors are RFC 9457 problems with a stable `code`."
    ),
    modifiers(&BearerJwt),
    security(("bearer" = [])),
    components(
        schemas(Problem, ProblemCode, FieldError),
        responses(
            BadRequest,
            Unauthorized,
            Forbidden,
            NotFound,
            MethodNotAllowed,
            RequestTimeout,
            Conflict,
            PayloadTooLarge,
            UnsupportedMediaType,
            Unprocessable,
            TooManyRequests,
            InternalError,
            Unavailable
        )
    ),
    tags(
        (name = "orders", description = "Order ids, pricing, creation, reads and the life cycle"),
        (name = "cart", description = "The buyer's cart (checked out with `POST /v1/orders` and `from_cart: true`)"),
        (name = "search", description = "Order search over the index fed by the event stream"),
        (name = "catalog", description = "Users, shops, products, stock and coupons"),
        (name = "service", description = "Health, readiness, metrics and this document")
    )
)]
pub struct ApiDoc;

/// `Authorization: Bearer <JWT>` (HS256): `sub`, `role` and, for merchants, `shop_id`.
struct BearerJwt;

impl Modify for BearerJwt {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .bearer_format("JWT")
            .description(Some(
                "HS256 JWT with claims `sub` (user id), `role` (user, merchant, service, admin) \
                 and `shop_id` for merchants",
            ))
            .build();
        api.components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(openapi_json))
}

/// The document, built once when the router is (see [`super::router`]).
#[derive(Clone)]
pub struct Document(pub Arc<utoipa::openapi::OpenApi>);

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "service",
    security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = Object))
)]
async fn openapi_json(Extension(Document(doc)): Extension<Document>) -> Response {
    match serde_json::to_vec(doc.as_ref()) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => ApiError::Internal(format!("cannot render the OpenAPI document: {e}")).into_response(),
    }
}

// ---------------------------------------------------------------- newtype schemas

/// A 64-bit id as JSON carries it: a decimal string (JavaScript cannot hold 64-bit integers).
fn id_schema(what: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some("^[1-9][0-9]{0,18}$"))
        .description(Some(format!(
            "{what}: a positive 64-bit integer as a decimal string"
        )))
        .examples([serde_json::json!("1234567890123")])
        .into()
}

impl PartialSchema for OrderId {
    fn schema() -> RefOr<Schema> {
        id_schema("An order id (its low bits name the buyer's shard)")
    }
}
impl ToSchema for OrderId {}

impl PartialSchema for UserId {
    fn schema() -> RefOr<Schema> {
        id_schema("A user id")
    }
}
impl ToSchema for UserId {}

impl PartialSchema for ShopId {
    fn schema() -> RefOr<Schema> {
        id_schema("A shop id")
    }
}
impl ToSchema for ShopId {}

impl PartialSchema for ProductId {
    fn schema() -> RefOr<Schema> {
        id_schema("A product id")
    }
}
impl ToSchema for ProductId {}

impl PartialSchema for CouponId {
    fn schema() -> RefOr<Schema> {
        id_schema("A coupon id")
    }
}
impl ToSchema for CouponId {}

impl PartialSchema for FlashSaleId {
    fn schema() -> RefOr<Schema> {
        id_schema("A flash sale id")
    }
}
impl ToSchema for FlashSaleId {}

impl PartialSchema for Money {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::Int64,
            )))
            .description(Some("An amount in the currency's minor unit (e.g. fen, cents)"))
            .into()
    }
}
impl ToSchema for Money {}

impl PartialSchema for Currency {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[A-Z]{3}$"))
            .description(Some("An ISO 4217 currency code"))
            .examples([serde_json::json!("CNY")])
            .into()
    }
}
impl ToSchema for Currency {}

// ---------------------------------------------------------------- problem responses

/// A problem response (`application/problem+json`, schema `Problem`) saying which `code`s
/// it carries; with the `Retry-After` header when `retry_after`.
fn problem_response(description: &str, retry_after: bool) -> RefOr<utoipa::openapi::Response> {
    let mut response = ResponseBuilder::new().description(description).content(
        PROBLEM_JSON,
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Problem")))
            .build(),
    );
    if retry_after {
        let seconds = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(0))
            .build();
        response = response.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(seconds)
                .description(Some(
                    "Seconds to wait before retrying (also in `retry_after_secs`)",
                ))
                .build(),
        );
    }
    response.into()
}

/// One reusable response per problem status, referenced from the routes'
/// `responses(...)` as `response = Unauthorized` and listed in [`ApiDoc`]'s components.
/// Each names every code of its status (a unit test holds them to [`ProblemCode::status`]).
/// A macro only because `ToResponse` is implemented once per marker type.
macro_rules! problem_responses {
    ($($name:ident => $description:literal,)*) => {
        $(
            pub struct $name;

            impl<'r> ToResponse<'r> for $name {
                fn response() -> (&'r str, RefOr<utoipa::openapi::Response>) {
                    let retry_after = WITH_RETRY_AFTER.contains(&stringify!($name));
                    (stringify!($name), problem_response($description, retry_after))
                }
            }
        )*
    };
}

/// The responses whose problems say when to retry (`Retry-After`, `retry_after_secs`).
const WITH_RETRY_AFTER: &[&str] = &["TooManyRequests", "Unavailable"];

problem_responses! {
    BadRequest => "`malformed_json`: the body is not JSON; `unreadable_body`: the body could not be \
                   read to its end",
    RequestTimeout => "`body_timeout`: the body did not arrive within the request timeout",
    Unauthorized => "`unauthorized`: no bearer token, or one that does not verify",
    Forbidden => "`forbidden`: the caller's role may not do this",
    NotFound => "`not_found`: no such resource, or one the caller may not see",
    MethodNotAllowed => "`method_not_allowed`: the path exists, but not with this method",
    Conflict => "`version_conflict` (with `current_version`), `invalid_transition` (with \
                 `current_status`), `idempotency_conflict`, `out_of_stock` (with `product_id`), \
                 `coupon_unavailable` (with `coupon_id`), `limit_exceeded` (with `held_units` and \
                 `max_unpaid_units`, or `flash_sale_id` and `per_user_limit`), `payment_mismatch` \
                 or `archived` (the order was moved to the archive and changes no more)",
    PayloadTooLarge => "`payload_too_large`: the body is over the limit",
    UnsupportedMediaType => "`unsupported_media_type`: the body is not sent as application/json",
    Unprocessable => "`validation_failed`: the failing fields are in `errors`",
    TooManyRequests => "`rate_limited`: over this buyer's rate limit of the route; retry after \
                    `Retry-After` seconds (also in `retry_after_secs`)",
    InternalError => "`internal`: a bug of ours, logged; the body says nothing more",
    Unavailable => "`unavailable`, `overloaded` or `timeout`: a dependency is down or refuses \
                    connections, the service is full, or the request took too long; retry after \
                    `Retry-After` seconds (also in `retry_after_secs`; with the same ids for a write)",
}

/// The routes with per-user rate limits (see [`super::limits`]), as `(method, path)`: they
/// can answer 429.
pub const RATE_LIMITED: &[(&str, &str)] = &[("post", "/v1/orders"), ("post", "/v1/order-ids")];

/// Adds the problems every operation can answer to every operation of `doc`, once the
/// feature routers are merged into it ([`super::api`]): 405 `method_not_allowed` (its path
/// with another method), 500 `internal` (a bug), and 429 `rate_limited` on [`RATE_LIMITED`].
pub fn add_shared_problems(doc: &mut utoipa::openapi::OpenApi) {
    let shared = |status: &str, name: &str| (status.to_owned(), Ref::from_response_name(name).into());
    for (path, item) in doc.paths.paths.iter_mut() {
        let operations = [
            ("get", &mut item.get),
            ("put", &mut item.put),
            ("post", &mut item.post),
            ("delete", &mut item.delete),
            ("options", &mut item.options),
            ("head", &mut item.head),
            ("patch", &mut item.patch),
            ("trace", &mut item.trace),
        ];
        for (method, operation) in operations {
            let Some(operation) = operation else { continue };
            let responses = &mut operation.responses.responses;
            let mut add = |(status, response): (String, RefOr<utoipa::openapi::Response>)| {
                responses.entry(status).or_insert(response);
            };
            add(shared("405", "MethodNotAllowed"));
            add(shared("500", "InternalError"));
            if RATE_LIMITED.contains(&(method, path.as_str())) {
                add(shared("429", "TooManyRequests"));
            }
        }
    }
}

/// Swagger UI at `/docs` over `/openapi.json` (`server.swagger_ui`), from the files compiled
/// into the binary (nothing is fetched at run time).
pub fn swagger_ui<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    utoipa_swagger_ui::SwaggerUi::new("/docs")
        .config(utoipa_swagger_ui::Config::from("/openapi.json"))
        .into()
}

/// The problems a JSON write can answer, as one `responses(...)` entry: 400, 401, 403, 404,
/// 408, 409, 413, 415, 422 and 503, each a reference to its reusable response above.
pub struct WriteProblems;

impl utoipa::IntoResponses for WriteProblems {
    fn responses() -> std::collections::BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        [
            (400, "BadRequest"),
            (401, "Unauthorized"),
            (403, "Forbidden"),
            (404, "NotFound"),
            (408, "RequestTimeout"),
            (409, "Conflict"),
            (413, "PayloadTooLarge"),
            (415, "UnsupportedMediaType"),
            (422, "Unprocessable"),
            (503, "Unavailable"),
        ]
        .into_iter()
        .map(|(status, name)| (status.to_string(), Ref::from_response_name(name).into()))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    fn document() -> Value {
        serde_json::to_value(super::super::api().into_openapi()).unwrap()
    }

    /// Every `$ref` under `v`, as its JSON pointer into the document.
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push(r),
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn the_document_is_openapi_3_1_and_every_reference_resolves() {
        let doc = document();
        assert!(
            doc["openapi"].as_str().unwrap().starts_with("3.1"),
            "{}",
            doc["openapi"]
        );
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(!found.is_empty());
        for r in found {
            let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("external $ref {r}"));
            assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
        }
    }

    #[test]
    fn every_operation_has_an_id_responses_and_a_security_requirement() {
        let doc = document();
        let mut ids = std::collections::HashSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let id = op["operationId"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{method} {path}"));
                assert!(ids.insert(id.to_owned()), "operation id {id} twice");
                let responses = op["responses"].as_object().unwrap();
                assert!(!responses.is_empty(), "{id} has no responses");
                // Public routes say so with an empty requirement; the others inherit bearer.
                if op.get("security").is_none() {
                    assert!(path.starts_with("/v1/"), "{id} is public but does not say so");
                }
            }
        }
        assert!(doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer");
    }

    /// Routes enter the served router only through `routes!` (documented by construction): a
    /// plain axum `.route(` or `routing::` in the HTTP layer would serve an undocumented route.
    #[test]
    fn no_route_is_added_around_the_document() {
        let mut dirs = vec![std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/http"
        ))];
        // Every file under src/http, those of module directories (`auth/`) too.
        let files = std::iter::from_fn(|| {
            let dir = dirs.pop()?;
            let entries = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path());
            let (sub, files): (Vec<_>, Vec<_>) = entries.partition(|p| p.is_dir());
            dirs.extend(sub);
            Some(files)
        });
        for path in files.collect::<Vec<_>>().concat() {
            if path.ends_with("openapi.rs") {
                continue; // this test names what it looks for
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Test modules may build routers of their own; they are never served.
            let mut text = text.split("#[cfg(test)]").next().unwrap_or_default().to_owned();
            // The admin listener's router (`health::admin_router`) is not the API: it is
            // served on its own address and is deliberately not in the document.
            if let Some(start) = text.find("pub fn admin_router(") {
                let end = start + text[start..].find("\n}\n").unwrap_or(text.len() - start);
                text.replace_range(start..end, "");
            }
            for needle in [".route(", "routing::", ".nest("] {
                assert!(
                    !text.contains(needle),
                    "{} uses `{needle}`: add the route with `routes!` instead",
                    path.display()
                );
            }
        }
    }
}
