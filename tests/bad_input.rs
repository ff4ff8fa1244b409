//! Bad input from outside: unknown topics, invalid names, out-of-range offsets, oversized
//! records, garbage on the port and malformed batches. Each gets a clear error, changes
//! nothing, and leaves the broker serving everyone else (checked after every case).

mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{within, TestBroker, WAIT};
use octolog_batch::{
    compute_crc, BatchBuilder, ATTRIBUTES_POSITION, BATCH_LENGTH_POSITION, CRC_POSITION,
    MAGIC_POSITION, RECORDS_POSITION, RECORD_COUNT_POSITION,
};
use octolog_client::{ClientError, Offset, ProducerRecord, StartAt, TopicOptions};
use octolog_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// Asserts the broker still serves a normal client: a record produced to topic `ok` (created
/// on first use) is acknowledged and read back.
async fn assert_serving(broker: &TestBroker) {
    let client = broker.client().await;
    let admin = client.admin();
    if admin.describe_topic("ok").await.is_err() {
        admin
            .create_topic("ok", TopicOptions::new())
            .await
            .expect("create ok");
    }
    let producer = client.producer().build().await.expect("producer");
    let meta = within(
        "a healthy produce",
        producer
            .send(ProducerRecord::new("ok", "still serving"))
            .await
            .expect("send"),
    )
    .await
    .expect("acknowledged");
    let mut consumer = client.consumer("ok").build().await.expect("consumer");
    consumer
        .seek(0, StartAt::Offset(meta.offset()))
        .await
        .expect("seek");
    let record = within("a healthy consume", consumer.next())
        .await
        .expect("next");
    assert_eq!(record.offset(), meta.offset());
    assert_eq!(record.value().map(|v| &v[..]), Some(&b"still serving"[..]));
}

/// Asserts a gRPC status has `code` and a message containing `needle`.
fn assert_status(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("the request should fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "message should mention {needle:?}: {status:?}"
    );
}

/// One v2 batch of `count` small records, as a producer would build it.
fn batch(count: usize) -> BytesMut {
    let mut builder = BatchBuilder::new();
    for i in 0..count {
        let value = format!("value-{i}");
        builder.push(
            1_700_000_000_000 + i as i64,
            Some(b"key"),
            Some(value.as_bytes()),
            &[("h", Some(b"v"))],
        );
    }
    builder.finish()
}

async fn high_watermarks(broker: &TestBroker, topic: &str) -> Vec<u64> {
    let client = broker.client().await;
    let info = client
        .admin()
        .describe_topic(topic)
        .await
        .expect("describe");
    info.partitions()
        .iter()
        .map(|p| p.high_watermark().0)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topic_is_a_clear_error() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let needle = "unknown topic \"nope\"";

    let producer = client.producer().build().await.expect("producer");
    let err = producer
        .send(ProducerRecord::new("nope", "v"))
        .await
        .expect_err("send to an unknown topic");
    assert!(err.is_unknown_topic(), "{err:?}");
    assert!(err.to_string().contains(needle), "{err}");
    assert!(
        err.to_string().contains("octolog topic create nope"),
        "{err}"
    );
    assert_serving(&broker).await;

    let err = client.consumer("nope").build().await.expect_err("consumer");
    assert!(err.is_unknown_topic(), "{err:?}");
    let admin = client.admin();
    assert!(admin
        .describe_topic("nope")
        .await
        .unwrap_err()
        .is_unknown_topic());
    assert!(admin
        .delete_topic("nope")
        .await
        .unwrap_err()
        .is_unknown_topic());
    assert_serving(&broker).await;

    let mut rpc = broker.rpc().await;
    let topic = || "nope".to_string();
    assert_status(
        rpc.produce(pb::ProduceRequest {
            topic: topic(),
            partition: None,
            records: vec![pb::Record::default()],
        })
        .await,
        Code::NotFound,
        needle,
    );
    assert_status(
        rpc.produce_batches(pb::ProduceBatchesRequest {
            topic: topic(),
            partitions: vec![pb::PartitionBatches {
                partition: 0,
                batches: batch(1).freeze(),
            }],
        })
        .await,
        Code::NotFound,
        needle,
    );
    assert_status(
        rpc.fetch(pb::FetchRequest {
            topic: topic(),
            partitions: vec![pb::PartitionFetch::default()],
            ..Default::default()
        })
        .await,
        Code::NotFound,
        needle,
    );
    assert_status(
        rpc.list_offsets(pb::ListOffsetsRequest {
            topic: topic(),
            queries: vec![pb::OffsetQuery {
                partition: 0,
                position: Some(pb::offset_query::Position::Latest(pb::Latest {})),
            }],
        })
        .await,
        Code::NotFound,
        needle,
    );
    assert_status(
        rpc.subscribe(pb::SubscribeRequest {
            topic: topic(),
            partitions: vec![pb::PartitionStart::default()],
            ..Default::default()
        })
        .await,
        Code::NotFound,
        needle,
    );
    assert_serving(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_topic_names_and_partitions_are_rejected() {
    let broker = TestBroker::start().await;
    let admin = broker.client().await.admin();
    let long = "x".repeat(250);
    for name in [
        "",
        ".",
        "..",
        "has space",
        "slash/y",
        "../escape",
        "star*",
        "tilde~",
        "ü",
        "new\nline",
        long.as_str(),
    ] {
        let err = admin
            .create_topic(name, TopicOptions::new())
            .await
            .expect_err(name);
        let ClientError::Broker { code, message } = &err else {
            panic!("{name:?}: {err:?}");
        };
        assert_eq!(*code, Code::InvalidArgument, "{name:?}: {err:?}");
        assert!(
            message.contains("invalid topic name"),
            "{name:?}: {message}"
        );
        assert_serving(&broker).await;
    }
    assert!(admin
        .list_topics()
        .await
        .expect("list")
        .iter()
        .all(|(n, _)| n == "ok"));
    // Nothing of the rejected names reached the data folder.
    let entries: Vec<String> = std::fs::read_dir(broker.data_dir())
        .expect("data dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        // Broker metadata: `.lock`, `.producer-ids`, `@groups`; no topic name starts so.
        .filter(|n| !n.starts_with('.') && !n.starts_with('@'))
        .collect();
    assert_eq!(entries, ["ok"]);

    for name in [
        "x".repeat(249),
        "gateway.jobs.gromacs".into(),
        "A-b_c.9".into(),
    ] {
        admin
            .create_topic(&name, TopicOptions::new())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let err = admin
        .create_topic("A-b_c.9", TopicOptions::new())
        .await
        .expect_err("exists");
    assert!(
        matches!(
            err,
            ClientError::Broker {
                code: Code::AlreadyExists,
                ..
            }
        ),
        "{err:?}"
    );
    let err = admin
        .create_topic("many", TopicOptions::new().partitions(1_000_000))
        .await
        .expect_err("too many partitions");
    assert!(
        matches!(
            err,
            ClientError::Broker {
                code: Code::ResourceExhausted,
                ..
            }
        ),
        "{err:?}"
    );

    // A partition the topic does not have.
    let mut rpc = broker.rpc().await;
    assert_status(
        rpc.produce(pb::ProduceRequest {
            topic: "ok".into(),
            partition: Some(7),
            records: vec![pb::Record::default()],
        })
        .await,
        Code::InvalidArgument,
        "has no partition 7",
    );
    let results = rpc
        .produce_batches(pb::ProduceBatchesRequest {
            topic: "ok".into(),
            partitions: vec![pb::PartitionBatches {
                partition: 7,
                batches: batch(1).freeze(),
            }],
        })
        .await
        .expect("per-partition answer")
        .into_inner()
        .partitions;
    assert_eq!(
        results[0].error_code,
        pb::ErrorCode::UnknownPartition as i32
    );
    assert!(results[0].error_message.contains("has no partition 7"));
    assert_status(
        rpc.produce(pb::ProduceRequest {
            topic: "ok".into(),
            partition: None,
            records: vec![],
        })
        .await,
        Code::InvalidArgument,
        "at least one record",
    );
    assert_serving(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_offsets_are_reported_with_the_bounds() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    client
        .admin()
        .create_topic("t", TopicOptions::new().partitions(2))
        .await
        .expect("create");
    let producer = client.producer().build().await.expect("producer");
    let mut deliveries = Vec::new();
    for i in 0..5 {
        deliveries.push(
            producer
                .send(ProducerRecord::new("t", format!("{i}")).partition(0))
                .await
                .expect("send"),
        );
    }
    for d in deliveries {
        within("delivery", d).await.expect("acknowledged");
    }

    let mut rpc = broker.rpc().await;
    for offset in [6, 1000, u64::MAX] {
        let data = rpc
            .fetch(pb::FetchRequest {
                topic: "t".into(),
                partitions: vec![
                    pb::PartitionFetch {
                        partition: 0,
                        offset,
                        max_bytes: 0,
                    },
                    pb::PartitionFetch {
                        partition: 1,
                        offset: 0,
                        max_bytes: 0,
                    },
                ],
                format: pb::RecordFormat::Records as i32,
                ..Default::default()
            })
            .await
            .expect("per-partition answer")
            .into_inner()
            .partitions;
        let bad = &data[0];
        assert_eq!(
            bad.error_code,
            pb::ErrorCode::OffsetOutOfRange as i32,
            "{offset}"
        );
        assert!(
            bad.error_message.contains(&format!("offset {offset}")),
            "{bad:?}"
        );
        assert!(bad.records.is_empty());
        // The answer carries the bounds, so the reader can choose where to resume.
        assert_eq!(
            (bad.log_start_offset, bad.high_watermark),
            (0, 5),
            "{bad:?}"
        );
        assert_eq!(data[1].error_code, 0, "{:?}", data[1]);
        assert_serving(&broker).await;
    }
    // At the high watermark there is nothing yet, which is not an error.
    let data = rpc
        .fetch(pb::FetchRequest {
            topic: "t".into(),
            partitions: vec![pb::PartitionFetch {
                partition: 0,
                offset: 5,
                max_bytes: 0,
            }],
            ..Default::default()
        })
        .await
        .expect("fetch")
        .into_inner()
        .partitions;
    assert_eq!(data[0].error_code, 0);
    assert!(data[0].batches.is_empty());
    assert_eq!(data[0].high_watermark, 5);

    // A subscription from beyond the end reports the error on its stream.
    let mut stream = rpc
        .subscribe(pb::SubscribeRequest {
            topic: "t".into(),
            partitions: vec![pb::PartitionStart {
                partition: 0,
                offset: 99,
            }],
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    let message = within("the subscription's error", stream.message())
        .await
        .expect("message")
        .expect("not ended");
    let data = message.data.expect("data");
    assert_eq!(data.error_code, pb::ErrorCode::OffsetOutOfRange as i32);
    assert_eq!(data.high_watermark, 5);

    // The consumer checks a seek against the bounds.
    let mut consumer = client.consumer("t").build().await.expect("consumer");
    let err = consumer
        .seek(0, StartAt::Offset(Offset(6)))
        .await
        .expect_err("seek past the end");
    assert!(err.is_offset_out_of_range(), "{err:?}");
    assert!(
        err.to_string().contains("offset 6 is out of range"),
        "{err}"
    );
    assert!(err.to_string().contains("0..5"), "{err}");
    consumer
        .seek(0, StartAt::Offset(Offset(5)))
        .await
        .expect("seek to the end is fine");
    let err = consumer
        .seek(9, StartAt::Beginning)
        .await
        .expect_err("unknown partition");
    assert!(matches!(err, ClientError::InvalidArgument(_)), "{err:?}");
    assert_serving(&broker).await;

    // An offset query without a position is refused for that query alone.
    let offsets = rpc
        .list_offsets(pb::ListOffsetsRequest {
            topic: "t".into(),
            queries: vec![
                pb::OffsetQuery {
                    partition: 0,
                    position: None,
                },
                pb::OffsetQuery {
                    partition: 0,
                    position: Some(pb::offset_query::Position::Latest(pb::Latest {})),
                },
                pb::OffsetQuery {
                    partition: 5,
                    position: Some(pb::offset_query::Position::Latest(pb::Latest {})),
                },
            ],
        })
        .await
        .expect("per-query answers")
        .into_inner()
        .offsets;
    assert_eq!(offsets[0].error_code, pb::ErrorCode::InvalidRequest as i32);
    assert_eq!((offsets[1].error_code, offsets[1].offset), (0, 5));
    assert_eq!(
        offsets[2].error_code,
        pb::ErrorCode::UnknownPartition as i32
    );

    // A partition listed twice makes a malformed request.
    let twice = vec![
        pb::PartitionFetch {
            partition: 0,
            offset: 0,
            max_bytes: 0,
        };
        2
    ];
    assert_status(
        rpc.fetch(pb::FetchRequest {
            topic: "t".into(),
            partitions: twice,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "partition 0 more than once",
    );
    assert_status(
        rpc.produce_batches(pb::ProduceBatchesRequest {
            topic: "t".into(),
            partitions: vec![
                pb::PartitionBatches {
                    partition: 1,
                    batches: batch(1).freeze(),
                };
                2
            ],
        })
        .await,
        Code::InvalidArgument,
        "partition 1 more than once",
    );
    assert_status(
        rpc.subscribe(pb::SubscribeRequest {
            topic: "t".into(),
            partitions: vec![pb::PartitionStart::default(); 2],
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "partition 0 more than once",
    );
    assert_eq!(high_watermarks(&broker, "t").await, [5, 0]);
    assert_serving(&broker).await;
}

/// `batch_bytes_max` of the brokers of `small_limits_broker`; their `request_bytes_max` is twice it.
const BATCH_BYTES_MAX: u32 = 64 << 10;

/// A broker with small size limits (`BATCH_BYTES_MAX`) and a one-partition `topic`.
async fn small_limits_broker(topic: &str) -> (TestBroker, octolog_client::Client) {
    let broker = TestBroker::start_with(|c| {
        c.batch_bytes_max = BATCH_BYTES_MAX;
        c.request_bytes_max = 2 * BATCH_BYTES_MAX as usize;
    })
    .await;
    let client = broker.client().await;
    client
        .admin()
        .create_topic(topic, TopicOptions::new())
        .await
        .expect("create");
    (broker, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_records_are_refused() {
    let (broker, client) = small_limits_broker("big").await;
    let mut rpc = broker.rpc().await;
    let record = |bytes: usize| pb::Record {
        value: Some(Bytes::from(vec![b'x'; bytes])),
        ..Default::default()
    };

    // The simple path: one record larger than a batch may be.
    assert_status(
        rpc.produce(pb::ProduceRequest {
            topic: "big".into(),
            partition: None,
            records: vec![record(BATCH_BYTES_MAX as usize + 1)],
        })
        .await,
        Code::ResourceExhausted,
        "exceeds batch_bytes_max",
    );
    assert_eq!(high_watermarks(&broker, "big").await, [0]);
    assert_serving(&broker).await;

    // Many records that fit one by one are split into batches that fit.
    let acks = rpc
        .produce(pb::ProduceRequest {
            topic: "big".into(),
            partition: None,
            records: vec![record(20 << 10); 5],
        })
        .await
        .expect("records that fit")
        .into_inner()
        .acks;
    let offsets: Vec<u64> = acks.iter().map(|a| a.offset).collect();
    assert_eq!(offsets, [0, 1, 2, 3, 4]);

    // A request larger than the broker decodes.
    let result = rpc
        .produce(pb::ProduceRequest {
            topic: "big".into(),
            partition: None,
            records: vec![record(30 << 10); 6],
        })
        .await;
    assert_status(result, Code::ResourceExhausted, "request_bytes_max");
    assert_eq!(high_watermarks(&broker, "big").await, [5]);
    assert_serving(&broker).await;

    // The fast path: the batch is refused with its own error code.
    let mut builder = BatchBuilder::new();
    builder.push(0, None, Some(&vec![b'y'; BATCH_BYTES_MAX as usize]), &[]);
    let results = rpc
        .produce_batches(pb::ProduceBatchesRequest {
            topic: "big".into(),
            partitions: vec![pb::PartitionBatches {
                partition: 0,
                batches: builder.finish().freeze(),
            }],
        })
        .await
        .expect("per-partition answer")
        .into_inner()
        .partitions;
    assert_eq!(results[0].error_code, pb::ErrorCode::BatchTooLarge as i32);
    assert!(results[0].error_message.contains("exceeds batch_bytes_max"));

    // And through the producer, the delivery fails with the broker's reason.
    let producer = client.producer().build().await.expect("producer");
    let delivery = producer
        .send(ProducerRecord::new(
            "big",
            vec![b'z'; BATCH_BYTES_MAX as usize + 1],
        ))
        .await
        .expect("queued");
    let err = within("the refusal", delivery)
        .await
        .expect_err("too large");
    assert!(
        matches!(&err, ClientError::Partition { code, .. } if *code == pb::ErrorCode::BatchTooLarge as i32),
        "{err:?}"
    );
    assert!(err.to_string().contains("exceeds batch_bytes_max"), "{err}");
    assert_eq!(high_watermarks(&broker, "big").await, [5]);
    assert_serving(&broker).await;
}

/// Guards `ProduceStream`: every request is answered once under its id, in order of appending;
/// a bad request (unknown topic, partition named twice, batch too large) is answered with its
/// error and the stream goes on; a request too large to read ends the stream, but its answer
/// says which request and why. The producer over such a stream fails only that record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_stream_answers_bad_requests_and_goes_on() {
    let (broker, client) = small_limits_broker("s").await;
    let batch = |records: usize, value_bytes: usize| {
        let mut builder = BatchBuilder::new();
        for _ in 0..records {
            builder.push(0, None, Some(&vec![b's'; value_bytes]), &[]);
        }
        builder.finish().freeze()
    };
    let entry = |batches: Bytes| pb::PartitionBatches {
        partition: 0,
        batches,
    };
    let requests = vec![
        ("s", vec![entry(batch(2, 10))]),
        ("no-such-topic", vec![entry(batch(1, 10))]),
        ("s", vec![entry(batch(1, 10)), entry(batch(1, 10))]),
        ("s", vec![entry(batch(1, 100 << 10))]),
        ("s", vec![entry(batch(2, 10))]),
        // Over request_bytes_max: cannot be read.
        ("s", vec![entry(batch(1, 200 << 10))]),
    ];
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for (id, (topic, partitions)) in requests.into_iter().enumerate() {
        tx.send(pb::ProduceStreamRequest {
            request_id: id as u64,
            topic: topic.into(),
            partitions,
        })
        .expect("queued");
    }
    let mut rpc = broker.rpc().await;
    let mut answers = within(
        "the stream to open",
        rpc.produce_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)),
    )
    .await
    .expect("stream opens")
    .into_inner();
    let mut got = std::collections::BTreeMap::new();
    let end = loop {
        match within("an answer", answers.message()).await {
            Ok(Some(answer)) => {
                assert!(
                    got.insert(answer.request_id, answer).is_none(),
                    "answered twice"
                );
            }
            Ok(None) => panic!("the stream must end with the refusal's status"),
            Err(status) => break status,
        }
    };
    drop(tx);
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5]);
    let ok = |id: u64| {
        let answer = &got[&id];
        assert_eq!(answer.status_code, 0, "{answer:?}");
        assert_eq!(answer.partitions.len(), 1, "{answer:?}");
        assert_eq!(answer.partitions[0].error_code, 0, "{answer:?}");
        answer.partitions[0].base_offset
    };
    assert_eq!(ok(0), 0);
    assert_eq!(got[&1].status_code, Code::NotFound as i32);
    assert!(
        got[&1].status_message.contains("no-such-topic"),
        "{:?}",
        got[&1]
    );
    assert_eq!(got[&2].status_code, Code::InvalidArgument as i32);
    assert!(
        got[&2].status_message.contains("more than once"),
        "{:?}",
        got[&2]
    );
    assert_eq!(
        got[&3].partitions[0].error_code,
        pb::ErrorCode::BatchTooLarge as i32
    );
    // Appended right after request 0: the refused ones took no offsets.
    assert_eq!(ok(4), 2);
    assert_eq!(got[&5].status_code, Code::ResourceExhausted as i32);
    assert!(
        got[&5].status_message.contains("request_bytes_max"),
        "{:?}",
        got[&5]
    );
    assert_eq!(high_watermarks(&broker, "s").await, [4]);
    assert_serving(&broker).await;

    // The producer: the unreadable request fails alone; the next record gets the next offset.
    let producer = client.producer().build().await.expect("producer");
    let refused = producer
        .send(ProducerRecord::new("s", vec![b'z'; 200 << 10]))
        .await
        .expect("queued");
    let err = within("the refusal", refused)
        .await
        .expect_err("over request_bytes_max");
    assert!(
        matches!(
            &err,
            ClientError::Broker {
                code: Code::ResourceExhausted,
                ..
            }
        ),
        "{err:?}"
    );
    let stored = producer
        .send(ProducerRecord::new("s", "after"))
        .await
        .expect("queued");
    let stored = within("the next record", stored).await.expect("stored");
    assert_eq!(stored.offset(), Offset(4));
    assert_serving(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_port_does_not_disturb_the_broker() {
    let broker = TestBroker::start().await;
    assert_serving(&broker).await;
    let junk: Vec<u8> = (0..64 << 10)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let payloads: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        &junk,
        b"\x00",
    ];
    for payload in payloads {
        let mut stream = tokio::net::TcpStream::connect(broker.addr())
            .await
            .expect("connect");
        // The broker may close the connection before it has read everything.
        let _ = stream.write_all(payload).await;
        let _ = stream.shutdown().await;
        // The broker closes the connection rather than waiting for more.
        let mut answer = Vec::new();
        let closed = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
        assert!(closed.is_ok(), "the broker kept a garbage connection open");
        assert_serving(&broker).await;
    }
    // A connection that sends half a preface and stalls does not block anyone else.
    let mut stalled = tokio::net::TcpStream::connect(broker.addr())
        .await
        .expect("connect");
    stalled
        .write_all(b"PRI * HTTP/2.0\r\n")
        .await
        .expect("write");
    assert_serving(&broker).await;
    drop(stalled);
    // A client that disconnects in the middle of a long poll does not either.
    let client = broker.client().await;
    let mut consumer = client
        .consumer("ok")
        .max_wait(Duration::from_secs(30))
        .build()
        .await
        .expect("consumer");
    consumer.assign_all(StartAt::End).await.expect("assign");
    let _ = tokio::time::timeout(Duration::from_millis(100), consumer.next()).await;
    drop(consumer);
    drop(client);
    assert_serving(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_batches_are_refused_and_nothing_is_appended() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    client
        .admin()
        .create_topic("fast", TopicOptions::new().partitions(2))
        .await
        .expect("create");
    let mut rpc = broker.rpc().await;
    let good = batch(3);
    let with_crc = |mut b: BytesMut| {
        let crc = compute_crc(&b);
        b[CRC_POSITION..CRC_POSITION + 4].copy_from_slice(&crc.to_be_bytes());
        b
    };
    let changed = |position: usize, byte: u8| {
        let mut b = good.clone();
        b[position] = byte;
        b
    };
    let last = good.len() - 1;
    let cases: Vec<(&str, BytesMut)> = vec![
        ("empty", BytesMut::new()),
        ("bad crc", changed(last, good[last] ^ 0x40)),
        (
            "crc field flipped",
            changed(CRC_POSITION, good[CRC_POSITION] ^ 1),
        ),
        ("truncated", good.clone().split_to(good.len() - 5)),
        ("truncated header", good.clone().split_to(30)),
        ("magic 1", changed(MAGIC_POSITION, 1)),
        ("magic 3", changed(MAGIC_POSITION, 3)),
        ("length too large", {
            let mut b = good.clone();
            b[BATCH_LENGTH_POSITION..BATCH_LENGTH_POSITION + 4]
                .copy_from_slice(&i32::MAX.to_be_bytes());
            b
        }),
        ("negative length", {
            let mut b = good.clone();
            b[BATCH_LENGTH_POSITION..BATCH_LENGTH_POSITION + 4]
                .copy_from_slice(&(-1i32).to_be_bytes());
            b
        }),
        ("lying record count, valid crc", {
            let mut b = good.clone();
            b[RECORD_COUNT_POSITION..RECORDS_POSITION].copy_from_slice(&4i32.to_be_bytes());
            with_crc(b)
        }),
        ("unknown compression codec, valid crc", {
            let mut b = good.clone();
            b[ATTRIBUTES_POSITION + 1] |= 0x07;
            with_crc(b)
        }),
        ("garbage records, valid crc", {
            let mut b = good.clone();
            for byte in &mut b[RECORDS_POSITION..] {
                *byte = 0xff;
            }
            with_crc(b)
        }),
        ("good batch then a bad one", {
            let mut b = good.clone();
            b.extend_from_slice(&changed(last, good[last] ^ 1));
            b
        }),
        ("good batch then trailing bytes", {
            let mut b = good.clone();
            b.extend_from_slice(b"\x00\x00\x00");
            b
        }),
    ];
    let mut healthy_offset = 0;
    for (name, bad) in cases {
        let results = within(
            name,
            rpc.produce_batches(pb::ProduceBatchesRequest {
                topic: "fast".into(),
                partitions: vec![
                    pb::PartitionBatches {
                        partition: 0,
                        batches: bad.freeze(),
                    },
                    pb::PartitionBatches {
                        partition: 1,
                        batches: good.clone().freeze(),
                    },
                ],
            }),
        )
        .await
        .unwrap_or_else(|s| panic!("{name}: per-partition answer expected: {s:?}"))
        .into_inner()
        .partitions;
        assert_eq!(results.len(), 2, "{name}");
        assert_eq!(results[0].partition, 0);
        assert_eq!(
            results[0].error_code,
            pb::ErrorCode::InvalidBatch as i32,
            "{name}: {:?}",
            results[0]
        );
        assert!(!results[0].error_message.is_empty(), "{name}");
        // The other partition of the same request is unaffected.
        assert_eq!(results[1].error_code, 0, "{name}: {:?}", results[1]);
        assert_eq!(results[1].base_offset, healthy_offset, "{name}");
        healthy_offset += 3;
        assert_eq!(
            high_watermarks(&broker, "fast").await,
            [0, healthy_offset],
            "{name}: nothing appended to partition 0"
        );
        assert_serving(&broker).await;
    }
    // Partition 1 reads back whole and in order.
    let all = common::consume_all(&client, "fast").await;
    assert!(all[&0].is_empty());
    assert_eq!(all[&1].len() as u64, healthy_offset);
    common::assert_dense(1, &all[&1]);
}

/// Guards the promise that deleting a topic ends the requests waiting on it: a long-polling
/// fetch went on waiting on the deleted topic until its `max_wait` ran out.
async fn check_delete_ends_waiting_consumer(push: bool) {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let admin = client.admin();
    admin
        .create_topic("doomed", TopicOptions::new().partitions(2))
        .await
        .expect("create");
    let max_wait = Duration::from_secs(30);
    let mut consumer = client
        .consumer("doomed")
        .push(push)
        .max_wait(max_wait)
        .build()
        .await
        .expect("consumer");
    consumer.assign_all(StartAt::End).await.expect("assign");
    // Nothing arrives meanwhile; by then the consumer waits at the broker.
    let idle = tokio::time::timeout(Duration::from_millis(200), consumer.next()).await;
    assert!(idle.is_err(), "{idle:?}");
    let started = std::time::Instant::now();
    admin.delete_topic("doomed").await.expect("delete");
    let err = within("the waiting consumer to learn", consumer.next())
        .await
        .expect_err("the topic is gone");
    assert!(
        started.elapsed() < max_wait / 3,
        "ended late: {:?}",
        started.elapsed()
    );
    assert!(err.is_unknown_topic(), "{err:?}");
    assert!(
        err.to_string().contains("unknown topic \"doomed\""),
        "{err}"
    );
    assert_serving(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_topic_ends_a_long_poll_waiting_on_it() {
    check_delete_ends_waiting_consumer(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_topic_ends_a_subscription_on_it() {
    check_delete_ends_waiting_consumer(true).await;
}

/// Guards the producer's settings checks: a value that could never work is refused by `build`,
/// with the setting named, before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_settings_out_of_range_are_refused() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let cases = [
        ("in_flight_max", client.producer().in_flight_max(0)),
        ("batch_bytes", client.producer().batch_bytes(0)),
        (
            "request_timeout",
            client.producer().request_timeout(Duration::ZERO),
        ),
    ];
    for (setting, builder) in cases {
        match builder.build().await {
            Err(ClientError::InvalidArgument(message)) => {
                assert!(message.contains(setting), "{setting}: {message}")
            }
            Err(other) => panic!("{setting}: {other:?}"),
            Ok(_) => panic!("{setting}: an impossible setting was accepted"),
        }
    }
    assert_serving(&broker).await;
}
