//! Property test: random appends, reads, rolls, retention, truncation and reopens (clean and
//! unclean) against a simple in-memory model of the log; every read is compared with the model.

mod common;

use bytes::Bytes;
use common::batch;
use octolog_batch::Offset;
use octolog_storage::{FlushPolicy, Log, LogConfig, StorageError};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Append batches, each a list of (value length, timestamp) records.
    Append(Vec<Vec<(usize, i64)>>),
    /// Read from a point in [log_start, log_end] chosen by the fraction, with this bytes_max.
    Read(u16, usize),
    Roll,
    Retention,
    /// Truncate at a point in [log_start, log_end + 2].
    Truncate(u16),
    OffsetForTimestamp(i64),
    ReopenClean,
    ReopenUnclean,
}

fn op() -> impl Strategy<Value = Op> {
    let record = (0usize..700, 0i64..1000);
    let batch = prop::collection::vec(record, 1..4);
    prop_oneof![
        6 => prop::collection::vec(batch, 1..4).prop_map(Op::Append),
        4 => (any::<u16>(), 1usize..6000).prop_map(|(f, b)| Op::Read(f, b)),
        1 => Just(Op::Roll),
        1 => Just(Op::Retention),
        1 => any::<u16>().prop_map(Op::Truncate),
        2 => (-10i64..1010).prop_map(Op::OffsetForTimestamp),
        1 => Just(Op::ReopenClean),
        1 => Just(Op::ReopenUnclean),
    ]
}

/// A record as the model keeps it.
#[derive(Debug, Clone)]
struct Record {
    value: Bytes,
    timestamp: i64,
}

/// The model: records by offset from `start`, and the batch boundaries (base offsets).
#[derive(Debug, Default)]
struct Model {
    start: u64,
    records: Vec<Record>,
    batch_bases: Vec<u64>,
}

impl Model {
    fn end(&self) -> u64 {
        self.start + self.records.len() as u64
    }
    fn pick(&self, fraction: u16, extra: u64) -> u64 {
        let span = self.end() - self.start + extra;
        self.start + (u64::from(fraction) * (span + 1)) / (u64::from(u16::MAX) + 1)
    }
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 300,
        index_bytes_max: 256,
        batch_bytes_max: 16 * 1024,
        retention_ms: None,
        retention_bytes: Some(12 * 1024),
        flush: FlushPolicy::Never,
        ..LogConfig::default()
    }
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), config()).unwrap();
    let mut model = Model::default();
    let mut counter = 0u64;
    for op in ops {
        match op {
            Op::Append(batches) => {
                let mut buf = Vec::new();
                let mut records = Vec::new();
                let mut bases = Vec::new();
                let mut next = model.end();
                for spec in batches {
                    let values: Vec<Vec<u8>> = spec
                        .iter()
                        .map(|&(len, _)| {
                            counter += 1;
                            let mut v = counter.to_string().into_bytes();
                            v.resize(len.max(v.len()), b'x');
                            v
                        })
                        .collect();
                    // `batch` gives consecutive timestamps from the first; use per-record ones.
                    let mut builder = octolog_batch::BatchBuilder::new();
                    for (value, &(_, ts)) in values.iter().zip(&spec) {
                        builder.push(ts, None, Some(value), &[]);
                        records.push(Record {
                            value: Bytes::from(value.clone()),
                            timestamp: ts,
                        });
                    }
                    bases.push(next);
                    next += spec.len() as u64;
                    buf.extend_from_slice(&builder.finish());
                }
                let info = log.append(&buf).unwrap();
                assert_eq!(info.first_offset, Offset(model.end()));
                model.records.extend(records);
                model.batch_bases.extend(bases);
                assert_eq!(info.log_end_offset, Offset(model.end()));
            }
            Op::Read(fraction, bytes_max) => {
                let from = model.pick(fraction, 0);
                let read = log.read(Offset(from), bytes_max).unwrap();
                if from == model.end() {
                    assert!(read.batches.is_empty());
                    continue;
                }
                let batches: Vec<_> = octolog_batch::batches_verified(&read.batches)
                    .collect::<Result<_, _>>()
                    .unwrap();
                assert!(!batches.is_empty());
                assert!(batches.len() == 1 || read.batches.len() <= bytes_max);
                let records = octolog_batch::decode_batches(&read.batches).unwrap();
                assert!(records[0].offset as u64 <= from);
                assert!(from <= records.last().unwrap().offset as u64);
                for (i, record) in records.iter().enumerate() {
                    let offset = record.offset as u64;
                    assert_eq!(offset, records[0].offset as u64 + i as u64);
                    let want = &model.records[(offset - model.start) as usize];
                    assert_eq!(record.value.as_ref(), Some(&want.value));
                    assert_eq!(record.timestamp_ms, want.timestamp);
                }
            }
            Op::Roll => log.roll().unwrap(),
            Op::Retention => {
                let before = log.log_start_offset().0;
                let outcome = log.apply_retention(0).unwrap();
                let start = outcome.log_start_offset.0;
                assert!(before <= start);
                assert!(start <= model.end());
                assert!(model.batch_bases.contains(&start) || start == model.end());
                if outcome.segments_deleted > 0 {
                    assert!(log.size_bytes() >= 12 * 1024);
                }
                model.records.drain(..(start - model.start) as usize);
                model.batch_bases.retain(|&b| b >= start);
                model.start = start;
            }
            Op::Truncate(fraction) => {
                let target = model.pick(fraction, 2);
                let end = log.truncate_to(Offset(target)).unwrap().0;
                if target < model.end() {
                    // The cut falls at the start of the batch holding `target`.
                    let base = *model
                        .batch_bases
                        .iter()
                        .filter(|&&b| b <= target)
                        .next_back()
                        .unwrap();
                    assert_eq!(end, base);
                    model.records.truncate((base - model.start) as usize);
                    model.batch_bases.retain(|&b| b < base);
                } else {
                    assert_eq!(end, model.end());
                }
            }
            Op::OffsetForTimestamp(ts) => {
                let want = model
                    .records
                    .iter()
                    .position(|r| r.timestamp >= ts)
                    .map(|i| Offset(model.start + i as u64));
                assert_eq!(log.offset_for_timestamp(ts).unwrap(), want);
            }
            Op::ReopenClean => {
                log.close().unwrap();
                drop(log);
                log = Log::open(dir.path(), config()).unwrap();
                assert!(log.open_report().clean_shutdown);
            }
            Op::ReopenUnclean => {
                drop(log);
                log = Log::open(dir.path(), config()).unwrap();
                assert!(!log.open_report().clean_shutdown);
                assert_eq!(log.open_report().bytes_cut, 0);
            }
        }
        assert_eq!(log.log_start_offset(), Offset(model.start));
        assert_eq!(log.log_end_offset(), Offset(model.end()));
        assert_eq!(log.high_watermark(), Offset(model.end()));
        if model.start > 0 {
            assert!(matches!(
                log.read(Offset(model.start - 1), 1),
                Err(StorageError::OffsetOutOfRange { .. })
            ));
        }
        assert!(matches!(
            log.read(Offset(model.end() + 1), 1),
            Err(StorageError::OffsetOutOfRange { .. })
        ));
    }
    // Finally every record, read sequentially.
    let mut next = model.start;
    for _ in 0..=model.records.len() {
        if next == model.end() {
            break;
        }
        let read = log.read(Offset(next), 2000).unwrap();
        for record in octolog_batch::decode_batches(&read.batches).unwrap() {
            if record.offset as u64 >= next {
                assert_eq!(
                    record.value.as_ref(),
                    Some(&model.records[(next - model.start) as usize].value)
                );
                next += 1;
            }
        }
    }
    assert_eq!(next, model.end());
    let _ = batch; // shared helper, unused here
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
