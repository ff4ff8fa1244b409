//! `octolog-bench`: the end-to-end throughput and latency tool (the `octolog-bench` binary), and
//! the storage micro-benchmarks (`benches/`, run with `cargo bench -p octolog-bench`).
//!
//! The binary's logic lives here so it can be tested: [`args`] turns flags into a checked
//! [`args::Plan`], [`run::run`] carries it out against an in-process or remote broker and returns
//! a [`run::Report`];
//! [`received::Received`] tells which records arrived, once or more; [`memory`] samples the
//! process's resident memory.

pub mod args;
pub mod error;
pub mod memory;
pub mod received;
pub mod run;

pub use crate::error::BenchError;
