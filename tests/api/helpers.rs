//! The test harness lives in the testkit ([`orderly_testkit::test_app`]): one local cluster
//! per test binary, and a `TestApp` per test with its own databases, Redis key prefix and
//! server bound on port 0.

pub use orderly_testkit::test_app::*;

use std::process::Stdio;

use orderly::config::Settings;

/// A port free at the time of asking, for a child process to bind.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `orderly` binary with `settings` written to a file of the returned directory (keep it
/// while the command runs) and passed as `--config`; logs at `warn`, to a pipe.
pub fn orderly_command(settings: &Settings) -> (tokio::process::Command, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("orderly.toml");
    std::fs::write(&config, toml::to_string(settings).unwrap()).unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_orderly"));
    command
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    (command, dir)
}

/// An app whose archive database is on a MariaDB server of the test's own, which the test
/// stops or freezes while the shards stay up on the shared cluster; `tweak` as
/// [`TestApp::spawn_with`]'s.
pub async fn app_with_own_archive(
    tweak: impl FnOnce(&mut Settings),
) -> (orderly_testkit::cluster::LocalCluster, TestApp) {
    use orderly_testkit::cluster::{ClusterSpec, LocalCluster};
    let own = LocalCluster::start(ClusterSpec {
        mariadb_servers: 1,
        with_redis: false,
        with_nats: false,
        ..ClusterSpec::default()
    })
    .await
    .expect("the archive's own MariaDB server");
    let server = own.mariadb(0).base_url();
    let app = TestApp::spawn_with(|s| {
        tweak(s);
        let name = s.archive.url.rsplit_once('/').unwrap().1.to_owned();
        s.archive.url = format!("{server}/{name}");
    })
    .await;
    (own, app)
}
