//! The producer: batches records per partition and sends the batches with the fast produce path.
//!
//! `send` encodes a record straight into its partition's open batch (a [`BatchBuilder`], no
//! per-record allocation beyond the caller's buffers) and returns a [`Delivery`], a future that
//! resolves to the record's offset once the broker has acknowledged its batch. A background
//! sender task closes a batch when it reaches `batch_bytes` or has lingered `linger`, and sends
//! it. Requests go out on one `ProduceStream`, which the broker appends in the order they were
//! submitted, so a partition can have several requests in flight (`in_flight_max`, default 5)
//! and its records are still appended in the order they were sent; different partitions are
//! sent concurrently too (pipelining).
//!
//! Idempotence (the default; [`ProducerBuilder::idempotent`]): on start the producer asks the
//! broker for a producer id and epoch (`InitProducerId`). When a batch is first sent it is
//! stamped with them and with its partition's next sequence (the count of records this producer
//! id sent to the partition before), so the broker appends it once. A request that fails in a
//! transient way (connection lost, `UNAVAILABLE`, no answer within `request_timeout`) is sent
//! again with the same bytes, up to `retries_max` times, `retry_backoff` apart, within
//! `delivery_timeout`; if the broker had appended it, it answers with the original offsets. At
//! most `IDEMPOTENT_BATCHES_IN_FLIGHT_MAX` (5) batches of a partition are in flight, the number
//! the broker remembers. When a batch fails for good, the sequence of its partition has a hole,
//! so the producer takes a new identity before stamping the next batch: its producer id with
//! the next epoch (as Kafka's KIP-360; a new producer id from the broker once the epoch is
//! spent), which fences any older copy still on its way; when the broker has lost the
//! producer's state (`UNKNOWN_PRODUCER_ID`), the batch is stamped afresh under a new identity
//! and sent again. A request retried, or refused as out of order behind earlier requests
//! that failed, is sent again only once every earlier request of its partition has settled, and
//! the partition sends nothing new meanwhile, so retries keep the order (as Kafka's producer
//! does with `max.in.flight.requests.per.connection` up to 5). Without idempotence, batches
//! carry no producer id and nothing is retried.
//!
//! Memory is bounded: `send` first reserves the record's size from a `buffer_bytes` budget and
//! waits when it is spent (back-pressure); the budget comes back when the batch is acknowledged.
//!
//! Batch state machine, per partition:
//! - *open*: takes records; closed when full, when it has lingered, on `flush`, or on close.
//! - *ready*: closed, queued until the partition may send another request.
//! - *in flight*: stamped (idempotent) and sent; on the broker's answer every record's
//!   `Delivery` resolves, and the next ready batches of the partition go out. A transient
//!   failure sends the same bytes again (idempotent only), until `retries_max` or
//!   `delivery_timeout`; then the deliveries fail.
//!
//! Thread-safety: `Producer` is `Clone + Send + Sync`; clones share the batches and the sender.
//! Dropping the last clone lets the sender send what is pending and stop; it never blocks.

use std::collections::{BTreeMap, VecDeque};
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use octolog_batch::{BatchBuilder, Offset};
use octolog_proto::v1 as pb;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use crate::error::{ClientError, Result};
use crate::partitioner::partition_for_key;
use crate::produce_stream::ProduceStreams;
use crate::Client;

/// Maps looked up on every `send`, keyed by the application's own topic names: foldhash's fast
/// hasher instead of SipHash, which was about 3% of a producer's CPU at 1 KiB records.
type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Largest `buffer_bytes`: permits of a tokio semaphore are counted in `u32` per acquisition.
const BUFFER_BYTES_MAX: usize = u32::MAX as usize;
/// Largest `batch_bytes`: a v2 batch's length is an `i32`, and brokers refuse far less.
const BATCH_BYTES_LIMIT: usize = 1 << 30;
/// Most bytes of batches one produce request carries for a partition.
const REQUEST_BYTES_MAX: usize = 8 << 20;
/// Most batches of a partition in flight (in all its requests) for an idempotent producer: the
/// broker remembers a producer's last 5 batches per partition, so any of them sent again is
/// recognised as a retry.
const IDEMPOTENT_BATCHES_IN_FLIGHT_MAX: usize = 5;
/// Default most requests in flight per partition (Kafka's `max.in.flight.requests.per.connection`).
const IN_FLIGHT_DEFAULT: usize = 5;

/// A record to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerRecord {
    topic: String,
    partition: Option<u32>,
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: Vec<(String, Option<Bytes>)>,
    timestamp_ms: Option<i64>,
}

impl ProducerRecord {
    /// A record for `topic` with this value, no key, no headers, the current time.
    pub fn new(topic: impl Into<String>, value: impl Into<Bytes>) -> Self {
        ProducerRecord {
            topic: topic.into(),
            partition: None,
            key: None,
            value: Some(value.into()),
            headers: Vec::new(),
            timestamp_ms: None,
        }
    }

    /// Sets the key; records with the same key go to the same partition. Default: no key
    /// (spread over partitions).
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sends to this partition instead of choosing by key. Default: chosen by key.
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Adds a header. Default: none.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((key.into(), Some(value.into())));
        self
    }

    /// Sets the timestamp in ms since the epoch. Default: the time of `send`.
    pub fn timestamp_ms(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }

    /// A tombstone: the value is null. Default: the value given to `new`.
    pub fn null_value(mut self) -> Self {
        self.value = None;
        self
    }

    fn size_bytes(&self) -> usize {
        let len = |b: &Option<Bytes>| b.as_ref().map_or(0, Bytes::len);
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| 10 + k.len() + len(v))
            .sum();
        // An upper bound of the record's encoded size (varints at their widest).
        36 + len(&self.key) + len(&self.value) + headers
    }
}

/// Where a record was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMetadata {
    partition: u32,
    offset: Offset,
}

impl RecordMetadata {
    /// The partition the record went to.
    pub fn partition(&self) -> u32 {
        self.partition
    }
    /// The offset it got.
    pub fn offset(&self) -> Offset {
        self.offset
    }
}

/// The outcome of one batch, shared by the deliveries of its records.
#[derive(Debug, Default)]
struct BatchAck {
    /// (partition, base offset) once acknowledged, or the error.
    result: OnceLock<Result<(u32, u64)>>,
    /// Woken when `result` is set.
    done: Notify,
}

impl BatchAck {
    fn complete(&self, result: Result<(u32, u64)>) {
        let _ = self.result.set(result);
        self.done.notify_waiters();
    }
}

/// The pending acknowledgement of one sent record; `.await` it for the record's offset.
#[derive(Debug)]
#[must_use = "a Delivery does nothing unless awaited; drop it to ignore the outcome"]
pub struct Delivery {
    ack: Arc<BatchAck>,
    /// The record's position in its batch.
    index: u32,
}

impl IntoFuture for Delivery {
    type Output = Result<RecordMetadata>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            loop {
                let notified = self.ack.done.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(result) = self.ack.result.get() {
                    return result.clone().map(|(partition, base)| RecordMetadata {
                        partition,
                        offset: Offset(base + u64::from(self.index)),
                    });
                }
                notified.await;
            }
        })
    }
}

/// Settings of a [`Producer`].
#[derive(Debug, Clone)]
pub struct ProducerBuilder {
    client: Client,
    linger: Duration,
    batch_bytes: usize,
    buffer_bytes: usize,
    idempotent: bool,
    in_flight_max: usize,
    retries_max: u32,
    retry_backoff: Duration,
    request_timeout: Duration,
    delivery_timeout: Duration,
}

impl ProducerBuilder {
    pub(crate) fn new(client: Client) -> Self {
        ProducerBuilder {
            client,
            linger: Duration::from_millis(5),
            batch_bytes: 256 << 10,
            buffer_bytes: 64 << 20,
            idempotent: true,
            in_flight_max: IN_FLIGHT_DEFAULT,
            retries_max: 100,
            retry_backoff: Duration::from_millis(100),
            request_timeout: Duration::from_secs(30),
            delivery_timeout: Duration::from_secs(120),
        }
    }

    /// Whether the broker stores each batch exactly once, even when a request is retried; see
    /// the module documentation. Default `true`. With `false`, batches carry no producer id and
    /// failed requests are not retried (a retry could store records twice).
    pub fn idempotent(mut self, idempotent: bool) -> Self {
        self.idempotent = idempotent;
        self
    }

    /// Most requests in flight per partition: a partition's next batches are sent while earlier
    /// requests wait for their answer, and the broker still appends them in order. An idempotent
    /// producer also keeps at most 5 batches of a partition in flight (the broker recognises a
    /// retry among a producer's last 5 batches). Default 5; 1 sends a partition's next request
    /// only once the previous one is answered. Without idempotence nothing is retried, so a
    /// request that fails while later ones succeed leaves a gap in the partition (as in Kafka).
    pub fn in_flight_max(mut self, in_flight_max: usize) -> Self {
        self.in_flight_max = in_flight_max;
        self
    }

    /// Most times a request is sent again after a transient failure (idempotent only).
    /// Default 100.
    pub fn retries_max(mut self, retries_max: u32) -> Self {
        self.retries_max = retries_max;
        self
    }

    /// How long to wait before sending a request again. Default 100 ms.
    pub fn retry_backoff(mut self, retry_backoff: Duration) -> Self {
        self.retry_backoff = retry_backoff;
        self
    }

    /// How long one attempt waits for the broker's answer before it counts as a transient
    /// failure. Default 30 s.
    pub fn request_timeout(mut self, request_timeout: Duration) -> Self {
        self.request_timeout = request_timeout;
        self
    }

    /// How long, from a batch's first attempt, it may take in all (retries included) before
    /// its deliveries fail. Default 120 s.
    pub fn delivery_timeout(mut self, delivery_timeout: Duration) -> Self {
        self.delivery_timeout = delivery_timeout;
        self
    }

    /// How long a batch waits for more records before it is sent. Default 5 ms.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Size at which a batch is closed and sent. Default 256 KiB. Keep it below the broker's
    /// `batch_bytes_max` (1 MiB by default).
    pub fn batch_bytes(mut self, batch_bytes: usize) -> Self {
        self.batch_bytes = batch_bytes;
        self
    }

    /// Most bytes of records buffered and in flight; `send` waits when they are spent.
    /// Default 64 MiB.
    pub fn buffer_bytes(mut self, buffer_bytes: usize) -> Self {
        self.buffer_bytes = buffer_bytes;
        self
    }

    /// Starts the producer's sender task on the current tokio runtime; an idempotent producer
    /// first gets its producer id from the broker.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidArgument`] for a zero or oversized setting; what the broker
    /// answered if it gave no producer id.
    pub async fn build(self) -> Result<Producer> {
        if self.request_timeout.is_zero() || self.delivery_timeout.is_zero() {
            return Err(ClientError::InvalidArgument(
                "request_timeout and delivery_timeout must be above zero".into(),
            ));
        }
        if self.batch_bytes == 0 || self.buffer_bytes == 0 || self.buffer_bytes > BUFFER_BYTES_MAX {
            return Err(ClientError::InvalidArgument(format!(
                "batch_bytes and buffer_bytes must be in 1..={BUFFER_BYTES_MAX}"
            )));
        }
        if self.in_flight_max == 0 {
            return Err(ClientError::InvalidArgument(
                "in_flight_max must be at least 1".into(),
            ));
        }
        if self.batch_bytes > BATCH_BYTES_LIMIT {
            return Err(ClientError::InvalidArgument(format!(
                "batch_bytes must be at most {BATCH_BYTES_LIMIT}"
            )));
        }
        let shared = Arc::new(Shared {
            streams: ProduceStreams::new(self.client.clone()),
            client: self.client,
            linger: self.linger,
            batch_bytes: self.batch_bytes,
            buffer: Arc::new(Semaphore::new(self.buffer_bytes)),
            buffer_bytes: self.buffer_bytes,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            idle: Notify::new(),
            closed: AtomicBool::new(false),
            partition_counts: Mutex::new(FastMap::default()),
            idempotent: self.idempotent,
            in_flight_max: self.in_flight_max,
            retries_max: self.retries_max,
            retry_backoff: self.retry_backoff,
            request_timeout: self.request_timeout,
            delivery_timeout: self.delivery_timeout,
            identity: tokio::sync::Mutex::new(Identities::default()),
            identity_generation: AtomicU64::new(0),
        });
        if shared.idempotent {
            shared.identity().await?;
        }
        tokio::spawn(sender(Arc::clone(&shared)));
        Ok(Producer {
            guard: Arc::new(Guard(Arc::clone(&shared))),
            shared,
        })
    }
}

/// An open batch of one partition.
#[derive(Debug)]
struct OpenBatch {
    builder: BatchBuilder,
    ack: Arc<BatchAck>,
    opened: Instant,
    reserved_bytes: usize,
}

/// A closed batch waiting for or in a request.
#[derive(Debug)]
struct ReadyBatch {
    /// The batch, frozen so that a request carrying it alone sends it without a copy.
    bytes: Bytes,
    ack: Arc<BatchAck>,
    reserved_bytes: usize,
    /// Whether the producer id, epoch and sequence are written into `bytes` (idempotent, once
    /// first sent); a retry sends them unchanged.
    stamped: bool,
}

#[derive(Debug, Default)]
struct PartitionQueue {
    open: Option<OpenBatch>,
    ready: VecDeque<ReadyBatch>,
    /// Requests sent and not settled (answered, or failed for good).
    in_flight: usize,
    /// Requests sent, from the oldest one not settled on: ticket -> its batches and whether it
    /// has settled. A settled request leaves only once every earlier one has, so the window
    /// holds the batches the broker may still have to recognise as retries.
    window: BTreeMap<u64, Sent>,
    /// Batches of the requests in `window`.
    window_batches: usize,
    /// Requests of this partition being retried: while any is, no new request is sent, so that
    /// the retries go out (and are stamped) before anything sent after them.
    recovering: usize,
    /// The ticket the next request gets: tickets number a partition's requests in the order the
    /// sender formed them, which is also the order of their sequences and of their first
    /// submission on the produce stream.
    next_ticket: u64,
    /// The ticket whose turn it is to be stamped and submitted for the first time.
    submit_turn: u64,
    /// Woken when `submit_turn` moves on or a request settles.
    progress: Arc<Notify>,
    /// The sequence the next batch stamped for this partition starts with, under the producer
    /// identity of generation `sequence_generation` (a new identity starts again at 0).
    next_sequence: i32,
    /// Which identity `next_sequence` counts for.
    sequence_generation: u64,
}

/// A request in a partition's window.
#[derive(Debug)]
struct Sent {
    batches: usize,
    settled: bool,
    /// The identity its batches are stamped with, once stamped.
    generation: Option<u64>,
}

impl PartitionQueue {
    /// Whether another request can be sent for this partition now.
    fn can_send(&self, in_flight_max: usize, idempotent: bool) -> bool {
        self.recovering == 0
            && self.in_flight < in_flight_max
            && !(idempotent && self.window_batches >= IDEMPOTENT_BATCHES_IN_FLIGHT_MAX)
    }

    /// Whether request `ticket` may be stamped under identity `generation` now: every earlier
    /// request not settled is stamped under it too (none of them can then be stamped again
    /// under another identity and appended after this one), and the partition has not moved on
    /// to a newer identity.
    fn may_stamp(&self, ticket: u64, generation: u64) -> bool {
        generation >= self.sequence_generation
            && self
                .window
                .range(..ticket)
                .all(|(_, sent)| sent.settled || sent.generation == Some(generation))
    }

    /// Whether `ticket` is the oldest request of the partition not settled.
    fn is_oldest(&self, ticket: u64) -> bool {
        self.window.first_key_value().map(|(t, _)| *t) == Some(ticket)
    }

    /// Records that request `ticket` settled, and moves the window past settled requests.
    fn settle(&mut self, ticket: u64) {
        if let Some(sent) = self.window.get_mut(&ticket) {
            sent.settled = true;
            self.in_flight -= 1;
        }
        while let Some(entry) = self.window.first_entry() {
            if !entry.get().settled {
                break;
            }
            self.window_batches -= entry.remove().batches;
        }
    }
}

/// The identity in use, and the one before it.
#[derive(Debug, Default)]
struct Identities {
    /// `None` when a new identity must be made before the next batch is stamped.
    current: Option<Identity>,
    /// The last identity dropped: the next one is its producer id with the next epoch.
    dropped: Option<Identity>,
}

/// An idempotent producer's identity: a producer id from the broker, and an epoch (the broker's
/// for a new id, then the producer's own bumps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    producer_id: i64,
    epoch: i16,
    /// Counts identities this producer had, so partitions notice a new one.
    generation: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Batches per (topic, partition).
    queues: FastMap<(Arc<str>, u32), PartitionQueue>,
    /// Batches open, ready or in flight; `flush` waits for 0.
    outstanding: usize,
    /// Set by the sender, under this lock, when it stops: sends must fail from then on.
    stopped: bool,
    /// `flush` calls in progress: while > 0, open batches are closed at once.
    flushing: usize,
    /// Per topic, the partition keyless records go to until its batch is closed (Kafka's
    /// sticky partitioner: fuller batches than round-robin per record).
    sticky: FastMap<Arc<str>, u32>,
    /// Every topic name this producer has sent to, shared by its queues' keys: found by hash on
    /// each `send` (a scan of `queues` cost a comparison per partition per record).
    topics: FastSet<Arc<str>>,
}

#[derive(Debug)]
struct Shared {
    client: Client,
    linger: Duration,
    batch_bytes: usize,
    /// Bytes of records buffered or in flight.
    buffer: Arc<Semaphore>,
    buffer_bytes: usize,
    state: Mutex<State>,
    /// Wakes the sender: a batch closed, a request finished, flush or close.
    wake: Notify,
    /// Woken when `outstanding` drops to 0.
    idle: Notify,
    /// Set when the last handle is dropped or `close` is called.
    closed: AtomicBool,
    /// Partition count per topic, learnt on first use.
    partition_counts: Mutex<FastMap<String, u32>>,
    /// Whether batches are stamped and retried (see the module documentation).
    idempotent: bool,
    /// Most requests in flight per partition.
    in_flight_max: usize,
    /// The stream requests go out on.
    streams: ProduceStreams,
    /// Most retries of one request.
    retries_max: u32,
    /// Pause before a retry.
    retry_backoff: Duration,
    /// Longest wait for one answer.
    request_timeout: Duration,
    /// Longest time for a batch, from its first attempt.
    delivery_timeout: Duration,
    /// The current identity, and the last one dropped. An async mutex so that one task asks
    /// the broker while the others wait for its answer.
    identity: tokio::sync::Mutex<Identities>,
    /// The generation of the last identity handed out.
    identity_generation: AtomicU64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The producer's identity. After one was dropped, the next is the same producer id with the
    /// next epoch, as Kafka's idempotent producer bumps its epoch (KIP-360): a partition that has
    /// taken a batch of the new epoch refuses ("fences") any batch of an older one, so a copy of
    /// an old request still on its way to the broker cannot be appended after the batches
    /// stamped afresh. The broker is asked for a producer id on the first call, and when the
    /// epoch is spent.
    async fn identity(&self) -> Result<Identity> {
        let mut identities = self.identity.lock().await;
        if let Some(identity) = identities.current {
            return Ok(identity);
        }
        if let Some(dropped) = identities.dropped.filter(|d| d.epoch < i16::MAX) {
            let identity = Identity {
                producer_id: dropped.producer_id,
                epoch: dropped.epoch + 1,
                generation: self.identity_generation.fetch_add(1, Ordering::AcqRel) + 1,
            };
            identities.current = Some(identity);
            return Ok(identity);
        }
        let mut rpc = self.client.rpc();
        let request = rpc.init_producer_id(pb::InitProducerIdRequest {});
        let response = tokio::time::timeout(self.request_timeout, request)
            .await
            .map_err(|_| ClientError::Timeout {
                operation: "InitProducerId",
                after: self.request_timeout,
            })??
            .into_inner();
        let epoch = i16::try_from(response.producer_epoch).map_err(|_| ClientError::Broker {
            code: tonic::Code::Internal,
            message: format!(
                "the broker gave producer epoch {}, outside 0..=32767",
                response.producer_epoch
            ),
        })?;
        let identity = Identity {
            producer_id: response.producer_id,
            epoch,
            generation: self.identity_generation.fetch_add(1, Ordering::AcqRel) + 1,
        };
        identities.current = Some(identity);
        Ok(identity)
    }

    /// Drops identity `generation` (if still current) so the next batch stamped gets a new one.
    async fn forget_identity(&self, generation: u64) {
        let mut identities = self.identity.lock().await;
        if let Some(current) = identities.current.filter(|i| i.generation == generation) {
            identities.current = None;
            identities.dropped = Some(current);
        }
    }

    /// Stamps `batches` (request `ticket`'s, of one partition, unstamped) with the identity and
    /// the partition's next sequences; returns the identity's generation, and whether earlier
    /// requests of the partition were unsettled then.
    ///
    /// Under an identity new to the partition, sequences start again at 0. A request is stamped
    /// only when every earlier unsettled request of its partition is stamped under the same
    /// identity (see `PartitionQueue::may_stamp`), else it waits: an earlier one could otherwise
    /// be stamped afresh later and appended after it.
    async fn stamp(
        &self,
        key: &(Arc<str>, u32),
        ticket: u64,
        progress: &Notify,
        batches: &mut [ReadyBatch],
    ) -> Result<(u64, bool)> {
        loop {
            let identity = self.identity().await?;
            let stamped = {
                let mut state = self.lock();
                let queue = state
                    .queues
                    .get_mut(key)
                    .expect("a partition with a request in flight has a queue");
                // Checked and stamped under one lock: the oldest request may be stamped afresh
                // concurrently with the request whose turn it is.
                queue.may_stamp(ticket, identity.generation).then(|| {
                    stamp_locked(queue, ticket, identity, batches);
                    !queue.is_oldest(ticket)
                })
            };
            if let Some(behind) = stamped {
                // A later request may be waiting for this one to be stamped (`may_stamp`).
                progress.notify_waiters();
                return Ok((identity.generation, behind));
            }
            let generation = identity.generation;
            self.wait_queue(key, progress, |q| {
                q.may_stamp(ticket, generation) || q.is_oldest(ticket)
            })
            .await;
        }
    }
}

/// Stamps `batches` of request `ticket` with `identity` and `queue`'s next sequences.
fn stamp_locked(
    queue: &mut PartitionQueue,
    ticket: u64,
    identity: Identity,
    batches: &mut [ReadyBatch],
) {
    if queue.sequence_generation != identity.generation {
        queue.sequence_generation = identity.generation;
        queue.next_sequence = 0;
    }
    for batch in batches.iter_mut() {
        assert!(!batch.stamped);
        let records = octolog_batch::BatchHeader::parse(&batch.bytes)
            .expect("the producer built this batch")
            .record_count;
        // Unique (never sent, or its request dropped) in practice, so this does not copy.
        let mut bytes = std::mem::take(&mut batch.bytes)
            .try_into_mut()
            .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
        octolog_batch::set_producer(
            &mut bytes,
            identity.producer_id,
            identity.epoch,
            queue.next_sequence,
        );
        batch.bytes = bytes.freeze();
        batch.stamped = true;
        queue.next_sequence = sequence_after(queue.next_sequence, records as u32);
    }
    if let Some(sent) = queue.window.get_mut(&ticket) {
        sent.generation = Some(identity.generation);
    }
}

/// The sequence `records` after `sequence`: after `i32::MAX` comes 0, as the broker counts.
fn sequence_after(sequence: i32, records: u32) -> i32 {
    ((sequence as u64 + u64::from(records)) % (i32::MAX as u64 + 1)) as i32
}

/// Whether a failed attempt is worth sending again unchanged.
fn is_transient(error: &ClientError) -> bool {
    use tonic::Code;
    match error {
        ClientError::Timeout { .. } | ClientError::Connect { .. } => true,
        ClientError::Broker { code, .. } => matches!(
            code,
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
        ),
        _ => false,
    }
}

/// Whether the broker refused a batch as out of order (a sequence gap).
fn is_out_of_order(error: &ClientError) -> bool {
    matches!(error, ClientError::Partition { code, .. } if *code == pb::ErrorCode::OutOfOrderSequence as i32)
}

/// Whether the broker refused a batch of an older epoch than the partition knows (or one that
/// came on an older stream than the producer's newest, an answer this producer never reads: it
/// has given that stream up by then).
fn is_fenced(error: &ClientError) -> bool {
    matches!(error, ClientError::Partition { code, .. } if *code == pb::ErrorCode::ProducerFenced as i32)
}

/// Whether the broker refused a batch because it has no state for the producer.
fn is_unknown_producer(error: &ClientError) -> bool {
    matches!(error, ClientError::Partition { code, .. } if *code == pb::ErrorCode::UnknownProducerId as i32)
}

/// Stops the sender when the last `Producer` clone is dropped.
#[derive(Debug)]
struct Guard(Arc<Shared>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.wake.notify_one();
    }
}

/// A batching, pipelining producer. See the module documentation.
#[derive(Debug, Clone)]
pub struct Producer {
    shared: Arc<Shared>,
    guard: Arc<Guard>,
}

impl Producer {
    /// Queues a record, waiting while the buffer is full, and returns its pending delivery.
    ///
    /// # Errors
    ///
    /// Unknown topic or partition, a record larger than `buffer_bytes`, or [`ClientError::Closed`].
    pub async fn send(&self, record: ProducerRecord) -> Result<Delivery> {
        let shared = &self.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(ClientError::Closed);
        }
        let count = self.partition_count(&record.topic).await?;
        if let Some(p) = record.partition {
            if p >= count {
                return Err(ClientError::InvalidArgument(format!(
                    "topic {:?} has partitions 0..{count}, not {p}",
                    record.topic
                )));
            }
        }
        let size = record.size_bytes();
        if size > shared.buffer_bytes.min(BATCH_BYTES_LIMIT) {
            return Err(ClientError::InvalidArgument(format!(
                "record of {size} bytes exceeds buffer_bytes ({}) or the largest batch ({BATCH_BYTES_LIMIT})",
                shared.buffer_bytes
            )));
        }
        let permit = Arc::clone(&shared.buffer)
            .acquire_many_owned(size as u32)
            .await
            .map_err(|_| ClientError::Closed)?;
        permit.forget();
        let timestamp = record.timestamp_ms.unwrap_or_else(now_ms);
        let mut guard = shared.lock();
        let state = &mut *guard;
        if state.stopped {
            // Closed while this send waited: nothing would ever send the record.
            drop(guard);
            shared.buffer.add_permits(size);
            return Err(ClientError::Closed);
        }
        let topic: Arc<str> = match state.topics.get(record.topic.as_str()) {
            Some(t) => Arc::clone(t),
            None => {
                let t: Arc<str> = Arc::from(record.topic.as_str());
                state.topics.insert(Arc::clone(&t));
                t
            }
        };
        let partition = match (record.partition, &record.key) {
            (Some(p), _) => p,
            (None, Some(key)) => partition_for_key(key, count),
            (None, None) => {
                // Stay on the sticky partition while its batch is open; once that batch is
                // closed (full, lingered or flushed), move on to the next partition.
                let sticky = state
                    .sticky
                    .entry(Arc::clone(&topic))
                    .or_insert_with(|| (now_ms() as u32) % count);
                let open = state
                    .queues
                    .get(&(Arc::clone(&topic), *sticky))
                    .is_some_and(|q| q.open.is_some());
                if !open {
                    *sticky = (*sticky + 1) % count;
                }
                *sticky
            }
        };
        let batch_bytes = shared.batch_bytes;
        let queue = state
            .queues
            .entry((Arc::clone(&topic), partition))
            .or_default();
        let opened = queue.open.is_none();
        if opened {
            queue.open = Some(OpenBatch {
                builder: BatchBuilder::with_capacity(batch_bytes.min(1 << 20)),
                ack: Arc::new(BatchAck::default()),
                opened: Instant::now(),
                reserved_bytes: 0,
            });
            state.outstanding += 1;
        }
        let open = queue.open.as_mut().expect("just ensured");
        let headers: Vec<(&str, Option<&[u8]>)> = record
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        open.builder.push(
            timestamp,
            record.key.as_deref(),
            record.value.as_deref(),
            &headers,
        );
        open.reserved_bytes += size;
        let delivery = Delivery {
            ack: Arc::clone(&open.ack),
            index: (open.builder.record_count() - 1) as u32,
        };
        let full = open.builder.size_bytes() >= batch_bytes;
        if full {
            close_open_batch(queue);
        }
        drop(guard);
        // A full batch is ready to go; a new one has a linger deadline the sender must learn.
        if full || opened {
            shared.wake.notify_one();
        }
        Ok(delivery)
    }

    /// Sends every buffered record now and waits until all sent records are acknowledged (or
    /// failed; their deliveries say which).
    pub async fn flush(&self) {
        let shared = &self.shared;
        shared.lock().flushing += 1;
        shared.wake.notify_one();
        loop {
            let idle = shared.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if shared.lock().outstanding == 0 {
                break;
            }
            idle.await;
        }
        shared.lock().flushing -= 1;
    }

    /// Flushes, then stops the sender; later sends fail with [`ClientError::Closed`].
    pub async fn close(&self) {
        self.flush().await;
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        let _ = &self.guard;
    }

    async fn partition_count(&self, topic: &str) -> Result<u32> {
        if let Some(&n) = self
            .shared
            .partition_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
        {
            return Ok(n);
        }
        let info = self.shared.client.admin().describe_topic(topic).await?;
        let n = info.partitions().len() as u32;
        if n == 0 {
            return Err(ClientError::InvalidArgument(format!(
                "topic {topic:?} has no partitions"
            )));
        }
        self.shared
            .partition_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic.to_string(), n);
        Ok(n)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Moves the open batch of `queue` to its ready list.
fn close_open_batch(queue: &mut PartitionQueue) {
    if let Some(mut open) = queue.open.take() {
        queue.ready.push_back(ReadyBatch {
            bytes: open.builder.finish().freeze(),
            ack: open.ack,
            reserved_bytes: open.reserved_bytes,
            stamped: false,
        });
    }
}

/// One produce request's worth of batches of one partition.
struct Dispatch {
    topic: Arc<str>,
    partition: u32,
    /// The request's place among its partition's requests (see `PartitionQueue::next_ticket`).
    ticket: u64,
    /// The partition queue's `progress`.
    progress: Arc<Notify>,
    batches: Vec<ReadyBatch>,
}

/// The sender task: closes lingering batches and sends ready ones, up to `in_flight_max`
/// requests in flight per partition. Ends when the producer is closed and nothing is
/// outstanding.
async fn sender(shared: Arc<Shared>) {
    loop {
        let wake = shared.wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let mut dispatches = Vec::new();
        let mut next_deadline: Option<Instant> = None;
        let finished = {
            let mut state = shared.lock();
            let closing = shared.closed.load(Ordering::Acquire);
            let close_all = state.flushing > 0 || closing;
            let now = Instant::now();
            for ((topic, partition), queue) in state.queues.iter_mut() {
                let can_send = queue.can_send(shared.in_flight_max, shared.idempotent);
                if let Some(open) = &queue.open {
                    // A batch that has lingered long enough stays open, taking more records,
                    // while its partition cannot send another request: it could not leave
                    // before an answer anyway (which wakes this task), and closing it would
                    // only split the waiting records into many small batches (as Kafka's
                    // accumulator, which drains a lingered batch when it can be sent).
                    let deadline = open.opened + shared.linger;
                    if close_all || (deadline <= now && can_send) {
                        close_open_batch(queue);
                    } else if can_send {
                        next_deadline =
                            Some(next_deadline.map_or(deadline, |d: Instant| d.min(deadline)));
                    }
                }
                while !queue.ready.is_empty()
                    && queue.can_send(shared.in_flight_max, shared.idempotent)
                {
                    let batches_max = if shared.idempotent {
                        IDEMPOTENT_BATCHES_IN_FLIGHT_MAX - queue.window_batches
                    } else {
                        usize::MAX
                    };
                    let mut batches = Vec::new();
                    let mut bytes = 0;
                    while let Some(batch) = queue.ready.front() {
                        if !batches.is_empty() && bytes + batch.bytes.len() > REQUEST_BYTES_MAX {
                            break;
                        }
                        if batches.len() == batches_max {
                            break;
                        }
                        bytes += batch.bytes.len();
                        batches.push(queue.ready.pop_front().expect("front exists"));
                    }
                    let ticket = queue.next_ticket;
                    queue.next_ticket += 1;
                    queue.window.insert(
                        ticket,
                        Sent {
                            batches: batches.len(),
                            settled: false,
                            generation: None,
                        },
                    );
                    queue.in_flight += 1;
                    queue.window_batches += batches.len();
                    dispatches.push(Dispatch {
                        topic: Arc::clone(topic),
                        partition: *partition,
                        ticket,
                        progress: Arc::clone(&queue.progress),
                        batches,
                    });
                }
            }
            // Decided under the lock that `send` checks, so no record is queued after this.
            state.stopped = closing && state.outstanding == 0;
            state.stopped
        };
        for dispatch in dispatches {
            tokio::spawn(send_request(Arc::clone(&shared), dispatch));
        }
        if finished {
            return;
        }
        match next_deadline {
            Some(deadline) => {
                tokio::select! {
                    _ = &mut wake => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                }
            }
            None => wake.await,
        }
    }
}

impl Shared {
    /// Waits until `ready` holds for the queue of `key` (checked again whenever `progress`, the
    /// queue's, is woken).
    async fn wait_queue(
        &self,
        key: &(Arc<str>, u32),
        progress: &Notify,
        ready: impl Fn(&PartitionQueue) -> bool,
    ) {
        loop {
            let notified = progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().queues.get(key).is_some_and(&ready) {
                return;
            }
            notified.await;
        }
    }

    /// Changes the queue of `key` and wakes whoever waits on its progress.
    fn update_queue(
        &self,
        key: &(Arc<str>, u32),
        progress: &Notify,
        f: impl FnOnce(&mut PartitionQueue),
    ) {
        if let Some(queue) = self.lock().queues.get_mut(key) {
            f(queue);
        }
        progress.notify_waiters();
    }

    /// The generation of the current identity, if there is one.
    async fn identity_generation(&self) -> Option<u64> {
        self.identity.lock().await.current.map(|i| i.generation)
    }
}

/// Sends one partition's batches and completes their deliveries: stamps them (idempotent) and
/// retries failures that allow it with the same bytes (see the module documentation).
///
/// Order: a request is stamped and first submitted in its ticket's turn, so sequences and the
/// stream's order follow the order the batches were formed in. A request sent again first waits
/// until every earlier request of its partition has settled, and meanwhile the partition sends
/// nothing new. An idempotent request that was sent behind unsettled ones and is refused as out
/// of order, for an unknown producer or as fenced (an earlier one failed, is being retried, was
/// lost, or was stamped afresh) is sent again once they have settled, stamped afresh if an
/// earlier failure cost the producer its identity.
async fn send_request(shared: Arc<Shared>, dispatch: Dispatch) {
    let Dispatch {
        topic,
        partition,
        ticket,
        progress,
        mut batches,
    } = dispatch;
    let key = (Arc::clone(&topic), partition);
    let deadline = Instant::now() + shared.delivery_timeout;
    let mut retries = 0u32;
    // The identity the batches were stamped with, and the request body built from them.
    let mut generation = None;
    let mut payload: Option<Bytes> = None;
    shared
        .wait_queue(&key, &progress, |q| q.submit_turn == ticket)
        .await;
    let mut holds_turn = true;
    // Whether earlier requests of the partition were unsettled when this one was first sent.
    let mut behind_others = false;
    // Whether any attempt reached the stream (else the broker cannot have the batches).
    let mut ever_submitted = false;
    // Whether the batches were stamped while earlier requests of the partition were unsettled.
    let mut stamped_behind = false;
    let mut recovering = false;
    let outcome: Result<u64> = loop {
        let mut wait = shared.request_timeout;
        let submitted = async {
            // Waiting for the turn, for earlier requests and for stamping takes time: never
            // stamp or send past the deadline (the records could be stored while their
            // deliveries report a failure, or sequences be spent for nothing).
            let past_deadline = || ClientError::Timeout {
                operation: "delivery",
                after: shared.delivery_timeout,
            };
            if Instant::now() >= deadline {
                return Err(past_deadline());
            }
            if shared.idempotent && !batches[0].stamped {
                // Dropped first, so that stamping finds the batches' bytes unshared.
                payload = None;
                let (stamped_under, behind) =
                    shared.stamp(&key, ticket, &progress, &mut batches).await?;
                generation = Some(stamped_under);
                stamped_behind |= behind;
            }
            wait = wait.min(deadline.saturating_duration_since(Instant::now()));
            if wait.is_zero() {
                return Err(past_deadline());
            }
            let body = payload
                .get_or_insert_with(|| match batches.as_slice() {
                    // The common case under load and at low latency: no copy of the batch.
                    [only] => only.bytes.clone(),
                    _ => {
                        let mut body =
                            BytesMut::with_capacity(batches.iter().map(|b| b.bytes.len()).sum());
                        for batch in &batches {
                            body.extend_from_slice(&batch.bytes);
                        }
                        body.freeze()
                    }
                })
                .clone();
            let stream = shared.streams.stream(wait).await?;
            // Whether earlier requests are unsettled as this one goes out.
            let behind = shared
                .lock()
                .queues
                .get(&key)
                .is_some_and(|q| !q.is_oldest(ticket));
            let answer = stream.submit(
                topic.to_string(),
                vec![pb::PartitionBatches {
                    partition,
                    batches: body,
                }],
            )?;
            Ok((answer, behind))
        }
        .await;
        let submitted = submitted.map(|(answer, behind)| {
            if holds_turn {
                holds_turn = false;
                behind_others = behind || stamped_behind;
                shared.update_queue(&key, &progress, |q| q.submit_turn += 1);
            }
            ever_submitted = true;
            answer
        });
        let answered = match submitted {
            Ok(answer) => tokio::time::timeout(wait, answer.wait())
                .await
                .unwrap_or(Err(ClientError::Timeout {
                    operation: "ProduceBatches",
                    after: wait,
                })),
            Err(error) => Err(error),
        };
        let result = answered.and_then(|partitions| match partitions.into_iter().next() {
            Some(p) => {
                crate::check_partition_error(&topic, partition, p.error_code, &p.error_message)
                    .map(|()| p.base_offset)
            }
            None => Err(ClientError::Broker {
                code: tonic::Code::Internal,
                message: "the broker answered a produce request with no partition".into(),
            }),
        });
        let error = match result {
            Ok(base) => break Ok(base),
            Err(error) => error,
        };
        let in_time = Instant::now() + shared.retry_backoff < deadline;
        let retry = shared.idempotent && retries < shared.retries_max && in_time;
        // Refused behind requests that had not settled, as out of order or for an unknown
        // producer (an earlier one failed, or was lost before it created the producer's state),
        // or as fenced (an earlier one was stamped afresh under the next epoch and stored, so
        // this one, after it in sequence, was not): possibly not this request's doing, so it is
        // sent again once they have settled, and it does not count as a retry. Only once: then
        // it is no longer behind anything.
        let behind = shared.idempotent
            && behind_others
            && (is_out_of_order(&error) || is_unknown_producer(&error) || is_fenced(&error))
            && Instant::now() < deadline;
        let unknown_producer = !behind && retry && is_unknown_producer(&error);
        if !(behind || unknown_producer || (retry && is_transient(&error))) {
            break Err(error);
        }
        if !recovering {
            recovering = true;
            shared.update_queue(&key, &progress, |q| q.recovering += 1);
        }
        if !behind {
            retries += 1;
            // Before the wait below, so that requests failed together back off together.
            tokio::time::sleep(shared.retry_backoff).await;
        }
        shared
            .wait_queue(&key, &progress, |q| q.is_oldest(ticket))
            .await;
        if Instant::now() >= deadline {
            break Err(error);
        }
        let stale = match generation {
            Some(g) => shared.identity_generation().await != Some(g),
            None => false,
        };
        if unknown_producer {
            // The broker lost this producer's state: start again under a new identity.
            if let Some(generation) = generation.take() {
                shared.forget_identity(generation).await;
            }
        }
        // Stamped afresh only when the batches cannot have been stored (refused, or never sent):
        // a transient failure is retried with the same bytes, which the broker recognises if
        // it had them.
        if unknown_producer || (stale && (behind || !ever_submitted)) {
            // Under a new identity the batches get new sequences, stamped now that every
            // earlier request has settled; later ones wait for that (`may_stamp`), so in order.
            for batch in &mut batches {
                batch.stamped = false;
            }
            shared.update_queue(&key, &progress, |q| {
                if let Some(sent) = q.window.get_mut(&ticket) {
                    sent.generation = None;
                }
            });
        }
        if behind {
            behind_others = false;
        }
    };
    if holds_turn {
        shared.update_queue(&key, &progress, |q| q.submit_turn += 1);
    }
    if outcome.is_err() {
        // The partition's sequence now has a hole (or the batches were stored after all): the
        // next batches go out under a new identity. Forgotten before this request settles, so
        // later requests waiting for it see the identity is stale.
        if let Some(generation) = generation {
            shared.forget_identity(generation).await;
        }
    }
    let mut base = outcome.as_ref().map(|&b| b).unwrap_or(0);
    let mut released = 0usize;
    for batch in &batches {
        let records =
            octolog_batch::BatchHeader::parse(&batch.bytes).map_or(0, |h| h.record_count as u64);
        batch
            .ack
            .complete(outcome.clone().map(|_| (partition, base)));
        base += records;
        released += batch.reserved_bytes;
    }
    shared.buffer.add_permits(released);
    let idle = {
        let mut state = shared.lock();
        if let Some(queue) = state.queues.get_mut(&key) {
            queue.settle(ticket);
            if recovering {
                queue.recovering -= 1;
            }
        }
        state.outstanding -= batches.len();
        state.outstanding == 0
    };
    progress.notify_waiters();
    if idle {
        shared.idle.notify_waiters();
    }
    shared.wake.notify_one();
}
