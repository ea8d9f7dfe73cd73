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

#[tokio::test]
async fn no_oversell_stock_can_never_go_negative_in_the_database() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[1]).await;
    let r = sqlx::query("UPDATE products SET stock = stock - 2 WHERE id = ?")
        .bind(cat.products[0].parse::<i64>().unwrap())
        .execute(&app.commerce)
        .await;
    assert!(r.is_err(), "the CHECK constraint refuses negative stock");
}
