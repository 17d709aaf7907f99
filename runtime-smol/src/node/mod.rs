//! A running node: the engine on its own thread (its store calls block),
//! the QUIC transport on a smol executor thread, and a channel-based
//! [`NodeHandle`] for the API and the tests.
//!
//! The engine thread follows the driving rule: it takes every input that is
//! waiting, handles them as one batch (one transaction: group commit),
//! drains every output, and sleeps until the next input or its deadline.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use p2pchat_protocol::address::AddressPolicy;
use p2pchat_protocol::engine::{
    Answer, Command, CommandOutcome, Engine, EngineConfig, EngineError, Event, Input, Query, Step, Transmit,
    TransmitOutcome,
};
use p2pchat_protocol::relay::{ClientAction, RelayClient, RelayFrame};
use p2pchat_protocol::{PeerId, Timestamp};
use p2pchat_storage_sqlite::{Durability, MasterKey, SqliteStore};
use rand_core::SeedableRng;
use smol::channel;

use crate::admission::IncomingLimits;
use crate::lock::DataDirLock;
use crate::tls::TlsIdentity;
use crate::transport::{Inbound, PeerConnection, Transport};

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
    /// Which addresses from peers' records may be dialled.
    pub address_policy: AddressPolicy,
    /// The passphrase that wraps the identity key, if it has one (a new
    /// identity is created wrapped under it).
    pub passphrase: Option<p2pchat_storage_sqlite::Passphrase>,
    /// Commit durability.
    pub durability: Durability,
    /// The engine's retries, backoff and retention.
    pub engine: EngineConfig,
    /// The relay to keep a connection to (the first of these is used).
    pub relays: Vec<crate::config::RelayAddress>,
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

enum EngineMsg {
    Command(Command, channel::Sender<Result<CommandOutcome, EngineError>>),
    Query(Query, channel::Sender<Result<Answer, EngineError>>),
    Input(Input),
    /// An input whose sender waits until it is committed (a relay mailbox
    /// entry is acknowledged only then).
    InputCommitted(Input, channel::Sender<bool>),
    Stop,
}

enum NetMsg {
    Transmit(Transmit),
    Lookup(PeerId),
    Stop,
}

/// Where peers can be reached directly. The node dials these; a peer with
/// no address here is looked up (and later reached through a relay).
#[derive(Clone, Debug, Default)]
pub struct Directory {
    addresses: Arc<Mutex<BTreeMap<PeerId, SocketAddr>>>,
}

impl Directory {
    /// Records a peer's direct address.
    pub fn insert(&self, peer: PeerId, addr: SocketAddr) {
        if let Ok(mut map) = self.addresses.lock() {
            map.insert(peer, addr);
        }
    }

    /// A peer's direct address, if known.
    pub fn get(&self, peer: &PeerId) -> Option<SocketAddr> {
        self.addresses.lock().ok().and_then(|map| map.get(peer).copied())
    }
}

/// The handle the API and tests drive a node with.
#[derive(Clone)]
pub struct NodeHandle {
    relay_up: Arc<std::sync::atomic::AtomicBool>,
    relay: Option<crate::config::RelayAddress>,
    no_direct: bool,
    address_policy: AddressPolicy,
    direct: Arc<DirectPeers>,
    peer: PeerId,
    listen: SocketAddr,
    engine: mpsc::Sender<EngineMsg>,
    events: Arc<Mutex<Vec<channel::Sender<Event>>>>,
    directory: Directory,
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

fn now() -> Timestamp {
    Timestamp::from_millis(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
}

impl Node {
    /// Opens the data directory (lock, identity, database) and starts the
    /// engine and network threads.
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
        let signer = p2pchat_protocol::IdentityKeyPair::from_seed(&identity.seed());
        let listen = transport.local_addr()?;
        // The engine's randomness is fresh from the OS on every start.
        let rng = rand_chacha::ChaCha20Rng::from_rng(rand_core::OsRng).map_err(|e| NodeError::Thread(e.to_string()))?;
        let engine = Engine::new(identity, store, config.engine.clone(), rng, now())?;

        let (engine_tx, engine_rx) = mpsc::channel::<EngineMsg>();
        let (net_tx, net_rx) = channel::unbounded::<NetMsg>();
        let events: Arc<Mutex<Vec<channel::Sender<Event>>>> = Arc::default();
        let directory = Directory::default();
        let handle = NodeHandle {
            relay_up: Arc::default(),
            relay: config.relays.first().cloned(),
            no_direct: config.no_direct,
            address_policy: config.address_policy,
            direct: Arc::default(),
            peer,
            listen,
            engine: engine_tx.clone(),
            events: events.clone(),
            directory,
        };
        // The first subscriber is there before anything can happen, so a
        // caller of `start_subscribed` misses no event.
        let first_events = handle.subscribe();

        let engine_thread = std::thread::Builder::new()
            .name(format!("engine-{peer}"))
            .spawn({
                let net_tx = net_tx.clone();
                move || run_engine(engine, engine_rx, net_tx, events)
            })
            .map_err(|e| NodeError::Thread(e.to_string()))?;
        let net_thread = std::thread::Builder::new()
            .name(format!("net-{peer}"))
            .spawn({
                let handle = handle.clone();
                let relay = config.relays.first().cloned();
                let no_direct = config.no_direct;
                move || smol::block_on(run_network(transport, net_rx, handle, relay, signer, no_direct))
            })
            .map_err(|e| NodeError::Thread(e.to_string()))?;
        log::info!("node {peer} listening on {listen}");
        Ok((Self { handle, net: net_tx, threads: vec![engine_thread, net_thread], _lock: lock }, first_events))
    }

    /// The handle.
    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// Stops the engine (after its last commit) and the network, and waits.
    pub fn shutdown(mut self) {
        let _ = self.handle.engine.send(EngineMsg::Stop);
        let _ = self.net.try_send(NetMsg::Stop);
        for thread in self.threads.drain(..) {
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

    /// Whether the node is registered with its relay right now.
    pub fn relay_connected(&self) -> bool {
        self.relay_up.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Tells the node where a peer can be reached directly.
    pub fn add_peer_address(&self, peer: PeerId, addr: SocketAddr) {
        self.directory.insert(peer, addr);
    }

    /// Runs an API command on the engine.
    pub async fn command(&self, command: Command) -> Result<CommandOutcome, NodeError> {
        let (tx, rx) = channel::bounded(1);
        self.engine.send(EngineMsg::Command(command, tx)).map_err(|_| NodeError::Stopped)?;
        Ok(rx.recv().await.map_err(|_| NodeError::Stopped)??)
    }

    /// Answers a read from committed state (after the commands already
    /// sent).
    pub async fn query(&self, query: Query) -> Result<Answer, NodeError> {
        let (tx, rx) = channel::bounded(1);
        self.engine.send(EngineMsg::Query(query, tx)).map_err(|_| NodeError::Stopped)?;
        Ok(rx.recv().await.map_err(|_| NodeError::Stopped)??)
    }

    /// Every event from now on (for the node's own use and tests: nothing
    /// bounds this buffer).
    pub fn subscribe(&self) -> channel::Receiver<Event> {
        self.subscribe_with(channel::unbounded())
    }

    /// Every event from now on, through a buffer of `capacity`: a
    /// subscriber that lets it fill up is dropped (its receiver then
    /// reports the channel closed), so a slow one cannot hold up the node.
    pub fn subscribe_bounded(&self, capacity: usize) -> channel::Receiver<Event> {
        self.subscribe_with(channel::bounded(capacity.max(1)))
    }

    fn subscribe_with(&self, (tx, rx): (channel::Sender<Event>, channel::Receiver<Event>)) -> channel::Receiver<Event> {
        if let Ok(mut subscribers) = self.events.lock() {
            subscribers.push(tx);
        }
        rx
    }

    /// The relay this node keeps a connection to, if any.
    pub fn relay(&self) -> Option<&crate::config::RelayAddress> {
        self.relay.as_ref()
    }

    /// Whether this node accepts direct connections.
    pub fn accepts_direct(&self) -> bool {
        !self.no_direct
    }

    /// The peers with a known direct address or an open connection: (peer,
    /// address, connected).
    pub fn peers(&self) -> Vec<(PeerId, Option<SocketAddr>, bool)> {
        let mut known: BTreeMap<PeerId, (Option<SocketAddr>, bool)> = BTreeMap::new();
        if let Ok(map) = self.directory.addresses.lock() {
            for (peer, addr) in map.iter() {
                known.insert(*peer, (Some(*addr), false));
            }
        }
        for peer in self.direct.peers() {
            known.entry(peer).or_insert((None, false)).1 = self.direct.connected(&peer);
        }
        known.into_iter().map(|(peer, (addr, connected))| (peer, addr, connected)).collect()
    }

    /// How many open connections this node has to `peer`, either way.
    pub fn open_connections(&self, peer: PeerId) -> usize {
        self.direct.open_connections(&peer)
    }

    fn input(&self, input: Input) {
        let _ = self.engine.send(EngineMsg::Input(input));
    }

    /// Hands the engine an input and waits until the transaction holding it
    /// has been committed: true only then (false if it failed, or the
    /// engine is gone).
    async fn input_committed(&self, input: Input) -> bool {
        let (tx, rx) = channel::bounded(1);
        if self.engine.send(EngineMsg::InputCommitted(input, tx)).is_err() {
            return false;
        }
        rx.recv().await.unwrap_or(false)
    }
}

/// The engine thread: every command and input that is waiting, in arrival
/// order, as one transaction (group commit).
fn run_engine(
    mut engine: Engine<SqliteStore>,
    rx: mpsc::Receiver<EngineMsg>,
    net: channel::Sender<NetMsg>,
    events: Arc<Mutex<Vec<channel::Sender<Event>>>>,
) {
    loop {
        drain(&mut engine, &net, &events);
        let wait = engine
            .poll_timeout()
            .map(|deadline| Duration::from_millis(deadline.as_millis().saturating_sub(now().as_millis())));
        let first = match wait {
            Some(wait) => rx.recv_timeout(wait),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let msg = match first {
            Ok(msg) => msg,
            Err(RecvTimeoutError::Timeout) => {
                if let Err(e) = engine.handle(now(), Input::Timeout) {
                    // The deadline stays in the past; do not spin on it.
                    log::error!("engine timeout failed: {e}; trying again in a second");
                    std::thread::sleep(Duration::from_secs(1));
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = Batch::default();
        // Reads wait for the batch, so they see what came before them.
        let mut queries = Vec::new();
        let mut stop = false;
        let mut pending = Some(msg);
        while let Some(msg) = pending.take().or_else(|| rx.try_recv().ok()) {
            match msg {
                EngineMsg::Input(input) => batch.push(Step::Input(input), Waiter::Nobody),
                EngineMsg::InputCommitted(input, done) => batch.push(Step::Input(input), Waiter::Commit(done)),
                EngineMsg::Command(command, reply) => batch.push(Step::Command(command), Waiter::Command(reply)),
                EngineMsg::Query(query, reply) => queries.push((query, reply)),
                EngineMsg::Stop => {
                    stop = true;
                    break;
                }
            }
            if batch.steps.len() >= MAX_BATCH {
                break;
            }
        }
        batch.run(&mut engine);
        for (query, reply) in queries {
            let _ = reply.try_send(engine.query(query));
        }
        if stop {
            drain(&mut engine, &net, &events);
            return;
        }
        // A steady stream of inputs must not starve the deadlines.
        if engine.poll_timeout().is_some_and(|deadline| deadline <= now()) {
            if let Err(e) = engine.handle(now(), Input::Timeout) {
                log::error!("engine timeout failed: {e}");
            }
        }
    }
}

/// The most steps in one transaction: enough to amortise the commit, few
/// enough that the first caller in a batch is not kept waiting long.
const MAX_BATCH: usize = 256;

/// Who waits for a step of a batch, and for what.
enum Waiter {
    Nobody,
    /// Whether the input was committed (a relay mailbox entry is
    /// acknowledged only then).
    Commit(channel::Sender<bool>),
    /// The command's outcome.
    Command(channel::Sender<Result<CommandOutcome, EngineError>>),
}

/// Steps waiting for the engine, with their waiters.
#[derive(Default)]
struct Batch {
    steps: Vec<Step>,
    waiters: Vec<Waiter>,
}

impl Batch {
    fn push(&mut self, step: Step, waiter: Waiter) {
        self.steps.push(step);
        self.waiters.push(waiter);
    }

    /// Runs the batch as one transaction. If a step fails (nothing of the
    /// batch was committed or sent), the steps before it run again as a
    /// batch, the failing one alone (a command with a caller's mistake gets
    /// its error), and the rest as a batch: one bad step costs one extra
    /// transaction, not one per step. If the commit itself fails, each step
    /// is tried on its own, so a transmit result in particular still
    /// reaches the engine, or its item would stay in flight.
    fn run(self, engine: &mut Engine<SqliteStore>) {
        let (mut steps, mut waiters) = (self.steps, self.waiters);
        while !steps.is_empty() {
            if steps.len() == 1 {
                if let (Some(step), Some(waiter)) = (steps.pop(), waiters.pop()) {
                    run_alone(engine, step, waiter);
                }
                return;
            }
            let failed = match engine.handle_batch(now(), steps.clone()) {
                Ok(outcomes) => {
                    let mut outcomes = outcomes.into_iter();
                    for waiter in waiters {
                        match waiter {
                            Waiter::Nobody => {}
                            Waiter::Commit(done) => {
                                let _ = done.try_send(true);
                            }
                            // One outcome per command, in order.
                            Waiter::Command(reply) => {
                                if let Some(outcome) = outcomes.next() {
                                    let _ = reply.try_send(Ok(outcome));
                                }
                            }
                        }
                    }
                    return;
                }
                Err(e) => e,
            };
            log::debug!("a batch of {} steps failed ({failed}); splitting it", steps.len());
            let Some(index) = failed.step.filter(|i| *i < steps.len()) else {
                for (step, waiter) in steps.into_iter().zip(waiters) {
                    run_alone(engine, step, waiter);
                }
                return;
            };
            let mut rest_steps = steps.split_off(index);
            let mut rest_waiters = waiters.split_off(index);
            Batch { steps, waiters }.run(engine);
            let (step, waiter) = (rest_steps.remove(0), rest_waiters.remove(0));
            run_alone(engine, step, waiter);
            (steps, waiters) = (rest_steps, rest_waiters);
        }
    }
}

/// One step in a transaction of its own, its waiter answered.
fn run_alone(engine: &mut Engine<SqliteStore>, step: Step, waiter: Waiter) {
    match (step, waiter) {
        (Step::Command(command), Waiter::Command(reply)) => {
            let _ = reply.try_send(engine.command(now(), command));
        }
        (Step::Command(command), _) => {
            let _ = engine.command(now(), command);
        }
        (Step::Input(input), waiter) => {
            let committed = match engine.handle(now(), input) {
                Ok(()) => true,
                Err(e) => {
                    log::error!("engine input failed: {e}");
                    false
                }
            };
            if let Waiter::Commit(done) = waiter {
                let _ = done.try_send(committed);
            }
        }
    }
}

fn drain(engine: &mut Engine<SqliteStore>, net: &channel::Sender<NetMsg>, events: &Mutex<Vec<channel::Sender<Event>>>) {
    while let Some(event) = engine.poll_event() {
        if let Ok(mut subscribers) = events.lock() {
            subscribers.retain(|s| s.try_send(event.clone()).is_ok());
        }
    }
    while let Some(peer) = engine.poll_lookup() {
        let _ = net.try_send(NetMsg::Lookup(peer));
    }
    while let Some(transmit) = engine.poll_transmit() {
        let _ = net.try_send(NetMsg::Transmit(transmit));
    }
}

/// The network thread: accepts connections, dials peers, and carries
/// frames between the transport and the engine.
async fn run_network(
    transport: Transport,
    rx: channel::Receiver<NetMsg>,
    node: NodeHandle,
    relay: Option<crate::config::RelayAddress>,
    signer: p2pchat_protocol::IdentityKeyPair,
    no_direct: bool,
) {
    let transport = Arc::new(transport);
    let direct = node.direct.clone();
    let link: RelayLink = Arc::default();
    let relay_task = relay.map(|relay| {
        let (transport, node, link) = (transport.clone(), node.clone(), link.clone());
        smol::spawn(keep_relay(transport, node, link, relay, signer, no_direct))
    });
    let acceptor = smol::spawn({
        let (transport, direct, node) = (transport.clone(), direct.clone(), node.clone());
        async move {
            while let Some(handshake) = transport.accept().await {
                let (direct, node) = (direct.clone(), node.clone());
                smol::spawn(async move {
                    match handshake.await {
                        Ok(conn) => direct.adopt(conn, Direction::Incoming, &node),
                        // Refusals have their own rate-limited lines.
                        Err(e) if e.is_refusal() => log::debug!("incoming connection refused: {e}"),
                        Err(e) => log::info!("incoming connection failed: {e}"),
                    }
                })
                .detach();
            }
        }
    });
    while let Ok(msg) = rx.recv().await {
        match msg {
            NetMsg::Stop => break,
            NetMsg::Lookup(peer) => {
                if node.directory.get(&peer).is_some() {
                    node.input(Input::PeerRecord(peer));
                } else {
                    let (conn, frame) = match link
                        .lock()
                        .ok()
                        .and_then(|mut l| l.as_mut().map(|(conn, client)| (conn.clone(), client.lookup(peer))))
                    {
                        Some(pair) => pair,
                        None => {
                            node.input(Input::LookupFailed(peer));
                            continue;
                        }
                    };
                    smol::spawn(async move {
                        if let Err(e) = conn.send(&frame.encode()).await {
                            log::info!("lookup through the relay failed: {e}");
                        }
                    })
                    .detach();
                }
            }
            NetMsg::Transmit(transmit) => {
                let (transport, direct, node, link) = (transport.clone(), direct.clone(), node.clone(), link.clone());
                // No direct address: through the relay, whose answer
                // (forwarded, held or refused) becomes the result.
                if node.directory.get(&transmit.peer).is_none() && forward_via_relay(&link, &transmit) {
                    continue;
                }
                smol::spawn(async move {
                    let outcome = direct.deliver(&transport, &node, &transmit).await;
                    // The direct path failed (the peer went away, or its
                    // address no longer answers): the relay forwards it,
                    // or holds it in the peer's mailbox, rather than the
                    // message waiting for a direct path that may not come
                    // back while we are online.
                    if let TransmitOutcome::Failed(why) = &outcome {
                        if forward_via_relay(&link, &transmit) {
                            log::info!("direct delivery to {} failed ({why}); sent through the relay", transmit.peer);
                            return;
                        }
                    }
                    node.input(Input::TransmitResult { id: transmit.id, outcome });
                })
                .detach();
            }
        }
    }
    drop(acceptor);
    drop(relay_task);
    transport.shutdown().await;
}

/// The connection to the relay and its client state, while connected.
type RelayLink = Arc<Mutex<Option<(PeerConnection, RelayClient)>>>;

/// Sends `transmit` through the relay, if connected to one; its answer
/// (forwarded, held or refused) becomes the transmit's result. A send that
/// fails closes the connection, whose loss fails the transmits in flight.
fn forward_via_relay(link: &RelayLink, transmit: &Transmit) -> bool {
    let relayed = link
        .lock()
        .ok()
        .and_then(|mut l| l.as_mut().map(|(conn, client)| (conn.clone(), client.forward(transmit.clone()))));
    let Some((conn, frame)) = relayed else { return false };
    smol::spawn(async move {
        if let Err(e) = conn.send(&frame.encode()).await {
            log::info!("forwarding through the relay failed: {e}");
            conn.close();
        }
    })
    .detach();
    true
}

/// Keeps a connection to the relay: registers, publishes this node's record
/// (its direct address, unless `--no-direct`), and carries frames both ways;
/// reconnects with backoff (1 s doubling to 30 s).
async fn keep_relay(
    transport: Arc<Transport>,
    node: NodeHandle,
    link: RelayLink,
    relay: crate::config::RelayAddress,
    signer: p2pchat_protocol::IdentityKeyPair,
    no_direct: bool,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        match transport.dial(relay.addr, relay.peer).await {
            Ok(conn) => {
                backoff = Duration::from_secs(1);
                let mut client = RelayClient::new();
                let direct = if no_direct { Vec::new() } else { vec![node.listen.to_string()] };
                let frames = match client.publish(&signer, direct, vec![relay.to_string()], now(), RECORD_LIFETIME_MS) {
                    RelayFrame::Publish(record) => client.on_connect(record),
                    _ => Vec::new(),
                };
                let mut ok = true;
                for frame in frames {
                    if let Err(e) = conn.send(&frame.encode()).await {
                        log::warn!("registering with the relay failed: {e}");
                        ok = false;
                        break;
                    }
                }
                if ok {
                    if let Ok(mut l) = link.lock() {
                        *l = Some((conn.clone(), client));
                    }
                    node.relay_up.store(true, std::sync::atomic::Ordering::Relaxed);
                    log::info!("connected to relay {relay}");
                    serve_relay(&conn, &node, &link).await;
                    node.relay_up.store(false, std::sync::atomic::Ordering::Relaxed);
                }
                let inputs = link.lock().ok().and_then(|mut l| l.take()).map(|(_, mut c)| c.on_disconnect());
                for input in inputs.into_iter().flatten() {
                    node.input(input);
                }
                log::info!("relay connection closed; reconnecting");
            }
            Err(e) => log::info!("cannot reach relay {relay}: {e}"),
        }
        smol::Timer::after(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Frames from the relay, in order: answers and deliveries become engine
/// inputs; a mailbox entry is acknowledged only after its input committed.
async fn serve_relay(conn: &PeerConnection, node: &NodeHandle, link: &RelayLink) {
    while let Ok(frame) = conn.accept_frame().await {
        let bytes = match frame.await {
            Ok(bytes) => bytes,
            Err(e) => {
                log::info!("a frame from the relay failed: {e}");
                continue;
            }
        };
        let actions = match link.lock().ok().and_then(|mut l| l.as_mut().map(|(_, c)| c.on_frame(now(), &bytes))) {
            Some(Ok(actions)) => actions,
            Some(Err(e)) => {
                log::warn!("the relay sent a frame that does not decode: {e}");
                continue;
            }
            None => return,
        };
        // An acknowledgement follows its input only if that input committed:
        // otherwise the relay keeps the entry and sends it again.
        let mut committed = true;
        for action in actions {
            match action {
                ClientAction::ToEngine(input) => committed = node.input_committed(input).await,
                ClientAction::AfterEngine(_) if !committed => {}
                ClientAction::AfterEngine(frame) => {
                    if let Err(e) = conn.send(&frame.encode()).await {
                        log::info!("acknowledging to the relay failed: {e}");
                    }
                }
                ClientAction::Record(record) => match node.address_policy.first_permitted(&record.direct_addresses) {
                    Some(addr) => node.directory.insert(record.peer_id, addr),
                    None if !record.direct_addresses.is_empty() => log::debug!(
                        "not dialling {}: its record lists only addresses this node does not dial ({:?}; \
                         --allow-private-addresses permits private ones)",
                        record.peer_id,
                        record.direct_addresses
                    ),
                    None => {}
                },
                ClientAction::Published { .. } => {}
                ClientAction::PublishRefused { reason, .. } => {
                    log::warn!("the relay refused our record: {}", reason.as_str())
                }
            }
        }
    }
}

/// How long the records this node publishes stay valid.
const RECORD_LIFETIME_MS: u64 = 24 * 60 * 60 * 1000;
