//! `orderly-dev`: the harness's commands beside the service (the playground and the
//! benches), parsed here and run by the testkit library. `cargo playground` runs the
//! playground (an alias in `.cargo/config.toml`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;

use orderly::config::Settings;
use orderly::telemetry::LogFormat;
use orderly_testkit::bench::{self, BenchOptions, Scenario, Target};

/// The same allocator as the `orderly` binary, so the in-process service of a self-started
/// bench runs as it does in production.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Parser)]
#[command(name = "orderly-dev", version, about = "orderly's playground and benchmarks")]
struct Cli {
    /// Settings file (TOML), merged over the defaults; ORDERLY_* variables override both.
    #[arg(long, global = true, env = "ORDERLY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a throwaway local cluster, load a demo catalog and serve it.
    Playground {
        /// Port of the HTTP API (0 picks a free one).
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Run load scenarios with raw baselines and correctness checks (SPEC section 5).
    Bench {
        /// Scenarios to run (default: all).
        #[arg(value_enum)]
        scenarios: Vec<Scenario>,
        /// Time per phase (each scenario runs once against the service, once raw; a
        /// self-started bench runs create, get-cold and list against the cache-on service and
        /// its cache-off twin as halves, in the order on, off, off, on; with replicas, get-cold
        /// and list also against the primary-only twin: service, cache off, primary only,
        /// primary only, cache off, service; flash serves its whole demand whatever the time,
        /// against the service's gate, then against the cache-off twin's database path).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// A running service; --config must name its databases and secret.
        #[arg(long, conflicts_with = "self_start")]
        target: Option<String>,
        /// Start a local cluster and the service in this process (the default).
        #[arg(long)]
        self_start: bool,
        /// Run the self-started cluster durably (data on disk, redo and binary log synced at
        /// every commit, doublewrite on) instead of on tmpfs with nothing synced.
        #[arg(long, conflicts_with = "target")]
        durable: bool,
        /// Where results.json and results.md go.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// Buyers in the catalog.
        #[arg(long, default_value_t = 10_000)]
        users: u32,
        /// Normal products in the catalog.
        #[arg(long, default_value_t = 1_000)]
        products: u32,
        /// Units of each flash sale the bench makes (one per service phase: the service's, behind
        /// its Redis gate, and in a self-started run the cache-off twin's, on the database path)
        /// and the stock of the raw phase's flash product; demand is ten times this.
        #[arg(long, default_value_t = 1_000)]
        flash_stock: i64,
        /// Self-started runs: GTID read replicas of every MariaDB server, read by the service.
        /// With any, get-cold and list also run against a primary-only instance of the
        /// service, and the GTID wait on a caught-up replica is measured. 0: no replicas.
        #[arg(long, default_value_t = 1, conflicts_with = "target")]
        replicas: usize,
    },
    /// The event stream's benchmark on a self-started cluster: commit-to-copy lag under
    /// the create load, the outbox's cost, relay throughput against raw JetStream publishes,
    /// the merchant list against its SQL.
    BenchEvents {
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long)]
        durable: bool,
        /// Outbox rows the relay-throughput phase drains.
        #[arg(long, default_value_t = 20_000)]
        relay_events: usize,
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
    },
    /// The archiver's benchmark on a self-started cluster: its rate against a raw move of
    /// the same orders, get-cold and create latency without and with a pass running, and
    /// the compressed archive's size against an uncompressed copy.
    BenchArchive {
        /// Each load scenario's time per side (without a pass, with one).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Old orders each side of the rate comparison moves.
        #[arg(long, default_value_t = 10_000)]
        orders: usize,
        #[arg(long)]
        durable: bool,
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    orderly::telemetry::init(match cli.command {
        Command::Playground { .. } => LogFormat::Pretty,
        _ => LogFormat::Compact,
    });
    let config = cli.config.as_ref();
    match cli.command {
        Command::Bench {
            scenarios,
            duration,
            concurrency,
            target,
            self_start: _,
            durable,
            out,
            users,
            products,
            flash_stock,
            replicas,
        } => {
            let settings = match (&target, config) {
                (_, Some(path)) => Some(Settings::load(Some(path))?),
                (Some(_), None) => Some(Settings::load(None)?),
                (None, None) => None,
            };
            let opts = BenchOptions {
                scenarios: if scenarios.is_empty() {
                    Scenario::ALL.to_vec()
                } else {
                    scenarios
                },
                duration,
                concurrency,
                users,
                products,
                flash_stock,
                progress: true,
                replicas,
            };
            let target = target.map_or(Target::SelfStart { durable }, Target::Url);
            if bench::run(target, settings, opts, out).await? {
                Ok(())
            } else {
                anyhow::bail!("correctness checks failed")
            }
        }
        Command::Playground { port } => {
            orderly_testkit::playground::run(config.map(PathBuf::as_path), port).await
        }
        Command::BenchEvents {
            duration,
            concurrency,
            durable,
            relay_events,
            out,
        } => {
            let md = bench::events::run(
                bench::events::EventsOptions {
                    duration,
                    concurrency,
                    durable,
                    relay_events,
                },
                out,
            )
            .await?;
            println!("{md}");
            Ok(())
        }
        Command::BenchArchive {
            duration,
            concurrency,
            orders,
            durable,
            out,
        } => {
            let md = bench::archive::run(
                bench::archive::ArchiveOptions {
                    duration,
                    concurrency,
                    durable,
                    orders,
                },
                out,
            )
            .await?;
            println!("{md}");
            Ok(())
        }
    }
}
