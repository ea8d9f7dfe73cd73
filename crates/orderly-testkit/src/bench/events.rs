//! `orderly-dev bench-events`: what the order event stream costs and how far behind it runs,
//! each figure against a raw baseline measured in the same run (issue 11):
//!
//! - **event lag**: from an order write (the outbox row's time, set just before its commit)
//!   to the merchant copy holding it, p50/p99, under the `create` load over HTTP;
//! - **the outbox's cost**: the create's shard transaction (order row, one line) with the
//!   outbox statement against the same transaction without it, in ABBA halves, with the relay
//!   draining the outbox as in production;
//! - **relay throughput**: outbox rows published, acknowledged and deleted per second,
//!   against publishing the same messages straight to JetStream (pipelined the same way);
//! - **merchant list**: `GET /v1/shops/{shop_id}/orders` over HTTP against the same SQL
//!   issued directly through the same driver, in ABBA halves.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use sqlx::AssertSqlSafe;
use tokio_util::sync::CancellationToken;

use crate::cluster::ClusterSpec;
use crate::raw::{self, RawDb};
use crate::stack::{self, PoolFit, Stack, StackSpec};
use orderly::app::Application;
use orderly::config::{LimitSettings, Settings};
use orderly::domain::actor::Role;
use orderly::domain::ids::{OrderId, ShopId};
use orderly::events::consumer::{self, Batch, Projection, ProjectionError};
use orderly::events::merchant::MerchantCopy;
use orderly::events::{relay, Broker};
use orderly::http::auth::AuthKeys;
use orderly::storage::merchant::{self, ShopQuery};
use orderly::storage::outbox;
use orderly::storage::shards::ShardMap;

#[derive(Debug, Clone)]
pub struct EventsOptions {
    pub duration: Duration,
    pub concurrency: usize,
    pub durable: bool,
    /// Outbox rows the relay-throughput phase drains.
    pub relay_events: usize,
}

/// The merchant copy, recording how long after its write each event was applied.
struct LagRecorder {
    copy: MerchantCopy,
    lag_us: Mutex<Histogram<u64>>,
}

impl Projection for LagRecorder {
    fn name(&self) -> &str {
        self.copy.name()
    }

    async fn apply(&self, batch: &Batch) -> Result<(), ProjectionError> {
        self.copy.apply(batch).await?;
        let now = Utc::now();
        let mut h = self
            .lag_us
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for e in &batch.events {
            let lag = (now - e.occurred_at).num_microseconds().unwrap_or(0).max(1);
            let _ = h.record(lag as u64);
        }
        Ok(())
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Runs `op` on `concurrency` tasks for `duration`; answers operations done and latencies.
async fn closed_loop<F, Fut>(concurrency: usize, duration: Duration, op: F) -> (u64, Histogram<u64>)
where
    F: Fn(u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let op = op.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut done = 0u64;
            while Instant::now() < deadline {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                if op(n).await {
                    done += 1;
                    let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                }
            }
            (done, h)
        }));
    }
    let mut total = 0;
    let mut all = histogram();
    for t in tasks {
        if let Ok((done, h)) = t.await {
            total += done;
            let _ = all.add(h);
        }
    }
    (total, all)
}

struct Phase {
    ops: u64,
    secs: f64,
    h: Histogram<u64>,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs.max(1e-9)
    }
    fn cells(&self) -> String {
        format!(
            "{:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
            self.rate(),
            ms(self.h.value_at_quantile(0.5)),
            ms(self.h.value_at_quantile(0.99))
        )
    }
}

async fn timed<F, Fut>(concurrency: usize, duration: Duration, op: F) -> Phase
where
    F: Fn(u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let t = Instant::now();
    let (ops, h) = closed_loop(concurrency, duration, op).await;
    Phase {
        ops,
        secs: t.elapsed().as_secs_f64(),
        h,
    }
}

/// Two phases of each side, in the order A B B A, merged per side.
async fn abba<FA, FB, FutA, FutB>(c: usize, d: Duration, a: FA, b: FB) -> (Phase, Phase)
where
    FA: Fn(u64) -> FutA + Send + Sync + Clone + 'static,
    FutA: std::future::Future<Output = bool> + Send,
    FB: Fn(u64) -> FutB + Send + Sync + Clone + 'static,
    FutB: std::future::Future<Output = bool> + Send,
{
    let half = d / 2;
    let a1 = timed(c, half, a.clone()).await;
    let b1 = timed(c, half, b.clone()).await;
    let b2 = timed(c, half, b).await;
    let a2 = timed(c, half, a).await;
    let merge = |mut x: Phase, y: Phase| {
        x.ops += y.ops;
        x.secs += y.secs;
        let _ = x.h.add(y.h);
        x
    };
    (merge(a1, a2), merge(b1, b2))
}

/// One order row and one line, with or without its outbox event, in one transaction: the
/// create's shard write without the service around it.
async fn raw_create(
    pool: &orderly::storage::Db,
    t: &orderly::storage::shards::ShardTables,
    id: i64,
    shop: i64,
    with_outbox: bool,
) -> bool {
    let work = async {
        let mut conn = pool.acquire().await?;
        let mut tx = orderly::storage::pool::begin(&mut conn).await?;
        let now = raw::ts(Utc::now());
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (order_id, user_id, shop_id, status, version, currency, total_amount,
                discount_amount, pay_amount, receiver_name, receiver_phone, receiver_region,
                receiver_detail, remark, request_hash, created_at, updated_at, pay_deadline)
             VALUES (?, ?, ?, 0, 1, 'CNY', 1000, 0, 1000, 'Li Lei', '13800000000', '', '1 Century Avenue', '', ?, ?, ?, ?)",
            t.orders
        )))
        .bind(id)
        .bind(id % 100_000 + 1)
        .bind(shop)
        .bind(&[0u8; 32][..])
        .bind(now)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (order_id, line_no, product_id, product_name, unit_price, quantity, line_total)
             VALUES (?, 1, 1, 'bench product', 1000, 1, 1000)",
            t.items
        )))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if with_outbox {
            let oid = OrderId::new(id).ok_or_else(|| orderly::storage::StorageError::Corrupt("id".into()))?;
            raw::insert_created_event(&mut tx, t, oid, Utc::now()).await?;
        }
        tx.commit().await?;
        Ok::<_, orderly::storage::StorageError>(())
    };
    work.await.is_ok()
}

/// Runs the events bench on a self-started cluster and writes `DIR/events.md`.
pub async fn run(opts: EventsOptions, out: PathBuf) -> anyhow::Result<String> {
    let mut base = Settings::defaults();
    base.auth.jwt_secret = (format!("bench-{}", uuid::Uuid::new_v4().simple()) + "-bench-secret").into();
    base.server.listen = ([127, 0, 0, 1], 0).into();
    let wanted = base.database.max_connections.max(opts.concurrency as u32);
    base.limits = LimitSettings::off();
    let Stack {
        cluster, settings: s, ..
    } = stack::start(
        ClusterSpec {
            mariadb_servers: 2,
            with_redis: true,
            with_nats: true,
            durable: opts.durable,
            ..ClusterSpec::default()
        },
        StackSpec {
            base,
            db_prefix: "bevents_".into(),
            shards: 32,
            // Within the servers' max_connections for the instance and the bench's own
            // relays and consumer together.
            pool_fit: Some(PoolFit { processes: 2, wanted }),
        },
        |s| {
            // This bench runs the relay and the copy's consumer itself, to stop and time them.
            s.events.relay = false;
            s.merchant.consume = false;
        },
    )
    .await?;
    let shutdown = CancellationToken::new();
    let app = Application::build(s.clone(), shutdown.clone()).await?;
    let base_url = format!("http://{}", app.address());
    let state = app.state().clone();
    let served = tokio::spawn(app.run());
    let keys = AuthKeys::new(&s.auth);
    let hour = Duration::from_secs(3600);
    let admin = keys.issue("1", Role::Admin, None, hour);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.concurrency)
        .build()?;
    let post = |path: &str, token: &str, body: Value| {
        client
            .post(format!("{base_url}{path}"))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    let shop: Value = post("/v1/shops", &admin, json!({"name": "bench shop"}))
        .await?
        .json()
        .await?;
    let shop_id = shop["shop_id"].as_str().unwrap_or_default().to_owned();
    let product: Value = post(
        "/v1/products",
        &admin,
        json!({"shop_id": shop_id, "name": "bench product", "price": 1000, "stock": 1_000_000_000}),
    )
    .await?
    .json()
    .await?;
    let product_id = product["product_id"].as_str().unwrap_or_default().to_owned();
    let shop = ShopId::parse(&shop_id).ok_or_else(|| anyhow::anyhow!("no shop: {shop}"))?;

    // The bench's own shard map (its relays run on pools of their own, counted in the fit).
    let databases = ShardMap::connect(&s).await?.databases().to_vec();
    let start_relay = || {
        let token = CancellationToken::new();
        let task = tokio::spawn(relay::run(
            databases.clone(),
            s.events.clone(),
            state.orders.relay_wakers().clone(),
            token.clone(),
        ));
        (token, task)
    };

    // 1. Event lag under the create load.
    eprintln!("events bench: create load with the relay and the merchant copy's consumer ...");
    let (relay_stop, relay_task) = start_relay();
    let recorder = Arc::new(LagRecorder {
        copy: MerchantCopy::new(state.merchant.map().clone()),
        lag_us: Mutex::new(histogram()),
    });
    let consumer_stop = CancellationToken::new();
    let consumer_task = tokio::spawn(consumer::run(
        s.events.clone(),
        recorder.clone(),
        consumer_stop.clone(),
    ));
    let tokens: Arc<Vec<String>> = Arc::new(
        (1..=1000)
            .map(|u| keys.issue(&u.to_string(), Role::User, None, hour))
            .collect(),
    );
    let create = {
        let client = client.clone();
        let base_url = base_url.clone();
        let product_id = product_id.clone();
        let tokens = tokens.clone();
        move |n: u64| {
            let client = client.clone();
            let base_url = base_url.clone();
            let product_id = product_id.clone();
            let token = tokens[(n % tokens.len() as u64) as usize].clone();
            async move {
                let id: Value = match client
                    .post(format!("{base_url}/v1/order-ids"))
                    .bearer_auth(&token)
                    .send()
                    .await
                {
                    Ok(r) => r.json().await.unwrap_or(Value::Null),
                    Err(_) => return false,
                };
                let body = json!({"order_id": id["order_id"], "items": [{"product_id": product_id, "quantity": 1}],
                    "address": {"name": "Li Lei", "phone": "13800000000", "detail": "1 Century Avenue"}});
                matches!(
                    client.post(format!("{base_url}/v1/orders")).bearer_auth(&token).json(&body).send().await,
                    Ok(r) if r.status().is_success()
                )
            }
        }
    };
    let creates = timed(opts.concurrency, opts.duration, create).await;
    // Let the copy catch up, then read the lag of everything the load wrote.
    let caught_up = Instant::now() + Duration::from_secs(60);
    loop {
        let applied = recorder.lag_us.lock().map(|h| h.len()).unwrap_or(0);
        if applied >= creates.ops || Instant::now() > caught_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consumer_stop.cancel();
    let _ = consumer_task.await;
    let lag = recorder
        .lag_us
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| histogram());

    // 2. The outbox's cost on the create's shard transaction (the relay drains it meanwhile).
    eprintln!("events bench: the create transaction with and without the outbox ...");
    let shards = RawDb::connect(&s).await?;
    let raw_tx = |with_outbox: bool, base_id: i64| {
        let shards = shards.clone();
        move |n: u64| {
            let shards = shards.clone();
            async move {
                // Ids far above any the service issues, spread over every shard.
                let id = base_id + n as i64;
                let shard = &shards.all()[(n % shards.all().len() as u64) as usize];
                raw_create(shards.primary(shard), &shard.tables, id, shop.get(), with_outbox).await
            }
        }
    };
    let (with_outbox, without_outbox) = abba(
        opts.concurrency,
        opts.duration,
        raw_tx(true, 7_000_000_000_000_000_000),
        raw_tx(false, 7_100_000_000_000_000_000),
    )
    .await;
    relay_stop.cancel();
    let _ = relay_task.await;

    // 3. Relay throughput against raw JetStream publishes of the same messages.
    eprintln!("events bench: relay throughput ...");
    let next = Arc::new(AtomicU64::new(0));
    let mut fillers = Vec::new();
    for _ in 0..opts.concurrency {
        let f = raw_tx(true, 7_200_000_000_000_000_000);
        let next = next.clone();
        let limit = opts.relay_events as u64;
        fillers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= limit {
                    return;
                }
                f(n).await;
            }
        }));
    }
    for f in fillers {
        let _ = f.await;
    }
    let broker = Broker::connect(&s.events).await?;
    let mut raw_settings = s.events.clone();
    raw_settings.stream = "BENCH_RAW".into();
    raw_settings.subject_prefix = "benchraw".into();
    let raw_broker = Broker::connect(&raw_settings).await?;
    let mut bodies = Vec::new();
    for db in &databases {
        let mut conn = db.write().acquire().await?;
        for row in outbox::pending(&mut conn, u32::MAX).await? {
            bodies.push((raw_broker.subject(row.shop_id, row.kind), row.clone()));
        }
    }
    let t = Instant::now();
    for chunk in bodies.chunks(s.events.relay_batch as usize) {
        let mut acks = Vec::new();
        for (subject, row) in chunk {
            let publish = async_nats::jetstream::message::PublishMessage::build()
                .payload(relay::body(row))
                .message_id(orderly::domain::events::event_id(row.order_id, row.version));
            acks.push(
                raw_broker
                    .jetstream()
                    .send_publish(subject.clone(), publish)
                    .await?,
            );
        }
        for a in acks {
            a.await?;
        }
    }
    let raw_rate = bodies.len() as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut relayed = 0usize;
    for db in &databases {
        let mut conn = db.write().acquire().await?.detach();
        while let Ok(r) = relay::relay_once(&mut conn, &broker, s.events.relay_batch).await {
            if r.published == 0 {
                break;
            }
            relayed += r.published;
        }
    }
    let relay_rate = relayed as f64 / t.elapsed().as_secs_f64();

    // 4. The merchant list against its SQL issued raw (the copy holds the create load's
    //    orders and the raw ones the relay published, all of one shop).
    eprintln!("events bench: merchant list ...");
    let (copy_stop, copy_task) = {
        let token = CancellationToken::new();
        let copy = Arc::new(MerchantCopy::new(state.merchant.map().clone()));
        (
            token.clone(),
            tokio::spawn(consumer::run(s.events.clone(), copy, token)),
        )
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let merchant_token = keys.issue("2", Role::Merchant, Some(shop), hour);
    let list_http = {
        let client = client.clone();
        let url = format!("{base_url}/v1/shops/{shop_id}/orders?limit=20");
        move |_n: u64| {
            let client = client.clone();
            let url = url.clone();
            let token = merchant_token.clone();
            async move {
                match client.get(&url).bearer_auth(&token).send().await {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                }
            }
        }
    };
    let list_raw = {
        let map = state.merchant.map().clone();
        move |_n: u64| {
            let map = map.clone();
            async move {
                let q = ShopQuery {
                    shop,
                    status: None,
                    created_from: None,
                    created_to: None,
                    before: None,
                    limit: 21,
                };
                merchant::list(&map, &q).await.is_ok()
            }
        }
    };
    let (list_service, list_baseline) = abba(opts.concurrency, opts.duration, list_http, list_raw).await;
    copy_stop.cancel();
    let _ = copy_task.await;

    shutdown.cancel();
    let _ = served.await;
    let copy_rows = {
        let mut n = 0i64;
        for t in state.merchant.map().tables() {
            let c: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT COUNT(*) FROM {}", t.name)))
                .fetch_one(state.merchant.map().pool(t))
                .await
                .unwrap_or(0);
            n += c;
        }
        n
    };

    let profile = if opts.durable { "durable" } else { "tmpfs" };
    let md = format!(
        "| measure | orderly | raw baseline | ratio |\n|---|---:|---:|---:|\n\
         | event lag, commit to merchant copy (create load: {creates}) | p50 {lag50:.1} ms, p99 {lag99:.1} ms ({lagn} events) | — | — |\n\
         | create's shard transaction, with the outbox vs without | {with} | {without} | {outbox_ratio:.2} |\n\
         | relay: outbox → JetStream, acked and deleted ({relayed} events) | {relay_rate:.0} events/s | {raw_rate:.0} publishes/s | {relay_ratio:.2} |\n\
         | `GET /v1/shops/{{id}}/orders?limit=20` vs its SQL | {ls} | {lb} | {list_ratio:.2} |\n\n\
         Profile: {profile}; {c} clients; {d:?} per measured phase (halves in the order A B B A for the ratios). \
         The merchant copy held {copy_rows} orders of the one bench shop at the end.\n",
        creates = creates.cells(),
        lag50 = ms(lag.value_at_quantile(0.5)),
        lag99 = ms(lag.value_at_quantile(0.99)),
        lagn = lag.len(),
        with = with_outbox.cells(),
        without = without_outbox.cells(),
        outbox_ratio = with_outbox.rate() / without_outbox.rate().max(1e-9),
        relay_ratio = relay_rate / raw_rate.max(1e-9),
        ls = list_service.cells(),
        lb = list_baseline.cells(),
        list_ratio = list_service.rate() / list_baseline.rate().max(1e-9),
        c = opts.concurrency,
        d = opts.duration,
    );
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("events.md"), &md)?;
    drop(cluster);
    Ok(md)
}
