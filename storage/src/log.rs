//! A partition log: an ordered set of segments in one folder, with the offsets vocabulary of
//! Kafka's log layer: `log_start_offset <= high_watermark <= log_end_offset`, and a
//! `recovery_point` below which every record is known to be on disk.
//!
//! Folder layout: `{base_offset:020}.log`, `.index`, `.timeindex` per segment, plus
//! `recovery-point.checkpoint` and, between a clean close and the next open, `clean-shutdown`.
//!
//! Thread-safety: `Log` is `Send + Sync`; share it in an `Arc`. One writer at a time (appends,
//! rolls, retention, truncation are serialised by the `writer` mutex, which is never held by
//! readers); any number of readers, which take the segment-list lock only long enough to clone an
//! `Arc` and then read without locks. A reader holding a segment keeps it readable even after
//! retention deletes it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use bytes::Bytes;
use octolog_batch::{BatchHeader, Offset};

use crate::checkpoint::{self, Checkpoint};
use crate::config::{FlushPolicy, LogConfig};
use crate::error::{io_err, Result, StorageError};
use crate::index::remove_if_exists;
use crate::segment::{self, OpenMode, Opened, Segment};

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    /// Offset given to the first record appended.
    pub first_offset: Offset,
    /// Offset given to the last record appended.
    pub last_offset: Offset,
    /// The log end offset after the append: the next offset to be assigned.
    pub log_end_offset: Offset,
}

/// Batches read from the log, with the bounds that were in force.
#[derive(Debug, Clone)]
pub struct ReadBatches {
    /// Whole v2 batches, back to back: a zero-copy slice of one segment's map. The first batch
    /// contains the offset asked for and may start before it. Empty at the high watermark.
    pub batches: Bytes,
    /// Where the next read continues: the offset after the last batch returned (`from` when
    /// nothing was returned).
    pub next_offset: Offset,
    /// Readers see records below this.
    pub high_watermark: Offset,
    /// The oldest offset still held.
    pub log_start_offset: Offset,
}

/// What retention deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionOutcome {
    /// Sealed segments deleted.
    pub segments_deleted: usize,
    /// Bytes of `.log` deleted.
    pub bytes_deleted: u64,
    /// The log start offset afterwards.
    pub log_start_offset: Offset,
}

/// What opening the log found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Whether the clean-shutdown marker was present.
    pub clean_shutdown: bool,
    /// Segments whose content was verified batch by batch (unclean shutdown or failed checks).
    pub segments_recovered: usize,
    /// Bytes cut off the log: a torn or corrupt tail, and whole segments past it.
    pub bytes_cut: u64,
    /// Segment files deleted because they came after damage or did not continue the offsets.
    pub segments_deleted: usize,
    /// Stray or leftover files removed (index files without a log, temp files).
    pub stray_files_removed: usize,
    /// Segments below the recovery point (flushed data) found damaged: their valid prefix is
    /// served and the rest left on disk for the operator; reads past it fail with `Corrupt`.
    pub segments_damaged: usize,
}

/// Group-commit and checkpoint state, guarded by the flush mutex.
#[derive(Debug)]
struct FlushState {
    /// When the last flush finished, for `interval-ms`.
    last_flush: Instant,
    /// The checkpoint on disk, as read on open or last written (`None`: none, or damaged). A
    /// checkpoint that would say the same is not written again: closing thousands of idle
    /// partitions would otherwise cost each a temp file and two fsyncs.
    checkpoint_on_disk: Option<Checkpoint>,
}

/// A partition log. See the module documentation.
#[derive(Debug)]
pub struct Log {
    /// The folder holding the segments.
    dir: PathBuf,
    /// Settings, validated on open.
    config: LogConfig,
    /// The segments in base-offset order; the last is the active one. Replaced whole on roll,
    /// retention and truncation so readers can keep an old list.
    segments: RwLock<Arc<Vec<Arc<Segment>>>>,
    /// The first segment's base offset, stored whenever the segment list is replaced, so that
    /// reading it takes no lock and writes no shared counter: a fetch of thousands of
    /// partitions asks every one of them.
    log_start_offset: AtomicU64,
    /// Serialises appends and structural changes. Held without I/O on the read path.
    writer: Mutex<()>,
    /// Readers see records below this. Equals `log_end_offset` except with `FlushPolicy::Always`,
    /// where it follows the flushed position.
    high_watermark: AtomicU64,
    /// The next offset to be assigned; published after the records are in the segment.
    log_end_offset: AtomicU64,
    /// Every record below this is known to be on disk.
    recovery_point: AtomicU64,
    /// Serialises flushes (group commit) and checkpoint writes. Taken after `writer`, never
    /// before it.
    flush_state: Mutex<FlushState>,
    /// Held while flushed bytes leave the page cache (`page_cache_window_bytes`), after the
    /// flush lock is released: one flusher drops at a time, and one that finds another at it
    /// skips (the next flush drops what this one would have).
    cache_drop: Mutex<()>,
    /// Set by `close`; appends fail afterwards.
    closed: AtomicBool,
    /// Set when `close` finished: flushed, checkpointed, marker written.
    closed_cleanly: AtomicBool,
    /// Set after a failed write or fsync: the state on disk is unknown, so the log takes no
    /// more writes until it is reopened (and recovered). Reads go on.
    failed: AtomicBool,
    /// What `open` found.
    report: OpenReport,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means another thread panicked on a broken invariant; the data it guards
    // is still consistent (every mutation completes before it is published).
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Log {
    /// Opens the log in `dir`, creating the folder and an empty log if needed, and recovers it
    /// if it was not closed cleanly (see `OpenReport`).
    ///
    /// # Errors
    ///
    /// `InvalidConfig` for bad settings; `Io` if the folder or a file cannot be read or
    /// written. Damaged data is not an error: it is cut off and reported.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Log> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut report = OpenReport {
            clean_shutdown: checkpoint::take_clean_shutdown_marker(&dir)?,
            ..OpenReport::default()
        };
        let checkpoint = checkpoint::read_checkpoint(&dir)?;
        let bases = list_segments(&dir, &mut report)?;
        // A new log: no segment and no checkpoint, so nothing on disk to recover or vouch for.
        let fresh = bases.is_empty() && checkpoint.is_none();
        let recovery_point = match (report.clean_shutdown, checkpoint) {
            (true, _) => u64::MAX,
            (false, Some(c)) => c.recovery_point,
            (false, None) => 0,
        };

        let clean = report.clean_shutdown;
        let last_index = bases.len().saturating_sub(1);
        let mut segments: Vec<Arc<Segment>> = Vec::with_capacity(bases.len());
        let mut i = 0;
        while i < bases.len() {
            let base = bases[i];
            let is_last = i == last_index;
            // Flushed data (below the recovery point, or everything after a clean close) is
            // trusted and, if damaged, kept; the unflushed tail is verified and cut.
            let trusted = clean || bases.get(i + 1).is_some_and(|&next| next <= recovery_point);
            if let Some(previous) = segments.last() {
                if previous.next_offset() != base && !trusted {
                    let reason = format!(
                        "segment starts at offset {base} but the one before ends at {}",
                        previous.next_offset()
                    );
                    delete_segment_files(&dir, &bases[i..], &reason, &mut report)?;
                    // The previous segment becomes the active one.
                    let previous = segments.pop().expect("checked");
                    let base = previous.base_offset();
                    drop(previous);
                    segments.push(Arc::new(reopen_active(&dir, base, &config)?));
                    break;
                }
                if previous.next_offset() != base {
                    tracing::error!(dir = %dir.display(), from = previous.next_offset(), to = base, "offsets missing between flushed segments: reads of them fail");
                }
            }
            let mode = if trusted {
                OpenMode::Trusted {
                    check_all_indexes: !clean,
                }
            } else {
                OpenMode::Recover { cut: true }
            };
            let mut opened = Segment::open(&dir, base, &config, is_last, mode)?;
            if let Opened::NeedsRecovery { reason } = opened {
                let cut = is_last || !trusted;
                tracing::warn!(dir = %dir.display(), base, %reason, cut, "segment failed its checks; verifying it batch by batch");
                opened = Segment::open(&dir, base, &config, is_last, OpenMode::Recover { cut })?;
            }
            let Opened::Ok { segment, damage } = opened else {
                unreachable!("Recover mode always opens the segment");
            };
            if !matches!(mode, OpenMode::Trusted { .. }) || damage.is_some() {
                report.segments_recovered += 1;
            }
            if clean && damage.is_none() {
                segment.mark_indexes_synced();
            }
            let segment = Arc::new(segment);
            segments.push(Arc::clone(&segment));
            if let Some((bytes, reason)) = damage {
                if trusted && !is_last {
                    tracing::error!(
                        path = %segment.log_path().display(),
                        damaged_bytes = bytes,
                        position = segment.size(),
                        first_offset_unreadable = segment.next_offset(),
                        %reason,
                        "flushed segment is damaged: serving its valid part and keeping the rest on disk"
                    );
                    report.segments_damaged += 1;
                } else {
                    tracing::warn!(
                        path = %segment.log_path().display(),
                        bytes_cut = bytes,
                        position = segment.size(),
                        first_offset_cut = segment.next_offset(),
                        %reason,
                        "cut a torn or corrupt tail off the log"
                    );
                    report.bytes_cut += bytes;
                    if !is_last {
                        let reason = format!("offsets from {} on were cut", segment.next_offset());
                        delete_segment_files(&dir, &bases[i + 1..], &reason, &mut report)?;
                        segments.pop();
                        drop(segment);
                        segments.push(Arc::new(reopen_active(&dir, base, &config)?));
                        break;
                    }
                }
            }
            i += 1;
        }
        if segments.is_empty() {
            segments.push(Arc::new(Segment::create(&dir, 0, &config)?));
            checkpoint::sync_dir(&dir)?;
        }
        let recovered_end = segments.last().expect("one segment").next_offset();
        if let Some(c) = checkpoint {
            if !clean && recovered_end < c.recovery_point {
                tracing::error!(dir = %dir.display(), recovery_point = c.recovery_point, log_end_offset = recovered_end, "records that were flushed are gone: the disk lost data");
            }
        }
        let recovering = report.segments_recovered > 0;

        let log_start_offset = segments[0].base_offset();
        let log_end_offset = segments.last().expect("one segment").next_offset();
        let log = Log {
            dir,
            config,
            segments: RwLock::new(Arc::new(segments)),
            log_start_offset: AtomicU64::new(log_start_offset),
            writer: Mutex::new(()),
            high_watermark: AtomicU64::new(log_end_offset),
            log_end_offset: AtomicU64::new(log_end_offset),
            // After a clean close everything is on disk. Otherwise what the checkpoint vouches
            // for still is (recovery only cut above it), and the flush below covers the rest.
            recovery_point: AtomicU64::new(if report.clean_shutdown && !recovering {
                log_end_offset
            } else {
                checkpoint
                    .map_or(0, |c| c.recovery_point)
                    .clamp(log_start_offset, log_end_offset)
            }),
            flush_state: Mutex::new(FlushState {
                last_flush: Instant::now(),
                checkpoint_on_disk: checkpoint,
            }),
            cache_drop: Mutex::new(()),
            closed: AtomicBool::new(false),
            closed_cleanly: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            report,
        };
        if (!log.report.clean_shutdown || recovering) && !fresh {
            // Whatever recovery kept is made durable now, so the next recovery starts here
            // (when recovery found nothing past the checkpoint, the checkpoint says so already
            // and is not rewritten). A new log has nothing to flush, and without a checkpoint
            // the next open recovers from offset 0, which is where it ends: writing one would
            // only cost two fsyncs per partition when a topic of thousands of partitions is
            // created.
            log.flush()?;
        }
        assert!(log.log_start_offset() <= log.high_watermark());
        assert!(log.high_watermark() <= log.log_end_offset());
        tracing::debug!(dir = %log.dir.display(), log_start_offset, log_end_offset, report = ?log.report, "opened log");
        Ok(log)
    }

    /// The folder holding the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The settings the log runs with.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// What `open` found and did.
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// The oldest offset still held.
    pub fn log_start_offset(&self) -> Offset {
        Offset(self.log_start_offset.load(Ordering::Acquire))
    }

    /// The next offset to be assigned.
    pub fn log_end_offset(&self) -> Offset {
        Offset(self.log_end_offset.load(Ordering::Acquire))
    }

    /// Readers see records below this offset.
    pub fn high_watermark(&self) -> Offset {
        Offset(self.high_watermark.load(Ordering::Acquire))
    }

    /// Every record below this offset is known to be on disk.
    pub fn recovery_point(&self) -> Offset {
        Offset(self.recovery_point.load(Ordering::Acquire))
    }

    /// How many segments the log has.
    pub fn segment_count(&self) -> usize {
        self.segments().len()
    }

    /// Bytes of `.log` in all segments.
    pub fn size_bytes(&self) -> u64 {
        self.segments().iter().map(|s| u64::from(s.size())).sum()
    }

    /// `Closed` or `Failed` if the log takes no writes.
    fn check_writable(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(StorageError::Failed {
                path: self.dir.clone(),
            });
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed {
                path: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// Puts the log in the failed state if `result` is an error: after a failed write or
    /// fsync the state on disk is unknown (and a retried fsync may lie), so only a reopen,
    /// which recovers, may write again.
    fn fail_on_error<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            if !self.failed.swap(true, Ordering::AcqRel) {
                tracing::error!(dir = %self.dir.display(), error = %e, "log stops taking writes until it is reopened");
            }
        }
        result
    }

    fn segments(&self) -> Arc<Vec<Arc<Segment>>> {
        Arc::clone(&self.segments.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn replace_segments(&self, segments: Vec<Arc<Segment>>) {
        assert!(!segments.is_empty());
        let log_start_offset = segments[0].base_offset();
        let mut list = self.segments.write().unwrap_or_else(|e| e.into_inner());
        *list = Arc::new(segments);
        // Under the list's lock, so the two never disagree for long; readers of either are
        // racy snapshots anyway.
        self.log_start_offset
            .store(log_start_offset, Ordering::Release);
    }

    /// Appends whole v2 record batches, back to back in `batches`, and gives them the next
    /// offsets: each batch is written with its new base offset (outside its CRC) in place of
    /// its own, gathered by `pwritev`, so `batches` is neither copied nor changed (it may be a
    /// slice of the request it came in). Every batch is validated (structure, magic, CRC-32C,
    /// size) before anything is written.
    ///
    /// With `FlushPolicy::Always` it returns once the batches are on disk; concurrent appends
    /// share one `fdatasync`. It is `append_unflushed` followed by `flush_to`.
    ///
    /// # Errors
    ///
    /// `EmptyAppend`, `InvalidBatch` or `BatchTooLarge` for bad input, with the log untouched;
    /// `Closed` after `close`; `Io` if the disk fails (batches appended before the failure stay),
    /// and as `flush_to`.
    pub fn append(&self, batches: &[u8]) -> Result<AppendInfo> {
        let info = self.append_unflushed(batches)?;
        if self.config.flush == FlushPolicy::Always {
            self.flush_to(info.log_end_offset)?;
        }
        Ok(info)
    }

    /// Appends and validates exactly like `append`, but never flushes, whatever the flush
    /// policy, so that a caller can release its own locks before it waits for the disk: it
    /// returns once the batches are in the segment (the page cache).
    ///
    /// With `FlushPolicy::Always` the records are not visible to readers (they stay at or
    /// above the high watermark) until someone flushes them: the caller's own
    /// `flush_to(info.log_end_offset)`, or a concurrent `flush_to`, `append`, roll, `flush` or
    /// `close`. A caller must call `flush_to` before it acknowledges them to anyone. With the
    /// other policies they are visible at once, as after `append`.
    ///
    /// # Errors
    ///
    /// As `append`, except that it never waits for a flush.
    pub fn append_unflushed(&self, batches: &[u8]) -> Result<AppendInfo> {
        self.validate(batches)?;
        let _writer = lock(&self.writer);
        self.check_writable()?;
        let appended = self.append_locked(batches);
        self.fail_on_error(appended)
    }

    fn validate(&self, batches: &[u8]) -> Result<()> {
        if batches.is_empty() {
            return Err(StorageError::EmptyAppend);
        }
        let mut position = 0;
        while position < batches.len() {
            let header = octolog_batch::validate_batch(&batches[position..])
                .map_err(|source| StorageError::InvalidBatch { position, source })?;
            if header.size() > self.config.batch_bytes_max as usize {
                return Err(StorageError::BatchTooLarge {
                    size: header.size(),
                    max: self.config.batch_bytes_max as usize,
                });
            }
            position += header.size();
        }
        Ok(())
    }

    /// Appends validated batches. Called with the writer lock held.
    fn append_locked(&self, batches: &[u8]) -> Result<AppendInfo> {
        let first_offset = self.log_end_offset.load(Ordering::Acquire);
        let mut records = 0u64;
        let mut at = 0usize;
        while at < batches.len() {
            let header = BatchHeader::parse(&batches[at..]).expect("validated");
            records += header.record_count as u64;
            at += header.size();
        }
        if first_offset
            .checked_add(records)
            .is_none_or(|end| end > i64::MAX as u64)
        {
            return Err(StorageError::InvalidBatch {
                position: 0,
                source: octolog_batch::BatchError::RecordMalformed {
                    index: 0,
                    reason: "the records would take the log past the largest offset",
                },
            });
        }
        let mut next_offset = first_offset;
        let mut active = Arc::clone(self.segments().last().expect("one segment"));
        if active.is_due_by_age(self.config.segment_ms) {
            active = self.roll_locked()?;
        }
        // Batches go to the active segment in chunks, a roll between two; the segment writes
        // each batch with its base offset (the caller's bytes are left as they are).
        let (mut chunk_start, mut chunk_batches, mut position) = (0usize, 0usize, 0usize);
        let mut chunk_first_offset = first_offset;
        while position < batches.len() {
            let header = BatchHeader::parse(&batches[position..]).expect("validated");
            let last_offset = next_offset + header.last_offset_delta as u64;
            let chunk_bytes = position + header.size() - chunk_start;
            if !active.has_room(chunk_bytes, chunk_batches + 1, last_offset) {
                if chunk_batches > 0 {
                    active.append(&batches[chunk_start..position], chunk_first_offset)?;
                    self.publish_log_end_offset(next_offset);
                }
                (chunk_start, chunk_batches, chunk_first_offset) = (position, 0, next_offset);
                active = self.roll_locked()?;
                assert!(active.has_room(header.size(), 1, last_offset));
            }
            next_offset = last_offset + 1;
            position += header.size();
            chunk_batches += 1;
        }
        active.append(&batches[chunk_start..], chunk_first_offset)?;
        self.publish_log_end_offset(next_offset);
        Ok(AppendInfo {
            first_offset: Offset(first_offset),
            last_offset: Offset(next_offset - 1),
            log_end_offset: Offset(next_offset),
        })
    }

    fn publish_log_end_offset(&self, log_end_offset: u64) {
        self.log_end_offset.store(log_end_offset, Ordering::Release);
        if self.config.flush != FlushPolicy::Always {
            self.high_watermark.store(log_end_offset, Ordering::Release);
        }
    }

    /// Seals the active segment and starts a new one at the log end offset, unless the active
    /// segment is empty. Called with the writer lock held.
    fn roll_locked(&self) -> Result<Arc<Segment>> {
        let segments = self.segments();
        let active = segments.last().expect("one segment");
        if active.size() == 0 {
            return Ok(Arc::clone(active));
        }
        let cut = active.seal()?;
        if self.config.flush == FlushPolicy::Never {
            // The sealed segment's trimmed indexes are trusted after a clean close: make them
            // durable now (two small files per roll) rather than all at once on close.
            active.flush_indexes()?;
            if cut {
                // Under the flush lock, so that a flush in progress has either stored its
                // recovery point or will sync this segment after the cut.
                let _flushing = lock(&self.flush_state);
                if active.next_offset() <= self.recovery_point.load(Ordering::Acquire) {
                    // Its records were flushed before the cut, so `close` will not sync this
                    // segment again: make the trimmed length durable now, so that a clean open
                    // finds the file ending where its data ends (else it scans it for nothing).
                    active.flush(false)?;
                }
            }
        } else {
            active.flush(true)?;
        }
        let base_offset = active.next_offset();
        assert!(base_offset == self.log_end_offset.load(Ordering::Acquire));
        let segment = Arc::new(Segment::create(&self.dir, base_offset, &self.config)?);
        let mut list = Vec::with_capacity(segments.len() + 1);
        list.extend(segments.iter().cloned());
        list.push(Arc::clone(&segment));
        self.replace_segments(list);
        tracing::debug!(dir = %self.dir.display(), base_offset, "rolled to a new segment");
        if self.config.flush != FlushPolicy::Never {
            checkpoint::sync_dir(&self.dir)?;
            self.flush()?;
        }
        Ok(segment)
    }

    /// Seals the active segment and starts a new one, unless the active segment is empty.
    ///
    /// # Errors
    ///
    /// `Closed` after `close`; `Io` if a file cannot be written.
    pub fn roll(&self) -> Result<()> {
        let _writer = lock(&self.writer);
        self.check_writable()?;
        let rolled = self.roll_locked();
        self.fail_on_error(rolled).map(drop)
    }

    /// Returns once every record in `[log_start_offset, end)` is on disk (below the recovery
    /// point) and, with `FlushPolicy::Always`, visible to readers. A no-op when they already
    /// are, whatever has happened to the log since. Otherwise it flushes, sharing the work with
    /// concurrent callers: whoever holds the flush lock flushes everything appended so far, so
    /// the callers queued behind it usually find their records already flushed (group commit).
    ///
    /// `end` is meant to come from an append (`AppendInfo::log_end_offset`, or
    /// `last_offset + 1`). It does not write the recovery-point checkpoint (`flush` does); a
    /// crash loses nothing by that, recovery just scans further.
    ///
    /// # Errors
    ///
    /// `Failed` if the log failed before the records were flushed, and `Io` if this flush
    /// fails (the log fails then, and takes no more writes until reopened): either way the
    /// records must not be acknowledged. `OffsetOutOfRange` if `end` is past the log end
    /// offset, which only happens when `truncate_to` cut the records meanwhile.
    pub fn flush_to(&self, end: Offset) -> Result<()> {
        let mut state = lock(&self.flush_state);
        if end.0 <= self.recovery_point.load(Ordering::Acquire) {
            return Ok(());
        }
        if self.failed.load(Ordering::Acquire) {
            return Err(StorageError::Failed {
                path: self.dir.clone(),
            });
        }
        // Failed before the lock is released: a caller queued behind must not retry the fsync.
        let flushed = self.fail_on_error(self.flush_locked(&mut state));
        drop(state);
        self.drop_cached_behind(flushed?);
        let recovery_point = self.recovery_point.load(Ordering::Acquire);
        if recovery_point < end.0 {
            return Err(StorageError::OffsetOutOfRange {
                offset: end,
                log_start_offset: self.log_start_offset(),
                log_end_offset: Offset(recovery_point),
            });
        }
        Ok(())
    }

    /// Flushes everything appended so far. Called with the flush lock held. Returns what this
    /// flush synced, for `drop_cached_behind` to run once the flush lock is released (so that
    /// the callers queued behind it are not kept waiting for page cache advice).
    fn flush_locked(&self, state: &mut FlushState) -> Result<Option<Synced>> {
        let end = self.log_end_offset.load(Ordering::Acquire);
        let recovery_point = self.recovery_point.load(Ordering::Acquire);
        let mut flushed = None;
        if recovery_point < end {
            let segments = self.segments();
            let active_base = segments.last().expect("one segment").base_offset();
            // Each segment synced now, with its size before the sync (what the sync covers).
            let mut synced = Vec::new();
            for segment in segments.iter().filter(|s| s.next_offset() > recovery_point) {
                let synced_size = segment.size();
                segment.flush(segment.base_offset() != active_base)?;
                synced.push((segment.base_offset(), synced_size));
            }
            self.recovery_point.store(end, Ordering::Release);
            if self.config.flush == FlushPolicy::Always {
                self.high_watermark.fetch_max(end, Ordering::AcqRel);
            }
            flushed = Some(Synced { segments, synced });
        }
        state.last_flush = Instant::now();
        Ok(flushed)
    }

    /// With a `page_cache_window_bytes`, drops what `synced` made droppable from the page cache
    /// (`drop_cached_behind` below). Called without the flush lock; skipped while another
    /// caller is dropping, and then left to the next flush (a partition that goes idle keeps
    /// those bytes cached until the kernel reclaims them).
    fn drop_cached_behind(&self, synced: Option<Synced>) {
        let (Some(keep_bytes), Some(synced)) = (self.config.page_cache_window_bytes, synced) else {
            return;
        };
        // Poisoned only by a panic in an earlier drop, which left nothing half done.
        let _dropping = match self.cache_drop.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        drop_cached_behind(&synced.segments, &synced.synced, keep_bytes);
    }

    /// Flushes every record appended so far to disk and writes the recovery-point checkpoint.
    ///
    /// # Errors
    ///
    /// `Io` if a file cannot be synced or the checkpoint written.
    pub fn flush(&self) -> Result<()> {
        let mut state = lock(&self.flush_state);
        if self.failed.load(Ordering::Acquire) {
            return Err(StorageError::Failed {
                path: self.dir.clone(),
            });
        }
        let flushed = self.flush_locked(&mut state);
        let synced = self.fail_on_error(flushed)?;
        let checkpointed = self.write_checkpoint(&mut state);
        drop(state);
        self.drop_cached_behind(synced);
        checkpointed
    }

    /// Writes the recovery-point checkpoint, unless the one on disk says the same already.
    /// Called with the flush lock held.
    fn write_checkpoint(&self, state: &mut FlushState) -> Result<()> {
        let checkpoint = Checkpoint {
            recovery_point: self.recovery_point.load(Ordering::Acquire),
            log_start_offset: self.log_start_offset().0,
        };
        if state.checkpoint_on_disk == Some(checkpoint) {
            return Ok(());
        }
        // Forgotten first: if the write fails half-way, what is on disk is unknown.
        state.checkpoint_on_disk = None;
        checkpoint::write_checkpoint(&self.dir, checkpoint)?;
        state.checkpoint_on_disk = Some(checkpoint);
        Ok(())
    }

    /// With `FlushPolicy::IntervalMs(n)`, flushes if unflushed records exist and the last flush
    /// was at least `n` ms ago. Returns whether it flushed. The owner of the log calls this
    /// from a timer.
    ///
    /// # Errors
    ///
    /// As `flush`.
    pub fn flush_if_due(&self) -> Result<bool> {
        let FlushPolicy::IntervalMs(interval_ms) = self.config.flush else {
            return Ok(false);
        };
        let due = {
            let state = lock(&self.flush_state);
            state.last_flush.elapsed().as_millis() >= u128::from(interval_ms)
                && self.recovery_point() < self.log_end_offset()
        };
        if due {
            self.flush()?;
        }
        Ok(due)
    }

    /// Whole batches starting with the one that contains `from`, as a zero-copy slice of the
    /// mapped segment: as many as fit in `bytes_max` but at least one, so a consumer never
    /// stalls on a large batch. Batches come from one segment; the next read continues. Empty
    /// when `from` is at the high watermark.
    ///
    /// Only the batches' structure is checked on this path (length, magic, contiguous offsets);
    /// their CRC-32C was checked on append and on recovery, and consumers check it again.
    ///
    /// # Errors
    ///
    /// `OffsetOutOfRange` when `from` is below the log start offset or above the log end offset;
    /// `Corrupt` if the segment's bytes are not a chain of batches.
    pub fn read(&self, from: Offset, bytes_max: usize) -> Result<ReadBatches> {
        let high_watermark = self.high_watermark.load(Ordering::Acquire);
        let log_end_offset = self.log_end_offset.load(Ordering::Acquire);
        let segments = self.segments();
        let log_start_offset = segments[0].base_offset();
        if from.0 < log_start_offset || log_end_offset.max(high_watermark) < from.0 {
            return Err(StorageError::OffsetOutOfRange {
                offset: from,
                log_start_offset: Offset(log_start_offset),
                log_end_offset: Offset(log_end_offset),
            });
        }
        let (batches, next_offset) = if from.0 < high_watermark {
            let index = segments.partition_point(|s| s.base_offset() <= from.0) - 1;
            let segment = &segments[index];
            if from.0 >= segment.next_offset() {
                if let Some(next) = segments.get(index + 1) {
                    // Only a damaged flushed segment leaves such a hole (see `OpenReport`).
                    return Err(StorageError::Corrupt {
                        path: segment.log_path().to_path_buf(),
                        position: u64::from(segment.size()),
                        reason: format!(
                            "offsets [{}, {}) are damaged or missing on disk; reads can resume at {}",
                            segment.next_offset(),
                            next.base_offset(),
                            next.base_offset()
                        ),
                    });
                }
            }
            segment.read(from.0, bytes_max, high_watermark)?
        } else {
            (Bytes::new(), from.0)
        };
        Ok(ReadBatches {
            batches,
            next_offset: Offset(next_offset),
            high_watermark: Offset(high_watermark),
            log_start_offset: Offset(log_start_offset),
        })
    }

    /// The offset of the first record, in offset order, whose timestamp is >= `timestamp_ms`,
    /// among the records below the high watermark; `None` if there is none.
    ///
    /// # Errors
    ///
    /// `Corrupt` if a segment's bytes are not a chain of batches.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<Offset>> {
        let high_watermark = self.high_watermark.load(Ordering::Acquire);
        for segment in self.segments().iter() {
            if segment.base_offset() >= high_watermark {
                break;
            }
            if let Some(offset) = segment.offset_for_timestamp(timestamp_ms, high_watermark)? {
                return Ok(Some(Offset(offset)));
            }
        }
        Ok(None)
    }

    /// Deletes the oldest sealed segments while their newest record is older than
    /// `retention_ms` before `now_ms`, or while the log without them is still at least
    /// `retention_bytes` long; never the active segment. Advances the log start offset.
    ///
    /// # Errors
    ///
    /// `Io` if a file cannot be deleted; the segments are already gone from the log then.
    pub fn apply_retention(&self, now_ms: i64) -> Result<RetentionOutcome> {
        let mut size: Option<u64> = None;
        self.delete_oldest_segments(|segment, segments| {
            let size =
                size.get_or_insert_with(|| segments.iter().map(|s| u64::from(s.size())).sum());
            let expired = self.config.retention_ms.is_some_and(|ms| {
                let ms = i64::try_from(ms).unwrap_or(i64::MAX);
                segment
                    .max_timestamp()
                    .is_some_and(|t| t < now_ms.saturating_sub(ms))
            });
            let oversized = self
                .config
                .retention_bytes
                .is_some_and(|max| *size - u64::from(segment.size()) >= max);
            if expired || oversized {
                *size -= u64::from(segment.size());
                true
            } else {
                false
            }
        })
    }

    /// Deletes the oldest sealed segments whose records all lie below `offset`, advancing the
    /// log start offset to the base offset of the first segment kept (Kafka's
    /// `deleteOldSegments` for a new log start offset). Records at and above `offset` are
    /// never touched, nor is the active segment; the new log start offset may stay below
    /// `offset`, since only whole segments go.
    ///
    /// # Errors
    ///
    /// `Closed` after `close`; `Io` if a file cannot be deleted (the segments are already gone
    /// from the log then).
    pub fn delete_segments_before(&self, offset: Offset) -> Result<RetentionOutcome> {
        self.delete_oldest_segments(|segment, _| segment.next_offset() <= offset.0)
    }

    /// Deletes sealed segments from the oldest on while `doomed(segment, all segments)` says
    /// so, stopping at the first it spares, at the active segment, or at a segment not yet
    /// below the high watermark.
    fn delete_oldest_segments(
        &self,
        mut doomed: impl FnMut(&Arc<Segment>, &[Arc<Segment>]) -> bool,
    ) -> Result<RetentionOutcome> {
        let _writer = lock(&self.writer);
        self.check_writable()?;
        let segments = self.segments();
        let mut outcome = RetentionOutcome::default();
        let high_watermark = self.high_watermark.load(Ordering::Acquire);
        for segment in &segments[..segments.len() - 1] {
            if segment.next_offset() > high_watermark {
                // Not yet visible to readers (unflushed with `always`): never delete it.
                break;
            }
            if !doomed(segment, &segments) {
                break;
            }
            outcome.segments_deleted += 1;
            outcome.bytes_deleted += u64::from(segment.size());
        }
        let kept = segments[outcome.segments_deleted..].to_vec();
        outcome.log_start_offset = Offset(kept[0].base_offset());
        if outcome.segments_deleted == 0 {
            return Ok(outcome);
        }
        assert!(outcome.log_start_offset.0 <= high_watermark);
        self.replace_segments(kept);
        for segment in &segments[..outcome.segments_deleted] {
            segment.delete()?;
        }
        tracing::info!(dir = %self.dir.display(), segments = outcome.segments_deleted, bytes = outcome.bytes_deleted, log_start_offset = outcome.log_start_offset.0, "retention deleted segments");
        let mut flush = lock(&self.flush_state);
        self.write_checkpoint(&mut flush)?;
        Ok(outcome)
    }

    /// Removes every record at `offset` and above, and returns the new log end offset. The cut
    /// falls at a batch boundary: if `offset` is inside a batch, the whole batch goes, so the
    /// new log end offset may be below `offset`. No-op at or past the log end offset.
    ///
    /// The truncated segment is rewritten to a new file rather than shrunk in place, so readers
    /// holding slices of it are unaffected.
    ///
    /// # Errors
    ///
    /// `OffsetOutOfRange` below the log start offset; `Closed` after `close`; `Io` on disk
    /// failure.
    pub fn truncate_to(&self, offset: Offset) -> Result<Offset> {
        let _writer = lock(&self.writer);
        self.check_writable()?;
        let log_end_offset = self.log_end_offset.load(Ordering::Acquire);
        if offset.0 >= log_end_offset {
            return Ok(Offset(log_end_offset));
        }
        let segments = self.segments();
        let log_start_offset = segments[0].base_offset();
        if offset.0 < log_start_offset {
            return Err(StorageError::OffsetOutOfRange {
                offset,
                log_start_offset: Offset(log_start_offset),
                log_end_offset: Offset(log_end_offset),
            });
        }
        let mut flush_state = lock(&self.flush_state);
        let index = segments.partition_point(|s| s.base_offset() <= offset.0) - 1;
        let segment = &segments[index];
        let (keep_bytes, new_end) = segment.cut_point(offset.0)?;
        // Check what is kept before anything is changed: it must be whole, valid batches.
        for item in octolog_batch::batches_verified(segment.prefix(keep_bytes)) {
            if let Err(e) = item {
                return Err(StorageError::Corrupt {
                    path: segment.log_path().to_path_buf(),
                    position: 0,
                    reason: format!("cannot truncate: the data kept is damaged: {e}"),
                });
            }
        }
        let truncated =
            self.truncate_segment_locked(&segments, index, keep_bytes, new_end, &mut flush_state);
        self.fail_on_error(truncated)?;
        tracing::info!(dir = %self.dir.display(), offset = offset.0, log_end_offset = new_end, "truncated log");
        Ok(Offset(new_end))
    }

    /// Replaces segment `index` by its first `keep_bytes` and deletes later segments. Called
    /// with the writer and flush locks held; any error leaves the log failed.
    fn truncate_segment_locked(
        &self,
        segments: &[Arc<Segment>],
        index: usize,
        keep_bytes: usize,
        new_end: u64,
        flush_state: &mut FlushState,
    ) -> Result<()> {
        let segment = &segments[index];
        // Write the kept prefix to a new file and rename it over the old one.
        let base = segment.base_offset();
        let log_path = self.dir.join(segment::file_name(base, "log"));
        let swap_path = self
            .dir
            .join(format!("{}.swap", segment::file_name(base, "log")));
        fs::write(&swap_path, segment.prefix(keep_bytes)).map_err(io_err(&swap_path))?;
        fs::File::open(&swap_path)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&swap_path))?;
        fs::rename(&swap_path, &log_path).map_err(io_err(&log_path))?;
        for extension in ["index", "timeindex"] {
            remove_if_exists(&self.dir.join(segment::file_name(base, extension)))?;
        }
        for later in &segments[index + 1..] {
            later.delete()?;
        }
        checkpoint::sync_dir(&self.dir)?;
        let reopened = reopen_active(&self.dir, base, &self.config)?;
        assert!(reopened.next_offset() == new_end);
        let mut list: Vec<Arc<Segment>> = segments[..index].to_vec();
        list.push(Arc::new(reopened));
        self.replace_segments(list);
        self.log_end_offset.store(new_end, Ordering::Release);
        self.high_watermark.fetch_min(new_end, Ordering::AcqRel);
        self.recovery_point.fetch_min(new_end, Ordering::AcqRel);
        // Nothing is dropped from the page cache here: the next flush does it.
        self.flush_locked(flush_state)?;
        self.write_checkpoint(flush_state)
    }

    /// Flushes everything, seals the active segment's indexes, writes the checkpoint and the
    /// clean-shutdown marker. Later appends fail with `Closed`; reads keep working. Idempotent.
    ///
    /// # Errors
    ///
    /// `Io` on disk failure; the marker is then not written and the next open recovers.
    pub fn close(&self) -> Result<()> {
        let _writer = lock(&self.writer);
        self.closed.store(true, Ordering::Release);
        if self.closed_cleanly.load(Ordering::Acquire) {
            return Ok(());
        }
        if self.failed.load(Ordering::Acquire) {
            // The state on disk is unknown: leave no marker, so the next open recovers.
            return Err(StorageError::Failed {
                path: self.dir.clone(),
            });
        }
        let segments = self.segments();
        let active = segments.last().expect("one segment");
        let mut state = lock(&self.flush_state);
        // A failure here fails the log: an appender that wrote before the close and waits in
        // `flush_to` must get an error, not a retried fsync that Linux may report as a success
        // after the first one failed (the dirty pages it lost are not written again).
        let synced = active.seal().and_then(|cut| {
            // `flush_locked` syncs the active segment's `.log` when records are unflushed.
            let unflushed = self.recovery_point.load(Ordering::Acquire)
                < self.log_end_offset.load(Ordering::Acquire);
            self.flush_locked(&mut state)?;
            if cut && !unflushed {
                // Sealing cut the room reserved past the data off after the last fdatasync:
                // make the new length durable, so that a clean open finds the file ending
                // where its data ends.
                active.flush(false)?;
            }
            for segment in segments.iter() {
                if !segment.indexes_synced() {
                    segment.flush(true)?;
                }
            }
            Ok(())
        });
        self.fail_on_error(synced)?;
        self.write_checkpoint(&mut state)?;
        checkpoint::write_clean_shutdown_marker(&self.dir)?;
        self.closed_cleanly.store(true, Ordering::Release);
        tracing::debug!(dir = %self.dir.display(), "closed log cleanly");
        Ok(())
    }

    /// Deletes the whole log: every segment and the folder. Readers holding slices keep them.
    ///
    /// # Errors
    ///
    /// `Io` if the folder cannot be removed.
    pub fn delete(self) -> Result<()> {
        let _writer = lock(&self.writer);
        self.closed.store(true, Ordering::Release);
        fs::remove_dir_all(&self.dir).map_err(io_err(&self.dir))
    }
}

/// Opens segment `base`, whose data was just validated, as the active segment.
fn reopen_active(dir: &Path, base: u64, config: &LogConfig) -> Result<Segment> {
    let mut opened = Segment::open(
        dir,
        base,
        config,
        true,
        OpenMode::Trusted {
            check_all_indexes: true,
        },
    )?;
    if let Opened::NeedsRecovery { reason } = opened {
        tracing::warn!(dir = %dir.display(), base, %reason, "segment failed its checks on reopening; verifying it");
        opened = Segment::open(dir, base, config, true, OpenMode::Recover { cut: true })?;
    }
    match opened {
        Opened::Ok { segment, .. } => Ok(segment),
        Opened::NeedsRecovery { .. } => unreachable!("Recover mode always opens the segment"),
    }
}

/// Lists the base offsets of the segments in `dir`, in order, and removes stray index files
/// (no `.log` beside them) and temp files left by an interrupted write.
fn list_segments(dir: &Path, report: &mut OpenReport) -> Result<Vec<u64>> {
    let mut logs = Vec::new();
    let mut indexes = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if let Some(base) = segment::parse_file_name(&name, "log") {
            logs.push(base);
        } else if segment::parse_file_name(&name, "index").is_some()
            || segment::parse_file_name(&name, "timeindex").is_some()
        {
            indexes.push(name);
        } else if name.ends_with(".tmp") || name.ends_with(".swap") {
            tracing::warn!(dir = %dir.display(), file = name, "removing leftover temp file");
            remove_if_exists(&dir.join(&name))?;
            report.stray_files_removed += 1;
        }
    }
    logs.sort_unstable();
    for name in indexes {
        let base = segment::parse_file_name(&name, "index")
            .or_else(|| segment::parse_file_name(&name, "timeindex"))
            .expect("matched above");
        if logs.binary_search(&base).is_err() {
            tracing::warn!(dir = %dir.display(), file = name, "removing index file that has no log");
            remove_if_exists(&dir.join(&name))?;
            report.stray_files_removed += 1;
        }
    }
    Ok(logs)
}

/// Deletes the files of the segments with these base offsets, logging why.
fn delete_segment_files(
    dir: &Path,
    bases: &[u64],
    reason: &str,
    report: &mut OpenReport,
) -> Result<()> {
    for &base in bases {
        let log_path = dir.join(segment::file_name(base, "log"));
        // An active segment's file may end in reserved zeros, which are not data.
        let bytes = segment::bytes_before_zero_tail(&log_path);
        tracing::warn!(path = %log_path.display(), bytes, reason, "deleting segment past the damage");
        report.bytes_cut += bytes;
        report.segments_deleted += 1;
        for extension in ["log", "index", "timeindex"] {
            remove_if_exists(&dir.join(segment::file_name(base, extension)))?;
        }
    }
    Ok(())
}

/// What one flush synced: the segments as they were, and for each segment it synced, that
/// segment's size before the sync (what the sync covers).
#[derive(Debug)]
struct Synced {
    segments: Arc<Vec<Arc<Segment>>>,
    synced: Vec<(u64, u32)>,
}

/// Drops from the page cache the log's bytes that are on disk and more than `keep_bytes` behind
/// its end (`Segment::drop_cached`), newest segment first. `synced` holds the segments synced
/// just now with their size before that sync; every other segment is on disk whole. It stops at
/// the first sealed segment wholly behind the window with nothing left to drop: older ones were
/// dropped whole before it.
fn drop_cached_behind(segments: &[Arc<Segment>], synced: &[(u64, u32)], keep_bytes: u64) {
    let mut after = 0u64;
    for (i, segment) in segments.iter().enumerate().rev() {
        let synced_size = synced
            .iter()
            .find(|&&(base, _)| base == segment.base_offset())
            .map_or_else(|| segment.size(), |&(_, size)| size);
        let keep_here = keep_bytes.saturating_sub(after);
        // Only the active (last) segment grows, and its sync may not cover all of it.
        let whole = i + 1 < segments.len() && keep_here == 0;
        // An empty sealed segment (kept with a damaged tail) has nothing to say of older ones.
        if !segment.drop_cached(synced_size, keep_here, whole) && whole && segment.size() > 0 {
            break;
        }
        after += u64::from(segment.size());
    }
}
