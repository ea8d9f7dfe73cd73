//! What one create costs the databases on its request path, read from the servers' general
//! log: the round trips (each command a client sent: a statement, a batch of statements, a
//! prepared statement's execution, a ping) and the commits. The targets of issue 21: at most
//! 10 round trips over both databases, guards included, and 2 commits.

use std::collections::HashSet;

use orderly::domain::ids::OrderId;
use sqlx::Row;

use crate::helpers::TestApp;

/// One command of the general log.
#[derive(Debug)]
struct Command {
    thread: i64,
    kind: String,
    text: String,
}

/// The commands of the servers behind `app` between two general-log switches, around `work`.
async fn logged<F: std::future::Future<Output = serde_json::Value>>(
    app: &TestApp,
    work: F,
) -> (serde_json::Value, Vec<Command>) {
    // One pool per server: the commerce database shares its server with shard databases.
    let mut servers = Vec::new();
    let mut ports = HashSet::new();
    for pool in app
        .raw
        .databases()
        .iter()
        .chain(std::iter::once(app.raw.commerce()))
    {
        let port: i64 = sqlx::query_scalar("SELECT CAST(@@port AS SIGNED)")
            .fetch_one(pool)
            .await
            .unwrap();
        if ports.insert(port) {
            servers.push(pool.clone());
        }
    }
    let mut since = Vec::new();
    for pool in &servers {
        sqlx::raw_sql("SET GLOBAL log_output = 'TABLE'; SET GLOBAL general_log = 1")
            .execute(pool)
            .await
            .unwrap();
        let at: chrono::NaiveDateTime = sqlx::query_scalar("SELECT NOW(6)").fetch_one(pool).await.unwrap();
        since.push(at);
    }
    let answer = work.await;
    let mut commands = Vec::new();
    for (pool, since) in servers.iter().zip(since) {
        sqlx::raw_sql("SET GLOBAL general_log = 0")
            .execute(pool)
            .await
            .unwrap();
        let rows = sqlx::query(
            "SELECT CAST(thread_id AS SIGNED), command_type, CONVERT(argument USING utf8mb4)
             FROM mysql.general_log WHERE event_time >= ?",
        )
        .bind(since)
        .fetch_all(pool)
        .await
        .unwrap();
        for r in rows {
            // Thread ids are per server: keep them apart.
            let port: i64 = sqlx::query_scalar("SELECT CAST(@@port AS SIGNED)")
                .fetch_one(pool)
                .await
                .unwrap();
            commands.push(Command {
                thread: port * 1_000_000 + r.get::<i64, _>(0),
                kind: r.get(1),
                text: r.get(2),
            });
        }
    }
    (answer, commands)
}

/// The commands of the connections that served the create of `order` on its request path:
/// those that name the order or read the products (the price). Left out: the harness's own
/// sessions, and the event's consumers after the commit (the merchant copy's and the
/// projections' sessions, off the request path, which also name the order).
fn of_the_create(commands: &[Command], order: OrderId) -> Vec<&Command> {
    let id = order.get().to_string();
    let consumers: HashSet<i64> = commands
        .iter()
        .filter(|c| c.text.contains("merchant_") || c.text.contains("projection_state"))
        .map(|c| c.thread)
        .collect();
    let serving: HashSet<i64> = commands
        .iter()
        .filter(|c| c.text.contains(&id) || c.text.contains("FROM products WHERE id IN"))
        .map(|c| c.thread)
        .filter(|t| !consumers.contains(t))
        .collect();
    commands
        .iter()
        .filter(|c| serving.contains(&c.thread))
        .filter(|c| {
            !c.text.contains("general_log") && !c.text.contains("@@port") && c.text != "SELECT NOW(6)"
        })
        .filter(|c| {
            matches!(
                c.kind.as_str(),
                "Query" | "Execute" | "Prepare" | "Ping" | "Reset stmt"
            )
        })
        .collect()
}

#[tokio::test]
async fn a_create_costs_at_most_ten_round_trips_and_two_commits() {
    let app = TestApp::spawn_with(|s| s.limits.max_unpaid_units_per_user = 50).await;
    let cat = app.catalog(&[1_000, 1_000, 1_000]).await;
    let user = 31_337;
    let items = [
        (&cat.products[0][..], 1),
        (&cat.products[1][..], 2),
        (&cat.products[2][..], 1),
    ];
    // Warm: the user's held-units row, the prepared statements, the pools.
    app.place_order(user, &items).await;
    // The fewest of three: a job of the service that used a connection of the create in the
    // same milliseconds only adds.
    let mut fewest: Option<(usize, usize, Vec<String>)> = None;
    for _ in 0..3 {
        let (order, commands) = logged(&app, app.place_order(user, &items)).await;
        let id = OrderId::parse(order["order_id"].as_str().unwrap()).unwrap();
        let create = of_the_create(&commands, id);
        let commits = create
            .iter()
            .filter(|c| c.text.trim_start().to_ascii_uppercase().starts_with("COMMIT"))
            .count();
        let texts: Vec<String> = create.iter().map(|c| format!("{} {}", c.kind, c.text)).collect();
        if fewest.as_ref().is_none_or(|(n, _, _)| create.len() < *n) {
            fewest = Some((create.len(), commits, texts));
        }
    }
    let (round_trips, commits, texts) = fewest.unwrap();
    let listing = texts.join("\n");
    // The log saw the create at all (a filter that finds nothing would pass anything).
    assert!(round_trips >= 6, "only {round_trips} commands found:\n{listing}");
    assert!(
        round_trips <= 10,
        "{round_trips} round trips for one create:\n{listing}"
    );
    assert_eq!(commits, 2, "commits of one create:\n{listing}");
}
