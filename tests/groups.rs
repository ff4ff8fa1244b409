//! Consumer groups end to end: members in one process and in separate processes share a topic's
//! partitions, and the delivery contract holds on the exact set of (partition, offset) each
//! member handled: with joins, clean leaves and rebalances every record reaches the group once;
//! a crash (stream closed without leaving, kill -9 of a member process, kill -9 of the broker)
//! sends the records after the last commit once more, marked as redelivered, and nothing else
//! is ever delivered twice. Zombies with stale epochs are fenced.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{within, BrokerProcess, OctologProcess, TestBroker};
use octolog_client::{Client, Consumer, Offset, ProducerRecord, Rebalance, StartAt, TopicOptions};
use octolog_proto::v1 as pb;
use octolog_proto::v1::groups_client::GroupsClient;
use tokio::sync::{mpsc, watch, Notify};

/// One delivery to a member: (member, partition, offset, redelivered).
type Delivery = (String, u32, u64, bool);

/// Everything the members of a test were handed, in order, and a wake-up per delivery.
#[derive(Default)]
struct Log {
    deliveries: Mutex<Vec<Delivery>>,
    grew: Notify,
}

impl Log {
    fn len(&self) -> usize {
        self.deliveries.lock().unwrap().len()
    }

    /// Distinct (partition, offset) delivered so far.
    fn distinct(&self) -> usize {
        let d = self.deliveries.lock().unwrap();
        d.iter()
            .map(|(_, p, o, _)| (*p, *o))
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// Waits until `enough` says so, woken by deliveries.
    async fn wait_for(&self, what: &str, enough: impl Fn(&Log) -> bool) {
        within(what, async {
            loop {
                let grew = self.grew.notified();
                if enough(self) {
                    return;
                }
                grew.await;
            }
        })
        .await
    }
}

async fn create_topic(client: &Client, topic: &str, partitions: u32) {
    client
        .admin()
        .create_topic(topic, TopicOptions::new().partitions(partitions))
        .await
        .expect("create topic");
}

/// Produces `count` records spread round-robin over `partitions`, waiting for every ack.
async fn produce(client: &Client, topic: &str, partitions: u32, count: u64) {
    let producer = client.producer().build().await.expect("producer");
    let mut deliveries = Vec::new();
    for i in 0..count {
        let record = ProducerRecord::new(topic, format!("record-{i}"))
            .partition((i % u64::from(partitions)) as u32);
        deliveries.push(producer.send(record).await.expect("send"));
    }
    for d in deliveries {
        within("ack", d).await.expect("delivered");
    }
    producer.close().await;
}

/// A group consumer that reads until `stop` turns true, then leaves cleanly (`close`), or, if
/// `crash` turned true first, drops its consumer without leaving (its stream just closes).
fn spawn_member(
    client: Client,
    topic: &str,
    group: &str,
    name: &str,
    log: Arc<Log>,
    mut stop: watch::Receiver<bool>,
    crash: watch::Receiver<bool>,
    configure: impl FnOnce(octolog_client::ConsumerBuilder) -> octolog_client::ConsumerBuilder
        + Send
        + 'static,
) -> tokio::task::JoinHandle<Consumer> {
    let topic = topic.to_string();
    let group = group.to_string();
    let name = name.to_string();
    tokio::spawn(async move {
        let builder = client
            .consumer(topic)
            .group_start(StartAt::Beginning)
            .max_wait(Duration::from_millis(50))
            .client_id(name.clone());
        let mut consumer = configure(builder).build().await.expect("consumer");
        within("subscribe", consumer.subscribe(&group))
            .await
            .expect("subscribe");
        loop {
            if *stop.borrow_and_update() || *crash.borrow() {
                return consumer;
            }
            let records = consumer.poll().await.expect("poll");
            if !records.is_empty() {
                let mut d = log.deliveries.lock().unwrap();
                for r in records {
                    d.push((name.clone(), r.partition(), r.offset().0, r.redelivered()));
                }
                drop(d);
                log.grew.notify_waiters();
            }
        }
    })
}

/// Waits until group `group` has `members` members and is stable.
async fn wait_stable(
    client: &Client,
    group: &str,
    members: usize,
) -> octolog_client::GroupDescription {
    let deadline = tokio::time::Instant::now() + common::WAIT;
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        if let Ok(d) = client.admin().describe_group(group).await {
            if d.members.len() == members
                && d.state == octolog_client::GroupState::Stable
                && d.partitions.iter().all(|p| p.owner.is_some())
            {
                return d;
            }
            last = Some(d);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "group {group} not stable with {members} members within {:?}: {last:#?}",
        common::WAIT
    );
}

/// Asserts that every offset below each partition's high watermark was delivered, and returns
/// the (partition, offset) delivered more than once with the deliveries of each.
async fn check_coverage(
    client: &Client,
    topic: &str,
    log: &Log,
) -> BTreeMap<(u32, u64), Vec<Delivery>> {
    let info = client
        .admin()
        .describe_topic(topic)
        .await
        .expect("describe");
    let mut seen: BTreeMap<(u32, u64), Vec<Delivery>> = BTreeMap::new();
    for d in log.deliveries.lock().unwrap().iter() {
        seen.entry((d.1, d.2)).or_default().push(d.clone());
    }
    for p in info.partitions() {
        for o in 0..p.high_watermark().0 {
            assert!(
                seen.contains_key(&(p.partition(), o)),
                "gap: partition {} offset {o} never delivered",
                p.partition()
            );
        }
    }
    seen.into_iter().filter(|(_, v)| v.len() > 1).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_leaves_and_rebalances_deliver_every_record_exactly_once() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create_topic(&client, "jobs", 6).await;
    let log = Arc::new(Log::default());
    let (_crash_tx, crash) = watch::channel(false);
    let rebalances = Arc::new(Mutex::new(Vec::new()));
    let mut members = Vec::new();
    let mut stops = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let (stop_tx, stop) = watch::channel(false);
        let seen = Arc::clone(&rebalances);
        let tag = name.to_string();
        members.push(spawn_member(
            client.clone(),
            "jobs",
            "status",
            name,
            Arc::clone(&log),
            stop,
            crash.clone(),
            move |b| {
                b.on_rebalance(move |r: &Rebalance| {
                    seen.lock().unwrap().push((tag.clone(), r.clone()))
                })
            },
        ));
        stops.push(stop_tx);
        // Once the group has settled with the newcomer, records flow to every member before
        // the next one joins, so each join moves partitions away from members that read.
        wait_stable(&client, "status", i + 1).await;
        produce(&client, "jobs", 6, 200).await;
        let target = 200 * (i + 1);
        log.wait_for("deliveries", |l| l.distinct() >= target).await;
    }
    // a leaves cleanly while b and c read, and more records arrive.
    stops[0].send(true).unwrap();
    let a = within("a stops", members.remove(0)).await.expect("a");
    within("a leaves", a.close())
        .await
        .expect("a leaves cleanly");
    produce(&client, "jobs", 6, 300).await;
    log.wait_for("all 900 records", |l| l.distinct() >= 900)
        .await;
    for stop in &stops[1..] {
        stop.send(true).unwrap();
    }
    for m in members {
        let consumer = within("member stops", m).await.expect("member");
        within("leave", consumer.close())
            .await
            .expect("leaves cleanly");
    }
    let duplicates = check_coverage(&client, "jobs", &log).await;
    assert!(
        duplicates.is_empty(),
        "delivered twice without a crash: {duplicates:?}"
    );
    assert_eq!(log.len(), 900);
    assert!(
        log.deliveries.lock().unwrap().iter().all(|d| !d.3),
        "nothing is redelivered"
    );
    // Every member was told what it got and what it gave up.
    {
        let rebalances = rebalances.lock().unwrap();
        assert!(rebalances
            .iter()
            .any(|(m, r)| m == "a" && matches!(r, Rebalance::Revoked(_))));
        assert!(rebalances
            .iter()
            .any(|(m, r)| m == "c" && matches!(r, Rebalance::Assigned(_))));
    }
    // The group is empty now, with a committed position at the end of every partition.
    let d = client
        .admin()
        .describe_group("status")
        .await
        .expect("describe");
    assert!(d.members.is_empty());
    assert_eq!(d.partitions.len(), 6);
    for p in &d.partitions {
        assert_eq!(p.committed, Some(p.high_watermark), "{p:?}");
        assert_eq!(p.lag, 0);
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_members_uncommitted_records_go_once_more_to_the_next_owner_marked() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create_topic(&client, "jobs", 2).await;
    produce(&client, "jobs", 2, 400).await;
    let log = Arc::new(Log::default());
    // a commits only by hand: after 100 records, then reads on and crashes.
    let mut a = client
        .consumer("jobs")
        .group_start(StartAt::Beginning)
        .auto_commit(None)
        .max_wait(Duration::from_millis(50))
        .build()
        .await
        .expect("consumer");
    a.subscribe("status").await.expect("subscribe");
    let mut handed = Vec::new();
    within("a reads", async {
        while handed.len() < 100 {
            handed.extend(a.poll_at_most(100 - handed.len()).await.expect("poll"));
        }
    })
    .await;
    a.commit().await.expect("commit");
    let committed: BTreeMap<u32, Offset> = (0..2).map(|p| (p, a.position(p).unwrap())).collect();
    within("a reads on", async {
        while handed.len() < 250 {
            handed.extend(a.poll_at_most(250 - handed.len()).await.expect("poll"));
        }
    })
    .await;
    {
        let mut d = log.deliveries.lock().unwrap();
        for r in &handed {
            d.push(("a".into(), r.partition(), r.offset().0, r.redelivered()));
        }
    }
    // The crash: the consumer goes away without leaving; its stream closes.
    drop(a);
    let (_stop_tx, stop) = watch::channel(false);
    let (_crash_tx, crash) = watch::channel(false);
    let b = spawn_member(
        client.clone(),
        "jobs",
        "status",
        "b",
        Arc::clone(&log),
        stop,
        crash,
        |b| b,
    );
    log.wait_for("all 400 records", |l| l.distinct() >= 400)
        .await;
    _stop_tx.send(true).unwrap();
    within("b leaves", within("b stops", b).await.expect("b").close())
        .await
        .expect("b leaves");
    let duplicates = check_coverage(&client, "jobs", &log).await;
    // Exactly the records a was handed after its commit came again, each marked.
    let after_commit: BTreeSet<(u32, u64)> = handed
        .iter()
        .filter(|r| r.offset() >= committed[&r.partition()])
        .map(|r| (r.partition(), r.offset().0))
        .collect();
    assert!(!after_commit.is_empty());
    assert_eq!(
        duplicates.keys().copied().collect::<BTreeSet<_>>(),
        after_commit
    );
    for deliveries in duplicates.values() {
        assert_eq!(deliveries.len(), 2);
        assert_eq!(deliveries[0].0, "a");
        assert!(!deliveries[0].3);
        assert_eq!(deliveries[1].0, "b");
        assert!(deliveries[1].3, "second delivery marked: {deliveries:?}");
    }
    // b started each partition exactly at a's commit.
    {
        let log_d = log.deliveries.lock().unwrap();
        for p in 0..2u32 {
            let first_b = log_d
                .iter()
                .find(|d| d.0 == "b" && d.1 == p)
                .expect("b read p");
            assert_eq!(first_b.2, committed[&p].0);
        }
    }
    broker.stop().await;
}

/// Opens a raw membership stream; returns the sender (keep it to keep the stream open), the
/// event stream, and the member id.
async fn raw_member(
    addr: &str,
    group: &str,
    topic: &str,
    session_timeout_ms: u32,
    rebalance_timeout_ms: u32,
) -> (
    mpsc::Sender<pb::MemberRequest>,
    tonic::Streaming<pb::MemberEvent>,
    String,
) {
    let mut groups = GroupsClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::MemberRequest {
        kind: Some(pb::member_request::Kind::Join(pb::JoinGroup {
            group: group.into(),
            topics: vec![topic.into()],
            session_timeout_ms,
            rebalance_timeout_ms,
            client_id: "raw".into(),
        })),
    })
    .await
    .unwrap();
    let mut events = within(
        "join",
        groups.join(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("join")
    .into_inner();
    let member_id = match within("joined", events.message()).await {
        Ok(Some(pb::MemberEvent {
            kind: Some(pb::member_event::Kind::Joined(j)),
        })) => j.member_id,
        other => panic!("expected joined, got {other:?}"),
    };
    (tx, events, member_id)
}

async fn next_assignment(events: &mut tonic::Streaming<pb::MemberEvent>) -> pb::Assignment {
    loop {
        match within("assignment", events.message()).await {
            Ok(Some(pb::MemberEvent {
                kind: Some(pb::member_event::Kind::Assignment(a)),
            })) => return a,
            Ok(Some(_)) => continue,
            other => panic!("expected an assignment, got {other:?}"),
        }
    }
}

async fn commit_result(events: &mut tonic::Streaming<pb::MemberEvent>) -> pb::CommitResult {
    loop {
        match within("commit result", events.message()).await {
            Ok(Some(pb::MemberEvent {
                kind: Some(pb::member_event::Kind::CommitResult(r)),
            })) => return r,
            Ok(Some(_)) => continue,
            other => panic!("expected a commit result, got {other:?}"),
        }
    }
}

fn commit(epoch: i32, partition: u32, offset: u64) -> pb::MemberRequest {
    pb::MemberRequest {
        kind: Some(pb::member_request::Kind::Commit(pb::CommitOffsets {
            request_id: 7,
            member_epoch: epoch,
            offsets: vec![pb::TopicPartitionOffset {
                topic: "jobs".into(),
                partition,
                offset,
            }],
        })),
    }
}

fn partitions_of(a: &pb::Assignment) -> BTreeSet<u32> {
    a.partitions.iter().map(|p| p.partition).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombies_with_stale_epochs_or_lost_membership_are_fenced() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create_topic(&client, "jobs", 4).await;
    produce(&client, "jobs", 4, 40).await;
    let (a_tx, mut a_events, a_id) = raw_member(&broker.addr(), "g", "jobs", 1000, 10_000).await;
    // a heartbeats until told to fall silent.
    let (silent_tx, mut silent) = watch::channel(false);
    let beats = a_tx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while !*silent.borrow_and_update() {
            tick.tick().await;
            let beat = pb::MemberRequest {
                kind: Some(pb::member_request::Kind::Heartbeat(pb::Heartbeat {})),
            };
            if beats.send(beat).await.is_err() {
                return;
            }
        }
    });
    let first = next_assignment(&mut a_events).await;
    assert_eq!(partitions_of(&first), BTreeSet::from([0, 1, 2, 3]));
    a_tx.send(commit(first.member_epoch, 0, 5)).await.unwrap();
    let r = commit_result(&mut a_events).await;
    assert_eq!(r.partitions[0].error_code, 0, "{r:?}");

    // b joins: a is asked to give up two partitions, under a new epoch.
    let (b_tx, mut b_events, b_id) = raw_member(&broker.addr(), "g", "jobs", 10_000, 10_000).await;
    let second = next_assignment(&mut a_events).await;
    assert!(second.member_epoch > first.member_epoch);
    let kept = partitions_of(&second);
    assert_eq!(kept.len(), 2);
    let moving: Vec<u32> = (0..4).filter(|p| !kept.contains(p)).collect();
    // b gets nothing that a still owns.
    let b_first = next_assignment(&mut b_events).await;
    assert!(partitions_of(&b_first).is_empty(), "{b_first:?}");
    a_tx.send(pb::MemberRequest {
        kind: Some(pb::member_request::Kind::Release(pb::ReleasePartitions {
            member_epoch: second.member_epoch,
            offsets: vec![],
            partitions: moving
                .iter()
                .map(|&p| pb::TopicPartition {
                    topic: "jobs".into(),
                    partition: p,
                })
                .collect(),
        })),
    })
    .await
    .unwrap();
    let b_second = next_assignment(&mut b_events).await;
    assert_eq!(partitions_of(&b_second), moving.iter().copied().collect());

    // a commits a partition it gave up: fenced, nothing committed.
    a_tx.send(commit(second.member_epoch, moving[0], 33))
        .await
        .unwrap();
    let r = commit_result(&mut a_events).await;
    assert_eq!(
        r.partitions[0].error_code,
        pb::ErrorCode::FencedMemberEpoch as i32,
        "{r:?}"
    );
    assert!(
        r.partitions[0].error_message.contains("does not own"),
        "{r:?}"
    );
    // b commits under an epoch older than the one it got the partition with: fenced too.
    b_tx.send(commit(b_first.member_epoch, moving[0], 34))
        .await
        .unwrap();
    let r = commit_result(&mut b_events).await;
    assert_eq!(
        r.partitions[0].error_code,
        pb::ErrorCode::FencedMemberEpoch as i32,
        "{r:?}"
    );
    // a fetches a partition it gave up: refused.
    let mut rpc = broker.rpc().await;
    let fetch = |member: &str, epoch: i32, partition: u32| pb::FetchRequest {
        topic: "jobs".into(),
        partitions: vec![pb::PartitionFetch {
            partition,
            offset: 0,
            max_bytes: 0,
        }],
        max_wait_ms: 0,
        min_bytes: 0,
        max_bytes: 0,
        format: 0,
        group: Some(pb::GroupContext {
            group: "g".into(),
            member_id: member.into(),
            member_epoch: epoch,
        }),
    };
    let answer = rpc
        .fetch(fetch(&a_id, second.member_epoch, moving[0]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.partitions[0].error_code,
        pb::ErrorCode::FencedMemberEpoch as i32
    );
    assert!(answer.partitions[0].batches.is_empty());
    // ... while its own partitions and b's new ones are served.
    let own = *kept.iter().next().unwrap();
    let answer = rpc
        .fetch(fetch(&a_id, second.member_epoch, own))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.partitions[0].error_code, 0);
    assert!(!answer.partitions[0].batches.is_empty());

    // a goes silent (no heartbeats): removed after its 1 s session; its stream says why.
    silent_tx.send(true).unwrap();
    let end = loop {
        match within("a's removal", a_events.message()).await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    let status = end.expect_err("stream ends with a status");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("session timed out"), "{status:?}");
    // The zombie's fetch: unknown member.
    let answer = rpc
        .fetch(fetch(&a_id, second.member_epoch, own))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.partitions[0].error_code,
        pb::ErrorCode::UnknownMember as i32
    );
    // b now owns all four; a's refused commit never landed.
    let b_third = next_assignment(&mut b_events).await;
    assert_eq!(partitions_of(&b_third), BTreeSet::from([0, 1, 2, 3]));
    let d = client.admin().describe_group("g").await.unwrap();
    assert_eq!(d.members.len(), 1);
    assert_eq!(d.members[0].member_id, b_id);
    let committed: BTreeMap<u32, Option<Offset>> = d
        .partitions
        .iter()
        .map(|p| (p.partition, p.committed))
        .collect();
    assert_eq!(committed[&0], Some(Offset(5)));
    assert_eq!(
        committed[&moving[0]],
        if moving[0] == 0 {
            Some(Offset(5))
        } else {
            None
        }
    );
    drop(a_tx);
    drop(b_tx);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_does_not_release_in_time_is_removed_and_the_others_go_on() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create_topic(&client, "jobs", 2).await;
    produce(&client, "jobs", 2, 20).await;
    // A slow member: owns everything, then never releases what it is asked to give up.
    let (a_tx, mut a_events, _) = raw_member(&broker.addr(), "g", "jobs", 10_000, 300).await;
    next_assignment(&mut a_events).await;
    let log = Arc::new(Log::default());
    let (stop_tx, stop) = watch::channel(false);
    let (_crash_tx, crash) = watch::channel(false);
    let b = spawn_member(
        client.clone(),
        "jobs",
        "g",
        "b",
        Arc::clone(&log),
        stop,
        crash,
        |b| b,
    );
    // After a's 300 ms rebalance timeout, b gets both partitions and reads everything.
    log.wait_for("all 20 records", |l| l.distinct() >= 20).await;
    let status = loop {
        match within("a's removal", a_events.message()).await {
            Ok(Some(_)) => continue,
            Err(status) => break status,
            Ok(None) => panic!("stream ended without a status"),
        }
    };
    assert!(status.message().contains("rebalance timeout"), "{status:?}");
    stop_tx.send(true).unwrap();
    within("b leaves", within("b stops", b).await.unwrap().close())
        .await
        .unwrap();
    drop(a_tx);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_positions_survive_a_broker_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::spawn(dir.path(), &[]);
    let client = Client::connect(broker.addr()).await.unwrap();
    create_topic(&client, "jobs", 2).await;
    produce(&client, "jobs", 2, 100).await;
    let mut a = client
        .consumer("jobs")
        .group_start(StartAt::Beginning)
        .auto_commit(None)
        .build()
        .await
        .unwrap();
    a.subscribe("status").await.unwrap();
    let mut handed = 0;
    within("a reads", async {
        while handed < 60 {
            handed += a.poll_at_most(60 - handed).await.unwrap().len();
        }
    })
    .await;
    a.commit().await.unwrap();
    let committed: BTreeMap<u32, Offset> = (0..2).map(|p| (p, a.position(p).unwrap())).collect();
    assert_eq!(committed.values().map(|o| o.0).sum::<u64>(), 60);
    broker.kill9();
    drop(a);
    let broker = BrokerProcess::spawn(dir.path(), &[]);
    let client = Client::connect(broker.addr()).await.unwrap();
    let d = client.admin().describe_group("status").await.unwrap();
    for p in &d.partitions {
        assert_eq!(p.committed, Some(committed[&p.partition]), "{p:?}");
        assert_eq!(p.lag, 50 - committed[&p.partition].0);
    }
    // A new member resumes exactly at the commits; the broker cannot know how far the old
    // member got, so what follows the commit is marked as possibly redelivered.
    let mut b = client
        .consumer("jobs")
        .max_wait(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    b.subscribe("status").await.unwrap();
    let mut got: BTreeMap<u32, Vec<(u64, bool)>> = BTreeMap::new();
    within("b reads the rest", async {
        while got.values().map(Vec::len).sum::<usize>() < 40 {
            for r in b.poll().await.unwrap() {
                got.entry(r.partition())
                    .or_default()
                    .push((r.offset().0, r.redelivered()));
            }
        }
    })
    .await;
    for (p, records) in &got {
        let offsets: Vec<u64> = records.iter().map(|r| r.0).collect();
        assert_eq!(offsets, (committed[p].0..50).collect::<Vec<_>>());
        assert!(records.iter().all(|r| r.1));
    }
    b.close().await.unwrap();
}

// The body blocks on the processes' output; the broker runs on the runtime's worker threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_processes_killed_with_sigkill_lose_nothing_and_duplicate_only_marked_records() {
    {
        let broker = TestBroker::start().await;
        let client = broker.client().await;
        create_topic(&client, "jobs", 4).await;
        produce(&client, "jobs", 4, 400).await;
        let args = |addr: &str| -> Vec<std::ffi::OsString> {
            [
                "--broker",
                addr,
                "consume",
                "jobs",
                "--group",
                "workers",
                "--from",
                "beginning",
                "--json",
            ]
            .iter()
            .map(std::ffi::OsString::from)
            .collect()
        };
        let spawn = || {
            let a = args(&broker.addr());
            let refs: Vec<&std::ffi::OsStr> = a.iter().map(|s| s.as_os_str()).collect();
            OctologProcess::spawn(&refs)
        };
        let parse = |line: String| -> (u32, u64, bool) {
            let v: serde_json::Value = serde_json::from_str(&line).expect("json line");
            (
                v["partition"].as_u64().unwrap() as u32,
                v["offset"].as_u64().unwrap(),
                v["redelivered"].as_bool().unwrap(),
            )
        };
        // One member alone prints some records, then is killed without warning.
        let first = spawn();
        let mut printed_by_first = Vec::new();
        for _ in 0..150 {
            printed_by_first.push(parse(first.next_line().expect("a line")));
        }
        let mut first = first;
        first.signal("KILL");
        first.wait();
        // Two more members share the rest; one leaves cleanly (SIGTERM) half way.
        let second = spawn();
        let third = spawn();
        let mut seen: Vec<(u32, u64, bool)> = printed_by_first.clone();
        let distinct = |seen: &Vec<(u32, u64, bool)>| {
            seen.iter()
                .map(|s| (s.0, s.1))
                .collect::<BTreeSet<_>>()
                .len()
        };
        let mut third_stopped = false;
        let deadline = std::time::Instant::now() + common::WAIT;
        while distinct(&seen) < 400 {
            assert!(
                std::time::Instant::now() < deadline,
                "records missing: {} of 400",
                distinct(&seen)
            );
            for process in [&second, &third] {
                while let Some(line) = process.try_next_line(Duration::from_millis(20)) {
                    seen.push(parse(line));
                }
            }
            if !third_stopped && distinct(&seen) >= 300 {
                third.signal("TERM");
                third_stopped = true;
            }
        }
        let mut third = third;
        assert!(third.wait().success(), "{}", third.stderr());
        while let Some(line) = third.try_next_line(Duration::from_millis(0)) {
            seen.push(parse(line));
        }
        let mut second = second;
        second.signal("TERM");
        assert!(second.wait().success(), "{}", second.stderr());
        while let Some(line) = second.try_next_line(Duration::from_millis(0)) {
            seen.push(parse(line));
        }
        // No gaps; duplicates only of what the killed member printed, the second time marked.
        let mut count: BTreeMap<(u32, u64), Vec<bool>> = BTreeMap::new();
        for (p, o, r) in &seen {
            count.entry((*p, *o)).or_default().push(*r);
        }
        assert_eq!(count.len(), 400);
        let first_set: BTreeSet<(u32, u64)> = printed_by_first.iter().map(|s| (s.0, s.1)).collect();
        for (key, flags) in &count {
            assert!(flags.len() <= 2, "{key:?} delivered {} times", flags.len());
            if flags.len() == 2 {
                assert!(
                    first_set.contains(key),
                    "{key:?} duplicated outside the crash window"
                );
                assert!(flags[1], "{key:?}'s second delivery is marked");
            }
        }
        // The group has committed everything.
        let d = client.admin().describe_group("workers").await.unwrap();
        assert!(d.partitions.iter().all(|p| p.lag == 0), "{d:?}");
        broker.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_member_does_not_pause_the_partitions_that_stay() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create_topic(&client, "jobs", 12).await;
    // Deliveries with their arrival time, per member.
    let arrivals: Arc<Mutex<Vec<(String, u32, u64, std::time::Instant)>>> = Arc::default();
    let (stop_tx, stop) = watch::channel(false);
    let mut members = Vec::new();
    let start_member = |name: &str| {
        let client = client.clone();
        let arrivals = Arc::clone(&arrivals);
        let mut stop = stop.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let mut c = client
                .consumer("jobs")
                .group_start(StartAt::Beginning)
                .max_wait(Duration::from_millis(50))
                .client_id(name.clone())
                .build()
                .await
                .unwrap();
            c.subscribe("timing").await.unwrap();
            while !*stop.borrow_and_update() {
                for r in c.poll().await.unwrap() {
                    arrivals.lock().unwrap().push((
                        name.clone(),
                        r.partition(),
                        r.offset().0,
                        std::time::Instant::now(),
                    ));
                }
            }
            c.close().await.unwrap();
        })
    };
    for name in ["a", "b", "c"] {
        members.push(start_member(name));
    }
    // A steady stream: one record per partition every 10 ms.
    let producer = client
        .producer()
        .linger(Duration::ZERO)
        .build()
        .await
        .unwrap();
    let (produce_stop_tx, mut produce_stop) = watch::channel(false);
    let producing = tokio::spawn(async move {
        let mut i = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        while !*produce_stop.borrow_and_update() {
            tick.tick().await;
            for p in 0..12 {
                let d = producer
                    .send(ProducerRecord::new("jobs", format!("{i}")).partition(p))
                    .await
                    .unwrap();
                drop(d);
            }
            i += 1;
        }
        producer.close().await;
    });
    let before = wait_stable(&client, "timing", 3).await;
    // Let records flow for a while, then a fourth member joins.
    let flowing_since = arrivals.lock().unwrap().len();
    within("records flowing", async {
        while arrivals.lock().unwrap().len() < flowing_since + 600 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let joined_at = std::time::Instant::now();
    members.push(start_member("d"));
    let after = wait_stable(&client, "timing", 4).await;
    // Keep going a little past the rebalance, then stop everything.
    let settled = arrivals.lock().unwrap().len();
    within("records after the rebalance", async {
        while arrivals.lock().unwrap().len() < settled + 600 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let ended_at = std::time::Instant::now();
    produce_stop_tx.send(true).unwrap();
    within("producer", producing).await.unwrap();
    stop_tx.send(true).unwrap();
    for m in members {
        within("member", m).await.unwrap();
    }
    let owner = |d: &octolog_client::GroupDescription, p: u32| {
        d.partitions
            .iter()
            .find(|x| x.partition == p)
            .unwrap()
            .owner
            .clone()
    };
    let stayed: Vec<u32> = (0..12)
        .filter(|&p| owner(&before, p) == owner(&after, p))
        .collect();
    assert_eq!(
        stayed.len(),
        9,
        "only 3 of 12 partitions move to the fourth member"
    );
    // The longest gap between deliveries on a partition that stayed, around the join.
    let arrivals = arrivals.lock().unwrap();
    let mut longest = Duration::ZERO;
    for &p in &stayed {
        let times: Vec<std::time::Instant> = arrivals
            .iter()
            .filter(|a| a.1 == p && a.3 >= joined_at && a.3 <= ended_at)
            .map(|a| a.3)
            .collect();
        assert!(!times.is_empty(), "partition {p} kept flowing");
        let mut last = joined_at;
        for t in times {
            longest = longest.max(t - last);
            last = t;
        }
    }
    println!("longest gap on a partition that stayed: {longest:?} (records every 10 ms)");
    // Not a speed target: a stop-the-world rebalance would pause them for the whole
    // hand-over (release, commit, reassign); these keep flowing with gaps far below it.
    assert!(longest < Duration::from_secs(2), "longest gap {longest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_stops_reading_its_stream_is_removed() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create_topic(&client, "jobs", 1).await;
    // A small receive window, so the broker's answers back up quickly.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", broker.addr()))
        .unwrap()
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect()
        .await
        .unwrap();
    let mut groups = GroupsClient::new(channel);
    let (out, out_rx) = mpsc::channel(30_000);
    out.send(pb::MemberRequest {
        kind: Some(pb::member_request::Kind::Join(pb::JoinGroup {
            group: "g".into(),
            topics: vec!["jobs".into()],
            session_timeout_ms: 300,
            rebalance_timeout_ms: 300,
            client_id: "stalled".into(),
        })),
    })
    .await
    .unwrap();
    let mut inbound = groups
        .join(tokio_stream::wrappers::ReceiverStream::new(out_rx))
        .await
        .unwrap()
        .into_inner();
    let _joined = inbound.message().await.unwrap().unwrap();
    let assignment = next_assignment(&mut inbound).await;
    // Commits keep coming (each refused, each answered), but nothing is read any more. The
    // broker may give up on the member (and drop its stream) before the last is sent: then
    // sending stops.
    for i in 0..20_000u64 {
        let sent = out
            .send(pb::MemberRequest {
                kind: Some(pb::member_request::Kind::Commit(pb::CommitOffsets {
                    request_id: i + 1,
                    member_epoch: assignment.member_epoch,
                    offsets: vec![pb::TopicPartitionOffset {
                        topic: "jobs".into(),
                        partition: 7,
                        offset: 1,
                    }],
                })),
            })
            .await;
        if sent.is_err() {
            break;
        }
    }
    // The broker gives up on it within its session timeout of not reading.
    within("the stalled member's removal", async {
        loop {
            match client.admin().describe_group("g").await {
                Ok(d) if d.members.is_empty() => return,
                Err(_) => return, // no members and no positions: the group is gone
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    drop(inbound);
    drop(out);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_joins_are_refused_clearly_and_the_broker_keeps_serving() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create_topic(&client, "jobs", 1).await;
    let join = |group: &str, topics: &[&str]| pb::MemberRequest {
        kind: Some(pb::member_request::Kind::Join(pb::JoinGroup {
            group: group.into(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        })),
    };
    let heartbeat = pb::MemberRequest {
        kind: Some(pb::member_request::Kind::Heartbeat(pb::Heartbeat {})),
    };
    for (first, code, needle) in [
        (
            join("bad group!", &["jobs"]),
            tonic::Code::InvalidArgument,
            "invalid group name",
        ),
        (
            join("g", &[]),
            tonic::Code::InvalidArgument,
            "at least one topic",
        ),
        (join("g", &["nope"]), tonic::Code::NotFound, "unknown topic"),
        (heartbeat, tonic::Code::InvalidArgument, "first message"),
    ] {
        let mut groups = GroupsClient::connect(format!("http://{}", broker.addr()))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(4);
        tx.send(first).await.unwrap();
        let status = within(
            "a refused join",
            groups.join(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        .expect_err("refused");
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(needle), "{status:?}");
    }
    // A second join on an open stream ends that member's session, and it is gone.
    let (tx, mut events, member) = raw_member(&broker.addr(), "g", "jobs", 10_000, 10_000).await;
    next_assignment(&mut events).await;
    tx.send(join("g", &["jobs"])).await.unwrap();
    let status = loop {
        match within("the end of the stream", events.message()).await {
            Ok(Some(_)) => continue,
            Err(status) => break status,
            Ok(None) => panic!("stream ended without a status"),
        }
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let d = client.admin().describe_group("g").await;
    assert!(d.map_or(true, |d| d.members.iter().all(|m| m.member_id != member)));
    // Nothing above hurt the broker: a well-formed member joins and gets the partition.
    let (_tx, mut events, _) = raw_member(&broker.addr(), "g", "jobs", 10_000, 10_000).await;
    assert_eq!(
        partitions_of(&next_assignment(&mut events).await),
        BTreeSet::from([0])
    );
    broker.stop().await;
}
