//! The gRPC service: translates `octolog.v1` protobuf messages to the broker's domain types and
//! back. Protobuf types stop here. Domain errors become gRPC statuses in one place, [`status`],
//! and per-partition error codes in one place, [`error_code`], with the domain message intact.

use std::sync::Arc;

use octolog_batch::Offset;
use octolog_proto::v1 as pb;
use octolog_proto::v1::octolog_server::Octolog;
use octolog_storage::{FlushPolicy, Log, ReadBatches, StorageError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::broker::{
    Broker, FetchPartition, FetchRequest, OffsetSpec, PendingProduce, ProduceRecord,
    TopicDescription,
};
use crate::error::BrokerError;
use crate::partition::Partition;
use crate::producer_state::OpenStream;

/// Messages queued per push subscription before the subscription waits for the client (gRPC flow
/// control does the rest).
pub const SUBSCRIPTION_QUEUE_DEPTH: usize = 4;

/// Answers queued per produce stream (and, under flush policy `always`, requests waiting for
/// their fsync) before the broker stops reading the stream's requests.
pub const PRODUCE_STREAM_QUEUE_DEPTH: usize = 64;

/// The gRPC status for a domain error.
pub fn status(error: BrokerError) -> Status {
    use tonic::Code;
    let code = match &error {
        BrokerError::UnknownTopic { .. } => Code::NotFound,
        BrokerError::TopicExists { .. } => Code::AlreadyExists,
        BrokerError::InvalidTopicName { .. }
        | BrokerError::InvalidRequest(_)
        | BrokerError::UnknownPartition { .. } => Code::InvalidArgument,
        BrokerError::LimitExceeded { .. } => Code::ResourceExhausted,
        BrokerError::ShuttingDown => Code::Unavailable,
        BrokerError::UnknownGroup { .. } => Code::NotFound,
        BrokerError::UnknownMember { .. }
        | BrokerError::FencedMemberEpoch { .. }
        | BrokerError::GroupNotEmpty { .. } => Code::FailedPrecondition,
        // The request is well-formed but does not fit the partition's producer state.
        BrokerError::OutOfOrderSequence { .. } | BrokerError::UnknownProducerId { .. } => {
            Code::FailedPrecondition
        }
        BrokerError::ProducerFenced { .. } | BrokerError::StaleProduceStream { .. } => {
            Code::PermissionDenied
        }
        BrokerError::Storage { source, .. } => match source {
            StorageError::OffsetOutOfRange { .. } => Code::OutOfRange,
            StorageError::InvalidBatch { .. } | StorageError::EmptyAppend => Code::InvalidArgument,
            StorageError::BatchTooLarge { .. } => Code::ResourceExhausted,
            StorageError::Closed { .. } => Code::Unavailable,
            StorageError::Corrupt { .. } => Code::DataLoss,
            _ => Code::Internal,
        },
        _ => Code::Internal,
    };
    if code == Code::Internal || code == Code::DataLoss {
        tracing::error!(error = %error, "request failed");
    }
    Status::new(code, error.to_string())
}

/// The per-partition error code for a domain error.
pub fn error_code(error: &BrokerError) -> pb::ErrorCode {
    match error {
        BrokerError::UnknownTopic { .. } => pb::ErrorCode::UnknownTopic,
        BrokerError::UnknownPartition { .. } => pb::ErrorCode::UnknownPartition,
        BrokerError::UnknownMember { .. } => pb::ErrorCode::UnknownMember,
        BrokerError::FencedMemberEpoch { .. } => pb::ErrorCode::FencedMemberEpoch,
        BrokerError::OutOfOrderSequence { .. } => pb::ErrorCode::OutOfOrderSequence,
        BrokerError::ProducerFenced { .. } | BrokerError::StaleProduceStream { .. } => {
            pb::ErrorCode::ProducerFenced
        }
        BrokerError::UnknownProducerId { .. } => pb::ErrorCode::UnknownProducerId,
        BrokerError::Storage { source, .. } => match source {
            StorageError::OffsetOutOfRange { .. } => pb::ErrorCode::OffsetOutOfRange,
            StorageError::InvalidBatch { .. } | StorageError::EmptyAppend => {
                pb::ErrorCode::InvalidBatch
            }
            StorageError::BatchTooLarge { .. } => pb::ErrorCode::BatchTooLarge,
            _ => pb::ErrorCode::Storage,
        },
        _ => pb::ErrorCode::InvalidRequest,
    }
}

fn describe(d: TopicDescription) -> pb::TopicDescription {
    pb::TopicDescription {
        name: d.spec.name,
        config: Some(pb::TopicConfig {
            retention_ms: d.spec.retention_ms,
            retention_bytes: d.spec.retention_bytes,
        }),
        partitions: d
            .partitions
            .into_iter()
            .map(|p| pb::PartitionDescription {
                partition: p.partition,
                log_start_offset: p.log_start_offset.0,
                high_watermark: p.high_watermark.0,
                log_end_offset: p.log_end_offset.0,
                segments: p.segments,
                size_bytes: p.size_bytes,
            })
            .collect(),
    }
}

/// The answer for one partition: batches as they are, or decoded records from `from` on. An
/// error still carries the partition's bounds, read from `log` when it exists, so that a reader
/// whose offset is out of range can choose where to resume.
fn partition_data(
    partition: u32,
    result: Result<ReadBatches, BrokerError>,
    from: Offset,
    format: pb::RecordFormat,
    log: Option<&Log>,
) -> pb::PartitionData {
    let read = match result {
        Ok(read) => read,
        Err(e) => {
            return pb::PartitionData {
                partition,
                high_watermark: log.map_or(0, |l| l.high_watermark().0),
                log_start_offset: log.map_or(0, |l| l.log_start_offset().0),
                error_code: error_code(&e) as i32,
                error_message: e.to_string(),
                ..Default::default()
            }
        }
    };
    let mut data = pb::PartitionData {
        partition,
        high_watermark: read.high_watermark.0,
        log_start_offset: read.log_start_offset.0,
        ..Default::default()
    };
    match format {
        pb::RecordFormat::Batches => data.batches = read.batches,
        pb::RecordFormat::Records => match octolog_batch::decode_batches(&read.batches) {
            Ok(records) => {
                data.records = records
                    .into_iter()
                    .filter(|r| r.offset as u64 >= from.0)
                    .map(|r| pb::Record {
                        offset: r.offset as u64,
                        timestamp_ms: Some(r.timestamp_ms),
                        key: r.key,
                        value: r.value,
                        headers: r
                            .headers
                            .into_iter()
                            .map(|h| pb::RecordHeader {
                                key: h.key,
                                value: h.value,
                            })
                            .collect(),
                    })
                    .collect();
            }
            Err(e) => {
                data.error_code = pb::ErrorCode::Storage as i32;
                data.error_message = format!("stored batch does not decode: {e}");
            }
        },
    }
    data
}

/// The result of one partition's part of a produce request.
fn produce_result(
    partition: u32,
    result: Result<octolog_storage::AppendInfo, BrokerError>,
) -> pb::PartitionProduceResult {
    match result {
        Ok(info) => pb::PartitionProduceResult {
            partition,
            base_offset: info.first_offset.0,
            log_end_offset: info.log_end_offset.0,
            ..Default::default()
        },
        Err(e) => pb::PartitionProduceResult {
            partition,
            error_code: error_code(&e) as i32,
            error_message: e.to_string(),
            ..Default::default()
        },
    }
}

/// Each partition of a `ProduceStream` request with its append, pending or failed.
type StreamAppends = Vec<(u32, Result<PendingProduce, BrokerError>)>;

/// Appends the partitions of one request of produce stream `stream` at once, in order. A
/// failure of the request as a whole (unknown topic, malformed, shutting down before anything
/// was appended) is a status; otherwise each partition's append, pending or failed.
fn begin_stream_produce(
    broker: &Broker,
    stream: &OpenStream,
    r: pb::ProduceStreamRequest,
) -> Result<StreamAppends, Status> {
    broker.topic(&r.topic).map_err(status)?;
    check_distinct(r.partitions.iter().map(|p| p.partition))?;
    let mut appends = Vec::with_capacity(r.partitions.len());
    for p in r.partitions {
        let result = broker.produce_batches_ordered(&r.topic, p.partition, p.batches, stream);
        if appends.is_empty() {
            if let Err(BrokerError::ShuttingDown) = result {
                return Err(status(BrokerError::ShuttingDown));
            }
        }
        appends.push((p.partition, result));
    }
    Ok(appends)
}

/// Completes a `ProduceStream` request's appends (waiting for their fsync under flush policy
/// `always`) and builds its answer.
async fn complete_stream_produce(
    request_id: u64,
    appends: StreamAppends,
) -> pb::ProduceStreamResponse {
    let mut partitions = Vec::with_capacity(appends.len());
    for (partition, append) in appends {
        let result = match append {
            Ok(pending) => pending.complete().await,
            Err(e) => Err(e),
        };
        partitions.push(produce_result(partition, result));
    }
    pb::ProduceStreamResponse {
        request_id,
        partitions,
        ..Default::default()
    }
}

/// Refuses a request that names a partition more than once.
fn check_distinct(partitions: impl IntoIterator<Item = u32>) -> Result<(), Status> {
    let mut seen = std::collections::HashSet::new();
    for partition in partitions {
        if !seen.insert(partition) {
            return Err(status(BrokerError::InvalidRequest(format!(
                "the request names partition {partition} more than once"
            ))));
        }
    }
    Ok(())
}

fn format_of(value: i32) -> Result<pb::RecordFormat, Status> {
    pb::RecordFormat::try_from(value)
        .map_err(|_| Status::invalid_argument(format!("unknown record format {value}")))
}

/// The `octolog.v1.Octolog` service over a [`Broker`].
#[derive(Debug, Clone)]
pub struct OctologService {
    broker: Arc<Broker>,
}

impl OctologService {
    /// Serves `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        OctologService { broker }
    }

    /// Runs blocking broker work (file operations) off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Broker) -> Result<T, BrokerError> + Send + 'static,
    ) -> Result<T, Status> {
        let broker = Arc::clone(&self.broker);
        tokio::task::spawn_blocking(move || work(&broker))
            .await
            .map_err(|e| Status::internal(format!("task failed: {e}")))?
            .map_err(status)
    }

    /// Answers a `Fetch` request: the trait method, and the broker's zero-copy path for it
    /// (`fetch_path`), both call this.
    pub(crate) async fn fetch_answer(
        &self,
        r: pb::FetchRequest,
    ) -> Result<pb::FetchResponse, Status> {
        let format = format_of(r.format)?;
        check_distinct(r.partitions.iter().map(|p| p.partition))?;
        let partitions: Vec<FetchPartition> = r
            .partitions
            .iter()
            .map(|p| FetchPartition {
                partition: p.partition,
                offset: Offset(p.offset),
                bytes_max: p.max_bytes,
            })
            .collect();
        let topic = r.topic.clone();
        let answers = self
            .broker
            .fetch(FetchRequest {
                topic: r.topic,
                partitions: partitions.clone(),
                max_wait_ms: r.max_wait_ms,
                min_bytes: r.min_bytes,
                max_bytes: r.max_bytes,
                group: r.group.map(|g| crate::group::MemberContext {
                    group: g.group,
                    member_id: g.member_id,
                    epoch: g.member_epoch,
                }),
            })
            .await
            .map_err(status)?;
        let partitions = answers
            .into_iter()
            .zip(&partitions)
            .map(|(answer, asked)| {
                let log = match &answer.result {
                    Ok(_) => None,
                    Err(_) => self
                        .broker
                        .topic(&topic)
                        .ok()
                        .and_then(|t| t.partition(answer.partition).ok().cloned()),
                };
                partition_data(
                    answer.partition,
                    answer.result,
                    asked.offset,
                    format,
                    log.as_deref().map(Partition::log),
                )
            })
            .collect();
        Ok(pb::FetchResponse { partitions })
    }
}

#[tonic::async_trait]
impl Octolog for OctologService {
    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let r = request.into_inner();
        let config = r.config.unwrap_or_default();
        let partitions = (r.partitions > 0).then_some(r.partitions);
        let description = self
            .blocking(move |b| {
                b.create_topic(
                    &r.name,
                    partitions,
                    config.retention_ms,
                    config.retention_bytes,
                )
            })
            .await?;
        Ok(Response::new(pb::CreateTopicResponse {
            topic: Some(describe(description)),
        }))
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        let name = request.into_inner().name;
        self.blocking(move |b| b.delete_topic(&name)).await?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn list_topics(
        &self,
        _request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let topics = self
            .broker
            .list_topics()
            .into_iter()
            .map(|s| pb::TopicSummary {
                name: s.name,
                partition_count: s.partitions,
            })
            .collect();
        Ok(Response::new(pb::ListTopicsResponse { topics }))
    }

    async fn describe_topic(
        &self,
        request: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::TopicDescription>, Status> {
        let description = self
            .broker
            .describe_topic(&request.into_inner().name)
            .map_err(status)?;
        Ok(Response::new(describe(description)))
    }

    async fn produce(
        &self,
        request: Request<pb::ProduceRequest>,
    ) -> Result<Response<pb::ProduceResponse>, Status> {
        let r = request.into_inner();
        let records = r
            .records
            .into_iter()
            .map(|rec| ProduceRecord {
                key: rec.key,
                value: rec.value,
                headers: rec.headers.into_iter().map(|h| (h.key, h.value)).collect(),
                timestamp_ms: rec.timestamp_ms.filter(|&t| t != 0),
            })
            .collect();
        let acks = self
            .broker
            .produce_records(&r.topic, r.partition, records)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ProduceResponse {
            acks: acks
                .into_iter()
                .map(|(partition, offset)| pb::RecordAck {
                    partition,
                    offset: offset.0,
                })
                .collect(),
        }))
    }

    async fn produce_batches(
        &self,
        request: Request<pb::ProduceBatchesRequest>,
    ) -> Result<Response<pb::ProduceBatchesResponse>, Status> {
        let r = request.into_inner();
        // An unknown topic or a malformed request fails as a whole; the rest is per partition.
        self.broker.topic(&r.topic).map_err(status)?;
        check_distinct(r.partitions.iter().map(|p| p.partition))?;
        let mut results = Vec::with_capacity(r.partitions.len());
        for p in r.partitions {
            let result = self
                .broker
                .produce_batches(&r.topic, p.partition, p.batches)
                .await;
            // Nothing appended yet: fail the request as a whole. Later, report it per
            // partition, since earlier partitions of the request were appended.
            if results.is_empty() {
                if let Err(BrokerError::ShuttingDown) = result {
                    return Err(status(BrokerError::ShuttingDown));
                }
            }
            results.push(produce_result(p.partition, result));
        }
        Ok(Response::new(pb::ProduceBatchesResponse {
            partitions: results,
        }))
    }

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchResponse>, Status> {
        self.fetch_answer(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_offsets(
        &self,
        request: Request<pb::ListOffsetsRequest>,
    ) -> Result<Response<pb::ListOffsetsResponse>, Status> {
        let r = request.into_inner();
        self.broker.topic(&r.topic).map_err(status)?;
        let mut offsets = Vec::with_capacity(r.queries.len());
        for q in r.queries {
            let spec = match q.position {
                Some(pb::offset_query::Position::Earliest(_)) => Ok(OffsetSpec::Earliest),
                Some(pb::offset_query::Position::Latest(_)) => Ok(OffsetSpec::Latest),
                Some(pb::offset_query::Position::TimestampMs(t)) => Ok(OffsetSpec::Timestamp(t)),
                // The query alone is malformed; the others still get their answers.
                None => Err(BrokerError::InvalidRequest(
                    "an offset query needs earliest, latest or timestamp_ms".into(),
                )),
            };
            let found = spec.and_then(|spec| self.broker.list_offset(&r.topic, q.partition, spec));
            offsets.push(match found {
                Ok(offset) => pb::PartitionOffset {
                    partition: q.partition,
                    offset: offset.0,
                    timestamp_ms: -1,
                    ..Default::default()
                },
                Err(e) => pb::PartitionOffset {
                    partition: q.partition,
                    timestamp_ms: -1,
                    error_code: error_code(&e) as i32,
                    error_message: e.to_string(),
                    ..Default::default()
                },
            });
        }
        Ok(Response::new(pb::ListOffsetsResponse { offsets }))
    }

    async fn init_producer_id(
        &self,
        _request: Request<pb::InitProducerIdRequest>,
    ) -> Result<Response<pb::InitProducerIdResponse>, Status> {
        let (producer_id, producer_epoch) = self.blocking(|b| b.init_producer_id()).await?;
        Ok(Response::new(pb::InitProducerIdResponse {
            producer_id,
            producer_epoch: i32::from(producer_epoch),
        }))
    }

    type ProduceStreamStream = ReceiverStream<Result<pb::ProduceStreamResponse, Status>>;

    async fn produce_stream(
        &self,
        request: Request<tonic::Streaming<pb::ProduceStreamRequest>>,
    ) -> Result<Response<Self::ProduceStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(PRODUCE_STREAM_QUEUE_DEPTH);
        let broker = Arc::clone(&self.broker);
        // Open, for the fencing of older streams (`StreamOwners`), until the task below ends.
        let stream = Arc::new(broker.open_produce_stream());
        let mut shutdown = broker.watch_shutdown();
        // One task reads the stream and appends each request before it reads the next: that is
        // the order guarantee. Answers that wait for an fsync are sent by tasks of their own, so
        // the next request is appended meanwhile and shares the fsync.
        tokio::spawn(async move {
            // The id the next request should have (they count up from 0).
            let mut next_id = 0u64;
            let policy = broker.config().flush_policy().ok();
            let fsyncs = policy == Some(FlushPolicy::Always);
            // Under `always` and `interval-ms`, a roll fsyncs the sealed segment: appends then
            // run on a blocking thread, awaited before the next request is read (the order).
            let blocking = policy != Some(FlushPolicy::Never);
            let waiting = Arc::new(tokio::sync::Semaphore::new(PRODUCE_STREAM_QUEUE_DEPTH));
            let down = "the broker is shutting down";
            loop {
                let message = tokio::select! {
                    biased;
                    _ = shutdown.wait_for(|down| *down) => {
                        let _ = tx.try_send(Err(Status::unavailable(down)));
                        return;
                    }
                    message = inbound.message() => message,
                };
                let r = match message {
                    Ok(Some(r)) => r,
                    // The client is done sending; answers still waiting are sent by their tasks.
                    Ok(None) => return,
                    Err(e) if crate::server::is_oversize(&e) => {
                        // The stream cannot go on past a message it could not read, but the
                        // client learns which request was refused and why.
                        let refused = Status::resource_exhausted(format!(
                            "the request exceeds the broker's request_bytes_max: {}; send smaller requests",
                            e.message()
                        ));
                        let answer = pb::ProduceStreamResponse {
                            request_id: next_id,
                            status_code: refused.code() as i32,
                            status_message: refused.message().to_string(),
                            partitions: Vec::new(),
                        };
                        if tx.send(Ok(answer)).await.is_ok() {
                            let _ = tx.send(Err(refused)).await;
                        }
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "produce stream broken");
                        return;
                    }
                };
                let request_id = r.request_id;
                next_id = request_id.wrapping_add(1);
                let failed = |failed: Status| pb::ProduceStreamResponse {
                    request_id,
                    status_code: failed.code() as i32,
                    status_message: failed.message().to_string(),
                    partitions: Vec::new(),
                };
                // Under `always`, answered once durable by a task of its own, so the next
                // request is appended meanwhile and shares the fsync. The permit bounds the
                // requests waiting so (the client may not be reading its answers).
                let permit = if fsyncs {
                    tokio::select! {
                        biased;
                        _ = shutdown.wait_for(|down| *down) => {
                            let _ = tx.try_send(Err(Status::unavailable(down)));
                            return;
                        }
                        permit = Arc::clone(&waiting).acquire_owned() => match permit {
                            Ok(permit) => Some(permit),
                            Err(_) => return,
                        },
                    }
                } else {
                    None
                };
                // A client that is gone (its connection failed) may already be sending these
                // records again on a new stream, under a new producer identity if an earlier one
                // failed: appending this stale copy late could store them twice.
                if tx.is_closed() {
                    return;
                }
                let begun = if blocking {
                    let broker = Arc::clone(&broker);
                    let stream = Arc::clone(&stream);
                    tokio::task::spawn_blocking(move || begin_stream_produce(&broker, &stream, r))
                        .await
                        .unwrap_or_else(|e| {
                            Err(Status::internal(format!("append task failed: {e}")))
                        })
                } else {
                    begin_stream_produce(&broker, &stream, r)
                };
                let answer = match begun {
                    Err(status) => failed(status),
                    Ok(appends) if permit.is_some() => {
                        let tx = tx.clone();
                        let mut shutdown = broker.watch_shutdown();
                        tokio::spawn(async move {
                            let answer = complete_stream_produce(request_id, appends).await;
                            tokio::select! {
                                _ = tx.send(Ok(answer)) => {}
                                _ = shutdown.wait_for(|down| *down) => {}
                            }
                            drop(permit);
                        });
                        continue;
                    }
                    Ok(appends) => complete_stream_produce(request_id, appends).await,
                };
                // A full queue is the client not reading its answers: stop reading its
                // requests until it does (but not past shutdown).
                tokio::select! {
                    sent = tx.send(Ok(answer)) => if sent.is_err() {
                        return;
                    },
                    _ = shutdown.wait_for(|down| *down) => {
                        let _ = tx.try_send(Err(Status::unavailable(down)));
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type SubscribeStream = ReceiverStream<Result<pb::SubscribeResponse, Status>>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let r = request.into_inner();
        let format = format_of(r.format)?;
        let topic = self.broker.topic(&r.topic).map_err(status)?;
        if r.partitions.is_empty() {
            return Err(Status::invalid_argument(
                "a subscription needs at least one partition",
            ));
        }
        check_distinct(r.partitions.iter().map(|p| p.partition))?;
        let mut positions = Vec::with_capacity(r.partitions.len());
        for p in &r.partitions {
            positions.push((
                Arc::clone(topic.partition(p.partition).map_err(status)?),
                Offset(p.offset),
            ));
        }
        let permit = self.broker.subscription_permit().map_err(status)?;
        let bytes_max = match r.max_bytes {
            0 => self.broker.config().fetch_bytes_max,
            n => n.min(self.broker.config().fetch_bytes_max),
        } as usize;
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_QUEUE_DEPTH);
        let mut shutdown = self.broker.watch_shutdown();
        let broker = Arc::clone(&self.broker);
        tokio::spawn(async move {
            let _permit = permit;
            let mut appended = topic.watch_appends();
            loop {
                appended.borrow_and_update();
                let mut sent = false;
                // A partition that fails is reported once and no longer followed.
                let mut failed_partitions = Vec::new();
                for (index, (partition, position)) in positions.iter_mut().enumerate() {
                    let result = partition.read(*position, bytes_max);
                    let failed = result.is_err();
                    let has_data = result.as_ref().is_ok_and(|read| !read.batches.is_empty());
                    if !(failed || has_data) {
                        continue;
                    }
                    // The log says where the next read continues, whatever the format sent.
                    let next = result.as_ref().map_or(*position, |read| read.next_offset);
                    let log = Some(partition.log());
                    let data = partition_data(partition.id(), result, *position, format, log);
                    *position = next.max(*position);
                    // Wait for room in the queue (the client's pace), but not past shutdown: a
                    // client that stops reading must not hold the broker's shutdown up.
                    let permit = tokio::select! {
                        permit = tx.reserve() => match permit {
                            Ok(permit) => permit,
                            Err(_) => return,
                        },
                        _ = shutdown.wait_for(|down| *down) => {
                            let _ = tx.try_send(Err(Status::unavailable("the broker is shutting down")));
                            return;
                        }
                    };
                    permit.send(Ok(pb::SubscribeResponse { data: Some(data) }));
                    if failed {
                        failed_partitions.push(index);
                    }
                    sent = true;
                }
                for index in failed_partitions.into_iter().rev() {
                    positions.remove(index);
                }
                if positions.is_empty() {
                    return;
                }
                if !sent {
                    tokio::select! {
                        changed = appended.changed() => if changed.is_err() { return },
                        _ = shutdown.changed() => {}
                        _ = tx.closed() => return,
                    }
                }
                if *shutdown.borrow() {
                    let _ = tx.try_send(Err(Status::unavailable("the broker is shutting down")));
                    return;
                }
                if !broker
                    .topic(topic.name())
                    .is_ok_and(|current| Arc::ptr_eq(&current, &topic))
                {
                    let gone = BrokerError::UnknownTopic {
                        topic: topic.name().to_string(),
                    };
                    let _ = tx.try_send(Err(status(gone)));
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
