//! Consumer groups: membership, incremental rebalancing, fencing and durable committed
//! positions. The rules are in `state.rs` (one group, no I/O) and the durable positions in
//! `store.rs`; this module ties them together for the broker.
//!
//! Thread-safety: `Coordinator` is shared inside the `Broker`. All groups sit behind one mutex,
//! held only for in-memory work; committing takes the store's writer lock first and this mutex
//! inside it (lock order: store writer, then groups, then the store's map), and never the other
//! way round.

pub mod state;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::{BrokerError, Result};
use crate::topic::validate_topic_name;
use state::{Group, Member, Refusal};
pub use state::{GroupState, TopicPartition};
use store::{OffsetStore, PositionKey};

/// Limits and defaults of group membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// Session timeout of a member that does not ask for one.
    pub session_timeout_ms_default: u32,
    /// Shortest session timeout a member may ask for.
    pub session_timeout_ms_min: u32,
    /// Longest session timeout a member may ask for.
    pub session_timeout_ms_max: u32,
    /// Time to release partitions, for a member that does not ask for one.
    pub rebalance_timeout_ms_default: u32,
    /// Most members of one group.
    pub members_max: usize,
    /// Most groups with members at once.
    pub groups_max: usize,
}

/// A member that just joined.
#[derive(Debug, Clone)]
pub struct Joined {
    /// Its id.
    pub member_id: String,
    /// The session timeout in force.
    pub session_timeout: Duration,
    /// How often it should send heartbeats.
    pub heartbeat_interval: Duration,
    /// Woken when the member has an assignment to receive or a deadline changed.
    pub notify: Arc<Notify>,
}

/// One partition of an assignment, as the member is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignedPartition {
    /// Topic and partition.
    pub partition: TopicPartition,
    /// The group's committed position, if any.
    pub committed: Option<u64>,
    /// Records below this (from the committed position on) may have reached a crashed member:
    /// deliver them marked as redelivered. 0 for none.
    pub redelivered_until: u64,
}

/// The full set of partitions a member owns from now on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The member's new epoch.
    pub epoch: i32,
    /// Its partitions, sorted.
    pub partitions: Vec<AssignedPartition>,
}

/// A member's request naming it: for fetches and commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberContext {
    /// The group.
    pub group: String,
    /// The member's id.
    pub member_id: String,
    /// The epoch the member believes it has.
    pub epoch: i32,
}

/// A member, described.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDescription {
    /// Its id.
    pub member_id: String,
    /// What it calls itself.
    pub client_id: String,
    /// Its epoch.
    pub epoch: i32,
    /// What it reads.
    pub topics: Vec<String>,
    /// What it owns now.
    pub owned: Vec<TopicPartition>,
}

/// A group's position in one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionPosition {
    /// Topic and partition.
    pub partition: TopicPartition,
    /// The committed position, if any.
    pub committed: Option<u64>,
    /// The member owning it, if any.
    pub owner: Option<String>,
}

/// A group, described (without high watermarks: the broker adds those).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    /// Its name.
    pub name: String,
    /// What it is doing.
    pub state: GroupState,
    /// Its members, by id.
    pub members: Vec<MemberDescription>,
    /// Its positions in every partition of subscribed topics and topics with commits.
    pub partitions: Vec<PartitionPosition>,
}

/// The coordinator of every group of this broker.
#[derive(Debug)]
pub struct Coordinator {
    /// Limits and defaults.
    config: GroupConfig,
    /// Groups with members (groups with only committed positions live in the store).
    groups: Mutex<HashMap<String, Group>>,
    /// Committed positions.
    store: OffsetStore,
    /// Numbers member ids, with `boot_ms` so that ids are not reused across restarts.
    next_member: std::sync::atomic::AtomicU64,
    /// When this broker started, in ms since the epoch.
    boot_ms: i64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Checks a group name: the same rules as topic names.
///
/// # Errors
///
/// `InvalidRequest` naming the rule broken.
pub fn validate_group_name(name: &str) -> Result<()> {
    validate_topic_name(name).map_err(|_| {
        BrokerError::InvalidRequest(format!(
            "invalid group name {name:?}: use 1 to 249 characters of A-Z a-z 0-9 . _ -"
        ))
    })
}

impl Coordinator {
    /// Opens the committed positions in `dir`. `high_watermark` gives the high watermark of an
    /// existing partition: after a restart the broker cannot know how far members read past
    /// their commits, so records from a committed position up to the high watermark at open
    /// are delivered marked as possibly redelivered.
    ///
    /// # Errors
    ///
    /// `Metadata` if the store cannot be opened.
    pub fn open(
        dir: &Path,
        config: GroupConfig,
        high_watermark: &dyn Fn(&str, u32) -> Option<u64>,
    ) -> Result<Coordinator> {
        let store = OffsetStore::open(dir)?;
        let mut groups: HashMap<String, Group> = HashMap::new();
        for ((group, topic, partition), committed) in store.all() {
            if let Some(hw) = high_watermark(&topic, partition) {
                if hw > committed {
                    groups
                        .entry(group)
                        .or_default()
                        .redeliver
                        .insert((topic, partition), hw);
                }
            }
        }
        Ok(Coordinator {
            config,
            groups: Mutex::new(groups),
            store,
            next_member: std::sync::atomic::AtomicU64::new(1),
            boot_ms: crate::broker::now_ms(),
        })
    }

    fn committed(&self, group: &str, tp: &TopicPartition) -> Option<u64> {
        self.store.get(&(group.to_string(), tp.0.clone(), tp.1))
    }

    /// Adds a member to `group` (creating the group) and rebalances.
    ///
    /// # Errors
    ///
    /// `InvalidRequest` for a bad group name or no topics; `LimitExceeded` past `members_max`
    /// or `groups_max`. Topics are checked by the caller.
    pub fn join(
        &self,
        group: &str,
        topics: Vec<String>,
        session_timeout_ms: u32,
        rebalance_timeout_ms: u32,
        client_id: String,
        partition_count: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<Joined> {
        validate_group_name(group)?;
        if topics.is_empty() {
            return Err(BrokerError::InvalidRequest(
                "a member must subscribe to at least one topic".into(),
            ));
        }
        let c = &self.config;
        let session_ms = match session_timeout_ms {
            0 => c.session_timeout_ms_default,
            n => n.clamp(c.session_timeout_ms_min, c.session_timeout_ms_max),
        };
        let rebalance_ms = match rebalance_timeout_ms {
            0 => c.rebalance_timeout_ms_default,
            n => n.clamp(c.session_timeout_ms_min, c.session_timeout_ms_max),
        };
        // Under the store's writer lock, so that a reset (checked and written under it) never
        // falls between a join and the assignment it reads positions for.
        let _writer = self.store.exclusive();
        let mut groups = lock(&self.groups);
        let live = groups.values().filter(|g| !g.members.is_empty()).count();
        let entry_is_live = groups.get(group).is_some_and(|g| !g.members.is_empty());
        if !entry_is_live && live >= c.groups_max {
            return Err(BrokerError::LimitExceeded {
                what: "groups with members".into(),
                limit: c.groups_max as u64,
            });
        }
        let g = groups.entry(group.to_string()).or_default();
        if g.members.len() >= c.members_max {
            return Err(BrokerError::LimitExceeded {
                what: format!("members of group {group:?}"),
                limit: c.members_max as u64,
            });
        }
        let n = self
            .next_member
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let member_id = format!("{}-{:x}-{n}", sanitize(&client_id), self.boot_ms);
        let notify = Arc::new(Notify::new());
        let mut topics = topics;
        topics.sort();
        topics.dedup();
        g.members.insert(
            member_id.clone(),
            Member {
                id: member_id.clone(),
                client_id,
                topics,
                session_timeout: Duration::from_millis(u64::from(session_ms)),
                rebalance_timeout: Duration::from_millis(u64::from(rebalance_ms)),
                epoch: 0,
                target: Default::default(),
                assigned: Default::default(),
                pending: true,
                sent: Default::default(),
                last_seen: Instant::now(),
                release_deadline: None,
                notify: Arc::clone(&notify),
            },
        );
        g.reconcile(partition_count, Instant::now());
        tracing::info!(group, member = %member_id, "member joined");
        Ok(Joined {
            member_id,
            session_timeout: Duration::from_millis(u64::from(session_ms)),
            heartbeat_interval: Duration::from_millis(u64::from(session_ms / 3).max(1)),
            notify,
        })
    }

    /// Notes that the member is alive.
    ///
    /// # Errors
    ///
    /// `UnknownMember` if it was removed.
    pub fn touch(&self, group: &str, member: &str) -> Result<()> {
        let mut groups = lock(&self.groups);
        let m = groups
            .get_mut(group)
            .and_then(|g| g.members.get_mut(member))
            .ok_or_else(|| unknown_member(group, member))?;
        m.last_seen = Instant::now();
        Ok(())
    }

    /// The member's assignment to send, if it changed since last taken.
    ///
    /// # Errors
    ///
    /// `UnknownMember` if it was removed.
    pub fn take_assignment(&self, group: &str, member: &str) -> Result<Option<Assignment>> {
        let mut groups = lock(&self.groups);
        let g = groups
            .get_mut(group)
            .ok_or_else(|| unknown_member(group, member))?;
        let m = g
            .members
            .get_mut(member)
            .ok_or_else(|| unknown_member(group, member))?;
        if !m.pending {
            return Ok(None);
        }
        m.pending = false;
        // Accumulated: partitions sent earlier and since revoked stay known to the member
        // until it releases them.
        m.sent.extend(m.assigned.iter().cloned());
        let partitions = m
            .assigned
            .iter()
            .map(|tp| {
                let committed = self.committed(group, tp);
                let redelivered_until = g
                    .redeliver
                    .get(tp)
                    .copied()
                    .filter(|&r| r > committed.unwrap_or(0))
                    .unwrap_or(0);
                AssignedPartition {
                    partition: tp.clone(),
                    committed,
                    redelivered_until,
                }
            })
            .collect();
        Ok(Some(Assignment {
            epoch: m.epoch,
            partitions,
        }))
    }

    /// When the member is to be removed if nothing happens first.
    ///
    /// # Errors
    ///
    /// `UnknownMember` if it was removed.
    pub fn deadline(&self, group: &str, member: &str) -> Result<Instant> {
        let groups = lock(&self.groups);
        groups
            .get(group)
            .and_then(|g| g.members.get(member))
            .map(Member::deadline)
            .ok_or_else(|| unknown_member(group, member))
    }

    /// Removes the member if its deadline has passed (as a crash: its uncommitted records are
    /// redelivered). Returns whether it was removed, and why.
    pub fn expire_if_due(
        &self,
        group: &str,
        member: &str,
        partition_count: &dyn Fn(&str) -> Option<u32>,
    ) -> Option<&'static str> {
        let now = Instant::now();
        let mut groups = lock(&self.groups);
        let g = groups.get_mut(group)?;
        let m = g.members.get(member)?;
        let reason = if m.release_deadline.is_some_and(|d| d <= now) {
            "it did not release its partitions within its rebalance timeout"
        } else if m.last_seen + m.session_timeout <= now {
            "its session timed out"
        } else {
            return None;
        };
        tracing::warn!(group, member, reason, "removing member");
        g.remove_member(member, true, &|tp| self.committed(group, tp));
        g.reconcile(partition_count, now);
        drop_if_idle(&mut groups, group);
        Some(reason)
    }

    /// Removes a member whose session ended without leaving (a crash, as far as the group can
    /// tell). No-op if it is already gone.
    pub fn remove(&self, group: &str, member: &str, partition_count: &dyn Fn(&str) -> Option<u32>) {
        let mut groups = lock(&self.groups);
        if let Some(g) = groups.get_mut(group) {
            if g.members.contains_key(member) {
                tracing::info!(group, member, "member's session ended without leaving");
                g.remove_member(member, true, &|tp| self.committed(group, tp));
                g.reconcile(partition_count, Instant::now());
            }
        }
        drop_if_idle(&mut groups, group);
    }

    /// Commits positions of partitions the member owns under `epoch`, durably. Blocking.
    /// Returns one result per position, in order: all refused (and nothing written) if the
    /// member is unknown; otherwise the owned ones are written together and the others refused.
    ///
    /// # Errors
    ///
    /// `Metadata` if writing failed (nothing was committed).
    pub fn commit(
        &self,
        ctx: &MemberContext,
        offsets: &[(TopicPartition, u64)],
        partition_count: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<Vec<Result<()>>> {
        let mut results: Vec<Result<()>> = Vec::with_capacity(offsets.len());
        let written = self.store.commit_with(|| -> std::result::Result<_, ()> {
            let groups = lock(&self.groups);
            let g = groups.get(&ctx.group);
            let mut entries = Vec::new();
            for (tp, offset) in offsets {
                // A deleted topic's positions are forgotten; a late commit must not bring
                // them back for a new topic of the same name.
                if partition_count(&tp.0).is_none_or(|n| tp.1 >= n) {
                    results.push(Err(BrokerError::UnknownPartition {
                        topic: tp.0.clone(),
                        partition: tp.1,
                        partition_count: partition_count(&tp.0).unwrap_or(0),
                    }));
                    continue;
                }
                let check = match g {
                    None => Err(Refusal::UnknownMember),
                    Some(g) => g.check_owner(&ctx.member_id, ctx.epoch, tp),
                };
                match check {
                    Ok(()) => {
                        entries.push(((ctx.group.clone(), tp.0.clone(), tp.1), Some(*offset)));
                        results.push(Ok(()));
                    }
                    Err(refusal) => results.push(Err(refused(ctx, tp, refusal))),
                }
            }
            Ok(entries)
        });
        match written {
            Ok(()) => Ok(results),
            Err(Err(e)) => Err(e),
            Err(Ok(())) => unreachable!("the choice never refuses"),
        }
    }

    /// Releases partitions the member was told to give up, committing their final positions
    /// first (`offsets`; `without_commit` are released as they are), then rebalances so they
    /// go to their new owners. Partitions its assignment still lists are not released.
    /// Blocking.
    ///
    /// # Errors
    ///
    /// `UnknownMember` if the member is gone; `Metadata` if writing failed (nothing released).
    pub fn release(
        &self,
        ctx: &MemberContext,
        offsets: &[(TopicPartition, u64)],
        without_commit: &[TopicPartition],
        partition_count: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<Vec<Result<()>>> {
        let results = self.commit(ctx, offsets, partition_count)?;
        let mut groups = lock(&self.groups);
        let g = groups
            .get_mut(&ctx.group)
            .ok_or_else(|| unknown_member(&ctx.group, &ctx.member_id))?;
        let assigned = g
            .members
            .get(&ctx.member_id)
            .ok_or_else(|| unknown_member(&ctx.group, &ctx.member_id))?
            .assigned
            .clone();
        // Only what was committed (or needs no commit, under a valid epoch) is released: a
        // refused release moves nothing, and the member stays responsible for the partition.
        let committed = offsets
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .map(|((tp, _), _)| tp);
        let uncommitted: Vec<&TopicPartition> = without_commit
            .iter()
            .filter(|tp| g.check_owner(&ctx.member_id, ctx.epoch, tp).is_ok())
            .collect();
        for tp in committed.chain(uncommitted) {
            if assigned.contains(tp) {
                continue;
            }
            if g.owners.get(tp).is_some_and(|o| o.member == ctx.member_id) {
                g.owners.remove(tp);
                if let Some(m) = g.members.get_mut(&ctx.member_id) {
                    m.sent.remove(tp);
                }
                let committed = self.committed(&ctx.group, tp).unwrap_or(0);
                if g.redeliver.get(tp).is_some_and(|&r| r <= committed) {
                    g.redeliver.remove(tp);
                }
            }
        }
        g.reconcile(partition_count, Instant::now());
        Ok(results)
    }

    /// The member leaves cleanly: commits its final positions, gives up everything (nothing is
    /// redelivered), and the group rebalances. Blocking.
    ///
    /// # Errors
    ///
    /// As [`Coordinator::commit`].
    pub fn leave(
        &self,
        ctx: &MemberContext,
        offsets: &[(TopicPartition, u64)],
        partition_count: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<Vec<Result<()>>> {
        let results = self.commit(ctx, offsets, partition_count)?;
        // A final position that was refused leaves its records unaccounted for: they are
        // redelivered as after a crash.
        let clean = results.iter().all(Result::is_ok);
        let mut groups = lock(&self.groups);
        if let Some(g) = groups.get_mut(&ctx.group) {
            if g.members.contains_key(&ctx.member_id) {
                tracing::info!(group = %ctx.group, member = %ctx.member_id, clean, "member left");
                g.remove_member(&ctx.member_id, !clean, &|tp| self.committed(&ctx.group, tp));
                g.reconcile(partition_count, Instant::now());
            }
        }
        drop_if_idle(&mut groups, &ctx.group);
        Ok(results)
    }

    /// Checks that the member owns each `(topic, partition)` under its epoch and, for those it
    /// does, notes `served_until[i]` (when `Some`) as how far it has been served. Returns one
    /// result per partition.
    pub fn serve(
        &self,
        ctx: &MemberContext,
        topic: &str,
        partitions: &[(u32, Option<u64>)],
    ) -> Vec<Result<()>> {
        let mut groups = lock(&self.groups);
        let Some(g) = groups.get_mut(&ctx.group) else {
            return partitions
                .iter()
                .map(|_| Err(unknown_member(&ctx.group, &ctx.member_id)))
                .collect();
        };
        partitions
            .iter()
            .map(|&(partition, served)| {
                let tp = (topic.to_string(), partition);
                g.check_owner(&ctx.member_id, ctx.epoch, &tp)
                    .map_err(|r| refused(ctx, &tp, r))?;
                if let (Some(served), Some(owner)) = (served, g.owners.get_mut(&tp)) {
                    owner.served_until = owner.served_until.max(served);
                }
                Ok(())
            })
            .collect()
    }

    /// Rebalances every group (after topics were created, deleted or grew).
    pub fn reconcile_all(&self, partition_count: &dyn Fn(&str) -> Option<u32>) {
        let mut groups = lock(&self.groups);
        for g in groups.values_mut() {
            g.reconcile(partition_count, Instant::now());
        }
    }

    /// Every group with members or committed positions: (name, state, member count), sorted.
    pub fn list(&self) -> Vec<(String, GroupState, usize)> {
        let groups = lock(&self.groups);
        let mut names: BTreeMap<String, (GroupState, usize)> = BTreeMap::new();
        for ((group, _, _), _) in self.store.all() {
            names.insert(group, (GroupState::Empty, 0));
        }
        for (name, g) in groups.iter() {
            if !g.members.is_empty() {
                names.insert(name.clone(), (g.state(), g.members.len()));
            }
        }
        names.into_iter().map(|(n, (s, c))| (n, s, c)).collect()
    }

    /// Describes a group. `partition_count` lists the partitions of subscribed topics.
    ///
    /// # Errors
    ///
    /// `UnknownGroup` if it has neither members nor committed positions.
    pub fn describe(
        &self,
        group: &str,
        partition_count: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<GroupDescription> {
        let groups = lock(&self.groups);
        let committed: BTreeMap<TopicPartition, u64> = self
            .store
            .all()
            .into_iter()
            .filter(|((g, _, _), _)| g == group)
            .map(|((_, t, p), o)| ((t, p), o))
            .collect();
        let g = groups.get(group).filter(|g| !g.members.is_empty());
        if g.is_none() && committed.is_empty() {
            return Err(BrokerError::UnknownGroup {
                group: group.to_string(),
            });
        }
        let mut topics: std::collections::BTreeSet<String> =
            committed.keys().map(|(t, _)| t.clone()).collect();
        let mut members = Vec::new();
        let mut state = GroupState::Empty;
        if let Some(g) = g {
            state = g.state();
            for m in g.members.values() {
                topics.extend(m.topics.iter().cloned());
                members.push(MemberDescription {
                    member_id: m.id.clone(),
                    client_id: m.client_id.clone(),
                    epoch: m.epoch,
                    topics: m.topics.clone(),
                    owned: g.owned_by(&m.id).into_iter().collect(),
                });
            }
        }
        let mut partitions = Vec::new();
        for topic in topics {
            let Some(count) = partition_count(&topic) else {
                continue;
            };
            for p in 0..count {
                let tp = (topic.clone(), p);
                partitions.push(PartitionPosition {
                    committed: committed.get(&tp).copied(),
                    owner: g.and_then(|g| g.owners.get(&tp)).map(|o| o.member.clone()),
                    partition: tp,
                });
            }
        }
        Ok(GroupDescription {
            name: group.to_string(),
            state,
            members,
            partitions,
        })
    }

    /// Sets the group's committed positions in some partitions, refusing while the group has
    /// members. Blocking.
    ///
    /// # Errors
    ///
    /// `GroupNotEmpty` while members are live; `Metadata` if writing failed.
    pub fn reset(&self, group: &str, positions: &[(TopicPartition, u64)]) -> Result<()> {
        validate_group_name(group)?;
        let entries: Vec<(PositionKey, Option<u64>)> = positions
            .iter()
            .map(|((t, p), o)| ((group.to_string(), t.clone(), *p), Some(*o)))
            .collect();
        let result = self.store.commit(&entries, || {
            let groups = lock(&self.groups);
            match groups.get(group) {
                Some(g) if !g.members.is_empty() => Err(BrokerError::GroupNotEmpty {
                    group: group.to_string(),
                    members: g.members.len(),
                }),
                _ => Ok(()),
            }
        });
        match result {
            Ok(()) => {
                let mut groups = lock(&self.groups);
                if let Some(g) = groups.get_mut(group) {
                    // The positions were chosen by hand: nothing before them is redelivered.
                    for (tp, _) in positions {
                        g.redeliver.remove(tp);
                    }
                }
                Ok(())
            }
            Err(Ok(e)) | Err(Err(e)) => Err(e),
        }
    }

    /// Forgets every group's positions in a deleted topic, so a new topic of that name starts
    /// afresh. Blocking.
    ///
    /// # Errors
    ///
    /// `Metadata` if writing failed.
    pub fn forget_topic(&self, topic: &str) -> Result<()> {
        let forgotten = self.store.commit_with(|| -> std::result::Result<_, ()> {
            // Under the writer lock: no commit can slip in between.
            let mut groups = lock(&self.groups);
            for g in groups.values_mut() {
                g.redeliver.retain(|(t, _), _| t != topic);
                g.owners.retain(|(t, _), _| t != topic);
                for m in g.members.values_mut() {
                    m.sent.retain(|(t, _)| t != topic);
                }
            }
            drop(groups);
            Ok(self
                .store
                .all()
                .into_keys()
                .filter(|(_, t, _)| t == topic)
                .map(|k| (k, None))
                .collect())
        });
        match forgotten {
            Ok(()) => Ok(()),
            Err(Err(e)) => Err(e),
            Err(Ok(())) => unreachable!("forgetting never refuses"),
        }
    }

    /// Flushes and closes the store.
    ///
    /// # Errors
    ///
    /// `Metadata` if closing failed.
    pub fn close(&self) -> Result<()> {
        self.store.close()
    }
}

/// Forgets a group that has neither members nor redelivery marks (its positions live on in
/// the store), so that the map does not grow with every group name ever used.
fn drop_if_idle(groups: &mut HashMap<String, Group>, name: &str) {
    if groups
        .get(name)
        .is_some_and(|g| g.members.is_empty() && g.redeliver.is_empty())
    {
        groups.remove(name);
    }
}

/// Keeps the characters of a client id that read well in a member id.
fn sanitize(client_id: &str) -> String {
    let s: String = client_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    if s.is_empty() {
        "member".to_string()
    } else {
        s
    }
}

fn unknown_member(group: &str, member: &str) -> BrokerError {
    BrokerError::UnknownMember {
        group: group.to_string(),
        member: member.to_string(),
    }
}

fn refused(ctx: &MemberContext, tp: &TopicPartition, refusal: Refusal) -> BrokerError {
    match refusal {
        Refusal::UnknownMember => unknown_member(&ctx.group, &ctx.member_id),
        Refusal::StaleEpoch { current } | Refusal::NotOwner { current } => {
            BrokerError::FencedMemberEpoch {
                group: ctx.group.clone(),
                member: ctx.member_id.clone(),
                epoch: ctx.epoch,
                current,
                topic: tp.0.clone(),
                partition: tp.1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn config() -> GroupConfig {
        GroupConfig {
            session_timeout_ms_default: 10_000,
            session_timeout_ms_min: 100,
            session_timeout_ms_max: 60_000,
            rebalance_timeout_ms_default: 10_000,
            members_max: 100,
            groups_max: 1_000_000,
        }
    }

    fn open(dir: &Path) -> Coordinator {
        Coordinator::open(dir, config(), &|_, _| None).unwrap()
    }

    fn ctx(c: &Coordinator, group: &str, member: &str) -> MemberContext {
        let epoch = lock(&c.groups)[group].members[member].epoch;
        MemberContext {
            group: group.into(),
            member_id: member.into(),
            epoch,
        }
    }

    fn tp(p: u32) -> TopicPartition {
        ("t".into(), p)
    }

    #[tokio::test]
    async fn a_release_whose_final_commit_is_refused_moves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path());
        let two = |t: &str| (t == "t").then_some(2u32);
        let a = c
            .join("g", vec!["t".into()], 0, 0, "a".into(), &two)
            .unwrap()
            .member_id;
        c.take_assignment("g", &a).unwrap();
        let a_ctx = ctx(&c, "g", &a);
        c.commit(&a_ctx, &[(tp(0), 10), (tp(1), 10)], &two).unwrap();
        c.join("g", vec!["t".into()], 0, 0, "b".into(), &two)
            .unwrap();
        c.take_assignment("g", &a).unwrap();
        let revoked = {
            let g = &lock(&c.groups)["g"];
            g.owned_by(&a)
                .difference(&g.members[&a].assigned)
                .next()
                .unwrap()
                .clone()
        };
        let stale = MemberContext {
            epoch: 0,
            ..ctx(&c, "g", &a)
        };
        let results = c
            .release(&stale, &[(revoked.clone(), 50)], &[], &two)
            .unwrap();
        assert!(results[0].is_err());
        assert_eq!(c.committed("g", &revoked), Some(10));
        assert_eq!(
            lock(&c.groups)["g"].owners[&revoked].member,
            a,
            "still a's to release"
        );
        // Under its real epoch the release goes through.
        let results = c
            .release(&ctx(&c, "g", &a), &[(revoked.clone(), 50)], &[], &two)
            .unwrap();
        assert!(results[0].is_ok());
        assert_eq!(c.committed("g", &revoked), Some(50));
        assert_ne!(lock(&c.groups)["g"].owners[&revoked].member, a);
    }

    #[tokio::test]
    async fn a_deleted_topic_stays_forgotten_with_no_marks_or_late_commits() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path());
        let exists = Cell::new(true);
        let count = |t: &str| (t == "t" && exists.get()).then_some(1u32);
        let a = c
            .join("g", vec!["t".into()], 0, 0, "a".into(), &count)
            .unwrap()
            .member_id;
        c.take_assignment("g", &a).unwrap();
        c.commit(&ctx(&c, "g", &a), &[(tp(0), 5)], &count).unwrap();
        assert!(c.serve(&ctx(&c, "g", &a), "t", &[(0, Some(100))])[0].is_ok());
        // Broker::delete_topic.
        exists.set(false);
        c.forget_topic("t").unwrap();
        c.reconcile_all(&count);
        assert_eq!(c.committed("g", &tp(0)), None);
        // The member's late release cannot bring the position back.
        let results = c
            .release(&ctx(&c, "g", &a), &[(tp(0), 9)], &[], &count)
            .unwrap();
        assert!(results[0].is_err());
        assert_eq!(c.committed("g", &tp(0)), None);
        // Its crash leaves no mark on a new topic of that name.
        c.remove("g", &a, &count);
        exists.set(true);
        let b = c
            .join("g", vec!["t".into()], 0, 0, "b".into(), &count)
            .unwrap()
            .member_id;
        let assignment = c.take_assignment("g", &b).unwrap().unwrap();
        assert_eq!(assignment.partitions[0].committed, None);
        assert_eq!(assignment.partitions[0].redelivered_until, 0);
        drop(c);
        assert_eq!(
            open(dir.path()).store.get(&("g".into(), "t".into(), 0)),
            None
        );
    }

    #[tokio::test]
    async fn groups_without_members_are_dropped_from_memory() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path());
        let one = |t: &str| (t == "t").then_some(1u32);
        for i in 0..100 {
            let group = format!("g{i}");
            let m = c
                .join(&group, vec!["t".into()], 0, 0, "a".into(), &one)
                .unwrap()
                .member_id;
            c.leave(&ctx(&c, &group, &m), &[], &one).unwrap();
        }
        assert!(c.list().is_empty());
        assert!(lock(&c.groups).is_empty());
    }
}
