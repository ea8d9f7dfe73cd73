//! `orderly migrate`, `migrate status` and `migrate --dry-run`, on databases of their own
//! (created, not migrated): status says pending (exit 1) until a migrate, up to date (exit 0)
//! after, and reports a changed checksum; a dry run writes nothing; two migrates at once both
//! succeed and apply each version once (the per-database lock); `serve` and `relay` refuse to
//! start while a version is pending; a database from before checksums upgrades.

use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use orderly::app::Application;
use orderly::config::Settings;
use orderly::storage::schema::{Databases, SchemaError, DEFAULT_LOCK_WAIT};
use orderly_testkit::stack;
use sqlx::{Connection, MySqlConnection};
use tokio_util::sync::CancellationToken;

use crate::helpers::{cluster, SECRET};

/// Table shards of these tests: two per server, enough for a database of several scopes.
const SHARDS: u32 = 4;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Settings for databases of this test's own, created and empty.
async fn fresh() -> Settings {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let mut base = Settings::defaults();
    base.auth.jwt_secret = SECRET.into();
    base.server.listen = ([127, 0, 0, 1], 0).into();
    base.database.max_connections = 4;
    let prefix = format!("m{}_{n}_", std::process::id());
    let settings = stack::cluster_settings(base, &cluster(), &prefix, SHARDS);
    settings.validate().unwrap();
    stack::create_databases(&settings).await.unwrap();
    settings
}

/// Versions of every scope of `settings`' databases (the bookkeeping's not counted).
fn versions(settings: &Settings) -> usize {
    7 + 6 * SHARDS as usize + settings.merchant.tables as usize + 3
}

/// Every database URL of `settings`, with its name in the settings.
fn urls(settings: &Settings) -> Vec<(String, String)> {
    let mut all = vec![("commerce".to_owned(), settings.commerce.url.clone())];
    for d in &settings.shards.databases {
        all.push((d.name.clone(), d.primary.clone()));
    }
    for (i, d) in settings.merchant.databases.iter().enumerate() {
        all.push((format!("merchant{i}"), d.url.clone()));
    }
    all.push(("archive".to_owned(), settings.archive.url.clone()));
    all
}

async fn connect(url: &str) -> MySqlConnection {
    MySqlConnection::connect(url).await.unwrap()
}

async fn tables_of(url: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE()")
        .fetch_one(&mut connect(url).await)
        .await
        .unwrap()
}

/// `orderly --config <settings> <args>`, run to its end.
async fn orderly(settings: &Settings, args: &[&str]) -> Output {
    let (mut command, _dir) = crate::helpers::orderly_command(settings);
    command
        .args(args)
        .stdout(std::process::Stdio::piped())
        .output()
        .await
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn migrate_status_exits_1_until_migrated_then_0_and_1_again_on_a_changed_checksum() {
    let settings = fresh().await;

    let before = orderly(&settings, &["migrate", "status"]).await;
    assert_eq!(before.status.code(), Some(1), "{}", text(&before));
    let stdout = String::from_utf8_lossy(&before.stdout);
    assert!(
        stdout.contains("commerce: 0 versions applied, 8 pending: schema_migrations v1, commerce v1"),
        "{}",
        text(&before)
    );
    assert!(
        stdout.contains("orders1: 0 versions applied, 13 pending"),
        "{}",
        text(&before)
    );

    // A dry run prints what would run and creates nothing, not even the bookkeeping table.
    let dry = orderly(&settings, &["migrate", "--dry-run"]).await;
    assert_eq!(dry.status.code(), Some(0), "{}", text(&dry));
    let stdout = String::from_utf8_lossy(&dry.stdout);
    for needle in [
        "-- database commerce:",
        "CREATE TABLE IF NOT EXISTS schema_migrations",
        "-- shard_03 v1:",
        "CREATE TABLE IF NOT EXISTS orders_03",
        "-- merchant_00 v1:",
        "-- archive v3:",
        "nothing changed",
    ] {
        assert!(stdout.contains(needle), "{needle} missing from\n{}", text(&dry));
    }
    for (name, url) in urls(&settings) {
        assert_eq!(tables_of(&url).await, 0, "the dry run wrote to {name}");
    }

    let migrate = orderly(&settings, &["migrate"]).await;
    assert_eq!(migrate.status.code(), Some(0), "{}", text(&migrate));
    let expected = format!("applied {} migrations, 0 already applied", versions(&settings));
    assert!(
        String::from_utf8_lossy(&migrate.stdout).contains(&expected),
        "{}",
        text(&migrate)
    );

    let after = orderly(&settings, &["migrate", "status"]).await;
    assert_eq!(after.status.code(), Some(0), "{}", text(&after));
    assert!(
        String::from_utf8_lossy(&after.stdout).contains("commerce: 8 versions applied, none pending"),
        "{}",
        text(&after)
    );

    // The text a version was applied from is not the one this build carries.
    let mut commerce = connect(&settings.commerce.url).await;
    sqlx::query(
        "UPDATE schema_migrations SET checksum = REPEAT('0', 64) WHERE scope = 'commerce' AND version = 2",
    )
    .execute(&mut commerce)
    .await
    .unwrap();
    let changed = orderly(&settings, &["migrate", "status"]).await;
    assert_eq!(changed.status.code(), Some(1), "{}", text(&changed));
    assert!(
        String::from_utf8_lossy(&changed.stdout)
            .contains("checksum mismatch: commerce v2 (worker-id leases)"),
        "{}",
        text(&changed)
    );
    let status = Databases::connect(&settings)
        .await
        .unwrap()
        .status()
        .await
        .unwrap();
    for s in &status {
        match s.database.as_str() {
            "commerce" => {
                let mismatched: Vec<String> = s.mismatched.iter().map(|v| v.to_string()).collect();
                assert_eq!(mismatched, ["commerce v2"]);
                assert!(s.pending.is_empty() && !s.is_up_to_date(), "{s}");
            }
            _ => assert!(s.is_up_to_date(), "{s}"),
        }
    }
}

#[tokio::test]
async fn migrate_dry_run_names_exactly_the_pending_version_and_changes_nothing() {
    let settings = fresh().await;
    orderly::app::migrate(&settings).await.unwrap();
    // orders0 holds shards 0 and 1: forget shard 1's v6 there.
    let orders0 = &settings.shards.databases[0].primary;
    sqlx::query("DELETE FROM schema_migrations WHERE scope = 'shard_01' AND version = 6")
        .execute(&mut connect(orders0).await)
        .await
        .unwrap();
    let databases = Databases::connect(&settings).await.unwrap();
    for _ in 0..2 {
        let plan = databases.plan().await.unwrap();
        for (name, statements) in &plan {
            match name.as_str() {
                "orders0" => {
                    assert_eq!(statements.len(), 2, "{statements:?}");
                    assert_eq!(statements[0], "-- shard_01 v6: buyers with archived orders");
                    assert!(
                        statements[1].starts_with("CREATE TABLE IF NOT EXISTS archived_users_01 ("),
                        "{}",
                        statements[1]
                    );
                }
                // The backfill the version calls for runs after the archive's versions.
                "archive" => assert_eq!(statements.len(), 1, "{statements:?}"),
                _ => assert!(statements.is_empty(), "{name}: {statements:?}"),
            }
        }
    }
    // Still pending: the plans recorded nothing.
    let pending = databases.list()[1].pending().await.unwrap();
    assert_eq!(databases.list()[1].name(), "orders0");
    let pending: Vec<String> = pending.iter().map(|v| v.to_string()).collect();
    assert_eq!(pending, ["shard_01 v6"]);
}

#[tokio::test]
async fn migrate_twice_at_once_both_succeed_and_apply_each_version_once() {
    let settings = fresh().await;
    let (a, b) = (
        Databases::connect(&settings).await.unwrap(),
        Databases::connect(&settings).await.unwrap(),
    );
    let (a, b) = tokio::join!(a.migrate(DEFAULT_LOCK_WAIT), b.migrate(DEFAULT_LOCK_WAIT));
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut applied: Vec<&String> = a.applied.iter().chain(&b.applied).collect();
    assert_eq!(applied.len(), versions(&settings), "{a:?} {b:?}");
    applied.sort();
    applied.dedup();
    assert_eq!(
        applied.len(),
        versions(&settings),
        "a version applied twice: {a:?} {b:?}"
    );
    assert_eq!(a.already + b.already, versions(&settings));
    for (name, url) in urls(&settings) {
        let twice: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT scope, version FROM schema_migrations GROUP BY scope, version HAVING COUNT(*) > 1) t",
        )
        .fetch_one(&mut connect(&url).await)
        .await
        .unwrap();
        assert_eq!(twice, 0, "{name}");
    }
}

#[tokio::test]
async fn migrate_waits_for_the_lock_of_another_and_gives_up_after_its_timeout() {
    let settings = fresh().await;
    // Another migrate holds the commerce database.
    let mut other = connect(&settings.commerce.url).await;
    let held: i64 =
        sqlx::query_scalar("SELECT GET_LOCK(LEFT(CONCAT('orderly_migrate.', DATABASE()), 64), 0)")
            .fetch_one(&mut other)
            .await
            .unwrap();
    assert_eq!(held, 1);
    let databases = Databases::connect(&settings).await.unwrap();
    let started = std::time::Instant::now();
    match databases.migrate(Duration::from_secs(1)).await {
        Err(SchemaError::Busy { database, .. }) => assert_eq!(database, "commerce"),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(
        tables_of(&settings.commerce.url).await,
        0,
        "applied under another's lock"
    );
    // Once the other is done, the waiting one goes on.
    let waiting = tokio::spawn(async move { databases.migrate(Duration::from_secs(30)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished());
    other.close().await.unwrap();
    let report = waiting.await.unwrap().unwrap();
    assert_eq!(report.applied.len(), versions(&settings));
}

#[tokio::test]
async fn serve_and_relay_refuse_to_start_while_a_migration_is_pending() {
    let settings = fresh().await;
    orderly::app::migrate(&settings).await.unwrap();
    let orders1 = &settings.shards.databases[1].primary;
    sqlx::query("DELETE FROM schema_migrations WHERE scope = 'shard_03' AND version = 5")
        .execute(&mut connect(orders1).await)
        .await
        .unwrap();

    let refused = Application::build(settings.clone(), CancellationToken::new()).await;
    let message = refused
        .err()
        .expect("serve started on a pending migration")
        .to_string();
    for needle in ["orders1", "shard_03 v5", "run `orderly migrate`"] {
        assert!(message.contains(needle), "{needle} missing from: {message}");
    }
    let message = orderly::app::relay(&settings, CancellationToken::new())
        .await
        .expect_err("relay started on a pending migration")
        .to_string();
    assert!(
        message.contains("orders1 has 1 pending (shard_03 v5)"),
        "{message}"
    );
    let serve = orderly(&settings, &["serve"]).await;
    assert!(!serve.status.success(), "{}", text(&serve));
    assert!(
        String::from_utf8_lossy(&serve.stderr).contains("database orders1 has 1 pending (shard_03 v5)"),
        "{}",
        text(&serve)
    );

    // Migrated, it starts.
    let report = orderly::app::migrate(&settings).await.unwrap();
    assert_eq!(report.applied, ["shard_03 v5"]);
    let shutdown = CancellationToken::new();
    let app = Application::build(settings, shutdown.clone()).await.unwrap();
    let running = tokio::spawn(app.run());
    shutdown.cancel();
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_database_migrated_before_checksums_upgrades_and_keeps_its_versions() {
    let settings = fresh().await;
    orderly::app::migrate(&settings).await.unwrap();
    // As an orderly before checksums left them.
    for (_, url) in urls(&settings) {
        let mut conn = connect(&url).await;
        sqlx::query("ALTER TABLE schema_migrations DROP COLUMN checksum")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query("DELETE FROM schema_migrations WHERE scope = 'schema_migrations'")
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let databases = Databases::connect(&settings).await.unwrap();
    for s in databases.status().await.unwrap() {
        let pending: Vec<String> = s.pending.iter().map(|v| v.to_string()).collect();
        assert_eq!(pending, ["schema_migrations v1"], "{s}");
        assert!(s.applied.is_empty() && s.mismatched.is_empty(), "{s}");
        assert!(!s.unrecorded.is_empty(), "{s}");
    }
    let refused = databases.refuse_pending().await.unwrap_err().to_string();
    assert!(
        refused.contains("database commerce has 1 pending (schema_migrations v1)"),
        "{refused}"
    );

    let report = databases.migrate(DEFAULT_LOCK_WAIT).await.unwrap();
    assert!(report.applied.is_empty(), "{:?}", report.applied);
    assert_eq!(report.already, versions(&settings));
    for s in databases.status().await.unwrap() {
        assert!(s.is_up_to_date(), "{s}");
        assert!(s.unrecorded.is_empty() && s.unknown.is_empty(), "{s}");
    }
    databases.refuse_pending().await.unwrap();

    // A version of a newer orderly is reported, and is no reason to migrate or refuse; a
    // scope of other settings sharing the database is theirs.
    sqlx::query(
        "INSERT INTO schema_migrations (scope, version, description, checksum, applied_at)
         VALUES ('commerce', 99, 'from a newer orderly', REPEAT('1', 64), NOW(6)),
                ('shard_31', 1, 'of other settings', REPEAT('1', 64), NOW(6))",
    )
    .execute(&mut connect(&settings.commerce.url).await)
    .await
    .unwrap();
    let commerce = databases.list()[0].status().await.unwrap();
    let unknown: Vec<String> = commerce.unknown.iter().map(|v| v.to_string()).collect();
    assert_eq!(unknown, ["commerce v99"]);
    assert!(commerce.is_up_to_date(), "{commerce}");
    assert!(
        commerce
            .to_string()
            .ends_with("\n  unknown to this build: commerce v99"),
        "{commerce}"
    );
    databases.refuse_pending().await.unwrap();
}
