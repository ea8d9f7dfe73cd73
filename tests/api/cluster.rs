//! The harness's own tests: the local cluster's servers start from the binaries on PATH,
//! replicate, survive a kill, a pause and a restart, and vanish on drop. Every other test
//! stands on them.

use std::time::{Duration, Instant};

use orderly_testkit::cluster::*;
use sqlx::mysql::MySqlConnection;
use sqlx::{Connection, Row};

#[tokio::test]
async fn two_mariadb_servers_and_redis_start_serve_and_vanish_on_drop() {
    let began = Instant::now();
    let cluster = LocalCluster::start(ClusterSpec {
        mariadb_servers: 2,
        with_redis: true,
        with_nats: false,
        base_dir: None,
        durable: false,
        replicas_per_server: 0,
        tls: false,
    })
    .await
    .expect("the cluster starts");
    eprintln!(
        "local cluster (2 MariaDB + Redis) started in {:?} in {}",
        began.elapsed(),
        cluster.dir().display()
    );

    let mut server_ids = Vec::new();
    for server in cluster.mariadb_servers() {
        let mut conn = MySqlConnection::connect(&server.admin_url())
            .await
            .expect("orderly can log in");
        let row = sqlx::query("SELECT @@server_id, @@log_bin, @@gtid_strict_mode")
            .fetch_one(&mut conn)
            .await
            .expect("query runs");
        let server_id: u64 = row.get(0);
        let log_bin: i64 = row.get(1);
        let gtid_strict_mode: i64 = row.get(2);
        assert_eq!(server_id, u64::from(server.server_id()));
        assert_eq!(log_bin, 1, "binary log is on");
        assert_eq!(gtid_strict_mode, 1, "GTID strict mode is on");
        server_ids.push(server_id);
        conn.close().await.expect("close");
    }
    assert_ne!(server_ids[0], server_ids[1], "server ids are distinct");
    assert!(cluster.mariadb_urls()[0].starts_with("mysql://orderly:orderly@127.0.0.1:"));

    let redis = cluster.redis().expect("redis is part of the cluster");
    redis_ping(redis.port()).await.expect("redis answers PING");
    assert_eq!(
        cluster.redis_url(),
        Some(format!("redis://127.0.0.1:{}", redis.port()))
    );

    let dir = cluster.dir().to_path_buf();
    let pids: Vec<u32> = cluster
        .mariadb_servers()
        .iter()
        .filter_map(MariaDbServer::pid)
        .chain(redis.pid())
        .collect();
    assert_eq!(pids.len(), 3);
    drop(cluster);
    assert!(!dir.exists(), "{} is removed", dir.display());
    for pid in pids {
        let pid = libc::pid_t::try_from(pid).expect("pid fits");
        assert!(!pid_alive(pid), "server {pid} is dead");
    }
}

#[tokio::test]
async fn a_durable_cluster_lives_on_disk_and_syncs_every_commit() {
    let cluster = LocalCluster::start(ClusterSpec {
        mariadb_servers: 1,
        with_redis: false,
        with_nats: false,
        base_dir: None,
        durable: true,
        replicas_per_server: 0,
        tls: false,
    })
    .await
    .expect("the cluster starts");
    assert!(
        !cluster.dir().starts_with("/dev/shm"),
        "{}",
        cluster.dir().display()
    );
    let mut conn = MySqlConnection::connect(&cluster.mariadb(0).admin_url())
        .await
        .expect("login");
    let row = sqlx::query(
        "SELECT @@innodb_flush_log_at_trx_commit, @@sync_binlog, @@innodb_doublewrite, @@log_bin",
    )
    .fetch_one(&mut conn)
    .await
    .expect("query runs");
    let flush: u64 = row.get(0);
    let sync: u64 = row.get(1);
    let doublewrite: i64 = row.get(2);
    let log_bin: i64 = row.get(3);
    assert_eq!((flush, sync, doublewrite, log_bin), (1, 1, 1, 1));
    conn.close().await.expect("close");
}

#[tokio::test]
async fn killed_or_paused_servers_come_back_with_their_data() {
    let cluster = LocalCluster::start(ClusterSpec {
        mariadb_servers: 1,
        with_redis: true,
        with_nats: false,
        base_dir: None,
        durable: false,
        replicas_per_server: 0,
        tls: false,
    })
    .await
    .expect("the cluster starts");
    let server = cluster.mariadb(0);
    let port = server.port();
    let mut conn = MySqlConnection::connect(&server.admin_url())
        .await
        .expect("connect");
    sqlx::query("CREATE DATABASE survivor")
        .execute(&mut conn)
        .await
        .expect("create");
    drop(conn);

    cluster.kill_mariadb(0).expect("kill");
    assert!(!server.is_running());
    assert!(MySqlConnection::connect(&server.admin_url()).await.is_err());
    cluster.start_mariadb(0).await.expect("restart after kill");
    assert_eq!(server.port(), port);
    let conn = MySqlConnection::connect(&server.url("survivor"))
        .await
        .expect("the committed database survived the kill");
    conn.close().await.expect("close");

    cluster.pause_redis().expect("pause");
    let port = cluster.redis().map(RedisServer::port).expect("redis");
    let paused = tokio::time::timeout(Duration::from_millis(200), redis_ping(port)).await;
    assert!(paused.is_err(), "a paused redis does not answer");
    cluster.resume_redis().expect("resume");
    redis_ping(port).await.expect("a resumed redis answers");

    cluster.stop_mariadb(0).await.expect("stop");
    cluster.stop_redis().await.expect("stop");
    assert!(matches!(cluster.pause_redis(), Err(ClusterError::NotRunning(_))));
    cluster.start_redis().await.expect("restart redis");
    redis_ping(port).await.expect("restarted redis answers");
    assert!(matches!(
        cluster.kill_mariadb(7),
        Err(ClusterError::NoSuchServer { index: 7, count: 1 })
    ));
}

#[tokio::test]
async fn redis_restarts_with_its_saved_data_or_empty() {
    let cluster = LocalCluster::start(ClusterSpec {
        mariadb_servers: 1,
        with_redis: true,
        with_nats: false,
        base_dir: None,
        durable: false,
        replicas_per_server: 0,
        tls: false,
    })
    .await
    .expect("the cluster starts");
    let url = cluster.redis_url().expect("redis");
    let client = ::redis::Client::open(url.as_str()).expect("client");
    let get = || async {
        let mut c = client.get_multiplexed_async_connection().await.expect("connect");
        ::redis::cmd("GET")
            .arg("survivor")
            .query_async::<Option<String>>(&mut c)
            .await
            .expect("GET")
    };
    let mut c = client.get_multiplexed_async_connection().await.expect("connect");
    ::redis::cmd("SET")
        .arg("survivor")
        .arg("yes")
        .query_async::<()>(&mut c)
        .await
        .expect("SET");
    drop(c);

    cluster.save_redis().await.expect("SAVE");
    cluster.kill_redis().expect("kill");
    cluster.start_redis().await.expect("start with the saved data");
    assert_eq!(get().await.as_deref(), Some("yes"), "start loads dump.rdb");

    cluster.kill_redis().expect("kill");
    cluster.start_redis_empty().await.expect("start empty");
    assert_eq!(get().await, None, "start_empty forgets what was saved");

    cluster.kill_redis().expect("kill");
    cluster.start_redis().await.expect("start again");
    assert_eq!(get().await, None, "the saved data is gone for good");
}

/// Starts `primaries` MariaDB servers with one replica each, without Redis.
async fn cluster_with_replicas(primaries: usize) -> LocalCluster {
    LocalCluster::start(ClusterSpec {
        mariadb_servers: primaries,
        with_redis: false,
        with_nats: false,
        base_dir: None,
        durable: false,
        replicas_per_server: 1,
        tls: false,
    })
    .await
    .expect("the cluster starts")
}

/// Runs `sql` on `server`, in database `db` ("" for none).
async fn execute(server: &MariaDbServer, db: &str, sql: &'static str) {
    let mut conn = MySqlConnection::connect(&server.url(db)).await.expect("connect");
    sqlx::query(sql).execute(&mut conn).await.expect(sql);
    conn.close().await.expect("close");
}

/// Creates database `replicated` with table `t` on `primary`.
async fn create_table(primary: &MariaDbServer) {
    execute(primary, "", "CREATE DATABASE replicated").await;
    execute(primary, "replicated", "CREATE TABLE t (id INT PRIMARY KEY)").await;
}

/// Inserts row `id` into `replicated.t` on `primary`.
async fn insert(primary: &MariaDbServer, id: i32) {
    let mut conn = MySqlConnection::connect(&primary.url("replicated"))
        .await
        .expect("connect");
    sqlx::query("INSERT INTO t (id) VALUES (?)")
        .bind(id)
        .execute(&mut conn)
        .await
        .expect("insert");
    conn.close().await.expect("close");
}

/// The ids in `replicated.t` on `server`, ascending.
async fn ids(server: &MariaDbServer) -> Vec<i32> {
    let mut conn = MySqlConnection::connect(&server.url("replicated"))
        .await
        .expect("connect");
    let ids = sqlx::query_scalar("SELECT id FROM t ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .expect("select");
    conn.close().await.expect("close");
    ids
}

/// Caught up within this in a healthy cluster: replication on one machine takes
/// milliseconds.
const CATCH_UP: Duration = Duration::from_secs(20);

#[tokio::test]
async fn replicas_apply_their_primarys_writes_are_read_only_and_vanish_on_drop() {
    let began = Instant::now();
    let cluster = cluster_with_replicas(2).await;
    eprintln!(
        "local cluster (2 MariaDB + 2 replicas) started in {:?}",
        began.elapsed()
    );
    let (primary, replica) = (cluster.mariadb(0), cluster.replica(0, 0).expect("replica"));
    let other = cluster.replica(1, 0).expect("replica of server 1");
    assert_eq!((replica.index(), replica.replica_of()), (0, Some(0)));
    assert_eq!((other.index(), other.replica_of()), (0, Some(1)));
    assert_eq!(primary.replica_of(), None);
    assert_eq!((replica.server_id(), other.server_id()), (1001, 1101));
    assert_eq!((replica.name(), other.name()), ("mariadb-0-r0", "mariadb-1-r0"));
    assert!(replica.datadir().starts_with(cluster.dir().join("mariadb-0-r0")));
    assert_eq!(cluster.replicas(1).len(), 1);
    assert!(cluster.replicas(2).is_empty());
    assert!(matches!(
        cluster.replica(0, 1),
        Err(ClusterError::NoSuchReplica {
            primary: 0,
            replica: 1,
            count: 1
        })
    ));
    assert!(matches!(
        cluster.replica(2, 0),
        Err(ClusterError::NoSuchServer { index: 2, count: 2 })
    ));

    for (server, read_only) in [(primary, 0), (replica, 1), (other, 1)] {
        let mut conn = MySqlConnection::connect(&server.admin_url())
            .await
            .expect("login");
        let row = sqlx::query("SELECT @@server_id, @@read_only")
            .fetch_one(&mut conn)
            .await
            .expect("query runs");
        assert_eq!(row.get::<u64, _>(0), u64::from(server.server_id()));
        assert_eq!(
            row.get::<i64, _>(1),
            read_only,
            "@@read_only of {}",
            server.name()
        );
        conn.close().await.expect("close");
    }

    let mut conn = MySqlConnection::connect(&replica.admin_url())
        .await
        .expect("login");
    let refused = sqlx::query("CREATE DATABASE written_on_a_replica")
        .execute(&mut conn)
        .await
        .expect_err("a replica refuses writes, even orderly's");
    // ER_OPTION_PREVENTS_STATEMENT: "running with the --read-only option".
    assert_eq!(
        refused.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("HY000")
    );
    assert!(refused.to_string().contains("read-only"), "{refused}");
    conn.close().await.expect("close");

    create_table(primary).await;
    insert(primary, 1).await;
    cluster
        .wait_replicas_caught_up(CATCH_UP)
        .await
        .expect("caught up");
    assert_eq!(ids(replica).await, [1], "the replica has the primary's row");
    let mut conn = MySqlConnection::connect(&other.admin_url()).await.expect("login");
    let databases: Vec<String> = sqlx::query_scalar("SELECT schema_name FROM information_schema.schemata")
        .fetch_all(&mut conn)
        .await
        .expect("show");
    assert!(
        !databases.iter().any(|d| d == "replicated"),
        "server 1's replica has only server 1's data: {databases:?}"
    );
    conn.close().await.expect("close");

    let dir = cluster.dir().to_path_buf();
    let pids: Vec<u32> = cluster
        .mariadb_servers()
        .iter()
        .chain(cluster.replicas(0))
        .chain(cluster.replicas(1))
        .filter_map(MariaDbServer::pid)
        .collect();
    assert_eq!(pids.len(), 4);
    drop(cluster);
    assert!(!dir.exists(), "{} is removed", dir.display());
    for pid in pids {
        let pid = libc::pid_t::try_from(pid).expect("pid fits");
        assert!(!pid_alive(pid), "server {pid} is dead");
    }
}

#[tokio::test]
async fn a_replica_whose_sql_thread_is_stopped_lags_until_it_is_started() {
    let cluster = cluster_with_replicas(1).await;
    let (primary, replica) = (cluster.mariadb(0), cluster.replica(0, 0).expect("replica"));
    create_table(primary).await;
    insert(primary, 1).await;
    cluster
        .wait_replicas_caught_up(CATCH_UP)
        .await
        .expect("caught up");

    cluster
        .stop_replica_sql(0, 0)
        .await
        .expect("STOP SLAVE SQL_THREAD");
    insert(primary, 2).await;
    assert!(matches!(
        cluster.wait_replicas_caught_up(Duration::from_millis(200)).await,
        Err(ClusterError::Replication { .. })
    ));
    assert_eq!(ids(replica).await, [1], "the replica does not apply");

    cluster
        .start_replica_sql(0, 0)
        .await
        .expect("START SLAVE SQL_THREAD");
    cluster
        .wait_replicas_caught_up(CATCH_UP)
        .await
        .expect("caught up");
    assert_eq!(ids(replica).await, [1, 2], "the replica caught up");
}

#[tokio::test]
async fn a_killed_or_stopped_replica_resumes_where_it_left_off() {
    let cluster = cluster_with_replicas(1).await;
    let (primary, replica) = (cluster.mariadb(0), cluster.replica(0, 0).expect("replica"));
    let port = replica.port();
    create_table(primary).await;
    insert(primary, 1).await;
    cluster
        .wait_replicas_caught_up(CATCH_UP)
        .await
        .expect("caught up");

    // Killed: it resumes from mysql.gtid_slave_pos; a transaction applied twice would stop
    // its SQL thread on a duplicate key, which `start_replica` reports.
    cluster.kill_replica(0, 0).expect("kill");
    assert!(!replica.is_running());
    insert(primary, 2).await;
    cluster
        .wait_replicas_caught_up(CATCH_UP)
        .await
        .expect("nothing to wait for");
    cluster.start_replica(0, 0).await.expect("restart after kill");
    assert_eq!(replica.port(), port);
    cluster
        .wait_replicas_caught_up(CATCH_UP)
        .await
        .expect("caught up");
    assert_eq!(ids(replica).await, [1, 2]);

    cluster.stop_replica(0, 0).await.expect("clean stop");
    insert(primary, 3).await;
    cluster.start_replica(0, 0).await.expect("restart after stop");
    cluster
        .wait_replicas_caught_up(CATCH_UP)
        .await
        .expect("caught up");
    assert_eq!(ids(replica).await, [1, 2, 3]);

    // Its primary killed and restarted: the replica reconnects by itself.
    cluster.kill_mariadb(0).expect("kill the primary");
    cluster.start_mariadb(0).await.expect("restart the primary");
    insert(primary, 4).await;
    cluster
        .wait_replicas_caught_up(CATCH_UP)
        .await
        .expect("caught up");
    assert_eq!(ids(replica).await, [1, 2, 3, 4]);
}

/// Whether a process `pid` exists (a zombie counts: the cluster reaps its children).
fn pid_alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}
