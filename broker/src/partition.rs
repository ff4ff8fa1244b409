//! One topic partition: a storage `Log` plus what the broker needs around it.
//!
//! Thread-safety: shared as `Arc<Partition>`. Reads go straight to the log (lock-free). Appends
//! that fsync (`FlushPolicy::Always`) run on tokio's blocking threads so that a slow disk never
//! stalls the async workers; other appends are a copy into the page cache and run inline.

use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;
use octolog_batch::Offset;
use octolog_storage::{AppendInfo, FlushPolicy, Log, LogConfig, ReadBatches, RetentionOutcome};
use tokio::sync::watch;

use crate::error::{BrokerError, Result};

/// A partition of a topic.
#[derive(Debug)]
pub struct Partition {
    /// The topic's name, for errors and logs.
    topic: String,
    /// The partition number.
    id: u32,
    /// The partition's log.
    log: Arc<Log>,
    /// The topic's append watch, bumped after every append so waiting fetches and
    /// subscriptions wake, even when the request that appended was cancelled meanwhile.
    appended: Arc<watch::Sender<u64>>,
}

impl Partition {
    /// Opens (recovering if needed) the log of partition `id` in `dir`.
    pub(crate) fn open(
        topic: &str,
        id: u32,
        dir: &Path,
        config: LogConfig,
        appended: Arc<watch::Sender<u64>>,
    ) -> Result<Partition> {
        let log = Log::open(dir, config).map_err(|source| BrokerError::Storage {
            topic: topic.to_string(),
            partition: id,
            source,
        })?;
        let report = log.open_report();
        if report.bytes_cut > 0 || report.stray_files_removed > 0 {
            tracing::warn!(
                topic,
                partition = id,
                ?report,
                "partition recovered with losses"
            );
        }
        Ok(Partition {
            topic: topic.to_string(),
            id,
            log: Arc::new(log),
            appended,
        })
    }

    fn storage_error(&self, source: octolog_storage::StorageError) -> BrokerError {
        BrokerError::Storage {
            topic: self.topic.clone(),
            partition: self.id,
            source,
        }
    }

    /// The partition number.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The partition's log.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Appends v2 batches (back to back); returns the offsets given.
    ///
    /// # Errors
    ///
    /// `Storage` wrapping what the log said (invalid batch, too large, I/O).
    pub async fn append(&self, mut batches: BytesMut) -> Result<AppendInfo> {
        let mut append = {
            let log = Arc::clone(&self.log);
            let appended = Arc::clone(&self.appended);
            move || {
                let result = log.append(&mut batches);
                if result.is_ok() {
                    appended.send_modify(|n| *n = n.wrapping_add(1));
                }
                result
            }
        };
        let result = if self.log.config().flush == FlushPolicy::Always {
            tokio::task::spawn_blocking(append)
                .await
                .map_err(|e| BrokerError::InvalidRequest(format!("append task failed: {e}")))?
        } else {
            append()
        };
        result.map_err(|e| self.storage_error(e))
    }

    /// Whole batches from the one containing `offset`, at most `bytes_max` (but at least one).
    ///
    /// # Errors
    ///
    /// `Storage` with `OffsetOutOfRange` or `Corrupt`.
    pub fn read(&self, offset: Offset, bytes_max: usize) -> Result<ReadBatches> {
        self.log
            .read(offset, bytes_max)
            .map_err(|e| self.storage_error(e))
    }

    /// The first offset whose record has a timestamp >= `timestamp_ms`.
    ///
    /// # Errors
    ///
    /// `Storage` with `Corrupt`.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<Offset>> {
        self.log
            .offset_for_timestamp(timestamp_ms)
            .map_err(|e| self.storage_error(e))
    }

    /// Flushes if the interval flush policy says it is time; runs on the caller's thread.
    pub(crate) fn flush_if_due(&self) -> Result<bool> {
        self.log.flush_if_due().map_err(|e| self.storage_error(e))
    }

    /// Deletes segments past retention.
    pub(crate) fn apply_retention(&self, now_ms: i64) -> Result<RetentionOutcome> {
        self.log
            .apply_retention(now_ms)
            .map_err(|e| self.storage_error(e))
    }

    /// Flushes and closes the log cleanly.
    pub(crate) fn close(&self) -> Result<()> {
        self.log.close().map_err(|e| self.storage_error(e))
    }
}
