//! Durable committed positions of consumer groups: an internal log in `DATA_DIR/.groups/offsets/`,
//! written with the same storage engine (and the same care: CRC-32C per batch, recovery that cuts
//! a torn tail, fsync before a commit is acknowledged) as every topic partition.
//!
//! Format: each committed position is one record of a v2 batch. Its key is
//! `group \n topic \n partition` in UTF-8 (group and topic names cannot hold a newline), its
//! value the position as decimal ASCII, or null for a tombstone that forgets the position. On
//! open the log is replayed from its start and the last record of each key wins.
//!
//! Compaction: once the log has `COMPACT_SEGMENTS` segments, the store rolls, writes every live
//! position again (a snapshot) into the new segment, and deletes the segments before it, so the
//! log holds at most a few segments whatever the commit rate.
//!
//! Thread-safety: shared by reference. `writer` serialises appends and compaction (a commit is
//! validated and written under it, so commits land in the order they were validated); `map`, a
//! leaf lock, is the in-memory copy read by everyone else. Blocking: call from blocking threads.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use octolog_batch::{BatchBuilder, Offset};
use octolog_storage::{FlushPolicy, Log, LogConfig};

use crate::error::{BrokerError, Result};

/// Segment size of the offsets log.
const SEGMENT_BYTES: u32 = 4 << 20;
/// Segments at which the log is compacted.
const COMPACT_SEGMENTS: usize = 3;
/// Most records per batch written.
const BATCH_RECORDS_MAX: usize = 1000;

/// Where a committed position belongs: group, topic, partition.
pub type PositionKey = (String, String, u32);

/// The committed positions and the log that makes them durable.
#[derive(Debug)]
pub struct OffsetStore {
    /// The internal log. Every append holds this lock.
    writer: Mutex<Log>,
    /// The last committed position of every key, as the log says.
    map: Mutex<BTreeMap<PositionKey, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn encode_key(key: &PositionKey) -> String {
    format!("{}\n{}\n{}", key.0, key.1, key.2)
}

fn decode_key(bytes: &[u8]) -> Option<PositionKey> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut parts = text.split('\n');
    let group = parts.next()?.to_string();
    let topic = parts.next()?.to_string();
    let partition = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some((group, topic, partition))
}

impl OffsetStore {
    /// Opens (recovering if needed) the offsets log in `dir` and replays it.
    ///
    /// # Errors
    ///
    /// `Metadata` if the log cannot be opened or read; a record that cannot be understood is
    /// skipped with a warning rather than failing the broker.
    pub fn open(dir: &Path) -> Result<OffsetStore> {
        OffsetStore::open_with(dir, SEGMENT_BYTES)
    }

    /// `open` with another segment size (tests use small ones to reach compaction quickly).
    fn open_with(dir: &Path, segment_bytes: u32) -> Result<OffsetStore> {
        let meta = |reason: String| BrokerError::Metadata {
            path: dir.to_path_buf(),
            reason,
        };
        let config = LogConfig {
            segment_bytes,
            index_bytes_max: 1 << 20,
            retention_ms: None,
            retention_bytes: None,
            flush: FlushPolicy::Always,
            ..LogConfig::default()
        };
        std::fs::create_dir_all(dir).map_err(|e| meta(e.to_string()))?;
        let log = Log::open(dir, config).map_err(|e| meta(e.to_string()))?;
        let mut map = BTreeMap::new();
        let mut offset = log.log_start_offset();
        let end = log.high_watermark();
        while offset < end {
            let read = log.read(offset, 1 << 20).map_err(|e| meta(e.to_string()))?;
            let records = octolog_batch::decode_batches(&read.batches)
                .map_err(|e| meta(format!("undecodable batch in the offsets log: {e}")))?;
            for record in records {
                if (record.offset as u64) < offset.0 {
                    continue;
                }
                let Some(key) = record.key.as_deref().and_then(decode_key) else {
                    tracing::warn!(
                        offset = record.offset,
                        "skipping a record without a valid key in the offsets log"
                    );
                    continue;
                };
                match record.value.as_deref() {
                    None => {
                        map.remove(&key);
                    }
                    Some(value) => {
                        match std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                            Some(position) => {
                                map.insert(key, position);
                            }
                            None => tracing::warn!(
                                offset = record.offset,
                                "skipping a record with an invalid position in the offsets log"
                            ),
                        }
                    }
                }
            }
            if read.next_offset <= offset {
                return Err(meta(format!(
                    "the offsets log does not advance at offset {offset}"
                )));
            }
            offset = read.next_offset;
        }
        tracing::info!(dir = %dir.display(), positions = map.len(), "opened group offsets");
        Ok(OffsetStore {
            writer: Mutex::new(log),
            map: Mutex::new(map),
        })
    }

    /// The committed position of `key`, if any.
    pub fn get(&self, key: &PositionKey) -> Option<u64> {
        lock(&self.map).get(key).copied()
    }

    /// Every committed position, as a snapshot.
    pub fn all(&self) -> BTreeMap<PositionKey, u64> {
        lock(&self.map).clone()
    }

    /// Commits positions (`None` forgets one) durably, after `validate` approves them with the
    /// writer lock held, so that a commit validated first is also written first.
    ///
    /// # Errors
    ///
    /// `Err(Ok(e))` when `validate` refused with `e`; `Err(Err(e))` when writing failed
    /// (nothing is committed then).
    pub fn commit<E>(
        &self,
        entries: &[(PositionKey, Option<u64>)],
        validate: impl FnOnce() -> std::result::Result<(), E>,
    ) -> std::result::Result<(), std::result::Result<E, BrokerError>> {
        self.commit_with(|| validate().map(|()| entries.to_vec()))
    }

    /// Commits the positions `choose` picks with the writer lock held (see `commit`).
    ///
    /// # Errors
    ///
    /// As [`OffsetStore::commit`].
    pub fn commit_with<E>(
        &self,
        choose: impl FnOnce() -> std::result::Result<Vec<(PositionKey, Option<u64>)>, E>,
    ) -> std::result::Result<(), std::result::Result<E, BrokerError>> {
        let log = lock(&self.writer);
        let entries = choose().map_err(Ok)?;
        self.write(&log, &entries).map_err(Err)?;
        // The commit is durable whatever compaction does; a failed compaction is retried by
        // the next commit.
        if let Err(e) = self.compact_if_needed(&log) {
            tracing::error!(error = %e, "compacting group offsets failed");
        }
        Ok(())
    }

    /// Holds the writer lock: nothing is committed until the guard is dropped.
    pub fn exclusive(&self) -> MutexGuard<'_, Log> {
        lock(&self.writer)
    }

    /// Appends `entries` and applies them to the map.
    fn write(&self, log: &Log, entries: &[(PositionKey, Option<u64>)]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let now = crate::broker::now_ms();
        let mut buf = bytes::BytesMut::new();
        for chunk in entries.chunks(BATCH_RECORDS_MAX) {
            let mut builder = BatchBuilder::new();
            for (key, position) in chunk {
                let value = position.map(|p| Bytes::from(p.to_string()));
                builder.push(now, Some(encode_key(key).as_bytes()), value.as_deref(), &[]);
            }
            buf.extend_from_slice(&builder.finish());
        }
        log.append(&buf).map_err(|e| BrokerError::Metadata {
            path: log.dir().to_path_buf(),
            reason: format!("cannot write committed positions: {e}"),
        })?;
        let mut map = lock(&self.map);
        for (key, position) in entries {
            match position {
                Some(p) => map.insert(key.clone(), *p),
                None => map.remove(key),
            };
        }
        Ok(())
    }

    /// Rewrites every live position into a fresh segment and drops the older ones, once the
    /// log has `COMPACT_SEGMENTS` segments.
    fn compact_if_needed(&self, log: &Log) -> Result<()> {
        if log.segment_count() < COMPACT_SEGMENTS {
            return Ok(());
        }
        let failed = |e: octolog_storage::StorageError| BrokerError::Metadata {
            path: log.dir().to_path_buf(),
            reason: format!("cannot compact committed positions: {e}"),
        };
        log.roll().map_err(failed)?;
        let snapshot_start: Offset = log.log_end_offset();
        let entries: Vec<(PositionKey, Option<u64>)> = lock(&self.map)
            .iter()
            .map(|(k, v)| (k.clone(), Some(*v)))
            .collect();
        self.write(log, &entries)?;
        let outcome = log.delete_segments_before(snapshot_start).map_err(failed)?;
        tracing::info!(
            positions = entries.len(),
            segments_deleted = outcome.segments_deleted,
            "compacted group offsets"
        );
        Ok(())
    }

    /// Flushes and closes the log cleanly.
    pub fn close(&self) -> Result<()> {
        let log = lock(&self.writer);
        log.close().map_err(|e| BrokerError::Metadata {
            path: log.dir().to_path_buf(),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(g: &str, t: &str, p: u32) -> PositionKey {
        (g.to_string(), t.to_string(), p)
    }

    fn commit(store: &OffsetStore, entries: &[(PositionKey, Option<u64>)]) {
        store.commit::<()>(entries, || Ok(())).expect("commit");
    }

    #[test]
    fn positions_survive_reopen_and_tombstones_forget() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = OffsetStore::open(dir.path()).unwrap();
            commit(
                &store,
                &[(key("g", "t", 0), Some(5)), (key("g", "t", 1), Some(7))],
            );
            commit(
                &store,
                &[(key("g", "t", 0), Some(9)), (key("h", "t", 0), Some(1))],
            );
            commit(&store, &[(key("h", "t", 0), None)]);
            // Dropped without close: the log is recovered from its checkpoint and fsyncs.
        }
        let store = OffsetStore::open(dir.path()).unwrap();
        assert_eq!(store.get(&key("g", "t", 0)), Some(9));
        assert_eq!(store.get(&key("g", "t", 1)), Some(7));
        assert_eq!(store.get(&key("h", "t", 0)), None);
        assert_eq!(store.all().len(), 2);
    }

    #[test]
    fn a_refused_validation_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = OffsetStore::open(dir.path()).unwrap();
        let refused = store.commit(&[(key("g", "t", 0), Some(5))], || Err("fenced"));
        assert!(matches!(refused, Err(Ok("fenced"))));
        assert_eq!(store.get(&key("g", "t", 0)), None);
        drop(store);
        assert!(OffsetStore::open(dir.path()).unwrap().all().is_empty());
    }

    #[test]
    fn compaction_keeps_every_live_position_and_bounds_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = OffsetStore::open_with(dir.path(), 64 << 10).unwrap();
        // About 35 bytes a record: enough commits to fill many 64 KiB segments.
        for round in 0..200u64 {
            let entries: Vec<_> = (0..100)
                .map(|p| (key("group", "topic", p), Some(round * 1000 + u64::from(p))))
                .collect();
            commit(&store, &entries);
        }
        {
            let log = lock(&store.writer);
            assert!(log.segment_count() < COMPACT_SEGMENTS);
            assert!(log.log_start_offset().0 > 0);
        }
        store.close().unwrap();
        let store = OffsetStore::open(dir.path()).unwrap();
        let all = store.all();
        assert_eq!(all.len(), 100);
        for p in 0..100u32 {
            assert_eq!(all[&key("group", "topic", p)], 199_000 + u64::from(p));
        }
    }

    #[test]
    fn keys_round_trip_and_bad_keys_are_refused() {
        let k = key("gateway.status", "gateway.jobs", 11);
        assert_eq!(decode_key(encode_key(&k).as_bytes()), Some(k));
        assert_eq!(decode_key(b"g\nt"), None);
        assert_eq!(decode_key(b"g\nt\nx"), None);
        assert_eq!(decode_key(b"g\nt\n1\n2"), None);
        assert_eq!(decode_key(&[0xff, b'\n', b't', b'\n', b'1']), None);
    }
}
