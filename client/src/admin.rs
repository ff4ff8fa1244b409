//! Topic administration and offset look-ups.

use octolog_batch::Offset;
use octolog_proto::v1 as pb;

use crate::error::Result;
use crate::Client;

/// Most offset queries in one `ListOffsets` request: a topic has at most 10,000 partitions by
/// default, so one request covers it, and the request stays far below the broker's size limit.
pub(crate) const OFFSET_QUERIES_PER_REQUEST_MAX: usize = 10_000;

/// Settings of a new topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicOptions {
    partitions: Option<u32>,
    retention_ms: Option<i64>,
    retention_bytes: Option<i64>,
}

impl TopicOptions {
    /// Defaults: the broker's default partition count and retention.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of partitions. Default: the broker's `default_partitions` (1).
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = Some(partitions);
        self
    }

    /// Retention by age in ms, `-1` for forever. Default: the broker's (7 days).
    pub fn retention_ms(mut self, retention_ms: i64) -> Self {
        self.retention_ms = Some(retention_ms);
        self
    }

    /// Retention by size per partition in bytes, `-1` for no limit. Default: the broker's (none).
    pub fn retention_bytes(mut self, retention_bytes: i64) -> Self {
        self.retention_bytes = Some(retention_bytes);
        self
    }
}

/// One partition of a topic, as the broker describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    partition: u32,
    log_start_offset: Offset,
    high_watermark: Offset,
    log_end_offset: Offset,
    segments: u32,
    size_bytes: u64,
}

impl PartitionInfo {
    /// The partition number.
    pub fn partition(&self) -> u32 {
        self.partition
    }
    /// The oldest offset still held.
    pub fn log_start_offset(&self) -> Offset {
        self.log_start_offset
    }
    /// Consumers read below this offset.
    pub fn high_watermark(&self) -> Offset {
        self.high_watermark
    }
    /// The next offset to be assigned.
    pub fn log_end_offset(&self) -> Offset {
        self.log_end_offset
    }
    /// Number of segments.
    pub fn segments(&self) -> u32 {
        self.segments
    }
    /// Bytes of log on disk.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
}

/// A topic, as the broker describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    name: String,
    retention_ms: Option<i64>,
    retention_bytes: Option<i64>,
    partitions: Vec<PartitionInfo>,
}

impl TopicInfo {
    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The topic's own retention by age, if it sets one.
    pub fn retention_ms(&self) -> Option<i64> {
        self.retention_ms
    }
    /// The topic's own retention by size, if it sets one.
    pub fn retention_bytes(&self) -> Option<i64> {
        self.retention_bytes
    }
    /// Its partitions, in order.
    pub fn partitions(&self) -> &[PartitionInfo] {
        &self.partitions
    }

    pub(crate) fn from_proto(t: pb::TopicDescription) -> TopicInfo {
        let config = t.config.unwrap_or_default();
        TopicInfo {
            name: t.name,
            retention_ms: config.retention_ms,
            retention_bytes: config.retention_bytes,
            partitions: t
                .partitions
                .into_iter()
                .map(|p| PartitionInfo {
                    partition: p.partition,
                    log_start_offset: Offset(p.log_start_offset),
                    high_watermark: Offset(p.high_watermark),
                    log_end_offset: Offset(p.log_end_offset),
                    segments: p.segments,
                    size_bytes: p.size_bytes,
                })
                .collect(),
        }
    }
}

/// Where to look up an offset in a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The oldest offset still held.
    Earliest,
    /// The offset the next record will get (the high watermark).
    Latest,
    /// The first record with a timestamp at or after this many ms since the epoch; the high
    /// watermark if there is none.
    Timestamp(i64),
}

/// Topic administration. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Admin {
    client: Client,
}

impl Admin {
    pub(crate) fn new(client: Client) -> Admin {
        Admin { client }
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Creates a topic.
    ///
    /// # Errors
    ///
    /// The broker's error: invalid name, existing topic, too many partitions.
    pub async fn create_topic(&self, name: &str, options: TopicOptions) -> Result<TopicInfo> {
        let response = self
            .client
            .rpc()
            .create_topic(pb::CreateTopicRequest {
                name: name.to_string(),
                partitions: options.partitions.unwrap_or(0),
                config: Some(pb::TopicConfig {
                    retention_ms: options.retention_ms,
                    retention_bytes: options.retention_bytes,
                }),
            })
            .await?
            .into_inner();
        Ok(TopicInfo::from_proto(response.topic.unwrap_or_default()))
    }

    /// Deletes a topic and all its records.
    ///
    /// # Errors
    ///
    /// The broker's error, e.g. unknown topic.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        self.client
            .rpc()
            .delete_topic(pb::DeleteTopicRequest {
                name: name.to_string(),
            })
            .await?;
        Ok(())
    }

    /// Every topic's name and partition count, sorted by name.
    ///
    /// # Errors
    ///
    /// The broker's error.
    pub async fn list_topics(&self) -> Result<Vec<(String, u32)>> {
        let response = self
            .client
            .rpc()
            .list_topics(pb::ListTopicsRequest {})
            .await?
            .into_inner();
        Ok(response
            .topics
            .into_iter()
            .map(|t| (t.name, t.partition_count))
            .collect())
    }

    /// A topic with its partitions' offsets and sizes.
    ///
    /// # Errors
    ///
    /// The broker's error, e.g. unknown topic.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        let response = self
            .client
            .rpc()
            .describe_topic(pb::DescribeTopicRequest {
                name: name.to_string(),
            })
            .await?
            .into_inner();
        Ok(TopicInfo::from_proto(response))
    }

    /// Looks up an offset in a partition.
    ///
    /// # Errors
    ///
    /// The broker's error, e.g. unknown topic or partition.
    pub async fn list_offset(
        &self,
        topic: &str,
        partition: u32,
        spec: OffsetSpec,
    ) -> Result<Offset> {
        let offsets = self.list_offsets(topic, &[(partition, spec)]).await?;
        Ok(offsets[0])
    }

    /// Looks up offsets in several partitions of a topic, with one request per
    /// `OFFSET_QUERIES_PER_REQUEST_MAX` (10,000) queries rather than one per partition. Returns
    /// one offset per query, in order.
    ///
    /// # Errors
    ///
    /// The broker's error, e.g. unknown topic; the first query's error, e.g. unknown partition.
    pub async fn list_offsets(
        &self,
        topic: &str,
        queries: &[(u32, OffsetSpec)],
    ) -> Result<Vec<Offset>> {
        let mut offsets = Vec::with_capacity(queries.len());
        for chunk in queries.chunks(OFFSET_QUERIES_PER_REQUEST_MAX) {
            let response = self
                .client
                .rpc()
                .list_offsets(pb::ListOffsetsRequest {
                    topic: topic.to_string(),
                    queries: chunk
                        .iter()
                        .map(|&(partition, spec)| pb::OffsetQuery {
                            partition,
                            position: Some(match spec {
                                OffsetSpec::Earliest => {
                                    pb::offset_query::Position::Earliest(pb::Earliest {})
                                }
                                OffsetSpec::Latest => {
                                    pb::offset_query::Position::Latest(pb::Latest {})
                                }
                                OffsetSpec::Timestamp(t) => {
                                    pb::offset_query::Position::TimestampMs(t)
                                }
                            }),
                        })
                        .collect(),
                })
                .await?
                .into_inner();
            if response.offsets.len() != chunk.len() {
                return Err(crate::ClientError::Broker {
                    code: tonic::Code::Internal,
                    message: format!(
                        "the broker answered {} list-offsets queries with {} offsets",
                        chunk.len(),
                        response.offsets.len()
                    ),
                });
            }
            for (&(partition, _), answer) in chunk.iter().zip(response.offsets) {
                crate::check_partition_error(
                    topic,
                    partition,
                    answer.error_code,
                    &answer.error_message,
                )?;
                offsets.push(Offset(answer.offset));
            }
        }
        Ok(offsets)
    }
}
