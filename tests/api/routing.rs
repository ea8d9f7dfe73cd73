//! SPEC 2.3: routing by order id and by user id.

use orderly::domain::ids::{OrderId, UserId};
use reqwest::StatusCode;
use serde_json::json;
use sqlx::AssertSqlSafe;

use crate::helpers::{TestApp, TEST_SHARDS};

#[tokio::test]
async fn routing_by_order_id_and_user_id() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[1000]).await;
    let shards = app.raw.clone();
    let mut databases_used = std::collections::HashSet::new();
    let mut orders = Vec::new();
    for user in 1..=24i64 {
        for _ in 0..2 {
            let o = app.place_order(user, &[(&cat.products[0], 1)]).await;
            orders.push((user, o["order_id"].as_str().unwrap().to_owned()));
        }
    }
    for (user, id) in &orders {
        let oid = OrderId::parse(id).unwrap();
        let shard = shards.of_order(oid);
        // The order's shard from its id alone is its user's shard.
        assert_eq!(shard.index, shards.of_user(UserId::new(*user).unwrap()).index);
        // And the row is really there, in that table on that server.
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {} WHERE order_id = ? AND user_id = ?",
            shard.tables.orders
        )))
        .bind(oid.get())
        .bind(user)
        .fetch_one(shards.primary(shard))
        .await
        .unwrap();
        assert_eq!(n, 1, "order {id} of user {user} is in {}", shard.tables.orders);
        databases_used.insert(shard.database);
        // Found by id alone.
        let (s, o) = app.get_order(*user, id).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(o["user_id"], user.to_string());
    }
    assert_eq!(databases_used.len(), 2, "shard tables on both servers are used");
    assert_eq!(app.count_shard_rows("orders").await, 48);
}

#[tokio::test]
async fn routing_lists_my_orders_newest_first_with_a_keyset_cursor() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[1000]).await;
    let user = 314;
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(
            app.place_order(user, &[(&cat.products[0], 1)]).await["order_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    app.place_order(315, &[(&cat.products[0], 1)]).await;
    let token = app.user_token(user);
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => "/v1/orders?limit=3".to_owned(),
            Some(c) => format!("/v1/orders?limit=3&cursor={c}"),
        };
        let (s, page) = app.call("GET", &path, Some(&token), None).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        for o in page["orders"].as_array().unwrap() {
            assert_eq!(o["user_id"], user.to_string());
            seen.push(o["order_id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, each once");

    // Filters.
    let first = &ids[0];
    let (s, _) = app
        .call(
            "POST",
            &format!("/v1/orders/{first}/cancel"),
            Some(&token),
            Some(json!({"expected_version": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, closed) = app
        .call("GET", "/v1/orders?status=closed", Some(&token), None)
        .await;
    assert_eq!(closed["orders"].as_array().unwrap().len(), 1);
    let (s, p) = app
        .call("GET", "/v1/orders?cursor=bogus", Some(&token), None)
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
    let (s, _) = app.call("GET", "/v1/orders?limit=101", Some(&token), None).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    // An administrator lists a given user's orders.
    let (s, admin_view) = app
        .call(
            "GET",
            &format!("/v1/orders?user_id={user}&limit=100"),
            Some(&app.admin_token()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(admin_view["orders"].as_array().unwrap().len(), 7);
}

#[tokio::test]
async fn routing_worker_ids_are_leased_so_two_processes_never_share_one() {
    let app = TestApp::spawn().await;
    let mut settings = app.settings.clone();
    settings.server.listen = ([127, 0, 0, 1], 0).into();
    let token = tokio_util::sync::CancellationToken::new();
    let second = orderly::app::Application::build(settings, token.clone())
        .await
        .unwrap();
    let (a, b) = (app.app.ids.worker().get(), second.state().ids.worker().get());
    assert_ne!(a, b);
    // Each holds its row of worker_leases, unexpired, under a holder token of its own.
    let held: Vec<(i16, Option<String>)> = sqlx::query_as(
        "SELECT worker_id, holder FROM worker_leases WHERE expires_at > NOW(6) ORDER BY worker_id",
    )
    .fetch_all(&app.commerce)
    .await
    .unwrap();
    let workers: Vec<u16> = held.iter().map(|(w, _)| *w as u16).collect();
    assert_eq!(workers, {
        let mut v = vec![a, b];
        v.sort();
        v
    });
    assert!(held.iter().all(|(_, h)| h.is_some()));
    assert_ne!(held[0].1, held[1].1);
    token.cancel();
}

#[tokio::test]
async fn routing_migrate_creates_every_shard_table_once_and_is_idempotent() {
    let app = TestApp::spawn().await;
    // TestApp::spawn migrated already: a second run applies nothing.
    let again = orderly::app::migrate(&app.settings).await.unwrap();
    assert!(again.applied.is_empty(), "{:?}", again.applied);
    // Seven commerce migrations, six per shard, one per table of the merchant copy, three of
    // the archive.
    let merchant_tables = app.settings.merchant.tables as usize;
    assert_eq!(again.already, 7 + 6 * TEST_SHARDS as usize + merchant_tables + 3);
    // One outbox per shard database, whichever of its shards created it.
    for (db, settings) in app.raw.databases().iter().zip(&app.settings.shards.databases) {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = 'order_outbox'",
        )
        .fetch_one(db)
        .await
        .unwrap();
        assert_eq!(n, 1, "the outbox of {}", settings.name);
    }
    // Every shard's six tables exist on the server that holds it, and only there.
    let shards = &app.raw;
    for shard in shards.all() {
        for db in 0..shards.databases().len() {
            let pool = &shards.databases()[db];
            let n: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name IN (?, ?, ?, ?, ?, ?)",
            )
            .bind(&shard.tables.orders)
            .bind(&shard.tables.items)
            .bind(&shard.tables.payments)
            .bind(&shard.tables.discounts)
            .bind(&shard.tables.voids)
            .bind(&shard.tables.archived_users)
            .fetch_one(pool)
            .await
            .unwrap();
            assert_eq!(
                n,
                if db == shard.database { 6 } else { 0 },
                "shard {} on database {db}",
                shard.index
            );
        }
    }
}
