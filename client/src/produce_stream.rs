//! A producer's `ProduceStream` to the broker: requests leave in the order they are submitted and
//! the broker appends them in that order, so a partition can have several requests in flight
//! without its records being reordered. Answers come back matched by request id.
//!
//! One stream at a time per producer, opened on first use and again after it breaks. When it
//! breaks (connection lost, broker shutting down), every request waiting on it fails with the
//! error that ended it; whether each was appended is unknown, which is what the idempotent
//! producer's retries are for.
//!
//! Ownership: the request side lives in [`Stream`], held by the producer and its requests in
//! flight. When the last holder drops it, the request side ends, the broker finishes the
//! stream, and the task that reads answers (which holds only the waiting list) ends too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use octolog_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::error::{ClientError, Result};
use crate::Client;

type AnswerSender = oneshot::Sender<Result<pb::ProduceStreamResponse>>;

/// Requests sent and not answered yet, shared by the stream and its answer reader.
#[derive(Debug, Default)]
struct Waiting {
    answers: HashMap<u64, AnswerSender>,
    next_id: u64,
    /// Once the stream has ended: code and message of the error every later submit gets.
    ended: Option<(tonic::Code, String)>,
}

type SharedWaiting = Arc<Mutex<Waiting>>;

fn lock(waiting: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    waiting.lock().unwrap_or_else(|e| e.into_inner())
}

/// One open `ProduceStream`.
#[derive(Debug)]
pub(crate) struct Stream {
    outbound: mpsc::UnboundedSender<pb::ProduceStreamRequest>,
    waiting: SharedWaiting,
}

impl Stream {
    /// Whether the stream has ended (a new one is needed).
    fn has_ended(&self) -> bool {
        lock(&self.waiting).ended.is_some()
    }

    /// Sends a request; the broker appends it after every request submitted before it on this
    /// stream. Returns the answer to wait for.
    ///
    /// # Errors
    ///
    /// [`ClientError::Broker`] with the error that ended the stream, if it has ended.
    pub(crate) fn submit(
        &self,
        topic: String,
        partitions: Vec<pb::PartitionBatches>,
    ) -> Result<Answer> {
        let mut waiting = lock(&self.waiting);
        if let Some((code, message)) = &waiting.ended {
            return Err(ClientError::Broker {
                code: *code,
                message: message.clone(),
            });
        }
        let request_id = waiting.next_id;
        waiting.next_id += 1;
        let request = pb::ProduceStreamRequest {
            request_id,
            topic,
            partitions,
        };
        if self.outbound.send(request).is_err() {
            // The call itself is gone (tonic dropped the request side): the next request opens
            // a new stream.
            let message = "the produce stream to the broker is closed".to_string();
            waiting.ended = Some((tonic::Code::Unavailable, message.clone()));
            return Err(ClientError::Broker {
                code: tonic::Code::Unavailable,
                message,
            });
        }
        let (sender, receiver) = oneshot::channel();
        waiting.answers.insert(request_id, sender);
        Ok(Answer {
            receiver,
            request_id,
            waiting: Arc::clone(&self.waiting),
        })
    }
}

/// The answer to one submitted request. Dropping it (a timeout) forgets the request.
#[derive(Debug)]
pub(crate) struct Answer {
    receiver: oneshot::Receiver<Result<pb::ProduceStreamResponse>>,
    request_id: u64,
    waiting: SharedWaiting,
}

impl Answer {
    /// Waits for the broker's answer: the per-partition results, or the failure of the request
    /// as a whole, or of the stream.
    pub(crate) async fn wait(mut self) -> Result<Vec<pb::PartitionProduceResult>> {
        let answer = match (&mut self.receiver).await {
            Ok(answer) => answer?,
            // The reader ends only after failing every waiting request; never reached.
            Err(_) => {
                return Err(ClientError::Broker {
                    code: tonic::Code::Unavailable,
                    message: "the produce stream to the broker ended".into(),
                })
            }
        };
        if answer.status_code != 0 {
            return Err(ClientError::Broker {
                code: tonic::Code::from_i32(answer.status_code),
                message: answer.status_message,
            });
        }
        Ok(answer.partitions)
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        lock(&self.waiting).answers.remove(&self.request_id);
    }
}

/// The producer's current stream, opened when needed.
#[derive(Debug)]
pub(crate) struct ProduceStreams {
    client: Client,
    current: tokio::sync::Mutex<Option<Arc<Stream>>>,
}

impl ProduceStreams {
    pub(crate) fn new(client: Client) -> Self {
        ProduceStreams {
            client,
            current: tokio::sync::Mutex::new(None),
        }
    }

    /// The open stream, opening one if there is none or it has ended; all within `timeout`
    /// (requests wait in line while one of them opens the stream).
    ///
    /// # Errors
    ///
    /// [`ClientError::Timeout`], or the broker's refusal of the call.
    pub(crate) async fn stream(&self, timeout: Duration) -> Result<Arc<Stream>> {
        tokio::time::timeout(timeout, self.open())
            .await
            .map_err(|_| ClientError::Timeout {
                operation: "ProduceStream",
                after: timeout,
            })?
    }

    async fn open(&self) -> Result<Arc<Stream>> {
        let mut current = self.current.lock().await;
        if let Some(stream) = current.as_ref().filter(|s| !s.has_ended()) {
            return Ok(Arc::clone(stream));
        }
        *current = None;
        let (outbound, requests) = mpsc::unbounded_channel();
        let mut rpc = self.client.rpc();
        let inbound = rpc
            .produce_stream(UnboundedReceiverStream::new(requests))
            .await?
            .into_inner();
        let waiting = SharedWaiting::default();
        tokio::spawn(read_answers(Arc::clone(&waiting), inbound));
        let stream = Arc::new(Stream { outbound, waiting });
        *current = Some(Arc::clone(&stream));
        Ok(stream)
    }
}

/// Hands each answer to its waiting request; when the stream ends, fails every request still
/// waiting and every later submit with the reason.
async fn read_answers(
    waiting: SharedWaiting,
    mut inbound: tonic::Streaming<pb::ProduceStreamResponse>,
) {
    let (code, message) = loop {
        match inbound.message().await {
            Ok(Some(answer)) => {
                let sender = lock(&waiting).answers.remove(&answer.request_id);
                // None: the request timed out and was forgotten.
                if let Some(sender) = sender {
                    let _ = sender.send(Ok(answer));
                }
            }
            Ok(None) => {
                break (
                    tonic::Code::Unavailable,
                    "the broker ended the produce stream".to_string(),
                )
            }
            Err(status) => break (status.code(), status.message().to_string()),
        }
    };
    // Whatever ended the stream, the requests still waiting were not answered: they may or may
    // not have been appended, so they fail in a way that lets an idempotent producer send them
    // again. (A request the broker refused, such as one over its size limit, was answered.)
    let message = format!("the produce stream ended before the answer: {message} ({code:?})");
    let answers = {
        let mut waiting = lock(&waiting);
        waiting.ended = Some((tonic::Code::Unavailable, message.clone()));
        std::mem::take(&mut waiting.answers)
    };
    for (_, sender) in answers {
        let _ = sender.send(Err(ClientError::Broker {
            code: tonic::Code::Unavailable,
            message: message.clone(),
        }));
    }
}
