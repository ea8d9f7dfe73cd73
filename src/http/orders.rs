//! Order routes: ids, preview, create, read, list and the life cycle.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;

use crate::domain::actor::Caller;
use crate::domain::ids::{OrderId, ShopId, UserId};
use crate::domain::money::{Currency, Money};
use crate::domain::order::{
    Address, CreateOrderRequest, FieldErrors, Order, OrderDiscount, OrderLine, Payment, PreviewRequest,
};
use crate::domain::status::OrderStatus;
use crate::lease::IdSourceError;
use crate::service::orders::{
    Created, ListParams, PatchRequest, PaymentRequest, RefundRequest, ShipmentRequest, VersionedRequest,
};
use crate::service::Error;

use super::auth::Auth;
use super::error::ApiError;
use super::extract::{Json, PathParam, QueryMap};
use super::{write, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/order-ids", post(new_order_id))
        .route("/v1/orders/preview", post(preview))
        .route("/v1/orders", post(create).get(list))
        .route("/v1/orders/{id}", get(get_order).patch(patch))
        .route("/v1/orders/{id}/payments", post(pay))
        .route("/v1/orders/{id}/shipment", post(ship))
        .route("/v1/orders/{id}/confirm", post(confirm))
        .route("/v1/orders/{id}/cancel", post(cancel))
        .route("/v1/orders/{id}/refunds", post(refund))
        .route("/v1/orders/{id}/invalidate", post(invalidate))
}

type ApiResult = Result<Response, ApiError>;

/// The order as JSON (SPEC section 3): ids as strings, status as name and code.
#[derive(Serialize)]
pub struct OrderView<'a> {
    order_id: OrderId,
    user_id: UserId,
    shop_id: ShopId,
    status: &'static str,
    status_code: u8,
    version: i64,
    currency: Currency,
    total_amount: Money,
    discount_amount: Money,
    pay_amount: Money,
    items: &'a [OrderLine],
    payments: &'a [Payment],
    discounts: &'a [OrderDiscount],
    /// Absent when redacted for the caller (see [`OrderView::redacted_for`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<&'a Address>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remark: Option<&'a str>,
    tracking_number: Option<&'a str>,
    carrier: Option<&'a str>,
    close_reason: Option<&'a str>,
    refund_required: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    pay_deadline: DateTime<Utc>,
    paid_at: Option<DateTime<Utc>>,
    shipped_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    closed_at: Option<DateTime<Utc>>,
    invalidated_at: Option<DateTime<Utc>>,
}

impl<'a> From<&'a Order> for OrderView<'a> {
    fn from(o: &'a Order) -> Self {
        OrderView {
            order_id: o.order_id,
            user_id: o.user_id,
            shop_id: o.shop_id,
            status: o.status.name(),
            status_code: o.status.code(),
            version: o.version,
            currency: o.currency,
            total_amount: o.total_amount,
            discount_amount: o.discount_amount,
            pay_amount: o.pay_amount,
            items: &o.items,
            payments: &o.payments,
            discounts: &o.discounts,
            address: Some(&o.address),
            remark: Some(&o.remark),
            tracking_number: o.tracking_number.as_deref(),
            carrier: o.carrier.as_deref(),
            close_reason: o.close_reason.as_deref(),
            refund_required: o.refund_required,
            created_at: o.created_at,
            updated_at: o.updated_at,
            pay_deadline: o.pay_deadline,
            paid_at: o.paid_at,
            shipped_at: o.shipped_at,
            completed_at: o.completed_at,
            closed_at: o.closed_at,
            invalidated_at: o.invalidated_at,
        }
    }
}

impl OrderView<'_> {
    /// The view `caller` may receive: the payment channel (`service`) learns nothing about
    /// the buyer — no receiver name, phone or address, no remark.
    pub fn redacted_for(mut self, caller: Caller) -> Self {
        if caller == Caller::Service {
            self.address = None;
            self.remark = None;
        }
        self
    }
}

/// The whole order, as `caller` may see it, with its version as a strong `ETag`.
fn order_response(caller: Caller, status: StatusCode, order: &Order) -> Response {
    let etag = format!("\"{}\"", order.version);
    let view = OrderView::from(order).redacted_for(caller);
    (status, [(header::ETAG, etag)], axum::Json(view)).into_response()
}

fn order_id(raw: &str) -> Result<OrderId, ApiError> {
    Ok(OrderId::parse(raw).ok_or(Error::NotFound)?)
}

/// Reads accept `consistency=eventual|session|strong`; every read goes to the primary
/// for now, which satisfies all three.
fn check_consistency(params: &HashMap<String, String>) -> Result<(), ApiError> {
    match params.get("consistency").map(String::as_str) {
        None | Some("eventual" | "session" | "strong") => Ok(()),
        Some(_) => Err(FieldErrors::single("consistency", "must be eventual, session or strong").into()),
    }
}

async fn new_order_id(State(s): State<AppState>, Auth(c): Auth) -> ApiResult {
    let Caller::User(user) = c else {
        return Err(Error::Forbidden("order ids are issued to buyers").into());
    };
    let id = s.ids.next_for(user).map_err(|e| match e {
        IdSourceError::LeaseLost | IdSourceError::Clock(_) => Error::Unavailable(e.to_string()),
    })?;
    Ok((StatusCode::CREATED, axum::Json(json!({"order_id": id}))).into_response())
}

async fn preview(State(s): State<AppState>, Auth(c): Auth, Json(req): Json<PreviewRequest>) -> ApiResult {
    Ok(axum::Json(s.orders.preview(c, req).await?).into_response())
}

async fn create(State(s): State<AppState>, Auth(c): Auth, Json(req): Json<CreateOrderRequest>) -> ApiResult {
    let orders = s.orders.clone();
    let (order, created) = write(&s, async move { orders.create(c, req).await }).await?;
    let status = match created {
        Created::New => StatusCode::CREATED,
        Created::Replay => StatusCode::OK,
    };
    Ok(order_response(c, status, &order))
}

async fn get_order(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(id): PathParam,
    QueryMap(params): QueryMap,
) -> ApiResult {
    check_consistency(&params)?;
    let order = s.orders.get(c, order_id(&id)?).await?;
    match params.get("include").map(String::as_str) {
        None | Some("") => Ok(order_response(c, StatusCode::OK, &order)),
        Some("user") => {
            let buyer = s.catalog.buyer_of(&order).await?;
            let mut body = serde_json::to_value(OrderView::from(&order))
                .map_err(|e| Error::Unavailable(e.to_string()))?;
            body["user"] = serde_json::to_value(buyer).unwrap_or_default();
            let etag = format!("\"{}\"", order.version);
            Ok(([(header::ETAG, etag)], axum::Json(body)).into_response())
        }
        Some(_) => Err(FieldErrors::single("include", "only 'user' can be included").into()),
    }
}

fn parse_time(field: &str, v: &str, errors: &mut FieldErrors) -> Option<DateTime<Utc>> {
    match DateTime::parse_from_rfc3339(v).map(|t| t.with_timezone(&Utc)) {
        Ok(t) if crate::domain::order::is_storable_time(&t) => Some(t),
        _ => {
            errors.push(field, "must be an RFC 3339 time between the years 1970 and 9999");
            None
        }
    }
}

async fn list(State(s): State<AppState>, Auth(c): Auth, QueryMap(params): QueryMap) -> ApiResult {
    check_consistency(&params)?;
    let mut errors = FieldErrors::default();
    let mut p = ListParams::default();
    for (k, v) in &params {
        match k.as_str() {
            "user_id" => {
                p.user_id = UserId::parse(v).or_else(|| {
                    errors.push("user_id", "must be a positive decimal id string");
                    None
                })
            }
            "status" => {
                p.status = OrderStatus::parse(v).or_else(|| {
                    errors.push("status", "must be a status name or code");
                    None
                })
            }
            "created_from" => p.created_from = parse_time(k, v, &mut errors),
            "created_to" => p.created_to = parse_time(k, v, &mut errors),
            "limit" => {
                p.limit = v.parse().ok().or_else(|| {
                    errors.push("limit", "must be a number between 1 and 100");
                    None
                })
            }
            "cursor" => p.cursor = Some(v.clone()),
            "consistency" => {}
            other => errors.push(other, "is not a filter of this list"),
        }
    }
    errors.into_result(())?;
    let (orders, next) = s.orders.list(c, p).await?;
    let views: Vec<OrderView> = orders.iter().map(OrderView::from).collect();
    Ok(axum::Json(json!({"orders": views, "next_cursor": next})).into_response())
}

async fn patch(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(id): PathParam,
    Json(req): Json<PatchRequest>,
) -> ApiResult {
    let (orders, id) = (s.orders.clone(), order_id(&id)?);
    let order = write(&s, async move { orders.patch(c, id, req).await }).await?;
    Ok(order_response(c, StatusCode::OK, &order))
}

async fn pay(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(id): PathParam,
    Json(req): Json<PaymentRequest>,
) -> ApiResult {
    let (orders, id) = (s.orders.clone(), order_id(&id)?);
    let order = write(&s, async move { orders.pay(c, id, req).await }).await?;
    Ok(order_response(c, StatusCode::OK, &order))
}

async fn ship(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(id): PathParam,
    Json(req): Json<ShipmentRequest>,
) -> ApiResult {
    let (orders, id) = (s.orders.clone(), order_id(&id)?);
    let order = write(&s, async move { orders.ship(c, id, req).await }).await?;
    Ok(order_response(c, StatusCode::OK, &order))
}

async fn confirm(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(id): PathParam,
    Json(req): Json<VersionedRequest>,
) -> ApiResult {
    let (orders, id) = (s.orders.clone(), order_id(&id)?);
    let order = write(&s, async move { orders.confirm(c, id, req).await }).await?;
    Ok(order_response(c, StatusCode::OK, &order))
}

async fn cancel(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(id): PathParam,
    Json(req): Json<VersionedRequest>,
) -> ApiResult {
    let (orders, id) = (s.orders.clone(), order_id(&id)?);
    let order = write(&s, async move { orders.cancel(c, id, req).await }).await?;
    Ok(order_response(c, StatusCode::OK, &order))
}

async fn refund(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(id): PathParam,
    Json(req): Json<RefundRequest>,
) -> ApiResult {
    let (orders, id) = (s.orders.clone(), order_id(&id)?);
    let order = write(&s, async move { orders.refund(c, id, req).await }).await?;
    Ok(order_response(c, StatusCode::OK, &order))
}

async fn invalidate(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(id): PathParam,
    Json(req): Json<VersionedRequest>,
) -> ApiResult {
    let (orders, id) = (s.orders.clone(), order_id(&id)?);
    let order = write(&s, async move { orders.invalidate(c, id, req).await }).await?;
    Ok(order_response(c, StatusCode::OK, &order))
}
