//! `octolog group list|describe|reset` as a user runs them against a real `octolog serve`:
//! output (text and `--json`, exactly), exit status and the one-line error, as INTERFACE.md's
//! "Consumer groups" promises. Group state comes from `reset` (which commits positions for a
//! group without members) and, for a live member, from a raw `Groups.Join` stream.

mod common;

use common::{octolog, run, start, BrokerProcess, WAIT};
use octolog_proto::v1 as pb;
use serde_json::{json, Value};

/// Topic `jobs` with 2 partitions: 5 records in partition 0, 2 in partition 1.
fn jobs_topic(broker: &BrokerProcess) {
    run(
        broker,
        &["topic", "create", "jobs", "--partitions", "2"],
        "",
    )
    .ok();
    run(
        broker,
        &["produce", "jobs", "--partition", "0"],
        "a\nb\nc\nd\ne\n",
    )
    .ok();
    run(broker, &["produce", "jobs", "--partition", "1"], "f\ng\n").ok();
}

/// `group describe G --json`, checked to be one line, parsed.
fn describe_json(broker: &BrokerProcess, group: &str) -> Value {
    let out = run(broker, &["group", "describe", group, "--json"], "");
    let text = out.ok();
    assert_eq!(text.lines().count(), 1, "one JSON object: {text}");
    serde_json::from_str(text).expect("json")
}

/// (committed_offset, high_watermark, lag) of each partition of `describe --json`, in order.
fn positions(description: &Value) -> Vec<(Value, u64, u64)> {
    description["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| {
            (
                p["committed_offset"].clone(),
                p["high_watermark"].as_u64().expect("high_watermark"),
                p["lag"].as_u64().expect("lag"),
            )
        })
        .collect()
}

#[test]
fn reset_creates_positions_that_list_and_describe_show_exactly() {
    let (_dir, broker) = start();
    jobs_topic(&broker);

    assert_eq!(run(&broker, &["group", "list"], "").ok(), "");
    assert_eq!(
        run(&broker, &["group", "list", "--json"], "").ok(),
        "{\"groups\":[]}\n"
    );
    run(&broker, &["group", "describe", "billing"], "").fails(1, "unknown group \"billing\"");
    run(&broker, &["group", "describe", "billing", "--json"], "")
        .fails(1, "unknown group \"billing\"");

    // Offset 3 is inside partition 0 and past the end of partition 1: clamped to its 2.
    assert_eq!(
        run(
            &broker,
            &[
                "group",
                "reset",
                "billing",
                "--topic",
                "jobs",
                "--to-offset",
                "3"
            ],
            ""
        )
        .ok(),
        "jobs 0 3\njobs 1 2\n"
    );
    run(
        &broker,
        &[
            "group",
            "reset",
            "a.b-c_9",
            "--topic",
            "jobs",
            "--to-latest",
        ],
        "",
    )
    .ok();
    assert_eq!(
        run(&broker, &["group", "list"], "").ok(),
        "a.b-c_9  empty  0\nbilling  empty  0\n"
    );
    assert_eq!(
        run(&broker, &["group", "list", "--json"], "").ok(),
        concat!(
            r#"{"groups":[{"name":"a.b-c_9","state":"empty","members":0},"#,
            r#"{"name":"billing","state":"empty","members":0}]}"#,
            "\n"
        )
    );

    assert_eq!(
        run(&broker, &["group", "describe", "billing", "--json"], "").ok(),
        concat!(
            r#"{"name":"billing","state":"empty","members":[],"partitions":["#,
            r#"{"topic":"jobs","partition":0,"committed_offset":3,"high_watermark":5,"lag":2,"owner":null},"#,
            r#"{"topic":"jobs","partition":1,"committed_offset":2,"high_watermark":2,"lag":0,"owner":null}]}"#,
            "\n"
        )
    );
    assert_eq!(
        run(&broker, &["group", "describe", "billing"], "").ok(),
        "group billing (empty, 0 members)\n\
         TOPIC  PARTITION  COMMITTED  HIGH_WATERMARK  LAG  OWNER\n\
         jobs           0          3               5    2  -\n\
         jobs           1          2               2    0  -\n"
    );

    // New records raise the high watermark and the lag, not the committed position.
    run(
        &broker,
        &["produce", "jobs", "--partition", "1"],
        "h\ni\nj\n",
    )
    .ok();
    assert_eq!(
        positions(&describe_json(&broker, "billing")),
        vec![(json!(3), 5, 2), (json!(2), 5, 3)]
    );

    let reset = |to: &[&str]| {
        let mut args = vec!["group", "reset", "billing", "--topic", "jobs"];
        args.extend_from_slice(to);
        run(&broker, &args, "").ok().to_string()
    };
    assert_eq!(reset(&["--to-earliest"]), "jobs 0 0\njobs 1 0\n");
    assert_eq!(
        positions(&describe_json(&broker, "billing")),
        vec![(json!(0), 5, 5), (json!(0), 5, 5)]
    );
    assert_eq!(reset(&["--to-latest"]), "jobs 0 5\njobs 1 5\n");
    assert_eq!(
        positions(&describe_json(&broker, "billing")),
        vec![(json!(5), 5, 0), (json!(5), 5, 0)]
    );
    assert_eq!(reset(&["--to-offset", "4"]), "jobs 0 4\njobs 1 4\n");
    assert_eq!(
        positions(&describe_json(&broker, "billing")),
        vec![(json!(4), 5, 1), (json!(4), 5, 1)]
    );
    assert_eq!(
        reset(&["--to-offset", "18446744073709551615"]),
        "jobs 0 5\njobs 1 5\n",
        "clamped to the high watermark"
    );
    assert_eq!(
        positions(&describe_json(&broker, "billing")),
        vec![(json!(5), 5, 0), (json!(5), 5, 0)]
    );
}

#[test]
fn reset_to_time_starts_at_the_first_record_at_or_after_it() {
    let (_dir, broker) = start();
    run(&broker, &["topic", "create", "events"], "").ok();
    run(&broker, &["produce", "events"], "a\nb\nc\n").ok();
    run(&broker, &["produce", "events"], "d\ne\n").ok();
    let records = run(
        &broker,
        &[
            "consume",
            "events",
            "--from",
            "beginning",
            "--exit-at-end",
            "--json",
        ],
        "",
    )
    .json_lines();
    let timestamps: Vec<i64> = records
        .iter()
        .map(|r| r["timestamp_ms"].as_i64().expect("timestamp_ms"))
        .collect();
    assert_eq!(timestamps.len(), 5);
    let reset_to_time = |ms: i64| {
        run(
            &broker,
            &[
                "group",
                "reset",
                "replay",
                "--topic",
                "events",
                "--to-time",
                &ms.to_string(),
            ],
            "",
        )
        .ok()
        .to_string()
    };
    // Records of one run may share a millisecond, so the expected offset is computed from the
    // timestamps the log holds: the first record at or after the time.
    for ms in [timestamps[3], timestamps[1], timestamps[4] + 1, 0] {
        let want = timestamps
            .iter()
            .position(|&t| t >= ms)
            .unwrap_or(timestamps.len());
        assert_eq!(
            reset_to_time(ms),
            format!("events 0 {want}\n"),
            "--to-time {ms}"
        );
        let description = describe_json(&broker, "replay");
        assert_eq!(
            positions(&description),
            vec![(json!(want), 5, 5 - want as u64)],
            "--to-time {ms}"
        );
    }
}

#[test]
fn bad_usage_exits_2_and_broker_errors_exit_1() {
    let (_dir, broker) = start();
    jobs_topic(&broker);
    let base = ["group", "reset", "billing", "--topic", "jobs"];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        run(&broker, &args, "")
    };
    with(&[]).fails(2, "--to-earliest");
    with(&["--to-earliest", "--to-latest"]).fails(2, "cannot be used with");
    with(&["--to-offset", "3", "--to-time", "0"]).fails(2, "cannot be used with");
    with(&["--to-offset", "x"]).fails(2, "invalid value 'x'");
    with(&["--to-offset"]).fails(2, "--to-offset");
    run(&broker, &["group", "reset", "billing", "--to-earliest"], "").fails(2, "--topic");
    run(&broker, &["group", "describe"], "").fails(2, "<GROUP>");
    run(&broker, &["group", "list", "--bogus"], "").fails(2, "--bogus");
    // None of the refused commands created the group.
    run(&broker, &["group", "describe", "billing"], "").fails(1, "unknown group \"billing\"");

    run(
        &broker,
        &[
            "group",
            "reset",
            "billing",
            "--topic",
            "nope",
            "--to-earliest",
        ],
        "",
    )
    .fails(1, "unknown topic \"nope\"");
    run(
        &broker,
        &[
            "group",
            "reset",
            "bad name",
            "--topic",
            "jobs",
            "--to-earliest",
        ],
        "",
    )
    .fails(1, "invalid group name");
    assert_eq!(run(&broker, &["group", "list"], "").ok(), "");

    let unreachable = octolog(&["--broker", "127.0.0.1:1", "group", "list"], b"");
    unreachable.fails(1, "cannot connect");
}

/// A member on a raw `Groups.Join` stream: the sender keeps the stream open, `events` yields
/// what the broker sends.
struct Member {
    requests: tokio::sync::mpsc::Sender<pb::MemberRequest>,
    events: tonic::Streaming<pb::MemberEvent>,
    member_id: String,
}

/// The next event on a member's stream, within [`WAIT`].
async fn next_event(events: &mut tonic::Streaming<pb::MemberEvent>) -> pb::member_event::Kind {
    tokio::time::timeout(WAIT, events.message())
        .await
        .expect("an event within WAIT")
        .expect("stream ok")
        .and_then(|e| e.kind)
        .expect("an event")
}

/// Joins `group` reading `topic`, and waits for the member's first assignment; returns the
/// member and the (topic, partition) pairs assigned.
async fn join(addr: &str, group: &str, topic: &str) -> (Member, i32, Vec<(String, u32)>) {
    let mut client = pb::groups_client::GroupsClient::connect(format!("http://{addr}"))
        .await
        .expect("connect Groups");
    let (requests, rx) = tokio::sync::mpsc::channel(4);
    requests
        .send(pb::MemberRequest {
            kind: Some(pb::member_request::Kind::Join(pb::JoinGroup {
                group: group.to_string(),
                topics: vec![topic.to_string()],
                // Long enough that the member stays through the test without heartbeats.
                session_timeout_ms: 120_000,
                rebalance_timeout_ms: 0,
                client_id: "test-member".to_string(),
            })),
        })
        .await
        .expect("queue join");
    let mut events = client
        .join(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("join")
        .into_inner();
    let member_id = match next_event(&mut events).await {
        pb::member_event::Kind::Joined(j) => j.member_id,
        other => panic!("first event should be joined: {other:?}"),
    };
    let assignment = match next_event(&mut events).await {
        pb::member_event::Kind::Assignment(a) => a,
        other => panic!("second event should be the assignment: {other:?}"),
    };
    let assigned = assignment
        .partitions
        .iter()
        .map(|p| (p.topic.clone(), p.partition))
        .collect();
    (
        Member {
            requests,
            events,
            member_id,
        },
        assignment.member_epoch,
        assigned,
    )
}

#[test]
fn reset_is_refused_while_a_member_is_live_and_describe_shows_it() {
    let (_dir, broker) = start();
    jobs_topic(&broker);
    run(
        &broker,
        &[
            "group",
            "reset",
            "live",
            "--topic",
            "jobs",
            "--to-offset",
            "1",
        ],
        "",
    )
    .ok();

    // A multi-threaded runtime keeps driving the member's connection while this thread runs
    // the `octolog` binary.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (mut member, epoch, mut assigned) = runtime.block_on(join(broker.addr(), "live", "jobs"));
    assigned.sort();
    assert_eq!(
        assigned,
        vec![("jobs".to_string(), 0), ("jobs".to_string(), 1)]
    );

    run(
        &broker,
        &["group", "reset", "live", "--topic", "jobs", "--to-earliest"],
        "",
    )
    .fails(1, "group \"live\" has 1 live member(s); stop them first");

    let description = describe_json(&broker, "live");
    let id = member.member_id.as_str();
    assert_eq!(description["name"], "live");
    assert_eq!(description["state"], "stable");
    let members = description["members"].as_array().expect("members");
    assert_eq!(members.len(), 1, "{description}");
    assert_eq!(
        members[0],
        json!({
            "member_id": id,
            "client_id": "test-member",
            "epoch": epoch,
            "topics": ["jobs"],
            "assigned": [{"topic": "jobs", "partition": 0}, {"topic": "jobs", "partition": 1}],
        })
    );
    // The refused reset moved nothing; the member owns both partitions.
    assert_eq!(
        description["partitions"],
        json!([
            {"topic": "jobs", "partition": 0, "committed_offset": 1, "high_watermark": 5, "lag": 4, "owner": id},
            {"topic": "jobs", "partition": 1, "committed_offset": 1, "high_watermark": 2, "lag": 1, "owner": id},
        ])
    );
    let text = run(&broker, &["group", "describe", "live"], "")
        .ok()
        .to_string();
    assert!(
        text.starts_with("group live (stable, 1 members)\n"),
        "{text}"
    );
    assert!(text.contains("MEMBER_ID"), "{text}");
    let member_line = text
        .lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("a line for the member: {text}"));
    assert_eq!(
        member_line.split_whitespace().collect::<Vec<_>>(),
        vec![
            id,
            "test-member",
            &epoch.to_string(),
            "jobs",
            "jobs/0,jobs/1"
        ]
    );
    assert_eq!(
        run(&broker, &["group", "list"], "").ok(),
        "live  stable  1\n"
    );

    // Once the member leaves, the group is empty again and the reset goes through.
    runtime.block_on(async {
        member
            .requests
            .send(pb::MemberRequest {
                kind: Some(pb::member_request::Kind::Leave(pb::LeaveGroup {
                    member_epoch: epoch,
                    offsets: vec![],
                })),
            })
            .await
            .expect("send leave");
        // The broker answers the leave's (empty) commit, then ends the stream.
        tokio::time::timeout(WAIT, async {
            while let Ok(Some(_)) = member.events.message().await {}
        })
        .await
        .expect("stream ends after leave");
    });
    assert_eq!(
        run(
            &broker,
            &["group", "reset", "live", "--topic", "jobs", "--to-earliest"],
            ""
        )
        .ok(),
        "jobs 0 0\njobs 1 0\n"
    );
    assert_eq!(
        run(&broker, &["group", "list"], "").ok(),
        "live  empty  0\n"
    );
}
