//! SPEC 2.2: no lost or doubled update (ABA), and status changes with one winner.

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test]
async fn no_lost_or_doubled_update_aba_tracking_number() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let order = app.place_order(5, &[(&cat.products[0], 1)]).await;
    let (s, paid) = app.pay(&order).await;
    assert_eq!(s, StatusCode::OK, "{paid}");
    let id = paid["order_id"].as_str().unwrap();
    let v = paid["version"].as_i64().unwrap();
    let merchant = app.merchant_token(cat.shop);
    let path = format!("/v1/orders/{id}");

    let set_666 = json!({"expected_version": v, "tracking_number": "666"});
    let (s, a) = app
        .call("PATCH", &path, Some(&merchant), Some(set_666.clone()))
        .await;
    assert_eq!(s, StatusCode::OK, "{a}");
    assert_eq!(a["version"].as_i64(), Some(v + 1));
    let (s, b) = app
        .call(
            "PATCH",
            &path,
            Some(&merchant),
            Some(json!({"expected_version": v + 1, "tracking_number": "888"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["version"].as_i64(), Some(v + 2));

    // The late retry of the "666" request.
    let (s, p) = app.call("PATCH", &path, Some(&merchant), Some(set_666)).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(p["code"], "version_conflict");
    assert_eq!(p["current_version"].as_i64(), Some(v + 2));

    let (s, headers, now) = app.call_full("GET", &path, Some(&app.user_token(5)), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(now["tracking_number"], "888");
    assert_eq!(now["version"].as_i64(), Some(v + 2));
    assert_eq!(headers["etag"], format!("\"{}\"", v + 2));
}

#[tokio::test]
async fn no_lost_or_doubled_update_concurrent_patches_one_winner() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[10]).await;
    let order = app.place_order(6, &[(&cat.products[0], 1)]).await;
    let id = order["order_id"].as_str().unwrap();
    let token = app.user_token(6);
    let path = format!("/v1/orders/{id}");
    let answers = join_all((0..20).map(|i| {
        app.call(
            "PATCH",
            &path,
            Some(&token),
            Some(json!({"expected_version": 1, "remark": format!("r{i}")})),
        )
    }))
    .await;
    let winners: Vec<_> = answers.iter().filter(|(s, _)| *s == StatusCode::OK).collect();
    assert_eq!(winners.len(), 1);
    assert!(answers
        .iter()
        .all(|(s, p)| *s == StatusCode::OK || p["code"] == "version_conflict"));
    let (_, now) = app.get_order(6, id).await;
    assert_eq!(now["version"].as_i64(), Some(2));
    assert_eq!(now["remark"], winners[0].1["remark"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_lost_or_doubled_update_pay_racing_cancel_has_one_winner() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[1000]).await;
    let user = 9;
    let token = app.user_token(user);
    let mut paid_count = 0;
    for round in 0..100 {
        let order = app.place_order(user, &[(&cat.products[0], 1)]).await;
        let id = order["order_id"].as_str().unwrap().to_owned();
        let cancel_path = format!("/v1/orders/{id}/cancel");
        let cancel = app.call(
            "POST",
            &cancel_path,
            Some(&token),
            Some(json!({"expected_version": 1})),
        );
        // Jitter one side so that both orders of arrival (and true overlaps) happen.
        let jitter = std::time::Duration::from_micros(rand::random::<u64>() % 4000);
        let pay = async {
            if round % 2 == 0 {
                tokio::time::sleep(jitter).await;
            }
            app.pay(&order).await
        };
        let cancel = async {
            if round % 2 == 1 {
                tokio::time::sleep(jitter).await;
            }
            cancel.await
        };
        let (pay, cancel) = tokio::join!(pay, cancel);
        let (s, now) = app.get_order(user, &id).await;
        assert_eq!(s, StatusCode::OK);
        match now["status"].as_str().unwrap() {
            "awaiting_shipment" => {
                paid_count += 1;
                assert_eq!(pay.0, StatusCode::OK, "round {round}");
                assert_eq!(cancel.0, StatusCode::CONFLICT, "round {round}: {}", cancel.1);
                assert_eq!(now["refund_required"], false);
            }
            "closed" => {
                assert_eq!(cancel.0, StatusCode::OK, "round {round}");
                // The late payment is recorded and flagged for refund, never lost.
                assert_eq!(pay.0, StatusCode::OK, "round {round}: {}", pay.1);
                assert_eq!(now["refund_required"], true, "round {round}");
                assert_eq!(now["payments"].as_array().unwrap().len(), 1);
            }
            other => panic!("round {round}: unexpected status {other}"),
        }
    }
    // Both outcomes happened, so the race was really run.
    assert!(
        (5..=95).contains(&paid_count),
        "payment won {paid_count} of 100 races"
    );
    // Stock agrees with the statuses: only paid orders still hold a unit.
    assert_eq!(app.stock_of(&cat.products[0]).await, 1000 - paid_count);
}
