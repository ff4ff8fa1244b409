//! Errors of the storage engine.
//!
//! Two kinds are kept apart (STYLE.md section 4): operating errors, which come from outside (a
//! malformed batch, an offset out of range, a damaged file, a failing disk) and are returned as
//! [`StorageError`]; and broken invariants of our own code, which are `assert!`ed and crash.

use std::io;
use std::path::{Path, PathBuf};

use octolog_batch::{BatchError, Offset};

/// An operating error of the storage engine. Messages are lowercase and say what to do where
/// there is something to do.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A read or a truncation named an offset the log does not hold.
    #[error(
        "offset {offset} is out of range: the log holds offsets [{log_start_offset}, {log_end_offset}), so reads start from {log_start_offset} to {log_end_offset}"
    )]
    OffsetOutOfRange {
        /// The offset that was asked for.
        offset: Offset,
        /// The first offset still held.
        log_start_offset: Offset,
        /// The next offset to be assigned.
        log_end_offset: Offset,
    },
    /// An append carried a batch that failed validation; nothing was written.
    #[error("invalid batch at byte {position} of the append: {source}")]
    InvalidBatch {
        /// Byte position of the bad batch inside the appended buffer.
        position: usize,
        /// What is wrong with it.
        #[source]
        source: BatchError,
    },
    /// An append carried a batch larger than `batch_bytes_max`; nothing was written.
    #[error("batch of {size} bytes exceeds batch_bytes_max of {max} bytes: send smaller batches")]
    BatchTooLarge {
        /// Size of the offending batch in bytes.
        size: usize,
        /// The configured `batch_bytes_max`.
        max: usize,
    },
    /// An append carried no batch at all.
    #[error("empty append: send at least one record batch")]
    EmptyAppend,
    /// Data on disk does not have the shape it must have.
    #[error("corrupt data in {path} at position {position}: {reason}")]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// Byte position of the damage inside the file.
        position: u64,
        /// What was found.
        reason: String,
    },
    /// A setting is outside what the engine supports.
    #[error("invalid log config: {0}")]
    InvalidConfig(String),
    /// The operating system refused an operation on a file.
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file or folder concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An earlier write or fsync failed; the log takes no more writes until it is reopened,
    /// which recovers it.
    #[error("the log at {path} stopped taking writes after an i/o error: restart to recover it")]
    Failed {
        /// The log's folder.
        path: PathBuf,
    },
    /// The log was closed; it takes no more appends.
    #[error("the log at {path} is closed")]
    Closed {
        /// The log's folder.
        path: PathBuf,
    },
}

/// Result alias for the storage engine.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Wraps an `io::Error` with the path it happened on: `file.sync_data().map_err(io_err(path))`.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}
