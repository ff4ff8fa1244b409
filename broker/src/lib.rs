//! `octolog-broker`: the Octolog server (topic registry, partitions on storage logs, long-poll
//! fetch and push subscriptions, the gRPC service) and the `octolog` command-line tool.
//!
//! Layers, outside in: `server` (listener, limits, graceful shutdown) -> `service` (protobuf <->
//! domain, the one place errors become statuses) -> `broker` (domain operations) -> `topic` and
//! `partition` -> `octolog_storage::Log`. The CLI (`cli`) talks to a broker through
//! `octolog-client`, as any user would.

pub mod broker;
pub mod cli;
pub mod cli_group;
pub mod config;
pub mod error;
mod fetch_path;
pub mod group;
pub mod group_service;
pub mod open_files;
pub mod partition;
pub mod producer_ids;
pub mod producer_state;
pub mod server;
pub mod service;
pub mod topic;

pub use crate::broker::Broker;
pub use crate::config::BrokerConfig;
pub use crate::error::{BrokerError, Result};
