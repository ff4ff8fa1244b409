//! The consumer: reads assigned partitions of a topic from chosen positions, in partition order.
//!
//! A background fetcher task keeps the next request in flight while the caller processes the
//! current answer (pipelining): it long-polls the broker (`Fetch` with `max_wait`), or with
//! [`ConsumerBuilder::push`] holds a `Subscribe` stream open and receives records as they are
//! appended. Answers travel to the consumer through a channel of `FETCHES_AHEAD` entries, which
//! bounds the memory read ahead. Every batch is checked (CRC-32C) before its records are handed
//! out; records below the position asked for (a batch may start earlier) are skipped.
//!
//! Thread-safety: `Consumer` is `Send`; it is used by one task at a time (`&mut self`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use octolog_batch::Offset;
use octolog_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::admin::OffsetSpec;
use crate::error::{ClientError, Result};
use crate::membership;
use crate::Client;

/// Shortest wait of a pushed consumer's `poll` for the next answer (see `fill`).
const PUSH_WAIT_MIN: Duration = Duration::from_millis(1);

/// Fetch answers read ahead of the caller.
const FETCHES_AHEAD: usize = 2;

/// Where to start reading a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest record still held.
    Beginning,
    /// After the last record: only records appended from now on.
    End,
    /// This offset (replay from here).
    Offset(Offset),
    /// The first record with a timestamp at or after this many ms since the epoch.
    Timestamp(i64),
}

/// A record read from a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    topic: Arc<str>,
    partition: u32,
    offset: Offset,
    timestamp_ms: i64,
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: Vec<(String, Option<Bytes>)>,
    redelivered: bool,
}

impl ConsumerRecord {
    /// Whether this record may have been handed to a member of the consumer's group before (a
    /// member that crashed after it was served the record and before it committed past it).
    /// Always `false` outside a group. The only way a record reaches a group twice.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The partition.
    pub fn partition(&self) -> u32 {
        self.partition
    }
    /// The record's offset in its partition.
    pub fn offset(&self) -> Offset {
        self.offset
    }
    /// The record's timestamp, ms since the epoch.
    pub fn timestamp_ms(&self) -> i64 {
        self.timestamp_ms
    }
    /// The key; `None` for a null key.
    pub fn key(&self) -> Option<&Bytes> {
        self.key.as_ref()
    }
    /// The value; `None` for a null value (tombstone).
    pub fn value(&self) -> Option<&Bytes> {
        self.value.as_ref()
    }
    /// The headers, in order.
    pub fn headers(&self) -> &[(String, Option<Bytes>)] {
        &self.headers
    }
}

/// A change of a group consumer's partitions, as passed to [`ConsumerBuilder::on_rebalance`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rebalance {
    /// These partitions are now the consumer's, read from the group's committed positions.
    Assigned(Vec<u32>),
    /// These partitions are about to be given up: records handed out so far are committed
    /// right after the callback returns, and no more of them will be handed out.
    Revoked(Vec<u32>),
    /// The session with the broker was lost (broker restart, or removal after a timeout) and
    /// these partitions with it, without a final commit: records handed out after the last
    /// commit will be delivered again, marked as redelivered.
    Lost(Vec<u32>),
}

/// The rebalance callback, shared by clones of the builder.
#[derive(Clone)]
struct RebalanceCallback(Arc<dyn Fn(&Rebalance) + Send + Sync>);

impl std::fmt::Debug for RebalanceCallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RebalanceCallback")
    }
}

/// Settings of a [`Consumer`].
#[derive(Debug, Clone)]
pub struct ConsumerBuilder {
    client: Client,
    topic: String,
    fetch_bytes_max: u32,
    partition_bytes_max: u32,
    max_wait: Duration,
    push: bool,
    auto_commit: Option<Duration>,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    group_start: StartAt,
    client_id: String,
    on_rebalance: Option<RebalanceCallback>,
}

impl ConsumerBuilder {
    pub(crate) fn new(client: Client, topic: String) -> Self {
        ConsumerBuilder {
            client,
            topic,
            fetch_bytes_max: 8 << 20,
            partition_bytes_max: 2 << 20,
            max_wait: Duration::from_millis(500),
            push: false,
            auto_commit: Some(Duration::from_secs(1)),
            session_timeout: Duration::from_secs(10),
            rebalance_timeout: Duration::from_secs(30),
            group_start: StartAt::End,
            client_id: format!("octolog-{}", std::process::id()),
            on_rebalance: None,
        }
    }

    /// In a group: commit the positions handed out at most this long ago, from within
    /// [`Consumer::next`] and [`Consumer::poll`] (so a record is committed only once the caller
    /// came back for more), or `None` to commit only by [`Consumer::commit`]. Default 1 s.
    pub fn auto_commit(mut self, interval: Option<Duration>) -> Self {
        self.auto_commit = interval;
        self
    }

    /// In a group: how long the consumer may go unheard before the broker removes it (heartbeats
    /// go out at a third of this). Default 10 s.
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }

    /// In a group: how long the consumer may take to give up partitions it was asked to
    /// release (the callback included). Default 30 s.
    pub fn rebalance_timeout(mut self, timeout: Duration) -> Self {
        self.rebalance_timeout = timeout;
        self
    }

    /// In a group: where to start in partitions where the group has no committed position.
    /// Default [`StartAt::End`].
    pub fn group_start(mut self, start: StartAt) -> Self {
        self.group_start = start;
        self
    }

    /// In a group: the name this member shows in `octolog group describe`. Default
    /// `octolog-<process id>`.
    pub fn client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self
    }

    /// In a group: called (on the consumer's task, inside `next`/`poll`) when partitions are
    /// assigned, revoked or lost. Default: none.
    pub fn on_rebalance(mut self, callback: impl Fn(&Rebalance) + Send + Sync + 'static) -> Self {
        self.on_rebalance = Some(RebalanceCallback(Arc::new(callback)));
        self
    }

    /// Most bytes per fetch answer. Default 8 MiB.
    pub fn fetch_bytes_max(mut self, bytes: u32) -> Self {
        self.fetch_bytes_max = bytes;
        self
    }

    /// Most bytes per partition per fetch answer (at least one batch comes anyway).
    /// Default 2 MiB.
    pub fn partition_bytes_max(mut self, bytes: u32) -> Self {
        self.partition_bytes_max = bytes;
        self
    }

    /// How long a fetch waits at the broker for new records. Default 500 ms.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// Receive records pushed by the broker over a `Subscribe` stream instead of long-polling
    /// fetches. Default `false`.
    pub fn push(mut self, push: bool) -> Self {
        self.push = push;
        self
    }

    /// Makes the consumer; nothing is assigned yet.
    ///
    /// # Errors
    ///
    /// The broker's error if the topic does not exist.
    pub async fn build(self) -> Result<Consumer> {
        let info = self.client.admin().describe_topic(&self.topic).await?;
        Ok(Consumer {
            partition_count: info.partitions().len() as u32,
            topic: Arc::from(self.topic.as_str()),
            settings: self,
            positions: BTreeMap::new(),
            high_watermarks: BTreeMap::new(),
            buffered: VecDeque::new(),
            buffered_next: BTreeMap::new(),
            fetcher: None,
            group: None,
        })
    }
}

/// What the fetcher task hands over: one partition's data, or an error that stops it.
type Fetched = Result<Vec<pb::PartitionData>>;

#[derive(Debug)]
struct Fetcher {
    answers: mpsc::Receiver<Fetched>,
    task: JoinHandle<()>,
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads assigned partitions of one topic. See the module documentation.
#[derive(Debug)]
pub struct Consumer {
    settings: ConsumerBuilder,
    topic: Arc<str>,
    partition_count: u32,
    /// Next offset to hand out, per assigned partition.
    positions: BTreeMap<u32, Offset>,
    /// High watermark per partition, from the latest answer.
    high_watermarks: BTreeMap<u32, Offset>,
    /// Records decoded and not yet handed out.
    buffered: VecDeque<ConsumerRecord>,
    /// Per partition, the offset after the last record put in `buffered`: records below it
    /// that come again (a batch may start before the offset asked for) are skipped. Equal to
    /// `positions` whenever `buffered` holds nothing of that partition.
    buffered_next: BTreeMap<u32, Offset>,
    /// The read-ahead task; restarted when positions change.
    fetcher: Option<Fetcher>,
    /// The group membership, after [`Consumer::subscribe`].
    group: Option<Membership>,
}

/// A consumer's side of its group membership.
#[derive(Debug)]
struct Membership {
    /// The group.
    name: String,
    /// The member id, while in a session.
    member_id: Option<String>,
    /// The epoch of the latest assignment.
    epoch: i32,
    /// Events from the membership task.
    events: mpsc::Receiver<membership::Event>,
    /// Commands to the membership task.
    commands: mpsc::Sender<membership::Command>,
    /// Per partition, records below this were possibly handed to a crashed member.
    redelivered_until: BTreeMap<u32, Offset>,
    /// The position last committed per partition, to skip commits that change nothing.
    committed: BTreeMap<u32, Offset>,
    /// When positions were last committed.
    last_commit: tokio::time::Instant,
    /// Set when a fetch was refused (the partitions are moving): reading waits for the next
    /// assignment.
    fenced: bool,
    /// Whether an assignment has come since the session began.
    assigned: bool,
}

impl Consumer {
    /// The topic read.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// How many partitions the topic has.
    pub fn partition_count(&self) -> u32 {
        self.partition_count
    }

    /// Reads these partitions, each starting at `start`. Replaces any earlier assignment.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidArgument`] for a partition the topic does not have; the broker's
    /// error if a position cannot be looked up.
    pub async fn assign(&mut self, partitions: &[u32], start: StartAt) -> Result<()> {
        self.refuse_in_group()?;
        // One look-up for all partitions (a topic may have thousands), and one restart.
        let offsets = self.resolve(partitions, start).await?;
        self.positions = partitions.iter().copied().zip(offsets).collect();
        self.restart();
        Ok(())
    }

    /// Reads every partition of the topic, each starting at `start`.
    ///
    /// # Errors
    ///
    /// As [`Consumer::assign`].
    pub async fn assign_all(&mut self, start: StartAt) -> Result<()> {
        let all: Vec<u32> = (0..self.partition_count).collect();
        self.assign(&all, start).await
    }

    /// Moves the position of `partition` (adding it to the assignment).
    ///
    /// # Errors
    ///
    /// As [`Consumer::assign`], and [`ClientError::OffsetOutOfRange`] for an offset outside
    /// `[log_start_offset, high_watermark]`.
    pub async fn seek(&mut self, partition: u32, start: StartAt) -> Result<()> {
        self.refuse_in_group()?;
        let offset = self.resolve(&[partition], start).await?[0];
        self.positions.insert(partition, offset);
        self.restart();
        Ok(())
    }

    fn refuse_in_group(&self) -> Result<()> {
        if let Some(group) = &self.group {
            return Err(ClientError::InvalidArgument(format!(
                "the partitions of a member of group {:?} are assigned by the broker",
                group.name
            )));
        }
        Ok(())
    }

    /// The offsets `start` names in `partitions`, in order, looked up with as few requests as
    /// possible.
    async fn resolve(&self, partitions: &[u32], start: StartAt) -> Result<Vec<Offset>> {
        if let Some(&partition) = partitions.iter().find(|&&p| p >= self.partition_count) {
            return Err(ClientError::InvalidArgument(format!(
                "topic {:?} has partitions 0..{}, not {partition}",
                self.topic, self.partition_count
            )));
        }
        let admin = self.settings.client.admin();
        let lookup = |spec: OffsetSpec| {
            let queries: Vec<(u32, OffsetSpec)> = partitions.iter().map(|&p| (p, spec)).collect();
            let admin = admin.clone();
            let topic = Arc::clone(&self.topic);
            async move { admin.list_offsets(&topic, &queries).await }
        };
        match start {
            StartAt::Beginning => lookup(OffsetSpec::Earliest).await,
            StartAt::End => lookup(OffsetSpec::Latest).await,
            StartAt::Timestamp(t) => lookup(OffsetSpec::Timestamp(t)).await,
            StartAt::Offset(o) => {
                let earliest = lookup(OffsetSpec::Earliest).await?;
                let latest = lookup(OffsetSpec::Latest).await?;
                for ((&partition, &earliest), &latest) in
                    partitions.iter().zip(&earliest).zip(&latest)
                {
                    if o < earliest || latest < o {
                        return Err(ClientError::OffsetOutOfRange {
                            topic: self.topic.to_string(),
                            partition,
                            offset: o,
                            log_start_offset: earliest,
                            high_watermark: latest,
                        });
                    }
                }
                Ok(vec![o; partitions.len()])
            }
        }
    }

    /// The next offset to be handed out for `partition`, if assigned.
    pub fn position(&self, partition: u32) -> Option<Offset> {
        self.positions.get(&partition).copied()
    }

    /// The assigned partitions.
    pub fn assignment(&self) -> Vec<u32> {
        self.positions.keys().copied().collect()
    }

    /// The high watermark of `partition` in the latest answer, if any came.
    pub fn high_watermark(&self, partition: u32) -> Option<Offset> {
        self.high_watermarks.get(&partition).copied()
    }

    /// Whether every assigned partition has been read up to the high watermark last reported
    /// by the broker (false until an answer has come for each).
    pub fn at_end(&self) -> bool {
        self.buffered.is_empty()
            && self
                .positions
                .iter()
                .all(|(p, pos)| self.high_watermarks.get(p).is_some_and(|hw| pos >= hw))
    }

    /// Drops the read-ahead (and what it buffered) and restarts reading from the positions
    /// handed out so far, so no buffered record of any partition is lost.
    fn restart(&mut self) {
        self.fetcher = None;
        self.buffered.clear();
        self.buffered_next = self.positions.clone();
        self.high_watermarks.clear();
    }

    /// Moves the position of the record's partition past it: it has been handed out.
    fn hand_out(&mut self, record: &ConsumerRecord) {
        if let Some(position) = self.positions.get_mut(&record.partition) {
            *position = Offset(record.offset.0 + 1);
        }
    }

    fn start_fetcher(&mut self) {
        let (tx, rx) = mpsc::channel(FETCHES_AHEAD);
        let positions = self.positions.clone();
        let settings = self.settings.clone();
        let group = self.group.as_ref().map(|g| pb::GroupContext {
            group: g.name.clone(),
            member_id: g.member_id.clone().unwrap_or_default(),
            member_epoch: g.epoch,
        });
        let task = if settings.push && group.is_none() {
            tokio::spawn(push_loop(settings, positions, tx))
        } else {
            tokio::spawn(fetch_loop(settings, positions, group, tx))
        };
        self.fetcher = Some(Fetcher { answers: rx, task });
    }

    /// Waits for the next answer and decodes it; returns how many records it added. Returns 0
    /// when a fetch's `max_wait` passed without records.
    async fn fill(&mut self) -> Result<usize> {
        if let Some(group) = self.group.as_mut() {
            // Membership first: an assignment changes what may be read.
            match group.events.try_recv() {
                Ok(event) => {
                    self.handle_event(event).await?;
                    return Ok(0);
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return Err(ClientError::Closed),
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            if self.positions.is_empty() || group.fenced {
                // Nothing to read until the broker assigns something; `max_wait` bounds the
                // wait as it bounds a fetch, so `poll` returns now and then.
                let wait = self.settings.max_wait;
                let Ok(event) = tokio::time::timeout(wait, group.events.recv()).await else {
                    return Ok(0);
                };
                self.handle_event(event.ok_or(ClientError::Closed)?).await?;
                return Ok(0);
            }
        } else if self.positions.is_empty() {
            return Err(ClientError::InvalidArgument(
                "no partition is assigned".into(),
            ));
        }
        if self.fetcher.is_none() {
            self.start_fetcher();
        }
        let fetcher = self.fetcher.as_mut().expect("just started");
        let answer = match self.group.as_mut() {
            // A subscription answers only when there are records: `max_wait` bounds the wait,
            // as a fetch's does at the broker, so `poll` returns (empty) now and then.
            None if self.settings.push => {
                // At least a millisecond, so that `next` on a quiet topic with a zero `max_wait`
                // waits instead of spinning.
                let wait = self.settings.max_wait.max(PUSH_WAIT_MIN);
                match tokio::time::timeout(wait, fetcher.answers.recv()).await {
                    Ok(answer) => answer,
                    Err(_) => return Ok(0),
                }
            }
            None => fetcher.answers.recv().await,
            Some(group) => tokio::select! {
                answer = fetcher.answers.recv() => answer,
                event = group.events.recv() => {
                    let event = event.ok_or(ClientError::Closed)?;
                    self.handle_event(event).await?;
                    return Ok(0);
                }
            },
        };
        let Some(answer) = answer else {
            self.fetcher = None;
            return Err(ClientError::Closed);
        };
        let partitions = match answer {
            Ok(partitions) => partitions,
            Err(e) => {
                self.fetcher = None;
                if let Some(group) = self.group.as_mut() {
                    if e.is_fenced() {
                        // The partitions are moving: wait for the assignment that says where.
                        group.fenced = true;
                        return Ok(0);
                    }
                }
                return Err(e);
            }
        };
        let before = self.buffered.len();
        for data in partitions {
            self.high_watermarks
                .insert(data.partition, Offset(data.high_watermark));
            let Some(position) = self.buffered_next.get_mut(&data.partition) else {
                continue;
            };
            let records = match octolog_batch::decode_batches(&data.batches) {
                Ok(records) => records,
                Err(source) => {
                    // The fetcher already moved past this answer: restart it from what was
                    // handed out, so nothing after the bad batch is skipped.
                    let error = ClientError::CorruptBatch {
                        topic: self.topic.to_string(),
                        partition: data.partition,
                        source,
                    };
                    self.restart();
                    return Err(error);
                }
            };
            let redelivered_until = self
                .group
                .as_ref()
                .and_then(|g| g.redelivered_until.get(&data.partition).copied())
                .unwrap_or(Offset(0));
            self.buffered.reserve(records.len());
            for record in records {
                let offset = record.offset as u64;
                if offset < position.0 {
                    continue;
                }
                *position = Offset(offset + 1);
                self.buffered.push_back(ConsumerRecord {
                    topic: Arc::clone(&self.topic),
                    partition: data.partition,
                    offset: Offset(offset),
                    timestamp_ms: record.timestamp_ms,
                    key: record.key,
                    value: record.value,
                    headers: record
                        .headers
                        .into_iter()
                        .map(|h| (h.key, h.value))
                        .collect(),
                    redelivered: offset < redelivered_until.0,
                });
            }
        }
        Ok(self.buffered.len() - before)
    }

    /// The records of the next answer (possibly none, when `max_wait` passed without any).
    ///
    /// # Errors
    ///
    /// The broker's error (e.g. offset out of range after retention), or a corrupt batch.
    pub async fn poll(&mut self) -> Result<Vec<ConsumerRecord>> {
        self.auto_commit().await?;
        if self.buffered.is_empty() {
            self.fill().await?;
        }
        // The buffer itself becomes the answer (no record is moved unless it wrapped around).
        let records = Vec::from(std::mem::take(&mut self.buffered));
        for record in &records {
            self.hand_out(record);
        }
        Ok(records)
    }

    /// Like [`Consumer::poll`], but hands out at most `records_max` records; the rest stay
    /// buffered for the next call (and are not counted as handed out, so not committed).
    ///
    /// # Errors
    ///
    /// As [`Consumer::poll`].
    pub async fn poll_at_most(&mut self, records_max: usize) -> Result<Vec<ConsumerRecord>> {
        self.auto_commit().await?;
        if self.buffered.is_empty() {
            self.fill().await?;
        }
        let n = records_max.min(self.buffered.len());
        let records: Vec<ConsumerRecord> = self.buffered.drain(..n).collect();
        for record in &records {
            self.hand_out(record);
        }
        Ok(records)
    }

    /// The next record, waiting as long as it takes.
    ///
    /// # Errors
    ///
    /// As [`Consumer::poll`].
    pub async fn next(&mut self) -> Result<ConsumerRecord> {
        self.auto_commit().await?;
        loop {
            if let Some(record) = self.buffered.pop_front() {
                self.hand_out(&record);
                return Ok(record);
            }
            self.fill().await?;
        }
    }

    /// Joins consumer group `group` for this consumer's topic: from now on the broker decides
    /// which partitions this consumer reads, sharing them with the group's other members, and
    /// each partition starts at the group's committed position (or at
    /// [`ConsumerBuilder::group_start`] where there is none). Returns once the broker accepted
    /// the member; partitions arrive with the following `next`/`poll` calls.
    ///
    /// Delivery: every record goes to one member of the group. Positions handed out are
    /// committed by auto-commit, by [`Consumer::commit`], when a partition is given up in a
    /// rebalance, and by [`Consumer::close`]. A member that crashes loses what it handed out
    /// after its last commit: those records go once more to the next owner, marked
    /// [`ConsumerRecord::redelivered`].
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidArgument`] if already subscribed or with partitions assigned by
    /// hand; the broker's error (unknown topic, bad group name, limits).
    pub async fn subscribe(&mut self, group: &str) -> Result<()> {
        if self.group.is_some() {
            return Err(ClientError::InvalidArgument(
                "this consumer is already in a group".into(),
            ));
        }
        if !self.positions.is_empty() {
            return Err(ClientError::InvalidArgument(
                "a consumer with partitions assigned by hand cannot join a group".into(),
            ));
        }
        let (events_tx, mut events) = mpsc::channel(membership::EVENTS_DEPTH);
        let (commands, commands_rx) = mpsc::channel(membership::COMMANDS_DEPTH);
        let settings = membership::Settings {
            client: self.settings.client.clone(),
            group: group.to_string(),
            topic: self.topic.to_string(),
            session_timeout: self.settings.session_timeout,
            rebalance_timeout: self.settings.rebalance_timeout,
            client_id: self.settings.client_id.clone(),
        };
        tokio::spawn(membership::run(settings, events_tx, commands_rx));
        let member_id = match events.recv().await {
            Some(membership::Event::Joined { member_id }) => member_id,
            Some(membership::Event::Failed(e)) | Some(membership::Event::Lost(e)) => return Err(e),
            Some(membership::Event::Assignment { .. }) | None => return Err(ClientError::Closed),
        };
        self.group = Some(Membership {
            name: group.to_string(),
            member_id: Some(member_id),
            epoch: 0,
            events,
            commands,
            redelivered_until: BTreeMap::new(),
            committed: BTreeMap::new(),
            last_commit: tokio::time::Instant::now(),
            fenced: false,
            assigned: false,
        });
        Ok(())
    }

    /// The member id given by the broker, while in a group session.
    pub fn member_id(&self) -> Option<&str> {
        self.group.as_ref().and_then(|g| g.member_id.as_deref())
    }

    /// Whether the consumer is in a group and has received its first assignment of the
    /// current session (which may be empty when the group has more members than partitions).
    pub fn has_assignment(&self) -> bool {
        self.group.as_ref().is_some_and(|g| g.assigned)
    }

    fn rebalanced(&self, event: Rebalance) {
        if let Some(callback) = &self.settings.on_rebalance {
            (callback.0)(&event);
        }
    }

    /// Applies a membership event.
    async fn handle_event(&mut self, event: membership::Event) -> Result<()> {
        match event {
            membership::Event::Joined { member_id } => {
                let group = self.group.as_mut().expect("events come only in a group");
                group.member_id = Some(member_id);
                group.epoch = 0;
            }
            membership::Event::Assignment { epoch, partitions } => {
                let new: BTreeMap<u32, membership::Assigned> =
                    partitions.into_iter().map(|a| (a.partition, a)).collect();
                let revoked: Vec<u32> = self
                    .positions
                    .keys()
                    .copied()
                    .filter(|p| !new.contains_key(p))
                    .collect();
                if !revoked.is_empty() {
                    self.rebalanced(Rebalance::Revoked(revoked.clone()));
                    let offsets: Vec<(u32, u64)> =
                        revoked.iter().map(|p| (*p, self.positions[p].0)).collect();
                    let group = self.group.as_mut().expect("in a group");
                    for p in &revoked {
                        self.positions.remove(p);
                        group.committed.remove(p);
                        group.redelivered_until.remove(p);
                    }
                    // Records handed out so far are committed as the partitions go; those
                    // buffered but not handed out are dropped (restart below) for the next
                    // owner to read.
                    group
                        .commands
                        .send(membership::Command::Release { epoch, offsets })
                        .await
                        .map_err(|_| ClientError::Closed)?;
                }
                let added: Vec<u32> = new
                    .keys()
                    .copied()
                    .filter(|p| !self.positions.contains_key(p))
                    .collect();
                // Looked up together: an assignment may bring thousands of partitions.
                let earliest = self.resolve(&added, StartAt::Beginning).await?;
                let uncommitted: Vec<u32> = added
                    .iter()
                    .copied()
                    .filter(|p| new[p].committed.is_none())
                    .collect();
                let mut starts = self
                    .resolve(&uncommitted, self.settings.group_start)
                    .await?
                    .into_iter();
                for (p, earliest) in added.iter().zip(earliest) {
                    let a = &new[p];
                    let position = match a.committed {
                        // Retention may have removed what the group had not read yet.
                        Some(c) => Offset(c).max(earliest),
                        None => starts.next().expect("one start per uncommitted partition"),
                    };
                    self.positions.insert(*p, position);
                    let group = self.group.as_mut().expect("in a group");
                    if let Some(c) = a.committed {
                        group.committed.insert(*p, Offset(c));
                    }
                    group
                        .redelivered_until
                        .insert(*p, Offset(a.redelivered_until));
                }
                let group = self.group.as_mut().expect("in a group");
                group.epoch = epoch;
                group.fenced = false;
                group.assigned = true;
                self.restart();
                if !added.is_empty() {
                    self.rebalanced(Rebalance::Assigned(added));
                }
            }
            membership::Event::Lost(e) => {
                let lost: Vec<u32> = self.positions.keys().copied().collect();
                tracing::warn!(error = %e, partitions = ?lost, "group session lost; joining again");
                self.positions.clear();
                let group = self.group.as_mut().expect("in a group");
                group.member_id = None;
                group.committed.clear();
                group.redelivered_until.clear();
                group.fenced = false;
                group.assigned = false;
                self.restart();
                if !lost.is_empty() {
                    self.rebalanced(Rebalance::Lost(lost));
                }
            }
            membership::Event::Failed(e) => return Err(e),
        }
        Ok(())
    }

    /// Positions that changed since they were last committed.
    fn uncommitted(&self) -> Vec<(u32, u64)> {
        let Some(group) = &self.group else {
            return Vec::new();
        };
        self.positions
            .iter()
            .filter(|(p, pos)| group.committed.get(p) != Some(pos))
            .map(|(p, pos)| (*p, pos.0))
            .collect()
    }

    /// Commits the positions handed out so far (the next offset to hand out, per partition),
    /// durably, for the group. Does nothing when nothing changed.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidArgument`] outside a group; [`ClientError::Closed`] when the
    /// session is gone; a partition error with [`ClientError::is_fenced`] when a partition was
    /// meanwhile moved (nothing of it is committed then).
    pub async fn commit(&mut self) -> Result<()> {
        let offsets = self.uncommitted();
        let group = self.group.as_mut().ok_or_else(|| {
            ClientError::InvalidArgument("commit needs a group: call subscribe first".into())
        })?;
        group.last_commit = tokio::time::Instant::now();
        if offsets.is_empty() {
            return Ok(());
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        group
            .commands
            .send(membership::Command::Commit {
                epoch: group.epoch,
                offsets: offsets.clone(),
                reply,
            })
            .await
            .map_err(|_| ClientError::Closed)?;
        answer.await.map_err(|_| ClientError::Closed)??;
        let group = self.group.as_mut().expect("checked above");
        for (p, o) in offsets {
            // Only if the partition is still ours and unchanged meanwhile.
            if self.positions.contains_key(&p) {
                group.committed.insert(p, Offset(o));
            }
        }
        Ok(())
    }

    /// Commits if the auto-commit interval has passed. A commit refused because partitions are
    /// moving is not an error: the release commits them.
    async fn auto_commit(&mut self) -> Result<()> {
        let due = match (&self.group, self.settings.auto_commit) {
            (Some(group), Some(interval)) => group.last_commit.elapsed() >= interval,
            _ => false,
        };
        if !due {
            return Ok(());
        }
        match self.commit().await {
            Ok(()) => Ok(()),
            Err(e) if e.is_fenced() || matches!(e, ClientError::Closed) => {
                tracing::debug!(error = %e, "auto-commit skipped");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Leaves the group cleanly: commits the positions handed out, gives up every partition
    /// (which move to the other members at once, nothing redelivered), and ends the session.
    /// Outside a group, just drops the consumer.
    ///
    /// # Errors
    ///
    /// The final commit's error; the member has left anyway.
    pub async fn close(mut self) -> Result<()> {
        self.fetcher = None;
        let offsets: Vec<(u32, u64)> = self.positions.iter().map(|(p, o)| (*p, o.0)).collect();
        let Some(group) = self.group.take() else {
            return Ok(());
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        if group
            .commands
            .send(membership::Command::Leave {
                epoch: group.epoch,
                offsets,
                reply,
            })
            .await
            .is_err()
        {
            return Err(ClientError::Closed);
        }
        match tokio::time::timeout(self.settings.session_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout {
                operation: "leave",
                after: self.settings.session_timeout,
            }),
        }
    }

    /// The records as a `Stream`, ending after the first error.
    pub fn into_stream(self) -> impl futures_core::Stream<Item = Result<ConsumerRecord>> + Send {
        futures_util::stream::unfold(Some(self), |consumer| async move {
            let mut consumer = consumer?;
            match consumer.next().await {
                Ok(record) => Some((Ok(record), Some(consumer))),
                Err(e) => Some((Err(e), None)),
            }
        })
    }
}

/// Advances `positions` past the batches of `data`.
fn advance(positions: &mut BTreeMap<u32, Offset>, data: &pb::PartitionData) {
    let last = octolog_batch::batches(&data.batches)
        .filter_map(|b| b.ok())
        .last();
    if let (Some((header, _)), Some(position)) = (last, positions.get_mut(&data.partition)) {
        let next = header.last_offset() as u64 + 1;
        if next > position.0 {
            *position = Offset(next);
        }
    }
}

/// Long-polls fetches back to back, always one ahead of the consumer.
async fn fetch_loop(
    settings: ConsumerBuilder,
    mut positions: BTreeMap<u32, Offset>,
    group: Option<pb::GroupContext>,
    tx: mpsc::Sender<Fetched>,
) {
    let mut rpc = settings.client.rpc();
    loop {
        let request = pb::FetchRequest {
            topic: settings.topic.clone(),
            partitions: positions
                .iter()
                .map(|(&partition, offset)| pb::PartitionFetch {
                    partition,
                    offset: offset.0,
                    max_bytes: settings.partition_bytes_max,
                })
                .collect(),
            max_wait_ms: settings.max_wait.as_millis().min(u128::from(u32::MAX)) as u32,
            min_bytes: 1,
            max_bytes: settings.fetch_bytes_max,
            format: pb::RecordFormat::Batches as i32,
            group: group.clone(),
        };
        let answer = match rpc.fetch(request).await {
            Ok(response) => {
                let partitions = response.into_inner().partitions;
                let mut error = None;
                for data in &partitions {
                    if let Err(e) = crate::check_partition_error(
                        &settings.topic,
                        data.partition,
                        data.error_code,
                        &data.error_message,
                    ) {
                        error = Some(e);
                        break;
                    }
                    advance(&mut positions, data);
                }
                match error {
                    Some(e) => Err(e),
                    None => Ok(partitions),
                }
            }
            Err(status) => Err(status.into()),
        };
        let stop = answer.is_err();
        if tx.send(answer).await.is_err() || stop {
            return;
        }
    }
}

/// Holds a `Subscribe` stream open and forwards what the broker pushes.
async fn push_loop(
    settings: ConsumerBuilder,
    mut positions: BTreeMap<u32, Offset>,
    tx: mpsc::Sender<Fetched>,
) {
    let request = pb::SubscribeRequest {
        topic: settings.topic.clone(),
        partitions: positions
            .iter()
            .map(|(&partition, offset)| pb::PartitionStart {
                partition,
                offset: offset.0,
            })
            .collect(),
        format: pb::RecordFormat::Batches as i32,
        max_bytes: settings.partition_bytes_max,
    };
    let mut stream = match settings.client.rpc().subscribe(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let _ = tx.send(Err(status.into())).await;
            return;
        }
    };
    loop {
        let answer = match stream.message().await {
            Ok(Some(message)) => {
                let data = message.data.unwrap_or_default();
                match crate::check_partition_error(
                    &settings.topic,
                    data.partition,
                    data.error_code,
                    &data.error_message,
                ) {
                    Ok(()) => {
                        advance(&mut positions, &data);
                        Ok(vec![data])
                    }
                    Err(e) => Err(e),
                }
            }
            Ok(None) => Err(ClientError::Closed),
            Err(status) => Err(status.into()),
        };
        let stop = answer.is_err();
        if tx.send(answer).await.is_err() || stop {
            return;
        }
    }
}
