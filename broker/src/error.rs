//! Errors of the broker's domain layer. The gRPC service maps them to status codes in one place
//! (`service::status`), keeping the message intact.

use std::path::PathBuf;

use octolog_storage::StorageError;

/// An operating error of the broker.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The topic does not exist.
    #[error("unknown topic {topic:?}: create it first with `octolog topic create {topic}`")]
    UnknownTopic {
        /// The name asked for.
        topic: String,
    },
    /// A topic of that name exists already.
    #[error("topic {topic:?} already exists")]
    TopicExists {
        /// The name asked for.
        topic: String,
    },
    /// The topic name breaks the naming rules.
    #[error("invalid topic name {name:?}: {reason}")]
    InvalidTopicName {
        /// The name given.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The partition does not exist in the topic.
    #[error(
        "topic {topic:?} has no partition {partition}: it has partitions 0..{partition_count}"
    )]
    UnknownPartition {
        /// The topic.
        topic: String,
        /// The partition asked for.
        partition: u32,
        /// How many partitions the topic has.
        partition_count: u32,
    },
    /// The request is malformed or asks for something unsupported.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A configured limit would be exceeded.
    #[error("{what} exceeds the limit of {limit}")]
    LimitExceeded {
        /// What is too large or too many.
        what: String,
        /// The configured limit.
        limit: u64,
    },
    /// The storage engine refused or failed.
    #[error("topic {topic:?} partition {partition}: {source}")]
    Storage {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// What the log said.
        #[source]
        source: StorageError,
    },
    /// Broker metadata on disk could not be read or written.
    #[error("metadata error on {path}: {reason}")]
    Metadata {
        /// The file or folder concerned.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The broker is shutting down and takes no new work.
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// A setting is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Idempotent produce: a batch's sequence is neither the next one expected nor a retry of
    /// a recent batch (a gap or a reordering). Nothing of the entry was appended.
    #[error("topic {topic:?} partition {partition}: producer {producer_id} sent base sequence {base_sequence}, but {reason}; records were lost or reordered before they reached the broker: start a new producer to go on")]
    OutOfOrderSequence {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The producer.
        producer_id: i64,
        /// The sequence the batch starts with.
        base_sequence: i32,
        /// What the broker expected instead.
        reason: String,
    },
    /// Idempotent produce: a newer epoch of the producer id has written to the partition.
    #[error("topic {topic:?} partition {partition}: producer {producer_id} epoch {producer_epoch} is fenced by epoch {current_epoch}: a newer instance of this producer took over; stop this one")]
    ProducerFenced {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The producer.
        producer_id: i64,
        /// The epoch the batch carries.
        producer_epoch: i16,
        /// The epoch the partition knows.
        current_epoch: i16,
    },
    /// Idempotent produce over `ProduceStream`: a newer stream has written this producer's
    /// batches to the partition, so what still arrives on an older stream is a stale copy of a
    /// request the client has already sent again (see `producer_state::StreamOwners`). Nothing
    /// of the entry was appended.
    #[error("topic {topic:?} partition {partition}: producer {producer_id} already writes to this partition over a newer produce stream; requests still arriving on an older stream are stale copies and are not appended")]
    StaleProduceStream {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The producer.
        producer_id: i64,
    },
    /// Idempotent produce: the partition has no state for the producer and the batch does not
    /// start a sequence.
    #[error("topic {topic:?} partition {partition}: no state for producer {producer_id}, and its batch starts at sequence {base_sequence} instead of 0 (the state was lost, e.g. to retention): resend under the next epoch from sequence 0, or under a new producer id from InitProducerId")]
    UnknownProducerId {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The producer.
        producer_id: i64,
        /// The sequence the batch starts with.
        base_sequence: i32,
    },
    /// The group has no such member: it left or was removed (session timeout).
    #[error("group {group:?} has no member {member:?}: it left or was removed; join again")]
    UnknownMember {
        /// The group.
        group: String,
        /// The member id given.
        member: String,
    },
    /// A member asked for a partition it does not own under the epoch it gave.
    #[error(
        "member {member:?} of group {group:?} does not own topic {topic:?} partition {partition} \
         under epoch {epoch} (its epoch is {current}): the partition was revoked or moved; \
         follow the latest assignment"
    )]
    FencedMemberEpoch {
        /// The group.
        group: String,
        /// The member.
        member: String,
        /// The epoch the request gave.
        epoch: i32,
        /// The member's current epoch.
        current: i32,
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
    },
    /// The group has neither members nor committed positions.
    #[error("unknown group {group:?}")]
    UnknownGroup {
        /// The name asked for.
        group: String,
    },
    /// The operation needs a group without members.
    #[error("group {group:?} has {members} live member(s); stop them first")]
    GroupNotEmpty {
        /// The group.
        group: String,
        /// How many members it has.
        members: usize,
    },
}

/// Result alias for the broker.
pub type Result<T, E = BrokerError> = std::result::Result<T, E>;
