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
use crate::Client;

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
}

impl ConsumerRecord {
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

/// Settings of a [`Consumer`].
#[derive(Debug, Clone)]
pub struct ConsumerBuilder {
    client: Client,
    topic: String,
    fetch_bytes_max: u32,
    partition_bytes_max: u32,
    max_wait: Duration,
    push: bool,
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
        }
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
        self.positions.clear();
        for &p in partitions {
            self.seek(p, start).await?;
        }
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
        if partition >= self.partition_count {
            return Err(ClientError::InvalidArgument(format!(
                "topic {:?} has partitions 0..{}, not {partition}",
                self.topic, self.partition_count
            )));
        }
        let admin = self.settings.client.admin();
        let offset = match start {
            StartAt::Beginning => {
                admin
                    .list_offset(&self.topic, partition, OffsetSpec::Earliest)
                    .await?
            }
            StartAt::End => {
                admin
                    .list_offset(&self.topic, partition, OffsetSpec::Latest)
                    .await?
            }
            StartAt::Timestamp(t) => {
                admin
                    .list_offset(&self.topic, partition, OffsetSpec::Timestamp(t))
                    .await?
            }
            StartAt::Offset(o) => {
                let earliest = admin
                    .list_offset(&self.topic, partition, OffsetSpec::Earliest)
                    .await?;
                let latest = admin
                    .list_offset(&self.topic, partition, OffsetSpec::Latest)
                    .await?;
                if o < earliest || latest < o {
                    return Err(ClientError::OffsetOutOfRange {
                        topic: self.topic.to_string(),
                        partition,
                        offset: o,
                        log_start_offset: earliest,
                        high_watermark: latest,
                    });
                }
                o
            }
        };
        self.positions.insert(partition, offset);
        self.restart();
        Ok(())
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
        let task = if settings.push {
            tokio::spawn(push_loop(settings, positions, tx))
        } else {
            tokio::spawn(fetch_loop(settings, positions, tx))
        };
        self.fetcher = Some(Fetcher { answers: rx, task });
    }

    /// Waits for the next answer and decodes it; returns how many records it added. Returns 0
    /// when a fetch's `max_wait` passed without records.
    async fn fill(&mut self) -> Result<usize> {
        if self.positions.is_empty() {
            return Err(ClientError::InvalidArgument(
                "no partition is assigned".into(),
            ));
        }
        if self.fetcher.is_none() {
            self.start_fetcher();
        }
        let fetcher = self.fetcher.as_mut().expect("just started");
        let Some(answer) = fetcher.answers.recv().await else {
            self.fetcher = None;
            return Err(ClientError::Closed);
        };
        let partitions = match answer {
            Ok(partitions) => partitions,
            Err(e) => {
                self.fetcher = None;
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
        if self.buffered.is_empty() {
            self.fill().await?;
        }
        let records: Vec<ConsumerRecord> = self.buffered.drain(..).collect();
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
        loop {
            if let Some(record) = self.buffered.pop_front() {
                self.hand_out(&record);
                return Ok(record);
            }
            self.fill().await?;
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
            group: None,
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
