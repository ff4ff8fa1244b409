//! Decoded records (`Record`, `Header`) and the decoder for the records of uncompressed batches.
//!
//! Wire format of one record (varints are zigzag LEB128, see `varint`):
//!
//! ```text
//! length           varint   bytes after this field
//! attributes       i8       unused, 0
//! timestamp_delta  varlong  relative to the batch's base_timestamp
//! offset_delta     varint   relative to the batch's base_offset; equals the record's index
//! key_length       varint   -1 for a null key
//! key              bytes
//! value_length     varint   -1 for a null value
//! value            bytes
//! header_count     varint
//! headers          header_count times:
//!   key_length     varint   not null
//!   key            bytes    UTF-8
//!   value_length   varint   -1 for a null value
//!   value          bytes
//! ```
//!
//! Keys, values and header values are zero-copy slices of the batch's `Bytes`; only header keys
//! (`String`) and the `Vec`s are allocated. Plain data, thread-safe.

use std::ops::Range;

use bytes::Bytes;

use crate::error::BatchError;
use crate::header::{BatchHeader, Compression, BATCH_HEADER_BYTES};
use crate::varint::{read_varint, read_varlong};

/// One record header: an application-defined key-value pair attached to a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The header's name; the format requires UTF-8.
    pub key: String,
    /// The header's value; `None` is distinct from an empty value.
    pub value: Option<Bytes>,
}

/// One decoded record, with its absolute offset; key/value/headers are zero-copy slices of the
/// batch `Bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record's offset: the batch's `base_offset` plus the record's index in the batch.
    pub offset: i64,
    /// Creation time in ms since the Unix epoch, or the batch's `max_timestamp` for batches with
    /// log-append time.
    pub timestamp_ms: i64,
    /// The record's key, used for partitioning and compaction; `None` is distinct from empty.
    pub key: Option<Bytes>,
    /// The record's payload; `None` (a tombstone) is distinct from empty.
    pub value: Option<Bytes>,
    /// Application headers, in the order they were written.
    pub headers: Vec<Header>,
}

/// Smallest possible encoded record: a one-byte length, attributes, timestamp delta, offset
/// delta, key length, value length and header count.
const RECORD_BYTES_MIN: usize = 7;
/// Smallest possible encoded header: key length and value length.
const HEADER_BYTES_MIN: usize = 2;

/// Decodes all records of the batch at the start of `batch`, after verifying its CRC. Bytes after
/// the batch are ignored, as in `BatchHeader::parse`; use `decode_batches` for a buffer of
/// several batches. Control batches are decoded like any other: check `BatchHeader::is_control`.
///
/// # Errors
///
/// Anything `BatchHeader::parse_verified` reports; `UnsupportedCompression` for compressed
/// batches, whose records this crate cannot read; `RecordMalformed` if a record cannot be
/// decoded, does not have the offset delta its position implies, or if the records do not fill
/// the batch exactly.
pub fn decode_batch(batch: &Bytes) -> Result<(BatchHeader, Vec<Record>), BatchError> {
    let header = BatchHeader::parse_verified(batch)?;
    let mut records = Vec::new();
    decode_records(batch, &header, &mut records)?;
    Ok((header, records))
}

/// Decodes every batch of a buffer of concatenated batches (e.g. a fetch response), verifying
/// the CRC of each, and returns their records in order. An empty buffer gives no records.
///
/// A truncated batch at the end is an error, not skipped: the buffer must hold whole batches.
///
/// # Errors
///
/// As `decode_batch`, for the first batch that fails.
pub fn decode_batches(buf: &Bytes) -> Result<Vec<Record>, BatchError> {
    // Sized once from the headers (bounded by what the bytes can hold), rather than grown batch
    // by batch: growing moved every record decoded so far again at each doubling, about as many
    // bytes as a consumer's fetch answer holds (perf: 14% of its copying).
    let mut capacity = 0usize;
    let mut at = 0;
    while let Some(header) = buf.get(at..).and_then(|rest| BatchHeader::parse(rest).ok()) {
        capacity += usize::try_from(header.record_count).unwrap_or(0);
        at += header.size();
    }
    let mut records = Vec::with_capacity(capacity.min(buf.len() / RECORD_BYTES_MIN));
    let mut position = 0;
    while position < buf.len() {
        let header = BatchHeader::parse_verified(&buf[position..])?;
        let end = position + header.size();
        decode_records(&buf.slice(position..end), &header, &mut records)?;
        position = end;
    }
    assert!(position == buf.len());
    Ok(records)
}

/// Checks the batch at the start of `batch` in full without allocating: its header and CRC
/// (`BatchHeader::parse_verified`) and, for uncompressed batches, every record's framing, that
/// offset deltas run 0, 1, 2, ..., that the records fill the batch exactly, that header keys are
/// UTF-8, and that the header's `max_timestamp` is the greatest record timestamp (create-time
/// batches). This is what a broker checks before it appends a producer's batch. Compressed
/// batches are checked as far as their header and CRC.
///
/// # Errors
///
/// As `decode_batch`, and `RecordMalformed` with reason "max_timestamp does not match the
/// records" for a lying header.
pub fn validate_batch(batch: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse_verified(batch)?;
    if header.compression() != Compression::None {
        return Ok(header);
    }
    let end = header.size();
    let record_count = usize::try_from(header.record_count).expect("parse checks record_count");
    let mut position = BATCH_HEADER_BYTES;
    let mut max_timestamp = i64::MIN;
    for index in 0..record_count {
        let malformed = |reason| BatchError::RecordMalformed { index, reason };
        if position == end {
            return Err(malformed("batch ends before its record count is reached"));
        }
        let timestamp_delta =
            walk_record(&batch[..end], &mut position, index).map_err(malformed)?;
        max_timestamp = max_timestamp.max(header.base_timestamp.wrapping_add(timestamp_delta));
    }
    if position != end {
        return Err(BatchError::RecordMalformed {
            index: record_count,
            reason: "bytes after the last record of the batch",
        });
    }
    if !header.is_log_append_time() && max_timestamp != header.max_timestamp {
        return Err(BatchError::RecordMalformed {
            index: record_count,
            reason: "max_timestamp does not match the records",
        });
    }
    Ok(header)
}

/// Skips one length-prefixed field (length -1 is null where `nullable`) and returns its range.
fn skip_field(
    record: &[u8],
    position: &mut usize,
    nullable: bool,
    what: &'static str,
) -> Result<Range<usize>, &'static str> {
    let length = read_varint(record, position)?;
    if nullable && length == -1 {
        return Ok(*position..*position);
    }
    let length = usize::try_from(length).map_err(|_| what)?;
    if record.len() - *position < length {
        return Err(what);
    }
    *position += length;
    Ok(*position - length..*position)
}

/// Walks the `index`-th record at `position` in `buf` (which ends where the batch ends) and
/// returns its timestamp delta; `position` moves past the record.
fn walk_record(buf: &[u8], position: &mut usize, index: usize) -> Result<i64, &'static str> {
    let length = read_varint(buf, position)?;
    let length = usize::try_from(length).map_err(|_| "record length is negative")?;
    if buf.len() - *position < length {
        return Err("record length goes beyond the batch");
    }
    let record = &buf[..*position + length];
    if *position == record.len() {
        return Err("record ends before its attributes");
    }
    *position += 1;
    let timestamp_delta = read_varlong(record, position)?;
    let offset_delta = read_varint(record, position)?;
    if usize::try_from(offset_delta) != Ok(index) {
        return Err("offset delta does not match the record's index in the batch");
    }
    skip_field(record, position, true, "key goes beyond the record")?;
    skip_field(record, position, true, "value goes beyond the record")?;
    let header_count = read_varint(record, position)?;
    let header_count = usize::try_from(header_count).map_err(|_| "header count is negative")?;
    for _ in 0..header_count {
        let key = skip_field(
            record,
            position,
            false,
            "header key is null or goes beyond the record",
        )?;
        std::str::from_utf8(&record[key]).map_err(|_| "header key is not valid utf-8")?;
        skip_field(
            record,
            position,
            true,
            "header value goes beyond the record",
        )?;
    }
    if *position != record.len() {
        return Err("bytes after the last field of the record");
    }
    Ok(timestamp_delta)
}

/// Appends the records of `batch`, whose header `parse_verified` returned, to `records`.
fn decode_records(
    batch: &Bytes,
    header: &BatchHeader,
    records: &mut Vec<Record>,
) -> Result<(), BatchError> {
    let compression = header.compression();
    if compression != Compression::None {
        return Err(BatchError::UnsupportedCompression {
            codec: compression.codec(),
        });
    }
    let end = header.size();
    assert!(end <= batch.len());
    let record_count = usize::try_from(header.record_count).expect("parse checks record_count");
    // Reserve no more than the bytes can hold, since record_count comes from outside.
    records.reserve(record_count.min((end - BATCH_HEADER_BYTES) / RECORD_BYTES_MIN));

    let mut reader = Reader {
        batch,
        end,
        position: BATCH_HEADER_BYTES,
    };
    for index in 0..record_count {
        if reader.position == end {
            return Err(BatchError::RecordMalformed {
                index,
                reason: "batch ends before its record count is reached",
            });
        }
        let record = reader
            .record(header, index)
            .map_err(|reason| BatchError::RecordMalformed { index, reason })?;
        records.push(record);
    }
    if reader.position != end {
        return Err(BatchError::RecordMalformed {
            index: record_count,
            reason: "bytes after the last record of the batch",
        });
    }
    Ok(())
}

/// A cursor over the records area of one batch.
struct Reader<'a> {
    /// The batch, starting at its `base_offset` field; slices of it become keys and values.
    batch: &'a Bytes,
    /// Position just after the current record (or the batch); reads never go past it.
    end: usize,
    /// Position of the next byte to read.
    position: usize,
}

impl Reader<'_> {
    fn varint(&mut self) -> Result<i32, &'static str> {
        read_varint(&self.batch[..self.end], &mut self.position)
    }

    fn varlong(&mut self) -> Result<i64, &'static str> {
        read_varlong(&self.batch[..self.end], &mut self.position)
    }

    /// Skips `length` bytes and returns their range; `length` has been checked non-negative.
    fn bytes(&mut self, length: i32, beyond: &'static str) -> Result<Range<usize>, &'static str> {
        let length = usize::try_from(length).expect("caller checks that length >= 0");
        if self.end - self.position < length {
            return Err(beyond);
        }
        let start = self.position;
        self.position += length;
        Ok(start..self.position)
    }

    /// Reads a length-prefixed field where length -1 means null.
    fn nullable_bytes(
        &mut self,
        negative: &'static str,
        beyond: &'static str,
    ) -> Result<Option<Bytes>, &'static str> {
        match self.varint()? {
            -1 => Ok(None),
            length if length < 0 => Err(negative),
            length => Ok(Some(self.batch.slice(self.bytes(length, beyond)?))),
        }
    }

    /// Decodes the record at `position`, the `index`-th of its batch.
    fn record(&mut self, header: &BatchHeader, index: usize) -> Result<Record, &'static str> {
        let length = self.varint()?;
        let length = usize::try_from(length).map_err(|_| "record length is negative")?;
        if self.end - self.position < length {
            return Err("record length goes beyond the batch");
        }
        let batch_end = self.end;
        // Confine the reads of the fields to this record.
        self.end = self.position + length;

        if self.position == self.end {
            return Err("record ends before its attributes");
        }
        // Record attributes are unused by the format; like Kafka, ignore their value.
        self.position += 1;
        let timestamp_delta = self.varlong()?;
        let offset_delta = self.varint()?;
        if usize::try_from(offset_delta) != Ok(index) {
            return Err("offset delta does not match the record's index in the batch");
        }
        let key = self.nullable_bytes("key length is below -1", "key goes beyond the record")?;
        let value =
            self.nullable_bytes("value length is below -1", "value goes beyond the record")?;
        let header_count = self.varint()?;
        let header_count = usize::try_from(header_count).map_err(|_| "header count is negative")?;
        let mut headers =
            Vec::with_capacity(header_count.min((self.end - self.position) / HEADER_BYTES_MIN));
        for _ in 0..header_count {
            let key_length = self.varint()?;
            if key_length < 0 {
                return Err("header key is null");
            }
            let key_range = self.bytes(key_length, "header key goes beyond the record")?;
            let key = std::str::from_utf8(&self.batch[key_range])
                .map_err(|_| "header key is not valid utf-8")?
                .to_owned();
            let value = self.nullable_bytes(
                "header value length is below -1",
                "header value goes beyond the record",
            )?;
            headers.push(Header { key, value });
        }
        if self.position != self.end {
            return Err("bytes after the last field of the record");
        }
        self.end = batch_end;

        let timestamp_ms = if header.is_log_append_time() {
            header.max_timestamp
        } else {
            // Wrapping, as Java's long arithmetic does; the builder's wrapping subtraction makes
            // every timestamp round-trip.
            header.base_timestamp.wrapping_add(timestamp_delta)
        };
        Ok(Record {
            offset: header
                .base_offset
                .wrapping_add(i64::try_from(index).expect("index fits in i32")),
            timestamp_ms,
            key,
            value,
            headers,
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, BytesMut};

    use super::*;
    use crate::builder::BatchBuilder;
    use crate::header::{compute_crc, set_base_offset, ATTRIBUTES_POSITION, CRC_POSITION};
    use crate::varint::{put_varint, put_varlong};

    /// A batch at base offset 100 with base timestamp 1000 and max timestamp 2000, whose records
    /// area is `area` as given, with a valid CRC.
    fn raw_batch(record_count: i32, attributes: i16, area: &[u8]) -> Bytes {
        let mut buf = BytesMut::new();
        buf.put_i64(100);
        buf.put_i32(i32::try_from(49 + area.len()).expect("small test batch"));
        buf.put_i32(0);
        buf.put_u8(2);
        buf.put_u32(0);
        buf.put_i16(attributes);
        buf.put_i32(record_count - 1);
        buf.put_i64(1_000);
        buf.put_i64(2_000);
        buf.put_i64(-1);
        buf.put_i16(-1);
        buf.put_i32(-1);
        buf.put_i32(record_count);
        buf.put_slice(area);
        let crc = compute_crc(&buf);
        buf[CRC_POSITION..ATTRIBUTES_POSITION].copy_from_slice(&crc.to_be_bytes());
        buf.freeze()
    }

    /// Zigzag varint bytes of `value`.
    fn v(value: i32) -> Vec<u8> {
        let mut buf = Vec::new();
        put_varint(&mut buf, value);
        buf
    }

    /// A record: the length prefix followed by `body` (whose first byte is the attributes).
    fn record(body: &[&[u8]]) -> Vec<u8> {
        let body = body.concat();
        [v(i32::try_from(body.len()).expect("small")), body].concat()
    }

    /// The body of a simple record: timestamp delta 5, null key, value "x", no headers.
    fn simple(offset_delta: i32) -> Vec<u8> {
        let mut timestamp = Vec::new();
        put_varlong(&mut timestamp, 5);
        record(&[
            &[0],
            &timestamp,
            &v(offset_delta),
            &v(-1),
            &v(1),
            b"x",
            &v(0),
        ])
    }

    fn check(name: &str, batch: Bytes, expected: Result<Vec<Record>, BatchError>) {
        let decoded = decode_batch(&batch).map(|(_, records)| records);
        assert_eq!(decoded, expected, "{name}");
        assert_eq!(decode_batches(&batch), expected, "{name}: decode_batches");
        // The allocation-free validator agrees on what is malformed.
        if let Err(BatchError::RecordMalformed { index, .. }) = &expected {
            let got = validate_batch(&batch);
            assert!(
                matches!(got, Err(BatchError::RecordMalformed { index: i, .. }) if i == *index),
                "{name}: validate_batch gave {got:?}"
            );
        }
    }

    fn malformed(index: usize, reason: &'static str) -> Result<Vec<Record>, BatchError> {
        Err(BatchError::RecordMalformed { index, reason })
    }

    fn plain(offset: i64, timestamp_ms: i64) -> Record {
        Record {
            offset,
            timestamp_ms,
            key: None,
            value: Some(Bytes::from_static(b"x")),
            headers: Vec::new(),
        }
    }

    #[test]
    fn decode_cases() {
        let ts5 = [0x0a]; // varlong 5
        let two = [simple(0), simple(1)].concat();
        check(
            "one record",
            raw_batch(1, 0, &simple(0)),
            Ok(vec![plain(100, 1_005)]),
        );
        check(
            "two records",
            raw_batch(2, 0, &two),
            Ok(vec![plain(100, 1_005), plain(101, 1_005)]),
        );
        check(
            "log-append time uses max_timestamp",
            raw_batch(1, 0x08, &simple(0)),
            Ok(vec![plain(100, 2_000)]),
        );
        check(
            "key, empty value, headers with null and empty values",
            raw_batch(
                1,
                0,
                &record(&[
                    &[0],
                    &ts5,
                    &v(0),
                    &v(2),
                    b"ke",
                    &v(0),
                    &v(2),
                    &v(1),
                    b"a",
                    &v(-1),
                    &v(2),
                    "é".as_bytes(),
                    &v(0),
                ]),
            ),
            Ok(vec![Record {
                offset: 100,
                timestamp_ms: 1_005,
                key: Some(Bytes::from_static(b"ke")),
                value: Some(Bytes::new()),
                headers: vec![
                    Header {
                        key: "a".to_owned(),
                        value: None,
                    },
                    Header {
                        key: "é".to_owned(),
                        value: Some(Bytes::new()),
                    },
                ],
            }]),
        );
        check(
            "compressed",
            raw_batch(1, 0x01, &simple(0)),
            Err(BatchError::UnsupportedCompression { codec: 1 }),
        );
        check(
            "zstd",
            raw_batch(1, 0x14, &simple(0)),
            Err(BatchError::UnsupportedCompression { codec: 4 }),
        );
        check(
            "offset delta skips",
            raw_batch(2, 0, &[simple(0), simple(2)].concat()),
            malformed(
                1,
                "offset delta does not match the record's index in the batch",
            ),
        );
        check(
            "offset delta negative",
            raw_batch(1, 0, &simple(-1)),
            malformed(
                0,
                "offset delta does not match the record's index in the batch",
            ),
        );
        check(
            "record length negative",
            raw_batch(1, 0, &[v(-3), simple(0)].concat()),
            malformed(0, "record length is negative"),
        );
        check(
            "record length beyond the batch",
            raw_batch(1, 0, &[v(40), vec![0; 10]].concat()),
            malformed(0, "record length goes beyond the batch"),
        );
        check(
            "record length varint truncated",
            raw_batch(1, 0, &[0x80]),
            malformed(0, "varint truncated"),
        );
        check(
            "record length 0",
            raw_batch(1, 0, &record(&[])),
            malformed(0, "record ends before its attributes"),
        );
        check(
            "timestamp varlong cut by the record length",
            raw_batch(1, 0, &record(&[&[0], &[0x80]])),
            malformed(0, "varint truncated"),
        );
        check(
            "key length below -1",
            raw_batch(1, 0, &record(&[&[0], &ts5, &v(0), &v(-2), &v(-1), &v(0)])),
            malformed(0, "key length is below -1"),
        );
        check(
            "key beyond the record",
            raw_batch(1, 0, &record(&[&[0], &ts5, &v(0), &v(9), b"abc"])),
            malformed(0, "key goes beyond the record"),
        );
        check(
            "value beyond the record",
            raw_batch(1, 0, &record(&[&[0], &ts5, &v(0), &v(-1), &v(5), b"abc"])),
            malformed(0, "value goes beyond the record"),
        );
        check(
            "header count negative",
            raw_batch(1, 0, &record(&[&[0], &ts5, &v(0), &v(-1), &v(-1), &v(-1)])),
            malformed(0, "header count is negative"),
        );
        check(
            "header count beyond the record",
            raw_batch(
                1,
                0,
                &record(&[&[0], &ts5, &v(0), &v(-1), &v(-1), &v(1_000)]),
            ),
            malformed(0, "varint truncated"),
        );
        check(
            "header key null",
            raw_batch(
                1,
                0,
                &record(&[&[0], &ts5, &v(0), &v(-1), &v(-1), &v(1), &v(-1), &v(-1)]),
            ),
            malformed(0, "header key is null"),
        );
        check(
            "header key invalid utf-8",
            raw_batch(
                1,
                0,
                &record(&[
                    &[0],
                    &ts5,
                    &v(0),
                    &v(-1),
                    &v(-1),
                    &v(1),
                    &v(1),
                    &[0xff],
                    &v(-1),
                ]),
            ),
            malformed(0, "header key is not valid utf-8"),
        );
        check(
            "header key beyond the record",
            raw_batch(
                1,
                0,
                &record(&[&[0], &ts5, &v(0), &v(-1), &v(-1), &v(1), &v(4), b"k"]),
            ),
            malformed(0, "header key goes beyond the record"),
        );
        check(
            "header value beyond the record",
            raw_batch(
                1,
                0,
                &record(&[&[0], &ts5, &v(0), &v(-1), &v(-1), &v(1), &v(1), b"k", &v(7)]),
            ),
            malformed(0, "header value goes beyond the record"),
        );
        check(
            "header value length below -1",
            raw_batch(
                1,
                0,
                &record(&[
                    &[0],
                    &ts5,
                    &v(0),
                    &v(-1),
                    &v(-1),
                    &v(1),
                    &v(1),
                    b"k",
                    &v(-9),
                ]),
            ),
            malformed(0, "header value length is below -1"),
        );
        check(
            "trailing bytes inside a record",
            raw_batch(
                1,
                0,
                &record(&[&[0], &ts5, &v(0), &v(-1), &v(-1), &v(0), b"zz"]),
            ),
            malformed(0, "bytes after the last field of the record"),
        );
        check(
            "fewer records than the record count",
            raw_batch(2, 0, &simple(0)),
            malformed(1, "batch ends before its record count is reached"),
        );
        check(
            "more records than the record count",
            raw_batch(1, 0, &two),
            malformed(1, "bytes after the last record of the batch"),
        );
        check(
            "no records at all",
            raw_batch(1, 0, &[]),
            malformed(0, "batch ends before its record count is reached"),
        );
    }

    #[test]
    fn decode_checks_the_crc() {
        let batch = raw_batch(1, 0, &simple(0));
        let mut corrupted = BytesMut::from(&batch[..]);
        let last = corrupted.len() - 1;
        corrupted[last] ^= 0x01;
        let corrupted = corrupted.freeze();
        let expected = Err(BatchError::CrcMismatch {
            stored: compute_crc(&batch),
            computed: compute_crc(&corrupted),
        });
        assert_eq!(
            decode_batch(&corrupted).map(|(_, records)| records),
            expected
        );
        assert_eq!(decode_batches(&corrupted), expected);
    }

    #[test]
    fn decode_batch_ignores_bytes_after_the_batch() {
        let batch = raw_batch(1, 0, &simple(0));
        let with_tail = Bytes::from([&batch[..], b"tail"].concat());
        let (header, records) = decode_batch(&with_tail).expect("first batch is valid");
        assert_eq!(header.size(), batch.len());
        assert_eq!(records, vec![plain(100, 1_005)]);
    }

    #[test]
    fn records_are_slices_of_the_batch() {
        let mut builder = BatchBuilder::new();
        builder.push(0, Some(b"key"), Some(b"value"), &[("h", Some(b"hv"))]);
        let batch = builder.finish().freeze();
        let (_, records) = decode_batch(&batch).expect("valid");
        let range = batch.as_ptr_range();
        let key = records[0].key.as_ref().expect("key");
        let value = records[0].value.as_ref().expect("value");
        let header_value = records[0].headers[0].value.as_ref().expect("header value");
        for field in [key, value, header_value] {
            assert!(range.contains(&field.as_ptr()), "{field:?} was copied");
        }
    }

    #[test]
    fn decode_batches_claiming_huge_record_counts_fail_without_reserving_for_them() {
        // Guards the bound on the capacity decode_batches reserves from the headers: a header
        // claiming i32::MAX records (consistent with its last offset delta, CRC not fixed) must
        // not make it reserve for them (about 2^31 records would abort the process).
        let mut builder = BatchBuilder::new();
        builder.push(7, None, Some(&b"v"[..]), &[]);
        let mut batch = builder.finish();
        let huge = i32::MAX;
        batch[crate::header::LAST_OFFSET_DELTA_POSITION..][..4]
            .copy_from_slice(&(huge - 1).to_be_bytes());
        batch[crate::header::RECORD_COUNT_POSITION..][..4].copy_from_slice(&huge.to_be_bytes());
        let buf = Bytes::from(batch.to_vec());
        assert_eq!(
            BatchHeader::parse(&buf).map(|h| h.record_count).ok(),
            Some(huge),
            "the header must pass the cheap parse for this test to mean anything"
        );
        assert!(decode_batches(&buf).is_err());
    }

    #[test]
    fn decode_batches_concatenated() {
        let mut builder = BatchBuilder::new();
        let mut buf = Vec::new();
        for (base_offset, values) in [(10, &["a", "b"][..]), (12, &["c"][..])] {
            for value in values {
                builder.push(7, None, Some(value.as_bytes()), &[]);
            }
            let mut batch = builder.finish();
            set_base_offset(&mut batch, base_offset);
            buf.extend_from_slice(&batch);
        }
        let buf = Bytes::from(buf);
        let records = decode_batches(&buf).expect("valid");
        let summary: Vec<(i64, Option<&[u8]>)> = records
            .iter()
            .map(|record| (record.offset, record.value.as_deref()))
            .collect();
        assert_eq!(
            summary,
            [
                (10, Some(&b"a"[..])),
                (11, Some(&b"b"[..])),
                (12, Some(&b"c"[..]))
            ]
        );
        assert_eq!(decode_batches(&Bytes::new()), Ok(Vec::new()));
        let cut = buf.slice(..buf.len() - 1);
        assert!(matches!(
            decode_batches(&cut),
            Err(BatchError::Truncated { .. })
        ));
    }

    #[test]
    fn validate_batch_accepts_built_batches_and_catches_lying_headers() {
        let mut builder = BatchBuilder::new();
        builder.push(1_000, Some(b"k"), Some(b"v"), &[("h", Some(b"x"))]);
        builder.push(900, None, None, &[]);
        let good = builder.finish().freeze();
        assert_eq!(validate_batch(&good).unwrap().record_count, 2);

        // A max_timestamp that is not the records' greatest, with a recomputed CRC.
        let mut lying = BytesMut::from(&good[..]);
        lying[35..43].copy_from_slice(&5_000i64.to_be_bytes());
        let crc = compute_crc(&lying);
        lying[CRC_POSITION..ATTRIBUTES_POSITION].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            validate_batch(&lying),
            Err(BatchError::RecordMalformed {
                reason: "max_timestamp does not match the records",
                ..
            })
        ));

        // A header claiming more records than the batch holds.
        let mut many = BytesMut::from(&good[..]);
        many[23..27].copy_from_slice(&99i32.to_be_bytes());
        many[57..61].copy_from_slice(&100i32.to_be_bytes());
        let crc = compute_crc(&many);
        many[CRC_POSITION..ATTRIBUTES_POSITION].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            validate_batch(&many),
            Err(BatchError::RecordMalformed { index: 2, .. })
        ));
    }
}
