//! The `octolog` command line (contract: `../shared/INTERFACE.md`): `serve`, and the commands
//! that talk to a broker through `octolog-client`.
//!
//! Exit status 0 on success; on failure one line `error: ...` on stderr and status 1, or 2 for
//! bad usage.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use octolog_client::{
    Client, ConsumerRecord, Offset, OffsetSpec, ProducerRecord, StartAt, TopicOptions,
};
use serde::Serialize;
use serde_json::json;
use tokio::io::AsyncBufReadExt;

use crate::config::BrokerConfig;

/// Octolog: a durable, log-based event-streaming broker.
#[derive(Debug, Parser)]
#[command(name = "octolog", version, about)]
struct Cli {
    /// Broker address for commands that talk to a broker.
    #[arg(
        long,
        global = true,
        env = "OCTOLOG_BROKER",
        default_value = "127.0.0.1:7171"
    )]
    broker: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Send standard input, one record per line, to a topic.
    Produce(ProduceArgs),
    /// Print records of a topic, following it or replaying from an offset or a time.
    Consume(ConsumeArgs),
    /// List, describe and reset consumer groups.
    #[command(subcommand)]
    Group(crate::cli_group::GroupCommand),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Folder holding the topics [default: ./octolog-data].
    #[arg(long, env = "OCTOLOG_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address to listen on; port 0 lets the OS choose [default: 127.0.0.1:7171].
    #[arg(long, env = "OCTOLOG_LISTEN")]
    listen: Option<SocketAddr>,
    /// TOML file with settings; flags win over it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Flush policy: always, never or interval-ms=N [default: interval-ms=1000].
    #[arg(long)]
    fsync: Option<String>,
    /// Segment size in bytes [default: 1073741824].
    #[arg(long)]
    segment_bytes: Option<u32>,
    /// Default retention by age in ms, -1 for forever [default: 604800000].
    #[arg(long, allow_negative_numbers = true)]
    retention_ms: Option<i64>,
    /// Default retention by size per partition in bytes, -1 for none [default: -1].
    #[arg(long, allow_negative_numbers = true)]
    retention_bytes: Option<i64>,
    /// Flushed bytes more than this far behind a partition's end leave the page cache; -1
    /// leaves the page cache to the kernel [default: 268435456].
    #[arg(long, allow_negative_numbers = true)]
    page_cache_window_bytes: Option<i64>,
}

#[derive(Debug, Subcommand)]
enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name: 1-249 characters of [A-Za-z0-9._-].
        name: String,
        /// Number of partitions [default: the broker's, 1].
        #[arg(long)]
        partitions: Option<u32>,
        /// Retention by age in ms, -1 for forever.
        #[arg(long, allow_negative_numbers = true)]
        retention_ms: Option<i64>,
        /// Retention by size per partition in bytes, -1 for none.
        #[arg(long, allow_negative_numbers = true)]
        retention_bytes: Option<i64>,
    },
    /// List topics.
    List {
        /// One JSON array instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show a topic's partitions, offsets and sizes.
    Describe {
        /// Topic name.
        name: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete a topic and all its records.
    Delete {
        /// Topic name.
        name: String,
    },
}

#[derive(Debug, Args)]
struct ProduceArgs {
    /// Topic to send to.
    topic: String,
    /// Send every record to this partition.
    #[arg(long)]
    partition: Option<u32>,
    /// Split each line at the first SEP: key before, value after.
    #[arg(long, value_name = "SEP")]
    key_separator: Option<String>,
    /// Add a header K=V to every record (repeatable).
    #[arg(long = "header", value_name = "K=V")]
    headers: Vec<String>,
    /// Print {"partition":P,"offset":O} per acknowledged record.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ConsumeArgs {
    /// Topic to read.
    topic: String,
    /// Read only this partition [default: all].
    #[arg(long)]
    partition: Option<u32>,
    /// Where to start: beginning, end, an OFFSET, or @UNIX_MS [default: end].
    #[arg(long, default_value = "end")]
    from: String,
    /// Join this consumer group.
    #[arg(long)]
    group: Option<String>,
    /// Stop after N records.
    #[arg(long)]
    count: Option<u64>,
    /// Stop at the end of the log instead of waiting for new records.
    #[arg(long)]
    exit_at_end: bool,
    /// One JSON object per record instead of the value.
    #[arg(long)]
    json: bool,
}

/// A failure to report: message and exit status.
struct Failure {
    message: String,
    status: u8,
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            message: e.to_string(),
            status: 1,
        }
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        status: 2,
    }
}

/// Runs the command line; returns the process exit status.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::from(
                    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                        2
                    } else {
                        0
                    },
                );
            }
            eprintln!("{}", usage_line(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };
    let default_level = if matches!(cli.command, Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colours only for a person at a terminal, not in log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let message = failure.message.replace('\n', " ");
            eprintln!("error: {message}");
            ExitCode::from(failure.status)
        }
    }
}

/// A clap error on one line: its message up to the usage section, lines joined, so that a
/// message continued on the next lines (e.g. which arguments are missing) is kept.
fn usage_line(rendered: &str) -> String {
    let message: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
        .collect();
    if message.is_empty() {
        "error: bad usage".to_string()
    } else {
        message.join(" ")
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Topic(command) => topic(&cli.broker, command).await,
        Command::Produce(args) => produce(&cli.broker, args).await,
        Command::Consume(args) => consume(&cli.broker, args).await,
        Command::Group(command) => Ok(crate::cli_group::run(&cli.broker, command).await?),
    }
}

/// Resolves when SIGINT or SIGTERM arrives.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn serve(args: ServeArgs) -> Result<(), Failure> {
    let mut config = match &args.config {
        Some(path) => BrokerConfig::from_file(path).map_err(usage_error)?,
        None => BrokerConfig::default(),
    };
    if let Some(v) = args.data_dir {
        config.data_dir = v;
    }
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.fsync {
        config.fsync = v;
    }
    if let Some(v) = args.segment_bytes {
        config.segment_bytes = v;
    }
    if let Some(v) = args.retention_ms {
        config.retention_ms = v;
    }
    if let Some(v) = args.retention_bytes {
        config.retention_bytes = v;
    }
    if let Some(v) = args.page_cache_window_bytes {
        config.page_cache_window_bytes = v;
    }
    config.validate().map_err(usage_error)?;
    // Each partition holds a descriptor per segment: thousands of partitions need more than
    // the soft limit many systems start with.
    let open_files = crate::open_files::raise_open_files_limit();
    let listen = config.listen;
    let broker = tokio::task::spawn_blocking(move || crate::Broker::open(config)).await??;
    // Said once the broker is open, so that a start that fails prints its one error line only.
    match open_files {
        Ok((before, after)) => tracing::info!(
            soft_before = before.soft,
            soft = after.soft,
            hard = after.hard,
            "open files limit"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "octolog listening on {local}")?;
        out.flush()?;
    }
    crate::server::run(listener, Arc::new(broker), shutdown_signal()).await?;
    Ok(())
}

fn usage_error(e: crate::BrokerError) -> Failure {
    usage(e.to_string())
}

async fn connect(addr: &str) -> Result<Client, Failure> {
    Ok(Client::connect(addr).await?)
}

async fn topic(addr: &str, command: TopicCommand) -> Result<(), Failure> {
    let client = connect(addr).await?;
    let admin = client.admin();
    let mut out = std::io::stdout().lock();
    match command {
        TopicCommand::Create {
            name,
            partitions,
            retention_ms,
            retention_bytes,
        } => {
            let mut options = TopicOptions::new();
            if let Some(p) = partitions {
                if p == 0 {
                    return Err(usage("--partitions must be at least 1"));
                }
                options = options.partitions(p);
            }
            if let Some(ms) = retention_ms {
                options = options.retention_ms(ms);
            }
            if let Some(bytes) = retention_bytes {
                options = options.retention_bytes(bytes);
            }
            let info = admin.create_topic(&name, options).await?;
            writeln!(
                out,
                "created topic {} with {} partitions",
                info.name(),
                info.partitions().len()
            )?;
        }
        TopicCommand::List { json } => {
            let topics = admin.list_topics().await?;
            if json {
                let list: Vec<_> = topics
                    .iter()
                    .map(|(name, n)| json!({"name": name, "partitions": n}))
                    .collect();
                writeln!(out, "{}", serde_json::Value::Array(list))?;
            } else {
                for (name, _) in topics {
                    writeln!(out, "{name}")?;
                }
            }
        }
        TopicCommand::Describe { name, json } => {
            let info = admin.describe_topic(&name).await?;
            if json {
                let line = DescribeLine {
                    name: info.name(),
                    partitions: info
                        .partitions()
                        .iter()
                        .map(|p| PartitionLine {
                            partition: p.partition(),
                            log_start_offset: p.log_start_offset().0,
                            high_watermark: p.high_watermark().0,
                            segments: p.segments(),
                            size_bytes: p.size_bytes(),
                        })
                        .collect(),
                };
                writeln!(out, "{}", serde_json::to_string(&line)?)?;
            } else {
                writeln!(
                    out,
                    "topic {} ({} partitions)",
                    info.name(),
                    info.partitions().len()
                )?;
                writeln!(
                    out,
                    "{:>9} {:>16} {:>16} {:>8} {:>14}",
                    "PARTITION", "LOG_START", "HIGH_WATERMARK", "SEGMENTS", "SIZE_BYTES"
                )?;
                for p in info.partitions() {
                    writeln!(
                        out,
                        "{:>9} {:>16} {:>16} {:>8} {:>14}",
                        p.partition(),
                        p.log_start_offset().0,
                        p.high_watermark().0,
                        p.segments(),
                        p.size_bytes()
                    )?;
                }
            }
        }
        TopicCommand::Delete { name } => {
            admin.delete_topic(&name).await?;
            writeln!(out, "deleted topic {name}")?;
        }
    }
    Ok(())
}

// JSON lines of the output, with their keys in the order INTERFACE.md shows (a struct
// serialises its fields in declaration order; `json!` would sort them).

/// `topic describe --json`.
#[derive(Serialize)]
struct DescribeLine<'a> {
    name: &'a str,
    partitions: Vec<PartitionLine>,
}

/// One partition of `topic describe --json`.
#[derive(Serialize)]
struct PartitionLine {
    partition: u32,
    log_start_offset: u64,
    high_watermark: u64,
    segments: u32,
    size_bytes: u64,
}

/// One acknowledgement of `produce --json`.
#[derive(Serialize)]
struct AckLine {
    partition: u32,
    offset: u64,
}

/// One record of `consume --json`.
#[derive(Serialize)]
struct RecordLine<'a> {
    topic: &'a str,
    partition: u32,
    offset: u64,
    timestamp_ms: i64,
    key: serde_json::Value,
    value: serde_json::Value,
    headers: serde_json::Map<String, serde_json::Value>,
    /// With `--group` only: whether the record may have reached the group before.
    #[serde(skip_serializing_if = "Option::is_none")]
    redelivered: Option<bool>,
}

/// Most acknowledgements awaited at once by `produce`; beyond it, the oldest is awaited first.
const PRODUCE_PENDING_MAX: usize = 65_536;

async fn produce(addr: &str, args: ProduceArgs) -> Result<(), Failure> {
    let mut headers = Vec::with_capacity(args.headers.len());
    for header in &args.headers {
        let (k, v) = header
            .split_once('=')
            .ok_or_else(|| usage(format!("--header {header:?} is not K=V")))?;
        headers.push((k.to_string(), Bytes::copy_from_slice(v.as_bytes())));
    }
    if args.key_separator.as_deref() == Some("") {
        return Err(usage("--key-separator must not be empty"));
    }
    let client = connect(addr).await?;
    // Fail early, with the broker's message, on an unknown topic or partition.
    let info = client.admin().describe_topic(&args.topic).await?;
    if let Some(p) = args.partition {
        if p as usize >= info.partitions().len() {
            return Err(Failure {
                message: format!(
                    "topic {:?} has partitions 0..{}, not {p}",
                    args.topic,
                    info.partitions().len()
                ),
                status: 1,
            });
        }
    }
    let producer = client.producer().build().await?;
    let mut pending = std::collections::VecDeque::new();
    let mut out = std::io::stdout();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).split(b'\n');
    while let Some(line) = lines.next_segment().await? {
        let (key, value) = match &args.key_separator {
            Some(sep) => match find(&line, sep.as_bytes()) {
                Some(i) => (
                    Some(Bytes::copy_from_slice(&line[..i])),
                    Bytes::copy_from_slice(&line[i + sep.len()..]),
                ),
                None => (None, Bytes::from(line)),
            },
            None => (None, Bytes::from(line)),
        };
        let mut record = ProducerRecord::new(args.topic.clone(), value);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(p) = args.partition {
            record = record.partition(p);
        }
        for (k, v) in &headers {
            record = record.header(k.clone(), v.clone());
        }
        pending.push_back(producer.send(record).await?);
        if pending.len() >= PRODUCE_PENDING_MAX {
            let delivery = pending.pop_front().expect("not empty");
            report(&mut out, delivery.await?, args.json)?;
        }
    }
    producer.flush().await;
    for delivery in pending {
        report(&mut out, delivery.await?, args.json)?;
    }
    producer.close().await;
    Ok(())
}

fn report(
    out: &mut std::io::Stdout,
    metadata: octolog_client::RecordMetadata,
    json: bool,
) -> std::io::Result<()> {
    if json {
        let line = AckLine {
            partition: metadata.partition(),
            offset: metadata.offset().0,
        };
        writeln!(out, "{}", serde_json::to_string(&line)?)?;
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_from(from: &str) -> Result<StartAt, Failure> {
    match from {
        "beginning" => Ok(StartAt::Beginning),
        "end" => Ok(StartAt::End),
        _ => {
            if let Some(ms) = from.strip_prefix('@') {
                return ms.parse().map(StartAt::Timestamp).map_err(|_| {
                    usage(format!(
                        "--from {from:?}: @ must be followed by milliseconds since the epoch"
                    ))
                });
            }
            from.parse()
                .map(|o| StartAt::Offset(Offset(o)))
                .map_err(|_| {
                    usage(format!(
                        "--from {from:?} is not beginning, end, an offset, or @UNIX_MS"
                    ))
                })
        }
    }
}

fn text(bytes: Option<&Bytes>) -> serde_json::Value {
    bytes.map_or(serde_json::Value::Null, |b| {
        serde_json::Value::String(String::from_utf8_lossy(b).into_owned())
    })
}

fn print_record(
    out: &mut impl Write,
    record: &ConsumerRecord,
    json: bool,
    in_group: bool,
) -> std::io::Result<()> {
    if json {
        let headers: serde_json::Map<String, serde_json::Value> = record
            .headers()
            .iter()
            .map(|(k, v)| (k.clone(), text(v.as_ref())))
            .collect();
        let line = RecordLine {
            topic: record.topic(),
            partition: record.partition(),
            offset: record.offset().0,
            timestamp_ms: record.timestamp_ms(),
            key: text(record.key()),
            value: text(record.value()),
            headers,
            redelivered: in_group.then_some(record.redelivered()),
        };
        writeln!(out, "{}", serde_json::to_string(&line)?)?;
    } else {
        out.write_all(record.value().map_or(&b""[..], |v| &v[..]))?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// `consume --group`: joins the group, prints what it is handed, and commits only what it has
/// printed and flushed (auto-commit inside `poll_at_most`, which runs only once the previous
/// records are printed, and a final commit on leaving).
async fn consume_group(addr: &str, args: ConsumeArgs, group: String) -> Result<(), Failure> {
    if args.partition.is_some() {
        return Err(Failure {
            message: "--partition cannot be used with --group: the group assigns partitions".into(),
            status: 2,
        });
    }
    let start = parse_from(&args.from)?;
    let client = connect(addr).await?;
    let mut consumer = client
        .consumer(args.topic.clone())
        .group_start(start)
        .max_wait(std::time::Duration::from_millis(200))
        .build()
        .await?;
    consumer.subscribe(&group).await?;
    // Signals only set a flag: the loop notices it within one poll (at most `max_wait`), so
    // the consumer is never interrupted halfway through applying an assignment.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    tokio::spawn(async move {
        shutdown_signal().await;
        flag.store(true, std::sync::atomic::Ordering::Release);
    });
    let mut printed = 0u64;
    let mut out = std::io::stdout().lock();
    loop {
        if stop.load(std::sync::atomic::Ordering::Acquire)
            || args.count.is_some_and(|n| printed >= n)
            || (args.exit_at_end && consumer.has_assignment() && consumer.at_end())
        {
            break;
        }
        let remaining = args.count.map_or(usize::MAX, |n| (n - printed) as usize);
        for record in consumer.poll_at_most(remaining).await? {
            match print_record(&mut out, &record, args.json, true) {
                Ok(()) => printed += 1,
                // The line was not written: leave without the final commit, so that what was
                // handed out and not printed is delivered again.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }
    consumer.close().await?;
    Ok(())
}

async fn consume(addr: &str, args: ConsumeArgs) -> Result<(), Failure> {
    if let Some(group) = args.group.clone() {
        return consume_group(addr, args, group).await;
    }
    let start = parse_from(&args.from)?;
    let client = connect(addr).await?;
    let mut consumer = client.consumer(args.topic.clone()).build().await?;
    let partitions: Vec<u32> = match args.partition {
        Some(p) => vec![p],
        None => (0..consumer.partition_count()).collect(),
    };
    consumer.assign(&partitions, start).await?;
    // With --exit-at-end, the end is the high watermark of each partition when we start.
    let mut ends = Vec::new();
    if args.exit_at_end {
        let admin = client.admin();
        for &p in &partitions {
            ends.push((
                p,
                admin
                    .list_offset(&args.topic, p, OffsetSpec::Latest)
                    .await?,
            ));
        }
    }
    let reached_end = |consumer: &octolog_client::Consumer| {
        ends.iter()
            .all(|&(p, end)| consumer.position(p).is_some_and(|pos| pos >= end))
    };
    let mut printed = 0u64;
    let mut out = std::io::stdout().lock();
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        if args.count.is_some_and(|n| printed >= n) || (args.exit_at_end && reached_end(&consumer))
        {
            return Ok(());
        }
        let records = tokio::select! {
            records = consumer.poll() => records?,
            _ = &mut stop => return Ok(()),
        };
        for record in records {
            if args.count.is_some_and(|n| printed >= n) {
                break;
            }
            match print_record(&mut out, &record, args.json, false) {
                Ok(()) => printed += 1,
                // The reader went away (e.g. `| head`): stop quietly.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_parses_every_form() {
        assert!(matches!(parse_from("beginning"), Ok(StartAt::Beginning)));
        assert!(matches!(parse_from("end"), Ok(StartAt::End)));
        assert!(matches!(parse_from("42"), Ok(StartAt::Offset(Offset(42)))));
        assert!(matches!(
            parse_from("@1700000000000"),
            Ok(StartAt::Timestamp(1_700_000_000_000))
        ));
        for bad in ["", "-1", "@", "@x", "begin", "1.5"] {
            assert!(
                matches!(parse_from(bad), Err(Failure { status: 2, .. })),
                "{bad}"
            );
        }
    }

    /// Guards the one-line usage error: clap puts what is missing on the lines after the first.
    #[test]
    fn usage_errors_keep_their_whole_message_on_one_line() {
        let check = |args: &[&str], want: &str| {
            let e = Cli::try_parse_from(args).expect_err("bad usage");
            assert_eq!(usage_line(&e.render().to_string()), want, "{args:?}");
        };
        check(
            &["octolog", "consume"],
            "error: the following required arguments were not provided: <TOPIC>",
        );
        check(
            &["octolog", "topic", "list", "--bogus"],
            "error: unexpected argument '--bogus' found",
        );
        assert_eq!(usage_line(""), "error: bad usage");
    }

    #[test]
    fn key_separator_splits_at_the_first_occurrence() {
        assert_eq!(find(b"job-1::queued::x", b"::"), Some(5));
        assert_eq!(find(b"no separator", b"::"), None);
    }
}
