//! The node: one chat engine and every path to its peers (direct
//! connections and relays), as a sans-IO state machine. The binary, the
//! simulator and embedders drive this same type; none of them decides
//! routes, fallbacks or batching on its own.
//!
//! # Driving rule
//!
//! 1. Hand the node what happened with [`Node::handle`] (API commands and
//!    queries with a [`Ticket`], bytes from a peer or a relay, connections
//!    up and down, dials that failed, direct sends acknowledged or failed),
//!    each with the time.
//! 2. Drain [`Node::poll_output`] until it returns `None`: dial a peer or
//!    connect to a relay, send bytes on a direct connection or to a relay,
//!    deliver events and replies. Inputs for the engine wait until this
//!    drain and then run together, in one store transaction (group commit);
//!    nothing they cause is output before that commit.
//! 3. Call [`Node::handle_timeout`] when [`Node::poll_timeout`] passes, then
//!    drain again.
//!
//! A driver keeps at most one connection attempt per relay, reports each
//! relay connection's end with [`NodeInput::RelayDisconnected`] before it
//! connects again, and hands in frames only from the current connection.
//!
//! # Routing
//!
//! Every engine transmit goes, in this order of preference: on an open
//! direct connection; after a dial of the peer's known address, if it has
//! not failed in the last [`DIRECT_RETRY_AFTER_MS`] and connects within
//! [`DIRECT_DIAL_BUDGET_MS`]; otherwise through a connected relay, which
//! forwards it to the peer or holds it in the peer's mailbox. A direct send
//! that fails goes through a relay at once. The two paths never race: a
//! transmit is on one path at a time, so the engine sees one result.

mod batch;
mod paths;
mod relays;
mod window;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

use rand_core::CryptoRngCore;

use crate::address::AddressPolicy;
use crate::engine::{
    Answer, Command, CommandOutcome, Engine, EngineConfig, EngineError, Event, Input, KeptRecord, Query, SendFailure,
    Step, Store, Transmit, TransmitId, TransmitOutcome,
};
use crate::identity::IdentityKeyPair;
use crate::ids::PeerId;
use crate::relay::{ClientAction, PeerRecord, PublishRefusal, RelayFrame, MAX_ACK_IDS};
use crate::time::Timestamp;
use crate::wire::WireError;

pub use batch::MAX_BATCH;
pub use paths::{
    AddressSource, PathState, PeerPath, RecordSource, DIRECT_DIAL_BUDGET_MS, DIRECT_RETRY_AFTER_MS,
    DIRECT_RETRY_MAX_MS, LOOKUP_INTERVAL_MS, MAX_PATHS, MAX_WAITING_FOR_DIAL,
};
pub use relays::{RelaySpec, RelayStatus, RELAY_BACKOFF_MAX_MS, RELAY_BACKOFF_MIN_MS, RELAY_STABLE_MS};
pub use window::{MAX_DIRECT_BYTES_PER_PEER, MAX_DIRECT_SENDS_PER_PEER, MAX_DIRECT_WAITING_BYTES_PER_PEER};

use batch::{After, Batch, Done};
use paths::{Dial, Paths, RecordSeen, Route};
use relays::RelayLink;
use window::{Admitted, DirectWindows};

/// How long the records this node publishes stay valid by default.
pub const RECORD_LIFETIME_MS: u64 = 24 * 60 * 60 * 1000;
/// The most relays of other peers the node connects to at once, as a
/// visitor, to reach those peers.
pub const MAX_VISITED_RELAYS: usize = 8;
/// How long a visiting link with nothing under way is kept open.
pub const VISIT_IDLE_MS: u64 = 60_000;
/// How long after a failed engine timeout the node tries it again.
const TIMEOUT_RETRY_MS: u64 = 1_000;
/// The most transmits held for a path, and their bytes (see
/// [`Node::no_path`] and [`NodeInput::RelayFrameUnsent`]): well within what a
/// driver queues for one relay, so that all of them can go at once when
/// one connects.
pub const MAX_HELD_FOR_A_PATH: usize = 4_096;
/// See [`MAX_HELD_FOR_A_PATH`].
pub const MAX_HELD_FOR_A_PATH_BYTES: usize = 4 * 1024 * 1024;
/// How often transmits held for a path are routed again while the node
/// stays cut off (a direct address may answer again).
pub const HELD_FOR_A_PATH_RETRY_MS: u64 = 60_000;

/// What a node needs besides its identity and store.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The engine's retries, backoff and retention.
    pub engine: EngineConfig,
    /// The relays to keep a connection to, in order of preference.
    pub relays: Vec<RelaySpec>,
    /// The addresses this node publishes for direct connections (none for
    /// a node that accepts no direct connections).
    pub direct_addresses: Vec<String>,
    /// Whether to publish, after those, the addresses its relays say its
    /// connections come from (for a node that takes direct connections on
    /// the socket it reaches its relays from).
    pub publish_observed: bool,
    /// Which addresses from peers' records may be dialled.
    pub address_policy: AddressPolicy,
    /// How long published records stay valid.
    pub record_lifetime_ms: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            engine: EngineConfig::default(),
            relays: Vec::new(),
            direct_addresses: Vec::new(),
            publish_observed: false,
            address_policy: AddressPolicy::default(),
            record_lifetime_ms: RECORD_LIFETIME_MS,
        }
    }
}

/// Names a command or query, for its reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

/// What happened, for the node to handle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeInput {
    /// An API command; its outcome comes back as [`NodeOutput::Reply`].
    Command {
        /// For the reply.
        ticket: Ticket,
        /// The command.
        command: Command,
    },
    /// A read, answered after the commands handed in before it.
    Query {
        /// For the reply.
        ticket: Ticket,
        /// The read.
        query: Query,
    },
    /// Bytes a peer sent on a direct connection (whose certificate proved
    /// `from`).
    DirectReceived {
        /// The peer.
        from: PeerId,
        /// The envelope.
        bytes: Vec<u8>,
    },
    /// A direct connection with the peer opened (either side dialled).
    DirectUp {
        /// The peer.
        peer: PeerId,
    },
    /// The last direct connection with the peer closed.
    DirectDown {
        /// The peer.
        peer: PeerId,
    },
    /// A dial asked for by [`NodeOutput::Dial`] failed.
    DialFailed {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// What became of a [`NodeOutput::SendDirect`]: acknowledged by the
    /// peer's transport, or failed.
    DirectSent {
        /// The send.
        id: TransmitId,
        /// Delivered, or failed with the reason.
        outcome: TransmitOutcome,
    },
    /// The connection to a relay is up (its certificate proved the relay's
    /// peer ID).
    RelayConnected {
        /// The relay's index in [`NodeConfig::relays`].
        relay: usize,
    },
    /// The connection to a relay could not be made, or closed.
    RelayDisconnected {
        /// The relay's index.
        relay: usize,
        /// Why.
        reason: String,
    },
    /// A frame from a relay.
    RelayFrame {
        /// The relay's index.
        relay: usize,
        /// The frame.
        bytes: Vec<u8>,
    },
    /// A frame for a relay that the driver could not send (its queue to
    /// the relay is full: the relay is not reading). A forward fails back
    /// to the next relay or the engine, whose outbox keeps the message; a
    /// lookup finds nothing; anything else (a registration, a mailbox
    /// acknowledgement) cannot be dropped without the connection going
    /// wrong, so it is closed and made again after the backoff.
    RelayFrameUnsent {
        /// The relay's index.
        relay: usize,
        /// The frame, as [`NodeOutput::SendToRelay`] gave it.
        bytes: Vec<u8>,
    },
    /// A peer's signed record from elsewhere than a relay (the user, a
    /// contact card), checked like any other: its direct addresses and
    /// relays are used as if a relay had answered with it.
    PeerRecord {
        /// The record.
        record: PeerRecord,
    },
    /// Where a peer can be reached directly, from the user or the driver
    /// (trusted as given: no address policy applies).
    PeerAddress {
        /// The peer.
        peer: PeerId,
        /// Its address.
        addr: SocketAddr,
    },
}

/// The answer to a command or query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A command's outcome.
    Command(Result<CommandOutcome, EngineError>),
    /// A query's answer.
    Query(Result<Answer, EngineError>),
}

/// Something the node reports for the driver's log (or the simulator's
/// checker): never needed for delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// An engine input failed even on its own; nothing of it took effect.
    InputFailed(EngineError),
    /// A relay refused this node's record.
    PublishRefused {
        /// The relay's index.
        relay: usize,
        /// Why.
        reason: PublishRefusal,
    },
    /// A relay sent a frame that does not decode.
    BadRelayFrame {
        /// The relay's index.
        relay: usize,
        /// Why.
        error: WireError,
    },
    /// A direct transmit failed and went through a relay instead.
    DirectFellBack {
        /// The peer.
        peer: PeerId,
        /// Why the direct path failed.
        reason: SendFailure,
    },
    /// A record handed in did not check out.
    RecordRefused {
        /// Whose it claims to be.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// A peer's record lists only addresses this node may not dial.
    AddressNotPermitted {
        /// The peer.
        peer: PeerId,
        /// What its record lists.
        addresses: Vec<String>,
    },
    /// A relay said this node's connection comes from an address no one
    /// could dial (or one that is not an address): not published.
    ObservedAddressRefused {
        /// The relay's index.
        relay: usize,
        /// What it said.
        address: String,
    },
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeOutput {
    /// Dial the peer at this address; report [`NodeInput::DirectUp`] or
    /// [`NodeInput::DialFailed`].
    Dial {
        /// The peer the connection must prove.
        peer: PeerId,
        /// Where.
        addr: SocketAddr,
    },
    /// Send these bytes on the open direct connection with the peer;
    /// report [`NodeInput::DirectSent`].
    SendDirect {
        /// The peer.
        peer: PeerId,
        /// For the result.
        id: TransmitId,
        /// The envelope.
        bytes: Vec<u8>,
    },
    /// Connect to this relay; report [`NodeInput::RelayConnected`] or
    /// [`NodeInput::RelayDisconnected`].
    ConnectRelay {
        /// The relay's index, which later inputs about it name.
        relay: usize,
        /// The relay: one of the node's own, or one a peer's record lists.
        spec: RelaySpec,
    },
    /// Close the current connection to this relay (it left a request
    /// unanswered); report [`NodeInput::RelayDisconnected`] when it is
    /// closed.
    CloseRelay {
        /// The relay's index.
        relay: usize,
    },
    /// Send this frame to the relay on its current connection.
    SendToRelay {
        /// The relay's index.
        relay: usize,
        /// The encoded frame.
        bytes: Vec<u8>,
    },
    /// An event for subscribers (committed).
    Event(Event),
    /// The reply to a command or query.
    Reply {
        /// Its ticket.
        ticket: Ticket,
        /// The reply.
        reply: Reply,
    },
    /// For the log.
    Notice(Notice),
}

/// A chat node: the engine, its relays and its direct paths.
pub struct Node<S: Store> {
    engine: Engine<S>,
    signer: IdentityKeyPair,
    config: NodeConfig,
    batch: Batch,
    queries: Vec<(Ticket, Query)>,
    timeout_queued: bool,
    timeout_retry_at: Option<Timestamp>,
    paths: Paths,
    relays: Vec<RelayLink>,
    /// Direct sends not yet acknowledged, kept for the relay fallback, and
    /// those waiting for room in their peer's window.
    direct: DirectWindows,
    /// Forwards no relay has answered yet, with the relays tried, kept to
    /// try the next relay.
    relay_in_flight: BTreeMap<TransmitId, (Transmit, Vec<PeerId>)>,
    /// Transmits that found no path while the node is cut off from every
    /// relay of its own, or whose relay's queue was full, with their bytes,
    /// and when they are next routed.
    held_for_a_path: VecDeque<Transmit>,
    held_bytes: usize,
    held_retry_at: Option<Timestamp>,
    outputs: VecDeque<NodeOutput>,
}

impl<S: Store> core::fmt::Debug for Node<S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Node").field("peer", &self.engine.peer_id()).finish_non_exhaustive()
    }
}

impl<S: Store> Node<S> {
    /// A node over `store`; `rng` must be freshly seeded on every start (see
    /// [`Engine::new`]). The first outputs connect to every relay.
    pub fn new(
        identity: IdentityKeyPair,
        store: S,
        config: NodeConfig,
        rng: impl CryptoRngCore + Send + 'static,
        now: Timestamp,
    ) -> Result<Self, EngineError> {
        let signer = IdentityKeyPair::from_seed(&identity.seed());
        let engine = Engine::new(identity, store, config.engine.clone(), rng, now)?;
        let relays = config.relays.iter().map(|spec| RelayLink::new(spec.clone(), now)).collect();
        let mut node = Self {
            engine,
            signer,
            config,
            batch: Batch::default(),
            queries: Vec::new(),
            timeout_queued: false,
            timeout_retry_at: None,
            paths: Paths::default(),
            relays,
            direct: DirectWindows::default(),
            relay_in_flight: BTreeMap::new(),
            held_for_a_path: VecDeque::new(),
            held_bytes: 0,
            held_retry_at: None,
            outputs: VecDeque::new(),
        };
        node.load_kept_records(now)?;
        node.connect_due_relays(now);
        Ok(node)
    }

    /// This node's peer ID.
    pub fn peer_id(&self) -> PeerId {
        self.engine.peer_id()
    }

    /// The engine (for reads of its store).
    pub fn engine(&self) -> &Engine<S> {
        &self.engine
    }

    /// The engine, mutably (for read transactions on its store).
    pub fn engine_mut(&mut self) -> &mut Engine<S> {
        &mut self.engine
    }

    /// This node's record as it publishes it now, valid for the configured
    /// lifetime: for someone who shares none of its relays to reach it.
    pub fn own_record(&self, now: Timestamp) -> PeerRecord {
        let relays = self.config.relays.iter().map(|r| r.address.clone()).collect();
        let expires_at = now.saturating_add_millis(self.config.record_lifetime_ms);
        PeerRecord::sign(&self.signer, self.published_addresses(), relays, now, expires_at, now.as_millis())
    }

    /// The direct addresses this node publishes: those configured, then
    /// each distinct address its own relays observed, up to what a record
    /// may list.
    pub fn published_addresses(&self) -> Vec<String> {
        let mut addresses = self.config.direct_addresses.clone();
        if self.config.publish_observed {
            let observed = self.relays.iter().filter(|l| !l.visiting).filter_map(|l| l.observed);
            for address in observed.map(|a| a.to_string()) {
                if !addresses.contains(&address) {
                    addresses.push(address);
                }
            }
        }
        addresses.truncate(crate::relay::MAX_ADDRESSES);
        addresses
    }

    /// Each relay's connection.
    pub fn relays(&self) -> Vec<RelayStatus> {
        self.relays.iter().map(RelayLink::status).collect()
    }

    /// Every peer the node has a path for.
    pub fn peers(&self, now: Timestamp) -> Vec<PeerPath> {
        self.paths.view(now)
    }

    /// Handles what happened. Engine work waits for the next
    /// [`Node::poll_output`].
    pub fn handle(&mut self, now: Timestamp, input: NodeInput) {
        match input {
            NodeInput::Command { ticket, command } => self.batch.push(Step::Command(command), After::Reply(ticket)),
            NodeInput::Query { ticket, query } => self.queries.push((ticket, query)),
            NodeInput::DirectReceived { from, bytes } => self.for_engine(Input::Received { from, bytes }),
            NodeInput::DirectUp { peer } => self.direct_up(now, peer),
            NodeInput::DirectDown { peer } => {
                let Some(path) = self.paths.get_mut(&peer) else { return };
                if path.connected {
                    path.connected = false;
                    self.for_engine(Input::PeerUnreachable(peer));
                }
                self.release_direct(now, peer);
            }
            NodeInput::DialFailed { peer, reason } => self.dial_failed(now, peer, reason),
            NodeInput::DirectSent { id, outcome } => {
                let Some(transmit) = self.direct.finish(id) else { return };
                let peer = transmit.peer;
                match outcome {
                    TransmitOutcome::Failed(reason) => self.fall_back(now, transmit, reason),
                    outcome => self.for_engine(Input::TransmitResult { id, outcome }),
                }
                self.release_direct(now, peer);
            }
            NodeInput::RelayConnected { relay } => self.relay_connected(now, relay),
            NodeInput::RelayDisconnected { relay, reason } => self.relay_disconnected(now, relay, reason),
            NodeInput::RelayFrame { relay, bytes } => self.relay_frame(now, relay, &bytes),
            NodeInput::RelayFrameUnsent { relay, bytes } => self.relay_frame_unsent(now, relay, &bytes),
            NodeInput::PeerRecord { record } => match record.verify(now, None) {
                Ok(()) => self.learn_record(now, RecordSource::HandedIn, record),
                Err(error) => {
                    let notice = Notice::RecordRefused { peer: record.peer_id, reason: error.to_string() };
                    self.outputs.push_back(NodeOutput::Notice(notice));
                }
            },
            NodeInput::PeerAddress { peer, addr } => {
                let path = self.paths.entry(peer, now);
                path.address = Some(addr);
                path.source = Some(AddressSource::Given);
                path.failed_until = None;
                path.failures = 0;
            }
        }
    }

    /// When to call [`Node::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let engine = self.engine.poll_timeout().map(|t| self.timeout_retry_at.map_or(t, |r| t.max(r)));
        let relays = self.relays.iter().filter_map(RelayLink::next_deadline);
        [engine, self.paths.next_deadline(), self.held_retry_at].into_iter().flatten().chain(relays).min()
    }

    /// Handles every deadline that passed: dials over their budget, relays
    /// due for another attempt, the engine's timeout.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        for peer in self.paths.overdue(now) {
            let reason = format!("no direct connection within {DIRECT_DIAL_BUDGET_MS} ms");
            self.dial_failed(now, peer, reason);
        }
        self.connect_due_relays(now);
        self.republish_due(now);
        self.close_idle_visits(now);
        if self.held_retry_at.is_some_and(|at| at <= now) {
            self.route_held(now);
        }
        // Requests a relay left unanswered on a connection still up: an
        // unanswered forward means the relay is gone or lost a frame.
        for relay in 0..self.relays.len() {
            if !self.relays[relay].is_up() {
                continue;
            }
            let unregistered = self.relays[relay].client.registration_overdue(now);
            let expired = self.relays[relay].client.expire(now);
            if unregistered || expired.iter().any(|i| matches!(i, Input::TransmitResult { .. })) {
                self.relay_unresponsive(now, relay, "the relay did not answer in time");
            }
            self.relay_gave_back(now, expired);
        }
        let due = self.engine.poll_timeout().is_some_and(|t| t <= now);
        if due && !self.timeout_queued && self.timeout_retry_at.is_none_or(|r| r <= now) {
            self.timeout_queued = true;
            self.batch.push(Step::Input(Input::Timeout), After::Timeout);
        }
    }

    /// The next thing to do, running the waiting engine work (one
    /// transaction) first if there is nothing else.
    pub fn poll_output(&mut self, now: Timestamp) -> Option<NodeOutput> {
        loop {
            if let Some(output) = self.outputs.pop_front() {
                return Some(output);
            }
            if self.batch.is_empty() && self.queries.is_empty() {
                return None;
            }
            self.process(now);
        }
    }

    /// Runs the waiting engine work as one transaction, then routes what it
    /// released.
    fn process(&mut self, now: Timestamp) {
        let batch = core::mem::take(&mut self.batch);
        self.timeout_queued = false;
        let mut done = Vec::new();
        batch.run(&mut self.engine, now, &mut done);
        let mut acks: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for item in done {
            match item {
                Done::Reply(ticket, result) => {
                    self.outputs.push_back(NodeOutput::Reply { ticket, reply: Reply::Command(result) })
                }
                // Acknowledgements travel together: one frame per relay.
                Done::Send { relay, frame } => match *frame {
                    RelayFrame::MailboxAck { ids } => acks.entry(relay).or_default().extend(ids),
                    frame => self.send_to_relay(relay, &frame),
                },
                Done::InputFailed { timeout, error } => {
                    if timeout {
                        self.timeout_retry_at = Some(now.saturating_add_millis(TIMEOUT_RETRY_MS));
                    }
                    self.outputs.push_back(NodeOutput::Notice(Notice::InputFailed(error)));
                }
            }
        }
        if self.engine.poll_timeout().is_none_or(|t| t > now) {
            self.timeout_retry_at = None;
        }
        for (relay, ids) in acks {
            for chunk in ids.chunks(MAX_ACK_IDS) {
                self.send_to_relay(relay, &RelayFrame::MailboxAck { ids: chunk.to_vec() });
            }
        }
        for (ticket, query) in core::mem::take(&mut self.queries) {
            let reply = Reply::Query(self.engine.query(query));
            self.outputs.push_back(NodeOutput::Reply { ticket, reply });
        }
        self.drain_engine(now);
    }

    fn drain_engine(&mut self, now: Timestamp) {
        while let Some(event) = self.engine.poll_event() {
            self.outputs.push_back(NodeOutput::Event(event));
        }
        while let Some(peer) = self.engine.poll_lookup() {
            self.look_up(now, peer);
        }
        while let Some(transmit) = self.engine.poll_transmit() {
            self.route(now, transmit);
        }
    }

    fn for_engine(&mut self, input: Input) {
        self.batch.push(Step::Input(input), After::Nothing);
    }

    // ---- routing ----

    /// Sends a transmit on the path the routing table chooses.
    fn route(&mut self, now: Timestamp, transmit: Transmit) {
        let peer = transmit.peer;
        match self.paths.route(&peer, now) {
            Route::Direct => self.send_direct(now, transmit),
            Route::WaitForDial => {
                if let Some(dial) = self.paths.entry(peer, now).dial.as_mut() {
                    dial.waiting.push(transmit);
                }
            }
            Route::Dial(addr) => {
                let deadline = now.saturating_add_millis(DIRECT_DIAL_BUDGET_MS);
                self.paths.entry(peer, now).dial = Some(Dial { deadline, waiting: vec![transmit] });
                self.outputs.push_back(NodeOutput::Dial { peer, addr });
            }
            Route::Relay => self.via_relay(now, transmit, SendFailure::NoPath),
        }
    }

    /// On the open connection, once the peer's window has room; if too
    /// much waits for that already, through a relay at once, as when a
    /// direct send fails (nothing is dropped, and nothing waits 30 s).
    fn send_direct(&mut self, now: Timestamp, transmit: Transmit) {
        let (id, peer) = (transmit.id, transmit.peer);
        match self.direct.admit(transmit) {
            Admitted::Started(bytes) => self.outputs.push_back(NodeOutput::SendDirect { peer, id, bytes }),
            Admitted::Waiting => {}
            Admitted::Full(transmit) => {
                self.fall_back(now, transmit, SendFailure::PeerSlow);
            }
        }
    }

    /// What waits in `peer`'s window: started as room frees while the
    /// connection is open, routed another way once it closed.
    fn release_direct(&mut self, now: Timestamp, peer: PeerId) {
        if self.paths.get(&peer).is_some_and(|p| p.connected) {
            while let Some((id, bytes)) = self.direct.start_next(&peer) {
                self.outputs.push_back(NodeOutput::SendDirect { peer, id, bytes });
            }
        } else {
            for transmit in self.direct.take_waiting(&peer) {
                self.route(now, transmit);
            }
        }
    }

    /// Through the first connected relay (which forwards it, or holds it in
    /// the peer's mailbox if the transmit allows), or, with none connected,
    /// failed for now with `reason` (the engine tries again later).
    fn via_relay(&mut self, now: Timestamp, transmit: Transmit, reason: SendFailure) {
        let peer = transmit.peer;
        if !self.try_next_relay(now, transmit.clone(), Vec::new()) {
            return self.no_path(now, transmit, reason);
        }
        // A peer reached only through relays may have published a direct
        // address since, or moved from the one its record gave that now
        // fails: ask now and then, of a relay of ours.
        let Some(index) = self.relays.iter().position(|l| l.is_up() && !l.visiting) else { return };
        let path = self.paths.entry(peer, now);
        let stale = match path.source {
            None => true,
            Some(AddressSource::Record { .. }) => path.failed_until.is_some_and(|until| until > now),
            Some(AddressSource::Given) => false,
        };
        if stale && path.last_lookup.is_none_or(|t| now.millis_since(t) >= LOOKUP_INTERVAL_MS) {
            path.last_lookup = Some(now);
            let frame = self.relays[index].client.lookup(now, peer);
            self.send_to_relay(index, &frame);
        }
    }

    /// Sends a forward on through the best relay not yet tried (relays
    /// are told apart by peer ID, whatever address names them), in this
    /// order: one the peer's record lists that is connected; one it lists
    /// that the node connects to now, as a visitor (the transmit waits for
    /// the connection; a relay that failed is not dialled again before its
    /// backoff); any other connected relay of the node's own. Each relay is
    /// tried at most once per transmit. False if none is left.
    fn try_next_relay(&mut self, now: Timestamp, transmit: Transmit, tried: Vec<PeerId>) -> bool {
        let listed: Vec<RelaySpec> = self.paths.get(&transmit.peer).map(|p| p.relays.clone()).unwrap_or_default();
        let index_of = |links: &[RelayLink], spec: &RelaySpec| links.iter().position(|l| l.spec.peer == spec.peer);
        let listed_up = listed
            .iter()
            .filter(|spec| !tried.contains(&spec.peer))
            .filter_map(|spec| index_of(&self.relays, spec))
            .find(|r| self.relays[*r].is_up());
        if let Some(relay) = listed_up {
            self.forward_via(now, relay, transmit, tried);
            return true;
        }
        for spec in listed.iter().filter(|spec| !tried.contains(&spec.peer)) {
            let relay = match index_of(&self.relays, spec) {
                Some(r) if self.relays[r].is_connecting() => r,
                Some(r) if self.relays[r].reusable() && self.relays[r].retry_due(now) => {
                    self.relays[r].state = relays::LinkState::Connecting;
                    self.outputs.push_back(NodeOutput::ConnectRelay { relay: r, spec: spec.clone() });
                    r
                }
                Some(_) => continue,
                None => match self.visit(now, spec.clone()) {
                    Some(r) => r,
                    None => continue,
                },
            };
            if self.relays[relay].waiting.len() < MAX_WAITING_FOR_DIAL {
                self.relays[relay].waiting.push((transmit, tried));
                return true;
            }
        }
        let own = (0..self.relays.len()).find(|r| {
            let link = &self.relays[*r];
            !link.visiting && link.is_up() && !tried.contains(&link.spec.peer)
        });
        match own {
            Some(relay) => {
                self.forward_via(now, relay, transmit, tried);
                true
            }
            None => false,
        }
    }

    /// A transmit with nowhere to go. While the node is cut off from every
    /// relay of its own (offline, most likely), one that may wait in a
    /// mailbox is held here, within [`MAX_HELD_FOR_A_PATH`] and
    /// [`MAX_HELD_FOR_A_PATH_BYTES`], and routed again, the same bytes, when
    /// a relay of its own connects, a direct connection opens, or every
    /// [`HELD_FOR_A_PATH_RETRY_MS`]. Failed back, the engine would seal
    /// the message again for every retry, each time with a new message
    /// key: a node offline for a day would move its sending chains
    /// thousands of keys ahead, past what a receiver may skip. Anything
    /// else fails back to the engine, which retries later.
    fn no_path(&mut self, now: Timestamp, transmit: Transmit, reason: SendFailure) {
        let cut_off = !self.config.relays.is_empty() && !self.relays.iter().any(|l| !l.visiting && l.is_up());
        if cut_off {
            self.hold_for_a_path(now, transmit, reason);
        } else {
            let outcome = TransmitOutcome::Failed(reason);
            self.for_engine(Input::TransmitResult { id: transmit.id, outcome });
        }
    }

    /// Holds a transmit that may wait in a mailbox until a path may take
    /// it (see [`Node::no_path`]); one that may not, or does not fit, fails
    /// back to the engine.
    fn hold_for_a_path(&mut self, now: Timestamp, transmit: Transmit, reason: SendFailure) {
        let fits = self.held_for_a_path.len() < MAX_HELD_FOR_A_PATH
            && self.held_bytes.saturating_add(transmit.bytes.len()) <= MAX_HELD_FOR_A_PATH_BYTES;
        if transmit.mailbox_allowed && fits {
            self.held_bytes += transmit.bytes.len();
            self.held_for_a_path.push_back(transmit);
            self.held_retry_at.get_or_insert(now.saturating_add_millis(HELD_FOR_A_PATH_RETRY_MS));
            return;
        }
        let outcome = TransmitOutcome::Failed(reason);
        self.for_engine(Input::TransmitResult { id: transmit.id, outcome });
    }

    /// Routes every transmit held for a path again.
    fn route_held(&mut self, now: Timestamp) {
        self.held_retry_at = None;
        self.held_bytes = 0;
        for transmit in core::mem::take(&mut self.held_for_a_path) {
            self.route(now, transmit);
        }
    }

    /// Opens a visiting link to a peer's relay (reusing the least recently
    /// used idle one when [`MAX_VISITED_RELAYS`] are open); its index, or
    /// `None` if all are busy.
    fn visit(&mut self, now: Timestamp, spec: RelaySpec) -> Option<usize> {
        let visiting = self.relays.iter().filter(|l| l.visiting).count();
        let relay = if visiting < MAX_VISITED_RELAYS {
            self.relays.push(RelayLink::visiting(spec.clone(), now));
            self.relays.len() - 1
        } else {
            let (r, _) =
                self.relays.iter().enumerate().filter(|(_, l)| l.reusable()).min_by_key(|(_, l)| l.last_used)?;
            self.relays[r] = RelayLink::visiting(spec.clone(), now);
            r
        };
        self.outputs.push_back(NodeOutput::ConnectRelay { relay, spec });
        Some(relay)
    }

    /// Forwards through relay `relay`, remembering the transmit (and the
    /// relays already tried) until the relay answers.
    fn forward_via(&mut self, now: Timestamp, relay: usize, transmit: Transmit, mut tried: Vec<PeerId>) {
        let link = &mut self.relays[relay];
        let frame = link.client.forward(now, transmit.clone());
        link.last_used = now;
        tried.push(link.spec.peer);
        self.send_to_relay(relay, &frame);
        self.paths.entry(transmit.peer, now).relayed_via = Some(relay);
        self.relay_in_flight.insert(transmit.id, (transmit, tried));
    }

    /// A direct send failed: the relay path takes it at once, so a peer that
    /// went away gets it from its mailbox.
    fn fall_back(&mut self, now: Timestamp, transmit: Transmit, reason: SendFailure) {
        if self.relays.iter().any(RelayLink::is_up) {
            let peer = transmit.peer;
            self.outputs.push_back(NodeOutput::Notice(Notice::DirectFellBack { peer, reason: reason.clone() }));
        }
        self.via_relay(now, transmit, reason);
    }

    fn direct_up(&mut self, now: Timestamp, peer: PeerId) {
        let path = self.paths.entry(peer, now);
        let was_connected = path.connected;
        path.connected = true;
        path.failed_until = None;
        path.last_failure = None;
        // Our own dial of the address worked: it is good again. (A peer
        // that dials us says nothing of whether we can dial it.)
        if path.dial.is_some() {
            path.failures = 0;
        }
        let waiting = path.dial.take().map(|d| d.waiting).unwrap_or_default();
        for transmit in waiting {
            self.send_direct(now, transmit);
        }
        if self.held_for_a_path.iter().any(|t| t.peer == peer) {
            self.route_held(now);
        }
        if !was_connected {
            // The engine sends what waits for this peer at once.
            self.for_engine(Input::PeerReachable(peer));
        }
    }

    fn dial_failed(&mut self, now: Timestamp, peer: PeerId, reason: String) {
        // A peer the node has no path for was never dialled by it.
        let Some(path) = self.paths.get_mut(&peer) else { return };
        if path.connected {
            return; // the peer dialled us meanwhile
        }
        // The node's own budget ends a dial before the driver gives up on
        // it; the driver's word on the same dial, later, counts no second
        // failure.
        if path.dial.is_none() && path.failed_until.is_some_and(|until| until > now) {
            path.last_failure = Some(reason);
            return;
        }
        path.failures = path.failures.saturating_add(1);
        let wait = DIRECT_RETRY_AFTER_MS.saturating_mul(1 << (path.failures - 1).min(10)).min(DIRECT_RETRY_MAX_MS);
        path.failed_until = Some(now.saturating_add_millis(wait));
        path.last_failure = Some(reason.clone());
        let waiting = path.dial.take().map(|d| d.waiting).unwrap_or_default();
        for transmit in waiting {
            self.fall_back(now, transmit, SendFailure::DialFailed(reason.clone()));
        }
    }

    /// An engine lookup: answered at once for a peer with a path that
    /// works (a connection, an address that has not failed, or relays its
    /// record lists), else asked of the first connected relay of ours.
    fn look_up(&mut self, now: Timestamp, peer: PeerId) {
        let known = self.paths.get(&peer).is_some_and(|p| {
            let address_works = p.address.is_some() && p.failed_until.is_none_or(|until| until <= now);
            p.connected || address_works || !p.relays.is_empty()
        });
        if known {
            return self.for_engine(Input::PeerRecord(peer));
        }
        let Some(index) = self.relays.iter().position(|l| l.is_up() && !l.visiting) else {
            return self.for_engine(Input::LookupFailed(peer));
        };
        self.paths.entry(peer, now).last_lookup = Some(now);
        let frame = self.relays[index].client.lookup(now, peer);
        self.send_to_relay(index, &frame);
    }

    /// A verified record: used at once, and kept across restarts when it
    /// replaces the one seen before.
    fn learn_record(&mut self, now: Timestamp, source: RecordSource, record: PeerRecord) {
        let seen = self.paths.get(&record.peer_id).and_then(|p| p.record);
        let new = seen.is_none_or(|seen| seen.sequence != record.sequence && seen.replaced_by(record.sequence, now));
        let kept = new.then(|| KeptRecord { peer: record.peer_id, seen_at: now, record: record.encode() });
        self.use_record(now, source, record);
        if let Some(kept) = kept {
            self.for_engine(Input::KeepRecord(kept));
        }
    }

    /// The records kept before a restart, each checked again (a store is
    /// not trusted to vouch for a signature). Expired ones are used too: the
    /// peer most likely still uses the relays they list.
    fn load_kept_records(&mut self, now: Timestamp) -> Result<(), EngineError> {
        let store = self.engine.store_mut();
        store.begin()?;
        let kept = store.kept_records();
        store.rollback();
        for kept in kept? {
            match PeerRecord::decode(&kept.record) {
                Ok(record) if record.peer_id == kept.peer && record.verify_signature().is_ok() => {
                    self.use_record(now, RecordSource::Kept, record);
                }
                _ => {
                    let notice =
                        Notice::RecordRefused { peer: kept.peer, reason: "the kept record does not verify".into() };
                    self.outputs.push_back(NodeOutput::Notice(notice));
                }
            }
        }
        Ok(())
    }

    /// A verified record: its relays and its first dialable address become
    /// the peer's, unless it is older than the one seen and that one has
    /// not expired (a stale answer, an old card).
    fn use_record(&mut self, now: Timestamp, source: RecordSource, record: PeerRecord) {
        let policy = self.config.address_policy;
        let relays: Vec<RelaySpec> =
            record.relay_addresses.iter().filter_map(|a| RelaySpec::parse(a, policy)).collect();
        let path = self.paths.entry(record.peer_id, now);
        if path.record.is_some_and(|seen| !seen.replaced_by(record.sequence, now)) {
            return;
        }
        path.record = Some(RecordSeen { sequence: record.sequence, expires_at: record.expires_at, source });
        path.relays = relays;
        let permitted = policy.first_permitted(&record.direct_addresses);
        if permitted.is_none() && !record.direct_addresses.is_empty() {
            let notice = Notice::AddressNotPermitted { peer: record.peer_id, addresses: record.direct_addresses };
            self.outputs.push_back(NodeOutput::Notice(notice));
            return;
        }
        if path.source == Some(AddressSource::Given) {
            return; // what the user said wins over what a record says
        }
        if path.address != permitted {
            path.failed_until = None;
            path.failures = 0;
        }
        path.address = permitted;
        let relay = match source {
            RecordSource::Relay(relay) => Some(relay),
            RecordSource::HandedIn | RecordSource::Kept => None,
        };
        path.source = permitted.map(|_| AddressSource::Record { relay });
    }

    // ---- relays ----

    fn connect_due_relays(&mut self, now: Timestamp) {
        for (relay, link) in self.relays.iter_mut().enumerate() {
            if link.start_if_due(now) {
                self.outputs.push_back(NodeOutput::ConnectRelay { relay, spec: link.spec.clone() });
            }
        }
    }

    fn send_to_relay(&mut self, relay: usize, frame: &RelayFrame) {
        self.outputs.push_back(NodeOutput::SendToRelay { relay, bytes: frame.encode() });
    }

    /// Registers (which brings the mailbox) and publishes this node's
    /// record, listing every relay it uses.
    fn relay_connected(&mut self, now: Timestamp, relay: usize) {
        let Some(link) = self.relays.get_mut(relay) else { return };
        if link.visiting {
            // A visitor sends only what it came for.
            link.connected(now);
            for (transmit, tried) in core::mem::take(&mut link.waiting) {
                self.forward_via(now, relay, transmit, tried);
            }
            return;
        }
        let Some(record) = self.sign_record(now, relay) else { return };
        let Some(link) = self.relays.get_mut(relay) else { return };
        link.connected(now);
        let frames = link.client.on_connect(now, record);
        let waiting = core::mem::take(&mut link.waiting);
        for frame in frames {
            self.send_to_relay(relay, &frame);
        }
        // What waited for this connection follows the registration, then
        // what waited for any path at all.
        for (transmit, tried) in waiting {
            self.forward_via(now, relay, transmit, tried);
        }
        self.route_held(now);
    }

    /// A freshly signed record of this node for relay `relay`'s client, and
    /// when to publish the next: halfway through its lifetime, so a node
    /// connected for days never leaves an expired record behind.
    fn sign_record(&mut self, now: Timestamp, relay: usize) -> Option<PeerRecord> {
        let relay_addresses: Vec<String> = self.config.relays.iter().map(|r| r.address.clone()).collect();
        let direct = self.published_addresses();
        let lifetime = self.config.record_lifetime_ms;
        let link = self.relays.get_mut(relay)?;
        link.republish_at = Some(now.saturating_add_millis((lifetime / 2).max(1)));
        match link.client.publish(&self.signer, direct, relay_addresses, now, lifetime) {
            RelayFrame::Publish(record) => Some(record),
            _ => None,
        }
    }

    /// Closes visiting links with nothing under way for
    /// [`VISIT_IDLE_MS`]: they were opened for a purpose, not to be kept.
    fn close_idle_visits(&mut self, now: Timestamp) {
        for relay in 0..self.relays.len() {
            if self.relays[relay].idle_visit_until().is_some_and(|until| until <= now) {
                self.relays[relay].closing("no longer needed");
                self.outputs.push_back(NodeOutput::CloseRelay { relay });
            }
        }
    }

    /// Publishes this node's record again to every connected relay whose
    /// copy is halfway through its lifetime.
    fn republish_due(&mut self, now: Timestamp) {
        let due: Vec<usize> = (0..self.relays.len())
            .filter(|&r| self.relays[r].is_up() && self.relays[r].republish_at.is_some_and(|at| at <= now))
            .collect();
        for relay in due {
            if let Some(record) = self.sign_record(now, relay) {
                self.send_to_relay(relay, &RelayFrame::Publish(record));
            }
        }
    }

    /// Every forward the relay had not answered failed (the engine tries
    /// again), every lookup found nothing; the relay is tried again after
    /// its backoff.
    fn relay_disconnected(&mut self, now: Timestamp, relay: usize, reason: String) {
        let Some(link) = self.relays.get_mut(relay) else { return };
        let inputs = link.client.on_disconnect();
        let waiting = core::mem::take(&mut link.waiting);
        link.disconnected(now, reason.clone());
        self.relay_gave_back(now, inputs);
        let relay_peer = self.relays[relay].spec.peer;
        for (transmit, mut tried) in waiting {
            tried.push(relay_peer);
            if !self.try_next_relay(now, transmit.clone(), tried) {
                self.no_path(now, transmit, SendFailure::RelayUnreachable(reason.clone()));
            }
        }
    }

    /// What a relay gave back unanswered or refused: a forward goes through
    /// the next connected relay it has not tried, so a sender tries each of
    /// its relays in turn; with none left, the engine hears it failed and
    /// retries later. Anything else goes to the engine.
    fn relay_gave_back(&mut self, now: Timestamp, inputs: Vec<Input>) {
        for input in inputs {
            let Input::TransmitResult { id, outcome: TransmitOutcome::Failed(reason) } = input else {
                self.for_engine(input);
                continue;
            };
            let Some((transmit, tried)) = self.relay_in_flight.remove(&id) else {
                self.for_engine(Input::TransmitResult { id, outcome: TransmitOutcome::Failed(reason) });
                continue;
            };
            if !self.try_next_relay(now, transmit.clone(), tried) {
                self.no_path(now, transmit, reason);
            }
        }
    }

    /// A relay left a forward unanswered on a connection that is still up:
    /// it is unresponsive, or a frame was lost. The connection is closed
    /// (the node reconnects after its backoff), and what it held goes
    /// through another relay.
    fn relay_unresponsive(&mut self, now: Timestamp, relay: usize, why: &str) {
        let Some(link) = self.relays.get_mut(relay) else { return };
        link.closing(why);
        let inputs = link.client.on_disconnect();
        self.outputs.push_back(NodeOutput::CloseRelay { relay });
        self.relay_gave_back(now, inputs);
    }

    /// See [`NodeInput::RelayFrameUnsent`].
    fn relay_frame_unsent(&mut self, now: Timestamp, relay: usize, bytes: &[u8]) {
        let Some(link) = self.relays.get_mut(relay).filter(|l| l.is_up()) else { return };
        // The node encoded it itself: it decodes.
        let Ok(frame) = RelayFrame::decode(bytes) else { return };
        match frame {
            // A congested queue is no reason to seal the message again: the
            // same bytes go through another relay, or wait for a path.
            RelayFrame::Forward { id, .. } => {
                if link.client.withdraw(&frame, SendFailure::RelayQueueFull).is_none() {
                    return;
                }
                let Some((transmit, tried)) = self.relay_in_flight.remove(&TransmitId(id)) else { return };
                if !self.try_next_relay(now, transmit.clone(), tried) {
                    self.hold_for_a_path(now, transmit, SendFailure::RelayQueueFull);
                }
            }
            RelayFrame::Lookup { .. } => {
                if let Some(input) = link.client.withdraw(&frame, SendFailure::RelayQueueFull) {
                    self.relay_gave_back(now, vec![input]);
                }
            }
            _ => self.relay_unresponsive(now, relay, "the relay does not read what the node sends"),
        }
    }

    fn relay_frame(&mut self, now: Timestamp, relay: usize, bytes: &[u8]) {
        let Some(link) = self.relays.get_mut(relay).filter(|l| l.is_up()) else { return };
        let actions = match link.client.on_frame(now, bytes) {
            Ok(actions) => actions,
            Err(error) => return self.outputs.push_back(NodeOutput::Notice(Notice::BadRelayFrame { relay, error })),
        };
        for action in actions {
            match action {
                ClientAction::ToEngine(input @ Input::TransmitResult { outcome: TransmitOutcome::Failed(_), .. }) => {
                    self.relay_gave_back(now, vec![input])
                }
                ClientAction::ToEngine(input) => {
                    if let Input::TransmitResult { id, .. } = &input {
                        self.relay_in_flight.remove(id);
                    }
                    self.for_engine(input)
                }
                // It follows the input just queued, and only its commit.
                ClientAction::AfterEngine(frame) => {
                    self.batch.push_after_last(After::Send { relay, frame: Box::new(frame) });
                }
                ClientAction::Record(record) => self.learn_record(now, RecordSource::Relay(relay), record),
                ClientAction::Published { .. } => {}
                // The relay lost this connection's registration (it restarted
                // under us, say): register again, which brings the mailbox.
                // Once per connection, and only on a relay of its own: a relay
                // cannot make the node sign records without end.
                // A second time on the same connection, the relay is not
                // serving this node: the connection is closed and made again.
                ClientAction::PublishRefused { reason: PublishRefusal::NotRegistered, .. }
                    if !self.relays[relay].visiting && self.relays[relay].reregistered =>
                {
                    self.relay_unresponsive(now, relay, "the relay keeps losing this node's registration");
                }
                ClientAction::PublishRefused { reason: PublishRefusal::NotRegistered, .. }
                    if !self.relays[relay].visiting =>
                {
                    self.relays[relay].reregistered = true;
                    if let Some(record) = self.sign_record(now, relay) {
                        let frames = self.relays[relay].client.on_connect(now, record);
                        for frame in frames {
                            self.send_to_relay(relay, &frame);
                        }
                    }
                }
                ClientAction::PublishRefused { reason, .. } => {
                    self.outputs.push_back(NodeOutput::Notice(Notice::PublishRefused { relay, reason }))
                }
                ClientAction::Observed { address } => self.observed(now, relay, address),
            }
        }
    }

    /// A relay of ours says where this node's connection comes from. An
    /// address anyone could dial is published, and the record signed again
    /// for every connected relay when the addresses change. Only the
    /// node's own relays are asked: a relay visited to reach someone else
    /// has no say in this node's record.
    fn observed(&mut self, now: Timestamp, relay: usize, address: String) {
        match self.relays.get_mut(relay) {
            Some(link) if self.config.publish_observed && !link.visiting && !link.observed_heard => {
                link.observed_heard = true;
            }
            _ => return,
        }
        let parsed = address.parse::<SocketAddr>().ok().map(|a| match a.ip() {
            // An IPv4 peer as a dual-stack socket shows it: published as
            // the IPv4 address others dial.
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, |v4| SocketAddr::new(v4.into(), a.port())),
            std::net::IpAddr::V4(_) => a,
        });
        let Some(addr) = parsed.filter(|a| !a.ip().is_unspecified() && a.port() != 0) else {
            let address = address.chars().take(crate::relay::MAX_ADDRESS_LEN).collect();
            let notice = Notice::ObservedAddressRefused { relay, address };
            return self.outputs.push_back(NodeOutput::Notice(notice));
        };
        let before = self.published_addresses();
        self.relays[relay].observed = Some(addr);
        if self.published_addresses() == before {
            return;
        }
        let up: Vec<usize> =
            (0..self.relays.len()).filter(|&r| self.relays[r].is_up() && !self.relays[r].visiting).collect();
        for relay in up {
            if let Some(record) = self.sign_record(now, relay) {
                self.send_to_relay(relay, &RelayFrame::Publish(record));
            }
        }
    }
}
