//! Producer-id allocation for idempotent producers: every id is handed out at most once per data
//! folder, even across `kill -9`.
//!
//! Ids are reserved in blocks of [`PRODUCER_ID_BLOCK_SIZE`] in `DATA_DIR/.producer-ids` (the
//! leading dot keeps it apart from topic folders, and it is a file, which topic discovery skips).
//! The file holds the first id of the next unreserved block; it is rewritten atomically (temp
//! file, fsync, rename, fsync of the folder) *before* any id of a new block is handed out. After
//! a crash the broker starts at the stored value, so the unused rest of the last block is skipped,
//! never reused. Layout, big-endian, 20 bytes:
//!
//! | bytes  | field                                         |
//! |--------|-----------------------------------------------|
//! | 0..4   | magic `b"OPID"`                               |
//! | 4..8   | version u32 = 1                               |
//! | 8..16  | `next_block_start` i64, >= 0                  |
//! | 16..20 | CRC-32 (crc32fast) of bytes 0..16             |
//!
//! A damaged file stops the broker from starting: guessing could hand out an id twice.
//!
//! Thread-safety: `ProducerIds` is shared behind the broker; `next` takes an internal lock and
//! may write the file (blocking I/O), so call it from a blocking thread.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{BrokerError, Result};
use crate::topic::write_atomically;

/// The file in the data folder that records reserved producer ids.
pub const PRODUCER_IDS_FILE: &str = ".producer-ids";
/// How many ids one write of [`PRODUCER_IDS_FILE`] reserves: one fsync per this many producers.
pub const PRODUCER_ID_BLOCK_SIZE: i64 = 1000;

const MAGIC: &[u8; 4] = b"OPID";
const VERSION: u32 = 1;
const FILE_BYTES: usize = 20;
const _: () = assert!(FILE_BYTES == 4 + 4 + 8 + 4);
const _: () = assert!(0 < PRODUCER_ID_BLOCK_SIZE);

/// The next id and the end of the reserved block, under one lock.
#[derive(Debug)]
struct Block {
    /// The id `next` hands out next.
    next_id: i64,
    /// Ids in `[next_id, reserved_end)` are reserved on disk and may be handed out.
    reserved_end: i64,
}

/// The broker's producer-id allocator. See the module documentation.
#[derive(Debug)]
pub struct ProducerIds {
    /// The data folder holding [`PRODUCER_IDS_FILE`].
    dir: PathBuf,
    /// Ids reserved and not yet handed out.
    block: Mutex<Block>,
}

fn encode(next_block_start: i64) -> [u8; FILE_BYTES] {
    let mut out = [0u8; FILE_BYTES];
    out[0..4].copy_from_slice(MAGIC);
    out[4..8].copy_from_slice(&VERSION.to_be_bytes());
    out[8..16].copy_from_slice(&next_block_start.to_be_bytes());
    let crc = crc32fast::hash(&out[0..16]);
    out[16..20].copy_from_slice(&crc.to_be_bytes());
    out
}

fn decode(path: &Path, bytes: &[u8]) -> Result<i64> {
    let bad = |reason: String| BrokerError::Metadata {
        path: path.to_path_buf(),
        reason: format!(
            "{reason}; the broker will not guess which producer ids were handed out: restore the \
             file, or remove it only if no producer that used this broker is still running"
        ),
    };
    if bytes.len() != FILE_BYTES {
        return Err(bad(format!(
            "{} bytes instead of {FILE_BYTES}",
            bytes.len()
        )));
    }
    let stored = u32::from_be_bytes(bytes[16..20].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(&bytes[0..16]);
    if stored != computed {
        return Err(bad(format!(
            "checksum {stored:08x} does not match {computed:08x}"
        )));
    }
    if &bytes[0..4] != MAGIC {
        return Err(bad("not a producer-id file (bad magic)".into()));
    }
    let version = u32::from_be_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(bad(format!("unsupported version {version}")));
    }
    let next = i64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes"));
    if next < 0 {
        return Err(bad(format!("negative next producer id {next}")));
    }
    Ok(next)
}

impl ProducerIds {
    /// Reads `dir/.producer-ids`; a missing file starts at id 0. Nothing is reserved until the
    /// first `next`.
    ///
    /// # Errors
    ///
    /// `Metadata` if the file cannot be read or is damaged.
    pub fn open(dir: &Path) -> Result<ProducerIds> {
        let path = dir.join(PRODUCER_IDS_FILE);
        let start = match fs::read(&path) {
            Ok(bytes) => decode(&path, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => {
                return Err(BrokerError::Metadata {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        Ok(ProducerIds {
            dir: dir.to_path_buf(),
            block: Mutex::new(Block {
                next_id: start,
                reserved_end: start,
            }),
        })
    }

    /// A producer id never handed out before. Blocking when a new block must be reserved.
    ///
    /// # Errors
    ///
    /// `Metadata` if the reservation cannot be written (nothing is handed out then);
    /// `LimitExceeded` if the ids ran out (after 2^63 of them).
    pub fn next(&self) -> Result<i64> {
        let mut block = self.block.lock().unwrap_or_else(|e| e.into_inner());
        assert!(block.next_id <= block.reserved_end);
        if block.next_id == block.reserved_end {
            let end = block
                .reserved_end
                .checked_add(PRODUCER_ID_BLOCK_SIZE)
                .ok_or_else(|| BrokerError::LimitExceeded {
                    what: "producer ids".into(),
                    limit: i64::MAX as u64,
                })?;
            write_atomically(&self.dir, PRODUCER_IDS_FILE, &encode(end))?;
            block.reserved_end = end;
        }
        let id = block.next_id;
        block.next_id += 1;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards the promise that no id is handed out twice across restarts, clean or not.
    #[test]
    fn ids_are_unique_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let mut seen = std::collections::HashSet::new();
        for _round in 0..3 {
            let ids = ProducerIds::open(dir.path()).unwrap();
            for _ in 0..(PRODUCER_ID_BLOCK_SIZE + 3) {
                assert!(seen.insert(ids.next().unwrap()));
            }
            // Dropped without any shutdown step: like a crash.
        }
        assert_eq!(seen.len() as i64, 3 * (PRODUCER_ID_BLOCK_SIZE + 3));
        let ids = ProducerIds::open(dir.path()).unwrap();
        let next = ids.next().unwrap();
        assert!(seen.iter().all(|&id| id < next));
    }

    #[test]
    fn damaged_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        ProducerIds::open(dir.path()).unwrap().next().unwrap();
        let path = dir.path().join(PRODUCER_IDS_FILE);
        let good = fs::read(&path).unwrap();
        assert_eq!(decode(&path, &good).unwrap(), PRODUCER_ID_BLOCK_SIZE);
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            assert!(decode(&path, &bad).is_err(), "flip at {i}");
        }
        fs::write(&path, &good[..FILE_BYTES - 1]).unwrap();
        let err = ProducerIds::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("bytes instead of"), "{err}");
        assert!(decode(&path, &encode(-5)).is_err());
    }
}
