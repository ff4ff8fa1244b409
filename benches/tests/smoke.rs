//! Runs the real `octolog-bench` binary against its own in-process broker.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_octolog-bench");

/// Runs the binary with `args`, asserts it succeeded and printed exactly one line, and returns
/// that line parsed as JSON.
fn run_json(args: &[&str]) -> serde_json::Value {
    let output = Command::new(BIN)
        .args(args)
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{args:?}\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    serde_json::from_str(&stdout).expect("stdout is JSON")
}

/// Guards the `--json` contract of INTERFACE.md: every key present, as numbers, and every record
/// sent is received.
#[test]
fn json_run_reports_every_key_and_all_records() {
    let total_bytes = 2_000_000u64;
    let message_bytes = 1024u64;
    let json = run_json(&["--total-bytes", &total_bytes.to_string(), "--json"]);
    for key in [
        "produce_mb_s",
        "produce_records_s",
        "consume_mb_s",
        "consume_records_s",
    ] {
        let value = json[key].as_f64().unwrap_or(0.0);
        assert!(value > 0.0, "{key} = {value} in {json}");
    }
    for key in [
        "latency_p50_us",
        "latency_p99_us",
        "latency_p999_us",
        "latency_max_us",
    ] {
        assert!(json[key].is_u64(), "{key} in {json}");
    }
    let p50 = json["latency_p50_us"].as_u64().unwrap_or(0);
    let p99 = json["latency_p99_us"].as_u64().unwrap_or(0);
    let max = json["latency_max_us"].as_u64().unwrap_or(0);
    assert!(0 < p50, "{json}");
    assert!(p50 <= p99, "{json}");
    assert!(p99 <= max, "{json}");
    assert_eq!(json["records"].as_u64(), Some(total_bytes / message_bytes));
    assert_eq!(
        json["bytes"].as_u64(),
        Some(total_bytes / message_bytes * message_bytes)
    );
    assert_eq!(json["partitions"].as_u64(), Some(8));
    assert_eq!(json["producers"].as_u64(), Some(1));
    assert_eq!(json["consumers"].as_u64(), Some(1));
    assert_eq!(json["fsync"], "never");
    for key in ["group", "consume_duplicates", "consume_redelivered"] {
        assert!(json.get(key).is_none(), "{key} without --group in {json}");
    }
}

/// Bytes and records of the two-consumer runs below.
const SMALL_RUN_BYTES: u64 = 2_000_000;
const SMALL_RUN_RECORDS: u64 = SMALL_RUN_BYTES / 1024;

/// A run of `SMALL_RUN_BYTES` over 4 partitions with 2 consumers and `mode` (a flag), as JSON;
/// asserts that it reports the mode and every record.
fn two_consumer_run(mode: &str) -> serde_json::Value {
    let json = run_json(&[
        "--total-bytes",
        &SMALL_RUN_BYTES.to_string(),
        "--partitions",
        "4",
        "--consumers",
        "2",
        mode,
        "--json",
    ]);
    assert_eq!(json[mode.trim_start_matches("--")], true, "{json}");
    assert_eq!(json["records"].as_u64(), Some(SMALL_RUN_RECORDS), "{json}");
    json
}

/// Guards `--replay`: consumers start only once every record is acknowledged, still receive
/// every record, and no end-to-end latency is reported.
#[test]
fn replay_run_consumes_after_producing() {
    let json = two_consumer_run("--replay");
    for key in ["produce_mb_s", "consume_mb_s"] {
        let value = json[key].as_f64().unwrap_or(0.0);
        assert!(value > 0.0, "{key} = {value} in {json}");
    }
    assert!(json["latency_p99_us"].is_null(), "{json}");
}

/// Guards `--push`: consumers fed by `Subscribe` streams receive every record, with latency.
#[test]
fn push_run_receives_every_record() {
    let json = two_consumer_run("--push");
    assert!(json["latency_p50_us"].as_u64().unwrap_or(0) > 0, "{json}");
}

/// Guards `--group` (issue 5): two consumers sharing the topic through a consumer group receive
/// every record exactly once between them, and the duplicate and redelivery counts are reported.
#[test]
fn group_run_receives_every_record_once() {
    let total_bytes = 4_000_000u64;
    let message_bytes = 1024u64;
    let json = run_json(&[
        "--total-bytes",
        &total_bytes.to_string(),
        "--consumers",
        "2",
        "--partitions",
        "4",
        "--group",
        "smoke",
        "--json",
    ]);
    assert_eq!(json["group"], "smoke");
    assert_eq!(json["consumers"].as_u64(), Some(2));
    assert_eq!(json["records"].as_u64(), Some(total_bytes / message_bytes));
    assert_eq!(json["consume_duplicates"].as_u64(), Some(0), "{json}");
    // Nothing is redelivered without a lost session or a broker restart.
    assert_eq!(json["consume_redelivered"].as_u64(), Some(0), "{json}");
    let consume_mb_s = json["consume_mb_s"].as_f64().unwrap_or(0.0);
    assert!(consume_mb_s > 0.0, "{json}");
}

/// Guards the usage checks of `--group`: an empty or invalid name, and a group without
/// consumers, exit 2 naming the flag, before any broker is started.
#[test]
fn bad_group_flags_exit_2() {
    let bad: &[&[&str]] = &[
        &["--group", ""],
        &["--group", "has space"],
        &["--group", "g", "--consumers", "0"],
    ];
    for args in bad {
        let output = Command::new(BIN)
            .args(*args)
            .output()
            .expect("the binary runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("--group"), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?}");
    }
}

/// Guards the exit statuses: 2 for a bad flag, 1 with `error: ...` for an unreachable broker.
#[test]
fn bad_flags_exit_2_and_unreachable_broker_exits_1() {
    let output = Command::new(BIN)
        .args(["--message-bytes", "4"])
        .output()
        .expect("the binary runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--message-bytes"));

    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    let output = Command::new(BIN)
        .args(["--broker", "127.0.0.1:1", "--total-bytes", "2MB"])
        .output()
        .expect("the binary runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(output.stdout.is_empty());
}
