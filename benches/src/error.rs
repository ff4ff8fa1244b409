//! Why a run of `octolog-bench` failed. Bad flags are not here: they are usage errors, reported
//! by the argument parser with exit status 2. Everything here ends the run with exit status 1.

use octolog_broker::BrokerError;
use octolog_client::ClientError;

/// An operating error of a benchmark run.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The in-process broker could not be started or stopped cleanly.
    #[error("in-process broker: {0}")]
    Broker(#[from] BrokerError),
    /// A local resource (temporary dir, listener) could not be had.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A call to the broker failed.
    #[error("{what}: {source}")]
    Client {
        /// What was being done.
        what: String,
        /// The client's error.
        source: ClientError,
    },
    /// A record came back that the tool did not send as it is.
    #[error("partition {partition} offset {offset}: {reason}")]
    BadRecord {
        /// Where it was read.
        partition: u32,
        /// Its offset.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// No record arrived for too long although some are missing.
    #[error("no record consumed for {seconds} s with {missing} of {records} records missing; is the broker alive?")]
    Stalled {
        /// How long nothing came.
        seconds: u64,
        /// Records not received.
        missing: u64,
        /// Records expected.
        records: u64,
    },
    /// The consumers stopped with records of the run never received.
    #[error("{missing} of {records} records were never received ({duplicates} received twice)")]
    Missing {
        /// Records sent and not received.
        missing: u64,
        /// Records sent.
        records: u64,
        /// Records received more than once, which do not make up for missing ones.
        duplicates: u64,
    },
    /// A task of the tool died (a bug).
    #[error("a benchmark task failed: {0}")]
    Task(String),
}

/// Wraps a client error with what was being done.
pub(crate) fn context(what: impl Into<String>) -> impl FnOnce(ClientError) -> BenchError {
    let what = what.into();
    move |source| BenchError::Client { what, source }
}
