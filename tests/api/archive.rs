//! SPEC 2.7, the archive: old final orders leave the hot shards without one being lost,
//! doubled, or unreadable, through crashes at every step and under live traffic.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::time::Duration;

use chrono::TimeDelta;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::AssertSqlSafe;

use orderly::domain::ids::{OrderId, ProductId, UserId};
use orderly::domain::money::Money;
use orderly::domain::status::OrderStatus;
use orderly::service::archive::{PassOptions, PassSummary};
use orderly_testkit::cluster::LocalCluster;
use orderly_testkit::fixtures::{write_old_orders, OldOrders};

use crate::helpers::TestApp;

/// Passes of these tests run one at a time: failpoints are process-wide, and a pass that
/// met another test's failpoint would fail for nothing.
static PASSES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An app whose background steps leave old orders alone while a test looks at them (the
/// payment-timeout closer and the completer would otherwise finish the non-final ones).
async fn app() -> TestApp {
    TestApp::spawn_with(|s| {
        s.sweeper.interval_secs = 3600;
        s.archive.min_age_days = 30;
        s.archive.older_than_days = 90;
    })
    .await
}

/// `count` orders of `users`, 120 days old and older (a minute apart), ending in `statuses`
/// (cycled), written through storage; answers their ids.
async fn old_orders(app: &TestApp, users: &[i64], count: usize, statuses: &[OrderStatus]) -> Vec<OrderId> {
    let catalog = app.catalog(&[1000, 1000]).await;
    let spec = OldOrders {
        users: users.iter().map(|u| UserId::new(*u).unwrap()).collect(),
        shop: catalog.shop,
        products: catalog
            .products
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (
                    ProductId::parse(p).unwrap(),
                    format!("product {i}"),
                    Money::new(1000).unwrap(),
                )
            })
            .collect(),
        count,
        newest_age: TimeDelta::days(120),
        statuses: statuses.to_vec(),
    };
    write_old_orders(&app.raw, &spec).await.expect("old orders")
}

const FINAL: &[OrderStatus] = &[OrderStatus::Completed, OrderStatus::Closed, OrderStatus::Invalid];

fn pass_options(batch: u32) -> PassOptions {
    PassOptions {
        older_than: TimeDelta::days(90),
        batch_size: batch,
        pause: Duration::ZERO,
        shards: None,
        dry_run: false,
        export_dir: None,
        progress: false,
        busy_percent: 100,
        stop: tokio_util::sync::CancellationToken::new(),
    }
}

async fn pass(app: &TestApp, opts: &PassOptions) -> anyhow::Result<PassSummary> {
    orderly::app::archive_pass(&app.settings, opts).await
}

/// Where each order is: `(rows in the hot shard's four tables, in the archive)`.
async fn places(app: &TestApp, ids: &[OrderId]) -> HashMap<i64, (bool, bool)> {
    let shards = &app.raw;
    let mut out: HashMap<i64, (bool, bool)> = ids.iter().map(|i| (i.get(), (false, false))).collect();
    for shard in shards.all() {
        let t = &shard.tables;
        for table in [&t.orders, &t.items] {
            let rows: Vec<i64> =
                sqlx::query_scalar(AssertSqlSafe(format!("SELECT DISTINCT order_id FROM {table}")))
                    .fetch_all(shards.primary(shard))
                    .await
                    .unwrap();
            for id in rows {
                if let Some(p) = out.get_mut(&id) {
                    p.0 = true;
                }
            }
        }
    }
    let archive = app.archive_pool().await;
    let rows: Vec<i64> = sqlx::query_scalar("SELECT order_id FROM archived_orders")
        .fetch_all(&archive)
        .await
        .unwrap();
    for id in rows {
        if let Some(p) = out.get_mut(&id) {
            p.1 = true;
        }
    }
    out
}

/// Asserts every order of `ids` is in exactly one place: the archive (`archived`) or the
/// hot shard (the others).
async fn assert_each_in_one_place(app: &TestApp, ids: &[OrderId], archived: &HashSet<i64>) {
    let at = places(app, ids).await;
    for id in ids {
        let (hot, arch) = at[&id.get()];
        if archived.contains(&id.get()) {
            assert!(
                arch && !hot,
                "order {id}: hot {hot}, archived {arch}; it belongs in the archive only"
            );
        } else {
            assert!(
                hot && !arch,
                "order {id}: hot {hot}, archived {arch}; it belongs in its shard only"
            );
        }
    }
}

fn exported_ids(dir: &std::path::Path) -> HashSet<i64> {
    let mut ids = HashSet::new();
    for shard in std::fs::read_dir(dir).unwrap() {
        for file in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            if !path.to_string_lossy().ends_with(".ndjson.gz") {
                continue;
            }
            let mut text = String::new();
            flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap())
                .read_to_string(&mut text)
                .unwrap();
            for line in text.lines() {
                let doc: Value = serde_json::from_str(line).unwrap();
                ids.insert(doc["order_id"].as_i64().unwrap());
            }
        }
    }
    ids
}

#[tokio::test]
#[ignore = "slow group: .ci/run runs it (cargo test --test api -- --ignored)"]
async fn archive_moves_ten_thousand_old_final_orders_in_batches() {
    let app = app().await;
    let users: Vec<i64> = (5001..5041).collect();
    let ids = old_orders(&app, &users, 10_000, FINAL).await;
    let claims_before = app.count_commerce_rows("order_claims").await;
    let _one = PASSES.lock().await;

    let dry = pass(
        &app,
        &PassOptions {
            dry_run: true,
            ..pass_options(700)
        },
    )
    .await
    .unwrap();
    assert_eq!(dry.moved(), 10_000, "the dry run counts every old final order");
    assert_eq!(
        places(&app, &ids).await.values().filter(|p| p.0).count(),
        10_000,
        "a dry run moves nothing"
    );

    let export = tempfile::tempdir().unwrap();
    let opts = PassOptions {
        export_dir: Some(export.path().to_owned()),
        ..pass_options(700)
    };
    let done = pass(&app, &opts).await.unwrap();
    assert_eq!(done.moved(), 10_000, "{done:?}");
    assert!(
        done.shards.iter().any(|s| s.batches > 1),
        "some shard took several batches"
    );

    let all: HashSet<i64> = ids.iter().map(|i| i.get()).collect();
    assert_each_in_one_place(&app, &ids, &all).await;
    for table in ["orders", "order_items", "order_payments", "order_discounts"] {
        assert_eq!(
            app.count_shard_rows(table).await,
            0,
            "{table} still holds archived orders"
        );
    }
    assert_eq!(
        app.count_commerce_rows("order_claims").await,
        claims_before - 10_000,
        "the claims of archived orders are pruned"
    );
    assert_eq!(app.count_commerce_rows("stock_reservations").await, 0);
    assert_eq!(
        exported_ids(export.path()),
        all,
        "the export holds every moved order"
    );

    // Every shard's checkpoint says its pass reached its bound.
    let archive = app.archive_pool().await;
    let rows: Vec<(i32, i64, i64, i8)> =
        sqlx::query_as("SELECT shard, bound, resume_after, done FROM archive_checkpoints ORDER BY shard")
            .fetch_all(&archive)
            .await
            .unwrap();
    assert_eq!(rows.len(), app.settings.shards.count as usize);
    let now = chrono::Utc::now();
    let cutoff = OrderId::lower_bound_at(now - TimeDelta::days(90));
    let minute = cutoff - OrderId::lower_bound_at(now - TimeDelta::days(90) - TimeDelta::minutes(1));
    for (shard, bound, resume_after, done) in rows {
        assert_eq!(
            (resume_after, done),
            (bound, 1),
            "shard {shard}: the pass reached its bound"
        );
        assert!(
            bound <= cutoff && bound > cutoff - minute,
            "shard {shard}: bound {bound} is the 90-day cutoff {cutoff}"
        );
    }
    // A second pass finds nothing more to move.
    assert_eq!(pass(&app, &pass_options(700)).await.unwrap().moved(), 0);
}

#[tokio::test]
async fn old_orders_that_are_not_final_stay_until_a_later_pass_after_they_end() {
    let app = app().await;
    let ids = old_orders(
        &app,
        &[6001, 6002],
        40,
        &[
            OrderStatus::Completed,
            OrderStatus::Shipped,
            OrderStatus::PendingPayment,
            OrderStatus::Closed,
        ],
    )
    .await;
    let _one = PASSES.lock().await;
    let first = pass(&app, &pass_options(7)).await.unwrap();
    assert_eq!(first.moved(), 20);
    let finals: HashSet<i64> = ids
        .iter()
        .step_by(4)
        .chain(ids.iter().skip(3).step_by(4))
        .map(|i| i.get())
        .collect();
    assert_each_in_one_place(&app, &ids, &finals).await;

    // The buyer confirms the shipped ones, the sweeper closes the unpaid ones.
    for (i, id) in ids.iter().enumerate() {
        let user = [6001, 6002][i % 2];
        match i % 4 {
            1 => {
                let (s, b) = app
                    .call(
                        "POST",
                        &format!("/v1/orders/{id}/confirm"),
                        Some(&app.user_token(user)),
                        Some(json!({"expected_version": 3})),
                    )
                    .await;
                assert_eq!(s, StatusCode::OK, "{b}");
            }
            2 => {
                let (s, b) = app
                    .call(
                        "POST",
                        &format!("/v1/orders/{id}/cancel"),
                        Some(&app.user_token(user)),
                        Some(json!({"expected_version": 1})),
                    )
                    .await;
                assert_eq!(s, StatusCode::OK, "{b}");
            }
            _ => {}
        }
    }
    let second = pass(&app, &pass_options(7)).await.unwrap();
    assert_eq!(
        second.moved(),
        20,
        "the orders that ended since move on the next pass"
    );
    let all: HashSet<i64> = ids.iter().map(|i| i.get()).collect();
    assert_each_in_one_place(&app, &ids, &all).await;
}

/// Kill the pass at each failpoint, run it again: every order in exactly one place.
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a_pass_killed_at_each_failpoint_and_run_again_leaves_every_order_in_one_place() {
    let app = TestApp::spawn_with(|s| {
        s.sweeper.interval_secs = 3600;
        s.archive.delete_chunk = 7;
    })
    .await;
    let users: Vec<i64> = (7001..7009).collect();
    let mut ids = Vec::new();
    let _one = PASSES.lock().await;
    let scenario = fail::FailScenario::setup();
    let export = tempfile::tempdir().unwrap();
    let opts = PassOptions {
        export_dir: Some(export.path().to_owned()),
        ..pass_options(40)
    };
    let mut kept_hot = HashSet::new();
    for point in [
        "archive::export",
        "archive::after_commit",
        "archive::between_deletes",
    ] {
        // A fresh set of old orders for each crash (the last pass moved every earlier one).
        ids.extend(old_orders(&app, &users, 300, FINAL).await);
        let all: HashSet<i64> = ids.iter().map(|i| i.get()).collect();
        // Fires on its third visit: some batches are through, one is cut off.
        fail::cfg(point, "2*off->return").unwrap();
        let err = pass(&app, &opts)
            .await
            .expect_err("the pass stops at the failpoint");
        assert!(err.to_string().contains(point), "{point}: {err}");
        fail::remove(point);
        let at = places(&app, &ids).await;
        assert!(
            at.values().all(|(hot, arch)| *hot || *arch),
            "{point}: an order is in neither place"
        );
        assert!(
            at.values().any(|(hot, _)| *hot),
            "{point}: the pass was cut off early"
        );
        // An order caught in both places takes money before the re-run: its archived copy
        // is stale then, and the order (now refund_required) must stay hot, alone.
        if let Some((&both, _)) = at.iter().find(|(_, (hot, arch))| *hot && *arch) {
            let body = json!({"transaction_no": format!("late-{both}"), "channel": "alipay", "amount": 1000});
            let (s, b) = app
                .call(
                    "POST",
                    &format!("/v1/orders/{both}/payments"),
                    Some(&app.service_token()),
                    Some(body),
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{b}");
            assert_eq!(b["refund_required"], true, "{b}");
            assert!(b.get("archived").is_none(), "paid in its shard: {b}");
            kept_hot.insert(both);
        } else {
            assert_ne!(
                point, "archive::after_commit",
                "the crash after the archive commit leaves its batch in both places"
            );
        }
        // Run again after each crash, then check every id.
        pass(&app, &opts).await.unwrap();
        let archived: HashSet<i64> = all.difference(&kept_hot).copied().collect();
        assert_each_in_one_place(&app, &ids, &archived).await;
        assert!(
            archived.is_subset(&exported_ids(export.path())),
            "{point}: the export holds every moved order"
        );
    }
    scenario.teardown();
}

#[tokio::test]
#[ignore = "slow group: .ci/run runs it (cargo test --test api -- --ignored)"]
async fn live_creates_and_reads_during_a_pass_never_miss_an_order() {
    let app = app().await;
    let users: Vec<i64> = (8001..8011).collect();
    let ids = old_orders(&app, &users, 3000, FINAL).await;
    let catalog = app.catalog(&[1_000_000]).await;
    let _one = PASSES.lock().await;
    let opts = PassOptions {
        pause: Duration::from_millis(20),
        ..pass_options(150)
    };
    let passing = {
        let settings = app.settings.clone();
        tokio::spawn(async move { orderly::app::archive_pass(&settings, &opts).await })
    };
    let mut reads = 0;
    let mut creates = 0;
    let mut lists = 0;
    let mut i = 0usize;
    while !passing.is_finished() {
        // Old orders cycle through the users: order k is user k's (mod the users).
        let k = (i * 7919) % ids.len();
        let (id, user) = (ids[k], users[k % users.len()]);
        let (s, b) = app.get_order(user, &id.to_string()).await;
        assert_eq!(s, StatusCode::OK, "order {id} missing during the pass: {b}");
        reads += 1;
        if i.is_multiple_of(5) {
            // A whole user's list, two pages at a time with the cursor: every order once.
            let want: HashSet<String> = ids
                .iter()
                .enumerate()
                .filter(|(k, _)| users[k % users.len()] == user)
                .map(|(_, o)| o.to_string())
                .collect();
            let seen = list_all(&app, user, "limit=100").await;
            let seen: HashSet<String> = seen
                .iter()
                .map(|o| o["order_id"].as_str().unwrap().to_owned())
                .collect();
            assert!(
                want.is_subset(&seen),
                "user {user}: {} of {} orders listed during the pass",
                want.intersection(&seen).count(),
                want.len()
            );
            lists += 1;
        }
        if i.is_multiple_of(3) {
            app.place_order(9000 + (i % 50) as i64, &[(&catalog.products[0], 1)])
                .await;
            creates += 1;
        }
        i += 1;
    }
    let done = passing.await.unwrap().unwrap();
    assert_eq!(done.moved(), 3000);
    assert!(
        reads > 20 && creates > 5 && lists > 3,
        "traffic ran during the pass: {reads} reads, {creates} creates, {lists} lists"
    );
}

/// Every order of `user` through `GET /v1/orders?{query}`, following the cursor.
async fn list_all(app: &TestApp, user: i64, query: &str) -> Vec<Value> {
    let token = app.user_token(user);
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/orders?{query}&cursor={c}"),
            None => format!("/v1/orders?{query}"),
        };
        let (s, b) = app.call("GET", &path, Some(&token), None).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        out.extend(b["orders"].as_array().unwrap().iter().cloned());
        match b["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return out,
        }
    }
}

#[tokio::test]
async fn archived_orders_read_as_before_and_money_for_them_is_recorded() {
    let app = app().await;
    let user = 9501;
    let ids = old_orders(&app, &[user], 30, FINAL).await;
    // Young orders of the same buyer: lists straddle the hot window and the archive.
    let catalog = app.catalog(&[100]).await;
    for _ in 0..5 {
        app.place_order(user, &[(&catalog.products[0], 1)]).await;
    }
    let token = app.user_token(user);
    let mut before = HashMap::new();
    for id in &ids {
        let (s, b) = app
            .call(
                "GET",
                &format!("/v1/orders/{id}?consistency=strong"),
                Some(&token),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        before.insert(id.get(), b);
    }
    let since =
        (chrono::Utc::now() - TimeDelta::days(130)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let queries = [
        "limit=7".to_owned(),
        "limit=4&consistency=strong".to_owned(),
        format!("limit=6&created_from={since}"),
        "limit=5&status=closed".to_owned(),
    ];
    let mut lists_before = Vec::new();
    for q in &queries {
        lists_before.push(list_all(&app, user, q).await);
    }
    assert_eq!(lists_before[0].len(), 35);

    let _one = PASSES.lock().await;
    assert_eq!(pass(&app, &pass_options(8)).await.unwrap().moved(), 30);
    drop(_one);

    for id in &ids {
        let (s, headers, b) = app
            .call_full(
                "GET",
                &format!("/v1/orders/{id}?consistency=strong"),
                Some(&token),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert_eq!(headers["served-by"], "archive");
        assert_eq!(b, before[&id.get()], "order {id} reads as it did before the move");
        // Another buyer still cannot see it.
        let (s, _) = app.get_order(user + 1, &id.to_string()).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }
    for (q, was) in queries.iter().zip(&lists_before) {
        assert_eq!(
            &list_all(&app, user, q).await,
            was,
            "GET /v1/orders?{q} lists as before the move"
        );
    }

    // Money for an archived order: recorded, flagged for refund, and said so.
    let closed = ids[1];
    assert_eq!(before[&closed.get()]["status"], "closed");
    let service = app.service_token();
    let body = json!({"transaction_no": "late-archived-1", "channel": "alipay", "amount": 1000});
    let path = format!("/v1/orders/{closed}/payments");
    let (s, paid) = app.call("POST", &path, Some(&service), Some(body.clone())).await;
    assert_eq!(s, StatusCode::OK, "{paid}");
    assert_eq!(paid["archived"], true);
    assert_eq!(paid["refund_required"], true);
    assert_eq!(
        paid["version"],
        before[&closed.get()]["version"].as_i64().unwrap() + 1
    );
    assert!(
        paid.get("address").is_none(),
        "the payment channel learns nothing about the buyer"
    );
    // A retry answers the same and records nothing more; the number cannot pay another order.
    let (s, again) = app.call("POST", &path, Some(&service), Some(body.clone())).await;
    assert_eq!(
        (s, &again["version"]),
        (StatusCode::OK, &paid["version"]),
        "{again}"
    );
    let (s, other) = app
        .call(
            "POST",
            &format!("/v1/orders/{}/payments", ids[4]),
            Some(&service),
            Some(body),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{other}");
    let (_, now) = app
        .call(
            "GET",
            &format!("/v1/orders/{closed}?consistency=strong"),
            Some(&token),
            None,
        )
        .await;
    let payments = now["payments"].as_array().unwrap();
    assert_eq!(
        payments
            .iter()
            .filter(|p| p["transaction_no"] == "late-archived-1")
            .count(),
        1
    );
    assert_eq!(now["refund_required"], true);
    // The cached read (session) sees the payment too, and so does the merchant copy, through
    // the archive's outbox and its relay.
    let (_, cached) = app.get_order(user, &closed.to_string()).await;
    assert_eq!(cached["version"], paid["version"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let copy = app.merchant_copy().await;
        let row = copy.iter().find(|(o, ..)| *o == closed.get());
        if row.map(|(_, v, ..)| *v) == paid["version"].as_i64() {
            let doc: Value = serde_json::from_str(&row.unwrap().3).unwrap();
            assert_eq!(doc["refund_required"], true, "{doc}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the merchant copy never saw the archived order's payment: {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Refunds follow the shard's rules: only the excess goes back, and once it has the
    // flag clears; a refund beyond it is refused and records nothing.
    let refund = |no: &str, amount: i64| json!({"refund_no": no, "amount": amount, "reason": "late payment of a closed order"});
    let path = format!("/v1/orders/{closed}/refunds");
    let (s, b) = app
        .call("POST", &path, Some(&service), Some(refund("late-refund-0", 1001)))
        .await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::CONFLICT, Some("payment_mismatch")),
        "{b}"
    );
    let (s, headers, refunded) = app
        .call_full("POST", &path, Some(&service), Some(refund("late-refund-1", 1000)))
        .await;
    assert_eq!(s, StatusCode::OK, "{refunded}");
    // Its token names the order's shard database (at the delete's position or later), so a
    // read that sends it back never gets the order's last hot version from a lagging replica.
    let token_header = headers["consistency-token"].to_str().unwrap();
    assert!(token_header.starts_with('o'), "{token_header}");
    assert_eq!(
        (&refunded["archived"], &refunded["refund_required"]),
        (&json!(true), &json!(false)),
        "{refunded}"
    );
    assert_eq!(refunded["version"], paid["version"].as_i64().unwrap() + 1);
    let (s, b) = app
        .call("POST", &path, Some(&service), Some(refund("late-refund-2", 1000)))
        .await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::CONFLICT, Some("invalid_transition")),
        "{b}"
    );
    let (_, now) = app
        .call(
            "GET",
            &format!("/v1/orders/{closed}?consistency=strong"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(
        now["version"], refunded["version"],
        "a refused refund records nothing"
    );

    // Every other change is refused as archived, and writes nothing.
    let (s, b) = app
        .call(
            "POST",
            &format!("/v1/orders/{}/cancel", ids[0]),
            Some(&token),
            Some(json!({"expected_version": before[&ids[0].get()]["version"]})),
        )
        .await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::CONFLICT, Some("archived")),
        "{b}"
    );
    let (s, b) = app
        .call(
            "PATCH",
            &format!("/v1/orders/{}", ids[0]),
            Some(&token),
            Some(json!({"expected_version": 4, "remark": "too late"})),
        )
        .await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::CONFLICT, Some("archived")),
        "{b}"
    );
    let (_, still) = app
        .call(
            "GET",
            &format!("/v1/orders/{}?consistency=strong", ids[0]),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(still, before[&ids[0].get()]);
}

#[tokio::test]
async fn serve_archives_in_the_background_beside_a_twin_process() {
    let _one = PASSES.lock().await;
    let app = TestApp::spawn_with(|s| {
        s.sweeper.interval_secs = 3600;
        s.archive.run_in_serve = true;
        s.archive.interval_secs = 1;
        s.archive.batch_size = 50;
        s.archive.pause_ms = 10;
    })
    .await;
    // A second process on the same databases: each shard's lock keeps them apart.
    let twin = app.twin().await;
    let ids = old_orders(&app, &(9601..9611).collect::<Vec<_>>(), 600, FINAL).await;
    let all: HashSet<i64> = ids.iter().map(|i| i.get()).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let at = places(&app, &ids).await;
        if at.values().all(|(hot, arch)| !hot && *arch) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {} orders archived in the background",
            at.values().filter(|(hot, arch)| !hot && *arch).count(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_each_in_one_place(&app, &ids, &all).await;
    drop(twin);
}

/// An app like [`app`]'s whose archive database is on a MariaDB server of the test's own,
/// which the test stops or freezes while the shards stay up on the shared cluster. Archive
/// reads wait at most `read_timeout_ms`.
async fn app_with_own_archive(read_timeout_ms: u64) -> (LocalCluster, TestApp) {
    crate::helpers::app_with_own_archive(|s| {
        s.sweeper.interval_secs = 3600;
        s.archive.min_age_days = 30;
        s.archive.older_than_days = 90;
        s.archive.read_timeout_ms = read_timeout_ms;
    })
    .await
}

/// How the archive's server is down.
#[derive(Debug, Clone, Copy)]
enum Outage {
    /// SIGSTOP: connections hang instead of failing.
    Frozen,
    /// Shut down: connections are refused.
    Stopped,
}

async fn begin(own: &LocalCluster, outage: Outage) {
    match outage {
        Outage::Frozen => own.pause_mariadb(0).unwrap(),
        Outage::Stopped => own.stop_mariadb(0).await.unwrap(),
    }
}

async fn end(own: &LocalCluster, outage: Outage) {
    match outage {
        Outage::Frozen => own.resume_mariadb(0).unwrap(),
        Outage::Stopped => own.start_mariadb(0).await.unwrap(),
    }
}

/// A user after `from` on the same table shard as `user`.
fn same_shard(app: &TestApp, user: i64, from: i64) -> i64 {
    let shards = &app.raw;
    let of = |u: i64| shards.of_user(UserId::new(u).unwrap()).index;
    (from..).find(|u| of(*u) == of(user)).unwrap()
}

/// `GET path` as `user`, with how long it took.
async fn timed_get(app: &TestApp, user: i64, path: &str) -> (StatusCode, Value, Duration) {
    let started = std::time::Instant::now();
    let (s, b) = app.call("GET", path, Some(&app.user_token(user)), None).await;
    (s, b, started.elapsed())
}

fn listed_ids(page: &Value) -> Vec<String> {
    page["orders"]
        .as_array()
        .unwrap_or_else(|| panic!("not a page: {page}"))
        .iter()
        .map(|o| o["order_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_without_archived_orders_lists_at_once_while_the_archive_is_stopped_or_frozen() {
    const READ_TIMEOUT_MS: u64 = 5000;
    // "At once": far below the archive's read timeout (a list that waited for the archive
    // would take all of it), with room for a slow test machine.
    const AT_ONCE: Duration = Duration::from_millis(READ_TIMEOUT_MS / 5);
    let (own, app) = app_with_own_archive(READ_TIMEOUT_MS).await;
    let user = 9701;
    // Hot orders only, old enough for the archive and young: old ones that are not final
    // stay in the shard whatever a pass does.
    let old_hot = old_orders(&app, &[user], 3, &[OrderStatus::Shipped]).await;
    let catalog = app.catalog(&[100]).await;
    let mut young = Vec::new();
    for _ in 0..2 {
        let o = app.place_order(user, &[(&catalog.products[0], 1)]).await;
        young.push(o["order_id"].as_str().unwrap().to_owned());
    }
    // A neighbour on the same shard has archived orders: the shard's archive is not empty.
    let neighbour = same_shard(&app, user, 9702);
    old_orders(&app, &[neighbour], 4, FINAL).await;
    let _one = PASSES.lock().await;
    assert_eq!(pass(&app, &pass_options(50)).await.unwrap().moved(), 4);
    drop(_one);

    let mut all: Vec<String> = young.iter().rev().cloned().collect();
    all.extend(old_hot.iter().map(|i| i.to_string()));
    let queries = [
        // The cached first page (session), then the server: a second time hits the cache.
        ("limit=10", all.clone()),
        ("limit=10", all.clone()),
        ("limit=50&consistency=strong", all.clone()),
        ("limit=2&consistency=eventual", all[..2].to_vec()),
        ("limit=10&status=shipped", all[2..].to_vec()),
    ];
    for outage in [Outage::Frozen, Outage::Stopped] {
        begin(&own, outage).await;
        let mut failures = Vec::new();
        for (q, want) in &queries {
            let (s, b, took) = timed_get(&app, user, &format!("/v1/orders?{q}")).await;
            if s != StatusCode::OK || took >= AT_ONCE || !b["archive"].is_null() || listed_ids(&b) != *want {
                failures.push(format!("GET /v1/orders?{q}: {s} after {took:?}: {b}"));
            }
        }
        // An old order its shard holds is read without the archive.
        let path = format!("/v1/orders/{}", old_hot[0]);
        let (s, b, took) = timed_get(&app, user, &path).await;
        if s != StatusCode::OK || took >= AT_ONCE {
            failures.push(format!("GET {path}: {s} after {took:?}: {b}"));
        }
        end(&own, outage).await;
        assert!(
            failures.is_empty(),
            "archive {outage:?}: a buyer without archived orders waited for it or was refused:\n{}",
            failures.join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_with_archived_orders_gets_the_hot_part_flagged_while_the_archive_is_down_and_everything_once_it_is_back(
) {
    const READ_TIMEOUT_MS: u64 = 1000;
    // A list waits for a down archive at most its read timeout (plus the list's own work).
    const BOUND: Duration = Duration::from_millis(READ_TIMEOUT_MS + 2000);
    let (own, app) = app_with_own_archive(READ_TIMEOUT_MS).await;
    let user = 9801;
    let archived = old_orders(&app, &[user], 12, FINAL).await;
    // Old orders that stay hot, created at the same times as the archived ones: the hot
    // part and the archive interleave.
    let old_hot = old_orders(&app, &[user], 3, &[OrderStatus::Shipped]).await;
    let catalog = app.catalog(&[100]).await;
    for _ in 0..4 {
        app.place_order(user, &[(&catalog.products[0], 1)]).await;
    }
    let _one = PASSES.lock().await;
    assert_eq!(pass(&app, &pass_options(50)).await.unwrap().moved(), 12);
    drop(_one);
    let everything = list_all(&app, user, "limit=7").await;
    assert_eq!(everything.len(), 19);
    let all: Vec<String> = everything
        .iter()
        .map(|o| o["order_id"].as_str().unwrap().to_owned())
        .collect();
    let cold: HashSet<String> = archived.iter().map(|i| i.to_string()).collect();
    let hot: Vec<String> = all.iter().filter(|o| !cold.contains(*o)).cloned().collect();
    assert_eq!(hot.len(), 7);

    for outage in [Outage::Frozen, Outage::Stopped] {
        begin(&own, outage).await;
        let mut failures = Vec::new();
        for q in ["limit=10", "limit=10", "limit=50", "limit=50&consistency=strong"] {
            let (s, b, took) = timed_get(&app, user, &format!("/v1/orders?{q}")).await;
            if s != StatusCode::OK || took >= BOUND || b["archive"] != "unavailable" || listed_ids(&b) != hot
            {
                failures.push(format!("GET /v1/orders?{q}: {s} after {took:?}: {b}"));
            }
        }
        // An order only the archive holds cannot be read now, and says so in time.
        let path = format!("/v1/orders/{}", archived[0]);
        let (s, b, took) = timed_get(&app, user, &path).await;
        if s != StatusCode::SERVICE_UNAVAILABLE || took >= BOUND {
            failures.push(format!("GET {path}: {s} after {took:?}: {b}"));
        }
        // One its shard holds is read as ever.
        let path = format!("/v1/orders/{}", old_hot[0]);
        let (s, b, took) = timed_get(&app, user, &path).await;
        if s != StatusCode::OK || took >= BOUND {
            failures.push(format!("GET {path}: {s} after {took:?}: {b}"));
        }
        end(&own, outage).await;
        assert!(
            failures.is_empty(),
            "archive {outage:?}: the list was not its hot part, flagged, in time:\n{}",
            failures.join("\n")
        );
        // Back up: the whole list again, unflagged (the first reads may still meet
        // connections that died with the server).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (s, b, _) = timed_get(&app, user, "/v1/orders?limit=50").await;
            if s == StatusCode::OK && b["archive"].is_null() && listed_ids(&b) == all {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "archive back after {outage:?}, the list is still not whole: {s} {b}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(list_all(&app, user, "limit=7").await, everything);
    }
}
