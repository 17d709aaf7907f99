//! `p2pchat relay`: the relay core's state machine over QUIC, with its
//! SQLite store. The state machine runs on its own thread (its store calls
//! block); the network runs on a smol thread and only carries frames.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use p2pchat_protocol::relay::{Relay, RelayConfig};
use p2pchat_protocol::{PeerId, Timestamp};
use p2pchat_storage_sqlite::{Durability, SqliteRelayStore};
use smol::channel;

use crate::admission::IncomingLimits;
use crate::lock::DataDirLock;
use crate::node::NodeError;
use crate::queues::{recv_within, NETWORK_QUEUE, STATE_MACHINE_QUEUE};
use crate::tls::TlsIdentity;
use crate::transport::{within, Inbound, PeerConnection, Transport, TransportError, NOT_READING};

/// The most bytes of frames queued for one peer. A mailbox batch is at most
/// 1 MiB, so an honest peer that reads stays far below; one that does not
/// read is disconnected here instead of growing the relay's memory.
pub const MAX_PEER_QUEUE_BYTES: usize = 8 * 1024 * 1024;

/// The most bytes of frames queued for all peers together: many peers
/// that do not read, each under its own limit, still cannot take more.
pub const MAX_QUEUED_BYTES: usize = 256 * 1024 * 1024;

/// How long a peer may take to acknowledge one frame before it is taken
/// for one that does not read and disconnected.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// What a relay needs to start.
#[derive(Clone, Debug)]
pub struct RelayServerConfig {
    /// Identity key file, database, lock.
    pub data_dir: PathBuf,
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// Commit durability.
    pub durability: Durability,
    /// Mailbox, rate and size limits.
    pub relay: RelayConfig,
    /// The passphrase that wraps the identity key, if it has one.
    pub passphrase: Option<p2pchat_storage_sqlite::Passphrase>,
}

enum RelayMsg {
    Connected(PeerId, std::net::SocketAddr),
    Disconnected(PeerId),
    Frame(PeerId, Vec<u8>),
    Stop,
}

/// A running relay.
pub struct RelayServer {
    peer: PeerId,
    listen: SocketAddr,
    tx: channel::Sender<RelayMsg>,
    stop_net: channel::Sender<()>,
    threads: Vec<std::thread::JoinHandle<()>>,
    _lock: DataDirLock,
}

fn now() -> Timestamp {
    Timestamp::from_millis(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
}

type Connections = Arc<Mutex<BTreeMap<PeerId, Vec<PeerConnection>>>>;

impl RelayServer {
    /// Opens the data directory and starts serving.
    pub fn start(config: RelayServerConfig) -> Result<Self, NodeError> {
        crate::node::create_data_dir(&config.data_dir)?;
        let lock = DataDirLock::acquire(&config.data_dir)?;
        let identity =
            p2pchat_storage_sqlite::load_or_create_identity_with(&config.data_dir, config.passphrase.as_ref())?;
        let peer = identity.peer_id();
        let store = SqliteRelayStore::open(&config.data_dir.join("relay.sqlite3"), config.durability)?;
        let relay = Relay::new(store, config.relay.clone())
            .map_err(|e| NodeError::Thread(format!("the relay's store failed: {e}")))?;
        let tls = TlsIdentity::new(&identity).map_err(TransportError::from)?;
        let transport = Arc::new(Transport::bind(config.listen, tls, Inbound::Limited(IncomingLimits::RELAY))?);
        let listen = transport.local_addr()?;
        // Bounded: a connection whose frames the relay has not taken yet
        // waits to read more, and QUIC's flow control holds its peer back.
        let (tx, rx) = channel::bounded(STATE_MACHINE_QUEUE);
        // Bounded: the relay thread waits for the network, which never waits
        // for the relay thread on this path (it only sorts frames into
        // per-peer queues, bounded by bytes).
        let (out_tx, out_rx) = channel::bounded::<(PeerId, Vec<u8>)>(NETWORK_QUEUE);
        let (stop_net, stop_rx) = channel::bounded::<()>(1);
        let relay_thread = std::thread::Builder::new()
            .name(format!("relay-{peer}"))
            .spawn(move || run_relay(relay, rx, out_tx))
            .map_err(|e| NodeError::Thread(e.to_string()))?;
        let net_thread = std::thread::Builder::new()
            .name(format!("relay-net-{peer}"))
            .spawn({
                let tx = tx.clone();
                move || smol::block_on(run_network(transport, tx, out_rx, stop_rx))
            })
            .map_err(|e| NodeError::Thread(e.to_string()))?;
        log::info!("relay {peer} listening on {listen}");
        Ok(Self { peer, listen, tx, stop_net, threads: vec![relay_thread, net_thread], _lock: lock })
    }

    /// The relay's peer ID.
    pub fn peer_id(&self) -> PeerId {
        self.peer
    }

    /// Its QUIC address.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// What nodes pass to `--relay`.
    pub fn address(&self) -> String {
        format!("{}@{}", self.peer, self.listen)
    }

    /// Stops serving and waits.
    pub fn shutdown(mut self) {
        let _ = self.tx.send_blocking(RelayMsg::Stop);
        let _ = self.stop_net.try_send(());
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn run_relay(
    mut relay: Relay<SqliteRelayStore>,
    rx: channel::Receiver<RelayMsg>,
    out: channel::Sender<(PeerId, Vec<u8>)>,
) {
    loop {
        while let Some(frame) = relay.poll_transmit() {
            let _ = out.send_blocking(frame);
        }
        while let Some(event) = relay.poll_event() {
            log::info!("relay: {event:?}");
        }
        let wait = relay.poll_timeout().map(|d| Duration::from_millis(d.as_millis().saturating_sub(now().as_millis())));
        let msg = recv_within(&rx, wait);
        let result = match msg {
            Ok(RelayMsg::Connected(peer, remote)) => {
                relay.connected_at(peer, remote);
                Ok(())
            }
            Ok(RelayMsg::Disconnected(peer)) => {
                relay.disconnected(&peer);
                Ok(())
            }
            Ok(RelayMsg::Frame(peer, bytes)) => relay.handle_frame(now(), peer, &bytes),
            Ok(RelayMsg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => relay.handle_timeout(now()),
        };
        if let Err(e) = result {
            log::error!("relay: {e}");
        }
    }
}

async fn run_network(
    transport: Arc<Transport>,
    tx: channel::Sender<RelayMsg>,
    out: channel::Receiver<(PeerId, Vec<u8>)>,
    stop: channel::Receiver<()>,
) {
    let connections: Connections = Arc::default();
    let acceptor = smol::spawn({
        let (transport, connections, tx) = (transport.clone(), connections.clone(), tx.clone());
        async move {
            while let Some(handshake) = transport.accept().await {
                let (connections, tx) = (connections.clone(), tx.clone());
                smol::spawn(async move {
                    match handshake.await {
                        Ok(conn) => serve(conn, connections, tx).await,
                        // Refusals have their own rate-limited lines.
                        Err(e) if e.is_refusal() => log::debug!("relay: incoming connection refused: {e}"),
                        Err(e) => log::info!("relay: incoming connection failed: {e}"),
                    }
                })
                .detach();
            }
        }
    });
    let sender = smol::spawn({
        let connections = connections.clone();
        async move {
            // One queue and task per peer: frames to a peer keep the
            // relay's order, and a slow peer holds up only itself. The
            // queue is bounded by bytes: a peer that does not read is
            // disconnected rather than kept in memory.
            let mut queues: BTreeMap<PeerId, PeerQueue> = BTreeMap::new();
            let total = Arc::new(AtomicUsize::new(0));
            while let Ok((peer, bytes)) = out.recv().await {
                queues.retain(|_, q| !q.tx.is_closed());
                let queue =
                    queues.entry(peer).or_insert_with(|| PeerQueue::start(peer, connections.clone(), total.clone()));
                let queued = queue.queued.load(Ordering::Acquire);
                if queued.saturating_add(bytes.len()) > MAX_PEER_QUEUE_BYTES {
                    let reason = format!("over {MAX_PEER_QUEUE_BYTES} bytes queued for this peer: it does not read");
                    give_up(&mut queues, &connections, &peer, &reason);
                    continue;
                }
                // Over the relay's total, the peers with the most queued go
                // first, whoever this frame is for: a reader that keeps up
                // is not dropped for the ones that do not.
                while total.load(Ordering::Acquire).saturating_add(bytes.len()) > MAX_QUEUED_BYTES {
                    let largest = queues.iter().max_by_key(|(_, q)| q.queued.load(Ordering::Acquire)).map(|(p, _)| *p);
                    let Some(largest) = largest else { break };
                    let reason = format!("the relay has {MAX_QUEUED_BYTES} bytes queued, the most for this peer");
                    give_up(&mut queues, &connections, &largest, &reason);
                }
                let Some(queue) = queues.get(&peer) else { continue };
                queue.queued.fetch_add(bytes.len(), Ordering::AcqRel);
                total.fetch_add(bytes.len(), Ordering::AcqRel);
                if queue.tx.try_send(bytes.clone()).is_err() {
                    queue.queued.fetch_sub(bytes.len(), Ordering::AcqRel);
                    total.fetch_sub(bytes.len(), Ordering::AcqRel);
                }
            }
        }
    });
    let _ = stop.recv().await;
    drop(acceptor);
    drop(sender);
    transport.shutdown().await;
}

/// Frames waiting to go to one peer, and their bytes.
struct PeerQueue {
    tx: channel::Sender<Vec<u8>>,
    queued: Arc<AtomicUsize>,
}

impl PeerQueue {
    /// The queue and the task that sends it: frames written in order, each
    /// written and acknowledged within [`SEND_TIMEOUT`].
    fn start(peer: PeerId, connections: Connections, total: Arc<AtomicUsize>) -> Self {
        let (tx, rx) = channel::unbounded::<Vec<u8>>();
        let queued = Arc::new(AtomicUsize::new(0));
        let counter = queued.clone();
        smol::spawn(async move {
            // Whatever is left when it stops goes out of both counts.
            let release = |rx: &channel::Receiver<Vec<u8>>| {
                while let Ok(bytes) = rx.try_recv() {
                    total.fetch_sub(bytes.len(), Ordering::AcqRel);
                }
            };
            while let Ok(bytes) = rx.recv().await {
                if rx.is_closed() {
                    // Given up on (the peer was disconnected): what is left
                    // would reach a new connection stale and out of order.
                    counter.fetch_sub(bytes.len(), Ordering::AcqRel);
                    total.fetch_sub(bytes.len(), Ordering::AcqRel);
                    break;
                }
                let conn = connections.lock().ok().and_then(|map| map.get(&peer).and_then(|c| c.last().cloned()));
                // Written in order (flow control holds back a peer that does
                // not read); acknowledgements are awaited side by side, so a
                // round trip, and the peer's delayed acknowledgements, do not
                // cap the peer at one frame per round trip.
                let written = match &conn {
                    Some(conn) => Some(within(SEND_TIMEOUT, conn.write(&bytes)).await),
                    None => None,
                };
                counter.fetch_sub(bytes.len(), Ordering::AcqRel);
                total.fetch_sub(bytes.len(), Ordering::AcqRel);
                let (Some(written), Some(conn)) = (written, conn) else { break };
                let reason = format!("a frame was not acknowledged within {} s", SEND_TIMEOUT.as_secs());
                match written {
                    Some(Ok(frame)) => {
                        smol::spawn(async move {
                            match within(SEND_TIMEOUT, frame.acknowledged()).await {
                                Some(Ok(())) => {}
                                Some(Err(e)) => log::info!("relay: a frame to {peer} failed: {e}"),
                                None => {
                                    log::info!("relay: disconnecting {peer}: {reason}");
                                    conn.close_because(NOT_READING, &reason);
                                }
                            }
                        })
                        .detach();
                    }
                    Some(Err(e)) => {
                        log::info!("relay: sending to {peer} failed: {e}");
                        break;
                    }
                    None => {
                        log::info!("relay: disconnecting {peer}: {reason}");
                        conn.close_because(NOT_READING, &reason);
                        break;
                    }
                }
            }
            rx.close();
            release(&rx);
        })
        .detach();
        Self { tx, queued }
    }
}

/// Disconnects `peer` with `reason` and drops its queue: its task sends
/// nothing more, not even to a new connection of the same peer.
fn give_up(queues: &mut BTreeMap<PeerId, PeerQueue>, connections: &Connections, peer: &PeerId, reason: &str) {
    log::info!("relay: disconnecting {peer}: {reason}");
    close_peer(connections, peer, reason);
    if let Some(queue) = queues.remove(peer) {
        queue.tx.close();
    }
}

/// Closes every connection of `peer`, telling it why.
fn close_peer(connections: &Connections, peer: &PeerId, reason: &str) {
    let conns = connections.lock().ok().and_then(|map| map.get(peer).cloned()).unwrap_or_default();
    for conn in conns {
        conn.close_because(NOT_READING, reason);
    }
}

async fn serve(conn: PeerConnection, connections: Connections, tx: channel::Sender<RelayMsg>) {
    let peer = conn.peer();
    if let Ok(mut map) = connections.lock() {
        map.entry(peer).or_default().push(conn.clone());
    }
    let _ = tx.send(RelayMsg::Connected(peer, conn.remote_address())).await;
    // Frames from one connection reach the relay in the order they arrive.
    while let Ok(frame) = conn.accept_frame().await {
        match frame.await {
            Ok(bytes) => {
                let _ = tx.send(RelayMsg::Frame(peer, bytes)).await;
            }
            Err(e) => log::info!("relay: a frame from {peer} failed: {e}"),
        }
    }
    if let Ok(mut map) = connections.lock() {
        if let Some(list) = map.get_mut(&peer) {
            list.retain(|c| !c.is_closed());
            if list.is_empty() {
                map.remove(&peer);
            }
        }
    }
    let _ = tx.send(RelayMsg::Disconnected(peer)).await;
}
