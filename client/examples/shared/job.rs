//! The job events of the science-gateway examples: a job's lifecycle and the JSON value of one
//! event. `job_events` writes them and `job_tracker` reads them, so both include this file
//! (it sits in a subdirectory so that Cargo does not take it for an example of its own).
//!
//! Wire format of one event, a record of the `gateway.jobs` topic:
//! - key: the job id (`job-0007`), so every event of a job lands in one partition, in order;
//! - value: `{"job":"job-0007","state":"queued","app":"gromacs","at_ms":1767225600000}`;
//! - header: `event-type=job-state`, so readers can skip other records sharing the topic.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Topic both examples use unless told otherwise.
pub const DEFAULT_TOPIC: &str = "gateway.jobs";
/// Key of the header that says what a record is.
pub const EVENT_TYPE_HEADER: &str = "event-type";
/// Value of the `event-type` header on job events.
pub const EVENT_TYPE: &str = "job-state";

/// Where a job is in its lifecycle:
/// `created -> queued -> executing -> completed | failed -> archived`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Submitted through the gateway; the first state of every job.
    Created,
    /// Handed to the cluster's batch scheduler, waiting for nodes.
    Queued,
    /// Running on the cluster.
    Executing,
    /// Finished with exit status 0.
    Completed,
    /// Finished with an error, or was cancelled.
    Failed,
    /// Outputs moved to long-term storage; the last state of a finished job.
    Archived,
}

// `state_counts` indexes by discriminant: `ALL` must list the states in declaration order.
const _: () = assert!(JobState::Created as usize == 0);
const _: () = assert!(JobState::Archived as usize == JobState::ALL.len() - 1);

impl JobState {
    /// Every state, in lifecycle order.
    pub const ALL: [JobState; 6] = [
        JobState::Created,
        JobState::Queued,
        JobState::Executing,
        JobState::Completed,
        JobState::Failed,
        JobState::Archived,
    ];

    /// The state's name, as it appears in the JSON value.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Created => "created",
            JobState::Queued => "queued",
            JobState::Executing => "executing",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Archived => "archived",
        }
    }

    /// Whether a job in state `from` (`None`: not seen yet) may move to `to`.
    pub fn can_follow(from: Option<JobState>, to: JobState) -> bool {
        use JobState::*;
        matches!(
            (from, to),
            (None, Created)
                | (Some(Created), Queued)
                | (Some(Queued), Executing)
                | (Some(Executing), Completed | Failed)
                | (Some(Completed | Failed), Archived)
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` rather than `write_str`, so that `{:<9}` aligns table columns.
        f.pad(self.as_str())
    }
}

/// The value of one job event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    /// The job id, also the record's key.
    pub job: String,
    /// The state the job entered.
    pub state: JobState,
    /// The application the job runs (`gromacs`, `namd`, ...).
    pub app: String,
    /// When the job entered the state, in ms since the epoch.
    pub at_ms: i64,
}

/// How many of `states` are in each state, in lifecycle order and without zeros:
/// `2 queued, 3 executing, 10 archived`.
pub fn state_counts(states: impl IntoIterator<Item = JobState>) -> String {
    let mut counts = [0usize; JobState::ALL.len()];
    for state in states {
        counts[state as usize] += 1;
    }
    let parts: Vec<String> = JobState::ALL
        .iter()
        .zip(counts)
        .filter(|&(_, count)| count > 0)
        .map(|(state, count)| format!("{count} {state}"))
        .collect();
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(", ")
    }
}
