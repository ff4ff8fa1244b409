//! Consumer-group administration: list, describe (members, assignments, positions, lag) and
//! reset of committed positions.

use octolog_batch::Offset;
use octolog_proto::v1 as pb;

use crate::error::Result;
use crate::Admin;

/// What a group is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    /// No members; committed positions only.
    Empty,
    /// Every partition is with the member meant to own it.
    Stable,
    /// Partitions are moving between members.
    Reconciling,
}

impl GroupState {
    fn from_pb(state: i32) -> GroupState {
        match pb::GroupState::try_from(state) {
            Ok(pb::GroupState::Stable) => GroupState::Stable,
            Ok(pb::GroupState::Reconciling) => GroupState::Reconciling,
            _ => GroupState::Empty,
        }
    }

    /// The state's name in lower case: `empty`, `stable`, `reconciling`.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupState::Empty => "empty",
            GroupState::Stable => "stable",
            GroupState::Reconciling => "reconciling",
        }
    }
}

/// A group in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSummary {
    /// The group's name.
    pub name: String,
    /// What it is doing.
    pub state: GroupState,
    /// How many members it has.
    pub members: u32,
}

/// A member of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// The id the broker gave it.
    pub member_id: String,
    /// What it calls itself.
    pub client_id: String,
    /// Its epoch, bumped on every change of its partitions.
    pub epoch: i32,
    /// The topics it reads.
    pub topics: Vec<String>,
    /// The partitions it owns now, as (topic, partition).
    pub assigned: Vec<(String, u32)>,
}

/// A group's position in one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPartition {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The committed position (next offset to handle), if any.
    pub committed: Option<Offset>,
    /// The partition's high watermark.
    pub high_watermark: Offset,
    /// Records not yet handled: from the committed position (or the log start) to the high
    /// watermark.
    pub lag: u64,
    /// The member that owns the partition, if any.
    pub owner: Option<String>,
}

/// A group in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    /// The group's name.
    pub name: String,
    /// What it is doing.
    pub state: GroupState,
    /// Its members.
    pub members: Vec<GroupMember>,
    /// Its positions, sorted by topic and partition.
    pub partitions: Vec<GroupPartition>,
}

/// Where [`Admin::reset_group`] moves a group's positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// Each partition's log start offset: replay everything still held.
    Earliest,
    /// Each partition's high watermark: skip everything so far.
    Latest,
    /// This offset in every partition, clamped to what each holds.
    Offset(Offset),
    /// The first record at or after this time (ms since the epoch) in each partition.
    Timestamp(i64),
}

impl Admin {
    /// Every group with members or committed positions, sorted by name.
    ///
    /// # Errors
    ///
    /// The broker's error, or a connection error.
    pub async fn list_groups(&self) -> Result<Vec<GroupSummary>> {
        let response = self
            .client()
            .groups_rpc()
            .list_groups(pb::ListGroupsRequest {})
            .await?
            .into_inner();
        Ok(response
            .groups
            .into_iter()
            .map(|g| GroupSummary {
                name: g.name,
                state: GroupState::from_pb(g.state),
                members: g.members,
            })
            .collect())
    }

    /// Describes a group.
    ///
    /// # Errors
    ///
    /// The broker's error: `NOT_FOUND` for a group it does not know.
    pub async fn describe_group(&self, group: &str) -> Result<GroupDescription> {
        let d = self
            .client()
            .groups_rpc()
            .describe_group(pb::DescribeGroupRequest {
                group: group.to_string(),
            })
            .await?
            .into_inner();
        Ok(GroupDescription {
            name: d.name,
            state: GroupState::from_pb(d.state),
            members: d
                .members
                .into_iter()
                .map(|m| GroupMember {
                    member_id: m.member_id,
                    client_id: m.client_id,
                    epoch: m.member_epoch,
                    topics: m.topics,
                    assigned: m
                        .assigned
                        .into_iter()
                        .map(|tp| (tp.topic, tp.partition))
                        .collect(),
                })
                .collect(),
            partitions: d
                .partitions
                .into_iter()
                .map(|p| GroupPartition {
                    topic: p.topic,
                    partition: p.partition,
                    committed: p.committed.then_some(Offset(p.committed_offset)),
                    high_watermark: Offset(p.high_watermark),
                    lag: p.lag,
                    owner: (!p.owner.is_empty()).then_some(p.owner),
                })
                .collect(),
        })
    }

    /// Moves the group's committed positions in every partition of `topic`; returns the new
    /// positions as (partition, offset). The group's members then replay from there.
    ///
    /// # Errors
    ///
    /// `FAILED_PRECONDITION` while the group has live members; `NOT_FOUND` for an unknown
    /// topic.
    pub async fn reset_group(
        &self,
        group: &str,
        topic: &str,
        to: ResetTo,
    ) -> Result<Vec<(u32, Offset)>> {
        use pb::reset_group_request::To;
        let to = match to {
            ResetTo::Earliest => To::Earliest(pb::Earliest {}),
            ResetTo::Latest => To::Latest(pb::Latest {}),
            ResetTo::Offset(o) => To::Offset(o.0),
            ResetTo::Timestamp(t) => To::TimestampMs(t),
        };
        let response = self
            .client()
            .groups_rpc()
            .reset_group(pb::ResetGroupRequest {
                group: group.to_string(),
                topic: topic.to_string(),
                to: Some(to),
            })
            .await?
            .into_inner();
        Ok(response
            .offsets
            .into_iter()
            .map(|o| (o.partition, Offset(o.offset)))
            .collect())
    }
}
