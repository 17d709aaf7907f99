//! A running node: `protocol::node::Node` on its own thread (its store
//! calls block), the QUIC transport on a smol executor thread, and a
//! channel-based [`NodeHandle`] for the API and the tests.
//!
//! The node thread follows the node's driving rule: it hands the node every
//! input that is waiting (the node runs the engine's share of them as one
//! transaction: group commit), carries out every output, and sleeps until
//! the next input or the node's deadline. The network thread does what the
//! node asks (dial, send, connect to a relay) and reports what happened;
//! every routing choice is the node's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use p2pchat_protocol::address::AddressPolicy;
use p2pchat_protocol::engine::{Answer, Command, CommandOutcome, EngineConfig, EngineError, Event, Query};
use p2pchat_protocol::node::{
    Node as ProtocolNode, NodeConfig as ProtocolConfig, NodeInput, NodeOutput, Notice, PeerPath, RelaySpec, Reply,
    Ticket, MAX_BATCH, RECORD_LIFETIME_MS,
};
use p2pchat_protocol::{PeerId, Timestamp};
use p2pchat_storage_sqlite::{Durability, MasterKey, SqliteStore};
use rand_core::SeedableRng;
use smol::channel;

use crate::admission::IncomingLimits;
use crate::config::RelayAddress;
use crate::lock::DataDirLock;
use crate::queues::{recv_either, NETWORK_QUEUE, RELAY_WRITE_QUEUE_BYTES, STATE_MACHINE_QUEUE, SUBSCRIBER_BUFFER};
use crate::tls::TlsIdentity;
use crate::transport::{by, Inbound, PeerConnection, Transport};

mod direct;
use direct::{DirectPeers, Direction};

/// What a node needs to start.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Identity key file, databases, lock.
    pub data_dir: PathBuf,
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// Accept no direct connections (behave as if behind NAT).
    pub no_direct: bool,
    /// Addresses this node is reached at, published besides a specific
    /// listen address.
    pub public_addrs: Vec<SocketAddr>,
    /// Which addresses from peers' records may be dialled.
    pub address_policy: AddressPolicy,
    /// The passphrase that wraps the identity key, if it has one (a new
    /// identity is created wrapped under it).
    pub passphrase: Option<p2pchat_storage_sqlite::Passphrase>,
    /// Commit durability.
    pub durability: Durability,
    /// The engine's retries, backoff and retention.
    pub engine: EngineConfig,
    /// The relays to keep a connection to.
    pub relays: Vec<RelayAddress>,
}

/// Why a node could not start or a call failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The data directory is in use.
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    /// Storage could not be opened.
    #[error(transparent)]
    Storage(#[from] p2pchat_storage_sqlite::StorageError),
    /// The engine refused the command or its store failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// TLS or QUIC could not be set up.
    #[error(transparent)]
    Transport(#[from] crate::transport::TransportError),
    /// A thread could not be started.
    #[error("cannot start the node's threads: {0}")]
    Thread(String),
    /// The node has stopped.
    #[error("the node has stopped")]
    Stopped,
}

/// What the node thread is handed.
enum NodeMsg {
    Command(Command, channel::Sender<Result<CommandOutcome, EngineError>>),
    Query(Query, channel::Sender<Result<Answer, EngineError>>),
    Input(NodeInput),
    Peers(channel::Sender<(Vec<PeerPath>, Vec<String>)>),
    OwnRecord(channel::Sender<p2pchat_protocol::relay::PeerRecord>),
    Stop,
}

/// What the node asks of the network thread.
enum NetMsg {
    Dial { peer: PeerId, addr: SocketAddr },
    SendDirect { peer: PeerId, id: p2pchat_protocol::engine::TransmitId, bytes: Vec<u8> },
    ConnectRelay(usize, RelaySpec),
    CloseRelay(usize),
    SendToRelay { relay: usize, bytes: Vec<u8> },
    Stop,
}

/// How the node thread is handed its work, on two queues. `data` is
/// bounded: frames from peers and API requests, whose senders wait while
/// it is full. `control` is not, and never needs to be: each of its
/// messages answers something the node asked for (a dial, a send, a relay
/// connection) or reports a connection opening or closing, so there are
/// never more of them than the node's outputs and connections, and they
/// must never wait behind a flood of data. The node thread takes control
/// messages first.
#[derive(Clone)]
pub(crate) struct Inputs {
    data: channel::Sender<NodeMsg>,
    control: channel::Sender<NodeMsg>,
}

impl Inputs {
    /// An answer to the node's own request, or a connection's change.
    fn control(&self, input: NodeInput) {
        let _ = self.control.try_send(NodeMsg::Input(input));
    }

    /// Bytes a peer sent, or what a relay connection carried; waits while
    /// the node is behind.
    async fn data(&self, input: NodeInput) {
        let _ = self.data.send(NodeMsg::Input(input)).await;
    }

    /// A request that waits its turn (and for room) on the data queue.
    async fn request(&self, msg: NodeMsg) -> Result<(), NodeError> {
        self.data.send(msg).await.map_err(|_| NodeError::Stopped)
    }
}

/// The node thread's ends of [`Inputs`].
struct Received {
    data: channel::Receiver<NodeMsg>,
    control: channel::Receiver<NodeMsg>,
}

type Subscribers = Arc<Mutex<Vec<channel::Sender<Event>>>>;

/// The handle the API and tests drive a node with.
#[derive(Clone)]
pub struct NodeHandle {
    relays: Arc<Vec<RelayAddress>>,
    /// Per relay, its connection as the network thread sees it.
    relay_links: Arc<Mutex<Vec<RelayLinkStatus>>>,
    no_direct: bool,
    direct: Arc<DirectPeers>,
    peer: PeerId,
    listen: SocketAddr,
    inputs: Inputs,
    events: Subscribers,
}

impl core::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NodeHandle").field("peer", &self.peer).field("listen", &self.listen).finish_non_exhaustive()
    }
}

/// A started node; dropping it does not stop it, [`Node::shutdown`] does.
pub struct Node {
    handle: NodeHandle,
    net: channel::Sender<NetMsg>,
    threads: Vec<std::thread::JoinHandle<()>>,
    _lock: DataDirLock,
}

/// Creates the data directory, its owner's alone (it holds the identity
/// key and the databases), if it does not exist.
pub(crate) fn create_data_dir(dir: &std::path::Path) -> Result<(), NodeError> {
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| p2pchat_storage_sqlite::StorageError::Io { path: dir.to_owned(), reason: e.to_string() })?;
    }
    Ok(())
}

/// The direct addresses a node publishes: none with `--no-direct`; else
/// every `--public-addr`, and the listen address when it is a specific one
/// (an unspecified one, `0.0.0.0`, is nowhere anyone can dial).
fn published_addresses(config: &NodeConfig, listen: SocketAddr) -> Vec<String> {
    if config.no_direct {
        return Vec::new();
    }
    let mut addresses: Vec<SocketAddr> = config.public_addrs.clone();
    if !listen.ip().is_unspecified() && listen.port() != 0 && !addresses.contains(&listen) {
        addresses.push(listen);
    }
    addresses.iter().map(ToString::to_string).collect()
}

fn now() -> Timestamp {
    Timestamp::from_millis(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
}

impl Node {
    /// Opens the data directory (lock, identity, database) and starts the
    /// node and network threads.
    pub fn start(config: NodeConfig) -> Result<Self, NodeError> {
        Self::start_subscribed(config).map(|(node, _)| node)
    }

    /// Like [`Node::start`], with a subscription to every event from the
    /// very start (a relay's mailbox can deliver at once).
    pub fn start_subscribed(config: NodeConfig) -> Result<(Self, channel::Receiver<Event>), NodeError> {
        create_data_dir(&config.data_dir)?;
        let lock = DataDirLock::acquire(&config.data_dir)?;
        let identity =
            p2pchat_storage_sqlite::load_or_create_identity_with(&config.data_dir, config.passphrase.as_ref())?;
        let peer = identity.peer_id();
        let key = MasterKey::derive(&identity.seed());
        let store = SqliteStore::open(&config.data_dir.join("node.sqlite3"), key, config.durability)?;
        let tls = TlsIdentity::new(&identity).map_err(crate::transport::TransportError::from)?;
        let inbound = if config.no_direct { Inbound::Refused } else { Inbound::Limited(IncomingLimits::NODE) };
        let transport = Transport::bind(config.listen, tls, inbound)?;
        let listen = transport.local_addr()?;
        let protocol_config = ProtocolConfig {
            engine: config.engine.clone(),
            relays: config.relays.iter().map(|r| RelaySpec { peer: r.peer, address: r.to_string() }).collect(),
            direct_addresses: published_addresses(&config, listen),
            // Relay connections leave from the listening socket, so what a
            // relay sees is where a NAT in front of it forwards to us.
            publish_observed: !config.no_direct,
            address_policy: config.address_policy,
            record_lifetime_ms: RECORD_LIFETIME_MS,
        };
        // The engine's randomness is fresh from the OS on every start.
        let rng = rand_chacha::ChaCha20Rng::from_rng(rand_core::OsRng).map_err(|e| NodeError::Thread(e.to_string()))?;
        let node = ProtocolNode::new(identity, store, protocol_config, rng, now())?;

        let (data, data_rx) = channel::bounded::<NodeMsg>(STATE_MACHINE_QUEUE);
        let (control, control_rx) = channel::unbounded::<NodeMsg>();
        let received = Received { data: data_rx, control: control_rx };
        let (net_tx, net_rx) = channel::bounded::<NetMsg>(NETWORK_QUEUE);
        let relays = Arc::new(config.relays.clone());
        let handle = NodeHandle {
            relay_links: Arc::new(Mutex::new(relays.iter().map(|_| RelayLinkStatus::new()).collect())),
            relays,
            no_direct: config.no_direct,
            direct: Arc::default(),
            peer,
            listen,
            inputs: Inputs { data, control },
            events: Subscribers::default(),
        };
        // The first subscriber is there before anything can happen, so a
        // caller of `start_subscribed` misses no event.
        let first_events = handle.subscribe();

        let node_thread = std::thread::Builder::new()
            .name(format!("node-{peer}"))
            .spawn({
                let (net_tx, events) = (net_tx.clone(), handle.events.clone());
                move || run_node(node, received, net_tx, events)
            })
            .map_err(|e| NodeError::Thread(e.to_string()))?;
        let net_thread = std::thread::Builder::new()
            .name(format!("net-{peer}"))
            .spawn({
                let network = Network {
                    inputs: handle.inputs.clone(),
                    direct: handle.direct.clone(),
                    relays: handle.relays.clone(),
                    relay_links: handle.relay_links.clone(),
                    links: Mutex::default(),
                };
                move || smol::block_on(run_network(transport, net_rx, Arc::new(network)))
            })
            .map_err(|e| NodeError::Thread(e.to_string()))?;
        log::info!("node {peer} listening on {listen}");
        Ok((Self { handle, net: net_tx, threads: vec![node_thread, net_thread], _lock: lock }, first_events))
    }

    /// The handle.
    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// Stops the node (after its last commit), then the network, which
    /// carries out the node's last outputs first, and waits for both. The
    /// stop overtakes work still queued: a command not yet taken is
    /// answered [`NodeError::Stopped`], never half done.
    pub fn shutdown(mut self) {
        let _ = self.handle.inputs.control.try_send(NodeMsg::Stop);
        let mut threads = self.threads.drain(..);
        if let Some(node_thread) = threads.next() {
            let _ = node_thread.join();
        }
        // The network thread takes what the node asked before this.
        let _ = self.net.send_blocking(NetMsg::Stop);
        for thread in threads {
            let _ = thread.join();
        }
    }
}

impl NodeHandle {
    /// This node's peer ID.
    pub fn peer_id(&self) -> PeerId {
        self.peer
    }

    /// The QUIC address it listens on.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Whether the node is connected to its first relay right now.
    pub fn relay_connected(&self) -> bool {
        self.relay_links.lock().unwrap_or_else(PoisonError::into_inner).first().is_some_and(|l| l.connected)
    }

    /// Tells the node where a peer can be reached directly.
    pub fn add_peer_address(&self, peer: PeerId, addr: SocketAddr) {
        let _ = self.inputs.data.send_blocking(NodeMsg::Input(NodeInput::PeerAddress { peer, addr }));
    }

    /// Runs an API command on the engine.
    pub async fn command(&self, command: Command) -> Result<CommandOutcome, NodeError> {
        let (tx, rx) = channel::bounded(1);
        self.inputs.request(NodeMsg::Command(command, tx)).await?;
        Ok(rx.recv().await.map_err(|_| NodeError::Stopped)??)
    }

    /// Answers a read from committed state (after the commands already
    /// sent).
    pub async fn query(&self, query: Query) -> Result<Answer, NodeError> {
        let (tx, rx) = channel::bounded(1);
        self.inputs.request(NodeMsg::Query(query, tx)).await?;
        Ok(rx.recv().await.map_err(|_| NodeError::Stopped)??)
    }

    /// Every event from now on, through a buffer of
    /// [`SUBSCRIBER_BUFFER`] events (a subscriber that lets it fill up is
    /// dropped, as with [`NodeHandle::subscribe_bounded`]).
    pub fn subscribe(&self) -> channel::Receiver<Event> {
        self.subscribe_bounded(SUBSCRIBER_BUFFER)
    }

    /// Every event from now on, through a buffer of `capacity`: a
    /// subscriber that lets it fill up is dropped (its receiver then
    /// reports the channel closed), so a slow one cannot hold up the node.
    pub fn subscribe_bounded(&self, capacity: usize) -> channel::Receiver<Event> {
        self.subscribe_with(channel::bounded(capacity.max(1)))
    }

    fn subscribe_with(&self, (tx, rx): (channel::Sender<Event>, channel::Receiver<Event>)) -> channel::Receiver<Event> {
        self.events.lock().unwrap_or_else(PoisonError::into_inner).push(tx);
        rx
    }

    /// The first relay this node keeps a connection to, if any.
    pub fn relay(&self) -> Option<&RelayAddress> {
        self.relays.first()
    }

    /// This node's record as it publishes it now: for someone who shares
    /// none of its relays (a contact card, a test).
    pub async fn own_record(&self) -> Result<p2pchat_protocol::relay::PeerRecord, NodeError> {
        let (tx, rx) = channel::bounded(1);
        self.inputs.request(NodeMsg::OwnRecord(tx)).await?;
        rx.recv().await.map_err(|_| NodeError::Stopped)
    }

    /// Hands the node a peer's signed record (checked there like one from
    /// a relay): its addresses and relays become paths to the peer.
    pub fn add_peer_record(&self, record: p2pchat_protocol::relay::PeerRecord) {
        let _ = self.inputs.data.send_blocking(NodeMsg::Input(NodeInput::PeerRecord { record }));
    }

    /// Every relay this node keeps a connection to, with that connection.
    pub fn relays(&self) -> Vec<(RelayAddress, RelayLinkStatus)> {
        let links = self.relay_links.lock().unwrap_or_else(PoisonError::into_inner).clone();
        self.relays.iter().cloned().zip(links).collect()
    }

    /// Whether this node accepts direct connections.
    pub fn accepts_direct(&self) -> bool {
        !self.no_direct
    }

    /// The peers the node has a path for, and how each is reached; and
    /// every relay the node knows (its own, then others' it visits), as
    /// the paths' relay indexes name them.
    pub async fn peers(&self) -> Result<(Vec<PeerPath>, Vec<String>), NodeError> {
        let (tx, rx) = channel::bounded(1);
        self.inputs.request(NodeMsg::Peers(tx)).await?;
        rx.recv().await.map_err(|_| NodeError::Stopped)
    }

    /// How many open connections this node has to `peer`, either way.
    pub fn open_connections(&self, peer: PeerId) -> usize {
        self.direct.open_connections(&peer)
    }
}

/// Who waits for a reply, and for what.
enum Waiter {
    Command(channel::Sender<Result<CommandOutcome, EngineError>>),
    Query(channel::Sender<Result<Answer, EngineError>>),
}

/// The node thread: every message that is waiting (up to [`MAX_BATCH`])
/// handed to the node, whose engine work then runs as one transaction;
/// every output carried out; then sleep until the next message or the
/// node's deadline.
fn run_node(mut node: ProtocolNode<SqliteStore>, rx: Received, net: channel::Sender<NetMsg>, events: Subscribers) {
    let mut waiters: BTreeMap<Ticket, Waiter> = BTreeMap::new();
    let mut next_ticket = 0u64;
    loop {
        carry_out(&mut node, &net, &events, &mut waiters);
        let wait = node
            .poll_timeout()
            .map(|deadline| Duration::from_millis(deadline.as_millis().saturating_sub(now().as_millis())));
        let msg = match recv_either(&rx.control, &rx.data, wait) {
            Ok(msg) => msg,
            Err(RecvTimeoutError::Timeout) => {
                node.handle_timeout(now());
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let at = now();
        let mut stop = false;
        let mut taken = 0;
        let mut pending = Some(msg);
        let next = || rx.control.try_recv().or_else(|_| rx.data.try_recv()).ok();
        while let Some(msg) = pending.take().or_else(next) {
            let mut ticket = || {
                next_ticket += 1;
                Ticket(next_ticket)
            };
            match msg {
                NodeMsg::Command(command, reply) => {
                    let ticket = ticket();
                    waiters.insert(ticket, Waiter::Command(reply));
                    node.handle(at, NodeInput::Command { ticket, command });
                }
                NodeMsg::Query(query, reply) => {
                    let ticket = ticket();
                    waiters.insert(ticket, Waiter::Query(reply));
                    node.handle(at, NodeInput::Query { ticket, query });
                }
                NodeMsg::Input(input) => node.handle(at, input),
                NodeMsg::Peers(reply) => {
                    let relays = node.relays().into_iter().map(|r| r.relay.address).collect();
                    let _ = reply.try_send((node.peers(at), relays));
                }
                NodeMsg::OwnRecord(reply) => {
                    let _ = reply.try_send(node.own_record(at));
                }
                NodeMsg::Stop => {
                    stop = true;
                    break;
                }
            }
            taken += 1;
            if taken >= MAX_BATCH {
                break;
            }
        }
        if stop {
            carry_out(&mut node, &net, &events, &mut waiters);
            return;
        }
        // A steady stream of inputs must not starve the deadlines.
        if node.poll_timeout().is_some_and(|deadline| deadline <= now()) {
            node.handle_timeout(now());
        }
    }
}

/// Carries out every output of the node: network work to the network
/// thread, events to subscribers, replies to their callers.
fn carry_out(
    node: &mut ProtocolNode<SqliteStore>,
    net: &channel::Sender<NetMsg>,
    events: &Subscribers,
    waiters: &mut BTreeMap<Ticket, Waiter>,
) {
    while let Some(output) = node.poll_output(now()) {
        let to_net = match output {
            NodeOutput::Dial { peer, addr } => NetMsg::Dial { peer, addr },
            NodeOutput::SendDirect { peer, id, bytes } => NetMsg::SendDirect { peer, id, bytes },
            NodeOutput::ConnectRelay { relay, spec } => NetMsg::ConnectRelay(relay, spec),
            NodeOutput::CloseRelay { relay } => NetMsg::CloseRelay(relay),
            NodeOutput::SendToRelay { relay, bytes } => NetMsg::SendToRelay { relay, bytes },
            NodeOutput::Event(event) => {
                events.lock().unwrap_or_else(PoisonError::into_inner).retain(|s| s.try_send(event.clone()).is_ok());
                continue;
            }
            NodeOutput::Reply { ticket, reply } => {
                match (waiters.remove(&ticket), reply) {
                    (Some(Waiter::Command(tx)), Reply::Command(result)) => {
                        let _ = tx.try_send(result);
                    }
                    (Some(Waiter::Query(tx)), Reply::Query(result)) => {
                        let _ = tx.try_send(result);
                    }
                    _ => {}
                }
                continue;
            }
            NodeOutput::Notice(notice) => {
                log_notice(&notice);
                continue;
            }
        };
        // A full queue holds the node thread here, and so its intake, until
        // the network catches up (the network thread never waits for the
        // node).
        let _ = net.send_blocking(to_net);
    }
}

fn log_notice(notice: &Notice) {
    match notice {
        Notice::InputFailed(e) => log::error!("the engine could not handle an input: {e}"),
        Notice::PublishRefused { relay, reason } => {
            log::warn!("relay {relay} refused our record: {}", reason.as_str())
        }
        Notice::BadRelayFrame { relay, error } => {
            log::warn!("relay {relay} sent a frame that does not decode: {error}")
        }
        Notice::DirectFellBack { peer, reason } => {
            log::info!("direct delivery to {peer} failed ({reason}); sent through a relay")
        }
        Notice::RecordRefused { peer, reason } => log::warn!("a record given for {peer} was refused: {reason}"),
        Notice::AddressNotPermitted { peer, addresses } => log::debug!(
            "not dialling {peer}: its record lists only addresses this node does not dial ({addresses:?}; \
             --allow-private-addresses permits private ones)"
        ),
        Notice::ObservedAddressRefused { relay, address } => {
            log::warn!(
                "relay {relay} says our connection comes from {address:?}, which no one could dial; not published"
            )
        }
    }
}

/// One relay's connection, as `GET /api/relay/status` shows it.
#[derive(Clone, Debug)]
pub struct RelayLinkStatus {
    /// Connected now.
    pub connected: bool,
    /// Since when it is connected, or not.
    pub since: SystemTime,
    /// Why the last attempt failed or the last connection closed.
    pub last_error: Option<String>,
}

impl RelayLinkStatus {
    fn new() -> Self {
        Self { connected: false, since: SystemTime::now(), last_error: None }
    }
}

/// A relay's open connection and the queue of frames to write on it.
type RelayConnection = (PeerConnection, RelayWriter);

/// The queue of frames waiting to be written to one relay, bounded by
/// bytes ([`RELAY_WRITE_QUEUE_BYTES`]).
#[derive(Clone)]
struct RelayWriter {
    tx: channel::Sender<Vec<u8>>,
    queued: Arc<AtomicUsize>,
}

impl RelayWriter {
    /// Queues a frame, or gives it back if the queue is full.
    fn push(&self, bytes: Vec<u8>) -> Result<(), Vec<u8>> {
        let len = bytes.len();
        let queued = self.queued.fetch_add(len, Ordering::AcqRel);
        if queued.saturating_add(len) > RELAY_WRITE_QUEUE_BYTES {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return Err(bytes);
        }
        self.tx.try_send(bytes).map_err(|e| {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            e.into_inner()
        })
    }
}

/// What the network thread shares with its tasks.
struct Network {
    inputs: Inputs,
    direct: Arc<DirectPeers>,
    relays: Arc<Vec<RelayAddress>>,
    relay_links: Arc<Mutex<Vec<RelayLinkStatus>>>,
    /// Per relay (this node's own, then others' it visits), its current
    /// connection and the queue of frames to it.
    links: Mutex<BTreeMap<usize, RelayConnection>>,
}

impl Network {
    /// The relay's connection opened (with its frame queue) or closed
    /// (with why).
    fn set_link(&self, relay: usize, link: Option<RelayConnection>, error: Option<String>) {
        let connected = link.is_some();
        {
            let mut links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
            match link {
                Some(link) => links.insert(relay, link),
                None => links.remove(&relay),
            };
        }
        if let Some(status) = self.relay_links.lock().unwrap_or_else(PoisonError::into_inner).get_mut(relay) {
            if status.connected != connected {
                status.since = SystemTime::now();
            }
            status.connected = connected;
            if error.is_some() || connected {
                status.last_error = error;
            }
        }
    }

    fn link(&self, relay: usize) -> Option<RelayConnection> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner).get(&relay).cloned()
    }
}

/// The network thread: accepts connections, and does what the node asks.
async fn run_network(transport: Transport, rx: channel::Receiver<NetMsg>, net: Arc<Network>) {
    let transport = Arc::new(transport);
    let acceptor = smol::spawn({
        let (transport, net) = (transport.clone(), net.clone());
        async move {
            while let Some(handshake) = transport.accept().await {
                let net = net.clone();
                smol::spawn(async move {
                    match handshake.await {
                        Ok(conn) => net.direct.adopt(conn, Direction::Incoming, &net.inputs),
                        // Refusals have their own rate-limited lines.
                        Err(e) if e.is_refusal() => log::debug!("incoming connection refused: {e}"),
                        Err(e) => log::info!("incoming connection failed: {e}"),
                    }
                })
                .detach();
            }
        }
    });
    let mut relay_tasks = Vec::new();
    while let Ok(msg) = rx.recv().await {
        match msg {
            NetMsg::Stop => break,
            NetMsg::Dial { peer, addr } => net.direct.dial(&transport, &net.inputs, peer, addr),
            NetMsg::SendDirect { peer, id, bytes } => net.direct.send(&net.inputs, peer, id, bytes),
            NetMsg::ConnectRelay(relay, spec) => {
                // One of ours by its index; another peer's by its address.
                let address = match net.relays.get(relay) {
                    Some(address) => Ok(address.clone()),
                    None => spec.address.parse::<RelayAddress>(),
                };
                match address {
                    Ok(address) => {
                        relay_tasks.retain(|task: &smol::Task<()>| !task.is_finished());
                        let task = keep_relay_connection(transport.clone(), net.clone(), relay, address);
                        relay_tasks.push(smol::spawn(task));
                    }
                    Err(reason) => net.inputs.control(NodeInput::RelayDisconnected { relay, reason }),
                }
            }
            // Its reader then ends and reports the close.
            NetMsg::CloseRelay(relay) => {
                if let Some((conn, _)) = net.link(relay) {
                    conn.close();
                }
            }
            NetMsg::SendToRelay { relay, bytes } => match net.link(relay) {
                Some((_, writer)) => {
                    // The relay leaves too much unread: what this frame
                    // asked fails back to the node, rather than waiting here.
                    if let Err(bytes) = writer.push(bytes) {
                        log::info!("the queue to relay {relay} is full; a frame fails back to the node");
                        net.inputs.control(NodeInput::RelayFrameUnsent { relay, bytes });
                    }
                }
                // The connection just closed: the node hears of it, and
                // fails back what it had sent through it.
                None => log::debug!("a frame for relay {relay} found it disconnected"),
            },
        }
    }
    drop(acceptor);
    drop(relay_tasks);
    transport.shutdown().await;
}

/// How long connecting to a relay may take.
const RELAY_DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection to a relay, from dial to close: frames the node sends
/// are written in order (the relay reads them in order: registration
/// first), frames from the relay reach the node in order, and its end is
/// reported so the node can reconnect after its backoff.
async fn keep_relay_connection(transport: Arc<Transport>, net: Arc<Network>, relay: usize, address: RelayAddress) {
    let conn = match by(Instant::now() + RELAY_DIAL_TIMEOUT, transport.dial(address.addr, address.peer)).await {
        Some(Ok(conn)) => conn,
        failed => {
            let reason = match failed {
                Some(Err(e)) => e.to_string(),
                _ => format!("no answer within {} s", RELAY_DIAL_TIMEOUT.as_secs()),
            };
            log::info!("cannot reach relay {address}: {reason}");
            net.set_link(relay, None, Some(reason.clone()));
            return net.inputs.data(NodeInput::RelayDisconnected { relay, reason }).await;
        }
    };
    // Its end of the connection's life goes through the data queue with
    // its frames, so the node hears of them in order.
    let (tx, frames) = channel::unbounded::<Vec<u8>>();
    let queued = Arc::new(AtomicUsize::new(0));
    net.set_link(relay, Some((conn.clone(), RelayWriter { tx, queued: queued.clone() })), None);
    log::info!("connected to relay {address}");
    net.inputs.data(NodeInput::RelayConnected { relay }).await;
    let writer = smol::spawn(write_frames(conn.clone(), frames, queued));
    let reason = loop {
        match conn.accept_frame().await {
            Ok(frame) => match frame.await {
                Ok(bytes) => net.inputs.data(NodeInput::RelayFrame { relay, bytes }).await,
                Err(e) => log::info!("a frame from relay {address} failed: {e}"),
            },
            Err(e) => break e.to_string(),
        }
    };
    net.set_link(relay, None, Some(reason.clone()));
    drop(writer);
    conn.close();
    log::info!("the connection to relay {address} closed ({reason}); reconnecting");
    net.inputs.data(NodeInput::RelayDisconnected { relay, reason }).await;
}

/// Writes frames to a relay in order; their acknowledgements are awaited
/// side by side. A frame that cannot be sent is logged, and the connection
/// kept: if it is dead, its reader reports that.
async fn write_frames(conn: PeerConnection, frames: channel::Receiver<Vec<u8>>, queued: Arc<AtomicUsize>) {
    while let Ok(bytes) = frames.recv().await {
        let written = conn.write(&bytes).await;
        queued.fetch_sub(bytes.len(), Ordering::AcqRel);
        match written {
            Ok(written) => smol::spawn(async move {
                if let Err(e) = written.acknowledged().await {
                    log::info!("a frame to the relay was not acknowledged: {e}");
                }
            })
            .detach(),
            Err(e) => log::info!("writing a frame to the relay failed: {e}"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_queue_takes_frames_up_to_its_bytes_and_gives_the_rest_back() {
        let (tx, rx) = channel::unbounded();
        let writer = RelayWriter { tx, queued: Arc::default() };
        let frame = vec![0u8; 1024 * 1024];
        for _ in 0..RELAY_WRITE_QUEUE_BYTES / frame.len() {
            writer.push(frame.clone()).unwrap();
        }
        assert_eq!(writer.push(vec![1]), Err(vec![1]), "one byte more is refused");
        assert_eq!(writer.queued.load(Ordering::Acquire), RELAY_WRITE_QUEUE_BYTES);
        // As the writer takes frames (and subtracts them), room returns.
        let taken = rx.try_recv().unwrap();
        writer.queued.fetch_sub(taken.len(), Ordering::AcqRel);
        writer.push(vec![1]).unwrap();
        // A queue whose writer is gone gives frames back too.
        drop(rx);
        assert_eq!(writer.push(vec![2]), Err(vec![2]));
    }
}
