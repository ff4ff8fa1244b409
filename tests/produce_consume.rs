//! Producing and consuming through the client crate against a real in-process broker: round
//! trips of keys, values, headers and timestamps; dense, ordered offsets per partition; key
//! partitioning; replay from an offset and from a time; consumers waiting at the end of the
//! log (long poll and push).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{assert_dense, consume_all, from_beginning, value_text, within, TestBroker};
use octolog_client::{
    partition_for_key, Client, ConsumerRecord, Offset, OffsetSpec, ProducerRecord, StartAt,
    TopicOptions,
};
use octolog_proto::v1 as pb;

async fn create(client: &Client, topic: &str, partitions: u32) {
    client
        .admin()
        .create_topic(
            topic,
            TopicOptions::new().partitions(partitions).retention_ms(-1),
        )
        .await
        .expect("create topic");
}

/// Sends `records` through one producer and returns (partition, offset) per record, in order.
async fn send_all(
    client: &Client,
    batch_bytes: usize,
    records: Vec<ProducerRecord>,
) -> Vec<(u32, u64)> {
    send_all_with(client.producer().batch_bytes(batch_bytes), records).await
}

/// As `send_all`, with a producer built by `builder`.
async fn send_all_with(
    builder: octolog_client::ProducerBuilder,
    records: Vec<ProducerRecord>,
) -> Vec<(u32, u64)> {
    let producer = builder.build().await.expect("producer");
    let mut deliveries = Vec::with_capacity(records.len());
    for record in records {
        deliveries.push(producer.send(record).await.expect("send"));
    }
    let mut acks = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        let meta = within("delivery", delivery).await.expect("acknowledged");
        acks.push((meta.partition(), meta.offset().0));
    }
    producer.close().await;
    acks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_keeps_keys_values_headers_and_timestamps() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create(&client, "gateway.jobs.gromacs", 3).await;
    let topic = "gateway.jobs.gromacs";
    let records = vec![
        ProducerRecord::new(topic, "queued")
            .key("job-1")
            .header("site", "hpc1")
            .header("attempt", "1")
            .header("attempt", "2")
            .timestamp_ms(1_700_000_000_123),
        // An empty key is a key (hashed like any other), unlike a missing one.
        ProducerRecord::new(topic, "empty key").key(""),
        ProducerRecord::new(topic, "no key").partition(2),
        ProducerRecord::new(topic, "").key("empty-value"),
        ProducerRecord::new(topic, "ignored")
            .key("job-1")
            .null_value(),
        ProducerRecord::new(topic, Bytes::from_static(&[0, 255, 10, 13])).key(&b"\xff\x00"[..]),
    ];
    let before_ms = now_ms();
    let acks = send_all(&client, 256 << 10, records.clone()).await;
    let after_ms = now_ms();
    assert_eq!(acks[1].0, partition_for_key(b"", 3));
    assert_eq!(acks[2].0, 2);
    assert_eq!(acks[0].0, acks[4].0, "same key, same partition");

    let all = consume_all(&client, topic).await;
    let find = |(p, o): (u32, u64)| -> &ConsumerRecord {
        all[&p]
            .iter()
            .find(|r| r.offset() == Offset(o))
            .unwrap_or_else(|| panic!("no record at partition {p} offset {o}"))
    };
    assert_eq!(all.values().map(Vec::len).sum::<usize>(), records.len());

    let first = find(acks[0]);
    assert_eq!(first.topic(), topic);
    assert_eq!(first.partition(), acks[0].0);
    assert_eq!(first.key().map(|k| &k[..]), Some(&b"job-1"[..]));
    assert_eq!(first.value().map(|v| &v[..]), Some(&b"queued"[..]));
    assert_eq!(first.timestamp_ms(), 1_700_000_000_123);
    let headers: Vec<(&str, Option<&[u8]>)> = first
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_deref()))
        .collect();
    assert_eq!(
        headers,
        [
            ("site", Some(&b"hpc1"[..])),
            ("attempt", Some(&b"1"[..])),
            ("attempt", Some(&b"2"[..]))
        ]
    );

    let empty_key = find(acks[1]);
    assert_eq!(empty_key.key().map(|k| k.len()), Some(0));
    assert!(empty_key.headers().is_empty());
    // Without an explicit timestamp a record carries the time it was sent.
    assert!((before_ms..=after_ms).contains(&empty_key.timestamp_ms()));

    assert_eq!(find(acks[2]).key(), None);
    assert_eq!(find(acks[3]).value().map(|v| v.len()), Some(0));
    let tombstone = find(acks[4]);
    assert_eq!(tombstone.value(), None);
    assert_eq!(tombstone.key().map(|k| &k[..]), Some(&b"job-1"[..]));
    let binary = find(acks[5]);
    assert_eq!(binary.key().map(|k| &k[..]), Some(&b"\xff\x00"[..]));
    assert_eq!(binary.value().map(|v| &v[..]), Some(&[0, 255, 10, 13][..]));
}

/// Guards against a lone record waiting forever: the producer's sender did not learn the
/// linger deadline of a newly opened batch, so only a full batch or `flush` sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_record_is_sent_after_linger_without_flush() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create(&client, "lone", 1).await;
    let producer = client
        .producer()
        .linger(Duration::from_millis(20))
        .build()
        .await
        .expect("producer");
    for i in 0..3 {
        let delivery = producer
            .send(ProducerRecord::new("lone", "only"))
            .await
            .expect("send");
        let meta = within("a lingering batch to be sent", delivery)
            .await
            .expect("acknowledged");
        assert_eq!((meta.partition(), meta.offset()), (0, Offset(i)));
    }
}

/// Guards the promise that keyless records are spread over partitions: the sticky partition
/// moved on only when a batch filled up, so a slow producer (every batch closed by linger)
/// wrote to one partition forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_records_of_a_slow_producer_are_spread_over_partitions() {
    const PARTITIONS: u32 = 3;
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create(&client, "spread", PARTITIONS).await;
    let producer = client.producer().build().await.expect("producer");
    let mut counts = [0u32; PARTITIONS as usize];
    for _ in 0..2 * PARTITIONS {
        let delivery = producer
            .send(ProducerRecord::new("spread", "keyless"))
            .await
            .expect("send");
        let meta = within("delivery", delivery).await.expect("acknowledged");
        counts[meta.partition() as usize] += 1;
    }
    assert_eq!(counts, [2, 2, 2], "one batch per record, round robin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_are_dense_and_in_send_order_per_partition() {
    dense_and_in_send_order(true).await;
}

/// Guards the order of a producer without idempotence, whose batches carry no sequence the
/// broker could check: with several requests of a partition in flight, the produce stream's
/// order alone keeps them in send order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_are_dense_and_in_send_order_without_idempotence() {
    dense_and_in_send_order(false).await;
}

async fn dense_and_in_send_order(idempotent: bool) {
    const PARTITIONS: u32 = 4;
    const RECORDS: usize = 4000;
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create(&client, "orders", PARTITIONS).await;
    let records: Vec<ProducerRecord> = (0..RECORDS)
        .map(|i| ProducerRecord::new("orders", format!("{i}")).key(format!("key-{}", i % 40)))
        .collect();
    // Small batches sent at once: many batches, and many requests in flight per partition.
    let producer = client
        .producer()
        .batch_bytes(2048)
        .linger(std::time::Duration::ZERO)
        .idempotent(idempotent);
    let acks = send_all_with(producer, records).await;

    // In send order, each partition's acknowledged offsets run 0, 1, 2, ...
    let mut sent: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &(p, offset)) in acks.iter().enumerate() {
        let values = sent.entry(p).or_default();
        assert_eq!(offset, values.len() as u64, "record {i} on partition {p}");
        values.push(i);
    }
    assert_eq!(
        sent.len(),
        PARTITIONS as usize,
        "keys spread over every partition"
    );

    // Small fetches: many answers, batches split over them; fetched and pushed alike.
    for push in [false, true] {
        let mut consumer = from_beginning(&client, "orders", |b| {
            b.push(push).partition_bytes_max(4096).fetch_bytes_max(8192)
        })
        .await;
        let mut got: BTreeMap<u32, Vec<ConsumerRecord>> = BTreeMap::new();
        within("reading every record", async {
            let mut count = 0;
            while count < RECORDS {
                for record in consumer.poll().await.expect("poll") {
                    got.entry(record.partition()).or_default().push(record);
                    count += 1;
                }
            }
        })
        .await;
        for (p, indexes) in &sent {
            let records = &got[p];
            assert_dense(*p, records);
            let values: Vec<String> = records.iter().map(value_text).collect();
            let want: Vec<String> = indexes.iter().map(|i| i.to_string()).collect();
            assert_eq!(values, want, "partition {p} in send order (push {push})");
            assert_eq!(consumer.position(*p), Some(Offset(indexes.len() as u64)));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_fetch_limit_still_arrives_whole() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create(&client, "large", 1).await;
    let big = "b".repeat(300 << 10);
    send_all(
        &client,
        256 << 10,
        vec![
            ProducerRecord::new("large", big.clone()),
            ProducerRecord::new("large", "small"),
        ],
    )
    .await;
    for push in [false, true] {
        let mut consumer = from_beginning(&client, "large", |b| {
            b.push(push).partition_bytes_max(1024).fetch_bytes_max(1024)
        })
        .await;
        let first = within("the large record", consumer.next())
            .await
            .expect("next");
        assert_eq!(first.offset(), Offset(0));
        assert_eq!(
            first.value().map(Bytes::len),
            Some(big.len()),
            "push {push}"
        );
        let second = within("the record after it", consumer.next())
            .await
            .expect("next");
        assert_eq!(value_text(&second), "small");
    }
}

/// Guards the meaning of 0 in a fetch: "the broker's default", not "one batch at most", and
/// not "nothing" for the partitions after the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_fetch_with_default_limits_returns_everything_available() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create(&client, "defaults", 2).await;
    // Several batches in each partition.
    let records = (0..100)
        .map(|i| ProducerRecord::new("defaults", format!("{i}")).partition(i % 2))
        .collect();
    send_all(&client, 128, records).await;
    let mut rpc = broker.rpc().await;
    for format in [pb::RecordFormat::Records, pb::RecordFormat::Batches] {
        let data = rpc
            .fetch(pb::FetchRequest {
                topic: "defaults".into(),
                partitions: (0..2)
                    .map(|partition| pb::PartitionFetch {
                        partition,
                        offset: 0,
                        max_bytes: 0,
                    })
                    .collect(),
                format: format as i32,
                ..Default::default()
            })
            .await
            .expect("fetch")
            .into_inner()
            .partitions;
        for d in &data {
            let count = match format {
                pb::RecordFormat::Records => d.records.len(),
                pb::RecordFormat::Batches => octolog_batch::decode_batches(&d.batches)
                    .expect("valid batches")
                    .len(),
            };
            assert_eq!(count, 50, "partition {} {format:?}", d.partition);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_goes_to_the_same_partition() {
    const PARTITIONS: u32 = 5;
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create(&client, "keyed", PARTITIONS).await;
    let keys: Vec<String> = (0..25).map(|k| format!("user-{k}")).collect();
    let records = (0..250)
        .map(|i| ProducerRecord::new("keyed", "v").key(keys[i % keys.len()].clone()))
        .collect();
    let acks = send_all(&client, 1024, records).await;
    for (i, &(p, _)) in acks.iter().enumerate() {
        let key = &keys[i % keys.len()];
        assert_eq!(p, partition_for_key(key.as_bytes(), PARTITIONS), "{key}");
    }

    // The simple `Produce` path hashes keys the same way.
    let mut rpc = broker.rpc().await;
    let response = rpc
        .produce(pb::ProduceRequest {
            topic: "keyed".into(),
            partition: None,
            records: keys
                .iter()
                .map(|k| pb::Record {
                    key: Some(Bytes::from(k.clone())),
                    value: Some(Bytes::from_static(b"v")),
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .expect("produce")
        .into_inner();
    assert_eq!(response.acks.len(), keys.len());
    for (ack, key) in response.acks.iter().zip(&keys) {
        assert_eq!(
            ack.partition,
            partition_for_key(key.as_bytes(), PARTITIONS),
            "{key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_an_offset_returns_exactly_the_suffix() {
    const RECORDS: u64 = 200;
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create(&client, "history", 1).await;
    let records = (0..RECORDS)
        .map(|i| ProducerRecord::new("history", format!("r{i}")))
        .collect();
    // About ten records per batch, so most replays start inside a batch.
    send_all(&client, 200, records).await;

    let check = |from: u64| {
        let client = client.clone();
        async move {
            let mut consumer = client
                .consumer("history")
                .max_wait(Duration::from_millis(50))
                .build()
                .await
                .expect("consumer");
            consumer
                .seek(0, StartAt::Offset(Offset(from)))
                .await
                .expect("seek");
            let mut got = Vec::new();
            while consumer.position(0) < Some(Offset(RECORDS)) {
                got.extend(consumer.poll().await.expect("poll"));
            }
            let offsets: Vec<u64> = got.iter().map(|r| r.offset().0).collect();
            assert_eq!(offsets, (from..RECORDS).collect::<Vec<_>>(), "from {from}");
            for r in &got {
                assert_eq!(value_text(r), format!("r{}", r.offset().0));
            }
            // Nothing follows the suffix.
            assert!(consumer.poll().await.expect("poll at end").is_empty());
        }
    };
    for from in [0, 1, 9, 37, 100, RECORDS - 1, RECORDS] {
        within("replay", check(from)).await;
    }

    // Seeking while reading drops what was read ahead and starts over there.
    let mut consumer = client.consumer("history").build().await.expect("consumer");
    consumer
        .seek(0, StartAt::Offset(Offset(150)))
        .await
        .expect("seek");
    let first = within("a record", consumer.next()).await.expect("next");
    assert_eq!(first.offset(), Offset(150));
    consumer
        .seek(0, StartAt::Offset(Offset(5)))
        .await
        .expect("seek back");
    for want in 5..8 {
        let record = within("a record", consumer.next()).await.expect("next");
        assert_eq!(record.offset(), Offset(want));
    }

    // Decoded records from a raw fetch start at the asked offset, not at its batch's start.
    let mut rpc = broker.rpc().await;
    let data = rpc
        .fetch(pb::FetchRequest {
            topic: "history".into(),
            partitions: vec![pb::PartitionFetch {
                partition: 0,
                offset: 37,
                max_bytes: 0,
            }],
            format: pb::RecordFormat::Records as i32,
            ..Default::default()
        })
        .await
        .expect("fetch")
        .into_inner()
        .partitions
        .remove(0);
    assert_eq!(data.error_code, 0, "{}", data.error_message);
    assert_eq!(data.high_watermark, RECORDS);
    assert_eq!(data.records.first().map(|r| r.offset), Some(37));
    assert!(data
        .records
        .windows(2)
        .all(|w| w[0].offset + 1 == w[1].offset));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_by_timestamp_starts_at_the_first_record_at_or_after_it() {
    const BASE: i64 = 1_700_000_000_000;
    const RECORDS: u64 = 100;
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create(&client, "timed", 1).await;
    let records = (0..RECORDS)
        .map(|i| ProducerRecord::new("timed", format!("t{i}")).timestamp_ms(BASE + 10 * i as i64))
        .collect();
    send_all(&client, 300, records).await;

    let admin = client.admin();
    // (time asked for, first offset at or after it); the high watermark when none is.
    let cases = [
        (0, 0),
        (BASE - 1, 0),
        (BASE, 0),
        (BASE + 1, 1),
        (BASE + 55, 6),
        (BASE + 500, 50),
        (BASE + 990, 99),
        (BASE + 991, RECORDS),
        (i64::MAX, RECORDS),
    ];
    for (time, want) in cases {
        let found = admin
            .list_offset("timed", 0, OffsetSpec::Timestamp(time))
            .await
            .expect("list offset");
        assert_eq!(found, Offset(want), "time {time}");

        let mut consumer = client
            .consumer("timed")
            .max_wait(Duration::from_millis(50))
            .build()
            .await
            .expect("consumer");
        consumer
            .seek(0, StartAt::Timestamp(time))
            .await
            .expect("seek by time");
        assert_eq!(consumer.position(0), Some(Offset(want)), "time {time}");
        let first = within("first record after seek", consumer.poll())
            .await
            .expect("poll");
        match first.first() {
            Some(r) => {
                assert_eq!(r.offset(), Offset(want), "time {time}");
                assert!(r.timestamp_ms() >= time);
            }
            None => assert_eq!(want, RECORDS, "time {time}: no record"),
        }
    }

    // Timestamps need not grow with offsets: the answer is the first in offset order.
    create(&client, "unordered", 1).await;
    let records = [5000, 1000, 7000, 3000]
        .iter()
        .map(|&t| ProducerRecord::new("unordered", "x").timestamp_ms(BASE + t))
        .collect();
    send_all(&client, 256 << 10, records).await;
    for (time, want) in [(2000, 0), (5000, 0), (5001, 2), (7000, 2), (7001, 4)] {
        let found = admin
            .list_offset("unordered", 0, OffsetSpec::Timestamp(BASE + time))
            .await
            .expect("list offset");
        assert_eq!(found, Offset(want), "time BASE+{time}");
    }
}

/// A consumer at the end of the log receives a record appended later, woken by the append
/// rather than by its wait running out.
async fn check_waiting_consumer_is_woken(push: bool) {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create(&client, "live", 2).await;
    send_all(
        &client,
        1024,
        (0..3)
            .map(|i| ProducerRecord::new("live", format!("old-{i}")).partition(i % 2))
            .collect(),
    )
    .await;

    let max_wait = Duration::from_secs(30);
    let mut consumer = client
        .consumer("live")
        .push(push)
        .max_wait(max_wait)
        .build()
        .await
        .expect("consumer");
    consumer.assign_all(StartAt::End).await.expect("assign");
    assert_eq!(consumer.position(0), Some(Offset(2)));
    assert_eq!(consumer.position(1), Some(Offset(1)));
    // Nothing is delivered while nothing is appended.
    let idle = tokio::time::timeout(Duration::from_millis(300), consumer.next()).await;
    assert!(idle.is_err(), "got a record from an idle topic: {idle:?}");

    let started = Instant::now();
    let producer = client.producer().build().await.expect("producer");
    let delivery = producer
        .send(ProducerRecord::new("live", "fresh").partition(1).key("k"))
        .await
        .expect("send");
    let record = within("the appended record", consumer.next())
        .await
        .expect("next");
    assert!(
        started.elapsed() < max_wait / 3,
        "woken late: {:?}",
        started.elapsed()
    );
    assert_eq!(record.partition(), 1);
    assert_eq!(record.offset(), Offset(1));
    assert_eq!(value_text(&record), "fresh");
    assert_eq!(
        delivery.await.expect("acknowledged").offset(),
        record.offset()
    );
    assert_eq!(consumer.position(1), Some(Offset(2)));

    // And it keeps following: a second append reaches it too.
    let second = producer
        .send(ProducerRecord::new("live", "again").partition(0))
        .await
        .expect("send");
    let record = within("the second record", consumer.next())
        .await
        .expect("next");
    assert_eq!((record.partition(), record.offset()), (0, Offset(2)));
    assert_eq!(second.await.expect("acknowledged").offset(), Offset(2));
}

/// Guards `poll`'s contract for both kinds of consumer: at the end of an idle log it returns
/// empty once `max_wait` has passed, rather than waiting for the next append (a pushed consumer
/// used to wait forever, which hung `octolog-bench --push` once every record had arrived).
async fn check_idle_poll_returns_empty(push: bool) {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create(&client, "idle", 1).await;
    let mut consumer = client
        .consumer("idle")
        .push(push)
        .max_wait(Duration::from_millis(50))
        .build()
        .await
        .expect("consumer");
    consumer.assign_all(StartAt::End).await.expect("assign");
    for _ in 0..2 {
        let records = within("an empty poll", consumer.poll())
            .await
            .expect("poll");
        assert!(records.is_empty(), "push {push}: {records:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_poll_returns_empty_after_max_wait() {
    check_idle_poll_returns_empty(false).await;
    check_idle_poll_returns_empty(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polling_consumer_receives_a_record_appended_later() {
    check_waiting_consumer_is_woken(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_consumer_receives_a_record_appended_later() {
    check_waiting_consumer_is_woken(true).await;
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// Guards that a seek on one partition loses nothing read ahead for the others, and that
/// `position` counts only what was handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seek_on_one_partition_keeps_the_others_records() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create(&client, "seek-keeps", 2).await;
    let producer = client.producer().build().await.unwrap();
    let mut deliveries = Vec::new();
    for p in 0..2u32 {
        for i in 0..10 {
            let record = ProducerRecord::new("seek-keeps", format!("p{p}-{i}")).partition(p);
            deliveries.push(producer.send(record).await.unwrap());
        }
    }
    producer.flush().await;
    for d in deliveries {
        d.await.unwrap();
    }
    let mut consumer = client.consumer("seek-keeps").build().await.unwrap();
    consumer.assign(&[0, 1], StartAt::Beginning).await.unwrap();
    let first = within("first record", consumer.next()).await.unwrap();
    let other = 1 - first.partition();
    assert_eq!(
        consumer.position(first.partition()),
        Some(Offset(first.offset().0 + 1))
    );
    assert_eq!(
        consumer.position(other),
        Some(Offset(0)),
        "nothing of it was handed out"
    );
    // Replay the first record's partition; the other one goes on from where it was.
    consumer
        .seek(first.partition(), StartAt::Offset(Offset(0)))
        .await
        .unwrap();
    let mut seen = [Vec::new(), Vec::new()];
    while seen[0].len() < 10 || seen[1].len() < 10 {
        for record in within("records after the seek", consumer.poll())
            .await
            .unwrap()
        {
            seen[record.partition() as usize].push(record.offset().0);
        }
    }
    assert_eq!(seen[0], (0..10).collect::<Vec<_>>());
    assert_eq!(seen[1], (0..10).collect::<Vec<_>>());
}

/// Guards that a push subscription in the decoded-records format moves on after every message:
/// each record arrives once, in order, across several pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_format_subscription_delivers_each_record_once() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create(&client, "pushed-records", 1).await;
    let producer = client.producer().build().await.unwrap();
    for i in 0..5 {
        // One batch per record: flush after each send.
        let delivery = producer
            .send(ProducerRecord::new("pushed-records", format!("r{i}")))
            .await
            .unwrap();
        producer.flush().await;
        delivery.await.unwrap();
    }
    let mut rpc = broker.rpc().await;
    let mut stream = rpc
        .subscribe(pb::SubscribeRequest {
            topic: "pushed-records".into(),
            partitions: vec![pb::PartitionStart {
                partition: 0,
                offset: 1,
            }],
            format: pb::RecordFormat::Records as i32,
            // One batch per push.
            max_bytes: 1,
        })
        .await
        .expect("subscribe")
        .into_inner();
    let mut offsets = Vec::new();
    within("four pushed records", async {
        while offsets.len() < 4 {
            let message = stream.message().await.expect("stream").expect("open");
            let data = message.data.expect("data");
            assert_eq!(data.error_code, 0, "{}", data.error_message);
            offsets.extend(data.records.iter().map(|r| r.offset));
        }
    })
    .await;
    assert_eq!(offsets, [1, 2, 3, 4]);
}

/// Guards the bulk look-up of start offsets (`Admin::list_offsets`, used by `Consumer::assign`
/// for all partitions at once): every partition gets its own answer in query order, an offset
/// outside a partition's range fails the whole assignment naming that partition, and a failed
/// assignment leaves the previous one in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assign_looks_up_every_partition_at_once_and_all_or_nothing() {
    const PARTITIONS: u32 = 40;
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create(&client, "bulk-assign", PARTITIONS).await;
    // Partition p holds p records.
    let records: Vec<ProducerRecord> = (0..PARTITIONS)
        .flat_map(|p| {
            (0..p).map(move |i| ProducerRecord::new("bulk-assign", format!("{p}-{i}")).partition(p))
        })
        .collect();
    send_all(&client, 1 << 20, records).await;

    let queries: Vec<(u32, OffsetSpec)> = (0..PARTITIONS)
        .rev()
        .flat_map(|p| [(p, OffsetSpec::Latest), (p, OffsetSpec::Earliest)])
        .collect();
    let offsets = client
        .admin()
        .list_offsets("bulk-assign", &queries)
        .await
        .unwrap();
    let expected: Vec<Offset> = (0..PARTITIONS)
        .rev()
        .flat_map(|p| [Offset(u64::from(p)), Offset(0)])
        .collect();
    assert_eq!(offsets, expected);
    let unknown = client
        .admin()
        .list_offsets(
            "bulk-assign",
            &[(0, OffsetSpec::Latest), (PARTITIONS, OffsetSpec::Latest)],
        )
        .await
        .unwrap_err();
    assert!(
        unknown.to_string().contains(&PARTITIONS.to_string()),
        "{unknown}"
    );

    let all: Vec<u32> = (0..PARTITIONS).collect();
    let mut consumer = client.consumer("bulk-assign").build().await.unwrap();
    consumer.assign(&all, StartAt::End).await.unwrap();
    for p in 0..PARTITIONS {
        assert_eq!(
            consumer.position(p),
            Some(Offset(u64::from(p))),
            "partition {p}"
        );
    }
    // Offset 5 is past the end of partitions 0..5: refused, naming partition 0, and the
    // assignment stays as it was.
    let refused = consumer
        .assign(&all, StartAt::Offset(Offset(5)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            octolog_client::ClientError::OffsetOutOfRange { partition: 0, .. }
        ),
        "{refused:?}"
    );
    assert_eq!(consumer.assignment(), all);
    assert_eq!(consumer.position(7), Some(Offset(7)));

    // From offset 5 in the partitions that have that many records: exactly their suffixes.
    let long: Vec<u32> = (5..PARTITIONS).collect();
    consumer
        .assign(&long, StartAt::Offset(Offset(5)))
        .await
        .unwrap();
    assert_eq!(consumer.assignment(), long);
    let expected: usize = (5..PARTITIONS).map(|p| p as usize - 5).sum();
    let mut received = 0;
    while received < expected {
        for record in within("suffixes", consumer.poll()).await.unwrap() {
            assert!(record.offset() >= Offset(5));
            assert_eq!(
                value_text(&record),
                format!("{}-{}", record.partition(), record.offset().0)
            );
            received += 1;
        }
    }
    assert_eq!(received, expected);
}
