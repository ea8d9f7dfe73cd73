//! Order routes: ids, preview, create, read, list and the life cycle. Each handler's
//! `#[utoipa::path]` is its entry in the OpenAPI document (see [`super::openapi`]).

use std::collections::HashMap;

use axum::extract::State;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::domain::actor::Caller;
use crate::domain::consistency::Consistency;
use crate::domain::ids::{OrderId, ShopId, UserId};
use crate::domain::money::{Currency, Money};
use crate::domain::order::{
    Address, CreateOrderRequest, FieldErrors, Order, OrderDiscount, OrderLine, Payment, PreviewRequest,
    Pricing,
};
use crate::domain::status::OrderStatus;
use crate::lease::IdSourceError;
use crate::service::orders::{
    Created, ListFilters, ListParams, MoneyAnswer, PatchRequest, PaymentRequest, ReadOptions, RefundRequest,
    Served, ShipmentRequest, VersionedRequest,
};
use crate::service::Error;

use super::auth::Auth;
use super::error::ApiError;
use super::extract::{Json, PathParam, QueryMap, TokenHeader, CONSISTENCY_TOKEN};
use super::openapi::{Forbidden, NotFound, Unauthorized, Unavailable, Unprocessable, WriteProblems};
use super::{write, AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(new_order_id))
        .routes(routes!(preview))
        .routes(routes!(create, list))
        .routes(routes!(get_order, patch))
        .routes(routes!(pay))
        .routes(routes!(ship))
        .routes(routes!(confirm))
        .routes(routes!(cancel))
        .routes(routes!(refund))
        .routes(routes!(invalidate))
}

type ApiResult = Result<Response, ApiError>;

/// The order as JSON (SPEC section 3): ids as strings, status as name and code. Every change
/// answers with it at its new version; `ETag` carries the version too.
#[derive(Serialize, ToSchema)]
pub struct OrderView<'a> {
    order_id: OrderId,
    user_id: UserId,
    shop_id: ShopId,
    /// `pending_payment`, `awaiting_shipment`, `shipped`, `completed`, `closed` or `invalid`.
    #[schema(example = "pending_payment")]
    status: &'static str,
    /// The status as its integer: 0 to 5, in the order of `status`'s names.
    status_code: u8,
    version: i64,
    currency: Currency,
    total_amount: Money,
    discount_amount: Money,
    pay_amount: Money,
    items: &'a [OrderLine],
    payments: &'a [Payment],
    discounts: &'a [OrderDiscount],
    /// Absent for the payment channel (`service`), which learns nothing about the buyer.
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<&'a Address>,
    /// Absent for the payment channel, like `address`.
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
    /// Present (`true`) only on a payment's or refund's answer for an archived order: the
    /// money was recorded against the archived document, which is now `refund_required`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    archived: bool,
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
            archived: false,
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

/// `POST /v1/order-ids`: a fresh id for the caller's next order.
#[derive(Serialize, ToSchema)]
pub struct NewOrderId {
    order_id: OrderId,
}

/// A page of `GET /v1/orders`, newest first.
#[derive(Serialize, ToSchema)]
pub struct OrderList<'a> {
    orders: Vec<OrderView<'a>>,
    /// Opaque; send it back as `cursor` for the next page. `null` on the last page.
    next_cursor: Option<String>,
    /// Present only when the page reaches back into the archive of old orders and the
    /// archive did not answer: the page then holds only the orders still in the hot store
    /// (archived ones in its range are missing; ask again later). Never a failed list.
    #[serde(skip_serializing_if = "Option::is_none")]
    archive: Option<ArchiveState>,
}

/// `OrderList.archive`.
#[derive(Serialize, ToSchema, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum ArchiveState {
    /// The archive failed or did not answer within `archive.read_timeout_ms`.
    Unavailable,
}

/// The whole order, as `caller` may see it, with its version as a strong `ETag`.
fn order_response(caller: Caller, status: StatusCode, order: &Order) -> Response {
    view_response(status, order, OrderView::from(order).redacted_for(caller))
}

fn view_response(status: StatusCode, order: &Order, view: OrderView<'_>) -> Response {
    let etag = format!("\"{}\"", order.version);
    (status, [(header::ETAG, etag)], axum::Json(view)).into_response()
}

/// A payment's or refund's answer: [`written_response`], saying whether the money went to
/// the archived order.
fn money_response(s: &AppState, caller: Caller, answer: &MoneyAnswer) -> Response {
    let mut view = OrderView::from(&answer.order).redacted_for(caller);
    view.archived = answer.archived;
    let mut response = view_response(StatusCode::OK, &answer.order, view);
    add_token(s, &mut response, answer.order.order_id);
    response
}

fn order_id(raw: &str) -> Result<OrderId, ApiError> {
    Ok(OrderId::parse(raw).ok_or(Error::NotFound)?)
}

/// A write's answer: the order, and the consistency token of the write (see
/// [`super::extract::TokenHeader`]).
fn written_response(s: &AppState, caller: Caller, status: StatusCode, order: &Order) -> Response {
    let mut response = order_response(caller, status, order);
    add_token(s, &mut response, order.order_id);
    response
}

fn add_token(s: &AppState, response: &mut Response, order: OrderId) {
    if let Some(token) = s.orders.consistency_token(order) {
        if let Ok(v) = HeaderValue::from_str(&token.to_string()) {
            response.headers_mut().insert(CONSISTENCY_TOKEN, v);
        }
    }
}

/// Which part of the system answered a read: `cache`, `replica` or `primary`.
const SERVED_BY: HeaderName = HeaderName::from_static("served-by");

fn served_by(mut response: Response, served: Served) -> Response {
    response
        .headers_mut()
        .insert(SERVED_BY, HeaderValue::from_static(served.name()));
    response
}

/// `consistency=eventual|session|strong` (default `session`) and the client's token.
fn read_options(params: &HashMap<String, String>, token: TokenHeader) -> Result<ReadOptions, ApiError> {
    let consistency = match params.get("consistency") {
        None => Consistency::Session,
        Some(v) => Consistency::parse(v)
            .ok_or_else(|| FieldErrors::single("consistency", "must be eventual, session or strong"))?,
    };
    Ok(ReadOptions {
        consistency,
        token: token.0,
    })
}

#[utoipa::path(
    post,
    path = "/v1/order-ids",
    operation_id = "new_order_id",
    tag = "orders",
    description = "A fresh order id for the calling buyer (role `user`); its low bits name the buyer's shard.",
    responses(
        (status = 201, description = "The id", body = NewOrderId),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
    )
)]
async fn new_order_id(State(s): State<AppState>, Auth(c): Auth) -> ApiResult {
    let Caller::User(user) = c else {
        return Err(Error::Forbidden("order ids are issued to buyers").into());
    };
    let id = s.ids.next_for(user).map_err(|e| match e {
        IdSourceError::LeaseLost | IdSourceError::Clock(_) => Error::Unavailable(e.to_string()),
    })?;
    Ok((StatusCode::CREATED, axum::Json(NewOrderId { order_id: id })).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/orders/preview",
    operation_id = "preview_order",
    tag = "orders",
    description = "Prices a would-be order (items, coupons) without side effects. Buyers only.",
    request_body = PreviewRequest,
    responses(
        (status = 200, description = "The pricing", body = Pricing),
        WriteProblems,
    )
)]
async fn preview(State(s): State<AppState>, Auth(c): Auth, Json(req): Json<PreviewRequest>) -> ApiResult {
    Ok(axum::Json(s.orders.preview(c, req).await?).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/orders",
    operation_id = "create_order",
    tag = "orders",
    description = "Creates an order exactly once per `order_id`: 201 new, 200 for an identical replay, 409 `idempotency_conflict` for the same id with other content. Buyers only.",
    request_body = CreateOrderRequest,
    responses(
        (status = 201, description = "Created", body = OrderView,
            headers(("Consistency-Token" = String, description = "Send it back on a later read to see this write"))),
        (status = 200, description = "An identical replay: the order as created", body = OrderView),
        WriteProblems,
    )
)]
async fn create(State(s): State<AppState>, Auth(c): Auth, Json(req): Json<CreateOrderRequest>) -> ApiResult {
    let orders = s.orders.clone();
    let (order, created) = write(&s, async move { orders.create(c, req).await }).await?;
    let status = match created {
        Created::New => StatusCode::CREATED,
        Created::Replay => StatusCode::OK,
    };
    Ok(written_response(&s, c, status, &order))
}

#[utoipa::path(
    get,
    path = "/v1/orders/{id}",
    operation_id = "get_order",
    tag = "orders",
    description = "The order, for its buyer, its shop and administrators; another party's order is 404.",
    params(
        ("id" = OrderId, Path, description = "The order id"),
        ("consistency" = Option<String>, Query, description = "`eventual` (any replica, or a cache hit), `session` (default: every write acknowledged before, by this or any client that passes its token) or `strong` (the primary)"),
        ("Consistency-Token" = Option<String>, Header, description = "The `Consistency-Token` of an earlier write: this read sees it, on any connection or process"),
        ("include" = Option<String>, Query, description = "`user` adds the buyer's profile as `user`"),
    ),
    responses(
        (status = 200, description = "The order; `ETag` is its version", body = OrderView,
            headers(("Served-By" = String, description = "`cache`, `replica` or `primary`"))),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
async fn get_order(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(id): PathParam,
    QueryMap(params): QueryMap,
    token: TokenHeader,
) -> ApiResult {
    let read = read_options(&params, token)?;
    let (order, served) = s.orders.get(c, order_id(&id)?, read).await?;
    let response = match params.get("include").map(String::as_str) {
        None | Some("") => order_response(c, StatusCode::OK, &order),
        Some("user") => {
            let buyer = s.catalog.buyer_of(&order).await?;
            let mut body = serde_json::to_value(OrderView::from(&order))
                .map_err(|e| Error::Unavailable(e.to_string()))?;
            body["user"] = serde_json::to_value(buyer).unwrap_or_default();
            let etag = format!("\"{}\"", order.version);
            ([(header::ETAG, etag)], axum::Json(body)).into_response()
        }
        Some(_) => return Err(FieldErrors::single("include", "only 'user' can be included").into()),
    };
    Ok(served_by(response, served))
}

/// Parses one filter of an order list (`status`, `created_from`, `created_to`, `limit`,
/// `cursor`) into `f`; any other name is an error of its own.
pub(crate) fn list_filter(k: &str, v: &str, f: &mut ListFilters, errors: &mut FieldErrors) {
    match k {
        "status" => {
            f.status = OrderStatus::parse(v).or_else(|| {
                errors.push("status", "must be a status name or code");
                None
            })
        }
        "created_from" => f.created_from = parse_time(k, v, errors),
        "created_to" => f.created_to = parse_time(k, v, errors),
        "limit" => {
            f.limit = v.parse().ok().or_else(|| {
                errors.push("limit", "must be a number between 1 and 100");
                None
            })
        }
        "cursor" => f.cursor = Some(v.to_owned()),
        other => errors.push(other, "is not a filter of this list"),
    }
}

pub(crate) fn parse_time(field: &str, v: &str, errors: &mut FieldErrors) -> Option<DateTime<Utc>> {
    match DateTime::parse_from_rfc3339(v).map(|t| t.with_timezone(&Utc)) {
        Ok(t) if crate::domain::order::is_storable_time(&t) => Some(t),
        _ => {
            errors.push(field, "must be an RFC 3339 time between the years 1970 and 9999");
            None
        }
    }
}

#[utoipa::path(
    get,
    path = "/v1/orders",
    operation_id = "list_orders",
    tag = "orders",
    description = "The caller's orders, newest first (keyset pages); administrators name a `user_id`.",
    params(
        ("user_id" = Option<UserId>, Query, description = "Administrators: whose orders"),
        ("status" = Option<String>, Query, description = "A status name or code"),
        ("created_from" = Option<DateTime<Utc>>, Query, description = "RFC 3339, inclusive"),
        ("created_to" = Option<DateTime<Utc>>, Query, description = "RFC 3339"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "Page size (default 20)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
        ("consistency" = Option<String>, Query, description = "`eventual` (any replica, or a cache hit), `session` (default: every write acknowledged before, by this or any client that passes its token) or `strong` (the primary)"),
        ("Consistency-Token" = Option<String>, Header, description = "The `Consistency-Token` of an earlier write: this read sees it, on any connection or process"),
    ),
    responses(
        (status = 200, description = "A page", body = OrderList,
            headers(("Served-By" = String, description = "`cache`, `replica` or `primary`"))),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
async fn list(
    State(s): State<AppState>,
    Auth(c): Auth,
    QueryMap(params): QueryMap,
    token: TokenHeader,
) -> ApiResult {
    let read = read_options(&params, token)?;
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
            "consistency" => {}
            _ => list_filter(k, v, &mut p.filters, &mut errors),
        }
    }
    errors.into_result(())?;
    let page = s.orders.list(c, p, read).await?;
    let body = OrderList {
        orders: page.orders.iter().map(OrderView::from).collect(),
        next_cursor: page.next_cursor,
        archive: page.archive_unavailable.then_some(ArchiveState::Unavailable),
    };
    Ok(served_by(axum::Json(body).into_response(), page.served))
}

#[utoipa::path(
    patch,
    path = "/v1/orders/{id}",
    operation_id = "patch_order",
    tag = "orders",
    description = "Field changes with `expected_version`: the buyer changes `address` and `remark` before shipment, the shop `tracking_number` and `carrier`.",
    params(("id" = OrderId, Path, description = "The order id")),
    request_body = PatchRequest,
    responses(
        (status = 200, description = "The order at its new version", body = OrderView,
            headers(("Consistency-Token" = String, description = "Send it back on a later read to see this write"))),
        WriteProblems,
    )
)]
async fn patch(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(id): PathParam,
    Json(req): Json<PatchRequest>,
) -> ApiResult {
    let (orders, id) = (s.orders.clone(), order_id(&id)?);
    let order = write(&s, async move { orders.patch(c, id, req).await }).await?;
    Ok(written_response(&s, c, StatusCode::OK, &order))
}

#[utoipa::path(
    post,
    path = "/v1/orders/{id}/payments",
    operation_id = "pay_order",
    tag = "orders",
    description = "Records the payment (role `service`): pending_payment → awaiting_shipment. The same `transaction_no` again answers the same result.",
    params(("id" = OrderId, Path, description = "The order id")),
    request_body = PaymentRequest,
    responses(
        (status = 200, description = "The order at its new version", body = OrderView,
            headers(("Consistency-Token" = String, description = "Send it back on a later read to see this write"))),
        WriteProblems,
    )
)]
async fn pay(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(id): PathParam,
    Json(req): Json<PaymentRequest>,
) -> ApiResult {
    let (orders, id) = (s.orders.clone(), order_id(&id)?);
    let answer = write(&s, async move { orders.pay(c, id, req).await }).await?;
    Ok(money_response(&s, c, &answer))
}

#[utoipa::path(
    post,
    path = "/v1/orders/{id}/shipment",
    operation_id = "ship_order",
    tag = "orders",
    description = "The shop ships: awaiting_shipment → shipped.",
    params(("id" = OrderId, Path, description = "The order id")),
    request_body = ShipmentRequest,
    responses(
        (status = 200, description = "The order at its new version", body = OrderView,
            headers(("Consistency-Token" = String, description = "Send it back on a later read to see this write"))),
        WriteProblems,
    )
)]
async fn ship(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(id): PathParam,
    Json(req): Json<ShipmentRequest>,
) -> ApiResult {
    let (orders, id) = (s.orders.clone(), order_id(&id)?);
    let order = write(&s, async move { orders.ship(c, id, req).await }).await?;
    Ok(written_response(&s, c, StatusCode::OK, &order))
}

#[utoipa::path(
    post,
    path = "/v1/orders/{id}/confirm",
    operation_id = "confirm_order",
    tag = "orders",
    description = "The buyer confirms receipt: shipped → completed.",
    params(("id" = OrderId, Path, description = "The order id")),
    request_body = VersionedRequest,
    responses(
        (status = 200, description = "The order at its new version", body = OrderView,
            headers(("Consistency-Token" = String, description = "Send it back on a later read to see this write"))),
        WriteProblems,
    )
)]
async fn confirm(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(id): PathParam,
    Json(req): Json<VersionedRequest>,
) -> ApiResult {
    let (orders, id) = (s.orders.clone(), order_id(&id)?);
    let order = write(&s, async move { orders.confirm(c, id, req).await }).await?;
    Ok(written_response(&s, c, StatusCode::OK, &order))
}

#[utoipa::path(
    post,
    path = "/v1/orders/{id}/cancel",
    operation_id = "cancel_order",
    tag = "orders",
    description = "The buyer (before payment) or an administrator cancels: → closed.",
    params(("id" = OrderId, Path, description = "The order id")),
    request_body = VersionedRequest,
    responses(
        (status = 200, description = "The order at its new version", body = OrderView,
            headers(("Consistency-Token" = String, description = "Send it back on a later read to see this write"))),
        WriteProblems,
    )
)]
async fn cancel(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(id): PathParam,
    Json(req): Json<VersionedRequest>,
) -> ApiResult {
    let (orders, id) = (s.orders.clone(), order_id(&id)?);
    let order = write(&s, async move { orders.cancel(c, id, req).await }).await?;
    Ok(written_response(&s, c, StatusCode::OK, &order))
}

#[utoipa::path(
    post,
    path = "/v1/orders/{id}/refunds",
    operation_id = "refund_order",
    tag = "orders",
    description = "Records a refund (roles `service`, `admin`); a full refund of a paid order closes it.",
    params(("id" = OrderId, Path, description = "The order id")),
    request_body = RefundRequest,
    responses(
        (status = 200, description = "The order at its new version", body = OrderView,
            headers(("Consistency-Token" = String, description = "Send it back on a later read to see this write"))),
        WriteProblems,
    )
)]
async fn refund(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(id): PathParam,
    Json(req): Json<RefundRequest>,
) -> ApiResult {
    let (orders, id) = (s.orders.clone(), order_id(&id)?);
    let answer = write(&s, async move { orders.refund(c, id, req).await }).await?;
    Ok(money_response(&s, c, &answer))
}

#[utoipa::path(
    post,
    path = "/v1/orders/{id}/invalidate",
    operation_id = "invalidate_order",
    tag = "orders",
    description = "An administrator invalidates the order: → invalid.",
    params(("id" = OrderId, Path, description = "The order id")),
    request_body = VersionedRequest,
    responses(
        (status = 200, description = "The order at its new version", body = OrderView,
            headers(("Consistency-Token" = String, description = "Send it back on a later read to see this write"))),
        WriteProblems,
    )
)]
async fn invalidate(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(id): PathParam,
    Json(req): Json<VersionedRequest>,
) -> ApiResult {
    let (orders, id) = (s.orders.clone(), order_id(&id)?);
    let order = write(&s, async move { orders.invalidate(c, id, req).await }).await?;
    Ok(written_response(&s, c, StatusCode::OK, &order))
}
