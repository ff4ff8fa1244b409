//! Behaviour of `Log` through its public API on real files.

mod common;

use std::sync::Arc;

use common::*;
use octolog_batch::{BatchError, Offset};
use octolog_storage::{FlushPolicy, Log, LogConfig, StorageError};

#[test]
fn append_assigns_dense_offsets_and_read_returns_them() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    assert_eq!(log.log_end_offset(), Offset(0));
    let first = batch(&[b"a".to_vec(), b"b".to_vec(), b"c".to_vec()], 1000);
    let info = log.append(&first).unwrap();
    assert_eq!(
        (info.first_offset, info.last_offset, info.log_end_offset),
        (Offset(0), Offset(2), Offset(3))
    );
    let second = batch(&[b"d".to_vec()], 2000);
    let info = log.append(&second).unwrap();
    assert_eq!(
        (info.first_offset, info.last_offset, info.log_end_offset),
        (Offset(3), Offset(3), Offset(4))
    );
    let values: Vec<_> = read_all(&log, 0).into_iter().map(|(_, v)| v).collect();
    assert_eq!(values, [&b"a"[..], b"b", b"c", b"d"]);
    // A read from inside a batch returns the whole batch, starting before the offset asked for.
    let read = log.read(Offset(1), 1 << 20).unwrap();
    let records = octolog_batch::decode_batches(&read.batches).unwrap();
    assert_eq!(records[0].offset, 0);
    assert_eq!(records.len(), 4);
    // At the high watermark: empty, not an error.
    assert!(log.read(Offset(4), 1 << 20).unwrap().batches.is_empty());
}

#[test]
fn several_batches_in_one_append_get_consecutive_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    let mut buf = Vec::new();
    for i in 0..5u64 {
        buf.extend_from_slice(&batch(
            &[value_for(i * 2, 900), value_for(i * 2 + 1, 900)],
            0,
        ));
    }
    // 5 batches of ~1.9 KiB into 8 KiB segments: the append spans a roll.
    let info = log.append(&buf).unwrap();
    assert_eq!(
        (info.first_offset, info.log_end_offset),
        (Offset(0), Offset(10))
    );
    assert!(log.segment_count() >= 2);
    let all = read_all(&log, 0);
    for (offset, value) in all {
        assert_eq!(value, value_for(offset, 900));
    }
}

/// Guards the gathered write: batches are stored with their assigned base offsets while the
/// caller's bytes (a slice of a request, perhaps shared) stay as they were, also for more
/// batches than one `pwritev` takes (1024 buffers, two per batch).
#[test]
fn append_leaves_the_callers_bytes_unchanged_and_stores_the_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    log.append(&batch(&[value_for(0, 10)], 0)).unwrap();
    const BATCHES: u64 = 700;
    let mut buf = Vec::new();
    for i in 1..=BATCHES {
        buf.extend_from_slice(&batch(&[value_for(i, 10)], 0));
    }
    let request = bytes::Bytes::from(buf);
    let sent = request.clone();
    let info = log.append(&request).unwrap();
    assert_eq!(request, sent);
    assert_eq!(
        octolog_batch::batches(&request)
            .map(|b| b.unwrap().0.base_offset)
            .collect::<Vec<_>>(),
        vec![0; BATCHES as usize],
        "the caller's base offsets are untouched"
    );
    assert_eq!(
        (info.first_offset, info.log_end_offset),
        (Offset(1), Offset(BATCHES + 1))
    );
    let read = log.read(Offset(0), usize::MAX).unwrap();
    let stored: Vec<i64> = octolog_batch::batches_verified(&read.batches)
        .map(|b| b.unwrap().0.base_offset)
        .collect();
    assert_eq!(stored, (0..=BATCHES as i64).collect::<Vec<_>>());
    // Each stored batch is the sent one but for its base offset.
    let sent_batches = octolog_batch::batches(&request).map(|b| b.unwrap().1);
    let stored_batches = octolog_batch::batches(&read.batches)
        .map(|b| b.unwrap().1)
        .skip(1);
    let mut compared = 0;
    for (sent, stored) in sent_batches.zip(stored_batches) {
        assert!(
            sent[8..] == stored[8..],
            "batch {compared} differs past its base offset"
        );
        compared += 1;
    }
    assert_eq!(compared, BATCHES);
    for (offset, value) in read_all(&log, 0) {
        assert_eq!(value, value_for(offset, 10));
    }
}

/// How many of the pages of the file at `path` are in the page cache, and whether the file
/// system drops clean pages on `POSIX_FADV_DONTNEED` at all (a probe file beside it; tmpfs
/// keeps them).
fn resident_pages(path: &std::path::Path) -> (usize, bool) {
    use std::os::unix::io::AsRawFd;
    let count = |path: &std::path::Path| {
        let file = std::fs::File::open(path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        // SAFETY: a read-only map of a file nothing shortens while the test looks at it.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        let mut flags = vec![0u8; len.div_ceil(4096)];
        // SAFETY: `flags` has a byte per page (pages are at least 4 KiB) of the mapping.
        let done =
            unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, len, flags.as_mut_ptr()) };
        assert_eq!(done, 0);
        flags.iter().filter(|&&f| f & 1 == 1).count()
    };
    let probe = path.with_file_name("probe");
    std::fs::write(&probe, vec![7u8; 1 << 20]).unwrap();
    let file = std::fs::File::open(&probe).unwrap();
    file.sync_all().unwrap();
    // SAFETY: a system call on a descriptor we own; no memory is passed.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let honoured = count(&probe) == 0;
    std::fs::remove_file(&probe).unwrap();
    (count(path), honoured)
}

/// Guards the page cache window at the log's level: with a window of 0 every flush drops what
/// it made durable from the page cache, sealed segments included, and every record still reads
/// back (from the disk), across rolls and a reopen.
#[test]
fn a_page_cache_window_keeps_every_record_readable() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        page_cache_window_bytes: Some(0),
        flush: FlushPolicy::Never,
        ..small_config()
    };
    let log = Log::open(dir.path(), config.clone()).unwrap();
    for round in 0..4u64 {
        append_records(&log, 10, 900, 0);
        log.flush().unwrap();
        assert!(log.segment_count() >= 2);
        if round == 0 {
            // Before anything reads it back: the oldest segment, sealed, on disk and behind
            // the window, has no page left in the cache.
            let (resident, honoured) = resident_pages(&dir.path().join(format!("{:020}.log", 0)));
            if honoured {
                assert_eq!(resident, 0);
            } else {
                eprintln!("this file system keeps pages despite POSIX_FADV_DONTNEED: reads only");
            }
        }
        let all = read_all(&log, 0);
        assert_eq!(all.len() as u64, (round + 1) * 10);
        for (offset, value) in all {
            assert_eq!(value, value_for(offset, 900));
        }
    }
    log.close().unwrap();
    drop(log);
    let log = Log::open(dir.path(), config).unwrap();
    assert_eq!(read_all(&log, 0).len(), 40);
}

#[test]
fn read_honours_bytes_max_but_returns_at_least_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    append_records(&log, 10, 1000, 0);
    let one = log.read(Offset(0), 1).unwrap();
    assert_eq!(
        octolog_batch::decode_batches(&one.batches).unwrap().len(),
        1
    );
    let some = log.read(Offset(0), 3 * one.batches.len()).unwrap();
    assert_eq!(some.batches.len(), 3 * one.batches.len());
    let all = log.read(Offset(0), 1 << 20).unwrap();
    assert_eq!(all.batches.len(), 10 * one.batches.len());
}

#[test]
fn out_of_range_offsets_are_errors_with_the_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        retention_bytes: Some(1),
        ..small_config()
    };
    let log = Log::open(dir.path(), config).unwrap();
    append_records(&log, 40, 500, 0);
    log.apply_retention(0).unwrap();
    let start = log.log_start_offset();
    assert!(start.0 > 0);
    for offset in [0, start.0 - 1, 41, u64::MAX] {
        match log.read(Offset(offset), 100) {
            Err(StorageError::OffsetOutOfRange {
                offset: o,
                log_start_offset,
                log_end_offset,
            }) => {
                assert_eq!(
                    (o, log_start_offset, log_end_offset),
                    (Offset(offset), start, Offset(40))
                );
            }
            other => panic!("offset {offset}: {other:?}"),
        }
    }
    assert!(log.read(start, 100).is_ok());
    assert!(log.read(Offset(40), 100).unwrap().batches.is_empty());
}

#[test]
fn bad_batches_are_rejected_without_touching_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        batch_bytes_max: 4096,
        ..small_config()
    };
    let log = Log::open(dir.path(), config).unwrap();
    append_records(&log, 3, 10, 0);
    let good = batch(&[b"x".to_vec()], 0);
    let size_before = log.size_bytes();

    let check = |bytes: Vec<u8>, want: &dyn Fn(&StorageError) -> bool| {
        let err = log.append(&bytes).unwrap_err();
        assert!(want(&err), "unexpected error {err:?}");
        assert!(!err.to_string().is_empty());
        assert_eq!(log.log_end_offset(), Offset(3));
        assert_eq!(log.size_bytes(), size_before);
    };
    check(Vec::new(), &|e| matches!(e, StorageError::EmptyAppend));
    let mut flipped = good.to_vec();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    check(flipped, &|e| {
        matches!(
            e,
            StorageError::InvalidBatch {
                position: 0,
                source: BatchError::CrcMismatch { .. }
            }
        )
    });
    let mut magic = good.to_vec();
    magic[16] = 1;
    check(magic, &|e| {
        matches!(
            e,
            StorageError::InvalidBatch {
                source: BatchError::WrongMagic { .. },
                ..
            }
        )
    });
    check(good[..good.len() - 3].to_vec(), &|e| {
        matches!(
            e,
            StorageError::InvalidBatch {
                source: BatchError::Truncated { .. },
                ..
            }
        )
    });
    // A good batch followed by a bad one: nothing of either is written.
    let mut two = good.to_vec();
    two.extend_from_slice(&good[..20]);
    check(
        two,
        &|e| matches!(e, StorageError::InvalidBatch { position, .. } if *position == good.len()),
    );
    check(batch(&[vec![7u8; 5000]], 0).to_vec(), &|e| {
        matches!(e, StorageError::BatchTooLarge { max: 4096, .. })
    });
    check(vec![0u8; 100], &|e| {
        matches!(e, StorageError::InvalidBatch { .. })
    });
    // And the log still works.
    append_records(&log, 1, 10, 0);
    assert_eq!(read_all(&log, 0).len(), 4);
}

#[test]
fn rolls_segments_and_reads_across_them_through_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    append_records(&log, 300, 200, 0);
    assert!(log.segment_count() > 5, "{} segments", log.segment_count());
    // Every offset can be read on its own, from any segment.
    for offset in 0..300u64 {
        let read = log.read(Offset(offset), 1).unwrap();
        let records = octolog_batch::decode_batches(&read.batches).unwrap();
        assert_eq!(records[0].offset as u64, offset);
        assert_eq!(
            records[0].value.as_deref(),
            Some(&value_for(offset, 200)[..])
        );
    }
    // The files are named by base offset, 20 digits.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert!(names.contains(&"00000000000000000000.log".to_string()));
    assert!(names.contains(&"00000000000000000000.index".to_string()));
    assert!(names.contains(&"00000000000000000000.timeindex".to_string()));
}

#[test]
fn a_full_index_rolls_the_segment() {
    let dir = tempfile::tempdir().unwrap();
    // Index entry after every batch (interval 0), room for 8 offset entries (64 bytes).
    let config = LogConfig {
        segment_bytes: 1 << 20,
        index_interval_bytes: 0,
        index_bytes_max: 64,
        ..small_config()
    };
    let log = Log::open(dir.path(), config).unwrap();
    append_records(&log, 40, 10, 0);
    assert!(log.segment_count() >= 5, "{} segments", log.segment_count());
    assert_eq!(read_all(&log, 0).len(), 40);
}

#[test]
fn segment_ms_rolls_an_old_segment() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_ms: 1,
        ..small_config()
    };
    let log = Log::open(dir.path(), config).unwrap();
    append_records(&log, 1, 10, 0);
    // The passage of time is what is tested here, not a synchronisation.
    std::thread::sleep(std::time::Duration::from_millis(5));
    append_records(&log, 1, 10, 0);
    assert_eq!(log.segment_count(), 2);
}

#[test]
fn offset_for_timestamp_finds_the_first_record_at_or_after() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    // Timestamps rise by 10 per record except a late record (ts 5) at offset 50.
    for offset in 0..200u64 {
        let ts = if offset == 50 { 5 } else { offset as i64 * 10 };
        let b = batch(&[value_for(offset, 100)], ts);
        log.append(&b).unwrap();
    }
    let check = |ts: i64, want: Option<u64>| {
        assert_eq!(
            log.offset_for_timestamp(ts).unwrap(),
            want.map(Offset),
            "timestamp {ts}"
        );
    };
    check(i64::MIN, Some(0));
    check(0, Some(0));
    check(1, Some(1));
    check(10, Some(1));
    check(11, Some(2));
    check(495, Some(51));
    check(500, Some(51));
    check(1990, Some(199));
    check(1991, None);
    // A batch with several records: the first record inside it that qualifies.
    let b = batch(&[b"x".to_vec(), b"y".to_vec(), b"z".to_vec()], 5000);
    log.append(&b).unwrap();
    check(5001, Some(201));
}

#[test]
fn retention_deletes_old_sealed_segments_and_keeps_held_slices_readable() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        retention_ms: Some(1000),
        ..small_config()
    };
    let log = Log::open(dir.path(), config).unwrap();
    append_records(&log, 100, 200, 10_000); // old
    let first_old = log.read(Offset(0), 1 << 20).unwrap().batches;
    log.roll().unwrap();
    append_records(&log, 50, 200, 20_000); // new
    let segments_before = log.segment_count();
    let outcome = log.apply_retention(20_500).unwrap();
    assert!(outcome.segments_deleted > 0);
    assert_eq!(outcome.log_start_offset, Offset(100));
    assert_eq!(log.log_start_offset(), Offset(100));
    assert_eq!(
        log.segment_count(),
        segments_before - outcome.segments_deleted
    );
    assert!(!dir.path().join("00000000000000000000.log").exists());
    // The slice taken before deletion still decodes.
    let records = octolog_batch::decode_batches(&first_old).unwrap();
    assert_eq!(records[0].value.as_deref(), Some(&value_for(0, 200)[..]));
    assert!(matches!(
        log.read(Offset(99), 1),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    assert_eq!(read_all(&log, 100).len(), 50);
    // Nothing more is old enough; the active segment is never deleted.
    assert_eq!(log.apply_retention(20_500).unwrap().segments_deleted, 0);
    assert_eq!(
        log.apply_retention(i64::MAX).unwrap().log_start_offset,
        log.log_start_offset()
    );
    assert!(log.segment_count() >= 1);
}

#[test]
fn retention_by_bytes_keeps_the_log_under_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        retention_bytes: Some(20_000),
        ..small_config()
    };
    let log = Log::open(dir.path(), config).unwrap();
    append_records(&log, 400, 200, 0);
    let before = log.size_bytes();
    let outcome = log.apply_retention(0).unwrap();
    assert!(outcome.segments_deleted > 0);
    assert_eq!(log.size_bytes(), before - outcome.bytes_deleted);
    assert!(log.size_bytes() >= 20_000);
    assert!(log.size_bytes() < 20_000 + 8 * 1024);
    let start = log.log_start_offset().0;
    assert_eq!(read_all(&log, start).len() as u64, 400 - start);
}

#[test]
fn delete_segments_before_removes_only_whole_segments_below_the_offset() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    append_records(&log, 400, 200, 0);
    assert!(log.segment_count() > 3);
    // Nothing lies wholly below offset 0 or 1.
    assert_eq!(
        log.delete_segments_before(Offset(1))
            .unwrap()
            .segments_deleted,
        0
    );
    let target = Offset(250);
    let outcome = log.delete_segments_before(target).unwrap();
    assert!(outcome.segments_deleted > 0);
    let start = log.log_start_offset();
    assert_eq!(outcome.log_start_offset, start);
    assert!(start <= target);
    // Every record from the new start on is still there, in order.
    assert_eq!(read_all(&log, start.0).len() as u64, 400 - start.0);
    // The next segment reaches past the target, or the loop would have taken it too.
    assert!(log.delete_segments_before(target).unwrap().segments_deleted == 0);
    // Even past the log end offset the active segment stays, and appends continue.
    log.delete_segments_before(Offset(u64::MAX)).unwrap();
    assert!(log.segment_count() >= 1);
    let first = append_records(&log, 1, 200, 0)[0];
    assert_eq!(first, 400);
    drop(log);
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert_eq!(log.log_end_offset(), Offset(401));
    assert!(log.log_start_offset() >= start);
}

#[test]
fn truncate_to_cuts_at_a_batch_boundary_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    append_records(&log, 100, 200, 0);
    let held = log.read(Offset(90), 1 << 20).unwrap().batches;
    // Offset 93 is alone in its batch: the cut is exact.
    assert_eq!(log.truncate_to(Offset(93)).unwrap(), Offset(93));
    assert_eq!(log.log_end_offset(), Offset(93));
    // A three-record batch: truncating into its middle removes all of it.
    let b = batch(&[b"a".to_vec(), b"b".to_vec(), b"c".to_vec()], 0);
    log.append(&b).unwrap();
    assert_eq!(log.truncate_to(Offset(95)).unwrap(), Offset(93));
    append_records(&log, 5, 200, 0);
    let all = read_all(&log, 0);
    assert_eq!(all.len(), 98);
    for (offset, value) in &all {
        assert_eq!(value, &value_for(*offset, 200));
    }
    // The slice held across the truncation is intact.
    let records = octolog_batch::decode_batches(&held).unwrap();
    assert_eq!(records.last().unwrap().offset, 99);
    // Truncate into an earlier segment, then below the start.
    assert_eq!(log.truncate_to(Offset(10)).unwrap(), Offset(10));
    assert_eq!(read_all(&log, 0).len(), 10);
    assert_eq!(log.truncate_to(Offset(500)).unwrap(), Offset(10));
    log.close().unwrap();
    drop(log);
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert_eq!(log.log_end_offset(), Offset(10));
    assert_eq!(read_all(&log, 0).len(), 10);
}

#[test]
fn clean_close_and_reopen_keeps_everything_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    append_records(&log, 150, 300, 0);
    log.close().unwrap();
    assert!(matches!(
        log.append(&batch(&[b"x".to_vec()], 0)),
        Err(StorageError::Closed { .. })
    ));
    drop(log);
    assert!(dir.path().join("clean-shutdown").exists());
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert!(log.open_report().clean_shutdown);
    assert_eq!(log.open_report().segments_recovered, 0);
    assert!(!dir.path().join("clean-shutdown").exists());
    assert_eq!(log.log_end_offset(), Offset(150));
    append_records(&log, 10, 300, 0);
    let all = read_all(&log, 0);
    assert_eq!(all.len(), 160);
    for (offset, value) in all {
        assert_eq!(value, value_for(offset, 300));
    }
}

/// Lengths of the `.log` files in `dir`, in base-offset order.
fn log_file_lengths(dir: &std::path::Path) -> Vec<u64> {
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs.iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .collect()
}

/// Guards that the room the active segment reserves ahead of its data is cut off by a clean
/// close (so a clean open can trust file length == data), that sealed segments never keep it,
/// and that `size_bytes` never counts it.
#[test]
fn a_clean_close_leaves_each_log_file_exactly_as_long_as_its_data() {
    for flush in [FlushPolicy::Never, FlushPolicy::Always] {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            flush,
            ..small_config()
        };
        let log = Log::open(dir.path(), config.clone()).unwrap();
        append_records(&log, 150, 300, 0);
        assert!(log.segment_count() >= 3);
        let lengths = log_file_lengths(dir.path());
        // The active segment has room reserved past its data; sealed ones do not.
        assert!(log.size_bytes() < lengths.iter().sum::<u64>(), "{flush}");
        log.close().unwrap();
        drop(log);
        let lengths = log_file_lengths(dir.path());
        let log = Log::open(dir.path(), config).unwrap();
        assert!(log.open_report().clean_shutdown);
        assert_eq!(log.open_report().segments_recovered, 0);
        assert_eq!(log.size_bytes(), lengths.iter().sum::<u64>(), "{flush}");
        // Each file is whole batches and nothing else.
        for path in std::fs::read_dir(dir.path()).unwrap() {
            let path = path.unwrap().path();
            if path.extension().is_some_and(|e| e == "log") {
                let bytes = std::fs::read(&path).unwrap();
                let batches: usize = octolog_batch::batches_verified(&bytes)
                    .map(|item| item.unwrap().1.len())
                    .sum();
                assert_eq!(batches, bytes.len(), "{path:?}");
            }
        }
        assert_eq!(read_all(&log, 0).len(), 150);
    }
}

#[test]
fn flush_always_appends_from_threads_return_durable_and_dense() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        flush: FlushPolicy::Always,
        ..LogConfig::default()
    };
    let log = Arc::new(Log::open(dir.path(), config).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut offsets = Vec::new();
                for i in 0..25 {
                    let b = batch(&[format!("t{t}-{i}").into_bytes()], 0);
                    let info = log.append(&b).unwrap();
                    // Durable before append returns: the recovery point is past it.
                    assert!(info.log_end_offset <= log.recovery_point());
                    assert!(info.log_end_offset <= log.high_watermark());
                    offsets.push(info.first_offset.0);
                }
                offsets
            })
        })
        .collect();
    let mut offsets: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (0..100).collect::<Vec<_>>());
    assert_eq!(read_all(&log, 0).len(), 100);
}

/// Guards the contract of `append_unflushed` with `Always`: invisible until a `flush_to`, and
/// one flush covers everything appended before it (group commit), whoever asked for it.
#[test]
fn append_unflushed_is_invisible_with_flush_always_until_flush_to() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config_always();
    let log = Log::open(dir.path(), config.clone()).unwrap();
    let a = log.append_unflushed(&batch(&[b"a".to_vec()], 0)).unwrap();
    let b = log
        .append_unflushed(&batch(&[b"b".to_vec(), b"c".to_vec()], 0))
        .unwrap();
    assert_eq!((a.first_offset, a.log_end_offset), (Offset(0), Offset(1)));
    assert_eq!((b.first_offset, b.log_end_offset), (Offset(1), Offset(3)));
    assert_eq!(log.log_end_offset(), Offset(3));
    assert_eq!(log.high_watermark(), Offset(0));
    assert_eq!(log.recovery_point(), Offset(0));
    assert!(log.read(Offset(0), 1 << 20).unwrap().batches.is_empty());
    assert_eq!(log.offset_for_timestamp(0).unwrap(), None);

    // Flushing for `a` flushes `b` too: its own flush_to then has nothing left to do.
    log.flush_to(a.log_end_offset).unwrap();
    assert_eq!(log.recovery_point(), Offset(3));
    assert_eq!(log.high_watermark(), Offset(3));
    log.flush_to(b.log_end_offset).unwrap();
    let values: Vec<_> = read_all(&log, 0).into_iter().map(|(_, v)| v).collect();
    assert_eq!(values, [&b"a"[..], b"b", b"c"]);

    // Dropped without close: what flush_to made durable is kept by recovery.
    drop(log);
    let log = Log::open(dir.path(), config).unwrap();
    assert!(!log.open_report().clean_shutdown);
    assert_eq!(read_all(&log, 0).len(), 3);
}

/// Guards that `flush_to` an offset already flushed does nothing: later unflushed records stay
/// invisible.
#[test]
fn flush_to_below_the_recovery_point_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config_always();
    let log = Log::open(dir.path(), config).unwrap();
    let a = log.append(&batch(&[b"a".to_vec()], 0)).unwrap();
    let b = log.append_unflushed(&batch(&[b"b".to_vec()], 0)).unwrap();
    for end in [Offset(0), a.first_offset, a.log_end_offset] {
        log.flush_to(end).unwrap();
        assert_eq!(log.recovery_point(), a.log_end_offset);
        assert_eq!(log.high_watermark(), a.log_end_offset);
    }
    assert_eq!(read_all(&log, 0).len(), 1);
    log.flush_to(b.log_end_offset).unwrap();
    assert_eq!(log.high_watermark(), b.log_end_offset);
    assert_eq!(read_all(&log, 0).len(), 2);
}

/// Guards that the other policies are unchanged by `append_unflushed` (visible at once), and
/// that `flush_to` makes records durable under them too.
#[test]
fn append_unflushed_with_flush_never_is_visible_and_flush_to_makes_it_durable() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    let a = log.append_unflushed(&batch(&[b"a".to_vec()], 0)).unwrap();
    assert_eq!(log.high_watermark(), a.log_end_offset);
    assert_eq!(read_all(&log, 0).len(), 1);
    assert_eq!(log.recovery_point(), Offset(0));
    log.flush_to(a.log_end_offset).unwrap();
    assert_eq!(log.recovery_point(), a.log_end_offset);
}

/// Guards that `flush_to` never reports as durable records that `truncate_to` cut between the
/// append and the flush, nor offsets never assigned; the log keeps working.
#[test]
fn flush_to_past_the_log_end_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config_always();
    let log = Log::open(dir.path(), config).unwrap();
    log.append(&batch(&[b"a".to_vec()], 0)).unwrap();
    let cut = log.append_unflushed(&batch(&[b"b".to_vec()], 0)).unwrap();
    assert_eq!(log.truncate_to(cut.first_offset).unwrap(), Offset(1));
    for end in [cut.log_end_offset, Offset(100)] {
        match log.flush_to(end) {
            Err(StorageError::OffsetOutOfRange {
                offset,
                log_end_offset,
                ..
            }) => assert_eq!((offset, log_end_offset), (end, Offset(1))),
            other => panic!("expected OffsetOutOfRange, got {other:?}"),
        }
    }
    let next = log.append(&batch(&[b"c".to_vec()], 0)).unwrap();
    assert_eq!(next.first_offset, Offset(1));
    assert_eq!(read_all(&log, 0).len(), 2);
}

/// Guards the split append path under concurrency: every record ends durable, visible and
/// exactly once, at dense offsets, also after an unclean reopen.
#[test]
fn concurrent_append_unflushed_and_flush_to_end_durable() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config_always();
    let log = Arc::new(Log::open(dir.path(), config.clone()).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut appended = Vec::new();
                for i in 0..25 {
                    let value = format!("t{t}-{i}").into_bytes();
                    let info = log
                        .append_unflushed(&batch(std::slice::from_ref(&value), 0))
                        .unwrap();
                    log.flush_to(info.log_end_offset).unwrap();
                    assert!(info.log_end_offset <= log.recovery_point());
                    assert!(info.log_end_offset <= log.high_watermark());
                    appended.push((info.first_offset.0, value));
                }
                appended
            })
        })
        .collect();
    let mut appended: Vec<(u64, Vec<u8>)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    appended.sort_unstable();
    let offsets: Vec<u64> = appended.iter().map(|(offset, _)| *offset).collect();
    assert_eq!(offsets, (0..100).collect::<Vec<_>>());
    assert_eq!(log.recovery_point(), Offset(100));
    drop(log);
    let log = Log::open(dir.path(), config).unwrap();
    let stored: Vec<(u64, Vec<u8>)> = read_all(&log, 0)
        .into_iter()
        .map(|(offset, value)| (offset, value.to_vec()))
        .collect();
    assert_eq!(stored, appended);
}

#[test]
fn flush_interval_flushes_when_due() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        flush: FlushPolicy::IntervalMs(1),
        ..small_config()
    };
    let log = Log::open(dir.path(), config).unwrap();
    append_records(&log, 3, 10, 0);
    assert_eq!(log.recovery_point(), Offset(0));
    std::thread::sleep(std::time::Duration::from_millis(3));
    assert!(log.flush_if_due().unwrap());
    assert_eq!(log.recovery_point(), Offset(3));
    assert!(!log.flush_if_due().unwrap(), "nothing left to flush");
}

#[test]
fn concurrent_readers_see_a_consistent_prefix_while_the_writer_appends() {
    readers_keep_up_with(small_config());
}

/// The same while every append is flushed and then dropped from the page cache (a window of 0,
/// `always`): the readers' slices lose their pages under them and fault the same bytes back in.
#[test]
fn concurrent_readers_see_the_same_records_while_flushed_bytes_leave_the_page_cache() {
    readers_keep_up_with(LogConfig {
        flush: FlushPolicy::Always,
        page_cache_window_bytes: Some(0),
        ..small_config()
    });
}

/// Two readers follow one writer of 2,000 records, each checking every record once, in order.
fn readers_keep_up_with(config: LogConfig) {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), config).unwrap());
    let total = 2000u64;
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut next = 0u64;
                // Bounded: each round either advances or waits for the writer, which finishes.
                for _ in 0..10_000_000u64 {
                    if next == total {
                        break;
                    }
                    let read = log.read(Offset(next), 4096).unwrap();
                    for record in octolog_batch::decode_batches(&read.batches).unwrap() {
                        let offset = record.offset as u64;
                        if offset >= next {
                            assert_eq!(offset, next);
                            assert_eq!(record.value.as_deref(), Some(&value_for(offset, 100)[..]));
                            next += 1;
                        }
                    }
                    if read.batches.is_empty() {
                        std::thread::yield_now();
                    }
                }
                next
            })
        })
        .collect();
    append_records(&log, total, 100, 0);
    for reader in readers {
        assert_eq!(reader.join().unwrap(), total);
    }
}

#[test]
fn delete_removes_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("topic-0");
    let log = Log::open(&path, small_config()).unwrap();
    append_records(&log, 5, 10, 0);
    log.delete().unwrap();
    assert!(!path.exists());
}

#[test]
fn invalid_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 10,
        ..LogConfig::default()
    };
    assert!(matches!(
        Log::open(dir.path(), config),
        Err(StorageError::InvalidConfig(_))
    ));
}

#[test]
fn batches_whose_records_contradict_their_header_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    let good = batch(&[b"a".to_vec(), b"b".to_vec()], 1000);
    let resign = |mut bytes: Vec<u8>| {
        let crc = octolog_batch::compute_crc(&bytes);
        bytes[17..21].copy_from_slice(&crc.to_be_bytes());
        bytes
    };
    // A max_timestamp above every record's.
    let mut lying = good.to_vec();
    lying[35..43].copy_from_slice(&9_999i64.to_be_bytes());
    // More records claimed than present (header fields kept consistent with each other).
    let mut many = good.to_vec();
    many[23..27].copy_from_slice(&(i32::MAX - 1).to_be_bytes());
    many[57..61].copy_from_slice(&i32::MAX.to_be_bytes());
    for bytes in [lying, many] {
        let bytes = resign(bytes);
        assert!(matches!(
            log.append(&bytes),
            Err(StorageError::InvalidBatch {
                source: BatchError::RecordMalformed { .. },
                ..
            })
        ));
    }
    assert_eq!(log.log_end_offset(), Offset(0));
}

#[test]
fn retention_ms_of_u64_max_means_forever() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        retention_ms: Some(u64::MAX),
        ..small_config()
    };
    let log = Log::open(dir.path(), config).unwrap();
    append_records(&log, 100, 200, 0);
    assert!(log.segment_count() > 1);
    assert_eq!(log.apply_retention(i64::MAX).unwrap().segments_deleted, 0);
}

#[test]
fn read_reports_where_the_next_read_continues() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    let three = batch(&[b"a".to_vec(), b"b".to_vec(), b"c".to_vec()], 0);
    log.append(&three).unwrap();
    append_records(&log, 2, 10, 0);
    assert_eq!(log.read(Offset(1), 1).unwrap().next_offset, Offset(3));
    assert_eq!(log.read(Offset(0), 1 << 20).unwrap().next_offset, Offset(5));
    assert_eq!(log.read(Offset(5), 1 << 20).unwrap().next_offset, Offset(5));
}

/// Guards that closing a log whose checkpoint on disk is current already (reopened cleanly and
/// nothing appended) does not write it again, and that a log with new records does.
#[test]
fn close_rewrites_the_checkpoint_only_when_it_changed() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("recovery-point.checkpoint");
    let inode = || std::fs::metadata(&checkpoint).unwrap().ino();
    let log = Log::open(dir.path(), small_config()).unwrap();
    append_records(&log, 5, 100, 1);
    log.close().unwrap();
    drop(log);
    let written = inode();

    let log = Log::open(dir.path(), small_config()).unwrap();
    assert!(log.open_report().clean_shutdown);
    log.close().unwrap();
    drop(log);
    assert_eq!(inode(), written);

    let log = Log::open(dir.path(), small_config()).unwrap();
    append_records(&log, 1, 100, 2);
    log.close().unwrap();
    drop(log);
    assert_ne!(inode(), written);
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert!(log.open_report().clean_shutdown);
    assert_eq!(log.recovery_point(), Offset(6));
    assert_eq!(read_all(&log, 0).len(), 6);
}

/// `small_config` with `FlushPolicy::Always`: the setup of the split append/flush tests.
fn small_config_always() -> LogConfig {
    LogConfig {
        flush: FlushPolicy::Always,
        ..small_config()
    }
}
