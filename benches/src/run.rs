//! One end-to-end run: start (or reach) a broker, create a fresh topic, produce and consume
//! concurrently, and measure throughput and end-to-end latency. With `--replay` the consumers
//! start only once every record is acknowledged and read the topic from the beginning, so each
//! side's throughput is measured with the machine to itself, and there is no latency figure.
//!
//! Record values: the first 8 bytes are the send time in nanoseconds since the Unix epoch, the
//! next 8 the record's index in its producer's sequence (both little-endian u64); the rest is
//! filler (`args::MESSAGE_HEADER_BYTES`). A consumer subtracts the send time from the time the
//! record reached it, so latency covers batching (linger), the produce request, the append, the
//! fetch and decoding. Producers and consumers run in this process, so they share one clock.
//! With `--replay` nothing reads those fields back: every record then carries one shared value
//! (zeros, then the filler), as Kafka's producer performance tool sends one payload.
//!
//! Consumers either each read a fixed share of the partitions (`assign`), or with `--group` join
//! one consumer group and let the broker share the partitions among them, committing what they
//! read (auto-commit, and on every rebalance and `close`). Either way the consumers together
//! must receive every record: arrivals are tracked by partition and offset (`Received`), so a
//! record received twice counts once, and is reported as a duplicate; the run fails if any
//! record is missing at the end.
//!
//! Throughput counts record values only (not keys, headers or framing); MB = 10^6 bytes.
//! Produce time runs from the shared start until every record is acknowledged; consume time
//! from the same start until the last record was received.
//!
//! Every wait is bounded: a stalled consumer gives up after `STALL_TIMEOUT`, the broker's shutdown
//! after `SHUTDOWN_TIMEOUT`, pending deliveries are capped at `DELIVERIES_PENDING_MAX`.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use hdrhistogram::Histogram;
use octolog_broker::{server, Broker, BrokerConfig};
use octolog_client::{Client, Consumer, ProducerRecord, StartAt, TopicOptions};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::args::{Plan, MESSAGE_HEADER_BYTES};
use crate::error::{context, BenchError};
use crate::memory;
use crate::received::{Arrival, Received};

/// Record values a producer cuts from one allocation...
const VALUES_PER_ALLOCATION: usize = 256;
/// ...unless that would be larger than this (large values: one allocation each, so that the
/// memory figures are not inflated by allocations kept alive by a few values).
const ARENA_BYTES_MAX: usize = 256 << 10;
/// How often the progress line on stderr is refreshed.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Most deliveries a producer keeps unchecked; past it, it awaits the oldest before sending more.
pub const DELIVERIES_PENDING_MAX: usize = 65_536;
/// How long a consumer's fetch waits at the broker before answering empty.
pub const CONSUMER_MAX_WAIT: Duration = Duration::from_millis(100);
/// How long the run waits without any record consumed before giving up.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// A paced producer this far behind its schedule forgets the backlog instead of bursting to
/// catch up, so a pause is not followed by a flood above the asked rate.
pub const PACING_LAG_MAX: Duration = Duration::from_millis(100);
/// A paced producer sleeps only when at least this far ahead of its schedule (timer resolution).
pub const PACING_SLEEP_MIN: Duration = Duration::from_millis(1);
/// Largest latency the histogram holds (1 hour, in µs); larger values count as this.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Significant decimal digits the histogram keeps (relative error below 0.1%).
pub const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;
/// How long the in-process broker may take to shut down.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// With `--group`, how often a consumer commits the positions it has handed out (the client's
/// default); a rebalance and `close` commit as well.
pub const GROUP_AUTO_COMMIT: Duration = Duration::from_secs(1);

/// The figures of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Records sent and received.
    pub records: u64,
    /// Bytes of record values sent and received.
    pub bytes: u64,
    /// Size of each record's value.
    pub message_bytes: usize,
    /// Partitions of the topic.
    pub partitions: u32,
    /// Producer tasks.
    pub producers: usize,
    /// Consumer tasks.
    pub consumers: usize,
    /// The consumer group the consumers joined; `None` when each read a fixed share.
    pub group: Option<String>,
    /// Records received again after they had already been received (by any consumer); only
    /// meaningful with a group, where it should be 0 unless a member lost its session.
    pub consume_duplicates: u64,
    /// Records the group marked as possibly handed out before
    /// (`ConsumerRecord::redelivered`); only meaningful with a group.
    pub consume_redelivered: u64,
    /// The flush policy, or `broker` when an external broker decides.
    pub fsync: String,
    /// The in-process broker's page cache window, if it has one.
    pub page_cache_window_bytes: Option<u64>,
    /// The broker measured, and whether this tool started it.
    pub broker: String,
    /// The asked total rate in MB/s, if paced.
    pub rate_mb_s: Option<f64>,
    /// The producers' linger, ms.
    pub linger_ms: u64,
    /// The producers' most requests in flight per partition.
    pub in_flight: usize,
    /// Seconds from the start until every record was acknowledged.
    pub produce_secs: f64,
    /// Seconds from the start until the last record was received; with `replay`, from the
    /// consumers' start (once every record was acknowledged).
    pub consume_secs: f64,
    /// Consumers were pushed records (`Subscribe`) instead of fetching them.
    pub push: bool,
    /// Consumers started only after every record was acknowledged (`--replay`): no end-to-end
    /// latency was measured, and the latency fields are empty.
    pub replay: bool,
    /// Leading records per producer left out of the latency figures.
    pub warmup_records_per_producer: u64,
    /// Latencies recorded.
    pub latency_samples: u64,
    /// Median end-to-end latency, µs.
    pub latency_p50_us: u64,
    /// 99th percentile, µs.
    pub latency_p99_us: u64,
    /// 99.9th percentile, µs.
    pub latency_p999_us: u64,
    /// Largest, µs.
    pub latency_max_us: u64,
    /// This process's resident memory over the run (with the in-process broker, the broker's
    /// too), sampled every `PROGRESS_INTERVAL`; `None` where it cannot be read.
    pub memory: Option<memory::Summary>,
}

/// `value / secs`, or 0 for a zero duration.
fn per_second(value: f64, secs: f64) -> f64 {
    if secs > 0.0 {
        value / secs
    } else {
        0.0
    }
}

impl Report {
    /// Produce throughput, MB (10^6 bytes) of record values per second.
    pub fn produce_mb_s(&self) -> f64 {
        per_second(self.bytes as f64 / 1e6, self.produce_secs)
    }
    /// Produce throughput, records per second.
    pub fn produce_records_s(&self) -> f64 {
        per_second(self.records as f64, self.produce_secs)
    }
    /// Consume throughput, MB (10^6 bytes) of record values per second.
    pub fn consume_mb_s(&self) -> f64 {
        per_second(self.bytes as f64 / 1e6, self.consume_secs)
    }
    /// Consume throughput, records per second.
    pub fn consume_records_s(&self) -> f64 {
        per_second(self.records as f64, self.consume_secs)
    }

    /// One JSON object with every figure as a number (INTERFACE.md keys first). With a group,
    /// also `group`, `consume_duplicates` and `consume_redelivered`; without one these keys are
    /// absent, as they would mean nothing.
    pub fn to_json(&self) -> serde_json::Value {
        let round = |v: f64| (v * 1000.0).round() / 1000.0;
        let mut json = serde_json::json!({
            "produce_mb_s": round(self.produce_mb_s()),
            "produce_records_s": round(self.produce_records_s()),
            "consume_mb_s": round(self.consume_mb_s()),
            "consume_records_s": round(self.consume_records_s()),
            "latency_p50_us": self.latency_p50_us,
            "latency_p99_us": self.latency_p99_us,
            "latency_p999_us": self.latency_p999_us,
            "latency_max_us": self.latency_max_us,
            "latency_samples": self.latency_samples,
            "records": self.records,
            "bytes": self.bytes,
            "message_bytes": self.message_bytes,
            "partitions": self.partitions,
            "producers": self.producers,
            "consumers": self.consumers,
            "fsync": self.fsync,
            "page_cache_window_bytes": self.page_cache_window_bytes,
            "broker": self.broker,
            "rate_mb_s": self.rate_mb_s,
            "linger_ms": self.linger_ms,
            "in_flight": self.in_flight,
            "produce_secs": round(self.produce_secs),
            "consume_secs": round(self.consume_secs),
            "push": self.push,
            "replay": self.replay,
        });
        if self.replay {
            // Not measured: a replayed record's age says nothing about the broker's latency.
            for key in [
                "latency_p50_us",
                "latency_p99_us",
                "latency_p999_us",
                "latency_max_us",
            ] {
                json[key] = serde_json::Value::Null;
            }
        }
        if let Some(m) = &self.memory {
            let mb = |bytes: u64| round(bytes as f64 / 1e6);
            json["rss_anon_start_mb"] = mb(m.start.anon_bytes).into();
            json["rss_anon_peak_mb"] = mb(m.anon_peak_bytes).into();
            json["rss_anon_end_mb"] = mb(m.end.anon_bytes).into();
            json["rss_file_peak_mb"] = mb(m.file_peak_bytes).into();
        }
        if let Some(group) = &self.group {
            json["group"] = group.as_str().into();
            json["consume_duplicates"] = self.consume_duplicates.into();
            json["consume_redelivered"] = self.consume_redelivered.into();
        }
        json
    }

    /// Human-readable lines.
    pub fn to_text(&self) -> String {
        let rate = self
            .rate_mb_s
            .map_or("unpaced".to_string(), |r| format!("paced at {r} MB/s"));
        let group = match &self.group {
            None => String::new(),
            Some(group) => format!(
                "\ngroup {group}: {duplicates} duplicate(s) (records received again), \
                 {redelivered} redelivered (marked as possibly received before)",
                duplicates = self.consume_duplicates,
                redelivered = self.consume_redelivered,
            ),
        };
        let memory = match &self.memory {
            None => String::new(),
            Some(m) => format!(
                "\nmemory of this process{broker}: anon RSS {start:.0} MB at start, peak {peak:.0} MB, \
                 {end:.0} MB at end; file-backed RSS peak {file:.0} MB (mapped segments, reclaimable)",
                broker = if self.broker.starts_with("in-process") {
                    " (bench and in-process broker)"
                } else {
                    " (bench only)"
                },
                start = m.start.anon_bytes as f64 / 1e6,
                peak = m.anon_peak_bytes as f64 / 1e6,
                end = m.end.anon_bytes as f64 / 1e6,
                file = m.file_peak_bytes as f64 / 1e6,
            ),
        };
        let consumers = match &self.group {
            None if self.push => format!("{} consumer(s) (pushed)", self.consumers),
            None => format!("{} consumer(s)", self.consumers),
            Some(group) => format!("{} consumer(s) in group {group}", self.consumers),
        };
        let (consumers, consume_from, latency) = if self.replay {
            (
                format!("{consumers} started after the last acknowledgement (replay)"),
                "from the consumers' start until all received",
                "latency: not measured (--replay: records are read long after they were sent)"
                    .to_string(),
            )
        } else {
            (
                consumers,
                "until all received",
                format!(
                    "latency (end to end, send to receive, first {warmup} records of each producer \
                     excluded, {samples} samples): p50 {p50} us, p99 {p99} us, p99.9 {p999} us, max {max} us",
                    warmup = self.warmup_records_per_producer,
                    samples = self.latency_samples,
                    p50 = self.latency_p50_us,
                    p99 = self.latency_p99_us,
                    p999 = self.latency_p999_us,
                    max = self.latency_max_us,
                ),
            )
        };
        format!(
            "octolog-bench: {records} records of {message} bytes ({mb:.1} MB; MB = 10^6 bytes), \
             {partitions} partitions, {producers} producer(s) (linger {linger} ms, {in_flight} in flight), {consumers}, {rate}\n\
             broker: {broker}; fsync: {fsync}{window}\n\
             produce: {pmb:.1} MB/s, {prec:.0} records/s ({psecs:.2} s until all acknowledged)\n\
             consume: {cmb:.1} MB/s, {crec:.0} records/s ({csecs:.2} s {consume_from})\n\
             {latency}{memory}{group}",
            records = self.records,
            message = self.message_bytes,
            mb = self.bytes as f64 / 1e6,
            partitions = self.partitions,
            producers = self.producers,
            linger = self.linger_ms,
            in_flight = self.in_flight,
            broker = self.broker,
            fsync = self.fsync,
            window = self
                .page_cache_window_bytes
                .map(|w| format!("; page cache window: {w} bytes"))
                .unwrap_or_default(),
            pmb = self.produce_mb_s(),
            prec = self.produce_records_s(),
            psecs = self.produce_secs,
            cmb = self.consume_mb_s(),
            crec = self.consume_records_s(),
            csecs = self.consume_secs,
        )
    }
}

/// When record `index` of a paced producer is due, after its schedule's start: records leave at
/// `bytes_per_s`, evenly spaced.
pub fn pacing_offset(index: u64, message_bytes: usize, bytes_per_s: f64) -> Duration {
    assert!(bytes_per_s > 0.0);
    Duration::from_secs_f64(index as f64 * message_bytes as f64 / bytes_per_s)
}

/// Nanoseconds since the Unix epoch (0 if the clock is before it).
fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// An empty latency histogram with the tool's bounds.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGNIFICANT_DIGITS)
        .expect("the histogram bounds are valid constants")
}

/// Progress shared by the tasks of a run.
#[derive(Debug, Default)]
struct Counters {
    /// Bytes of values handed to producers.
    produced_bytes: AtomicU64,
    /// Distinct records received by consumers (a duplicate is not counted again).
    consumed_records: AtomicU64,
    /// Records received marked as redelivered by the group.
    redelivered_records: AtomicU64,
    /// Bytes of values received by consumers.
    consumed_bytes: AtomicU64,
    /// Nanoseconds after the start at which a record was last received.
    last_consumed_ns: AtomicU64,
    /// Set when a task failed, so the others stop instead of waiting for records.
    failed: AtomicBool,
    /// This process's memory, sampled at the start, at every progress tick and at the end;
    /// `None` where it cannot be read.
    memory: Mutex<Option<memory::Summary>>,
}

impl Counters {
    /// Takes a memory sample, if memory can be sampled here; returns it.
    fn sample_memory(&self) -> Option<memory::Sample> {
        let sample = memory::sample()?;
        let mut summary = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        match summary.as_mut() {
            Some(summary) => summary.note(sample),
            None => *summary = Some(memory::Summary::new(sample)),
        }
        Some(sample)
    }
}

/// A broker this tool started, on a temporary data dir.
struct OwnBroker {
    addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<octolog_broker::Result<()>>,
    dir: tempfile::TempDir,
}

impl OwnBroker {
    async fn start(fsync: &str, page_cache_window: Option<u64>) -> Result<OwnBroker, BenchError> {
        let dir = tempfile::Builder::new()
            .prefix("octolog-bench-")
            .tempdir()
            .map_err(|source| BenchError::Io {
                what: "cannot create a temporary data dir",
                source,
            })?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|source| BenchError::Io {
                what: "cannot listen on 127.0.0.1",
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| BenchError::Io {
            what: "cannot read the listening address",
            source,
        })?;
        let config = BrokerConfig {
            data_dir: dir.path().to_path_buf(),
            listen: addr,
            fsync: fsync.to_string(),
            page_cache_window_bytes: page_cache_window
                .map_or(-1, |w| w.min(i64::MAX as u64) as i64),
            ..BrokerConfig::default()
        };
        let broker = Arc::new(Broker::open(config)?);
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, broker, async move {
            let _ = stop.await;
        }));
        Ok(OwnBroker {
            addr,
            shutdown,
            task,
            dir,
        })
    }

    /// Shuts the broker down (flushing its logs) and removes its data dir.
    async fn stop(self) -> Result<(), BenchError> {
        let _ = self.shutdown.send(());
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, self.task).await {
            Ok(Ok(result)) => result?,
            Ok(Err(e)) => return Err(BenchError::Task(format!("broker: {e}"))),
            Err(_) => {
                return Err(BenchError::Task(format!(
                    "the in-process broker did not shut down within {} s",
                    SHUTDOWN_TIMEOUT.as_secs()
                )))
            }
        }
        self.dir.close().map_err(|source| BenchError::Io {
            what: "cannot remove the temporary data dir",
            source,
        })
    }
}

/// Carries out `plan` and returns the figures. With no broker in the plan, starts one in-process
/// and stops it (removing its data) before returning, also on error.
///
/// # Errors
///
/// Anything that stops the run: the broker unreachable or failing, a record lost or mangled, no
/// progress for `STALL_TIMEOUT`.
pub async fn run(plan: &Plan) -> Result<Report, BenchError> {
    match &plan.broker {
        Some(addr) => {
            let description = format!("{addr} (external; its own fsync policy applies)");
            measure(plan, addr.clone(), description, "broker".to_string()).await
        }
        None => {
            let own = OwnBroker::start(&plan.fsync, plan.page_cache_window).await?;
            let description = format!("in-process at {} on a temporary data dir", own.addr);
            let result = measure(plan, own.addr.to_string(), description, plan.fsync.clone()).await;
            let stopped = own.stop().await;
            let report = result?;
            stopped?;
            Ok(report)
        }
    }
}

/// The run proper, against the broker at `addr`.
async fn measure(
    plan: &Plan,
    addr: String,
    broker: String,
    fsync: String,
) -> Result<Report, BenchError> {
    let client = Client::connect(addr.clone())
        .await
        .map_err(context(format!("cannot connect to {addr}")))?;
    client
        .admin()
        .create_topic(&plan.topic, TopicOptions::new().partitions(plan.partitions))
        .await
        .map_err(context(format!("cannot create topic {}", plan.topic)))?;
    let plan = Arc::new(plan.clone());
    let counters = Arc::new(Counters::default());
    counters.sample_memory();
    let received = Arc::new(Mutex::new(Received::new(plan.partitions, plan.records)));
    let start = Instant::now();
    let start_ns = now_ns();
    let spawn_consumers = |start_ns: u64| -> Vec<JoinHandle<Result<Histogram<u64>, BenchError>>> {
        (0..plan.consumers)
            .map(|index| {
                let share = match &plan.group {
                    Some(group) => Share::Group(group.clone()),
                    None => Share::Fixed(
                        (0..plan.partitions)
                            .filter(|p| *p as usize % plan.consumers == index)
                            .collect(),
                    ),
                };
                tokio::spawn(failing_fast(
                    Arc::clone(&counters),
                    consume(
                        client.clone(),
                        Arc::clone(&plan),
                        index,
                        share,
                        Arc::clone(&counters),
                        Arc::clone(&received),
                        start_ns,
                    ),
                ))
            })
            .collect()
    };

    let mut consumers = if plan.replay {
        Vec::new()
    } else {
        spawn_consumers(start_ns)
    };
    let producers: Vec<_> = (0..plan.producers)
        .map(|index| {
            tokio::spawn(failing_fast(
                Arc::clone(&counters),
                produce(
                    client.clone(),
                    Arc::clone(&plan),
                    index,
                    start,
                    Arc::clone(&counters),
                ),
            ))
        })
        .collect();
    let progress = tokio::spawn(progress(Arc::clone(&plan), Arc::clone(&counters)));

    let mut first_error = None;
    for handle in producers {
        let outcome = match handle.await {
            Ok(outcome) => outcome,
            Err(e) => Err(BenchError::Task(format!("producer: {e}"))),
        };
        if let Err(e) = outcome {
            counters.failed.store(true, Ordering::Release);
            first_error.get_or_insert(e);
        }
    }
    let produce_secs = start.elapsed().as_secs_f64();
    if plan.replay && first_error.is_none() {
        // The consumers start now; their `last_consumed_ns`, and so consume time, count from
        // here.
        consumers = spawn_consumers(now_ns());
    }
    let mut histogram = new_histogram();
    for handle in consumers {
        match handle.await {
            Ok(Ok(h)) => histogram
                .add(&h)
                .expect("histograms with the same bounds add up"),
            Ok(Err(e)) => {
                counters.failed.store(true, Ordering::Release);
                first_error.get_or_insert(e);
            }
            Err(e) => {
                counters.failed.store(true, Ordering::Release);
                first_error.get_or_insert(BenchError::Task(format!("consumer: {e}")));
            }
        }
    }
    progress.abort();
    let _ = progress.await;
    counters.sample_memory();
    let memory = *counters.memory.lock().unwrap_or_else(|e| e.into_inner());
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let (missing, duplicates) = {
        let received = lock(&received);
        (received.missing_count(), received.duplicate_count())
    };
    if missing > 0 {
        return Err(BenchError::Missing {
            missing,
            records: plan.records,
            duplicates,
        });
    }
    let consume_secs = counters.last_consumed_ns.load(Ordering::Acquire) as f64 / 1e9;
    Ok(Report {
        records: plan.records,
        bytes: plan.bytes(),
        message_bytes: plan.message_bytes,
        partitions: plan.partitions,
        producers: plan.producers,
        consumers: plan.consumers,
        group: plan.group.clone(),
        consume_duplicates: duplicates,
        consume_redelivered: counters.redelivered_records.load(Ordering::Acquire),
        page_cache_window_bytes: plan.page_cache_window.filter(|_| plan.broker.is_none()),
        fsync,
        broker,
        rate_mb_s: plan.rate_bytes_per_s.map(|r| r / 1e6),
        linger_ms: plan.linger.as_millis() as u64,
        in_flight: plan.in_flight,
        produce_secs,
        consume_secs,
        push: plan.push,
        replay: plan.replay,
        warmup_records_per_producer: plan.warmup_records_per_producer,
        latency_samples: histogram.len(),
        latency_p50_us: histogram.value_at_quantile(0.5),
        latency_p99_us: histogram.value_at_quantile(0.99),
        latency_p999_us: histogram.value_at_quantile(0.999),
        latency_max_us: histogram.max(),
        memory,
    })
}

/// Runs a producer's or consumer's `task` and, if it fails, tells the others at once (they
/// check `counters.failed` and stop), so that the run ends with this error rather than with
/// another task stalling until `STALL_TIMEOUT`.
async fn failing_fast<T>(
    counters: Arc<Counters>,
    task: impl std::future::Future<Output = Result<T, BenchError>>,
) -> Result<T, BenchError> {
    let outcome = task.await;
    if outcome.is_err() {
        counters.failed.store(true, Ordering::Release);
    }
    outcome
}

/// Producer `index`: sends its share of the records, keyless (the client spreads them over the
/// partitions), paced if the plan says so, and waits until all are acknowledged.
async fn produce(
    client: Client,
    plan: Arc<Plan>,
    index: usize,
    start: Instant,
    counters: Arc<Counters>,
) -> Result<(), BenchError> {
    let producer = client
        .producer()
        .linger(plan.linger)
        .in_flight_max(plan.in_flight)
        .batch_bytes(plan.batch_bytes)
        .build()
        .await
        .map_err(context("cannot start a producer"))?;
    let records = plan.producer_records[index];
    let rate = plan.rate_bytes_per_s.map(|r| r / plan.producers as f64);
    let mut template = BytesMut::zeroed(plan.message_bytes);
    for (i, byte) in template.iter_mut().enumerate().skip(MESSAGE_HEADER_BYTES) {
        *byte = b'a' + (i % 26) as u8;
    }
    // A replay reads neither send time nor sequence back: every record then carries the same
    // value, shared rather than copied, as Kafka's producer performance tool sends one payload,
    // so the producer's own work is what is measured.
    let shared_value = plan.replay.then(|| template.clone().freeze());
    let mut pending = VecDeque::with_capacity(DELIVERIES_PENDING_MAX.min(records as usize));
    let mut arena = BytesMut::new();
    // The pacing schedule: record `seq` is due at `schedule_start + pacing_offset(seq -
    // schedule_first)`; both move when the producer falls too far behind.
    let mut schedule_start = start;
    let mut schedule_first = 0u64;
    for seq in 0..records {
        if counters.failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        if let Some(rate) = rate {
            let due =
                schedule_start + pacing_offset(seq - schedule_first, plan.message_bytes, rate);
            let now = Instant::now();
            if due > now + PACING_SLEEP_MIN {
                tokio::time::sleep_until(due).await;
            } else if now > due + PACING_LAG_MAX {
                schedule_start = now;
                schedule_first = seq;
            }
        }
        let value = match &shared_value {
            Some(value) => value.clone(),
            None => {
                // Values are cut from a shared allocation, a malloc per VALUES_PER_ALLOCATION
                // records rather than one each (the producer copies each value into its batch
                // at once).
                if arena.capacity() - arena.len() < plan.message_bytes {
                    arena = BytesMut::with_capacity(
                        (plan.message_bytes * VALUES_PER_ALLOCATION)
                            .min(ARENA_BYTES_MAX)
                            .max(plan.message_bytes),
                    );
                }
                arena.extend_from_slice(&template);
                let mut value = arena.split();
                value[0..8].copy_from_slice(&now_ns().to_le_bytes());
                value[8..16].copy_from_slice(&seq.to_le_bytes());
                value.freeze()
            }
        };
        let delivery = producer
            .send(ProducerRecord::new(plan.topic.as_str(), value))
            .await
            .map_err(context("cannot send a record"))?;
        counters
            .produced_bytes
            .fetch_add(plan.message_bytes as u64, Ordering::Relaxed);
        pending.push_back(delivery);
        if pending.len() >= DELIVERIES_PENDING_MAX {
            if let Some(oldest) = pending.pop_front() {
                oldest.await.map_err(context("a record was not stored"))?;
            }
        }
    }
    producer.flush().await;
    for delivery in pending {
        delivery.await.map_err(context("a record was not stored"))?;
    }
    producer.close().await;
    Ok(())
}

/// Which partitions a consumer reads.
#[derive(Debug, Clone)]
enum Share {
    /// These partitions, assigned by hand.
    Fixed(Vec<u32>),
    /// Whatever this consumer group gives it, from time to time.
    Group(String),
}

/// Locks the shared `Received`. A poisoned lock means a consumer panicked while holding it: a
/// bug, so crash.
fn lock(received: &Mutex<Received>) -> std::sync::MutexGuard<'_, Received> {
    received
        .lock()
        .expect("a consumer panicked while noting records")
}

/// Consumer `index`: reads its share of the partitions from the beginning (with a group: from
/// the group's committed positions, the beginning where there are none) until every record of
/// the run has arrived (at any consumer), then leaves its group, and returns its latency
/// histogram.
async fn consume(
    client: Client,
    plan: Arc<Plan>,
    index: usize,
    share: Share,
    counters: Arc<Counters>,
    received: Arc<Mutex<Received>>,
    start_ns: u64,
) -> Result<Histogram<u64>, BenchError> {
    let mut consumer = client
        .consumer(plan.topic.as_str())
        .max_wait(CONSUMER_MAX_WAIT)
        .push(plan.push)
        .group_start(StartAt::Beginning)
        .auto_commit(Some(GROUP_AUTO_COMMIT))
        .client_id(format!("octolog-bench-{}-{index}", std::process::id()))
        .build()
        .await
        .map_err(context("cannot start a consumer"))?;
    match &share {
        Share::Fixed(partitions) => consumer
            .assign(partitions, StartAt::Beginning)
            .await
            .map_err(context(format!("cannot assign partitions {partitions:?}")))?,
        Share::Group(group) => consumer
            .subscribe(group)
            .await
            .map_err(context(format!("cannot join consumer group {group}")))?,
    }
    let outcome = receive(&mut consumer, &plan, &counters, &received, start_ns).await;
    // Leaving commits what was handed out and hands the partitions to the other members at
    // once; without a group this just drops the consumer.
    let closed = consumer.close().await;
    let histogram = outcome?;
    if let Share::Group(group) = &share {
        closed.map_err(context(format!(
            "cannot leave consumer group {group} cleanly"
        )))?;
    }
    Ok(histogram)
}

/// The receiving loop of a consumer: until every record of the run has arrived (at any
/// consumer) or another task failed.
async fn receive(
    consumer: &mut Consumer,
    plan: &Plan,
    counters: &Counters,
    received: &Mutex<Received>,
    start_ns: u64,
) -> Result<Histogram<u64>, BenchError> {
    let mut histogram = new_histogram();
    loop {
        if counters.failed.load(Ordering::Relaxed) {
            return Ok(histogram);
        }
        let consumed = counters.consumed_records.load(Ordering::Acquire);
        if consumed >= plan.records {
            return Ok(histogram);
        }
        let records = consumer
            .poll()
            .await
            .map_err(context("cannot fetch records"))?;
        let received_ns = now_ns();
        if records.is_empty() {
            let last = start_ns + counters.last_consumed_ns.load(Ordering::Acquire);
            let idle = Duration::from_nanos(received_ns.saturating_sub(last));
            if idle > STALL_TIMEOUT {
                return Err(BenchError::Stalled {
                    seconds: idle.as_secs(),
                    missing: plan.records - consumed,
                    records: plan.records,
                });
            }
            continue;
        }
        let mut first_count = 0u64;
        let mut redelivered_count = 0u64;
        let mut received = lock(received);
        for record in &records {
            let bad = |reason: String| BenchError::BadRecord {
                partition: record.partition(),
                offset: record.offset().0,
                reason,
            };
            let value = record.value().ok_or_else(|| bad("null value".into()))?;
            if value.len() != plan.message_bytes {
                return Err(bad(format!(
                    "value of {} bytes, expected {}",
                    value.len(),
                    plan.message_bytes
                )));
            }
            if record.redelivered() {
                redelivered_count += 1;
            }
            if received
                .mark(record.partition(), record.offset().0)
                .map_err(bad)?
                == Arrival::Again
            {
                // Its latency was recorded when it first arrived.
                continue;
            }
            first_count += 1;
            let field = |at: usize| {
                let mut le = [0u8; 8];
                le.copy_from_slice(&value[at..at + 8]);
                u64::from_le_bytes(le)
            };
            let sent_ns = field(0);
            let seq = field(8);
            if !plan.replay && seq >= plan.warmup_records_per_producer {
                histogram.saturating_record(received_ns.saturating_sub(sent_ns) / 1000);
            }
        }
        // Counted while the lock is held, so `consumed_records` never runs ahead of `Received`.
        counters
            .consumed_records
            .fetch_add(first_count, Ordering::AcqRel);
        drop(received);
        counters
            .redelivered_records
            .fetch_add(redelivered_count, Ordering::Relaxed);
        counters
            .consumed_bytes
            .fetch_add(first_count * plan.message_bytes as u64, Ordering::Relaxed);
        if first_count > 0 {
            counters
                .last_consumed_ns
                .fetch_max(received_ns.saturating_sub(start_ns), Ordering::AcqRel);
        }
    }
}

/// Writes a progress line to stderr every `PROGRESS_INTERVAL` until aborted: overwritten in place
/// on a terminal, one line per interval otherwise.
async fn progress(plan: Arc<Plan>, counters: Arc<Counters>) {
    let terminal = std::io::stderr().is_terminal();
    let mut ticks = tokio::time::interval(PROGRESS_INTERVAL);
    ticks.tick().await;
    let mut last_bytes = 0u64;
    let mut last_at = Instant::now();
    loop {
        ticks.tick().await;
        let produced = counters.produced_bytes.load(Ordering::Relaxed);
        let consumed = counters.consumed_bytes.load(Ordering::Relaxed);
        let now = Instant::now();
        let mb_s = per_second(
            (produced - last_bytes) as f64 / 1e6,
            (now - last_at).as_secs_f64(),
        );
        last_bytes = produced;
        last_at = now;
        let memory = counters.sample_memory().map_or(String::new(), |m| {
            format!(", anon RSS {:.0} MB", m.anon_bytes as f64 / 1e6)
        });
        let line = format!(
            "produced {:.1}/{:.1} MB ({mb_s:.1} MB/s now), consumed {:.1} MB{memory}",
            produced as f64 / 1e6,
            plan.bytes() as f64 / 1e6,
            consumed as f64 / 1e6,
        );
        let mut stderr = std::io::stderr().lock();
        let _ = if terminal {
            write!(stderr, "\r{line}\x1b[K")
        } else {
            writeln!(stderr, "{line}")
        };
        let _ = stderr.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_spreads_records_evenly_at_the_rate() {
        let check = |index: u64, message_bytes: usize, bytes_per_s: f64, expected_ms: u64| {
            let offset = pacing_offset(index, message_bytes, bytes_per_s);
            assert_eq!(
                offset.as_millis() as u64,
                expected_ms,
                "{index} {message_bytes}"
            );
        };
        check(0, 1024, 1e6, 0);
        // 50 MB/s of 1000-byte records: 50,000 records a second.
        check(50_000, 1000, 50e6, 1000);
        check(25_000, 1000, 50e6, 500);
        check(1, 1_000_000, 1e6, 1000);
    }

    /// Guards that a failing producer or consumer stops the others at once (the flag they
    /// poll), and that a task that succeeds does not.
    #[test]
    fn a_failing_task_raises_the_flag_the_others_stop_on() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let counters = Arc::new(Counters::default());
        let ok = runtime.block_on(failing_fast(Arc::clone(&counters), async {
            Ok::<u32, BenchError>(7)
        }));
        assert_eq!(ok.ok(), Some(7));
        assert!(!counters.failed.load(Ordering::Acquire));
        let failed = runtime.block_on(failing_fast(Arc::clone(&counters), async {
            Err::<u32, BenchError>(BenchError::Task("consumer: boom".into()))
        }));
        assert!(failed.is_err());
        assert!(counters.failed.load(Ordering::Acquire));
    }

    #[test]
    fn json_has_the_interface_keys_as_numbers() {
        let report = Report {
            records: 1000,
            bytes: 1_024_000,
            message_bytes: 1024,
            partitions: 8,
            producers: 1,
            consumers: 1,
            group: None,
            consume_duplicates: 0,
            consume_redelivered: 0,
            fsync: "never".into(),
            page_cache_window_bytes: None,
            broker: "in-process".into(),
            rate_mb_s: None,
            linger_ms: 5,
            in_flight: 5,
            produce_secs: 0.5,
            consume_secs: 1.0,
            push: false,
            replay: false,
            warmup_records_per_producer: 100,
            latency_samples: 900,
            latency_p50_us: 10,
            latency_p99_us: 20,
            latency_p999_us: 30,
            latency_max_us: 40,
            memory: None,
        };
        let json = report.to_json();
        for key in [
            "produce_mb_s",
            "produce_records_s",
            "consume_mb_s",
            "consume_records_s",
            "latency_p50_us",
            "latency_p99_us",
            "latency_p999_us",
            "latency_max_us",
            "records",
            "bytes",
            "partitions",
            "producers",
            "consumers",
        ] {
            assert!(json[key].is_number(), "{key} in {json}");
        }
        assert_eq!(json["produce_mb_s"].as_f64(), Some(2.048));
        assert_eq!(json["consume_records_s"].as_f64(), Some(1000.0));
        assert_eq!(json["fsync"], "never");
        assert_eq!(json["linger_ms"], 5);
        assert_eq!(json["in_flight"], 5);
        assert!(json.get("rss_anon_peak_mb").is_none());
        assert!(report.to_text().contains("p99.9 30 us"));

        let sample = |anon_mb: u64| memory::Sample {
            anon_bytes: anon_mb * 1_000_000,
            file_bytes: 7_000_000,
        };
        let mut summary = memory::Summary::new(sample(10));
        summary.note(sample(40));
        summary.note(sample(25));
        let report = Report {
            memory: Some(summary),
            ..report
        };
        let json = report.to_json();
        assert_eq!(json["rss_anon_start_mb"].as_f64(), Some(10.0));
        assert_eq!(json["rss_anon_peak_mb"].as_f64(), Some(40.0));
        assert_eq!(json["rss_anon_end_mb"].as_f64(), Some(25.0));
        assert_eq!(json["rss_file_peak_mb"].as_f64(), Some(7.0));
        assert!(report
            .to_text()
            .contains("anon RSS 10 MB at start, peak 40 MB, 25 MB at end"));
        assert_eq!(json["replay"], false);

        // A replay measures no end-to-end latency: the keys stay, empty, and the text says so.
        let report = Report {
            replay: true,
            ..report
        };
        let json = report.to_json();
        assert_eq!(json["replay"], true);
        for key in [
            "latency_p50_us",
            "latency_p99_us",
            "latency_p999_us",
            "latency_max_us",
        ] {
            assert!(json[key].is_null(), "{key} in {json}");
        }
        assert_eq!(json["consume_mb_s"].as_f64(), Some(1.024));
        let text = report.to_text();
        assert!(text.contains("latency: not measured"), "{text}");
        assert!(!text.contains("p99.9"), "{text}");
    }
}
