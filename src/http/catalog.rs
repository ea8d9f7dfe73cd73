//! Catalog routes: users, shops, products, stock, coupons. Each handler's `#[utoipa::path]`
//! is its entry in the OpenAPI document (see [`super::openapi`]).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::domain::ids::{ProductId, UserId};
use crate::domain::user::User;
use crate::service::catalog::{
    AddStockRequest, CouponView, NewCouponRequest, NewProductRequest, NewShopRequest, NewUserRequest,
};
use crate::service::Error;
use crate::storage::commerce::{Product, Shop};

use super::auth::Auth;
use super::error::ApiError;
use super::extract::{Json, PathParam};
use super::openapi::{Forbidden, NotFound, Unauthorized, Unavailable, WriteProblems};
use super::{write, AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_user))
        .routes(routes!(get_user))
        .routes(routes!(create_shop))
        .routes(routes!(create_product))
        .routes(routes!(get_product))
        .routes(routes!(add_stock))
        .routes(routes!(issue_coupon))
}

type ApiResult = Result<axum::response::Response, ApiError>;

fn created<T: serde::Serialize>(v: T) -> axum::response::Response {
    (StatusCode::CREATED, axum::Json(v)).into_response()
}

#[utoipa::path(
    post,
    path = "/v1/users",
    operation_id = "create_user",
    tag = "catalog",
    description = "Creates a user (administrators).",
    request_body = NewUserRequest,
    responses(
        (status = 201, body = User),
        WriteProblems,
    )
)]
async fn create_user(State(s): State<AppState>, Auth(c): Auth, Json(req): Json<NewUserRequest>) -> ApiResult {
    let catalog = s.catalog.clone();
    Ok(created(
        write(&s, async move { catalog.create_user(c, req).await }).await?,
    ))
}

#[utoipa::path(
    get,
    path = "/v1/users/{id}",
    operation_id = "get_user",
    tag = "catalog",
    description = "A user, for themselves and administrators; anyone else gets 404.",
    params(("id" = UserId, Path, description = "The user id")),
    responses(
        (status = 200, body = User),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
async fn get_user(State(s): State<AppState>, Auth(c): Auth, PathParam(id): PathParam) -> ApiResult {
    let id = UserId::parse(&id).ok_or(Error::NotFound)?;
    Ok(axum::Json(s.catalog.get_user(c, id).await?).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/shops",
    operation_id = "create_shop",
    tag = "catalog",
    description = "Creates a shop (administrators).",
    request_body = NewShopRequest,
    responses(
        (status = 201, body = Shop),
        WriteProblems,
    )
)]
async fn create_shop(State(s): State<AppState>, Auth(c): Auth, Json(req): Json<NewShopRequest>) -> ApiResult {
    let catalog = s.catalog.clone();
    Ok(created(
        write(&s, async move { catalog.create_shop(c, req).await }).await?,
    ))
}

#[utoipa::path(
    post,
    path = "/v1/products",
    operation_id = "create_product",
    tag = "catalog",
    description = "Creates a product with price and stock (administrators, the shop's merchant).",
    request_body = NewProductRequest,
    responses(
        (status = 201, body = Product),
        WriteProblems,
    )
)]
async fn create_product(
    State(s): State<AppState>,
    Auth(c): Auth,
    Json(req): Json<NewProductRequest>,
) -> ApiResult {
    let catalog = s.catalog.clone();
    Ok(created(
        write(&s, async move { catalog.create_product(c, req).await }).await?,
    ))
}

#[utoipa::path(
    get,
    path = "/v1/products/{id}",
    operation_id = "get_product",
    tag = "catalog",
    description = "A product, for any authenticated caller.",
    params(("id" = ProductId, Path, description = "The product id")),
    responses(
        (status = 200, body = Product),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
async fn get_product(State(s): State<AppState>, Auth(_): Auth, PathParam(id): PathParam) -> ApiResult {
    let id = ProductId::parse(&id).ok_or(Error::NotFound)?;
    Ok(axum::Json(s.catalog.get_product(id).await?).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/products/{id}/stock",
    operation_id = "add_stock",
    tag = "catalog",
    description = "Adds stock (administrators, the shop's merchant).",
    params(("id" = ProductId, Path, description = "The product id")),
    request_body = AddStockRequest,
    responses(
        (status = 200, body = Product),
        WriteProblems,
    )
)]
async fn add_stock(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(id): PathParam,
    Json(req): Json<AddStockRequest>,
) -> ApiResult {
    let id = ProductId::parse(&id).ok_or(Error::NotFound)?;
    let catalog = s.catalog.clone();
    Ok(axum::Json(write(&s, async move { catalog.add_stock(c, id, req).await }).await?).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/coupons",
    operation_id = "issue_coupon",
    tag = "catalog",
    description = "Issues a coupon to a user (administrators, merchants for their shop).",
    request_body = NewCouponRequest,
    responses(
        (status = 201, body = CouponView),
        WriteProblems,
    )
)]
async fn issue_coupon(
    State(s): State<AppState>,
    Auth(c): Auth,
    Json(req): Json<NewCouponRequest>,
) -> ApiResult {
    let catalog = s.catalog.clone();
    Ok(created(
        write(&s, async move { catalog.issue_coupon(c, req).await }).await?,
    ))
}
