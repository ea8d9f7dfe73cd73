//! A buyer's profile as the service shows it (`GET /v1/users/{id}`, `?include=user`).

use chrono::{DateTime, Utc};

use super::ids::UserId;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct User {
    pub user_id: UserId,
    pub name: String,
    pub level: i32,
    pub created_at: DateTime<Utc>,
}
