//! Bearer tokens: HS256 JWTs with `sub` (user id), `role` and, for merchants, `shop_id`.
//! A token is turned into a [`Caller`] once, here; handlers never see raw claims.
//!
//! A token is accepted only if its signature holds and: `exp` has not passed; `nbf`, when
//! present, has; `iat` is present and not in the future; `exp - iat` is at most
//! `auth.max_token_lifetime_secs`; and `iss`/`aud` match `auth.issuer`/`auth.audience` when
//! those are set. Every time check allows [`LEEWAY_SECS`] of clock drift.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthSettings;
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
    /// Issued at; required (a token without it cannot be held to the lifetime limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not before; checked when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
}

/// `aud` is one string or a list of them (RFC 7519 4.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// Clocks of token issuers drift a little; a minute of leeway is the usual choice. It
/// applies to `exp`, `nbf` and `iat`.
const LEEWAY_SECS: u64 = 60;

/// The HS256 keys of this deployment and what a token must satisfy.
pub struct AuthKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: Option<String>,
    audience: Option<String>,
    max_lifetime_secs: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl AuthKeys {
    pub fn new(settings: &AuthSettings) -> Self {
        let secret = settings.jwt_secret.as_bytes();
        let issuer = Some(settings.issuer.clone()).filter(|s| !s.is_empty());
        let audience = Some(settings.audience.clone()).filter(|s| !s.is_empty());
        let mut validation = Validation::new(Algorithm::HS256);
        let mut required = vec!["exp", "sub"];
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        if let Some(iss) = &issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        // Without a configured audience, `aud` is not looked at (the library would refuse
        // every token that carries one).
        validation.validate_aud = audience.is_some();
        if let Some(aud) = &audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        AuthKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            issuer,
            audience,
            max_lifetime_secs: settings.max_token_lifetime_secs,
        }
    }

    /// Signs a token for `sub` with `role`, valid for `ttl` from now (tokens longer than
    /// `auth.max_token_lifetime_secs` are refused by [`AuthKeys::verify`]).
    pub fn issue(&self, sub: &str, role: Role, shop: Option<ShopId>, ttl: Duration) -> String {
        let iat = unix_now();
        let claims = Claims {
            sub: sub.to_owned(),
            role,
            shop_id: shop.map(|s| s.to_string()),
            exp: iat.saturating_add(ttl.as_secs()),
            iat: Some(iat),
            nbf: None,
            iss: self.issuer.clone(),
            aud: self.audience.clone().map(Audience::One),
        };
        // HS256 signing of a serialisable struct cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).unwrap_or_default()
    }

    pub fn verify(&self, token: &str) -> Result<Caller, ApiError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| ApiError::Unauthorized("invalid or expired token"))?;
        let c = data.claims;
        let iat = c.iat.ok_or(ApiError::Unauthorized("token without iat"))?;
        if iat > unix_now().saturating_add(LEEWAY_SECS) {
            return Err(ApiError::Unauthorized("token issued in the future"));
        }
        if c.exp.saturating_sub(iat) > self.max_lifetime_secs {
            return Err(ApiError::Unauthorized("token lifetime exceeds the maximum"));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const SECRET: &str = "unit-test-secret-unit-test-secret!!";

    fn settings(issuer: &str, audience: &str) -> AuthSettings {
        AuthSettings {
            jwt_secret: SECRET.into(),
            issuer: issuer.into(),
            audience: audience.into(),
            max_token_lifetime_secs: 86400,
        }
    }

    /// A token of a user with the given claims on top of valid `sub`, `role`, `iat`, `exp`
    /// (`null` removes a claim).
    fn token(extra: Value) -> String {
        let now = unix_now();
        let mut claims = json!({"sub": "7", "role": "user", "iat": now, "exp": now + 600});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
    }

    fn accepts(keys: &AuthKeys, extra: Value) -> bool {
        keys.verify(&token(extra)).is_ok()
    }

    #[test]
    fn issued_tokens_verify() {
        for (iss, aud) in [("", ""), ("orderly-idp", "orderly")] {
            let keys = AuthKeys::new(&settings(iss, aud));
            let t = keys.issue("7", Role::User, None, Duration::from_secs(3600));
            assert_eq!(keys.verify(&t).unwrap(), Caller::User(UserId::new(7).unwrap()));
        }
    }

    #[test]
    fn not_before_is_checked_when_present() {
        let keys = AuthKeys::new(&settings("", ""));
        let now = unix_now();
        assert!(accepts(&keys, json!({})));
        assert!(accepts(&keys, json!({"nbf": now - 10})));
        assert!(!accepts(&keys, json!({"nbf": now + 3600})));
    }

    #[test]
    fn issued_at_is_required_and_not_in_the_future() {
        let keys = AuthKeys::new(&settings("", ""));
        let now = unix_now();
        assert!(!accepts(&keys, json!({"iat": null})));
        assert!(!accepts(&keys, json!({"iat": now + 3600, "exp": now + 4000})));
        // Within the leeway: clock drift, not a forgery.
        assert!(accepts(&keys, json!({"iat": now + 30})));
    }

    #[test]
    fn lifetime_is_bounded() {
        let keys = AuthKeys::new(&settings("", ""));
        let now = unix_now();
        assert!(accepts(&keys, json!({"iat": now, "exp": now + 86400})));
        assert!(!accepts(&keys, json!({"iat": now, "exp": now + 86401})));
        assert!(!accepts(
            &keys,
            json!({"iat": now - 10, "exp": now + 365 * 86400})
        ));
    }

    #[test]
    fn issuer_is_checked_when_configured() {
        let open = AuthKeys::new(&settings("", ""));
        assert!(accepts(&open, json!({"iss": "anyone"})));
        let keys = AuthKeys::new(&settings("orderly-idp", ""));
        assert!(accepts(&keys, json!({"iss": "orderly-idp"})));
        assert!(!accepts(&keys, json!({"iss": "other-idp"})));
        assert!(!accepts(&keys, json!({})));
    }

    #[test]
    fn audience_is_checked_when_configured() {
        let open = AuthKeys::new(&settings("", ""));
        assert!(accepts(&open, json!({"aud": "anything"})));
        assert!(accepts(&open, json!({"aud": ["a", "b"]})));
        let keys = AuthKeys::new(&settings("", "orderly"));
        assert!(accepts(&keys, json!({"aud": "orderly"})));
        assert!(accepts(&keys, json!({"aud": ["billing", "orderly"]})));
        assert!(!accepts(&keys, json!({"aud": "billing"})));
        assert!(!accepts(&keys, json!({})));
    }
}
