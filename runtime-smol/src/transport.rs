//! QUIC between p2pchat nodes (and between nodes and relays), on quinn's
//! smol runtime. Each frame travels on its own unidirectional stream, so a
//! lost packet delays only its own frame; a send completes when the other
//! side's QUIC stack has acknowledged every byte of it, which is what the
//! engine's `TransmitOutcome::Delivered` means.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use p2pchat_protocol::PeerId;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::admission::{Admission, IncomingLimits, Limit, RefusalLog};
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
    /// An incoming connection was refused: a limit was met.
    #[error("refused a connection from {peer}: {limit}")]
    OverLimit {
        /// Who dialled.
        peer: PeerId,
        /// Which limit it met (also the reason the dialler is given).
        limit: Limit,
    },
    /// An incoming handshake did not finish in time.
    #[error("the handshake did not finish within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    HandshakeTimeout,
    /// A frame did not arrive whole in time.
    #[error("a frame did not arrive whole within {} s", FRAME_TIMEOUT.as_secs())]
    FrameTimeout,
}

impl TransportError {
    /// Whether this is a dialler held to our limits (counted in the
    /// refusal log, so not worth a line of its own).
    pub fn is_refusal(&self) -> bool {
        matches!(self, TransportError::OverLimit { .. } | TransportError::HandshakeTimeout)
    }
}

/// Whether an endpoint takes incoming connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inbound {
    /// None (a node behind NAT, or `--no-direct`): every dialler is refused
    /// at once, with no handshake.
    Refused,
    /// Up to these limits.
    Limited(IncomingLimits),
}

/// The application close code of a connection refused over a limit; the
/// reason phrase names the limit.
pub const REFUSED: u32 = 1;

/// The application close code of a connection whose peer sent a frame
/// over [`MAX_FRAME_LEN`]: our transport never sends one, so the peer is
/// broken or hostile, and its stream alone could not tell it (a frame that
/// fits in flight is acknowledged before it is found too long).
pub const FRAME_TOO_LARGE: u32 = 2;

/// The application close code of a connection whose peer does not take
/// what we send it: frames queued for it passed a byte limit, or one was
/// not acknowledged in time. The reason phrase says which.
pub const NOT_READING: u32 = 3;

/// How long an incoming handshake may take before its slot is given back.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a frame may take to arrive whole once its stream opened: a
/// peer cannot keep half-sent frames in our memory for ever.
const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// A QUIC endpoint with this node's identity.
#[derive(Debug)]
pub struct Transport {
    endpoint: quinn::Endpoint,
    tls: Arc<TlsIdentity>,
    /// `None` when every incoming connection is refused.
    admission: Option<Arc<Admission>>,
    refusals: Arc<RefusalLog>,
}

impl Transport {
    /// Binds `addr`, taking incoming connections as `inbound` says.
    pub fn bind(addr: SocketAddr, tls: TlsIdentity, inbound: Inbound) -> Result<Self, TransportError> {
        let crypto = QuicServerConfig::try_from(tls.server_config()?)
            .map_err(|e| TlsError::Certificate(format!("QUIC needs TLS 1.3 with AES-128-GCM: {e}")))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport_config());
        let socket = std::net::UdpSocket::bind(addr)?;
        let endpoint =
            quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), socket, Arc::new(quinn::SmolRuntime))?;
        let admission = match inbound {
            Inbound::Refused => None,
            Inbound::Limited(limits) => Some(Admission::new(limits)),
        };
        Ok(Self { endpoint, tls: Arc::new(tls), admission, refusals: Arc::default() })
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
        Ok(PeerConnection::new(connection, peer))
    }

    /// The next incoming connection attempt; `None` once the endpoint is
    /// closed. The handshake is the returned future: run each in its own
    /// task, so one slow or silent dialler cannot hold up the others.
    ///
    /// Dialers over the [`IncomingLimits`] are refused: before the
    /// handshake (a QUIC refusal) when too many are in progress, or right
    /// after it, once the peer is known, with [`REFUSED`] and the limit as
    /// the reason. A handshake gets [`HANDSHAKE_TIMEOUT`] to finish.
    pub async fn accept(
        &self,
    ) -> Option<impl core::future::Future<Output = Result<PeerConnection, TransportError>> + Send + 'static> {
        let (incoming, ticket, admission) = loop {
            let incoming = self.endpoint.accept().await?;
            let from = incoming.remote_address();
            let Some(admission) = &self.admission else {
                self.refusals.record(from, "this endpoint takes no incoming connections");
                incoming.refuse();
                continue;
            };
            // Under pressure a dialler proves it receives at its address
            // before it costs us a handshake: spoofed floods end here.
            if !incoming.remote_address_validated() && admission.under_pressure() {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            }
            match admission.start_handshake(from.ip()) {
                Ok(ticket) => break (incoming, ticket, admission.clone()),
                Err(limit) => {
                    self.refusals.record(from, limit);
                    incoming.refuse();
                }
            }
        };
        let refusals = self.refusals.clone();
        Some(async move {
            let from = incoming.remote_address();
            let connection = within(HANDSHAKE_TIMEOUT, async { incoming.await }).await;
            drop(ticket);
            let Some(connection) = connection else {
                refusals.record(from, "the handshake took too long");
                return Err(TransportError::HandshakeTimeout);
            };
            let connection = connection?;
            let peer = identity_of(&connection).ok_or(TransportError::NoIdentity)?;
            let slot = admission.admit(from.ip(), peer).map_err(|limit| {
                refusals.record(from, limit);
                connection.close(REFUSED.into(), limit.to_string().as_bytes());
                TransportError::OverLimit { peer, limit }
            })?;
            // The slot comes back when the connection ends, however it ends.
            let watched = connection.clone();
            smol::spawn(async move {
                watched.closed().await;
                drop(slot);
            })
            .detach();
            Ok(PeerConnection::new(connection, peer))
        })
    }

    /// Closes every connection, stops accepting, and waits until the peers
    /// have been told (or a short while has passed).
    pub async fn shutdown(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
        within(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// `work`'s result, or `None` if it is not done by `deadline`.
pub(crate) async fn by<T>(deadline: Instant, work: impl core::future::Future<Output = T>) -> Option<T> {
    let late = async {
        smol::Timer::at(deadline).await;
        None
    };
    smol::future::or(async { Some(work.await) }, late).await
}

/// `work`'s result, or `None` if it takes longer than `limit`.
pub(crate) async fn within<T>(limit: Duration, work: impl core::future::Future<Output = T>) -> Option<T> {
    by(Instant::now() + limit, work).await
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
pub(crate) const MAX_STREAMS: u32 = 16;

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

/// A frame written whole on its stream, waiting for the peer's
/// acknowledgement.
pub struct WrittenFrame {
    sending: Sending,
    progress: Arc<Mutex<Option<Instant>>>,
}

impl WrittenFrame {
    /// Returns once the peer's QUIC stack has acknowledged all of the frame
    /// (not that the application handled it), or why it did not.
    pub async fn acknowledged(self) -> Result<(), TransportError> {
        match self.sending.stream.stopped().await? {
            None => {
                *self.progress.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
                Ok(())
            }
            Some(code) => Err(TransportError::Refused(code)),
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
    /// When a frame sent on it was last acknowledged, if ever.
    progress: Arc<Mutex<Option<Instant>>>,
}

impl PeerConnection {
    fn new(connection: quinn::Connection, peer: PeerId) -> Self {
        Self { connection, peer, progress: Arc::default() }
    }

    /// Whether a frame sent on it was acknowledged at `since` or later: a
    /// connection that is slow but moving is not a dead one.
    pub fn acknowledged_since(&self, since: Instant) -> bool {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner).is_some_and(|at| at >= since)
    }

    /// The peer, as its certificate proved.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Sends one frame; returns once the peer's QUIC stack has acknowledged
    /// all of it (not that the application handled it: the engine's
    /// end-to-end receipts are for that).
    pub async fn send(&self, frame: &[u8]) -> Result<(), TransportError> {
        self.write(frame).await?.acknowledged().await
    }

    /// Opens a stream and writes one frame on it, finished; the returned
    /// [`WrittenFrame`] tells when the peer acknowledged it. Frames written
    /// one after another reach a peer that reads streams in order (a relay)
    /// in that order, while their acknowledgements are awaited together.
    pub async fn write(&self, frame: &[u8]) -> Result<WrittenFrame, TransportError> {
        if frame.len() > MAX_FRAME_LEN {
            return Err(TransportError::TooLarge { len: frame.len(), max: MAX_FRAME_LEN });
        }
        let mut sending = Sending { stream: self.connection.open_uni().await?, finished: false };
        sending.stream.write_all(frame).await?;
        sending.stream.finish()?;
        sending.finished = true;
        Ok(WrittenFrame { sending, progress: self.progress.clone() })
    }

    /// The next frame stream from the peer; the frame is the returned
    /// future. Read each in its own task, so one stalled stream does not
    /// hold up the frames behind it.
    pub async fn accept_frame(
        &self,
    ) -> Result<impl core::future::Future<Output = Result<Vec<u8>, TransportError>> + Send + 'static, TransportError>
    {
        let mut stream = self.connection.accept_uni().await?;
        let connection = self.connection.clone();
        Ok(async move {
            match within(FRAME_TIMEOUT, stream.read_to_end(MAX_FRAME_LEN)).await {
                Some(Ok(frame)) => Ok(frame),
                Some(Err(quinn::ReadToEndError::TooLong)) => {
                    let reason = format!("a frame over the {MAX_FRAME_LEN}-byte limit");
                    connection.close(FRAME_TOO_LARGE.into(), reason.as_bytes());
                    Err(TransportError::Read(quinn::ReadToEndError::TooLong))
                }
                Some(Err(e)) => Err(e.into()),
                None => Err(TransportError::FrameTimeout),
            }
        })
    }

    /// Whether the connection has closed (the peer left, or it timed out).
    pub fn is_closed(&self) -> bool {
        self.connection.close_reason().is_some()
    }

    /// Why the connection closed, once it has (a refusal's reason among
    /// them).
    pub fn close_reason(&self) -> Option<String> {
        self.connection.close_reason().map(|e| e.to_string())
    }

    /// The limit the other side named, if it refused this connection over
    /// one.
    pub fn refusal(&self) -> Option<Limit> {
        match self.connection.close_reason()? {
            quinn::ConnectionError::ApplicationClosed(close) if close.error_code == quinn::VarInt::from(REFUSED) => {
                Limit::from_reason(&close.reason)
            }
            _ => None,
        }
    }

    /// The address the peer's packets come from.
    pub fn remote_address(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// Identifies this connection among others to the same peer.
    pub fn id(&self) -> usize {
        self.connection.stable_id()
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.connection.close(0u32.into(), b"closed");
    }

    /// Closes the connection with an application code and a reason the
    /// peer can read.
    pub fn close_because(&self, code: u32, reason: &str) {
        self.connection.close(code.into(), reason.as_bytes());
    }
}
