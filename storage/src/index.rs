//! The two per-segment indexes, both pre-allocated, memory-mapped and sparse.
//!
//! On-disk format (big-endian, no header, no checksum: after an unclean shutdown they are rebuilt
//! from the log, and on every open they are sanity-checked and rebuilt when they fail):
//!
//! - `.index`, the offset index: 8-byte entries `relative_offset: u32, position: u32`, where
//!   `relative_offset = offset - base_offset` of a batch's first record and `position` is that
//!   batch's byte position in the `.log`. One entry per `index_interval_bytes` of log. Position 0
//!   is implicit and never stored, so an all-zero entry is always invalid.
//! - `.timeindex`, the time index: 12-byte entries `timestamp_ms: i64, relative_offset: u32`,
//!   meaning "every record at or below `base_offset + relative_offset` in this segment has a
//!   timestamp <= `timestamp_ms`" (a running maximum). Entries are added only when the maximum
//!   grows, so both columns strictly increase.
//!
//! While a segment is active its index files are `index_bytes_max` long (pre-allocated, sparse);
//! entries are stored through a shared writable map into room reserved a few KiB at a time;
//! sealing trims them to their entries.
//!
//! Thread-safety: one writer (the log's append path, serialised by the log) and any number of
//! readers. The writer fills an entry and then publishes it by bumping an atomic count with
//! release ordering; readers read only entries below the count they loaded with acquire ordering,
//! so they never see a half-written entry.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{io_err, Result};

/// Bytes of one offset index entry.
pub(crate) const OFFSET_ENTRY_BYTES: usize = 8;
/// Bytes of one time index entry.
pub(crate) const TIME_ENTRY_BYTES: usize = 12;
const _: () = assert!(OFFSET_ENTRY_BYTES == 4 + 4);
const _: () = assert!(TIME_ENTRY_BYTES == 8 + 4);

/// Bytes of index file reserved at a time, by writing zeros through `pwrite`, before entries
/// are stored into that part of the map: a store into a page whose blocks the file system has
/// not reserved could need space on a full disk and raise SIGBUS, where `pwrite` returns an
/// error. One reservation covers 512 offset index entries (2 MiB of log at the default
/// `index_interval_bytes`) or 341 time index entries.
const RESERVE_CHUNK_BYTES: usize = 4096;

/// A file of fixed-size entries, memory-mapped for reading and writing.
///
/// No file descriptor is kept: entries are stored through the map, and the few operations that
/// need the file (reserving room, trimming, syncing) open it by path. A partition's active
/// segment thus holds one descriptor (its `.log`) instead of three, which matters with
/// thousands of partitions.
#[derive(Debug)]
struct MappedIndex {
    /// Where the file lives, for the operations that open it, error messages and deletion.
    path: PathBuf,
    /// Shared mapping of `capacity * entry_bytes` bytes (at least one entry); writable while
    /// the index has spare room, read-only for a sealed index opened from disk.
    map: MmapRaw,
    /// Bytes per entry.
    entry_bytes: usize,
    /// How many entries fit in the file as it is now; a sealed index has no spare room.
    capacity: AtomicU32,
    /// Entries published to readers.
    count: AtomicU32,
    /// The file's first `reserved` bytes have blocks reserved (written, or zeros written by
    /// `reserve`), so stores into them cannot fail for want of space. Only the writer uses it.
    reserved: AtomicUsize,
}

impl MappedIndex {
    /// Creates a fresh, pre-allocated (sparse) index, replacing any file of that name. The old
    /// file is unlinked rather than truncated, so readers that still map it are not disturbed.
    fn create(path: &Path, entry_bytes: usize, bytes_max: u32) -> Result<MappedIndex> {
        remove_if_exists(path)?;
        Self::recreate(path, entry_bytes, bytes_max)
    }

    /// Like `create`, but an existing file is emptied in place (same inode) instead of
    /// unlinked. Only for the index of a segment being opened, which nothing maps yet: making
    /// a new inode costs ext4 a search of its inode bitmaps, which took 70% of a 10,000-partition
    /// broker's start after `kill -9` (two index files rebuilt per partition).
    fn recreate(path: &Path, entry_bytes: usize, bytes_max: u32) -> Result<MappedIndex> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_err(path))?;
        let capacity = bytes_max as usize / entry_bytes;
        Self::map(path, file, entry_bytes, 0, capacity)
    }

    /// Opens an existing index with the entries its length says it has. With `preallocate`, the
    /// file is grown back to `bytes_max` so the index can take more entries.
    ///
    /// Returns `Ok(None)` when the file is missing or its length is not a whole number of
    /// entries: such an index is rebuilt, never trusted.
    fn open(
        path: &Path,
        entry_bytes: usize,
        bytes_max: u32,
        preallocate: bool,
    ) -> Result<Option<MappedIndex>> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(path)(e)),
        };
        let len = file.metadata().map_err(io_err(path))?.len() as usize;
        if !len.is_multiple_of(entry_bytes) || len > u32::MAX as usize {
            return Ok(None);
        }
        let count = len / entry_bytes;
        let capacity = if preallocate {
            count.max(bytes_max as usize / entry_bytes)
        } else {
            count
        };
        Self::map(path, file, entry_bytes, count, capacity).map(Some)
    }

    /// Sizes `file` for `capacity` entries and maps it; the descriptor is closed on return (the
    /// mapping stays valid).
    fn map(
        path: &Path,
        file: File,
        entry_bytes: usize,
        count: usize,
        capacity: usize,
    ) -> Result<MappedIndex> {
        assert!(count <= capacity);
        let bytes = capacity * entry_bytes;
        if file.metadata().map_err(io_err(path))?.len() != bytes as u64 {
            file.set_len(bytes as u64).map_err(io_err(path))?;
        }
        // A mapping cannot be empty; one entry of slack past the end of an empty file is never
        // touched because reads stop at `count` and writes at `capacity`.
        let options = {
            let mut options = MmapOptions::new();
            options.len(bytes.max(entry_bytes));
            options
        };
        let map = if count < capacity {
            options.map_raw(&file)
        } else {
            options.map_raw_read_only(&file)
        }
        .map_err(io_err(path))?;
        Ok(MappedIndex {
            path: path.to_path_buf(),
            map,
            entry_bytes,
            capacity: AtomicU32::new(capacity as u32),
            count: AtomicU32::new(count as u32),
            // Entries on disk are written; room past them is a hole until reserved.
            reserved: AtomicUsize::new(count * entry_bytes),
        })
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Acquire) as usize
    }

    fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed) as usize
    }

    /// Copies entry `index` out of the map.
    fn entry<const N: usize>(&self, index: usize) -> [u8; N] {
        assert!(N == self.entry_bytes);
        assert!(index < self.count());
        let mut out = [0u8; N];
        // SAFETY: `index < count <= capacity`, so the N bytes lie inside the mapping and inside
        // the file (the file is `capacity * entry_bytes` long). Entries below `count` were fully
        // written before `count` was published with release ordering and are never written
        // again, so this read does not race with the writer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(index * self.entry_bytes),
                out.as_mut_ptr(),
                N,
            );
        }
        out
    }

    /// Appends one entry. Only the log's single writer calls this.
    ///
    /// The entry is stored through the map, into room reserved beforehand (see
    /// `RESERVE_CHUNK_BYTES`), so a full disk fails `reserve` with an error instead of a store
    /// with SIGBUS.
    fn push(&self, bytes: &[u8]) -> Result<()> {
        assert!(bytes.len() == self.entry_bytes);
        let count = self.count.load(Ordering::Relaxed) as usize;
        assert!(count < self.capacity.load(Ordering::Relaxed) as usize);
        let at = count * self.entry_bytes;
        let end = at + self.entry_bytes;
        if end > self.reserved.load(Ordering::Relaxed) {
            self.reserve(end)?;
        }
        // SAFETY: `count < capacity`, so the slot lies inside the mapping and the file, and the
        // mapping is writable (it is read-only only when `count == capacity` at open, and
        // `capacity` never grows). No reader reads slot `count` before `count` is bumped below
        // with release ordering, and there is one writer. The slot's blocks are reserved.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(at),
                self.entry_bytes,
            );
        }
        self.count.store(count as u32 + 1, Ordering::Release);
        Ok(())
    }

    /// Reserves the file's blocks up to at least `end` by writing zeros over the unreserved
    /// room, a chunk at a time, up to the file's end at most. The zeros lie past `count`, where
    /// nothing reads, and are overwritten by entries.
    fn reserve(&self, end: usize) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let from = self.reserved.load(Ordering::Relaxed);
        let file_bytes = self.capacity() * self.entry_bytes;
        assert!(from < end && end <= file_bytes);
        let to = (end.div_ceil(RESERVE_CHUNK_BYTES) * RESERVE_CHUNK_BYTES).min(file_bytes);
        let file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(io_err(&self.path))?;
        // Zeros only where no entry is yet: `from` is at or past the last stored entry's end.
        let zeros = vec![0u8; to - from];
        file.write_all_at(&zeros, from as u64)
            .map_err(io_err(&self.path))?;
        self.reserved.store(to, Ordering::Relaxed);
        Ok(())
    }

    /// Cuts the pre-allocated room off the file; the index takes no more entries afterwards.
    fn trim(&self) -> Result<()> {
        let count = self.count();
        self.capacity.store(count as u32, Ordering::Relaxed);
        let file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(io_err(&self.path))?;
        file.set_len((count * self.entry_bytes) as u64)
            .map_err(io_err(&self.path))
    }

    /// Forces the entries (stored through the map or not) to disk: `fdatasync` writes every
    /// dirty page of the file, whichever descriptor or mapping dirtied it.
    fn sync(&self) -> Result<()> {
        let file = File::open(&self.path).map_err(io_err(&self.path))?;
        file.sync_data().map_err(io_err(&self.path))
    }

    fn delete(&self) -> Result<()> {
        remove_if_exists(&self.path)
    }
}

/// Removes a file, treating "already gone" as success.
pub(crate) fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// The sparse offset index of one segment: relative offset -> position.
#[derive(Debug)]
pub(crate) struct OffsetIndex {
    /// Entries store offsets relative to this.
    base_offset: u64,
    inner: MappedIndex,
}

impl OffsetIndex {
    pub(crate) fn create(path: &Path, base_offset: u64, bytes_max: u32) -> Result<Self> {
        let inner = MappedIndex::create(path, OFFSET_ENTRY_BYTES, bytes_max)?;
        Ok(OffsetIndex { base_offset, inner })
    }

    /// An empty index in place of the file at `path`, keeping its inode: for rebuilding the
    /// index of a segment being opened, which no reader maps (see `MappedIndex::recreate`).
    pub(crate) fn recreate(path: &Path, base_offset: u64, bytes_max: u32) -> Result<Self> {
        let inner = MappedIndex::recreate(path, OFFSET_ENTRY_BYTES, bytes_max)?;
        Ok(OffsetIndex { base_offset, inner })
    }

    /// Opens an existing index; `Ok(None)` if it is missing or fails the sanity check against
    /// a log of `log_bytes`. With `check_all`, every entry is checked, else the last one.
    pub(crate) fn open(
        path: &Path,
        base_offset: u64,
        bytes_max: u32,
        preallocate: bool,
        log_bytes: u32,
        check_all: bool,
    ) -> Result<Option<Self>> {
        let Some(inner) = MappedIndex::open(path, OFFSET_ENTRY_BYTES, bytes_max, preallocate)?
        else {
            return Ok(None);
        };
        let index = OffsetIndex { base_offset, inner };
        let count = index.len();
        let first = if check_all {
            0
        } else {
            count.saturating_sub(1)
        };
        let mut previous = (0u32, 0u32);
        if first > 0 {
            previous = index.raw_entry(first - 1);
        }
        for i in first..count {
            let (relative_offset, position) = index.raw_entry(i);
            if relative_offset <= previous.0 || position <= previous.1 || position >= log_bytes {
                return Ok(None);
            }
            previous = (relative_offset, position);
        }
        Ok(Some(index))
    }

    pub(crate) fn len(&self) -> usize {
        self.inner.count()
    }

    /// How many entries the file has room for.
    pub(crate) fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    fn raw_entry(&self, index: usize) -> (u32, u32) {
        let e: [u8; OFFSET_ENTRY_BYTES] = self.inner.entry(index);
        (
            u32::from_be_bytes([e[0], e[1], e[2], e[3]]),
            u32::from_be_bytes([e[4], e[5], e[6], e[7]]),
        )
    }

    /// Entry `index` as (absolute offset, position).
    pub(crate) fn entry(&self, index: usize) -> (u64, u32) {
        let (relative_offset, position) = self.raw_entry(index);
        (self.base_offset + u64::from(relative_offset), position)
    }

    /// Records that the batch starting at `offset` sits at `position`.
    pub(crate) fn append(&self, offset: u64, position: u32) -> Result<()> {
        assert!(self.base_offset < offset);
        assert!(0 < position);
        let relative_offset = u32::try_from(offset - self.base_offset).expect("roll bounds it");
        if let Some(last) = self.len().checked_sub(1) {
            let (last_offset, last_position) = self.entry(last);
            assert!(last_offset < offset);
            assert!(last_position < position);
        }
        let mut bytes = [0u8; OFFSET_ENTRY_BYTES];
        bytes[..4].copy_from_slice(&relative_offset.to_be_bytes());
        bytes[4..].copy_from_slice(&position.to_be_bytes());
        self.inner.push(&bytes)
    }

    /// The greatest entry whose offset is <= `target`, as (offset, position); the segment's
    /// start `(base_offset, 0)` when there is none.
    pub(crate) fn lookup(&self, target: u64) -> (u64, u32) {
        let count = self.len();
        // Binary search for the number of entries with offset <= target.
        let (mut low, mut high) = (0usize, count);
        while low < high {
            let mid = low + (high - low) / 2;
            if self.entry(mid).0 <= target {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        match low.checked_sub(1) {
            Some(i) => self.entry(i),
            None => (self.base_offset, 0),
        }
    }

    pub(crate) fn trim(&self) -> Result<()> {
        self.inner.trim()
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.inner.sync()
    }

    pub(crate) fn delete(&self) -> Result<()> {
        self.inner.delete()
    }
}

/// The time index of one segment: running maximum timestamp -> relative offset.
#[derive(Debug)]
pub(crate) struct TimeIndex {
    /// Entries store offsets relative to this.
    base_offset: u64,
    inner: MappedIndex,
}

impl TimeIndex {
    pub(crate) fn create(path: &Path, base_offset: u64, bytes_max: u32) -> Result<Self> {
        let inner = MappedIndex::create(path, TIME_ENTRY_BYTES, bytes_max)?;
        Ok(TimeIndex { base_offset, inner })
    }

    /// As `OffsetIndex::recreate`.
    pub(crate) fn recreate(path: &Path, base_offset: u64, bytes_max: u32) -> Result<Self> {
        let inner = MappedIndex::recreate(path, TIME_ENTRY_BYTES, bytes_max)?;
        Ok(TimeIndex { base_offset, inner })
    }

    /// Opens an existing index; `Ok(None)` if it is missing or fails the sanity check against
    /// a segment whose records end before `next_offset`. With `check_all`, every entry is
    /// checked, else the last two.
    pub(crate) fn open(
        path: &Path,
        base_offset: u64,
        bytes_max: u32,
        preallocate: bool,
        next_offset: u64,
        check_all: bool,
    ) -> Result<Option<Self>> {
        let Some(inner) = MappedIndex::open(path, TIME_ENTRY_BYTES, bytes_max, preallocate)? else {
            return Ok(None);
        };
        let index = TimeIndex { base_offset, inner };
        let mut previous: Option<(i64, u64)> = None;
        let first = if check_all {
            0
        } else {
            index.len().saturating_sub(2)
        };
        for i in first..index.len() {
            let (timestamp, offset) = index.entry(i);
            if offset >= next_offset {
                return Ok(None);
            }
            if let Some((previous_timestamp, previous_offset)) = previous {
                if timestamp <= previous_timestamp || offset <= previous_offset {
                    return Ok(None);
                }
            }
            previous = Some((timestamp, offset));
        }
        Ok(Some(index))
    }

    pub(crate) fn len(&self) -> usize {
        self.inner.count()
    }

    /// How many entries the file has room for.
    pub(crate) fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    /// Entry `index` as (timestamp, absolute offset).
    pub(crate) fn entry(&self, index: usize) -> (i64, u64) {
        let e: [u8; TIME_ENTRY_BYTES] = self.inner.entry(index);
        let timestamp = i64::from_be_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
        let relative_offset = u32::from_be_bytes([e[8], e[9], e[10], e[11]]);
        (timestamp, self.base_offset + u64::from(relative_offset))
    }

    pub(crate) fn last_entry(&self) -> Option<(i64, u64)> {
        self.len().checked_sub(1).map(|i| self.entry(i))
    }

    /// Records that every record up to `offset` has a timestamp <= `timestamp`.
    pub(crate) fn append(&self, timestamp: i64, offset: u64) -> Result<()> {
        assert!(self.base_offset <= offset);
        if let Some((last_timestamp, last_offset)) = self.last_entry() {
            assert!(last_timestamp < timestamp);
            assert!(last_offset < offset);
        }
        let relative_offset = u32::try_from(offset - self.base_offset).expect("roll bounds it");
        let mut bytes = [0u8; TIME_ENTRY_BYTES];
        bytes[..8].copy_from_slice(&timestamp.to_be_bytes());
        bytes[8..].copy_from_slice(&relative_offset.to_be_bytes());
        self.inner.push(&bytes)
    }

    /// The offset after which to start looking for the first record with a timestamp >=
    /// `target`: the offset of the greatest entry whose timestamp is < `target`, or `None` to
    /// start at the segment's beginning.
    pub(crate) fn lookup_below(&self, target: i64) -> Option<u64> {
        let (mut low, mut high) = (0usize, self.len());
        while low < high {
            let mid = low + (high - low) / 2;
            if self.entry(mid).0 < target {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        low.checked_sub(1).map(|i| self.entry(i).1)
    }

    pub(crate) fn trim(&self) -> Result<()> {
        self.inner.trim()
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.inner.sync()
    }

    pub(crate) fn delete(&self) -> Result<()> {
        self.inner.delete()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_index_lookup_finds_greatest_entry_at_or_below() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.index");
        let index = OffsetIndex::create(&path, 100, 64).unwrap();
        assert_eq!(index.lookup(100), (100, 0));
        assert_eq!(index.lookup(5000), (100, 0));
        for (offset, position) in [(110, 4100), (120, 8300), (135, 12400)] {
            index.append(offset, position).unwrap();
        }
        let check = |target: u64, want: (u64, u32)| assert_eq!(index.lookup(target), want);
        check(100, (100, 0));
        check(109, (100, 0));
        check(110, (110, 4100));
        check(119, (110, 4100));
        check(120, (120, 8300));
        check(134, (120, 8300));
        check(135, (135, 12400));
        check(u64::MAX, (135, 12400));
    }

    /// Guards `recreate`: an existing index file is emptied in place, keeping its inode (no
    /// new inode for ext4 to allocate at recovery), and works as a fresh one.
    #[test]
    fn recreate_empties_an_index_file_in_place() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.index");
        let inode = |path: &Path| std::fs::metadata(path).unwrap().ino();
        let old = OffsetIndex::create(&path, 0, 64).unwrap();
        old.append(10, 1000).unwrap();
        old.sync().unwrap();
        drop(old);
        let before = inode(&path);
        let index = OffsetIndex::recreate(&path, 0, 64).unwrap();
        assert_eq!(inode(&path), before, "recreate made a new file");
        assert_eq!(index.len(), 0);
        index.append(20, 2000).unwrap();
        assert_eq!(index.lookup(25), (20, 2000));
        drop(index);
        let time_before = {
            let time_path = dir.path().join("x.timeindex");
            let t = TimeIndex::create(&time_path, 0, 120).unwrap();
            t.append(5, 1).unwrap();
            drop(t);
            let ino = inode(&time_path);
            let t = TimeIndex::recreate(&time_path, 0, 120).unwrap();
            assert_eq!(t.len(), 0);
            (ino, inode(&time_path))
        };
        assert_eq!(time_before.0, time_before.1);
        // A missing file is simply created.
        let fresh = dir.path().join("y.index");
        assert_eq!(OffsetIndex::recreate(&fresh, 0, 64).unwrap().len(), 0);
    }

    #[test]
    fn offset_index_fills_up_and_reopens_after_trim() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.index");
        let index = OffsetIndex::create(&path, 0, 64).unwrap();
        for i in 1..=8u32 {
            assert!(index.len() < index.capacity());
            index.append(u64::from(i) * 10, i * 1000).unwrap();
        }
        assert_eq!(index.len(), index.capacity());
        index.trim().unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 64);
        drop(index);
        let index = OffsetIndex::open(&path, 0, 128, true, 9000, true)
            .unwrap()
            .unwrap();
        assert_eq!(index.len(), 8);
        assert_eq!(index.capacity(), 16);
        assert_eq!(index.lookup(55), (50, 5000));
        // An entry pointing past the end of the log fails the check.
        drop(index);
        assert!(OffsetIndex::open(&path, 0, 128, false, 8000, true)
            .unwrap()
            .is_none());
    }

    /// Entries are stored through the map into room reserved a chunk at a time: they reach
    /// the file across chunk boundaries, the room past the last reservation stays a hole, and
    /// an index reopened to take more entries reserves from where its entries end.
    #[test]
    fn entries_stored_through_the_map_reach_the_file_across_reservations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.index");
        let entry = |i: u32| (u64::from(i) * 3, i * 100);
        let index = OffsetIndex::create(&path, 0, 64 << 10).unwrap();
        let first = 1000u32; // 8,000 bytes: past the first 4 KiB reservation
        for i in 1..=first {
            let (offset, position) = entry(i);
            index.append(offset, position).unwrap();
        }
        assert_eq!(
            index.inner.reserved.load(Ordering::Relaxed),
            2 * RESERVE_CHUNK_BYTES
        );
        index.sync().unwrap();
        // Another descriptor sees what the map stored.
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 64 << 10);
        for i in 1..=first {
            let at = (i as usize - 1) * OFFSET_ENTRY_BYTES;
            let (offset, position) = entry(i);
            assert_eq!(&bytes[at..at + 4], &(offset as u32).to_be_bytes());
            assert_eq!(&bytes[at + 4..at + 8], &position.to_be_bytes());
        }
        assert!(bytes[first as usize * OFFSET_ENTRY_BYTES..]
            .iter()
            .all(|&b| b == 0));
        index.trim().unwrap();
        drop(index);

        let index = OffsetIndex::open(&path, 0, 64 << 10, true, u32::MAX, true)
            .unwrap()
            .unwrap();
        assert_eq!(index.len(), first as usize);
        assert_eq!(
            index.inner.reserved.load(Ordering::Relaxed),
            first as usize * OFFSET_ENTRY_BYTES
        );
        let more = 2000u32;
        for i in first + 1..=more {
            let (offset, position) = entry(i);
            index.append(offset, position).unwrap();
        }
        index.trim().unwrap();
        index.sync().unwrap();
        drop(index);
        let index = OffsetIndex::open(&path, 0, 64 << 10, false, u32::MAX, true)
            .unwrap()
            .unwrap();
        assert_eq!(index.len(), more as usize);
        for i in [1, first, first + 1, more] {
            assert_eq!(index.entry(i as usize - 1), entry(i));
        }
    }

    #[test]
    fn offset_index_open_rejects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.index");
        // Missing file.
        assert!(OffsetIndex::open(&path, 0, 64, false, 100, true)
            .unwrap()
            .is_none());
        // Length not a multiple of the entry size.
        fs::write(&path, [0u8; 13]).unwrap();
        assert!(OffsetIndex::open(&path, 0, 64, false, 100, true)
            .unwrap()
            .is_none());
        // Pre-allocated zeros left by a crash.
        fs::write(&path, [0u8; 64]).unwrap();
        assert!(OffsetIndex::open(&path, 0, 64, false, 100, true)
            .unwrap()
            .is_none());
        // Entries out of order.
        let mut bytes = Vec::new();
        for (relative_offset, position) in [(5u32, 50u32), (4, 60)] {
            bytes.extend_from_slice(&relative_offset.to_be_bytes());
            bytes.extend_from_slice(&position.to_be_bytes());
        }
        fs::write(&path, &bytes).unwrap();
        assert!(OffsetIndex::open(&path, 0, 64, false, 100, true)
            .unwrap()
            .is_none());
    }

    #[test]
    fn time_index_lookup_below() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.timeindex");
        let index = TimeIndex::create(&path, 1000, 120).unwrap();
        assert_eq!(index.lookup_below(5), None);
        for (timestamp, offset) in [(-5, 1000), (10, 1004), (20, 1010)] {
            index.append(timestamp, offset).unwrap();
        }
        let check = |target: i64, want: Option<u64>| assert_eq!(index.lookup_below(target), want);
        check(-5, None);
        check(-4, Some(1000));
        check(10, Some(1000));
        check(11, Some(1004));
        check(20, Some(1004));
        check(21, Some(1010));
        index.trim().unwrap();
        drop(index);
        let index = TimeIndex::open(&path, 1000, 120, false, 1011, true)
            .unwrap()
            .unwrap();
        assert_eq!(index.last_entry(), Some((20, 1010)));
        drop(index);
        // The segment is shorter than the index claims.
        assert!(TimeIndex::open(&path, 1000, 120, false, 1010, false)
            .unwrap()
            .is_none());
    }
}
