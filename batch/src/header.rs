//! The fixed 61-byte header of a v2 record batch, and iteration over concatenated batches.
//!
//! Wire format (all integers big-endian; positions are byte positions within the batch):
//!
//! | position | field                    | type | notes                                     |
//! |---------:|--------------------------|------|-------------------------------------------|
//! |        0 | `base_offset`            | i64  | offset of the first record                |
//! |        8 | `batch_length`           | i32  | bytes after this field                    |
//! |       12 | `partition_leader_epoch` | i32  | set by the leader, not covered by the CRC |
//! |       16 | `magic`                  | i8   | always 2                                  |
//! |       17 | `crc`                    | u32  | CRC-32C of bytes `[21, end)`              |
//! |       21 | `attributes`             | i16  | codec, timestamp type, flags              |
//! |       23 | `last_offset_delta`      | i32  | `record_count - 1` for dense batches      |
//! |       27 | `base_timestamp`         | i64  | first record's timestamp                  |
//! |       35 | `max_timestamp`          | i64  | greatest record timestamp                 |
//! |       43 | `producer_id`            | i64  | -1 without idempotence                    |
//! |       51 | `producer_epoch`         | i16  | -1 without idempotence                    |
//! |       53 | `base_sequence`          | i32  | -1 without idempotence                    |
//! |       57 | `record_count`           | i32  | number of records that follow             |
//! |       61 | records                  |      |                                           |
//!
//! The fields before `crc` can be rewritten (the broker assigns `base_offset` and
//! `partition_leader_epoch`) without recomputing the checksum.
//!
//! Parsing reads fixed positions of a borrowed slice and never allocates. Everything here is
//! plain data and thread-safe.

use std::iter::FusedIterator;

use crate::error::BatchError;

/// Size of the fixed v2 batch header, up to the first record.
pub const BATCH_HEADER_BYTES: usize = 61;
/// Size of the prefix that every batch format shares: `base_offset` and `batch_length`.
pub const LOG_OVERHEAD_BYTES: usize = 12;
/// The `magic` byte of v2 batches, the only format this crate reads and writes.
pub const MAGIC_V2: u8 = 2;
/// `producer_id` of a batch from a producer without idempotence.
pub const NO_PRODUCER_ID: i64 = -1;
/// `producer_epoch` of a batch from a producer without idempotence.
pub const NO_PRODUCER_EPOCH: i16 = -1;
/// `base_sequence` of a batch from a producer without idempotence.
pub const NO_SEQUENCE: i32 = -1;
/// `partition_leader_epoch` of a batch that no leader has stamped yet (what producers send).
pub const NO_PARTITION_LEADER_EPOCH: i32 = -1;

/// Byte position of `base_offset` within a batch.
pub const BASE_OFFSET_POSITION: usize = 0;
/// Byte position of `batch_length` within a batch.
pub const BATCH_LENGTH_POSITION: usize = BASE_OFFSET_POSITION + 8;
/// Byte position of `partition_leader_epoch` within a batch.
pub const PARTITION_LEADER_EPOCH_POSITION: usize = BATCH_LENGTH_POSITION + 4;
/// Byte position of `magic` within a batch.
pub const MAGIC_POSITION: usize = PARTITION_LEADER_EPOCH_POSITION + 4;
/// Byte position of `crc` within a batch.
pub const CRC_POSITION: usize = MAGIC_POSITION + 1;
/// Byte position of `attributes` within a batch; the CRC covers everything from here on.
pub const ATTRIBUTES_POSITION: usize = CRC_POSITION + 4;
/// Byte position of `last_offset_delta` within a batch.
pub const LAST_OFFSET_DELTA_POSITION: usize = ATTRIBUTES_POSITION + 2;
/// Byte position of `base_timestamp` within a batch.
pub const BASE_TIMESTAMP_POSITION: usize = LAST_OFFSET_DELTA_POSITION + 4;
/// Byte position of `max_timestamp` within a batch.
pub const MAX_TIMESTAMP_POSITION: usize = BASE_TIMESTAMP_POSITION + 8;
/// Byte position of `producer_id` within a batch.
pub const PRODUCER_ID_POSITION: usize = MAX_TIMESTAMP_POSITION + 8;
/// Byte position of `producer_epoch` within a batch.
pub const PRODUCER_EPOCH_POSITION: usize = PRODUCER_ID_POSITION + 8;
/// Byte position of `base_sequence` within a batch.
pub const BASE_SEQUENCE_POSITION: usize = PRODUCER_EPOCH_POSITION + 2;
/// Byte position of `record_count` within a batch.
pub const RECORD_COUNT_POSITION: usize = BASE_SEQUENCE_POSITION + 4;
/// Byte position of the first record within a batch.
pub const RECORDS_POSITION: usize = RECORD_COUNT_POSITION + 4;

/// Smallest valid `batch_length`: a header without records.
pub const BATCH_LENGTH_MIN: i32 = (BATCH_HEADER_BYTES - LOG_OVERHEAD_BYTES) as i32;

const _: () = assert!(RECORDS_POSITION == BATCH_HEADER_BYTES);
const _: () = assert!(PARTITION_LEADER_EPOCH_POSITION == LOG_OVERHEAD_BYTES);
const _: () = assert!(BATCH_LENGTH_MIN == 49);

/// `attributes` bits 0-2: the compression codec.
pub const ATTRIBUTE_COMPRESSION_MASK: i16 = 0x07;
/// `attributes` bit 3: set when timestamps were assigned by the broker (log-append time).
pub const ATTRIBUTE_LOG_APPEND_TIME_FLAG: i16 = 0x08;
/// `attributes` bit 4: set when the batch belongs to a transaction.
pub const ATTRIBUTE_TRANSACTIONAL_FLAG: i16 = 0x10;
/// `attributes` bit 5: set when the batch holds a control record (a transaction marker).
pub const ATTRIBUTE_CONTROL_FLAG: i16 = 0x20;
/// `attributes` bit 6: set when `base_timestamp` holds the compaction delete horizon.
pub const ATTRIBUTE_DELETE_HORIZON_FLAG: i16 = 0x40;

/// The compression codec of a batch's records (`attributes` bits 0-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Codec 0: records are stored as they are.
    None,
    /// Codec 1.
    Gzip,
    /// Codec 2.
    Snappy,
    /// Codec 3.
    Lz4,
    /// Codec 4.
    Zstd,
}

impl Compression {
    /// The compression for codec bits `codec`, or `None` for the invalid codecs 5..=7 and above.
    pub fn from_codec(codec: u8) -> Option<Compression> {
        match codec {
            0 => Some(Compression::None),
            1 => Some(Compression::Gzip),
            2 => Some(Compression::Snappy),
            3 => Some(Compression::Lz4),
            4 => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// The codec number written in `attributes` bits 0-2.
    pub fn codec(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Snappy => 2,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }
}

/// Parsed fixed header; plain data, borrows nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Offset of the first record; the leader assigns it on append (producers send 0).
    pub base_offset: i64,
    /// Bytes after this field, so that a reader knows where the next batch starts.
    pub batch_length: i32,
    /// Epoch of the leader that appended the batch, used to detect diverging logs.
    pub partition_leader_epoch: i32,
    /// Format version; always 2 once parsed.
    pub magic: i8,
    /// CRC-32C of the bytes from `attributes` to the end of the batch.
    pub crc: u32,
    /// Codec and flags; see the `ATTRIBUTE_*` constants.
    pub attributes: i16,
    /// Offset of the last record minus `base_offset`.
    pub last_offset_delta: i32,
    /// First record's timestamp in ms; record timestamps are deltas from it.
    pub base_timestamp: i64,
    /// Greatest record timestamp in ms, so the time index need not decode records.
    pub max_timestamp: i64,
    /// Idempotent producer's id, or `NO_PRODUCER_ID`.
    pub producer_id: i64,
    /// Idempotent producer's epoch, or `NO_PRODUCER_EPOCH`.
    pub producer_epoch: i16,
    /// Sequence number of the first record, for deduplication, or `NO_SEQUENCE`.
    pub base_sequence: i32,
    /// Number of records in the batch.
    pub record_count: i32,
}

fn read_i16(buf: &[u8], position: usize) -> i16 {
    i16::from_be_bytes([buf[position], buf[position + 1]])
}

fn read_i32(buf: &[u8], position: usize) -> i32 {
    let mut bytes = [0; 4];
    bytes.copy_from_slice(&buf[position..position + 4]);
    i32::from_be_bytes(bytes)
}

fn read_i64(buf: &[u8], position: usize) -> i64 {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&buf[position..position + 8]);
    i64::from_be_bytes(bytes)
}

/// Checks the framing common to `parse` and `parse_verified`: length fields, a complete batch,
/// and the magic byte (which decides how the rest, CRC included, is read). Returns the batch's
/// size.
fn check_frame(buf: &[u8]) -> Result<usize, BatchError> {
    if buf.len() < LOG_OVERHEAD_BYTES {
        return Err(BatchError::Truncated {
            needed: BATCH_HEADER_BYTES,
            available: buf.len(),
        });
    }
    let (_, size) = peek_batch_size(buf)?;
    if buf.len() < size {
        return Err(BatchError::Truncated {
            needed: size,
            available: buf.len(),
        });
    }
    assert!(BATCH_HEADER_BYTES <= size);
    let magic = buf[MAGIC_POSITION] as i8;
    if magic != MAGIC_V2 as i8 {
        return Err(BatchError::WrongMagic { magic });
    }
    Ok(size)
}

/// Reads the header fields; the caller has checked that `buf` holds the whole header.
fn read_fields(buf: &[u8]) -> BatchHeader {
    BatchHeader {
        base_offset: read_i64(buf, BASE_OFFSET_POSITION),
        batch_length: read_i32(buf, BATCH_LENGTH_POSITION),
        partition_leader_epoch: read_i32(buf, PARTITION_LEADER_EPOCH_POSITION),
        magic: buf[MAGIC_POSITION] as i8,
        crc: read_i32(buf, CRC_POSITION) as u32,
        attributes: read_i16(buf, ATTRIBUTES_POSITION),
        last_offset_delta: read_i32(buf, LAST_OFFSET_DELTA_POSITION),
        base_timestamp: read_i64(buf, BASE_TIMESTAMP_POSITION),
        max_timestamp: read_i64(buf, MAX_TIMESTAMP_POSITION),
        producer_id: read_i64(buf, PRODUCER_ID_POSITION),
        producer_epoch: read_i16(buf, PRODUCER_EPOCH_POSITION),
        base_sequence: read_i32(buf, BASE_SEQUENCE_POSITION),
        record_count: read_i32(buf, RECORD_COUNT_POSITION),
    }
}

impl BatchHeader {
    /// Cheap structural validation of the batch at the start of `buf`, without touching the
    /// records or the CRC: the header and the whole batch (`12 + batch_length` bytes) are in
    /// `buf`, `batch_length >= 49`, the magic is 2, the compression codec is 0..=4, and the
    /// batch holds at least one record with dense offsets. Bytes after the batch are ignored.
    /// `base_offset` may be any value.
    ///
    /// # Errors
    ///
    /// `Truncated`, `BatchLengthInvalid`, `WrongMagic`, `UnsupportedCompression` (codec 5..=7
    /// only) or `RecordCountMismatch`.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        check_frame(buf)?;
        let header = read_fields(buf);
        header.check_fields()?;
        Ok(header)
    }

    /// `parse` plus the CRC-32C check over `buf[21 .. 12 + batch_length]`.
    ///
    /// The checksum is compared before the fields it covers are validated, so that a corrupted
    /// byte anywhere from `attributes` on is reported as `CrcMismatch`.
    ///
    /// # Errors
    ///
    /// As `parse`, plus `CrcMismatch`.
    pub fn parse_verified(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        let size = check_frame(buf)?;
        let header = read_fields(buf);
        let computed = compute_crc(&buf[..size]);
        if computed != header.crc {
            return Err(BatchError::CrcMismatch {
                stored: header.crc,
                computed,
            });
        }
        header.check_fields()?;
        Ok(header)
    }

    /// Validates the fields that `check_frame` does not.
    fn check_fields(&self) -> Result<(), BatchError> {
        let codec = (self.attributes & ATTRIBUTE_COMPRESSION_MASK) as u8;
        if Compression::from_codec(codec).is_none() {
            return Err(BatchError::UnsupportedCompression { codec });
        }
        // Producers always send dense batches; compaction, which could leave gaps, is not
        // something this log does.
        if self.record_count < 1 || self.last_offset_delta != self.record_count - 1 {
            return Err(BatchError::RecordCountMismatch {
                record_count: self.record_count,
                last_offset_delta: self.last_offset_delta,
            });
        }
        Ok(())
    }

    /// Size of the whole batch in bytes: `12 + batch_length`.
    ///
    /// # Panics
    ///
    /// If `batch_length` is negative, which `parse` rejects.
    pub fn size(&self) -> usize {
        let batch_length = usize::try_from(self.batch_length).expect("batch_length is negative");
        LOG_OVERHEAD_BYTES + batch_length
    }

    /// Offset of the last record: `base_offset + last_offset_delta`.
    ///
    /// Wraps around on overflow, which only a `base_offset` within 2^31 of `i64::MAX` can cause;
    /// callers that accept offsets from outside bound them first.
    pub fn last_offset(&self) -> i64 {
        self.base_offset
            .wrapping_add(i64::from(self.last_offset_delta))
    }

    /// The compression codec of the records.
    ///
    /// # Panics
    ///
    /// If the codec bits hold 5..=7, which `parse` rejects: only a hand-built header has them.
    pub fn compression(&self) -> Compression {
        let codec = (self.attributes & ATTRIBUTE_COMPRESSION_MASK) as u8;
        Compression::from_codec(codec).expect("parse rejects codecs above 4")
    }

    /// Whether the batch belongs to a transaction.
    pub fn is_transactional(&self) -> bool {
        self.attributes & ATTRIBUTE_TRANSACTIONAL_FLAG != 0
    }

    /// Whether the batch holds a control record (a transaction marker) instead of user data.
    pub fn is_control(&self) -> bool {
        self.attributes & ATTRIBUTE_CONTROL_FLAG != 0
    }

    /// Whether the broker assigned the timestamps: then every record's timestamp is
    /// `max_timestamp`.
    pub fn is_log_append_time(&self) -> bool {
        self.attributes & ATTRIBUTE_LOG_APPEND_TIME_FLAG != 0
    }

    /// Whether `base_timestamp` holds the compaction delete horizon.
    pub fn has_delete_horizon(&self) -> bool {
        self.attributes & ATTRIBUTE_DELETE_HORIZON_FLAG != 0
    }
}

/// Reads just the 12-byte prefix of the batch at the start of `buf`: returns its `base_offset`
/// and its total size (`12 + batch_length`), for scanning a log without parsing whole headers.
/// Does not check that `buf` holds the whole batch.
///
/// # Errors
///
/// `Truncated` (with `needed` 12) if `buf` is shorter than the prefix, `BatchLengthInvalid` if
/// `batch_length < 49`.
pub fn peek_batch_size(buf: &[u8]) -> Result<(i64, usize), BatchError> {
    if buf.len() < LOG_OVERHEAD_BYTES {
        return Err(BatchError::Truncated {
            needed: LOG_OVERHEAD_BYTES,
            available: buf.len(),
        });
    }
    let base_offset = read_i64(buf, BASE_OFFSET_POSITION);
    let batch_length = read_i32(buf, BATCH_LENGTH_POSITION);
    if batch_length < BATCH_LENGTH_MIN {
        return Err(BatchError::BatchLengthInvalid { batch_length });
    }
    let batch_length = usize::try_from(batch_length).expect("batch_length is at least 49");
    Ok((base_offset, LOG_OVERHEAD_BYTES + batch_length))
}

/// CRC-32C (Castagnoli) of `batch[21..]`, the bytes a v2 batch's `crc` field covers. `batch`
/// must end where the batch ends.
///
/// # Panics
///
/// If `batch` is shorter than 21 bytes.
pub fn compute_crc(batch: &[u8]) -> u32 {
    crc32c(&batch[ATTRIBUTES_POSITION..])
}

/// CRC-32C (Castagnoli, the CRC-32/ISCSI of the CRC catalogue) of `data`, with the widest
/// carry-less multiply the CPU has (AVX-512 VPCLMULQDQ where present), chosen at run time.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32
}

/// Overwrites the `base_offset` field; the CRC does not cover it, so it stays valid.
///
/// # Panics
///
/// If `batch` is shorter than the 61-byte header (a caller bug).
pub fn set_base_offset(batch: &mut [u8], base_offset: i64) {
    assert!(BATCH_HEADER_BYTES <= batch.len());
    batch[BASE_OFFSET_POSITION..BASE_OFFSET_POSITION + 8]
        .copy_from_slice(&base_offset.to_be_bytes());
}

/// Overwrites the `partition_leader_epoch` field; the CRC does not cover it, so it stays valid.
///
/// # Panics
///
/// If `batch` is shorter than the 61-byte header (a caller bug).
pub fn set_partition_leader_epoch(batch: &mut [u8], epoch: i32) {
    assert!(BATCH_HEADER_BYTES <= batch.len());
    batch[PARTITION_LEADER_EPOCH_POSITION..PARTITION_LEADER_EPOCH_POSITION + 4]
        .copy_from_slice(&epoch.to_be_bytes());
}

/// Overwrites the idempotent producer's fields (`producer_id`, `producer_epoch`,
/// `base_sequence`) and recomputes the CRC, which covers them. A producer stamps a closed batch
/// this way when it sends it for the first time. `batch` must end where the batch ends.
///
/// # Panics
///
/// If `batch` is shorter than the 61-byte header (a caller bug).
pub fn set_producer(batch: &mut [u8], producer_id: i64, producer_epoch: i16, base_sequence: i32) {
    assert!(BATCH_HEADER_BYTES <= batch.len());
    batch[PRODUCER_ID_POSITION..PRODUCER_ID_POSITION + 8]
        .copy_from_slice(&producer_id.to_be_bytes());
    batch[PRODUCER_EPOCH_POSITION..PRODUCER_EPOCH_POSITION + 2]
        .copy_from_slice(&producer_epoch.to_be_bytes());
    batch[BASE_SEQUENCE_POSITION..BASE_SEQUENCE_POSITION + 4]
        .copy_from_slice(&base_sequence.to_be_bytes());
    let crc = compute_crc(batch);
    batch[CRC_POSITION..CRC_POSITION + 4].copy_from_slice(&crc.to_be_bytes());
}

/// Iterates over a buffer of concatenated batches, yielding `Ok((header, batch_bytes))` per
/// batch, then one `Err` at the first invalid or truncated batch, then `None`. An empty buffer
/// yields nothing. Never allocates.
#[derive(Debug, Clone)]
pub struct BatchIter<'a> {
    /// The bytes not consumed yet; the next batch starts at `remaining[0]`.
    remaining: &'a [u8],
    /// Bytes consumed by the batches yielded so far, so callers can cut a log after the last
    /// valid batch.
    position: usize,
    /// Whether every batch's CRC is checked (`batches_verified`).
    verify_crc: bool,
    /// Set once an error was yielded, so the iterator stops instead of resyncing on garbage.
    failed: bool,
}

impl BatchIter<'_> {
    /// Byte position, within the buffer given to `batches`, of the first byte after the last
    /// batch yielded as `Ok`. After an `Err`, this is where the invalid bytes start.
    pub fn position(&self) -> usize {
        self.position
    }
}

impl<'a> Iterator for BatchIter<'a> {
    type Item = Result<(BatchHeader, &'a [u8]), BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.remaining.is_empty() {
            return None;
        }
        let parsed = if self.verify_crc {
            BatchHeader::parse_verified(self.remaining)
        } else {
            BatchHeader::parse(self.remaining)
        };
        match parsed {
            Ok(header) => {
                let size = header.size();
                assert!(size <= self.remaining.len());
                let (batch, rest) = self.remaining.split_at(size);
                self.remaining = rest;
                self.position += size;
                Some(Ok((header, batch)))
            }
            Err(error) => {
                self.failed = true;
                Some(Err(error))
            }
        }
    }
}

impl FusedIterator for BatchIter<'_> {}

/// Iterates over the batches of `buf` with `BatchHeader::parse` (no CRC check).
#[must_use]
pub fn batches(buf: &[u8]) -> BatchIter<'_> {
    BatchIter {
        remaining: buf,
        position: 0,
        verify_crc: false,
        failed: false,
    }
}

/// Iterates over the batches of `buf` with `BatchHeader::parse_verified` (CRC checked).
#[must_use]
pub fn batches_verified(buf: &[u8]) -> BatchIter<'_> {
    BatchIter {
        remaining: buf,
        position: 0,
        verify_crc: true,
        failed: false,
    }
}

#[cfg(test)]
mod tests {

    /// CRC-32C bit by bit (reflected polynomial 0x82F63B78), the definition itself.
    fn crc32c_bitwise(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in data {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// Guards the CRC every batch is checked with: the catalogue's check value, and agreement
    /// with the bitwise definition at every length up to 1100 bytes and a few large ones (the
    /// SIMD paths change at 16, 64, 128, 256 and 2048 bytes), at several alignments.
    #[test]
    fn crc32c_matches_its_definition() {
        assert_eq!(super::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(super::crc32c(b""), 0);
        let data: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for start in [0, 1, 7] {
            for len in (0..1100).chain([2047, 2048, 2049, 4096, 15_556, 65_537]) {
                let slice = &data[start..start + len];
                assert_eq!(
                    super::crc32c(slice),
                    crc32c_bitwise(slice),
                    "{len} bytes at {start}"
                );
            }
        }
    }

    /// Guards that restamping a batch's producer fields keeps it valid (the CRC covers them).
    #[test]
    fn set_producer_rewrites_fields_and_crc() {
        let mut builder = crate::BatchBuilder::new();
        builder.push(1, None, Some(b"a"), &[]);
        builder.push(2, None, Some(b"b"), &[]);
        let mut batch = builder.finish();
        set_producer(&mut batch, 42, 3, 17);
        let header = super::BatchHeader::parse_verified(&batch).unwrap();
        assert_eq!(
            (
                header.producer_id,
                header.producer_epoch,
                header.base_sequence
            ),
            (42, 3, 17)
        );
        assert_eq!(header.record_count, 2);
        batch[super::PRODUCER_ID_POSITION] ^= 1;
        assert!(super::BatchHeader::parse_verified(&batch).is_err());
    }

    use super::*;
    use crate::builder::BatchBuilder;

    /// A valid three-record batch from an idempotent producer, as a leader stored it.
    fn sample() -> Vec<u8> {
        let mut builder = BatchBuilder::new();
        builder.producer(7, 1, 100);
        builder.push(1_000, Some(b"a"), Some(b"one"), &[]);
        builder.push(3_000, None, Some(b"two"), &[("h", Some(b"v"))]);
        builder.push(2_000, Some(b"c"), None, &[]);
        let mut batch = builder.finish().to_vec();
        set_base_offset(&mut batch, 1_000);
        set_partition_leader_epoch(&mut batch, 5);
        batch
    }

    fn fix_crc(buf: &mut [u8]) {
        let crc = compute_crc(buf);
        buf[CRC_POSITION..ATTRIBUTES_POSITION].copy_from_slice(&crc.to_be_bytes());
    }

    fn put_i32_at(buf: &mut [u8], position: usize, value: i32) {
        buf[position..position + 4].copy_from_slice(&value.to_be_bytes());
    }

    fn set_attributes(buf: &mut [u8], attributes: i16) {
        buf[ATTRIBUTES_POSITION..ATTRIBUTES_POSITION + 2]
            .copy_from_slice(&attributes.to_be_bytes());
    }

    /// One header-parsing case: a mutation of `sample()` and what each parser must say.
    struct Case {
        /// Shown when the case fails.
        name: &'static str,
        /// Turns `sample()` into the input under test.
        mutate: fn(&mut Vec<u8>),
        /// What `BatchHeader::parse` must return.
        parse: Result<(), BatchError>,
        /// What `BatchHeader::parse_verified` must return.
        parse_verified: Result<(), BatchError>,
    }

    fn check(case: &Case) {
        let mut buf = sample();
        (case.mutate)(&mut buf);
        let parsed = BatchHeader::parse(&buf);
        assert_eq!(
            parsed.clone().map(|_| ()),
            case.parse,
            "{}: parse",
            case.name
        );
        let verified = BatchHeader::parse_verified(&buf);
        assert_eq!(
            verified.clone().map(|_| ()),
            case.parse_verified,
            "{}: parse_verified",
            case.name
        );
        if let (Ok(parsed), Ok(verified)) = (parsed, verified) {
            assert_eq!(parsed, verified, "{}", case.name);
            assert!(parsed.size() <= buf.len(), "{}", case.name);
        }
    }

    #[test]
    fn parse_cases() {
        let buf = sample();
        let size = buf.len();
        let stored = u32::from_be_bytes([buf[17], buf[18], buf[19], buf[20]]);
        let crc_mismatch = |mutate: fn(&mut Vec<u8>)| {
            let mut buf = sample();
            mutate(&mut buf);
            Err(BatchError::CrcMismatch {
                stored: u32::from_be_bytes([buf[17], buf[18], buf[19], buf[20]]),
                computed: compute_crc(&buf[..size]),
            })
        };
        let truncated = |needed, available| Err(BatchError::Truncated { needed, available });
        let flip_crc: fn(&mut Vec<u8>) = |buf| buf[CRC_POSITION] ^= 0x01;
        let flip_record_byte: fn(&mut Vec<u8>) = |buf| buf[RECORDS_POSITION + 3] ^= 0x80;
        let zero_record_count: fn(&mut Vec<u8>) = |buf| put_i32_at(buf, RECORD_COUNT_POSITION, 0);
        let cases = [
            Case {
                name: "valid",
                mutate: |_| {},
                parse: Ok(()),
                parse_verified: Ok(()),
            },
            Case {
                name: "bytes after the batch are ignored",
                mutate: |buf| buf.extend_from_slice(b"next batch"),
                parse: Ok(()),
                parse_verified: Ok(()),
            },
            Case {
                name: "negative base offset is not checked here",
                mutate: |buf| set_base_offset(buf, -5),
                parse: Ok(()),
                parse_verified: Ok(()),
            },
            Case {
                name: "empty buffer",
                mutate: |buf| buf.clear(),
                parse: truncated(BATCH_HEADER_BYTES, 0),
                parse_verified: truncated(BATCH_HEADER_BYTES, 0),
            },
            Case {
                name: "shorter than the length prefix",
                mutate: |buf| buf.truncate(11),
                parse: truncated(BATCH_HEADER_BYTES, 11),
                parse_verified: truncated(BATCH_HEADER_BYTES, 11),
            },
            Case {
                name: "shorter than the header",
                mutate: |buf| buf.truncate(60),
                parse: truncated(size, 60),
                parse_verified: truncated(size, 60),
            },
            Case {
                name: "last byte missing",
                mutate: |buf| {
                    buf.pop();
                },
                parse: truncated(size, size - 1),
                parse_verified: truncated(size, size - 1),
            },
            Case {
                name: "batch length 0",
                mutate: |buf| put_i32_at(buf, BATCH_LENGTH_POSITION, 0),
                parse: Err(BatchError::BatchLengthInvalid { batch_length: 0 }),
                parse_verified: Err(BatchError::BatchLengthInvalid { batch_length: 0 }),
            },
            Case {
                name: "batch length 48",
                mutate: |buf| put_i32_at(buf, BATCH_LENGTH_POSITION, 48),
                parse: Err(BatchError::BatchLengthInvalid { batch_length: 48 }),
                parse_verified: Err(BatchError::BatchLengthInvalid { batch_length: 48 }),
            },
            Case {
                name: "batch length negative",
                mutate: |buf| put_i32_at(buf, BATCH_LENGTH_POSITION, i32::MIN),
                parse: Err(BatchError::BatchLengthInvalid {
                    batch_length: i32::MIN,
                }),
                parse_verified: Err(BatchError::BatchLengthInvalid {
                    batch_length: i32::MIN,
                }),
            },
            Case {
                name: "batch length huge",
                mutate: |buf| put_i32_at(buf, BATCH_LENGTH_POSITION, i32::MAX),
                parse: truncated(LOG_OVERHEAD_BYTES + i32::MAX as usize, size),
                parse_verified: truncated(LOG_OVERHEAD_BYTES + i32::MAX as usize, size),
            },
            Case {
                name: "batch length one too large",
                mutate: |buf| {
                    let batch_length = read_i32(buf, BATCH_LENGTH_POSITION);
                    put_i32_at(buf, BATCH_LENGTH_POSITION, batch_length + 1);
                },
                parse: truncated(size + 1, size),
                parse_verified: truncated(size + 1, size),
            },
            Case {
                name: "magic 1",
                mutate: |buf| buf[MAGIC_POSITION] = 1,
                parse: Err(BatchError::WrongMagic { magic: 1 }),
                parse_verified: Err(BatchError::WrongMagic { magic: 1 }),
            },
            Case {
                name: "magic -1",
                mutate: |buf| buf[MAGIC_POSITION] = 0xff,
                parse: Err(BatchError::WrongMagic { magic: -1 }),
                parse_verified: Err(BatchError::WrongMagic { magic: -1 }),
            },
            Case {
                name: "bad crc",
                mutate: flip_crc,
                parse: Ok(()),
                parse_verified: Err(BatchError::CrcMismatch {
                    stored: stored ^ 0x0100_0000,
                    computed: stored,
                }),
            },
            Case {
                name: "corrupted record byte",
                mutate: flip_record_byte,
                parse: Ok(()),
                parse_verified: crc_mismatch(flip_record_byte),
            },
            Case {
                name: "record count 0 without crc fix-up is reported as corruption",
                mutate: zero_record_count,
                parse: Err(BatchError::RecordCountMismatch {
                    record_count: 0,
                    last_offset_delta: 2,
                }),
                parse_verified: crc_mismatch(zero_record_count),
            },
            Case {
                name: "record count 0",
                mutate: |buf| {
                    put_i32_at(buf, RECORD_COUNT_POSITION, 0);
                    put_i32_at(buf, LAST_OFFSET_DELTA_POSITION, -1);
                    fix_crc(buf);
                },
                parse: Err(BatchError::RecordCountMismatch {
                    record_count: 0,
                    last_offset_delta: -1,
                }),
                parse_verified: Err(BatchError::RecordCountMismatch {
                    record_count: 0,
                    last_offset_delta: -1,
                }),
            },
            Case {
                name: "record count negative",
                mutate: |buf| {
                    put_i32_at(buf, RECORD_COUNT_POSITION, i32::MIN);
                    put_i32_at(buf, LAST_OFFSET_DELTA_POSITION, i32::MAX);
                    fix_crc(buf);
                },
                parse: Err(BatchError::RecordCountMismatch {
                    record_count: i32::MIN,
                    last_offset_delta: i32::MAX,
                }),
                parse_verified: Err(BatchError::RecordCountMismatch {
                    record_count: i32::MIN,
                    last_offset_delta: i32::MAX,
                }),
            },
            Case {
                name: "last offset delta mismatch",
                mutate: |buf| {
                    put_i32_at(buf, LAST_OFFSET_DELTA_POSITION, 1);
                    fix_crc(buf);
                },
                parse: Err(BatchError::RecordCountMismatch {
                    record_count: 3,
                    last_offset_delta: 1,
                }),
                parse_verified: Err(BatchError::RecordCountMismatch {
                    record_count: 3,
                    last_offset_delta: 1,
                }),
            },
            Case {
                name: "codec 7",
                mutate: |buf| {
                    set_attributes(buf, 0x07);
                    fix_crc(buf);
                },
                parse: Err(BatchError::UnsupportedCompression { codec: 7 }),
                parse_verified: Err(BatchError::UnsupportedCompression { codec: 7 }),
            },
            Case {
                name: "codec 5 among flags",
                mutate: |buf| {
                    set_attributes(buf, 0x35);
                    fix_crc(buf);
                },
                parse: Err(BatchError::UnsupportedCompression { codec: 5 }),
                parse_verified: Err(BatchError::UnsupportedCompression { codec: 5 }),
            },
            Case {
                name: "codec 4 (zstd) is a valid header",
                mutate: |buf| {
                    set_attributes(buf, 0x04);
                    fix_crc(buf);
                },
                parse: Ok(()),
                parse_verified: Ok(()),
            },
        ];
        for case in &cases {
            check(case);
        }
    }

    #[test]
    fn parse_reads_every_field() {
        let buf = sample();
        let header = BatchHeader::parse_verified(&buf).expect("sample is valid");
        assert_eq!(
            header,
            BatchHeader {
                base_offset: 1_000,
                batch_length: i32::try_from(buf.len() - LOG_OVERHEAD_BYTES).expect("small"),
                partition_leader_epoch: 5,
                magic: 2,
                crc: compute_crc(&buf),
                attributes: 0,
                last_offset_delta: 2,
                base_timestamp: 1_000,
                max_timestamp: 3_000,
                producer_id: 7,
                producer_epoch: 1,
                base_sequence: 100,
                record_count: 3,
            }
        );
        assert_eq!(header.size(), buf.len());
        assert_eq!(header.last_offset(), 1_002);
        assert_eq!(header.compression(), Compression::None);
        assert!(!header.is_transactional());
        assert!(!header.is_control());
        assert!(!header.is_log_append_time());
        assert!(!header.has_delete_horizon());
    }

    #[test]
    fn attribute_flags() {
        let check_flags = |attributes: i16, compression, transactional, control, log_append| {
            let mut buf = sample();
            set_attributes(&mut buf, attributes);
            fix_crc(&mut buf);
            let header = BatchHeader::parse_verified(&buf).expect("valid attributes");
            assert_eq!(header.compression(), compression, "{attributes:#x}");
            assert_eq!(header.is_transactional(), transactional, "{attributes:#x}");
            assert_eq!(header.is_control(), control, "{attributes:#x}");
            assert_eq!(header.is_log_append_time(), log_append, "{attributes:#x}");
        };
        check_flags(0x01, Compression::Gzip, false, false, false);
        check_flags(0x02, Compression::Snappy, false, false, false);
        check_flags(0x03, Compression::Lz4, false, false, false);
        check_flags(0x08, Compression::None, false, false, true);
        check_flags(0x10, Compression::None, true, false, false);
        check_flags(0x30, Compression::None, true, true, false);
        check_flags(0x7c, Compression::Zstd, true, true, true);
        for codec in 0..=4 {
            let compression = Compression::from_codec(codec).expect("valid codec");
            assert_eq!(compression.codec(), codec);
        }
        assert_eq!(Compression::from_codec(5), None);
    }

    #[test]
    fn peek_batch_size_reads_only_the_prefix() {
        let buf = sample();
        assert_eq!(peek_batch_size(&buf), Ok((1_000, buf.len())));
        assert_eq!(
            peek_batch_size(&buf[..LOG_OVERHEAD_BYTES]),
            Ok((1_000, buf.len()))
        );
        assert_eq!(
            peek_batch_size(&buf[..LOG_OVERHEAD_BYTES - 1]),
            Err(BatchError::Truncated {
                needed: LOG_OVERHEAD_BYTES,
                available: LOG_OVERHEAD_BYTES - 1
            })
        );
        let mut short = buf.clone();
        put_i32_at(&mut short, BATCH_LENGTH_POSITION, BATCH_LENGTH_MIN - 1);
        assert_eq!(
            peek_batch_size(&short),
            Err(BatchError::BatchLengthInvalid { batch_length: 48 })
        );
        put_i32_at(&mut short, BATCH_LENGTH_POSITION, BATCH_LENGTH_MIN);
        assert_eq!(peek_batch_size(&short), Ok((1_000, BATCH_HEADER_BYTES)));
    }

    #[test]
    fn rewriting_offset_and_epoch_keeps_the_crc_valid() {
        let mut buf = sample();
        let crc = compute_crc(&buf);
        set_base_offset(&mut buf, i64::MAX - 2);
        set_partition_leader_epoch(&mut buf, -1);
        assert_eq!(compute_crc(&buf), crc);
        let header = BatchHeader::parse_verified(&buf).expect("still valid");
        assert_eq!(header.base_offset, i64::MAX - 2);
        assert_eq!(header.partition_leader_epoch, -1);
        assert_eq!(header.last_offset(), i64::MAX);
    }

    #[test]
    #[should_panic(expected = "BATCH_HEADER_BYTES <= batch.len()")]
    fn set_base_offset_on_a_short_buffer_is_a_bug() {
        set_base_offset(&mut [0; BATCH_HEADER_BYTES - 1], 0);
    }

    /// Three batches with offsets 0..3, 3..4 and 4..6, concatenated.
    fn three_batches() -> (Vec<u8>, Vec<usize>) {
        let mut builder = BatchBuilder::new();
        let mut log = Vec::new();
        let mut sizes = Vec::new();
        for (base_offset, count) in [(0, 3), (3, 1), (4, 2)] {
            for index in 0..count {
                builder.push(index, None, Some(b"value"), &[]);
            }
            let mut batch = builder.finish();
            set_base_offset(&mut batch, base_offset);
            sizes.push(batch.len());
            log.extend_from_slice(&batch);
        }
        (log, sizes)
    }

    fn base_offsets(iter: BatchIter<'_>) -> Vec<Result<i64, BatchError>> {
        iter.map(|item| item.map(|(header, _)| header.base_offset))
            .collect()
    }

    #[test]
    fn iterates_over_concatenated_batches() {
        let (log, sizes) = three_batches();
        assert_eq!(base_offsets(batches(&log)), [Ok(0), Ok(3), Ok(4)]);
        assert_eq!(base_offsets(batches_verified(&log)), [Ok(0), Ok(3), Ok(4)]);
        let mut iter = batches(&log);
        let mut position = 0;
        for size in sizes {
            let (header, batch) = iter.next().expect("a batch").expect("valid");
            assert_eq!(batch.len(), size);
            assert_eq!(header.size(), size);
            assert_eq!(batch, &log[position..position + size]);
            position += size;
            assert_eq!(iter.position(), position);
        }
        assert!(iter.next().is_none());
        assert!(batches(&[]).next().is_none());
    }

    #[test]
    fn truncated_tail_yields_one_error() {
        let (log, sizes) = three_batches();
        let cut = log.len() - 1;
        let mut iter = batches(&log[..cut]);
        assert_eq!(
            base_offsets(iter.clone()),
            [
                Ok(0),
                Ok(3),
                Err(BatchError::Truncated {
                    needed: sizes[2],
                    available: sizes[2] - 1
                })
            ]
        );
        iter.by_ref().take(3).for_each(drop);
        assert_eq!(iter.position(), sizes[0] + sizes[1]);
        assert!(iter.next().is_none());
        assert!(iter.next().is_none());

        // A tail too short for the length prefix.
        let cut = sizes[0] + 5;
        assert_eq!(
            base_offsets(batches_verified(&log[..cut])),
            [
                Ok(0),
                Err(BatchError::Truncated {
                    needed: BATCH_HEADER_BYTES,
                    available: 5
                })
            ]
        );
    }

    #[test]
    fn garbage_after_batches_yields_one_error() {
        let (mut log, _) = three_batches();
        log.extend_from_slice(&[0xab; 100]);
        let results = base_offsets(batches(&log));
        assert_eq!(results.len(), 4);
        assert_eq!(results[..3], [Ok(0), Ok(3), Ok(4)]);
        assert!(
            matches!(results[3], Err(BatchError::BatchLengthInvalid { .. })),
            "{results:?}"
        );

        // Zeroes, as a preallocated file tail holds, are an invalid batch length, not a batch.
        let (mut zeroed, _) = three_batches();
        zeroed.extend_from_slice(&[0; 64]);
        assert_eq!(
            base_offsets(batches(&zeroed))[3],
            Err(BatchError::BatchLengthInvalid { batch_length: 0 })
        );
    }

    #[test]
    fn verified_iteration_stops_at_a_corrupted_batch() {
        let (mut log, sizes) = three_batches();
        log[sizes[0] + RECORDS_POSITION] ^= 0x04;
        assert_eq!(base_offsets(batches(&log)), [Ok(0), Ok(3), Ok(4)]);
        let results = base_offsets(batches_verified(&log));
        assert_eq!(results.len(), 2);
        assert_eq!(results[0], Ok(0));
        assert!(
            matches!(results[1], Err(BatchError::CrcMismatch { .. })),
            "{results:?}"
        );
    }
}
