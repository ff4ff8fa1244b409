//! Topics: names, their metadata file, and their partitions.
//!
//! A topic lives in `DATA_DIR/<topic>/`: `topic.meta` and one folder per partition
//! (`DATA_DIR/<topic>/<partition>/`, a storage `Log`). `topic.meta` is a first line
//! `octolog-topic 1 <crc32 of the rest, 8 hex digits>` followed by a JSON object
//! `{"name":..,"partitions":..,"retention_ms":..,"retention_bytes":..}`. It is written last when a
//! topic is created (atomically: temp file, fsync, rename, fsync of the folder), so a folder
//! without it is an unfinished creation and is removed on start-up. Deletion renames the folder
//! to `<topic>~deleted-<nanos>` (`~` cannot appear in a topic name) before removing it, so a crash
//! mid-way leaves nothing that looks like a topic.
//!
//! Partitions are opened (and recovered) and closed by up to `recovery_threads` threads at once
//! (`on_threads`): opening and closing a partition is mostly waiting for fsyncs, which the disk
//! serves side by side, so a topic of thousands of partitions does not wait for them one by one.
//!
//! Thread-safety: `Topic` is immutable after creation apart from its logs, which are themselves
//! thread-safe; the `appended` watch wakes fetches and subscriptions waiting for data.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::BrokerConfig;
use crate::error::{BrokerError, Result};
use crate::partition::Partition;

/// Longest topic name, as in Kafka.
pub const TOPIC_NAME_BYTES_MAX: usize = 249;
const META_FILE: &str = "topic.meta";
const META_MAGIC: &str = "octolog-topic 1";

/// Checks a topic name: 1-249 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
///
/// # Errors
///
/// `InvalidTopicName` saying which rule the name breaks.
pub fn validate_topic_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("a topic name must not be empty")
    } else if name.len() > TOPIC_NAME_BYTES_MAX {
        Some("a topic name must be at most 249 characters")
    } else if name == "." || name == ".." {
        Some("a topic name must not be '.' or '..'")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        Some("a topic name may only contain ASCII letters, digits, '.', '_' and '-'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(BrokerError::InvalidTopicName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// What a topic is created with and keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicSpec {
    /// The topic's name.
    pub name: String,
    /// Number of partitions, fixed at creation.
    pub partitions: u32,
    /// Retention by age for this topic; `None` uses the broker default, `-1` keeps forever.
    pub retention_ms: Option<i64>,
    /// Retention by size per partition; `None` uses the broker default, `-1` means no limit.
    pub retention_bytes: Option<i64>,
}

impl TopicSpec {
    fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("a TopicSpec always serialises");
        let mut out = format!("{META_MAGIC} {:08x}\n", crc32fast::hash(&json)).into_bytes();
        out.extend_from_slice(&json);
        out
    }

    fn decode(path: &Path, bytes: &[u8]) -> Result<TopicSpec> {
        let bad = |reason: String| BrokerError::Metadata {
            path: path.to_path_buf(),
            reason,
        };
        let newline = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| bad("no header line".into()))?;
        let header =
            std::str::from_utf8(&bytes[..newline]).map_err(|_| bad("header is not text".into()))?;
        let crc = header
            .strip_prefix(META_MAGIC)
            .and_then(|rest| u32::from_str_radix(rest.trim(), 16).ok())
            .ok_or_else(|| bad(format!("bad header line {header:?}")))?;
        let json = &bytes[newline + 1..];
        let computed = crc32fast::hash(json);
        if crc != computed {
            return Err(bad(format!(
                "checksum {crc:08x} does not match {computed:08x}"
            )));
        }
        serde_json::from_slice(json).map_err(|e| bad(e.to_string()))
    }
}

/// A topic and its open partitions.
#[derive(Debug)]
pub struct Topic {
    /// What the topic was created with.
    spec: TopicSpec,
    /// `DATA_DIR/<topic>`.
    dir: PathBuf,
    /// One per partition, index = partition number.
    partitions: Vec<Arc<Partition>>,
    /// Bumped after every append to any partition, to wake waiting fetches and subscriptions.
    appended: Arc<watch::Sender<u64>>,
}

impl Topic {
    /// Creates the topic's folder, partitions and metadata file.
    pub(crate) fn create(config: &BrokerConfig, spec: TopicSpec) -> Result<Topic> {
        let dir = config.data_dir.join(&spec.name);
        let meta = |e: std::io::Error| BrokerError::Metadata {
            path: dir.clone(),
            reason: e.to_string(),
        };
        if dir.exists() {
            // Left by a creation that did not finish (no metadata file), or a race lost.
            if dir.join(META_FILE).exists() {
                return Err(BrokerError::TopicExists { topic: spec.name });
            }
            fs::remove_dir_all(&dir).map_err(meta)?;
        }
        fs::create_dir_all(&dir).map_err(meta)?;
        let topic = Self::open_partitions(config, spec, dir)?;
        write_atomically(&topic.dir, META_FILE, &topic.spec.encode())?;
        sync_dir(&config.data_dir)?;
        Ok(topic)
    }

    /// Opens an existing topic folder; `Ok(None)` if it has no metadata file (an unfinished
    /// creation, which is removed).
    pub(crate) fn open(config: &BrokerConfig, dir: PathBuf) -> Result<Option<Topic>> {
        let path = dir.join(META_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(dir = %dir.display(), "removing topic folder without metadata (unfinished creation)");
                fs::remove_dir_all(&dir).map_err(|e| BrokerError::Metadata {
                    path: dir.clone(),
                    reason: e.to_string(),
                })?;
                return Ok(None);
            }
            Err(e) => {
                return Err(BrokerError::Metadata {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        let spec = TopicSpec::decode(&path, &bytes)?;
        let folder_name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if spec.name != folder_name {
            return Err(BrokerError::Metadata {
                path,
                reason: format!(
                    "names topic {:?} but sits in folder {folder_name:?}",
                    spec.name
                ),
            });
        }
        Self::open_partitions(config, spec, dir).map(Some)
    }

    fn open_partitions(config: &BrokerConfig, spec: TopicSpec, dir: PathBuf) -> Result<Topic> {
        let log_config = config.log_config(spec.retention_ms, spec.retention_bytes)?;
        let appended = Arc::new(watch::channel(0).0);
        let count = spec.partitions as usize;
        // After the first failure the other threads stop taking partitions: the topic cannot
        // open anyway, and what was opened is closed again when dropped.
        let failed = AtomicBool::new(false);
        let opened = on_threads(count, config.recovery_threads, |index| {
            if failed.load(Ordering::Relaxed) {
                return None;
            }
            let id = index as u32;
            let partition = Partition::open(
                &spec.name,
                id,
                &dir.join(id.to_string()),
                log_config.clone(),
                Arc::clone(&appended),
            );
            if partition.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            Some(partition.map(Arc::new))
        });
        let mut partitions = Vec::with_capacity(count);
        let mut first_error = None;
        for partition in opened.into_iter().flatten() {
            match partition {
                Ok(partition) => partitions.push(partition),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        assert!(partitions.len() == count);
        Ok(Topic {
            spec,
            dir,
            partitions,
            appended,
        })
    }

    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// What the topic was created with.
    pub fn spec(&self) -> &TopicSpec {
        &self.spec
    }

    /// How many partitions the topic has.
    pub fn partition_count(&self) -> u32 {
        self.partitions.len() as u32
    }

    /// All partitions, index = partition number.
    pub fn partitions(&self) -> &[Arc<Partition>] {
        &self.partitions
    }

    /// Partition `id`.
    ///
    /// # Errors
    ///
    /// `UnknownPartition` if the topic has no such partition.
    pub fn partition(&self, id: u32) -> Result<&Arc<Partition>> {
        self.partitions
            .get(id as usize)
            .ok_or_else(|| BrokerError::UnknownPartition {
                topic: self.spec.name.clone(),
                partition: id,
                partition_count: self.partition_count(),
            })
    }

    /// A receiver that sees a change after every append to the topic.
    pub fn watch_appends(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// Wakes everyone waiting for data on this topic.
    pub(crate) fn notify_appended(&self) {
        self.appended.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Closes every partition log cleanly, on up to `threads` threads.
    ///
    /// # Errors
    ///
    /// The error of the lowest-numbered partition that failed; every partition is still tried.
    pub(crate) fn close(&self, threads: usize) -> Result<()> {
        on_threads(self.partitions.len(), threads, |index| {
            let partition = &self.partitions[index];
            let closed = partition.close();
            if let Err(e) = &closed {
                tracing::error!(topic = self.name(), partition = partition.id(), error = %e, "closing partition failed");
            }
            closed
        })
        .into_iter()
        .collect()
    }

    /// Removes the topic's files: renames the folder out of the way, then deletes it.
    pub(crate) fn delete_files(&self) -> Result<()> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let parent = self.dir.parent().unwrap_or(Path::new("."));
        let graveyard = parent.join(format!("{}~deleted-{nanos}", self.spec.name));
        let meta = |e: std::io::Error| BrokerError::Metadata {
            path: self.dir.clone(),
            reason: e.to_string(),
        };
        fs::rename(&self.dir, &graveyard).map_err(meta)?;
        sync_dir(parent)?;
        fs::remove_dir_all(&graveyard).map_err(meta)
    }
}

/// Runs `work(index)` for every index in `0..count` on up to `threads` threads (the caller's
/// own when one is enough), and returns the results in index order. Blocking: meant for file
/// work, each call of `work` being independent of the others.
///
/// # Panics
///
/// If `threads` is 0, or `work` panics.
pub(crate) fn on_threads<T: Send>(
    count: usize,
    threads: usize,
    work: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
    assert!(threads > 0);
    let threads = threads.min(count);
    if threads <= 1 {
        return (0..count).map(work).collect();
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<T>>> = Mutex::new((0..count).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count {
                    return;
                }
                let result = work(index);
                results.lock().unwrap_or_else(|e| e.into_inner())[index] = Some(result);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|result| result.expect("every index was worked on"))
        .collect()
}

/// Writes `bytes` to `dir/name` atomically: temp file, fsync, rename, fsync of the folder.
pub(crate) fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let fail = |e: std::io::Error| BrokerError::Metadata {
        path: path.clone(),
        reason: e.to_string(),
    };
    let mut file = fs::File::create(&tmp).map_err(fail)?;
    file.write_all(bytes).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    drop(file);
    fs::rename(&tmp, &path).map_err(fail)?;
    sync_dir(dir)
}

/// Makes a folder's entries durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| BrokerError::Metadata {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_the_rules() {
        for good in ["a", "gateway.jobs.gromacs", "A-b_c.9", &"x".repeat(249)] {
            assert!(validate_topic_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "has space",
            "slash/y",
            "star*",
            "ü",
            "tilde~",
            &"x".repeat(250),
        ] {
            let err = validate_topic_name(bad).unwrap_err();
            assert!(matches!(err, BrokerError::InvalidTopicName { .. }), "{bad}");
        }
    }

    #[test]
    fn on_threads_works_every_index_once_in_order() {
        for (count, threads) in [(0, 1), (1, 8), (5, 1), (100, 3), (1000, 8), (3, 64)] {
            let calls = AtomicUsize::new(0);
            let results = on_threads(count, threads, |index| {
                calls.fetch_add(1, Ordering::Relaxed);
                index * 2
            });
            assert_eq!(calls.load(Ordering::Relaxed), count);
            assert_eq!(
                results,
                (0..count).map(|i| i * 2).collect::<Vec<_>>(),
                "{count} on {threads}"
            );
        }
    }

    /// Guards that partitions opened on several threads come back in partition order, and that
    /// a partition that cannot be opened fails the whole topic, naming the partition.
    #[test]
    fn partitions_open_in_parallel_in_order_and_one_failure_fails_the_topic() {
        let dir = tempfile::tempdir().unwrap();
        let config = BrokerConfig {
            data_dir: dir.path().to_path_buf(),
            recovery_threads: 4,
            ..BrokerConfig::default()
        };
        let spec = TopicSpec {
            name: "jobs".into(),
            partitions: 50,
            retention_ms: None,
            retention_bytes: None,
        };
        let topic = Topic::create(&config, spec.clone()).unwrap();
        let ids: Vec<u32> = topic.partitions().iter().map(|p| p.id()).collect();
        assert_eq!(ids, (0..50).collect::<Vec<_>>());
        topic.close(config.recovery_threads).unwrap();
        drop(topic);

        let topic = Topic::open(&config, dir.path().join("jobs"))
            .unwrap()
            .unwrap();
        assert_eq!(topic.partition_count(), 50);
        for partition in topic.partitions() {
            assert!(partition.log().open_report().clean_shutdown);
        }
        drop(topic);

        // Partition 37's folder replaced by a file: its log cannot open.
        let broken = dir.path().join("jobs").join("37");
        fs::remove_dir_all(&broken).unwrap();
        fs::write(&broken, b"not a folder").unwrap();
        match Topic::open(&config, dir.path().join("jobs")) {
            Err(BrokerError::Storage { partition, .. }) => assert_eq!(partition, 37),
            other => panic!("expected a storage error of partition 37, got {other:?}"),
        }
    }

    #[test]
    fn metadata_round_trips_and_rejects_damage() {
        let spec = TopicSpec {
            name: "jobs".into(),
            partitions: 3,
            retention_ms: Some(-1),
            retention_bytes: None,
        };
        let bytes = spec.encode();
        let path = Path::new("topic.meta");
        assert_eq!(TopicSpec::decode(path, &bytes).unwrap(), spec);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(TopicSpec::decode(path, &bad).is_err(), "flip at {i}");
        }
        assert!(TopicSpec::decode(path, &bytes[..bytes.len() - 1]).is_err());
        assert!(TopicSpec::decode(path, b"").is_err());
    }
}
