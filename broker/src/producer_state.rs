//! Idempotent produce: each partition's state of the producers that write to it, the rules that
//! make a batch appended once, and how that state survives restarts.
//!
//! Per producer id the partition keeps the epoch and the metadata of the producer's last
//! [`PRODUCER_BATCHES_CACHED`] batches (first and last sequence, first and last offset), as
//! Apache Kafka does. The rules, for a batch with `producer_id` >= 0 (-1 means not idempotent,
//! unchecked):
//!
//! - unknown producer: base sequence 0 starts it; anything else is `UnknownProducerId`;
//! - epoch below the known one: `ProducerFenced`;
//! - epoch above the known one: base sequence must be 0 (else `OutOfOrderSequence`); the new
//!   epoch replaces the old state;
//! - same epoch: sequences equal to a cached batch's are a duplicate (append nothing, answer the
//!   original offsets); base sequence = last sequence + 1 (after `i32::MAX` comes 0) appends;
//!   anything else is `OutOfOrderSequence`.
//!
//! An entry of several batches is checked in order, each batch against the state the batches
//! before it leave. It must be all new (appended) or all duplicates of batches stored one after
//! the other (answered with their original offsets); a mix is `OutOfOrderSequence`, nothing
//! appended. [`ProducerStates::plan`] decides, [`ProducerStates::record`] applies an append.
//!
//! Persistence: `producer-state.snapshot` in the partition's folder holds the state as of a log
//! end offset, written atomically (temp file, fsync, rename, fsync of the folder) and only when
//! every record below that offset is flushed: on clean close, and by maintenance after about a
//! segment's worth of appends. On open the partition loads the snapshot if it is intact and not
//! past the log end offset, then walks the batch headers (no record decoding) from
//! max(snapshot offset, log start offset) to the end. So a clean restart walks nothing and an
//! unclean one walks about one segment; a missing, damaged or stale snapshot means a walk from
//! the log start offset. Producers whose batches were all deleted by retention are kept by the
//! snapshot but not found by a walk; such a producer then gets `UnknownProducerId` and starts
//! over at sequence 0 (Octolog's producer under its next epoch). The state keeps at most [`PRODUCERS_PER_PARTITION_MAX`] producers,
//! evicting the one that wrote least recently.
//!
//! Snapshot layout, big-endian: magic `b"OPST"`, version u32 = 1, `log_end_offset` u64,
//! producer count u32, then per producer (sorted by id): `producer_id` i64, `producer_epoch`
//! i16, batch count u8 (1..=5), and per batch, oldest first: `first_sequence` i32,
//! `last_sequence` i32, `first_offset` u64, `last_offset` u64; last, a CRC-32 (crc32fast) of
//! everything before it.
//!
//! Thread-safety: plain data; the partition keeps it behind a mutex held across check and append.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use octolog_batch::{BatchHeader, Offset, NO_PRODUCER_ID};
use octolog_storage::{Log, StorageError};

/// Batches remembered per producer for duplicate detection, as in Kafka: a client keeps at most
/// this many batches of a partition unacknowledged.
pub const PRODUCER_BATCHES_CACHED: usize = 5;
/// Most producers remembered per partition; the least recently written one is evicted beyond.
pub const PRODUCERS_PER_PARTITION_MAX: usize = 10_000;
/// The snapshot's file name in the partition's folder.
pub const SNAPSHOT_FILE: &str = "producer-state.snapshot";
/// Bytes of log read at a time when walking batch headers on open.
const WALK_READ_BYTES: usize = 1 << 20;

const SNAPSHOT_MAGIC: &[u8; 4] = b"OPST";
const SNAPSHOT_VERSION: u32 = 1;
const SNAPSHOT_HEADER_BYTES: usize = 4 + 4 + 8 + 4;
const SNAPSHOT_BATCH_BYTES: usize = 4 + 4 + 8 + 8;
const SNAPSHOT_PRODUCER_BYTES: usize = 8 + 2 + 1;
const _: () = assert!(PRODUCER_BATCHES_CACHED <= u8::MAX as usize);

/// Where one of a producer's batches went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMetadata {
    /// Sequence of the batch's first record.
    pub first_sequence: i32,
    /// Sequence of its last record.
    pub last_sequence: i32,
    /// Offset its first record got.
    pub first_offset: Offset,
    /// Offset its last record got.
    pub last_offset: Offset,
}

/// What a partition knows of one producer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProducerEntry {
    /// The newest epoch seen; older ones are fenced.
    epoch: i16,
    /// The last batches appended under `epoch`, oldest first; never empty.
    batches: VecDeque<BatchMetadata>,
}

/// The idempotence fields of a batch with a producer id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchIdentity {
    /// The producer.
    pub producer_id: i64,
    /// Its epoch.
    pub epoch: i16,
    /// Sequence of the first record.
    pub first_sequence: i32,
    /// Sequence of the last record (wrapping after `i32::MAX` to 0).
    pub last_sequence: i32,
    /// Records in the batch.
    pub record_count: u64,
}

/// Why a batch breaks the rules; the partition adds topic and partition to make a `BrokerError`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A gap, a reordering, or a mixed entry.
    OutOfOrder {
        /// The producer.
        producer_id: i64,
        /// The batch's base sequence.
        base_sequence: i32,
        /// What was expected.
        reason: String,
    },
    /// An older epoch than the partition knows.
    Fenced {
        /// The producer.
        producer_id: i64,
        /// The batch's epoch.
        epoch: i16,
        /// The epoch known.
        current_epoch: i16,
    },
    /// No state for the producer and a base sequence other than 0.
    UnknownProducer {
        /// The producer.
        producer_id: i64,
        /// The batch's base sequence.
        base_sequence: i32,
    },
    /// Idempotence fields that make no sense (negative epoch or sequence).
    Invalid(String),
}

/// What to do with an entry that passed the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Append every batch, then `record` them.
    Append,
    /// Every batch is a retry: append nothing, answer with these original offsets.
    Duplicate {
        /// The first batch's first offset.
        first_offset: Offset,
        /// The last batch's last offset.
        last_offset: Offset,
    },
}

/// The sequence `delta` records after `base`, wrapping after `i32::MAX` to 0 as Kafka does.
pub fn sequence_after(base: i32, delta: u64) -> i32 {
    assert!(0 <= base);
    let wrapped = (base as u64 + delta) % (i32::MAX as u64 + 1);
    wrapped as i32
}

/// The idempotence fields of `header`; `Ok(None)` for a batch without producer id.
///
/// # Errors
///
/// `Violation::Invalid` for a producer id below -1, or a producer id with a negative epoch or
/// base sequence.
pub fn identity(header: &BatchHeader) -> Result<Option<BatchIdentity>, Violation> {
    if header.producer_id == NO_PRODUCER_ID {
        return Ok(None);
    }
    if header.producer_id < 0 || header.producer_epoch < 0 || header.base_sequence < 0 {
        return Err(Violation::Invalid(format!(
            "a batch with producer id {}, epoch {} and base sequence {}: the id must be -1 (not \
             idempotent) or at least 0 with an epoch and base sequence of at least 0",
            header.producer_id, header.producer_epoch, header.base_sequence
        )));
    }
    let delta = u64::try_from(header.last_offset_delta).unwrap_or(0);
    Ok(Some(BatchIdentity {
        producer_id: header.producer_id,
        epoch: header.producer_epoch,
        first_sequence: header.base_sequence,
        last_sequence: sequence_after(header.base_sequence, delta),
        record_count: delta + 1,
    }))
}

/// Checks one batch against what is known of its producer.
fn check(
    entry: Option<&ProducerEntry>,
    id: &BatchIdentity,
) -> Result<Option<BatchMetadata>, Violation> {
    let out_of_order = |reason: String| Violation::OutOfOrder {
        producer_id: id.producer_id,
        base_sequence: id.first_sequence,
        reason,
    };
    let Some(entry) = entry else {
        if id.first_sequence == 0 {
            return Ok(None);
        }
        return Err(Violation::UnknownProducer {
            producer_id: id.producer_id,
            base_sequence: id.first_sequence,
        });
    };
    if id.epoch < entry.epoch {
        return Err(Violation::Fenced {
            producer_id: id.producer_id,
            epoch: id.epoch,
            current_epoch: entry.epoch,
        });
    }
    if entry.epoch < id.epoch {
        if id.first_sequence == 0 {
            return Ok(None);
        }
        return Err(out_of_order(format!(
            "a new epoch {} must start at sequence 0",
            id.epoch
        )));
    }
    if let Some(batch) = entry
        .batches
        .iter()
        .find(|b| b.first_sequence == id.first_sequence && b.last_sequence == id.last_sequence)
    {
        return Ok(Some(*batch));
    }
    let last = entry.batches.back().expect("an entry has a batch");
    let expected = sequence_after(last.last_sequence, 1);
    if id.first_sequence == expected {
        return Ok(None);
    }
    Err(out_of_order(format!(
        "the partition expected {expected} (the batch is neither the next one nor a retry of the \
         last {PRODUCER_BATCHES_CACHED})"
    )))
}

/// `entry` after appending the batch `id` at `[first_offset, last_offset]`.
fn advance(entry: Option<ProducerEntry>, id: &BatchIdentity, meta: BatchMetadata) -> ProducerEntry {
    match entry {
        Some(mut entry) if entry.epoch == id.epoch => {
            entry.batches.push_back(meta);
            if entry.batches.len() > PRODUCER_BATCHES_CACHED {
                entry.batches.pop_front();
            }
            entry
        }
        _ => ProducerEntry {
            epoch: id.epoch,
            batches: VecDeque::from([meta]),
        },
    }
}

/// Identifies one `ProduceStream` of a broker process; later streams have larger ids.
pub type StreamId = u64;

/// The broker's `ProduceStream`s: hands out their ids and knows which are still open.
#[derive(Debug, Default)]
pub struct ProduceStreams {
    state: Mutex<ProduceStreamsState>,
}

#[derive(Debug, Default)]
struct ProduceStreamsState {
    /// The id of the last stream opened.
    last: StreamId,
    /// Ids of the streams still open.
    open: BTreeSet<StreamId>,
}

impl ProduceStreams {
    /// Opens a stream, with an id larger than every earlier one's; it is open until dropped.
    pub fn open(self: &Arc<Self>) -> OpenStream {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.last += 1;
        let id = state.last;
        state.open.insert(id);
        OpenStream {
            id,
            streams: Arc::clone(self),
        }
    }

    /// The oldest stream still open, if any.
    fn oldest_open(&self) -> Option<StreamId> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.open.first().copied()
    }
}

/// A `ProduceStream` being read; see [`ProduceStreams::open`].
#[derive(Debug)]
pub struct OpenStream {
    id: StreamId,
    streams: Arc<ProduceStreams>,
}

impl OpenStream {
    /// The stream's id.
    pub fn id(&self) -> StreamId {
        self.id
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let mut state = self.streams.state.lock().unwrap_or_else(|e| e.into_inner());
        state.open.remove(&self.id);
    }
}

/// Per producer id, the newest `ProduceStream` that has sent the producer's batches to one
/// partition. In memory only: stream ids start again with the process, and so do streams.
///
/// A client sends a producer's requests over one stream at a time. When that stream ends (a
/// broken connection, an error) it sends the unanswered requests again on a new one, and after
/// some refusals (out of order, unknown producer, a failed request) it stamps them afresh under
/// the next epoch. The broker may still read the ended stream's copies late: a connection the
/// client has given up can still hold requests the broker has not read. Appended after the
/// refusal that made the client stamp afresh, such a copy would be stored twice, once under
/// each epoch. So once a newer stream has reached the partition for a producer (appended or
/// refused), batches of that producer from older streams are refused, under the same mutex as
/// the sequence checks. A copy that arrives before the newer stream is either the first one
/// (then its retry is a duplicate) or refused by sequence like the others.
///
/// An entry matters only while a stream older than its own is still open. At
/// [`PRODUCERS_PER_PARTITION_MAX`] entries, those are dropped first; if every entry still
/// matters (that many producers, each behind an open older stream), the one of the oldest
/// stream is, which leaves that producer unfenced.
#[derive(Debug, Default)]
pub struct StreamOwners {
    /// Producer id -> newest stream seen for it.
    streams: HashMap<i64, StreamId>,
}

impl StreamOwners {
    /// Claims the producers of `headers` for `stream`, unless a newer stream holds one of them:
    /// then `Err` with that producer id, and nothing changes.
    pub fn claim(&mut self, headers: &[BatchHeader], stream: &OpenStream) -> Result<(), i64> {
        let ids = || {
            headers
                .iter()
                .map(|h| h.producer_id)
                .filter(|&id| id != NO_PRODUCER_ID)
        };
        if let Some(id) = ids().find(|id| self.streams.get(id).is_some_and(|&s| s > stream.id)) {
            return Err(id);
        }
        for id in ids() {
            if !self.streams.contains_key(&id) && self.streams.len() >= PRODUCERS_PER_PARTITION_MAX
            {
                self.make_room(&stream.streams);
            }
            self.streams.insert(id, stream.id);
        }
        assert!(self.streams.len() <= PRODUCERS_PER_PARTITION_MAX);
        Ok(())
    }

    /// Drops the entries no open stream is older than; if none, the oldest stream's.
    fn make_room(&mut self, streams: &ProduceStreams) {
        if let Some(oldest_open) = streams.oldest_open() {
            self.streams.retain(|_, &mut s| s > oldest_open);
        }
        if self.streams.len() >= PRODUCERS_PER_PARTITION_MAX {
            let oldest = self
                .streams
                .iter()
                .min_by_key(|(_, &s)| s)
                .map(|(&id, _)| id);
            if let Some(oldest) = oldest {
                self.streams.remove(&oldest);
            }
        }
    }

    /// How many producers are remembered.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Whether no producer is remembered.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }
}

/// The state of every producer that wrote to one partition.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProducerStates {
    /// Producer id -> what the partition knows of it.
    producers: HashMap<i64, ProducerEntry>,
}

impl ProducerStates {
    /// How many producers are remembered.
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    /// Whether no producer is remembered.
    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// The epoch and last batch known for `producer_id`, for tests and diagnostics.
    pub fn last_batch(&self, producer_id: i64) -> Option<(i16, BatchMetadata)> {
        self.producers
            .get(&producer_id)
            .map(|e| (e.epoch, *e.batches.back().expect("an entry has a batch")))
    }

    /// Decides what to do with an entry of batches (their headers, in order), without changing
    /// anything. See the module documentation for the rules.
    ///
    /// # Errors
    ///
    /// The first batch that breaks a rule, or a mix of duplicates and new batches.
    pub fn plan(&self, headers: &[BatchHeader]) -> Result<Plan, Violation> {
        // Producers touched by earlier batches of this entry, as those batches leave them.
        let mut scratch: HashMap<i64, ProducerEntry> = HashMap::new();
        let mut duplicates: Vec<BatchMetadata> = Vec::new();
        let mut new_batches = 0usize;
        let mut first_mixed: Option<(i64, i32)> = None;
        for header in headers {
            let Some(id) = identity(header)? else {
                new_batches += 1;
                first_mixed.get_or_insert((NO_PRODUCER_ID, header.base_sequence));
                continue;
            };
            let entry = scratch
                .get(&id.producer_id)
                .or_else(|| self.producers.get(&id.producer_id));
            match check(entry, &id)? {
                Some(original) => {
                    first_mixed.get_or_insert((id.producer_id, id.first_sequence));
                    duplicates.push(original);
                }
                None => {
                    first_mixed.get_or_insert((id.producer_id, id.first_sequence));
                    new_batches += 1;
                    // Offsets are not known before the append; sequences are all `check` needs.
                    let meta = BatchMetadata {
                        first_sequence: id.first_sequence,
                        last_sequence: id.last_sequence,
                        first_offset: Offset(u64::MAX),
                        last_offset: Offset(u64::MAX),
                    };
                    let next = advance(entry.cloned(), &id, meta);
                    scratch.insert(id.producer_id, next);
                }
            }
        }
        if duplicates.is_empty() {
            return Ok(Plan::Append);
        }
        let (producer_id, base_sequence) = first_mixed.expect("an entry has a batch");
        if new_batches > 0 {
            return Err(Violation::OutOfOrder {
                producer_id,
                base_sequence,
                reason: "the request mixes retried batches with new ones; send the new batches \
                         in a request of their own"
                    .into(),
            });
        }
        for pair in duplicates.windows(2) {
            if pair[0].last_offset.0 + 1 != pair[1].first_offset.0 {
                return Err(Violation::OutOfOrder {
                    producer_id,
                    base_sequence,
                    reason: "the retried batches were not stored one after the other; retry \
                             them one request each"
                        .into(),
                });
            }
        }
        Ok(Plan::Duplicate {
            first_offset: duplicates[0].first_offset,
            last_offset: duplicates[duplicates.len() - 1].last_offset,
        })
    }

    /// Applies batches appended back to back from `first_offset` (after [`Plan::Append`], or
    /// when walking the log). Batches without producer id only take their offsets.
    pub fn record(&mut self, headers: &[BatchHeader], first_offset: Offset) {
        let mut offset = first_offset.0;
        for header in headers {
            let records = u64::try_from(header.last_offset_delta).unwrap_or(0) + 1;
            if let Ok(Some(id)) = identity(header) {
                self.apply(&id, Offset(offset), Offset(offset + records - 1));
            }
            offset += records;
        }
    }

    /// Records one batch of `id` at `[first_offset, last_offset]`. A batch of an older epoch
    /// than known (only possible in a log written by something else) changes nothing.
    fn apply(&mut self, id: &BatchIdentity, first_offset: Offset, last_offset: Offset) {
        let meta = BatchMetadata {
            first_sequence: id.first_sequence,
            last_sequence: id.last_sequence,
            first_offset,
            last_offset,
        };
        match self.producers.remove(&id.producer_id) {
            Some(entry) if id.epoch < entry.epoch => {
                self.producers.insert(id.producer_id, entry);
            }
            Some(entry) => {
                self.producers
                    .insert(id.producer_id, advance(Some(entry), id, meta));
            }
            None => {
                if self.producers.len() >= PRODUCERS_PER_PARTITION_MAX {
                    self.evict_least_recent();
                }
                self.producers
                    .insert(id.producer_id, advance(None, id, meta));
            }
        }
        assert!(self.producers.len() <= PRODUCERS_PER_PARTITION_MAX);
    }

    /// Forgets the producer whose last batch has the lowest offset. A scan, only when full.
    fn evict_least_recent(&mut self) {
        let oldest = self
            .producers
            .iter()
            .min_by_key(|(_, e)| e.batches.back().map_or(0, |b| b.last_offset.0))
            .map(|(&id, _)| id);
        if let Some(id) = oldest {
            tracing::info!(
                producer_id = id,
                "forgetting the least recent producer of a full partition"
            );
            self.producers.remove(&id);
        }
    }

    /// The snapshot file's bytes for this state as of `log_end_offset`.
    pub fn encode(&self, log_end_offset: Offset) -> Vec<u8> {
        let mut ids: Vec<i64> = self.producers.keys().copied().collect();
        ids.sort_unstable();
        let mut out = Vec::with_capacity(
            SNAPSHOT_HEADER_BYTES
                + ids.len()
                    * (SNAPSHOT_PRODUCER_BYTES + PRODUCER_BATCHES_CACHED * SNAPSHOT_BATCH_BYTES)
                + 4,
        );
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&SNAPSHOT_VERSION.to_be_bytes());
        out.extend_from_slice(&log_end_offset.0.to_be_bytes());
        out.extend_from_slice(&(ids.len() as u32).to_be_bytes());
        for id in ids {
            let entry = &self.producers[&id];
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&entry.epoch.to_be_bytes());
            out.push(entry.batches.len() as u8);
            for b in &entry.batches {
                out.extend_from_slice(&b.first_sequence.to_be_bytes());
                out.extend_from_slice(&b.last_sequence.to_be_bytes());
                out.extend_from_slice(&b.first_offset.0.to_be_bytes());
                out.extend_from_slice(&b.last_offset.0.to_be_bytes());
            }
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Parses snapshot bytes into the state and the log end offset it is as of.
    ///
    /// # Errors
    ///
    /// Why the bytes are not an intact snapshot.
    pub fn decode(bytes: &[u8]) -> Result<(ProducerStates, Offset), String> {
        if bytes.len() < SNAPSHOT_HEADER_BYTES + 4 {
            return Err(format!("{} bytes is too short", bytes.len()));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_be_bytes(crc.try_into().expect("4 bytes"));
        let computed = crc32fast::hash(body);
        if stored != computed {
            return Err(format!(
                "checksum {stored:08x} does not match {computed:08x}"
            ));
        }
        let mut reader = Reader { rest: body };
        if reader.take(4)? != SNAPSHOT_MAGIC {
            return Err("bad magic".into());
        }
        let version = u32::from_be_bytes(reader.array()?);
        if version != SNAPSHOT_VERSION {
            return Err(format!("unsupported version {version}"));
        }
        let offset = Offset(u64::from_be_bytes(reader.array()?));
        let count = u32::from_be_bytes(reader.array()?) as usize;
        if count > PRODUCERS_PER_PARTITION_MAX {
            return Err(format!("{count} producers exceed the limit"));
        }
        let mut producers = HashMap::with_capacity(count);
        for _ in 0..count {
            let id = i64::from_be_bytes(reader.array()?);
            let epoch = i16::from_be_bytes(reader.array()?);
            let n = reader.take(1)?[0] as usize;
            if id < 0 || epoch < 0 || n == 0 || n > PRODUCER_BATCHES_CACHED {
                return Err(format!("bad producer {id} epoch {epoch} with {n} batches"));
            }
            let mut batches = VecDeque::with_capacity(n);
            for _ in 0..n {
                let meta = BatchMetadata {
                    first_sequence: i32::from_be_bytes(reader.array()?),
                    last_sequence: i32::from_be_bytes(reader.array()?),
                    first_offset: Offset(u64::from_be_bytes(reader.array()?)),
                    last_offset: Offset(u64::from_be_bytes(reader.array()?)),
                };
                if meta.first_sequence < 0
                    || meta.last_sequence < 0
                    || meta.last_offset < meta.first_offset
                    || offset <= meta.last_offset
                {
                    return Err(format!("bad batch {meta:?} of producer {id}"));
                }
                batches.push_back(meta);
            }
            if producers
                .insert(id, ProducerEntry { epoch, batches })
                .is_some()
            {
                return Err(format!("producer {id} listed twice"));
            }
        }
        if !reader.rest.is_empty() {
            return Err(format!(
                "{} bytes after the last producer",
                reader.rest.len()
            ));
        }
        Ok((ProducerStates { producers }, offset))
    }
}

/// Reads big-endian fields off the front of a byte slice, failing instead of panicking.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.rest.len() < n {
            return Err("truncated".into());
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }
}

/// How the state of a partition was rebuilt on open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildReport {
    /// The offset of the snapshot used, if one was.
    pub snapshot_offset: Option<Offset>,
    /// Where the walk of batch headers started.
    pub walked_from: Offset,
    /// Batches whose headers were walked.
    pub batches_walked: u64,
    /// Bytes of those batches: the work a snapshot would have saved.
    pub bytes_walked: u64,
}

/// Rebuilds a partition's producer state on open: the snapshot in `log`'s folder when it is
/// intact and not past the log end offset, then the batch headers after it.
///
/// # Errors
///
/// What the log said when a read failed (`Corrupt` for a damaged flushed segment).
pub fn rebuild(log: &Log) -> Result<(ProducerStates, RebuildReport), StorageError> {
    let path = log.dir().join(SNAPSHOT_FILE);
    let log_start_offset = log.log_start_offset();
    let log_end_offset = log.log_end_offset();
    let snapshot = match std::fs::read(&path) {
        Ok(bytes) => match ProducerStates::decode(&bytes) {
            Ok((states, offset)) if offset <= log_end_offset => Some((states, offset)),
            Ok((_, offset)) => {
                tracing::warn!(path = %path.display(), %offset, %log_end_offset, "producer-state snapshot is past the log end (the log lost its tail): rebuilding from the log");
                None
            }
            Err(reason) => {
                tracing::warn!(path = %path.display(), reason, "damaged producer-state snapshot: rebuilding from the log");
                None
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unreadable producer-state snapshot: rebuilding from the log");
            None
        }
    };
    let (mut states, snapshot_offset) = match snapshot {
        Some((states, offset)) => (states, Some(offset)),
        None => (ProducerStates::default(), None),
    };
    let from = snapshot_offset.map_or(log_start_offset, |o| o.max(log_start_offset));
    let mut report = RebuildReport {
        snapshot_offset,
        walked_from: from,
        batches_walked: 0,
        bytes_walked: 0,
    };
    let mut at = from;
    let mut headers = Vec::new();
    // Each read returns at least one batch and moves `at` forward, so this ends at the end.
    while at < log.high_watermark() {
        let read = log.read(at, WALK_READ_BYTES)?;
        if read.batches.is_empty() {
            break;
        }
        assert!(at < read.next_offset);
        headers.clear();
        let mut first_offset = None;
        for batch in octolog_batch::batches(&read.batches) {
            let (header, _) = batch.map_err(|source| StorageError::Corrupt {
                path: log.dir().to_path_buf(),
                position: 0,
                reason: format!(
                    "a batch header does not parse while rebuilding producer state: {source}"
                ),
            })?;
            // The first batch may start before `at`; never apply a batch twice.
            if (header.last_offset() as u64) < at.0 {
                continue;
            }
            first_offset.get_or_insert(Offset(header.base_offset as u64));
            report.bytes_walked += header.size() as u64;
            headers.push(header);
        }
        if let Some(first_offset) = first_offset {
            states.record(&headers, first_offset);
            report.batches_walked += headers.len() as u64;
        }
        at = read.next_offset;
    }
    Ok((states, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use octolog_batch::BatchBuilder;

    /// A batch of `records` records for the producer, its header parsed.
    fn batch(producer_id: i64, epoch: i16, base_sequence: i32, records: usize) -> BatchHeader {
        let mut builder = BatchBuilder::new();
        builder.producer(producer_id, epoch, base_sequence);
        for i in 0..records {
            builder.push(1000 + i as i64, None, Some(b"v"), &[]);
        }
        BatchHeader::parse(&builder.finish()).unwrap()
    }

    /// Guards how a full `StreamOwners` makes room: first by dropping entries no open stream is
    /// older than (they fence nothing), and only if every entry still fences an open stream,
    /// one entry of the oldest stream; and that a newer stream's claim refuses an older one's.
    #[test]
    fn stream_owners_forget_what_fences_nothing_first() {
        let streams = Arc::new(ProduceStreams::default());
        let older = streams.open();
        let newer = streams.open();
        assert!(older.id() < newer.id());
        let mut owners = StreamOwners::default();
        assert_eq!(owners.claim(&[batch(1, 0, 0, 1)], &newer), Ok(()));
        assert_eq!(owners.claim(&[batch(1, 0, 1, 1)], &older), Err(1));
        // A batch without producer id claims nothing.
        assert_eq!(
            owners.claim(&[batch(NO_PRODUCER_ID, 0, 0, 1)], &older),
            Ok(())
        );
        assert_eq!(owners.len(), 1);

        // Full of the newer stream's claims, while the older stream is open: each still fences,
        // so a new producer takes one entry's place.
        for id in 2..=PRODUCERS_PER_PARTITION_MAX as i64 {
            owners.claim(&[batch(id, 0, 0, 1)], &newer).unwrap();
        }
        assert_eq!(owners.len(), PRODUCERS_PER_PARTITION_MAX);
        let next = PRODUCERS_PER_PARTITION_MAX as i64 + 1;
        owners.claim(&[batch(next, 0, 0, 1)], &newer).unwrap();
        assert_eq!(owners.len(), PRODUCERS_PER_PARTITION_MAX);
        assert_eq!(owners.claim(&[batch(next, 0, 1, 1)], &older), Err(next));

        // Once the older stream is closed, no entry fences anything: they all go.
        drop(older);
        owners.claim(&[batch(next + 1, 0, 0, 1)], &newer).unwrap();
        assert_eq!(owners.len(), 1);
    }

    /// Runs `entries` through plan/record as a partition would, with the log end offset
    /// advancing on appends; returns each entry's outcome: `Ok((first, last))` offsets (new or
    /// original), or the violation.
    fn run(entries: &[Vec<BatchHeader>]) -> Vec<Result<(u64, u64), Violation>> {
        let mut states = ProducerStates::default();
        let mut log_end = 0u64;
        entries
            .iter()
            .map(|headers| match states.plan(headers)? {
                Plan::Append => {
                    let records: u64 = headers.iter().map(|h| h.record_count as u64).sum();
                    states.record(headers, Offset(log_end));
                    log_end += records;
                    Ok((log_end - records, log_end - 1))
                }
                Plan::Duplicate {
                    first_offset,
                    last_offset,
                } => Ok((first_offset.0, last_offset.0)),
            })
            .collect()
    }

    fn out_of_order(result: &Result<(u64, u64), Violation>) -> bool {
        matches!(result, Err(Violation::OutOfOrder { .. }))
    }

    #[test]
    fn sequences_wrap_after_i32_max() {
        assert_eq!(sequence_after(0, 0), 0);
        assert_eq!(sequence_after(5, 3), 8);
        assert_eq!(sequence_after(i32::MAX, 1), 0);
        assert_eq!(sequence_after(i32::MAX - 1, 3), 1);
    }

    #[test]
    fn rules_of_the_state_machine() {
        let p = 7;
        // In order, then a retry of the last batch and of an older one: the original offsets.
        let results = run(&[
            vec![batch(p, 0, 0, 3)],
            vec![batch(p, 0, 3, 2)],
            vec![batch(p, 0, 3, 2)],
            vec![batch(p, 0, 0, 3)],
            vec![batch(p, 0, 5, 1)],
        ]);
        assert_eq!(results[0], Ok((0, 2)));
        assert_eq!(results[1], Ok((3, 4)));
        assert_eq!(
            results[2],
            Ok((3, 4)),
            "duplicate answered with original offsets"
        );
        assert_eq!(results[3], Ok((0, 2)));
        assert_eq!(
            results[4],
            Ok((5, 5)),
            "nothing was appended for the duplicates"
        );

        // A gap, and a reordering (the later batch first).
        let results = run(&[vec![batch(p, 0, 0, 2)], vec![batch(p, 0, 3, 1)]]);
        assert!(out_of_order(&results[1]), "{results:?}");
        let results = run(&[
            vec![batch(p, 0, 0, 2)],
            vec![batch(p, 0, 4, 2)],
            vec![batch(p, 0, 2, 2)],
        ]);
        assert!(out_of_order(&results[1]), "{results:?}");
        assert_eq!(results[2], Ok((2, 3)));

        // Unknown producer: only sequence 0 starts it.
        let results = run(&[vec![batch(p, 0, 5, 1)], vec![batch(p, 0, 0, 1)]]);
        assert_eq!(
            results[0],
            Err(Violation::UnknownProducer {
                producer_id: p,
                base_sequence: 5
            })
        );
        assert_eq!(results[1], Ok((0, 0)));

        // A new epoch starts at 0 and fences the old one; a new epoch not at 0 is refused.
        let results = run(&[
            vec![batch(p, 0, 0, 2)],
            vec![batch(p, 1, 2, 1)],
            vec![batch(p, 1, 0, 1)],
            vec![batch(p, 0, 2, 1)],
            vec![batch(p, 1, 1, 1)],
        ]);
        assert!(out_of_order(&results[1]), "{results:?}");
        assert_eq!(results[2], Ok((2, 2)));
        assert_eq!(
            results[3],
            Err(Violation::Fenced {
                producer_id: p,
                epoch: 0,
                current_epoch: 1
            })
        );
        assert_eq!(results[4], Ok((3, 3)));

        // Only the last 5 batches are remembered: an older retry is out of order.
        let mut entries: Vec<Vec<BatchHeader>> = (0..7).map(|i| vec![batch(p, 0, i, 1)]).collect();
        entries.push(vec![batch(p, 0, 2, 1)]);
        entries.push(vec![batch(p, 0, 1, 1)]);
        let results = run(&entries);
        assert_eq!(results[7], Ok((2, 2)));
        assert!(out_of_order(&results[8]), "{results:?}");

        // Sequences wrap: after i32::MAX comes 0, for a producer whose state starts near it.
        let mut states = ProducerStates::default();
        states.record(&[batch(p, 0, i32::MAX - 1, 2)], Offset(0));
        assert_eq!(states.plan(&[batch(p, 0, 0, 1)]), Ok(Plan::Append));
        assert!(matches!(
            states.plan(&[batch(p, 0, 1, 1)]),
            Err(Violation::OutOfOrder { .. })
        ));

        // Producers are independent; batches without a producer id are unchecked.
        let results = run(&[
            vec![batch(1, 0, 0, 1)],
            vec![batch(2, 0, 0, 1)],
            vec![batch(-1, -1, -1, 1)],
            vec![batch(1, 0, 1, 1)],
            vec![batch(-1, -1, -1, 1)],
        ]);
        assert!(results.iter().all(Result::is_ok), "{results:?}");

        // Nonsense fields.
        let results = run(&[
            vec![batch(-2, 0, 0, 1)],
            vec![batch(3, -1, 0, 1)],
            vec![batch(3, 0, -1, 1)],
        ]);
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(Violation::Invalid(_)))),
            "{results:?}"
        );
    }

    #[test]
    fn entries_of_several_batches() {
        let p = 9;
        let results = run(&[
            // Two new batches in one entry: the second follows the first.
            vec![batch(p, 0, 0, 2), batch(p, 0, 2, 3)],
            // Their retry: the original offsets of both.
            vec![batch(p, 0, 0, 2), batch(p, 0, 2, 3)],
            // A retry followed by a new batch: refused, nothing appended.
            vec![batch(p, 0, 2, 3), batch(p, 0, 5, 1)],
            // A gap inside the entry: refused as a whole.
            vec![batch(p, 0, 5, 1), batch(p, 0, 7, 1)],
            vec![batch(p, 0, 5, 1)],
        ]);
        assert_eq!(results[0], Ok((0, 4)));
        assert_eq!(results[1], Ok((0, 4)));
        assert!(out_of_order(&results[2]), "{results:?}");
        assert!(out_of_order(&results[3]), "{results:?}");
        assert_eq!(results[4], Ok((5, 5)));

        // Retries of batches that were not stored one after the other.
        let results = run(&[
            vec![batch(p, 0, 0, 1)],
            vec![batch(-1, -1, -1, 1)],
            vec![batch(p, 0, 1, 1)],
            vec![batch(p, 0, 0, 1), batch(p, 0, 1, 1)],
        ]);
        assert!(out_of_order(&results[3]), "{results:?}");
    }

    #[test]
    fn eviction_keeps_the_bound() {
        let mut states = ProducerStates::default();
        for id in 0..(PRODUCERS_PER_PARTITION_MAX as i64 + 1) {
            states.record(&[batch(id, 0, 0, 1)], Offset(id as u64));
        }
        assert_eq!(states.len(), PRODUCERS_PER_PARTITION_MAX);
        assert_eq!(
            states.last_batch(0),
            None,
            "the least recent producer is forgotten"
        );
        assert!(states.last_batch(1).is_some());
    }

    #[test]
    fn snapshot_round_trips_and_rejects_damage() {
        let mut states = ProducerStates::default();
        for id in 0..3 {
            for seq in 0..(id as i32 + 4) {
                let at = (id as u64) * 100 + seq as u64;
                states.record(&[batch(id, id as i16, seq, 1)], Offset(at));
            }
        }
        let bytes = states.encode(Offset(1000));
        assert_eq!(
            ProducerStates::decode(&bytes),
            Ok((states.clone(), Offset(1000)))
        );
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x04;
            assert!(ProducerStates::decode(&bad).is_err(), "flip at {i}");
        }
        for len in 0..bytes.len() {
            assert!(
                ProducerStates::decode(&bytes[..len]).is_err(),
                "cut at {len}"
            );
        }
        let empty = ProducerStates::default().encode(Offset(0));
        assert_eq!(
            ProducerStates::decode(&empty),
            Ok((ProducerStates::default(), Offset(0)))
        );
    }
}
