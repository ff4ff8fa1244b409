//! Helpers shared by the storage integration tests.
#![allow(dead_code)]

use bytes::{Bytes, BytesMut};
use octolog_batch::{BatchBuilder, Offset};
use octolog_storage::{Log, LogConfig};

/// A batch whose records carry `values`, with timestamps `timestamp_ms`, `timestamp_ms + 1`, ...
pub fn batch(values: &[Vec<u8>], timestamp_ms: i64) -> BytesMut {
    let mut builder = BatchBuilder::new();
    for (i, value) in values.iter().enumerate() {
        let key = format!("k{}", i % 3);
        builder.push(
            timestamp_ms + i as i64,
            Some(key.as_bytes()),
            Some(value),
            &[("h", Some(b"v"))],
        );
    }
    builder.finish()
}

/// The value of record `offset` in tests that use `value_for`.
pub fn value_for(offset: u64, size: usize) -> Vec<u8> {
    let mut v = format!("record-{offset}-").into_bytes();
    v.resize(size.max(v.len()), b'a' + (offset % 26) as u8);
    v
}

/// Reads every record from `from` to the high watermark, as (offset, value).
pub fn read_all(log: &Log, from: u64) -> Vec<(u64, Bytes)> {
    let mut out = Vec::new();
    let mut next = from;
    let end = log.high_watermark().0;
    // Each read returns at least one batch, so this loop ends within `end - from` rounds.
    for _ in 0..=end.saturating_sub(from) {
        if next >= end {
            break;
        }
        let read = log.read(Offset(next), 64 * 1024).expect("read");
        assert!(!read.batches.is_empty(), "empty read at {next} below {end}");
        for record in octolog_batch::decode_batches(&read.batches).expect("decode") {
            let offset = record.offset as u64;
            if offset >= next {
                assert_eq!(offset, next, "offsets are dense");
                out.push((offset, record.value.expect("value")));
                next += 1;
            }
        }
    }
    assert_eq!(next, end.max(from));
    out
}

/// A small config so tests roll segments and fill indexes quickly.
pub fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes: 8 * 1024,
        index_interval_bytes: 512,
        index_bytes_max: 1024,
        batch_bytes_max: 64 * 1024,
        retention_ms: None,
        retention_bytes: None,
        flush: octolog_storage::FlushPolicy::Never,
        ..LogConfig::default()
    }
}

/// Appends `count` single-record batches of `size`-byte values (`value_for`), returning the
/// offsets given.
pub fn append_records(log: &Log, count: u64, size: usize, timestamp_ms: i64) -> Vec<u64> {
    let mut offsets = Vec::new();
    for _ in 0..count {
        let offset = log.log_end_offset().0;
        let b = batch(&[value_for(offset, size)], timestamp_ms);
        let info = log.append(&b).expect("append");
        assert_eq!(info.first_offset.0, offset);
        offsets.push(offset);
    }
    offsets
}
