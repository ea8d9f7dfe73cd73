//! Shipped orders complete themselves (SPEC 2→3, "auto-confirmed") `orders.auto_complete_days`
//! after shipment, each exactly once however many processes run the completer, and beside
//! the payment-timeout closer.

use orderly::storage::Db;
use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use orderly::domain::ids::OrderId;
use orderly::service::sweeper::{CloseOutcome, CompleteOutcome};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::AssertSqlSafe;

use crate::helpers::{Catalog, TestApp};

/// A test app whose background loop never runs during the test (its first step is a week
/// away): the tests drive every step themselves.
async fn spawn() -> TestApp {
    TestApp::spawn_with(|s| s.sweeper.interval_secs = 7 * 86_400).await
}

fn id_of(order: &Value) -> &str {
    order["order_id"].as_str().unwrap()
}

/// Pays and ships `order`; answers the shipped order.
async fn pay_and_ship(app: &TestApp, cat: &Catalog, order: &Value) -> Value {
    let (s, paid) = app.pay(order).await;
    assert_eq!(s, StatusCode::OK, "{paid}");
    let id = id_of(order);
    let (s, shipped) = app
        .call(
            "POST",
            &format!("/v1/orders/{id}/shipment"),
            Some(&app.merchant_token(cat.shop)),
            Some(json!({"expected_version": paid["version"], "carrier": "SF", "tracking_number": "SF1"})),
        )
        .await;
    assert_eq!(
        (s, shipped["status"].as_str()),
        (StatusCode::OK, Some("shipped")),
        "{shipped}"
    );
    shipped
}

/// The primary pool and the orders table of the shard of `order`.
fn table_of(app: &TestApp, order: &Value) -> (Db, String) {
    let shards = &app.raw;
    let shard = shards.of_order(OrderId::parse(id_of(order)).unwrap());
    (shards.primary(shard).clone(), shard.tables.orders.clone())
}

/// Moves the shipment of `order` back to `days` ago, straight in its shard table.
async fn shipped_days_ago(app: &TestApp, order: &Value, days: i64) {
    let (pool, table) = table_of(app, order);
    let done = sqlx::query(AssertSqlSafe(format!(
        "UPDATE {table} SET shipped_at = ? WHERE order_id = ?"
    )))
    .bind((Utc::now() - TimeDelta::days(days)).naive_utc())
    .bind(OrderId::parse(id_of(order)).unwrap().get())
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(done.rows_affected(), 1);
}

#[tokio::test]
async fn shipped_orders_complete_themselves_after_auto_complete_days() {
    let app = spawn().await;
    let cat = app.catalog(&[20]).await;
    let product = &cat.products[0];
    let user = 1101;
    let days = app.settings.orders.auto_complete_days as i64;
    let after = app.settings.orders.auto_complete_after();

    let mut old = Vec::new();
    for _ in 0..2 {
        let shipped = pay_and_ship(&app, &cat, &app.place_order(user, &[(product, 1)]).await).await;
        shipped_days_ago(&app, &shipped, days + 1).await;
        old.push(shipped);
    }
    let recent = pay_and_ship(&app, &cat, &app.place_order(user, &[(product, 1)]).await).await;
    shipped_days_ago(&app, &recent, days - 1).await;
    let unpaid = app.place_order(user, &[(product, 1)]).await;
    let (s, paid) = app.pay(&app.place_order(user, &[(product, 1)]).await).await;
    assert_eq!(s, StatusCode::OK, "{paid}");
    // Read once before the step, so the cache holds them as shipped: the completion must
    // replace what it holds.
    for o in &old {
        let (_, got) = app.get_order(user, id_of(o)).await;
        assert_eq!(got["status"], "shipped");
    }

    let out = app
        .app
        .orders
        .complete_shipped_once(Utc::now(), after, 100)
        .await
        .unwrap();
    assert_eq!(
        out,
        CompleteOutcome {
            completed: 2,
            raced: 0,
            failed: 0
        }
    );
    for o in &old {
        let (s, got) = app.get_order(user, id_of(o)).await;
        assert_eq!(s, StatusCode::OK, "{got}");
        assert_eq!(
            (
                got["status"].as_str(),
                got["status_code"].as_i64(),
                got["version"].as_i64()
            ),
            (
                Some("completed"),
                Some(3),
                Some(o["version"].as_i64().unwrap() + 1)
            ),
            "{got}"
        );
        assert!(got["completed_at"].is_string(), "{got}");
        assert_eq!(got["tracking_number"], "SF1");
    }
    // Shipped nine days ago: not yet.
    let (_, got) = app.get_order(user, id_of(&recent)).await;
    assert_eq!(
        (got["status"].as_str(), got["version"].as_i64()),
        (Some("shipped"), recent["version"].as_i64())
    );
    assert!(got["completed_at"].is_null(), "{got}");
    // Not shipped at all: untouched.
    for (o, status) in [(&unpaid, "pending_payment"), (&paid, "awaiting_shipment")] {
        let (_, got) = app.get_order(user, id_of(o)).await;
        assert_eq!(
            (got["status"].as_str(), got["version"].as_i64()),
            (Some(status), o["version"].as_i64()),
            "{got}"
        );
    }
    // Completion keeps the units sold: only the unpaid order still holds its reservation.
    assert_eq!(app.stock_of(product).await, 15);

    // A second step finds nothing more to do.
    let again = app
        .app
        .orders
        .complete_shipped_once(Utc::now(), after, 100)
        .await
        .unwrap();
    assert_eq!(again, CompleteOutcome::default());
    // Two days on, the order shipped nine days ago is due as well.
    let later = Utc::now() + TimeDelta::days(2);
    let out = app
        .app
        .orders
        .complete_shipped_once(later, after, 100)
        .await
        .unwrap();
    assert_eq!((out.completed, out.raced, out.failed), (1, 0, 0));
    let (_, got) = app.get_order(user, id_of(&recent)).await;
    assert_eq!(got["status"], "completed");
}

/// Sessions of this database running an update of `table`. While the test holds every row
/// of the table that a step could write locked, these are updates waiting for the lock.
/// (MariaDB 10.11 shows these autocommit updates in neither `INNODB_TRX` nor
/// `INNODB_LOCK_WAITS` while they wait; the process list does.)
async fn updates_of(pool: &Db, table: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST
         WHERE DB = DATABASE() AND INFO LIKE CONCAT('UPDATE ', ?, ' %')",
    )
    .bind(table)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn two_completers_and_two_closers_move_each_order_once() {
    const SHIPPED: usize = 40;
    const UNPAID: usize = 40;
    const STOCK: i64 = 1000;
    let app = spawn().await;
    let cat = app.catalog(&[STOCK]).await;
    let product = &cat.products[0];
    // One buyer: every order on one shard, so that the four steps meet on the same rows.
    let user = 1102;
    let days = app.settings.orders.auto_complete_days as i64;
    let after = app.settings.orders.auto_complete_after();

    // Shipped orders of 2 units, unpaid ones of 3: the stock tells which were given back.
    let mut versions = BTreeMap::new();
    let mut shipped = Vec::new();
    for _ in 0..SHIPPED {
        let order = pay_and_ship(&app, &cat, &app.place_order(user, &[(product, 2)]).await).await;
        shipped_days_ago(&app, &order, days + 1).await;
        versions.insert(id_of(&order).to_owned(), (3, order["version"].as_i64().unwrap()));
        shipped.push(order);
    }
    for _ in 0..UNPAID {
        let order = app.place_order(user, &[(product, 3)]).await;
        versions.insert(id_of(&order).to_owned(), (4, order["version"].as_i64().unwrap()));
    }
    assert_eq!(
        app.stock_of(product).await,
        STOCK - 2 * SHIPPED as i64 - 3 * UNPAID as i64
    );

    // Every row of the buyer stays locked until all four steps wait for one: a step reads
    // its list without waiting for locks and only then writes, so each of them holds every
    // order in its list when the lock goes, and every order is fought over by two steps.
    let (pool, table) = table_of(&app, &shipped[0]);
    let mut holder_conn = pool.acquire().await.unwrap();
    let mut holder = orderly::storage::pool::begin(&mut holder_conn).await.unwrap();
    let locked = sqlx::query(AssertSqlSafe(format!(
        "SELECT order_id FROM {table} WHERE user_id = ? FOR UPDATE"
    )))
    .bind(user)
    .fetch_all(&mut *holder)
    .await
    .unwrap();
    assert_eq!(locked.len(), SHIPPED + UNPAID);

    let deadline_passed =
        Utc::now() + TimeDelta::seconds(app.settings.orders.payment_timeout_secs as i64 + 60);
    let (c1, c2, x1, x2) = (
        app.app.orders.clone(),
        app.app.orders.clone(),
        app.app.orders.clone(),
        app.app.orders.clone(),
    );
    let steps = tokio::spawn(async move {
        let now = Utc::now();
        tokio::join!(
            c1.complete_shipped_once(now, after, 500),
            c2.complete_shipped_once(now, after, 500),
            x1.close_expired_once(deadline_passed, 500),
            x2.close_expired_once(deadline_passed, 500),
        )
    });
    let waiting_since = tokio::time::Instant::now();
    while updates_of(&pool, &table).await < 4 {
        assert!(
            waiting_since.elapsed() < Duration::from_secs(20),
            "the four steps never all waited for the locked rows"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    holder.commit().await.unwrap();

    let (c1, c2, x1, x2) = steps.await.unwrap();
    let (c1, c2, x1, x2) = (c1.unwrap(), c2.unwrap(), x1.unwrap(), x2.unwrap());
    // Every order was in both lists of its kind: one step moved it, the other lost the race.
    assert_eq!(
        (
            c1.completed + c2.completed,
            c1.raced + c2.raced,
            c1.failed + c2.failed
        ),
        (SHIPPED, SHIPPED, 0),
        "{c1:?} {c2:?}"
    );
    assert_eq!(
        (x1.closed + x2.closed, x1.raced + x2.raced, x1.failed + x2.failed),
        (UNPAID, UNPAID, 0),
        "{x1:?} {x2:?}"
    );

    // Each order moved exactly once: its new status, and its version one up.
    let rows: Vec<(i64, i8, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT order_id, status, version FROM {table} WHERE user_id = ?"
    )))
    .bind(user)
    .fetch_all(&pool)
    .await
    .unwrap();
    let moved: BTreeMap<String, (i8, i64)> = rows
        .into_iter()
        .map(|(id, status, version)| (id.to_string(), (status, version)))
        .collect();
    let expected: BTreeMap<String, (i8, i64)> = versions
        .into_iter()
        .map(|(id, (status, version))| (id, (status, version + 1)))
        .collect();
    assert_eq!(moved, expected);
    // The closed orders' units came back once; the completed orders' stay sold.
    assert_eq!(app.stock_of(product).await, STOCK - 2 * SHIPPED as i64);

    // Nothing is left for a later step of either kind.
    let done = app
        .app
        .orders
        .complete_shipped_once(Utc::now(), after, 500)
        .await
        .unwrap();
    assert_eq!(done, CompleteOutcome::default());
    let done = app
        .app
        .orders
        .close_expired_once(deadline_passed, 500)
        .await
        .unwrap();
    assert_eq!(done, CloseOutcome::default());
    assert_eq!(app.stock_of(product).await, STOCK - 2 * SHIPPED as i64);
}
