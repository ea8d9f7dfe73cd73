//! The cache: order details, user profiles and the first page of "my orders" in Redis,
//! cache-aside, never behind a committed write (SPEC 2.5).
//!
//! [`Cache`] is what the services hold: [`Cache::Redis`] or [`Cache::Disabled`] (settings
//! `[cache] enabled = false`: every read goes to the loader, every write notice is dropped).
//! The HTTP layer never sees Redis.
//!
//! # Reads
//! `order(id, load)`, `user(id, load)` and `first_page(user, load)` answer from Redis when they
//! can; on a miss they call `load` (MySQL), at most once per key and process at a time
//! (single flight: concurrent misses share one load), behind a bound on concurrent loads, and
//! fill the entry conditionally (below). An id that does not exist is cached as absent for a
//! short TTL (penetration). TTLs carry random jitter (avalanche).
//!
//! # Writes
//! Every committed order write reaches [`Cache::order_written`] from the service's one
//! `after_commit` step, before its response leaves. It leaves a marker holding the write's
//! version, replaces the entry when it is given the order at that version (or deletes it when
//! it is older), and invalidates the owner's first page. The interleavings ruled out, and how,
//! are in the `aside` module, with the cache's key table.
//!
//! # Redis down
//! Slower, not failing: every call has a short timeout, a circuit breaker skips Redis while it
//! is down and probes it later (both are the shared connection's, [`crate::redis::Redis`]);
//! reads go to MySQL. Write notices that could not be delivered are kept and replayed before
//! the cache is read again (and as soon as any user of the connection reconnects).

mod aside;
/// Public (hidden) only for `benches/cache_codec.rs`.
#[doc(hidden)]
pub mod codec;
mod flight;

use std::future::Future;

use super::Redis;
use crate::config::CacheSettings;
use crate::domain::consistency::DatabaseRef;
use crate::domain::ids::{OrderId, UserId};
use crate::domain::order::Order;
use crate::domain::user::User;

pub(crate) use self::aside::SCRIPTS;
pub use self::aside::{order_key, FillGate, PausedFill, RedisCache};

/// The cache the services use; cheap to clone.
#[derive(Clone)]
pub enum Cache {
    Redis(std::sync::Arc<RedisCache>),
    /// No caching: reads call their loader, write notices are dropped.
    Disabled,
}

/// How the cache is doing, for `/readyz` (never a reason to be unready).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheHealth {
    Disabled,
    Up,
    /// Redis does not answer: reads go to MySQL until it is back.
    Degraded,
}

impl Cache {
    /// The cache over `redis`, or [`Cache::Disabled`] without one (`[cache] enabled =
    /// false`, see [`Redis::from_settings`]).
    pub fn new(redis: Option<&Redis>, cache: &CacheSettings) -> Cache {
        match redis {
            Some(r) => Cache::Redis(std::sync::Arc::new(RedisCache::new(r.clone(), cache))),
            None => Cache::Disabled,
        }
    }

    /// The order `id` (`None`: there is no such order), from Redis or from `load`, which
    /// reads `db`. A miss loads behind `db`'s bound on concurrent loads (one database's
    /// trouble never holds another's), and `load` must answer at least every write
    /// acknowledged before it was called: the cache trusts it to (see the `aside` module).
    pub async fn order<E, F, Fut>(&self, id: OrderId, db: DatabaseRef, load: F) -> Result<Option<Order>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Order>, E>>,
    {
        match self {
            Cache::Redis(r) => r.order(id, db, load).await,
            Cache::Disabled => load().await,
        }
    }

    /// The user profile `id` (`None`: no such user), from Redis or from `load`, like
    /// [`Cache::order`].
    pub async fn user<E, F, Fut>(&self, id: UserId, db: DatabaseRef, load: F) -> Result<Option<User>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<User>, E>>,
    {
        match self {
            Cache::Redis(r) => r.user(id, db, load).await,
            Cache::Disabled => load().await,
        }
    }

    /// The newest orders of `user` with no filter: at most [`FIRST_PAGE`] of them, newest
    /// first, from Redis or from `load` (which must return the newest `FIRST_PAGE`), like
    /// [`Cache::order`].
    pub async fn first_page<E, F, Fut>(&self, user: UserId, db: DatabaseRef, load: F) -> Result<Vec<Order>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<Order>, E>>,
    {
        match self {
            Cache::Redis(r) => r.first_page(user, db, load).await,
            Cache::Disabled => load().await,
        }
    }

    /// An order write committed at `version`: called once per commit, before the response
    /// leaves. `snapshot` is the order at exactly that version when the caller has it (it then
    /// replaces the entry instead of deleting it). Never fails: what cannot reach Redis now is
    /// replayed before the cache is read again.
    pub async fn order_written(&self, order: OrderId, owner: UserId, version: i64, snapshot: Option<&Order>) {
        if let Cache::Redis(r) = self {
            r.order_written(order, owner, version, snapshot).await
        }
    }

    /// The order `id` if the cache holds it now, without loading or filling (`Some(None)`:
    /// cached as absent).
    pub async fn order_hit(&self, id: OrderId) -> Option<Option<Order>> {
        match self {
            Cache::Redis(r) => r.order_hit(id).await,
            Cache::Disabled => None,
        }
    }

    /// A user profile was created (profiles never change after): clears a cached "absent".
    pub async fn user_written(&self, user: &User) {
        if let Cache::Redis(r) = self {
            r.user_written(user).await
        }
    }

    pub fn health(&self) -> CacheHealth {
        match self {
            Cache::Redis(r) => r.health(),
            Cache::Disabled => CacheHealth::Disabled,
        }
    }

    /// Test hook: pause fills between their database read and their Redis write.
    #[doc(hidden)]
    pub fn fill_gate(&self) -> Option<&FillGate> {
        match self {
            Cache::Redis(r) => Some(r.fill_gate()),
            Cache::Disabled => None,
        }
    }
}

/// How many orders the cached first page holds: the default page of `GET /v1/orders` and one
/// more, so the page knows whether there is a next one.
pub const FIRST_PAGE: usize = 21;
