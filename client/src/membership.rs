//! A consumer's membership in a group: one background task holds the `Join` stream open, sends
//! heartbeats, forwards assignments to the consumer and carries its commits, releases and leave.
//! When the session is lost (broker restart, removal after a timeout), the task reports it and
//! joins again as a new member, with bounded back-off and a bounded number of attempts.
//!
//! States of the task: *joining* (stream opening, waiting for `joined`), *member* (forwarding
//! events and commands), *lost* (reports `Lost`, fails pending commits, backs off, joins again),
//! *left* (after `leave` was answered, or the consumer was dropped: the task ends).

use std::collections::HashMap;
use std::time::Duration;

use octolog_proto::v1 as pb;
use pb::member_event::Kind as EventKind;
use pb::member_request::Kind as RequestKind;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{ClientError, Result};
use crate::Client;

/// Messages queued towards the broker on the stream.
const OUTBOUND_DEPTH: usize = 16;
/// Events queued towards the consumer.
pub(crate) const EVENTS_DEPTH: usize = 16;
/// Commands queued from the consumer.
pub(crate) const COMMANDS_DEPTH: usize = 16;
/// Attempts to join again after losing the session, before giving up.
const REJOIN_ATTEMPTS_MAX: u32 = 600;
/// First and longest pause between attempts to join.
const REJOIN_BACKOFF_MIN: Duration = Duration::from_millis(50);
const REJOIN_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A partition of an assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Assigned {
    pub partition: u32,
    pub committed: Option<u64>,
    pub redelivered_until: u64,
}

/// What the task tells the consumer.
#[derive(Debug)]
pub(crate) enum Event {
    /// Joined as this member.
    Joined { member_id: String },
    /// The full set of partitions owned from now on, under `epoch`.
    Assignment {
        epoch: i32,
        partitions: Vec<Assigned>,
    },
    /// The session is gone, and with it every partition; the task joins again.
    Lost(ClientError),
    /// The task gave up joining; the consumer cannot go on.
    Failed(ClientError),
}

/// What the consumer asks of the task.
#[derive(Debug)]
pub(crate) enum Command {
    /// Commit positions (partition, offset) under `epoch`; the answer comes once durable.
    Commit {
        epoch: i32,
        offsets: Vec<(u32, u64)>,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Give up partitions, committing these final positions.
    Release {
        epoch: i32,
        offsets: Vec<(u32, u64)>,
    },
    /// Leave the group with final positions; answered when the broker confirmed the commit.
    Leave {
        epoch: i32,
        offsets: Vec<(u32, u64)>,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// Settings of the membership.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub client: Client,
    pub group: String,
    pub topic: String,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
    pub client_id: String,
}

fn offsets_pb(topic: &str, offsets: &[(u32, u64)]) -> Vec<pb::TopicPartitionOffset> {
    offsets
        .iter()
        .map(|&(partition, offset)| pb::TopicPartitionOffset {
            topic: topic.to_string(),
            partition,
            offset,
        })
        .collect()
}

fn commit_outcome(topic: &str, result: pb::CommitResult) -> Result<()> {
    for p in result.partitions {
        crate::check_partition_error(topic, p.partition, p.error_code, &p.error_message)?;
    }
    Ok(())
}

/// How one session ended.
enum SessionEnd {
    /// Left cleanly or the consumer is gone: stop.
    Done,
    /// Lost: join again.
    Lost(ClientError),
}

/// Runs the membership until the consumer leaves or drops its handle.
pub(crate) async fn run(
    settings: Settings,
    events: mpsc::Sender<Event>,
    mut commands: mpsc::Receiver<Command>,
) {
    let mut attempts = 0u32;
    let mut backoff = REJOIN_BACKOFF_MIN;
    let mut ever_joined = false;
    loop {
        let (end, joined) = session(&settings, &events, &mut commands).await;
        let error = match end {
            SessionEnd::Done => return,
            SessionEnd::Lost(e) => e,
        };
        if !ever_joined && !joined {
            // The very first join failed (unknown topic, bad group name, no broker): that is
            // the caller's error to see, not a reason to retry.
            let _ = events.send(Event::Failed(error)).await;
            return;
        }
        ever_joined = true;
        if joined {
            attempts = 0;
            backoff = REJOIN_BACKOFF_MIN;
            if events.send(Event::Lost(error)).await.is_err() {
                return;
            }
        } else {
            attempts += 1;
            if attempts >= REJOIN_ATTEMPTS_MAX {
                let _ = events.send(Event::Failed(error)).await;
                return;
            }
        }
        // Commands sent while no session exists fail at once rather than wait.
        let sleep = tokio::time::sleep(backoff);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Commit { reply, .. }) => {
                        let _ = reply.send(Err(ClientError::Closed));
                    }
                    Some(Command::Release { .. }) => {}
                    Some(Command::Leave { reply, .. }) => {
                        // Nothing to leave: the broker already dropped the member.
                        let _ = reply.send(Ok(()));
                        return;
                    }
                },
            }
        }
        backoff = (backoff * 2).min(REJOIN_BACKOFF_MAX);
    }
}

/// One session, from join to loss or leave. Returns how it ended and whether it joined.
async fn session(
    settings: &Settings,
    events: &mpsc::Sender<Event>,
    commands: &mut mpsc::Receiver<Command>,
) -> (SessionEnd, bool) {
    let (out, out_rx) = mpsc::channel(OUTBOUND_DEPTH);
    let join = pb::MemberRequest {
        kind: Some(RequestKind::Join(pb::JoinGroup {
            group: settings.group.clone(),
            topics: vec![settings.topic.clone()],
            session_timeout_ms: settings.session_timeout.as_millis().min(u32::MAX as u128) as u32,
            rebalance_timeout_ms: settings.rebalance_timeout.as_millis().min(u32::MAX as u128)
                as u32,
            client_id: settings.client_id.clone(),
        })),
    };
    out.try_send(join).expect("a new queue has room");
    let mut inbound = match settings
        .client
        .groups_rpc()
        .join(ReceiverStream::new(out_rx))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return (SessionEnd::Lost(status.into()), false),
    };
    let heartbeat = match inbound.message().await {
        Ok(Some(pb::MemberEvent {
            kind: Some(EventKind::Joined(joined)),
        })) => {
            if events
                .send(Event::Joined {
                    member_id: joined.member_id,
                })
                .await
                .is_err()
            {
                return (SessionEnd::Done, true);
            }
            Duration::from_millis(u64::from(joined.heartbeat_interval_ms.max(1)))
        }
        Ok(_) => {
            return (
                SessionEnd::Lost(ClientError::Broker {
                    code: tonic::Code::Internal,
                    message: "the broker did not answer join with joined".into(),
                }),
                false,
            )
        }
        Err(status) => return (SessionEnd::Lost(status.into()), false),
    };
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: HashMap<u64, oneshot::Sender<Result<()>>> = HashMap::new();
    let mut leaving: Option<oneshot::Sender<Result<()>>> = None;
    let mut next_request_id = 1u64;
    let topic = &settings.topic;
    let end = loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(pb::MemberEvent { kind: Some(EventKind::Assignment(a)) })) => {
                    let partitions = a
                        .partitions
                        .into_iter()
                        .filter(|p| &p.topic == topic)
                        .map(|p| Assigned {
                            partition: p.partition,
                            committed: p.committed.then_some(p.committed_offset),
                            redelivered_until: p.redelivered_until,
                        })
                        .collect();
                    if events.send(Event::Assignment { epoch: a.member_epoch, partitions }).await.is_err() {
                        break SessionEnd::Done;
                    }
                }
                Ok(Some(pb::MemberEvent { kind: Some(EventKind::CommitResult(r)) })) => {
                    let id = r.request_id;
                    let outcome = commit_outcome(topic, r);
                    if id == 0 {
                        if let Some(reply) = leaving.take() {
                            let _ = reply.send(outcome);
                        }
                    } else if let Some(reply) = pending.remove(&id) {
                        let _ = reply.send(outcome);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) if leaving.is_some() => {
                    // The stream ended before the leave was confirmed.
                    if let Some(reply) = leaving.take() {
                        let _ = reply.send(Err(ClientError::Closed));
                    }
                    break SessionEnd::Done;
                }
                Ok(None) => break SessionEnd::Lost(ClientError::Closed),
                Err(status) => {
                    if let Some(reply) = leaving.take() {
                        let _ = reply.send(Err(status.clone().into()));
                        break SessionEnd::Done;
                    }
                    break SessionEnd::Lost(status.into());
                }
            },
            command = commands.recv(), if leaving.is_none() => {
                let request = match command {
                    // The consumer was dropped without leaving: end the stream, and the
                    // broker treats the member as crashed.
                    None => break SessionEnd::Done,
                    Some(Command::Commit { epoch, offsets, reply }) => {
                        let id = next_request_id;
                        next_request_id += 1;
                        pending.insert(id, reply);
                        RequestKind::Commit(pb::CommitOffsets {
                            request_id: id,
                            member_epoch: epoch,
                            offsets: offsets_pb(topic, &offsets),
                        })
                    }
                    Some(Command::Release { epoch, offsets }) => {
                        RequestKind::Release(pb::ReleasePartitions {
                            member_epoch: epoch,
                            offsets: offsets_pb(topic, &offsets),
                            partitions: Vec::new(),
                        })
                    }
                    Some(Command::Leave { epoch, offsets, reply }) => {
                        leaving = Some(reply);
                        RequestKind::Leave(pb::LeaveGroup {
                            member_epoch: epoch,
                            offsets: offsets_pb(topic, &offsets),
                        })
                    }
                };
                if out.send(pb::MemberRequest { kind: Some(request) }).await.is_err() {
                    break SessionEnd::Lost(ClientError::Closed);
                }
            }
            _ = ticker.tick() => {
                let beat = pb::MemberRequest { kind: Some(RequestKind::Heartbeat(pb::Heartbeat {})) };
                // A full queue means messages are flowing anyway; any message keeps the session.
                let _ = out.try_send(beat);
            }
        }
    };
    for (_, reply) in pending.drain() {
        let _ = reply.send(Err(ClientError::Closed));
    }
    (end, true)
}
