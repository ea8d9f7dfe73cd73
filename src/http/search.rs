//! `GET /v1/search/orders`: order search over the index the event stream feeds (see
//! [`crate::search`]). The caller's visibility is part of the query, so a page is never
//! filtered after its limit. The index lags the orders by the stream's delay: a write is
//! found once its event is applied (a second or so), unlike `GET /v1/orders`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::domain::order::{FieldErrors, Order};
use crate::domain::status::OrderStatus;
use crate::search::index::MAX_QUERY_CHARS;
use crate::search::{Scope, SearchQuery, MAX_LIMIT};
use crate::service::Error;

use super::auth::Auth;
use super::error::ApiError;
use super::extract::QueryMap;
use super::openapi::{Forbidden, Unauthorized, Unavailable, Unprocessable};
use super::orders::{parse_time, OrderView};
use super::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(search_orders))
}

/// The orders a search found, newest first.
#[derive(Serialize, ToSchema)]
pub struct SearchResults<'a> {
    orders: Vec<OrderView<'a>>,
}

/// The query string as a [`SearchQuery`] in `scope`; every bad parameter is named.
fn parse(
    scope: Scope,
    params: &std::collections::HashMap<String, String>,
) -> Result<SearchQuery, FieldErrors> {
    let mut errors = FieldErrors::default();
    let mut q = SearchQuery::new(scope);
    for (k, v) in params {
        match k.as_str() {
            "q" => {
                let text = v.trim();
                if text.is_empty() || text.chars().count() > MAX_QUERY_CHARS {
                    errors.push(
                        "q",
                        format!(
                            "must be 1 to {MAX_QUERY_CHARS} characters: words of a product name, an order id or a tracking number"
                        ),
                    );
                } else {
                    q.text = Some(text.to_owned());
                }
            }
            "status" => {
                q.status = OrderStatus::parse(v).or_else(|| {
                    errors.push("status", "must be a status name or code");
                    None
                })
            }
            "created_from" => q.created_from = parse_time(k, v, &mut errors),
            "created_to" => q.created_to = parse_time(k, v, &mut errors),
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => q.limit = n,
                _ => errors.push("limit", "must be a number between 1 and 100"),
            },
            other => errors.push(other, "is not a parameter of this search"),
        }
    }
    errors.into_result(q)
}

#[utoipa::path(
    get,
    path = "/v1/search/orders",
    operation_id = "search_orders",
    tag = "search",
    description = "Orders matching `q` (every word in a product name, the exact order id, or the exact tracking number) and the filters, newest first. Users search their own orders, merchants their shop's, administrators all. The index follows the order event stream, so a change shows up after a short delay.",
    params(
        ("q" = Option<String>, Query, description = "Product-name words, an order id or a tracking number (1 to 200 characters); absent: every order of the caller's scope"),
        ("status" = Option<String>, Query, description = "A status name or code"),
        ("created_from" = Option<chrono::DateTime<chrono::Utc>>, Query, description = "RFC 3339, inclusive"),
        ("created_to" = Option<chrono::DateTime<chrono::Utc>>, Query, description = "RFC 3339, exclusive"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "Results (default 20)"),
    ),
    responses(
        (status = 200, description = "The matching orders, newest first", body = SearchResults),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
async fn search_orders(
    State(s): State<AppState>,
    Auth(c): Auth,
    QueryMap(params): QueryMap,
) -> Result<Response, ApiError> {
    let scope = Scope::of(c).ok_or(Error::Forbidden("the payment channel does not search orders"))?;
    let query = parse(scope, &params)?;
    let index = s
        .search
        .clone()
        .ok_or_else(|| Error::Unavailable("search is not enabled on this process".into()))?;
    if index.fed_elsewhere() {
        return Err(Error::Unavailable(
            "another host keeps this deployment's search index; route /v1/search/* to it".into(),
        )
        .into());
    }
    let found = tokio::task::spawn_blocking(move || index.search(&query))
        .await
        .map_err(|e| ApiError::Internal(format!("search task failed: {e}")))?
        .map_err(|e| ApiError::Internal(format!("search failed: {e}")))?;
    let orders: Vec<Order> = found
        .iter()
        .filter_map(|snapshot| {
            let order = snapshot.to_order();
            if order.is_none() {
                tracing::error!(
                    order_id = snapshot.order_id,
                    "indexed snapshot out of its domain; skipped"
                );
            }
            order
        })
        .collect();
    let body = SearchResults {
        orders: orders
            .iter()
            .map(|o| OrderView::from(o).redacted_for(c))
            .collect(),
    };
    Ok(axum::Json(body).into_response())
}
