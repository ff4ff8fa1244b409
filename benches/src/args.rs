//! The flags of `octolog-bench` (INTERFACE.md, section `octolog-bench`) and their checks.
//!
//! Sizes accept a plain byte count or a suffix: `k`/`KB`, `M`/`MB`, `G`/`GB` are powers of 10;
//! `KiB`, `MiB`, `GiB` are powers of 2. Rates are in MB/s, where 1 MB = 10^6 bytes.

use std::time::Duration;

use clap::Parser;
use octolog_broker::{BrokerConfig, BrokerError};

/// Bytes at the start of every record's value that the tool uses itself: the send time (u64
/// nanoseconds since the Unix epoch, little-endian) and the record's index in its producer's
/// sequence (u64, little-endian). The rest of the value is filler.
pub const MESSAGE_HEADER_BYTES: usize = 16;

/// Slack left between a producer batch and the broker's `batch_bytes_max`: a batch is closed only
/// once it reaches `batch_bytes`, so it may exceed it by one record plus framing.
const BATCH_FRAMING_BYTES: usize = 4096;

/// Most producers or consumers: each is a task with its own buffers.
pub const TASKS_MAX: usize = 1024;
/// Largest `--linger-ms`: a minute.
pub const LINGER_MS_MAX: u64 = 60_000;
/// Largest `--in-flight`: more only buys memory (an idempotent producer keeps at most 5 batches
/// of a partition in flight anyway).
pub const IN_FLIGHT_MAX: usize = 100;

/// The command line, as typed.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "octolog-bench",
    about = "Measures Octolog's produce and consume throughput (MB = 10^6 bytes) and end-to-end latency"
)]
pub struct Args {
    /// Broker to measure (HOST:PORT). Default: start one in-process on a temporary data dir.
    #[arg(long, value_name = "HOST:PORT")]
    pub broker: Option<String>,
    /// Concurrent producers; they share `--total-bytes`.
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Concurrent consumers; each reads a fixed share of the partitions, or with --group the
    /// share the group gives it.
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// Consumers join consumer group NAME on the bench topic (the broker shares the partitions
    /// among them, and they commit what they read) instead of each being assigned a fixed share.
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// Partitions of the fresh topic.
    #[arg(long, default_value_t = 8)]
    pub partitions: u32,
    /// Size of each record's value, at least 16 (the send time and a sequence number).
    #[arg(long, default_value = "1024", value_parser = parse_bytes)]
    pub message_bytes: u64,
    /// Records per producer batch: batch_bytes = message_bytes * batch_records.
    #[arg(long, default_value_t = 256)]
    pub batch_records: u64,
    /// Bytes of record values to send in total (e.g. 1GiB, 300MB, 2000000).
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub total_bytes: u64,
    /// Flush policy of the in-process broker: always, never or interval-ms=N. Default never.
    /// Ignored with --broker (the broker's own setting applies).
    #[arg(long, value_name = "POLICY")]
    pub fsync: Option<String>,
    /// Page cache window of the in-process broker (its `page_cache_window_bytes`): after each
    /// flush, partition bytes on disk more than this far behind the log end are dropped from
    /// the page cache; `off` leaves the page cache to the kernel, as Kafka does. Default: the
    /// broker's default (256 MiB). Ignored with --broker.
    #[arg(long, value_name = "BYTES|off", value_parser = parse_window)]
    pub page_cache_window: Option<Window>,
    /// Pace producers to this many MB/s in total (MB = 10^6 bytes). Default: as fast as possible.
    #[arg(long, value_name = "MB_PER_S")]
    pub rate: Option<f64>,
    /// How long a producer batch waits for more records before it is sent (the producer's
    /// `linger`; Kafka's `linger.ms`), at most 60000. 0 sends a batch as soon as its partition
    /// may send another request (see --in-flight): the setting for latency at moderate load.
    #[arg(long, default_value_t = 5)]
    pub linger_ms: u64,
    /// Most produce requests in flight per partition (the producer's `in_flight_max`; Kafka's
    /// `max.in.flight.requests.per.connection`), 1 to 100.
    #[arg(long, default_value_t = 5)]
    pub in_flight: usize,
    /// Bytes at the start of the run left out of the latency figures (split evenly over the
    /// producers). Default: 10% of --total-bytes.
    #[arg(long, value_parser = parse_bytes)]
    pub warmup_bytes: Option<u64>,
    /// Topic to create. Default: bench-<pid>-<nanos>.
    #[arg(long, value_name = "NAME")]
    pub topic: Option<String>,
    /// Consumers receive records pushed by the broker over a `Subscribe` stream instead of
    /// long-polling fetches (the consumer's `push`; not with --group, whose members fetch).
    #[arg(long)]
    pub push: bool,
    /// Produce first and consume afterwards: the consumers start once every record is
    /// acknowledged and read the whole topic from the beginning, so produce throughput and
    /// consume (replay) throughput are each measured with the machine to themselves, as Kafka's
    /// producer and consumer performance tools do. End-to-end latency is then not measured.
    #[arg(long)]
    pub replay: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A checked plan for one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Broker to talk to; `None` starts one in-process.
    pub broker: Option<String>,
    /// Flush policy of the in-process broker (unused with `broker`).
    pub fsync: String,
    /// Page cache window of the in-process broker (unused with `broker`).
    pub page_cache_window: Option<u64>,
    /// Number of producer tasks.
    pub producers: usize,
    /// Number of consumer tasks.
    pub consumers: usize,
    /// Consumer group the consumers join; `None` assigns each a fixed share of the partitions.
    pub group: Option<String>,
    /// Partitions of the topic.
    pub partitions: u32,
    /// Bytes of each record's value.
    pub message_bytes: usize,
    /// Producer `batch_bytes`.
    pub batch_bytes: usize,
    /// Records per producer, indexed by producer; they add up to `records`.
    pub producer_records: Vec<u64>,
    /// Records in total: `total_bytes / message_bytes`.
    pub records: u64,
    /// Leading records of each producer left out of the latency histogram.
    pub warmup_records_per_producer: u64,
    /// Total pacing rate in bytes per second, if paced.
    pub rate_bytes_per_s: Option<f64>,
    /// The producers' linger.
    pub linger: Duration,
    /// The producers' `in_flight_max`.
    pub in_flight: usize,
    /// Topic name.
    pub topic: String,
    /// Consumers are pushed records instead of fetching them (`--push`).
    pub push: bool,
    /// Consumers start only after every record is acknowledged (`--replay`).
    pub replay: bool,
    /// JSON output.
    pub json: bool,
}

impl Plan {
    /// Bytes of record values sent in total.
    pub fn bytes(&self) -> u64 {
        self.records * self.message_bytes as u64
    }
}

/// A `--page-cache-window`: a size, or `None` for `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window(pub Option<u64>);

/// Parses `--page-cache-window`: `off`, or a size as [`parse_bytes`] takes it.
///
/// # Errors
///
/// A message naming the text, if it is neither.
pub fn parse_window(text: &str) -> Result<Window, String> {
    if text.trim() == "off" {
        return Ok(Window(None));
    }
    parse_bytes(text).map(|bytes| Window(Some(bytes)))
}

/// The in-process broker's page cache window when `--page-cache-window` is not given: the
/// broker's own default.
fn default_window() -> Option<u64> {
    u64::try_from(BrokerConfig::default().page_cache_window_bytes).ok()
}

/// Parses a size: a byte count, optionally with a decimal (`k`, `KB`, `M`, `MB`, `G`, `GB`) or
/// binary (`KiB`, `MiB`, `GiB`) suffix.
///
/// # Errors
///
/// A message for anything else, or a size that does not fit in a u64.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(digits_end);
    let multiplier: u64 = match suffix.trim() {
        "" | "B" => 1,
        "k" | "K" | "kB" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size suffix {other:?}: use a byte count, KB, MB, GB, KiB, MiB or GiB"
            ))
        }
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 1024, 300MB, 1GiB)"))?;
    value
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?} is too large"))
}

impl Args {
    /// Checks the flags together and works out the plan.
    ///
    /// # Errors
    ///
    /// A message naming the first bad flag (a usage error: exit status 2).
    pub fn plan(&self) -> Result<Plan, String> {
        if self.producers == 0 || self.producers > TASKS_MAX {
            return Err(format!("--producers must be in 1..={TASKS_MAX}"));
        }
        if let Some(group) = &self.group {
            // Checked here rather than by the broker so that a bad name is a usage error.
            octolog_broker::group::validate_group_name(group).map_err(|e| match e {
                BrokerError::InvalidRequest(message) => format!("--group: {message}"),
                other => format!("--group: {other}"),
            })?;
            if self.consumers == 0 {
                return Err("--group needs at least one consumer (--consumers 1 or more)".into());
            }
            if self.push {
                return Err(
                    "--push cannot be combined with --group: group members fetch their records"
                        .into(),
                );
            }
        }
        if self.consumers == 0 || self.consumers > TASKS_MAX {
            return Err(format!("--consumers must be in 1..={TASKS_MAX}"));
        }
        let partitions_max = BrokerConfig::default().partitions_max;
        if self.partitions == 0 || self.partitions > partitions_max {
            return Err(format!("--partitions must be in 1..={partitions_max}"));
        }
        if self.consumers > self.partitions as usize {
            return Err(format!(
                "--consumers ({}) must not exceed --partitions ({}): each consumer reads whole partitions",
                self.consumers, self.partitions
            ));
        }
        let batch_bytes_max = BrokerConfig::default().batch_bytes_max as u64;
        if self.message_bytes < MESSAGE_HEADER_BYTES as u64 {
            return Err(format!(
                "--message-bytes must be at least {MESSAGE_HEADER_BYTES} (send time and sequence number)"
            ));
        }
        if self.batch_records == 0 {
            return Err("--batch-records must be positive".into());
        }
        let batch_bytes = self.message_bytes.saturating_mul(self.batch_records);
        let batch_limit = batch_bytes_max - BATCH_FRAMING_BYTES as u64;
        if batch_bytes.saturating_add(self.message_bytes) > batch_limit {
            return Err(format!(
                "--message-bytes * (--batch-records + 1) must stay below {batch_limit} bytes, the broker's default batch_bytes_max less framing"
            ));
        }
        let records = self.total_bytes / self.message_bytes;
        if records < self.producers as u64 {
            return Err(format!(
                "--total-bytes must hold at least one --message-bytes record per producer ({} records for {} producers)",
                records, self.producers
            ));
        }
        let fsync = self.fsync.clone().unwrap_or_else(|| "never".to_string());
        let config = BrokerConfig {
            fsync: fsync.clone(),
            ..BrokerConfig::default()
        };
        config.flush_policy().map_err(|e| format!("--fsync: {e}"))?;
        let rate_bytes_per_s = match self.rate {
            None => None,
            Some(r) if r.is_finite() && r > 0.0 => Some(r * 1e6),
            Some(r) => return Err(format!("--rate must be a positive number of MB/s, not {r}")),
        };
        if self.linger_ms > LINGER_MS_MAX {
            return Err(format!("--linger-ms must be at most {LINGER_MS_MAX}"));
        }
        if !(1..=IN_FLIGHT_MAX).contains(&self.in_flight) {
            return Err(format!("--in-flight must be in 1..={IN_FLIGHT_MAX}"));
        }
        let warmup_bytes = self.warmup_bytes.unwrap_or(self.total_bytes / 10);
        if warmup_bytes >= self.total_bytes {
            return Err("--warmup-bytes must be smaller than --total-bytes".into());
        }
        let producers = self.producers as u64;
        let producer_records = (0..producers)
            .map(|i| records / producers + u64::from(i < records % producers))
            .collect();
        let warmup_records_per_producer = warmup_bytes / self.message_bytes / producers;
        let topic = match &self.topic {
            Some(t) => t.clone(),
            None => default_topic(),
        };
        Ok(Plan {
            broker: self.broker.clone(),
            fsync,
            page_cache_window: self
                .page_cache_window
                .map_or_else(default_window, |window| window.0),
            producers: self.producers,
            consumers: self.consumers,
            group: self.group.clone(),
            partitions: self.partitions,
            message_bytes: self.message_bytes as usize,
            batch_bytes: batch_bytes as usize,
            producer_records,
            records,
            warmup_records_per_producer,
            rate_bytes_per_s,
            linger: Duration::from_millis(self.linger_ms),
            in_flight: self.in_flight,
            topic,
            push: self.push,
            replay: self.replay,
            json: self.json,
        })
    }
}

/// `bench-<pid>-<nanos since the epoch>`: fresh for every run.
fn default_topic() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("bench-{}-{nanos}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Result<Plan, String> {
        let argv = std::iter::once("octolog-bench").chain(args.iter().copied());
        Args::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .plan()
    }

    #[test]
    fn sizes_parse_with_decimal_and_binary_suffixes() {
        let check = |text: &str, expected: Option<u64>| {
            assert_eq!(parse_bytes(text).ok(), expected, "{text}");
        };
        check("2000000", Some(2_000_000));
        check("1GiB", Some(1 << 30));
        check("300MB", Some(300_000_000));
        check("4 KiB", Some(4096));
        check("1k", Some(1000));
        check("1TB", None);
        check("MB", None);
        check("-5", None);
        check("99999999999999999999GiB", None);
    }

    #[test]
    fn defaults_follow_the_interface() {
        let p = plan(&[]).unwrap();
        assert_eq!(p.producers, 1);
        assert_eq!(p.consumers, 1);
        assert_eq!(p.partitions, 8);
        assert_eq!(p.message_bytes, 1024);
        assert_eq!(p.batch_bytes, 1024 * 256);
        assert_eq!(p.records, (1 << 30) / 1024);
        assert_eq!(p.fsync, "never");
        assert_eq!(p.warmup_records_per_producer, p.records / 10);
        assert!(p.topic.starts_with("bench-"));
        assert_eq!(p.rate_bytes_per_s, None);
        assert_eq!(p.linger, Duration::from_millis(5));
        assert_eq!(p.group, None);
        assert!(!p.replay);
        assert!(plan(&["--replay"]).unwrap().replay);
        assert!(!p.push);
        assert!(plan(&["--push"]).unwrap().push);
        assert_eq!(p.page_cache_window, Some(256 << 20));
        assert_eq!(
            plan(&["--page-cache-window", "64MiB"])
                .unwrap()
                .page_cache_window,
            Some(64 << 20)
        );
        assert_eq!(
            plan(&["--page-cache-window", "off"])
                .unwrap()
                .page_cache_window,
            None
        );
        assert!(plan(&["--page-cache-window", "sometimes"]).is_err());
    }

    #[test]
    fn producers_split_the_records_exactly() {
        let p = plan(&[
            "--total-bytes",
            "10240",
            "--producers",
            "3",
            "--message-bytes",
            "1024",
        ])
        .unwrap();
        assert_eq!(p.records, 10);
        assert_eq!(p.producer_records, vec![4, 3, 3]);
        assert_eq!(p.producer_records.iter().sum::<u64>(), p.records);
        assert_eq!(p.bytes(), 10240);
    }

    #[test]
    fn bad_flags_are_rejected() {
        let bad: &[&[&str]] = &[
            &["--producers", "0"],
            &["--consumers", "9", "--partitions", "8"],
            &["--partitions", "0"],
            &["--message-bytes", "8"],
            &["--batch-records", "0"],
            &["--message-bytes", "1MiB"],
            &["--fsync", "sometimes"],
            &["--in-flight", "0"],
            &["--in-flight", "101"],
            &["--rate", "0"],
            &["--linger-ms", "60001"],
            &["--linger-ms", "-1"],
            &["--rate", "fast"],
            &["--total-bytes", "100", "--message-bytes", "1024"],
            &["--warmup-bytes", "2GiB"],
            &["--unknown"],
            &["--group", ""],
            &["--group", "no spaces"],
            &["--group", "g", "--consumers", "0"],
            &["--group", "g", "--consumers", "9", "--partitions", "8"],
            &["--group", "g", "--push"],
        ];
        for args in bad {
            assert!(plan(args).is_err(), "{args:?} was accepted");
        }
        assert_eq!(
            plan(&["--rate", "50"]).unwrap().rate_bytes_per_s,
            Some(50e6)
        );
        assert_eq!(
            plan(&["--group", "bench", "--consumers", "2"])
                .unwrap()
                .group,
            Some("bench".to_string())
        );
        let message = plan(&["--group", "g", "--consumers", "0"]).unwrap_err();
        assert!(
            message.contains("--group needs at least one consumer"),
            "{message}"
        );
        let message = plan(&["--group", ""]).unwrap_err();
        assert!(
            message.starts_with("--group: invalid group name"),
            "{message}"
        );
    }
}
