//! QUIC between p2pchat nodes (and between nodes and relays), on quinn's
//! smol runtime. Each frame travels on its own unidirectional stream, so a
//! lost packet delays only its own frame; a send completes when the other
//! side's QUIC stack has acknowledged every byte of it, which is what the
//! engine's `TransmitOutcome::Delivered` means.

use std::net::SocketAddr;
use std::sync::Arc;

use p2pchat_protocol::PeerId;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::tls::{peer_of_certificate, TlsError, TlsIdentity};

/// The largest frame accepted on a stream (a relay frame carries at most
/// one envelope of 256 KiB plus its header).
pub const MAX_FRAME_LEN: usize = p2pchat_protocol::relay::MAX_FRAME_LEN;

/// Why a connection or a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The socket could not be bound or used.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The connection could not be started.
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or closed (a refused certificate ends here).
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing a frame failed.
    #[error("sending: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream closed before the frame was acknowledged.
    #[error("sending: the stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    /// The stream was stopped before the frame was acknowledged.
    #[error("sending: the peer stopped the stream: {0}")]
    Stopped(#[from] quinn::StoppedError),
    /// Reading a frame failed or it was too large.
    #[error("receiving: {0}")]
    Read(#[from] quinn::ReadToEndError),
    /// The other side's certificate proves no p2pchat identity.
    #[error("the other side presented no p2pchat identity")]
    NoIdentity,
    /// The frame is larger than any side accepts.
    #[error("a frame of {len} bytes is over the {max}-byte limit")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The peer stopped the stream (it refused the frame) with this code.
    #[error("the peer refused the frame (code {0})")]
    Refused(quinn::VarInt),
}

/// A QUIC endpoint with this node's identity.
#[derive(Debug)]
pub struct Transport {
    endpoint: quinn::Endpoint,
    tls: Arc<TlsIdentity>,
    accept_incoming: bool,
}

impl Transport {
    /// Binds `addr`. With `accept_incoming` false (a node behind NAT, or
    /// `--no-direct`), the endpoint only dials out: [`Transport::accept`]
    /// refuses every incoming connection at once (the dialler gets a clear
    /// refusal, not a timeout).
    pub fn bind(addr: SocketAddr, tls: TlsIdentity, accept_incoming: bool) -> Result<Self, TransportError> {
        let crypto = QuicServerConfig::try_from(tls.server_config()?)
            .map_err(|e| TlsError::Certificate(format!("QUIC needs TLS 1.3 with AES-128-GCM: {e}")))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport_config());
        let socket = std::net::UdpSocket::bind(addr)?;
        let endpoint =
            quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), socket, Arc::new(quinn::SmolRuntime))?;
        Ok(Self { endpoint, tls: Arc::new(tls), accept_incoming })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        Ok(self.endpoint.local_addr()?)
    }

    /// This node's peer ID.
    pub fn peer_id(&self) -> PeerId {
        self.tls.peer_id()
    }

    /// Connects to `expected` at `addr`; refused unless its certificate is
    /// that peer's.
    pub async fn dial(&self, addr: SocketAddr, expected: PeerId) -> Result<PeerConnection, TransportError> {
        let crypto = QuicClientConfig::try_from(self.tls.client_config(expected)?)
            .map_err(|e| TlsError::Certificate(format!("QUIC needs TLS 1.3 with AES-128-GCM: {e}")))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport_config());
        let connection = self.endpoint.connect_with(config, addr, "p2pchat")?.await?;
        let peer = identity_of(&connection).ok_or(TransportError::NoIdentity)?;
        Ok(PeerConnection { connection, peer })
    }

    /// The next incoming connection attempt; `None` once the endpoint is
    /// closed. The handshake is the returned future: run each in its own
    /// task, so one slow or silent dialler cannot hold up the others.
    pub async fn accept(
        &self,
    ) -> Option<impl core::future::Future<Output = Result<PeerConnection, TransportError>> + Send + 'static> {
        let incoming = loop {
            let incoming = self.endpoint.accept().await?;
            if self.accept_incoming {
                break incoming;
            }
            log::info!("refused a connection from {}: this node accepts none (--no-direct)", incoming.remote_address());
            incoming.refuse();
        };
        Some(async move {
            let connection = incoming.await?;
            let peer = identity_of(&connection).ok_or(TransportError::NoIdentity)?;
            Ok(PeerConnection { connection, peer })
        })
    }

    /// Closes every connection, stops accepting, and waits until the peers
    /// have been told (or a short while has passed).
    pub async fn shutdown(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
        let timeout = async {
            smol::Timer::after(std::time::Duration::from_secs(2)).await;
        };
        smol::future::or(self.endpoint.wait_idle(), timeout).await;
    }
}

/// Connections idle for 30 s close; a keep-alive every 10 s holds NAT
/// bindings (and relay connections) open meanwhile. Flow control bounds
/// what one connection can make us buffer: one frame per stream, 16 frames
/// in flight, no bidirectional streams at all.
fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut config = quinn::TransportConfig::default();
    config.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(30_000))));
    config.keep_alive_interval(Some(std::time::Duration::from_secs(10)));
    let frame = quinn::VarInt::from_u32(MAX_FRAME_LEN as u32);
    config.stream_receive_window(frame);
    config.receive_window(quinn::VarInt::from_u32(4 * MAX_FRAME_LEN as u32));
    config.send_window(4 * MAX_FRAME_LEN as u64);
    config.max_concurrent_uni_streams(quinn::VarInt::from_u32(MAX_STREAMS));
    config.max_concurrent_bidi_streams(quinn::VarInt::from_u32(0));
    Arc::new(config)
}

/// Unidirectional streams (frames) a peer may have open at once.
const MAX_STREAMS: u32 = 16;

/// A stream being sent: reset if dropped before it was finished, so that a
/// send cancelled half-way never delivers half a frame as a whole one
/// (quinn finishes a stream that is dropped).
struct Sending {
    stream: quinn::SendStream,
    finished: bool,
}

impl Drop for Sending {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.stream.reset(quinn::VarInt::from_u32(0));
        }
    }
}

fn identity_of(connection: &quinn::Connection) -> Option<PeerId> {
    let identity = connection.peer_identity()?;
    let certificates = identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    peer_of_certificate(certificates.first()?)
}

/// A connection to an authenticated peer.
#[derive(Clone, Debug)]
pub struct PeerConnection {
    connection: quinn::Connection,
    peer: PeerId,
}

impl PeerConnection {
    /// The peer, as its certificate proved.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Sends one frame; returns once the peer's QUIC stack has acknowledged
    /// all of it (not that the application handled it: the engine's
    /// end-to-end receipts are for that).
    pub async fn send(&self, frame: &[u8]) -> Result<(), TransportError> {
        if frame.len() > MAX_FRAME_LEN {
            return Err(TransportError::TooLarge { len: frame.len(), max: MAX_FRAME_LEN });
        }
        let mut sending = Sending { stream: self.connection.open_uni().await?, finished: false };
        sending.stream.write_all(frame).await?;
        sending.stream.finish()?;
        sending.finished = true;
        match sending.stream.stopped().await? {
            None => Ok(()),
            Some(code) => Err(TransportError::Refused(code)),
        }
    }

    /// The next frame stream from the peer; the frame is the returned
    /// future. Read each in its own task, so one stalled stream does not
    /// hold up the frames behind it.
    pub async fn accept_frame(
        &self,
    ) -> Result<impl core::future::Future<Output = Result<Vec<u8>, TransportError>> + Send + 'static, TransportError>
    {
        let mut stream = self.connection.accept_uni().await?;
        Ok(async move { Ok(stream.read_to_end(MAX_FRAME_LEN).await?) })
    }

    /// Whether the connection has closed (the peer left, or it timed out).
    pub fn is_closed(&self) -> bool {
        self.connection.close_reason().is_some()
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.connection.close(0u32.into(), b"closed");
    }
}
