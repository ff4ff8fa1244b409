//! Crash tests on real files: a log is left as a crash leaves it (dropped without `close`), then
//! damaged the ways disks and crashes damage files. Each test asserts exactly which records
//! survive: everything before the damage, nothing after it, and appends continue contiguously.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use octolog_batch::Offset;
use octolog_storage::{Log, LogConfig};

/// Deterministic pseudo-random numbers (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// One batch of a segment file: its byte range and offsets.
#[derive(Debug, Clone, Copy)]
struct BatchAt {
    start: usize,
    end: usize,
    base_offset: u64,
    last_offset: u64,
}

/// The `.log` files of a log folder in order, with their batches. A file may end in zeros (room
/// the active segment reserved ahead of its data); anything else past its batches fails.
fn layout(dir: &Path) -> Vec<(PathBuf, Vec<BatchAt>)> {
    let mut logs: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs.into_iter()
        .map(|path| {
            let bytes = fs::read(&path).unwrap();
            let mut batches = Vec::new();
            let mut iter = octolog_batch::batches_verified(&bytes);
            let mut start = 0;
            for item in &mut iter {
                let Ok((header, slice)) = item else {
                    assert!(
                        bytes[start..].iter().all(|&b| b == 0),
                        "{path:?}: not a batch at {start}"
                    );
                    break;
                };
                batches.push(BatchAt {
                    start,
                    end: start + slice.len(),
                    base_offset: header.base_offset as u64,
                    last_offset: header.last_offset() as u64,
                });
                start += slice.len();
            }
            (path, batches)
        })
        .collect()
}

fn config() -> LogConfig {
    small_config()
}

const RECORDS: u64 = 200;
const VALUE_BYTES: usize = 150;

/// A log of `RECORDS` records over several segments, dropped without `close` (a crash), in a
/// fresh folder inside `root`.
fn crashed_log(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    let log = Log::open(&dir, config()).unwrap();
    // Batches of 1, 2 or 3 records so cuts fall inside multi-record batches too.
    let mut offset = 0u64;
    let mut i = 0;
    while offset < RECORDS {
        let n = (1 + i % 3).min(RECORDS - offset);
        let values: Vec<Vec<u8>> = (offset..offset + n)
            .map(|o| value_for(o, VALUE_BYTES))
            .collect();
        let b = batch(&values, offset as i64);
        log.append(&b).unwrap();
        offset += n;
        i += 1;
    }
    assert!(log.segment_count() >= 4);
    drop(log);
    dir
}

/// Opens the damaged log and asserts that exactly the records below `survivors` are there, with
/// their values, and that appends continue at `survivors`; then that a clean reopen agrees.
fn assert_survivors(dir: &Path, survivors: u64) {
    let log = Log::open(dir, config()).unwrap();
    assert_eq!(
        log.log_end_offset(),
        Offset(survivors),
        "report: {:?}",
        log.open_report()
    );
    let records = read_all(&log, 0);
    assert_eq!(records.len() as u64, survivors);
    for (offset, value) in &records {
        assert_eq!(value, &value_for(*offset, VALUE_BYTES));
    }
    let b = batch(&[value_for(survivors, VALUE_BYTES)], 0);
    let info = log.append(&b).unwrap();
    assert_eq!(info.first_offset, Offset(survivors));
    log.close().unwrap();
    drop(log);
    let log = Log::open(dir, config()).unwrap();
    assert!(log.open_report().clean_shutdown);
    assert_eq!(log.log_end_offset(), Offset(survivors + 1));
    assert_eq!(read_all(&log, 0).len() as u64, survivors + 1);
}

/// The records that survive a cut of `file` at `position`: those of earlier files and of whole
/// batches before the cut.
fn survivors_after_cut(layout: &[(PathBuf, Vec<BatchAt>)], file: usize, position: usize) -> u64 {
    let (_, batches) = &layout[file];
    let base = batches[0].base_offset;
    batches
        .iter()
        .take_while(|b| b.end <= position)
        .last()
        .map_or(base, |b| b.last_offset + 1)
}

#[test]
fn a_crash_without_damage_loses_nothing() {
    let root = tempfile::tempdir().unwrap();
    let dir = crashed_log(root.path(), "log");
    let log = Log::open(&dir, config()).unwrap();
    assert!(!log.open_report().clean_shutdown);
    assert!(log.open_report().segments_recovered > 0);
    assert_eq!(log.open_report().bytes_cut, 0);
    drop(log);
    assert_survivors(&dir, RECORDS);
}

#[test]
fn cutting_a_log_file_at_any_position_keeps_exactly_the_whole_batches_before_it() {
    let root = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for trial in 0..40 {
        let dir = crashed_log(root.path(), &format!("cut-{trial}"));
        let layout = layout(&dir);
        // Mostly the last segment (a torn tail), sometimes an earlier one (lost writes).
        let file = if trial % 4 == 0 {
            rng.below(layout.len() as u64) as usize
        } else {
            layout.len() - 1
        };
        let (path, batches) = &layout[file];
        let len = batches.last().map_or(0, |b| b.end);
        let position = rng.below(len as u64 + 1) as usize;
        fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(position as u64)
            .unwrap();
        let survivors = survivors_after_cut(&layout, file, position);
        assert_survivors(&dir, survivors);
        // Segments after a damaged one are gone, files and all.
        for (later, _) in &layout[file + 1..] {
            assert!(
                !later.exists() || survivors == RECORDS,
                "{later:?} should be deleted"
            );
        }
    }
}

#[test]
fn flipping_a_byte_cuts_the_log_at_the_batch_holding_it() {
    let root = tempfile::tempdir().unwrap();
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    for trial in 0..40 {
        let dir = crashed_log(root.path(), &format!("flip-{trial}"));
        let layout = layout(&dir);
        let file = rng.below(layout.len() as u64) as usize;
        let (path, batches) = &layout[file];
        let len = batches.last().unwrap().end;
        let position = rng.below(len as u64) as usize;
        let mut bytes = fs::read(path).unwrap();
        bytes[position] ^= 1 << rng.below(8);
        fs::write(path, &bytes).unwrap();
        let hit = batches
            .iter()
            .find(|b| b.start <= position && position < b.end)
            .unwrap();
        // The partition leader epoch (bytes 12..16) is outside the CRC, as in Kafka, and the
        // engine does not interpret it: a flip there damages nothing.
        let in_leader_epoch = (hit.start + 12..hit.start + 16).contains(&position);
        let survivors = if in_leader_epoch {
            RECORDS
        } else {
            hit.base_offset
        };
        assert_survivors(&dir, survivors);
    }
}

/// Where garbage goes in `garbage_in_or_after_the_reserved_zeros_is_cut_off`.
#[derive(Debug, Clone, Copy)]
enum GarbageAt {
    /// Right after the last batch, over the start of the reserved zeros.
    DataEnd,
    /// Inside the reserved zeros, after some of them.
    InsideZeros,
    /// After the reserved zeros, growing the file.
    FileEnd,
}

/// Guards that bytes other than zeros past the last batch are reported as cut (up to the last
/// of them), wherever they sit in or after the zeros the active segment reserved, and that the
/// file is cut back to its batches.
#[test]
fn garbage_in_or_after_the_reserved_zeros_is_cut_off() {
    use std::os::unix::fs::FileExt;
    let root = tempfile::tempdir().unwrap();
    let mut rng = Rng(42);
    let places = [
        GarbageAt::DataEnd,
        GarbageAt::InsideZeros,
        GarbageAt::FileEnd,
    ];
    for (trial, garbage_bytes) in [1usize, 11, 61, 500, 5000].into_iter().enumerate() {
        for at in places {
            let dir = crashed_log(root.path(), &format!("garbage-{trial}-{at:?}"));
            let layout = layout(&dir);
            let (path, batches) = layout.last().unwrap();
            let data_end = batches.last().unwrap().end as u64;
            let file_len = fs::metadata(path).unwrap().len();
            // The crash left the active segment's reserved room behind its batches.
            assert!(data_end < file_len, "{data_end} {file_len}");
            let position = match at {
                GarbageAt::DataEnd => data_end,
                GarbageAt::InsideZeros => data_end + (file_len - data_end) / 2,
                GarbageAt::FileEnd => file_len,
            };
            // Never zero, so the garbage's extent is exactly what is reported.
            let garbage: Vec<u8> = (0..garbage_bytes)
                .map(|_| 1 + rng.below(255) as u8)
                .collect();
            fs::OpenOptions::new()
                .write(true)
                .open(path)
                .unwrap()
                .write_all_at(&garbage, position)
                .unwrap();
            let log = Log::open(&dir, config()).unwrap();
            assert_eq!(
                log.open_report().bytes_cut,
                position + garbage_bytes as u64 - data_end,
                "{garbage_bytes} at {at:?}"
            );
            assert_eq!(log.open_report().segments_deleted, 0);
            drop(log);
            assert_eq!(fs::metadata(path).unwrap().len(), data_end);
            assert_survivors(&dir, RECORDS);
        }
    }
}

#[test]
fn a_zeroed_tail_like_a_preallocated_file_is_trimmed_without_reporting_a_cut() {
    let root = tempfile::tempdir().unwrap();
    let dir = crashed_log(root.path(), "zeros");
    let layout = layout(&dir);
    let (path, batches) = layout.last().unwrap();
    let len = fs::metadata(path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len + 4096)
        .unwrap();
    let log = Log::open(&dir, config()).unwrap();
    assert_eq!(log.open_report().bytes_cut, 0);
    assert_eq!(log.open_report().segments_damaged, 0);
    drop(log);
    assert_eq!(
        fs::metadata(path).unwrap().len(),
        batches.last().unwrap().end as u64
    );
    assert_survivors(&dir, RECORDS);
}

/// Segments large enough that the active one reserves room several times (64, 128, 256 KiB
/// ...).
fn reserving_config() -> LogConfig {
    LogConfig {
        segment_bytes: 4 << 20,
        index_bytes_max: 64 << 10,
        ..config()
    }
}

/// Appends `count` batches of 1 to 3 records (`value_for` values of `VALUE_BYTES`) from the log
/// end offset on.
fn append_mixed_batches(log: &Log, count: u64) {
    for i in 0..count {
        let offset = log.log_end_offset().0;
        let n = 1 + i % 3;
        let values: Vec<Vec<u8>> = (offset..offset + n)
            .map(|o| value_for(o, VALUE_BYTES))
            .collect();
        let info = log.append(&batch(&values, offset as i64)).unwrap();
        assert_eq!(info.first_offset, Offset(offset));
    }
}

/// Asserts that `log` holds exactly the records `[0, end)`, with their values.
fn assert_records(log: &Log, end: u64) {
    assert_eq!(log.log_end_offset(), Offset(end));
    let records = read_all(log, 0);
    assert_eq!(records.len() as u64, end);
    for (offset, value) in &records {
        assert_eq!(value, &value_for(*offset, VALUE_BYTES));
    }
}

/// Guards that the zeros an active segment reserved ahead of its data, which a crash leaves in
/// the file, are trimmed on recovery without being reported as damage, that no record is lost,
/// and that appends continue at the right offset (reserving again) across further crashes.
#[test]
fn a_crash_leaves_reserved_zeros_that_recovery_trims_quietly() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("reserved");
    let path = dir.join("00000000000000000000.log");
    let log = Log::open(&dir, reserving_config()).unwrap();
    // About 600 KiB: past the first three reservations.
    append_mixed_batches(&log, 2000);
    let end = log.log_end_offset().0;
    assert_eq!(log.segment_count(), 1);
    drop(log);
    let data_end = layout(&dir)[0].1.last().unwrap().end as u64;
    let file_len = fs::metadata(&path).unwrap().len();
    assert!(data_end < file_len, "{data_end} {file_len}");
    assert!(file_len <= data_end + (1 << 20));

    for round in 0..2 {
        let log = Log::open(&dir, reserving_config()).unwrap();
        let report = log.open_report().clone();
        assert!(!report.clean_shutdown);
        assert_eq!(report.bytes_cut, 0, "round {round}: {report:?}");
        assert_eq!(report.segments_deleted, 0);
        assert_eq!(report.segments_damaged, 0);
        assert_records(&log, end + round * 300);
        let data_end = fs::metadata(&path).unwrap().len();
        // Appends continue at the log end and reserve room again.
        append_mixed_batches(&log, 150);
        assert_records(&log, end + (round + 1) * 300);
        assert!(data_end < fs::metadata(&path).unwrap().len());
        drop(log);
    }
    // A clean close leaves the file exactly as long as its data.
    let log = Log::open(&dir, reserving_config()).unwrap();
    log.close().unwrap();
    drop(log);
    let layout = layout(&dir);
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        layout[0].1.last().unwrap().end as u64
    );
    let log = Log::open(&dir, reserving_config()).unwrap();
    assert!(log.open_report().clean_shutdown);
    assert_eq!(log.open_report().segments_recovered, 0);
    assert_records(&log, end + 600);
}

/// Guards against the write-back order of dirty pages, which is arbitrary: after a crash a page
/// in the middle of the data may be zeros while later pages hold batches. Recovery cuts
/// at the first batch the zeros touch and reports everything after it, up to the last batch
/// byte, as cut.
#[test]
fn a_zero_page_inside_the_data_cuts_the_log_there() {
    use std::os::unix::fs::FileExt;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("zero-page");
    let path = dir.join("00000000000000000000.log");
    let log = Log::open(&dir, reserving_config()).unwrap();
    append_mixed_batches(&log, 1000);
    drop(log);
    let layout = layout(&dir);
    let batches = &layout[0].1;
    let data_end = batches.last().unwrap().end;
    let page = 40 * 4096;
    assert!(page + 4096 < data_end);
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&[0u8; 4096], page as u64)
        .unwrap();
    let hit = batches.iter().find(|b| page < b.end).unwrap();
    let log = Log::open(&dir, reserving_config()).unwrap();
    assert_eq!(
        log.open_report().bytes_cut,
        (data_end - hit.start) as u64,
        "{:?}",
        log.open_report()
    );
    assert_records(&log, hit.base_offset);
    drop(log);
    assert_eq!(fs::metadata(&path).unwrap().len(), hit.start as u64);
}

#[test]
fn missing_or_damaged_index_files_are_rebuilt_after_a_clean_shutdown_too() {
    let root = tempfile::tempdir().unwrap();
    let damages: [(&str, fn(&Path)); 5] = [
        ("deleted", |p| fs::remove_file(p).unwrap()),
        ("emptied", |p| fs::write(p, b"").unwrap()),
        ("odd length", |p| fs::write(p, [1u8; 13]).unwrap()),
        ("zeros", |p| fs::write(p, [0u8; 64]).unwrap()),
        // Plausible entries that point into the middle of batches.
        ("lying", |p| {
            let mut bytes = Vec::new();
            for (relative_offset, position) in [(1u32, 5u32), (2, 9)] {
                bytes.extend_from_slice(&relative_offset.to_be_bytes());
                bytes.extend_from_slice(&position.to_be_bytes());
            }
            fs::write(p, bytes).unwrap();
        }),
    ];
    for (name, damage) in damages {
        for extension in ["index", "timeindex"] {
            let dir = root.path().join(format!("{name}-{extension}"));
            let log = Log::open(&dir, config()).unwrap();
            append_records(&log, 200, 100, 7);
            log.close().unwrap();
            drop(log);
            let mut indexes: Vec<PathBuf> = fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == extension))
                .collect();
            indexes.sort();
            assert!(indexes.len() >= 3);
            // A sealed segment's index and the active one's.
            damage(&indexes[1]);
            damage(indexes.last().unwrap());
            let log = Log::open(&dir, config()).unwrap();
            assert_eq!(log.log_end_offset(), Offset(200), "{name} {extension}");
            for offset in 0..200u64 {
                let read = log.read(Offset(offset), 1).unwrap();
                let records = octolog_batch::decode_batches(&read.batches).unwrap();
                assert_eq!(records[0].offset as u64, offset, "{name} {extension}");
            }
            assert_eq!(log.offset_for_timestamp(7).unwrap(), Some(Offset(0)));
            assert_eq!(log.offset_for_timestamp(8).unwrap(), None);
            append_records(&log, 1, 100, 9);
            assert_eq!(log.offset_for_timestamp(8).unwrap(), Some(Offset(200)));
        }
    }
}

#[test]
fn stray_index_and_temp_files_are_removed() {
    let root = tempfile::tempdir().unwrap();
    let dir = crashed_log(root.path(), "stray");
    let stray = [
        "00000000000000999999.index",
        "00000000000000999999.timeindex",
        "recovery-point.checkpoint.tmp",
    ];
    for name in stray {
        fs::write(dir.join(name), b"junk").unwrap();
    }
    let log = Log::open(&dir, config()).unwrap();
    assert_eq!(log.open_report().stray_files_removed, 3);
    for name in stray {
        assert!(!dir.join(name).exists(), "{name}");
    }
    drop(log);
    assert_survivors(&dir, RECORDS);
}

#[test]
fn a_damaged_log_behind_a_clean_shutdown_marker_is_still_recovered() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("liar");
    let log = Log::open(&dir, config()).unwrap();
    append_records(&log, 50, 100, 0);
    log.close().unwrap();
    drop(log);
    let layout = layout(&dir);
    let (path, batches) = layout.last().unwrap();
    let cut = batches.last().unwrap().start + 10;
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(cut as u64)
        .unwrap();
    let survivors = batches.last().unwrap().base_offset;
    let log = Log::open(&dir, config()).unwrap();
    assert!(log.open_report().clean_shutdown);
    assert_eq!(log.log_end_offset(), Offset(survivors));
    assert_eq!(read_all(&log, 0).len() as u64, survivors);
}

#[test]
fn a_damaged_checkpoint_means_scanning_everything() {
    let root = tempfile::tempdir().unwrap();
    let dir = crashed_log(root.path(), "checkpoint");
    fs::write(dir.join("recovery-point.checkpoint"), b"not a checkpoint").unwrap();
    let log = Log::open(&dir, config()).unwrap();
    let segments = log.segment_count();
    assert_eq!(log.open_report().segments_recovered, segments);
    drop(log);
    assert_survivors(&dir, RECORDS);
}

#[test]
fn a_missing_segment_in_the_middle_cuts_the_log_there() {
    let root = tempfile::tempdir().unwrap();
    let dir = crashed_log(root.path(), "hole");
    let layout = layout(&dir);
    fs::remove_file(&layout[2].0).unwrap();
    let survivors = layout[1].1.last().unwrap().last_offset + 1;
    assert_survivors(&dir, survivors);
}

#[test]
fn recovery_point_bounds_the_scan() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("flushed");
    let log = Log::open(&dir, config()).unwrap();
    append_records(&log, 100, 150, 0);
    log.flush().unwrap();
    append_records(&log, 5, 150, 0);
    let segments = log.segment_count();
    drop(log);
    let log = Log::open(&dir, config()).unwrap();
    assert!(log.open_report().segments_recovered < segments);
    assert!(log.open_report().segments_recovered >= 1);
    assert_eq!(log.log_end_offset(), Offset(105));
}

/// A log of `RECORDS` single-record batches with `FlushPolicy::Always`, closed cleanly.
fn flushed_log(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    let config = LogConfig {
        flush: octolog_storage::FlushPolicy::Always,
        ..config()
    };
    let log = Log::open(&dir, config).unwrap();
    append_records(&log, RECORDS, VALUE_BYTES, 0);
    assert!(log.segment_count() >= 4);
    log.close().unwrap();
    dir
}

/// Guards that damage in flushed data costs only the damaged part: later segments stay, reads
/// of the hole fail clearly, reads after it work.
#[test]
fn damage_in_a_flushed_middle_segment_keeps_the_later_segments() {
    let root = tempfile::tempdir().unwrap();
    for unclean in [false, true] {
        let dir = flushed_log(root.path(), &format!("flushed-{unclean}"));
        if unclean {
            fs::remove_file(dir.join("clean-shutdown")).unwrap();
        }
        let layout = layout(&dir);
        let (path, batches) = &layout[1];
        // The last batch: a trusted segment's tail is checked on every open (a full scan of
        // flushed data on every start would be too slow; damage earlier in it is found by reads).
        let hit = *batches.last().unwrap();
        let mut bytes = fs::read(path).unwrap();
        bytes[hit.start + 8] ^= 0x40; // batch_length
        fs::write(path, &bytes).unwrap();
        let log = Log::open(&dir, config()).unwrap();
        assert_eq!(log.open_report().segments_damaged, 1, "unclean {unclean}");
        assert_eq!(log.open_report().bytes_cut, 0);
        assert_eq!(log.open_report().segments_deleted, 0);
        assert_eq!(log.log_end_offset(), Offset(RECORDS));
        // The damaged file is left as it was, for the operator.
        assert_eq!(fs::read(path).unwrap(), bytes);
        // Before the damage: readable. In the hole: a clear error. After it: readable.
        assert!(log.read(Offset(hit.base_offset - 1), 1).is_ok());
        let err = log
            .read(Offset(hit.base_offset), 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("damaged or missing"), "{err}");
        let next_base = layout[2].1[0].base_offset;
        assert_eq!(read_all(&log, next_base).len() as u64, RECORDS - next_base);
        // Appends go on at the end.
        append_records(&log, 1, VALUE_BYTES, 0);
        assert_eq!(log.log_end_offset(), Offset(RECORDS + 1));
    }
}

#[test]
fn truncating_into_damaged_flushed_data_fails_and_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let dir = flushed_log(root.path(), "truncate-damaged");
    let layout = layout(&dir);
    let (path, batches) = layout.last().unwrap();
    // Damage the CRC-covered part of the first batch of the last segment: the structure stays,
    // so a clean open trusts it, and only the truncation's check finds it.
    let mut bytes = fs::read(path).unwrap();
    bytes[batches[0].start + 70] ^= 0x01;
    fs::write(path, &bytes).unwrap();
    let log = Log::open(&dir, config()).unwrap();
    let err = log
        .truncate_to(Offset(batches[2].base_offset))
        .unwrap_err()
        .to_string();
    assert!(err.contains("damaged"), "{err}");
    assert_eq!(log.log_end_offset(), Offset(RECORDS));
    assert_eq!(fs::read(path).unwrap(), bytes);
    // Still writable.
    append_records(&log, 1, VALUE_BYTES, 0);
}

/// Guards against a panic on batches that claim offsets beyond what a segment can index.
#[test]
fn batches_claiming_huge_record_counts_are_cut_not_panicked_on() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("huge");
    fs::create_dir_all(&dir).unwrap();
    let mut file = Vec::new();
    let mut base = 0i64;
    for _ in 0..4 {
        // A bare 61-byte header claiming i32::MAX records, with a valid CRC.
        let mut header = vec![0u8; 61];
        header[0..8].copy_from_slice(&base.to_be_bytes());
        header[8..12].copy_from_slice(&49i32.to_be_bytes());
        header[16] = 2;
        header[23..27].copy_from_slice(&(i32::MAX - 1).to_be_bytes());
        header[43..51].copy_from_slice(&(-1i64).to_be_bytes());
        header[57..61].copy_from_slice(&i32::MAX.to_be_bytes());
        let crc = octolog_batch::compute_crc(&header);
        header[17..21].copy_from_slice(&crc.to_be_bytes());
        file.extend_from_slice(&header);
        base += i64::from(i32::MAX);
    }
    fs::write(dir.join("00000000000000000000.log"), &file).unwrap();
    let config = LogConfig {
        index_interval_bytes: 0,
        ..config()
    };
    let log = Log::open(&dir, config).unwrap();
    // The first two fit in a u32 of relative offsets; the third would not.
    assert!(log.open_report().bytes_cut > 0);
    assert!(log.log_end_offset().0 <= 2 * i32::MAX as u64);
}

/// Guards against a panic when a lying index meets a damaged log after a clean shutdown.
#[test]
fn a_lying_index_over_a_damaged_log_is_recovered_without_panicking() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("lying");
    let log = Log::open(&dir, config()).unwrap();
    append_records(&log, 20, 100, 0);
    log.close().unwrap();
    drop(log);
    fs::write(
        dir.join("00000000000000000000.index"),
        0xFFFF_0000u32.to_be_bytes().repeat(2),
    )
    .unwrap();
    let path = dir.join("00000000000000000000.log");
    let mut bytes = fs::read(&path).unwrap();
    bytes[8..12].copy_from_slice(&5i32.to_be_bytes());
    fs::write(&path, &bytes).unwrap();
    let log = Log::open(&dir, config()).unwrap();
    assert_eq!(log.log_end_offset(), Offset(0));
    append_records(&log, 1, 100, 0);
}

/// Guards that a new log writes no checkpoint when it opens (creating a topic of thousands of
/// partitions costs no fsyncs for it), and that a crash before its first flush still recovers
/// every record, since without a checkpoint recovery starts at offset 0.
#[test]
fn a_new_log_writes_no_checkpoint_and_a_crash_before_any_flush_loses_nothing() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("new");
    let checkpoint = dir.join("recovery-point.checkpoint");
    let log = Log::open(&dir, config()).unwrap();
    assert!(!checkpoint.exists());
    append_records(&log, 10, VALUE_BYTES, 1);
    assert_eq!(log.segment_count(), 1);
    drop(log);
    let log = Log::open(&dir, config()).unwrap();
    assert!(!log.open_report().clean_shutdown);
    assert_eq!(log.log_end_offset(), Offset(10));
    let records = read_all(&log, 0);
    assert_eq!(records.len(), 10);
    for (offset, value) in &records {
        assert_eq!(value, &value_for(*offset, VALUE_BYTES));
    }
    // Recovery made what it kept durable, and says so.
    assert!(checkpoint.exists());
}

/// Guards that a start after a crash rewrites the checkpoint only when recovery found records
/// past it: thousands of idle partitions then cost no temp file and fsyncs each.
#[test]
fn an_unclean_open_rewrites_the_checkpoint_only_when_records_follow_it() {
    use std::os::unix::fs::MetadataExt;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("idle");
    let checkpoint = dir.join("recovery-point.checkpoint");
    let inode = || fs::metadata(&checkpoint).unwrap().ino();
    let log = Log::open(&dir, config()).unwrap();
    append_records(&log, 10, VALUE_BYTES, 1);
    log.flush().unwrap();
    drop(log);
    let flushed = inode();

    // Crashed with nothing after the checkpoint: it stays as it is.
    let log = Log::open(&dir, config()).unwrap();
    assert!(!log.open_report().clean_shutdown);
    assert_eq!(log.log_end_offset(), Offset(10));
    assert_eq!(log.recovery_point(), Offset(10));
    drop(log);
    assert_eq!(inode(), flushed);

    // Crashed with records after it: recovery keeps them and vouches for them.
    let log = Log::open(&dir, config()).unwrap();
    append_records(&log, 5, VALUE_BYTES, 2);
    drop(log);
    let log = Log::open(&dir, config()).unwrap();
    assert_eq!(log.log_end_offset(), Offset(15));
    assert_eq!(log.recovery_point(), Offset(15));
    assert_ne!(inode(), flushed);
    assert_eq!(read_all(&log, 0).len(), 15);
    drop(log);
    let log = Log::open(&dir, config()).unwrap();
    assert_eq!(log.recovery_point(), Offset(15));
}
