//! `octolog group list|describe|reset` (contract: `../shared/INTERFACE.md`, "Consumer groups"):
//! consumer-group administration through `octolog_client::Admin`.
//!
//! Output formats, text and `--json`:
//!
//! - `list`: one line per group, `NAME  STATE  MEMBERS`, the columns aligned; with `--json`, one
//!   line `{"groups":[{"name":..,"state":..,"members":N}, ...]}`.
//! - `describe`: a `group NAME (STATE, N members)` line, a table of members (when there are any)
//!   and a table of partitions with committed offset, high watermark, lag and owner (`-` where
//!   there is none); with `--json`, one line `{"name":..,"state":..,"members":[..],
//!   "partitions":[..]}` (see [`DescribeLine`]).
//! - `reset`: one line per partition, `TOPIC PARTITION OFFSET`, the group's new position.
//!
//! Errors go back to `cli`, which prints them as one `error: ...` line and exits 1; bad usage
//! (e.g. no `--to-*` flag, or two) is clap's, exit 2.

use std::io::Write;

use clap::{ArgGroup, Args, Subcommand};
use octolog_client::{Client, GroupDescription, GroupSummary, Offset, ResetTo};
use serde::Serialize;

/// A failure of a group command; `cli` reports it with exit status 1.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// `octolog group ...`.
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List consumer groups with their state and member count.
    List {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show a group's members, assignments, committed offsets and lag.
    Describe {
        /// Group name.
        group: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Move a group's committed positions in a topic; refused while the group has members.
    Reset(ResetArgs),
}

/// `octolog group reset`.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("to")
        .required(true)
        .multiple(false)
        .args(["to_earliest", "to_latest", "to_offset", "to_time"])
))]
pub struct ResetArgs {
    /// Group name.
    group: String,
    /// Topic whose positions move (every partition of it).
    #[arg(long)]
    topic: String,
    /// To each partition's log start offset: replay everything still held.
    #[arg(long)]
    to_earliest: bool,
    /// To each partition's high watermark: skip everything so far.
    #[arg(long)]
    to_latest: bool,
    /// To offset N in every partition, clamped to what each partition holds.
    #[arg(long, value_name = "N")]
    to_offset: Option<u64>,
    /// To the first record at or after this time (ms since the epoch) in each partition.
    #[arg(long, value_name = "UNIX_MS")]
    to_time: Option<i64>,
}

impl ResetArgs {
    /// The target the flags name; clap's `to` group guarantees exactly one is set.
    fn target(&self) -> ResetTo {
        match (
            self.to_earliest,
            self.to_latest,
            self.to_offset,
            self.to_time,
        ) {
            (true, false, None, None) => ResetTo::Earliest,
            (false, true, None, None) => ResetTo::Latest,
            (false, false, Some(n), None) => ResetTo::Offset(Offset(n)),
            (false, false, None, Some(ms)) => ResetTo::Timestamp(ms),
            _ => unreachable!("clap's required, exclusive `to` group lets exactly one through"),
        }
    }
}

/// Runs a group command against the broker at `addr`.
///
/// # Errors
///
/// The connection's or the broker's error (unknown group or topic, a reset while members are
/// live), or a failed write to stdout.
pub async fn run(addr: &str, command: GroupCommand) -> Result<(), Error> {
    let client = Client::connect(addr).await?;
    let admin = client.admin();
    let mut out = std::io::stdout().lock();
    match command {
        GroupCommand::List { json } => {
            let groups = admin.list_groups().await?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&list_line(&groups))?)?;
            } else {
                out.write_all(list_text(&groups).as_bytes())?;
            }
        }
        GroupCommand::Describe { group, json } => {
            let d = admin.describe_group(&group).await?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&describe_line(&d))?)?;
            } else {
                out.write_all(describe_text(&d).as_bytes())?;
            }
        }
        GroupCommand::Reset(args) => {
            let positions = admin
                .reset_group(&args.group, &args.topic, args.target())
                .await?;
            for (partition, offset) in positions {
                writeln!(out, "{} {partition} {}", args.topic, offset.0)?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

// JSON lines of the output. Structs, not `json!`, so that keys print in the documented order.

/// `group list --json`.
#[derive(Serialize)]
struct ListLine<'a> {
    groups: Vec<SummaryLine<'a>>,
}

/// One group of `group list --json`.
#[derive(Serialize)]
struct SummaryLine<'a> {
    name: &'a str,
    state: &'static str,
    members: u32,
}

/// `group describe --json`.
#[derive(Serialize)]
struct DescribeLine<'a> {
    name: &'a str,
    state: &'static str,
    members: Vec<MemberLine<'a>>,
    partitions: Vec<PartitionLine<'a>>,
}

/// One member of `group describe --json`.
#[derive(Serialize)]
struct MemberLine<'a> {
    member_id: &'a str,
    client_id: &'a str,
    epoch: i32,
    topics: &'a [String],
    assigned: Vec<TopicPartitionLine<'a>>,
}

/// One assigned partition of a member in `group describe --json`.
#[derive(Serialize)]
struct TopicPartitionLine<'a> {
    topic: &'a str,
    partition: u32,
}

/// One partition of `group describe --json`; `null` where there is no committed offset or no
/// owner.
#[derive(Serialize)]
struct PartitionLine<'a> {
    topic: &'a str,
    partition: u32,
    committed_offset: Option<u64>,
    high_watermark: u64,
    lag: u64,
    owner: Option<&'a str>,
}

fn list_line(groups: &[GroupSummary]) -> ListLine<'_> {
    ListLine {
        groups: groups
            .iter()
            .map(|g| SummaryLine {
                name: &g.name,
                state: g.state.as_str(),
                members: g.members,
            })
            .collect(),
    }
}

fn describe_line(d: &GroupDescription) -> DescribeLine<'_> {
    DescribeLine {
        name: &d.name,
        state: d.state.as_str(),
        members: d
            .members
            .iter()
            .map(|m| MemberLine {
                member_id: &m.member_id,
                client_id: &m.client_id,
                epoch: m.epoch,
                topics: &m.topics,
                assigned: m
                    .assigned
                    .iter()
                    .map(|(topic, partition)| TopicPartitionLine {
                        topic,
                        partition: *partition,
                    })
                    .collect(),
            })
            .collect(),
        partitions: d
            .partitions
            .iter()
            .map(|p| PartitionLine {
                topic: &p.topic,
                partition: p.partition,
                committed_offset: p.committed.map(|o| o.0),
                high_watermark: p.high_watermark.0,
                lag: p.lag,
                owner: p.owner.as_deref(),
            })
            .collect(),
    }
}

/// `rows` as text: columns separated by two spaces, each as wide as its widest cell, the
/// columns `right` names right-aligned (numbers) and the others left-aligned. The last column
/// is not padded, so no line ends in spaces.
fn table(rows: &[Vec<String>], right: &[bool]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for row in rows {
        assert_eq!(row.len(), columns, "every row has every column");
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            let pad = widths[c] - cell.chars().count();
            if right[c] {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if c + 1 < columns {
                    line.push_str(&" ".repeat(pad));
                }
            }
        }
        text.push_str(&line);
        text.push('\n');
    }
    text
}

/// `group list`: `NAME  STATE  MEMBERS` per group, aligned, no header (as `topic list`).
fn list_text(groups: &[GroupSummary]) -> String {
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            vec![
                g.name.clone(),
                g.state.as_str().to_string(),
                g.members.to_string(),
            ]
        })
        .collect();
    table(&rows, &[false, false, true])
}

/// `group describe`: a title line, the members (if any), then the partitions.
fn describe_text(d: &GroupDescription) -> String {
    let mut text = format!(
        "group {} ({}, {} members)\n",
        d.name,
        d.state.as_str(),
        d.members.len()
    );
    if !d.members.is_empty() {
        let mut rows = vec![vec![
            "MEMBER_ID".to_string(),
            "CLIENT_ID".to_string(),
            "EPOCH".to_string(),
            "TOPICS".to_string(),
            "ASSIGNED".to_string(),
        ]];
        for m in &d.members {
            let assigned: Vec<String> = m
                .assigned
                .iter()
                .map(|(topic, partition)| format!("{topic}/{partition}"))
                .collect();
            rows.push(vec![
                m.member_id.clone(),
                dash_if_empty(&m.client_id),
                m.epoch.to_string(),
                dash_if_empty(&m.topics.join(",")),
                dash_if_empty(&assigned.join(",")),
            ]);
        }
        text.push_str(&table(&rows, &[false, false, true, false, false]));
    }
    let mut rows = vec![vec![
        "TOPIC".to_string(),
        "PARTITION".to_string(),
        "COMMITTED".to_string(),
        "HIGH_WATERMARK".to_string(),
        "LAG".to_string(),
        "OWNER".to_string(),
    ]];
    for p in &d.partitions {
        rows.push(vec![
            p.topic.clone(),
            p.partition.to_string(),
            p.committed
                .map_or_else(|| "-".to_string(), |o| o.0.to_string()),
            p.high_watermark.0.to_string(),
            p.lag.to_string(),
            p.owner.clone().unwrap_or_else(|| "-".to_string()),
        ]);
    }
    text.push_str(&table(&rows, &[false, true, true, true, true, false]));
    text
}

fn dash_if_empty(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use octolog_client::{GroupMember, GroupPartition, GroupState};

    #[test]
    fn list_aligns_columns_without_trailing_spaces() {
        let groups = vec![
            GroupSummary {
                name: "billing".into(),
                state: GroupState::Reconciling,
                members: 12,
            },
            GroupSummary {
                name: "a".into(),
                state: GroupState::Empty,
                members: 0,
            },
        ];
        assert_eq!(
            list_text(&groups),
            "billing  reconciling  12\na        empty         0\n"
        );
        assert_eq!(list_text(&[]), "");
    }

    #[test]
    fn describe_shows_members_and_positions_with_dashes_for_none() {
        let d = GroupDescription {
            name: "g".into(),
            state: GroupState::Stable,
            members: vec![GroupMember {
                member_id: "m-1".into(),
                client_id: String::new(),
                epoch: 3,
                topics: vec!["jobs".into()],
                assigned: vec![("jobs".into(), 0), ("jobs".into(), 1)],
            }],
            partitions: vec![
                GroupPartition {
                    topic: "jobs".into(),
                    partition: 0,
                    committed: Some(Offset(5)),
                    high_watermark: Offset(120),
                    lag: 115,
                    owner: Some("m-1".into()),
                },
                GroupPartition {
                    topic: "jobs".into(),
                    partition: 1,
                    committed: None,
                    high_watermark: Offset(0),
                    lag: 0,
                    owner: None,
                },
            ],
        };
        assert_eq!(
            describe_text(&d),
            "group g (stable, 1 members)\n\
             MEMBER_ID  CLIENT_ID  EPOCH  TOPICS  ASSIGNED\n\
             m-1        -              3  jobs    jobs/0,jobs/1\n\
             TOPIC  PARTITION  COMMITTED  HIGH_WATERMARK  LAG  OWNER\n\
             jobs           0          5             120  115  m-1\n\
             jobs           1          -               0    0  -\n"
        );
        assert_eq!(
            serde_json::to_string(&describe_line(&d)).expect("json"),
            r#"{"name":"g","state":"stable","members":[{"member_id":"m-1","client_id":"","epoch":3,"topics":["jobs"],"assigned":[{"topic":"jobs","partition":0},{"topic":"jobs","partition":1}]}],"partitions":[{"topic":"jobs","partition":0,"committed_offset":5,"high_watermark":120,"lag":115,"owner":"m-1"},{"topic":"jobs","partition":1,"committed_offset":null,"high_watermark":0,"lag":0,"owner":null}]}"#
        );
    }
}
