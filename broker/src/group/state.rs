//! The membership state of one consumer group and its rebalancing, without I/O: who is in the
//! group, what each member is meant to own (its target), what it was told it owns (its
//! assignment), and who owns each partition right now.
//!
//! States of a partition of a subscribed topic:
//!
//! - *free*: no owner. It is granted to the member whose target holds it, in that member's next
//!   assignment (epoch bumped), and becomes *owned*.
//! - *owned* by a member whose target holds it: it stays where it is; rebalances elsewhere do
//!   not touch it, so its records keep flowing.
//! - *owned* by a member whose target no longer holds it (*releasing*): the member's next
//!   assignment leaves it out, and the member must release it (after committing) within its
//!   rebalance timeout. It becomes *free* when the member releases it or is removed, and only
//!   then goes to its new owner: two members never own one partition at once.
//!
//! The group as a whole is *empty* (no members), *stable* (every owner matches its target and
//! every member knows its assignment) or *reconciling* (partitions on the move).
//!
//! Thread-safety: none here; the coordinator keeps groups behind a mutex.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// A partition of a topic.
pub type TopicPartition = (String, u32);

/// A member of a group.
#[derive(Debug)]
pub struct Member {
    /// The id the broker gave it.
    pub id: String,
    /// What it calls itself, for `describe`.
    pub client_id: String,
    /// The topics it reads.
    pub topics: Vec<String>,
    /// Silence after which it is removed.
    pub session_timeout: Duration,
    /// Time it has to release partitions it was asked to give up.
    pub rebalance_timeout: Duration,
    /// Bumped on every change of `assigned`; fetches and commits must carry an epoch at least
    /// the one at which they got the partition.
    pub epoch: i32,
    /// What the broker means it to own.
    pub target: BTreeSet<TopicPartition>,
    /// What it was last told it owns (in `pending`, or in its latest sent assignment).
    pub assigned: BTreeSet<TopicPartition>,
    /// An assignment to send: set when `assigned` changes, taken by the member's session.
    pub pending: bool,
    /// The partitions the member has been told it owns and has not released since. Assignments
    /// are coalesced, so a partition granted and revoked again before the member was told is
    /// not in it: the member cannot be reading it, and it is freed at once instead of waiting
    /// for a release the member could never send.
    pub sent: BTreeSet<TopicPartition>,
    /// When it was last heard from.
    pub last_seen: Instant,
    /// When it must have released what it was asked to give up, if anything.
    pub release_deadline: Option<Instant>,
    /// Wakes the member's session when there is an assignment to send or a deadline moved.
    pub notify: Arc<Notify>,
}

impl Member {
    /// When the member is to be removed if nothing happens first.
    pub fn deadline(&self) -> Instant {
        let session = self.last_seen + self.session_timeout;
        match self.release_deadline {
            Some(release) => session.min(release),
            None => session,
        }
    }
}

/// The current owner of a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The member.
    pub member: String,
    /// The member's epoch when it got the partition: requests under an older epoch are stale.
    pub since_epoch: i32,
    /// The offset after the last record served to the member by a fetch: what it may have
    /// handed out, which a crash would leave uncommitted.
    pub served_until: u64,
}

/// One group's members and ownership.
#[derive(Debug, Default)]
pub struct Group {
    /// Members by id.
    pub members: BTreeMap<String, Member>,
    /// The owner of every owned partition.
    pub owners: BTreeMap<TopicPartition, Owner>,
    /// Per partition, the end of the records a removed member may have handed out without
    /// committing: the next owner gets them marked as redelivered.
    pub redeliver: BTreeMap<TopicPartition, u64>,
}

/// What a group is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    /// No members.
    Empty,
    /// Every partition is with the member meant to own it, and every member knows.
    Stable,
    /// Partitions are moving.
    Reconciling,
}

impl Group {
    /// The group's state.
    pub fn state(&self) -> GroupState {
        if self.members.is_empty() {
            return GroupState::Empty;
        }
        let settled = self
            .members
            .values()
            .all(|m| !m.pending && m.assigned == m.target && m.release_deadline.is_none());
        if settled {
            GroupState::Stable
        } else {
            GroupState::Reconciling
        }
    }

    /// The partitions `member` owns now, releasing ones included.
    pub fn owned_by(&self, member: &str) -> BTreeSet<TopicPartition> {
        self.owners
            .iter()
            .filter(|(_, o)| o.member == member)
            .map(|(tp, _)| tp.clone())
            .collect()
    }

    /// Recomputes targets and moves what can move: grants free partitions to the members
    /// meant to own them and takes revoked ones out of assignments. `partition_count` gives a
    /// topic's partition count (`None` if it no longer exists). Members whose assignment
    /// changed are marked `pending` and woken.
    pub fn reconcile(&mut self, partition_count: &dyn Fn(&str) -> Option<u32>, now: Instant) {
        let targets = compute_targets(&self.members, &self.owners, partition_count);
        for (id, member) in self.members.iter_mut() {
            member.target = targets.get(id).cloned().unwrap_or_default();
        }
        // Partitions leaving a member that was never told it had them need no release.
        let members = &self.members;
        self.owners.retain(|tp, owner| {
            members
                .get(&owner.member)
                .is_some_and(|m| m.target.contains(tp) || m.sent.contains(tp))
        });
        let ids: Vec<String> = self.members.keys().cloned().collect();
        for id in ids {
            let owned = self.owned_by(&id);
            let member = self.members.get_mut(&id).expect("listed above");
            let keep: BTreeSet<TopicPartition> = member
                .assigned
                .intersection(&member.target)
                .cloned()
                .collect();
            // Free partitions, and ones this member still owns (revoked, not yet released, and
            // now meant for it again: it keeps them rather than release and get them back).
            let grant: Vec<TopicPartition> = member
                .target
                .difference(&member.assigned)
                .filter(|tp| self.owners.get(*tp).is_none_or(|o| o.member == id))
                .cloned()
                .collect();
            let mut next = keep;
            next.extend(grant.iter().cloned());
            if next != member.assigned {
                member.epoch += 1;
                member.assigned = next;
                member.pending = true;
                for tp in grant {
                    let epoch = member.epoch;
                    self.owners
                        .entry(tp)
                        .and_modify(|o| o.since_epoch = epoch)
                        .or_insert_with(|| Owner {
                            member: id.clone(),
                            since_epoch: epoch,
                            served_until: 0,
                        });
                }
            }
            let releasing = owned.iter().any(|tp| !member.assigned.contains(tp));
            match (releasing, member.release_deadline) {
                (true, None) => member.release_deadline = Some(now + member.rebalance_timeout),
                (false, Some(_)) => member.release_deadline = None,
                _ => {}
            }
            if member.pending || member.release_deadline.is_some() {
                member.notify.notify_one();
            }
        }
    }

    /// Frees the partitions of a member that is gone. When `crashed`, what it was served past
    /// `committed` is noted for redelivery.
    pub fn remove_member(
        &mut self,
        id: &str,
        crashed: bool,
        committed: &dyn Fn(&TopicPartition) -> Option<u64>,
    ) {
        self.members.remove(id);
        let owned = self.owned_by(id);
        for tp in owned {
            let owner = self.owners.remove(&tp).expect("owned");
            if crashed && owner.served_until > committed(&tp).unwrap_or(0) {
                let mark = self.redeliver.entry(tp).or_insert(0);
                *mark = (*mark).max(owner.served_until);
            }
        }
    }

    /// Whether `member` may fetch or commit `tp` under `epoch`: it owns the partition (even if
    /// releasing it) and `epoch` is not older than the one it got the partition with, nor newer
    /// than its own.
    pub fn check_owner(
        &self,
        member: &str,
        epoch: i32,
        tp: &TopicPartition,
    ) -> Result<(), Refusal> {
        let Some(m) = self.members.get(member) else {
            return Err(Refusal::UnknownMember);
        };
        match self.owners.get(tp) {
            Some(owner)
                if owner.member == member && owner.since_epoch <= epoch && epoch <= m.epoch =>
            {
                Ok(())
            }
            Some(owner) if owner.member == member => Err(Refusal::StaleEpoch { current: m.epoch }),
            _ => Err(Refusal::NotOwner { current: m.epoch }),
        }
    }
}

/// Why a member's request for a partition is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The group has no such member.
    UnknownMember,
    /// The member owns the partition, but under a newer epoch than the request's.
    StaleEpoch {
        /// The member's epoch.
        current: i32,
    },
    /// The member does not own the partition.
    NotOwner {
        /// The member's epoch.
        current: i32,
    },
}

/// Spreads each topic's partitions evenly over the members subscribing to it (counts differ by
/// at most one), keeping every member's current target where the balance allows, so that a
/// membership change moves as few partitions as it can.
pub fn compute_targets(
    members: &BTreeMap<String, Member>,
    owners: &BTreeMap<TopicPartition, Owner>,
    partition_count: &dyn Fn(&str) -> Option<u32>,
) -> BTreeMap<String, BTreeSet<TopicPartition>> {
    let mut topics: BTreeSet<&str> = BTreeSet::new();
    for m in members.values() {
        topics.extend(m.topics.iter().map(String::as_str));
    }
    let mut targets: BTreeMap<String, BTreeSet<TopicPartition>> = members
        .keys()
        .map(|id| (id.clone(), BTreeSet::new()))
        .collect();
    for topic in topics {
        let Some(count) = partition_count(topic) else {
            continue;
        };
        let subscribers: Vec<&Member> = members
            .values()
            .filter(|m| m.topics.iter().any(|t| t == topic))
            .collect();
        // What each subscriber holds in this topic: first the partitions it owns, then those
        // its current target gives it that nobody else owns. Keeping these first moves least.
        let mut current: Vec<(&str, Vec<u32>)> = subscribers
            .iter()
            .map(|m| {
                let owned = owners
                    .iter()
                    .filter(|((t, p), o)| t == topic && *p < count && o.member == m.id)
                    .map(|((_, p), _)| *p);
                let targeted = m
                    .target
                    .iter()
                    .filter(|tp| tp.0 == topic && tp.1 < count)
                    .filter(|tp| owners.get(*tp).is_none_or(|o| o.member == m.id))
                    .map(|(_, p)| *p);
                let mut held: Vec<u32> = Vec::new();
                for p in owned.chain(targeted) {
                    if !held.contains(&p) {
                        held.push(p);
                    }
                }
                (m.id.as_str(), held)
            })
            .collect();
        // The members holding most get the larger quotas, so fewer partitions move.
        current.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
        let n = count as usize;
        let m = current.len();
        let quota = |i: usize| n / m + usize::from(i < n % m);
        let mut taken = vec![false; n];
        let mut kept: Vec<Vec<u32>> = Vec::with_capacity(m);
        for (i, (_, held)) in current.iter().enumerate() {
            let mut keep: Vec<u32> = Vec::new();
            for &p in held {
                if keep.len() < quota(i) && !taken[p as usize] {
                    taken[p as usize] = true;
                    keep.push(p);
                }
            }
            kept.push(keep);
        }
        let mut free = (0..count).filter(|&p| !taken[p as usize]);
        for (i, (id, _)) in current.iter().enumerate() {
            while kept[i].len() < quota(i) {
                let p = free.next().expect("quotas add up to the partition count");
                kept[i].push(p);
            }
            let target = targets.get_mut(*id).expect("every member has a target");
            target.extend(kept[i].iter().map(|&p| (topic.to_string(), p)));
        }
        assert!(free.next().is_none());
    }
    targets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, topics: &[&str]) -> Member {
        Member {
            id: id.to_string(),
            client_id: String::new(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            session_timeout: Duration::from_secs(10),
            rebalance_timeout: Duration::from_secs(10),
            epoch: 0,
            target: BTreeSet::new(),
            assigned: BTreeSet::new(),
            pending: false,
            sent: BTreeSet::new(),
            last_seen: Instant::now(),
            release_deadline: None,
            notify: Arc::new(Notify::new()),
        }
    }

    fn twelve(topic: &str) -> Option<u32> {
        (topic == "jobs").then_some(12)
    }

    fn counts(group: &Group) -> Vec<usize> {
        group.members.values().map(|m| m.assigned.len()).collect()
    }

    /// Plays the sessions' side: every member is sent its assignment.
    fn send_all(group: &mut Group) {
        for m in group.members.values_mut() {
            m.pending = false;
            m.sent.extend(m.assigned.iter().cloned());
        }
    }

    /// Plays the members' side: every member releases what it was told to give up.
    fn release_all(group: &mut Group) {
        let ids: Vec<String> = group.members.keys().cloned().collect();
        for id in ids {
            let assigned = group.members[&id].assigned.clone();
            for tp in group.owned_by(&id) {
                if !assigned.contains(&tp) {
                    group.owners.remove(&tp);
                    group.members.get_mut(&id).unwrap().sent.remove(&tp);
                }
            }
        }
    }

    #[test]
    fn partitions_are_spread_evenly_and_each_has_one_owner() {
        let mut group = Group::default();
        for id in ["a", "b", "c"] {
            group.members.insert(id.into(), member(id, &["jobs"]));
        }
        group.reconcile(&twelve, Instant::now());
        assert_eq!(counts(&group), vec![4, 4, 4]);
        assert_eq!(group.owners.len(), 12);
        assert_eq!(group.state(), GroupState::Reconciling); // assignments not yet sent
        for m in group.members.values_mut() {
            m.pending = false;
        }
        assert_eq!(group.state(), GroupState::Stable);
    }

    #[test]
    fn a_joining_member_takes_only_what_must_move_and_only_after_release() {
        let mut group = Group::default();
        for id in ["a", "b", "c"] {
            group.members.insert(id.into(), member(id, &["jobs"]));
        }
        group.reconcile(&twelve, Instant::now());
        send_all(&mut group);
        let before: BTreeMap<String, BTreeSet<TopicPartition>> = group
            .members
            .iter()
            .map(|(id, m)| (id.clone(), m.assigned.clone()))
            .collect();
        let epochs: Vec<i32> = group.members.values().map(|m| m.epoch).collect();
        group.members.insert("d".into(), member("d", &["jobs"]));
        group.reconcile(&twelve, Instant::now());
        // d gets nothing yet: its partitions are still owned by the others, who must release.
        assert!(group.members["d"].assigned.is_empty());
        assert_eq!(group.members["d"].target.len(), 3);
        let mut moved = 0;
        for (id, old) in &before {
            let m = &group.members[id];
            assert!(
                m.assigned.is_subset(old),
                "no member gains while another releases"
            );
            moved += old.len() - m.assigned.len();
            assert!(m.release_deadline.is_some());
        }
        assert_eq!(moved, 3, "only three partitions move to the newcomer");
        assert!(group
            .members
            .values()
            .zip(&epochs)
            .all(|(m, e)| m.epoch > *e));
        release_all(&mut group);
        group.reconcile(&twelve, Instant::now());
        assert_eq!(counts(&group), vec![3, 3, 3, 3]);
        assert!(group.members.values().all(|m| m.release_deadline.is_none()));
        // Every partition has exactly one owner, and it is the member that lists it.
        for (tp, owner) in &group.owners {
            assert!(group.members[&owner.member].assigned.contains(tp));
        }
        assert_eq!(group.owners.len(), 12);
    }

    #[test]
    fn a_crashed_members_partitions_move_with_redelivery_marks() {
        let mut group = Group::default();
        for id in ["a", "b"] {
            group.members.insert(id.into(), member(id, &["jobs"]));
        }
        group.reconcile(&twelve, Instant::now());
        let a_parts = group.members["a"].assigned.clone();
        let tp = a_parts.iter().next().unwrap().clone();
        group.owners.get_mut(&tp).unwrap().served_until = 50;
        group.remove_member("a", true, &|_| Some(20));
        group.reconcile(&twelve, Instant::now());
        assert_eq!(group.members["b"].assigned.len(), 12);
        assert_eq!(group.redeliver.get(&tp), Some(&50));
        // A clean leave marks nothing.
        let mut group2 = Group::default();
        group2.members.insert("a".into(), member("a", &["jobs"]));
        group2.reconcile(&twelve, Instant::now());
        group2.owners.get_mut(&tp).unwrap().served_until = 50;
        group2.remove_member("a", false, &|_| Some(20));
        assert!(group2.redeliver.is_empty());
        assert!(group2.owners.is_empty());
    }

    #[test]
    fn stale_epochs_and_non_owners_are_refused() {
        let mut group = Group::default();
        group.members.insert("a".into(), member("a", &["jobs"]));
        group.reconcile(&twelve, Instant::now());
        send_all(&mut group);
        let epoch = group.members["a"].epoch;
        let tp = ("jobs".to_string(), 0);
        assert_eq!(group.check_owner("a", epoch, &tp), Ok(()));
        assert_eq!(
            group.check_owner("a", epoch - 1, &tp),
            Err(Refusal::StaleEpoch { current: epoch })
        );
        assert_eq!(
            group.check_owner("zombie", epoch, &tp),
            Err(Refusal::UnknownMember)
        );
        group.members.insert("b".into(), member("b", &["jobs"]));
        group.reconcile(&twelve, Instant::now());
        release_all(&mut group);
        group.reconcile(&twelve, Instant::now());
        let moved = group
            .owners
            .iter()
            .find(|(_, o)| o.member == "b")
            .unwrap()
            .0
            .clone();
        let a_epoch = group.members["a"].epoch;
        assert!(matches!(
            group.check_owner("a", a_epoch, &moved),
            Err(Refusal::NotOwner { .. })
        ));
    }

    #[test]
    fn partitions_granted_and_revoked_before_the_member_was_told_move_at_once() {
        let mut group = Group::default();
        group.members.insert("a".into(), member("a", &["jobs"]));
        group.reconcile(&twelve, Instant::now());
        // b joins before a's first assignment (all twelve) was sent: a is told six only, and
        // the other six go to b without waiting for a release a could never send.
        group.members.insert("b".into(), member("b", &["jobs"]));
        group.reconcile(&twelve, Instant::now());
        assert_eq!(counts(&group), vec![6, 6]);
        assert_eq!(group.owned_by("a").len(), 6);
        assert!(group.members["a"].release_deadline.is_none());
        // Once a knows its partitions, taking them away again needs its release.
        send_all(&mut group);
        group.members.insert("c".into(), member("c", &["jobs"]));
        group.reconcile(&twelve, Instant::now());
        assert!(group.members["c"].assigned.is_empty());
        assert_eq!(group.owned_by("a").len(), 6);
        assert!(group.members["a"].release_deadline.is_some());
        // a is sent its smaller assignment but has not released yet; another change must not
        // take the revoked partitions away from it behind its back.
        send_all(&mut group);
        group.members.insert("d".into(), member("d", &["jobs"]));
        group.reconcile(&twelve, Instant::now());
        assert_eq!(group.owned_by("a").len(), 6);
        assert!(group.members["d"].assigned.is_empty() || group.owners.len() == 12);
        for (tp, owner) in &group.owners {
            if owner.member != "a" {
                assert!(!group.owned_by("a").contains(tp));
            }
        }
    }

    #[test]
    fn targets_are_sticky_and_balanced_for_many_shapes() {
        for n in [1u32, 2, 5, 12, 13, 100] {
            for m in 1..=6usize {
                let mut group = Group::default();
                let count = move |t: &str| (t == "t").then_some(n);
                for i in 0..m {
                    let id = format!("m{i}");
                    group.members.insert(id.clone(), member(&id, &["t"]));
                    group.reconcile(&count, Instant::now());
                    release_all(&mut group);
                    group.reconcile(&count, Instant::now());
                }
                let sizes: Vec<usize> = group.members.values().map(|m| m.assigned.len()).collect();
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(max - min <= 1, "n={n} m={m} sizes={sizes:?}");
                assert_eq!(sizes.iter().sum::<usize>(), n as usize);
                // Removing one member moves only its partitions.
                let before: BTreeMap<TopicPartition, String> = group
                    .owners
                    .iter()
                    .map(|(tp, o)| (tp.clone(), o.member.clone()))
                    .collect();
                group.remove_member("m0", false, &|_| None);
                group.reconcile(&count, Instant::now());
                for (tp, owner) in &group.owners {
                    if before[tp] != "m0" {
                        assert_eq!(
                            before[tp], owner.member,
                            "n={n} m={m}: {tp:?} moved needlessly"
                        );
                    }
                }
            }
        }
    }
    #[test]
    fn a_revoked_partition_meant_for_its_owner_again_is_kept_not_stranded() {
        let two = |t: &str| (t == "t").then_some(2u32);
        let mut group = Group::default();
        group.members.insert("a".into(), member("a", &["t"]));
        group.reconcile(&two, Instant::now());
        send_all(&mut group);
        group.members.insert("b".into(), member("b", &["t"]));
        group.reconcile(&two, Instant::now());
        send_all(&mut group);
        assert_eq!(
            group.members["a"].assigned.len(),
            1,
            "a is told to give one up"
        );
        assert!(group.members["a"].release_deadline.is_some());
        // b leaves before a released: a keeps both, is told so, and owes no release.
        group.remove_member("b", false, &|_| None);
        group.reconcile(&two, Instant::now());
        let a = &group.members["a"];
        assert_eq!(a.assigned.len(), 2);
        assert_eq!(group.owned_by("a"), a.assigned);
        assert!(a.release_deadline.is_none());
        send_all(&mut group);
        assert_eq!(group.state(), GroupState::Stable);
    }

    #[test]
    fn a_newcomer_leaving_before_the_handover_moves_nothing_needlessly() {
        let six = |t: &str| (t == "t").then_some(6u32);
        let mut group = Group::default();
        group.members.insert("b".into(), member("b", &["t"]));
        group.reconcile(&six, Instant::now());
        group.members.insert("a".into(), member("a", &["t"]));
        group.reconcile(&six, Instant::now());
        send_all(&mut group);
        release_all(&mut group);
        group.reconcile(&six, Instant::now());
        send_all(&mut group);
        let before: BTreeMap<TopicPartition, String> = group
            .owners
            .iter()
            .map(|(tp, o)| (tp.clone(), o.member.clone()))
            .collect();
        group.members.insert("c".into(), member("c", &["t"]));
        group.reconcile(&six, Instant::now());
        send_all(&mut group);
        group.remove_member("c", false, &|_| None);
        group.reconcile(&six, Instant::now());
        for (tp, owner) in &before {
            assert!(
                group.members[owner].target.contains(tp),
                "{tp:?} would move from {owner} for nothing"
            );
        }
    }
}
