//! `BatchBuilder`: writes one uncompressed v2 batch in place into a reusable buffer.
//!
//! Records are encoded straight into a `BytesMut` after a 61-byte placeholder header; `finish`
//! fills in the header and the CRC and hands the bytes out. Pushing a record computes its size
//! first, reserves once and writes in place, so it never allocates beyond the buffer's growth.
//! The layout is described in `header` and `record`. Not shared between threads (`&mut self`);
//! the builder is `Send`.

use bytes::{BufMut, BytesMut};

use crate::header::{
    BatchHeader, ATTRIBUTES_POSITION, BATCH_HEADER_BYTES, CRC_POSITION, LOG_OVERHEAD_BYTES,
    MAGIC_V2, NO_PARTITION_LEADER_EPOCH, NO_PRODUCER_EPOCH, NO_PRODUCER_ID, NO_SEQUENCE,
};
use crate::varint::{put_varint, put_varlong, varint_size, varlong_size};

/// Builds one uncompressed v2 batch. Writes into a reusable `BytesMut` with no per-record
/// allocation.
#[derive(Debug)]
pub struct BatchBuilder {
    /// The batch so far: the 61-byte placeholder header followed by the encoded records. Empty
    /// until the first `push`, so an idle builder holds no memory it did not ask for.
    buf: BytesMut,
    /// Bytes reserved when a new batch starts, so that typical batches never reallocate.
    capacity_bytes: usize,
    /// Records pushed so far; also the next record's offset delta.
    record_count: usize,
    /// First record's timestamp, the base of every timestamp delta.
    base_timestamp_ms: i64,
    /// Greatest timestamp pushed so far, for the header's `max_timestamp`.
    max_timestamp_ms: i64,
    /// Idempotent producer's id, or `NO_PRODUCER_ID`.
    producer_id: i64,
    /// Idempotent producer's epoch, or `NO_PRODUCER_EPOCH`.
    producer_epoch: i16,
    /// Sequence number of the first record, or `NO_SEQUENCE`.
    base_sequence: i32,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// Encoded size of a length-prefixed field where `None` is written as length -1.
fn nullable_size(field: Option<&[u8]>) -> usize {
    match field {
        None => varint_size(-1),
        Some(bytes) => varint_size(length_i32(bytes.len())) + bytes.len(),
    }
}

fn put_nullable(buf: &mut BytesMut, field: Option<&[u8]>) {
    match field {
        None => put_varint(buf, -1),
        Some(bytes) => {
            put_varint(buf, length_i32(bytes.len()));
            buf.put_slice(bytes);
        }
    }
}

/// Converts a length to the format's `i32`.
///
/// # Panics
///
/// If `length` exceeds `i32::MAX`; no batch can hold such a field, so this is a caller bug.
fn length_i32(length: usize) -> i32 {
    i32::try_from(length).expect("a record field exceeds i32::MAX bytes")
}

impl BatchBuilder {
    /// An empty builder with no reserved memory. Producer id, epoch and base sequence default to
    /// -1 (no idempotence); the finished batch's `base_offset` is 0 for the leader to assign.
    pub fn new() -> Self {
        Self::with_capacity(0)
    }

    /// An empty builder that reserves `bytes` (at least the 61-byte header) whenever it starts a
    /// batch. Defaults as in `new`.
    pub fn with_capacity(bytes: usize) -> Self {
        BatchBuilder {
            buf: BytesMut::new(),
            capacity_bytes: bytes,
            record_count: 0,
            base_timestamp_ms: 0,
            max_timestamp_ms: 0,
            producer_id: NO_PRODUCER_ID,
            producer_epoch: NO_PRODUCER_EPOCH,
            base_sequence: NO_SEQUENCE,
        }
    }

    /// Sets the idempotent producer's state for the current batch. Defaults: `NO_PRODUCER_ID`,
    /// `NO_PRODUCER_EPOCH`, `NO_SEQUENCE`; `finish` resets them, since each batch has its own
    /// `base_sequence`.
    pub fn producer(
        &mut self,
        producer_id: i64,
        producer_epoch: i16,
        base_sequence: i32,
    ) -> &mut Self {
        self.producer_id = producer_id;
        self.producer_epoch = producer_epoch;
        self.base_sequence = base_sequence;
        self
    }

    /// Appends one record. Its offset delta is the number of records pushed before it; its
    /// timestamp delta is relative to the first record's timestamp and may be negative.
    ///
    /// # Panics
    ///
    /// If a field exceeds `i32::MAX` bytes, the batch would exceed `i32::MAX` bytes or records:
    /// limits the caller enforces long before (see `BatchError::TooLarge`).
    pub fn push(
        &mut self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
    ) {
        if self.record_count == 0 {
            self.base_timestamp_ms = timestamp_ms;
            self.max_timestamp_ms = timestamp_ms;
            self.buf.clear();
            self.buf
                .reserve(self.capacity_bytes.max(BATCH_HEADER_BYTES));
            self.buf.put_bytes(0, BATCH_HEADER_BYTES);
        }
        assert!(BATCH_HEADER_BYTES <= self.buf.len());
        self.max_timestamp_ms = self.max_timestamp_ms.max(timestamp_ms);
        // Wrapping, as Java's long arithmetic does: the decoder's wrapping addition restores
        // the timestamp exactly.
        let timestamp_delta = timestamp_ms.wrapping_sub(self.base_timestamp_ms);
        let offset_delta =
            i32::try_from(self.record_count).expect("a batch holds at most i32::MAX records");

        let mut body_size = 1 // attributes
            + varlong_size(timestamp_delta)
            + varint_size(offset_delta)
            + nullable_size(key)
            + nullable_size(value)
            + varint_size(length_i32(headers.len()));
        for (header_key, header_value) in headers {
            body_size += nullable_size(Some(header_key.as_bytes())) + nullable_size(*header_value);
        }
        let body_length = length_i32(body_size);
        let record_size = varint_size(body_length) + body_size;
        assert!(
            self.buf.len() - LOG_OVERHEAD_BYTES + record_size <= i32::MAX as usize,
            "a batch holds at most i32::MAX bytes"
        );

        self.buf.reserve(record_size);
        let start = self.buf.len();
        put_varint(&mut self.buf, body_length);
        self.buf.put_i8(0); // attributes
        put_varlong(&mut self.buf, timestamp_delta);
        put_varint(&mut self.buf, offset_delta);
        put_nullable(&mut self.buf, key);
        put_nullable(&mut self.buf, value);
        put_varint(&mut self.buf, length_i32(headers.len()));
        for (header_key, header_value) in headers {
            put_nullable(&mut self.buf, Some(header_key.as_bytes()));
            put_nullable(&mut self.buf, *header_value);
        }
        assert_eq!(self.buf.len() - start, record_size);
        self.record_count += 1;
    }

    /// Records pushed since the builder was created or last finished.
    pub fn record_count(&self) -> usize {
        self.record_count
    }

    /// Current encoded size of the batch, including the 61-byte header (so 61 when empty).
    pub fn size_bytes(&self) -> usize {
        if self.record_count == 0 {
            BATCH_HEADER_BYTES
        } else {
            self.buf.len()
        }
    }

    /// Whether no record was pushed since the builder was created or last finished.
    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    /// Returns the finished batch (`base_offset` 0, `partition_leader_epoch` -1 as Kafka's
    /// producers send it, CRC set) and resets the builder for reuse, keeping its allocation
    /// when the returned batch has been dropped by the next `push`.
    ///
    /// # Panics
    ///
    /// If no record was pushed: an empty batch is invalid, so this is a caller bug.
    #[must_use = "the finished batch is the builder's only output"]
    pub fn finish(&mut self) -> BytesMut {
        assert!(!self.is_empty(), "finish called on an empty BatchBuilder");
        let record_count = i32::try_from(self.record_count).expect("push bounds record_count");
        let batch_length =
            i32::try_from(self.buf.len() - LOG_OVERHEAD_BYTES).expect("push bounds the size");

        let mut header = &mut self.buf[..BATCH_HEADER_BYTES];
        header.put_i64(0); // base_offset, assigned by the leader
        header.put_i32(batch_length);
        header.put_i32(NO_PARTITION_LEADER_EPOCH);
        header.put_u8(MAGIC_V2);
        header.put_u32(0); // crc, computed below over the finished bytes
        header.put_i16(0); // attributes: no compression, create time, no flags
        header.put_i32(record_count - 1);
        header.put_i64(self.base_timestamp_ms);
        header.put_i64(self.max_timestamp_ms);
        header.put_i64(self.producer_id);
        header.put_i16(self.producer_epoch);
        header.put_i32(self.base_sequence);
        header.put_i32(record_count);
        assert!(header.is_empty());

        let crc = crate::header::crc32c(&self.buf[ATTRIBUTES_POSITION..]);
        self.buf[CRC_POSITION..ATTRIBUTES_POSITION].copy_from_slice(&crc.to_be_bytes());
        debug_assert_eq!(
            BatchHeader::parse_verified(&self.buf).map(|header| header.record_count),
            Ok(record_count)
        );

        let batch = self.buf.split();
        self.record_count = 0;
        self.base_timestamp_ms = 0;
        self.max_timestamp_ms = 0;
        self.producer_id = NO_PRODUCER_ID;
        self.producer_epoch = NO_PRODUCER_EPOCH;
        self.base_sequence = NO_SEQUENCE;
        batch
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::error::BatchError;
    use crate::header::{batches, set_base_offset, set_partition_leader_epoch};
    use crate::record::{decode_batch, Header, Record};

    fn decode_hex(hex: &str) -> Vec<u8> {
        assert!(hex.len().is_multiple_of(2));
        (0..hex.len())
            .step_by(2)
            .map(|index| u8::from_str_radix(&hex[index..index + 2], 16).expect("valid hex"))
            .collect()
    }

    /// Built by kafka-python 3.0.12's `DefaultRecordBatchBuilder(magic=2, compression_type=0,
    /// is_transactional=0, producer_id=-1, producer_epoch=-1, base_sequence=-1,
    /// batch_size=1<<20)` with
    /// `append(0, 1700000000000, b"k1", b"hello", [("trace", b"abc")])`,
    /// `append(1, 1699999999000, None, b"world", [("h1", None), ("h2", b"")])`,
    /// `append(2, 1700000005000, b"", None, [])`, then `build()`.
    const KAFKA_PYTHON_BATCH: &str = "\
        000000000000000000000066000000000243ff197d0000000000020000018bcfe568000000018bcfe57b88\
        ffffffffffffffffffffffffffff000000032e000000046b310a68656c6c6f020a7472616365066162632800\
        cf0f02010a776f726c640404683101046832000e00904e04000100";

    /// As `KAFKA_PYTHON_BATCH`, with `producer_id=1000, producer_epoch=3, base_sequence=17` and
    /// `append(0, 5, b"key", b"\x00\xff", [("été", b"v")])`.
    const KAFKA_PYTHON_IDEMPOTENT_BATCH: &str = "\
        0000000000000000000000450000000002a36185dd00000000000000000000000000050000000000000005\
        00000000000003e80003000000110000000126000000066b65790400ff020ac3a974c3a90276";

    fn header(key: &str, value: Option<&'static [u8]>) -> Header {
        Header {
            key: key.to_owned(),
            value: value.map(Bytes::from_static),
        }
    }

    /// Guards interoperability: Kafka clients' batches decode, and ours are byte-identical.
    #[test]
    fn golden_kafka_python_batch() {
        let golden = Bytes::from(decode_hex(KAFKA_PYTHON_BATCH));
        let (batch_header, records) = decode_batch(&golden).expect("kafka-python batch is valid");
        assert_eq!(batch_header.record_count, 3);
        assert_eq!(batch_header.base_timestamp, 1_700_000_000_000);
        assert_eq!(batch_header.max_timestamp, 1_700_000_005_000);
        assert_eq!(batch_header.producer_id, NO_PRODUCER_ID);
        assert_eq!(
            records,
            vec![
                Record {
                    offset: 0,
                    timestamp_ms: 1_700_000_000_000,
                    key: Some(Bytes::from_static(b"k1")),
                    value: Some(Bytes::from_static(b"hello")),
                    headers: vec![header("trace", Some(b"abc"))],
                },
                Record {
                    offset: 1,
                    timestamp_ms: 1_699_999_999_000,
                    key: None,
                    value: Some(Bytes::from_static(b"world")),
                    headers: vec![header("h1", None), header("h2", Some(b""))],
                },
                Record {
                    offset: 2,
                    timestamp_ms: 1_700_000_005_000,
                    key: Some(Bytes::new()),
                    value: None,
                    headers: vec![],
                },
            ]
        );

        let mut builder = BatchBuilder::new();
        builder.push(
            1_700_000_000_000,
            Some(b"k1"),
            Some(b"hello"),
            &[("trace", Some(b"abc"))],
        );
        builder.push(
            1_699_999_999_000,
            None,
            Some(b"world"),
            &[("h1", None), ("h2", Some(b""))],
        );
        builder.push(1_700_000_005_000, Some(b""), None, &[]);
        let mut ours = builder.finish();
        // The only difference: kafka-python writes partition_leader_epoch 0 where Kafka's Java
        // producer (and we) write -1 (NO_PARTITION_LEADER_EPOCH). The CRC does not cover it.
        assert_eq!(
            BatchHeader::parse(&ours).map(|header| header.partition_leader_epoch),
            Ok(NO_PARTITION_LEADER_EPOCH)
        );
        set_partition_leader_epoch(&mut ours, 0);
        assert_eq!(&ours[..], &golden[..]);
    }

    #[test]
    fn golden_kafka_python_idempotent_batch() {
        let golden = Bytes::from(decode_hex(KAFKA_PYTHON_IDEMPOTENT_BATCH));
        let (batch_header, records) = decode_batch(&golden).expect("kafka-python batch is valid");
        assert_eq!(batch_header.producer_id, 1_000);
        assert_eq!(batch_header.producer_epoch, 3);
        assert_eq!(batch_header.base_sequence, 17);
        assert_eq!(
            records,
            vec![Record {
                offset: 0,
                timestamp_ms: 5,
                key: Some(Bytes::from_static(b"key")),
                value: Some(Bytes::from_static(b"\x00\xff")),
                headers: vec![header("été", Some(b"v"))],
            }]
        );

        let mut builder = BatchBuilder::new();
        builder.producer(1_000, 3, 17).push(
            5,
            Some(b"key"),
            Some(b"\x00\xff"),
            &[("été", Some(b"v"))],
        );
        let mut ours = builder.finish();
        set_partition_leader_epoch(&mut ours, 0);
        assert_eq!(&ours[..], &golden[..]);
    }

    #[test]
    fn sizes_counts_and_reset() {
        let mut builder = BatchBuilder::with_capacity(4096);
        assert!(builder.is_empty());
        assert_eq!(builder.record_count(), 0);
        assert_eq!(builder.size_bytes(), BATCH_HEADER_BYTES);

        builder.producer(9, 2, 40);
        builder.push(50, Some(b"k"), Some(b"v"), &[]);
        // length 1 + attributes 1 + ts 1 + offset 1 + key 2 + value 2 + header count 1
        assert_eq!(builder.size_bytes(), BATCH_HEADER_BYTES + 9);
        builder.push(-70, None, None, &[("h", None)]);
        assert!(!builder.is_empty());
        assert_eq!(builder.record_count(), 2);
        let size = builder.size_bytes();
        let first = builder.finish();
        assert_eq!(first.len(), size);
        let header = BatchHeader::parse_verified(&first).expect("valid");
        assert_eq!(header.base_offset, 0);
        assert_eq!(header.base_timestamp, 50);
        assert_eq!(header.max_timestamp, 50);
        assert_eq!(header.producer_id, 9);
        assert_eq!(header.producer_epoch, 2);
        assert_eq!(header.base_sequence, 40);
        assert_eq!(header.attributes, 0);

        assert!(builder.is_empty());
        assert_eq!(builder.size_bytes(), BATCH_HEADER_BYTES);
        builder.push(1, None, None, &[]);
        let second = BatchHeader::parse_verified(&builder.finish()).expect("valid");
        assert_eq!(second.record_count, 1);
        assert_eq!(second.base_timestamp, 1);
        assert_eq!(second.producer_id, NO_PRODUCER_ID);
        assert_eq!(second.producer_epoch, NO_PRODUCER_EPOCH);
        assert_eq!(second.base_sequence, NO_SEQUENCE);
    }

    #[test]
    fn finished_batch_is_reused_once_dropped() {
        let mut builder = BatchBuilder::with_capacity(1024);
        builder.push(0, None, Some(&[7; 100]), &[]);
        let first = builder.finish();
        let first_start = first.as_ptr();
        drop(first);
        builder.push(0, None, Some(&[8; 100]), &[]);
        let second = builder.finish();
        assert_eq!(second.as_ptr(), first_start);
    }

    #[test]
    #[should_panic(expected = "empty BatchBuilder")]
    fn finishing_an_empty_builder_is_a_bug() {
        let _ = BatchBuilder::new().finish();
    }

    /// One record as the proptests push it.
    #[derive(Debug, Clone)]
    struct Input {
        /// Any timestamp, so that deltas are negative and extreme too.
        timestamp_ms: i64,
        /// Null, empty or not.
        key: Option<Vec<u8>>,
        /// Null, empty or not.
        value: Option<Vec<u8>>,
        /// Zero to four headers with Unicode keys.
        headers: Vec<(String, Option<Vec<u8>>)>,
    }

    fn input() -> impl Strategy<Value = Input> {
        let bytes = |len| proptest::option::of(proptest::collection::vec(any::<u8>(), 0..len));
        (
            prop_oneof![
                4 => -2_000_000_000_000i64..2_000_000_000_000,
                1 => any::<i64>(),
            ],
            bytes(20),
            bytes(200),
            proptest::collection::vec(("\\PC{0,6}", bytes(10)), 0..5),
        )
            .prop_map(|(timestamp_ms, key, value, headers)| Input {
                timestamp_ms,
                key,
                value,
                headers,
            })
    }

    fn build(inputs: &[Input]) -> BytesMut {
        let mut builder = BatchBuilder::new();
        for input in inputs {
            let headers: Vec<(&str, Option<&[u8]>)> = input
                .headers
                .iter()
                .map(|(key, value)| (key.as_str(), value.as_deref()))
                .collect();
            builder.push(
                input.timestamp_ms,
                input.key.as_deref(),
                input.value.as_deref(),
                &headers,
            );
        }
        builder.finish()
    }

    proptest! {
        #[test]
        fn builder_round_trips(
            inputs in proptest::collection::vec(input(), 1..12),
            base_offset in 0i64..i64::MAX / 2,
        ) {
            let mut batch = build(&inputs);
            set_base_offset(&mut batch, base_offset);
            let batch = batch.freeze();
            let (header, records) = decode_batch(&batch).expect("built batch is valid");
            prop_assert_eq!(header.size(), batch.len());
            prop_assert_eq!(header.base_timestamp, inputs[0].timestamp_ms);
            let max_timestamp = inputs.iter().map(|input| input.timestamp_ms).max();
            prop_assert_eq!(Some(header.max_timestamp), max_timestamp);
            prop_assert_eq!(header.record_count as usize, inputs.len());
            prop_assert_eq!(records.len(), inputs.len());
            for ((index, input), record) in inputs.iter().enumerate().zip(&records) {
                prop_assert_eq!(record.offset, base_offset + index as i64);
                prop_assert_eq!(record.timestamp_ms, input.timestamp_ms);
                prop_assert_eq!(record.key.as_deref(), input.key.as_deref());
                prop_assert_eq!(record.value.as_deref(), input.value.as_deref());
                prop_assert_eq!(record.headers.len(), input.headers.len());
                for (decoded, (key, value)) in record.headers.iter().zip(&input.headers) {
                    prop_assert_eq!(&decoded.key, key);
                    prop_assert_eq!(decoded.value.as_deref(), value.as_deref());
                }
            }
        }

        #[test]
        fn any_flipped_byte_is_a_crc_mismatch(
            inputs in proptest::collection::vec(input(), 1..4),
            index in any::<prop::sample::Index>(),
            mask in 1u8..=255,
        ) {
            let mut batch = build(&inputs);
            let position = ATTRIBUTES_POSITION + index.index(batch.len() - ATTRIBUTES_POSITION);
            batch[position] ^= mask;
            let batch = batch.freeze();
            let verified = BatchHeader::parse_verified(&batch);
            prop_assert!(matches!(verified, Err(BatchError::CrcMismatch { .. })), "{:?}", verified);
            let decoded = decode_batch(&batch);
            prop_assert!(matches!(decoded, Err(BatchError::CrcMismatch { .. })), "{:?}", decoded);
        }

        #[test]
        fn any_truncation_fails_cleanly(inputs in proptest::collection::vec(input(), 1..4)) {
            let batch = build(&inputs).freeze();
            for len in 0..batch.len() {
                let cut = batch.slice(..len);
                let parsed = BatchHeader::parse(&cut);
                prop_assert!(matches!(parsed, Err(BatchError::Truncated { .. })), "{:?}", parsed);
                let verified = BatchHeader::parse_verified(&cut);
                prop_assert!(matches!(verified, Err(BatchError::Truncated { .. })), "{:?}", verified);
                prop_assert!(decode_batch(&cut).is_err());
                let results: Vec<_> = batches(&cut).collect();
                prop_assert_eq!(results.len(), usize::from(len > 0));
                prop_assert!(results.iter().all(Result::is_err));
            }
        }

        /// Arbitrary record bytes behind a valid header and CRC never make the decoder panic.
        #[test]
        fn arbitrary_records_never_panic(
            area in proptest::collection::vec(any::<u8>(), 0..64),
            record_count in 1i32..4,
        ) {
            let mut builder = BatchBuilder::new();
            for _ in 0..record_count {
                builder.push(0, None, None, &[]);
            }
            let mut batch = builder.finish();
            batch.truncate(BATCH_HEADER_BYTES);
            batch.extend_from_slice(&area);
            let batch_length = i32::try_from(batch.len() - LOG_OVERHEAD_BYTES).expect("small");
            batch[8..12].copy_from_slice(&batch_length.to_be_bytes());
            let crc = crate::header::crc32c(&batch[ATTRIBUTES_POSITION..]);
            batch[CRC_POSITION..ATTRIBUTES_POSITION].copy_from_slice(&crc.to_be_bytes());
            if let Ok((_, records)) = decode_batch(&batch.freeze()) {
                prop_assert_eq!(records.len(), record_count as usize);
            }
        }
    }
}
