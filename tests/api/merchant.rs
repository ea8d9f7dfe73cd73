//! SPEC 6: the merchant copy sharded by shop and the daily reports, kept from the event
//! stream: they show every order change within a bounded time, are idempotent by version
//! (a replay or an older event changes nothing) and equal what the shards say.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use chrono::Utc;
use orderly::events::consumer::{self, Batch, Projection, StartAt};
use orderly::events::merchant::MerchantCopy;
use orderly::events::Broker;
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
    for shard in app.app.orders.shards().all() {
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
            .fetch_all(app.app.orders.shards().primary(shard))
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

#[tokio::test]
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
    let first = consumer::durable(&broker, copy.name(), StartAt::Beginning)
        .await
        .unwrap();
    assert_eq!(
        consumer::drain(&first, &copy, 3).await.unwrap(),
        9,
        "5 created, 3 paid, 1 shipped"
    );
    let tables = (app.merchant_copy().await, app.merchant_reports().await);
    assert_eq!(tables.0.len(), 5);

    for replay in ["second", "third"] {
        consumer::delete(&broker, copy.name()).await.unwrap();
        let again = consumer::durable(&broker, copy.name(), StartAt::Beginning)
            .await
            .unwrap();
        assert_eq!(consumer::drain(&again, &copy, 4).await.unwrap(), 9);
        assert_eq!(
            (app.merchant_copy().await, app.merchant_reports().await),
            tables,
            "{replay} replay"
        );
    }

    // The oldest event of every order, delivered after the newest: nothing moves back.
    let events = app.stream_events().await;
    let mut oldest = Batch::default();
    for e in events.iter().filter(|e| e.order.version == 1) {
        oldest.events.push(e.clone());
    }
    assert_eq!(oldest.events.len(), 5);
    copy.apply(&oldest).await.unwrap();
    assert_eq!((app.merchant_copy().await, app.merchant_reports().await), tables);
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
        app.app.orders.shards(),
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
