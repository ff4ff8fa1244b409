//! The broker's domain layer: the topic registry and every operation the API offers, in domain
//! types. The gRPC service (`service.rs`) translates to and from protobuf and calls these.
//!
//! Thread-safety: `Broker` is shared as `Arc<Broker>`. The topic map sits behind an `RwLock` held
//! only to look up or replace entries; topic creation and deletion are serialised by `admin`.
//! Waiting fetches and subscriptions sleep on their topic's append watch, never in polling loops.

use std::collections::HashMap;
use std::fs;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use octolog_batch::{BatchBuilder, Offset};
use octolog_storage::ReadBatches;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::config::BrokerConfig;
use crate::error::{BrokerError, Result};
use crate::group::{Coordinator, MemberContext};
use crate::producer_ids::ProducerIds;
use crate::producer_state::{OpenStream, ProduceStreams};
use crate::topic::{validate_topic_name, Topic, TopicSpec};

/// One partition of a topic, described.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionDescription {
    /// Partition number.
    pub partition: u32,
    /// Oldest offset held.
    pub log_start_offset: Offset,
    /// Consumers read below this.
    pub high_watermark: Offset,
    /// Next offset to be assigned.
    pub log_end_offset: Offset,
    /// Number of segments.
    pub segments: u32,
    /// Bytes of log.
    pub size_bytes: u64,
}

/// A topic, described.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicDescription {
    /// What it was created with.
    pub spec: TopicSpec,
    /// Its partitions.
    pub partitions: Vec<PartitionDescription>,
}

/// A record as the simple produce path receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceRecord {
    /// `None` is a null key.
    pub key: Option<Bytes>,
    /// `None` is a null value.
    pub value: Option<Bytes>,
    /// Header keys and values.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// `None` takes the broker's clock.
    pub timestamp_ms: Option<i64>,
}

/// One partition of a fetch request.
/// A produce appended in order whose acknowledgement is pending; see
/// `Broker::produce_batches_ordered`.
#[derive(Debug)]
#[must_use = "the produce is acknowledged only once `complete` returns"]
pub struct PendingProduce {
    topic: Arc<Topic>,
    pending: crate::partition::PendingAppend,
}

impl PendingProduce {
    /// Waits until the records are durable (flush policy `always`), wakes readers, and returns
    /// the offsets given.
    ///
    /// # Errors
    ///
    /// `Storage` if the fsync failed.
    pub async fn complete(self) -> Result<octolog_storage::AppendInfo> {
        let info = self.pending.complete().await?;
        self.topic.notify_appended();
        Ok(info)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchPartition {
    /// Partition number.
    pub partition: u32,
    /// First offset wanted.
    pub offset: Offset,
    /// Most bytes wanted from this partition (at least one batch is returned); 0 means no limit
    /// beyond the whole answer's.
    pub bytes_max: u32,
}

/// A fetch: long-polls until `min_bytes` are there or `max_wait_ms` passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest {
    /// The topic.
    pub topic: String,
    /// The partitions and where to read them.
    pub partitions: Vec<FetchPartition>,
    /// Longest to wait for data; capped by `fetch_wait_ms_max`.
    pub max_wait_ms: u32,
    /// Answer as soon as this many bytes are there; 0 answers at once.
    pub min_bytes: u32,
    /// Most bytes in the whole answer; 0 means `fetch_bytes_max`.
    pub max_bytes: u32,
    /// The consumer-group member fetching, if any: only partitions it owns are served.
    pub group: Option<MemberContext>,
}

/// The answer for one partition of a fetch.
#[derive(Debug)]
pub struct FetchedPartition {
    /// Partition number.
    pub partition: u32,
    /// The batches, or why there are none.
    pub result: Result<ReadBatches>,
}

/// Where to look up an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The log start offset.
    Earliest,
    /// The high watermark: the offset the next record will get, as consumers see it.
    Latest,
    /// The first record with a timestamp at or after this; the high watermark if none.
    Timestamp(i64),
}

/// The broker. See the module documentation.
#[derive(Debug)]
pub struct Broker {
    /// Settings, validated.
    config: BrokerConfig,
    /// Topics by name.
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    /// Serialises topic creation and deletion (file operations).
    admin: Mutex<()>,
    /// Bounds the fetches waiting for data at once (`fetch_waiters_max`).
    fetch_waiters: Arc<Semaphore>,
    /// Bounds concurrent push subscriptions (`subscriptions_max`).
    subscriptions: Arc<Semaphore>,
    /// Round-robin counter for keyless records on the simple produce path.
    round_robin: AtomicU32,
    /// The `ProduceStream`s: their ids, and which are open.
    produce_streams: Arc<ProduceStreams>,
    /// Set when shutdown starts: waits end and new work is refused.
    shutting_down: AtomicBool,
    /// Wakes waiting fetches and subscriptions when shutdown starts.
    shutdown: watch::Sender<bool>,
    /// Consumer groups and their committed positions.
    groups: Coordinator,
    /// Hands out idempotent producers' ids, each at most once per data folder.
    producer_ids: ProducerIds,
    /// The data folder's lock: one broker per folder. Held until `close` has closed every log,
    /// then released, so that a new broker can open the folder even while requests of this one
    /// still linger (they can no longer touch the folder: everything is closed).
    lock: Mutex<Option<fs::File>>,
}

/// The folder, inside the data folder, of consumer groups' committed positions. `@` cannot
/// start a topic name, so no topic can ever collide with it.
pub const GROUPS_DIR: &str = "@groups";

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Broker {
    /// Opens the data folder (creating it if needed), takes its lock, and opens every topic,
    /// recovering logs that were not closed cleanly.
    ///
    /// # Errors
    ///
    /// `Config` for bad settings or a data folder in use by another broker; `Metadata` or
    /// `Storage` if a topic cannot be opened.
    pub fn open(config: BrokerConfig) -> Result<Broker> {
        config.validate()?;
        let dir = &config.data_dir;
        let meta = |e: std::io::Error| BrokerError::Metadata {
            path: dir.clone(),
            reason: e.to_string(),
        };
        fs::create_dir_all(dir).map_err(meta)?;
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".lock"))
            .map_err(meta)?;
        if lock.try_lock().is_err() {
            return Err(BrokerError::Config(format!(
                "data folder {} is in use by another broker",
                dir.display()
            )));
        }
        let producer_ids = ProducerIds::open(dir)?;
        let mut topics = HashMap::new();
        for entry in fs::read_dir(dir).map_err(meta)? {
            let entry = entry.map_err(meta)?;
            let path = entry.path();
            if !entry.file_type().map_err(meta)?.is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == GROUPS_DIR {
                continue;
            }
            if name.contains('~') {
                tracing::info!(dir = %path.display(), "removing remains of a deleted topic");
                fs::remove_dir_all(&path).map_err(meta)?;
                continue;
            }
            if validate_topic_name(&name).is_err() {
                tracing::warn!(dir = %path.display(), "ignoring folder that is not a topic");
                continue;
            }
            if let Some(topic) = Topic::open(&config, path)? {
                topics.insert(name, Arc::new(topic));
            }
        }
        let groups = Coordinator::open(
            &dir.join(GROUPS_DIR).join("offsets"),
            config.group_config(),
            &|topic, partition| {
                let topic: &Arc<Topic> = topics.get(topic)?;
                Some(topic.partition(partition).ok()?.log().high_watermark().0)
            },
        )?;
        tracing::info!(data_dir = %dir.display(), topics = topics.len(), "opened data folder");
        Ok(Broker {
            groups,
            fetch_waiters: Arc::new(Semaphore::new(config.fetch_waiters_max)),
            subscriptions: Arc::new(Semaphore::new(config.subscriptions_max)),
            config,
            topics: RwLock::new(topics),
            admin: Mutex::new(()),
            round_robin: AtomicU32::new(0),
            produce_streams: Arc::default(),
            shutting_down: AtomicBool::new(false),
            shutdown: watch::channel(false).0,
            producer_ids,
            lock: Mutex::new(Some(lock)),
        })
    }

    /// The settings the broker runs with.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// `ShuttingDown` once shutdown has started.
    ///
    /// # Errors
    ///
    /// `ShuttingDown`.
    pub fn check_running(&self) -> Result<()> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(BrokerError::ShuttingDown);
        }
        Ok(())
    }

    /// Every topic, as a snapshot: the map's lock is not held while the caller works.
    fn all_topics(&self) -> Vec<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The topic called `name`.
    ///
    /// # Errors
    ///
    /// `UnknownTopic`.
    pub fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownTopic {
                topic: name.to_string(),
            })
    }

    /// Creates a topic. Blocking: file operations and fsyncs.
    ///
    /// # Errors
    ///
    /// `InvalidTopicName`, `TopicExists`, `LimitExceeded` (partitions), `Metadata`, `Storage`.
    pub fn create_topic(
        &self,
        name: &str,
        partitions: Option<u32>,
        retention_ms: Option<i64>,
        retention_bytes: Option<i64>,
    ) -> Result<TopicDescription> {
        self.check_running()?;
        validate_topic_name(name)?;
        let partitions = partitions.unwrap_or(self.config.default_partitions);
        if partitions == 0 {
            return Err(BrokerError::InvalidRequest(
                "a topic needs at least one partition".into(),
            ));
        }
        if partitions > self.config.partitions_max {
            return Err(BrokerError::LimitExceeded {
                what: format!("{partitions} partitions"),
                limit: u64::from(self.config.partitions_max),
            });
        }
        for (what, value) in [
            ("retention_ms", retention_ms),
            ("retention_bytes", retention_bytes),
        ] {
            if value.is_some_and(|v| v < -1 || v == 0) {
                return Err(BrokerError::InvalidRequest(format!(
                    "{what} must be positive, or -1 for no limit"
                )));
            }
        }
        let _admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        if self.topic(name).is_ok() {
            return Err(BrokerError::TopicExists {
                topic: name.to_string(),
            });
        }
        let spec = TopicSpec {
            name: name.to_string(),
            partitions,
            retention_ms,
            retention_bytes,
        };
        let topic = Arc::new(Topic::create(&self.config, spec)?);
        tracing::info!(topic = name, partitions, "created topic");
        let description = describe(&topic);
        self.topics
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), topic);
        self.groups
            .reconcile_all(&|topic| self.partition_count(topic));
        Ok(description)
    }

    /// Deletes a topic and its data. Blocking.
    ///
    /// # Errors
    ///
    /// `UnknownTopic`, `Metadata`.
    pub fn delete_topic(&self, name: &str) -> Result<()> {
        self.check_running()?;
        let _admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let topic = self
            .topics
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .ok_or_else(|| BrokerError::UnknownTopic {
                topic: name.to_string(),
            })?;
        // Wake anyone waiting on it; they will find it gone.
        topic.notify_appended();
        topic.delete_files()?;
        tracing::info!(topic = name, "deleted topic");
        // Forget first (positions, owners, redelivery marks), then rebalance without it.
        let forgotten = self.groups.forget_topic(name);
        self.groups
            .reconcile_all(&|topic| self.partition_count(topic));
        forgotten?;
        Ok(())
    }

    /// The consumer-group coordinator.
    pub fn groups(&self) -> &Coordinator {
        &self.groups
    }

    /// How many partitions `topic` has; `None` if it does not exist.
    pub fn partition_count(&self, topic: &str) -> Option<u32> {
        self.topic(topic).ok().map(|t| t.partition_count())
    }

    /// Every topic, sorted by name.
    pub fn list_topics(&self) -> Vec<TopicSpec> {
        let mut specs: Vec<TopicSpec> = self
            .topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|t| t.spec().clone())
            .collect();
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        specs
    }

    /// One topic with its partitions' offsets and sizes.
    ///
    /// # Errors
    ///
    /// `UnknownTopic`.
    pub fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        Ok(describe(&*self.topic(name)?))
    }

    /// A new idempotent producer's id and epoch (always 0: each producer gets a fresh id, and
    /// later epochs are the producer's own, KIP-360 style).
    /// Blocking: now and then it reserves a block of ids on disk.
    ///
    /// # Errors
    ///
    /// `ShuttingDown`; `Metadata` if the reservation cannot be written.
    pub fn init_producer_id(&self) -> Result<(i64, i16)> {
        self.check_running()?;
        Ok((self.producer_ids.next()?, 0))
    }

    /// Appends ready-made v2 batches to one partition (the fast path). Idempotent batches are
    /// appended once: a retry of an appended entry appends nothing and gets the original
    /// offsets back.
    ///
    /// # Errors
    ///
    /// `UnknownTopic`, `UnknownPartition`, `Storage` (invalid batch, too large, I/O),
    /// `ShuttingDown`; `OutOfOrderSequence`, `ProducerFenced`, `UnknownProducerId` for
    /// idempotent batches that break the rules.
    pub async fn produce_batches(
        &self,
        topic: &str,
        partition: u32,
        batches: Bytes,
    ) -> Result<octolog_storage::AppendInfo> {
        self.check_running()?;
        let topic = self.topic(topic)?;
        let info = topic.partition(partition)?.append(batches).await?;
        topic.notify_appended();
        Ok(info)
    }

    /// Opens a `ProduceStream`: its id is larger than every earlier stream's, and it counts as
    /// open until dropped.
    pub fn open_produce_stream(&self) -> OpenStream {
        self.produce_streams.open()
    }

    /// Appends v2 batches that came on produce stream `stream` to a partition at once, in the
    /// caller's order, and returns the append still to complete (durability under flush policy
    /// `always`, waking readers); see `Partition::append_ordered`.
    ///
    /// # Errors
    ///
    /// As `produce_batches`, and `StaleProduceStream` when a newer stream has sent the same
    /// producer's batches to the partition; nothing is appended then.
    pub fn produce_batches_ordered(
        &self,
        topic: &str,
        partition: u32,
        batches: Bytes,
        stream: &OpenStream,
    ) -> Result<PendingProduce> {
        self.check_running()?;
        let topic = self.topic(topic)?;
        let pending = topic
            .partition(partition)?
            .append_ordered(batches, Some(stream))?;
        Ok(PendingProduce { topic, pending })
    }

    /// Appends records (the simple path): to `partition` if given, else each record by key hash,
    /// keyless records round-robin. Returns (partition, offset) per record, in order.
    ///
    /// # Errors
    ///
    /// As `produce_batches`, and `InvalidRequest` for an empty request. Records bound for one
    /// partition are appended together: they all succeed or all fail.
    pub async fn produce_records(
        &self,
        topic_name: &str,
        partition: Option<u32>,
        records: Vec<ProduceRecord>,
    ) -> Result<Vec<(u32, Offset)>> {
        self.check_running()?;
        if records.is_empty() {
            return Err(BrokerError::InvalidRequest(
                "a produce request needs at least one record".into(),
            ));
        }
        let topic = self.topic(topic_name)?;
        let count = topic.partition_count();
        if let Some(p) = partition {
            topic.partition(p)?;
        }
        let now = now_ms();
        // Partition of each record, and per partition the records' indexes in request order.
        let mut by_partition: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, record) in records.iter().enumerate() {
            let p = match (partition, &record.key) {
                (Some(p), _) => p,
                (None, Some(key)) => octolog_client::partition_for_key(key, count),
                (None, None) => self.round_robin.fetch_add(1, Ordering::Relaxed) % count,
            };
            by_partition.entry(p).or_default().push(i);
        }
        let batch_bytes_max = self.config.batch_bytes_max as usize;
        let mut acks = vec![(0u32, Offset(0)); records.len()];
        let mut builder = BatchBuilder::new();
        for (p, indexes) in by_partition {
            // One or more batches back to back, each kept within batch_bytes_max by an upper
            // bound of the next record's encoded size. A single record too large for a batch
            // makes a batch of its own, which the log refuses with a clear error.
            let mut buf = BytesMut::new();
            for &i in &indexes {
                let record = &records[i];
                if !builder.is_empty()
                    && builder.size_bytes() + record_bytes_bound(record) > batch_bytes_max
                {
                    buf.extend_from_slice(&builder.finish());
                }
                let headers: Vec<(&str, Option<&[u8]>)> = record
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_deref()))
                    .collect();
                builder.push(
                    record.timestamp_ms.unwrap_or(now),
                    record.key.as_deref(),
                    record.value.as_deref(),
                    &headers,
                );
            }
            buf.extend_from_slice(&builder.finish());
            let info = topic.partition(p)?.append(buf.freeze()).await?;
            for (n, &i) in indexes.iter().enumerate() {
                acks[i] = (p, Offset(info.first_offset.0 + n as u64));
            }
            topic.notify_appended();
        }
        Ok(acks)
    }

    /// Reads the requested partitions once, within `bytes_max` for the whole answer (the first
    /// partition with data always gets at least one batch). Returns the answers and their bytes.
    fn read_once(
        &self,
        topic: &Topic,
        partitions: &[FetchPartition],
        bytes_max: usize,
    ) -> (Vec<FetchedPartition>, usize) {
        let mut total = 0usize;
        let answers = partitions
            .iter()
            .map(|p| {
                let result = topic.partition(p.partition).and_then(|partition| {
                    let partition_bytes_max = match p.bytes_max {
                        0 => bytes_max,
                        n => n as usize,
                    };
                    let budget = partition_bytes_max.min(bytes_max.saturating_sub(total));
                    if budget == 0 && total > 0 {
                        // The answer is full: report the bounds but no data.
                        let log = partition.log();
                        return Ok(ReadBatches {
                            batches: Bytes::new(),
                            next_offset: p.offset,
                            high_watermark: log.high_watermark(),
                            log_start_offset: log.log_start_offset(),
                        });
                    }
                    partition.read(p.offset, budget.max(1))
                });
                if let Ok(read) = &result {
                    total += read.batches.len();
                }
                FetchedPartition {
                    partition: p.partition,
                    result,
                }
            })
            .collect();
        (answers, total)
    }

    /// Fetches batches, long-polling: answers once `min_bytes` are there, an error occurs, or
    /// `max_wait_ms` passes; woken by appends, never by polling.
    ///
    /// # Errors
    ///
    /// `UnknownTopic`, `InvalidRequest` (no partitions, or too many); per-partition errors are
    /// in the answers.
    pub async fn fetch(&self, mut request: FetchRequest) -> Result<Vec<FetchedPartition>> {
        let Some(ctx) = request.group.take() else {
            return self.fetch_partitions(request).await;
        };
        self.check_running()?;
        self.topic(&request.topic)?;
        // Partitions the member does not own are refused before anything is read, and then
        // the rest is answered at once rather than making the member wait for them.
        let asked: Vec<(u32, Option<u64>)> = request
            .partitions
            .iter()
            .map(|p| (p.partition, None))
            .collect();
        let checks = self.groups.serve(&ctx, &request.topic, &asked);
        let mut refused: HashMap<u32, BrokerError> = HashMap::new();
        for (p, check) in request.partitions.iter().zip(checks) {
            if let Err(e) = check {
                refused.insert(p.partition, e);
            }
        }
        let all = request.partitions.clone();
        if !refused.is_empty() {
            request
                .partitions
                .retain(|p| !refused.contains_key(&p.partition));
            request.max_wait_ms = 0;
        }
        let mut answers = if request.partitions.is_empty() {
            Vec::new()
        } else {
            self.fetch_partitions(request.clone()).await?
        };
        // What was read is served only if the member still owns it now; its new position is
        // noted, so that a crash hands exactly these records over as redelivered.
        let served: Vec<(u32, Option<u64>)> = answers
            .iter()
            .map(|a| (a.partition, a.result.as_ref().ok().map(|r| r.next_offset.0)))
            .collect();
        let checks = self.groups.serve(&ctx, &request.topic, &served);
        for (answer, check) in answers.iter_mut().zip(checks) {
            if let Err(e) = check {
                answer.result = Err(e);
            }
        }
        let mut by_partition: HashMap<u32, FetchedPartition> =
            answers.into_iter().map(|a| (a.partition, a)).collect();
        Ok(all
            .iter()
            .map(|p| match refused.remove(&p.partition) {
                Some(e) => FetchedPartition {
                    partition: p.partition,
                    result: Err(e),
                },
                None => by_partition
                    .remove(&p.partition)
                    .expect("every partition not refused was fetched"),
            })
            .collect())
    }

    /// `fetch` without a group: reads and long-polls the requested partitions.
    async fn fetch_partitions(&self, request: FetchRequest) -> Result<Vec<FetchedPartition>> {
        self.check_running()?;
        let topic = self.topic(&request.topic)?;
        if request.partitions.is_empty() {
            return Err(BrokerError::InvalidRequest(
                "a fetch needs at least one partition".into(),
            ));
        }
        if request.partitions.len() > topic.partition_count() as usize {
            return Err(BrokerError::InvalidRequest(format!(
                "a fetch names {} partitions but topic {:?} has {}",
                request.partitions.len(),
                topic.name(),
                topic.partition_count()
            )));
        }
        let fetch_bytes_max = self.config.fetch_bytes_max as usize;
        let bytes_max = match request.max_bytes as usize {
            0 => fetch_bytes_max,
            n => n.min(fetch_bytes_max),
        };
        let wait = Duration::from_millis(u64::from(
            request.max_wait_ms.min(self.config.fetch_wait_ms_max),
        ));
        let deadline = Instant::now() + wait;
        let mut appended = topic.watch_appends();
        let mut shutdown = self.shutdown.subscribe();
        let mut _waiter = None;
        loop {
            appended.borrow_and_update();
            let (answers, total) = self.read_once(&topic, &request.partitions, bytes_max);
            let failed = answers.iter().any(|a| a.result.is_err());
            if failed
                || total >= request.min_bytes as usize
                || request.min_bytes == 0
                || wait.is_zero()
                || *shutdown.borrow()
            {
                return Ok(answers);
            }
            if _waiter.is_none() {
                match Arc::clone(&self.fetch_waiters).try_acquire_owned() {
                    Ok(permit) => _waiter = Some(permit),
                    // Too many waiters: answer now rather than queue without bound.
                    Err(_) => return Ok(answers),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return Ok(self.read_once(&topic, &request.partitions, bytes_max).0);
                }
                changed = appended.changed() => {
                    if changed.is_err() {
                        return Ok(answers);
                    }
                }
                _ = shutdown.changed() => return Ok(answers),
            }
            // Deletion wakes the waiters too: end the wait rather than keep reading a topic
            // that is gone (or that a new topic of the same name replaced).
            let current = self.topic(&request.topic);
            if !current.is_ok_and(|t| Arc::ptr_eq(&t, &topic)) {
                return Ok(request
                    .partitions
                    .iter()
                    .map(|p| FetchedPartition {
                        partition: p.partition,
                        result: Err(BrokerError::UnknownTopic {
                            topic: request.topic.clone(),
                        }),
                    })
                    .collect());
            }
        }
    }

    /// Looks up an offset in a partition.
    ///
    /// # Errors
    ///
    /// `UnknownTopic`, `UnknownPartition`, `Storage`.
    pub fn list_offset(&self, topic: &str, partition: u32, spec: OffsetSpec) -> Result<Offset> {
        let topic = self.topic(topic)?;
        let partition = topic.partition(partition)?;
        let log = partition.log();
        Ok(match spec {
            OffsetSpec::Earliest => log.log_start_offset(),
            OffsetSpec::Latest => log.high_watermark(),
            OffsetSpec::Timestamp(t) => partition
                .offset_for_timestamp(t)?
                .unwrap_or_else(|| log.high_watermark()),
        })
    }

    /// A permit for one push subscription, or `LimitExceeded`.
    ///
    /// # Errors
    ///
    /// `LimitExceeded` when `subscriptions_max` subscriptions are open; `ShuttingDown`.
    pub fn subscription_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        self.check_running()?;
        Arc::clone(&self.subscriptions)
            .try_acquire_owned()
            .map_err(|_| BrokerError::LimitExceeded {
                what: "open subscriptions".into(),
                limit: self.config.subscriptions_max as u64,
            })
    }

    /// A receiver that turns `true` when shutdown starts.
    pub fn watch_shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// One maintenance round: flushes partitions whose interval is due, snapshots producer
    /// state where due and, when `check_retention`, applies retention. Blocking (fsyncs,
    /// deletions); errors are logged.
    pub fn maintain(&self, check_retention: bool) {
        let topics = self.all_topics();
        let now = now_ms();
        for topic in topics {
            for partition in topic.partitions() {
                if let Err(e) = partition.flush_if_due() {
                    tracing::error!(topic = topic.name(), partition = partition.id(), error = %e, "flush failed");
                }
                if let Err(e) = partition.snapshot_if_due() {
                    tracing::error!(topic = topic.name(), partition = partition.id(), error = %e, "producer-state snapshot failed");
                }
                if check_retention {
                    match partition.apply_retention(now) {
                        Ok(outcome) if outcome.segments_deleted > 0 => {
                            tracing::info!(
                                topic = topic.name(),
                                partition = partition.id(),
                                ?outcome,
                                "retention"
                            );
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::error!(topic = topic.name(), partition = partition.id(), error = %e, "retention failed")
                        }
                    }
                }
            }
        }
    }

    /// Starts shutdown: new work is refused and waiting fetches and subscriptions end.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.shutdown.send_replace(true);
    }

    /// Flushes and closes every log, writing their clean-shutdown markers. Blocking.
    ///
    /// # Errors
    ///
    /// The first error met; every log is still tried.
    pub fn close(&self) -> Result<()> {
        self.begin_shutdown();
        let topics = self.all_topics();
        let mut first_error = self.groups.close().err();
        for topic in topics {
            if let Err(e) = topic.close(self.config.recovery_threads) {
                tracing::error!(topic = topic.name(), error = %e, "closing topic failed");
                first_error.get_or_insert(e);
            }
        }
        if first_error.is_none() {
            // Dropping the file releases its lock. After a failed close the folder stays locked
            // until this broker is dropped: a log that did not close cleanly is recovered by the
            // next open, which rebuilds index files in place, and must not find this broker's
            // segments still mapping them.
            self.lock.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// An upper bound of the encoded size of a record in a v2 batch: the varint fields take at most
/// 5 (i32) or 10 (i64) bytes each.
fn record_bytes_bound(record: &ProduceRecord) -> usize {
    let len = |b: &Option<Bytes>| b.as_ref().map_or(0, Bytes::len);
    let headers: usize = record
        .headers
        .iter()
        .map(|(k, v)| 10 + k.len() + len(v))
        .sum();
    // length, attributes, timestamp delta, offset delta, key length, value length, header count
    5 + 1 + 10 + 5 + 5 + 5 + 5 + len(&record.key) + len(&record.value) + headers
}

fn describe(topic: &Topic) -> TopicDescription {
    TopicDescription {
        spec: topic.spec().clone(),
        partitions: topic
            .partitions()
            .iter()
            .map(|p| {
                let log = p.log();
                PartitionDescription {
                    partition: p.id(),
                    log_start_offset: log.log_start_offset(),
                    high_watermark: log.high_watermark(),
                    log_end_offset: log.log_end_offset(),
                    segments: log.segment_count() as u32,
                    size_bytes: log.size_bytes(),
                }
            })
            .collect(),
    }
}
