//! `TestApp`, the integration tests' harness: one local cluster (two MariaDB servers and Redis, started from the
//! binaries on PATH) per test binary, and a [`TestApp`] per test with its own databases, its
//! own Redis key prefix and its own server bound on port 0.

use orderly::storage::Db;
use sqlx::AssertSqlSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::cluster::{ClusterSpec, LocalCluster};
use crate::raw::RawDb;
use crate::stack::{self, StackSpec};
use chrono::{TimeDelta, Utc};
use orderly::app::Application;
use orderly::config::Settings;
use orderly::domain::actor::Role;
use orderly::domain::ids::ShopId;
use orderly::http::auth::AuthKeys;
use orderly::storage::shards::ShardMap;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Shards used by tests: the default, on two servers (16 each).
pub const TEST_SHARDS: u32 = 32;
pub const SECRET: &str = "test-secret-test-secret-test-secret!";

static CLUSTER: OnceLock<Arc<LocalCluster>> = OnceLock::new();
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The cluster of this test binary, started on first use.
pub fn cluster() -> Arc<LocalCluster> {
    CLUSTER
        .get_or_init(|| {
            // Started on its own runtime: tests each have their own, and the cluster outlives
            // every one of them.
            std::thread::spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(LocalCluster::start(ClusterSpec {
                    mariadb_servers: 2,
                    with_redis: true,
                    ..ClusterSpec::default()
                }))
            })
            .join()
            .expect("cluster thread")
            .map(Arc::new)
            .unwrap_or_else(|e| panic!("cannot start the test cluster: {e}"))
        })
        .clone()
}

/// A Redis of the test's own (no MariaDB), for tests that stop or freeze it: the shared
/// cluster's Redis serves the other tests.
pub async fn own_redis() -> LocalCluster {
    LocalCluster::start(ClusterSpec {
        mariadb_servers: 0,
        with_redis: true,
        with_nats: false,
        ..ClusterSpec::default()
    })
    .await
    .expect("redis")
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub settings: Settings,
    pub keys: AuthKeys,
    /// The harness's own pool on the commerce database (the same as `raw.commerce()`).
    pub commerce: Db,
    /// The harness's own pools on every shard database, with the shard routing: for reading
    /// and checking rows (see [`crate::raw`]).
    pub raw: RawDb,
    pub app: orderly::http::AppState,
    /// The search index's data directory, removed with the last app on it (twins share it).
    pub search_dir: Arc<tempfile::TempDir>,
    shutdown: CancellationToken,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A shop with products, set up through the API.
pub struct Catalog {
    pub shop: ShopId,
    pub products: Vec<String>,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
        Self::spawn_on(&cluster(), tweak).await
    }

    /// A test app on a cluster of the test's own (a test that counts what reaches a server,
    /// or stops one, must not share it).
    pub async fn spawn_on(cluster: &LocalCluster, tweak: impl FnOnce(&mut Settings)) -> TestApp {
        if std::env::var_os("TEST_LOG").is_some() {
            orderly::telemetry::init(orderly::telemetry::LogFormat::Compact);
        }
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("t{}_{n}_", std::process::id());
        let mut base = Settings::defaults();
        base.auth.jwt_secret = SECRET.into();
        base.server.listen = ([127, 0, 0, 1], 0).into();
        base.redis.key_prefix = format!("{prefix}:");
        base.database.max_connections = 8;
        // Tests that are not about limits create many orders of one user quickly; the
        // limits' own tests turn them on.
        base.limits = orderly::config::LimitSettings::off();
        // Every app its own search index, in a directory that goes with the test.
        let search_dir = Arc::new(tempfile::tempdir().expect("search data dir"));
        let spec = StackSpec {
            base,
            db_prefix: prefix,
            shards: TEST_SHARDS,
            pool_fit: None,
        };
        let (settings, _) = stack::prepare(cluster, spec, |settings| {
            settings.search.data_dir = search_dir.path().to_owned();
            // Tantivy's smallest writer arena: test batches are tiny, and many apps run at once.
            settings.search.writer_memory_mb = 15;
            tweak(settings);
        })
        .await
        .expect("test databases");
        Self::start(settings, search_dir).await
    }

    /// A second service process on this app's databases and Redis (its own worker id, its
    /// own in-process state): what another instance behind a load balancer sees.
    pub async fn twin(&self) -> TestApp {
        Self::start(self.settings.clone(), self.search_dir.clone()).await
    }

    /// A second service process on this app's databases and Redis, as on another host: with
    /// a search data directory of its own.
    pub async fn twin_on_another_host(&self) -> TestApp {
        let dir = Arc::new(tempfile::tempdir().expect("search data dir"));
        let mut settings = self.settings.clone();
        settings.search.data_dir = dir.path().to_owned();
        Self::start(settings, dir).await
    }

    async fn start(settings: Settings, search_dir: Arc<tempfile::TempDir>) -> TestApp {
        let shutdown = CancellationToken::new();
        let app = Application::build(settings.clone(), shutdown.clone())
            .await
            .expect("build app");
        let base_url = format!("http://{}", app.address());
        let state = app.state().clone();
        tokio::spawn(app.run());
        let raw = RawDb::connect_checked(&settings).await.expect("raw pools");
        let commerce = raw.commerce().clone();
        TestApp {
            base: base_url,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            keys: AuthKeys::new(&settings.auth),
            settings,
            commerce,
            raw,
            app: state,
            search_dir,
            shutdown,
        }
    }

    // ------------------------------------------------------------ tokens

    pub fn user_token(&self, user: i64) -> String {
        self.keys
            .issue(&user.to_string(), Role::User, None, Duration::from_secs(3600))
    }

    pub fn merchant_token(&self, shop: ShopId) -> String {
        self.keys
            .issue("900", Role::Merchant, Some(shop), Duration::from_secs(3600))
    }

    pub fn service_token(&self) -> String {
        self.keys
            .issue("0", Role::Service, None, Duration::from_secs(3600))
    }

    pub fn admin_token(&self) -> String {
        self.keys.issue("1", Role::Admin, None, Duration::from_secs(3600))
    }

    // ------------------------------------------------------------ raw HTTP

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (status, _, body) = self.call_full(method, path, token, body).await;
        (status, body)
    }

    pub async fn call_full(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self
            .client
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, body)
    }

    pub async fn call_raw(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: String,
        content_type: &str,
    ) -> (StatusCode, Value) {
        let resp = self
            .client
            .request(method.parse().unwrap(), format!("{}{path}", self.base))
            .bearer_auth(token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request");
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    // ------------------------------------------------------------ catalog

    /// A shop with one product per entry of `stocks` (price 1000 each).
    pub async fn catalog(&self, stocks: &[i64]) -> Catalog {
        let admin = self.admin_token();
        let (s, shop) = self
            .call("POST", "/v1/shops", Some(&admin), Some(json!({"name": "shop"})))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{shop}");
        let shop_id = ShopId::parse(shop["shop_id"].as_str().unwrap()).unwrap();
        let mut products = Vec::new();
        for (i, stock) in stocks.iter().enumerate() {
            let (s, p) = self
                .call(
                    "POST",
                    "/v1/products",
                    Some(&admin),
                    Some(json!({"shop_id": shop_id.to_string(), "name": format!("product {i}"), "price": 1000, "stock": stock})),
                )
                .await;
            assert_eq!(s, StatusCode::CREATED, "{p}");
            products.push(p["product_id"].as_str().unwrap().to_owned());
        }
        Catalog {
            shop: shop_id,
            products,
        }
    }

    pub async fn coupon(&self, user: i64, amount: i64, min_spend: i64) -> String {
        let (s, c) = self
            .call(
                "POST",
                "/v1/coupons",
                Some(&self.admin_token()),
                Some(
                    json!({"user_id": user.to_string(), "amount": amount, "min_spend": min_spend,
                            "valid_to": (Utc::now() + TimeDelta::days(1)).to_rfc3339()}),
                ),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{c}");
        c["coupon_id"].as_str().unwrap().to_owned()
    }

    /// Creates a flash sale of `product` (as an administrator): `units` at `price`, `limit`
    /// per buyer, from `starts_at` for an hour, orders to be paid within `timeout_secs`.
    pub async fn flash_sale(
        &self,
        product: &str,
        units: i64,
        price: i64,
        limit: i64,
        starts_at: chrono::DateTime<Utc>,
        timeout_secs: i64,
    ) -> Value {
        let (s, sale) = self
            .call(
                "POST",
                "/v1/flash-sales",
                Some(&self.admin_token()),
                Some(json!({
                    "product_id": product, "units": units, "sale_price": price, "per_user_limit": limit,
                    "starts_at": starts_at.to_rfc3339(),
                    "ends_at": (starts_at + TimeDelta::hours(1)).to_rfc3339(),
                    "payment_timeout_secs": timeout_secs,
                })),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{sale}");
        sale
    }

    pub async fn stock_of(&self, product: &str) -> i64 {
        sqlx::query_scalar("SELECT stock FROM products WHERE id = ?")
            .bind(product.parse::<i64>().unwrap())
            .fetch_one(&self.commerce)
            .await
            .unwrap()
    }

    // ------------------------------------------------------------ orders

    pub async fn new_order_id(&self, user: i64) -> String {
        let (s, b) = self
            .call("POST", "/v1/order-ids", Some(&self.user_token(user)), None)
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        b["order_id"].as_str().unwrap().to_owned()
    }

    pub fn order_body(id: &str, items: &[(&str, i64)]) -> Value {
        json!({
            "order_id": id,
            "items": items.iter().map(|(p, q)| json!({"product_id": p, "quantity": q})).collect::<Vec<_>>(),
            "address": {"name": "Li Lei", "phone": "13800000000", "detail": "1 Century Avenue"},
            "remark": "",
        })
    }

    pub async fn create_order(&self, user: i64, body: Value) -> (StatusCode, Value) {
        self.call("POST", "/v1/orders", Some(&self.user_token(user)), Some(body))
            .await
    }

    /// Gets an id and creates an order of `items`; asserts 201.
    pub async fn place_order(&self, user: i64, items: &[(&str, i64)]) -> Value {
        let id = self.new_order_id(user).await;
        let (s, o) = self.create_order(user, Self::order_body(&id, items)).await;
        assert_eq!(s, StatusCode::CREATED, "{o}");
        o
    }

    pub async fn pay(&self, order: &Value) -> (StatusCode, Value) {
        let id = order["order_id"].as_str().unwrap();
        let body =
            json!({"transaction_no": format!("tx-{id}"), "channel": "alipay", "amount": order["pay_amount"]});
        self.call(
            "POST",
            &format!("/v1/orders/{id}/payments"),
            Some(&self.service_token()),
            Some(body),
        )
        .await
    }

    pub async fn get_order(&self, user: i64, id: &str) -> (StatusCode, Value) {
        self.call(
            "GET",
            &format!("/v1/orders/{id}"),
            Some(&self.user_token(user)),
            None,
        )
        .await
    }

    // ------------------------------------------------------------ database checks

    /// Rows of `table_prefix` over every shard table on every server (`orders`, `order_items`, …).
    pub async fn count_shard_rows(&self, table_prefix: &str) -> i64 {
        let mut total = 0;
        for shard in self.raw.all() {
            let t = &shard.tables;
            let table = match table_prefix {
                "orders" => &t.orders,
                "order_items" => &t.items,
                "order_payments" => &t.payments,
                "order_discounts" => &t.discounts,
                other => panic!("no shard table {other}"),
            };
            let pool = self.raw.primary(shard);
            let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(pool)
                .await
                .unwrap();
            total += n;
        }
        total
    }

    /// A shard map of the harness's own on this app's shard databases, for the library
    /// functions that take one (rebuilds, backfills, fixtures).
    pub async fn shard_map(&self) -> ShardMap {
        ShardMap::connect(&self.settings).await.expect("shard map")
    }

    /// A pool on the archive's database.
    pub async fn archive_pool(&self) -> Db {
        orderly::storage::connect(&self.settings.archive.url, &self.settings.database)
            .await
            .unwrap()
    }

    pub async fn count_commerce_rows(&self, table: &str) -> i64 {
        sqlx::query_scalar(AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
            .fetch_one(&self.commerce)
            .await
            .unwrap()
    }

    // ------------------------------------------------------------ events

    /// Rows waiting in the outboxes of every shard database.
    pub async fn outbox_rows(&self) -> i64 {
        let mut total = 0;
        for db in self.raw.databases() {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM order_outbox")
                .fetch_one(db)
                .await
                .unwrap();
            total += n;
        }
        total
    }

    /// Polls until every outbox is empty (the relay published everything), at most `within`.
    pub async fn wait_outbox_drained(&self, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = self.outbox_rows().await;
            if left == 0 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{left} outbox rows still waiting after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every message of this app's event stream, in stream order.
    pub async fn stream_events(&self) -> Vec<orderly::domain::events::OrderEvent> {
        let broker = orderly::events::Broker::connect(&self.settings.events)
            .await
            .expect("nats");
        let mut stream = broker
            .jetstream()
            .get_stream(&self.settings.events.stream)
            .await
            .expect("stream");
        let state = stream.info().await.expect("stream info").state.clone();
        let mut events = Vec::new();
        if state.messages == 0 {
            return events;
        }
        for seq in state.first_sequence..=state.last_sequence {
            let m = stream.get_raw_message(seq).await.expect("message");
            let id = m
                .headers
                .get("Nats-Msg-Id")
                .map(|v| v.to_string())
                .expect("Nats-Msg-Id");
            let e: orderly::domain::events::OrderEvent =
                serde_json::from_slice(&m.payload).expect("an order event");
            assert_eq!(e.event_id, id, "the message id is the event id");
            events.push(e);
        }
        events
    }

    // ------------------------------------------------------------ merchant copy

    /// Every row of the merchant copy, `(order_id, version, status, doc)`, by order id.
    pub async fn merchant_copy(&self) -> Vec<(i64, i64, i64, String)> {
        let map = self.app.merchant.map();
        let mut rows = Vec::new();
        for t in map.tables() {
            let part: Vec<(i64, i64, i8, String)> = sqlx::query_as(AssertSqlSafe(format!(
                "SELECT order_id, version, status, doc FROM {}",
                t.name
            )))
            .fetch_all(map.pool(t))
            .await
            .unwrap();
            rows.extend(part.into_iter().map(|(o, v, s, d)| (o, v, i64::from(s), d)));
        }
        rows.sort();
        rows
    }

    /// Every report row of the copy, as text, sorted: for comparing whole tables.
    pub async fn merchant_reports(&self) -> Vec<String> {
        let mut rows = Vec::new();
        for pool in self.app.merchant.map().pools() {
            let part: Vec<(String,)> = sqlx::query_as(
                "SELECT CONCAT_WS(',', shop_id, day, orders, units, gross, discounts, paid, refunded,
                    status_0, status_1, status_2, status_3, status_4, status_5)
                 FROM merchant_reports",
            )
            .fetch_all(pool)
            .await
            .unwrap();
            rows.extend(part.into_iter().map(|(r,)| r));
        }
        rows.sort();
        rows
    }

    /// Polls until the copy holds exactly `want` (order id -> version), at most `within`.
    pub async fn wait_copy(&self, want: &std::collections::HashMap<i64, i64>, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let got: std::collections::HashMap<i64, i64> = self
                .merchant_copy()
                .await
                .into_iter()
                .map(|(o, v, _, _)| (o, v))
                .collect();
            if &got == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the merchant copy never reached the acknowledged versions: {} of {} orders, {} at their version",
                got.len(),
                want.len(),
                want.iter().filter(|(o, v)| got.get(o) == Some(v)).count()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
