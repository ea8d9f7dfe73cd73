//! SPEC 2.3: order ids are unique across processes (each holds its own worker id, leased in
//! the commerce database; two live processes never share one) and survive the clock
//! stepping back; SPEC 2.5: Redis down does not stop id issuing or creates.

use orderly::storage::Db;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use orderly::app::{lease_worker_from, Application};
use orderly::config::Settings;
use orderly::domain::ids::{IdError, OrderId, UserId};
use orderly::lease::{IdSource, IdSourceError};
use reqwest::StatusCode;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::helpers::{own_redis, TestApp};

/// A second process on the same databases, serving on its own port until `token` fires.
async fn second_process(
    settings: &Settings,
    token: &CancellationToken,
) -> (Arc<IdSource>, String, JoinHandle<()>) {
    let mut s = settings.clone();
    s.server.listen = ([127, 0, 0, 1], 0).into();
    let app = Application::build(s, token.clone())
        .await
        .expect("second process");
    let ids = app.state().ids.clone();
    let base = format!("http://{}", app.address());
    let run = tokio::spawn(async move {
        app.run().await.expect("second process runs");
    });
    (ids, base, run)
}

/// Marks every free lease row but `except` as held by somebody else for a day.
async fn block_free_rows(commerce: &Db, except: Option<u16>) {
    sqlx::query(
        "UPDATE worker_leases SET holder = 'someone else', expires_at = NOW(6) + INTERVAL 1 DAY
         WHERE expires_at < NOW(6) AND (? IS NULL OR worker_id <> ?)",
    )
    .bind(except)
    .bind(except)
    .execute(commerce)
    .await
    .unwrap();
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

#[tokio::test]
async fn worker_ids_a_vanished_lease_row_is_taken_by_nobody_and_ids_never_collide() {
    const TOTAL: usize = 100_000;
    let ttl = Duration::from_secs(2);
    let app = TestApp::spawn_with(|s| s.ids.lease_ttl_secs = ttl.as_secs()).await;
    let a = app.app.ids.clone();
    let w = a.worker().get();
    let spare = (w + 1) % 64;
    // Only `spare` stays free besides whatever a broken lease would make of w.
    block_free_rows(&app.commerce, Some(spare)).await;
    let user = UserId::new(42).unwrap();
    let issued = Arc::new(AtomicUsize::new(0));
    let a_done = Arc::new(AtomicBool::new(false));

    // A issues ids all along, throttled so that it leaves room for B in the total.
    let a_draw = {
        let (a, issued, a_done) = (a.clone(), issued.clone(), a_done.clone());
        tokio::task::spawn_blocking(move || {
            let mut ids = Vec::new();
            loop {
                match a.next_for(user) {
                    Ok(id) => ids.push(id),
                    Err(IdSourceError::LeaseLost) => {
                        a_done.store(true, Ordering::SeqCst);
                        return (ids, Instant::now());
                    }
                    Err(e) => panic!("A: {e}"),
                }
                if issued.fetch_add(1, Ordering::SeqCst) + 1 >= TOTAL {
                    panic!("A was still issuing ids after {TOTAL}");
                }
                if ids.len() % 10 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;

    let deleted_at = Instant::now();
    let n = sqlx::query("DELETE FROM worker_leases WHERE worker_id = ?")
        .bind(w)
        .execute(&app.commerce)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(n, 1);

    // With `spare` blocked too, nothing is free: B cannot start, w is nobody's.
    block_free_rows(&app.commerce, None).await;
    let b_token = CancellationToken::new();
    assert!(
        lease_worker_from(&app.settings, b_token.clone()).await.is_err(),
        "a worker id whose lease row vanished was taken"
    );
    sqlx::query(
        "UPDATE worker_leases SET holder = NULL, expires_at = '1970-01-01 00:00:01' WHERE worker_id = ?",
    )
    .bind(spare)
    .execute(&app.commerce)
    .await
    .unwrap();
    let (b, _keeper) = lease_worker_from(&app.settings, b_token.clone()).await.unwrap();
    assert_eq!(
        b.worker().get(),
        spare,
        "B takes the free row, never the vanished one"
    );

    // B draws while A is still going (as slowly as A), then fills up to the total.
    let b_draw = {
        let (b, issued, a_done) = (b.clone(), issued.clone(), a_done.clone());
        tokio::task::spawn_blocking(move || {
            let mut ids = Vec::new();
            while issued.fetch_add(1, Ordering::SeqCst) < TOTAL {
                ids.push(b.next_for(user).expect("B issues ids"));
                if ids.len() % 10 == 0 && !a_done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            ids
        })
    };
    let (a_ids, a_stopped) = a_draw.await.unwrap();
    let b_ids = b_draw.await.unwrap();

    // A stopped at its next renewal (every ttl/3), not only when its deadline ran out.
    let took = a_stopped - deleted_at;
    assert!(
        took < ttl / 3 + Duration::from_millis(600),
        "A stopped {took:?} after the delete"
    );
    assert!(!a_ids.is_empty());
    assert_eq!(a_ids.len() + b_ids.len(), TOTAL);
    let mut seen = HashSet::with_capacity(TOTAL);
    for id in a_ids.iter().chain(&b_ids) {
        assert!(seen.insert(*id), "duplicate id {id}");
    }
    // And A stays silent: its row is gone, so it can never take its worker id back.
    tokio::time::sleep(ttl).await;
    assert!(matches!(a.next_for(user), Err(IdSourceError::LeaseLost)));
    b_token.cancel();
}

#[tokio::test]
async fn worker_ids_differ_between_processes_and_a_released_one_continues_above_its_last_id() {
    let app = TestApp::spawn().await;
    let a_token = CancellationToken::new();
    let (a, _, a_run) = second_process(&app.settings, &a_token).await;
    let wa = a.worker().get();
    assert_ne!(
        wa,
        app.app.ids.worker().get(),
        "two live processes, two worker ids"
    );

    let user = UserId::new(7).unwrap();
    let mut last = None;
    for _ in 0..1000 {
        last = Some(a.next_for(user).unwrap());
    }
    let last: OrderId = last.unwrap();

    // Clean shutdown: A stops issuing, then gives the row back with the exact floor.
    a_token.cancel();
    a_run.await.unwrap();
    assert!(matches!(a.next_for(user), Err(IdSourceError::LeaseLost)));
    let (holder, expired, floor): (Option<String>, bool, i64) = sqlx::query_as(
        "SELECT holder, expires_at < NOW(6), issued_below_ms FROM worker_leases WHERE worker_id = ?",
    )
    .bind(wa)
    .fetch_one(&app.commerce)
    .await
    .unwrap();
    assert_eq!((holder, expired), (None, true), "released");
    assert_eq!(floor, last.parts().unix_ms + 1);

    // The next process can take it (the only free one) and continues above A's last id.
    block_free_rows(&app.commerce, Some(wa)).await;
    let b_token = CancellationToken::new();
    let (b, _, b_run) = second_process(&app.settings, &b_token).await;
    assert_eq!(b.worker().get(), wa);
    for _ in 0..1000 {
        let id = b.next_for(user).unwrap();
        assert!(id > last, "{id} is not above A's last id {last}");
    }
    b_token.cancel();
    b_run.await.unwrap();
}

#[tokio::test]
async fn worker_ids_a_clock_behind_the_previous_holders_ids_is_refused() {
    let app = TestApp::spawn().await;
    // Earlier holders of every free worker id issued ids up to an hour from now: to a new
    // holder that is exactly a clock stepped back by an hour across a restart.
    let floor = now_ms() + 3_600_000;
    sqlx::query("UPDATE worker_leases SET issued_below_ms = ? WHERE expires_at < NOW(6)")
        .bind(floor)
        .execute(&app.commerce)
        .await
        .unwrap();
    let token = CancellationToken::new();
    let (b, base, run) = second_process(&app.settings, &token).await;
    let resp = app
        .client
        .post(format!("{base}/v1/order-ids"))
        .bearer_auth(app.user_token(5))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.text().await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(matches!(
        b.next_for(UserId::new(5).unwrap()),
        Err(IdSourceError::Clock(IdError::BelowFloor(_)))
    ));
    // The process that held its worker id all along is not affected.
    app.new_order_id(5).await;
    token.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn worker_ids_and_creates_keep_working_while_redis_is_down() {
    let redis = own_redis().await;
    let url = redis.redis_url().unwrap();
    let ttl = Duration::from_secs(1);
    let app = TestApp::spawn_with(|s| {
        s.redis.url = url;
        s.ids.lease_ttl_secs = ttl.as_secs();
    })
    .await;
    assert_eq!(
        app.app.orders.cache().health(),
        orderly::redis::cache::CacheHealth::Up,
        "the service found Redis at start"
    );
    let cat = app.catalog(&[100]).await;
    app.place_order(11, &[(&cat.products[0], 1)]).await;

    redis.stop_redis().await.unwrap();
    assert!(!redis.redis().unwrap().is_running());
    // Well past the lease TTL, several times over.
    let until = Instant::now() + 3 * ttl + Duration::from_millis(500);
    let mut orders = 0;
    while Instant::now() < until {
        let o = app.place_order(11, &[(&cat.products[0], 1)]).await;
        assert_eq!(o["status"], "pending_payment");
        orders += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let id = app.new_order_id(12).await;
    assert!(OrderId::parse(&id).is_some());
    assert!(orders >= 5, "{orders} orders while Redis was down");
}
