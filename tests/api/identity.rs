//! Identity providers: tokens verified with a JWKS that a small server of the test publishes
//! (key pairs in `tests/fixtures/jwks`), HS256 secret rotation, the algorithm allow-list,
//! claims read through configured pointers, and the `WWW-Authenticate` of every 401.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode as AxumStatus;
use axum::response::IntoResponse;
use axum::routing::get;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use orderly::config::{HmacKey, Settings};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{TestApp, SECRET};

// ------------------------------------------------------------ the identity provider

/// A JWKS endpoint on 127.0.0.1:0 whose keys the test changes, counting its fetches.
struct Idp {
    url: String,
    listed: Arc<Mutex<Vec<&'static str>>>,
    fetches: Arc<AtomicUsize>,
    up: Arc<AtomicBool>,
    /// How long the provider takes to answer.
    delay_ms: Arc<AtomicU64>,
}

#[derive(Clone)]
struct IdpState {
    listed: Arc<Mutex<Vec<&'static str>>>,
    fetches: Arc<AtomicUsize>,
    up: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
}

fn public_jwk(kid: &str) -> Value {
    let all: Value = serde_json::from_str(include_str!("../fixtures/jwks/public.json")).unwrap();
    all[kid].clone()
}

async fn jwks(State(s): State<IdpState>) -> axum::response::Response {
    s.fetches.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(s.delay_ms.load(Ordering::SeqCst))).await;
    if !s.up.load(Ordering::SeqCst) {
        return AxumStatus::SERVICE_UNAVAILABLE.into_response();
    }
    let keys: Vec<Value> = s.listed.lock().unwrap().iter().map(|k| public_jwk(k)).collect();
    axum::Json(json!({ "keys": keys })).into_response()
}

impl Idp {
    async fn start(kids: &[&'static str]) -> Idp {
        let state = IdpState {
            listed: Arc::new(Mutex::new(kids.to_vec())),
            fetches: Arc::new(AtomicUsize::new(0)),
            up: Arc::new(AtomicBool::new(true)),
            delay_ms: Arc::new(AtomicU64::new(0)),
        };
        let app = axum::Router::new()
            .route("/.well-known/jwks.json", get(jwks))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/.well-known/jwks.json", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Idp {
            url,
            listed: state.listed,
            fetches: state.fetches,
            up: state.up,
            delay_ms: state.delay_ms,
        }
    }

    fn publish(&self, kids: &[&'static str]) {
        *self.listed.lock().unwrap() = kids.to_vec();
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// An app whose tokens may come from this provider, `tweak` applied after.
    async fn app(&self, tweak: impl FnOnce(&mut Settings)) -> TestApp {
        let url = self.url.clone();
        TestApp::spawn_with(move |s| {
            s.auth.jwks_url = url;
            tweak(s);
        })
        .await
    }
}

// ------------------------------------------------------------ tokens

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Claims of user 41, valid for ten minutes.
fn user_claims() -> Value {
    let now = now();
    json!({"sub": "41", "role": "user", "iat": now, "exp": now + 600})
}

/// `claims` signed by the fixture key `key` with `alg`, naming `kid` in the header.
fn signed(alg: Algorithm, key: &str, kid: Option<&str>, claims: &Value) -> String {
    let pem = |name: &str| {
        std::fs::read(format!(
            "{}/tests/fixtures/jwks/{name}.pem",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    };
    let encoding = match alg {
        Algorithm::RS256 | Algorithm::PS256 => EncodingKey::from_rsa_pem(&pem(key)).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem(key)).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem(key)).unwrap(),
        Algorithm::HS256 => EncodingKey::from_secret(key.as_bytes()),
        other => panic!("no fixture for {other:?}"),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &encoding).unwrap()
}

/// A user's call that needs nothing but a valid user token: its status, and the
/// `WWW-Authenticate` of a refusal.
async fn as_user(app: &TestApp, token: &str) -> (StatusCode, Option<String>, Value) {
    let (status, headers, body) = app.call_full("POST", "/v1/order-ids", Some(token), None).await;
    let challenge = headers
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, challenge, body)
}

async fn accepted(app: &TestApp, token: &str) -> bool {
    let (status, _, body) = as_user(app, token).await;
    assert!(
        status == StatusCode::CREATED || status == StatusCode::UNAUTHORIZED,
        "{status} {body}"
    );
    status == StatusCode::CREATED
}

/// Asserts a 401 whose challenge is `invalid_token` with `description`.
async fn refused_because(app: &TestApp, token: &str, description: &str) {
    let (status, challenge, body) = as_user(app, token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["code"], "unauthorized");
    assert_eq!(
        challenge.as_deref(),
        Some(
            format!("Bearer realm=\"orderly\", error=\"invalid_token\", error_description=\"{description}\"")
                .as_str()
        ),
        "{body}"
    );
}

// ------------------------------------------------------------ tests

#[tokio::test]
async fn tokens_signed_with_a_key_of_the_jwks_are_accepted_by_kid() {
    let idp = Idp::start(&["rsa-1", "ec-1", "ed-1"]).await;
    let app = idp.app(|_| {}).await;
    let claims = user_claims();
    assert!(accepted(&app, &signed(Algorithm::RS256, "rsa-1", Some("rsa-1"), &claims)).await);
    assert!(accepted(&app, &signed(Algorithm::ES256, "ec-1", Some("ec-1"), &claims)).await);
    assert!(accepted(&app, &signed(Algorithm::EdDSA, "ed-1", Some("ed-1"), &claims)).await);
    // A token without a kid is tried against the keys of its algorithm's type.
    assert!(accepted(&app, &signed(Algorithm::RS256, "rsa-1", None, &claims)).await);
    // The shared secret keeps working beside the provider.
    assert!(accepted(&app, &app.user_token(41)).await);
    // Another key under a listed kid: the signature does not hold.
    refused_because(
        &app,
        &signed(Algorithm::RS256, "rsa-2", Some("rsa-1"), &claims),
        "signature does not verify",
    )
    .await;
    // A listed kid with an algorithm of another key type.
    refused_because(
        &app,
        &signed(Algorithm::ES256, "ec-1", Some("rsa-1"), &claims),
        "unknown signing key",
    )
    .await;
    // The pairing no key has asked for a fetch, within the minimum interval of the start's:
    // refused with the keys held.
    assert_eq!(idp.fetches(), 1);
}

#[tokio::test]
async fn a_new_key_of_the_provider_is_fetched_on_first_sight_and_old_ones_keep_working() {
    let idp = Idp::start(&["rsa-1"]).await;
    // No periodic refresh in this test's time: only a token's unknown kid fetches.
    let app = idp
        .app(|s| {
            s.auth.jwks_refresh_secs = 3600;
            s.auth.jwks_min_refresh_secs = 1;
        })
        .await;
    let claims = user_claims();
    let old = signed(Algorithm::RS256, "rsa-1", Some("rsa-1"), &claims);
    let new = signed(Algorithm::RS256, "rsa-2", Some("rsa-2"), &claims);
    assert!(accepted(&app, &old).await);
    assert_eq!(idp.fetches(), 1);
    // The provider rotates: the new key is listed beside the old one.
    idp.publish(&["rsa-1", "rsa-2"]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        accepted(&app, &new).await,
        "the unknown kid fetched the set again"
    );
    assert_eq!(idp.fetches(), 2);
    assert!(accepted(&app, &old).await, "the old key is still listed");
    assert!(accepted(&app, &new).await);
    assert_eq!(idp.fetches(), 2, "known kids fetch nothing");
}

#[tokio::test]
async fn the_key_set_is_refreshed_periodically_and_a_retired_key_stops_working() {
    let idp = Idp::start(&["rsa-1"]).await;
    // On-demand fetches are held back by the minimum interval; the periodic refresh is not.
    let app = idp
        .app(|s| {
            s.auth.jwks_refresh_secs = 1;
            s.auth.jwks_min_refresh_secs = 60;
        })
        .await;
    let claims = user_claims();
    let old = signed(Algorithm::RS256, "rsa-1", Some("rsa-1"), &claims);
    let new = signed(Algorithm::RS256, "rsa-2", Some("rsa-2"), &claims);
    assert!(accepted(&app, &old).await);
    idp.publish(&["rsa-2"]);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(idp.fetches() >= 2, "refreshed on its own: {}", idp.fetches());
    assert!(accepted(&app, &new).await);
    refused_because(&app, &old, "unknown signing key").await;
}

#[tokio::test]
async fn unknown_kids_cost_the_provider_at_most_one_fetch_per_interval() {
    let idp = Idp::start(&["rsa-1"]).await;
    let app = idp
        .app(|s| {
            s.auth.jwks_refresh_secs = 3600;
            s.auth.jwks_min_refresh_secs = 2;
        })
        .await;
    let forged = |i: usize| {
        signed(
            Algorithm::RS256,
            "rsa-1",
            Some(&format!("forged-{i}")),
            &user_claims(),
        )
    };
    let burst = |from: usize| {
        let app = &app;
        futures::future::join_all((from..from + 20).map(move |i| {
            let t = forged(i);
            async move { as_user(app, &t).await.0 }
        }))
    };
    assert_eq!(idp.fetches(), 1);
    // Within the interval of the start's fetch: no fetch at all.
    let answers = burst(0).await;
    assert!(
        answers.iter().all(|s| *s == StatusCode::UNAUTHORIZED),
        "{answers:?}"
    );
    assert_eq!(idp.fetches(), 1);
    // After it: twenty unknown kids at once make one fetch.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let answers = burst(100).await;
    assert!(
        answers.iter().all(|s| *s == StatusCode::UNAUTHORIZED),
        "{answers:?}"
    );
    assert_eq!(idp.fetches(), 2);
    refused_because(&app, &forged(1000), "unknown signing key").await;
}

#[tokio::test]
async fn a_hanging_fetch_holds_up_only_the_unknown_kid_and_no_longer_than_its_timeout() {
    let idp = Idp::start(&["rsa-1"]).await;
    let app = idp
        .app(|s| {
            s.auth.jwks_refresh_secs = 3600;
            s.auth.jwks_min_refresh_secs = 1;
            s.auth.jwks_timeout_ms = 1000;
        })
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    idp.delay_ms.store(5000, Ordering::SeqCst);
    let known = signed(Algorithm::RS256, "rsa-1", Some("rsa-1"), &user_claims());
    let unknown = signed(Algorithm::RS256, "rsa-1", Some("rsa-9"), &user_claims());
    let started = std::time::Instant::now();
    let waiting = async {
        let answer = as_user(&app, &unknown).await.0;
        (answer, started.elapsed())
    };
    let served = async {
        // Sent while the unknown kid's fetch hangs.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let ok = accepted(&app, &known).await;
        (ok, started.elapsed())
    };
    let ((refused, refused_after), (ok, served_after)) = tokio::join!(waiting, served);
    assert_eq!(idp.fetches(), 2, "the unknown kid's fetch was under way");
    assert!(
        ok && served_after < Duration::from_millis(900),
        "known kid served after {served_after:?}"
    );
    assert_eq!(refused, StatusCode::UNAUTHORIZED);
    assert!(
        refused_after >= Duration::from_millis(900) && refused_after < Duration::from_millis(3000),
        "the fetch gave up at its timeout: {refused_after:?}"
    );
}

#[tokio::test]
async fn the_service_starts_while_the_provider_is_down_and_takes_its_keys_once_it_is_back() {
    let idp = Idp::start(&["rsa-1"]).await;
    idp.up.store(false, Ordering::SeqCst);
    let app = idp
        .app(|s| {
            s.auth.jwks_refresh_secs = 3600;
            s.auth.jwks_min_refresh_secs = 1;
        })
        .await;
    let token = signed(Algorithm::RS256, "rsa-1", Some("rsa-1"), &user_claims());
    assert!(
        accepted(&app, &app.user_token(41)).await,
        "HS256 is served meanwhile"
    );
    refused_because(&app, &token, "unknown signing key").await;
    idp.up.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(accepted(&app, &token).await);
}

#[tokio::test]
async fn hs256_secrets_rotate_by_kid() {
    const NEXT: &str = "next-secret-next-secret-next-secret!";
    let app = TestApp::spawn_with(|s| {
        s.auth.keys = vec![HmacKey {
            kid: Some("2025-02".into()),
            secret: NEXT.into(),
        }];
    })
    .await;
    let claims = user_claims();
    // Tokens of the old secret (no kid: what the testkit mints) keep working.
    assert!(accepted(&app, &app.user_token(41)).await);
    assert!(accepted(&app, &signed(Algorithm::HS256, SECRET, None, &claims)).await);
    // The new secret, named or not.
    assert!(accepted(&app, &signed(Algorithm::HS256, NEXT, Some("2025-02"), &claims)).await);
    assert!(accepted(&app, &signed(Algorithm::HS256, NEXT, None, &claims)).await);
    // A kid picks its key: the old secret does not pass under the new kid.
    refused_because(
        &app,
        &signed(Algorithm::HS256, SECRET, Some("2025-02"), &claims),
        "signature does not verify",
    )
    .await;
    refused_because(
        &app,
        &signed(
            Algorithm::HS256,
            "a-secret-nobody-here-knows-at-all!!",
            None,
            &claims,
        ),
        "signature does not verify",
    )
    .await;
}

#[tokio::test]
async fn algorithms_outside_the_allow_list_are_refused() {
    let idp = Idp::start(&["rsa-1", "ec-1"]).await;
    let app = idp.app(|s| s.auth.algorithms = vec![Algorithm::RS256]).await;
    let claims = user_claims();
    assert!(accepted(&app, &signed(Algorithm::RS256, "rsa-1", Some("rsa-1"), &claims)).await);
    let not_allowed = "token algorithm is not allowed";
    refused_because(
        &app,
        &signed(Algorithm::ES256, "ec-1", Some("ec-1"), &claims),
        not_allowed,
    )
    .await;
    refused_because(&app, &app.user_token(41), not_allowed).await;
    let b64 = |v: Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let unsigned = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(claims.clone())
    );
    refused_because(&app, &unsigned, not_allowed).await;

    // HS256 allowed (the default): a token "signed" with the provider's public key as an
    // HS256 secret is still refused, the public key is never a secret.
    let open = idp.app(|_| {}).await;
    let public_pem = include_str!("../fixtures/jwks/rsa-1.pub.pem");
    let mut admin = claims.clone();
    admin["role"] = json!("admin");
    refused_because(
        &open,
        &signed(Algorithm::HS256, public_pem, Some("rsa-1"), &admin),
        "signature does not verify",
    )
    .await;
}

#[tokio::test]
async fn the_caller_is_read_through_the_configured_claim_pointers() {
    let idp = Idp::start(&["rsa-1"]).await;
    let app = idp
        .app(|s| {
            s.auth.user_claim = "/uid".into();
            s.auth.role_claim = "/realm_access/roles".into();
            s.auth.shop_claim = "/https:~1~1orderly.example~1shop".into();
        })
        .await;
    let now = now();
    let token = |extra: Value| {
        let mut claims = json!({"sub": "f3a9c1@idp", "iat": now, "exp": now + 600});
        claims
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        signed(Algorithm::RS256, "rsa-1", Some("rsa-1"), &claims)
    };
    let user = token(json!({"uid": 41, "realm_access": {"roles": ["offline_access", "user"]}}));
    assert!(accepted(&app, &user).await);
    let (s, body) = app.call("GET", "/v1/orders", Some(&user), None).await;
    assert_eq!(s, StatusCode::OK, "{body}");

    let merchant = token(json!({
        "uid": "77",
        "realm_access": {"roles": ["uma_authorization", "merchant"]},
        "https://orderly.example/shop": "9",
    }));
    let (s, body) = app.call("GET", "/v1/shops/9/orders", Some(&merchant), None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = app
        .call("GET", "/v1/shops/10/orders", Some(&merchant), None)
        .await;
    assert!(
        s == StatusCode::FORBIDDEN || s == StatusCode::NOT_FOUND,
        "{s} {body}"
    );

    // The default places are not read any more.
    let by_default = token(json!({"sub": "41", "role": "user"}));
    refused_because(&app, &by_default, "token without a known role").await;
    let no_user = token(json!({"realm_access": {"roles": ["user"]}}));
    refused_because(&app, &no_user, "token subject is not a user id").await;
}

#[tokio::test]
async fn every_401_says_how_to_authenticate() {
    let idp = Idp::start(&["rsa-1"]).await;
    let app = idp.app(|_| {}).await;
    let routes = [
        ("POST", "/v1/order-ids"),
        ("POST", "/v1/orders"),
        ("GET", "/v1/orders"),
        ("GET", "/v1/cart"),
    ];
    let now = now();
    let expired = signed(
        Algorithm::HS256,
        SECRET,
        None,
        &json!({"sub": "41", "role": "user", "iat": now - 7200, "exp": now - 3600}),
    );
    let cases: [(Option<&str>, &str); 5] = [
        (None, "Bearer realm=\"orderly\""),
        (
            Some("Basic YWxhZGRpbjpvcGVuc2VzYW1l"),
            "Bearer realm=\"orderly\", error=\"invalid_request\", \
             error_description=\"expected 'Authorization: Bearer <token>'\"",
        ),
        (
            Some("Bearer not.a.token"),
            "Bearer realm=\"orderly\", error=\"invalid_token\", error_description=\"malformed token\"",
        ),
        (
            Some(&format!("Bearer {expired}")),
            "Bearer realm=\"orderly\", error=\"invalid_token\", error_description=\"token expired\"",
        ),
        (
            Some(&format!(
                "Bearer {}",
                signed(Algorithm::RS256, "rsa-2", Some("rsa-2"), &user_claims())
            )),
            "Bearer realm=\"orderly\", error=\"invalid_token\", error_description=\"unknown signing key\"",
        ),
    ];
    for (method, path) in routes {
        for (authorization, challenge) in &cases {
            let mut req = app
                .client
                .request(method.parse().unwrap(), format!("{}{path}", app.base));
            if let Some(a) = authorization {
                req = req.header("authorization", *a);
            }
            if method == "POST" {
                req = req.json(&json!({}));
            }
            let resp = req.send().await.unwrap();
            assert_eq!(
                resp.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} {authorization:?}"
            );
            assert_eq!(
                resp.headers()
                    .get("www-authenticate")
                    .map(|v| v.to_str().unwrap()),
                Some(*challenge),
                "{method} {path} {authorization:?}"
            );
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["code"], "unauthorized");
        }
    }
    // The scheme name is case-insensitive.
    let resp = app
        .client
        .post(format!("{}/v1/order-ids", app.base))
        .header("authorization", format!("bearer {}", app.user_token(41)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
}
