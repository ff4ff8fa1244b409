//! Serving the gRPC API on an already-bound listener until a shutdown future resolves.
//!
//! `run(listener, broker, shutdown)` is the entry point tests use with `127.0.0.1:0`. Shutdown
//! (the future resolving, e.g. on SIGINT/SIGTERM): stop accepting, tell waiting fetches and
//! subscriptions to end, let in-flight requests finish, then flush and close every log (writing
//! their clean-shutdown markers).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use octolog_proto::v1::groups_server::GroupsServer;
use octolog_proto::v1::octolog_server::OctologServer;

use crate::group_service::GroupService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Code, Status};

use crate::broker::Broker;
use crate::error::{BrokerError, Result};
use crate::fetch_path::FetchPath;
use crate::service::OctologService;

/// How often the maintenance task looks for due flushes (`interval-ms` policy).
pub const MAINTENANCE_TICK_MS: u64 = 50;
/// How often an idle connection is pinged to check that its peer is alive.
pub const KEEPALIVE_INTERVAL_MS: u64 = 30_000;
/// How long a ping may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT_MS: u64 = 10_000;
/// How long to wait before accepting again after `accept` failed (e.g. out of file handles).
const ACCEPT_RETRY_MS: u64 = 50;

/// A client connection holding one of the `connections_max` permits until it closes.
struct LimitedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for LimitedStream {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Largest HTTP/2 frame the broker accepts (HTTP/2 allows up to 16 MiB - 1).
const FRAME_BYTES_MAX: u32 = 1 << 20;

/// How tonic's message starts when a request exceeds `max_decoding_message_size`.
const DECODE_LIMIT_MESSAGE: &str = "Error, decoded message length too large";

/// Whether tonic refused a message for exceeding `max_decoding_message_size`.
pub(crate) fn is_oversize(status: &Status) -> bool {
    status.code() == Code::OutOfRange && status.message().starts_with(DECODE_LIMIT_MESSAGE)
}

/// Answers a request larger than `request_bytes_max` with `RESOURCE_EXHAUSTED`, as the API
/// promises for requests over the broker's size limits (and as grpc-go and grpc-java do), where
/// tonic says `OUT_OF_RANGE`, which the API reserves for offsets outside a log.
#[derive(Debug, Clone)]
struct OversizeIsResourceExhausted<S>(S);

impl<S: NamedService> NamedService for OversizeIsResourceExhausted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for OversizeIsResourceExhausted<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let response = self.0.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            // A request refused before it reached the service answers with headers only.
            let refused = Status::from_header_map(response.headers()).filter(is_oversize);
            if let Some(status) = refused {
                let exhausted = Status::resource_exhausted(format!(
                    "the request exceeds the broker's request_bytes_max: {}; send smaller requests",
                    status.message()
                ));
                // Cannot fail: the message is ASCII.
                let _ = exhausted.add_header(response.headers_mut());
            }
            Ok(response)
        })
    }
}

/// Accepts connections while fewer than `connections_max` are open; further clients wait in
/// the listen backlog until one closes.
fn incoming(
    listener: TcpListener,
    connections: Arc<Semaphore>,
) -> impl futures_core::Stream<Item = io::Result<LimitedStream>> {
    futures_util::stream::unfold(
        (listener, connections),
        |(listener, connections)| async move {
            let permit = Arc::clone(&connections)
                .acquire_owned()
                .await
                .expect("never closed");
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        tracing::debug!(%peer, "accepted connection");
                        return Some((
                            Ok(LimitedStream {
                                stream,
                                _permit: permit,
                            }),
                            (listener, connections),
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_MS)).await;
                    }
                }
            }
        },
    )
}

/// Flushes due partitions every tick and applies retention every
/// `retention_check_interval_ms`, on a blocking thread, until shutdown.
async fn maintenance(broker: Arc<Broker>) {
    let mut shutdown = broker.watch_shutdown();
    let mut tick = tokio::time::interval(Duration::from_millis(MAINTENANCE_TICK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let retention_every =
        (broker.config().retention_check_interval_ms / MAINTENANCE_TICK_MS).max(1);
    let mut round = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        round += 1;
        let check_retention = round.is_multiple_of(retention_every);
        let b = Arc::clone(&broker);
        if tokio::task::spawn_blocking(move || b.maintain(check_retention))
            .await
            .is_err()
        {
            tracing::error!("maintenance task failed");
        }
    }
}

/// Serves `broker` on `listener` until `shutdown` resolves, then shuts down gracefully.
///
/// # Errors
///
/// `Config` if the server fails; the first error closing the logs.
pub async fn run(
    listener: TcpListener,
    broker: Arc<Broker>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let config = broker.config().clone();
    let connections = Arc::new(Semaphore::new(config.connections_max));
    let maintenance_task = tokio::spawn(maintenance(Arc::clone(&broker)));
    let response_bytes_max = config.fetch_bytes_max as usize + (1 << 20);
    let octolog = OctologServer::new(OctologService::new(Arc::clone(&broker)))
        .max_decoding_message_size(config.request_bytes_max)
        .max_encoding_message_size(response_bytes_max);
    // `Fetch` without tonic's encode copy (`fetch_path`); every other call goes to tonic.
    let service = FetchPath::new(
        octolog,
        OctologService::new(Arc::clone(&broker)),
        config.request_bytes_max,
        response_bytes_max,
    );
    let signal_broker = Arc::clone(&broker);
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight requests");
        signal_broker.begin_shutdown();
    };
    let serve = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        // Large HTTP/2 frames: a produce request of a few hundred KiB arrives in one or a few
        // frames instead of dozens of 16 KiB ones, each a wake-up and a copy in the decoder.
        .max_frame_size(Some(FRAME_BYTES_MAX))
        // Dead peers (a client host that vanished) are found by HTTP/2 pings and their
        // connection slot freed, rather than held until the operating system gives up.
        .http2_keepalive_interval(Some(Duration::from_millis(KEEPALIVE_INTERVAL_MS)))
        .http2_keepalive_timeout(Some(Duration::from_millis(KEEPALIVE_TIMEOUT_MS)))
        .add_service(OversizeIsResourceExhausted(service))
        .add_service(GroupsServer::new(GroupService::new(Arc::clone(&broker))))
        .serve_with_incoming_shutdown(incoming(listener, connections), signal);
    // Graceful shutdown waits for open requests and streams; a client that stops reading must
    // not hold it up for ever, so after `shutdown_grace_ms` the remaining connections are dropped.
    let mut down = broker.watch_shutdown();
    let grace_ms = config.shutdown_grace_ms;
    let grace = async move {
        let _ = down.wait_for(|down| *down).await;
        tokio::time::sleep(Duration::from_millis(grace_ms)).await;
    };
    let served = tokio::select! {
        served = serve => served,
        () = grace => {
            tracing::warn!(grace_ms, "shutdown grace period over: dropping open connections");
            Ok(())
        }
    };
    broker.begin_shutdown();
    let _ = maintenance_task.await;
    let closing = Arc::clone(&broker);
    let closed = tokio::task::spawn_blocking(move || closing.close())
        .await
        .map_err(|e| BrokerError::Config(format!("closing task failed: {e}")))?;
    served.map_err(|e| BrokerError::Config(format!("server failed: {e}")))?;
    closed?;
    tracing::info!("shut down cleanly");
    Ok(())
}
