//! SPEC 2.6: no oversell.

use futures::future::join_all;
use reqwest::StatusCode;

use crate::helpers::TestApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_oversell_200_buyers_for_50_units() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[50]).await;
    let product = cat.products[0].clone();
    let buyers = (1..=200).map(|u| {
        let app = &app;
        let product = product.clone();
        async move {
            let id = app.new_order_id(10_000 + u).await;
            app.create_order(10_000 + u, TestApp::order_body(&id, &[(&product, 1)]))
                .await
        }
    });
    let answers = join_all(buyers).await;
    let sold = answers.iter().filter(|(s, _)| *s == StatusCode::CREATED).count();
    let refused = answers
        .iter()
        .filter(|(s, p)| {
            *s == StatusCode::CONFLICT && p["code"] == "out_of_stock" && p["product_id"] == product.as_str()
        })
        .count();
    assert_eq!(sold, 50);
    assert_eq!(
        refused,
        150,
        "{:?}",
        answers
            .iter()
            .find(|(s, _)| !s.is_success() && *s != StatusCode::CONFLICT)
    );
    assert_eq!(app.stock_of(&product).await, 0);
    assert_eq!(app.count_shard_rows("orders").await, 50);
    let reserved: i64 =
        sqlx::query_scalar("SELECT CAST(COALESCE(SUM(quantity), 0) AS SIGNED) FROM stock_reservations")
            .fetch_one(&app.commerce)
            .await
            .unwrap();
    assert_eq!(reserved, 50);
}

/// Orders of two products in several quantities at once, with cancellations racing the
/// creates: the stock read while it runs never drops below zero, every refusal is a clean
/// `out_of_stock`, and at the end each product's stock plus the units of the orders that stand
/// is exactly what it started with (every unit taken is in a live order or back).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_oversell_stock_can_never_go_negative_in_the_database() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let app = Arc::new(TestApp::spawn().await);
    let initial = [7_i64, 5];
    let cat = app.catalog(&initial).await;
    let products = cat.products.clone();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (app, products, done) = (app.clone(), products.clone(), done.clone());
        tokio::spawn(async move {
            let mut lowest = i64::MAX;
            while !done.load(Ordering::Acquire) {
                for p in &products {
                    lowest = lowest.min(app.stock_of(p).await);
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            lowest
        })
    };
    let buyers = (0..40_i64).map(|i| {
        let (app, products) = (app.clone(), products.clone());
        async move {
            let user = 96_000 + i;
            let (qa, qb) = (1 + i % 3, 1 + (i / 3) % 3);
            let id = app.new_order_id(user).await;
            let body = TestApp::order_body(&id, &[(&products[0], qa), (&products[1], qb)]);
            let (s, o) = app.create_order(user, body).await;
            match s {
                StatusCode::CREATED if i % 2 == 0 => {
                    let (s, c) = app
                        .call(
                            "POST",
                            &format!("/v1/orders/{id}/cancel"),
                            Some(&app.user_token(user)),
                            Some(serde_json::json!({"expected_version": 1, "reason": "changed my mind"})),
                        )
                        .await;
                    assert_eq!(s, StatusCode::OK, "{c}");
                    (0, 0)
                }
                StatusCode::CREATED => (qa, qb),
                StatusCode::CONFLICT if o["code"] == "out_of_stock" => (0, 0),
                other => panic!("a create answered {other}: {o}"),
            }
        }
    });
    let standing: Vec<(i64, i64)> = join_all(buyers).await;
    done.store(true, Ordering::Release);
    let lowest = sampler.await.unwrap();
    assert!(lowest >= 0, "the stock went below zero: {lowest}");
    let held = [
        standing.iter().map(|s| s.0).sum::<i64>(),
        standing.iter().map(|s| s.1).sum::<i64>(),
    ];
    for (i, p) in products.iter().enumerate() {
        assert!(held[i] <= initial[i], "orders hold {} of {}", held[i], initial[i]);
        assert_eq!(
            app.stock_of(p).await + held[i],
            initial[i],
            "product {i}: stock plus the units of standing orders"
        );
    }
}
