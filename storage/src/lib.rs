//! `octolog-storage`: the segmented, memory-mapped, checksummed, append-only log behind every
//! Octolog topic partition.
//!
//! A [`Log`] lives in one folder and is an ordered set of segments, each a `.log` file of Apache
//! Kafka v2 record batches (see `octolog-batch`) with a sparse offset index and a time index.
//! Appends are validated (structure, magic, CRC-32C), given dense offsets, and written with
//! positional writes into file space reserved ahead of them; reads are zero-copy
//! [`bytes::Bytes`] slices of the mapped segment. After an unclean shutdown the log is scanned
//! from its recovery point, a torn tail is cut off and the reserved zeros are trimmed.
//!
//! This crate is synchronous and knows nothing of async runtimes, networks or protobuf: the broker
//! calls it from the threads it chooses (blocking ones for appends that fsync).
//!
//! ```
//! use octolog_batch::{BatchBuilder, Offset};
//! use octolog_storage::{Log, LogConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let log = Log::open(dir.path(), LogConfig::default())?;
//! let mut builder = BatchBuilder::new();
//! builder.push(1_700_000_000_000, Some(b"job-42"), Some(b"queued"), &[]);
//! builder.push(1_700_000_000_001, Some(b"job-42"), Some(b"executing"), &[]);
//! let batch = builder.finish();
//! let appended = log.append(&batch)?;
//! assert_eq!(appended.first_offset, Offset(0));
//! assert_eq!(appended.log_end_offset, Offset(2));
//!
//! let read = log.read(Offset(1), 1 << 20)?;
//! let records = octolog_batch::decode_batches(&read.batches)?;
//! assert_eq!(records[1].value.as_deref(), Some(&b"executing"[..]));
//! log.close()?;
//! # Ok(())
//! # }
//! ```

mod checkpoint;
mod config;
mod error;
mod index;
mod log;
mod segment;

pub use crate::config::{FlushPolicy, LogConfig, SEGMENT_BYTES_LIMIT};
pub use crate::error::{Result, StorageError};
pub use crate::log::{AppendInfo, Log, OpenReport, ReadBatches, RetentionOutcome};
pub use octolog_batch::Offset;
