//! Flash-sale routes: create, read and end a sale (administrators and the product's
//! merchant). Buying goes through `POST /v1/orders` as any order does. Each handler's
//! `#[utoipa::path]` is its entry in the OpenAPI document (see [`super::openapi`]).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::domain::flash::{FlashSale, NewFlashSaleRequest};
use crate::domain::ids::FlashSaleId;
use crate::service::Error;

use super::auth::Auth;
use super::error::ApiError;
use super::extract::{Json, PathParam};
use super::openapi::{Forbidden, NotFound, Unauthorized, Unavailable, WriteProblems};
use super::{write, AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_sale))
        .routes(routes!(get_sale))
        .routes(routes!(end_sale))
}

type ApiResult = Result<axum::response::Response, ApiError>;

fn sale_id(raw: &str) -> Result<FlashSaleId, ApiError> {
    Ok(FlashSaleId::parse(raw).ok_or(Error::NotFound)?)
}

#[utoipa::path(
    post,
    path = "/v1/flash-sales",
    operation_id = "create_flash_sale",
    tag = "flash sales",
    description = "Creates a flash sale of one product (administrators, the product's merchant): `units` at `sale_price` between `starts_at` and `ends_at`, at most `per_user_limit` per buyer, orders to be paid within `payment_timeout_secs`. Inside the window `POST /v1/orders` sells the product at the sale price through the sale; a sold-out sale answers 409 `out_of_stock`, a buyer over the limit 409 `limit_exceeded`. Windows of one product's sales may not overlap.",
    request_body = NewFlashSaleRequest,
    responses(
        (status = 201, description = "The sale", body = FlashSale),
        WriteProblems,
    )
)]
async fn create_sale(
    State(s): State<AppState>,
    Auth(c): Auth,
    Json(req): Json<NewFlashSaleRequest>,
) -> ApiResult {
    let flash = s.orders.flash().clone();
    let sale = write(&s, async move { flash.create(c, req).await }).await?;
    Ok((StatusCode::CREATED, axum::Json(sale)).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/flash-sales/{id}",
    operation_id = "get_flash_sale",
    tag = "flash sales",
    description = "A flash sale with the units sold so far (the database's count), for administrators and the shop's merchant; anyone else gets 404.",
    params(("id" = String, Path, description = "The flash sale id")),
    responses(
        (status = 200, description = "The sale", body = FlashSale),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
async fn get_sale(State(s): State<AppState>, Auth(c): Auth, PathParam(id): PathParam) -> ApiResult {
    let sale = s.orders.flash().get(c, sale_id(&id)?).await?;
    Ok(axum::Json(sale).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/flash-sales/{id}/end",
    operation_id = "end_flash_sale",
    tag = "flash sales",
    description = "Ends a flash sale now (administrators, the shop's merchant): no more units are sold through it; orders already made stay.",
    params(("id" = String, Path, description = "The flash sale id")),
    responses(
        (status = 200, description = "The ended sale", body = FlashSale),
        WriteProblems,
    )
)]
async fn end_sale(State(s): State<AppState>, Auth(c): Auth, PathParam(id): PathParam) -> ApiResult {
    let (flash, id) = (s.orders.flash().clone(), sale_id(&id)?);
    let sale = write(&s, async move { flash.end(c, id).await }).await?;
    Ok(axum::Json(sale).into_response())
}
