//! TLS to the dependencies: a cluster whose MariaDB server requires secure transport
//! (`require_secure_transport=ON`, a certificate signed by a throwaway CA made with the
//! `openssl` tool), whose Redis is reached over `rediss://` and whose NATS requires TLS. The
//! service is configured as an operator would: `ssl-mode=VERIFY_IDENTITY&ssl-ca=…` in every
//! database URL, `redis.tls_ca_file` and `events.nats_tls_ca_file`.

use orderly::domain::ids::OrderId;
use orderly::redis::cache::order_key;
use orderly_testkit::cluster::{ClusterSpec, LocalCluster};
use reqwest::StatusCode;
use sqlx::{Connection, MySqlConnection};

use crate::helpers::*;

#[tokio::test]
async fn the_service_works_over_tls_to_mariadb_redis_and_nats() {
    let cluster = LocalCluster::start(ClusterSpec {
        tls: true,
        ..ClusterSpec::default()
    })
    .await
    .expect("TLS cluster");
    let tls = cluster.tls().expect("certificates").clone();
    let server = cluster.mariadb(0);

    // The server refuses a session without TLS, so everything below that reaches MariaDB
    // went over TLS.
    let plain = format!("{}/?ssl-mode=disabled", server.base_url());
    // (MariaDB answers "access denied" rather than naming the transport; the same
    // credentials over TLS are let in below.)
    let refused = MySqlConnection::connect(&plain)
        .await
        .expect_err("plaintext refused");
    assert!(
        ["insecure transport", "Access denied"]
            .iter()
            .any(|m| refused.to_string().contains(m)),
        "{refused}"
    );
    // And verification is real: a CA that did not sign the server's certificate fails.
    let wrong_ca = format!(
        "{}/?ssl-mode=VERIFY_IDENTITY&ssl-ca={}",
        server.base_url(),
        tls.cert.display()
    );
    assert!(
        MySqlConnection::connect(&wrong_ca).await.is_err(),
        "an unknown CA was trusted"
    );
    let mut admin = MySqlConnection::connect(&server.admin_url())
        .await
        .expect("TLS session");
    let (_, cipher): (String, String) = sqlx::query_as("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert!(!cipher.is_empty(), "no cipher: the session is not encrypted");

    let redis = cluster.redis().expect("redis");
    let rediss = redis.tls_url().expect("a TLS port");
    let app = TestApp::spawn_on(&cluster, |s| {
        s.redis.url = rediss.clone();
        s.redis.tls_ca_file = tls.ca.clone();
        s.events.nats_tls_ca_file = tls.ca.clone();
    })
    .await;
    assert!(app.settings.commerce.url.contains("ssl-mode=VERIFY_IDENTITY"));
    assert!(app.settings.events.nats_url.starts_with("tls://"));
    let catalog = app.catalog(&[10]).await;
    let order = app.place_order(7, &[(&catalog.products[0], 1)]).await;
    let id = order["order_id"].as_str().unwrap();
    let (s, b) = app.get_order(7, id).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, ready) = app.call("GET", "/readyz", None, None).await;
    assert_eq!(s, StatusCode::OK, "{ready}");
    assert_eq!(
        ready["checks"]["cache"], "up",
        "the cache never reached the TLS Redis: {ready}"
    );

    // The read filled the cache through the TLS port: the entry is there (read back over
    // the harness's plain port).
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = order_key(&app.settings.redis.key_prefix, OrderId::parse(id).unwrap());
    let mut cached = None;
    for _ in 0..50 {
        cached = redis::cmd("GET")
            .arg(&key)
            .query_async::<Option<Vec<u8>>>(&mut conn)
            .await
            .unwrap();
        if cached.is_some() {
            break;
        }
        let _ = app.get_order(7, id).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(cached.is_some(), "the order was never cached over rediss://");

    // The relay published the order's event to the TLS-only NATS: the outbox drains.
    app.wait_outbox_drained(std::time::Duration::from_secs(20)).await;
}
