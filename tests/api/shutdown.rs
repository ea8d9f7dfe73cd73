//! SPEC 2.8 at shutdown: SIGTERM to a real `orderly serve` during a burst of creates. The
//! process stops accepting, lets the requests and writes in flight finish within its grace
//! period and exits cleanly; every order it answered 2xx for is complete in the database, and
//! no create is left half-written (a reservation without its order).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use orderly::domain::ids::OrderId;
use reqwest::StatusCode;
use sqlx::{AssertSqlSafe, Connection, MySqlConnection};

use crate::helpers::{free_port, orderly_command, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_are_complete_after_sigterm_during_a_burst() {
    // The test app migrates the databases and sets up the catalog; the process under test
    // serves the same databases.
    let app = TestApp::spawn().await;
    let catalog = app.catalog(&[1_000_000, 1_000_000]).await;
    let mut settings = app.settings.clone();
    let port = free_port();
    settings.server.listen = ([127, 0, 0, 1], port).into();
    settings.server.shutdown_grace_ms = 10_000;
    let (mut command, _dir) = orderly_command(&settings);
    let mut child = command.arg("serve").spawn().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let up = Instant::now();
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(
            up.elapsed() < Duration::from_secs(30),
            "orderly serve did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The burst: clients create orders until the server stops answering.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let app = Arc::new(app);
    let clients: Vec<_> = (0..16i64)
        .map(|c| {
            let (app, base, acked, client) = (app.clone(), base.clone(), acked.clone(), client.clone());
            let product = catalog.products[(c % 2) as usize].clone();
            tokio::spawn(async move {
                let user = 100 + c;
                let token = app.user_token(user);
                loop {
                    let Ok(r) = client
                        .post(format!("{base}/v1/order-ids"))
                        .bearer_auth(&token)
                        .send()
                        .await
                    else {
                        return;
                    };
                    if r.status() != StatusCode::CREATED {
                        return;
                    }
                    let id = r.json::<serde_json::Value>().await.unwrap()["order_id"]
                        .as_str()
                        .unwrap()
                        .to_owned();
                    let body = TestApp::order_body(&id, &[(&product, 2)]);
                    match client
                        .post(format!("{base}/v1/orders"))
                        .bearer_auth(&token)
                        .json(&body)
                        .send()
                        .await
                    {
                        Ok(r) if r.status().is_success() => acked.lock().unwrap().push(id),
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_signal = acked.lock().unwrap().len();
    let pid = child.id().unwrap() as i32;
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("orderly serve did not exit within its grace period")
        .unwrap();
    for c in clients {
        c.await.unwrap();
    }
    let mut log = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut log).await;
    }
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(
        before_signal > 10,
        "the burst created only {before_signal} orders before the signal"
    );

    // Every acknowledged order is complete: its row, its line, its reservation.
    let shards = &app.raw;
    let mut commerce = MySqlConnection::connect(&app.settings.commerce.url)
        .await
        .unwrap();
    for id in &acked {
        let shard = shards.of_order(OrderId::parse(id).unwrap());
        let mut c = MySqlConnection::connect(&app.settings.shards.databases[shard.database].primary)
            .await
            .unwrap();
        let (orders, lines): (i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT (SELECT COUNT(*) FROM {} WHERE order_id = ?), (SELECT COUNT(*) FROM {} WHERE order_id = ?)",
            shard.tables.orders, shard.tables.items
        )))
        .bind(id.parse::<i64>().unwrap())
        .bind(id.parse::<i64>().unwrap())
        .fetch_one(&mut c)
        .await
        .unwrap();
        assert_eq!(
            (orders, lines),
            (1, 1),
            "order {id} answered 2xx but is not complete"
        );
        let held: Option<i64> =
            sqlx::query_scalar("SELECT quantity FROM stock_reservations WHERE order_id = ?")
                .bind(id.parse::<i64>().unwrap())
                .fetch_optional(&mut commerce)
                .await
                .unwrap();
        assert_eq!(held, Some(2), "order {id} holds no stock");
    }
    // Nothing half-written: every claim has its order.
    let claims: Vec<i64> = sqlx::query_scalar("SELECT order_id FROM order_claims")
        .fetch_all(&mut commerce)
        .await
        .unwrap();
    assert!(claims.len() >= acked.len());
    for id in claims {
        let shard = shards.of_order(OrderId::new(id).unwrap());
        let mut c = MySqlConnection::connect(&app.settings.shards.databases[shard.database].primary)
            .await
            .unwrap();
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {} WHERE order_id = ?",
            shard.tables.orders
        )))
        .bind(id)
        .fetch_one(&mut c)
        .await
        .unwrap();
        assert_eq!(n, 1, "order {id} reserved stock but was never written");
    }
}
