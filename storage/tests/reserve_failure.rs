//! Appends when the disk is short of room (as on a full disk): a reservation of room ahead that
//! does not fit must not fail appends that do; an append that does not fit must fail with an
//! `Io` error and leave the log as it was for readers and for recovery.
//!
//! The failure is provoked with a file-size limit (`RLIMIT_FSIZE`), under which `fallocate` past
//! the limit fails with `EFBIG`. The limit is per process, so this file is its own test binary
//! with a single test: no other test can run under the limit.

mod common;

use std::fs;

use common::*;
use octolog_batch::Offset;
use octolog_storage::{Log, LogConfig, StorageError};

/// Bytes any file of this process may grow to while the limit is set.
const FILE_BYTES_LIMIT: u64 = 256 << 10;

fn set_file_bytes_limit(bytes: libc::rlim_t) {
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain system call with a valid pointer to an initialised `rlimit`.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &limit) }, 0);
}

/// Guards that a failed reservation of room ahead falls back to reserving (or writing) just what
/// an append needs, so appends go on until one really does not fit; that this one is an `Io`
/// error with the log unchanged (no record published, the file cut back to its data), that the
/// log then takes no writes, and that a reopen recovers every record appended before without
/// reporting a cut.
#[test]
fn appends_fill_the_room_left_and_the_one_that_does_not_fit_leaves_the_log_as_it_was() {
    // SAFETY: ignoring a signal installs no handler code; going past the limit then only fails
    // the system call with EFBIG instead of killing the process.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 4 << 20,
        index_bytes_max: 64 << 10,
        ..small_config()
    };
    let path = dir.path().join("00000000000000000000.log");
    let log = Log::open(dir.path(), config.clone()).unwrap();
    // Reserves 64 KiB, then 192 KiB in all; the next reservation (448 KiB) passes the limit.
    append_records(&log, 100, 900, 0);
    set_file_bytes_limit(FILE_BYTES_LIMIT);
    let mut failure = None;
    for _ in 0..1000 {
        let end = log.log_end_offset();
        let size_bytes = log.size_bytes();
        let file = fs::read(&path).unwrap();
        let b = batch(&[value_for(end.0, 900)], 0);
        let batch_bytes = b.len() as u64;
        match log.append(&b) {
            Ok(_) => continue,
            Err(e) => {
                failure = Some((e, end, size_bytes, file, batch_bytes));
                break;
            }
        }
    }
    let (error, end, size_bytes, file, batch_bytes) =
        failure.expect("an append fails past the limit");
    set_file_bytes_limit(libc::RLIM_INFINITY);
    match &error {
        StorageError::Io { source, .. } => {
            assert_eq!(source.raw_os_error(), Some(libc::EFBIG), "{error}")
        }
        other => panic!("expected an i/o error, got {other}"),
    }
    assert!((file.len() as u64) <= FILE_BYTES_LIMIT);
    assert!(size_bytes <= file.len() as u64);
    // The failed 448 KiB reservation did not stop appends: they filled the file up to the limit.
    assert!(
        size_bytes + batch_bytes > FILE_BYTES_LIMIT,
        "{size_bytes} + {batch_bytes} bytes fit under {FILE_BYTES_LIMIT}"
    );
    // Nothing published; the file holds the data it held, and nothing past it.
    assert_eq!(log.log_end_offset(), end);
    assert_eq!(log.high_watermark(), end);
    assert_eq!(log.size_bytes(), size_bytes);
    assert_eq!(fs::read(&path).unwrap(), file[..size_bytes as usize]);
    assert!(file[size_bytes as usize..].iter().all(|&b| b == 0));
    let records = read_all(&log, 0);
    assert_eq!(records.len() as u64, end.0);
    // The log takes no more writes until it is reopened.
    let b = batch(&[value_for(end.0, 900)], 0);
    assert!(matches!(log.append(&b), Err(StorageError::Failed { .. })));
    assert!(matches!(log.close(), Err(StorageError::Failed { .. })));
    drop(log);

    let log = Log::open(dir.path(), config).unwrap();
    assert!(!log.open_report().clean_shutdown);
    assert_eq!(log.open_report().bytes_cut, 0);
    assert_eq!(log.log_end_offset(), end);
    for (offset, value) in read_all(&log, 0) {
        assert_eq!(value, value_for(offset, 900));
    }
    append_records(&log, 200, 900, 0);
    assert_eq!(log.log_end_offset(), Offset(end.0 + 200));
    log.close().unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), log.size_bytes());
}
