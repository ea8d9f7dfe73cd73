//! The HTTP floor of `get-hot`: the least an HTTP service can do to answer a cached read,
//! in the same process stack as the service (axum on a tokio listener, the same JWT check
//! with the service's own [`AuthKeys`], one Redis `GET` of the order's cached bytes on one
//! shared multiplexed connection, the bytes written as they are), driven by the same clients.
//! What the service does beyond it (the owner check, decoding and re-encoding the order, the
//! cache's freshness marker, metrics, the request id, limits and timeouts) is what service /
//! HTTP floor prices.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use orderly::domain::ids::OrderId;
use orderly::http::auth::AuthKeys;
use orderly::redis::cache::order_key;

struct Floor {
    keys: AuthKeys,
    redis: redis::aio::ConnectionManager,
    prefix: String,
}

/// Starts the floor on a free loopback port; answers its base URL. It runs until the
/// process ends.
pub(super) async fn start(
    keys: AuthKeys,
    redis: redis::aio::ConnectionManager,
    prefix: String,
) -> anyhow::Result<String> {
    let floor = Arc::new(Floor { keys, redis, prefix });
    let app = Router::new()
        .route("/v1/orders/{id}", get(read))
        .with_state(floor);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(base)
}

async fn read(State(floor): State<Arc<Floor>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let verified = match token {
        Some(t) => floor.keys.verify(t).await.is_ok(),
        None => false,
    };
    if !verified {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Some(id) = OrderId::parse(&id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let mut redis = floor.redis.clone();
    let cached: Result<Option<Vec<u8>>, _> = redis::cmd("GET")
        .arg(order_key(&floor.prefix, id))
        .query_async(&mut redis)
        .await;
    match cached {
        Ok(Some(bytes)) if !bytes.is_empty() => {
            ([(header::CONTENT_TYPE, "application/json")], bytes).into_response()
        }
        Ok(_) => StatusCode::NOT_FOUND.into_response(),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}
