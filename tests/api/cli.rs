//! The binary's command line: what an operator sees before any server is involved.

use std::process::Command;

fn orderly() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_orderly"));
    // Nothing from the environment of the test run leaks in.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ORDERLY_") {
            c.env_remove(k);
        }
    }
    c.env("RUST_LOG", "off");
    c
}

/// An order id of this build's layout, for the decode below.
const ORDER_ID: &str = "1796001234567890123";

#[test]
fn id_decode_fails_loudly_when_the_settings_do_not_load() {
    // No secret set: the settings are invalid, so their shard count cannot be trusted.
    let out = orderly().args(["id", "decode", ORDER_ID]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "decoded with a guessed shard count");
    assert!(stderr.contains("--shards"), "{stderr}");
    assert!(stderr.contains("jwt_secret"), "the cause is named: {stderr}");
    // An unknown key is named too.
    let out = orderly()
        .args(["id", "decode", ORDER_ID])
        .env("ORDERLY_AUTH__JWT_SECRET", "0123456789abcdef0123456789abcdef")
        .env("ORDERLY_SHARDS_COUNT", "64")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("shards_count"), "{stderr}");
    // With the count given, no settings are needed.
    let out = orderly()
        .args(["id", "decode", ORDER_ID, "--shards", "32"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("of 32"));
}

#[test]
fn completions_and_the_man_page_are_generated() {
    let out = orderly().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(script.contains("orderly") && script.contains("serve"), "{script}");
    let out = orderly().arg("man").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.starts_with(".ie") || page.contains(".TH orderly"), "{page}");
    assert!(page.contains("ORDERLY_"), "the man page explains the settings");
}
