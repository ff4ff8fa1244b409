//! Errors of the client.

use octolog_batch::BatchError;

/// What went wrong talking to a broker.
#[non_exhaustive]
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The broker could not be reached.
    #[error("cannot connect to broker at {addr}: {reason}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why it failed.
        reason: String,
    },
    /// The broker answered with an error status.
    #[error("{message}")]
    Broker {
        /// The gRPC status code.
        code: tonic::Code,
        /// The broker's message.
        message: String,
    },
    /// The broker refused one partition's part of a request.
    #[error("topic {topic:?} partition {partition}: {message}")]
    Partition {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The broker's error code, as its protobuf number.
        code: i32,
        /// The broker's message.
        message: String,
    },
    /// A fetched batch failed its checks (CRC-32C, structure).
    #[error("corrupt batch from topic {topic:?} partition {partition}: {source}")]
    CorruptBatch {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// What is wrong.
        #[source]
        source: BatchError,
    },
    /// A position outside what the partition holds.
    #[error("offset {offset} is out of range for topic {topic:?} partition {partition}: it holds offsets {log_start_offset}..{high_watermark}")]
    OffsetOutOfRange {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The offset asked for.
        offset: octolog_batch::Offset,
        /// The oldest offset held.
        log_start_offset: octolog_batch::Offset,
        /// The next offset to be written.
        high_watermark: octolog_batch::Offset,
    },
    /// The broker did not answer in time.
    #[error(
        "no answer to {operation} within {after:?}: the broker may be overloaded or unreachable"
    )]
    Timeout {
        /// The request that went unanswered.
        operation: &'static str,
        /// How long it waited.
        after: std::time::Duration,
    },
    /// The caller asked for something invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The producer or consumer was closed.
    #[error("closed")]
    Closed,
}

impl ClientError {
    /// Whether a consumer-group member was refused because it does not own the partition
    /// under its epoch (it moved), or is no longer a member.
    pub fn is_fenced(&self) -> bool {
        const UNKNOWN_MEMBER: i32 = octolog_proto::v1::ErrorCode::UnknownMember as i32;
        const FENCED_MEMBER_EPOCH: i32 = octolog_proto::v1::ErrorCode::FencedMemberEpoch as i32;
        matches!(
            self,
            ClientError::Partition {
                code: UNKNOWN_MEMBER | FENCED_MEMBER_EPOCH,
                ..
            }
        )
    }

    /// Whether the error is an unknown topic: one that does not exist, or was deleted while a
    /// request waited on it.
    pub fn is_unknown_topic(&self) -> bool {
        matches!(
            self,
            ClientError::Broker {
                code: tonic::Code::NotFound,
                ..
            } | ClientError::Partition { code: 1, .. }
        )
    }

    /// Whether the error is a topic that exists already (on create).
    pub fn is_already_exists(&self) -> bool {
        matches!(
            self,
            ClientError::Broker {
                code: tonic::Code::AlreadyExists,
                ..
            }
        )
    }

    /// Whether the error is an offset outside the log: found by a seek, or reported by the
    /// broker.
    pub fn is_offset_out_of_range(&self) -> bool {
        matches!(
            self,
            ClientError::OffsetOutOfRange { .. }
                | ClientError::Broker {
                    code: tonic::Code::OutOfRange,
                    ..
                }
                | ClientError::Partition { code: 3, .. }
        )
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Broker {
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

/// Result alias for the client.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
