//! The gRPC `Groups` service: each member's `Join` stream (its session), and group listing,
//! description and reset. Protobuf stops here; the rules live in `group`.
//!
//! A session is one task per member. It sends the member's assignments as they change (woken by
//! the coordinator, never polling), answers commits once they are durable, and removes the member
//! when the stream ends without a `leave` (a crash, as far as the group can tell), when the member
//! stays silent past its session timeout, or when it does not release partitions in time.

use std::sync::Arc;
use std::time::Duration;

use octolog_proto::v1 as pb;
use pb::member_request::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::broker::OffsetSpec;
use crate::error::BrokerError;
use crate::group::{Assignment, GroupState, MemberContext, TopicPartition};
use crate::service::{error_code, status};
use crate::Broker;

/// Events queued for a member's stream: assignments are coalesced by the coordinator and commit
/// answers come one per commit, so a short queue suffices.
const MEMBER_QUEUE_DEPTH: usize = 16;
/// How long a new stream may take to send its `join`.
const JOIN_WAIT: Duration = Duration::from_secs(30);

/// The `Groups` service.
#[derive(Debug, Clone)]
pub struct GroupService {
    broker: Arc<Broker>,
}

impl GroupService {
    /// Serves the groups of `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        GroupService { broker }
    }
}

fn state_of(state: GroupState) -> pb::GroupState {
    match state {
        GroupState::Empty => pb::GroupState::Empty,
        GroupState::Stable => pb::GroupState::Stable,
        GroupState::Reconciling => pb::GroupState::Reconciling,
    }
}

fn positions(offsets: Vec<pb::TopicPartitionOffset>) -> Vec<(TopicPartition, u64)> {
    offsets
        .into_iter()
        .map(|o| ((o.topic, o.partition), o.offset))
        .collect()
}

fn assignment_event(a: Assignment) -> pb::MemberEvent {
    pb::MemberEvent {
        kind: Some(pb::member_event::Kind::Assignment(pb::Assignment {
            member_epoch: a.epoch,
            partitions: a
                .partitions
                .into_iter()
                .map(|p| pb::AssignedPartition {
                    topic: p.partition.0,
                    partition: p.partition.1,
                    committed: p.committed.is_some(),
                    committed_offset: p.committed.unwrap_or(0),
                    redelivered_until: p.redelivered_until,
                })
                .collect(),
        })),
    }
}

fn commit_event(
    request_id: u64,
    offsets: &[(TopicPartition, u64)],
    results: crate::Result<Vec<crate::Result<()>>>,
) -> pb::MemberEvent {
    let results: Vec<crate::Result<()>> = match results {
        Ok(results) => results,
        Err(e) => {
            // Nothing was written: every position fails with the same error.
            let message = e.to_string();
            offsets
                .iter()
                .map(|_| Err(BrokerError::InvalidRequest(message.clone())))
                .collect()
        }
    };
    pb::MemberEvent {
        kind: Some(pb::member_event::Kind::CommitResult(pb::CommitResult {
            request_id,
            partitions: offsets
                .iter()
                .zip(results)
                .map(|((tp, _), result)| {
                    let (code, message) = match result {
                        Ok(()) => (pb::ErrorCode::None, String::new()),
                        Err(e) => (error_code(&e), e.to_string()),
                    };
                    pb::CommitPartitionResult {
                        topic: tp.0.clone(),
                        partition: tp.1,
                        error_code: code as i32,
                        error_message: message,
                    }
                })
                .collect(),
        })),
    }
}

/// What ends a session.
enum End {
    /// The member left cleanly, or its stream closed (it was removed as crashed).
    Quiet,
    /// The broker ends the stream with this status.
    Status(Status),
}

/// Runs a coordinator call that writes to disk on a blocking thread.
async fn blocking<T: Send + 'static>(
    broker: &Arc<Broker>,
    what: &'static str,
    call: impl FnOnce(&Broker) -> crate::Result<T> + Send + 'static,
) -> crate::Result<T> {
    let broker = Arc::clone(broker);
    tokio::task::spawn_blocking(move || call(&broker))
        .await
        .unwrap_or_else(|e| {
            Err(BrokerError::InvalidRequest(format!(
                "{what} task failed: {e}"
            )))
        })
}

fn not_reading(group: &str) -> Status {
    Status::failed_precondition(format!(
        "removed from group {group:?}: it did not read its stream within its session timeout"
    ))
}

/// One member's session: see the module documentation.
async fn session(
    broker: Arc<Broker>,
    group: String,
    member: String,
    notify: Arc<tokio::sync::Notify>,
    mut inbound: Streaming<pb::MemberRequest>,
    tx: mpsc::Sender<Result<pb::MemberEvent, Status>>,
) {
    let groups = || broker.groups();
    let count = |t: &str| broker.partition_count(t);
    let mut shutdown = broker.watch_shutdown();
    let mut epoch = 0;
    let end = loop {
        let deadline = match groups().deadline(&group, &member) {
            Ok(deadline) => deadline,
            Err(e) => break End::Status(status(e)),
        };
        match groups().take_assignment(&group, &member) {
            Ok(Some(assignment)) => {
                epoch = assignment.epoch;
                // A member that stops reading its stream is removed at its deadline like a
                // silent one.
                let sent =
                    tokio::time::timeout_at(deadline, tx.send(Ok(assignment_event(assignment))));
                match sent.await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) => break End::Quiet,
                    // Not delivered: the member does not know its partitions, so it cannot
                    // stay. Removed as crashed below.
                    Err(_) => break End::Status(not_reading(&group)),
                }
            }
            Ok(None) => {}
            Err(e) => break End::Status(status(e)),
        }
        let ctx = MemberContext {
            group: group.clone(),
            member_id: member.clone(),
            epoch,
        };
        tokio::select! {
            message = inbound.message() => {
                let message = match message {
                    Ok(Some(message)) => message,
                    // The member closed its stream or its connection broke.
                    Ok(None) | Err(_) => break End::Quiet,
                };
                if let Err(e) = groups().touch(&group, &member) {
                    break End::Status(status(e));
                }
                match message.kind {
                    None | Some(Kind::Heartbeat(_)) => {}
                    Some(Kind::Join(_)) => {
                        break End::Status(Status::invalid_argument("a member joins once per stream; open a new stream to join again"));
                    }
                    Some(Kind::Commit(c)) => {
                        let ctx = MemberContext { epoch: c.member_epoch, ..ctx };
                        let offsets = positions(c.offsets);
                        let o = offsets.clone();
                        let results = blocking(&broker, "commit", move |b| {
                            b.groups().commit(&ctx, &o, &|t| b.partition_count(t))
                        })
                        .await;
                        let answer = Ok(commit_event(c.request_id, &offsets, results));
                        match tokio::time::timeout_at(deadline, tx.send(answer)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => break End::Quiet,
                            // A member that stops reading its stream cannot hold on for ever.
                            Err(_) => break End::Status(not_reading(&group)),
                        }
                    }
                    Some(Kind::Release(r)) => {
                        let ctx = MemberContext { epoch: r.member_epoch, ..ctx };
                        let offsets = positions(r.offsets);
                        let without: Vec<TopicPartition> =
                            r.partitions.into_iter().map(|p| (p.topic, p.partition)).collect();
                        let released = blocking(&broker, "release", move |b| {
                            b.groups().release(&ctx, &offsets, &without, &|t| b.partition_count(t))
                        })
                        .await;
                        match released {
                            Ok(results) => {
                                for e in results.into_iter().filter_map(Result::err) {
                                    tracing::warn!(group = %group, member = %member, error = %e, "final commit of a released partition refused");
                                }
                            }
                            Err(e) => break End::Status(status(e)),
                        }
                    }
                    Some(Kind::Leave(l)) => {
                        let ctx = MemberContext { epoch: l.member_epoch, ..ctx };
                        let offsets = positions(l.offsets);
                        let o = offsets.clone();
                        let results = blocking(&broker, "leave", move |b| {
                            b.groups().leave(&ctx, &o, &|t| b.partition_count(t))
                        })
                        .await;
                        // The final commit's outcome, then the end of the stream. If the leave
                        // failed, the member is still there: removed as crashed below.
                        let answer = Ok(commit_event(0, &offsets, results));
                        let _ = tokio::time::timeout_at(deadline, tx.send(answer)).await;
                        break End::Quiet;
                    }
                }
            }
            () = notify.notified() => {}
            () = tokio::time::sleep_until(deadline) => {
                if let Some(reason) = groups().expire_if_due(&group, &member, &count) {
                    break End::Status(Status::failed_precondition(format!(
                        "removed from group {group:?}: {reason}; join again"
                    )));
                }
            }
            _ = async { shutdown.wait_for(|down| *down).await.is_ok() } => {
                break End::Status(Status::unavailable("the broker is shutting down"));
            }
        }
    };
    // Whatever ended the session, the member is gone: as far as the group knows, it crashed.
    groups().remove(&group, &member, &count);
    if let End::Status(s) = end {
        let _ = tx.try_send(Err(s));
    }
}

#[tonic::async_trait]
impl pb::groups_server::Groups for GroupService {
    type JoinStream = ReceiverStream<Result<pb::MemberEvent, Status>>;

    async fn join(
        &self,
        request: Request<Streaming<pb::MemberRequest>>,
    ) -> Result<Response<Self::JoinStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(JOIN_WAIT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no join message arrived"))??;
        let join = match first.and_then(|m| m.kind) {
            Some(Kind::Join(join)) => join,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on a Join stream must be join",
                ))
            }
        };
        self.broker.check_running().map_err(status)?;
        for topic in &join.topics {
            self.broker.topic(topic).map_err(status)?;
        }
        let broker = Arc::clone(&self.broker);
        let joined = broker
            .groups()
            .join(
                &join.group,
                join.topics,
                join.session_timeout_ms,
                join.rebalance_timeout_ms,
                join.client_id,
                &|t| broker.partition_count(t),
            )
            .map_err(status)?;
        let (tx, rx) = mpsc::channel(MEMBER_QUEUE_DEPTH);
        tx.try_send(Ok(pb::MemberEvent {
            kind: Some(pb::member_event::Kind::Joined(pb::Joined {
                member_id: joined.member_id.clone(),
                session_timeout_ms: joined.session_timeout.as_millis() as u32,
                heartbeat_interval_ms: joined.heartbeat_interval.as_millis() as u32,
            })),
        }))
        .expect("a new queue has room");
        tokio::spawn(session(
            broker,
            join.group,
            joined.member_id,
            joined.notify,
            inbound,
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_groups(
        &self,
        _request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let groups = self
            .broker
            .groups()
            .list()
            .into_iter()
            .map(|(name, state, members)| pb::GroupSummary {
                name,
                state: state_of(state) as i32,
                members: members as u32,
            })
            .collect();
        Ok(Response::new(pb::ListGroupsResponse { groups }))
    }

    async fn describe_group(
        &self,
        request: Request<pb::DescribeGroupRequest>,
    ) -> Result<Response<pb::GroupDescription>, Status> {
        let name = request.into_inner().group;
        crate::group::validate_group_name(&name).map_err(status)?;
        let broker = &self.broker;
        let d = broker
            .groups()
            .describe(&name, &|t| broker.partition_count(t))
            .map_err(status)?;
        let partitions = d
            .partitions
            .into_iter()
            .map(|p| {
                let (topic, partition) = p.partition;
                let (start, hw) = broker
                    .topic(&topic)
                    .ok()
                    .and_then(|t| {
                        let log = t.partition(partition).ok()?.log();
                        Some((log.log_start_offset().0, log.high_watermark().0))
                    })
                    .unwrap_or((0, 0));
                let from = p.committed.unwrap_or(start).max(start);
                pb::PartitionLag {
                    topic,
                    partition,
                    committed: p.committed.is_some(),
                    committed_offset: p.committed.unwrap_or(0),
                    high_watermark: hw,
                    lag: hw.saturating_sub(from),
                    owner: p.owner.unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(pb::GroupDescription {
            name: d.name,
            state: state_of(d.state) as i32,
            members: d
                .members
                .into_iter()
                .map(|m| pb::MemberDescription {
                    member_id: m.member_id,
                    client_id: m.client_id,
                    member_epoch: m.epoch,
                    topics: m.topics,
                    assigned: m
                        .owned
                        .into_iter()
                        .map(|(topic, partition)| pb::TopicPartition { topic, partition })
                        .collect(),
                })
                .collect(),
            partitions,
        }))
    }

    async fn reset_group(
        &self,
        request: Request<pb::ResetGroupRequest>,
    ) -> Result<Response<pb::ResetGroupResponse>, Status> {
        let r = request.into_inner();
        crate::group::validate_group_name(&r.group).map_err(status)?;
        let topic = self.broker.topic(&r.topic).map_err(status)?;
        let Some(to) = r.to else {
            return Err(Status::invalid_argument(
                "a reset needs earliest, latest, offset or timestamp_ms",
            ));
        };
        let mut new_positions = Vec::new();
        for partition in 0..topic.partition_count() {
            let log_bounds = topic.partition(partition).map_err(status)?.log();
            let (start, hw) = (
                log_bounds.log_start_offset().0,
                log_bounds.high_watermark().0,
            );
            let offset = match &to {
                pb::reset_group_request::To::Earliest(_) => start,
                pb::reset_group_request::To::Latest(_) => hw,
                // Clamped into what the partition holds, as Kafka's reset does.
                pb::reset_group_request::To::Offset(o) => (*o).clamp(start, hw),
                pb::reset_group_request::To::TimestampMs(t) => {
                    self.broker
                        .list_offset(&r.topic, partition, OffsetSpec::Timestamp(*t))
                        .map_err(status)?
                        .0
                }
            };
            new_positions.push(((r.topic.clone(), partition), offset));
        }
        let broker = Arc::clone(&self.broker);
        let group = r.group.clone();
        let to_write = new_positions.clone();
        tokio::task::spawn_blocking(move || broker.groups().reset(&group, &to_write))
            .await
            .map_err(|e| Status::internal(format!("reset task failed: {e}")))?
            .map_err(status)?;
        tracing::info!(group = %r.group, topic = %r.topic, "group positions reset");
        Ok(Response::new(pb::ResetGroupResponse {
            offsets: new_positions
                .into_iter()
                .map(|((topic, partition), offset)| pb::TopicPartitionOffset {
                    topic,
                    partition,
                    offset,
                })
                .collect(),
        }))
    }
}
