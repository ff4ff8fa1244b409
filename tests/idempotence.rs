//! The idempotent producer end to end: answers lost after the broker appended (a TCP proxy
//! between client and broker swallows them, then drops the connection), and broker restarts
//! (kill -9 of an `octolog serve` process, and a graceful stop and start) in the middle of a
//! producer's stream. The producer retries; every record must be stored exactly once, in order,
//! at the offset its delivery reported.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{consume_all, value_text, within, BrokerProcess, TestBroker};
use octolog_client::{
    Client, ClientError, Delivery, Offset, Producer, ProducerRecord, StartAt, TopicOptions,
};
use octolog_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A TCP proxy on `127.0.0.1:0` in front of a broker whose address can change (restarts).
/// While swallowing, it passes requests on but drops everything the broker answers; `cut` then
/// closes every connection, so the client saw its request go out and never heard back.
struct Proxy {
    addr: SocketAddr,
    /// Where new connections go; `None` closes them at once (the broker is away).
    upstream: Arc<Mutex<Option<String>>>,
    swallow: Arc<AtomicBool>,
    /// Bytes of answers dropped while swallowing.
    swallowed_bytes: Arc<AtomicU64>,
    /// Bytes of requests passed on to the broker.
    forwarded_bytes: Arc<AtomicU64>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let upstream = Arc::new(Mutex::new(Some(upstream)));
        let swallow = Arc::new(AtomicBool::new(false));
        let swallowed_bytes = Arc::new(AtomicU64::new(0));
        let forwarded_bytes = Arc::new(AtomicU64::new(0));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let (upstream, swallow, swallowed_bytes, forwarded_bytes, connections) = (
                Arc::clone(&upstream),
                Arc::clone(&swallow),
                Arc::clone(&swallowed_bytes),
                Arc::clone(&forwarded_bytes),
                Arc::clone(&connections),
            );
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let target = upstream.lock().unwrap().clone();
                    let task = tokio::spawn(relay(
                        client,
                        target,
                        Arc::clone(&swallow),
                        Arc::clone(&swallowed_bytes),
                        Arc::clone(&forwarded_bytes),
                    ));
                    let mut connections = connections.lock().unwrap();
                    connections.retain(|c| !c.is_finished());
                    connections.push(task);
                }
            }
        });
        Proxy {
            addr,
            upstream,
            swallow,
            swallowed_bytes,
            forwarded_bytes,
            connections,
            accept,
        }
    }

    fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// New connections go to `addr` from now on.
    fn set_upstream(&self, addr: &str) {
        *self.upstream.lock().unwrap() = Some(addr.to_string());
    }

    /// New connections are closed at once until `set_upstream`.
    fn pause(&self) {
        *self.upstream.lock().unwrap() = None;
    }

    /// From now on, the broker's answers are dropped.
    fn swallow_answers(&self) {
        self.swallow.store(true, Ordering::SeqCst);
    }

    /// Stops swallowing and closes every connection open now.
    fn cut(&self) {
        self.swallow.store(false, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

/// Copies bytes both ways between `client` and a new connection to `target`; answers are
/// dropped while `swallow` is set. Ends when either side closes; a dead broker closes the client.
async fn relay(
    client: TcpStream,
    target: Option<String>,
    swallow: Arc<AtomicBool>,
    swallowed_bytes: Arc<AtomicU64>,
    forwarded_bytes: Arc<AtomicU64>,
) {
    let Some(target) = target else {
        return;
    };
    let Ok(broker) = TcpStream::connect(&target).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut broker_read, mut broker_write) = broker.into_split();
    let requests = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = client_read.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            broker_write.write_all(&buf[..n]).await?;
            forwarded_bytes.fetch_add(n as u64, Ordering::SeqCst);
        }
    };
    let answers = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = broker_read.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            if swallow.load(Ordering::SeqCst) {
                swallowed_bytes.fetch_add(n as u64, Ordering::SeqCst);
            } else {
                client_write.write_all(&buf[..n]).await?;
            }
        }
    };
    tokio::select! {
        _ = requests => {}
        _ = answers => {}
    }
}

/// A producer through the proxy that retries quickly, so restarts cost milliseconds.
async fn producer(proxy: &Proxy) -> Producer {
    let client = within("connect through the proxy", Client::connect(proxy.addr()))
        .await
        .expect("connect through the proxy");
    client
        .producer()
        .linger(Duration::from_millis(1))
        .batch_bytes(2048)
        .retries_max(10_000)
        .retry_backoff(Duration::from_millis(5))
        .request_timeout(Duration::from_secs(10))
        .delivery_timeout(Duration::from_secs(60))
        .build()
        .await
        .expect("idempotent producer starts")
}

/// The records sent so far: per partition, values in send order with their deliveries.
#[derive(Default)]
struct Sent {
    partitions: BTreeMap<u32, Vec<(String, Delivery)>>,
}

impl Sent {
    async fn send(&mut self, producer: &Producer, topic: &str, partition: u32, value: String) {
        let delivery = producer
            .send(ProducerRecord::new(topic, value.clone()).partition(partition))
            .await
            .expect("send");
        self.partitions
            .entry(partition)
            .or_default()
            .push((value, delivery));
    }

    /// Awaits every delivery, then reads the topic back through `direct` and asserts that each
    /// partition holds exactly the records sent, once each, in order, at the offsets the
    /// deliveries reported.
    async fn assert_stored_once(self, direct: &Client, topic: &str) {
        let mut expected: BTreeMap<u32, Vec<(String, Offset)>> = BTreeMap::new();
        for (partition, records) in self.partitions {
            for (value, delivery) in records {
                let stored = within("a delivery", delivery)
                    .await
                    .unwrap_or_else(|e| panic!("{value}: {e}"));
                assert_eq!(stored.partition(), partition);
                expected
                    .entry(partition)
                    .or_default()
                    .push((value, stored.offset()));
            }
        }
        let stored = consume_all(direct, topic).await;
        for (partition, want) in expected {
            let got: Vec<(String, Offset)> = stored[&partition]
                .iter()
                .map(|r| (value_text(r), r.offset()))
                .collect();
            assert_eq!(got.len(), want.len(), "partition {partition}: record count");
            assert_eq!(got, want, "partition {partition}: values and offsets");
        }
    }
}

/// Waits until the broker at `direct` appends to `partition` past `from`: the sign that the
/// request whose answer is being swallowed was appended.
async fn wait_for_append(direct: &Client, topic: &str, partition: u32, from: Offset) {
    let mut consumer = direct
        .consumer(topic)
        .max_wait(Duration::from_secs(5))
        .build()
        .await
        .expect("consumer");
    consumer
        .assign(&[partition], StartAt::Offset(from))
        .await
        .expect("assign");
    within(
        "the broker to append the swallowed request",
        consumer.next(),
    )
    .await
    .expect("a record appended");
}

async fn high_watermark(direct: &Client, topic: &str, partition: u32) -> Offset {
    let info = direct
        .admin()
        .describe_topic(topic)
        .await
        .expect("describe");
    info.partitions()[partition as usize].high_watermark()
}

/// Sends a round of records to both partitions, then a batch whose answer is lost after the
/// broker appended it; `between` runs while the client waits for that answer (a restart, or
/// nothing), and must return the client for the broker it leaves running.
async fn lost_answer_round(
    proxy: &Proxy,
    producer: &Producer,
    sent: &mut Sent,
    direct: &Client,
    topic: &str,
    round: usize,
) {
    for i in 0..40 {
        let partition = (i % 2) as u32;
        sent.send(producer, topic, partition, format!("r{round}-{i}"))
            .await;
    }
    producer.flush().await;
    let before = high_watermark(direct, topic, 0).await;
    let swallowed_before = proxy.swallowed_bytes.load(Ordering::SeqCst);
    proxy.swallow_answers();
    for i in 0..10 {
        sent.send(
            producer,
            topic,
            (i % 2) as u32,
            format!("r{round}-lost-{i}"),
        )
        .await;
    }
    wait_for_append(direct, topic, 0, before).await;
    // The broker appended and answered into the void: the client has not heard.
    within("the answer to reach the proxy", async {
        while proxy.swallowed_bytes.load(Ordering::SeqCst) == swallowed_before {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// Guards that a produce whose answer was lost after the append is retried and stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answers_are_retried_and_stored_once() {
    let topic = "idem.lost";
    let (_broker, direct, proxy, producer) = through_a_proxy(topic).await;
    let mut sent = Sent::default();
    for round in 0..5 {
        lost_answer_round(&proxy, &producer, &mut sent, &direct, topic, round).await;
        proxy.cut();
    }
    finish(sent, producer, &direct, topic).await;
}

/// Sends 20 more records after the faults, then checks every record sent is stored once, in
/// order, where its delivery said.
async fn finish(mut sent: Sent, producer: Producer, direct: &Client, topic: &str) {
    for i in 0..20 {
        sent.send(&producer, topic, (i % 2) as u32, format!("tail-{i}"))
            .await;
    }
    sent.assert_stored_once(direct, topic).await;
    producer.close().await;
}

/// Guards that producer state rebuilt from the log after `kill -9` recognises a retried batch
/// that the killed broker had appended but never acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_in_the_middle_stores_each_record_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut broker = BrokerProcess::spawn(dir.path(), &["--fsync", "always"]);
    let mut direct = Client::connect(broker.addr()).await.expect("connect");
    let topic = "idem.kill";
    direct
        .admin()
        .create_topic(topic, TopicOptions::new().partitions(2))
        .await
        .expect("create");
    let proxy = Proxy::start(broker.addr().to_string()).await;
    let producer = producer(&proxy).await;
    let mut sent = Sent::default();
    for round in 0..2 {
        lost_answer_round(&proxy, &producer, &mut sent, &direct, topic, round).await;
        broker.kill9();
        broker = BrokerProcess::spawn(dir.path(), &["--fsync", "always"]);
        direct = Client::connect(broker.addr()).await.expect("connect");
        proxy.set_upstream(broker.addr());
        proxy.cut();
    }
    finish(sent, producer, &direct, topic).await;
}

/// A broker with `topic` (2 partitions), a client straight to it, and a producer through a
/// proxy.
async fn through_a_proxy(topic: &str) -> (TestBroker, Client, Proxy, Producer) {
    let broker = TestBroker::start().await;
    let direct = broker.client().await;
    direct
        .admin()
        .create_topic(topic, TopicOptions::new().partitions(2))
        .await
        .expect("create");
    let proxy = Proxy::start(broker.addr()).await;
    let producer = producer(&proxy).await;
    (broker, direct, proxy, producer)
}

/// As `through_a_proxy`, and one record stored on partition 0 by the producer: its first send
/// learns the topic's partition count, an answer that must come through before answers are
/// swallowed.
async fn one_record_through_a_proxy(topic: &str) -> (TestBroker, Client, Proxy, Producer, Sent) {
    let (broker, direct, proxy, producer) = through_a_proxy(topic).await;
    let mut sent = Sent::default();
    sent.send(&producer, topic, 0, "before".to_string()).await;
    wait_for_append(&direct, topic, 0, Offset(0)).await;
    (broker, direct, proxy, producer, sent)
}

/// Guards pipelining: with every answer held back, a partition's next requests still go out and
/// are appended, in order, behind the unanswered ones (several requests in flight per
/// partition); when the connection then drops, all of them are retried and each record is
/// stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_behind_unanswered_ones_are_appended_in_order() {
    let topic = "idem.pipelined";
    let (_broker, direct, proxy, producer, mut sent) = one_record_through_a_proxy(topic).await;
    proxy.swallow_answers();
    // Each record is a request of its own (the previous one is on the broker already), and
    // stays unanswered; 4 stay within the 5 batches a partition may have in flight.
    for i in 1..5u64 {
        sent.send(&producer, topic, 0, format!("pipelined-{i}"))
            .await;
        wait_for_append(&direct, topic, 0, Offset(i)).await;
    }
    proxy.cut();
    finish(sent, producer, &direct, topic).await;
}

/// Guards the order when a request fails for good while later requests of its partition are in
/// flight: they are refused as out of order, then sent again under a new producer id, in order,
/// and stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_behind_a_refused_one_keep_their_order() {
    let topic = "idem.refused";
    let (broker, direct, proxy, producer, mut sent) = one_record_through_a_proxy(topic).await;
    proxy.swallow_answers();
    let forwarded = proxy.forwarded_bytes.load(Ordering::SeqCst);
    // Over the broker's batch_bytes_max (1 MiB), within its request size limit.
    let large = vec![7u8; 2 << 20];
    let refused = producer
        .send(ProducerRecord::new(topic, large).partition(0))
        .await
        .expect("send");
    // On its way before the next records are queued, so they go in requests behind it.
    within("the large request to go out", async {
        while proxy.forwarded_bytes.load(Ordering::SeqCst) < forwarded + (2 << 20) {
            tokio::task::yield_now().await;
        }
    })
    .await;
    for i in 0..3 {
        sent.send(&producer, topic, 0, format!("after-{i}")).await;
    }
    proxy.cut();
    match within("the refusal", refused).await {
        Err(ClientError::Partition { code, .. }) => {
            assert_eq!(code, pb::ErrorCode::BatchTooLarge as i32)
        }
        other => panic!("a batch over batch_bytes_max must be refused, got {other:?}"),
    }
    finish(sent, producer, &direct, topic).await;
    // After the refusal the producer went on under its producer id with the next epoch, which
    // fences older copies: partition 0 holds the first record's batch, then only batches of
    // the next epoch.
    let data = broker
        .rpc()
        .await
        .fetch(pb::FetchRequest {
            topic: topic.into(),
            partitions: vec![pb::PartitionFetch {
                partition: 0,
                offset: 0,
                max_bytes: 0,
            }],
            format: pb::RecordFormat::Batches as i32,
            ..Default::default()
        })
        .await
        .expect("fetch")
        .into_inner()
        .partitions;
    let identities: Vec<(i64, i16)> = octolog_batch::batches(&data[0].batches)
        .map(|batch| {
            let (header, _) = batch.expect("a valid batch");
            (header.producer_id, header.producer_epoch)
        })
        .collect();
    let (first_id, first_epoch) = identities[0];
    assert!(identities.len() > 1, "{identities:?}");
    assert!(
        identities[1..]
            .iter()
            .all(|&identity| identity == (first_id, first_epoch + 1)),
        "{identities:?}"
    );
}

/// Guards the clean-restart path: producer state comes back from the snapshot written on close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_in_the_middle_stores_each_record_once() {
    let topic = "idem.restart";
    let (mut broker, mut direct, proxy, producer) = through_a_proxy(topic).await;
    let mut sent = Sent::default();
    for round in 0..2 {
        lost_answer_round(&proxy, &producer, &mut sent, &direct, topic, round).await;
        // The client's connection goes first (its broker side must end before the broker can
        // let go of its data folder), and its retries find no broker until the restart.
        proxy.pause();
        proxy.cut();
        drop(direct);
        let dir = broker.stop().await;
        assert!(dir
            .path()
            .join(topic)
            .join("0/producer-state.snapshot")
            .exists());
        broker = TestBroker::start_in(dir, |_| {}).await;
        direct = broker.client().await;
        proxy.set_upstream(&broker.addr());
        proxy.cut();
    }
    finish(sent, producer, &direct, topic).await;
}

/// Guards the broker's side of a given-up stream: once a newer `ProduceStream` has sent a
/// producer's batches to a partition, the producer's batches still arriving on an older stream
/// are refused (a client sends them again on its new stream, perhaps stamped afresh under the
/// next epoch, so a late copy could be stored twice). Other producers on the older stream go on.
#[tokio::test]
async fn an_older_produce_stream_cannot_append_after_a_newer_one() {
    let broker = TestBroker::start().await;
    let topic = "idem.streams";
    broker
        .client()
        .await
        .admin()
        .create_topic(topic, TopicOptions::new().partitions(1))
        .await
        .expect("create topic");
    let mut rpc = broker.rpc().await;
    let producer_id = within(
        "a producer id",
        rpc.init_producer_id(pb::InitProducerIdRequest::default()),
    )
    .await
    .expect("producer id")
    .into_inner()
    .producer_id;
    // Opened one after the other, each awaited until the broker has answered its opening (so
    // its handler has run and numbered it): the broker numbers `older` below `newer`.
    let open = |rpc: &mut pb::octolog_client::OctologClient<tonic::transport::Channel>| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<pb::ProduceStreamRequest>();
        let mut rpc = rpc.clone();
        async move {
            let answers = within(
                "a stream to open",
                rpc.produce_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)),
            )
            .await
            .expect("stream opens")
            .into_inner();
            (tx, answers, 0u64)
        }
    };
    let mut older = open(&mut rpc).await;
    let mut newer = open(&mut rpc).await;
    // Sends one batch of `producer` at `sequence` on `stream`; its error code and offset.
    async fn send(
        stream: &mut (
            tokio::sync::mpsc::UnboundedSender<pb::ProduceStreamRequest>,
            tonic::Streaming<pb::ProduceStreamResponse>,
            u64,
        ),
        topic: &str,
        producer: i64,
        sequence: i32,
    ) -> (i32, u64, String) {
        let mut builder = octolog_batch::BatchBuilder::new();
        builder.producer(producer, 0, sequence);
        builder.push(0, None, Some(format!("seq-{sequence}").as_bytes()), &[]);
        let request_id = stream.2;
        stream.2 += 1;
        stream
            .0
            .send(pb::ProduceStreamRequest {
                request_id,
                topic: topic.into(),
                partitions: vec![pb::PartitionBatches {
                    partition: 0,
                    batches: builder.finish().freeze(),
                }],
            })
            .expect("stream open");
        let answer = within("an answer", stream.1.message())
            .await
            .expect("answer")
            .expect("stream goes on");
        assert_eq!(answer.request_id, request_id);
        assert_eq!(answer.status_code, 0, "{answer:?}");
        let p = &answer.partitions[0];
        (p.error_code, p.base_offset, p.error_message.clone())
    }
    assert_eq!(send(&mut older, topic, producer_id, 0).await.0, 0);
    assert_eq!(send(&mut newer, topic, producer_id, 1).await.0, 0);
    let (code, _, message) = send(&mut older, topic, producer_id, 2).await;
    assert_eq!(code, pb::ErrorCode::ProducerFenced as i32, "{message}");
    assert!(message.contains("newer produce stream"), "{message}");
    assert_eq!(
        send(&mut newer, topic, producer_id, 2).await,
        (0, 2, String::new())
    );
    // A producer the newer stream never sent for is not held to it.
    assert_eq!(
        send(&mut older, topic, producer_id + 1, 0).await,
        (0, 3, String::new())
    );
}
