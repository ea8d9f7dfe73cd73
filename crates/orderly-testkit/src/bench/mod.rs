//! `orderly-dev bench`: the 11.11 load generator (SPEC section 5).
//!
//! Every scenario runs at least twice at the same concurrency for the same time: once against
//! the service over HTTP (keep-alive clients, one JWT per user), once as a **raw baseline**:
//! the same SQL statements issued directly by this process through the same driver, with no
//! HTTP and no service around them. The figure we steer by is `service / raw`, which holds
//! on a shared, noisy machine where absolute numbers drift.
//!
//! `get-hot` measures cache hits, so its baseline is what a hit costs at the least: a Redis
//! `GET` of the cached order, straight from this process (after one read of each hot order
//! through the service has filled the cache), in the service's concurrency shape: each client
//! has a connection of its own and one `GET` in flight, as each HTTP client has one request
//! on its keep-alive connection. Further figures, as notes: the same `GET`s with every client
//! on one shared multiplexed connection (`raw_pipelined`: different clients' `GET`s travel
//! pipelined, which no HTTP client gets); in a self-started run the service's read path
//! called in this process (`in_process`: `OrderService::get` through the cache, no HTTP, no
//! JSON), which splits the cache layer's cost from HTTP's (`service / in_process`): against
//! `raw`, and against `raw_pipelined`, whose shape it shares (the cache's `GET`s all go over
//! one multiplexed connection); and the SQL read the cache replaced (`raw_sql`). The service
//! phase's hit ratio comes from Redis's `keyspace_hits` and `keyspace_misses`: a hit is
//! exactly one `GET` of the data key, a miss also reads the fill marker (so misses weigh a
//! little more than once). Without a cache, or without Redis, get-hot keeps the SQL baseline.
//!
//! **Cache on against off.** A self-started bench runs a second instance of the service on
//! the same databases and Redis with `[cache] enabled = false`. `create`, `get-cold` and `list`
//! then run their service phase against both, in ABBA order: on, off, off, on, each for half
//! the duration (get-cold: each an equal share of its orders, each order read once), so that
//! what drifts during a scenario (the sweeper confirming the previous run's claims, pages
//! coming into the buffer pool) falls on both sides alike. Each side's ops/s is the mean of
//! its two halves, its latency from their merged histograms; `vs_cache_off` is
//! `service / service_cache_off`. For `create` its shortfall from 1 is what invalidation
//! costs (`invalidation_cost`). Against a running service (`--target`) there is no second
//! instance and no such figure.
//!
//! **Replicas against primary only.** A self-started bench gives every MariaDB server
//! `--replicas N` GTID replicas (default 1; 0 starts none and runs exactly as before), and the
//! service reads orders there (see `storage::replicas`). It then runs a third instance of the
//! service on the same databases and Redis, with its cache off (like the cache-off twin) and
//! every replica removed from its settings: every read it serves is a read of a primary.
//! `get-cold` and `list` run their service phase against it too, as halves beside the others
//! in a mirrored order: service, cache off, primary only, primary only, cache off, service
//! (each side's two halves at the same mean position, so a drift linear in time weighs on all
//! three alike; get-cold: an equal share of its orders each, each read once, the cache emptied
//! of them first, so every half misses). `vs_primary_only` is `service_cache_off /
//! service_primary_only`: the same service with no cache in front, reading replicas against
//! reading primaries (list's first page is cached, so with the cache on list would compare
//! two cache hits). Every answer of those phases is counted by its `Served-By` header
//! (`cache`, `replica`, `primary`): `served_by` shows that the twin's reads did go to the
//! replica (`replica_share`) and the primary-only instance's to the primary. Before get-cold
//! and list read,
//! the bench waits until every replica has applied what was seeded and is back in the
//! service's rotation.
//!
//! **Flash sale: the gate against the database only.** `flash` buys hot products, one unit per
//! buyer and request (buyer `i % users` for the `i`-th), ten times as many requests as there
//! are units, served to the end whatever `--duration` says. Before it runs, the bench (with an
//! administrator's token it mints) makes each service phase's product a flash sale:
//! `--flash-stock` units on a shelf of twice that (so the sale, not the shelf, is what sells
//! out), live from a minute ago for an hour, a per-user limit of 1 000 (the API's most;
//! `validate` keeps the requests per buyer within it, so it refuses nobody), payment within 30
//! minutes; it warms each selling instance with a few creates of normal products (so that
//! neither side's first buyers pay for opening its connection pools); and it asks the instance
//! for every order id the run will use, so a request is timed from its `POST /v1/orders` to the
//! answer, without the id request. In a self-started run the service (cache on) sells behind
//! the Redis gate and the cache-off twin on the database path (no gate), as halves in ABBA
//! order (gate, database, database, gate), each half a sale of its own from full with half the
//! units and half the demand, so that what the first run pays (it follows the warm-up and the
//! sweeper's catching up: measured, the first run's successes were 1.5–2 × slower whichever
//! side it was) falls on both sides alike; the database path runs with `flash.fallback_concurrency` raised to
//! `--concurrency` on the twin so that the database path is bounded by the clients alone, not
//! by the default 4. Same run, same clients, same demand; the raw phase keeps its own product
//! without a sale (the service's SQL, the shelf as the limit). Each side is measured by
//! outcome: answered requests (201 and 409 `out_of_stock`) per second over the run, the
//! sold-out answers per second over the time the sale was sold out (from the start of the first
//! sold-out request to the end of the last), and p50 / p99 of the sold-out answers and of the
//! successful creates, each from a histogram of its own (`flash_gate` in the JSON, and the
//! table "Flash sale: gate against database only"). The targets: sold-out answers per second at
//! least 10 × the database path's, successes' p99 no higher than the database path's. After the
//! runs each sale is checked: `sold` = its units, its live reservations hold exactly them, the
//! shelf went down by exactly them (never below zero), and the product's live orders are
//! exactly `units` orders of one unit. Against a running service (`--target`) the bench makes
//! the service phase's sale all the same (the secret of `--config` mints the token): the
//! service's figures then split by outcome as well, with no database-only side and no ratios.
//!
//! **GTID wait.** After the scenarios, a self-started bench with replicas measures what a
//! `session` read's wait for its watermark costs on a caught-up replica: on replica 0 of shard
//! database 0, after the replicas caught up, with the domain-0 GTID of its `@@gtid_slave_pos`
//! (applied, so the wait answers at once), it alternates blocks of point reads of existing
//! orders (`orders::load_order`, the service's read) with blocks of `MASTER_GTID_WAIT` followed
//! by the same read, at concurrency 1 and at the bench's concurrency. The added cost is the
//! difference of the two at p50 and p99 (target: at most 1 ms at p50).
//!
//! Clients are closed-loop (each waits for its answer before the next request), so latency
//! is recorded as measured: there is no coordinated omission to correct for.
//!
//! For `create`, each run also counts the transactions committed to the binary log on every
//! server (`Binlog_commits`) per order created: `commits_per_create`, the number of durable
//! commits (each an fsync under `--durable`) one order costs.
//!
//! `--durable` runs the self-started cluster as production would (data on disk, redo and
//! binary log synced at every commit, doublewrite on); without it the cluster lives on tmpfs
//! and syncs nothing. The results name the profile that ran and each server's settings.
//!
//! After each scenario the databases are checked: no duplicate order, no order without
//! items, every unit of stock either in a live order or still on the shelf, stock never
//! negative, every acknowledged create present, and for each flash sale exactly its units
//! sold (for the raw phase's product, exactly its stock). Any violation fails the run.
//!
//! # Layout
//! - this file: options, environment (self-started or given), the phase driver, reports;
//! - [`workload`]: what one operation of each scenario does, over HTTP and raw;
//! - [`checks`]: the correctness checks.
//! - [`archive`]: `orderly-dev bench-archive`, the archiver against a raw move and beside the load.

pub mod archive;
pub mod checks;
pub mod events;
pub mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::cluster::{ClusterSpec, LocalCluster};
use crate::stack::{self, PoolFit, Stack, StackSpec};
use orderly::app::Application;
use orderly::config::Settings;

use self::checks::Check;
use self::workload::{Outcome, Workload};

/// The scenarios of SPEC section 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Get an id and create an order: many users, normal products.
    Create,
    /// A flash sale of a hot product, demand ten times its units (see the module docs).
    Flash,
    /// Reads of a few orders, again and again (cache hits once there is a cache).
    GetHot,
    /// Each read a different order.
    GetCold,
    /// The first page of "my orders".
    List,
    /// Create, pay, ship, confirm.
    Lifecycle,
    /// Cart updates (`PUT /v1/cart/items/{product_id}`), written behind to MySQL.
    Cart,
}

impl Scenario {
    pub const ALL: [Scenario; 7] = [
        Scenario::Create,
        Scenario::Flash,
        Scenario::GetHot,
        Scenario::GetCold,
        Scenario::List,
        Scenario::Lifecycle,
        Scenario::Cart,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Create => "create",
            Scenario::Flash => "flash",
            Scenario::GetHot => "get-hot",
            Scenario::GetCold => "get-cold",
            Scenario::List => "list",
            Scenario::Lifecycle => "lifecycle",
            Scenario::Cart => "cart",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub scenarios: Vec<Scenario>,
    /// Per phase: each scenario runs this long against the service and again raw (the
    /// service and its twins, cache off and primary only, as two halves each, mirrored).
    pub duration: Duration,
    pub concurrency: usize,
    /// Buyers in the catalog (each with a token).
    pub users: u32,
    /// Normal products.
    pub products: u32,
    /// Units of each flash sale (and the raw phase's flash product's stock); demand is ten
    /// times this.
    pub flash_stock: i64,
    /// Show a progress bar (off in tests).
    pub progress: bool,
    /// Self-started runs: GTID replicas of every MariaDB server, read by the service; with any,
    /// a primary-only instance runs beside it and the GTID wait is measured. 0: none.
    pub replicas: usize,
}

/// A flash sale's demand is served to the end; this bounds it if the service stalls.
const FLASH_MAX_TIME: Duration = Duration::from_secs(600);

/// `flash.fallback_concurrency` of the cache-off twin: one place per client (see the module
/// docs).
fn twin_fallback_concurrency(opts: &BenchOptions) -> usize {
    opts.concurrency
}

/// The flash targets of the issue: the gate answers sold-out buyers at least this many times
/// as fast as the database path ...
const FLASH_SOLD_OUT_RATIO_TARGET: f64 = 10.0;
/// ... and its successful creates' p99 is at most this times the database path's.
const FLASH_CREATED_P99_RATIO_TARGET: f64 = 1.0;

impl BenchOptions {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.concurrency >= 1, "--concurrency must be at least 1");
        anyhow::ensure!(
            self.users >= 1 && self.products >= 1,
            "--users and --products must be at least 1"
        );
        anyhow::ensure!(
            (1..=10_000_000).contains(&self.flash_stock),
            "--flash-stock must be between 1 and 10 000 000"
        );
        anyhow::ensure!(self.replicas <= 9, "--replicas must be at most 9");
        // Each buyer asks a flash sale for one unit this many times: the sale's per-user limit
        // must refuse none of them.
        let per_buyer = (10 * self.flash_stock as u64).div_ceil(u64::from(self.users));
        anyhow::ensure!(
            !self.scenarios.contains(&Scenario::Flash) || per_buyer <= workload::FLASH_PER_USER_LIMIT as u64,
            "flash: {per_buyer} units per buyer would pass the sale's per-user limit of {}: \
             raise --users or lower --flash-stock",
            workload::FLASH_PER_USER_LIMIT
        );
        Ok(())
    }
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            scenarios: Scenario::ALL.to_vec(),
            // Six scenarios of two to five phases: 10 s per phase keeps a full run near three
            // minutes.
            duration: Duration::from_secs(10),
            concurrency: 64,
            users: 10_000,
            products: 1_000,
            flash_stock: 1_000,
            progress: true,
            replicas: 1,
        }
    }
}

/// What a timed run of a scenario's operation runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Over HTTP to the service under test (its cache as configured).
    Service,
    /// Over HTTP to the second instance, cache off (self-started runs).
    ServiceCacheOff,
    /// Over HTTP to the third instance, which reads only primaries (self-started runs with
    /// replicas; get-cold and list).
    ServicePrimaryOnly,
    /// `get-hot`, self-started: the service's read path (`OrderService::get`, through the
    /// cache) called in this process, with no HTTP and no JSON.
    InProcess,
    /// The raw baseline (see [`Baseline`]).
    Raw,
    /// `get-hot` with the Redis baseline: the same `GET`s, but every client shares one
    /// multiplexed connection, so that the GETs of different clients travel pipelined.
    RawPipelined,
    /// `get-hot` with the Redis baseline: the SQL read, as a second baseline.
    RawSql,
    /// `create`: the least work that keeps a create's guarantees, raw (see
    /// `workload/floor.rs`).
    Floor,
    /// `get-hot`: the least an HTTP service does to answer a cached read, in this process
    /// (see `workload/http_floor.rs`).
    HttpFloor,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Service => "service",
            Phase::ServiceCacheOff => "cache off",
            Phase::ServicePrimaryOnly => "primary only",
            Phase::InProcess => "in process",
            Phase::Raw => "raw",
            Phase::RawPipelined => "raw pipelined",
            Phase::RawSql => "raw SQL",
            Phase::Floor => "floor",
            Phase::HttpFloor => "HTTP floor",
        }
    }
}

/// One timed run of a scenario's schedule: a phase, for a whole phase's time or half of it.
///
/// The service and its twins (cache off; primary only) run as halves in a mirrored order
/// (on, off, off, on; or service, cache off, primary only, primary only, cache off, service),
/// so that whatever drifts during a scenario (the sweeper confirming the previous run's
/// claims, the buffer pool warming, the machine's other load) weighs on every side alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub phase: Phase,
    /// The run's length in halves of `--duration` (1 or 2); for get-cold also its share of
    /// the cold pool, in the same unit.
    pub halves: u32,
}

/// What a scenario's raw phase issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Baseline {
    /// The service's SQL through the same storage functions.
    Sql,
    /// A Redis `GET` of the cached order (`get-hot` with a cache), each client on its own
    /// connection.
    RedisGet,
    /// `HSET` of the line and `SADD` of the buyer to a dirty set in one round trip (`cart`
    /// with Redis), each client on its own connection.
    RedisCart,
}

impl Baseline {
    fn name(self) -> &'static str {
        match self {
            Baseline::Sql => "SQL",
            Baseline::RedisGet => "Redis GET",
            Baseline::RedisCart => "Redis HSET+SADD",
        }
    }
}

/// Redis keyspace lookups during the service phases of `get-hot` (hits) and `get-cold` (misses).
#[derive(Debug, Clone, Serialize)]
pub struct HitRatio {
    pub hits: u64,
    pub misses: u64,
    /// `hits / (hits + misses)`; `None` when Redis saw no lookup at all.
    pub ratio: Option<f64>,
}

/// The answers of one service phase (get-cold, list) by their `Served-By` header.
#[derive(Debug, Clone, Serialize)]
pub struct ServedBy {
    pub phase: Phase,
    pub cache: u64,
    pub replica: u64,
    pub primary: u64,
    /// Successful answers without a known `Served-By`.
    pub other: u64,
    /// `replica / all answers`; `None` without answers.
    pub replica_share: Option<f64>,
    /// `replica / (replica + primary)`: the share of the database reads a replica served.
    pub replica_share_of_db_reads: Option<f64>,
}

impl ServedBy {
    pub fn new(phase: Phase, cache: u64, replica: u64, primary: u64, other: u64) -> ServedBy {
        let share = |n: u64, of: u64| (of > 0).then(|| n as f64 / of as f64);
        ServedBy {
            phase,
            cache,
            replica,
            primary,
            other,
            replica_share: share(replica, cache + replica + primary + other),
            replica_share_of_db_reads: share(replica, replica + primary),
        }
    }

    pub fn answers(&self) -> u64 {
        self.cache + self.replica + self.primary + self.other
    }
}

/// The GTID wait on a caught-up replica (see the module docs): self-started runs with
/// replicas.
#[derive(Debug, Clone, Serialize)]
pub struct GtidWait {
    /// Which replica (`<database>/r0`), never a URL.
    pub replica: String,
    /// The GTID waited for (applied by the replica before the measurement).
    pub gtid: Option<String>,
    /// The target of the added cost at p50.
    pub target_p50_ms: f64,
    pub levels: Vec<GtidWaitLevel>,
    /// Why the measurement did not run or stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The GTID wait at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct GtidWaitLevel {
    pub concurrency: usize,
    /// (a) point reads alone.
    pub reads: u64,
    pub read_p50_ms: f64,
    pub read_p99_ms: f64,
    /// (b) `MASTER_GTID_WAIT`, then the same read.
    pub waited_reads: u64,
    pub waited_read_p50_ms: f64,
    pub waited_read_p99_ms: f64,
    /// The wait alone, within (b).
    pub wait_p50_ms: f64,
    pub wait_p99_ms: f64,
    /// What the wait adds: (b) − (a) at p50 and at p99.
    pub added_p50_ms: f64,
    pub added_p99_ms: f64,
    /// Waits that timed out (none on a caught-up replica).
    pub timeouts: u64,
    /// Reads that found no order (none: the orders were applied).
    pub missing: u64,
}

impl GtidWaitLevel {
    fn new(
        concurrency: usize,
        read: &Histogram<u64>,
        waited: &Histogram<u64>,
        wait: &Histogram<u64>,
        timeouts: u64,
        missing: u64,
    ) -> GtidWaitLevel {
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        // In whole microseconds, as the histograms hold them.
        let added =
            |q: f64| (waited.value_at_quantile(q) as i64 - read.value_at_quantile(q) as i64) as f64 / 1000.0;
        GtidWaitLevel {
            concurrency,
            reads: read.len(),
            read_p50_ms: ms(read, 0.5),
            read_p99_ms: ms(read, 0.99),
            waited_reads: waited.len(),
            waited_read_p50_ms: ms(waited, 0.5),
            waited_read_p99_ms: ms(waited, 0.99),
            wait_p50_ms: ms(wait, 0.5),
            wait_p99_ms: ms(wait, 0.99),
            added_p50_ms: added(0.5),
            added_p99_ms: added(0.99),
            timeouts,
            missing,
        }
    }
}

/// The added cost of the GTID wait the issue aims for, at p50.
const GTID_WAIT_TARGET_P50_MS: f64 = 1.0;

/// Throughput and latency of one phase.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseStats {
    /// Operations that completed (answered, or refused as the business demands); errors
    /// are not counted here.
    pub ops: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Unexpected failures by code (problem `code`, `http_NNN` or `transport`).
    pub errors: BTreeMap<String, u64>,
    /// Expected business refusals by code (`out_of_stock` in a flash sale).
    pub refused: BTreeMap<String, u64>,
    /// `create` only: transactions committed to the binary log over every server during the
    /// phase, per order created (refusals and errors excluded). Background work of the
    /// service (lease renewals, the sweeper) is counted too; it is a few commits in 10 s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commits_per_create: Option<f64>,
    /// `create` only: what the servers counted during the phase, per order created (the
    /// service's background work included, as for `commits_per_create`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_create: Option<PerCreate>,
    /// Each run's ops/s, in the order they ran, when the phase ran more than once (the two
    /// halves of an ABBA comparison); `ops_per_sec` is their mean.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs_ops_per_sec: Vec<f64>,
}

impl PhaseStats {
    /// One phase's figures from its runs: ops/s is the mean of the runs' ops/s (they ran for
    /// the same time, or read the same number of orders), latency comes from their merged
    /// histogram, counts and commits are summed.
    pub fn from_runs(runs: &[&Sample]) -> PhaseStats {
        let mut hist = new_histogram();
        let mut errors = BTreeMap::new();
        let mut refused = BTreeMap::new();
        for r in runs {
            let _ = hist.add(&r.hist);
            add_counts(&mut errors, &r.errors);
            add_counts(&mut refused, &r.refused);
        }
        let rates: Vec<f64> = runs.iter().map(|r| r.ops_per_sec()).collect();
        let created: u64 = runs
            .iter()
            .map(|r| r.hist.len() - r.refused.values().sum::<u64>())
            .sum();
        let commits: Option<u64> = runs.iter().map(|r| r.commits).sum();
        let counted: Option<Vec<ServerCounters>> = runs.iter().map(|r| r.counters).collect();
        let per_create = counted.filter(|_| created > 0).map(|c| {
            let sum = c.iter().fold(ServerCounters::default(), |a, b| a.plus(b));
            sum.per(created)
        });
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        PhaseStats {
            ops: hist.len(),
            seconds: runs.iter().map(|r| r.seconds).sum(),
            ops_per_sec: rates.iter().sum::<f64>() / rates.len().max(1) as f64,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            errors,
            refused,
            commits_per_create: commits.filter(|_| created > 0).map(|c| c as f64 / created as f64),
            per_create,
            runs_ops_per_sec: if rates.len() > 1 { rates } else { Vec::new() },
        }
    }
}

/// What one timed run measured, histogram included, so that the runs of one phase merge.
pub struct Sample {
    /// Latency of every completed operation, in microseconds.
    pub hist: Histogram<u64>,
    /// The same, of the operations that succeeded only ([`Outcome::Ok`]).
    pub ok_hist: Histogram<u64>,
    /// The same, of the refused ones only ([`Outcome::Refused`]: a sold-out flash sale's 409
    /// `out_of_stock`).
    pub refused_hist: Histogram<u64>,
    /// From the start of the first refused operation to the end of the last (0 without any):
    /// the time the refusals were answered in.
    pub refused_seconds: f64,
    pub seconds: f64,
    pub errors: BTreeMap<String, u64>,
    pub refused: BTreeMap<String, u64>,
    /// `create` only: transactions committed to the binary log over every server during the
    /// run (`None` when not measured).
    pub commits: Option<u64>,
    /// `create` only: the servers' counters over the run (`None` when not measured).
    pub counters: Option<ServerCounters>,
}

/// Counters of the servers' global status, summed over every server: how much a phase asked
/// of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerCounters {
    /// `Questions`: statements the clients sent (each statement of a batch counts).
    pub statements: u64,
    /// `Com_admin_commands`: pings and other admin commands (round trips with no statement).
    pub admin_commands: u64,
    /// `Binlog_commits`: transactions written to the binary log.
    pub binlog_commits: u64,
    /// `Binlog_group_commits`: binary log group commits (with `sync_binlog=1`, one fsync each).
    pub group_commits: u64,
    /// `Innodb_data_fsyncs`: InnoDB's fsyncs (the redo log's among them).
    pub innodb_fsyncs: u64,
}

impl ServerCounters {
    pub const NAMES: [&'static str; 5] = [
        "Questions",
        "Com_admin_commands",
        "Binlog_commits",
        "Binlog_group_commits",
        "Innodb_data_fsyncs",
    ];

    pub fn set(&mut self, name: &str, value: u64) {
        match name {
            "Questions" => self.statements = value,
            "Com_admin_commands" => self.admin_commands = value,
            "Binlog_commits" => self.binlog_commits = value,
            "Binlog_group_commits" => self.group_commits = value,
            "Innodb_data_fsyncs" => self.innodb_fsyncs = value,
            _ => {}
        }
    }

    pub fn plus(&self, o: &ServerCounters) -> ServerCounters {
        ServerCounters {
            statements: self.statements + o.statements,
            admin_commands: self.admin_commands + o.admin_commands,
            binlog_commits: self.binlog_commits + o.binlog_commits,
            group_commits: self.group_commits + o.group_commits,
            innodb_fsyncs: self.innodb_fsyncs + o.innodb_fsyncs,
        }
    }

    pub fn since(&self, before: &ServerCounters) -> ServerCounters {
        ServerCounters {
            statements: self.statements.saturating_sub(before.statements),
            admin_commands: self.admin_commands.saturating_sub(before.admin_commands),
            binlog_commits: self.binlog_commits.saturating_sub(before.binlog_commits),
            group_commits: self.group_commits.saturating_sub(before.group_commits),
            innodb_fsyncs: self.innodb_fsyncs.saturating_sub(before.innodb_fsyncs),
        }
    }

    fn per(&self, created: u64) -> PerCreate {
        let n = created as f64;
        PerCreate {
            statements: self.statements as f64 / n,
            admin_commands: self.admin_commands as f64 / n,
            binlog_commits: self.binlog_commits as f64 / n,
            group_commits: self.group_commits as f64 / n,
            commits_per_group_commit: self.binlog_commits as f64 / (self.group_commits.max(1)) as f64,
            innodb_fsyncs: self.innodb_fsyncs as f64 / n,
        }
    }
}

/// [`ServerCounters`] per order created.
#[derive(Debug, Clone, Serialize)]
pub struct PerCreate {
    pub statements: f64,
    pub admin_commands: f64,
    pub binlog_commits: f64,
    pub group_commits: f64,
    pub commits_per_group_commit: f64,
    pub innodb_fsyncs: f64,
}

impl PerCreate {
    fn cell(&self) -> String {
        format!(
            "{:.1} statements, {:.2} pings, {:.2} binlog commits ({:.2} group commits, {:.1} per group), {:.2} InnoDB fsyncs",
            self.statements,
            self.admin_commands,
            self.binlog_commits,
            self.group_commits,
            self.commits_per_group_commit,
            self.innodb_fsyncs
        )
    }
}

impl Sample {
    pub fn ops_per_sec(&self) -> f64 {
        self.hist.len() as f64 / self.seconds.max(0.001)
    }
}

/// Microseconds, up to a minute, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn add_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// One side of the flash comparison: a service phase of `flash`, by outcome.
#[derive(Debug, Clone, Serialize)]
pub struct FlashSide {
    pub phase: Phase,
    /// Whether the instance answered at the Redis gate (its cache on); without, every buyer
    /// took the database path.
    pub gate: bool,
    /// The sale it sold (`None`: no sale was made for it).
    pub sale_id: Option<String>,
    /// The database path's bound per sale on the instance (`flash.fallback_concurrency`).
    pub fallback_concurrency: usize,
    /// Requests sent: answered and failed.
    pub requests: u64,
    pub seconds: f64,
    /// Answered: 201 and 409 `out_of_stock`.
    pub answered: u64,
    pub answered_per_sec: f64,
    /// 409 `out_of_stock`.
    pub sold_out: u64,
    /// From the start of the first sold-out request to the end of the last.
    pub sold_out_seconds: f64,
    /// `sold_out / sold_out_seconds`: sold-out answers per second while the sale was sold out.
    pub sold_out_per_sec: f64,
    pub sold_out_p50_ms: f64,
    pub sold_out_p99_ms: f64,
    /// 201.
    pub created: u64,
    pub created_p50_ms: f64,
    pub created_p99_ms: f64,
    /// Unexpected failures by code.
    pub errors: BTreeMap<String, u64>,
}

impl FlashSide {
    fn new(
        phase: Phase,
        gate: bool,
        sale_id: Option<String>,
        fallback_concurrency: usize,
        runs: &[&Sample],
    ) -> FlashSide {
        let (mut ok, mut refused) = (new_histogram(), new_histogram());
        let mut errors = BTreeMap::new();
        for r in runs {
            let _ = ok.add(&r.ok_hist);
            let _ = refused.add(&r.refused_hist);
            add_counts(&mut errors, &r.errors);
        }
        let seconds: f64 = runs.iter().map(|r| r.seconds).sum();
        let sold_out_seconds: f64 = runs.iter().map(|r| r.refused_seconds).sum();
        let answered = ok.len() + refused.len();
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        FlashSide {
            phase,
            gate,
            sale_id,
            fallback_concurrency,
            requests: answered + errors.values().sum::<u64>(),
            seconds,
            answered,
            answered_per_sec: answered as f64 / seconds.max(0.001),
            sold_out: refused.len(),
            sold_out_seconds,
            sold_out_per_sec: if refused.is_empty() {
                0.0
            } else {
                refused.len() as f64 / sold_out_seconds.max(0.000_001)
            },
            sold_out_p50_ms: ms(&refused, 0.5),
            sold_out_p99_ms: ms(&refused, 0.99),
            created: ok.len(),
            created_p50_ms: ms(&ok, 0.5),
            created_p99_ms: ms(&ok, 0.99),
            errors,
        }
    }
}

/// `flash`: the service's sale (behind the gate when it caches) against the cache-off twin's
/// (the database path), same run, same clients, same demand (see the module docs).
#[derive(Debug, Clone, Serialize)]
pub struct FlashGate {
    pub concurrency: usize,
    /// Units of each sale.
    pub units: i64,
    /// Requests per side: ten per unit.
    pub demand: u64,
    pub service: FlashSide,
    /// The cache-off twin (self-started runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_only: Option<FlashSide>,
    /// `service.sold_out_per_sec / database_only.sold_out_per_sec`, when the service has the
    /// gate and both sides answered sold-out buyers.
    pub sold_out_ratio: Option<f64>,
    pub sold_out_ratio_target: f64,
    pub sold_out_ratio_met: Option<bool>,
    /// `service.created_p99_ms / database_only.created_p99_ms`, when the service has the gate
    /// and both sides sold.
    pub created_p99_ratio: Option<f64>,
    pub created_p99_ratio_target: f64,
    pub created_p99_ratio_met: Option<bool>,
}

impl FlashGate {
    fn new(w: &Workload, opts: &BenchOptions, runs: &[(Phase, Sample)]) -> Option<FlashGate> {
        let sales = w.flash_sales();
        let side = |phase: Phase, fallback: usize| {
            let samples: Vec<&Sample> = runs.iter().filter(|(p, _)| *p == phase).map(|(_, s)| s).collect();
            (!samples.is_empty()).then(|| {
                let sale = sales.iter().find(|s| s.phase == phase).map(|s| s.sale_id.clone());
                FlashSide::new(phase, w.has_gate(phase), sale, fallback, &samples)
            })
        };
        let service = side(Phase::Service, w.service_fallback_concurrency())?;
        let database_only = side(Phase::ServiceCacheOff, twin_fallback_concurrency(opts));
        let compared = database_only.as_ref().filter(|_| service.gate);
        let sold_out_ratio = compared
            .filter(|d| d.sold_out > 0 && service.sold_out > 0)
            .map(|d| service.sold_out_per_sec / d.sold_out_per_sec.max(f64::MIN_POSITIVE));
        let created_p99_ratio = compared
            .filter(|d| d.created > 0 && service.created > 0)
            .map(|d| service.created_p99_ms / d.created_p99_ms.max(0.001));
        Some(FlashGate {
            concurrency: opts.concurrency,
            units: opts.flash_stock,
            demand: 10 * opts.flash_stock as u64,
            service,
            database_only,
            sold_out_ratio,
            sold_out_ratio_target: FLASH_SOLD_OUT_RATIO_TARGET,
            sold_out_ratio_met: sold_out_ratio.map(|r| r >= FLASH_SOLD_OUT_RATIO_TARGET),
            created_p99_ratio,
            created_p99_ratio_target: FLASH_CREATED_P99_RATIO_TARGET,
            created_p99_ratio_met: created_p99_ratio.map(|r| r <= FLASH_CREATED_P99_RATIO_TARGET),
        })
    }
}

/// `cart`: the flusher's rows per second against the same rows upserted raw.
#[derive(Debug, Clone, Serialize)]
pub struct CartFlush {
    /// Carts one `flush_once` wrote.
    pub rows: usize,
    /// Its round trips of dirty sets (one batch per bucket each).
    pub rounds: usize,
    pub flusher_secs: f64,
    pub flusher_rows_per_sec: f64,
    /// Rows of the raw upsert (the flusher's statement, its batch size, issued directly).
    pub raw_rows: usize,
    pub raw_secs: f64,
    pub raw_rows_per_sec: f64,
    /// `flusher_rows_per_sec / raw_rows_per_sec`.
    pub ratio: f64,
}

/// The cart updates' target of the issue: at least this share of raw `HSET` + `SADD`.
const CART_RATIO_TARGET: f64 = 0.5;

/// One scenario's line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub scenario: Scenario,
    /// The runs in the order they ran (a phase twice: the halves of an ABBA comparison).
    pub schedule: Vec<Phase>,
    pub service: PhaseStats,
    /// What `raw` issued.
    pub baseline: Baseline,
    pub raw: PhaseStats,
    /// `service.ops_per_sec / raw.ops_per_sec`.
    pub ratio: f64,
    /// The service phase again, against the cache-off instance (self-started runs; `create`,
    /// `get-cold`, `list`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_cache_off: Option<PhaseStats>,
    /// `service.ops_per_sec / service_cache_off.ops_per_sec`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_cache_off: Option<f64>,
    /// The service phase again, against the primary-only instance (self-started runs with
    /// replicas; `get-cold`, `list`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_primary_only: Option<PhaseStats>,
    /// `service_cache_off.ops_per_sec / service_primary_only.ops_per_sec`: reading replicas
    /// against reading primaries, no cache on either side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_primary_only: Option<f64>,
    /// `get-cold` and `list`: the answers of each service phase by `Served-By`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub served_by: Vec<ServedBy>,
    /// `create` only: `1 - vs_cache_off`, the share of create throughput the cache's
    /// invalidation costs (negative: the cache-on instance was faster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalidation_cost: Option<f64>,
    /// `get-hot` with the Redis baseline: the same `GET`s with every client on one shared
    /// multiplexed connection (pipelined across clients), the figure before `raw` had a
    /// connection per client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_pipelined: Option<PhaseStats>,
    /// `service.ops_per_sec / raw_pipelined.ops_per_sec`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_pipelined: Option<f64>,
    /// `get-hot`, self-started: the service's read path called in process (no HTTP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_process: Option<PhaseStats>,
    /// `in_process.ops_per_sec / raw.ops_per_sec`: what the cache layer costs over a GET.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_process_vs_raw: Option<f64>,
    /// `in_process.ops_per_sec / raw_pipelined.ops_per_sec`: the same, against the GETs in the
    /// service's own connection shape (its cache shares one multiplexed connection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_process_vs_pipelined: Option<f64>,
    /// `service.ops_per_sec / in_process.ops_per_sec`: what HTTP costs over the read path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_vs_in_process: Option<f64>,
    /// `get-hot` with the Redis baseline: the SQL read, the baseline before the cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_sql: Option<PhaseStats>,
    /// `service.ops_per_sec / raw_sql.ops_per_sec`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_sql: Option<f64>,
    /// `get-hot` with a cache: Redis's hits and misses during the service phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hit_ratio: Option<HitRatio>,
    /// `flash`: the service's sale against the cache-off twin's, by outcome.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flash_gate: Option<FlashGate>,
    /// `cart`: the flusher against a raw batched upsert.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cart_flush: Option<CartFlush>,
    /// `create`: the floor (see [`Phase::Floor`]) and service / floor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor: Option<PhaseStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_floor: Option<f64>,
    /// `get-hot`: the HTTP floor (see [`Phase::HttpFloor`]) and service / HTTP floor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_floor: Option<PhaseStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_http_floor: Option<f64>,
    pub checks: Vec<Check>,
}

impl ScenarioResult {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

/// Runs `op` from `concurrency` closed-loop tasks until `duration` passes or `max_ops`
/// operations were started. `op` gets the number of its client (`0..concurrency`, so that a
/// client can keep a connection of its own) and of the operation.
pub async fn drive<F, Fut>(
    label: &str,
    concurrency: usize,
    duration: Duration,
    max_ops: Option<u64>,
    progress: bool,
    op: F,
) -> Sample
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Outcome> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let bar = progress.then(|| {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix:>22} {elapsed:>4} {msg}")
                .unwrap_or(ProgressStyle::default_spinner()),
        );
        bar.set_prefix(label.to_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    });
    let ticker = bar.clone().map(|bar| {
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let n = done.load(Ordering::Relaxed);
                let secs = start.elapsed().as_secs_f64().max(0.001);
                bar.set_message(format!("{n} ops, {:.0} ops/s", n as f64 / secs));
            }
        })
    });
    let tasks: Vec<_> = (0..concurrency)
        .map(|client| {
            let (op, next, done) = (op.clone(), next.clone(), done.clone());
            tokio::spawn(async move {
                let mut hist = new_histogram();
                let (mut ok_hist, mut refused_hist) = (new_histogram(), new_histogram());
                let mut refused_span: Option<(Instant, Instant)> = None;
                let mut errors: BTreeMap<String, u64> = BTreeMap::new();
                let mut refused: BTreeMap<String, u64> = BTreeMap::new();
                loop {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if max_ops.is_some_and(|m| i >= m) {
                        break;
                    }
                    let t = Instant::now();
                    let outcome = op(client, i).await;
                    let ended = Instant::now();
                    let micros = (ended.duration_since(t).as_micros() as u64).clamp(1, 60_000_000);
                    // Failures are counted, not timed: a fast error is no throughput.
                    match outcome {
                        Outcome::Ok => {
                            let _ = hist.record(micros);
                            let _ = ok_hist.record(micros);
                        }
                        Outcome::Refused(code) => {
                            let _ = hist.record(micros);
                            let _ = refused_hist.record(micros);
                            refused_span = Some((refused_span.map_or(t, |(first, _)| first), ended));
                            *refused.entry(code).or_default() += 1;
                        }
                        Outcome::Error(code) => *errors.entry(code).or_default() += 1,
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                (hist, ok_hist, refused_hist, refused_span, errors, refused)
            })
        })
        .collect();
    let mut hist = new_histogram();
    let (mut ok_hist, mut refused_hist) = (new_histogram(), new_histogram());
    let mut refused_span: Option<(Instant, Instant)> = None;
    let mut errors = BTreeMap::new();
    let mut refused = BTreeMap::new();
    for t in tasks {
        let (h, ok, no, span, e, r) = match t.await {
            Ok(v) => v,
            // A panicking operation is a bug of the bench: let it end the run loudly.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => continue,
        };
        let _ = hist.add(&h);
        let _ = ok_hist.add(&ok);
        let _ = refused_hist.add(&no);
        if let Some((first, last)) = span {
            refused_span = Some(refused_span.map_or((first, last), |(a, b)| (a.min(first), b.max(last))));
        }
        add_counts(&mut errors, &e);
        add_counts(&mut refused, &r);
    }
    let seconds = start.elapsed().as_secs_f64();
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Sample {
        hist,
        ok_hist,
        refused_hist,
        refused_seconds: refused_span.map_or(0.0, |(first, last)| last.duration_since(first).as_secs_f64()),
        seconds,
        errors,
        refused,
        commits: None,
        counters: None,
    }
}

/// Runs the scenarios against a prepared workload (service running at its base URL).
pub async fn run_scenarios(w: Arc<Workload>, opts: &BenchOptions) -> anyhow::Result<Vec<ScenarioResult>> {
    let mut results = Vec::new();
    opts.validate()?;
    for &scenario in &opts.scenarios {
        // What the previous scenario left to the event stream (the relay, then the merchant
        // copy and the search index) runs in this process too: let it drain first, so that it
        // does not weigh on this scenario's phases.
        w.wait_outbox_drained(Duration::from_secs(120)).await;
        w.prepare(scenario, opts).await?;
        let schedule = w.schedule(scenario);
        let mut runs: Vec<(Phase, Sample)> = Vec::new();
        let mut lookups: Option<(u64, u64)> = None;
        for (slot, run) in schedule.iter().enumerate() {
            let phase = run.phase;
            // A flash sale runs until its whole demand has bought (or been refused), whatever
            // the duration; get-cold until the run has read its share of the orders once.
            let duration = opts.duration * run.halves / 2;
            let (max_ops, duration) = match scenario {
                Scenario::Flash => (
                    Some(10 * w.flash_units(slot, opts.flash_stock) as u64),
                    duration.max(FLASH_MAX_TIME),
                ),
                Scenario::GetCold => (Some(w.cold_share(slot).len() as u64), duration),
                _ => (None, duration),
            };
            let mut label = format!("{} {}", scenario.name(), phase.label());
            let times = schedule.iter().filter(|r| r.phase == phase).count();
            if times > 1 {
                let nth = schedule[..=slot].iter().filter(|r| r.phase == phase).count();
                label.push_str(&format!(" {nth}/{times}"));
            }
            let op_w = w.clone();
            let op = move |client, i| {
                let w = op_w.clone();
                async move { w.op(scenario, phase, slot, client, i).await }
            };
            // Hits and misses are counted around the service phases of get-hot and get-cold
            // only: warming and the raw GETs would count too.
            // get-cold's are counted too: they show the reads were misses.
            let count_hits = phase == Phase::Service
                && ((scenario == Scenario::GetHot && w.baseline(scenario) == Baseline::RedisGet)
                    || scenario == Scenario::GetCold);
            let keyspace_before = if count_hits { w.keyspace().await } else { None };
            // Commits are counted around the run, after the previous one's writes settled.
            let count_commits = scenario == Scenario::Create;
            let before = if count_commits {
                binlog_commits(&w).await
            } else {
                None
            };
            let counters_before = if count_commits {
                w.server_counters().await.ok()
            } else {
                None
            };
            let mut sample = drive(&label, opts.concurrency, duration, max_ops, opts.progress, op).await;
            if let Some(before) = keyspace_before {
                if let Some(after) = w.keyspace().await {
                    let (hits, misses) = lookups.get_or_insert((0, 0));
                    *hits += after.hits.saturating_sub(before.hits);
                    *misses += after.misses.saturating_sub(before.misses);
                }
            }
            let after = if count_commits {
                binlog_commits(&w).await
            } else {
                None
            };
            if let (Some(before), Some(after)) = (before, after) {
                sample.commits = Some(after.saturating_sub(before));
            }
            if let Some(before) = counters_before {
                sample.counters = w.server_counters().await.ok().map(|after| after.since(&before));
            }
            runs.push((phase, sample));
        }
        let served_by = w.take_served();
        let hit_ratio = lookups.map(|(hits, misses)| HitRatio {
            hits,
            misses,
            ratio: (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64),
        });
        let flash_gate = if scenario == Scenario::Flash {
            FlashGate::new(&w, opts, &runs)
        } else {
            None
        };
        let mut checks = w.check(scenario, opts).await?;
        let cart_flush = if scenario == Scenario::Cart {
            w.measure_cart_flush().await?
        } else {
            None
        };
        // Every run on its own: each half of an ABBA comparison must have done work.
        let per_run: Vec<(String, PhaseStats)> = runs
            .iter()
            .enumerate()
            .map(|(slot, (phase, sample))| {
                let label = if schedule.iter().filter(|r| r.phase == *phase).count() > 1 {
                    format!("{} (run {})", phase.label(), slot + 1)
                } else {
                    phase.label().to_owned()
                };
                (label, PhaseStats::from_runs(&[sample]))
            })
            .collect();
        checks.push(checks::phases_ran(
            &per_run.iter().map(|(l, s)| (l.as_str(), s)).collect::<Vec<_>>(),
        ));
        let take = |phase: Phase| {
            let samples: Vec<&Sample> = runs.iter().filter(|(p, _)| *p == phase).map(|(_, s)| s).collect();
            (!samples.is_empty()).then(|| PhaseStats::from_runs(&samples))
        };
        let service = take(Phase::Service).ok_or_else(|| anyhow::anyhow!("no service phase"))?;
        let raw = take(Phase::Raw).ok_or_else(|| anyhow::anyhow!("no raw phase"))?;
        let service_cache_off = take(Phase::ServiceCacheOff);
        let service_primary_only = take(Phase::ServicePrimaryOnly);
        let raw_pipelined = take(Phase::RawPipelined);
        let in_process = take(Phase::InProcess);
        let raw_sql = take(Phase::RawSql);
        let floor = take(Phase::Floor);
        let http_floor = take(Phase::HttpFloor);
        let per = |a: &PhaseStats, b: &PhaseStats| a.ops_per_sec / b.ops_per_sec.max(f64::MIN_POSITIVE);
        let vs_cache_off = service_cache_off.as_ref().map(|off| per(&service, off));
        // Replicas against primaries, both without a cache (see the module docs).
        let vs_primary_only = service_primary_only
            .as_ref()
            .zip(service_cache_off.as_ref())
            .map(|(p, off)| per(off, p));
        let result = ScenarioResult {
            scenario,
            schedule: schedule.iter().map(|r| r.phase).collect(),
            ratio: per(&service, &raw),
            baseline: w.baseline(scenario),
            invalidation_cost: vs_cache_off
                .filter(|_| scenario == Scenario::Create)
                .map(|r| 1.0 - r),
            vs_cache_off,
            ratio_pipelined: raw_pipelined.as_ref().map(|p| per(&service, p)),
            in_process_vs_raw: in_process.as_ref().map(|p| per(p, &raw)),
            in_process_vs_pipelined: in_process
                .as_ref()
                .zip(raw_pipelined.as_ref())
                .map(|(p, pipelined)| per(p, pipelined)),
            service_vs_in_process: in_process.as_ref().map(|p| per(&service, p)),
            ratio_sql: raw_sql.as_ref().map(|sql| per(&service, sql)),
            service_cache_off,
            service_primary_only,
            vs_primary_only,
            served_by,
            raw_pipelined,
            in_process,
            raw_sql,
            hit_ratio,
            flash_gate,
            cart_flush,
            ratio_floor: floor.as_ref().map(|f| per(&service, f)),
            floor,
            ratio_http_floor: http_floor.as_ref().map(|f| per(&service, f)),
            http_floor,
            service,
            raw,
            checks,
        };
        if opts.progress {
            eprintln!("{}", summary_line(&result));
        }
        results.push(result);
    }
    Ok(results)
}

/// `Binlog_commits` summed over the servers; `None` (and a warning) when it cannot be had.
async fn binlog_commits(w: &Workload) -> Option<u64> {
    match w.binlog_commits().await {
        Ok(Some(n)) => Some(n),
        Ok(None) => {
            tracing::warn!("a server has its binary log off: commits per create not measured");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read Binlog_commits: commits per create not measured");
            None
        }
    }
}

fn summary_line(r: &ScenarioResult) -> String {
    let mut line = format!(
        "{:<10} service {:>8.0} ops/s  raw ({}) {:>8.0} ops/s  ratio {:.2}  checks {}",
        r.scenario.name(),
        r.service.ops_per_sec,
        r.baseline.name(),
        r.raw.ops_per_sec,
        r.ratio,
        if r.passed() { "ok" } else { "FAILED" }
    );
    if let (Some(off), Some(vs)) = (&r.service_cache_off, r.vs_cache_off) {
        line.push_str(&format!(
            "  cache off {:.0} ops/s  vs cache off {vs:.2}",
            off.ops_per_sec
        ));
    }
    if let (Some(p), Some(vs)) = (&r.service_primary_only, r.vs_primary_only) {
        line.push_str(&format!(
            "  primary only {:.0} ops/s  vs primary only {vs:.2}",
            p.ops_per_sec
        ));
    }
    if let Some(s) = r.served_by.iter().find(|s| s.phase == Phase::Service) {
        line.push_str(&format!("  served by {}", served_cell(s)));
    }
    if let Some(cost) = r.invalidation_cost {
        line.push_str(&format!("  invalidation cost {}", percent(cost)));
    }
    if let (Some(p), Some(ratio)) = (&r.raw_pipelined, r.ratio_pipelined) {
        line.push_str(&format!(
            "  pipelined GET {:.0} ops/s  service / pipelined {ratio:.2}",
            p.ops_per_sec
        ));
    }
    if let (Some(p), Some(ratio)) = (&r.in_process, r.in_process_vs_raw) {
        line.push_str(&format!(
            "  in process {:.0} ops/s  in process / raw {ratio:.2}",
            p.ops_per_sec
        ));
    }
    if let (Some(sql), Some(ratio)) = (&r.raw_sql, r.ratio_sql) {
        line.push_str(&format!(
            "  raw SQL {:.0} ops/s  service / raw SQL {ratio:.2}",
            sql.ops_per_sec
        ));
    }
    if let Some(h) = &r.hit_ratio {
        line.push_str(&format!("  hit ratio {}", hit_ratio_cell(h)));
    }
    if r.scenario == Scenario::Create {
        line.push_str(&format!("  commits/create {}", commits_cell(r)));
    }
    if let (Some(f), Some(ratio)) = (&r.floor, r.ratio_floor) {
        line.push_str(&format!(
            "  floor {:.0} ops/s (p99 {:.1} ms)  service / floor {ratio:.2}",
            f.ops_per_sec, f.p99_ms
        ));
    }
    if let (Some(f), Some(ratio)) = (&r.http_floor, r.ratio_http_floor) {
        line.push_str(&format!(
            "  HTTP floor {:.0} ops/s (p99 {:.1} ms)  service / HTTP floor {ratio:.2}",
            f.ops_per_sec, f.p99_ms
        ));
    }
    for (label, stats) in [
        ("service", Some(&r.service)),
        ("raw", Some(&r.raw)),
        ("floor", r.floor.as_ref()),
    ] {
        if let Some(per) = stats.and_then(|s| s.per_create.as_ref()) {
            line.push_str(&format!("\n    per create, {label}: {}", per.cell()));
        }
    }
    if let Some(f) = &r.flash_gate {
        line.push_str(&format!(
            "  sold-out/s {:.0} (p99 {:.2} ms)",
            f.service.sold_out_per_sec, f.service.sold_out_p99_ms
        ));
        if let Some(d) = &f.database_only {
            line.push_str(&format!(
                "  database only {:.0} (p99 {:.2} ms)",
                d.sold_out_per_sec, d.sold_out_p99_ms
            ));
        }
        if let Some(ratio) = f.sold_out_ratio {
            line.push_str(&format!("  gate / database only {ratio:.1}x"));
        }
    }
    line
}

/// The halves of the service and its twins in the order they ran, `on 1801, off 1535, off
/// 1540, on 1790` (ops/s; with a primary-only twin `service …, cache off …, primary only …`);
/// `None` when no twin ran beside the service in halves.
fn abba_runs(r: &ScenarioResult) -> Option<String> {
    let twins = [&r.service_cache_off, &r.service_primary_only];
    if r.service.runs_ops_per_sec.is_empty()
        || !twins
            .iter()
            .any(|t| t.as_ref().is_some_and(|t| !t.runs_ops_per_sec.is_empty()))
    {
        return None;
    }
    let primary_only = r.service_primary_only.is_some();
    let runs_of = |p: &Option<PhaseStats>| p.as_ref().map(|p| p.runs_ops_per_sec.clone()).unwrap_or_default();
    let mut on_runs = r.service.runs_ops_per_sec.iter();
    let (off, only) = (runs_of(&r.service_cache_off), runs_of(&r.service_primary_only));
    let (mut off_runs, mut only_runs) = (off.iter(), only.iter());
    let (on, off) = if primary_only {
        ("service", "cache off")
    } else {
        ("on", "off")
    };
    let runs: Vec<String> = r
        .schedule
        .iter()
        .filter_map(|phase| match phase {
            Phase::Service => on_runs.next().map(|v| format!("{on} {v:.0}")),
            Phase::ServiceCacheOff => off_runs.next().map(|v| format!("{off} {v:.0}")),
            Phase::ServicePrimaryOnly => only_runs.next().map(|v| format!("primary only {v:.0}")),
            _ => None,
        })
        .collect();
    Some(runs.join(", "))
}

/// `replica 4 990 / primary 10 / cache 0 (99.8 % replica)`.
fn served_cell(s: &ServedBy) -> String {
    let mut cell = format!(
        "replica {} / primary {} / cache {}",
        s.replica, s.primary, s.cache
    );
    if s.other > 0 {
        cell.push_str(&format!(" / unnamed {}", s.other));
    }
    if let Some(share) = s.replica_share {
        cell.push_str(&format!(" ({} replica)", percent(share)));
    }
    cell
}

/// `**0.82**`, or `–` when the baseline completed nothing (the ratio means nothing then).
fn ratio_cell(ratio: f64, baseline: &PhaseStats) -> String {
    if baseline.ops == 0 || !ratio.is_finite() {
        "–".into()
    } else {
        format!("**{ratio:.2}**")
    }
}

/// `12.3 %`.
fn percent(share: f64) -> String {
    format!("{:.1} %", share * 100.0)
}

/// `99.9 % (9 990 / 10 000)`, or `no lookups`.
fn hit_ratio_cell(h: &HitRatio) -> String {
    match h.ratio {
        Some(r) => format!("{} ({} / {})", percent(r), h.hits, h.hits + h.misses),
        None => "no lookups".into(),
    }
}

fn codes(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "0".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `service / raw` commits per create (`service / cache off / raw` with a cache-off phase),
/// `–` where not measured.
fn commits_cell(r: &ScenarioResult) -> String {
    let f = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.2}"));
    let (a, b) = (r.service.commits_per_create, r.raw.commits_per_create);
    match &r.service_cache_off {
        Some(off) if a.is_some() || b.is_some() || off.commits_per_create.is_some() => {
            format!("{} / {} / {}", f(a), f(off.commits_per_create), f(b))
        }
        _ if a.is_none() && b.is_none() => "–".into(),
        _ => format!("{} / {}", f(a), f(b)),
    }
}

/// The Markdown table of a run, with notes under it for the figures that fit no column (the
/// second baseline of get-hot, the invalidation cost of create).
pub fn markdown(results: &[ScenarioResult], opts: &BenchOptions) -> String {
    let dash = || "–".to_owned();
    let abba = results.iter().any(|r| abba_runs(r).is_some());
    let primary_only = results.iter().any(|r| r.service_primary_only.is_some());
    let mut s = format!(
        "{} s per phase, {} concurrent clients.{}\n\n\
         | scenario | service ops/s | p50 ms | p99 ms | p99.9 ms | errors | baseline | raw ops/s | raw p50 ms | raw p99 ms | raw errors | service / raw | cache off ops/s | cache off p99 ms | vs cache off | hit ratio | commits / create (service / cache off / raw) | checks |\n\
         |---|---:|---:|---:|---:|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|\n",
        opts.duration.as_secs_f64(),
        opts.concurrency,
        if abba {
            format!(
                " Cache on against off{}: run as halves ({} s each; get-cold: an equal share of \
                 the orders each) in the order {}; each side's ops/s is the mean of its two \
                 halves, its latency from their merged histograms.",
                if primary_only {
                    ", replicas against primary only: the service and its two twins"
                } else {
                    ": the service and its cache-off twin"
                },
                opts.duration.as_secs_f64() / 2.0,
                if primary_only {
                    "service, cache off, primary only, primary only, cache off, service \
                     (create: on, off, off, on)"
                } else {
                    "on, off, off, on"
                },
            )
        } else {
            String::new()
        }
    );
    let mut notes = Vec::new();
    for r in results {
        let (a, b) = (&r.service, &r.raw);
        let mut errors = codes(&a.errors);
        if !a.refused.is_empty() {
            errors.push_str(&format!(" (refused {})", codes(&a.refused)));
        }
        if let Some(off) = r.service_cache_off.as_ref().filter(|off| !off.errors.is_empty()) {
            errors.push_str(&format!(" (cache off {})", codes(&off.errors)));
        }
        let failed: Vec<_> = r
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.as_str())
            .collect();
        s.push_str(&format!(
            "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {:.0} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.scenario.name(),
            a.ops_per_sec,
            a.p50_ms,
            a.p99_ms,
            a.p999_ms,
            errors,
            r.baseline.name(),
            b.ops_per_sec,
            b.p50_ms,
            b.p99_ms,
            codes(&b.errors),
            ratio_cell(r.ratio, b),
            r.service_cache_off
                .as_ref()
                .map_or_else(dash, |off| format!("{:.0}", off.ops_per_sec)),
            r.service_cache_off
                .as_ref()
                .map_or_else(dash, |off| format!("{:.1}", off.p99_ms)),
            r.vs_cache_off.map_or_else(dash, |v| format!("**{v:.2}**")),
            r.hit_ratio.as_ref().map_or_else(dash, hit_ratio_cell),
            commits_cell(r),
            if failed.is_empty() {
                format!("{} passed", r.checks.len())
            } else {
                format!("FAILED: {}", failed.join(", "))
            }
        ));
        if let Some(runs) = abba_runs(r) {
            notes.push(format!(
                "- {}: {} runs in order: {runs} ops/s.",
                r.scenario.name(),
                if r.service_primary_only.is_some() {
                    "service / cache off / primary only"
                } else {
                    "cache on / off"
                }
            ));
        }
        if let (Some(f), Some(ratio)) = (&r.floor, r.ratio_floor) {
            notes.push(format!(
                "- {}: against the floor (the least work that keeps a create's guarantees, raw): \
                 **{ratio:.2}** (floor {:.0} ops/s, p50 {:.1} ms, p99 {:.1} ms).",
                r.scenario.name(),
                f.ops_per_sec,
                f.p50_ms,
                f.p99_ms,
            ));
        }
        if let (Some(f), Some(ratio)) = (&r.http_floor, r.ratio_http_floor) {
            notes.push(format!(
                "- {}: against the HTTP floor (axum, the JWT check, one Redis GET, the cached \
                 bytes as they are, in this process): **{ratio:.2}** (floor {:.0} ops/s, p50 \
                 {:.1} ms, p99 {:.1} ms).",
                r.scenario.name(),
                f.ops_per_sec,
                f.p50_ms,
                f.p99_ms,
            ));
        }
        for (label, stats) in [
            ("service", Some(&r.service)),
            ("raw", Some(&r.raw)),
            ("floor", r.floor.as_ref()),
        ] {
            if let Some(per) = stats.and_then(|s| s.per_create.as_ref()) {
                notes.push(format!(
                    "- {}: per create, {label}: {}.",
                    r.scenario.name(),
                    per.cell()
                ));
            }
        }
        if let Some(cost) = r.invalidation_cost {
            notes.push(format!(
                "- {}: the cache's invalidation costs **{}** of create throughput \
                 (cache on {:.0} ops/s, off {:.0} ops/s).",
                r.scenario.name(),
                percent(cost),
                a.ops_per_sec,
                r.service_cache_off.as_ref().map_or(0.0, |off| off.ops_per_sec),
            ));
        }
        if r.baseline == Baseline::RedisGet {
            notes.push(format!(
                "- {}: the Redis GET baseline gives each of the {c} clients a connection of its \
                 own, one GET at a time: {c} requests in flight over {c} connections, as the \
                 service's {c} keep-alive HTTP connections.",
                r.scenario.name(),
                c = opts.concurrency,
            ));
        }
        if let (Some(p), Some(ratio)) = (&r.raw_pipelined, r.ratio_pipelined) {
            notes.push(format!(
                "- {}: pipelined Redis GET (the {} clients share one multiplexed connection): \
                 {:.0} ops/s (p50 {:.1} ms, p99 {:.1} ms, errors {}), service / pipelined \
                 GET **{ratio:.2}**.",
                r.scenario.name(),
                opts.concurrency,
                p.ops_per_sec,
                p.p50_ms,
                p.p99_ms,
                codes(&p.errors),
            ));
        }
        if r.baseline == Baseline::RedisCart {
            notes.push(format!(
                "- {}: the Redis baseline is `HSET` of the line and `SADD` of the buyer to a \
                 dirty set in one round trip, each of the {} clients on a connection of its own; \
                 the service's update is one Lua script (line limit, version, dirty score) plus \
                 HTTP, the JWT and the product's existence (cached in process). Target \
                 service / raw ≥ {CART_RATIO_TARGET}: **{}**.",
                r.scenario.name(),
                opts.concurrency,
                if r.ratio >= CART_RATIO_TARGET {
                    "met"
                } else {
                    "not met"
                },
            ));
        }
        if let Some(f) = &r.cart_flush {
            notes.push(format!(
                "- {}: flusher: {} dirty carts written by one `flush_once` ({} rounds) in {:.3} s, \
                 **{:.0} rows/s**; raw batched upsert (the flusher's statement, batches of 500, \
                 issued directly): {} rows in {:.3} s, **{:.0} rows/s**; flusher / raw **{:.2}**.",
                r.scenario.name(),
                f.rows,
                f.rounds,
                f.flusher_secs,
                f.flusher_rows_per_sec,
                f.raw_rows,
                f.raw_secs,
                f.raw_rows_per_sec,
                f.ratio,
            ));
        }
        if let (Some(p), Some(ratio), Some(http)) = (
            r.in_process.as_ref().filter(|_| r.scenario == Scenario::Cart),
            r.in_process_vs_raw,
            r.service_vs_in_process,
        ) {
            notes.push(format!(
                "- {}: in process (`CartService::set`, no HTTP, no JSON, no JWT): {:.0} ops/s \
                 (p50 {:.1} ms, p99 {:.1} ms, errors {}), in process / raw **{ratio:.2}**; \
                 service / in process **{http:.2}**.",
                r.scenario.name(),
                p.ops_per_sec,
                p.p50_ms,
                p.p99_ms,
                codes(&p.errors),
            ));
        }
        if let (Some(p), Some(ratio), Some(http)) = (
            r.in_process.as_ref().filter(|_| r.scenario != Scenario::Cart),
            r.in_process_vs_raw,
            r.service_vs_in_process,
        ) {
            notes.push(format!(
                "- {}: in process (the service's read path through the cache, \
                 `OrderService::get`, no HTTP, no JSON): {:.0} ops/s (p50 {:.1} ms, p99 {:.1} ms, \
                 errors {}), in process / raw GET **{ratio:.2}**{}; service / in process \
                 **{http:.2}**.",
                r.scenario.name(),
                p.ops_per_sec,
                p.p50_ms,
                p.p99_ms,
                codes(&p.errors),
                r.in_process_vs_pipelined.map_or_else(String::new, |v| format!(
                    ", in process / pipelined GET **{v:.2}** (the service's cache shares one \
                     multiplexed connection, so its GETs pipeline like that baseline's)"
                )),
            ));
        }
        if let (Some(sql), Some(ratio)) = (&r.raw_sql, r.ratio_sql) {
            notes.push(format!(
                "- {}: against the SQL read instead of the Redis GET: raw SQL {:.0} ops/s \
                 (p50 {:.1} ms, p99 {:.1} ms, errors {}), service / raw SQL **{ratio:.2}**.",
                r.scenario.name(),
                sql.ops_per_sec,
                sql.p50_ms,
                sql.p99_ms,
                codes(&sql.errors),
            ));
        }
    }
    let cache_scenarios = [Scenario::Create, Scenario::GetCold, Scenario::List];
    if results
        .iter()
        .any(|r| cache_scenarios.contains(&r.scenario) && r.service_cache_off.is_none())
    {
        notes.push(
            "- No cache-off instance ran (only a self-started bench starts one): no `vs cache off`.".into(),
        );
    }
    let replica_scenarios = [Scenario::GetCold, Scenario::List];
    if results
        .iter()
        .any(|r| replica_scenarios.contains(&r.scenario) && r.service_primary_only.is_none())
    {
        notes.push(
            "- No primary-only instance ran (only a self-started bench with `--replicas` 1 or more \
             starts one): no `vs primary only`."
                .into(),
        );
    }
    if !notes.is_empty() {
        s.push('\n');
        for n in notes {
            s.push_str(&n);
            s.push('\n');
        }
    }
    s.push_str(&replicas_markdown(results));
    s.push_str(&flash_markdown(results));
    s
}

/// The table of the flash sale, the gate against the database path, when `flash` ran (see the
/// module docs); empty otherwise.
fn flash_markdown(results: &[ScenarioResult]) -> String {
    let Some(f) = results.iter().find_map(|r| r.flash_gate.as_ref()) else {
        return String::new();
    };
    let mut s = format!(
        "\nFlash sale: gate against database only (same run, {} clients; each side sells {} units \
         to {} requests of one unit each, as two halves in ABBA order (gate, database, database, \
         gate), each half a sale of its own from full; a request is one `POST /v1/orders`, its \
         order id issued before the run; sold-out/s is counted over the time the sale was sold \
         out):\n\n\
         | side | requests | answered/s | sold-out | sold-out/s | sold-out p50 ms | sold-out p99 ms | successes | successes p50 ms | successes p99 ms | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        f.concurrency, f.units, f.demand,
    );
    let sides = std::iter::once(&f.service).chain(f.database_only.as_ref());
    for side in sides {
        let name = match (side.phase, side.gate) {
            (Phase::Service, true) => "gate (service, cache on)".to_owned(),
            (Phase::Service, false) => format!(
                "service (cache off: no gate, fallback_concurrency {})",
                side.fallback_concurrency
            ),
            _ => format!(
                "database only (cache-off twin, fallback_concurrency {})",
                side.fallback_concurrency
            ),
        };
        s.push_str(&format!(
            "| {name} | {} | {:.0} | {} | {:.0} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {} |\n",
            side.requests,
            side.answered_per_sec,
            side.sold_out,
            side.sold_out_per_sec,
            side.sold_out_p50_ms,
            side.sold_out_p99_ms,
            side.created,
            side.created_p50_ms,
            side.created_p99_ms,
            codes(&side.errors),
        ));
    }
    let met = |m: Option<bool>| match m {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "–",
    };
    if f.sold_out_ratio.is_some() || f.created_p99_ratio.is_some() {
        s.push_str(&format!(
            "\n| figure | gate / database only | target | |\n|---|---:|---|---|\n\
             | sold-out answers per second | {} | ≥ {}× | {} |\n\
             | successes p99 | {} | ≤ {} (not slower) | {} |\n",
            f.sold_out_ratio
                .map_or_else(|| "–".to_owned(), |r| format!("**{r:.1}×**")),
            f.sold_out_ratio_target,
            met(f.sold_out_ratio_met),
            f.created_p99_ratio
                .map_or_else(|| "–".to_owned(), |r| format!("**{r:.2}**")),
            f.created_p99_ratio_target,
            met(f.created_p99_ratio_met),
        ));
    } else if f.database_only.is_none() {
        s.push_str(
            "\nNo database-only side (only a self-started bench starts the cache-off twin): no ratios.\n",
        );
    } else {
        s.push_str("\nThe service has no gate (its cache is off): no ratios.\n");
    }
    s
}

/// The table of replicas against primary only (get-cold and list, when the primary-only
/// instance ran): both sides' ops/s, p50 and p99, their ratio, and who answered (`Served-By`)
/// in each service phase. Empty when no scenario has a primary-only side.
fn replicas_markdown(results: &[ScenarioResult]) -> String {
    let rows: Vec<_> = results
        .iter()
        .filter_map(|r| Some((r, r.service_cache_off.as_ref()?, r.service_primary_only.as_ref()?)))
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "\nRead replicas against primary only (same run; both instances with the cache off, the \
         primary-only one with every replica removed from its settings):\n\n\
         | scenario | replicas ops/s | p50 ms | p99 ms | primary only ops/s | p50 ms | p99 ms | replicas / primary only | served by (service, cache on) | served by (cache off, replicas) | served by (primary only) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---|---|---|\n",
    );
    for (r, off, p) in rows {
        let served = |phase: Phase| {
            r.served_by
                .iter()
                .find(|s| s.phase == phase)
                .map_or_else(|| "–".to_owned(), served_cell)
        };
        s.push_str(&format!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} |\n",
            r.scenario.name(),
            off.ops_per_sec,
            off.p50_ms,
            off.p99_ms,
            p.ops_per_sec,
            p.p50_ms,
            p.p99_ms,
            r.vs_primary_only
                .map_or_else(|| "–".to_owned(), |v| format!("**{v:.2}**")),
            served(Phase::Service),
            served(Phase::ServiceCacheOff),
            served(Phase::ServicePrimaryOnly),
        ));
    }
    s
}

/// The GTID wait table (see the module docs).
pub fn gtid_wait_markdown(g: &GtidWait) -> String {
    let mut s = format!(
        "\nGTID wait (replica caught up): `{}`, waiting for `{}` (applied), target: the wait adds \
         at most {} ms at p50. (a) a point read of an order (`orders::load_order`), (b) \
         `MASTER_GTID_WAIT` then the same read, in alternating blocks on one connection per client.\n",
        g.replica,
        g.gtid.as_deref().unwrap_or("–"),
        g.target_p50_ms,
    );
    if !g.levels.is_empty() {
        s.push_str(
            "\n| clients | (a) reads | (a) p50 ms | (a) p99 ms | (b) reads | (b) p50 ms | (b) p99 ms | wait alone p50 / p99 ms | added p50 ms | added p99 ms | timeouts / missing | target met |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        );
        for l in &g.levels {
            s.push_str(&format!(
                "| {} | {} | {:.3} | {:.3} | {} | {:.3} | {:.3} | {:.3} / {:.3} | **{:.3}** | {:.3} | {} / {} | {} |\n",
                l.concurrency,
                l.reads,
                l.read_p50_ms,
                l.read_p99_ms,
                l.waited_reads,
                l.waited_read_p50_ms,
                l.waited_read_p99_ms,
                l.wait_p50_ms,
                l.wait_p99_ms,
                l.added_p50_ms,
                l.added_p99_ms,
                l.timeouts,
                l.missing,
                if l.added_p50_ms <= g.target_p50_ms && l.timeouts == 0 && l.missing == 0 {
                    "yes"
                } else {
                    "**no**"
                },
            ));
        }
    }
    if let Some(e) = &g.error {
        s.push_str(&format!("\nGTID wait not measured: {e}\n"));
    }
    s
}

/// Which database setup a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    /// `tmpfs` (self-started, nothing synced), `durable` (self-started, `--durable`) or
    /// `target` (a running service: whatever its servers run with).
    pub name: &'static str,
    /// The self-started cluster's directory (tmpfs or disk).
    pub data_dir: Option<String>,
    /// Each server's durability settings, as it reports them.
    pub servers: Vec<workload::ServerSettings>,
    /// `[cache] enabled` of the service under test.
    pub cache_enabled: bool,
    /// Whether a second instance with its cache off ran beside it (self-started runs).
    pub cache_off_instance: bool,
    /// Read replicas of each MariaDB server the service reads (self-started: `--replicas`;
    /// against a target: the most any shard database of its settings lists).
    pub replicas_per_server: usize,
    /// Whether a third instance reading only primaries ran beside it (self-started runs with
    /// replicas).
    pub primary_only_instance: bool,
}

impl Profile {
    fn markdown(&self) -> String {
        let mut s = format!("Profile: **{}**", self.name);
        if let Some(dir) = &self.data_dir {
            s.push_str(&format!(", data in `{dir}`"));
        }
        s.push_str(&format!(
            ", cache {}{}.",
            if self.cache_enabled { "on" } else { "off" },
            if self.cache_off_instance {
                " (and a cache-off instance beside it)"
            } else {
                ""
            }
        ));
        s.push_str(&match self.replicas_per_server {
            0 => " Replicas **off** (every read on the primaries).".to_owned(),
            n => format!(
                " Replicas **on**: {n} GTID replica{} per MariaDB server, read by the service{}.",
                if n == 1 { "" } else { "s" },
                if self.primary_only_instance {
                    " (and a primary-only instance beside it)"
                } else {
                    ""
                }
            ),
        });
        for v in &self.servers {
            s.push_str(&format!(
                " {}: innodb_flush_log_at_trx_commit={}, sync_binlog={}, doublewrite={}, log_bin={}.",
                v.server,
                v.innodb_flush_log_at_trx_commit,
                v.sync_binlog,
                if v.innodb_doublewrite { "on" } else { "off" },
                if v.log_bin { "on" } else { "off" },
            ));
        }
        s.push('\n');
        s
    }
}

/// `results.json`.
#[derive(Serialize)]
struct Report<'a> {
    profile: &'a Profile,
    scenarios: &'a [ScenarioResult],
    #[serde(skip_serializing_if = "Option::is_none")]
    gtid_wait: Option<&'a GtidWait>,
}

/// Where the service under test is.
pub enum Target {
    /// Start a local cluster and the service in this process; `durable` picks the durable
    /// profile ([`ClusterSpec::durable`]) over the tmpfs one.
    SelfStart { durable: bool },
    /// A running service at this URL; `settings` name its databases and secret.
    Url(String),
}

/// `orderly-dev bench`: prepares the target, runs, writes `out/results.json` and
/// `out/results.md`, prints the table. Returns whether every check passed.
pub async fn run(
    target: Target,
    settings: Option<Settings>,
    opts: BenchOptions,
    out: PathBuf,
) -> anyhow::Result<bool> {
    opts.validate()?;
    let mut cluster = None;
    let mut services = Vec::new();
    // The self-started service's state, for get-hot's in-process reads.
    let mut state = None;
    let shutdown = CancellationToken::new();
    let mut profile = Profile {
        name: "target",
        data_dir: None,
        servers: Vec::new(),
        cache_enabled: false,
        cache_off_instance: false,
        replicas_per_server: 0,
        primary_only_instance: false,
    };
    let mut base_primary_only = None;
    let (settings, base_url, base_cache_off) = match target {
        Target::SelfStart { durable } => {
            profile.name = if durable { "durable" } else { "tmpfs" };
            eprintln!(
                "starting a local cluster (2 MariaDB servers{}, Redis; {} profile), the service, its cache-off twin{} ...",
                match opts.replicas {
                    0 => String::new(),
                    n => format!(" with {n} replica{} each", if n == 1 { "" } else { "s" }),
                },
                profile.name,
                if opts.replicas > 0 {
                    " and its primary-only twin"
                } else {
                    ""
                },
            );
            let mut base = settings.unwrap_or_else(Settings::defaults);
            // Tokens are minted with the first HS256 secret: make one if there is none.
            if base.auth.hmac_keys().is_empty() {
                base.auth.jwt_secret =
                    (format!("bench-{}", uuid::Uuid::new_v4().simple()) + "-bench-secret").into();
            }
            base.server.listen = ([127, 0, 0, 1], 0).into();
            // The service gets as many connections per server as the raw baseline may use.
            let wanted = base.database.max_connections.max(opts.concurrency as u32);
            // The replicas are the cluster's (none with `--replicas 0`).
            let Stack {
                cluster: started,
                settings: s,
                ..
            } = stack::start(
                ClusterSpec {
                    mariadb_servers: 2,
                    with_redis: true,
                    durable,
                    replicas_per_server: opts.replicas,
                    ..ClusterSpec::default()
                },
                StackSpec {
                    base,
                    db_prefix: "bench_".into(),
                    shards: 32,
                    // But no more than lets every process of the bench fit into the servers'
                    // max_connections together: the service, its cache-off twin, the
                    // primary-only twin (with replicas) and the raw phase's pools (counted as
                    // one more service). Pools that outgrow the server measure its refusals,
                    // not the service.
                    pool_fit: Some(PoolFit {
                        processes: 3 + u32::from(opts.replicas > 0),
                        wanted,
                    }),
                },
                |_| {},
            )
            .await?;
            profile.data_dir = Some(started.dir().display().to_string());
            profile.replicas_per_server = opts.replicas;
            let app = Application::build(s.clone(), shutdown.clone()).await?;
            let url = format!("http://{}", app.address());
            state = Some(app.state().clone());
            services.push(tokio::spawn(app.run()));
            // The same service with its cache off, on the same databases and Redis, for
            // `vs cache off`. It leases a worker id of its own (as the first does unless the
            // settings fix one, and as the raw phase does), so the two never share one. Its
            // writes (creates only) invalidate nothing, which is harmless here: no stale entry
            // is ever read (get-hot and get-cold read orders nobody changes; first pages are
            // read only within list's phases, and nothing writes during them).
            let mut off = s.clone();
            off.cache.enabled = false;
            off.ids.worker_id = None;
            // Without a cache there is no flash gate: every buyer takes the database path,
            // bounded per sale by `fallback_concurrency`. The flash comparison gives it as many
            // places as there are clients, so that only the database limits it.
            off.flash.fallback_concurrency = twin_fallback_concurrency(&opts);
            let off_app = Application::build(off, shutdown.clone()).await?;
            let off_url = format!("http://{}", off_app.address());
            services.push(tokio::spawn(off_app.run()));
            profile.cache_off_instance = true;
            // With replicas, the cache-off twin reading only primaries, for `vs primary only`;
            // a worker id of its own too. It runs only reads.
            if opts.replicas > 0 {
                let mut only = s.clone();
                only.cache.enabled = false;
                for db in &mut only.shards.databases {
                    db.replicas.clear();
                }
                only.commerce.replicas.clear();
                only.ids.worker_id = None;
                let only_app = Application::build(only, shutdown.clone()).await?;
                base_primary_only = Some(format!("http://{}", only_app.address()));
                services.push(tokio::spawn(only_app.run()));
                profile.primary_only_instance = true;
            }
            cluster = Some(started);
            (s, url, Some(off_url))
        }
        Target::Url(url) => {
            let s = settings.ok_or_else(|| {
                anyhow::anyhow!("--target needs --config naming the service's databases and secret")
            })?;
            profile.replicas_per_server = s
                .shards
                .databases
                .iter()
                .map(|d| d.replicas.len())
                .max()
                .unwrap_or(0);
            (s, url, None)
        }
    };
    profile.cache_enabled = settings.cache.enabled;
    let mut workload = Workload::setup(&settings, &base_url, &opts).await?;
    if let Some(off) = &base_cache_off {
        workload = workload.with_cache_off_service(off);
    }
    if let Some(only) = &base_primary_only {
        workload = workload.with_primary_only_service(only);
    }
    if let Some(cluster) = cluster.as_ref().filter(|_| opts.replicas > 0) {
        workload = workload.with_cluster(cluster.clone());
    }
    if let Some(state) = state {
        workload = workload.with_app_state(state);
    }
    let workload = Arc::new(workload);
    profile.servers = workload.server_settings().await?;
    let results = run_scenarios(workload.clone(), &opts).await?;
    // Every worker id goes back before the cluster goes (each service instance releases its
    // own on the way out of `run`).
    shutdown.cancel();
    workload.release_lease().await;
    for service in services {
        let _ = service.await;
    }
    // The services are gone: the replica serves the measurement alone.
    let gtid_wait = match cluster.as_deref().filter(|_| opts.replicas > 0) {
        Some(cluster) => Some(gtid_wait(cluster, &settings, &workload, &opts).await),
        None => None,
    };

    std::fs::create_dir_all(&out)?;
    let mut table = format!("{}\n{}", profile.markdown(), markdown(&results, &opts));
    if let Some(g) = &gtid_wait {
        table.push_str(&gtid_wait_markdown(g));
    }
    let report = Report {
        profile: &profile,
        scenarios: &results,
        gtid_wait: gtid_wait.as_ref(),
    };
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&report)?)?;
    std::fs::write(out.join("results.md"), &table)?;
    println!("{table}");
    let passed = results.iter().all(ScenarioResult::passed);
    for r in results.iter().filter(|r| !r.passed()) {
        for c in r.checks.iter().filter(|c| !c.ok) {
            eprintln!(
                "check failed after {}: {}: {}",
                r.scenario.name(),
                c.name,
                c.detail
            );
        }
    }
    Ok(passed)
}

/// Iterations per side of the GTID wait measurement: at concurrency 1, and over all clients at
/// the bench's concurrency.
const GTID_WAIT_PER_SIDE: [u64; 2] = [2_000, 4_000];
/// At most this long per concurrency.
const GTID_WAIT_MAX_TIME: Duration = Duration::from_secs(4);

/// The GTID wait measurement (see the module docs) on replica 0 of shard database 0; a failure
/// is reported in it, not raised: the scenarios' results stand.
async fn gtid_wait(
    cluster: &LocalCluster,
    settings: &Settings,
    w: &Workload,
    opts: &BenchOptions,
) -> GtidWait {
    let database = &settings.shards.databases[0];
    let mut report = GtidWait {
        replica: format!("{}/r0", database.name),
        gtid: None,
        target_p50_ms: GTID_WAIT_TARGET_P50_MS,
        levels: Vec::new(),
        error: None,
    };
    let Some(url) = database.replicas.first() else {
        report.error = Some("shard database 0 has no replica".into());
        return report;
    };
    if opts.progress {
        eprintln!("measuring the GTID wait on {} ...", report.replica);
    }
    let measured = async {
        cluster.wait_replicas_caught_up(Duration::from_secs(60)).await?;
        let gtid = workload::applied_gtid(url).await?;
        report.gtid = Some(gtid.to_string());
        let orders = w.orders_in_database(0, 1_000);
        let levels = if opts.concurrency > 1 {
            vec![1, opts.concurrency]
        } else {
            vec![1]
        };
        for (concurrency, per_side) in levels.into_iter().zip(GTID_WAIT_PER_SIDE) {
            let level = workload::measure_gtid_wait(
                url,
                gtid,
                orders.clone(),
                concurrency,
                per_side,
                GTID_WAIT_MAX_TIME,
            )
            .await?;
            report.levels.push(level);
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = measured {
        eprintln!("GTID wait not measured: {e:#}");
        report.error = Some(format!("{e:#}"));
    }
    report
}

/// Shared list of acknowledged order ids (per scenario).
pub type Acked = Mutex<Vec<orderly::domain::ids::OrderId>>;
