//! Bearer tokens: JWTs, turned into a [`Caller`] once, here; handlers never see raw claims.
//!
//! Keys, by the header's `alg` (which must be in `auth.algorithms`; `none` never parses):
//! - HS256: the shared secrets, `auth.jwt_secret` first, then `auth.keys`. A `kid` in the
//!   header picks the key of that kid; a token without one (or with a kid no secret has,
//!   as tokens of issuers that always set one did before `auth.keys`) is tried against the
//!   secrets without a kid, and a token without a kid against every secret.
//! - Any asymmetric algorithm (RS256, ES256, EdDSA, …): the identity provider's public keys
//!   ([`jwks`]), by `kid`, of the key type the algorithm needs and never a symmetric one. A
//!   public key is never used as an HS256 secret (the "algorithm confusion" forgery): HS256
//!   is verified with the configured secrets only.
//!
//! A token is accepted only if its signature holds and: `exp` has not passed; `nbf`, when
//! present, has; `iat` is present and not in the future; `exp - iat` is at most
//! `auth.max_token_lifetime_secs`; and `iss`/`aud` match `auth.issuer`/`auth.audience` when
//! those are set. Every time check allows [`LEEWAY_SECS`] of clock drift. The caller is read
//! from the claims through JSON pointers (`auth.user_claim`, `auth.role_claim`,
//! `auth.shop_claim`; by default `/sub`, `/role`, `/shop_id`).
//!
//! Every refusal is an [`AuthError`]: a 401 whose `WWW-Authenticate` says why (RFC 6750 3).

mod jwks;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::HeaderValue;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::AuthSettings;
use crate::domain::actor::{Caller, Role};
use crate::domain::ids::{ShopId, UserId};

pub use self::jwks::{Jwks, KeySet};

/// The authenticated caller of a request (an extractor).
#[derive(Debug, Clone, Copy)]
pub struct Auth(pub Caller);

/// The claims of the tokens this service mints (playground, bench, tests). Tokens it verifies
/// are read as JSON, through the configured claim pointers.
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

/// The realm of every challenge (RFC 6750 3: `WWW-Authenticate: Bearer realm="…"`).
const REALM: &str = "orderly";

/// Why a request is not authenticated: the 401's `detail` and its `WWW-Authenticate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header: the challenge carries no error (RFC 6750 3.1).
    #[error("missing bearer token")]
    Missing,
    /// An `Authorization` header of another scheme, or not text: `invalid_request`.
    #[error("expected 'Authorization: Bearer <token>'")]
    NotBearer,
    /// A bearer token that does not verify: `invalid_token`, with the reason.
    #[error("{0}")]
    Invalid(&'static str),
}

impl AuthError {
    /// The problem's `detail`.
    pub fn detail(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing bearer token",
            AuthError::NotBearer => "expected 'Authorization: Bearer <token>'",
            AuthError::Invalid(why) => why,
        }
    }

    /// The `WWW-Authenticate` value of the 401 (RFC 6750 3).
    pub fn challenge(&self) -> HeaderValue {
        let error = match self {
            AuthError::Missing => return HeaderValue::from_static("Bearer realm=\"orderly\""),
            AuthError::NotBearer => "invalid_request",
            AuthError::Invalid(_) => "invalid_token",
        };
        // error_description admits printable ASCII but `"` and `\` (RFC 6750 3).
        let description: String = self
            .detail()
            .chars()
            .filter(|c| matches!(c, ' '..='~') && !matches!(c, '"' | '\\'))
            .collect();
        HeaderValue::from_str(&format!(
            "Bearer realm=\"{REALM}\", error=\"{error}\", error_description=\"{description}\""
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer realm=\"orderly\", error=\"invalid_token\""))
    }
}

/// One HS256 secret.
struct Secret {
    kid: Option<String>,
    key: DecodingKey,
}

/// Where the caller is read from the claims.
struct ClaimPointers {
    user: String,
    role: String,
    shop: String,
}

/// This deployment's keys and what a token must satisfy.
pub struct AuthKeys {
    secrets: Vec<Secret>,
    /// The first secret and its kid: what [`AuthKeys::issue`] signs with.
    signing: Option<(EncodingKey, Option<String>)>,
    jwks: Option<Arc<Jwks>>,
    /// One validation per allowed algorithm (`auth.algorithms`).
    validations: Vec<(Algorithm, Validation)>,
    claims: ClaimPointers,
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
    /// The HS256 secrets and the checks, without the identity provider's keys: what minting
    /// and tools need. The service starts with [`AuthKeys::start`].
    pub fn new(settings: &AuthSettings) -> Self {
        let issuer = Some(settings.issuer.clone()).filter(|s| !s.is_empty());
        let audience = Some(settings.audience.clone()).filter(|s| !s.is_empty());
        let mut base = Validation::new(Algorithm::HS256);
        // `sub` is not required here: the user claim may be another one, and a service
        // token names no user.
        let mut required = vec!["exp"];
        base.leeway = LEEWAY_SECS;
        base.validate_nbf = true;
        if let Some(iss) = &issuer {
            base.set_issuer(&[iss]);
            required.push("iss");
        }
        // Without a configured audience, `aud` is not looked at (the library would refuse
        // every token that carries one).
        base.validate_aud = audience.is_some();
        if let Some(aud) = &audience {
            base.set_audience(&[aud]);
            required.push("aud");
        }
        base.set_required_spec_claims(&required);
        let validations = settings
            .algorithms
            .iter()
            .map(|&alg| {
                let mut v = base.clone();
                v.algorithms = vec![alg];
                (alg, v)
            })
            .collect();
        let hmac = settings.hmac_keys();
        let signing = hmac.first().map(|k| {
            (
                EncodingKey::from_secret(k.secret.expose_secret().as_bytes()),
                k.kid.clone(),
            )
        });
        AuthKeys {
            secrets: hmac
                .iter()
                .map(|k| Secret {
                    kid: k.kid.clone(),
                    key: DecodingKey::from_secret(k.secret.expose_secret().as_bytes()),
                })
                .collect(),
            signing,
            jwks: None,
            validations,
            claims: ClaimPointers {
                user: settings.user_claim.clone(),
                role: settings.role_claim.clone(),
                shop: settings.shop_claim.clone(),
            },
            issuer,
            audience,
            max_lifetime_secs: settings.max_token_lifetime_secs,
        }
    }

    /// The service's keys: [`AuthKeys::new`], and, when `auth.jwks_url` is set, the identity
    /// provider's key set, fetched once now (bounded by `auth.jwks_timeout_ms`) and then kept
    /// fresh by the returned task until `shutdown`.
    ///
    /// A first fetch that fails does not stop the start: HS256 tokens are served as ever,
    /// the provider's tokens are refused (401) until a fetch succeeds, and the refresh task
    /// tries again every `auth.jwks_min_refresh_secs` meanwhile. A service that cannot start
    /// while its identity provider is down would turn the provider's outage into its own.
    pub async fn start(
        settings: &AuthSettings,
        shutdown: CancellationToken,
    ) -> Result<(AuthKeys, Option<JoinHandle<()>>), reqwest::Error> {
        let mut keys = AuthKeys::new(settings);
        let Some(jwks) = Jwks::new(settings)? else {
            return Ok((keys, None));
        };
        let url = crate::config::redact_url(&settings.jwks_url);
        if settings.jwks_url.starts_with("http://") {
            tracing::warn!(
                %url,
                "auth.jwks_url is plain http: whoever can change the answer on the way can mint tokens; use https"
            );
        }
        if settings.audience.is_empty() && settings.issuer.is_empty() {
            tracing::warn!(
                %url,
                "auth.jwks_url without auth.audience or auth.issuer: every token the provider signs, for any of its clients, is accepted; set auth.audience"
            );
        }
        if jwks.refresh_now().await {
            tracing::info!(%url, keys = jwks.current().len(), "JWKS fetched");
        } else {
            tracing::error!(
                %url,
                "cannot fetch the JWKS at start: tokens of the identity provider are refused until a fetch succeeds"
            );
        }
        let refresh = tokio::spawn(jwks.clone().run_refresh(shutdown));
        keys.jwks = Some(jwks);
        Ok((keys, Some(refresh)))
    }

    /// Signs a token for `sub` with `role`, valid for `ttl` from now (tokens longer than
    /// `auth.max_token_lifetime_secs` are refused by [`AuthKeys::verify`]), with the first
    /// HS256 secret (and its kid). Without any secret (a JWKS-only deployment) there is
    /// nothing to sign with: the answer is an empty string, which no check accepts.
    pub fn issue(&self, sub: &str, role: Role, shop: Option<ShopId>, ttl: Duration) -> String {
        let Some((key, kid)) = &self.signing else {
            return String::new();
        };
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
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.clone();
        // HS256 signing of a serialisable struct cannot fail.
        jsonwebtoken::encode(&header, &claims, key).unwrap_or_default()
    }

    /// The caller a token authenticates. Waits only when the token names an identity
    /// provider's key not held yet (see [`Jwks::refetch_for_unknown_kid`]).
    pub async fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| match names_an_alg(token) {
            // `none`, or a name the library does not know: a header that parses otherwise.
            true => AuthError::Invalid("token algorithm is not allowed"),
            false => AuthError::Invalid("malformed token"),
        })?;
        let Some((_, validation)) = self.validations.iter().find(|(a, _)| *a == header.alg) else {
            return Err(AuthError::Invalid("token algorithm is not allowed"));
        };
        let kid = header.kid.as_deref();
        let claims = match header.alg {
            Algorithm::HS256 => {
                let named = kid.filter(|k| self.secrets.iter().any(|s| s.kid.as_deref() == Some(*k)));
                let keys = self.secrets.iter().filter(|s| match (kid, named) {
                    (_, Some(named)) => s.kid.as_deref() == Some(named),
                    (Some(_), None) => s.kid.is_none(),
                    (None, _) => true,
                });
                first_verifying(token, keys.map(|s| &s.key), validation)?
            }
            alg => {
                let Some(jwks) = &self.jwks else {
                    return Err(AuthError::Invalid("no key for this token"));
                };
                let mut held = jwks.current();
                let mut keys = held.candidates(kid, alg);
                if keys.is_empty() {
                    held = jwks.refetch_for_unknown_kid(&held).await;
                    keys = held.candidates(kid, alg);
                }
                if keys.is_empty() {
                    return Err(AuthError::Invalid("unknown signing key"));
                }
                first_verifying(token, keys.iter(), validation)?
            }
        };
        self.caller(&claims)
    }

    fn caller(&self, claims: &Value) -> Result<Caller, AuthError> {
        let iat = claims
            .get("iat")
            .and_then(seconds)
            .ok_or(AuthError::Invalid("token without iat"))?;
        if iat > unix_now().saturating_add(LEEWAY_SECS) {
            return Err(AuthError::Invalid("token issued in the future"));
        }
        let exp = claims
            .get("exp")
            .and_then(seconds)
            .ok_or(AuthError::Invalid("token without exp"))?;
        if exp.saturating_sub(iat) > self.max_lifetime_secs {
            return Err(AuthError::Invalid("token lifetime exceeds the maximum"));
        }
        // The library checks a numeric `nbf`; one of another type would be skipped there.
        if let Some(nbf) = claims.get("nbf") {
            match seconds(nbf) {
                Some(nbf) if nbf <= unix_now().saturating_add(LEEWAY_SECS) => {}
                Some(_) => return Err(AuthError::Invalid("token not valid yet")),
                None => return Err(AuthError::Invalid("token with a malformed nbf")),
            }
        }
        let role = claims
            .pointer(&self.claims.role)
            .and_then(role_of)
            .ok_or(AuthError::Invalid("token without a known role"))?;
        let user = || {
            claims
                .pointer(&self.claims.user)
                .and_then(id_text)
                .and_then(|t| UserId::parse(&t))
                .ok_or(AuthError::Invalid("token subject is not a user id"))
        };
        Ok(match role {
            Role::User => Caller::User(user()?),
            Role::Admin => Caller::Admin(user()?),
            Role::Service => Caller::Service,
            Role::Merchant => Caller::Merchant {
                user: user()?,
                shop: claims
                    .pointer(&self.claims.shop)
                    .and_then(id_text)
                    .and_then(|t| ShopId::parse(&t))
                    .ok_or(AuthError::Invalid("merchant token without a shop id"))?,
            },
        })
    }
}

/// The claims of `token` under the first of `keys` whose signature holds. A token whose
/// signature holds but whose claims fail is refused at once, with that reason.
fn first_verifying<'k>(
    token: &str,
    keys: impl Iterator<Item = &'k DecodingKey>,
    validation: &Validation,
) -> Result<Value, AuthError> {
    let mut tried = false;
    for key in keys {
        tried = true;
        match jsonwebtoken::decode::<Value>(token, key, validation) {
            Ok(data) => return Ok(data.claims),
            Err(e) if *e.kind() == ErrorKind::InvalidSignature => continue,
            Err(e) => return Err(AuthError::Invalid(reason(e.kind()))),
        }
    }
    Err(AuthError::Invalid(match tried {
        true => "signature does not verify",
        false => "no key for this token",
    }))
}

/// Whether the token's header is JSON naming some `alg`: a header refused for its algorithm,
/// not for its form.
fn names_an_alg(token: &str) -> bool {
    use base64::Engine;
    token
        .split('.')
        .next()
        .and_then(|h| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(h).ok())
        .and_then(|h| serde_json::from_slice::<Value>(&h).ok())
        .is_some_and(|h| h.get("alg").is_some_and(Value::is_string))
}

fn reason(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "token expired",
        ErrorKind::ImmatureSignature => "token not yet valid",
        ErrorKind::InvalidIssuer => "token of another issuer",
        ErrorKind::InvalidAudience => "token for another audience",
        ErrorKind::MissingRequiredClaim(_) => "token without a required claim",
        ErrorKind::InvalidAlgorithm => "token algorithm is not allowed",
        ErrorKind::InvalidSignature => "signature does not verify",
        _ => "malformed token",
    }
}

/// A NumericDate (RFC 7519 2): seconds, possibly with a fraction.
fn seconds(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
}

/// An id claim as text: a decimal string, or a JSON integer.
fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => n.as_u64().map(|n| n.to_string()),
        _ => None,
    }
}

/// A role claim: one role name, or a list whose first role name counts (identity providers
/// list every group of the user, most of them not roles of this service).
fn role_of(v: &Value) -> Option<Role> {
    let one = |v: &Value| v.as_str().and_then(|s| Role::deserialize(Value::from(s)).ok());
    match v {
        Value::Array(items) => items.iter().find_map(one),
        v => one(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HmacKey, Settings};
    use serde_json::json;

    const SECRET: &str = "unit-test-secret-unit-test-secret!!";
    const SECOND: &str = "second-secret-second-secret-second!!";

    fn settings(issuer: &str, audience: &str) -> AuthSettings {
        AuthSettings {
            jwt_secret: SECRET.into(),
            issuer: issuer.into(),
            audience: audience.into(),
            max_token_lifetime_secs: 86400,
            ..Settings::defaults().auth
        }
    }

    fn sign(claims: &Value, secret: &str, kid: Option<&str>) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    /// Claims of a user with the given claims on top of valid `sub`, `role`, `iat`, `exp`
    /// (`null` removes a claim).
    fn claims(extra: Value) -> Value {
        let now = unix_now();
        let mut claims = json!({"sub": "7", "role": "user", "iat": now, "exp": now + 600});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        claims
    }

    fn token(extra: Value) -> String {
        sign(&claims(extra), SECRET, None)
    }

    fn check(keys: &AuthKeys, token: &str) -> Result<Caller, AuthError> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(keys.verify(token))
    }

    fn accepts(keys: &AuthKeys, extra: Value) -> bool {
        check(keys, &token(extra)).is_ok()
    }

    #[test]
    fn issued_tokens_verify() {
        for (iss, aud) in [("", ""), ("orderly-idp", "orderly")] {
            let keys = AuthKeys::new(&settings(iss, aud));
            let t = keys.issue("7", Role::User, None, Duration::from_secs(3600));
            assert_eq!(check(&keys, &t).unwrap(), Caller::User(UserId::new(7).unwrap()));
        }
    }

    #[test]
    fn not_before_is_checked_when_present() {
        let keys = AuthKeys::new(&settings("", ""));
        let now = unix_now();
        assert!(accepts(&keys, json!({})));
        assert!(accepts(&keys, json!({"nbf": now - 10})));
        assert!(!accepts(&keys, json!({"nbf": now + 3600})));
        assert!(!accepts(&keys, json!({"nbf": "soon"})));
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

    #[test]
    fn a_kid_picks_its_secret_and_a_token_without_one_tries_each() {
        let mut s = settings("", "");
        s.keys = vec![HmacKey {
            kid: Some("k2".into()),
            secret: SECOND.into(),
        }];
        let keys = AuthKeys::new(&s);
        let c = claims(json!({}));
        assert!(check(&keys, &sign(&c, SECRET, None)).is_ok());
        assert!(check(&keys, &sign(&c, SECOND, None)).is_ok());
        assert!(check(&keys, &sign(&c, SECOND, Some("k2"))).is_ok());
        // The kid names the second secret: the first does not verify under it.
        assert_eq!(
            check(&keys, &sign(&c, SECRET, Some("k2"))),
            Err(AuthError::Invalid("signature does not verify"))
        );
        // A kid no secret has: the secrets without a kid (what issuers that always send a
        // kid relied on before `auth.keys`), not the others.
        assert!(check(&keys, &sign(&c, SECRET, Some("other"))).is_ok());
        assert!(check(&keys, &sign(&c, SECOND, Some("other"))).is_err());
        // An expired token signed by a key is refused as expired, not tried further.
        let now = unix_now();
        let old = claims(json!({"iat": now - 7200, "exp": now - 3600}));
        assert_eq!(
            check(&keys, &sign(&old, SECOND, None)),
            Err(AuthError::Invalid("token expired"))
        );
    }

    #[test]
    fn minting_uses_the_first_secret_and_its_kid() {
        let mut s = settings("", "");
        s.jwt_secret = "".into();
        s.keys = vec![
            HmacKey {
                kid: Some("k2".into()),
                secret: SECOND.into(),
            },
            HmacKey {
                kid: None,
                secret: SECRET.into(),
            },
        ];
        let keys = AuthKeys::new(&s);
        let t = keys.issue("7", Role::User, None, Duration::from_secs(60));
        assert_eq!(
            jsonwebtoken::decode_header(&t).unwrap().kid.as_deref(),
            Some("k2")
        );
        let only_second = AuthKeys::new(&AuthSettings {
            jwt_secret: SECOND.into(),
            ..settings("", "")
        });
        assert!(check(&only_second, &t).is_ok());
    }

    #[test]
    fn algorithms_outside_the_allow_list_and_none_are_refused() {
        let mut s = settings("", "");
        s.algorithms = vec![Algorithm::RS256];
        let keys = AuthKeys::new(&s);
        assert_eq!(
            check(&keys, &token(json!({}))),
            Err(AuthError::Invalid("token algorithm is not allowed"))
        );
        let open = AuthKeys::new(&settings("", ""));
        // `alg: none`, no signature.
        let b64 = |v: Value| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let unsigned = format!("{}.{}.", b64(json!({"alg": "none"})), b64(claims(json!({}))));
        assert_eq!(
            check(&open, &unsigned),
            Err(AuthError::Invalid("token algorithm is not allowed"))
        );
        assert_eq!(
            check(&open, "not.a.token"),
            Err(AuthError::Invalid("malformed token"))
        );
        // HS384 under a configured secret is not HS256.
        let hs384 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &claims(json!({})),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(check(&open, &hs384).is_err());
    }

    #[test]
    fn an_rsa_public_key_is_never_an_hs256_secret() {
        let public_pem = include_str!("../../tests/fixtures/jwks/rsa-1.pub.pem");
        let keys = AuthKeys::new(&settings("", ""));
        let forged = sign(&claims(json!({"role": "admin"})), public_pem, Some("rsa-1"));
        assert!(check(&keys, &forged).is_err());
    }

    #[test]
    fn the_caller_is_read_through_the_claim_pointers() {
        let mut s = settings("", "");
        s.user_claim = "/uid".into();
        s.role_claim = "/realm_access/roles".into();
        s.shop_claim = "/https:~1~1orderly.example~1shop".into();
        let keys = AuthKeys::new(&s);
        let t = |extra: Value| {
            let mut c = claims(json!({"sub": "someone@idp", "role": null}));
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            sign(&c, SECRET, None)
        };
        let merchant = t(json!({
            "uid": 41,
            "realm_access": {"roles": ["offline_access", "merchant", "admin"]},
            "https://orderly.example/shop": "9",
        }));
        assert_eq!(
            check(&keys, &merchant).unwrap(),
            Caller::Merchant {
                user: UserId::new(41).unwrap(),
                shop: ShopId::new(9).unwrap()
            }
        );
        let no_role = t(json!({"uid": "41", "realm_access": {"roles": ["offline_access"]}}));
        assert_eq!(
            check(&keys, &no_role),
            Err(AuthError::Invalid("token without a known role"))
        );
        // The default pointers do not apply any more: `sub` is not a user id here.
        let wrong_place = t(json!({"sub": "41", "realm_access": {"roles": ["user"]}}));
        assert_eq!(
            check(&keys, &wrong_place),
            Err(AuthError::Invalid("token subject is not a user id"))
        );
    }

    #[test]
    fn challenges_follow_rfc_6750() {
        assert_eq!(AuthError::Missing.challenge(), "Bearer realm=\"orderly\"");
        assert_eq!(
            AuthError::NotBearer.challenge(),
            "Bearer realm=\"orderly\", error=\"invalid_request\", \
             error_description=\"expected 'Authorization: Bearer <token>'\""
        );
        assert_eq!(
            AuthError::Invalid("token \"expired\"").challenge(),
            "Bearer realm=\"orderly\", error=\"invalid_token\", error_description=\"token expired\""
        );
    }

    #[test]
    fn every_401_carries_its_challenge() {
        use axum::response::IntoResponse;
        for e in [
            AuthError::Missing,
            AuthError::NotBearer,
            AuthError::Invalid("token expired"),
        ] {
            let response = super::super::error::ApiError::Unauthorized(e).into_response();
            assert_eq!(response.status(), axum::http::StatusCode::UNAUTHORIZED);
            assert_eq!(response.headers()["www-authenticate"], e.challenge());
        }
    }
}
