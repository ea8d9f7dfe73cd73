//! An identity provider's public keys (a JWKS, RFC 7517), fetched from `auth.jwks_url` and
//! held in memory.
//!
//! Invariants:
//! - Requests read the held key set without waiting: a read lock held for an `Arc` clone,
//!   never across an `.await`.
//! - At most one fetch runs at a time, in a task of its own (a dropped waiter cannot cancel
//!   it or start a second one). A request whose token names a `kid` not held asks for a fetch
//!   ([`Jwks::refetch_for_unknown_kid`]): it joins the fetch under way, or starts one if the
//!   last (of any kind: the start's, the periodic refresh's, another request's) ended at
//!   least `auth.jwks_min_refresh_secs` ago, or is answered at once with the keys held; it
//!   waits at most [`UNKNOWN_KID_WAIT`]. Forged kids therefore cost the provider at most one
//!   fetch per that interval, and hold a request for half a second at most, even when the
//!   provider is slow or down.
//! - A failed fetch (unreachable, slow past `auth.jwks_timeout_ms`, not a JWKS, or a set
//!   with no usable key) keeps the keys held: a provider's bad minute does not log everyone
//!   out.
//! - Only signing keys of an asymmetric type are kept: `use: enc` keys and symmetric (`oct`)
//!   keys are dropped, so a JWKS can never supply an HS256 secret.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::AuthSettings;

/// The largest JWKS body read. A provider's set holds a handful of keys (a few KB); a body
/// larger than this is not a key set, and reading it whole could exhaust memory.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// The kind of public key a token's algorithm needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyType {
    Rsa,
    Ec,
    Okp,
}

impl KeyType {
    fn of(alg: Algorithm) -> Option<KeyType> {
        use Algorithm as A;
        match alg {
            A::RS256 | A::RS384 | A::RS512 | A::PS256 | A::PS384 | A::PS512 => Some(KeyType::Rsa),
            A::ES256 | A::ES384 => Some(KeyType::Ec),
            A::EdDSA => Some(KeyType::Okp),
            A::HS256 | A::HS384 | A::HS512 => None,
        }
    }
}

/// One usable key of the set.
struct PublicKey {
    kid: Option<String>,
    kind: KeyType,
    /// The JWK's own `alg`, when it names one: the key is then used for that algorithm only.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

/// The keys of one fetch.
#[derive(Default)]
pub struct KeySet {
    keys: Vec<PublicKey>,
}

impl KeySet {
    /// Parses a JWKS document, keeping every key this service can verify with and skipping
    /// (with a warning) the others: one exotic key must not hide the rest.
    pub fn parse(body: &[u8]) -> Result<KeySet, String> {
        let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
        let Some(Value::Array(entries)) = doc.get("keys") else {
            return Err("not a JWKS: no `keys` array".into());
        };
        let mut keys = Vec::new();
        for entry in entries {
            let kid = entry.get("kid").and_then(Value::as_str).unwrap_or("(none)");
            match usable(entry) {
                Ok(key) => keys.push(key),
                Err(why) => tracing::warn!(kid, why, "JWKS key skipped"),
            }
        }
        Ok(KeySet { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys a token of `alg` naming `kid` may be verified with: the key of that kid
    /// (when its type and `alg` fit), or, for a token without a kid, every key that fits.
    pub fn candidates(&self, kid: Option<&str>, alg: Algorithm) -> Vec<DecodingKey> {
        let Some(kind) = KeyType::of(alg) else {
            return Vec::new();
        };
        self.keys
            .iter()
            .filter(|k| k.kind == kind && k.alg.is_none_or(|a| a == alg))
            .filter(|k| kid.is_none_or(|kid| k.kid.as_deref() == Some(kid)))
            .map(|k| k.key.clone())
            .collect()
    }
}

fn usable(entry: &Value) -> Result<PublicKey, &'static str> {
    let jwk: Jwk = serde_json::from_value(entry.clone()).map_err(|_| "not a JWK this service reads")?;
    if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return Err("not a signing key (`use`)");
    }
    let kind = match jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyType::Rsa,
        AlgorithmParameters::EllipticCurve(_) => KeyType::Ec,
        AlgorithmParameters::OctetKeyPair(_) => KeyType::Okp,
        AlgorithmParameters::OctetKey(_) => return Err("a symmetric key (never taken from a JWKS)"),
    };
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(a) => {
            let a = a
                .to_string()
                .parse::<Algorithm>()
                .map_err(|_| "an encryption `alg`")?;
            if KeyType::of(a) != Some(kind) {
                return Err("`alg` does not fit the key type");
            }
            Some(a)
        }
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| "malformed key")?;
    Ok(PublicKey {
        kid: jwk.common.key_id,
        kind,
        alg,
        key,
    })
}

/// The key set of `auth.jwks_url`, and the one gate every fetch of it passes.
pub struct Jwks {
    /// `auth.jwks_url` with its password masked, for logs.
    url: String,
    fetch_url: String,
    client: reqwest::Client,
    held: RwLock<Arc<KeySet>>,
    /// The single flight: the fetch under way, and when the last one ended. Never held across
    /// an `.await`.
    gate: Mutex<Gate>,
    /// How long a request with an unknown kid waits for the fetch it asked for.
    unknown_kid_wait: Duration,
    /// Whether the last fetch succeeded (the refresh loop retries sooner when not).
    last_ok: AtomicBool,
    refresh: Duration,
    min_refresh: Duration,
}

/// See [`Jwks::fetch_in`].
#[derive(Default)]
struct Gate {
    running: Option<Shared<BoxFuture<'static, bool>>>,
    /// When the last fetch ended (`None`: never).
    ended: Option<Instant>,
}

/// The longest a request whose token names an unknown kid waits for the fetch it caused
/// (or joined); a key the provider just published arrives well within it, and a forged kid
/// holds its request (and its place under `server.max_in_flight`) no longer.
pub const UNKNOWN_KID_WAIT: Duration = Duration::from_millis(500);

impl Jwks {
    /// An empty key set for `settings.jwks_url` (nothing fetched yet); `None` when no URL is
    /// set.
    pub fn new(settings: &AuthSettings) -> Result<Option<Arc<Jwks>>, reqwest::Error> {
        if settings.jwks_url.is_empty() {
            return Ok(None);
        }
        let timeout = Duration::from_millis(settings.jwks_timeout_ms);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()?;
        Ok(Some(Arc::new(Jwks {
            // Only for logs: a URL may carry credentials.
            url: crate::config::redact_url(&settings.jwks_url),
            fetch_url: settings.jwks_url.clone(),
            client,
            held: RwLock::default(),
            gate: Mutex::new(Gate::default()),
            unknown_kid_wait: timeout.min(UNKNOWN_KID_WAIT),
            last_ok: AtomicBool::new(false),
            refresh: Duration::from_secs(settings.jwks_refresh_secs),
            min_refresh: Duration::from_secs(settings.jwks_min_refresh_secs),
        })))
    }

    /// The keys held now.
    pub fn current(&self) -> Arc<KeySet> {
        self.held.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Fetches now (or joins the fetch under way); whether it succeeded. The start and the
    /// periodic refresh call this.
    pub async fn refresh_now(self: &Arc<Self>) -> bool {
        let fetch = {
            let mut gate = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
            self.fetch_in(&mut gate)
        };
        fetch.await
    }

    /// A token named a kid that `seen` (the set it was looked up in) lacks: fetch again if
    /// allowed, and answer the keys held after it. Joins a fetch under way; starts one only if
    /// none ended in the last `auth.jwks_min_refresh_secs`; waits for it at most
    /// [`UNKNOWN_KID_WAIT`] (a forged kid must not hold a request for a provider's timeout).
    pub async fn refetch_for_unknown_kid(self: &Arc<Self>, seen: &Arc<KeySet>) -> Arc<KeySet> {
        let fetch = {
            let mut gate = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
            let now = self.current();
            if !Arc::ptr_eq(&now, seen) {
                // A fetch ended while this request looked: that is the answer.
                return now;
            }
            if gate.running.is_none() && gate.ended.is_some_and(|at| at.elapsed() < self.min_refresh) {
                return now;
            }
            self.fetch_in(&mut gate)
        };
        let _ = tokio::time::timeout(self.unknown_kid_wait, fetch).await;
        self.current()
    }

    /// The fetch under way, or a new one. The fetch runs in a task of its own, which records
    /// its end: a waiter that is dropped (a client gone) neither cancels it nor lets the next
    /// waiter start another one.
    fn fetch_in(self: &Arc<Self>, gate: &mut Gate) -> Shared<BoxFuture<'static, bool>> {
        if let Some(running) = &gate.running {
            return running.clone();
        }
        let jwks = self.clone();
        let task = tokio::spawn(async move {
            let ok = jwks.fetch_and_hold().await;
            let mut gate = jwks.gate.lock().unwrap_or_else(PoisonError::into_inner);
            gate.ended = Some(Instant::now());
            gate.running = None;
            ok
        });
        let running = async move { task.await.unwrap_or(false) }.boxed().shared();
        gate.running = Some(running.clone());
        running
    }

    /// Fetches the set and holds it; on failure logs and keeps the keys held.
    async fn fetch_and_hold(&self) -> bool {
        let ok = match self.fetch().await {
            Ok(set) if set.is_empty() => {
                // Most likely a provider's mistake: keep the keys held (the module's promise).
                tracing::warn!(url = %self.url, "the JWKS holds no usable key; the keys held stay in use");
                false
            }
            Ok(set) => {
                tracing::debug!(url = %self.url, keys = set.len(), "JWKS fetched");
                *self.held.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
                true
            }
            Err(why) => {
                tracing::warn!(url = %self.url, %why, "cannot fetch the JWKS; the keys held stay in use");
                false
            }
        };
        self.last_ok.store(ok, Ordering::Relaxed);
        ok
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let mut response = self
            .client
            .get(&self.fetch_url)
            .header(
                reqwest::header::ACCEPT,
                "application/jwk-set+json, application/json",
            )
            .send()
            .await
            .map_err(|e| crate::http::error::cause_chain(&e))?;
        if !response.status().is_success() {
            return Err(format!("answered {}", response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| crate::http::error::cause_chain(&e))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        KeySet::parse(&body)
    }

    /// Fetches every `auth.jwks_refresh_secs` (after a failure, every
    /// `auth.jwks_min_refresh_secs`) until `shutdown` fires.
    pub async fn run_refresh(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let wait = match self.last_ok.load(Ordering::Relaxed) {
                true => self.refresh,
                false => self.min_refresh,
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.refresh_now() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture_keys() -> Value {
        serde_json::from_str(include_str!("../../../tests/fixtures/jwks/public.json")).unwrap()
    }

    #[test]
    fn keys_are_selected_by_kid_type_and_alg() {
        let f = fixture_keys();
        let set = KeySet::parse(
            json!({"keys": [f["rsa-1"], f["rsa-2"], f["ec-1"], f["ed-1"]]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(set.len(), 4);
        assert_eq!(set.candidates(Some("rsa-2"), Algorithm::RS256).len(), 1);
        assert_eq!(set.candidates(Some("rsa-3"), Algorithm::RS256).len(), 0);
        // The JWK says RS256: not for PS256, and never an EC key for an RSA algorithm.
        assert_eq!(set.candidates(Some("rsa-1"), Algorithm::PS256).len(), 0);
        assert_eq!(set.candidates(Some("ec-1"), Algorithm::RS256).len(), 0);
        assert_eq!(set.candidates(None, Algorithm::RS256).len(), 2);
        assert_eq!(set.candidates(Some("ed-1"), Algorithm::EdDSA).len(), 1);
        // No JWKS key ever verifies an HS256 token.
        assert!(set.candidates(Some("rsa-1"), Algorithm::HS256).is_empty());
        assert!(set.candidates(None, Algorithm::HS256).is_empty());
    }

    #[test]
    fn unusable_keys_are_skipped_without_hiding_the_others() {
        let f = fixture_keys();
        let mut enc = f["rsa-2"].clone();
        enc["use"] = json!("enc");
        let mut wrong_alg = f["ec-1"].clone();
        wrong_alg["alg"] = json!("RS256");
        let body = json!({"keys": [
            f["rsa-1"],
            enc,
            wrong_alg,
            {"kty": "oct", "kid": "secret", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"},
            {"kty": "XYZ", "kid": "future"},
            {"kty": "RSA", "kid": "rsa-oaep", "alg": "RSA-OAEP", "n": f["rsa-2"]["n"], "e": "AQAB"},
        ]});
        let set = KeySet::parse(body.to_string().as_bytes()).unwrap();
        assert_eq!(set.len(), 1);
        assert_eq!(set.candidates(Some("rsa-1"), Algorithm::RS256).len(), 1);
        assert!(KeySet::parse(b"<html>").is_err());
        assert!(KeySet::parse(b"{\"keys\": {}}").is_err());
    }
}
