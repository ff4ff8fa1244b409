//! `octolog.v1.Octolog/Fetch` answered without tonic's encode copy: the record batches of each
//! partition, zero-copy slices of the mapped segments, go to HTTP/2 as body chunks of their own.
//!
//! Through tonic, every fetched byte is copied once into its encode buffer: a unary answer is
//! one protobuf message written into one `BytesMut`. Here the answer is the same protobuf
//! message, laid out by hand around the `batches` fields: the bytes before each `batches` value
//! (the gRPC message prefix, the `partitions` key and length, the partition's other fields, and
//! the `batches` key and length) form one small chunk, then the batches themselves follow as the
//! slice the log returned. Protobuf readers accept fields in any order, so putting `batches`
//! last in each `PartitionData` decodes exactly as tonic's encoding does; `partition_data_bytes`
//! in the tests checks that. HTTP/2 (h2) writes chunks of 256 bytes or more straight from the
//! slice, gathered with the frame headers into one `writev`.
//!
//! Everything else about the call is the service's (`OctologService::fetch_answer`): checks,
//! waits, errors. Only the framing is done here: one uncompressed request message of at most
//! `request_bytes_max` bytes (larger ones get `RESOURCE_EXHAUSTED`, as the service's other calls),
//! and an answer of at most the service's `max_encoding_message_size`.
//!
//! Every other call passes through to the tonic service untouched.

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, LengthLimitError, Limited, StreamBody};
use octolog_proto::v1 as pb;
use prost::encoding::{encode_varint, encoded_len_varint};
use prost::Message;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::Status;

use crate::service::OctologService;

/// The HTTP path of the `Fetch` call.
const FETCH_PATH: &str = "/octolog.v1.Octolog/Fetch";
/// gRPC's message prefix: a compression flag, then the message length (big-endian `u32`).
const PREFIX_BYTES: usize = 5;
/// Protobuf key of `FetchResponse.partitions`: field 1, length-delimited.
const PARTITIONS_KEY: u8 = (1 << 3) | 2;
/// Protobuf key of `PartitionData.batches`: field 4, length-delimited.
const BATCHES_KEY: u8 = (4 << 3) | 2;
/// A partition's other fields this large go out as a chunk of their own rather than copied
/// into the bytes between batches; h2 copies chunks smaller than 256 bytes into its own buffer.
const OWN_CHUNK_BYTES_MIN: usize = 256;

/// Wraps the tonic service of `octolog.v1.Octolog`, answering `Fetch` itself.
#[derive(Debug, Clone)]
pub(crate) struct FetchPath<S> {
    inner: S,
    service: OctologService,
    /// Largest request message taken (`request_bytes_max`).
    request_bytes_max: usize,
    /// Largest answer message sent (the tonic service's `max_encoding_message_size`).
    response_bytes_max: usize,
}

impl<S> FetchPath<S> {
    pub(crate) fn new(
        inner: S,
        service: OctologService,
        request_bytes_max: usize,
        response_bytes_max: usize,
    ) -> Self {
        FetchPath {
            inner,
            service,
            request_bytes_max,
            response_bytes_max,
        }
    }
}

impl<S: NamedService> NamedService for FetchPath<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for FetchPath<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != FETCH_PATH {
            return Box::pin(self.inner.call(request));
        }
        let service = self.service.clone();
        let request_bytes_max = self.request_bytes_max;
        let response_bytes_max = self.response_bytes_max;
        Box::pin(async move {
            let answered = answer(
                &service,
                request.into_body(),
                request_bytes_max,
                response_bytes_max,
            )
            .await;
            Ok(match answered {
                Ok(chunks) => response(chunks),
                Err(status) => {
                    let unimplemented = status.code() == tonic::Code::Unimplemented;
                    let mut response = status.into_http();
                    if unimplemented {
                        // What the broker takes instead of a compressed request (gRPC spec).
                        response.headers_mut().insert(
                            "grpc-accept-encoding",
                            http::HeaderValue::from_static("identity"),
                        );
                    }
                    response
                }
            })
        })
    }
}

/// Reads the request, asks the service, and lays the answer out as body chunks.
async fn answer<B>(
    service: &OctologService,
    body: B,
    request_bytes_max: usize,
    response_bytes_max: usize,
) -> Result<Vec<Bytes>, Status>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let request = {
        // Dropped before the fetch waits: it may share a block of HTTP/2's read buffer.
        let body = request_body(body, request_bytes_max).await?;
        let message = request_message(&body, request_bytes_max)
            .map_err(|e| e.unwrap_or_else(|| too_large(request_bytes_max)))?;
        pb::FetchRequest::decode(message)
            .map_err(|e| Status::internal(format!("cannot decode the fetch request: {e}")))?
    };
    let fetched = service.fetch_answer(request).await?;
    response_chunks(fetched, response_bytes_max)
}

/// `RESOURCE_EXHAUSTED` for a request over `request_bytes_max`, as the broker's other calls.
fn too_large(request_bytes_max: usize) -> Status {
    Status::resource_exhausted(format!(
        "the request exceeds the broker's request_bytes_max ({request_bytes_max} bytes); send smaller requests"
    ))
}

/// The whole request body, if it holds no more than one message of `request_bytes_max` bytes.
async fn request_body<B>(body: B, request_bytes_max: usize) -> Result<Bytes, Status>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Ok(Limited::new(body, PREFIX_BYTES + request_bytes_max)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                too_large(request_bytes_max)
            } else {
                Status::from_error(e)
            }
        })?
        .to_bytes())
}

/// The one message of a unary request body. `Err(None)` if it is larger than
/// `request_bytes_max`.
fn request_message(body: &Bytes, request_bytes_max: usize) -> Result<Bytes, Option<Status>> {
    if body.is_empty() {
        return Err(Some(Status::internal("Missing request message.")));
    }
    if body.len() < PREFIX_BYTES {
        return Err(Some(Status::internal(
            "the request message prefix is cut short",
        )));
    }
    match body[0] {
        0 => {}
        1 => {
            return Err(Some(Status::unimplemented(
                "compressed requests are not supported: send them uncompressed",
            )))
        }
        flag => {
            return Err(Some(Status::internal(format!(
                "protocol error: received message with invalid compression flag: {flag} (valid flags are 0 and 1)"
            ))))
        }
    }
    let len = u32::from_be_bytes(body[1..PREFIX_BYTES].try_into().expect("4 bytes")) as usize;
    if len > request_bytes_max {
        return Err(None);
    }
    let end = PREFIX_BYTES + len;
    if body.len() < end {
        return Err(Some(Status::internal("the request message is cut short")));
    }
    if body.len() > end {
        return Err(Some(Status::internal(
            "a unary call takes one request message; more followed",
        )));
    }
    Ok(body.slice(PREFIX_BYTES..end))
}

/// The gRPC message of `fetched` as chunks: each partition's `batches` a chunk of its own (the
/// log's slice), the bytes between them in small chunks.
fn response_chunks(
    fetched: pb::FetchResponse,
    response_bytes_max: usize,
) -> Result<Vec<Bytes>, Status> {
    // Destructured, so that a field added to the message cannot be left out here unnoticed.
    let pb::FetchResponse { partitions } = fetched;
    // Each partition's other fields, encoded as prost would, and its batches.
    let partitions: Vec<(Vec<u8>, Bytes)> = partitions
        .into_iter()
        .map(|mut partition| {
            let batches = std::mem::take(&mut partition.batches);
            (partition.encode_to_vec(), batches)
        })
        .collect();
    let partition_len = |head: &[u8], batches: &Bytes| {
        head.len()
            + if batches.is_empty() {
                0
            } else {
                1 + encoded_len_varint(batches.len() as u64) + batches.len()
            }
    };
    let message_len: usize = partitions
        .iter()
        .map(|(head, batches)| {
            let len = partition_len(head, batches);
            1 + encoded_len_varint(len as u64) + len
        })
        .sum();
    let message_len_u32 = u32::try_from(message_len)
        .ok()
        .filter(|_| message_len <= response_bytes_max)
        .ok_or_else(|| {
            Status::out_of_range(format!(
                "Error, encoded message length too large: found {message_len} bytes, the limit is: {response_bytes_max} bytes"
            ))
        })?;
    let mut chunks = Vec::with_capacity(2 * partitions.len() + 1);
    let mut between = Vec::with_capacity(64);
    between.push(0);
    between.extend_from_slice(&message_len_u32.to_be_bytes());
    for (head, batches) in partitions {
        between.push(PARTITIONS_KEY);
        encode_varint(partition_len(&head, &batches) as u64, &mut between);
        if head.len() < OWN_CHUNK_BYTES_MIN {
            between.extend_from_slice(&head);
        } else {
            // Decoded records (`RECORD_FORMAT_RECORDS`): not copied a second time.
            chunks.push(Bytes::from(std::mem::take(&mut between)));
            chunks.push(Bytes::from(head));
        }
        if !batches.is_empty() {
            between.push(BATCHES_KEY);
            encode_varint(batches.len() as u64, &mut between);
            chunks.push(Bytes::from(std::mem::take(&mut between)));
            chunks.push(batches);
        }
    }
    if !between.is_empty() {
        chunks.push(Bytes::from(between));
    }
    Ok(chunks)
}

/// A successful gRPC answer: the chunks, then `grpc-status: 0` in the trailers.
fn response(chunks: Vec<Bytes>) -> http::Response<tonic::body::Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = chunks
        .into_iter()
        .map(Frame::data)
        .chain(std::iter::once(Frame::trailers(trailers)))
        .map(Ok::<_, Infallible>);
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let mut response = http::Response::new(tonic::body::Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(n: u32, batches: &'static [u8], error: &str) -> pb::PartitionData {
        pb::PartitionData {
            partition: n,
            high_watermark: 1_000_000 + u64::from(n),
            log_start_offset: 7,
            batches: Bytes::from_static(batches),
            records: Vec::new(),
            error_code: if error.is_empty() { 0 } else { 3 },
            error_message: error.to_string(),
        }
    }

    /// Guards the layout: the chunks, joined, are a gRPC message that decodes to the answer
    /// given, and each partition's batches are a chunk of their own (the same bytes, not a
    /// copy).
    #[test]
    fn partition_data_bytes_decode_as_the_answer_and_batches_are_their_own_chunks() {
        let big = vec![0xAB_u8; 300_000].leak();
        let answer = pb::FetchResponse {
            partitions: vec![
                partition(0, big, ""),
                partition(1, b"", "not the leader"),
                partition(2, b"short", ""),
                partition(3, b"", ""),
            ],
        };
        let chunks = response_chunks(answer.clone(), 16 << 20).unwrap();
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(joined[0], 0);
        let len = u32::from_be_bytes(joined[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, joined.len() - PREFIX_BYTES);
        assert_eq!(len, answer.encoded_len());
        let decoded = pb::FetchResponse::decode(&joined[PREFIX_BYTES..]).unwrap();
        assert_eq!(decoded, answer);
        // Zero-copy: the large batches chunk points at the answer's own bytes.
        assert!(chunks
            .iter()
            .any(|c| c.as_ptr() == big.as_ptr() && c.len() == big.len()));
        // No answer at all is a message of length 0.
        let empty = response_chunks(pb::FetchResponse::default(), 16 << 20).unwrap();
        assert_eq!(empty.concat(), [0, 0, 0, 0, 0]);
    }

    #[test]
    fn an_answer_over_the_limit_is_refused() {
        let answer = pb::FetchResponse {
            partitions: vec![partition(0, &[1; 100], "")],
        };
        let status = response_chunks(answer, 50).unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange);
    }

    /// A request body over the limit is refused with `RESOURCE_EXHAUSTED`; one at the limit is
    /// read.
    #[tokio::test]
    async fn a_request_body_over_the_limit_is_resource_exhausted() {
        let body = |len: usize| http_body_util::Full::new(Bytes::from(vec![0u8; len]));
        let at_limit = request_body(body(PREFIX_BYTES + 100), 100).await.unwrap();
        assert_eq!(at_limit.len(), PREFIX_BYTES + 100);
        let over = request_body(body(PREFIX_BYTES + 101), 100)
            .await
            .unwrap_err();
        assert_eq!(over.code(), tonic::Code::ResourceExhausted);
        assert!(
            over.message().contains("request_bytes_max (100 bytes)"),
            "{over:?}"
        );
    }

    /// Decoded records (large partition heads) travel as chunks of their own and still decode.
    #[test]
    fn large_partition_heads_are_chunks_of_their_own() {
        let mut records = partition(5, b"", "");
        records.records = (0..20)
            .map(|i| pb::Record {
                offset: i,
                value: Some(Bytes::from(vec![i as u8; 100])),
                ..Default::default()
            })
            .collect();
        let answer = pb::FetchResponse {
            partitions: vec![records, partition(6, b"batches", "")],
        };
        let chunks = response_chunks(answer.clone(), 16 << 20).unwrap();
        assert!(chunks.len() >= 3, "{}", chunks.len());
        let joined = chunks.concat();
        assert_eq!(
            pb::FetchResponse::decode(&joined[PREFIX_BYTES..]).unwrap(),
            answer
        );
    }

    #[test]
    fn request_framing_is_checked() {
        let framed = |flag: u8, len: u32, payload: &[u8]| {
            let mut body = vec![flag];
            body.extend_from_slice(&len.to_be_bytes());
            body.extend_from_slice(payload);
            Bytes::from(body)
        };
        assert_eq!(
            request_message(&framed(0, 3, b"abc"), 100).unwrap(),
            Bytes::from_static(b"abc")
        );
        let code = |body: Bytes| request_message(&body, 100).unwrap_err().unwrap().code();
        assert_eq!(code(Bytes::new()), tonic::Code::Internal);
        assert_eq!(code(Bytes::from_static(&[0, 0])), tonic::Code::Internal);
        assert_eq!(code(framed(1, 3, b"abc")), tonic::Code::Unimplemented);
        assert_eq!(code(framed(7, 3, b"abc")), tonic::Code::Internal);
        assert_eq!(code(framed(0, 4, b"abc")), tonic::Code::Internal);
        assert_eq!(code(framed(0, 2, b"abc")), tonic::Code::Internal);
        // Over the limit: the caller answers RESOURCE_EXHAUSTED.
        assert!(request_message(&framed(0, 101, b""), 100)
            .unwrap_err()
            .is_none());
    }
}
