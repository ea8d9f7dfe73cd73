//! The bench tool itself: every scenario runs briefly against the test cluster with its
//! checks passing, and the checks really fail on a corrupted database. (A test of the tool,
//! not a speed test.)

use sqlx::AssertSqlSafe;
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use orderly::domain::ids::{OrderId, ProductId};
use orderly_testkit::bench::{checks, run_scenarios, workload::Workload, BenchOptions, Scenario};

use crate::helpers::TestApp;

fn small() -> BenchOptions {
    BenchOptions {
        scenarios: Scenario::ALL.to_vec(),
        duration: Duration::from_millis(1500),
        concurrency: 4,
        users: 50,
        products: 5,
        flash_stock: 20,
        progress: false,
        // The shared test cluster has no replicas.
        replicas: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow group: .ci/run runs it (cargo test --test api -- --ignored)"]
async fn bench_runs_every_scenario_with_passing_checks() {
    let app = TestApp::spawn().await;
    let opts = small();
    let w = Arc::new(Workload::setup(&app.settings, &app.base, &opts).await.unwrap());
    let results = run_scenarios(w, &opts).await.unwrap();
    assert_eq!(results.len(), 7);
    for r in &results {
        assert!(
            r.service.ops > 0 && r.raw.ops > 0,
            "{:?} ran no operation",
            r.scenario
        );
        assert!(
            r.service.errors.is_empty(),
            "{:?} service errors: {:?}",
            r.scenario,
            r.service.errors
        );
        assert!(
            r.raw.errors.is_empty(),
            "{:?} raw errors: {:?}",
            r.scenario,
            r.raw.errors
        );
        assert!(r.passed(), "{:?}: {:?}", r.scenario, r.checks);
        assert!(r.ratio > 0.0);
    }
    let flash = results.iter().find(|r| r.scenario == Scenario::Flash).unwrap();
    assert_eq!(flash.service.refused.get("out_of_stock").copied(), Some(180));
    // The service phase sold a flash sale of its own (no cache-off twin here: one side), and
    // its answers split by outcome: 20 units sold, 180 buyers refused.
    let gate = flash.flash_gate.as_ref().expect("flash_gate");
    assert_eq!((gate.service.created, gate.service.sold_out), (20, 180));
    assert!(gate.service.sale_id.is_some());
    assert!(gate.database_only.is_none() && gate.sold_out_ratio.is_none());
    assert!(
        flash
            .checks
            .iter()
            .any(|c| c.name == "flash_sale_sold_exactly_service" && c.ok),
        "{:?}",
        flash.checks
    );
    let table = orderly_testkit::bench::markdown(&results, &opts);
    assert!(table.contains("| lifecycle |"));
    assert!(table.contains("Flash sale: gate against database only"));
}

#[tokio::test]
async fn bench_checks_fail_on_a_corrupted_database() {
    let app = TestApp::spawn().await;
    let mut opts = small();
    opts.scenarios = vec![Scenario::Create];
    opts.duration = Duration::from_millis(500);
    let w = Arc::new(Workload::setup(&app.settings, &app.base, &opts).await.unwrap());
    let results = run_scenarios(w, &opts).await.unwrap();
    assert!(results[0].passed(), "{:?}", results[0].checks);
    let shards = &app.raw;
    // What was loaded: shelf + reserved per product, now that the checks passed.
    let loaded: HashMap<ProductId, i64> = sqlx::query_as::<_, (i64, i64)>(
        "SELECT p.id, p.stock + CAST(COALESCE((SELECT SUM(quantity) FROM stock_reservations r
                                               WHERE r.product_id = p.id AND r.state <> 2), 0) AS SIGNED)
         FROM products p",
    )
    .fetch_all(&app.commerce)
    .await
    .unwrap()
    .into_iter()
    .map(|(id, total)| (ProductId::new(id).unwrap(), total))
    .collect();
    let failing = |checks: Vec<checks::Check>| -> Vec<String> {
        checks.into_iter().filter(|c| !c.ok).map(|c| c.name).collect()
    };
    assert!(failing(checks::run(shards, &app.commerce, &loaded, &[]).await.unwrap()).is_empty());

    // One unit of stock appears from nowhere.
    let product: i64 = sqlx::query_scalar("SELECT product_id FROM stock_reservations LIMIT 1")
        .fetch_one(&app.commerce)
        .await
        .unwrap();
    let bump = |delta: i64| {
        sqlx::query("UPDATE products SET stock = stock + ? WHERE id = ?")
            .bind(delta)
            .bind(product)
            .execute(&app.commerce)
    };
    bump(1).await.unwrap();
    assert_eq!(
        failing(checks::run(shards, &app.commerce, &loaded, &[]).await.unwrap()),
        ["stock_conserved"]
    );
    bump(-1).await.unwrap();

    // An item row duplicated: the live orders hold more units than were reserved.
    let mut found = None;
    for shard in shards.all() {
        let sql = format!("SELECT order_id FROM {} LIMIT 1", shard.tables.items);
        if let Some(id) = sqlx::query_scalar::<_, i64>(AssertSqlSafe(&*sql))
            .fetch_optional(shards.primary(shard))
            .await
            .unwrap()
        {
            found = Some((id, shard.clone()));
            break;
        }
    }
    let (order, shard) = found.expect("an order with items");
    let t = &shard.tables.items;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {t} (order_id, line_no, product_id, product_name, unit_price, quantity, line_total)
         SELECT order_id, line_no + 100, product_id, product_name, unit_price, quantity, line_total
         FROM {t} WHERE order_id = ? AND line_no = 1"
    )))
    .bind(order)
    .execute(shards.primary(&shard))
    .await
    .unwrap();
    assert_eq!(
        failing(checks::run(shards, &app.commerce, &loaded, &[]).await.unwrap()),
        ["reserved_units_in_live_orders"]
    );

    // An acknowledged order that is not there.
    let ghost = OrderId::new(order + 1).unwrap();
    assert!(failing(
        checks::run(shards, &app.commerce, &loaded, &[ghost])
            .await
            .unwrap()
    )
    .contains(&"acknowledged_creates_present".to_owned()));
}
