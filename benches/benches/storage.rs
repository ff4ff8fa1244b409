//! Criterion micro-benchmarks of the storage engine (`octolog-storage`) and the batch codec
//! (`octolog-batch`), all reported as throughput in bytes.
//!
//! - `append/never/{16KiB,256KiB}`: `Log::append` of one batch of 1 KiB records per iteration,
//!   with `FlushPolicy::Never` (validation with CRC-32C, offset assignment, `pwrite` into the page
//!   cache, index upkeep, segment rolls every 1 GiB).
//! - `append/always/{16KiB,256KiB}`: the same with `FlushPolicy::Always`: every append also waits
//!   for an `fdatasync`.
//! - `read/sequential`: reads a prefilled ~1 GiB log from offset 0 to its end, 1 MiB at a time,
//!   and verifies every batch's CRC-32C as a consumer would.
//! - `read/sequential-nocheck`: the same walk, parsing only the batch headers (needed to find the
//!   next offset): the cost of the zero-copy read path itself.
//! - `codec/encode`, `codec/decode`, `codec/verify`: `BatchBuilder` (16 records of 1 KiB),
//!   `decode_batches` of that batch, `BatchHeader::parse_verified` of a 256 KiB batch.
//!
//! "16 KiB" and "256 KiB" batches hold as many 1 KiB records as fit in that many bytes, so each
//! append is one write of at most that size (comparable with `disk-baseline.sh`'s `dd bs=`).
//!
//! Logs live in a temporary folder under `$OCTOLOG_BENCH_DIR` (default `/tmp`), so they can be
//! put on the disk being measured. An append log is deleted and opened afresh, outside the timed
//! region, once it would pass `NEVER_LOG_BYTES_MAX` (`never`) or `ALWAYS_LOG_BYTES_MAX`
//! (`always`). The `never` bound keeps the dirty data below the kernel's background write-back
//! threshold (10% of memory by default), so `append/never` measures the append path into the
//! page cache and not the disk's write-back (which `octolog-bench`'s sustained runs measure).
//! Deleting the log drops its dirty pages unwritten. Fixtures are built the first time their
//! benchmark runs, so a filter (`-- codec`) skips their cost.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use octolog_batch::{BatchBuilder, BatchHeader, Offset};
use octolog_storage::{FlushPolicy, Log, LogConfig};
use tempfile::TempDir;

/// Bytes of each record's value; records have no key and no headers.
const RECORD_VALUE_BYTES: usize = 1024;
/// Nominal size of the small batches: a producer with a short linger.
const SMALL_BATCH_BYTES: usize = 16 << 10;
/// Nominal size of the large batches: a producer with a full 256 KiB batch.
const LARGE_BATCH_BYTES: usize = 256 << 10;
/// Segment size of every benchmark log (Kafka's default).
const SEGMENT_BYTES: u32 = 1 << 30;
/// An `append/never` log is replaced by an empty one before it would grow past this: one
/// segment of dirty page cache at most.
const NEVER_LOG_BYTES_MAX: u64 = 1 << 30;
/// An `append/always` log is replaced by an empty one before it would grow past this (nothing
/// stays dirty; the bound only keeps the disk from filling up).
const ALWAYS_LOG_BYTES_MAX: u64 = 4 << 30;
/// Batches of `LARGE_BATCH_BYTES` written before the read benchmarks: just under 1 GiB, so one
/// segment.
const READ_PREFILL_BATCH_COUNT: usize = 4096;
/// `bytes_max` of each read, as a consumer's fetch size.
const READ_BYTES_MAX: usize = 1 << 20;
/// Records in the `codec/encode` and `codec/decode` batch.
const CODEC_RECORD_COUNT: usize = 16;
/// Timestamp of the first record of every batch; records follow 1 ms apart.
const TIMESTAMP_MS: i64 = 1_700_000_000_000;
/// Folder holding the benchmark logs when `OCTOLOG_BENCH_DIR` is not set.
const BENCH_DIR_DEFAULT: &str = "/tmp";

const _: () = assert!(RECORD_VALUE_BYTES <= SMALL_BATCH_BYTES);
const _: () = assert!(SMALL_BATCH_BYTES < LARGE_BATCH_BYTES);
const _: () = assert!(LARGE_BATCH_BYTES <= READ_BYTES_MAX);
const _: () =
    assert!((LARGE_BATCH_BYTES * READ_PREFILL_BATCH_COUNT) as u64 <= SEGMENT_BYTES as u64);
const _: () = assert!((SEGMENT_BYTES as u64) <= NEVER_LOG_BYTES_MAX);
const _: () = assert!(NEVER_LOG_BYTES_MAX <= ALWAYS_LOG_BYTES_MAX);

/// Deterministic, incompressible filler for record values (xorshift64), so that a compressing
/// or deduplicating file system cannot flatter the numbers.
fn filler(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// One uncompressed batch of `record_count` records of `RECORD_VALUE_BYTES` each, with distinct
/// values.
fn batch_of(record_count: usize) -> Vec<u8> {
    assert!(record_count > 0);
    let values = filler(RECORD_VALUE_BYTES + record_count);
    let mut builder = BatchBuilder::new();
    for i in 0..record_count {
        let value = &values[i..i + RECORD_VALUE_BYTES];
        builder.push(TIMESTAMP_MS + i as i64, None, Some(value), &[]);
    }
    builder.finish().to_vec()
}

/// The batch with the most 1 KiB records that still fits in `batch_bytes_max`.
fn batch_within(batch_bytes_max: usize) -> Vec<u8> {
    let mut record_count = batch_bytes_max / RECORD_VALUE_BYTES;
    loop {
        let batch = batch_of(record_count);
        if batch.len() <= batch_bytes_max {
            return batch;
        }
        record_count -= 1;
    }
}

/// The folder under which benchmark logs are created: `$OCTOLOG_BENCH_DIR`, or `/tmp`.
fn bench_dir() -> PathBuf {
    std::env::var_os("OCTOLOG_BENCH_DIR")
        .map_or_else(|| PathBuf::from(BENCH_DIR_DEFAULT), PathBuf::from)
}

fn log_config(flush: FlushPolicy) -> LogConfig {
    LogConfig {
        segment_bytes: SEGMENT_BYTES,
        flush,
        ..LogConfig::default()
    }
}

/// A log that benchmarks append to, replaced by an empty one when it grows too large.
struct AppendLog {
    /// The open log; `None` only while it is being replaced. Declared before `dir` so that it is
    /// dropped before its folder is removed.
    log: Option<Log>,
    /// Settings every replacement log is opened with.
    config: LogConfig,
    /// Bytes appended to the current log, to know when to replace it.
    log_bytes: u64,
    /// The log is replaced before it would grow past this.
    log_bytes_max: u64,
    /// The temporary folder holding the log; removed on drop.
    dir: TempDir,
}

impl AppendLog {
    fn new(flush: FlushPolicy, log_bytes_max: u64) -> AppendLog {
        let base = bench_dir();
        let dir = tempfile::Builder::new()
            .prefix("octolog-bench-append-")
            .tempdir_in(&base)
            .unwrap_or_else(|e| panic!("cannot create a temp folder in {}: {e}", base.display()));
        let config = log_config(flush);
        let log = Log::open(dir.path().join("log"), config.clone()).expect("open the append log");
        AppendLog {
            log: Some(log),
            config,
            log_bytes: 0,
            log_bytes_max,
            dir,
        }
    }

    /// Deletes the log and opens an empty one in its place, then waits for the file system to
    /// commit the deletion, so that its cost stays outside the timed region: on ext4 the
    /// deletion is committed by the next journal commit, which an `fdatasync` of the next
    /// append would otherwise pay for, with the online discard of the freed blocks on a
    /// `discard` mount (this machine's): `append/always/256KiB` had samples at twice the rest
    /// after each replacement.
    fn replace(&mut self) {
        let log = self.log.take().expect("the log is open");
        log.delete().expect("delete the full append log");
        let folder = std::fs::File::open(self.dir.path()).expect("open the bench folder");
        // SAFETY: a system call on a descriptor we own; no memory is passed.
        let synced = unsafe { libc::syncfs(std::os::unix::io::AsRawFd::as_raw_fd(&folder)) };
        assert_eq!(synced, 0, "syncfs: {}", std::io::Error::last_os_error());
        let log = Log::open(self.dir.path().join("log"), self.config.clone())
            .expect("reopen the append log");
        self.log = Some(log);
        self.log_bytes = 0;
    }

    /// Appends `batch` `iters` times and returns the time spent in `Log::append`, excluding the
    /// time spent replacing a full log.
    fn append_timed(&mut self, batch: &[u8], iters: u64) -> Duration {
        let batch_bytes = batch.len() as u64;
        let mut elapsed = Duration::ZERO;
        let mut start = Instant::now();
        for _ in 0..iters {
            if self.log_bytes + batch_bytes > self.log_bytes_max {
                elapsed += start.elapsed();
                self.replace();
                start = Instant::now();
            }
            // Re-appending the same buffer is valid: the log stores it with a base offset of
            // its own (outside the CRC) and leaves the buffer as it is.
            let log = self.log.as_ref().expect("the log is open");
            let info = log.append(batch).expect("append to the benchmark log");
            black_box(info);
            self.log_bytes += batch_bytes;
        }
        elapsed + start.elapsed()
    }
}

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("append");
    let cases = [
        (
            "never",
            FlushPolicy::Never,
            NEVER_LOG_BYTES_MAX,
            20,
            Duration::from_secs(2),
            Duration::from_secs(5),
        ),
        (
            "always",
            FlushPolicy::Always,
            ALWAYS_LOG_BYTES_MAX,
            10,
            Duration::from_secs(2),
            Duration::from_secs(10),
        ),
    ];
    for (policy_name, flush, log_bytes_max, sample_size, warm_up_time, measurement_time) in cases {
        for (size_name, batch_bytes_max) in
            [("16KiB", SMALL_BATCH_BYTES), ("256KiB", LARGE_BATCH_BYTES)]
        {
            let batch = batch_within(batch_bytes_max);
            // The exact write size, for the disk baseline (`disk-baseline.sh` uses the same).
            let records = BatchHeader::parse(&batch)
                .expect("a valid batch")
                .record_count;
            eprintln!(
                "append/{policy_name}/{size_name}: batches of {records} records, {} bytes",
                batch.len()
            );
            let mut fixture: Option<AppendLog> = None;
            group
                .sample_size(sample_size)
                .warm_up_time(warm_up_time)
                .measurement_time(measurement_time)
                .throughput(Throughput::Bytes(batch.len() as u64));
            group.bench_function(format!("{policy_name}/{size_name}"), |b| {
                let log = fixture.get_or_insert_with(|| AppendLog::new(flush, log_bytes_max));
                b.iter_custom(|iters| log.append_timed(&batch, iters));
            });
        }
    }
    group.finish();
}

/// A log prefilled with `READ_PREFILL_BATCH_COUNT` large batches, flushed.
struct ReadLog {
    /// The log; declared before `dir` so that it is dropped before its folder is removed.
    log: Log,
    /// Bytes of batches in the log: what one full read returns.
    log_bytes: u64,
    /// The temporary folder holding the log; removed on drop.
    _dir: TempDir,
}

impl ReadLog {
    fn new() -> ReadLog {
        let base = bench_dir();
        let dir = tempfile::Builder::new()
            .prefix("octolog-bench-read-")
            .tempdir_in(&base)
            .unwrap_or_else(|e| panic!("cannot create a temp folder in {}: {e}", base.display()));
        let log = Log::open(dir.path().join("log"), log_config(FlushPolicy::Never))
            .expect("open the read log");
        let batch = batch_within(LARGE_BATCH_BYTES);
        for _ in 0..READ_PREFILL_BATCH_COUNT {
            log.append(&batch).expect("prefill the read log");
        }
        // Flushed now so that write-back does not compete with the measurement.
        log.flush().expect("flush the read log");
        let log_bytes = log.size_bytes();
        assert_eq!(log_bytes, (batch.len() * READ_PREFILL_BATCH_COUNT) as u64);
        assert_eq!(log.segment_count(), 1);
        ReadLog {
            log,
            log_bytes,
            _dir: dir,
        }
    }

    /// Reads the whole log, `READ_BYTES_MAX` at a time, and returns the bytes read. Every batch
    /// header is parsed to find the next offset; with `verify`, its CRC-32C is checked too.
    fn read_all(&self, verify: bool) -> u64 {
        let end = self.log.high_watermark();
        let mut offset = Offset(0);
        let mut bytes = 0u64;
        while offset < end {
            let read = self.log.read(offset, READ_BYTES_MAX).expect("read the log");
            let batches: &Bytes = &read.batches;
            assert!(!batches.is_empty());
            let mut position = 0;
            let mut last_offset = offset.0;
            while position < batches.len() {
                let parsed = if verify {
                    BatchHeader::parse_verified(&batches[position..])
                } else {
                    BatchHeader::parse(&batches[position..])
                };
                let header = parsed.expect("the log returns valid batches");
                position += header.size();
                last_offset = header.last_offset() as u64;
            }
            bytes += batches.len() as u64;
            offset = Offset(last_offset + 1);
        }
        assert_eq!(bytes, self.log_bytes);
        bytes
    }
}

fn read(c: &mut Criterion) {
    let mut group = c.benchmark_group("read");
    // One iteration reads ~1 GiB: few, equal iterations per sample.
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Bytes(
            (batch_within(LARGE_BATCH_BYTES).len() * READ_PREFILL_BATCH_COUNT) as u64,
        ));
    let mut fixture: Option<ReadLog> = None;
    for (name, verify) in [("sequential", true), ("sequential-nocheck", false)] {
        group.bench_function(name, |b| {
            let log = fixture.get_or_insert_with(ReadLog::new);
            b.iter(|| log.read_all(verify));
        });
    }
    group.finish();
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    let values = filler(RECORD_VALUE_BYTES + CODEC_RECORD_COUNT);
    let small = Bytes::from(batch_of(CODEC_RECORD_COUNT));
    group.throughput(Throughput::Bytes(small.len() as u64));
    let mut builder = BatchBuilder::with_capacity(small.len());
    group.bench_function("encode", |b| {
        b.iter(|| {
            for i in 0..CODEC_RECORD_COUNT {
                let value = &values[i..i + RECORD_VALUE_BYTES];
                builder.push(TIMESTAMP_MS + i as i64, None, Some(black_box(value)), &[]);
            }
            builder.finish()
        });
    });
    group.bench_function("decode", |b| {
        b.iter(|| octolog_batch::decode_batches(black_box(&small)).expect("decode"));
    });

    let large = batch_within(LARGE_BATCH_BYTES);
    group.throughput(Throughput::Bytes(large.len() as u64));
    group.bench_function("verify", |b| {
        b.iter(|| BatchHeader::parse_verified(black_box(&large)).expect("verify"));
    });
    group.finish();
}

criterion_group!(benches, append, read, codec);
criterion_main!(benches);
