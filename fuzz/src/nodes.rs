//! Two nodes, two relays and a driver whose every step the fuzzer chooses:
//! dials that connect or fail, direct sends acknowledged or failed,
//! direct connections closing, relay connections up, refused or dying with
//! frames in flight, a driver queue to a relay that is full, time passing,
//! nodes restarting from what their store committed, and frames from a
//! hostile relay. The nodes route with the code that
//! ships (`protocol::node`); the relays are the relay core.
//!
//! `settle` then heals everything and lets retries run, so the target can
//! check that every message its sender does not count as failed arrived.

use std::collections::{BTreeMap, VecDeque};

use p2pchat_protocol::address::AddressPolicy;
use p2pchat_protocol::engine::{
    Answer, Command, CommandOutcome, Event, MemoryStore, MessageStatus, Query, SendFailure, TransmitId, TransmitOutcome,
};
use p2pchat_protocol::keys::IdentitySeed;
use p2pchat_protocol::node::{Node, NodeConfig, NodeInput, NodeOutput, Notice, RelaySpec, Reply, Ticket};
use p2pchat_protocol::relay::{MemoryRelayStore, Relay, RelayConfig};
use p2pchat_protocol::{ConversationId, IdentityKeyPair, MessageId, PeerId, Timestamp};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// Something the driver was asked to do and has not done yet.
/// Frames name the connection they were written on (its generation): a
/// frame of a connection that closed is never handed to a newer one.
#[derive(Debug)]
pub enum Pending {
    Dial { from: usize },
    ConnectRelay { node: usize, relay: usize },
    SendDirect { from: usize, link: Option<u64>, id: TransmitId, bytes: Vec<u8> },
    ToRelay { node: usize, relay: usize, link: u64, bytes: Vec<u8> },
    FromRelay { relay: usize, to: usize, link: u64, bytes: Vec<u8> },
}

impl Pending {
    /// Whether this work belongs to node `i` (and dies with it).
    fn of(&self, i: usize) -> bool {
        match self {
            Pending::Dial { from } | Pending::SendDirect { from, .. } => *from == i,
            Pending::ConnectRelay { node, .. } | Pending::ToRelay { node, .. } => *node == i,
            Pending::FromRelay { to, .. } => *to == i,
        }
    }
}

/// How long `settle` lets retries run: past every backoff of the node and
/// the engine's retries, including the copies of a message a relay holds,
/// which are spaced out by up to two days.
const SETTLE_MS: u64 = 3 * 24 * 60 * 60 * 1000;

pub struct NodeWorld {
    pub nodes: Vec<Node<MemoryStore>>,
    pub ids: Vec<PeerId>,
    pub relays: Vec<Relay<MemoryRelayStore>>,
    pub now: Timestamp,
    pub pending: VecDeque<Pending>,
    /// (node, relay) connections that are up, with their generation.
    links: BTreeMap<(usize, usize), u64>,
    next_link: u64,
    seed: u64,
    restarts: u64,
    /// The direct connection between the two nodes, if open (its
    /// generation).
    direct: Option<u64>,
    /// Settling: every piece of work is done, successfully, as it comes.
    healing: bool,
    draining: bool,
    conversations: Vec<ConversationId>,
    /// What each node sent that was accepted: ID → content.
    pub sent: Vec<BTreeMap<MessageId, String>>,
    /// How often each node was handed each message.
    pub received: Vec<BTreeMap<MessageId, (String, usize)>>,
    next_ticket: u64,
    replies: BTreeMap<Ticket, Option<CommandOutcome>>,
}

impl NodeWorld {
    pub fn new(seed: u64) -> Self {
        let now = Timestamp::from_millis(1_750_000_000_000);
        let mut nodes = Vec::new();
        let mut ids = Vec::new();
        for i in 0..2 {
            let identity = identity(seed, i);
            ids.push(identity.peer_id());
            let rng = ChaCha20Rng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(i as u64));
            let node = Node::new(identity, MemoryStore::new(), config(i), rng, now)
                .unwrap_or_else(|e| panic!("a node on an empty store must start: {e}"));
            nodes.push(node);
        }
        let relays = (0..2)
            .map(|_| {
                Relay::new(MemoryRelayStore::new(), RelayConfig::default())
                    .unwrap_or_else(|e| panic!("a relay on an empty store must start: {e}"))
            })
            .collect();
        let mut world = Self {
            nodes,
            ids,
            relays,
            now,
            pending: VecDeque::new(),
            links: BTreeMap::new(),
            next_link: 0,
            seed,
            restarts: 0,
            direct: None,
            healing: false,
            draining: false,
            conversations: Vec::new(),
            sent: vec![BTreeMap::new(); 2],
            received: vec![BTreeMap::new(); 2],
            next_ticket: 0,
            replies: BTreeMap::new(),
        };
        // Alice knows where bob takes direct connections.
        let addr = "10.0.0.2:4433".parse().unwrap_or_else(|_| unreachable!());
        world.nodes[0].handle(now, NodeInput::PeerAddress { peer: world.ids[1], addr });
        for i in 0..2 {
            let peer = world.ids[1 - i];
            match world.command(i, Command::CreateConversation { peer }) {
                Some(CommandOutcome::Conversation(c)) => world.conversations.push(c.id),
                other => panic!("creating a conversation failed: {other:?}"),
            }
        }
        world
    }

    fn command(&mut self, i: usize, command: Command) -> Option<CommandOutcome> {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        self.nodes[i].handle(self.now, NodeInput::Command { ticket, command });
        self.collect();
        self.replies.remove(&ticket).flatten()
    }

    /// Node `i` sends `content` to the other.
    pub fn send(&mut self, i: usize, content: String) {
        let conversation = self.conversations[i];
        if let Some(CommandOutcome::Message(m)) = self.command(i, Command::SendMessage { conversation, content }) {
            self.sent[i].insert(m.id, m.content);
        }
    }

    /// Takes every node's outputs: driver work goes to `pending`, and
    /// what the relays send to `pending` too. While healing, that work is
    /// then done at once, successfully, as a working network would.
    fn collect(&mut self) {
        self.collect_outputs();
        if !self.healing || self.draining {
            return;
        }
        self.draining = true;
        let mut rounds = 0;
        while let Some(work) = self.pending.pop_front() {
            self.work(work, true);
            self.collect_outputs();
            rounds += 1;
            assert!(rounds < 1_000_000, "the nodes and relays keep each other busy for ever");
        }
        self.draining = false;
    }

    fn collect_outputs(&mut self) {
        for i in 0..2 {
            while let Some(output) = self.nodes[i].poll_output(self.now) {
                match output {
                    NodeOutput::Dial { .. } => self.pending.push_back(Pending::Dial { from: i }),
                    NodeOutput::SendDirect { id, bytes, .. } => {
                        let link = self.direct;
                        self.pending.push_back(Pending::SendDirect { from: i, link, id, bytes })
                    }
                    NodeOutput::ConnectRelay { relay, .. } => {
                        self.pending.push_back(Pending::ConnectRelay { node: i, relay })
                    }
                    NodeOutput::CloseRelay { relay } => self.close_relay(i, relay, "closed by the node"),
                    NodeOutput::SendToRelay { relay, bytes } => {
                        // Written on the connection up now, if any.
                        if let Some(&link) = self.links.get(&(i, relay)) {
                            self.pending.push_back(Pending::ToRelay { node: i, relay, link, bytes });
                        }
                    }
                    NodeOutput::Event(Event::MessageReceived(m)) => {
                        let entry = self.received[i].entry(m.id).or_insert((m.content.clone(), 0));
                        assert_eq!(entry.0, m.content, "a message's content changed between copies");
                        entry.1 += 1;
                    }
                    NodeOutput::Reply { ticket, reply: Reply::Command(result) } => {
                        self.replies.insert(ticket, result.ok());
                    }
                    NodeOutput::Notice(Notice::InputFailed(e)) => panic!("node {i}'s engine failed an input: {e}"),
                    NodeOutput::Event(_) | NodeOutput::Reply { .. } | NodeOutput::Notice(_) => {}
                }
            }
        }
        for relay in 0..self.relays.len() {
            while self.relays[relay].poll_event().is_some() {}
            while let Some((to, bytes)) = self.relays[relay].poll_transmit() {
                let Some(to) = self.ids.iter().position(|p| *p == to) else { continue };
                if let Some(&link) = self.links.get(&(to, relay)) {
                    self.pending.push_back(Pending::FromRelay { relay, to, link, bytes });
                }
            }
        }
    }

    fn close_relay(&mut self, node: usize, relay: usize, reason: &str) {
        if self.links.remove(&(node, relay)).is_some() {
            self.relays[relay].disconnected(&self.ids[node]);
        }
        let reason = reason.into();
        self.nodes[node].handle(self.now, NodeInput::RelayDisconnected { relay, reason });
    }

    fn close_direct(&mut self) {
        if self.direct.take().is_some() {
            for i in 0..2 {
                self.nodes[i].handle(self.now, NodeInput::DirectDown { peer: self.ids[1 - i] });
            }
        }
    }

    /// Does the pending work at `index` (taken modulo the queue's length),
    /// as asked or failing.
    pub fn step(&mut self, index: usize, succeed: bool) {
        if let Some(work) = self.take(index) {
            self.work(work, succeed);
            self.collect();
        }
    }

    /// Does the pending work at `index`, successfully, and node `who`
    /// crashes before it has done anything with what it was handed.
    pub fn step_then_restart(&mut self, index: usize, who: usize) {
        if let Some(work) = self.take(index) {
            self.work(work, true);
        }
        self.restart(who);
    }

    fn take(&mut self, index: usize) -> Option<Pending> {
        if self.pending.is_empty() {
            return None;
        }
        let index = index % self.pending.len();
        self.pending.remove(index)
    }

    fn work(&mut self, work: Pending, succeed: bool) {
        let now = self.now;
        match work {
            Pending::Dial { from } => {
                let peer = self.ids[1 - from];
                if succeed {
                    if self.direct.is_none() {
                        self.direct = Some(self.next_link);
                        self.next_link += 1;
                    }
                    self.nodes[from].handle(now, NodeInput::DirectUp { peer });
                    self.nodes[1 - from].handle(now, NodeInput::DirectUp { peer: self.ids[from] });
                } else {
                    self.nodes[from].handle(now, NodeInput::DialFailed { peer, reason: "no answer".into() });
                }
            }
            Pending::SendDirect { from, link, id, bytes } => {
                // Only on the connection it was written on.
                let outcome = if succeed && link.is_some() && self.direct == link {
                    let sender = self.ids[from];
                    self.nodes[1 - from].handle(now, NodeInput::DirectReceived { from: sender, bytes });
                    TransmitOutcome::Delivered
                } else {
                    TransmitOutcome::Failed(SendFailure::ConnectionClosed)
                };
                self.nodes[from].handle(now, NodeInput::DirectSent { id, outcome });
            }
            Pending::ConnectRelay { node, relay } => {
                // Only the two relays exist; any other is out of reach.
                if succeed && relay < self.relays.len() {
                    if let std::collections::btree_map::Entry::Vacant(entry) = self.links.entry((node, relay)) {
                        entry.insert(self.next_link);
                        self.next_link += 1;
                        self.relays[relay].connected(self.ids[node]);
                    }
                    self.nodes[node].handle(now, NodeInput::RelayConnected { relay });
                } else {
                    self.close_relay(node, relay, "cannot connect");
                }
            }
            Pending::ToRelay { node, relay, link, bytes } => {
                if self.links.get(&(node, relay)) != Some(&link) {
                    // The connection it was written on is gone.
                } else if succeed {
                    if let Err(e) = self.relays[relay].handle_frame(now, self.ids[node], &bytes) {
                        panic!("the relay's memory store failed: {e}");
                    }
                } else {
                    // The driver's queue to the relay was full.
                    self.nodes[node].handle(now, NodeInput::RelayFrameUnsent { relay, bytes });
                }
            }
            Pending::FromRelay { relay, to, link, bytes } => {
                if self.links.get(&(to, relay)) == Some(&link) {
                    if succeed {
                        self.nodes[to].handle(now, NodeInput::RelayFrame { relay, bytes });
                    } else {
                        // The connection dies with the frame on it.
                        self.close_relay(to, relay, "the connection died");
                    }
                }
            }
        }
    }

    /// A hostile relay sends node `to` whatever bytes it likes.
    pub fn hostile_frame(&mut self, to: usize, relay: usize, bytes: Vec<u8>) {
        if self.links.contains_key(&(to, relay)) {
            self.nodes[to].handle(self.now, NodeInput::RelayFrame { relay, bytes });
            self.collect();
        }
    }

    /// Time passes; every deadline on the way fires.
    pub fn advance(&mut self, by_ms: u64) {
        let until = self.now.saturating_add_millis(by_ms);
        loop {
            let next = self
                .nodes
                .iter()
                .filter_map(|n| n.poll_timeout())
                .chain(self.relays.iter().filter_map(|r| r.poll_timeout()))
                .filter(|t| *t <= until)
                .min();
            let Some(next) = next else { break };
            self.now = next.max(self.now);
            for node in &mut self.nodes {
                if node.poll_timeout().is_some_and(|t| t <= self.now) {
                    node.handle_timeout(self.now);
                }
            }
            for relay in &mut self.relays {
                if relay.poll_timeout().is_some_and(|t| t <= self.now) {
                    if let Err(e) = relay.handle_timeout(self.now) {
                        panic!("the relay's memory store failed: {e}");
                    }
                }
            }
            self.collect();
        }
        self.now = until;
    }

    /// Connections close or open as chosen.
    pub fn close(&mut self, which: u8) {
        match which % 3 {
            0 => self.close_direct(),
            n => {
                let (node, relay) = (usize::from(n - 1), usize::from(which / 3) % self.relays.len());
                self.close_relay(node, relay, "the connection closed");
            }
        }
    }

    /// Node `i` crashes and starts again from what its store committed: its
    /// connections close and the work the driver had for it is lost.
    pub fn restart(&mut self, i: usize) {
        self.close_direct();
        for relay in 0..self.relays.len() {
            if self.links.remove(&(i, relay)).is_some() {
                self.relays[relay].disconnected(&self.ids[i]);
            }
        }
        self.pending.retain(|work| !work.of(i));
        self.restarts += 1;
        let store = self.nodes[i].engine().store().crash_copy();
        let rng = ChaCha20Rng::seed_from_u64(self.seed.wrapping_mul(31).wrapping_add(1_000 * self.restarts + i as u64));
        self.nodes[i] = Node::new(identity(self.seed, i), store, config(i), rng, self.now)
            .unwrap_or_else(|e| panic!("a node restarted from its store must start: {e}"));
        // Replies and events of the old process are gone with it.
        self.collect();
    }

    /// Heals the network: every piece of pending work succeeds, and time
    /// runs on until every retry has had its chance.
    pub fn settle(&mut self) {
        self.healing = true;
        self.collect();
        self.advance(SETTLE_MS);
    }

    /// The status node `i` gives message `id`.
    pub fn status(&mut self, i: usize, id: MessageId) -> Option<MessageStatus> {
        match self.nodes[i].engine_mut().query(Query::Message(id)) {
            Ok(Answer::Message(m)) => Some(m.status),
            _ => None,
        }
    }
}

fn identity(seed: u64, i: usize) -> IdentityKeyPair {
    let mut bytes = [0u8; 32];
    bytes[0] = i as u8 + 1;
    bytes[1..9].copy_from_slice(&seed.to_le_bytes());
    IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(bytes))
}

/// The relays every node uses, as records list them (`PEER@HOST:PORT`).
fn relay_specs() -> Vec<RelaySpec> {
    (0..2u8)
        .map(|n| {
            let peer = PeerId([0xe0 + n; 20]);
            RelaySpec { peer, address: format!("{peer}@10.9.0.{n}:4433") }
        })
        .collect()
}

/// Node `i`'s configuration: bob takes direct connections, alice does not.
fn config(i: usize) -> NodeConfig {
    NodeConfig {
        relays: relay_specs(),
        direct_addresses: if i == 1 { vec!["10.0.0.2:4433".into()] } else { Vec::new() },
        address_policy: AddressPolicy::AllowPrivate,
        ..NodeConfig::default()
    }
}
