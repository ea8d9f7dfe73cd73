//! SPEC 6: the merchant copy sharded by shop and the daily reports, kept from the event
//! stream: they show every order change within a bounded time, are idempotent by version
//! (a replay or an older event changes nothing) and equal what the shards say, also with
//! two appliers at once (two `serve` processes, or a rebuild beside a running consumer).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use orderly::domain::events::{event_id, OrderEvent};
use orderly::domain::ids::OrderId;
use orderly::events::consumer::{self, Batch, Projection, StartAt};
use orderly::events::merchant::MerchantCopy;
use orderly::events::Broker;
use orderly::storage::merchant::{self as copy_store, MerchantMap};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::AssertSqlSafe;

use crate::helpers::TestApp;

async fn list(app: &TestApp, shop: &str, token: &str, query: &str) -> (StatusCode, Value) {
    app.call(
        "GET",
        &format!("/v1/shops/{shop}/orders{query}"),
        Some(token),
        None,
    )
    .await
}

fn today(app: &TestApp) -> String {
    let offset = chrono::TimeDelta::minutes(i64::from(app.settings.merchant.report_utc_offset_minutes));
    (Utc::now() + offset).date_naive().to_string()
}

#[tokio::test]
async fn a_shipped_order_reaches_the_merchant_list_and_its_report_in_bounded_time() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[50, 50]).await;
    let merchant = app.merchant_token(cat.shop);
    let shop = cat.shop.to_string();
    let order = app
        .place_order(31, &[(&cat.products[0], 2), (&cat.products[1], 1)])
        .await;
    let id = order["order_id"].as_str().unwrap().to_owned();
    assert_eq!(app.pay(&order).await.0, StatusCode::OK);
    let (s, shipped) = app
        .call(
            "POST",
            &format!("/v1/orders/{id}/shipment"),
            Some(&merchant),
            Some(json!({"expected_version": 2, "carrier": "SF", "tracking_number": "SF9"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{shipped}");

    // Bounded: poll the merchant's own list until the shipped version shows.
    let deadline = Instant::now() + Duration::from_secs(20);
    let page = loop {
        let (s, page) = list(&app, &shop, &merchant, "").await;
        assert_eq!(s, StatusCode::OK, "{page}");
        if page["orders"][0]["version"] == 3 {
            break page;
        }
        assert!(
            Instant::now() < deadline,
            "the copy never showed the shipment: {page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(page["orders"].as_array().unwrap().len(), 1);
    // The copy's order is the order, field for field.
    let (_, direct) = app.get_order(31, &id).await;
    assert_eq!(page["orders"][0], direct);
    assert_eq!(page["orders"][0]["status"], "shipped");
    assert!(page["copy"]["applied_through"].is_string(), "{page}");
    assert!(page["copy"]["pending_events"].is_number());

    // Filters and the keyset cursor.
    let (_, paid_only) = list(&app, &shop, &merchant, "?status=awaiting_shipment").await;
    assert_eq!(paid_only["orders"].as_array().unwrap().len(), 0);
    let second = app.place_order(32, &[(&cat.products[0], 1)]).await;
    let want: HashMap<i64, i64> = [
        (id.parse().unwrap(), 3),
        (second["order_id"].as_str().unwrap().parse().unwrap(), 1),
    ]
    .into_iter()
    .collect();
    app.wait_copy(&want, Duration::from_secs(20)).await;
    let (_, first_page) = list(&app, &shop, &merchant, "?limit=1").await;
    assert_eq!(
        first_page["orders"][0]["order_id"], second["order_id"],
        "newest first"
    );
    let cursor = first_page["next_cursor"].as_str().unwrap();
    let (_, next) = list(&app, &shop, &merchant, &format!("?limit=1&cursor={cursor}")).await;
    assert_eq!(next["orders"][0]["order_id"], id.as_str());
    assert!(next["next_cursor"].is_null());

    // The report of today.
    let day = today(&app);
    let (s, report) = app
        .call(
            "GET",
            &format!("/v1/shops/{shop}/reports/daily?from={day}&to={day}"),
            Some(&merchant),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{report}");
    let d = &report["days"][0];
    assert_eq!(d["day"], day.as_str());
    assert_eq!((d["orders"].as_i64(), d["units"].as_i64()), (Some(2), Some(4)));
    let paid = order["pay_amount"].as_i64().unwrap();
    assert_eq!(d["paid_amount"].as_i64(), Some(paid));
    assert_eq!(
        d["gross_amount"].as_i64(),
        Some(order["total_amount"].as_i64().unwrap() + second["total_amount"].as_i64().unwrap())
    );
    assert_eq!(
        (
            d["by_status"]["shipped"].as_i64(),
            d["by_status"]["pending_payment"].as_i64()
        ),
        (Some(1), Some(1))
    );
}

#[tokio::test]
async fn another_shops_merchant_gets_404_and_buyers_403_on_lists_and_reports() {
    let app = TestApp::spawn().await;
    let mine = app.catalog(&[10]).await;
    let theirs = app.catalog(&[10]).await;
    let shop = mine.shop.to_string();
    let day = today(&app);
    let paths = [
        format!("/v1/shops/{shop}/orders"),
        format!("/v1/shops/{shop}/reports/daily?from={day}&to={day}"),
    ];
    for path in &paths {
        let other = app.merchant_token(theirs.shop);
        let (s, b) = app.call("GET", path, Some(&other), None).await;
        assert_eq!(
            (s, b["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "{path}"
        );
        let (s, _) = app.call("GET", path, Some(&app.user_token(5)), None).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}");
        let (s, _) = app.call("GET", path, Some(&app.service_token()), None).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}");
        for token in [app.merchant_token(mine.shop), app.admin_token()] {
            let (s, b) = app.call("GET", path, Some(&token), None).await;
            assert_eq!(s, StatusCode::OK, "{path}: {b}");
        }
    }
    // Bad input is a 422 problem.
    let merchant = app.merchant_token(mine.shop);
    for query in ["?limit=0", "?status=lost", "?cursor=nope", "?colour=red"] {
        let (s, b) = list(&app, &shop, &merchant, query).await;
        assert_eq!(
            (s, b["code"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("validation_failed")),
            "{query}"
        );
    }
    for query in [
        "",
        "?from=2026-01-02&to=2026-01-01",
        "?from=2026-01-01&to=2027-06-01",
        "?from=x&to=y",
    ] {
        let (s, b) = app
            .call(
                "GET",
                &format!("/v1/shops/{shop}/reports/daily{query}"),
                Some(&merchant),
                None,
            )
            .await;
        assert_eq!(
            (s, b["code"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("validation_failed")),
            "{query}"
        );
    }
}

/// shop, day, status, gross, discount, units, paid, refunded of one order.
type ShardOrderRow = (i64, String, i8, i64, i64, i64, i64, i64);

/// Report rows computed directly over every shard: `shop,day,orders,units,gross,discounts,
/// paid,refunded,status_0..5`, as the copy's table holds them.
async fn reports_from_shards(app: &TestApp) -> Vec<String> {
    let offset = app.settings.merchant.report_utc_offset_minutes;
    let mut sums: BTreeMap<(i64, String), [i64; 13]> = BTreeMap::new();
    for shard in app.raw.all() {
        let t = &shard.tables;
        let sql = format!(
            "SELECT o.shop_id, CAST(DATE(o.created_at + INTERVAL {offset} MINUTE) AS CHAR),
                o.status, o.total_amount, o.discount_amount,
                CAST((SELECT COALESCE(SUM(quantity), 0) FROM {items} i WHERE i.order_id = o.order_id) AS SIGNED),
                CAST((SELECT COALESCE(SUM(amount), 0) FROM {payments} p WHERE p.order_id = o.order_id AND p.kind = 0) AS SIGNED),
                CAST((SELECT COALESCE(SUM(amount), 0) FROM {payments} p WHERE p.order_id = o.order_id AND p.kind = 1) AS SIGNED)
             FROM {orders} o",
            items = t.items,
            payments = t.payments,
            orders = t.orders
        );
        let rows: Vec<ShardOrderRow> = sqlx::query_as(AssertSqlSafe(sql))
            .fetch_all(app.raw.primary(shard))
            .await
            .unwrap();
        for (shop, day, status, gross, discount, units, paid, refunded) in rows {
            let s = sums.entry((shop, day)).or_default();
            s[0] += 1;
            s[1] += units;
            s[2] += gross;
            s[3] += discount;
            s[4] += paid;
            s[5] += refunded;
            s[6 + status as usize] += 1;
        }
    }
    let mut rows: Vec<String> = sums
        .into_iter()
        .map(|((shop, day), s)| {
            let figures: Vec<String> = s[..12].iter().map(i64::to_string).collect();
            format!("{shop},{day},{}", figures.join(","))
        })
        .collect();
    rows.sort();
    rows
}

#[tokio::test]
async fn report_totals_equal_the_sums_over_every_shard() {
    let app = TestApp::spawn().await;
    let a = app.catalog(&[500, 500]).await;
    let b = app.catalog(&[500]).await;
    let service = app.service_token();
    let mut want = HashMap::new();
    for n in 0..24i64 {
        let user = 100 + n;
        let product = match n % 3 {
            0 => &a.products[0],
            1 => &a.products[1],
            _ => &b.products[0],
        };
        let mut body = TestApp::order_body(&app.new_order_id(user).await, &[(product, 1 + n % 4)]);
        if n % 5 == 0 {
            body["coupon_ids"] = json!([app.coupon(user, 100, 500).await]);
        }
        let (s, o) = app.create_order(user, body).await;
        assert_eq!(s, StatusCode::CREATED, "{o}");
        let id = o["order_id"].as_str().unwrap().to_owned();
        let mut version = 1;
        match n % 4 {
            1 => {
                version = app.pay(&o).await.1["version"].as_i64().unwrap();
            }
            2 => {
                app.pay(&o).await;
                let (s, r) = app
                    .call(
                        "POST",
                        &format!("/v1/orders/{id}/refunds"),
                        Some(&service),
                        Some(json!({"refund_no": format!("rf-{id}"), "amount": 100, "reason": "part"})),
                    )
                    .await;
                assert_eq!(s, StatusCode::OK, "{r}");
                version = r["version"].as_i64().unwrap();
            }
            3 => {
                let (s, c) = app
                    .call(
                        "POST",
                        &format!("/v1/orders/{id}/cancel"),
                        Some(&app.user_token(user)),
                        Some(json!({"expected_version": 1, "reason": "no"})),
                    )
                    .await;
                assert_eq!(s, StatusCode::OK, "{c}");
                version = c["version"].as_i64().unwrap();
            }
            _ => {}
        }
        want.insert(id.parse::<i64>().unwrap(), version);
    }
    app.wait_copy(&want, Duration::from_secs(30)).await;
    let from_shards = reports_from_shards(&app).await;
    assert_eq!(from_shards.len(), 2, "two shops, one day: {from_shards:?}");
    assert_eq!(app.merchant_reports().await, from_shards);
}

/// A projection of the test's own app, fed by hand: the app runs no consumer of its own.
async fn copy_and_broker(app: &TestApp) -> (MerchantCopy, Broker) {
    let broker = Broker::connect(&app.settings.events).await.expect("nats");
    (MerchantCopy::new(app.app.merchant.map().clone()), broker)
}

/// A second applier of the copy on pools of its own: what another `serve` process (or a
/// rebuild beside one) is to the first.
async fn second_copy(app: &TestApp) -> MerchantCopy {
    let map = MerchantMap::connect(&app.settings.merchant, &app.settings.database)
        .await
        .expect("merchant databases");
    MerchantCopy::new(map)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_stream_twice_or_an_older_event_changes_nothing() {
    let app = TestApp::spawn_with(|s| s.merchant.consume = false).await;
    let cat = app.catalog(&[100]).await;
    let merchant = app.merchant_token(cat.shop);
    for user in 1..=5 {
        let o = app.place_order(user, &[(&cat.products[0], user)]).await;
        if user % 2 == 1 {
            app.pay(&o).await;
        }
        if user == 1 {
            let id = o["order_id"].as_str().unwrap();
            let (s, _) = app
                .call(
                    "POST",
                    &format!("/v1/orders/{id}/shipment"),
                    Some(&merchant),
                    Some(json!({"expected_version": 2, "carrier": "SF", "tracking_number": "R1"})),
                )
                .await;
            assert_eq!(s, StatusCode::OK);
        }
    }
    app.wait_outbox_drained(Duration::from_secs(20)).await;
    let (copy, broker) = copy_and_broker(&app).await;
    let other = second_copy(&app).await;
    // Two appliers on one durable consumer, as two `serve` processes share it: the events of
    // one order may go to either.
    let first = consumer::durable(&broker, copy.name(), StartAt::Beginning)
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        consumer::drain(&first, &copy, 1),
        consumer::drain(&first, &other, 1)
    );
    assert_eq!(a.unwrap() + b.unwrap(), 9, "5 created, 3 paid, 1 shipped");
    let tables = (app.merchant_copy().await, app.merchant_reports().await);
    assert_eq!(tables.0.len(), 5);
    assert_eq!(tables.1, reports_from_shards(&app).await);

    for replay in ["second", "third"] {
        // Both appliers replay the whole stream at once, each from a consumer of its own.
        let names = [format!("replay_{replay}_a"), format!("replay_{replay}_b")];
        let mut consumers = Vec::new();
        for name in &names {
            consumers.push(
                consumer::durable(&broker, name, StartAt::Beginning)
                    .await
                    .unwrap(),
            );
        }
        let (a, b) = tokio::join!(
            consumer::drain(&consumers[0], &copy, 4),
            consumer::drain(&consumers[1], &other, 3)
        );
        assert_eq!((a.unwrap(), b.unwrap()), (9, 9));
        assert_eq!(
            (app.merchant_copy().await, app.merchant_reports().await),
            tables,
            "{replay} replay"
        );
        for name in &names {
            consumer::delete(&broker, name).await.unwrap();
        }
    }

    // The oldest event of every order, delivered after the newest: nothing moves back.
    let events = app.stream_events().await;
    let mut oldest = Batch::default();
    for e in events.iter().filter(|e| e.order.version == 1) {
        oldest.events.push(e.clone());
    }
    assert_eq!(oldest.events.len(), 5);
    let (a, b) = tokio::join!(copy.apply(&oldest), other.apply(&oldest));
    a.unwrap();
    b.unwrap();
    assert_eq!((app.merchant_copy().await, app.merchant_reports().await), tables);
}

/// Applies `events` as one applier does: one transaction per database of the copy (the
/// events in the order given), each tried again while the database answers a deadlock (the
/// consumer's redelivery).
async fn apply_events(map: &MerchantMap, events: &[OrderEvent]) {
    let mut by_database: BTreeMap<usize, Vec<&OrderEvent>> = BTreeMap::new();
    for e in events {
        by_database
            .entry(map.table_of(e.order.shop_id).database)
            .or_default()
            .push(e);
    }
    for (database, events) in by_database {
        let mut tries = 0;
        loop {
            let progress = copy_store::Progress {
                pending: 0,
                newest: events.iter().map(|e| e.occurred_at).max(),
            };
            match copy_store::apply(map, database, &events, progress).await {
                Ok(_) => break,
                Err(e) if e.is_retryable() && tries < 100 => tries += 1,
                Err(e) => panic!("applying {} events: {e}", events.len()),
            }
        }
    }
}

/// shop, day, status, units, gross, discounts, paid, refunded of one row of the copy.
type CopyOrderRow = (i64, String, i8, i64, i64, i64, i64, i64);

/// Report rows summed over the copy's own rows, in the form of
/// [`TestApp::merchant_reports`].
async fn reports_from_copy(app: &TestApp) -> Vec<String> {
    let map = app.app.merchant.map();
    let mut sums: BTreeMap<(i64, String), [i64; 12]> = BTreeMap::new();
    for t in map.tables() {
        let rows: Vec<CopyOrderRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT shop_id, CAST(day AS CHAR), status, units, gross, discounts, paid, refunded
             FROM {}",
            t.name
        )))
        .fetch_all(map.pool(t))
        .await
        .unwrap();
        for (shop, day, status, units, gross, discounts, paid, refunded) in rows {
            let s = sums.entry((shop, day)).or_default();
            s[0] += 1;
            s[1] += units;
            s[2] += gross;
            s[3] += discounts;
            s[4] += paid;
            s[5] += refunded;
            s[6 + status as usize] += 1;
        }
    }
    let mut rows: Vec<String> = sums
        .into_iter()
        .map(|((shop, day), s)| {
            let figures: Vec<String> = s.iter().map(i64::to_string).collect();
            format!("{shop},{day},{}", figures.join(","))
        })
        .collect();
    rows.sort();
    rows
}

/// `event` as the event of another order (`order_id` of shop `shop_id`).
fn as_order(event: &OrderEvent, order_id: i64, shop_id: i64) -> OrderEvent {
    let mut e = event.clone();
    e.order.order_id = order_id;
    e.order.shop_id = shop_id;
    e.event_id = event_id(OrderId::new(order_id).unwrap(), e.order.version);
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_appliers_fed_the_same_events_concurrently_keep_the_newest_version_and_count_each_order_once() {
    const ROUNDS: usize = 12;
    const ORDERS_PER_ROUND: usize = 16;
    const SHOPS: i64 = 4;

    let app = TestApp::spawn_with(|s| s.merchant.consume = false).await;
    let cat = app.catalog(&[100, 100]).await;
    // One real order's created and paid events are the pattern of every order below.
    let real = app
        .place_order(7, &[(&cat.products[0], 2), (&cat.products[1], 1)])
        .await;
    assert_eq!(app.pay(&real).await.0, StatusCode::OK);
    app.wait_outbox_drained(Duration::from_secs(20)).await;
    let events = app.stream_events().await;
    let created = events.iter().find(|e| e.order.version == 1).unwrap();
    let paid = events.iter().find(|e| e.order.version == 2).unwrap();
    assert_eq!((created.order.status, paid.order.status), (0, 1));

    let first_id = created.order.order_id + 1_000;
    let orders: Vec<(OrderEvent, OrderEvent)> = (0..(ROUNDS * ORDERS_PER_ROUND) as i64)
        .map(|n| {
            let (id, shop) = (first_id + n, cat.shop.get() + n % SHOPS);
            (as_order(created, id, shop), as_order(paid, id, shop))
        })
        .collect();

    // Two appliers on pools of their own, like two processes.
    let connect = || MerchantMap::connect(&app.settings.merchant, &app.settings.database);
    let (map_a, map_b) = (connect().await.unwrap(), connect().await.unwrap());
    for (round, chunk) in orders.chunks(ORDERS_PER_ROUND).enumerate() {
        // Transactions of each applier, in its order; the two see every event.
        let (a, b): (Vec<Vec<OrderEvent>>, Vec<Vec<OrderEvent>>) = match round % 3 {
            // One transaction per order: created then paid, and paid then created.
            0 => (
                chunk.iter().map(|(c, p)| vec![c.clone(), p.clone()]).collect(),
                chunk.iter().map(|(c, p)| vec![p.clone(), c.clone()]).collect(),
            ),
            // One transaction of every created event and one of every paid event.
            1 => (
                vec![
                    chunk.iter().map(|(c, _)| c.clone()).collect(),
                    chunk.iter().map(|(_, p)| p.clone()).collect(),
                ],
                vec![
                    chunk.iter().map(|(_, p)| p.clone()).collect(),
                    chunk.iter().map(|(c, _)| c.clone()).collect(),
                ],
            ),
            // One transaction per event, the second applier from the last order backwards.
            _ => (
                chunk
                    .iter()
                    .flat_map(|(c, p)| [vec![c.clone()], vec![p.clone()]])
                    .collect(),
                chunk
                    .iter()
                    .rev()
                    .flat_map(|(c, p)| [vec![p.clone()], vec![c.clone()]])
                    .collect(),
            ),
        };
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let run = |map: MerchantMap, transactions: Vec<Vec<OrderEvent>>| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                for t in &transactions {
                    apply_events(&map, t).await;
                }
            })
        };
        let (ra, rb) = tokio::join!(run(map_a.clone(), a), run(map_b.clone(), b));
        ra.unwrap();
        rb.unwrap();
    }

    let copy: HashMap<i64, (i64, i64)> = app
        .merchant_copy()
        .await
        .into_iter()
        .map(|(o, v, s, _)| (o, (v, s)))
        .collect();
    assert_eq!(copy.len(), orders.len());
    let behind = orders
        .iter()
        .filter(|(_, p)| copy.get(&p.order.order_id) != Some(&(2, 1)))
        .count();
    assert_eq!(behind, 0, "orders not at their newest version (paid, 2)");

    let reports = app.merchant_reports().await;
    assert_eq!(
        reports,
        reports_from_copy(&app).await,
        "the reports are the sums of the copy"
    );
    // Every shop's orders counted once, each as paid.
    let per_shop = (orders.len() as i64) / SHOPS;
    let o = &paid.order;
    let units = o.units();
    let mut want: Vec<String> = (0..SHOPS)
        .map(|n| {
            let (paid, refunded) = o.paid_and_refunded();
            let day = app.app.merchant.map().day_of(o.created_at);
            format!(
                "{},{day},{per_shop},{},{},{},{},{},0,{per_shop},0,0,0,0",
                cat.shop.get() + n,
                per_shop * units,
                per_shop * o.total_amount,
                per_shop * o.discount_amount,
                per_shop * paid,
                per_shop * refunded,
            )
        })
        .collect();
    want.sort();
    assert_eq!(reports, want, "each order counted once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_racing_a_live_applier_counts_every_order_once() {
    let app = TestApp::spawn_with(|s| s.merchant.consume = false).await;
    let cat = app.catalog(&[500, 500]).await;
    let mut want = HashMap::new();
    for user in 1..=24i64 {
        let o = app
            .place_order(user, &[(&cat.products[(user % 2) as usize], 1 + user % 3)])
            .await;
        let mut version = 1;
        if user % 3 != 0 {
            version = app.pay(&o).await.1["version"].as_i64().unwrap();
        }
        want.insert(o["order_id"].as_str().unwrap().parse::<i64>().unwrap(), version);
    }
    app.wait_outbox_drained(Duration::from_secs(20)).await;
    let events = app.stream_events().await;
    assert_eq!(events.len(), 24 + 16);

    // The live applier replays the stream in small batches until the rebuilds are done.
    let live = second_copy(&app).await.map().clone();
    let done = Arc::new(AtomicBool::new(false));
    let passes = Arc::new(AtomicUsize::new(0));
    let applier = {
        let (done, passes, events) = (done.clone(), passes.clone(), events.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                for batch in events.chunks(3) {
                    apply_events(&live, batch).await;
                }
                passes.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let (copy, broker) = copy_and_broker(&app).await;
    let archive = app.archive_pool().await;
    for _ in 0..4 {
        let map = app.app.merchant.map().clone();
        let rebuilt = orderly::events::rebuild::rebuild(
            &broker,
            &app.shard_map().await,
            &archive,
            &copy,
            async move {
                copy_store::reset(&map)
                    .await
                    .map_err(orderly::events::consumer::ProjectionError::new)
            },
            false,
        )
        .await
        .unwrap();
        assert_eq!(rebuilt.orders, 24);
    }
    done.store(true, Ordering::SeqCst);
    applier.await.unwrap();
    assert!(passes.load(Ordering::SeqCst) > 0);

    app.wait_copy(&want, Duration::from_secs(1)).await;
    let reports = app.merchant_reports().await;
    assert_eq!(
        reports,
        reports_from_copy(&app).await,
        "the reports are the sums of the copy"
    );
    assert_eq!(
        reports,
        reports_from_shards(&app).await,
        "each order counted once"
    );
}

#[tokio::test]
async fn a_rebuild_from_the_shards_gives_the_same_copy_and_reports() {
    let app = TestApp::spawn_with(|s| s.merchant.consume = false).await;
    let cat = app.catalog(&[100]).await;
    for user in 1..=6 {
        let o = app.place_order(user, &[(&cat.products[0], 1)]).await;
        if user % 3 == 0 {
            app.pay(&o).await;
        }
    }
    app.wait_outbox_drained(Duration::from_secs(20)).await;
    let (copy, broker) = copy_and_broker(&app).await;
    let consumer_ = consumer::durable(&broker, copy.name(), StartAt::Beginning)
        .await
        .unwrap();
    consumer::drain(&consumer_, &copy, 100).await.unwrap();
    let before = (app.merchant_copy().await, app.merchant_reports().await);
    assert_eq!(before.0.len(), 6);

    let map = app.app.merchant.map().clone();
    let done = orderly::events::rebuild::rebuild(
        &broker,
        &app.shard_map().await,
        &app.archive_pool().await,
        &copy,
        async move {
            orderly::storage::merchant::reset(&map)
                .await
                .map_err(orderly::events::consumer::ProjectionError::new)
        },
        false,
    )
    .await
    .unwrap();
    assert_eq!(done.orders, 6);
    assert_eq!((app.merchant_copy().await, app.merchant_reports().await), before);

    // It follows the stream from where the backfill started: a later change arrives.
    let late = app.place_order(9, &[(&cat.products[0], 2)]).await;
    app.wait_outbox_drained(Duration::from_secs(20)).await;
    let follow = consumer::durable(&broker, copy.name(), StartAt::Beginning)
        .await
        .unwrap();
    assert_eq!(
        consumer::drain(&follow, &copy, 100).await.unwrap(),
        1,
        "only the change after the backfill"
    );
    let rows = app.merchant_copy().await;
    assert_eq!(rows.len(), 7);
    assert!(rows
        .iter()
        .any(|r| r.0.to_string() == late["order_id"].as_str().unwrap()));
}
