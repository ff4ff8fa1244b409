//! The Apache Kafka v2 record batch format (magic 2), shared by Octolog's storage, broker and
//! client, so that the client does not depend on the log engine.
//!
//! A batch is a fixed 61-byte header followed by `record_count` records. All header integers are
//! big-endian; record fields are zigzag varints (see `record` for their layout).
//!
//! | position | field                    | type | notes                                     |
//! |---------:|--------------------------|------|-------------------------------------------|
//! |        0 | `base_offset`            | i64  | offset of the first record                |
//! |        8 | `batch_length`           | i32  | bytes after this field                    |
//! |       12 | `partition_leader_epoch` | i32  | set by the leader, not covered by the CRC |
//! |       16 | `magic`                  | i8   | always 2                                  |
//! |       17 | `crc`                    | u32  | CRC-32C (Castagnoli) of bytes `[21, end)` |
//! |       21 | `attributes`             | i16  | bits 0-2 codec, 3 log-append time, 4 transactional, 5 control, 6 delete horizon |
//! |       23 | `last_offset_delta`      | i32  | `record_count - 1`: offsets are dense     |
//! |       27 | `base_timestamp`         | i64  | first record's timestamp                  |
//! |       35 | `max_timestamp`          | i64  | greatest record timestamp                 |
//! |       43 | `producer_id`            | i64  | -1 without idempotence                    |
//! |       51 | `producer_epoch`         | i16  | -1 without idempotence                    |
//! |       53 | `base_sequence`          | i32  | -1 without idempotence                    |
//! |       57 | `record_count`           | i32  | at least 1                                |
//! |       61 | records                  |      |                                           |
//!
//! The crate writes uncompressed batches only, and decodes the records of uncompressed batches
//! only; it parses the headers of compressed ones (codecs 1..=4) so that they can be stored and
//! served as they are.
//!
//! Everything here is plain data or pure functions, and thread-safe.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use octolog_batch::{decode_batch, set_base_offset, BatchBuilder, BatchHeader};
//!
//! # fn main() -> Result<(), octolog_batch::BatchError> {
//! // A producer builds a batch; offsets are deltas from 0 until the leader assigns them.
//! let mut builder = BatchBuilder::new();
//! builder.push(1_700_000_000_000, Some(b"user-1"), Some(b"signed up"), &[]);
//! builder.push(1_700_000_000_250, None, Some(b"tick"), &[("trace", Some(b"abc"))]);
//! let mut batch = builder.finish();
//!
//! // The leader assigns offsets by rewriting base_offset; the CRC does not cover it.
//! set_base_offset(&mut batch, 41);
//! let header = BatchHeader::parse_verified(&batch)?;
//! assert_eq!(header.record_count, 2);
//! assert_eq!(header.last_offset(), 42);
//! assert_eq!(header.size(), batch.len());
//!
//! // A consumer decodes the records; keys and values are slices of `batch`.
//! let (_, records) = decode_batch(&Bytes::from(batch))?;
//! assert_eq!(records[0].offset, 41);
//! assert_eq!(records[0].key.as_deref(), Some(&b"user-1"[..]));
//! assert_eq!(records[1].offset, 42);
//! assert_eq!(records[1].key, None);
//! assert_eq!(records[1].timestamp_ms, 1_700_000_000_250);
//! assert_eq!(records[1].headers[0].key, "trace");
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod builder;
mod error;
mod header;
mod offset;
mod record;
mod varint;

pub use builder::BatchBuilder;
pub use error::BatchError;
pub use header::{
    batches, batches_verified, compute_crc, peek_batch_size, set_base_offset,
    set_partition_leader_epoch, set_producer, BatchHeader, BatchIter, Compression,
    ATTRIBUTES_POSITION, ATTRIBUTE_COMPRESSION_MASK, ATTRIBUTE_CONTROL_FLAG,
    ATTRIBUTE_DELETE_HORIZON_FLAG, ATTRIBUTE_LOG_APPEND_TIME_FLAG, ATTRIBUTE_TRANSACTIONAL_FLAG,
    BASE_OFFSET_POSITION, BASE_SEQUENCE_POSITION, BASE_TIMESTAMP_POSITION, BATCH_HEADER_BYTES,
    BATCH_LENGTH_MIN, BATCH_LENGTH_POSITION, CRC_POSITION, LAST_OFFSET_DELTA_POSITION,
    LOG_OVERHEAD_BYTES, MAGIC_POSITION, MAGIC_V2, MAX_TIMESTAMP_POSITION,
    NO_PARTITION_LEADER_EPOCH, NO_PRODUCER_EPOCH, NO_PRODUCER_ID, NO_SEQUENCE,
    PARTITION_LEADER_EPOCH_POSITION, PRODUCER_EPOCH_POSITION, PRODUCER_ID_POSITION,
    RECORDS_POSITION, RECORD_COUNT_POSITION,
};
pub use offset::Offset;
pub use record::{decode_batch, decode_batches, validate_batch, Header, Record};
