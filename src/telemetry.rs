//! Telemetry: logs and traces through `tracing`, metrics through the `metrics` facade into a
//! Prometheus recorder that `GET /metrics` renders.
//!
//! Logs go to stderr, as JSON lines for `serve` (one object per event, with the fields of the
//! request span around it: `request_id`, `method`, `route`) and as human text for the
//! playground, the bench and the small tools. `RUST_LOG` filters them; without it each format
//! has a default ([`LogFormat::default_filter`]).
//!
//! # Metrics
//! Every series the service emits is described in [`describe_metrics`], so the `# HELP` lines
//! of `/metrics` are the reference; docs/operations.md says what a dashboard plots from them.
//! No label ever takes an unbounded value (an order id, a raw path, a user).

use crate::storage::Db;
use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line, for a log collector (`serve`).
    Json,
    /// Multi-line, readable, for a person watching a terminal (`playground`).
    Pretty,
    /// One line per event (`bench` and the small tools).
    Compact,
}

impl LogFormat {
    /// The filter used when `RUST_LOG` is unset (the same for every format). A served request
    /// logs one `debug` line when it finishes (method, route, numeric `status` and
    /// `latency_ms`, request id): an access log for `RUST_LOG=info,orderly::http=debug`, off
    /// by default (a line per request cost more than a cached read). Failed requests (5xx)
    /// log at `error`, load-shedding refusals at `warn`, sampled.
    pub fn default_filter(self) -> &'static str {
        "info,sqlx=warn"
    }
}

/// Installs the process's log subscriber; a second call (tests) changes nothing.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(format.default_filter()));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => logs.json().try_init(),
        LogFormat::Pretty => logs.pretty().try_init(),
        LogFormat::Compact => logs.compact().try_init(),
    };
}

/// Upper bounds of the latency histograms, in seconds: a cache hit answers in about a
/// millisecond, a create in a few, a request stuck on a lock or a slow replica in hundreds,
/// and the request timeout cuts everything off at seconds. Finer below 100 ms, where the
/// service lives, and coarse above, where only "how bad" matters.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process's recorder handle: one per process because a `metrics` recorder is
/// process-global by nature (the facade has a single slot, set once). This is the one lazy
/// global of the crate; it holds no connection or setting, only the counters every part of
/// the process already reaches through the facade. Tests build many [`crate::app::Application`]s
/// in one process, and all of them render the same recorder.
static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder on first call and answers its handle.
///
/// No HTTP listener of the exporter's own: `GET /metrics` on the API port renders the handle.
/// Histogram samples are drained into their buckets by [`PrometheusHandle::run_upkeep`], which
/// the gauge sampler of [`crate::app`] calls, and by every render.
pub fn metrics() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed: /metrics will stay empty");
            }
            describe_metrics();
            metrics_process::Collector::default().describe();
            metrics::gauge!("orderly_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// The text of one scrape of `handle`: the process's own series (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_open_fds`, `process_threads`, … from
/// `metrics-process`) read now, then every series rendered.
pub fn render(handle: &PrometheusHandle) -> String {
    metrics_process::Collector::default().collect();
    handle.render()
}

/// Every series, with its labels and meaning. Emitted where the thing happens (`metrics::`
/// macros in the module named); described here in one place.
fn describe_metrics() {
    // http (the middleware of `crate::http`)
    describe_counter!(
        "orderly_http_requests_total",
        "HTTP requests answered, by method, route (the matched route template, `unmatched` for \
         none) and status code"
    );
    describe_histogram!(
        "orderly_http_request_duration_seconds",
        Unit::Seconds,
        "Time from receiving a request to having its response, by method, route and status"
    );
    // service (the one commit point of order writes)
    describe_counter!(
        "orderly_rate_limited_total",
        "Requests refused with 429 by a per-user rate limit, by route (`create`, `ids`)"
    );
    describe_counter!(
        "orderly_http_overloaded_total",
        "Requests refused with 503 because server.max_in_flight requests were being served"
    );
    describe_counter!(
        "orderly_order_writes_total",
        "Order writes committed, by the status the order has after the write"
    );
    describe_counter!(
        "orderly_reservations_total",
        "Stock and coupon reservations of creates, by outcome (reserved, already_reserved, \
         out_of_stock, coupon_unavailable, limit_exceeded, conflict, vanished)"
    );
    // jobs (`crate::jobs::sweeper`, `closer`, `completer`)
    describe_counter!(
        "orderly_sweeper_claims_total",
        "Sweeper results: claims confirmed, reservations returned, releases finished \
         (released), claims or shards left for the next step (failed)"
    );
    describe_counter!(
        "orderly_closer_orders_total",
        "Payment-timeout closer results: unpaid orders closed, orders that changed meanwhile \
         (raced), shards or orders left for the next step (failed)"
    );
    describe_counter!(
        "orderly_completer_orders_total",
        "Completer results: shipped orders completed after orders.auto_complete_days, orders \
         that changed meanwhile (raced), shards or orders left for the next step (failed)"
    );
    // storage
    describe_counter!(
        "orderly_db_connections_closed_in_transaction_total",
        "Pooled connections whose use ended inside a transaction (cut off, or an error), closed \
         instead of reused, by pool"
    );
    describe_counter!(
        "orderly_db_errors_total",
        "Database errors, by kind (lock: deadlock or lock wait timeout, refused: too many \
         connections, server, pool_timeout, connection, other); duplicate keys are answers and \
         are not counted"
    );
    describe_gauge!(
        "orderly_db_pool_connections",
        "Connections of each database pool, by database and state (in_use, idle)"
    );
    // flash sales (`crate::service::flash`)
    describe_counter!(
        "orderly_flash_gate_requests_total",
        "Flash-sale buyers the Redis gate answered without MySQL (sold_out, over_limit), and \
         those sent to the database path because the gate could not answer (fallback)"
    );
    // carts (`crate::service::cart`)
    describe_counter!(
        "orderly_cart_writes_total",
        "Cart changes by where they went: redis (written behind), mysql (Redis did not answer)"
    );
    describe_counter!(
        "orderly_cart_flushed_total",
        "Dirty carts the flusher handled: written (to MySQL), stale (MySQL held a newer cart, \
         written while Redis did not answer: the Redis copy was dropped), gone (evicted before \
         its flush: its unflushed changes are lost)"
    );
    // replicas (`crate::storage::replicas`)
    describe_counter!(
        "orderly_db_reads_total",
        "Order, list and profile reads by database and the server that answered (primary, \
         replica); cache hits are not counted"
    );
    describe_histogram!(
        "orderly_replica_gtid_wait_seconds",
        Unit::Seconds,
        "Time a session read spent making a replica wait for its watermark \
         (MASTER_GTID_WAIT); reads whose replica was known to have it do not wait"
    );
    describe_counter!(
        "orderly_replica_fences_total",
        "Primary GTID positions read for session reads (the fence), by database and outcome: \
         read, shared (a read joined one in flight), failed"
    );
    describe_counter!(
        "orderly_replica_read_timeouts_total",
        "Replica reads cut off at replicas.read_timeout_ms (the read moved on), by replica"
    );
    describe_counter!(
        "orderly_order_replays_total",
        "Creates answered as an identical replay of an order already created (200, not 201)"
    );
    describe_counter!(
        "orderly_replica_gtid_wait_timeouts_total",
        "Session reads whose replica did not apply the watermark within \
         replicas.gtid_wait_ms (the primary answered), by replica"
    );
    describe_counter!(
        "orderly_replica_failovers_total",
        "Times a replica was found unusable, by replica and reason (read_failed, \
         probe_failed, probe_timed_out, lagging); the read moved on"
    );
    describe_gauge!(
        "orderly_replica_lag_seconds",
        "Age of the oldest primary position the replica had not applied, at the last probe"
    );
    describe_gauge!(
        "orderly_replica_in_rotation",
        "1 while the replica takes reads, 0 while it is out (down or lagging)"
    );
    // the event stream (`crate::events`)
    describe_gauge!(
        "orderly_outbox_backlog_events",
        "Order events waiting in a shard database's outbox, sampled by its relay after every \
         failed publish and full batch (0 only once a partial batch all went out); grows while \
         NATS is down"
    );
    describe_counter!(
        "orderly_relay_publish_failures_total",
        "Publishes the relay could not get acknowledged, by database and reason (send_timeout: \
         the NATS client's buffer is full, NATS away long; send_error; ack_timeout; ack_error; \
         no_stream; refused: JetStream or the client refuses the message itself, parked after \
         events.max_publish_attempts); the row and those after it are retried"
    );
    describe_gauge!(
        "orderly_outbox_parked_events",
        "Order events the relay parked in order_outbox_parked because JetStream kept refusing \
         them, by database; not published until `orderly relay --republish-parked`; alert on > 0"
    );
    describe_counter!(
        "orderly_events_published_total",
        "Outbox events the relay published, JetStream acknowledged and the relay deleted, by \
         database"
    );
    describe_counter!(
        "orderly_relay_failures_total",
        "Relay steps that failed (a publish failed, or the database did not answer), by database"
    );
    describe_gauge!(
        "orderly_relay_active",
        "1 while this process holds the relay lock of the database, 0 while another does"
    );
    describe_counter!(
        "orderly_projection_events_total",
        "Events a read model applied and acknowledged, by projection (merchant, search)"
    );
    describe_counter!(
        "orderly_projection_failures_total",
        "Times a read model's consumer failed (redelivered after a pause), by projection"
    );
    // the archive (`crate::service::archive`)
    describe_counter!(
        "orderly_archived_orders_total",
        "Orders the archiver wrote to the archive (and then deleted from their shards, unless \
         they changed meanwhile)"
    );
    describe_gauge!(
        "orderly_archive_slowdown_ratio",
        "How many times the base pause the archiver waits between batches (1: no strain; more \
         while a replica lags or the hot tables' deletes slow down)"
    );
    describe_counter!(
        "orderly_archive_read_failures_total",
        "Reads of the archive that failed or did not answer within archive.read_timeout_ms \
         (a list then answers its hot part, flagged archive: unavailable)"
    );
    describe_counter!(
        "orderly_archived_money_records_total",
        "Payments and refunds recorded for archived orders (each flags its order \
         refund_required: look at it)"
    );
    // cache
    describe_counter!(
        "orderly_cache_reads_total",
        "Cache reads that did not miss, by kind (order, user, page) and outcome (hit, skipped)"
    );
    describe_counter!(
        "orderly_cache_fills_total",
        "Cache fills after a miss, by outcome (stored, refused, late, failed)"
    );
    describe_counter!(
        "orderly_cache_notices_total",
        "Write notices that could not reach Redis and wait in the pending list (outcome=pending)"
    );
    describe_counter!(
        "orderly_cache_redis_errors_total",
        "Redis calls that failed (cache, flash gate, carts: one connection), by kind (error, \
         timeout); each counts toward the circuit breaker"
    );
    describe_gauge!(
        "orderly_cache_up",
        "1 while the cache's Redis answers, 0 while it is degraded; absent when the cache is \
         disabled"
    );
    // the process (`crate::app`, every long-running command)
    describe_gauge!(
        "orderly_build_info",
        "Always 1; the label `version` is the release of this process's binary"
    );
    describe_gauge!(
        "orderly_http_requests_in_flight",
        "Requests this process was serving when sampled (every 5 s), of server.max_in_flight; \
         the probes and the scrape are not counted"
    );
    describe_gauge!(
        "orderly_lease_valid",
        "1 while this process holds its worker id (leased and renewed in time, or fixed) and \
         can issue order ids; 0 while its lease is lost (creates answer 503)"
    );
    describe_gauge!(
        "orderly_projection_lag_seconds",
        Unit::Seconds,
        "Age of the oldest order event in the stream that a read model has not applied yet, \
         by its commit time (0 when the projection has applied everything), by projection; \
         sampled every 5 s from JetStream by each serve process that runs the projection"
    );
}

/// Samples the connections of one pool into `orderly_db_pool_connections`.
pub fn record_pool(database: &str, pool: &Db) {
    let idle = pool.num_idle() as f64;
    let in_use = (f64::from(pool.size()) - idle).max(0.0);
    metrics::gauge!("orderly_db_pool_connections", "database" => database.to_owned(), "state" => "in_use")
        .set(in_use);
    metrics::gauge!("orderly_db_pool_connections", "database" => database.to_owned(), "state" => "idle")
        .set(idle);
}
