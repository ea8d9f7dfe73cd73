//! Limits at the HTTP edge: the request body read whole and bounded before anything answers,
//! per-user rate limits on creating orders and issuing ids, and a bound on the requests a
//! process serves at once.
//!
//! # Request bodies
//! Every request's body is read to its end, at most `server.body_limit_bytes` within
//! `server.request_timeout_ms`, before the request takes an in-flight place, whatever the
//! route does with it (see [`read_body`]). hyper closes a keep-alive connection whose
//! request body was left unread and had not arrived when the answer went out: a handler that
//! never reads its body (`POST /v1/order-ids`), or one refused before its JSON extractor ran
//! (401, 403, 429, 503), would otherwise break the connection of every client that sends the
//! body after the headers (SPEC 2.11). Over the limit is 413 `payload_too_large` (declared
//! by `Content-Length` or found while reading) and the connection may then close; a body
//! that cannot be read is 400 `unreadable_body`, one that does not arrive in time 408
//! `body_timeout`. Routes see the body as a buffer, so the JSON extractor finds it whole.
//!
//! # Per-user rate limits
//! A keyed token bucket (GCRA, the `governor` crate) per limited route, keyed by the
//! authenticated buyer: `burst` requests at once, then one every `1 / per_sec` seconds.
//! Over it, 429 `rate_limited` with `Retry-After` (whole seconds, rounded up), answered
//! before the handler runs, so nothing is written. Only buyers (`role = user`) are limited:
//! merchants, the payment channel and administrators are trusted parties with their own
//! protections. A request that fails authentication passes through to the handler's 401.
//!
//! **The buckets are per process.** They live in this process's memory: with N processes
//! behind a load balancer that spreads a user's requests, the user gets up to N times the
//! configured rate and burst, and a restart forgets every bucket. That is enough to stop a
//! script hammering the create path (the goal) without a Redis call on every create; a hard
//! global limit would need a shared store. Idle buckets are dropped by [`run_cleanup`].
//!
//! # In-flight bound
//! At most `server.max_in_flight` requests are served at once; one more is refused at once
//! with 503 `overloaded` and `Retry-After: 1` rather than queued. `/healthz`, `/readyz` and
//! `/metrics` are never refused, so probes and scrapes keep working under overload.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{header, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::LimitSettings;
use crate::domain::actor::Caller;
use crate::domain::ids::UserId;

use super::auth::Auth;
use super::error::ApiError;
use super::extract::Verified;
use super::{route_of, AppState};

/// How often idle buckets are dropped. A bucket is idle once it has refilled completely
/// (at most `burst / per_sec` seconds after its last request, 2 s with the defaults), so a
/// minute keeps the maps at the size of the last minute's active buyers at little cost.
pub const CLEANUP_INTERVAL: Duration = Duration::from_secs(60);

/// One keyed token bucket per user.
pub struct UserRateLimit<C: Clock = DefaultClock> {
    limiter: RateLimiter<UserId, DefaultKeyedStateStore<UserId>, C, NoOpMiddleware<C::Instant>>,
    clock: C,
}

impl<C: Clock + Clone> UserRateLimit<C> {
    /// `per_sec` tokens a second, `burst` at most; `None` when the limit is off (`per_sec`
    /// 0). A `burst` of 0 counts as 1 (settings validation refuses it anyway).
    pub fn new(per_sec: u32, burst: u32, clock: C) -> Option<Self> {
        let rate = NonZeroU32::new(per_sec)?;
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(rate).allow_burst(burst);
        Some(UserRateLimit {
            limiter: RateLimiter::dashmap_with_clock(quota, clock.clone()),
            clock,
        })
    }

    /// Takes a token of `user`'s bucket, or says how long until one is there.
    pub fn check(&self, user: UserId) -> Result<(), Duration> {
        self.limiter
            .check_key(&user)
            .map(drop)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Drops the buckets that have refilled completely (they behave as new ones would).
    pub fn retain_recent(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Buckets held.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

/// The per-user limits of one process.
pub struct UserLimits {
    create: Option<UserRateLimit>,
    ids: Option<UserRateLimit>,
}

/// Which limited route a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limited {
    Create,
    Ids,
}

/// `Retry-After` is whole seconds: a wait of 0.2 s says 1, never 0 (which would invite an
/// immediate retry that is refused again).
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

impl UserLimits {
    pub fn new(s: &LimitSettings) -> Self {
        UserLimits {
            create: UserRateLimit::new(s.create_per_user_per_sec, s.create_burst, DefaultClock::default()),
            ids: UserRateLimit::new(s.ids_per_user_per_sec, s.ids_burst, DefaultClock::default()),
        }
    }

    fn check(&self, route: Limited, user: UserId) -> Result<(), ApiError> {
        let limit = match route {
            Limited::Create => &self.create,
            Limited::Ids => &self.ids,
        };
        match limit.as_ref().map(|l| l.check(user)) {
            Some(Err(wait)) => {
                metrics::counter!("orderly_rate_limited_total", "route" => match route {
                    Limited::Create => "create",
                    Limited::Ids => "ids",
                })
                .increment(1);
                Err(ApiError::RateLimited {
                    retry_after_secs: retry_after_secs(wait),
                })
            }
            _ => Ok(()),
        }
    }

    fn retain_recent(&self) {
        for l in [&self.create, &self.ids].into_iter().flatten() {
            l.retain_recent();
        }
    }
}

/// Drops idle buckets every [`CLEANUP_INTERVAL`] until `shutdown` fires.
pub async fn run_cleanup(limits: Arc<UserLimits>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(CLEANUP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => limits.retain_recent(),
        }
    }
}

/// The per-user rate limits, as a middleware inside routing (it needs the route template).
/// Authenticates the caller itself (the handler does again; an HS256 check costs
/// microseconds), so the limit is keyed by who the token says, never by anything else in
/// the request.
pub(super) async fn per_user_limits(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = match (req.method(), route_of(&req)) {
        (&Method::POST, "/v1/orders") => Limited::Create,
        (&Method::POST, "/v1/order-ids") => Limited::Ids,
        _ => return next.run(req).await,
    };
    let (mut parts, body) = req.into_parts();
    if let Ok(Auth(caller)) = Auth::from_request_parts(&mut parts, &s).await {
        // The handler's extractor takes the caller from here: one token check per request.
        parts.extensions.insert(Verified(caller));
        if let Caller::User(user) = caller {
            if let Err(refused) = s.limits.check(route, user) {
                return refused.into_response();
            }
        }
    }
    next.run(Request::from_parts(parts, body)).await
}

/// Reads the whole body of `req` (at most `limit` bytes, within `timeout`), then lets the
/// request go on with it as a buffer; see the module docs. A request without a body goes on
/// at once.
pub async fn read_body(limit: usize, timeout: Duration, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    if body.is_end_stream() {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return ApiError::PayloadTooLarge.into_response();
    }
    match tokio::time::timeout(timeout, read_at_most(body, limit)).await {
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Ok(Err(refused)) => refused.into_response(),
        Err(_) => ApiError::BodyTimeout.into_response(),
    }
}

/// The bytes of `body`, or 413 once it passes `limit`, or 400 when it cannot be read (the
/// client went away, a broken chunked encoding).
async fn read_at_most(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut chunks = body.into_data_stream();
    let mut buf = BytesMut::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|_| ApiError::UnreadableBody)?;
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Paths never refused for load: probes and scrapes must see an overloaded process as it is.
fn exempt_from_load_shedding(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

/// The requests a process serves at once, bounded by `server.max_in_flight` (see
/// [`bound_in_flight`]); cheap to clone (the clones share the bound). The count is read, not
/// kept: the gauge sampler sets `orderly_http_requests_in_flight` from [`InFlight::current`],
/// so no request pays for a shared counter.
#[derive(Debug, Clone)]
pub struct InFlight {
    permits: Arc<Semaphore>,
    max: usize,
}

impl InFlight {
    pub fn new(max: usize) -> InFlight {
        InFlight {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// Requests holding a place now (those exempt from the bound are not counted).
    pub fn current(&self) -> usize {
        self.max.saturating_sub(self.permits.available_permits())
    }

    /// Sets `orderly_http_requests_in_flight` to [`Self::current`].
    pub fn record(&self) {
        metrics::gauge!("orderly_http_requests_in_flight").set(self.current() as f64);
    }
}

/// Serves at most `limit`'s maximum of requests of `router` at once; the next one gets 503
/// `overloaded` at once (see the module docs). The permit is held until the response is
/// ready.
pub fn bound_in_flight<S: Clone + Send + Sync + 'static>(router: Router<S>, limit: InFlight) -> Router<S> {
    let max = limit.max;
    let permits = limit.permits;
    let log = Arc::new(SampledLog::new(SHED_LOG_EVERY));
    router.layer(middleware::from_fn(move |req: Request, next: Next| {
        let permits = permits.clone();
        let log = log.clone();
        async move {
            if exempt_from_load_shedding(req.uri().path()) {
                return next.run(req).await;
            }
            match permits.try_acquire_owned() {
                Ok(_permit) => next.run(req).await,
                Err(_) => {
                    metrics::counter!("orderly_http_overloaded_total").increment(1);
                    if let Some(refused) = log.tick() {
                        tracing::warn!(
                            refused,
                            max_in_flight = max,
                            "overloaded: requests refused with 503 (one line per second at most)"
                        );
                    }
                    let mut response = ApiError::Overloaded.into_response();
                    response.extensions_mut().insert(Shed);
                    response
                }
            }
        }
    }))
}

/// Marks a response as a load-shedding refusal: the access log leaves it to the in-flight
/// bound's sampled warning.
#[derive(Debug, Clone, Copy)]
pub struct Shed;

/// At most one warning per this long about refused requests, with their count.
const SHED_LOG_EVERY: Duration = Duration::from_secs(1);

/// Counts events and lets one through per period, with the number counted since the last.
struct SampledLog {
    start: std::time::Instant,
    period_ms: u64,
    /// Milliseconds since `start` before which nothing is let through.
    next_ms: std::sync::atomic::AtomicU64,
    counted: std::sync::atomic::AtomicU64,
}

impl SampledLog {
    fn new(period: Duration) -> Self {
        SampledLog {
            start: std::time::Instant::now(),
            period_ms: period.as_millis().max(1) as u64,
            next_ms: 0.into(),
            counted: 0.into(),
        }
    }

    /// Counts one event; answers the count since the last answer once per period.
    fn tick(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        self.counted.fetch_add(1, Relaxed);
        let now = self.start.elapsed().as_millis() as u64;
        let next = self.next_ms.load(Relaxed);
        if now < next
            || self
                .next_ms
                .compare_exchange(next, now + self.period_ms, Relaxed, Relaxed)
                .is_err()
        {
            return None;
        }
        Some(self.counted.swap(0, Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sampled_log_lets_one_event_through_per_period_with_the_count() {
        let log = SampledLog::new(Duration::from_secs(3600));
        assert_eq!(log.tick(), Some(1));
        for _ in 0..99 {
            assert_eq!(log.tick(), None);
        }
        // The next period's line would carry the 99 counted since.
        log.next_ms.store(0, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(log.tick(), Some(100));
    }
    use axum::routing::{get, post};
    use governor::clock::FakeRelativeClock;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn user(n: i64) -> UserId {
        UserId::new(n).unwrap()
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate_per_user() {
        let clock = FakeRelativeClock::default();
        let limit = UserRateLimit::new(2, 3, clock.clone()).unwrap();
        for _ in 0..3 {
            limit.check(user(1)).unwrap();
        }
        let wait = limit.check(user(1)).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Another user has a bucket of their own.
        limit.check(user(2)).unwrap();
        clock.advance(Duration::from_millis(500));
        limit.check(user(1)).unwrap();
        assert!(limit.check(user(1)).is_err());
        // Refilled buckets are dropped by the cleanup.
        clock.advance(Duration::from_secs(10));
        assert_eq!(limit.len(), 2);
        limit.retain_recent();
        assert!(limit.is_empty());
        assert!(UserRateLimit::new(0, 3, clock).is_none(), "0 = off");
    }

    /// Two slow requests fill a bound of 2; a third is refused at once with 503 and
    /// Retry-After; probes still pass; once one finishes, requests are served again.
    #[tokio::test]
    async fn requests_beyond_the_in_flight_bound_are_refused_at_once() {
        let gate = Arc::new(Semaphore::new(0));
        let inside = Arc::new(AtomicUsize::new(0));
        let (g, i) = (gate.clone(), inside.clone());
        let app = Router::new()
            .route(
                "/slow",
                get(move || {
                    let (g, i) = (g.clone(), i.clone());
                    async move {
                        i.fetch_add(1, Ordering::SeqCst);
                        g.acquire().await.unwrap().forget();
                        "done"
                    }
                }),
            )
            .route("/fast", get(|| async { "fast" }))
            .route("/healthz", get(|| async { "ok" }));
        let limit = InFlight::new(2);
        let app = bound_in_flight(app, limit.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = reqwest::Client::new();
        let slow: Vec<_> = (0..2)
            .map(|_| tokio::spawn(client.get(format!("{base}/slow")).send()))
            .collect();
        while inside.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(limit.current(), 2, "the in-flight gauge's count");
        let refused = client.get(format!("{base}/fast")).send().await.unwrap();
        assert_eq!(refused.status(), 503);
        assert_eq!(refused.headers()["retry-after"], "1");
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["code"], "overloaded");
        let probe = client.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(probe.status(), 200);
        gate.add_permits(2);
        for s in slow {
            assert_eq!(s.await.unwrap().unwrap().status(), 200);
        }
        let served = client.get(format!("{base}/fast")).send().await.unwrap();
        assert_eq!(served.status(), 200);
        assert_eq!(limit.current(), 0, "every place given back");
    }

    /// Sends `parts` on `stream` with `pause` between them, then reads one answer: its
    /// status, or `None` when the connection closed without one.
    async fn exchange(stream: &mut TcpStream, parts: &[&str], pause: Duration) -> Option<u16> {
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(pause).await;
            }
            stream.write_all(part.as_bytes()).await.ok()?;
        }
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_owned())
                    })
                    .and_then(|v| v.parse::<usize>().ok())?;
                if body.len() >= length {
                    return head.split(' ').nth(1)?.parse().ok();
                }
            }
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The body reader: a body over the limit is 413 (declared, or found while reading a
    /// chunked one), one that does not come in time 408, and a route that never reads its
    /// body answers after it came, on a connection that stays usable.
    #[tokio::test]
    async fn bodies_are_read_whole_within_their_limit_and_their_time() {
        let app = Router::new()
            .route("/ignores-its-body", post(|| async { "ignored" }))
            .layer(middleware::from_fn(|req, next| {
                read_body(16, Duration::from_millis(300), req, next)
            }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let pause = Duration::from_millis(30);
        let head = |length: usize| {
            format!("POST /ignores-its-body HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\n\r\n")
        };

        let mut kept = TcpStream::connect(addr).await.unwrap();
        for _ in 0..3 {
            let answer = exchange(&mut kept, &[&head(16), &"x".repeat(16)], pause).await;
            assert_eq!(answer, Some(200), "the body came after the headers");
        }

        let mut declared = TcpStream::connect(addr).await.unwrap();
        let answer = exchange(&mut declared, &[&head(17)], pause).await;
        assert_eq!(answer, Some(413), "a declared length over the limit");

        let mut chunked = TcpStream::connect(addr).await.unwrap();
        let chunked_head = "POST /ignores-its-body HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n";
        let answer = exchange(
            &mut chunked,
            &[chunked_head, "a\r\n0123456789\r\n", "a\r\n0123456789\r\n"],
            pause,
        )
        .await;
        assert_eq!(answer, Some(413), "a chunked body that grows over the limit");

        let mut slow = TcpStream::connect(addr).await.unwrap();
        let answer = exchange(&mut slow, &[&head(16), "x"], pause).await;
        assert_eq!(answer, Some(408), "a body that does not come in time");
    }
}
