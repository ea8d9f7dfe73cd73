//! The `orderly` binary: parses the command line and calls into the library.

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};
use mimalloc::MiMalloc;
use tokio_util::sync::CancellationToken;

use orderly::app::{self, Application};
use orderly::config::Settings;
use orderly::domain::ids::{OrderId, UserId};
use orderly::domain::shard::{Gene, ShardCount};
use orderly::telemetry::LogFormat;

/// glibc's malloc showed up at ~15% of the service's own CPU under load (many small
/// short-lived buffers per request and per SQL row); mimalloc cuts that.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// An e-commerce order service.
///
/// orderly creates each order exactly once, moves it through its life cycle with no lost or
/// doubled update, spreads orders over sharded MariaDB servers with read replicas, caches in
/// Redis without ever serving a state older than an acknowledged write, and publishes every
/// order change to NATS JetStream.
///
/// Settings come from the compiled-in defaults, then the --config file, then ORDERLY_*
/// environment variables (ORDERLY_<SECTION>__<KEY>, e.g. ORDERLY_SERVER__LISTEN); secrets can
/// be read from files with ORDERLY_<SECTION>__<KEY>_FILE. `orderly man` prints the manual.
#[derive(Parser)]
#[command(name = "orderly", version, max_term_width = 100)]
struct Cli {
    /// Settings file (TOML), merged over the defaults; ORDERLY_* variables override both.
    #[arg(long, global = true, env = "ORDERLY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Serve,
    /// Create every table on every database (idempotent; one migrate at a time per
    /// database); `migrate status` reports where each database stands.
    #[command(args_conflicts_with_subcommands = true)]
    Migrate {
        /// Print the statements that would run on each database; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// How long to wait for another migrate that holds a database, e.g. `30s`.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
        lock_timeout: std::time::Duration,
        #[command(subcommand)]
        command: Option<MigrateCommand>,
    },
    /// Publish the order events of every shard database's outbox to NATS JetStream (what
    /// `serve` also does unless `events.relay = false`).
    Relay {
        /// Instead: move the rows the relay parked (JetStream kept refusing them) back into
        /// their outboxes, for the running relays to publish again, and exit.
        #[arg(long)]
        republish_parked: bool,
    },
    /// Move old final orders out of the hot shards into the archive (read transparently).
    Archive {
        /// Orders created longer ago than this move, e.g. `90d` (default:
        /// archive.older_than_days; never less than archive.min_age_days).
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
        /// Orders looked at per batch and shard (default: archive.batch_size).
        #[arg(long)]
        batch_size: Option<u32>,
        /// Pause between batches, e.g. `200ms` (default: archive.pause_ms); it grows while
        /// replicas lag or the hot tables slow down.
        #[arg(long, value_parser = humantime::parse_duration)]
        pause: Option<std::time::Duration>,
        /// Table shards to archive: `0-31`, `5`, or `3-7` (default: all).
        #[arg(long, value_parser = parse_shard_range)]
        shards: Option<std::ops::RangeInclusive<u32>>,
        /// One pass, then exit (the default).
        #[arg(long, conflicts_with = "run_loop")]
        once: bool,
        /// A pass every archive.interval_secs until Ctrl-C.
        #[arg(long = "loop")]
        run_loop: bool,
        /// Count what a pass would move, per shard; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also write every batch as gzip NDJSON here before anything is deleted.
        #[arg(long)]
        export_dir: Option<PathBuf>,
    },
    /// A shop's daily report, from the merchant copy.
    Report {
        /// The shop id.
        #[arg(long)]
        shop: String,
        /// First day, YYYY-MM-DD.
        #[arg(long)]
        from: chrono::NaiveDate,
        /// Last day (inclusive), YYYY-MM-DD.
        #[arg(long)]
        to: chrono::NaiveDate,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
        format: ReportFormat,
    },
    /// Work with the read models the event stream keeps.
    Project {
        #[command(subcommand)]
        command: ProjectCommand,
    },
    /// Work with order ids.
    Id {
        #[command(subcommand)]
        command: IdCommand,
    },
    /// Print the shard of a user id.
    ShardOf {
        /// The user id (a positive integer).
        user_id: String,
        /// Number of table shards (default: the settings' shards.count).
        #[arg(long)]
        shards: Option<u32>,
    },
    /// Print a shell completion script, e.g. `orderly completions bash > /etc/bash_completion.d/orderly`.
    Completions {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `orderly man > orderly.1 && man ./orderly.1`.
    Man,
}

/// `--shards 0-31` or `--shards 5`.
fn parse_shard_range(s: &str) -> Result<std::ops::RangeInclusive<u32>, String> {
    let bad = || format!("{s:?} is not a shard or a range like 0-31");
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let (a, b): (u32, u32) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a > b {
        return Err(bad());
    }
    Ok(a..=b)
}

fn print_archive_summary(s: &orderly::service::archive::PassSummary) {
    let verb = if s.dry_run { "would move" } else { "moved" };
    for shard in &s.shards {
        if shard.busy {
            println!(
                "shard {:02}: skipped, another process is archiving it",
                shard.shard
            );
        } else if s.dry_run && (shard.moved > 0 || shard.not_final > 0) {
            println!(
                "shard {:02}: {verb} {}, {} old orders not final yet",
                shard.shard, shard.moved, shard.not_final
            );
        } else if shard.moved > 0 || shard.moved_on > 0 {
            println!(
                "shard {:02}: {verb} {} ({} KiB){}",
                shard.shard,
                shard.moved,
                shard.bytes / 1024,
                if shard.moved_on > 0 {
                    format!(", {} left hot (changed during the move)", shard.moved_on)
                } else {
                    String::new()
                }
            );
        }
    }
    if s.dry_run {
        println!("{} orders {verb}; nothing changed", s.moved());
    } else {
        println!(
            "{} orders {verb}, {:.1} MiB of documents, in {:.1} s ({:.0} orders/s)",
            s.moved(),
            s.bytes() as f64 / (1024.0 * 1024.0),
            s.elapsed.as_secs_f64(),
            s.rate()
        );
    }
}

#[derive(Subcommand)]
enum MigrateCommand {
    /// Per database: versions applied, pending and changed since applied (checksum
    /// mismatch). Exits 1 unless every database is up to date.
    Status,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ReportFormat {
    /// Aligned columns for a terminal.
    Table,
    /// Comma-separated values with a header line.
    Csv,
}

#[derive(Subcommand)]
enum ProjectCommand {
    /// Rebuild a read model from the shards; the consumer in `serve` follows the stream from where the rebuild started.
    Rebuild {
        /// The read model to rebuild.
        #[arg(value_enum)]
        projection: ProjectionName,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ProjectionName {
    /// The merchant copy by shop, with its reports.
    Merchant,
    /// The daily reports: kept in the merchant copy's transactions, so this rebuilds both.
    Reports,
    /// The order search index in `search.data_dir` (no `serve` may hold its writer).
    Search,
}

fn print_report(rows: &[orderly::storage::merchant::DailyReport], format: ReportFormat) {
    let header = [
        "day",
        "orders",
        "units",
        "gross",
        "discounts",
        "paid",
        "refunded",
        "pending",
        "paid_st",
        "shipped",
        "completed",
        "closed",
        "invalid",
    ];
    let lines: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut l = vec![
                r.day.to_string(),
                r.orders.to_string(),
                r.units.to_string(),
                r.gross.to_string(),
                r.discounts.to_string(),
                r.paid.to_string(),
                r.refunded.to_string(),
            ];
            l.extend(r.by_status.iter().map(i64::to_string));
            l
        })
        .collect();
    match format {
        ReportFormat::Csv => {
            println!("{}", header.join(","));
            for l in &lines {
                println!("{}", l.join(","));
            }
        }
        ReportFormat::Table => {
            let widths: Vec<usize> = (0..header.len())
                .map(|i| {
                    lines
                        .iter()
                        .map(|l| l[i].len())
                        .chain([header[i].len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let row = |cells: Vec<&str>| {
                cells
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:>w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
            };
            println!("{}", row(header.to_vec()));
            for l in &lines {
                println!("{}", row(l.iter().map(String::as_str).collect()));
            }
            if lines.is_empty() {
                println!("(no orders in this range)");
            }
        }
    }
}

#[derive(Subcommand)]
enum IdCommand {
    /// Print the time, worker, sequence, gene and shard of an order id.
    Decode {
        /// The order id.
        order_id: String,
        /// Number of table shards (default: the settings' shards.count).
        #[arg(long)]
        shards: Option<u32>,
    },
}

/// `--shards`, else the settings' `shards.count`. Settings that do not load are an error,
/// not a silent default: a shard computed for the wrong count names the wrong table.
fn shard_count(explicit: Option<u32>, config: Option<&PathBuf>) -> anyhow::Result<ShardCount> {
    let n = match explicit {
        Some(n) => n,
        None => {
            Settings::load(config.map(PathBuf::as_path))
                .map_err(|e| anyhow::anyhow!("{e}\n(or give the shard count with --shards N)"))?
                .shards
                .count
        }
    };
    Ok(ShardCount::new(n)?)
}

/// Ctrl-C and SIGTERM (what an orchestrator sends) both start a graceful shutdown.
async fn shutdown_signal(token: CancellationToken) {
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down");
    token.cancel();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The processes that run for long (under an orchestrator, read by a log collector) log
    // JSON lines; the one-shot tools log for the person at the terminal.
    orderly::telemetry::init(match cli.command {
        Command::Serve
        | Command::Relay {
            republish_parked: false,
        }
        | Command::Archive { run_loop: true, .. }
        | Command::Project { .. } => LogFormat::Json,
        _ => LogFormat::Compact,
    });
    let config = cli.config.as_ref();
    match cli.command {
        Command::Serve => {
            let settings = Settings::load(config.map(PathBuf::as_path))?;
            let token = CancellationToken::new();
            tokio::spawn(shutdown_signal(token.clone()));
            let app = Application::build(settings, token).await?;
            tracing::info!(address = %app.address(), admin = ?app.admin_address(), "serving");
            app.run().await
        }
        Command::Migrate {
            dry_run,
            lock_timeout,
            command,
        } => {
            let settings = Settings::load(config.map(PathBuf::as_path))?;
            let databases = orderly::storage::schema::Databases::connect(&settings).await?;
            if let Some(MigrateCommand::Status) = command {
                let statuses = databases.status().await?;
                for status in &statuses {
                    println!("{status}");
                }
                let behind = statuses.iter().filter(|s| !s.is_up_to_date()).count();
                anyhow::ensure!(behind == 0, "{behind} databases are not up to date");
                return Ok(());
            }
            if dry_run {
                for (database, plan) in databases.plan().await? {
                    let n = plan.iter().filter(|s| !s.starts_with("--")).count();
                    println!("-- database {database}: {n} statements");
                    for line in plan {
                        match line.starts_with("--") {
                            true => println!("{line}"),
                            false => println!("{line};"),
                        }
                    }
                }
                println!("-- dry run: nothing changed");
                return Ok(());
            }
            let report = databases.migrate(lock_timeout).await?;
            println!(
                "applied {} migrations, {} already applied",
                report.applied.len(),
                report.already
            );
            Ok(())
        }
        Command::Archive {
            older_than,
            batch_size,
            pause,
            shards,
            once: _,
            run_loop,
            dry_run,
            export_dir,
        } => {
            let settings = Settings::load(config.map(PathBuf::as_path))?;
            let mut opts = orderly::service::archive::PassOptions::from_settings(&settings.archive);
            if let Some(d) = older_than {
                let d = chrono::TimeDelta::from_std(d)?;
                anyhow::ensure!(
                    d >= settings.archive.min_age(),
                    "--older-than must be at least archive.min_age_days ({} days): reads skip the archive for younger orders",
                    settings.archive.min_age_days
                );
                opts.older_than = d;
            }
            if let Some(b) = batch_size {
                anyhow::ensure!((1..=10_000).contains(&b), "--batch-size must be 1..=10000");
                opts.batch_size = b;
            }
            if let Some(p) = pause {
                opts.pause = p;
            }
            opts.shards = shards;
            opts.dry_run = dry_run;
            opts.export_dir = export_dir;
            opts.progress = true;
            let token = CancellationToken::new();
            tokio::spawn(shutdown_signal(token.clone()));
            // Ctrl-C stops a pass between two batches; the next one resumes there.
            opts.stop = token.clone();
            if !run_loop {
                print_archive_summary(&app::archiver(&settings).await?.pass(&opts).await?);
                return Ok(());
            }
            let archiving = app::ArchiveLoop::build(&settings).await?;
            if let Some(admin) = archiving.admin_address() {
                tracing::info!(address = %admin, "admin listener");
            }
            archiving.run(&opts, token, print_archive_summary).await
        }
        Command::Relay {
            republish_parked: true,
        } => {
            let settings = Settings::load(config.map(PathBuf::as_path))?;
            let moved = app::republish_parked(&settings).await?;
            println!("{moved} parked events put back into their outboxes");
            Ok(())
        }
        Command::Relay {
            republish_parked: false,
        } => {
            let settings = Settings::load(config.map(PathBuf::as_path))?;
            let token = CancellationToken::new();
            tokio::spawn(shutdown_signal(token.clone()));
            let relay = app::RelayProcess::build(&settings, token).await?;
            if let Some(admin) = relay.admin_address() {
                tracing::info!(address = %admin, "admin listener");
            }
            relay.run().await
        }
        Command::Report {
            shop,
            from,
            to,
            format,
        } => {
            let settings = Settings::load(config.map(PathBuf::as_path))?;
            let shop = orderly::domain::ids::ShopId::parse(&shop)
                .ok_or_else(|| anyhow::anyhow!("not a shop id: {shop}"))?;
            anyhow::ensure!(from <= to, "--from must not be after --to");
            let rows = app::daily_report(&settings, shop, from, to).await?;
            print_report(&rows, format);
            Ok(())
        }
        Command::Project {
            command: ProjectCommand::Rebuild { projection },
        } => {
            let settings = Settings::load(config.map(PathBuf::as_path))?;
            // Liveness, metrics and readiness while the rebuild runs (it may take hours).
            let stop = CancellationToken::new();
            let admin = app::rebuild_admin(&settings, stop.clone()).await;
            let done = match projection {
                ProjectionName::Merchant | ProjectionName::Reports => {
                    app::rebuild_merchant(&settings, true).await
                }
                ProjectionName::Search => app::rebuild_search(&settings, true).await,
            };
            stop.cancel();
            if let Some(admin) = admin {
                let _ = admin.await;
            }
            let done = done?;
            println!(
                "{} orders backfilled; following the stream after message {}",
                done.orders, done.followed_after
            );
            Ok(())
        }
        Command::Id {
            command: IdCommand::Decode { order_id, shards },
        } => {
            let id =
                OrderId::parse(&order_id).ok_or_else(|| anyhow::anyhow!("not an order id: {order_id}"))?;
            let p = id.parts();
            let count = shard_count(shards, config)?;
            println!("order_id  {id}");
            println!("time      {} ({} ms)", id.created_at().to_rfc3339(), p.unix_ms);
            println!("worker    {}", p.worker);
            println!("sequence  {}", p.seq);
            println!("gene      {}", p.gene.get());
            println!("shard     {} of {}", count.shard_of_gene(p.gene), count.get());
            Ok(())
        }
        Command::Completions { shell } => {
            let mut cli = Cli::command();
            clap_complete::generate(shell, &mut cli, "orderly", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::ShardOf { user_id, shards } => {
            let user = UserId::parse(&user_id).ok_or_else(|| anyhow::anyhow!("not a user id: {user_id}"))?;
            let count = shard_count(shards, config)?;
            println!("user      {user}");
            println!("gene      {}", Gene::of_user(user).get());
            println!("shard     {} of {}", count.shard_of_user(user), count.get());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand and argument explains itself in `--help`, the man page and the
    /// completions, and none points at documents a user of the binary does not have.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() {
                missing.push(format!("{path}: no about"));
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                match arg.get_help() {
                    None => missing.push(format!("{path} {id}: no help")),
                    Some(h) if h.to_string().contains("SPEC") => {
                        missing.push(format!("{path} {id}: refers to the SPEC"))
                    }
                    Some(_) => {}
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() != "help" {
                    walk(sub, &path, missing);
                }
            }
        }
        let cli = Cli::command();
        cli.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cli, "", &mut missing);
        assert!(missing.is_empty(), "{missing:#?}");
    }
}
