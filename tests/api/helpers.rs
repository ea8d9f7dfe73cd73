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
