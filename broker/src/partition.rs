//! One topic partition: a storage `Log` plus what the broker needs around it, including the
//! idempotent producers' state (`producer_state.rs`: the rules, the snapshot, the rebuild).
//!
//! Thread-safety: shared as `Arc<Partition>`. Reads go straight to the log (lock-free). Appends
//! that fsync (`FlushPolicy::Always`) run on tokio's blocking threads so that a slow disk never
//! stalls the async workers; other appends are a copy into the page cache and run inline. An
//! entry with idempotent batches is checked and written (`Log::append_unflushed`) under the
//! producer-state mutex, so check and append are one step; it runs inside the blocking closure,
//! so a cancelled request cannot release the mutex half-way. The mutex is released before the
//! wait for the fsync (`Log::flush_to`), so that concurrent producers share one fsync (the log's
//! group commit) instead of queueing on the mutex for one fsync each. Entries without producer
//! ids never take that mutex. Lock order: producer state, then the log's own locks.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use octolog_batch::{BatchHeader, Offset, NO_PRODUCER_ID};
use octolog_storage::{AppendInfo, FlushPolicy, Log, LogConfig, ReadBatches, RetentionOutcome};
use tokio::sync::watch;

use crate::error::{BrokerError, Result};
use crate::producer_state::{
    self, OpenStream, Plan, ProducerStates, StreamOwners, Violation, SNAPSHOT_FILE,
};
use crate::topic::write_atomically;

/// A partition of a topic.
#[derive(Debug)]
pub struct Partition {
    /// The topic's name, for errors and logs.
    topic: String,
    /// The partition number.
    id: u32,
    /// The partition's log.
    log: Arc<Log>,
    /// The topic's append watch, bumped after every append so waiting fetches and
    /// subscriptions wake, even when the request that appended was cancelled meanwhile.
    appended: Arc<watch::Sender<u64>>,
    /// Idempotent producers' state; held across check and append of idempotent entries.
    producers: Arc<Mutex<ProducerStates>>,
    /// Per producer, the newest `ProduceStream` that sent its batches here: older streams' late
    /// copies are refused. Locked inside `producers`.
    stream_owners: Mutex<StreamOwners>,
    /// Bytes appended since the last producer-state snapshot: maintenance writes a new one
    /// after about a segment's worth, which bounds the walk after an unclean shutdown.
    bytes_since_snapshot: Arc<AtomicU64>,
    /// Whether the snapshot on disk may not be the state as of the log end offset (records were
    /// appended since it was written, or it is missing, damaged or as of another offset). A
    /// clean close writes one only then, so that closing thousands of idle partitions costs no
    /// fsyncs for their snapshots. Only a hint: if it is wrong, the next open walks further.
    snapshot_stale: Arc<AtomicBool>,
}

impl Partition {
    /// Opens (recovering if needed) the log of partition `id` in `dir`.
    pub(crate) fn open(
        topic: &str,
        id: u32,
        dir: &Path,
        config: LogConfig,
        appended: Arc<watch::Sender<u64>>,
    ) -> Result<Partition> {
        let log = Log::open(dir, config).map_err(|source| BrokerError::Storage {
            topic: topic.to_string(),
            partition: id,
            source,
        })?;
        let report = log.open_report();
        if report.bytes_cut > 0 || report.stray_files_removed > 0 {
            tracing::warn!(
                topic,
                partition = id,
                ?report,
                "partition recovered with losses"
            );
        }
        let (producers, rebuilt) =
            producer_state::rebuild(&log).map_err(|source| BrokerError::Storage {
                topic: topic.to_string(),
                partition: id,
                source,
            })?;
        tracing::debug!(
            topic,
            partition = id,
            producers = producers.len(),
            ?rebuilt,
            "rebuilt producer state"
        );
        let log_end_offset = log.log_end_offset();
        let snapshot_stale = match rebuilt.snapshot_offset {
            Some(offset) => offset != log_end_offset,
            // A file that could not be used is replaced; without one, an empty log needs none
            // (the next open has nothing to walk).
            None => {
                log.dir().join(SNAPSHOT_FILE).exists() || log.log_start_offset() != log_end_offset
            }
        };
        Ok(Partition {
            topic: topic.to_string(),
            id,
            log: Arc::new(log),
            appended,
            producers: Arc::new(Mutex::new(producers)),
            stream_owners: Mutex::new(StreamOwners::default()),
            // A long walk now is a reason to snapshot soon.
            bytes_since_snapshot: Arc::new(AtomicU64::new(rebuilt.bytes_walked)),
            snapshot_stale: Arc::new(AtomicBool::new(snapshot_stale)),
        })
    }

    fn storage_error(&self, source: octolog_storage::StorageError) -> BrokerError {
        BrokerError::Storage {
            topic: self.topic.clone(),
            partition: self.id,
            source,
        }
    }

    /// The partition number.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The partition's log.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Appends v2 batches (back to back) at once, on the caller's thread, without waiting for an
    /// fsync, and returns the append still to complete: [`PendingAppend::complete`] waits until
    /// the records are durable (flush policy `always`) and wakes readers. For streams whose
    /// requests must be appended in the order they arrive (`ProduceStream`): the next request is
    /// appended while this one waits for its fsync, and both share it (group commit). Checked
    /// as [`Partition::append`] checks; `stream` names the `ProduceStream` the batches came on,
    /// if any, so that a newer stream of their producer fences older ones (`StreamOwners`).
    ///
    /// # Errors
    ///
    /// As [`Partition::append`], and `StaleProduceStream`; nothing is appended then.
    pub fn append_ordered(
        self: &Arc<Self>,
        batches: Bytes,
        stream: Option<&OpenStream>,
    ) -> Result<PendingAppend> {
        let size = batches.len() as u64;
        let (info, fresh) = append_checked(self, &batches, stream)?;
        Ok(PendingAppend {
            partition: Arc::clone(self),
            info,
            fresh,
            size,
        })
    }

    /// What an append that stored new records does once they are durable: count them toward the
    /// next snapshot and wake readers.
    fn appended(&self, size: u64) {
        self.bytes_since_snapshot.fetch_add(size, Ordering::Relaxed);
        self.snapshot_stale.store(true, Ordering::SeqCst);
        self.appended.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Appends v2 batches (back to back); returns the offsets given. Idempotent batches are
    /// checked first (see `producer_state.rs`): a retried entry appends nothing and returns the
    /// original offsets.
    ///
    /// # Errors
    ///
    /// `Storage` wrapping what the log said (invalid batch, too large, I/O);
    /// `OutOfOrderSequence`, `ProducerFenced`, `UnknownProducerId` or `InvalidRequest` for
    /// idempotent batches that break the rules, with nothing appended.
    pub async fn append(self: &Arc<Self>, batches: Bytes) -> Result<AppendInfo> {
        // The same steps as a stream's ordered append, completed at once; under `always` on a
        // blocking thread, which finishes even if the request is cancelled meanwhile.
        if self.log.config().flush == FlushPolicy::Always {
            let partition = Arc::clone(self);
            tokio::task::spawn_blocking(move || partition.append_ordered(batches, None)?.finish())
                .await
                .map_err(|e| BrokerError::InvalidRequest(format!("append task failed: {e}")))?
        } else {
            self.append_ordered(batches, None)?.finish()
        }
    }

    /// Whole batches from the one containing `offset`, at most `bytes_max` (but at least one).
    ///
    /// # Errors
    ///
    /// `Storage` with `OffsetOutOfRange` or `Corrupt`.
    pub fn read(&self, offset: Offset, bytes_max: usize) -> Result<ReadBatches> {
        self.log
            .read(offset, bytes_max)
            .map_err(|e| self.storage_error(e))
    }

    /// The first offset whose record has a timestamp >= `timestamp_ms`.
    ///
    /// # Errors
    ///
    /// `Storage` with `Corrupt`.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<Offset>> {
        self.log
            .offset_for_timestamp(timestamp_ms)
            .map_err(|e| self.storage_error(e))
    }

    /// Flushes if the interval flush policy says it is time; runs on the caller's thread.
    pub(crate) fn flush_if_due(&self) -> Result<bool> {
        self.log.flush_if_due().map_err(|e| self.storage_error(e))
    }

    /// Deletes segments past retention.
    pub(crate) fn apply_retention(&self, now_ms: i64) -> Result<RetentionOutcome> {
        self.log
            .apply_retention(now_ms)
            .map_err(|e| self.storage_error(e))
    }

    /// Writes a producer-state snapshot if about a segment's worth of bytes was appended since
    /// the last one and everything appended is flushed (a snapshot must never cover records a
    /// crash could take back). Blocking. Returns whether it wrote one.
    pub(crate) fn snapshot_if_due(&self) -> Result<bool> {
        let due = u64::from(self.log.config().segment_bytes);
        if self.bytes_since_snapshot.load(Ordering::Relaxed) < due {
            return Ok(false);
        }
        self.write_snapshot(false)
    }

    /// Writes the producer-state snapshot as of the log end offset, if every record below it is
    /// flushed (always after `close`, unless the snapshot on disk is as of the log end already).
    /// The state is encoded under its mutex so no idempotent append slips between the state and
    /// the offset. With `FlushPolicy::Always` it then waits for those records (outside the
    /// mutex), since some may still be waiting for their appender's fsync: skipping instead
    /// would skip most snapshots under a steady load. Called by maintenance, and by `close` once
    /// maintenance has stopped: one writer at a time.
    fn write_snapshot(&self, closed: bool) -> Result<bool> {
        let always = self.log.config().flush == FlushPolicy::Always;
        let stale = || self.snapshot_stale.store(true, Ordering::SeqCst);
        let (bytes, log_end_offset) = {
            let producers = self.producers.lock().unwrap_or_else(|e| e.into_inner());
            if closed && !self.snapshot_stale.load(Ordering::SeqCst) {
                return Ok(false);
            }
            // Cleared before the log end offset is read, so that an append the snapshot misses
            // marks it stale again.
            self.snapshot_stale.store(false, Ordering::SeqCst);
            std::sync::atomic::fence(Ordering::SeqCst);
            let log_end_offset = self.log.log_end_offset();
            if !closed && !always && self.log.recovery_point() < log_end_offset {
                stale();
                return Ok(false);
            }
            (producers.encode(log_end_offset), log_end_offset)
        };
        if !closed && always {
            if let Err(e) = self.log.flush_to(log_end_offset) {
                stale();
                return Err(self.storage_error(e));
            }
        }
        // A snapshot must never cover records a crash could take back.
        if self.log.recovery_point() < log_end_offset {
            assert!(!closed, "close flushes every record");
            stale();
            return Ok(false);
        }
        self.bytes_since_snapshot.store(0, Ordering::Relaxed);
        if let Err(e) = write_atomically(self.log.dir(), SNAPSHOT_FILE, &bytes) {
            stale();
            return Err(e);
        }
        Ok(true)
    }

    /// Flushes and closes the log cleanly, then snapshots the producer state (unless the one on
    /// disk is current) so the next open walks no batch headers.
    pub(crate) fn close(&self) -> Result<()> {
        self.log.close().map_err(|e| self.storage_error(e))?;
        self.write_snapshot(true).map(drop)
    }

    /// The state of the idempotent producers, for tests.
    #[cfg(test)]
    pub(crate) fn producer_states(&self) -> ProducerStates {
        self.producers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Appends `batches` to `partition`'s log without waiting for the disk
/// (`Log::append_unflushed`), checking idempotent ones against its producer state under that
/// mutex (and, for batches that came on `stream`, against the producers' newest streams).
/// Returns the offsets, and whether anything was appended (false for a retried entry). The
/// caller must `wait_durable` before it answers.
fn append_checked(
    target: &Partition,
    batches: &[u8],
    stream: Option<&OpenStream>,
) -> Result<(AppendInfo, bool)> {
    let log = &*target.log;
    let producers = &*target.producers;
    let topic = target.topic.as_str();
    let partition = target.id;
    let storage = |source| BrokerError::Storage {
        topic: topic.to_string(),
        partition,
        source,
    };
    // Headers only; a malformed entry goes straight to the log, which refuses it.
    let headers: Option<Vec<BatchHeader>> = octolog_batch::batches(batches)
        .map(|b| b.ok().map(|(header, _)| header))
        .collect();
    let headers = headers.unwrap_or_default();
    if !headers.iter().any(|h| h.producer_id != NO_PRODUCER_ID) {
        return log
            .append_unflushed(batches)
            .map(|info| (info, true))
            .map_err(storage);
    }
    let mut states = producers.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(stream) = stream {
        let mut owners = target
            .stream_owners
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        owners
            .claim(&headers, stream)
            .map_err(|producer_id| BrokerError::StaleProduceStream {
                topic: topic.to_string(),
                partition,
                producer_id,
            })?;
    }
    let plan = states.plan(&headers).map_err(|violation| match violation {
        Violation::OutOfOrder {
            producer_id,
            base_sequence,
            reason,
        } => BrokerError::OutOfOrderSequence {
            topic: topic.to_string(),
            partition,
            producer_id,
            base_sequence,
            reason,
        },
        Violation::Fenced {
            producer_id,
            epoch,
            current_epoch,
        } => BrokerError::ProducerFenced {
            topic: topic.to_string(),
            partition,
            producer_id,
            producer_epoch: epoch,
            current_epoch,
        },
        Violation::UnknownProducer {
            producer_id,
            base_sequence,
        } => BrokerError::UnknownProducerId {
            topic: topic.to_string(),
            partition,
            producer_id,
            base_sequence,
        },
        Violation::Invalid(reason) => BrokerError::InvalidRequest(reason),
    })?;
    match plan {
        Plan::Append => {
            let info = log.append_unflushed(batches).map_err(storage)?;
            states.record(&headers, info.first_offset);
            // The mutex is released on return, before `wait_durable`: retries of this entry that
            // arrive meanwhile are duplicates, and wait for the same flush.
            Ok((info, true))
        }
        Plan::Duplicate {
            first_offset,
            last_offset,
        } => {
            // Nothing is written, but a retry must still be what it claims: check every CRC.
            for batch in octolog_batch::batches_verified(batches) {
                if let Err(source) = batch {
                    return Err(storage(octolog_storage::StorageError::InvalidBatch {
                        position: 0,
                        source,
                    }));
                }
            }
            let info = AppendInfo {
                first_offset,
                last_offset,
                log_end_offset: log.log_end_offset(),
            };
            Ok((info, false))
        }
    }
}

/// An append in the log whose records may not be durable yet; see [`Partition::append_ordered`].
#[derive(Debug)]
#[must_use = "the append is acknowledged only once `complete` returns"]
pub struct PendingAppend {
    partition: Arc<Partition>,
    info: AppendInfo,
    /// Whether new records were stored (not a retried duplicate).
    fresh: bool,
    size: u64,
}

impl PendingAppend {
    /// Whether `complete` waits for an fsync (flush policy `always`).
    pub fn waits_for_fsync(&self) -> bool {
        self.partition.log.config().flush == FlushPolicy::Always
    }

    /// Waits until the records are durable (flush policy `always`, sharing the fsync with
    /// concurrent appenders, on a blocking thread that finishes even if this future is dropped),
    /// then wakes readers; returns the offsets given.
    ///
    /// # Errors
    ///
    /// `Storage` if the fsync failed: the records are in the log but not known to be durable.
    pub async fn complete(self) -> Result<AppendInfo> {
        if self.waits_for_fsync() {
            tokio::task::spawn_blocking(move || self.finish())
                .await
                .map_err(|e| BrokerError::InvalidRequest(format!("append task failed: {e}")))?
        } else {
            self.finish()
        }
    }

    fn finish(self) -> Result<AppendInfo> {
        let p = &self.partition;
        wait_durable(&p.log, &self.info, &p.topic, p.id)?;
        if self.fresh {
            p.appended(self.size);
        }
        Ok(self.info)
    }
}

/// With `FlushPolicy::Always`, returns once the records of `info` are durable, sharing the fsync
/// with concurrent appenders (the log's group commit). This holds for a retried entry too: its
/// original may have been written by an appender that has not finished its own wait, and a
/// retry must never be acknowledged before the records it points to are durable. Other
/// policies do not wait.
fn wait_durable(log: &Log, info: &AppendInfo, topic: &str, partition: u32) -> Result<()> {
    if log.config().flush != FlushPolicy::Always {
        return Ok(());
    }
    log.flush_to(Offset(info.last_offset.0 + 1))
        .map_err(|source| BrokerError::Storage {
            topic: topic.to_string(),
            partition,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::producer_state::{ProduceStreams, PRODUCER_BATCHES_CACHED};
    use bytes::BytesMut;
    use octolog_batch::BatchBuilder;

    fn open(dir: &Path, config: &LogConfig) -> Arc<Partition> {
        let appended = Arc::new(watch::channel(0).0);
        Arc::new(
            Partition::open("jobs", 0, dir, config.clone(), appended).expect("partition opens"),
        )
    }

    /// A batch of `records` records; `producer_id` -1 makes it not idempotent.
    fn batch(producer_id: i64, epoch: i16, base_sequence: i32, records: usize) -> BytesMut {
        let mut builder = BatchBuilder::new();
        builder.producer(producer_id, epoch, base_sequence);
        for i in 0..records {
            let value = format!(
                "{producer_id}-{epoch}-{}",
                i64::from(base_sequence) + i as i64
            );
            builder.push(1_000 + i as i64, None, Some(value.as_bytes()), &[]);
        }
        builder.finish()
    }

    /// The first and last offsets of an append, or the error's name.
    async fn append(
        partition: &Arc<Partition>,
        batches: &[BytesMut],
    ) -> Result<(u64, u64), String> {
        let mut entry = BytesMut::new();
        for b in batches {
            entry.extend_from_slice(b);
        }
        match partition.append(entry.freeze()).await {
            Ok(info) => Ok((info.first_offset.0, info.last_offset.0)),
            Err(e) => Err(match e {
                BrokerError::OutOfOrderSequence { .. } => "out of order".into(),
                BrokerError::ProducerFenced { .. } => "fenced".into(),
                BrokerError::UnknownProducerId { .. } => "unknown producer".into(),
                other => format!("{other}"),
            }),
        }
    }

    fn config(flush: FlushPolicy) -> LogConfig {
        LogConfig {
            segment_bytes: 1024,
            retention_ms: None,
            flush,
            ..LogConfig::default()
        }
    }

    /// Guards the idempotence rules as the produce path applies them, for both append paths
    /// (inline and on a blocking thread).
    #[tokio::test]
    async fn each_batch_is_appended_once() {
        for flush in [FlushPolicy::Always, FlushPolicy::Never] {
            let dir = tempfile::tempdir().unwrap();
            let p = open(dir.path(), &config(flush));
            assert_eq!(append(&p, &[batch(1, 0, 0, 3)]).await, Ok((0, 2)));
            assert_eq!(append(&p, &[batch(-1, -1, -1, 2)]).await, Ok((3, 4)));
            assert_eq!(append(&p, &[batch(1, 0, 3, 2)]).await, Ok((5, 6)));
            // Retries: the original offsets, nothing appended.
            assert_eq!(append(&p, &[batch(1, 0, 3, 2)]).await, Ok((5, 6)));
            assert_eq!(append(&p, &[batch(1, 0, 0, 3)]).await, Ok((0, 2)));
            assert_eq!(p.log().log_end_offset(), Offset(7));
            // A gap, a reordering, an unknown producer, a fenced epoch: refused, nothing appended.
            assert_eq!(
                append(&p, &[batch(1, 0, 6, 1)]).await,
                Err("out of order".into())
            );
            assert_eq!(
                append(&p, &[batch(1, 0, 4, 1)]).await,
                Err("out of order".into())
            );
            assert_eq!(
                append(&p, &[batch(2, 0, 1, 1)]).await,
                Err("unknown producer".into())
            );
            assert_eq!(append(&p, &[batch(1, 1, 0, 1)]).await, Ok((7, 7)));
            assert_eq!(append(&p, &[batch(1, 0, 5, 1)]).await, Err("fenced".into()));
            assert_eq!(p.log().log_end_offset(), Offset(8));
            // Several batches in one entry, then their retry.
            let entry = [batch(1, 1, 1, 2), batch(1, 1, 3, 2)];
            assert_eq!(append(&p, &entry).await, Ok((8, 11)));
            assert_eq!(append(&p, &entry).await, Ok((8, 11)));
            // A retry with a damaged CRC is refused, though nothing would be written.
            let mut damaged = batch(1, 1, 3, 2);
            let last = damaged.len() - 1;
            damaged[last] ^= 0xff;
            let refused = append(&p, &[damaged]).await.unwrap_err();
            assert!(refused.contains("invalid batch"), "{refused}");
            assert_eq!(p.log().log_end_offset(), Offset(12));
        }
    }

    /// Guards that producer state survives a clean close (snapshot) and an unclean stop (walk
    /// of the log), and that a stale or damaged snapshot is not trusted.
    #[tokio::test]
    async fn producer_state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(FlushPolicy::Always);
        let p = open(dir.path(), &config);
        for n in 0..10i32 {
            let producer = i64::from(n % 2);
            append(&p, &[batch(producer, 0, n / 2 * 4, 4)])
                .await
                .unwrap();
        }
        let last_batch = batch(1, 0, 20, 4);
        assert_eq!(
            append(&p, std::slice::from_ref(&last_batch)).await,
            Ok((40, 43))
        );
        let before = p.producer_states();
        assert_eq!(before.len(), 2);

        // Unclean: dropped without close, no snapshot yet (not a segment's worth since).
        drop(p);
        assert!(!dir.path().join(SNAPSHOT_FILE).exists());
        let p = open(dir.path(), &config);
        assert_eq!(p.producer_states(), before);
        assert_eq!(
            append(&p, std::slice::from_ref(&last_batch)).await,
            Ok((40, 43))
        );

        // Clean: close writes the snapshot, and the state comes back from it.
        p.close().unwrap();
        drop(p);
        let snapshot = std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap();
        assert_eq!(
            ProducerStates::decode(&snapshot),
            Ok((before.clone(), Offset(44)))
        );
        let p = open(dir.path(), &config);
        assert_eq!(p.producer_states(), before);
        assert_eq!(
            append(&p, std::slice::from_ref(&last_batch)).await,
            Ok((40, 43))
        );
        assert_eq!(append(&p, &[batch(0, 0, 20, 1)]).await, Ok((44, 44)));
        let after = p.producer_states();
        drop(p);

        // A snapshot past the log end (the log lost its tail) or damaged: the log is walked.
        for bad in [
            ProducerStates::default().encode(Offset(1000)),
            snapshot[..snapshot.len() - 1].to_vec(),
        ] {
            std::fs::write(dir.path().join(SNAPSHOT_FILE), bad).unwrap();
            let p = open(dir.path(), &config);
            assert_eq!(p.producer_states(), after);
            drop(p);
        }
    }

    /// Guards that a clean close writes the producer-state snapshot only when the one on disk is
    /// not as of the log end (closing thousands of idle partitions costs no snapshot fsyncs),
    /// and always replaces a snapshot that could not be used.
    #[tokio::test]
    async fn close_writes_a_snapshot_only_when_it_is_stale() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SNAPSHOT_FILE);
        let inode = || std::fs::metadata(&path).map(|m| m.ino()).ok();
        let config = config(FlushPolicy::Never);
        let reopen_and_close = |appends: Vec<BytesMut>| {
            let config = config.clone();
            let dir = dir.path().to_path_buf();
            async move {
                let p = open(&dir, &config);
                for b in appends {
                    append(&p, &[b]).await.unwrap();
                }
                p.close().unwrap();
            }
        };

        // A new, empty partition needs none: the next open has nothing to walk.
        reopen_and_close(vec![]).await;
        assert_eq!(inode(), None);
        reopen_and_close(vec![batch(1, 0, 0, 2)]).await;
        let written = inode().expect("a snapshot after appends");
        // Reopened and closed without appends: the snapshot is as of the log end already.
        reopen_and_close(vec![]).await;
        assert_eq!(inode(), Some(written));
        reopen_and_close(vec![batch(1, 0, 2, 1)]).await;
        let rewritten = inode().unwrap();
        assert_ne!(rewritten, written);
        let snapshot = std::fs::read(&path).unwrap();
        assert_eq!(ProducerStates::decode(&snapshot).unwrap().1, Offset(3));

        // A snapshot that cannot be used (past the log end, or damaged) is replaced.
        for bad in [
            ProducerStates::default().encode(Offset(1000)),
            snapshot[..snapshot.len() - 1].to_vec(),
        ] {
            std::fs::write(&path, bad).unwrap();
            reopen_and_close(vec![]).await;
            assert_eq!(std::fs::read(&path).unwrap(), snapshot);
        }
    }

    /// Guards that retention moving the log start offset does not break the rebuild: the walk
    /// starts at the log start offset, and the snapshot keeps producers whose batches are gone.
    #[tokio::test]
    async fn retention_and_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(FlushPolicy::Always);
        config.retention_bytes = Some(2048);
        let p = open(dir.path(), &config);
        // Producer 5 writes early, producer 6 keeps writing long after.
        append(&p, &[batch(5, 0, 0, 2)]).await.unwrap();
        for seq in 0..200 {
            append(&p, &[batch(6, 0, seq, 1)]).await.unwrap();
        }
        let outcome = p.apply_retention(0).unwrap();
        assert!(outcome.segments_deleted > 0);
        assert!(Offset(2) < p.log().log_start_offset());
        // Still known in memory.
        assert_eq!(append(&p, &[batch(5, 0, 2, 1)]).await.map(|_| ()), Ok(()));

        // Unclean stop: the walk from the log start offset does not see producer 5's first
        // batches but does see its last one, so it goes on; producer 6 is intact.
        let expected = p.producer_states();
        drop(p);
        let p = open(dir.path(), &config);
        for producer in [5, 6] {
            assert_eq!(
                p.producer_states().last_batch(producer),
                expected.last_batch(producer)
            );
        }
        assert!(p.snapshot_if_due().unwrap(), "a segment's worth was walked");
        assert!(!p.snapshot_if_due().unwrap(), "nothing appended since");
        drop(p);

        // Retention deletes producer 5's last batch as well; the snapshot still has it.
        let p = open(dir.path(), &config);
        for seq in 200..300 {
            append(&p, &[batch(6, 0, seq, 1)]).await.unwrap();
        }
        p.apply_retention(0).unwrap();
        let (_, last) = p.producer_states().last_batch(5).unwrap();
        assert!(last.last_offset < p.log().log_start_offset());
        p.close().unwrap();
        drop(p);
        let p = open(dir.path(), &config);
        assert_eq!(
            p.producer_states()
                .last_batch(5)
                .map(|(_, b)| b.last_sequence),
            Some(2)
        );
        drop(p);

        // Without any snapshot, producer 5 is gone with its batches: it must start over.
        std::fs::remove_file(dir.path().join(SNAPSHOT_FILE)).unwrap();
        let p = open(dir.path(), &config);
        assert_eq!(p.producer_states().last_batch(5), None);
        assert_eq!(
            append(&p, &[batch(5, 0, 3, 1)]).await,
            Err("unknown producer".into())
        );
        assert_eq!(
            p.producer_states().last_batch(6).unwrap().1.last_sequence,
            299
        );
    }

    /// Every record below the high watermark, as (offset, value).
    fn read_all(p: &Partition) -> Vec<(u64, String)> {
        let mut records = Vec::new();
        let mut next = p.log().log_start_offset();
        while next < p.log().high_watermark() {
            let read = p.read(next, 1 << 20).unwrap();
            // At least one batch per read below the high watermark: the loop ends.
            assert!(!read.batches.is_empty());
            for record in octolog_batch::decode_batches(&read.batches).unwrap() {
                if record.offset as u64 >= next.0 {
                    let value = String::from_utf8(record.value.unwrap().to_vec()).unwrap();
                    records.push((record.offset as u64, value));
                }
            }
            next = read.next_offset;
        }
        records
    }

    /// Guards idempotent appends now that the producer-state mutex is released before the
    /// fsync: concurrent producers on one partition each get distinct, dense offsets, answered
    /// only once durable, stored exactly once. (Whether they share fsyncs is not observable
    /// here; `octolog-bench --fsync always` shows it.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_idempotent_producers_are_answered_durable_and_stored_once() {
        const PRODUCERS: i64 = 4;
        const ENTRIES: i32 = 20;
        const RECORDS: usize = 2;
        let dir = tempfile::tempdir().unwrap();
        let config = config(FlushPolicy::Always);
        let p = Arc::new(open(dir.path(), &config));
        let tasks: Vec<_> = (0..PRODUCERS)
            .map(|producer| {
                let p = Arc::clone(&p);
                tokio::spawn(async move {
                    let mut answers = Vec::new();
                    for n in 0..ENTRIES {
                        let entry = batch(producer, 0, n * RECORDS as i32, RECORDS);
                        let (first, last) = append(&p, std::slice::from_ref(&entry)).await.unwrap();
                        assert!(Offset(last) < p.log().recovery_point());
                        assert!(Offset(last) < p.log().high_watermark());
                        if n % 5 == 0 {
                            assert_eq!(append(&p, &[entry]).await, Ok((first, last)));
                        }
                        answers.push((first, last, producer, n));
                    }
                    answers
                })
            })
            .collect();
        let mut answers = Vec::new();
        for task in tasks {
            answers.extend(task.await.unwrap());
        }
        answers.sort_unstable();
        let mut next = 0;
        for &(first, last, ..) in &answers {
            assert_eq!(first, next);
            assert_eq!(last - first + 1, RECORDS as u64);
            next = last + 1;
        }
        let total = PRODUCERS as u64 * ENTRIES as u64 * RECORDS as u64;
        assert_eq!(next, total);
        assert_eq!(p.log().log_end_offset(), Offset(total));
        assert_eq!(p.log().recovery_point(), Offset(total));

        // Dropped without close: each record is there once, at the offset it was answered with,
        // and retries still get their original offsets.
        drop(p);
        let p = open(dir.path(), &config);
        let mut expected = Vec::new();
        for &(first, _, producer, n) in &answers {
            for i in 0..RECORDS {
                let sequence = n as usize * RECORDS + i;
                expected.push((first + i as u64, format!("{producer}-0-{sequence}")));
            }
        }
        assert_eq!(read_all(&p), expected);
        // The state keeps each producer's last batches only.
        for &(first, last, producer, n) in answers
            .iter()
            .filter(|a| ENTRIES as usize - PRODUCER_BATCHES_CACHED <= a.3 as usize)
        {
            let entry = batch(producer, 0, n * RECORDS as i32, RECORDS);
            assert_eq!(append(&p, &[entry]).await, Ok((first, last)));
        }
        assert_eq!(p.log().log_end_offset(), Offset(total));
    }

    /// Appends `batch` as if it came on produce stream `stream`; the first and last offsets,
    /// or the error's name.
    fn append_on(
        p: &Arc<Partition>,
        stream: &OpenStream,
        batch: BytesMut,
    ) -> Result<(u64, u64), String> {
        match p
            .append_ordered(batch.freeze(), Some(stream))
            .and_then(PendingAppend::finish)
        {
            Ok(info) => Ok((info.first_offset.0, info.last_offset.0)),
            Err(BrokerError::OutOfOrderSequence { .. }) => Err("out of order".into()),
            Err(BrokerError::StaleProduceStream { .. }) => Err("stale stream".into()),
            Err(other) => Err(other.to_string()),
        }
    }

    /// Guards against storing records twice when the broker reads an ended stream's copy of a
    /// request late. The client sent sequence 1 on stream 1, which ended, and sent sequences 1
    /// and 2 again on stream 2, where sequence 1 was lost (say, refused as too large) and 2 was
    /// refused as out of order. The client then stamps them afresh under the next epoch; stream
    /// 1's copy of sequence 1, read only now, must not be stored, or its records would be there
    /// twice.
    #[tokio::test]
    async fn an_ended_stream_cannot_append_after_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path(), &config(FlushPolicy::Never));
        let streams = Arc::new(ProduceStreams::default());
        let (one, two) = (streams.open(), streams.open());
        assert_eq!(append_on(&p, &one, batch(7, 0, 0, 1)), Ok((0, 0)));
        assert_eq!(
            append_on(&p, &two, batch(7, 0, 2, 1)),
            Err("out of order".into())
        );
        assert_eq!(
            append_on(&p, &one, batch(7, 0, 1, 1)),
            Err("stale stream".into())
        );
        assert_eq!(append_on(&p, &two, batch(7, 1, 0, 1)), Ok((1, 1)));
        assert_eq!(append_on(&p, &two, batch(7, 1, 1, 1)), Ok((2, 2)));
        let values: Vec<String> = read_all(&p).into_iter().map(|(_, v)| v).collect();
        assert_eq!(values, ["7-0-0", "7-1-0", "7-1-1"]);

        // Other producers, and batches without a stream (`Produce`, `ProduceBatches`), are
        // not held to stream 2; a newer stream takes the producer over.
        assert_eq!(append_on(&p, &one, batch(8, 0, 0, 1)), Ok((3, 3)));
        assert_eq!(append(&p, &[batch(7, 1, 2, 1)]).await, Ok((4, 4)));
        let three = streams.open();
        assert_eq!(append_on(&p, &three, batch(7, 1, 3, 1)), Ok((5, 5)));
        assert_eq!(
            append_on(&p, &two, batch(7, 1, 4, 1)),
            Err("stale stream".into())
        );
        assert_eq!(p.log().log_end_offset(), Offset(6));
    }

    /// Guards that a retry is answered only once the records it points to are durable: when it
    /// arrives, the original's appender may have written them and released the mutex but not
    /// yet be through its fsync. Also shows that another producer is not held up meanwhile.
    #[tokio::test]
    async fn a_retry_is_answered_only_once_its_original_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path(), &config(FlushPolicy::Always));
        let entry = batch(1, 0, 0, 3);
        // The original, stopped where its appender has released the mutex, before its wait.
        let original = entry.clone();
        let (info, appended) = append_checked(&p, &original, None).unwrap();
        assert!(appended);
        assert_eq!(
            (info.first_offset, info.last_offset),
            (Offset(0), Offset(2))
        );
        assert_eq!(p.log().recovery_point(), Offset(0));
        assert_eq!(p.log().high_watermark(), Offset(0));

        // The retry gets the original offsets, and only once they are durable and visible.
        assert_eq!(append(&p, &[entry]).await, Ok((0, 2)));
        assert_eq!(p.log().recovery_point(), Offset(3));
        assert_eq!(p.log().high_watermark(), Offset(3));
        assert_eq!(p.log().log_end_offset(), Offset(3));

        // Another producer appends while a first one still waits; its flush covers both.
        let first = batch(2, 0, 0, 1);
        let (info, _) = append_checked(&p, &first, None).unwrap();
        assert_eq!(info.first_offset, Offset(3));
        assert_eq!(append(&p, &[batch(3, 0, 0, 1)]).await, Ok((4, 4)));
        assert_eq!(p.log().recovery_point(), Offset(5));
        wait_durable(p.log(), &info, "jobs", 0).unwrap();
        let values: Vec<String> = read_all(&p).into_iter().map(|(_, v)| v).collect();
        assert_eq!(values, ["1-0-0", "1-0-1", "1-0-2", "2-0-0", "3-0-0"]);
    }

    /// Guards that with `Always` a snapshot is not skipped because idempotent records are
    /// written but still waiting for their appender's fsync (which the mutex no longer covers):
    /// it waits for them, so it still never covers records a crash could take back.
    #[tokio::test]
    async fn snapshot_waits_for_records_not_yet_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path(), &config(FlushPolicy::Always));
        for seq in 0..20 {
            append(&p, &[batch(1, 0, seq, 1)]).await.unwrap();
        }
        let waiting = batch(2, 0, 0, 2);
        append_checked(&p, &waiting, None).unwrap();
        assert!(p.log().recovery_point() < p.log().log_end_offset());
        assert!(p.snapshot_if_due().unwrap());
        let end = p.log().log_end_offset();
        assert_eq!(p.log().recovery_point(), end);
        let snapshot = std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap();
        assert_eq!(
            ProducerStates::decode(&snapshot),
            Ok((p.producer_states(), end))
        );
    }
}
