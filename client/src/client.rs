//! The connection to a broker, shared by admin, producers and consumers.

use std::time::Duration;

use octolog_proto::v1::groups_client::GroupsClient;
use octolog_proto::v1::octolog_client::OctologClient;
use tonic::transport::{Channel, Endpoint};

use crate::error::{ClientError, Result};

/// Largest gRPC message the client accepts: above the broker's largest fetch answer.
pub(crate) const MESSAGE_BYTES_MAX: usize = 64 << 20;
/// How often an idle connection pings the broker.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is dropped.
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP/2 frame the client accepts (HTTP/2 allows up to 16 MiB - 1): a fetch answer of
/// a few MiB arrives in a few frames instead of hundreds of 16 KiB ones.
pub(crate) const FRAME_BYTES_MAX: u32 = 1 << 20;
/// How long to wait for a TCP connection to a broker.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to an Octolog broker: cheap to clone (clones share one HTTP/2 connection), and
/// `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Client {
    /// The generated gRPC client over the shared channel.
    rpc: OctologClient<Channel>,
    /// The consumer-group service over the same channel.
    groups: GroupsClient<Channel>,
    /// The address it was made with, for messages.
    addr: String,
}

impl Client {
    /// Connects to a broker at `addr` (`HOST:PORT`, or a `http://` URI).
    ///
    /// # Errors
    ///
    /// [`ClientError::Connect`] if the address is malformed or nobody answers there.
    pub async fn connect(addr: impl Into<String>) -> Result<Client> {
        let addr = addr.into();
        let uri = if addr.contains("://") {
            addr.clone()
        } else {
            format!("http://{addr}")
        };
        let connect_error = |reason: String| ClientError::Connect {
            addr: addr.clone(),
            reason,
        };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| connect_error(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            // A broker host that vanished is noticed by HTTP/2 pings, not left to TCP's
            // retransmission timeout, so waiting calls fail instead of hanging.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .max_frame_size(FRAME_BYTES_MAX);
        let channel = endpoint.connect().await.map_err(|e| {
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(inner) = source {
                // Layers often repeat their inner error's text: add only what is new.
                let text = inner.to_string();
                if !reason.ends_with(&text) {
                    reason = format!("{reason}: {text}");
                }
                source = inner.source();
            }
            connect_error(reason)
        })?;
        let groups = GroupsClient::new(channel.clone())
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX);
        let rpc = OctologClient::new(channel)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX);
        Ok(Client { rpc, groups, addr })
    }

    /// The address the client connected to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Topic administration.
    pub fn admin(&self) -> crate::Admin {
        crate::Admin::new(self.clone())
    }

    /// A producer builder; see [`crate::ProducerBuilder`] for the settings.
    pub fn producer(&self) -> crate::ProducerBuilder {
        crate::ProducerBuilder::new(self.clone())
    }

    /// A consumer builder for `topic`; see [`crate::ConsumerBuilder`].
    pub fn consumer(&self, topic: impl Into<String>) -> crate::ConsumerBuilder {
        crate::ConsumerBuilder::new(self.clone(), topic.into())
    }

    /// The generated client, for this crate's modules.
    pub(crate) fn rpc(&self) -> OctologClient<Channel> {
        self.rpc.clone()
    }

    /// The generated consumer-group client, for this crate's modules.
    pub(crate) fn groups_rpc(&self) -> GroupsClient<Channel> {
        self.groups.clone()
    }
}
