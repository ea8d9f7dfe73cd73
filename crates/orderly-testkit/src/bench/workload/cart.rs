//! The `cart` scenario: cart updates (`PUT /v1/cart/items/{product_id}`) against the raw
//! Redis `HSET` + `SADD` a write-behind cart needs at the least, at the same concurrency (each
//! client on a connection of its own, one update in flight, both commands in one round trip),
//! and the flusher's rows per second against a raw batched upsert of as many rows.
//!
//! Operation `i` updates user `i % users`'s cart: product `(i / users + i) % products`,
//! quantity `i % 9 + 1`. The raw phase writes keys of its own (`{prefix}bench-raw:…`), which no
//! flusher reads. After the phases, the check waits for the service's flusher to write every
//! cart the service phase touched and compares each with Redis.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{Check, Outcome, Workload};
use crate::bench::CartFlush;
use orderly::domain::actor::Caller;
use orderly::domain::cart::CartQuantity;
use orderly::domain::ids::UserId;
use orderly::redis::cart::CartStore;
use orderly::redis::cart::{bucket_of, cart_key, dirty_key};
use orderly::redis::Redis;
use orderly::service::cart::CartService;
use orderly::storage::carts;

/// Carts the flusher measurement writes (and the raw upsert as many): 16 buckets of 500 per
/// round make this three rounds, enough to time past start-up costs.
const FLUSH_ROWS: usize = 20_000;

/// How long the check waits for the service's flusher (it runs every loss window).
const FLUSHED_WAIT: Duration = Duration::from_secs(20);

/// User ids of the flusher measurement's carts (and, above them, the raw upsert's): far above
/// any bench buyer.
const FLUSH_USERS_FROM: i64 = 2_000_000_000;
const RAW_USERS_FROM: i64 = 3_000_000_000;

impl Workload {
    fn cart_target(&self, i: u64) -> (usize, usize, i64) {
        let users = self.users.len().max(1);
        let user = i as usize % users;
        let product = (i as usize / users + i as usize) % self.products.len().max(1);
        (user, product, (i % 9) as i64 + 1)
    }

    /// Operation `i` over HTTP against `base`.
    pub(super) async fn http_cart_put(&self, base: &str, i: u64) -> Result<(), Outcome> {
        let (user, product, q) = self.cart_target(i);
        self.cart_touched[user].store(true, std::sync::atomic::Ordering::Relaxed);
        let path = format!("/v1/cart/items/{}", self.products[product].id);
        self.request(
            base,
            reqwest::Method::PUT,
            &path,
            &self.tokens[user],
            Some(json!({ "quantity": q })),
            false,
        )
        .await
        .map(drop)
    }

    /// Operation `i` in process: `CartService::set`, no HTTP.
    pub(super) async fn in_process_cart_put(&self, i: u64) -> Result<(), Outcome> {
        let Some(app) = &self.app else {
            return Err(Outcome::Error("no_app_state".into()));
        };
        let (user, product, q) = self.cart_target(i);
        self.cart_touched[user].store(true, std::sync::atomic::Ordering::Relaxed);
        let q = CartQuantity::parse(q).map_err(|_| Outcome::Error("quantity".into()))?;
        app.orders
            .carts()
            .set(Caller::User(self.users[user]), self.products[product].id, q)
            .await
            .map(drop)
            .map_err(|e| Outcome::Error(format!("service: {e}")))
    }

    /// Operation `i` raw: `HSET` of the line and `SADD` of the user to a dirty set, one round
    /// trip, on client `client`'s own connection.
    pub(super) async fn raw_cart_put(&self, client: usize, i: u64) -> Result<(), Outcome> {
        let conns = Self::lock(&self.redis_per_client).clone();
        let Some(conn) = conns.get(client) else {
            return Err(Outcome::Error("no_redis_connection".into()));
        };
        let (user, product, q) = self.cart_target(i);
        let user = self.users[user];
        let prefix = format!("{}bench-raw:", self.key_prefix);
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(cart_key(&prefix, user))
            .arg(self.products[product].id.get())
            .arg(q)
            .ignore()
            .cmd("SADD")
            .arg(dirty_key(&prefix, bucket_of(user)))
            .arg(user.get())
            .ignore();
        pipe.query_async::<()>(&mut conn.clone())
            .await
            .map_err(|e| Outcome::Error(format!("redis: {}", e.kind() as u8)))
    }

    /// Operation `i` raw without Redis (the service then keeps carts in MySQL alone): the
    /// service's read-modify-write of the row.
    pub(super) async fn raw_cart_sql(&self, i: u64) -> Result<(), Outcome> {
        let (user, product, q) = self.cart_target(i);
        let q = CartQuantity::parse(q).map_err(|_| Outcome::Error("quantity".into()))?;
        let product = self.products[product].id;
        carts::change(&self.commerce, self.users[user], 1, chrono::Utc::now(), |c| {
            c.set(product, q)
        })
        .await
        .map(drop)
        .map_err(Outcome::from)
    }

    /// After `cart`: every cart the service phase touched is flushed by the service's own
    /// flusher (within [`FLUSHED_WAIT`]) and equals what Redis holds.
    pub(super) async fn check_carts(&self) -> Check {
        let name = "carts_flushed_equal_redis".to_owned();
        let Some(mut redis) = self.redis.clone() else {
            return Check {
                name,
                ok: true,
                detail: "no Redis: carts live in MySQL only".into(),
            };
        };
        let touched: Vec<UserId> = self
            .cart_touched
            .iter()
            .enumerate()
            .filter(|(_, t)| t.load(std::sync::atomic::Ordering::Relaxed))
            .map(|(u, _)| self.users[u])
            .collect();
        let deadline = Instant::now() + FLUSHED_WAIT;
        let mut problems = Vec::new();
        let mut from_mysql = 0;
        for &user in &touched {
            let dirty = dirty_key(&self.key_prefix, bucket_of(user));
            loop {
                let score: Option<f64> = redis::cmd("ZSCORE")
                    .arg(&dirty)
                    .arg(user.get())
                    .query_async(&mut redis)
                    .await
                    .unwrap_or(None);
                if score.is_none() || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let h: BTreeMap<String, String> = redis::cmd("HGETALL")
                .arg(cart_key(&self.key_prefix, user))
                .query_async(&mut redis)
                .await
                .unwrap_or_default();
            let in_redis: BTreeMap<i64, i64> = h
                .iter()
                .filter(|(k, _)| !k.starts_with('_'))
                .filter_map(|(k, v)| Some((k.parse().ok()?, v.parse().ok()?)))
                .collect();
            let Some(version) = h.get("_v").and_then(|v| v.parse::<i64>().ok()) else {
                // No Redis copy: dropped after a change went to MySQL directly (a Redis call
                // that timed out), or evicted; a read answers MySQL's cart.
                from_mysql += 1;
                continue;
            };
            match carts::load(&self.commerce, user).await {
                Ok(stored) => {
                    let in_mysql: BTreeMap<i64, i64> =
                        stored.cart.lines.iter().map(|(p, q)| (p.get(), *q)).collect();
                    if stored.version != version || in_mysql != in_redis {
                        problems.push(format!(
                            "user {user}: MySQL v{} {in_mysql:?}, Redis v{version} {in_redis:?}",
                            stored.version
                        ));
                    }
                }
                Err(e) => problems.push(format!("user {user}: {e}")),
            }
        }
        Check {
            name,
            ok: problems.is_empty(),
            detail: if problems.is_empty() {
                format!(
                    "{} carts flushed, each equal to Redis ({from_mysql} of them not in Redis: \
                     read back from MySQL; cart writes that went to MySQL directly: {})",
                    touched.len(),
                    self.metric_value("orderly_cart_writes_total{path=\"mysql\"}")
                        .await
                        .map_or_else(|| "unknown".to_owned(), |v| v.to_string()),
                )
            } else {
                problems.truncate(5);
                problems.join("; ")
            },
        }
    }

    /// A series' value from the service's `GET /metrics` (0 when it is absent: never counted).
    async fn metric_value(&self, series: &str) -> Option<f64> {
        let text = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        Some(
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
                .unwrap_or(0.0),
        )
    }

    /// The flusher's rows per second: [`FLUSH_ROWS`] dirty carts (made in process, under a
    /// key prefix of their own, so the service's flusher leaves them alone) written by one
    /// `flush_once`, against the same number of rows upserted raw in batches of the same size.
    pub async fn measure_cart_flush(&self) -> anyhow::Result<Option<CartFlush>> {
        let mut redis_settings = self.settings.redis.clone();
        redis_settings.key_prefix = format!("{}bench-flush:", self.key_prefix);
        let Some(store) = Redis::from_settings(&redis_settings, &self.settings.cache).await? else {
            return Ok(None);
        };
        if self.redis.is_none() {
            return Ok(None);
        }
        let mut cart_settings = self.settings.cart.clone();
        cart_settings.flush_batch = carts::UPSERT_CHUNK;
        let service = std::sync::Arc::new(CartService::new(
            self.commerce.clone(),
            Some(CartStore::new(store)),
            cart_settings,
        ));
        // Dirty carts, 64 at a time: one line each.
        let product = self.products[0].id;
        let q = CartQuantity::parse(1).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut tasks = Vec::new();
        for t in 0..64 {
            let service = service.clone();
            tasks.push(tokio::spawn(async move {
                for n in (t..FLUSH_ROWS).step_by(64) {
                    let user = UserId::new(FLUSH_USERS_FROM + n as i64).expect("positive");
                    service.set(Caller::User(user), product, q).await?;
                }
                Ok::<_, orderly::service::Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let start = Instant::now();
        let out = service.flush_once().await?;
        let flusher_secs = start.elapsed().as_secs_f64();

        // Raw: the same rows through the flusher's own statement (`carts::upsert_newer`, in
        // its batches), issued directly: no Redis reads, no version read-back, no cleaning.
        let mut cart = orderly::domain::cart::Cart::default();
        cart.set(product, q).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let rows: Vec<_> = (0..FLUSH_ROWS)
            .map(|n| {
                let user = UserId::new(RAW_USERS_FROM + n as i64).expect("positive");
                (
                    user,
                    orderly::domain::cart::StoredCart {
                        version: 1,
                        cart: cart.clone(),
                    },
                )
            })
            .collect();
        let start = Instant::now();
        carts::upsert_newer(&self.commerce, &rows, chrono::Utc::now()).await?;
        let raw_secs = start.elapsed().as_secs_f64();
        let per = |rows: usize, secs: f64| rows as f64 / secs.max(1e-9);
        let flusher_rows_per_sec = per(out.written, flusher_secs);
        let raw_rows_per_sec = per(FLUSH_ROWS, raw_secs);
        Ok(Some(CartFlush {
            rows: out.written,
            rounds: out.rounds,
            flusher_secs,
            flusher_rows_per_sec,
            raw_rows: FLUSH_ROWS,
            raw_secs,
            raw_rows_per_sec,
            ratio: flusher_rows_per_sec / raw_rows_per_sec.max(f64::MIN_POSITIVE),
        }))
    }
}
