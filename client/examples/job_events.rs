//! Job-event generator of the science-gateway demo.
//!
//! A science gateway submits simulation jobs (GROMACS, NAMD, LAMMPS, ...) to a cluster on behalf
//! of its users and records every step of a job as an event in a topic:
//! `created -> queued -> executing -> completed | failed -> archived`. This program plays the
//! gateway: it creates the topic if it is missing (3 partitions), then sends the events of
//! `--jobs` jobs, interleaved as real jobs would be, and waits until the broker has acknowledged
//! every one of them. Some jobs stop early (still queued, still executing, finished but not yet
//! archived), so that `job_tracker` has open jobs to show and live changes to follow.
//!
//! What it demonstrates of the client: `Admin::create_topic`, a batching `Producer` with keyed
//! records (the job id is the key, so a job's events stay in order in one partition), headers,
//! and awaiting each `Delivery` for the offset the record got.
//!
//! The job mix is a pure function of `--seed`; job numbers start at seed x 1000 + 1, so runs
//! with different seeds add new jobs instead of restarting old ones.
//!
//! ```text
//! cargo run -p octolog-client --example job_events -- --jobs 20 --seed 0
//! ```

#[path = "shared/job.rs"]
mod job;

use std::collections::{BTreeMap, VecDeque};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use job::{JobEvent, JobState, EVENT_TYPE, EVENT_TYPE_HEADER};
use octolog_client::{Client, ClientError, Offset, ProducerRecord, TopicOptions};

/// Errors end the program with `error: ...` and exit status 1.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Partitions of the topic when this program creates it.
const PARTITIONS: u32 = 3;
/// Most jobs one run generates: their plans and deliveries are held in memory.
const JOBS_MAX: u64 = 100_000;
/// Job numbers each seed owns: seed `s` numbers its jobs from `s * JOBS_PER_SEED + 1`.
const JOBS_PER_SEED: u64 = 1000;
/// The applications jobs run, picked by the seed.
const APPS: [&str; 5] = ["gromacs", "namd", "lammps", "openfoam", "cp2k"];

/// Emit the lifecycle events of simulated science-gateway jobs to an Octolog topic.
#[derive(Debug, Parser)]
#[command(name = "job_events")]
struct Args {
    /// Broker address.
    #[arg(long, env = "OCTOLOG_BROKER", default_value = "127.0.0.1:7171")]
    broker: String,
    /// Topic to write to; created with 3 partitions if it does not exist.
    #[arg(long, default_value = job::DEFAULT_TOPIC)]
    topic: String,
    /// Number of jobs (at most 100000: the plan of every job is held in memory).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(..=JOBS_MAX))]
    jobs: u64,
    /// Seed of the job mix; job numbers start at seed x 1000 + 1.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Pause between two events in ms, to watch a tracker follow along.
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    let first_number = args
        .seed
        .checked_mul(JOBS_PER_SEED)
        .and_then(|n| n.checked_add(args.jobs).map(|_| n))
        .ok_or("--seed is too large: job numbers would overflow")?;
    let mut rng = SplitMix64(args.seed);
    let mut plans: Vec<JobPlan> = (1..=args.jobs)
        .map(|i| JobPlan::new(first_number + i, &mut rng))
        .collect();
    let final_states: Vec<JobState> = plans.iter().map(JobPlan::final_state).collect();
    let event_count: usize = plans.iter().map(|plan| plan.states.len()).sum();

    let client = Client::connect(&args.broker).await?;
    ensure_topic(&client, &args.topic).await?;
    let producer = client.producer().build().await?;

    // Interleave the jobs: each step advances a job picked at random among those with events
    // left. Within a job the events keep their order, and the key keeps them in one partition.
    let mut deliveries = Vec::with_capacity(event_count);
    while !plans.is_empty() {
        let index = rng.below(plans.len() as u64) as usize;
        let plan = &mut plans[index];
        let state = plan.states.pop_front().expect("empty plans are removed");
        let event = JobEvent {
            job: plan.id.clone(),
            state,
            app: plan.app.to_string(),
            at_ms: now_ms(),
        };
        let record = ProducerRecord::new(&args.topic, serde_json::to_vec(&event)?)
            .key(plan.id.clone())
            .header(EVENT_TYPE_HEADER, EVENT_TYPE);
        deliveries.push(producer.send(record).await?);
        if plan.states.is_empty() {
            plans.swap_remove(index);
        }
        if args.pause_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
        }
    }

    // Send what is still lingering in open batches now rather than after `linger`.
    producer.flush().await;
    // A record is stored only once its delivery resolves: check every one.
    let mut stored: BTreeMap<u32, (usize, Offset, Offset)> = BTreeMap::new();
    let mut failures = 0usize;
    let mut first_failure: Option<ClientError> = None;
    for delivery in deliveries {
        match delivery.await {
            Ok(metadata) => {
                let offset = metadata.offset();
                let entry = stored
                    .entry(metadata.partition())
                    .or_insert((0, offset, offset));
                entry.0 += 1;
                entry.1 = entry.1.min(offset);
                entry.2 = entry.2.max(offset);
            }
            Err(e) => {
                failures += 1;
                first_failure.get_or_insert(e);
            }
        }
    }
    producer.close().await;
    if let Some(e) = first_failure {
        return Err(format!("{failures} of {event_count} events were not stored: {e}").into());
    }

    let jobs = match args.jobs {
        0 => {
            println!("sent no events: --jobs is 0");
            return Ok(());
        }
        1 => job_id(first_number + 1),
        n => format!("{}..{}", job_id(first_number + 1), job_id(first_number + n)),
    };
    println!(
        "sent {event_count} events of {} ({jobs}, seed {}) to {}",
        if args.jobs == 1 {
            "1 job".to_string()
        } else {
            format!("{} jobs", args.jobs)
        },
        args.seed,
        args.topic
    );
    for (partition, (count, first, last)) in &stored {
        println!(
            "  partition {partition}: {count} events at offsets [{first}, {})",
            last.0 + 1
        );
    }
    println!("final states: {}", job::state_counts(final_states));
    Ok(())
}

/// Creates `topic` with `PARTITIONS` partitions unless it exists already.
async fn ensure_topic(client: &Client, topic: &str) -> Result<(), ClientError> {
    let options = TopicOptions::new().partitions(PARTITIONS);
    match client.admin().create_topic(topic, options).await {
        Ok(info) => {
            println!(
                "created topic {} with {} partitions",
                info.name(),
                info.partitions().len()
            );
            Ok(())
        }
        Err(e) if e.is_already_exists() => Ok(()),
        Err(e) => Err(e),
    }
}

/// The events one job will go through, in order.
#[derive(Debug)]
struct JobPlan {
    /// The job id, e.g. `job-0007`: the record key.
    id: String,
    /// The application the job runs.
    app: &'static str,
    /// The states still to send; never empty while the plan is in the list.
    states: VecDeque<JobState>,
}

impl JobPlan {
    /// Draws the application and the fate of job `number`.
    fn new(number: u64, rng: &mut SplitMix64) -> JobPlan {
        use JobState::*;
        let app = APPS[rng.below(APPS.len() as u64) as usize];
        let states: &[JobState] = match rng.below(100) {
            0..10 => &[Created, Queued],
            10..25 => &[Created, Queued, Executing],
            25..35 => &[Created, Queued, Executing, Completed],
            35..40 => &[Created, Queued, Executing, Failed],
            40..50 => &[Created, Queued, Executing, Failed, Archived],
            _ => &[Created, Queued, Executing, Completed, Archived],
        };
        let mut previous = None;
        for &state in states {
            assert!(JobState::can_follow(previous, state));
            previous = Some(state);
        }
        JobPlan {
            id: job_id(number),
            app,
            states: states.iter().copied().collect(),
        }
    }

    fn final_state(&self) -> JobState {
        *self.states.back().expect("a plan has at least one state")
    }
}

fn job_id(number: u64) -> String {
    format!("job-{number:04}")
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// SplitMix64: a small deterministic generator, so that a seed always gives the same jobs in
/// the same interleaving (no dependency on `rand` for a demo).
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `[0, n)`; the modulo bias is irrelevant for `n` this small.
    fn below(&mut self, n: u64) -> u64 {
        assert!(0 < n);
        self.next_u64() % n
    }
}
