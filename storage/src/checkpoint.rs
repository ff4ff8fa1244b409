//! The recovery-point checkpoint and the clean-shutdown marker of one log folder.
//!
//! `recovery-point.checkpoint`, 32 bytes, big-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `OCTLOGRP` |
//! | 8..12 | version, 1 |
//! | 12..20 | `recovery_point`: every record below it was flushed to disk |
//! | 20..28 | `log_start_offset` when the checkpoint was written |
//! | 28..32 | CRC-32 (crc32fast) of bytes 0..28 |
//!
//! It is replaced atomically: written to `recovery-point.checkpoint.tmp`, fsynced, renamed over
//! the old file, and the folder fsynced. A checkpoint that is missing, short, or fails its
//! checksum is ignored with a warning, and recovery then scans the whole log.
//!
//! `clean-shutdown` is an empty file written after the last flush on close and removed on open,
//! before anything else is written: its presence on open means the log was closed cleanly.
//!
//! Not thread-safe by itself: the log calls it under its flush lock.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use crate::error::{io_err, Result};
use crate::index::remove_if_exists;

/// File name of the recovery-point checkpoint inside a log folder.
pub(crate) const CHECKPOINT_FILE: &str = "recovery-point.checkpoint";
/// File name of the clean-shutdown marker inside a log folder.
pub(crate) const CLEAN_SHUTDOWN_FILE: &str = "clean-shutdown";
const MAGIC: &[u8; 8] = b"OCTLOGRP";
const VERSION: u32 = 1;
const CHECKPOINT_BYTES: usize = 32;
const _: () = assert!(CHECKPOINT_BYTES == 8 + 4 + 8 + 8 + 4);

/// What a checkpoint records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    /// Every record below this offset was on disk when the checkpoint was written.
    pub(crate) recovery_point: u64,
    /// The log start offset at that time.
    pub(crate) log_start_offset: u64,
}

impl Checkpoint {
    fn encode(&self) -> [u8; CHECKPOINT_BYTES] {
        let mut out = [0u8; CHECKPOINT_BYTES];
        out[0..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_be_bytes());
        out[12..20].copy_from_slice(&self.recovery_point.to_be_bytes());
        out[20..28].copy_from_slice(&self.log_start_offset.to_be_bytes());
        let crc = crc32fast::hash(&out[..28]);
        out[28..32].copy_from_slice(&crc.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<Checkpoint, String> {
        if bytes.len() != CHECKPOINT_BYTES {
            return Err(format!("length {} is not {CHECKPOINT_BYTES}", bytes.len()));
        }
        let stored = u32::from_be_bytes(bytes[28..32].try_into().expect("4 bytes"));
        let computed = crc32fast::hash(&bytes[..28]);
        if stored != computed {
            return Err(format!(
                "checksum {stored:#010x} does not match {computed:#010x}"
            ));
        }
        if &bytes[0..8] != MAGIC {
            return Err("wrong magic".to_string());
        }
        let version = u32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(format!("unknown version {version}"));
        }
        Ok(Checkpoint {
            recovery_point: u64::from_be_bytes(bytes[12..20].try_into().expect("8 bytes")),
            log_start_offset: u64::from_be_bytes(bytes[20..28].try_into().expect("8 bytes")),
        })
    }
}

/// Reads the checkpoint of the log in `dir`; `None` when it is missing or damaged (logged).
pub(crate) fn read_checkpoint(dir: &Path) -> Result<Option<Checkpoint>> {
    let path = dir.join(CHECKPOINT_FILE);
    match fs::read(&path) {
        Ok(bytes) => match Checkpoint::decode(&bytes) {
            Ok(checkpoint) => Ok(Some(checkpoint)),
            Err(reason) => {
                tracing::warn!(path = %path.display(), %reason, "ignoring damaged checkpoint; recovery scans the whole log");
                Ok(None)
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Atomically replaces the checkpoint of the log in `dir`.
pub(crate) fn write_checkpoint(dir: &Path, checkpoint: Checkpoint) -> Result<()> {
    write_atomically(dir, CHECKPOINT_FILE, &checkpoint.encode())
}

/// Writes `bytes` to `dir/name` so that after a crash the file holds either the old or the new
/// content, never a mix: temp file, fsync, rename, fsync of the folder.
pub(crate) fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(bytes).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)
}

/// Makes the folder's entries (created, renamed, removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Whether the log in `dir` was closed cleanly; removes the marker, durably, so that a crash from
/// now on is seen as unclean.
pub(crate) fn take_clean_shutdown_marker(dir: &Path) -> Result<bool> {
    let path = dir.join(CLEAN_SHUTDOWN_FILE);
    let clean = path.exists();
    if clean {
        remove_if_exists(&path)?;
        sync_dir(dir)?;
    }
    Ok(clean)
}

/// Writes the clean-shutdown marker, durably.
pub(crate) fn write_clean_shutdown_marker(dir: &Path) -> Result<()> {
    let path = dir.join(CLEAN_SHUTDOWN_FILE);
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&path))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trips_and_rejects_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_checkpoint(dir.path()).unwrap(), None);
        let checkpoint = Checkpoint {
            recovery_point: 1234,
            log_start_offset: 17,
        };
        write_checkpoint(dir.path(), checkpoint).unwrap();
        assert_eq!(read_checkpoint(dir.path()).unwrap(), Some(checkpoint));
        assert!(!dir.path().join("recovery-point.checkpoint.tmp").exists());

        let good = checkpoint.encode();
        for position in 0..CHECKPOINT_BYTES {
            let mut bad = good;
            bad[position] ^= 0x40;
            assert!(Checkpoint::decode(&bad).is_err(), "flip at {position}");
        }
        assert!(Checkpoint::decode(&good[..31]).is_err());
        fs::write(dir.path().join(CHECKPOINT_FILE), &good[..20]).unwrap();
        assert_eq!(read_checkpoint(dir.path()).unwrap(), None);
    }

    #[test]
    fn clean_shutdown_marker_is_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!take_clean_shutdown_marker(dir.path()).unwrap());
        write_clean_shutdown_marker(dir.path()).unwrap();
        assert!(take_clean_shutdown_marker(dir.path()).unwrap());
        assert!(!take_clean_shutdown_marker(dir.path()).unwrap());
    }
}
