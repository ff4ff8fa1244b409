//! The Rust client of Octolog: an [`Admin`] for topics, a batching, pipelining [`Producer`] and a
//! read-ahead [`Consumer`], all over one [`Client`] connection to a broker.
//!
//! ```no_run
//! use octolog_client::{Client, ProducerRecord, StartAt, TopicOptions};
//!
//! # async fn example() -> Result<(), octolog_client::ClientError> {
//! let client = Client::connect("127.0.0.1:7171").await?;
//! client.admin().create_topic("gateway.jobs", TopicOptions::new().partitions(3)).await?;
//!
//! // Produce: records with the same key land in the same partition, in order.
//! let producer = client.producer().build().await?;
//! let delivery = producer
//!     .send(ProducerRecord::new("gateway.jobs", "queued").key("job-42").header("site", "hpc1"))
//!     .await?;
//! let stored = delivery.await?;
//! println!("stored at partition {} offset {}", stored.partition(), stored.offset());
//! producer.close().await;
//!
//! // Replay the topic from the beginning.
//! let mut consumer = client.consumer("gateway.jobs").build().await?;
//! consumer.assign_all(StartAt::Beginning).await?;
//! let record = consumer.next().await?;
//! assert_eq!(record.value().map(|v| &v[..]), Some(&b"queued"[..]));
//! # Ok(())
//! # }
//! ```
//!
//! Every handle is `Send + Sync` (the consumer is `Send`), `Debug`, and never blocks on drop.

#![deny(missing_docs)]

mod admin;
mod client;
mod consumer;
mod error;
mod group_admin;
mod membership;
mod partitioner;
mod produce_stream;
mod producer;

pub use crate::admin::{Admin, OffsetSpec, PartitionInfo, TopicInfo, TopicOptions};
pub use crate::client::Client;
pub use crate::consumer::{Consumer, ConsumerBuilder, ConsumerRecord, Rebalance, StartAt};
pub use crate::error::{ClientError, Result};
pub use crate::group_admin::{
    GroupDescription, GroupMember, GroupPartition, GroupState, GroupSummary, ResetTo,
};
pub use crate::partitioner::{murmur2, partition_for_key};
pub use crate::producer::{Delivery, Producer, ProducerBuilder, ProducerRecord, RecordMetadata};
pub use octolog_batch::Offset;

/// Turns a per-partition error code of an answer into an error.
pub(crate) fn check_partition_error(
    topic: &str,
    partition: u32,
    code: i32,
    message: &str,
) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    Err(ClientError::Partition {
        topic: topic.to_string(),
        partition,
        code,
        message: message.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    /// Guards the promise that handles can be shared across tasks.
    #[test]
    fn handles_are_send_and_sync() {
        assert_send_sync::<Client>();
        assert_send_sync::<Admin>();
        assert_send_sync::<Producer>();
        assert_send_sync::<Delivery>();
        fn assert_send<T: Send>() {}
        assert_send::<Consumer>();
    }
}
