//! Bearer tokens: HS256 JWTs with `sub` (user id), `role` and, for merchants, `shop_id`.
//! A token is turned into a [`Caller`] once, here; handlers never see raw claims.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::domain::actor::{Caller, Role};
use crate::domain::ids::{ShopId, UserId};

use super::error::ApiError;

/// The authenticated caller of a request (an extractor).
#[derive(Debug, Clone, Copy)]
pub struct Auth(pub Caller);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shop_id: Option<String>,
    pub exp: u64,
}

/// The HS256 keys of this deployment.
pub struct AuthKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl AuthKeys {
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // Clocks of token issuers drift a little; a minute of leeway is the usual choice.
        validation.leeway = 60;
        AuthKeys {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// Signs a token for `sub` with `role`, valid for `ttl`.
    pub fn issue(&self, sub: &str, role: Role, shop: Option<ShopId>, ttl: Duration) -> String {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(ttl)
            .as_secs();
        let claims = Claims {
            sub: sub.to_owned(),
            role,
            shop_id: shop.map(|s| s.to_string()),
            exp,
        };
        // HS256 signing of a serialisable struct cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).unwrap_or_default()
    }

    pub fn verify(&self, token: &str) -> Result<Caller, ApiError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| ApiError::Unauthorized("invalid or expired token"))?;
        let c = data.claims;
        let user = || UserId::parse(&c.sub).ok_or(ApiError::Unauthorized("token subject is not a user id"));
        Ok(match c.role {
            Role::User => Caller::User(user()?),
            Role::Admin => Caller::Admin(user()?),
            Role::Service => Caller::Service,
            Role::Merchant => Caller::Merchant {
                user: user()?,
                shop: c
                    .shop_id
                    .as_deref()
                    .and_then(ShopId::parse)
                    .ok_or(ApiError::Unauthorized("merchant token without a shop_id"))?,
            },
        })
    }
}
