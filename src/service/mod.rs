//! Services: the use cases behind the HTTP API. They route to shards, run the storage
//! functions in the right order, and answer in domain terms ([`Error`]); HTTP maps those to
//! problem responses.

pub mod archive;
pub mod cart;
pub mod catalog;
pub mod flash;
pub mod merchant;
pub mod orders;
pub mod sweeper;
pub mod watermarks;

use crate::domain::ids::{CouponId, FlashSaleId, ProductId};
use crate::domain::order::FieldErrors;
use crate::domain::status::OrderStatus;
use crate::storage::StorageError;

/// What a use case can answer besides success.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Validation(#[from] FieldErrors),
    #[error("not found")]
    NotFound,
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    #[error("version conflict, current version {current_version}")]
    VersionConflict { current_version: i64 },
    #[error("invalid transition from {status}")]
    InvalidTransition { status: OrderStatus },
    #[error("this id was used with different content")]
    IdempotencyConflict,
    /// The order was moved to the archive: only money can still be recorded for it.
    #[error("the order is archived")]
    Archived,
    #[error("product {product_id} is out of stock")]
    OutOfStock { product_id: ProductId },
    #[error("coupon {coupon_id} is no longer available")]
    CouponUnavailable { coupon_id: CouponId },
    /// The user's unpaid orders hold `held` units; this order's would take them past `max`
    /// (`limits.max_unpaid_units_per_user`).
    #[error("unpaid orders hold {held} units; the cap is {max}")]
    LimitExceeded { held: i64, max: i64 },
    /// A flash sale's per-user limit: this order would take the buyer past `limit` units.
    #[error("flash sale {sale_id} allows {limit} units per buyer")]
    FlashLimit { sale_id: FlashSaleId, limit: i64 },
    #[error("amount does not match: {detail}")]
    PaymentMismatch { detail: String },
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs `f` again when it failed on a deadlock or lock-wait timeout.
pub(crate) async fn retry_deadlocks<T, F, Fut>(mut f: F) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StorageError>>,
{
    let mut tries = 0;
    loop {
        match f().await {
            Err(e) if e.is_retryable() && tries < crate::storage::DEADLOCK_RETRIES => tries += 1,
            other => return other,
        }
    }
}
