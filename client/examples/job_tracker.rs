//! Job tracker of the science-gateway demo: rebuilds the state of every job by replaying the
//! job-event topic, then follows it live.
//!
//! A gateway's job tracker keeps no database of its own: the topic written by `job_events` is
//! the record of what happened. After a restart (or on a fresh machine) the tracker replays every
//! partition from its oldest record (`StartAt::Beginning`) and folds the events into one state per
//! job, checking that each job moves along its lifecycle
//! (`created -> queued -> executing -> completed | failed -> archived`). An event that breaks the
//! lifecycle is reported as a warning and taken as the job's new state: the log is the truth.
//!
//! The tracker is caught up when, on every partition, its position has reached the high
//! watermark looked up at start (`Admin::list_offset` with `OffsetSpec::Latest`): everything
//! written before it started has been read. It then prints a summary table and, unless given
//! `--replay-only`, follows the topic and prints one line per state change until Ctrl-C.
//!
//! What it demonstrates of the client: a `Consumer` assigned to every partition, replay from the
//! beginning, `position` and `high_watermark`, and `poll` raced against Ctrl-C (dropping a
//! pending `poll` loses nothing: it only waits on the read-ahead channel).
//!
//! ```text
//! cargo run -p octolog-client --example job_tracker -- --replay-only
//! ```

#[path = "shared/job.rs"]
mod job;

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use job::{JobEvent, JobState, EVENT_TYPE, EVENT_TYPE_HEADER};
use octolog_client::{Client, Consumer, ConsumerRecord, Offset, OffsetSpec, StartAt};

/// Errors end the program with `error: ...` and exit status 1.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `println!` that returns the error instead of panicking when stdout is closed, as in
/// `job_tracker | head`; `main` then ends quietly.
macro_rules! out {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*)?
    };
}

/// Rebuild the state of every science-gateway job from an Octolog topic, then follow it live.
#[derive(Debug, Parser)]
#[command(name = "job_tracker")]
struct Args {
    /// Broker address.
    #[arg(long, env = "OCTOLOG_BROKER", default_value = "127.0.0.1:7171")]
    broker: String,
    /// Topic of job events.
    #[arg(long, default_value = job::DEFAULT_TOPIC)]
    topic: String,
    /// Exit after the summary instead of following new events.
    #[arg(long)]
    replay_only: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&*e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Whether `e` is stdout closed under us, which is how `job_tracker | head` ends.
fn is_broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

async fn run(args: Args) -> Result<(), BoxError> {
    let started = Instant::now();
    let client = Client::connect(&args.broker).await?;
    let mut consumer = match client.consumer(&args.topic).build().await {
        Ok(consumer) => consumer,
        Err(e) if e.is_unknown_topic() => {
            return Err(format!(
                "topic {:?} does not exist yet: run the job_events example first",
                args.topic
            )
            .into())
        }
        Err(e) => return Err(e.into()),
    };

    // What "caught up" means: every record written before we started has been read.
    let admin = client.admin();
    let mut targets = Vec::with_capacity(consumer.partition_count() as usize);
    for partition in 0..consumer.partition_count() {
        targets.push(
            admin
                .list_offset(&args.topic, partition, OffsetSpec::Latest)
                .await?,
        );
    }
    consumer.assign_all(StartAt::Beginning).await?;

    let mut tracker = Tracker::default();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    while !caught_up(&consumer, &targets) {
        let records = tokio::select! {
            records = consumer.poll() => records?,
            signal = &mut ctrl_c => {
                signal?;
                out!("interrupted before catching up, after {}", plural(tracker.events, "event"));
                return Ok(());
            }
        };
        for record in &records {
            tracker.apply(record);
        }
    }
    print_summary(&args.topic, &consumer, &targets, &tracker, started)?;
    if args.replay_only {
        return Ok(());
    }

    out!();
    out!(
        "following {} for new events; press Ctrl-C to stop",
        args.topic
    );
    let replayed = tracker.events;
    loop {
        let records = tokio::select! {
            records = consumer.poll() => records?,
            signal = &mut ctrl_c => {
                signal?;
                break;
            }
        };
        for record in &records {
            if let Some(change) = tracker.apply(record) {
                out!("{change}");
            }
        }
    }
    out!(
        "stopped: {} followed live; tracking {}: {}",
        plural(tracker.events - replayed, "event"),
        plural(tracker.jobs.len() as u64, "job"),
        job::state_counts(tracker.jobs.values().map(|job| job.state))
    );
    Ok(())
}

/// Whether the consumer's position has reached `targets[p]` on every partition `p`.
fn caught_up(consumer: &Consumer, targets: &[Offset]) -> bool {
    targets.iter().zip(0..).all(|(&target, partition)| {
        consumer
            .position(partition)
            .is_some_and(|position| target <= position)
    })
}

fn print_summary(
    topic: &str,
    consumer: &Consumer,
    targets: &[Offset],
    tracker: &Tracker,
    started: Instant,
) -> io::Result<()> {
    out!(
        "caught up with {topic}: replayed {} of {} from {} partitions in {} ms",
        plural(tracker.events, "event"),
        plural(tracker.jobs.len() as u64, "job"),
        targets.len(),
        started.elapsed().as_millis()
    );
    if tracker.warnings > 0 || tracker.skipped > 0 {
        out!(
            "  {} (on stderr), {} without the {EVENT_TYPE_HEADER}={EVENT_TYPE} header skipped",
            plural(tracker.warnings, "warning"),
            plural(tracker.skipped, "record")
        );
    }
    for (partition, target) in (0..).zip(targets) {
        // No high watermark is known for a partition that was empty at start: nothing was
        // fetched from it.
        let high_watermark = consumer
            .high_watermark(partition)
            .map_or_else(|| "-".to_string(), |hw| hw.to_string());
        let position = consumer
            .position(partition)
            .map_or_else(|| "-".to_string(), |p| p.to_string());
        out!(
            "  partition {partition}: position {position}, high watermark {high_watermark} \
             (at start {target})"
        );
    }
    out!();
    if tracker.jobs.is_empty() {
        out!("no jobs yet");
        return Ok(());
    }
    let id_width = tracker
        .jobs
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(0)
        .max(3);
    let app_width = tracker
        .jobs
        .values()
        .map(|j| j.app.len())
        .max()
        .unwrap_or(0)
        .max(3);
    out!(
        "{:<id_width$}  {:<9}  {:<app_width$}  {:>9}  {:>6}",
        "JOB",
        "STATE",
        "APP",
        "PARTITION",
        "OFFSET"
    );
    for (id, job) in &tracker.jobs {
        out!(
            "{id:<id_width$}  {:<9}  {:<app_width$}  {:>9}  {:>6}",
            job.state,
            job.app,
            job.partition,
            job.offset
        );
    }
    out!(
        "{}: {}",
        plural(tracker.jobs.len() as u64, "job"),
        job::state_counts(tracker.jobs.values().map(|job| job.state))
    );
    Ok(())
}

/// `1 event`, `2 events`.
fn plural(count: u64, noun: &str) -> String {
    if count == 1 {
        format!("{count} {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// What the tracker knows of one job.
#[derive(Debug)]
struct Job {
    /// The state of the job's latest event.
    state: JobState,
    /// The application it runs.
    app: String,
    /// The partition its events are in (one, since the job id is the key).
    partition: u32,
    /// The offset of its latest event: where to look in the log.
    offset: Offset,
}

/// The state of every job, folded from the events read so far.
#[derive(Debug, Default)]
struct Tracker {
    /// Jobs by id, sorted so that the summary reads in job order.
    jobs: BTreeMap<String, Job>,
    /// Job events applied.
    events: u64,
    /// Events that broke a job's lifecycle or could not be read.
    warnings: u64,
    /// Records without the `event-type=job-state` header.
    skipped: u64,
}

/// One state change, printed as `job-0007 executing -> completed (gromacs)`.
#[derive(Debug)]
struct Change {
    /// The job id.
    job: String,
    /// The state before; `None` for a job seen for the first time.
    from: Option<JobState>,
    /// The state the event moved the job to.
    to: JobState,
    /// The application the job runs, to make the line readable on its own.
    app: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.from {
            Some(from) => write!(f, "{} {from} -> {} ({})", self.job, self.to, self.app),
            None => write!(f, "{} new -> {} ({})", self.job, self.to, self.app),
        }
    }
}

impl Tracker {
    /// Folds one record into the jobs' states; returns the change it made, if it was a job event.
    /// Bad events are reported on stderr and counted, never fatal: the tracker must keep going
    /// past whatever a buggy producer wrote.
    fn apply(&mut self, record: &ConsumerRecord) -> Option<Change> {
        let is_job_event = record.headers().iter().any(|(key, value)| {
            key == EVENT_TYPE_HEADER && value.as_deref() == Some(EVENT_TYPE.as_bytes())
        });
        if !is_job_event {
            self.skipped += 1;
            return None;
        }
        let at = format!(
            "partition {} offset {}",
            record.partition(),
            record.offset()
        );
        let event: JobEvent = match record.value().map(|v| serde_json::from_slice(v)) {
            Some(Ok(event)) => event,
            Some(Err(e)) => {
                self.warn(format_args!("{at}: not a job event: {e}"));
                return None;
            }
            None => {
                self.warn(format_args!("{at}: job event without a value"));
                return None;
            }
        };
        if record.key().map(|k| &k[..]) != Some(event.job.as_bytes()) {
            // Events keyed otherwise may sit in another partition, out of order with the rest.
            self.warn(format_args!(
                "{at}: event of {} is not keyed by its job id",
                event.job
            ));
        }
        self.events += 1;
        let from = self.jobs.get(&event.job).map(|job| job.state);
        if !JobState::can_follow(from, event.state) {
            let from_name = from.map_or("new", JobState::as_str);
            self.warn(format_args!(
                "{at}: {} {from_name} -> {} is not a valid transition; taking it anyway",
                event.job, event.state
            ));
        }
        let change = Change {
            job: event.job.clone(),
            from,
            to: event.state,
            app: event.app.clone(),
        };
        self.jobs.insert(
            event.job,
            Job {
                state: event.state,
                app: event.app,
                partition: record.partition(),
                offset: record.offset(),
            },
        );
        Some(change)
    }

    fn warn(&mut self, message: fmt::Arguments<'_>) {
        self.warnings += 1;
        eprintln!("warning: {message}");
    }
}
