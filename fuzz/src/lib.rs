//! The hostile network the stateful fuzz targets drive engines through.
//!
//! Every transmit goes onto a wire the fuzzer's bytes control: delivered,
//! dropped, duplicated, reordered or altered. The world checks, as it goes,
//! that no engine accepts an altered packet and that every message received
//! is one its sender sent, once; `settle` then heals the network and lets
//! the engines' retries finish, so that a target can check what must have
//! arrived.

pub mod corrupt;
pub mod nodes;

use std::collections::{BTreeMap, BTreeSet};

use p2pchat_protocol::engine::{
    Answer, Command, CommandOutcome, Engine, EngineConfig, Event, Input, MemoryStore, Message, Query, TransmitOutcome,
};
use p2pchat_protocol::keys::IdentitySeed;
use p2pchat_protocol::{ConversationId, IdentityKeyPair, MessageId, PeerId, Timestamp};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// A packet on the wire.
pub struct Packet {
    pub from: usize,
    pub to: usize,
    pub bytes: Vec<u8>,
    /// What the sender sent. Bytes that differ from it were altered by the
    /// network and must be refused (two alterations can cancel out).
    pub original: Vec<u8>,
}

impl Packet {
    pub fn tampered(&self) -> bool {
        self.bytes != self.original
    }
}

/// Reads the fuzzer's bytes as small numbers; zeros once they run out.
pub struct Bytes<'a>(pub &'a [u8]);

impl Bytes<'_> {
    pub fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            usize::from(self.byte()) % n
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// How far ahead `settle` looks for retries: beyond every retry and backoff
/// the engine's default configuration schedules.
pub const SETTLE_HORIZON_MS: u64 = 2 * 60 * 60 * 1000;

pub struct World {
    pub engines: Vec<Engine<MemoryStore>>,
    pub ids: Vec<PeerId>,
    pub now: Timestamp,
    pub wire: Vec<Packet>,
    /// What each node sent: message ID → (conversation, content).
    pub sent: Vec<BTreeMap<MessageId, (ConversationId, String)>>,
    /// What each node received: message ID → (sender, content).
    pub received: Vec<BTreeMap<MessageId, (PeerId, String)>>,
    /// Contents each node sent, for matching what others receive.
    contents: BTreeSet<(PeerId, String)>,
}

impl World {
    pub fn new(count: usize, seed: u64) -> Self {
        let now = Timestamp::from_millis(1_750_000_000_000);
        let mut engines = Vec::new();
        let mut ids = Vec::new();
        for i in 0..count {
            let mut bytes = [0u8; 32];
            bytes[0] = i as u8 + 1;
            bytes[1..9].copy_from_slice(&seed.to_le_bytes());
            let identity = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(bytes));
            let rng = ChaCha20Rng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(i as u64));
            let engine = Engine::new(identity, MemoryStore::new(), EngineConfig::default(), rng, now)
                .unwrap_or_else(|e| panic!("an engine on an empty store must start: {e}"));
            ids.push(engine.peer_id());
            engines.push(engine);
        }
        Self {
            engines,
            ids,
            now,
            wire: Vec::new(),
            sent: vec![BTreeMap::new(); count],
            received: vec![BTreeMap::new(); count],
            contents: BTreeSet::new(),
        }
    }

    fn index(&self, peer: &PeerId) -> usize {
        self.ids.iter().position(|p| p == peer).unwrap_or_else(|| panic!("a transmit to a peer outside the world"))
    }

    /// Runs a command at node `i`; its outputs go onto the wire.
    pub fn command(&mut self, i: usize, command: Command) -> Option<CommandOutcome> {
        let outcome = self.engines[i].command(self.now, command).ok();
        if let Some(CommandOutcome::Message(m)) = &outcome {
            self.note_sent(i, m);
        }
        self.collect(i, false);
        outcome
    }

    fn note_sent(&mut self, i: usize, m: &Message) {
        self.sent[i].insert(m.id, (m.conversation_id, m.content.clone()));
        self.contents.insert((self.ids[i], m.content.clone()));
    }

    /// Feeds an input to node `i`; `tampered` says the input carries an
    /// altered packet, which must produce no received message.
    fn handle(&mut self, i: usize, input: Input, tampered: bool) {
        // An input the engine refuses (a store error) changes nothing; with
        // the memory store there are none, and a refusal here is a bug.
        if let Err(e) = self.engines[i].handle(self.now, input) {
            panic!("node {i} failed an input: {e}");
        }
        self.collect(i, tampered);
    }

    /// Takes node `i`'s outputs: transmits onto the wire (each reported
    /// taken by the transport), lookups answered, events checked.
    fn collect(&mut self, i: usize, tampered: bool) {
        let mut inputs = Vec::new();
        let mut invitations = Vec::new();
        while let Some(event) = self.engines[i].poll_event() {
            if let Event::GroupInvite { conversation_id, pending: true, .. } = event {
                invitations.push(conversation_id);
            }
            if let Event::MessageReceived(m) = event {
                assert!(!tampered, "node {i} accepted an altered packet as message {:?}", m.content);
                assert!(
                    self.contents.contains(&(m.sender, m.content.clone())),
                    "node {i} received {:?} from {}, which that peer never sent",
                    m.content,
                    m.sender
                );
                let again = self.received[i].insert(m.id, (m.sender, m.content.clone()));
                assert!(again.is_none(), "node {i} received message {} twice", m.id);
            }
        }
        while let Some(peer) = self.engines[i].poll_lookup() {
            inputs.push(Input::PeerRecord(peer));
        }
        while let Some(t) = self.engines[i].poll_transmit() {
            let to = self.index(&t.peer);
            self.wire.push(Packet { from: i, to, original: t.bytes.clone(), bytes: t.bytes });
            inputs.push(Input::TransmitResult { id: t.id, outcome: TransmitOutcome::Delivered });
        }
        for input in inputs {
            self.handle(i, input, false);
        }
        // Every user accepts a group invitation at once.
        for group in invitations {
            if let Err(e) = self.engines[i].command(self.now, Command::AcceptInvitation { group }) {
                panic!("node {i} could not accept the invitation it was just shown: {e}");
            }
            self.collect(i, false);
        }
    }

    /// Delivers wire packet `k`.
    pub fn deliver(&mut self, k: usize) {
        if k >= self.wire.len() {
            return;
        }
        let packet = self.wire.remove(k);
        let from = self.ids[packet.from];
        let tampered = packet.tampered();
        self.handle(packet.to, Input::Received { from, bytes: packet.bytes }, tampered);
    }

    /// One network action chosen by the fuzzer.
    pub fn network_action(&mut self, input: &mut Bytes<'_>) {
        if self.wire.is_empty() {
            return;
        }
        let k = input.below(self.wire.len());
        match input.byte() % 6 {
            0 | 1 => self.deliver(k),
            2 => {
                self.wire.remove(k);
            }
            3 => {
                let p = &self.wire[k];
                let copy = Packet { from: p.from, to: p.to, bytes: p.bytes.clone(), original: p.original.clone() };
                self.wire.push(copy);
            }
            4 => {
                let j = input.below(self.wire.len());
                self.wire.swap(k, j);
            }
            _ => {
                let at = input.below(self.wire[k].bytes.len().max(1));
                let flip = input.byte() | 1;
                let p = &mut self.wire[k];
                if let Some(b) = p.bytes.get_mut(at) {
                    *b ^= flip;
                }
            }
        }
    }

    /// Moves virtual time forward by `ms`, firing every deadline on the way.
    pub fn advance(&mut self, ms: u64) {
        let until = self.now.saturating_add_millis(ms);
        for round in 0.. {
            // A deadline that firing does not move would spin for ever.
            assert!(round < 10_000, "deadlines did not move past {:?}", self.now);
            let next = self.engines.iter().filter_map(Engine::poll_timeout).filter(|t| *t <= until).min();
            let Some(next) = next else { break };
            self.now = next.max(self.now);
            for i in 0..self.engines.len() {
                if self.engines[i].poll_timeout().is_some_and(|t| t <= self.now) {
                    self.handle(i, Input::Timeout, false);
                }
            }
        }
        self.now = until;
    }

    /// Heals the network: altered packets are lost, everything else is
    /// delivered, and time runs on, deadline to deadline, while `pending`
    /// says something is still owed and some deadline falls within
    /// [`SETTLE_HORIZON_MS`] (the engines' daily housekeeping is always
    /// pending and is no retry).
    pub fn settle(&mut self, pending: impl Fn(&mut World) -> bool) {
        self.wire.retain(|p| !p.tampered());
        for _ in 0..1_000 {
            while !self.wire.is_empty() {
                self.deliver(0);
            }
            if !pending(self) {
                break;
            }
            let next = self.engines.iter().filter_map(Engine::poll_timeout).min();
            match next {
                Some(next) if next.millis_since(self.now) <= SETTLE_HORIZON_MS => {
                    self.advance(next.millis_since(self.now));
                }
                _ => break,
            }
        }
        while !self.wire.is_empty() {
            self.deliver(0);
        }
    }

    /// Whether a message `from` sent is neither received by `to` nor
    /// failed at `from`.
    pub fn owed(&mut self, from: usize, to: usize) -> bool {
        let ids: Vec<MessageId> = self.sent[from].keys().copied().collect();
        ids.into_iter().any(|id| {
            !self.received[to].contains_key(&id)
                && self.message(from, &id).is_some_and(|m| m.status != p2pchat_protocol::engine::MessageStatus::Failed)
        })
    }

    /// Node `i`'s stored copy of a message.
    pub fn message(&mut self, i: usize, id: &MessageId) -> Option<Message> {
        match self.engines[i].query(Query::Message(*id)) {
            Ok(Answer::Message(m)) => Some(m),
            _ => None,
        }
    }
}
