//! A database that refuses connections is a dependency's fault, not a bug: 503 with
//! `Retry-After`, never 500 (SPEC 2.11). MariaDB answers 1040 "Too many connections" once
//! `max_connections` are taken; a pool that cannot get a connection in time fails with
//! `PoolTimedOut`; both must reach the client as the same retryable refusal.

use std::time::Duration;

use orderly_testkit::cluster::{ClusterSpec, LocalCluster};
use reqwest::StatusCode;
use sqlx::mysql::MySqlDatabaseError;
use sqlx::{Connection, MySqlConnection};

use crate::helpers::TestApp;

/// MariaDB's smallest `max_connections`.
const SERVER_MAX_CONNECTIONS: u32 = 10;

/// Opens connections to `url` until the server refuses one, adding them to `held`; answers
/// the refusal's MySQL error number.
async fn fill_server(url: &str, held: &mut Vec<(i64, MySqlConnection)>) -> Option<u16> {
    // The server allows `max_connections` and one more for an administrator (`orderly` is
    // one): a few more than that must be refused.
    for _ in 0..(SERVER_MAX_CONNECTIONS + 10) {
        match MySqlConnection::connect(url).await {
            Ok(mut c) => {
                let id: i64 = sqlx::query_scalar("SELECT CAST(CONNECTION_ID() AS SIGNED)")
                    .fetch_one(&mut c)
                    .await
                    .unwrap();
                held.push((id, c));
            }
            Err(sqlx::Error::Database(e)) => {
                return e.try_downcast_ref::<MySqlDatabaseError>().map(|m| m.number());
            }
            Err(e) => panic!("connecting failed otherwise: {e}"),
        }
    }
    None
}

/// Every connection of the server that is not the test's (the service's, all of them).
async fn others(admin: &mut MySqlConnection, held: &[(i64, MySqlConnection)]) -> Vec<i64> {
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT CAST(id AS SIGNED) FROM information_schema.processlist \
         WHERE id <> CONNECTION_ID() AND user = 'orderly'",
    )
    .fetch_all(admin)
    .await
    .unwrap();
    ids.into_iter()
        .filter(|id| held.iter().all(|(h, _)| h != id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_database_connections_answer_503_with_retry_after() {
    // A server of the test's own: it is made to refuse every new connection.
    let cluster = LocalCluster::start(ClusterSpec {
        mariadb_servers: 1,
        with_redis: true,
        with_nats: false,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let app = TestApp::spawn_on(&cluster, |s| {
        s.database.max_connections = 2;
        // A request that waits for a connection gives up well within the test's patience.
        s.database.acquire_timeout_ms = 1000;
    })
    .await;
    let cat = app.catalog(&[100]).await;
    let user = 911;
    let order = app.place_order(user, &[(&cat.products[0], 1)]).await;
    let order_id = order["order_id"].as_str().unwrap().to_owned();
    let fresh_id = app.new_order_id(user).await;

    // Take the server's connections away from the service: a tiny `max_connections`, every
    // connection of the service killed, and the free places taken by the test.
    let server = cluster.mariadb(0);
    let mut admin = MySqlConnection::connect(&server.admin_url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET GLOBAL max_connections = {SERVER_MAX_CONNECTIONS}"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    // The service's background steps may reconnect between the kill and the filling: again
    // until the test holds every place.
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..20 {
        for id in others(&mut admin, &held).await {
            // Gone already is fine.
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("KILL CONNECTION {id}")))
                .execute(&mut admin)
                .await;
        }
        refused = fill_server(&server.admin_url(), &mut held).await;
        if others(&mut admin, &held).await.is_empty() {
            break;
        }
    }
    assert!(
        others(&mut admin, &held).await.is_empty(),
        "the service kept a connection"
    );
    assert_eq!(
        refused,
        Some(1040),
        "the server must refuse with Too many connections"
    );

    let token = app.user_token(user);
    let read = format!("/v1/orders/{order_id}?consistency=strong");
    let create = TestApp::order_body(&fresh_id, &[(&cat.products[0], 1)]);
    let mut answers = Vec::new();
    for round in 0..4 {
        // More requests at once than the pool has connections: some need a new one.
        let mut calls = Vec::new();
        for i in 0..4 {
            let req = if (round + i) % 2 == 0 {
                app.client.get(format!("{}{read}", app.base))
            } else {
                app.client.post(format!("{}/v1/orders", app.base)).json(&create)
            };
            calls.push(req.bearer_auth(&token).send());
        }
        for resp in futures::future::join_all(calls).await {
            let resp = resp.expect("an answer");
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            answers.push((
                status,
                retry_after,
                body["code"].as_str().unwrap_or("").to_owned(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let wrong: Vec<_> = answers
        .iter()
        .filter(|(status, retry_after, code)| {
            *status != StatusCode::SERVICE_UNAVAILABLE
                || retry_after
                    .as_deref()
                    .and_then(|s| s.parse::<u64>().ok())
                    .is_none()
                || code != "unavailable"
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "every request that needed a refused connection must be 503 unavailable with \
         Retry-After; got {wrong:?} (all: {answers:?})"
    );
}

/// Captures what the current thread logs, as text.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A process whose pools can open more connections to a server than its `max_connections`
/// says so when it starts: a WARN naming the server, both numbers and the pools.
#[tokio::test]
async fn pools_that_cannot_fit_a_server_are_warned_about_at_start() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _log = tracing::subscriber::set_default(subscriber);
    // Pools open lazily beyond their first connection, so this many per pool costs nothing
    // here. The first server holds the commerce, archive and a shard database: 3 × 200, the
    // lease's 2, a relay's connection for two of them, the search writer's lock and the
    // readiness probes' one connection for commerce and the shard, 607 over its 500. The
    // second holds a shard database and the merchant copy: 402, which fits.
    let app = TestApp::spawn_with(|s| s.database.max_connections = 200).await;
    let fits = TestApp::spawn_with(|s| s.database.max_connections = 8).await;
    drop((app, fits));
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("max_connections"))
        .collect();
    let first = orderly::storage::budget::server_of(&crate::helpers::cluster().mariadb(0).url("x")).unwrap();
    assert!(
        warnings.iter().any(|l| l.contains(&first)
            && l.contains("max_connections=500")
            && l.contains("connections=607")
            && l.contains("commerce")),
        "no warning names the first server, its 500 and the 607 connections: {text}"
    );
    assert_eq!(
        warnings.len(),
        1,
        "one warning, for the one server the big pools overfill; none for pools that fit: {text}"
    );
}
