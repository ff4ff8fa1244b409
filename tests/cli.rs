//! The `octolog` binary as a user runs it: `serve` as a child process, and the topic, produce
//! and consume commands with their output, exit status and error line exactly as INTERFACE.md
//! promises.

mod common;

use std::path::Path;

use common::{block_on, octolog, run, start, BrokerProcess, OctologProcess};
use octolog_client::{partition_for_key, Client, ProducerRecord};
use serde_json::Value;

/// `object` printed compactly with exactly the keys of `order`, in that order (INTERFACE.md's);
/// nested values print as serde_json prints them (object keys sorted).
fn printed_in_order(object: &Value, order: &[&str]) -> String {
    let map = object
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {object}"));
    let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
    let mut want: Vec<&str> = order.to_vec();
    keys.sort_unstable();
    want.sort_unstable();
    assert_eq!(keys, want, "exactly the documented keys: {object}");
    let fields: Vec<String> = order
        .iter()
        .map(|k| format!("{}:{}", Value::from(*k), map[*k]))
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// Asserts `line` parses to `value` and is printed with its keys in `order`.
fn assert_exact_object(line: &str, value: &Value, order: &[&str]) {
    assert_eq!(
        line,
        printed_in_order(value, order),
        "keys in the documented order"
    );
}

fn segment_files(partition_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(partition_dir)
        .expect("partition dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn topic_commands_create_list_describe_and_delete() {
    let (_dir, broker) = start();
    let out = run(
        &broker,
        &[
            "topic",
            "create",
            "gateway.jobs.gromacs",
            "--partitions",
            "3",
        ],
        "",
    );
    assert_eq!(
        out.ok(),
        "created topic gateway.jobs.gromacs with 3 partitions\n"
    );
    run(
        &broker,
        &["topic", "create", "audit", "--retention-ms", "-1"],
        "",
    )
    .ok();

    assert_eq!(
        run(&broker, &["topic", "list"], "").ok(),
        "audit\ngateway.jobs.gromacs\n"
    );
    let list: Value =
        serde_json::from_str(run(&broker, &["topic", "list", "--json"], "").ok()).expect("json");
    assert_eq!(
        list,
        serde_json::json!([
            {"name": "audit", "partitions": 1},
            {"name": "gateway.jobs.gromacs", "partitions": 3}
        ])
    );

    run(
        &broker,
        &["produce", "gateway.jobs.gromacs", "--partition", "1"],
        "a\nb\n",
    )
    .ok();
    let out = run(
        &broker,
        &["topic", "describe", "gateway.jobs.gromacs", "--json"],
        "",
    );
    let text = out.ok();
    assert_eq!(text.lines().count(), 1, "one JSON object: {text}");
    let line = text.trim_end();
    let description: Value = serde_json::from_str(line).expect("json");
    assert_eq!(description["name"], "gateway.jobs.gromacs");
    let partitions = description["partitions"].as_array().expect("array");
    assert_eq!(partitions.len(), 3);
    let order = [
        "partition",
        "log_start_offset",
        "high_watermark",
        "segments",
        "size_bytes",
    ];
    let printed: Vec<String> = partitions
        .iter()
        .map(|p| printed_in_order(p, &order))
        .collect();
    assert_eq!(
        line,
        format!(
            r#"{{"name":"gateway.jobs.gromacs","partitions":[{}]}}"#,
            printed.join(",")
        ),
        "keys in the documented order"
    );
    for (i, p) in partitions.iter().enumerate() {
        assert_eq!(p["partition"], i);
        assert_eq!(p["log_start_offset"], 0);
        assert_eq!(p["high_watermark"], if i == 1 { 2 } else { 0 });
        assert!(p["segments"].as_u64().is_some_and(|n| n >= 1), "{p}");
        let size = p["size_bytes"].as_u64().expect("size_bytes");
        assert_eq!(size > 0, i == 1, "{p}");
    }

    let human = run(&broker, &["topic", "describe", "audit"], "");
    let human = human.ok();
    assert!(human.starts_with("topic audit (1 partitions)\n"), "{human}");
    assert!(human.contains("HIGH_WATERMARK"), "{human}");

    run(&broker, &["topic", "create", "audit"], "").fails(1, "already exists");
    run(&broker, &["topic", "create", "bad name"], "").fails(1, "invalid topic name");
    run(
        &broker,
        &["topic", "create", "zero", "--partitions", "0"],
        "",
    )
    .fails(2, "--partitions must be at least 1");

    assert_eq!(
        run(&broker, &["topic", "delete", "audit"], "").ok(),
        "deleted topic audit\n"
    );
    assert_eq!(
        run(&broker, &["topic", "list"], "").ok(),
        "gateway.jobs.gromacs\n"
    );
    run(&broker, &["topic", "describe", "audit"], "").fails(1, "unknown topic \"audit\"");
    run(&broker, &["topic", "delete", "audit"], "").fails(1, "unknown topic \"audit\"");
    // A deleted name can be created again, empty.
    run(&broker, &["topic", "create", "audit"], "").ok();
    let out = run(
        &broker,
        &["consume", "audit", "--from", "beginning", "--exit-at-end"],
        "",
    );
    assert_eq!(out.ok(), "");
}

#[test]
fn produce_and_consume_round_trip_as_json() {
    let (_dir, broker) = start();
    run(
        &broker,
        &["topic", "create", "jobs", "--partitions", "3"],
        "",
    )
    .ok();
    let input = "job-1::queued\njob-2::running\nno separator\njob-1::done::really\n\njob-3::\n";
    let out = run(
        &broker,
        &[
            "produce",
            "jobs",
            "--key-separator",
            "::",
            "--header",
            "site=hpc1",
            "--header",
            "run=a=b",
            "--json",
        ],
        input,
    );
    let acks_text = out.ok().to_string();
    let acks = out.json_lines();
    assert_eq!(acks.len(), 6, "one acknowledgement per line: {acks_text}");
    for (line, ack) in acks_text.lines().zip(&acks) {
        assert_exact_object(line, ack, &["partition", "offset"]);
    }
    let key_partition = |key: &str| partition_for_key(key.as_bytes(), 3);
    assert_eq!(acks[0]["partition"], key_partition("job-1"));
    assert_eq!(acks[3]["partition"], key_partition("job-1"));
    assert_eq!(acks[1]["partition"], key_partition("job-2"));
    assert_eq!(acks[5]["partition"], key_partition("job-3"));

    let out = run(
        &broker,
        &[
            "consume",
            "jobs",
            "--from",
            "beginning",
            "--exit-at-end",
            "--json",
        ],
        "",
    );
    let text = out.ok().to_string();
    let records = out.json_lines();
    assert_eq!(records.len(), 6, "{text}");
    let order = [
        "topic",
        "partition",
        "offset",
        "timestamp_ms",
        "key",
        "value",
        "headers",
    ];
    for (line, record) in text.lines().zip(&records) {
        assert_exact_object(line, record, &order);
        assert_eq!(record["topic"], "jobs");
        assert!(record["timestamp_ms"]
            .as_i64()
            .is_some_and(|t| t > 1_600_000_000_000));
        assert_eq!(
            record["headers"],
            serde_json::json!({"site": "hpc1", "run": "a=b"})
        );
    }
    // Every acknowledged (partition, offset) holds what was sent from that line.
    let sent: [(Value, &str); 6] = [
        ("job-1".into(), "queued"),
        ("job-2".into(), "running"),
        (Value::Null, "no separator"),
        ("job-1".into(), "done::really"),
        (Value::Null, ""),
        ("job-3".into(), ""),
    ];
    for (ack, (key, value)) in acks.iter().zip(&sent) {
        let record = records
            .iter()
            .find(|r| r["partition"] == ack["partition"] && r["offset"] == ack["offset"])
            .unwrap_or_else(|| panic!("no record for {ack}"));
        assert_eq!(&record["key"], key, "{record}");
        assert_eq!(record["value"], *value, "{record}");
    }
    // Per partition, offsets are dense and in line order.
    for p in 0..3 {
        let offsets: Vec<u64> = records
            .iter()
            .filter(|r| r["partition"] == p)
            .map(|r| r["offset"].as_u64().expect("offset"))
            .collect();
        assert_eq!(
            offsets,
            (0..offsets.len() as u64).collect::<Vec<_>>(),
            "partition {p}"
        );
    }

    // Text output: the values, one per line.
    let p = key_partition("job-1");
    let out = run(
        &broker,
        &[
            "consume",
            "jobs",
            "--partition",
            &p.to_string(),
            "--from",
            "beginning",
            "--exit-at-end",
        ],
        "",
    );
    let values: Vec<&str> = out.ok().lines().collect();
    let mut want: Vec<&Value> = records.iter().filter(|r| r["partition"] == p).collect();
    want.sort_by_key(|r| r["offset"].as_u64());
    let want: Vec<&str> = want
        .iter()
        .map(|r| r["value"].as_str().expect("text"))
        .collect();
    assert_eq!(values, want);
    let position = |v: &str| values.iter().position(|x| *x == v).expect(v);
    assert!(position("queued") < position("done::really"));

    // --count stops after N records, even while following.
    let out = run(
        &broker,
        &["consume", "jobs", "--from", "beginning", "--count", "2"],
        "",
    );
    assert_eq!(out.ok().lines().count(), 2);
    // From the end with --exit-at-end there is nothing to print.
    let out = run(&broker, &["consume", "jobs", "--exit-at-end"], "");
    assert_eq!(out.ok(), "");
    // Without --json, produce prints nothing; with --partition every record goes there.
    let out = run(
        &broker,
        &["produce", "jobs", "--partition", "2", "--json"],
        "x\ny\n",
    );
    for ack in out.json_lines() {
        assert_eq!(ack["partition"], 2);
    }
    assert_eq!(run(&broker, &["produce", "jobs"], "z\n").ok(), "");
    // The last line needs no newline.
    let out = run(
        &broker,
        &["produce", "jobs", "--partition", "0", "--json"],
        "p\nq",
    );
    assert_eq!(out.json_lines().len(), 2);
}

/// A following consumer prints each record as it arrives (flushed line by line, as `| jq`
/// needs), and SIGTERM or SIGINT stops it with status 0.
fn check_following_consumer(signal: &str, json: bool) {
    let (_dir, broker) = start();
    run(
        &broker,
        &["topic", "create", "live", "--partitions", "2"],
        "",
    )
    .ok();
    let mut args = vec![
        "--broker",
        broker.addr(),
        "consume",
        "live",
        "--from",
        "beginning",
    ];
    if json {
        args.push("--json");
    }
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let mut consumer = OctologProcess::spawn(&args);
    for i in 0..3 {
        let value = format!("event-{i}");
        run(&broker, &["produce", "live"], &format!("{value}\n")).ok();
        let line = consumer.next_line().expect("a line per record");
        if json {
            let record: Value = serde_json::from_str(&line).expect("json");
            assert_eq!(record["value"], value.as_str());
        } else {
            assert_eq!(line, value);
        }
    }
    consumer.signal(signal);
    assert_eq!(consumer.wait().code(), Some(0), "{}", consumer.stderr());
    assert_eq!(
        consumer.next_line(),
        None,
        "nothing printed after the signal"
    );
}

#[test]
fn following_consumer_prints_records_as_they_come_and_stops_on_sigterm() {
    check_following_consumer("TERM", false);
}

#[test]
fn following_json_consumer_stops_on_sigint() {
    check_following_consumer("INT", true);
}

#[test]
fn consume_replays_from_an_offset_and_from_a_time() {
    let (_dir, broker) = start();
    run(
        &broker,
        &["topic", "create", "replay", "--retention-ms", "-1"],
        "",
    )
    .ok();
    const BASE: i64 = 1_700_000_000_000;
    block_on(async {
        let client = Client::connect(broker.addr()).await.expect("connect");
        let producer = client.producer().build().await.expect("producer");
        let mut deliveries = Vec::new();
        for i in 0..10 {
            let record =
                ProducerRecord::new("replay", format!("r{i}")).timestamp_ms(BASE + 1000 * i);
            deliveries.push(producer.send(record).await.expect("send"));
        }
        for d in deliveries {
            d.await.expect("acknowledged");
        }
    });
    let values = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["consume", "replay", "--exit-at-end"];
        all.extend_from_slice(args);
        run(&broker, &all, "")
            .ok()
            .lines()
            .map(str::to_string)
            .collect()
    };
    let suffix = |from: usize| -> Vec<String> { (from..10).map(|i| format!("r{i}")).collect() };
    assert_eq!(values(&["--from", "beginning"]), suffix(0));
    assert_eq!(values(&["--from", "0"]), suffix(0));
    assert_eq!(values(&["--from", "7"]), suffix(7));
    assert_eq!(values(&["--from", "10"]), suffix(10));
    assert_eq!(values(&["--from", &format!("@{}", BASE + 3000)]), suffix(3));
    assert_eq!(values(&["--from", &format!("@{}", BASE + 3001)]), suffix(4));
    assert_eq!(values(&["--from", "@0"]), suffix(0));
    assert_eq!(
        values(&["--from", &format!("@{}", BASE + 60_000)]),
        suffix(10)
    );
    assert_eq!(values(&["--from", "4", "--count", "3"]), ["r4", "r5", "r6"]);
    let out = run(
        &broker,
        &[
            "consume",
            "replay",
            "--from",
            &format!("@{}", BASE + 5000),
            "--json",
            "--count",
            "1",
        ],
        "",
    );
    let record = &out.json_lines()[0];
    assert_eq!(
        (record["offset"].as_u64(), record["timestamp_ms"].as_i64()),
        (Some(5), Some(BASE + 5000))
    );
    assert_eq!(record["key"], Value::Null);
    assert_eq!(record["headers"], serde_json::json!({}));

    run(
        &broker,
        &["consume", "replay", "--from", "11", "--exit-at-end"],
        "",
    )
    .fails(1, "out of range");
}

#[test]
fn failures_exit_1_with_one_error_line_and_bad_usage_exits_2() {
    let (_dir, broker) = start();
    run(&broker, &["topic", "create", "t", "--partitions", "3"], "").ok();
    let unknown = "unknown topic \"nope\"";
    run(&broker, &["produce", "nope"], "x\n").fails(1, unknown);
    run(&broker, &["consume", "nope", "--exit-at-end"], "").fails(1, unknown);
    run(&broker, &["topic", "describe", "nope"], "").fails(1, unknown);
    run(&broker, &["produce", "t", "--partition", "9"], "x\n").fails(1, "0..3");
    run(
        &broker,
        &["consume", "t", "--partition", "9", "--exit-at-end"],
        "",
    )
    .fails(1, "0..3");

    let unreachable = "cannot connect to broker at 127.0.0.1:1";
    for args in [
        &["topic", "list"][..],
        &["produce", "t"],
        &["consume", "t", "--exit-at-end"],
    ] {
        let mut all = vec!["--broker", "127.0.0.1:1"];
        all.extend_from_slice(args);
        octolog(&all, b"x\n").fails(1, unreachable);
    }
    // The environment variable works like the flag.
    let out = std::process::Command::new(common::OCTOLOG)
        .args(["topic", "list"])
        .env("OCTOLOG_BROKER", broker.addr())
        .output()
        .expect("run");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "t\n");

    for (args, needle) in [
        (&["topic", "list", "--bogus"][..], "--bogus"),
        (&["consume", "t", "--from", "yesterday"], "yesterday"),
        (&["consume", "t", "--from", "@soon"], "@soon"),
        (&["consume", "t", "--from", "-5"], "-5"),
        (&["consume", "t", "--count", "many"], "many"),
        (
            &["consume", "t", "--group", "g", "--partition", "0"],
            "--partition",
        ),
        (&["consume"], "TOPIC"),
        (&["produce", "t", "--header", "novalue"], "novalue"),
        (&["produce", "t", "--key-separator", ""], "--key-separator"),
        (&["frobnicate"], "frobnicate"),
        (&["serve", "--listen", "not-an-address"], "not-an-address"),
        (&["serve", "--fsync", "sometimes"], "sometimes"),
        (
            &["serve", "--page-cache-window-bytes", "-2"],
            "page_cache_window_bytes",
        ),
    ] {
        run(&broker, args, "x\n").fails(2, needle);
    }
    // A configuration file that cannot be used is bad usage too.
    let dir = tempfile::tempdir().expect("temp dir");
    let bad_config = dir.path().join("octolog.toml");
    std::fs::write(&bad_config, "fsink = \"always\"\n").expect("write config");
    let missing = dir.path().join("missing.toml");
    for (config, needle) in [(&bad_config, "fsink"), (&missing, "cannot read")] {
        let config = config.to_str().expect("utf-8 path");
        run(&broker, &["serve", "--config", config], "").fails(2, needle);
    }
    // Nothing above reached the topic.
    let out = run(
        &broker,
        &["consume", "t", "--from", "beginning", "--exit-at-end"],
        "",
    );
    assert_eq!(out.ok(), "");
}

#[test]
fn oversized_record_from_the_cli_is_refused() {
    let (_dir, broker) = start();
    run(&broker, &["topic", "create", "big"], "").ok();
    // One line larger than the broker's default batch_bytes_max of 1 MiB.
    let line = format!("{}\n", "x".repeat((1 << 20) + 100));
    run(&broker, &["produce", "big"], &line).fails(1, "exceeds batch_bytes_max");
    let out = run(&broker, &["topic", "describe", "big", "--json"], "");
    let description: Value = serde_json::from_str(out.ok()).expect("json");
    assert_eq!(description["partitions"][0]["high_watermark"], 0);
    // The broker goes on serving.
    let out = run(&broker, &["produce", "big", "--json"], "small\n");
    assert_eq!(out.ok(), "{\"partition\":0,\"offset\":0}\n");
    let out = run(
        &broker,
        &["consume", "big", "--from", "beginning", "--exit-at-end"],
        "",
    );
    assert_eq!(out.ok(), "small\n");
}

/// SIGTERM and SIGINT stop `serve` with status 0 and clean-shutdown markers, even while a
/// consumer is waiting for records (long poll) or subscribed (push).
fn check_signal_stops_cleanly(signal: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut broker = BrokerProcess::spawn(dir.path(), &[]);
    run(&broker, &["topic", "create", "t", "--partitions", "2"], "").ok();
    run(&broker, &["produce", "t", "--partition", "0"], "a\nb\n").ok();
    let status = block_on(async move {
        let client = Client::connect(broker.addr()).await.expect("connect");
        let mut waiting = Vec::new();
        for push in [false, true] {
            let mut consumer = client
                .consumer("t")
                .push(push)
                .max_wait(std::time::Duration::from_secs(30))
                .build()
                .await
                .expect("consumer");
            consumer
                .assign_all(octolog_client::StartAt::End)
                .await
                .expect("assign");
            // Nothing arrives meanwhile; by then the consumer waits at the broker.
            let idle =
                tokio::time::timeout(std::time::Duration::from_millis(200), consumer.next()).await;
            assert!(idle.is_err(), "{idle:?}");
            waiting.push(tokio::spawn(async move { consumer.next().await }));
        }
        broker.signal(signal);
        let status = tokio::task::spawn_blocking(move || {
            let status = broker.wait();
            (status, broker)
        })
        .await
        .expect("wait");
        for w in waiting {
            let ended = common::within("the consumer to see the broker go", w)
                .await
                .expect("task");
            assert!(ended.is_err(), "{ended:?}");
        }
        status
    });
    let (status, broker) = status;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", broker.stderr());
    for p in ["0", "1"] {
        let files = segment_files(&dir.path().join("t").join(p));
        for name in [
            "00000000000000000000.index",
            "00000000000000000000.log",
            "00000000000000000000.timeindex",
            "clean-shutdown",
        ] {
            assert!(
                files.iter().any(|f| f == name),
                "partition {p} lacks {name}: {files:?}"
            );
        }
    }
    drop(broker);
    // A restart finds everything, and takes the markers (a crash from now on is unclean).
    let broker = BrokerProcess::spawn(dir.path(), &[]);
    let out = run(
        &broker,
        &["consume", "t", "--from", "beginning", "--exit-at-end"],
        "",
    );
    assert_eq!(out.ok(), "a\nb\n");
    assert!(!dir.path().join("t/0/clean-shutdown").exists());
}

#[test]
fn sigterm_stops_serve_cleanly() {
    check_signal_stops_cleanly("TERM");
}

#[test]
fn sigint_stops_serve_cleanly() {
    check_signal_stops_cleanly("INT");
}

#[test]
fn second_broker_on_the_same_data_folder_is_refused() {
    let (dir, _broker) = start();
    let dir_arg = dir.path().to_str().expect("utf-8 path");
    let out = octolog(
        &["serve", "--listen", "127.0.0.1:0", "--data-dir", dir_arg],
        b"",
    );
    out.fails(1, "in use by another broker");
    assert_eq!(out.stdout, "", "it must not claim to listen");
}
