//! What survives a broker going away: a graceful restart in-process keeps every topic and
//! record, and a `kill -9` of the `octolog serve` process running with `--fsync always` loses
//! no record the broker acknowledged.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{assert_dense, consume_all, value_text, within, BrokerProcess, TestBroker};
use octolog_client::{Client, Offset, ProducerRecord, StartAt, TopicOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_topics_and_data() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let admin = client.admin();
    admin
        .create_topic(
            "gateway.jobs.gromacs",
            TopicOptions::new().partitions(3).retention_ms(-1),
        )
        .await
        .expect("create");
    admin
        .create_topic("audit", TopicOptions::new().retention_bytes(1 << 30))
        .await
        .expect("create");
    admin
        .create_topic("empty", TopicOptions::new().partitions(2))
        .await
        .expect("create");
    let producer = client
        .producer()
        .batch_bytes(4096)
        .build()
        .await
        .expect("producer");
    let mut deliveries = Vec::new();
    for i in 0..600 {
        let record = ProducerRecord::new("gateway.jobs.gromacs", format!("state-{i}"))
            .key(format!("job-{}", i % 13))
            .header("n", format!("{i}"));
        deliveries.push(producer.send(record).await.expect("send"));
        if i % 3 == 0 {
            deliveries.push(
                producer
                    .send(ProducerRecord::new("audit", format!("audit-{i}")))
                    .await
                    .expect("send"),
            );
        }
    }
    for d in deliveries {
        d.await.expect("acknowledged");
    }
    producer.close().await;
    let topics_before = admin.list_topics().await.expect("list");
    let mut described_before = Vec::new();
    let mut records_before = Vec::new();
    for (name, _) in &topics_before {
        described_before.push(admin.describe_topic(name).await.expect("describe"));
        records_before.push(consume_all(&client, name).await);
    }
    // A consumer waiting at the end does not hold the shutdown up, and learns of it.
    let mut waiting = client
        .consumer("audit")
        .max_wait(Duration::from_secs(30))
        .build()
        .await
        .expect("consumer");
    waiting.assign_all(StartAt::End).await.expect("assign");
    let idle = tokio::time::timeout(Duration::from_millis(200), waiting.next()).await;
    assert!(idle.is_err(), "{idle:?}");
    let waiting = tokio::spawn(async move { waiting.next().await });

    // The client stays connected across the shutdown.
    let dir = broker.stop().await;
    let ended = within("the waiting consumer to end", waiting)
        .await
        .expect("task");
    assert!(ended.is_err(), "{ended:?}");
    drop(client);
    let broker = TestBroker::start_in(dir, |_| {}).await;
    let client = broker.client().await;
    let admin = client.admin();
    assert_eq!(admin.list_topics().await.expect("list"), topics_before);
    for ((name, _), (described, records)) in topics_before
        .iter()
        .zip(described_before.iter().zip(&records_before))
    {
        let after = admin.describe_topic(name).await.expect("describe");
        assert_eq!(after.retention_ms(), described.retention_ms(), "{name}");
        assert_eq!(
            after.retention_bytes(),
            described.retention_bytes(),
            "{name}"
        );
        let bounds = |t: &octolog_client::TopicInfo| -> Vec<_> {
            t.partitions()
                .iter()
                .map(|p| (p.partition(), p.log_start_offset(), p.high_watermark()))
                .collect()
        };
        assert_eq!(bounds(&after), bounds(described), "{name}");
        let records_after = consume_all(&client, name).await;
        assert_eq!(&records_after, records, "{name}");
        for (p, rs) in &records_after {
            assert_dense(*p, rs);
        }
    }
    let held = |name: &str| -> usize {
        let i = topics_before
            .iter()
            .position(|(n, _)| n == name)
            .expect("listed");
        records_before[i].values().map(Vec::len).sum()
    };
    assert_eq!(held("gateway.jobs.gromacs"), 600);
    assert_eq!(held("audit"), 200);
    assert_eq!(held("empty"), 0);

    // The logs take appends where they stopped.
    let producer = client.producer().build().await.expect("producer");
    let next = producer
        .send(ProducerRecord::new("audit", "after restart"))
        .await
        .expect("send")
        .await
        .expect("acknowledged");
    assert_eq!(next.offset(), Offset(200));
}

/// Produces keyed records as fast as the broker acknowledges them, recording each acknowledged
/// (partition, offset, value), until told to stop.
async fn produce_until_stopped(
    client: Client,
    acked: Arc<Mutex<Vec<(u32, u64, String)>>>,
    acked_enough: tokio::sync::oneshot::Sender<()>,
    enough: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let producer = client
        .producer()
        .linger(Duration::from_millis(1))
        .batch_bytes(8 << 10)
        .buffer_bytes(1 << 20)
        // The broker stays dead: retrying its outstanding batches would only delay the test.
        .retries_max(0)
        .build()
        .await
        .expect("producer");
    let mut acked_enough = Some(acked_enough);
    let mut waiters = tokio::task::JoinSet::new();
    // Bounded: far more records than the test needs before it kills the broker.
    for i in 0..1_000_000u64 {
        let value = format!("value-{i}");
        let record = ProducerRecord::new("crash", value.clone()).key(format!("k{}", i % 31));
        let delivery = tokio::select! {
            sent = producer.send(record) => sent.expect("send"),
            _ = stop.changed() => break,
        };
        let acked = Arc::clone(&acked);
        waiters.spawn(async move {
            if let Ok(meta) = delivery.await {
                let mut acked = acked.lock().unwrap();
                acked.push((meta.partition(), meta.offset().0, value));
                acked.len()
            } else {
                0
            }
        });
        while let Some(done) = waiters.try_join_next() {
            if done.expect("waiter") >= enough {
                if let Some(tx) = acked_enough.take() {
                    let _ = tx.send(());
                }
            }
        }
    }
    // Every outstanding delivery resolves, acknowledged or failed, once the broker is gone.
    within("outstanding deliveries to resolve", async {
        while waiters.join_next().await.is_some() {}
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_record() {
    const ENOUGH: usize = 3000;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut process = BrokerProcess::spawn(dir.path(), &["--fsync", "always"]);
    let client = within("connect", Client::connect(process.addr()))
        .await
        .expect("connect");
    client
        .admin()
        .create_topic("crash", TopicOptions::new().partitions(3))
        .await
        .expect("create");

    let acked = Arc::new(Mutex::new(Vec::new()));
    let (enough_tx, enough_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let producing = tokio::spawn(produce_until_stopped(
        client.clone(),
        Arc::clone(&acked),
        enough_tx,
        ENOUGH,
        stop_rx,
    ));
    within("enough acknowledgements", enough_rx)
        .await
        .expect("producer reached the goal");
    // Kill the broker with produce requests in flight.
    let status = process.kill9();
    assert!(!status.success(), "{status:?}");
    stop_tx.send_replace(true);
    within("the producer to stop", producing)
        .await
        .expect("producer task");
    drop(client);
    drop(process);
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(acked.len() >= ENOUGH, "{}", acked.len());
    // The broker really died: no partition was closed cleanly.
    for p in 0..3 {
        let marker = dir
            .path()
            .join("crash")
            .join(p.to_string())
            .join("clean-shutdown");
        assert!(!marker.exists(), "{}", marker.display());
    }

    let process = BrokerProcess::spawn(dir.path(), &[]);
    let client = within("connect", Client::connect(process.addr()))
        .await
        .expect("connect after restart");
    let records = consume_all(&client, "crash").await;
    let mut stored: BTreeMap<(u32, u64), String> = BTreeMap::new();
    for (p, rs) in &records {
        assert_dense(*p, rs);
        for r in rs {
            stored.insert((*p, r.offset().0), value_text(r));
        }
    }
    for (p, offset, value) in &acked {
        assert_eq!(
            stored.get(&(*p, *offset)),
            Some(value),
            "acknowledged record lost at partition {p} offset {offset}; stderr:\n{}",
            process.stderr()
        );
    }
    // The recovered log takes appends right after what it kept.
    let end = records[&0].len() as u64;
    let producer = client.producer().build().await.expect("producer");
    let meta = producer
        .send(ProducerRecord::new("crash", "after").partition(0))
        .await
        .expect("send")
        .await
        .expect("acknowledged");
    assert_eq!(meta.offset(), Offset(end));
    let mut consumer = client.consumer("crash").build().await.expect("consumer");
    consumer
        .seek(0, StartAt::Offset(Offset(end)))
        .await
        .expect("seek");
    let record = within("the new record", consumer.next())
        .await
        .expect("next");
    assert_eq!(value_text(&record), "after");
}

/// Guards that a subscriber which stops reading cannot hold up the broker's shutdown: after
/// `shutdown_grace_ms` its connection is dropped and the logs are closed cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_not_held_up_by_a_subscriber_that_stopped_reading() {
    let broker = TestBroker::start_with(|config| config.shutdown_grace_ms = 300).await;
    let client = broker.client().await;
    client
        .admin()
        .create_topic("unread", TopicOptions::new().partitions(1))
        .await
        .unwrap();
    let producer = client.producer().build().await.unwrap();
    let value = vec![b'x'; 64 << 10];
    let mut last = None;
    // 32 MiB: more than the subscription queue and the HTTP/2 windows hold.
    for _ in 0..512 {
        last = Some(
            producer
                .send(ProducerRecord::new("unread", value.clone()).partition(0))
                .await
                .unwrap(),
        );
    }
    producer.flush().await;
    last.unwrap().await.unwrap();
    let mut consumer = client
        .consumer("unread")
        .push(true)
        .partition_bytes_max(1 << 20)
        .build()
        .await
        .unwrap();
    consumer.assign(&[0], StartAt::Beginning).await.unwrap();
    // Read one answer so the subscription is flowing, then stop reading.
    within("first pushed record", consumer.next())
        .await
        .unwrap();
    // `stop` fails the test if the broker does not shut down (and close its logs) in time.
    let dir = broker.stop().await;
    assert!(dir.path().join("unread/0/clean-shutdown").exists());
    // The data folder is free again at once, even while the stalled client still holds its
    // connection (and the old server's connection task the broker): a new broker opens it.
    let again = TestBroker::start_in(dir, |_| {}).await;
    let records = common::consume_all(&again.client().await, "unread").await;
    assert_eq!(records[&0].len(), 512);
    drop(consumer);
    again.stop().await;
}
