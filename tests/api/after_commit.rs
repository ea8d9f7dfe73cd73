//! SPEC 2.5 and 2.8 at the commit point: a write that committed but lost its `after_commit`
//! (its step cut off by a timeout or shutdown between COMMIT and the cache notice, its
//! process killed there) must never leave the cache showing the older version: background
//! steps are not cut there, and a client's retry, answered as a replay, does the notice the
//! first attempt could not.
//!
//! The failpoint `orders::after_write` holds one order's write right after its COMMIT
//! (`return(<id>)`: for `COMMIT_FAILPOINT_DELAY`; `return(panic:<id>)`: the write dies there,
//! as in a killed process). Failpoints are process-wide: each test holds the `fail` crate's
//! scenario lock (shared with the archive's failpoint tests) and names its own order.

use std::time::Duration;

use chrono::Utc;
use orderly::service::orders::COMMIT_FAILPOINT_DELAY;
use orderly_testkit::cluster::{ClusterSpec, LocalCluster};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::TestApp;

const POINT: &str = "orders::after_write";

fn id_of(o: &Value) -> &str {
    o["order_id"].as_str().unwrap()
}

/// The closer's step is cut off (its caller's timeout) while an order's write stands between
/// COMMIT and the notice: the move still finishes, and the cache shows the closed order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_background_step_cut_off_after_its_commit_still_notifies_the_cache() {
    // Its own cluster: the step closes every unpaid order it finds.
    let cluster = LocalCluster::start(ClusterSpec::default()).await.unwrap();
    let app = TestApp::spawn_on(&cluster, |_| {}).await;
    let cat = app.catalog(&[100]).await;
    let user = 8101;
    let order = app.place_order(user, &[(&cat.products[0], 1)]).await;
    let id = id_of(&order).to_owned();
    for _ in 0..2 {
        let (_, got) = app.get_order(user, &id).await;
        assert_eq!(got["status"], "pending_payment", "cached unpaid");
    }

    let scenario = fail::FailScenario::setup();
    fail::cfg(POINT, &format!("return({id})")).unwrap();
    let step = app
        .app
        .orders
        .close_expired_once(Utc::now() + chrono::TimeDelta::days(2), 100);
    let cut = tokio::time::timeout(COMMIT_FAILPOINT_DELAY / 4, step).await;
    fail::remove(POINT);
    drop(scenario);
    assert!(cut.is_err(), "the step was cut off: {cut:?}");

    tokio::time::sleep(COMMIT_FAILPOINT_DELAY + Duration::from_secs(1)).await;
    let (_, got) = app.get_order(user, &id).await;
    assert_eq!(
        (got["status"].as_str(), got["version"].as_i64()),
        (Some("closed"), Some(2)),
        "the cache must not keep the unpaid version: {got}"
    );
    assert_eq!(app.stock_of(&cat.products[0]).await, 100, "its stock came back");
}

/// A create whose write dies between COMMIT and the notice (the client sees a 5xx), after a
/// read cached its id as absent: the client's retry is a replay, and from then on the order
/// is there for every read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_create_replayed_after_a_lost_notice_repairs_the_cache() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[100]).await;
    let user = 8202;
    let id = app.new_order_id(user).await;
    let (s, _) = app.get_order(user, &id).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "not created yet: cached as absent");

    let body = TestApp::order_body(&id, &[(&cat.products[0], 1)]);
    let scenario = fail::FailScenario::setup();
    fail::cfg(POINT, &format!("return(panic:{id})")).unwrap();
    let (s, first) = app.create_order(user, body.clone()).await;
    fail::remove(POINT);
    drop(scenario);
    assert!(
        s.is_server_error(),
        "the first attempt died after its commit: {s} {first}"
    );

    let (s, replayed) = app.create_order(user, body).await;
    assert_eq!(s, StatusCode::OK, "a replay of the committed order: {replayed}");
    let (s, got) = app.get_order(user, &id).await;
    assert_eq!(s, StatusCode::OK, "the replay replaced the cached absence: {got}");
    assert_eq!(got["version"], 1);
    let (_, list) = app
        .call("GET", "/v1/orders", Some(&app.user_token(user)), None)
        .await;
    assert_eq!(list["orders"][0]["order_id"], json!(id), "{list}");
}

/// The same for a payment: its first attempt dies after COMMIT, with the unpaid order
/// cached; the payment channel's retry (same transaction number) repairs the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_replayed_after_a_lost_notice_repairs_the_cache() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[100]).await;
    let user = 8303;
    let order = app.place_order(user, &[(&cat.products[0], 1)]).await;
    let id = id_of(&order).to_owned();
    for _ in 0..2 {
        let (_, got) = app.get_order(user, &id).await;
        assert_eq!(got["status"], "pending_payment");
    }

    let scenario = fail::FailScenario::setup();
    fail::cfg(POINT, &format!("return(panic:{id})")).unwrap();
    let (s, first) = app.pay(&order).await;
    fail::remove(POINT);
    drop(scenario);
    assert!(
        s.is_server_error(),
        "the first attempt died after its commit: {s} {first}"
    );

    let (s, replayed) = app.pay(&order).await;
    assert_eq!(s, StatusCode::OK, "{replayed}");
    assert_eq!(replayed["status"], "awaiting_shipment");
    let (_, got) = app.get_order(user, &id).await;
    assert_eq!(
        (got["status"].as_str(), got["version"].as_i64()),
        (Some("awaiting_shipment"), Some(2)),
        "the cache must not keep the unpaid version: {got}"
    );
}
