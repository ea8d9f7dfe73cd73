//! Catalog routes: users, shops, products, stock, coupons.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;

use crate::domain::ids::{ProductId, UserId};
use crate::service::catalog::{
    AddStockRequest, NewCouponRequest, NewProductRequest, NewShopRequest, NewUserRequest,
};
use crate::service::Error;

use super::auth::Auth;
use super::error::ApiError;
use super::extract::{Json, PathParam};
use super::{write, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/users", post(create_user))
        .route("/v1/users/{id}", get(get_user))
        .route("/v1/shops", post(create_shop))
        .route("/v1/products", post(create_product))
        .route("/v1/products/{id}", get(get_product))
        .route("/v1/products/{id}/stock", post(add_stock))
        .route("/v1/coupons", post(issue_coupon))
}

type ApiResult = Result<axum::response::Response, ApiError>;

fn created<T: serde::Serialize>(v: T) -> axum::response::Response {
    (StatusCode::CREATED, axum::Json(v)).into_response()
}

async fn create_user(State(s): State<AppState>, Auth(c): Auth, Json(req): Json<NewUserRequest>) -> ApiResult {
    let catalog = s.catalog.clone();
    Ok(created(
        write(&s, async move { catalog.create_user(c, req).await }).await?,
    ))
}

async fn get_user(State(s): State<AppState>, Auth(c): Auth, PathParam(id): PathParam) -> ApiResult {
    let id = UserId::parse(&id).ok_or(Error::NotFound)?;
    Ok(axum::Json(s.catalog.get_user(c, id).await?).into_response())
}

async fn create_shop(State(s): State<AppState>, Auth(c): Auth, Json(req): Json<NewShopRequest>) -> ApiResult {
    let catalog = s.catalog.clone();
    Ok(created(
        write(&s, async move { catalog.create_shop(c, req).await }).await?,
    ))
}

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

async fn get_product(State(s): State<AppState>, Auth(_): Auth, PathParam(id): PathParam) -> ApiResult {
    let id = ProductId::parse(&id).ok_or(Error::NotFound)?;
    Ok(axum::Json(s.catalog.get_product(id).await?).into_response())
}

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
