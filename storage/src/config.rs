//! Settings of one partition log, with Kafka's defaults where Kafka has one.

use std::fmt;
use std::str::FromStr;

use crate::error::{Result, StorageError};

/// When appended data is forced to disk with `fdatasync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// Durable before `append` returns. Concurrent appends share one `fdatasync` (group commit),
    /// and the high watermark only moves past flushed data, so no reader ever sees a record that
    /// a crash could take back.
    Always,
    /// Flushed by [`Log::flush_if_due`](crate::Log::flush_if_due) at most this many
    /// milliseconds after it was appended; the owner of the log calls it from a timer.
    IntervalMs(u64),
    /// Left to the operating system; flushed only on roll-over checkpoints and on close.
    Never,
}

impl FromStr for FlushPolicy {
    type Err = StorageError;

    /// Parses `always`, `never` or `interval-ms=N`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "always" => Ok(FlushPolicy::Always),
            "never" => Ok(FlushPolicy::Never),
            _ => match s.strip_prefix("interval-ms=").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms > 0 => Ok(FlushPolicy::IntervalMs(ms)),
                _ => Err(StorageError::InvalidConfig(format!(
                    "flush policy {s:?} is not one of always, never, interval-ms=N (N > 0)"
                ))),
            },
        }
    }
}

impl fmt::Display for FlushPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlushPolicy::Always => f.write_str("always"),
            FlushPolicy::Never => f.write_str("never"),
            FlushPolicy::IntervalMs(ms) => write!(f, "interval-ms={ms}"),
        }
    }
}

/// Largest segment: positions are `u32` in the index, and Kafka caps segments at `i32::MAX`.
pub const SEGMENT_BYTES_LIMIT: u32 = i32::MAX as u32;

/// Settings of one partition log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Roll to a new segment before the active one would grow past this many bytes. Default 1 GiB.
    pub segment_bytes: u32,
    /// Roll to a new segment once the active one is this old (by wall clock, counted from its
    /// creation or from when the log was opened). Default 7 days.
    pub segment_ms: u64,
    /// Bytes of log between two entries of the sparse offset index. Default 4096.
    pub index_interval_bytes: u32,
    /// Pre-allocated size of each index file; a full index rolls the segment. Default 10 MiB.
    pub index_bytes_max: u32,
    /// Largest batch an append accepts. Default 1 MiB.
    pub batch_bytes_max: u32,
    /// Delete sealed segments whose newest record is older than this. Default 7 days;
    /// `None` keeps them forever.
    pub retention_ms: Option<u64>,
    /// Delete the oldest sealed segments while the log is larger than this. Default `None`
    /// (no size limit).
    pub retention_bytes: Option<u64>,
    /// When appended data is forced to disk. Default `interval-ms=1000`.
    pub flush: FlushPolicy,
    /// After each flush, the log's bytes that are on disk and more than this many bytes behind
    /// the log end are dropped from the page cache: their page-table entries in the log's own
    /// map are removed (`MADV_DONTNEED`), then `POSIX_FADV_DONTNEED`. Readers of them then read
    /// the disk (page faults on the map). Default `None`: everything stays cached until the
    /// kernel reclaims it, as Kafka leaves it. A sustained writer whose readers keep up then
    /// reuses the same memory instead of spreading the cache over all of it, which is far
    /// cheaper where first touches of memory are expensive (a VM). A window smaller than the
    /// readers' lag makes every read a disk read. (The broker sets 256 MiB unless told
    /// otherwise.)
    pub page_cache_window_bytes: Option<u64>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 1 << 30,
            segment_ms: 7 * 24 * 3600 * 1000,
            index_interval_bytes: 4096,
            index_bytes_max: 10 << 20,
            batch_bytes_max: 1 << 20,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            retention_bytes: None,
            flush: FlushPolicy::IntervalMs(1000),
            page_cache_window_bytes: None,
        }
    }
}

impl LogConfig {
    /// Checks the settings against what the engine supports.
    ///
    /// # Errors
    ///
    /// [`StorageError::InvalidConfig`] naming the first bad setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(StorageError::InvalidConfig(msg));
        if self.segment_bytes < 1024 || self.segment_bytes > SEGMENT_BYTES_LIMIT {
            return bad(format!(
                "segment_bytes {} must be in [1024, {SEGMENT_BYTES_LIMIT}]",
                self.segment_bytes
            ));
        }
        if (self.batch_bytes_max as usize) < octolog_batch::BATCH_HEADER_BYTES
            || self.batch_bytes_max > SEGMENT_BYTES_LIMIT
        {
            return bad(format!(
                "batch_bytes_max {} must be in [{}, {SEGMENT_BYTES_LIMIT}]",
                self.batch_bytes_max,
                octolog_batch::BATCH_HEADER_BYTES
            ));
        }
        if self.index_bytes_max < 64 {
            return bad(format!(
                "index_bytes_max {} must be at least 64",
                self.index_bytes_max
            ));
        }
        if self.segment_ms == 0 {
            return bad("segment_ms must be greater than 0".to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_policy_parses_and_prints() {
        for (text, want) in [
            ("always", Some(FlushPolicy::Always)),
            ("never", Some(FlushPolicy::Never)),
            ("interval-ms=250", Some(FlushPolicy::IntervalMs(250))),
            ("interval-ms=0", None),
            ("interval-ms=", None),
            ("interval-ms=-1", None),
            ("sometimes", None),
            ("", None),
        ] {
            let got = text.parse::<FlushPolicy>().ok();
            assert_eq!(got, want, "parsing {text:?}");
            if let Some(policy) = got {
                assert_eq!(policy.to_string(), text);
            }
        }
    }

    #[test]
    fn config_validation_rejects_out_of_range_settings() {
        assert!(LogConfig::default().validate().is_ok());
        let cases: [fn(&mut LogConfig); 5] = [
            |c| c.segment_bytes = 10,
            |c| c.segment_bytes = u32::MAX,
            |c| c.batch_bytes_max = 10,
            |c| c.index_bytes_max = 8,
            |c| c.segment_ms = 0,
        ];
        for change in cases {
            let mut config = LogConfig::default();
            change(&mut config);
            assert!(matches!(
                config.validate(),
                Err(StorageError::InvalidConfig(_))
            ));
        }
    }
}
