//! The Redis cache. (Stub: being implemented.)

use std::future::Future;

use crate::config::{CacheSettings, RedisSettings};
use crate::domain::ids::{OrderId, UserId};
use crate::domain::order::Order;
use crate::domain::user::User;

use super::CacheHealth;

pub struct RedisCache {
    gate: FillGate,
}

/// Test hook: pauses fills between their database read and their Redis write.
#[derive(Default)]
pub struct FillGate {}

impl RedisCache {
    pub async fn connect(_redis: &RedisSettings, _cache: &CacheSettings) -> anyhow::Result<RedisCache> {
        Ok(RedisCache {
            gate: FillGate::default(),
        })
    }

    pub async fn order<E, F, Fut>(&self, _id: OrderId, load: F) -> Result<Option<Order>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Order>, E>>,
    {
        load().await
    }

    pub async fn user<E, F, Fut>(&self, _id: UserId, load: F) -> Result<Option<User>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<User>, E>>,
    {
        load().await
    }

    pub async fn first_page<E, F, Fut>(&self, _user: UserId, load: F) -> Result<Vec<Order>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<Order>, E>>,
    {
        load().await
    }

    pub async fn order_written(
        &self,
        _order: OrderId,
        _owner: UserId,
        _version: i64,
        _snapshot: Option<&Order>,
    ) {
    }

    pub async fn user_written(&self, _user: &User) {}

    pub fn health(&self) -> CacheHealth {
        CacheHealth::Up
    }

    pub fn fill_gate(&self) -> &FillGate {
        &self.gate
    }
}
