//! One segment of a partition log: a `.log` file of whole v2 record batches, back to back, with
//! its sparse `.index` and its `.timeindex` (format in `index.rs` and `storage/FORMAT.md`).
//!
//! The `.log` file's first `size` bytes are valid batches. The file of a sealed segment, and of
//! every segment after a clean close, ends where its data ends. The active segment's file is
//! longer: room ahead of `size` is reserved with `fallocate` in chunks that grow from
//! `RESERVE_FIRST_BYTES` to `RESERVE_MAX_BYTES`, and reads as zeros. Sealing cuts that zero
//! tail off, and recovery after a crash trims it quietly: a batch is never all zeros, so zeros
//! past the last valid batch are reserved room, not data.
//!
//! Appends are written with positional writes (`pwritev`) at `size`, into the reserved room: the
//! file system then has the blocks already and skips its delayed-allocation work per write
//! (measured: ~15 KiB appends +12-18%, ~256 KiB appends +35%), and a full disk fails the
//! reservation before any byte is written. Where the file system cannot `fallocate`, appends
//! just grow the file. A busy segment of small appends (at least 10 MiB/s, 64 KiB or less per
//! append) also writes zeros over each 1 MiB it reserves, unless flushes come more often than
//! once a second: aligned 64 KiB writes that put the room into the page cache in 64 KiB folios,
//! so that the appends after them overwrite cached pages (`prefill`: 16 KiB appends 1.6x
//! faster). The file is read through a read-only shared memory map of `capacity` bytes made
//! once when the segment is created or opened. (Copying appends into a writable map instead,
//! with the pages ahead pre-faulted by `MADV_POPULATE_WRITE`, was measured slower on fresh
//! segment files: every page then costs a page fault, a zeroed page and a `page_mkwrite`, where
//! `pwrite` fills large folios; see `BENCHMARKS.md`.)
//!
//! A reader only ever forms slices below the `size` it loaded, and bytes below `size` never
//! change: the writer stores only at or past `size`, and the file is never shrunk below `size`
//! while the segment is in use (`Log::truncate_to` writes a new file instead). So a slice handed
//! out stays valid and unchanged for as long as its holder keeps it, even after the segment is
//! deleted by retention: the map is reference-counted and an unlinked file stays mapped.
//!
//! Thread-safety: `Segment` is `Sync`. Appends, sealing and rebuilding come from the log's single
//! writer; reads come from any thread at any time and take no lock.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use memmap2::{MmapOptions, MmapRaw};
use octolog_batch::{BatchHeader, Compression};

use crate::config::{FlushPolicy, LogConfig};
use crate::error::{io_err, Result, StorageError};
use crate::index::{remove_if_exists, OffsetIndex, TimeIndex};

/// Marks "no record yet" in `max_timestamp`.
const NO_TIMESTAMP: i64 = i64::MIN;

/// Room the first reservation of an active segment's `.log` adds past its data. Each later
/// reservation adds twice as much as the one before, up to `RESERVE_MAX_BYTES`: a partition that
/// takes a few records costs 64 KiB of disk until its segment is sealed, and a busy one
/// reserves (one `fallocate`) once per MiB. Reservations end on a multiple of this.
const RESERVE_FIRST_BYTES: usize = 64 << 10;
/// The most one reservation adds: the largest zero tail a crash can leave (plus one append), and
/// the most disk an idle active segment holds beyond its data (10,000 partitions: 10 GiB at
/// worst). Measured: one `fallocate` per MiB costs nothing visible in `append/never`.
const RESERVE_MAX_BYTES: usize = 1 << 20;
/// Bytes of file compared at a time when looking for the end of a zero tail.
const ZEROS_BYTES: usize = 64 << 10;
/// A segment whose full-step reservations (`RESERVE_MAX_BYTES`) come at most this far apart,
/// i.e. one taking at least 10 MiB/s, writes zeros over each new one (`Segment::prefill`).
/// Slower segments gain little from it, and under `interval-ms` the zeros still ahead of the
/// data at a flush go to disk too: for a busy segment that is at most one step per flush.
const PREFILL_INTERVAL_MAX: Duration = Duration::from_millis(100);
/// Prefill only where flushes are at least this far apart (or never come): a flush writes the
/// zeros still ahead of the data to disk (at most one 1 MiB step per busy segment), and then
/// the data over them again. At 10 MiB/s or more and one flush a second that is at most 10%
/// more bytes written; with a flush every 100 ms it could be twice the data.
const PREFILL_FLUSH_INTERVAL_MS_MIN: u64 = 1000;
/// ... and whose appends are small: at least this many went into the previous step (64 KiB or
/// less on average). Large appends make large folios themselves: 256 KiB appends went from
/// 57-60 us to 67-75 us with the zeros written first, where 16 KiB ones went from 8.2-8.6 us to
/// 5.2-5.5 us.
const PREFILL_APPENDS_MIN: u32 = (RESERVE_MAX_BYTES / ZEROS_BYTES) as u32;
const _: () = assert!(RESERVE_FIRST_BYTES <= RESERVE_MAX_BYTES);
const _: () = assert!(RESERVE_MAX_BYTES.is_power_of_two());
const _: () = assert!(RESERVE_MAX_BYTES.is_multiple_of(RESERVE_FIRST_BYTES));

/// A block of zeros for finding a zero tail.
static ZEROS: [u8; ZEROS_BYTES] = [0; ZEROS_BYTES];

/// The file name of a segment file: the base offset in 20 digits, so `ls` sorts them.
pub(crate) fn file_name(base_offset: u64, extension: &str) -> String {
    format!("{base_offset:020}.{extension}")
}

/// Parses a segment file name back into its base offset, if it is one with that extension.
pub(crate) fn parse_file_name(name: &str, extension: &str) -> Option<u64> {
    let stem = name.strip_suffix(extension)?.strip_suffix('.')?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// Bookkeeping that only the writer touches.
#[derive(Debug)]
struct AppendState {
    /// Log bytes appended since the last offset index entry; an entry is due past
    /// `index_interval_bytes`.
    bytes_since_index_entry: u32,
    /// The `.log`'s first `reserved_end` bytes have blocks allocated (data, or room reserved by
    /// `reserve`), so writes into them need no new space. At or past `size`, and the file is at
    /// least this long.
    reserved_end: usize,
    /// Room the next reservation adds at least (see `RESERVE_FIRST_BYTES`).
    reserve_step_bytes: usize,
    /// Whether the file system takes `fallocate`; once it refused, appends just grow the file
    /// (reserving by writing zeros first would write every byte twice).
    fallocate: bool,
    /// When the last full-step (`RESERVE_MAX_BYTES`) reservation was made, to tell a busy
    /// segment (see `PREFILL_INTERVAL_MAX`).
    last_full_reserve: Option<Instant>,
    /// Appends since then, to tell small appends (see `PREFILL_APPENDS_MIN`).
    appends_since_full_reserve: u32,
    /// Set by `seal`: the segment takes no more appends.
    sealed: bool,
}

/// How a segment's content is checked when it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenMode {
    /// Known to have been flushed (below the recovery point, or closed cleanly): sanity-check
    /// the indexes (every entry with `check_all_indexes`, else the last ones) and the tail,
    /// rebuild indexes that fail.
    Trusted {
        /// Check every index entry, not only the last: after an unclean shutdown.
        check_all_indexes: bool,
    },
    /// Verify every batch with its checksum from the start. With `cut`, the `.log` is cut at
    /// the first invalid byte (a torn tail); without, the file is left as it is and only the
    /// valid prefix is served (damage in data that was flushed: keep it for the operator).
    Recover {
        /// Whether to cut the file at the damage.
        cut: bool,
    },
}

/// What opening a segment found.
// Made once per segment opened and unpacked at once: boxing the segment would only add an
// allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Opened {
    /// The segment is open (possibly after cutting a torn tail in `Recover` mode).
    Ok {
        segment: Segment,
        /// Bytes past the valid batches (cut, or left in place when not cutting), and why.
        damage: Option<(u64, String)>,
    },
    /// A trusted segment failed its tail check; open it again in `Recover` mode.
    NeedsRecovery { reason: String },
}

/// One segment. See the module documentation.
#[derive(Debug)]
pub(crate) struct Segment {
    /// Offset of the segment's first record; names its files.
    base_offset: u64,
    /// Path of the `.log` file, for errors and deletion.
    log_path: PathBuf,
    /// The `.log` file, written with positional writes into reserved room.
    log_file: File,
    /// Read-only map over the first `capacity` bytes of the `.log` file, shared with every slice
    /// handed to readers.
    log_map: Arc<MmapRaw>,
    /// Bytes mapped: room for appends without remapping.
    capacity: usize,
    /// Bytes of whole batches in the `.log`; published with release ordering after the bytes
    /// and the index entries are in place.
    size: AtomicU32,
    /// Offset after the segment's last record (`base_offset` when empty).
    next_offset: AtomicU64,
    /// Greatest record timestamp in the segment (by batch `max_timestamp`), or `NO_TIMESTAMP`.
    max_timestamp: AtomicI64,
    /// Sparse offset -> position index.
    offset_index: OffsetIndex,
    /// Running maximum timestamp -> offset index.
    time_index: TimeIndex,
    /// When this segment was created (file birth time if the file system records it, else when
    /// it was opened), in ms since the epoch, for `segment_ms`.
    created_ms: i64,
    /// Whether the indexes are known to be on disk as they are (synced after sealing, or
    /// found intact after a clean shutdown); `close` syncs the sealed ones that are not.
    indexes_synced: AtomicBool,
    /// The `.log`'s bytes below this were dropped from the page cache (`drop_cached`); a
    /// multiple of the page size. Changed only by the holder of the log's `cache_drop` lock.
    cache_dropped_to: AtomicU32,
    /// Bytes after `size` are damaged data kept for the operator: never cut them off.
    keep_tail: bool,
    /// Writer-only bookkeeping.
    append_state: Mutex<AppendState>,
    /// `index_interval_bytes` of the log config.
    index_interval_bytes: u32,
    /// `segment_bytes` of the log config.
    segment_bytes: u32,
    /// Whether busy segments write zeros over the room they reserve (`prefill`): not when
    /// flushes come often (`PREFILL_FLUSH_INTERVAL_MS_MIN`), since a flush writes the zeros
    /// still ahead of the data to disk too.
    prefill: bool,
}

/// The owner of a zero-copy slice of a segment's map: keeps the map alive while any `Bytes`
/// made from it lives.
struct MapSlice {
    map: Arc<MmapRaw>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `[start, end)` was below the segment's published `size` when the slice was
        // made, so it lies inside the mapping and inside the file. Bytes below `size` are never
        // written again and the file is never shrunk below `size` while mapped (see the module
        // documentation), so the memory stays valid and unchanged while `map` is alive.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(self.start), self.end - self.start)
        }
    }
}

impl Segment {
    fn index_paths(dir: &Path, base_offset: u64) -> (PathBuf, PathBuf, PathBuf) {
        (
            dir.join(file_name(base_offset, "log")),
            dir.join(file_name(base_offset, "index")),
            dir.join(file_name(base_offset, "timeindex")),
        )
    }

    /// Creates an empty active segment, replacing any files of that base offset.
    pub(crate) fn create(dir: &Path, base_offset: u64, config: &LogConfig) -> Result<Segment> {
        let (log_path, index_path, time_index_path) = Self::index_paths(dir, base_offset);
        remove_if_exists(&log_path)?;
        let log_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        let offset_index = OffsetIndex::create(&index_path, base_offset, config.index_bytes_max)?;
        let time_index = TimeIndex::create(&time_index_path, base_offset, config.index_bytes_max)?;
        Self::assemble(
            log_path,
            log_file,
            base_offset,
            0,
            base_offset,
            NO_TIMESTAMP,
            true,
            offset_index,
            time_index,
            config,
            false,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        log_path: PathBuf,
        log_file: File,
        base_offset: u64,
        size: u32,
        next_offset: u64,
        max_timestamp: i64,
        active: bool,
        offset_index: OffsetIndex,
        time_index: TimeIndex,
        config: &LogConfig,
        keep_tail: bool,
    ) -> Result<Segment> {
        let file_len = log_file.metadata().map_err(io_err(&log_path))?.len() as usize;
        let capacity = if active {
            (config.segment_bytes.max(config.batch_bytes_max) as usize).max(file_len)
        } else {
            file_len.max(1)
        };
        assert!(size as usize <= file_len);
        // The map may reach past the end of the file: pages wholly past the end are never
        // touched, because reads stop at `size` and the file always holds `size` bytes.
        let log_map = MmapOptions::new()
            .len(capacity)
            .map_raw_read_only(&log_file)
            .map_err(io_err(&log_path))?;
        let created_ms = log_file
            .metadata()
            .and_then(|m| m.created())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or_else(now_ms, |d| d.as_millis() as i64);
        let bytes_since_index_entry = match offset_index.len().checked_sub(1) {
            Some(last) => size - offset_index.entry(last).1,
            None => size,
        };
        Ok(Segment {
            base_offset,
            log_path,
            log_file,
            log_map: Arc::new(log_map),
            capacity,
            size: AtomicU32::new(size),
            next_offset: AtomicU64::new(next_offset),
            max_timestamp: AtomicI64::new(max_timestamp),
            offset_index,
            time_index,
            created_ms,
            indexes_synced: AtomicBool::new(false),
            cache_dropped_to: AtomicU32::new(0),
            keep_tail,
            append_state: Mutex::new(AppendState {
                bytes_since_index_entry,
                // Bytes below `size` are data, so allocated; room past them is reserved again
                // as appends need it (`fallocate` of allocated blocks is a no-op).
                reserved_end: size as usize,
                reserve_step_bytes: RESERVE_FIRST_BYTES,
                fallocate: true,
                last_full_reserve: None,
                appends_since_full_reserve: 0,
                sealed: !active,
            }),
            index_interval_bytes: config.index_interval_bytes,
            segment_bytes: config.segment_bytes,
            prefill: match config.flush {
                FlushPolicy::Never => true,
                FlushPolicy::IntervalMs(ms) => ms >= PREFILL_FLUSH_INTERVAL_MS_MIN,
                FlushPolicy::Always => false,
            },
        })
    }

    /// Opens the segment with files `dir/{base_offset:020}.*`.
    ///
    /// `active` segments get pre-allocated indexes and a map with room to grow; others are
    /// sealed. See `OpenMode` for what is checked.
    pub(crate) fn open(
        dir: &Path,
        base_offset: u64,
        config: &LogConfig,
        active: bool,
        mode: OpenMode,
    ) -> Result<Opened> {
        let (log_path, index_path, time_index_path) = Self::index_paths(dir, base_offset);
        let log_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        let file_len = log_file.metadata().map_err(io_err(&log_path))?.len();
        let readable = file_len.min(u64::from(crate::config::SEGMENT_BYTES_LIMIT)) as usize;
        // A temporary map of the whole file for scanning.
        let scan_map = if readable > 0 {
            // SAFETY: the file is ours and nobody else writes it while the log is being opened
            // (the broker holds a lock on its data folder); the map is dropped before this
            // function returns, and the file is only cut after it is dropped.
            Some(
                unsafe { MmapOptions::new().len(readable).map(&log_file) }
                    .map_err(io_err(&log_path))?,
            )
        } else {
            None
        };
        let bytes: &[u8] = scan_map.as_deref().unwrap_or(&[]);

        if let OpenMode::Trusted { check_all_indexes } = mode {
            if let Some(offset_index) = OffsetIndex::open(
                &index_path,
                base_offset,
                config.index_bytes_max,
                active,
                readable as u32,
                active || check_all_indexes,
            )? {
                let (start_offset, start_position) = offset_index
                    .len()
                    .checked_sub(1)
                    .map(|i| offset_index.entry(i))
                    .unwrap_or((base_offset, 0));
                let tail = scan(
                    bytes,
                    start_position as usize,
                    start_offset,
                    base_offset,
                    false,
                );
                if let Some(reason) = tail.error {
                    return Ok(Opened::NeedsRecovery { reason });
                }
                if tail.end as u64 != file_len {
                    return Ok(Opened::NeedsRecovery {
                        reason: format!(
                            "file is {file_len} bytes but its batches end at {}",
                            tail.end
                        ),
                    });
                }
                if let Some(time_index) = TimeIndex::open(
                    &time_index_path,
                    base_offset,
                    config.index_bytes_max,
                    active,
                    tail.next_offset,
                    active || check_all_indexes,
                )? {
                    let indexed_max = time_index.last_entry().map_or(NO_TIMESTAMP, |e| e.0);
                    let max_timestamp = indexed_max.max(tail.max_timestamp);
                    drop(scan_map);
                    let segment = Self::assemble(
                        log_path,
                        log_file,
                        base_offset,
                        tail.end as u32,
                        tail.next_offset,
                        max_timestamp,
                        active,
                        offset_index,
                        time_index,
                        config,
                        false,
                    )?;
                    return Ok(Opened::Ok {
                        segment,
                        damage: None,
                    });
                }
            }
            // An index is missing or damaged: rebuild both from the log, checking structure.
            let whole = scan(bytes, 0, base_offset, base_offset, false);
            if let Some(reason) = whole.error {
                return Ok(Opened::NeedsRecovery { reason });
            }
            if whole.end as u64 != file_len {
                return Ok(Opened::NeedsRecovery {
                    reason: format!(
                        "file is {file_len} bytes but its batches end at {}",
                        whole.end
                    ),
                });
            }
            tracing::info!(path = %log_path.display(), "rebuilding missing or damaged index files");
        }

        // Rebuild (and in Recover mode, verify) in one pass over the batches.
        let (verify, cut) = match mode {
            OpenMode::Recover { cut } => (true, cut),
            OpenMode::Trusted { .. } => (false, false),
        };
        let scanned = scan(bytes, 0, base_offset, base_offset, verify);
        // Where the bytes that are not zeros end: zeros past the valid batches are room the
        // segment reserved while it was active (a batch is never all zeros), not damage. Past
        // the readable part the file is counted as it is.
        let damage_end = if readable as u64 == file_len {
            (scanned.end + nonzero_prefix_len(&bytes[scanned.end..])) as u64
        } else {
            file_len
        };
        drop(scan_map);
        let mut damage = None;
        if (scanned.end as u64) < file_len {
            if damage_end == scanned.end as u64 {
                tracing::debug!(path = %log_path.display(), bytes = file_len - scanned.end as u64, "trimming the zeros reserved past the last batch");
                log_file
                    .set_len(scanned.end as u64)
                    .map_err(io_err(&log_path))?;
            } else {
                let reason = scanned
                    .error
                    .clone()
                    .unwrap_or_else(|| "bytes past the last whole batch".to_string());
                if cut {
                    log_file
                        .set_len(scanned.end as u64)
                        .map_err(io_err(&log_path))?;
                }
                // Reserved zeros after the last damaged byte are not counted.
                damage = Some((damage_end - scanned.end as u64, reason));
            }
        }
        // Nothing maps this segment's index files yet (it is being opened: by `Log::open`, or
        // by `truncate_to` after it removed them), so they are emptied in place.
        let offset_index = OffsetIndex::recreate(&index_path, base_offset, config.index_bytes_max)?;
        let time_index =
            TimeIndex::recreate(&time_index_path, base_offset, config.index_bytes_max)?;
        let segment = Self::assemble(
            log_path,
            log_file,
            base_offset,
            0,
            base_offset,
            NO_TIMESTAMP,
            active,
            offset_index,
            time_index,
            config,
            damage.is_some() && !cut,
        )?;
        segment.reindex(scanned.end)?;
        if !active {
            segment.seal()?;
        }
        Ok(Opened::Ok { segment, damage })
    }

    /// Rebuilds the indexes (which must be empty) from the first `end` bytes of the `.log`,
    /// which were already validated, and publishes them as the segment's content.
    fn reindex(&self, end: usize) -> Result<()> {
        assert!(end <= self.capacity);
        assert!(self.offset_index.len() == 0);
        // SAFETY: the file holds at least `end` bytes (it was just scanned and cut to that
        // length), they lie inside the map (`end <= capacity`), and nothing writes them while
        // the segment is being opened.
        let bytes = unsafe { std::slice::from_raw_parts(self.log_map.as_ptr(), end) };
        let mut state = self.lock_append_state();
        let mut position = 0usize;
        let mut next_offset = self.base_offset;
        while position < end {
            let header = BatchHeader::parse(&bytes[position..]).expect("validated by scan");
            self.index_batch(&mut state, position as u32, &header)?;
            position += header.size();
            next_offset = header.last_offset() as u64 + 1;
        }
        assert!(position == end);
        self.next_offset.store(next_offset, Ordering::Release);
        // The data is allocated: reservations start past it.
        state.reserved_end = state.reserved_end.max(end);
        self.size.store(end as u32, Ordering::Release);
        Ok(())
    }

    fn lock_append_state(&self) -> std::sync::MutexGuard<'_, AppendState> {
        // Poisoning would mean a panic in the writer, which already crashed the broker's
        // invariant checks; the state itself stays usable.
        self.append_state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds index entries for the batch at `position` (its base offset already assigned), and
    /// moves the running maximum timestamp. Entries for a batch describe what comes before it,
    /// so they are added before the batch is counted.
    fn index_batch(
        &self,
        state: &mut AppendState,
        position: u32,
        header: &BatchHeader,
    ) -> Result<()> {
        let first_offset = header.base_offset as u64;
        if state.bytes_since_index_entry > self.index_interval_bytes && position > 0 {
            self.offset_index.append(first_offset, position)?;
            self.append_time_entry(first_offset - 1)?;
            state.bytes_since_index_entry = 0;
        }
        state.bytes_since_index_entry += header.size() as u32;
        self.max_timestamp
            .fetch_max(header.max_timestamp, Ordering::Relaxed);
        Ok(())
    }

    /// Records in the time index that every record up to `last_offset` has a timestamp <= the
    /// running maximum, if the maximum grew since the last entry.
    fn append_time_entry(&self, last_offset: u64) -> Result<()> {
        let max_timestamp = self.max_timestamp.load(Ordering::Relaxed);
        if max_timestamp == NO_TIMESTAMP {
            return Ok(());
        }
        match self.time_index.last_entry() {
            Some((timestamp, offset)) if timestamp >= max_timestamp || offset >= last_offset => {
                Ok(())
            }
            _ => self.time_index.append(max_timestamp, last_offset),
        }
    }

    pub(crate) fn base_offset(&self) -> u64 {
        self.base_offset
    }

    pub(crate) fn size(&self) -> u32 {
        self.size.load(Ordering::Acquire)
    }

    pub(crate) fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }

    /// Greatest record timestamp in the segment, `None` when it is empty.
    pub(crate) fn max_timestamp(&self) -> Option<i64> {
        let t = self.max_timestamp.load(Ordering::Relaxed);
        (t != NO_TIMESTAMP).then_some(t)
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Whether the active segment is old enough to roll by `segment_ms`.
    pub(crate) fn is_due_by_age(&self, segment_ms: u64) -> bool {
        let age_ms = now_ms().saturating_sub(self.created_ms);
        self.size() > 0 && u64::try_from(age_ms).is_ok_and(|age| age >= segment_ms)
    }

    /// Whether `batches` more batches, `bytes` in all, the last ending at `last_offset`, fit in
    /// this active segment. An empty segment takes a single batch of any allowed size.
    pub(crate) fn has_room(&self, bytes: usize, batches: usize, last_offset: u64) -> bool {
        let size = self.size() as usize;
        let fits_bytes = size + bytes <= self.segment_bytes as usize || (size == 0 && batches == 1);
        fits_bytes
            && size + bytes <= self.capacity
            && self.offset_index.len() + batches <= self.offset_index.capacity()
            // One time index entry is kept for `seal`.
            && self.time_index.len() + batches < self.time_index.capacity()
            && last_offset - self.base_offset <= u64::from(u32::MAX)
    }

    /// Appends `chunk`, whole validated batches which `has_room` said fit, at the end of the
    /// segment, the first at offset `first_offset` (the segment's next offset) and each next
    /// one after its predecessor's last: reserves room if needed, writes the batches with
    /// those base offsets (gathered in one `pwritev` from the base offsets and the rest of each
    /// batch, so `chunk`, perhaps shared with the request it came in, is neither copied nor
    /// changed), indexes them and publishes the new `size`.
    ///
    /// # Errors
    ///
    /// `Io` if room cannot be reserved (a full disk: nothing was written), a write fails or an
    /// index entry cannot be stored. The segment is then unchanged for readers (its `size` is not
    /// moved) and the bytes written past it are cut off again if possible; the log stops taking
    /// writes either way (see `Log`).
    ///
    /// # Panics
    ///
    /// If the segment is sealed, `chunk` does not fit in the map, or `first_offset` is not the
    /// segment's next offset.
    pub(crate) fn append(&self, chunk: &[u8], first_offset: u64) -> Result<()> {
        let mut state = self.lock_append_state();
        assert!(!state.sealed);
        assert_eq!(first_offset, self.next_offset());
        let position = self.size();
        let end = position as usize + chunk.len();
        assert!(end <= self.capacity);
        if state.fallocate && state.reserved_end < end {
            self.reserve(&mut state, end)?;
        }
        state.appends_since_full_reserve = state.appends_since_full_reserve.saturating_add(1);
        let written = self
            .write_with_offsets(chunk, first_offset, u64::from(position))
            .map_err(io_err(&self.log_path))
            .and_then(|end_offset| {
                self.index_chunk(&mut state, position, chunk)?;
                // Written and indexed with the same offsets.
                assert_eq!(self.next_offset(), end_offset);
                Ok(())
            });
        if let Err(e) = written {
            // Whole batches left past `size` could otherwise come back at recovery.
            if let Err(cut) = self.log_file.set_len(u64::from(position)) {
                tracing::error!(path = %self.log_path.display(), error = %cut, "cannot cut a failed append off the log");
            }
            state.reserved_end = state.reserved_end.min(position as usize);
            return Err(e);
        }
        Ok(())
    }

    /// Writes the batches of `chunk` at `position` of the `.log`, with base offsets from
    /// `first_offset` on instead of their own; returns the offset after the last record.
    fn write_with_offsets(
        &self,
        chunk: &[u8],
        first_offset: u64,
        position: u64,
    ) -> io::Result<u64> {
        // Each batch's new base offset and size.
        let mut batches: Vec<([u8; 8], usize)> = Vec::new();
        let mut next_offset = first_offset;
        let mut at = 0usize;
        while at < chunk.len() {
            let header = BatchHeader::parse(&chunk[at..]).expect("validated by the log");
            batches.push(((next_offset as i64).to_be_bytes(), header.size()));
            next_offset += header.last_offset_delta as u64 + 1;
            at += header.size();
        }
        assert!(at == chunk.len());
        let mut slices = Vec::with_capacity(2 * batches.len());
        let mut at = 0usize;
        for (base, size) in &batches {
            slices.push(io::IoSlice::new(base));
            slices.push(io::IoSlice::new(&chunk[at + BASE_OFFSET_BYTES..at + size]));
            at += size;
        }
        write_all_vectored_at(&self.log_file, &mut slices, position)?;
        Ok(next_offset)
    }

    /// Reserves the `.log`'s blocks up to at least `end`, and the next chunk of room with them
    /// (see `RESERVE_FIRST_BYTES`), never past `segment_bytes` (unless `end` is) nor the map.
    /// Where the file system cannot `fallocate`, it stops reserving for good.
    ///
    /// When the disk (or a quota or file-size limit) has no room for the chunk, it reserves just
    /// up to `end`; if even that fails, it reserves nothing and lets the write itself decide, so
    /// that a disk short of a speculative chunk never fails an append that fits (the log stops
    /// taking writes after a failed append).
    fn reserve(&self, state: &mut AppendState, end: usize) -> Result<()> {
        // Past `reserved_end` when an append was written without a reservation (none fitted):
        // its bytes have blocks too.
        let from = state.reserved_end.max(self.size() as usize);
        assert!(from < end);
        assert!(end <= self.capacity);
        let limit = (self.segment_bytes as usize).max(end).min(self.capacity);
        let to = (from + state.reserve_step_bytes)
            .max(end)
            .next_multiple_of(RESERVE_FIRST_BYTES)
            .min(limit);
        assert!(end <= to);
        let no_room = |e: &io::Error| {
            matches!(
                e.raw_os_error(),
                Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
            )
        };
        match fallocate(&self.log_file, from, to) {
            Ok(()) => {
                state.reserved_end = to;
                if state.reserve_step_bytes == RESERVE_MAX_BYTES && self.prefill {
                    let now = Instant::now();
                    let busy = state
                        .last_full_reserve
                        .is_some_and(|last| now.duration_since(last) <= PREFILL_INTERVAL_MAX);
                    let small = state.appends_since_full_reserve >= PREFILL_APPENDS_MIN;
                    state.last_full_reserve = Some(now);
                    state.appends_since_full_reserve = 0;
                    if busy && small {
                        // From the page the append ends in (it writes its bytes over the
                        // zeros), so that the write of zeros starts on a page.
                        let page = page_size() as usize;
                        self.prefill(from.max(end / page * page), to);
                    }
                }
                state.reserve_step_bytes = (state.reserve_step_bytes * 2).min(RESERVE_MAX_BYTES);
                Ok(())
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) => {
                tracing::debug!(path = %self.log_path.display(), "file system cannot fallocate: appends grow the file as they write");
                state.fallocate = false;
                Ok(())
            }
            Err(e) if no_room(&e) => {
                // Space is short: no more speculative room than this append needs, if that.
                state.reserve_step_bytes = RESERVE_FIRST_BYTES;
                match fallocate(&self.log_file, from, end) {
                    Ok(()) => state.reserved_end = end,
                    Err(e) if no_room(&e) => {
                        tracing::debug!(path = %self.log_path.display(), error = %e, "cannot reserve room for an append: writing without")
                    }
                    Err(e) => return Err(io_err(&self.log_path)(e)),
                }
                Ok(())
            }
            Err(e) => Err(io_err(&self.log_path)(e)),
        }
    }

    /// Writes zeros over `[from, to)`, room just reserved past `size` (the `.log` reads as zeros
    /// there already). Only the page cache changes: it now holds that room in 64 KiB folios,
    /// made by aligned writes, and the appends that follow overwrite cached pages instead of
    /// adding a page (or a small folio) to the cache at every unaligned write. Measured in C
    /// with writes of 15,556 bytes into fallocated room: 2.0-2.2 GB/s plain, 3.7-4.2 GB/s with
    /// each MiB of zeros written first in 64 KiB pieces, those zeros included; on the log,
    /// `append/never/16KiB` went from 8.2-8.7 us to 5.2 us (`BENCHMARKS.md`). PostgreSQL fills
    /// new WAL files with zeros (`wal_init_zero`) for a similar reason.
    ///
    /// A failure is only logged: the room is reserved either way, and the append that follows
    /// reports a failing disk.
    fn prefill(&self, from: usize, to: usize) {
        // Published bytes are never written again (see the module documentation).
        assert!(from >= self.size() as usize);
        if from >= to {
            return;
        }
        // One write per 64 KiB-aligned piece: folios of up to 64 KiB. One write of the whole
        // MiB makes folios of up to the largest order, and allocating those in a fragmented
        // memory (and, in a VM that hands freed memory back, refilling them) stalled appends:
        // on the same machine the 1 MiB write ran the first pass at 436-456 MB/s and later
        // ones at 3.2-3.5 GB/s, the 64 KiB writes at 3.7-4.2 GB/s from the first pass on.
        let mut at = from;
        while at < to {
            let end = (at + 1).next_multiple_of(ZEROS_BYTES).min(to);
            if let Err(error) = self.log_file.write_all_at(&ZEROS[..end - at], at as u64) {
                tracing::debug!(path = %self.log_path.display(), %error, "cannot write zeros over reserved room");
                return;
            }
            at = end;
        }
    }

    fn index_chunk(&self, state: &mut AppendState, position: u32, chunk: &[u8]) -> Result<()> {
        let mut at = 0usize;
        let mut next_offset = self.next_offset();
        while at < chunk.len() {
            // As written: with its assigned base offset (`write_with_offsets`).
            let mut header = BatchHeader::parse(&chunk[at..]).expect("validated by the log");
            header.base_offset = next_offset as i64;
            self.index_batch(state, position + at as u32, &header)?;
            at += header.size();
            next_offset = header.last_offset() as u64 + 1;
        }
        assert!(at == chunk.len());
        self.next_offset.store(next_offset, Ordering::Release);
        self.size
            .store(position + chunk.len() as u32, Ordering::Release);
        Ok(())
    }

    /// Finishes the segment: a last time index entry, indexes trimmed to their entries, and the
    /// `.log` cut to `size` (the room reserved ahead of the data, and bytes of a failed append).
    /// Returns whether the `.log` was cut: its new length is then not on disk until the next
    /// `fdatasync`.
    ///
    /// A segment kept with a damaged tail (`keep_tail`) is not cut.
    pub(crate) fn seal(&self) -> Result<bool> {
        let mut state = self.lock_append_state();
        state.sealed = true;
        let next_offset = self.next_offset();
        if next_offset > self.base_offset && self.time_index.len() < self.time_index.capacity() {
            self.append_time_entry(next_offset - 1)?;
        }
        self.offset_index.trim()?;
        self.time_index.trim()?;
        let size = u64::from(self.size());
        let file_len = self
            .log_file
            .metadata()
            .map_err(io_err(&self.log_path))?
            .len();
        assert!(size <= file_len);
        let cut = size < file_len && !self.keep_tail;
        if cut {
            self.log_file
                .set_len(size)
                .map_err(io_err(&self.log_path))?;
            state.reserved_end = state.reserved_end.min(size as usize);
        }
        Ok(cut)
    }

    /// Forces the `.log` to disk, and the indexes too when `with_indexes`.
    pub(crate) fn flush(&self, with_indexes: bool) -> Result<()> {
        self.log_file.sync_data().map_err(io_err(&self.log_path))?;
        if with_indexes {
            self.offset_index.sync()?;
            self.time_index.sync()?;
            self.indexes_synced.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Drops the `.log`'s bytes below `synced_size - keep_bytes` (rounded down to a page) from
    /// the page cache: they must be on disk (`synced_size` is at most the size at the last
    /// `fdatasync`). Their page-table entries in the segment's own map go first, since the
    /// kernel keeps mapped pages; a reader still holding a slice of them faults them in again
    /// from the file, whose bytes below `size` never change. With `keep_bytes` > 0 it waits
    /// until `DROP_STEP_BYTES` have built up, so frequent flushes (`always`) cost few calls.
    /// `whole` (a segment that no longer grows, all of it on disk, `keep_bytes` 0) takes its
    /// last partial page too. Returns whether it dropped anything. Advice only: a failure is
    /// logged, not returned.
    pub(crate) fn drop_cached(&self, synced_size: u32, keep_bytes: u64, whole: bool) -> bool {
        let page = page_size();
        // A segment that stopped growing and is on disk whole: always so when `whole` is asked
        // for, but a flush must not crash on it.
        debug_assert!(!whole || (keep_bytes == 0 && synced_size == self.size()));
        let whole = whole && keep_bytes == 0 && synced_size == self.size();
        let up_to = if whole {
            u64::from(synced_size).div_ceil(page) * page
        } else {
            u64::from(synced_size).saturating_sub(keep_bytes) / page * page
        };
        let from = u64::from(self.cache_dropped_to.load(Ordering::Acquire));
        if up_to <= from || (keep_bytes > 0 && up_to - from < DROP_STEP_BYTES) {
            return false;
        }
        let len = (up_to - from) as usize;
        // SAFETY: `[from, up_to)` lies below `size` (rounded up to a page for a whole segment),
        // inside the shared file mapping (the kernel maps whole pages, and `size` is at most its
        // length), and `from` is page-aligned like the map's start. MADV_DONTNEED on a shared file mapping only
        // removes the page-table entries: the next access reads the same bytes from the page
        // cache or the file, so no reader sees memory change.
        let unmapped = unsafe {
            libc::madvise(
                self.log_map.as_ptr().add(from as usize) as *mut libc::c_void,
                len,
                libc::MADV_DONTNEED,
            )
        };
        if unmapped != 0 {
            let error = io::Error::last_os_error();
            tracing::debug!(path = %self.log_path.display(), %error, "cannot unmap flushed bytes");
        }
        // From a little before `from`: the kernel keeps a large folio that reached past the
        // previous `up_to`, and it lies wholly in this range only now.
        let advise_from = from.saturating_sub(FOLIO_BYTES_MAX);
        // SAFETY: a system call on a descriptor we own; no memory is passed.
        let dropped = unsafe {
            libc::posix_fadvise(
                self.log_file.as_raw_fd(),
                advise_from as libc::off_t,
                (up_to - advise_from) as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        if dropped != 0 {
            let error = io::Error::from_raw_os_error(dropped);
            tracing::debug!(path = %self.log_path.display(), %error, "cannot drop flushed bytes from the page cache");
        }
        let up_to =
            u32::try_from(up_to).expect("a segment's size, rounded up to a page, fits a u32");
        self.cache_dropped_to.store(up_to, Ordering::Release);
        true
    }

    /// Forces the indexes (not the `.log`) to disk.
    pub(crate) fn flush_indexes(&self) -> Result<()> {
        self.offset_index.sync()?;
        self.time_index.sync()?;
        self.indexes_synced.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether the indexes are known to be on disk as they are now.
    pub(crate) fn indexes_synced(&self) -> bool {
        self.indexes_synced.load(Ordering::Acquire)
    }

    /// Records that the indexes, found intact after a clean shutdown, are on disk.
    pub(crate) fn mark_indexes_synced(&self) {
        self.indexes_synced.store(true, Ordering::Release)
    }

    /// Unlinks the segment's files. Readers holding slices keep them.
    pub(crate) fn delete(&self) -> Result<()> {
        remove_if_exists(&self.log_path)?;
        self.offset_index.delete()?;
        self.time_index.delete()
    }

    /// Where truncating to `target` cuts this segment: (bytes kept, offset after them). The cut
    /// is at the start of the batch containing `target`.
    pub(crate) fn cut_point(&self, target: u64) -> Result<(usize, u64)> {
        let bytes = self.published();
        Ok(match self.position_of(bytes, target)? {
            Some((position, header)) => (position, header.base_offset as u64),
            None => (bytes.len(), self.next_offset()),
        })
    }

    /// The first `end` published bytes of the `.log`.
    pub(crate) fn prefix(&self, end: usize) -> &[u8] {
        &self.published()[..end]
    }

    /// A zero-copy slice of `[start, end)` of the `.log`, both below the published size.
    fn slice(&self, start: usize, end: usize) -> Bytes {
        assert!(start <= end);
        assert!(end <= self.size() as usize);
        Bytes::from_owner(MapSlice {
            map: Arc::clone(&self.log_map),
            start,
            end,
        })
    }

    /// The published bytes of the `.log`, borrowed.
    fn published(&self) -> &[u8] {
        let size = self.size() as usize;
        // SAFETY: as for `MapSlice::as_ref`: `[0, size)` is published, inside the map and the
        // file, and never changes while `self` (and so the map) is alive.
        unsafe { std::slice::from_raw_parts(self.log_map.as_ptr(), size) }
    }

    fn corrupt(&self, position: usize, reason: impl Into<String>) -> StorageError {
        StorageError::Corrupt {
            path: self.log_path.clone(),
            position: position as u64,
            reason: reason.into(),
        }
    }

    /// Position of the batch containing `target` (which must be in this segment), starting from
    /// the offset index's hint; `None` if `target` is past the segment's published records.
    fn position_of(&self, bytes: &[u8], target: u64) -> Result<Option<(usize, BatchHeader)>> {
        let (mut expected, hint) = self.offset_index.lookup(target);
        let mut position = hint as usize;
        if position >= bytes.len() && position > 0 {
            // An entry published before the bytes it points at (an append in progress).
            return Ok(None);
        }
        if position > 0 {
            match octolog_batch::peek_batch_size(&bytes[position.min(bytes.len())..]) {
                Ok((base, _)) if base as u64 == expected => {}
                _ => {
                    tracing::warn!(path = %self.log_path.display(), position, "offset index entry does not point at its batch; scanning from the start");
                    position = 0;
                    expected = self.base_offset;
                }
            }
        }
        while position < bytes.len() {
            let header = BatchHeader::parse(&bytes[position..])
                .map_err(|e| self.corrupt(position, e.to_string()))?;
            if header.base_offset as u64 != expected {
                return Err(self.corrupt(
                    position,
                    format!(
                        "batch base offset {} where {expected} was expected",
                        header.base_offset
                    ),
                ));
            }
            if target <= header.last_offset() as u64 {
                return Ok(Some((position, header)));
            }
            expected = header.last_offset() as u64 + 1;
            position += header.size();
        }
        Ok(None)
    }

    /// Whole batches starting with the one containing `target`, below `limit_offset`: as many
    /// as fit in `bytes_max`, but at least one, as one zero-copy slice, with the offset after
    /// them. Empty (and `target`) if `target` is at or past the end of the published records or
    /// at or past `limit_offset`.
    ///
    /// # Errors
    ///
    /// `Corrupt` if the bytes on disk are not a chain of batches with contiguous offsets.
    pub(crate) fn read(
        &self,
        target: u64,
        bytes_max: usize,
        limit_offset: u64,
    ) -> Result<(Bytes, u64)> {
        let bytes = self.published();
        let Some((start, first)) = self.position_of(bytes, target)? else {
            return Ok((Bytes::new(), target));
        };
        if first.base_offset as u64 >= limit_offset {
            return Ok((Bytes::new(), target));
        }
        let mut end = start + first.size();
        let mut expected = first.last_offset() as u64 + 1;
        while end < bytes.len() && expected < limit_offset {
            let header =
                BatchHeader::parse(&bytes[end..]).map_err(|e| self.corrupt(end, e.to_string()))?;
            if header.base_offset as u64 != expected {
                return Err(self.corrupt(
                    end,
                    format!(
                        "batch base offset {} where {expected} was expected",
                        header.base_offset
                    ),
                ));
            }
            if end + header.size() - start > bytes_max {
                break;
            }
            end += header.size();
            expected = header.last_offset() as u64 + 1;
        }
        Ok((self.slice(start, end), expected))
    }

    /// The first offset in this segment, at or after the segment's start and below
    /// `limit_offset`, whose record has a timestamp >= `timestamp`; `None` if there is none.
    pub(crate) fn offset_for_timestamp(
        &self,
        timestamp: i64,
        limit_offset: u64,
    ) -> Result<Option<u64>> {
        match self.max_timestamp() {
            Some(max) if max >= timestamp => {}
            _ => return Ok(None),
        }
        let start = self
            .time_index
            .lookup_below(timestamp)
            .map_or(self.base_offset, |offset| offset + 1);
        let bytes = self.published();
        let Some((mut position, _)) = self.position_of(bytes, start)? else {
            return Ok(None);
        };
        while position < bytes.len() {
            let header = BatchHeader::parse(&bytes[position..])
                .map_err(|e| self.corrupt(position, e.to_string()))?;
            if header.base_offset as u64 >= limit_offset {
                return Ok(None);
            }
            if header.max_timestamp >= timestamp {
                if header.compression() != Compression::None {
                    // Record timestamps are inside the compressed payload; the batch is the
                    // finest answer available without decompressing.
                    return Ok(Some(header.base_offset as u64));
                }
                let batch = self.slice(position, position + header.size());
                let (_, records) = octolog_batch::decode_batch(&batch)
                    .map_err(|e| self.corrupt(position, e.to_string()))?;
                for record in records {
                    if record.timestamp_ms >= timestamp && (record.offset as u64) < limit_offset {
                        return Ok(Some(record.offset as u64));
                    }
                }
            }
            position += header.size();
        }
        Ok(None)
    }
}

/// Result of scanning a `.log`'s bytes batch by batch.
#[derive(Debug)]
struct Scan {
    /// Position after the last valid batch.
    end: usize,
    /// Offset after the last valid batch.
    next_offset: u64,
    /// Greatest `max_timestamp` among the valid batches scanned.
    max_timestamp: i64,
    /// Why the scan stopped before the end of `bytes`, if it did.
    error: Option<String>,
}

/// Walks the batches of `bytes` from `position`, whose first batch must start at
/// `expected_offset`, checking structure, contiguous offsets, that offsets stay within
/// `u32::MAX` of the segment's `base_offset` and, with `verify`, checksums.
fn scan(
    bytes: &[u8],
    mut position: usize,
    mut expected_offset: u64,
    base_offset: u64,
    verify: bool,
) -> Scan {
    let mut max_timestamp = NO_TIMESTAMP;
    let mut error = None;
    while position < bytes.len() {
        let rest = &bytes[position..];
        let parsed = if verify {
            BatchHeader::parse_verified(rest)
        } else {
            BatchHeader::parse(rest)
        };
        let header = match parsed {
            Ok(header) => header,
            Err(e) => {
                error = Some(format!("invalid batch at position {position}: {e}"));
                break;
            }
        };
        if header.base_offset as u64 != expected_offset {
            error = Some(format!(
                "batch at position {position} has base offset {} where {expected_offset} was expected",
                header.base_offset
            ));
            break;
        }
        let last_offset = header.last_offset();
        if last_offset < header.base_offset
            || (last_offset as u64) - base_offset > u64::from(u32::MAX)
        {
            error = Some(format!(
                "batch at position {position} ends at offset {last_offset}, beyond what a segment starting at {base_offset} can hold"
            ));
            break;
        }
        max_timestamp = max_timestamp.max(header.max_timestamp);
        expected_offset = last_offset as u64 + 1;
        position += header.size();
    }
    Scan {
        end: position,
        next_offset: expected_offset,
        max_timestamp,
        error,
    }
}

/// Bytes `drop_cached` lets build up before it drops them, unless told to keep none.
const DROP_STEP_BYTES: u64 = 1 << 20;
/// Largest page-cache folio a file's pages may share (a PMD, 2 MiB on x86-64).
const FOLIO_BYTES_MAX: u64 = 2 << 20;

/// The size of a memory page.
fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the system.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// Bytes of a batch's base offset, the field before its length (outside the CRC).
const BASE_OFFSET_BYTES: usize = 8;
/// Most buffers one `pwritev` takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Writes all of `slices`, one after the other, at `position` of `file`: `pwritev` calls of at
/// most `IOV_MAX` buffers, again after a short write or an interruption.
fn write_all_vectored_at(
    file: &File,
    mut slices: &mut [io::IoSlice<'_>],
    mut position: u64,
) -> io::Result<()> {
    io::IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        let count = slices.len().min(IOV_MAX);
        let offset = libc::off_t::try_from(position)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix, and each points into a
        // buffer borrowed for this call; the kernel only reads them.
        let written = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                slices.as_ptr().cast::<libc::iovec>(),
                count as libc::c_int,
                offset,
            )
        };
        if written < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        position += written as u64;
        io::IoSlice::advance_slices(&mut slices, written as usize);
    }
    Ok(())
}

/// Allocates `file`'s blocks in `[from, to)`, growing the file to `to` if it is shorter.
fn fallocate(file: &File, from: usize, to: usize) -> io::Result<()> {
    assert!(from < to);
    loop {
        // SAFETY: a system call on a descriptor we own; no memory is passed.
        let done = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                0,
                from as libc::off_t,
                (to - from) as libc::off_t,
            )
        };
        if done == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Bytes of `bytes` up to and including its last non-zero byte (0 if it is all zeros).
fn nonzero_prefix_len(bytes: &[u8]) -> usize {
    let mut end = bytes.len();
    // Block by block from the end (a zero tail is up to `RESERVE_MAX_BYTES`), then the block
    // holding the last non-zero byte byte by byte.
    while end > 0 {
        let start = end.saturating_sub(ZEROS_BYTES);
        if bytes[start..end] != ZEROS[..end - start] {
            let last = bytes[start..end]
                .iter()
                .rposition(|&b| b != 0)
                .expect("the block is not all zeros");
            return start + last + 1;
        }
        end = start;
    }
    0
}

/// Bytes of the file at `path` before its trailing zeros: what a segment file that may end in
/// reserved room holds, for reports. 0 if the file cannot be read.
pub(crate) fn bytes_before_zero_tail(path: &Path) -> u64 {
    let Ok(file) = File::open(path) else {
        return 0;
    };
    let Ok(len) = file.metadata().map(|m| m.len()) else {
        return 0;
    };
    let mut buffer = vec![0u8; ZEROS_BYTES];
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(ZEROS_BYTES as u64);
        let block = &mut buffer[..(end - start) as usize];
        if file.read_exact_at(block, start).is_err() {
            return len;
        }
        let kept = nonzero_prefix_len(block);
        if kept > 0 {
            return start + kept as u64;
        }
        end = start;
    }
    0
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FlushPolicy;

    #[test]
    fn file_names_round_trip() {
        assert_eq!(file_name(42, "log"), "00000000000000000042.log");
        assert_eq!(parse_file_name("00000000000000000042.log", "log"), Some(42));
        assert_eq!(parse_file_name("00000000000000000042.index", "log"), None);
        assert_eq!(parse_file_name("0000000000000000042.log", "log"), None);
        assert_eq!(parse_file_name("0000000000000000004x.log", "log"), None);
        assert_eq!(parse_file_name("99999999999999999999.log", "log"), None);
    }

    #[test]
    fn nonzero_prefix_len_finds_the_last_non_zero_byte() {
        let check = |bytes: &[u8], want: usize| assert_eq!(nonzero_prefix_len(bytes), want);
        check(&[], 0);
        check(&[0; 10], 0);
        check(&[1], 1);
        check(&[0, 1, 0], 2);
        let mut big = vec![0u8; 3 * ZEROS_BYTES + 5];
        check(&big, 0);
        big[0] = 7;
        check(&big, 1);
        big[ZEROS_BYTES + 3] = 1;
        check(&big, ZEROS_BYTES + 4);
        big[3 * ZEROS_BYTES + 4] = 1;
        check(&big, 3 * ZEROS_BYTES + 5);
    }

    /// Appends copies of one ~16 KiB batch, with offsets assigned, until the segment holds at
    /// least `bytes`; returns the bytes appended.
    fn fill(segment: &Segment, bytes: usize) -> Vec<u8> {
        fill_with(segment, bytes, 1)
    }

    /// `fill`, with `batches` copies of the batch in each append.
    fn fill_with(segment: &Segment, bytes: usize, batches: usize) -> Vec<u8> {
        let mut builder = octolog_batch::BatchBuilder::new();
        for i in 0..15u8 {
            builder.push(1_700_000_000_000, None, Some(&[i; 1000]), &[]);
        }
        let batch = builder.finish().to_vec();
        let mut chunk = batch.repeat(batches);
        let mut appended = Vec::new();
        while (segment.size() as usize) < bytes {
            let first_offset = segment.next_offset();
            segment.append(&chunk, first_offset).unwrap();
            for (i, stored) in chunk.chunks_mut(batch.len()).enumerate() {
                octolog_batch::set_base_offset(stored, (first_offset + 15 * i as u64) as i64);
            }
            appended.extend_from_slice(&chunk);
            let state = segment.lock_append_state();
            let file_len = segment.log_file.metadata().unwrap().len() as usize;
            if state.fallocate {
                assert!(segment.size() as usize <= state.reserved_end);
                assert_eq!(file_len, state.reserved_end);
            } else {
                assert_eq!(file_len, segment.size() as usize);
            }
        }
        appended
    }

    /// Guards the reservation ahead of the data: chunks that start at `RESERVE_FIRST_BYTES` and
    /// double up to `RESERVE_MAX_BYTES`, the file holding the data and zeros past it, sealing
    /// cutting the zeros off; and appends that just grow the file where `fallocate` is missing.
    #[test]
    fn appends_reserve_room_in_growing_chunks_and_sealing_cuts_it_off() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 32 << 20,
            index_bytes_max: 1 << 20,
            flush: FlushPolicy::Never,
            ..LogConfig::default()
        };
        let segment = Segment::create(dir.path(), 0, &config).unwrap();
        let mut steps = Vec::new();
        let mut reserved_end = 0;
        let mut appended = Vec::new();
        while reserved_end < 3 << 20 {
            appended.extend(fill(&segment, reserved_end + 1));
            let now = segment.lock_append_state().reserved_end;
            steps.push(now - reserved_end);
            reserved_end = now;
        }
        let k = 1 << 10;
        let m = 1 << 20;
        assert_eq!(steps, [64 * k, 128 * k, 256 * k, 512 * k, m, m, m]);
        let size = segment.size() as usize;
        let file = std::fs::read(segment.log_path()).unwrap();
        assert_eq!(file.len(), reserved_end);
        assert_eq!(&file[..size], &appended[..]);
        assert!(file[size..].iter().all(|&b| b == 0));
        let (read, _) = segment
            .read(segment.base_offset(), usize::MAX, u64::MAX)
            .unwrap();
        assert_eq!(&read[..], &appended[..]);
        assert!(segment.seal().unwrap());
        assert_eq!(
            std::fs::metadata(segment.log_path()).unwrap().len(),
            size as u64
        );
        // Slices stay readable after the cut.
        assert_eq!(&read[..], &appended[..]);

        // Without `fallocate` (as `reserve` leaves it after EOPNOTSUPP).
        let segment = Segment::create(dir.path(), 1 << 40, &config).unwrap();
        segment.lock_append_state().fallocate = false;
        let appended = fill(&segment, 1 << 20);
        assert_eq!(segment.lock_append_state().reserved_end, 0);
        let (read, _) = segment
            .read(segment.base_offset(), usize::MAX, u64::MAX)
            .unwrap();
        assert_eq!(&read[..], &appended[..]);
        assert!(!segment.seal().unwrap());
    }

    /// Guards `prefill`: a busy segment of small appends holds the room it reserved in the page
    /// cache (zeros written over it) unless every append is synced (`FlushPolicy::Always`), and
    /// its data reads back as appended with zeros past it.
    #[test]
    fn busy_segments_of_small_appends_write_zeros_over_reserved_room_unless_synced() {
        let dir = tempfile::tempdir().unwrap();
        let page = page_size() as usize;
        // Whether, after each reservation, the room past the data was all in the page cache.
        let cached_rooms = |flush: FlushPolicy, base_offset: u64, batches: usize| -> Vec<bool> {
            let config = LogConfig {
                segment_bytes: 64 << 20,
                index_bytes_max: 1 << 20,
                flush,
                ..LogConfig::default()
            };
            let segment = Segment::create(dir.path(), base_offset, &config).unwrap();
            let mut rooms = Vec::new();
            let mut reserved_end = 0;
            let mut appended = Vec::new();
            // Bounded: full-step reservations more than `PREFILL_INTERVAL_MAX` apart are not
            // prefilled, and a loaded machine may stall between some of them.
            while reserved_end < 24 << 20 {
                appended.extend(fill_with(&segment, reserved_end + 1, batches));
                reserved_end = segment.lock_append_state().reserved_end;
                let room_from = (segment.size() as usize).div_ceil(page) * page;
                if room_from < reserved_end {
                    rooms.push(
                        resident(&segment, room_from, reserved_end)
                            .iter()
                            .all(|&r| r),
                    );
                }
            }
            let file = std::fs::read(segment.log_path()).unwrap();
            let size = segment.size() as usize;
            assert_eq!(&file[..size], &appended[..]);
            assert!(file[size..].iter().all(|&b| b == 0));
            rooms
        };
        // Each run checks its data and the zeros past it, wherever it runs.
        let never = cached_rooms(FlushPolicy::Never, 0, 1);
        let hourly = cached_rooms(FlushPolicy::IntervalMs(3_600_000), 1 << 40, 1);
        let always = cached_rooms(FlushPolicy::Always, 2 << 40, 1);
        let frequent = cached_rooms(FlushPolicy::IntervalMs(100), 3 << 40, 1);
        // Appends of ~256 KiB (17 batches each) make large folios themselves.
        let large = cached_rooms(FlushPolicy::Never, 4 << 40, 17);
        if !fallocate_leaves_the_cache_alone(dir.path()) {
            eprintln!("this file system caches room fallocate reserves: page cache not checked");
            return;
        }
        for prefilled in [&never, &hourly] {
            // Not the rooms of the growing steps (64 KiB to 512 KiB) nor of the first full
            // one, which only starts the clock that tells a busy segment.
            assert!(
                prefilled[..5].iter().all(|&cached| !cached),
                "{prefilled:?}"
            );
            assert!(prefilled[5..].iter().any(|&cached| cached), "{prefilled:?}");
        }
        for left_alone in [&always, &frequent, &large] {
            assert!(left_alone.iter().all(|&cached| !cached), "{left_alone:?}");
        }
    }

    /// An append written without a reservation (none fitted: `reserve` lets the write decide)
    /// leaves `reserved_end` below `size`; the next reservation starts from `size`.
    #[test]
    fn a_reservation_after_an_unreserved_append_starts_at_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            flush: FlushPolicy::Never,
            ..LogConfig::default()
        };
        let segment = Segment::create(dir.path(), 0, &config).unwrap();
        let mut appended = fill(&segment, 1);
        {
            // As `reserve` leaves it when neither the chunk nor the append fitted, after the
            // write itself went through.
            let mut state = segment.lock_append_state();
            let size = segment.size() as usize;
            state.reserved_end = size - 1;
            segment.log_file.set_len(size as u64).unwrap();
        }
        appended.extend(fill(&segment, segment.size() as usize + 1));
        assert!(segment.size() as usize <= segment.lock_append_state().reserved_end);
        let (read, _) = segment
            .read(segment.base_offset(), usize::MAX, u64::MAX)
            .unwrap();
        assert_eq!(&read[..], &appended[..]);
    }

    /// Whether a new file's room reserved with `fallocate` stays out of the page cache (tmpfs,
    /// for one, allocates cached pages for it).
    fn fallocate_leaves_the_cache_alone(dir: &Path) -> bool {
        probe_leaves_no_page_cached(dir, |file| fallocate(file, 0, 1 << 20).is_ok())
    }

    /// Whether `prepare` (true if it succeeded) leaves no page of the first MiB of a new probe
    /// file in `dir` in the page cache.
    fn probe_leaves_no_page_cached(dir: &Path, prepare: impl FnOnce(&File) -> bool) -> bool {
        let path = dir.join("probe");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        if !prepare(&file) {
            std::fs::remove_file(&path).unwrap();
            return false;
        }
        // SAFETY: the probe file is ours and nothing changes its length while it is mapped.
        let map = unsafe { MmapOptions::new().len(1 << 20).map(&file) }.unwrap();
        let mut flags = vec![0u8; (1 << 20) / page_size() as usize];
        // SAFETY: `flags` has one byte per page of the mapping.
        let done = unsafe {
            libc::mincore(
                map.as_ptr() as *mut libc::c_void,
                1 << 20,
                flags.as_mut_ptr(),
            )
        };
        drop(map);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(done, 0, "mincore: {}", io::Error::last_os_error());
        flags.iter().all(|f| f & 1 == 0)
    }

    /// Which pages of `segment`'s `.log` from `from` to `to` bytes are in the page cache.
    fn resident(segment: &Segment, from: usize, to: usize) -> Vec<bool> {
        let page = page_size() as usize;
        assert!(from % page == 0);
        let pages = (to - from).div_ceil(page);
        let mut flags = vec![0u8; pages];
        // SAFETY: the range lies inside the segment's mapping; mincore only writes `flags`,
        // which has one byte per page.
        let done = unsafe {
            libc::mincore(
                segment.log_map.as_ptr().add(from) as *mut libc::c_void,
                to - from,
                flags.as_mut_ptr(),
            )
        };
        assert_eq!(done, 0, "mincore: {}", io::Error::last_os_error());
        flags.iter().map(|f| f & 1 == 1).collect()
    }

    /// Whether the file system of `dir` drops a file's clean pages on `POSIX_FADV_DONTNEED`
    /// (tmpfs, for one, keeps them): a probe file, written, synced and advised.
    fn drops_clean_pages(dir: &Path) -> bool {
        probe_leaves_no_page_cached(dir, |file| {
            file.write_all_at(&vec![7u8; 1 << 20], 0).unwrap();
            file.sync_data().unwrap();
            // SAFETY: a system call on a descriptor we own; no memory is passed.
            let advised =
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            advised == 0
        })
    }

    /// Guards `drop_cached`: the flushed bytes behind the window leave the page cache, the
    /// window's stay, and every byte still reads the same afterwards, also through a slice a
    /// reader took before the drop. Where the file system keeps pages despite
    /// `POSIX_FADV_DONTNEED` (a probe file says), only the reads are checked.
    #[test]
    fn drop_cached_drops_what_lies_behind_the_window_and_nothing_changes_for_readers() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            flush: FlushPolicy::Never,
            ..LogConfig::default()
        };
        let segment = Segment::create(dir.path(), 0, &config).unwrap();
        let appended = fill(&segment, 8 << 20);
        let held = segment.slice(0, segment.size() as usize);
        assert!(segment.published() == &appended[..]);
        segment.flush(false).unwrap();
        let size = segment.size();
        let page = page_size() as usize;
        let keep = 64 << 10;
        segment.drop_cached(size, keep as u64, false);
        let up_to = (size as usize - keep) / page * page;
        assert_eq!(
            segment.cache_dropped_to.load(Ordering::Acquire) as usize,
            up_to
        );
        let dropped = resident(&segment, 0, up_to);
        if !drops_clean_pages(dir.path()) {
            eprintln!("this file system keeps pages despite POSIX_FADV_DONTNEED: reads only");
        } else {
            // A large folio reaching past the boundary stays whole: allow up to 2 MiB before it.
            let straddling = (2 << 20) / page;
            let stayed: Vec<usize> = (0..dropped.len()).filter(|&i| dropped[i]).collect();
            assert!(
                stayed.iter().all(|&i| i + straddling >= dropped.len()),
                "pages behind the window stayed: {stayed:?} of {}",
                dropped.len()
            );
            assert!(resident(&segment, up_to, size as usize).iter().all(|&r| r));
        }
        assert!(segment.published() == &appended[..]);
        assert!(held.as_ref() == &appended[..]);
        // Nothing more is dropped without a new flush past the window, and appends go on.
        assert!(!segment.drop_cached(size, keep as u64, false));
        fill(&segment, 9 << 20);
        assert!(segment.published()[..appended.len()] == appended[..]);
    }

    /// Guards that reservations stop at `segment_bytes` (a small segment does not reserve a
    /// whole first chunk) unless one lone batch needs more.
    #[test]
    fn reservations_stop_at_segment_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 20_000,
            index_bytes_max: 1 << 20,
            flush: FlushPolicy::Never,
            ..LogConfig::default()
        };
        let segment = Segment::create(dir.path(), 0, &config).unwrap();
        fill(&segment, 1);
        assert_eq!(segment.lock_append_state().reserved_end, 20_000);
        let small = LogConfig {
            segment_bytes: 1000,
            ..config
        };
        let segment = Segment::create(dir.path(), 100, &small).unwrap();
        fill(&segment, 1);
        let size = segment.size() as usize;
        assert!(1000 < size);
        assert_eq!(segment.lock_append_state().reserved_end, size);
    }
}
