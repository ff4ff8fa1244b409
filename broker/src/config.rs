//! Broker settings: defaults, a TOML file, then flags and environment (flags win over the file).
//!
//! The TOML file uses the field names of [`BrokerConfig`], for example:
//!
//! ```toml
//! data_dir = "/var/lib/octolog"
//! listen = "0.0.0.0:7171"
//! fsync = "interval-ms=1000"
//! segment_bytes = 1073741824
//! retention_ms = 604800000
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use octolog_storage::{FlushPolicy, LogConfig};
use serde::Deserialize;

use crate::error::{BrokerError, Result};

/// Everything the broker can be told. Every limit is a named setting with a default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Where topics live. Default `./octolog-data`.
    pub data_dir: PathBuf,
    /// Address to listen on. Default `127.0.0.1:7171`.
    pub listen: SocketAddr,
    /// Flush policy of every partition log: `always`, `never` or `interval-ms=N`.
    /// Default `interval-ms=1000`.
    pub fsync: String,
    /// Segment size before a roll. Default 1 GiB.
    pub segment_bytes: u32,
    /// Default retention by age for topics that do not set one; `-1` keeps forever.
    /// Default 7 days.
    pub retention_ms: i64,
    /// Default retention by size per partition; `-1` for no limit. Default `-1`.
    pub retention_bytes: i64,
    /// After each flush, a partition's bytes on disk more than this many bytes behind its log
    /// end are dropped from the page cache (consumers further behind then read the disk); `-1`
    /// leaves the page cache to the kernel, as Kafka does. Default
    /// [`PAGE_CACHE_WINDOW_BYTES_DEFAULT`] (256 MiB). See `LogConfig::page_cache_window_bytes`.
    pub page_cache_window_bytes: i64,
    /// Partitions of a topic created without a count. Default 1.
    pub default_partitions: u32,
    /// Most partitions one topic may have. Default 10,000.
    pub partitions_max: u32,
    /// Largest record batch a producer may send. Default 1 MiB.
    pub batch_bytes_max: u32,
    /// Largest gRPC request the broker decodes. Default 16 MiB.
    pub request_bytes_max: usize,
    /// Largest fetch response, and the cap on what one fetch may ask for. Default 16 MiB.
    pub fetch_bytes_max: u32,
    /// Longest a fetch may wait for data (long poll). Default 30,000 ms.
    pub fetch_wait_ms_max: u32,
    /// Most fetches waiting for data at once; further fetches answer at once. Default 10,000.
    pub fetch_waiters_max: usize,
    /// Most open client connections; further clients wait to be accepted. Default 1,024.
    pub connections_max: usize,
    /// Most concurrent push subscriptions. Default 1,024.
    pub subscriptions_max: usize,
    /// How often to check retention. Default 60,000 ms.
    pub retention_check_interval_ms: u64,
    /// How long shutdown waits for open requests and streams (a client that stopped reading)
    /// before dropping their connections. Default 10,000 ms.
    pub shutdown_grace_ms: u64,
    /// Consumer groups: session timeout of a member that does not ask for one. Default 10,000 ms.
    pub group_session_timeout_ms: u32,
    /// Consumer groups: shortest session timeout a member may ask for. Default 100 ms.
    pub group_session_timeout_ms_min: u32,
    /// Consumer groups: longest session timeout (and rebalance timeout) a member may ask for.
    /// Default 300,000 ms.
    pub group_session_timeout_ms_max: u32,
    /// Consumer groups: how long a member may take to release partitions it was asked to give
    /// up, for a member that does not ask for a time. Default 30,000 ms.
    pub group_rebalance_timeout_ms: u32,
    /// Most members of one group. Default 1,000.
    pub group_members_max: usize,
    /// Most groups with members at once. Default 10,000.
    pub groups_max: usize,
    /// Threads that open partition logs (recovering them) at start-up and topic creation, and
    /// close them (flushing) at shutdown, as Kafka's `num.recovery.threads.per.data.dir`. The
    /// work is mostly waiting for fsyncs, which a disk serves side by side, so a 10,000-partition
    /// topic opens and closes several times faster than one partition after the other.
    /// Default 8; 1 ..= `RECOVERY_THREADS_MAX`.
    pub recovery_threads: usize,
}

/// Largest `recovery_threads`.
pub const RECOVERY_THREADS_MAX: usize = 256;

/// Default of `page_cache_window_bytes`: the newest 256 MiB of each partition stay in the page
/// cache (once flushed) for as long as the kernel keeps them; older flushed bytes leave it.
///
/// Why not leave it all to the kernel, as Kafka does: a log that outgrows memory makes the
/// kernel reclaim page cache it has filled, and a freshly written page then costs a fresh page
/// from the allocator. On virtual machines that hand free memory back to their host (free page
/// reporting, a balloon, DAMON reclaim) that fresh page is a host fault: a sustained 20 GiB run
/// went at 275-333 MB/s without the window and 484-586 MB/s with it on the same machine
/// (`BENCHMARKS.md`). Bytes the log drops itself are reused at once, and the page cache a busy
/// partition holds stays bounded (per partition: thousands of partitions are still bounded
/// only by the kernel). The price: a consumer more than 256 MiB behind the end of
/// its partition reads from disk (sequentially, with read-ahead); 256 MiB of 1 KiB records is a
/// quarter of a million records per partition.
pub const PAGE_CACHE_WINDOW_BYTES_DEFAULT: i64 = 256 << 20;

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            data_dir: PathBuf::from("octolog-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7171)),
            fsync: "interval-ms=1000".to_string(),
            segment_bytes: 1 << 30,
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            page_cache_window_bytes: PAGE_CACHE_WINDOW_BYTES_DEFAULT,
            default_partitions: 1,
            partitions_max: 10_000,
            batch_bytes_max: 1 << 20,
            request_bytes_max: 16 << 20,
            fetch_bytes_max: 16 << 20,
            fetch_wait_ms_max: 30_000,
            fetch_waiters_max: 10_000,
            connections_max: 1024,
            subscriptions_max: 1024,
            retention_check_interval_ms: 60_000,
            shutdown_grace_ms: 10_000,
            group_session_timeout_ms: 10_000,
            group_session_timeout_ms_min: 100,
            group_session_timeout_ms_max: 300_000,
            group_rebalance_timeout_ms: 30_000,
            group_members_max: 1000,
            groups_max: 10_000,
            recovery_threads: 8,
        }
    }
}

impl BrokerConfig {
    /// Reads a TOML file; fields it does not set keep their defaults.
    ///
    /// # Errors
    ///
    /// `Config` if the file cannot be read or has unknown or ill-typed fields.
    pub fn from_file(path: &Path) -> Result<BrokerConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| BrokerError::Config(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text)
            .map_err(|e| BrokerError::Config(format!("{}: {}", path.display(), e.message())))
    }

    /// The flush policy, parsed.
    ///
    /// # Errors
    ///
    /// `Config` if `fsync` is not a policy.
    pub fn flush_policy(&self) -> Result<FlushPolicy> {
        self.fsync
            .parse()
            .map_err(|e: octolog_storage::StorageError| BrokerError::Config(e.to_string()))
    }

    /// The log settings of a partition of a topic with these retention overrides.
    ///
    /// # Errors
    ///
    /// `Config` if the result is not a valid log config.
    pub fn log_config(
        &self,
        retention_ms: Option<i64>,
        retention_bytes: Option<i64>,
    ) -> Result<LogConfig> {
        let positive = |v: i64| u64::try_from(v).ok();
        let config = LogConfig {
            segment_bytes: self.segment_bytes,
            batch_bytes_max: self.batch_bytes_max,
            retention_ms: positive(retention_ms.unwrap_or(self.retention_ms)),
            retention_bytes: positive(retention_bytes.unwrap_or(self.retention_bytes)),
            flush: self.flush_policy()?,
            page_cache_window_bytes: positive(self.page_cache_window_bytes),
            ..LogConfig::default()
        };
        config
            .validate()
            .map_err(|e| BrokerError::Config(e.to_string()))?;
        Ok(config)
    }

    /// Checks every setting.
    ///
    /// # Errors
    ///
    /// `Config` naming the first bad setting.
    pub fn validate(&self) -> Result<()> {
        self.log_config(None, None)?;
        let bad = |msg: &str| Err(BrokerError::Config(msg.to_string()));
        if self.default_partitions == 0 || self.default_partitions > self.partitions_max {
            return bad("default_partitions must be in 1..=partitions_max");
        }
        if self.request_bytes_max < self.batch_bytes_max as usize + 1024 {
            return bad("request_bytes_max must exceed batch_bytes_max by at least 1 KiB");
        }
        if self.fetch_bytes_max == 0 || self.connections_max == 0 || self.subscriptions_max == 0 {
            return bad("fetch_bytes_max, connections_max and subscriptions_max must be positive");
        }
        if self.retention_check_interval_ms == 0 {
            return bad("retention_check_interval_ms must be positive");
        }
        if self.page_cache_window_bytes < -1 {
            return bad("page_cache_window_bytes must be -1 (off) or at least 0");
        }
        if self.group_session_timeout_ms_min == 0
            || self.group_session_timeout_ms_min > self.group_session_timeout_ms_max
            || !(self.group_session_timeout_ms_min..=self.group_session_timeout_ms_max)
                .contains(&self.group_session_timeout_ms)
            || !(self.group_session_timeout_ms_min..=self.group_session_timeout_ms_max)
                .contains(&self.group_rebalance_timeout_ms)
        {
            return bad("group session and rebalance timeouts must lie in 1..=group_session_timeout_ms_max, within group_session_timeout_ms_min..=group_session_timeout_ms_max");
        }
        if self.group_members_max == 0 || self.groups_max == 0 {
            return bad("group_members_max and groups_max must be positive");
        }
        if !(1..=RECOVERY_THREADS_MAX).contains(&self.recovery_threads) {
            return bad(&format!(
                "recovery_threads must be in 1..={RECOVERY_THREADS_MAX}"
            ));
        }
        Ok(())
    }

    /// The settings of consumer groups.
    pub fn group_config(&self) -> crate::group::GroupConfig {
        crate::group::GroupConfig {
            session_timeout_ms_default: self.group_session_timeout_ms,
            session_timeout_ms_min: self.group_session_timeout_ms_min,
            session_timeout_ms_max: self.group_session_timeout_ms_max,
            rebalance_timeout_ms_default: self.group_rebalance_timeout_ms,
            members_max: self.group_members_max,
            groups_max: self.groups_max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_sets_fields_and_rejects_unknown_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("octolog.toml");
        std::fs::write(&path, "fsync = \"always\"\nsegment_bytes = 4096\n").unwrap();
        let config = BrokerConfig::from_file(&path).unwrap();
        assert_eq!(config.flush_policy().unwrap(), FlushPolicy::Always);
        assert_eq!(config.segment_bytes, 4096);
        assert_eq!(config.listen, BrokerConfig::default().listen);

        std::fs::write(&path, "fsink = \"always\"\n").unwrap();
        let err = BrokerConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("fsink"), "{err}");
        assert!(BrokerConfig::from_file(&dir.path().join("missing.toml")).is_err());
    }

    #[test]
    fn validation_catches_bad_settings() {
        assert!(BrokerConfig::default().validate().is_ok());
        let bad = [
            BrokerConfig {
                fsync: "sometimes".into(),
                ..BrokerConfig::default()
            },
            BrokerConfig {
                segment_bytes: 1,
                ..BrokerConfig::default()
            },
            BrokerConfig {
                default_partitions: 0,
                ..BrokerConfig::default()
            },
            BrokerConfig {
                request_bytes_max: 10,
                ..BrokerConfig::default()
            },
            BrokerConfig {
                recovery_threads: 0,
                ..BrokerConfig::default()
            },
            BrokerConfig {
                recovery_threads: RECOVERY_THREADS_MAX + 1,
                ..BrokerConfig::default()
            },
            BrokerConfig {
                page_cache_window_bytes: -2,
                ..BrokerConfig::default()
            },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?}");
        }
    }

    #[test]
    fn topic_overrides_and_minus_one_mean_forever() {
        let config = BrokerConfig::default();
        let log = config.log_config(Some(-1), Some(5000)).unwrap();
        assert_eq!(log.retention_ms, None);
        assert_eq!(log.retention_bytes, Some(5000));
        let log = config.log_config(None, None).unwrap();
        assert_eq!(log.retention_ms, Some(7 * 24 * 3600 * 1000));
        assert_eq!(log.retention_bytes, None);
    }

    #[test]
    fn page_cache_window_reaches_the_logs_and_minus_one_leaves_the_cache_alone() {
        let config: BrokerConfig = toml::from_str("page_cache_window_bytes = 67108864").unwrap();
        let log = config.log_config(None, None).unwrap();
        assert_eq!(log.page_cache_window_bytes, Some(64 << 20));
        let config: BrokerConfig = toml::from_str("page_cache_window_bytes = -1").unwrap();
        let log = config.log_config(None, None).unwrap();
        assert_eq!(log.page_cache_window_bytes, None);
        // A file that does not name it gets the default.
        let config: BrokerConfig = toml::from_str("fsync = \"never\"").unwrap();
        let log = config.log_config(None, None).unwrap();
        assert_eq!(log.page_cache_window_bytes, Some(256 << 20));
        let log = BrokerConfig::default().log_config(None, None).unwrap();
        assert_eq!(log.page_cache_window_bytes, Some(256 << 20));
    }
}
