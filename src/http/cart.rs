//! Cart routes: the buyer's own cart (role `user`). Each handler's `#[utoipa::path]` is its
//! entry in the OpenAPI document (see [`super::openapi`]). Checking out is
//! `POST /v1/orders` with `from_cart: true`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::domain::cart::{CartQuantity, StoredCart};
use crate::domain::ids::{ProductId, ShopId};
use crate::domain::money::{Currency, Money, MAX_AMOUNT};
use crate::domain::order::FieldErrors;
use crate::storage::commerce::Product;

use super::auth::Auth;
use super::error::ApiError;
use super::extract::{Json, PathParam};
use super::openapi::{Forbidden, Unauthorized, Unavailable, WriteProblems};
use super::{write, AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_cart, clear_cart))
        .routes(routes!(set_item))
}

type ApiResult = Result<Response, ApiError>;

/// `PUT /v1/cart/items/{product_id}` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetItemRequest {
    /// 0 removes the line; at most 10 000.
    #[schema(minimum = 0, maximum = 10000)]
    pub quantity: i64,
}

/// A line of the cart with the catalog's current price.
#[derive(Serialize, ToSchema)]
pub struct CartItemView {
    product_id: ProductId,
    shop_id: ShopId,
    product_name: String,
    /// The catalog's price now (a cart stores no price).
    unit_price: Money,
    currency: Currency,
    quantity: i64,
    line_total: Money,
}

/// `GET /v1/cart`: the lines in product id order, priced now.
#[derive(Serialize, ToSchema)]
pub struct CartView {
    items: Vec<CartItemView>,
}

/// A line as a change answers it.
#[derive(Serialize, ToSchema)]
pub struct CartLineView {
    product_id: ProductId,
    quantity: i64,
}

/// What a change answers: the cart's lines after it, in product id order (`GET /v1/cart`
/// prices them).
#[derive(Serialize, ToSchema)]
pub struct CartLines {
    items: Vec<CartLineView>,
}

fn lines_response(c: &StoredCart) -> Response {
    let items = c
        .cart
        .lines
        .iter()
        .map(|(&product_id, &quantity)| CartLineView { product_id, quantity })
        .collect();
    axum::Json(CartLines { items }).into_response()
}

fn priced(c: &StoredCart, products: &[Product]) -> CartView {
    let items = c
        .cart
        .lines
        .iter()
        .filter_map(|(&product_id, &quantity)| {
            let p = products.iter().find(|p| p.product_id == product_id)?;
            Some(CartItemView {
                product_id,
                shop_id: p.shop_id,
                product_name: p.name.clone(),
                unit_price: p.price,
                currency: p.currency,
                quantity,
                // A line past the largest amount shows the largest (an order of it is refused).
                line_total: p
                    .price
                    .checked_mul(quantity)
                    .or(Money::new(MAX_AMOUNT))
                    .unwrap_or(Money::ZERO),
            })
        })
        .collect();
    CartView { items }
}

#[utoipa::path(
    get,
    path = "/v1/cart",
    operation_id = "get_cart",
    tag = "cart",
    description = "The caller's cart (buyers only) with the catalog's current prices. A cart lives in Redis and is written behind to MySQL; one missing from Redis is read back from MySQL.",
    responses(
        (status = 200, description = "The cart", body = CartView),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
    )
)]
async fn get_cart(State(s): State<AppState>, Auth(c): Auth) -> ApiResult {
    let (cart, products) = s.orders.carts().get(c).await?;
    Ok(axum::Json(priced(&cart, &products)).into_response())
}

#[utoipa::path(
    put,
    path = "/v1/cart/items/{product_id}",
    operation_id = "set_cart_item",
    tag = "cart",
    description = "Sets the quantity of one product in the caller's cart (buyers only); 0 removes the line. An unknown product, a quantity outside 0..=10000 or a 101st line is 422 and changes nothing.",
    params(("product_id" = String, Path, description = "The product id")),
    request_body = SetItemRequest,
    responses(
        (status = 200, description = "The cart's lines after the change", body = CartLines),
        WriteProblems,
    )
)]
async fn set_item(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(product): PathParam,
    Json(req): Json<SetItemRequest>,
) -> ApiResult {
    let product = ProductId::parse(&product)
        .ok_or_else(|| FieldErrors::single("product_id", "must be a positive decimal id string"))?;
    let quantity = CartQuantity::parse(req.quantity)?;
    let carts = s.orders.carts().clone();
    let cart = write(&s, async move { carts.set(c, product, quantity).await }).await?;
    Ok(lines_response(&cart))
}

#[utoipa::path(
    delete,
    path = "/v1/cart",
    operation_id = "clear_cart",
    tag = "cart",
    description = "Empties the caller's cart (buyers only).",
    responses(
        (status = 200, description = "The (empty) cart", body = CartLines),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
    )
)]
async fn clear_cart(State(s): State<AppState>, Auth(c): Auth) -> ApiResult {
    let carts = s.orders.carts().clone();
    let cart = write(&s, async move { carts.clear(c).await }).await?;
    Ok(lines_response(&cart))
}
