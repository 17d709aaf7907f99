//! The harness: engines on a simulated network with virtual time, driven
//! by the engine's driving rule, with helpers the scenarios share.

use std::collections::{BTreeSet, VecDeque};

use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::{rng, LossRule, TestStore, NOW};
use crate::engine::{
    Answer, Command, CommandOutcome, Conversation, Engine, EngineConfig, EngineError, Event, Input, Message, Query,
    RequestError, SendFailure, Store, TransmitOutcome,
};
use crate::wire::{Envelope, EnvelopeBody};
use crate::{ConversationId, IdentityKeyPair, MessageId, PeerId, Timestamp};

pub(super) struct Node<S: Store> {
    pub(super) engine: Engine<S>,
    pub(super) identity_seed: [u8; 32],
    pub(super) events: Vec<Event>,
    pub(super) online: bool,
    pub(super) restarts: u64,
}

/// A network of engines over stores of type `S`.
pub struct Net<S: TestStore> {
    pub(super) nodes: Vec<Node<S>>,
    pub(super) now: Timestamp,
    pub(super) unknown_to_directory: BTreeSet<PeerId>,
    pub(super) lose: LossRule,
    pub(super) delivered: Vec<(usize, usize, Vec<u8>)>,
    /// Engine calls so far, and the one after which the called node crashes
    /// before any of its outputs leave.
    pub(super) calls: u64,
    pub(super) crash_after_call: Option<u64>,
    /// Directory lookups answered, per node.
    pub(super) lookups: Vec<u32>,
    /// Every ciphertext seen per message key: (header bytes or group
    /// position) → ciphertext. A key must never seal two different texts.
    pub(super) seen_keys: std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
    /// Every distinct group envelope put on the wire, delivered or not, with
    /// its sender's index: what a relay carrying all of them would see.
    pub(super) wire_group_envelopes: Vec<(usize, Vec<u8>)>,
    /// Whether each node's user accepts a waiting group invitation as soon
    /// as it arrives (most scenarios are about what follows).
    pub(super) accept_invitations: bool,
    /// Invitations seen and not answered yet: (node, group).
    pub(super) accepts: VecDeque<(usize, ConversationId)>,
}

impl<S: TestStore> Net<S> {
    /// `count` engines, each on a fresh store from `make`.
    pub fn new(make: fn() -> S, count: usize, seed: u64) -> Self {
        Self::with_config(make, count, seed, EngineConfig::default())
    }

    /// As [`Net::new`], with every engine on `config`.
    pub fn with_config(make: fn() -> S, count: usize, seed: u64, config: EngineConfig) -> Self {
        let mut r = rng(seed);
        let nodes = (0..count)
            .map(|i| {
                let mut identity_seed = [0u8; 32];
                rand_chacha::rand_core::RngCore::fill_bytes(&mut r, &mut identity_seed);
                let identity = IdentityKeyPair::from_seed(&crate::keys::IdentitySeed::from_bytes(identity_seed));
                let engine = Engine::new(
                    identity,
                    make(),
                    config.clone(),
                    ChaCha20Rng::seed_from_u64(seed * 1000 + i as u64),
                    NOW,
                )
                .unwrap();
                Node { engine, identity_seed, events: Vec::new(), online: true, restarts: 0 }
            })
            .collect();
        Self {
            nodes,
            now: NOW,
            unknown_to_directory: BTreeSet::new(),
            lose: Box::new(|_, _| false),
            delivered: Vec::new(),
            calls: 0,
            crash_after_call: None,
            lookups: vec![0; count],
            seen_keys: std::collections::BTreeMap::new(),
            wire_group_envelopes: Vec::new(),
            accept_invitations: true,
            accepts: VecDeque::new(),
        }
    }

    pub(super) fn id(&self, i: usize) -> PeerId {
        self.nodes[i].engine.peer_id()
    }

    pub(super) fn command(&mut self, i: usize, command: Command) -> Result<CommandOutcome, EngineError> {
        let out = self.nodes[i].engine.command(self.now, command);
        self.after_call(i);
        self.drain();
        out
    }

    /// Crashes node `i` if this call is the chosen crash point.
    fn after_call(&mut self, i: usize) {
        self.calls += 1;
        if self.crash_after_call == Some(self.calls) {
            self.restart(i);
        }
    }

    /// Checks that no message key seals two different ciphertexts.
    fn check_key_use(&mut self, bytes: &[u8]) {
        let Ok(envelope) = Envelope::decode(bytes) else { return };
        let (key, ciphertext) = match envelope.body {
            EnvelopeBody::Ratchet(m) => (m.header.to_bytes().to_vec(), m.ciphertext),
            EnvelopeBody::Group(g) => {
                let mut k = g.group_id.as_bytes().to_vec();
                k.extend_from_slice(&g.sender.0);
                k.extend_from_slice(&g.key_id.to_be_bytes());
                k.extend_from_slice(&g.message_number.to_be_bytes());
                (k, g.ciphertext)
            }
            _ => return,
        };
        let first = self.seen_keys.entry(key).or_insert_with(|| ciphertext.clone());
        assert_eq!(*first, ciphertext, "a message key sealed two different plaintexts");
    }

    pub(super) fn input(&mut self, i: usize, input: Input) {
        self.nodes[i].engine.handle(self.now, input).unwrap();
        self.drain();
    }

    /// Delivers every output until the network is quiet.
    pub(super) fn drain(&mut self) {
        let mut work: VecDeque<(usize, Input)> = VecDeque::new();
        loop {
            for i in 0..self.nodes.len() {
                while let Some(event) = self.nodes[i].engine.poll_event() {
                    if let Event::GroupInvite { conversation_id, pending: true, .. } = &event {
                        if self.accept_invitations {
                            self.accepts.push_back((i, *conversation_id));
                        }
                    }
                    self.nodes[i].events.push(event);
                }
                while let Some(peer) = self.nodes[i].engine.poll_lookup() {
                    self.lookups[i] += 1;
                    let answer = if self.unknown_to_directory.contains(&peer) {
                        Input::LookupFailed(peer)
                    } else {
                        Input::PeerRecord(peer)
                    };
                    work.push_back((i, answer));
                }
                while let Some(t) = self.nodes[i].engine.poll_transmit() {
                    self.check_key_use(&t.bytes);
                    let group = matches!(Envelope::decode(&t.bytes).map(|e| e.body), Ok(EnvelopeBody::Group(_)));
                    if group && !self.wire_group_envelopes.iter().any(|(_, b)| *b == t.bytes) {
                        self.wire_group_envelopes.push((i, t.bytes.clone()));
                    }
                    // A peer outside the network (an invented member) is
                    // never reached.
                    let Some(to) = self.nodes.iter().position(|n| n.engine.peer_id() == t.peer) else {
                        let outcome = TransmitOutcome::Failed(SendFailure::DialFailed("no such peer".into()));
                        work.push_back((i, Input::TransmitResult { id: t.id, outcome }));
                        continue;
                    };
                    let lost = (self.lose)(i, &t);
                    if self.nodes[to].online && !lost {
                        self.delivered.push((i, to, t.bytes.clone()));
                        work.push_back((to, Input::Received { from: self.id(i), bytes: t.bytes }));
                        work.push_back((i, Input::TransmitResult { id: t.id, outcome: TransmitOutcome::Delivered }));
                    } else if lost && self.nodes[to].online {
                        // Lost in transit after the sender's transport took it.
                        work.push_back((i, Input::TransmitResult { id: t.id, outcome: TransmitOutcome::Delivered }));
                    } else {
                        work.push_back((
                            i,
                            Input::TransmitResult {
                                id: t.id,
                                outcome: TransmitOutcome::Failed(SendFailure::NoConnection),
                            },
                        ));
                    }
                }
            }
            let Some((i, input)) = work.pop_front() else {
                // The network is quiet: the users answer their invitations.
                let Some((i, group)) = self.accepts.pop_front() else { break };
                match self.nodes[i].engine.command(self.now, Command::AcceptInvitation { group }) {
                    // A crash may have lost the invitation with its commit.
                    Ok(_) | Err(EngineError::Request(RequestError::NoInvitation(_))) => {}
                    Err(e) => panic!("node {i} could not accept its invitation: {e}"),
                }
                self.after_call(i);
                continue;
            };
            self.nodes[i].engine.handle(self.now, input).unwrap();
            self.after_call(i);
        }
    }

    /// Jumps virtual time forward to `until`, firing every deadline on the way.
    pub(super) fn advance(&mut self, by_ms: u64) {
        let until = self.now.saturating_add_millis(by_ms);
        loop {
            let next = self.nodes.iter().filter_map(|n| n.engine.poll_timeout()).filter(|t| *t <= until).min();
            let Some(next) = next else { break };
            self.now = next.max(self.now);
            for i in 0..self.nodes.len() {
                if self.nodes[i].engine.poll_timeout().is_some_and(|t| t <= self.now) {
                    self.nodes[i].engine.handle(self.now, Input::Timeout).unwrap();
                    self.after_call(i);
                }
            }
            self.drain();
            for (i, node) in self.nodes.iter().enumerate() {
                // A deadline that a timeout does not move would spin forever.
                assert!(
                    node.engine.poll_timeout().is_none_or(|t| t > self.now),
                    "node {i}'s deadline did not move past {:?}",
                    self.now
                );
            }
        }
        self.now = until;
    }

    pub(super) fn set_online(&mut self, i: usize, online: bool) {
        self.nodes[i].online = online;
        let me = self.id(i);
        for j in 0..self.nodes.len() {
            if j != i {
                let input = if online { Input::PeerReachable(me) } else { Input::PeerUnreachable(me) };
                self.nodes[j].engine.handle(self.now, input).unwrap();
                self.after_call(j);
            }
        }
        self.drain();
    }

    /// Drops the engine's memory and rebuilds it from what its store committed.
    pub(super) fn restart(&mut self, i: usize) {
        let store = self.nodes[i].engine.store().crash_copy();
        // Outputs not yet drained die with the process; events already
        // seen by the API stay seen.
        self.nodes[i].restarts += 1;
        let identity = IdentityKeyPair::from_seed(&crate::keys::IdentitySeed::from_bytes(self.nodes[i].identity_seed));
        let seed = 7_000_000 + i as u64 * 100 + self.nodes[i].restarts;
        self.nodes[i].engine =
            Engine::new(identity, store, EngineConfig::default(), ChaCha20Rng::seed_from_u64(seed), self.now).unwrap();
        // Its user's page, reloaded, lists the invitations still waiting.
        if self.accept_invitations {
            if let Ok(Answer::Invitations(waiting)) = self.nodes[i].engine.query(Query::Invitations) {
                self.accepts.extend(waiting.into_iter().map(|w| (i, w.group_id)));
            }
        }
        // The driver tells the new engine who is reachable.
        for j in 0..self.nodes.len() {
            if j != i && self.nodes[j].online {
                let peer = self.nodes[j].engine.peer_id();
                self.nodes[i].engine.handle(self.now, Input::PeerReachable(peer)).unwrap();
            }
        }
    }

    pub(super) fn conversation(&mut self, i: usize, j: usize) -> Conversation {
        let peer = self.id(j);
        match self.command(i, Command::CreateConversation { peer }).unwrap() {
            CommandOutcome::Conversation(c) => c,
            other => panic!("expected a conversation, got {other:?}"),
        }
    }

    pub(super) fn send(&mut self, i: usize, conversation: ConversationId, text: &str) -> Message {
        match self.command(i, Command::SendMessage { conversation, content: text.into() }).unwrap() {
            CommandOutcome::Message(m) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    pub(super) fn message(&mut self, i: usize, id: &MessageId) -> Option<Message> {
        let store = self.nodes[i].engine.store_mut();
        store.begin().unwrap();
        let m = store.message(id).unwrap();
        store.rollback();
        m
    }

    pub(super) fn messages(&mut self, i: usize, conversation: &ConversationId) -> Vec<Message> {
        let store = self.nodes[i].engine.store_mut();
        store.begin().unwrap();
        let m = store.messages(conversation).unwrap();
        store.rollback();
        m
    }

    pub(super) fn kinds(&self, i: usize) -> Vec<&'static str> {
        self.nodes[i].events.iter().map(Event::kind).collect()
    }
}

pub(super) fn group<S: TestStore>(net: &mut Net<S>, admin: usize, members: &[usize], name: &str) -> Conversation {
    let members = members.iter().map(|&i| net.id(i)).collect();
    match net.command(admin, Command::CreateGroup { name: name.into(), members }).unwrap() {
        CommandOutcome::Conversation(c) => c,
        other => panic!("expected a conversation, got {other:?}"),
    }
}

pub(super) fn send_group<S: TestStore>(net: &mut Net<S>, i: usize, group: ConversationId, text: &str) -> Message {
    match net.command(i, Command::SendGroupMessage { group, content: text.into() }).unwrap() {
        CommandOutcome::Message(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

pub(super) fn contents<S: TestStore>(net: &mut Net<S>, i: usize, c: &ConversationId) -> Vec<String> {
    net.messages(i, c).into_iter().map(|m| m.content).collect()
}

/// The group envelopes `from` sent so far.
pub(super) fn group_envelopes<S: TestStore>(net: &Net<S>, from: usize) -> Vec<Vec<u8>> {
    let mut seen = BTreeSet::new();
    net.delivered
        .iter()
        .filter(|(f, _, b)| *f == from && matches!(Envelope::decode(b).map(|e| e.body), Ok(EnvelopeBody::Group(_))))
        .filter(|(_, _, b)| seen.insert(b.clone()))
        .map(|(_, _, b)| b.clone())
        .collect()
}

pub(super) fn invitations<S: TestStore>(net: &mut Net<S>, i: usize) -> Vec<crate::engine::Invitation> {
    match net.nodes[i].engine.query(Query::Invitations).unwrap() {
        Answer::Invitations(all) => all,
        other => panic!("{other:?}"),
    }
}

pub(super) fn has_left<S: TestStore>(net: &mut Net<S>, i: usize, group: &ConversationId, peer: usize) -> bool {
    let peer = net.id(peer);
    members_of(net, i, group).iter().any(|m| m.peer_id == peer && m.left_at.is_some())
}

/// What node `i` keeps of a group: its conversation, keys, members, messages
/// and held messages.
pub(super) fn traces_of_group<S: TestStore>(net: &mut Net<S>, i: usize, group: &ConversationId) -> usize {
    let store = net.nodes[i].engine.store_mut();
    store.begin().unwrap();
    let traces = usize::from(store.conversation(group).unwrap().is_some())
        + usize::from(store.group_keys(group).unwrap().is_some())
        + store.members(group).unwrap().len()
        + store.messages(group).unwrap().len()
        + store.held_messages(group).unwrap().len();
    store.rollback();
    traces
}

/// `payload` sealed by node `from` for node `to` under their session, which
/// is advanced and saved (as `from`'s engine would), for forgeries.
pub(super) fn seal_for<S: TestStore>(
    net: &mut Net<S>,
    from: usize,
    to: usize,
    payload: &crate::wire::PairwisePayload,
) -> Vec<u8> {
    let peer = net.id(to);
    let store = net.nodes[from].engine.store_mut();
    store.begin().unwrap();
    let bytes = store.sessions(&peer).unwrap().expect("a session to forge under");
    let mut sessions = crate::PairwiseSessions::from_bytes(&bytes).unwrap();
    let message = sessions.encrypt(&payload.encode(), &mut rng(from as u64 * 31 + to as u64)).unwrap();
    store.put_sessions(&peer, &sessions.to_bytes()).unwrap();
    store.commit().unwrap();
    Envelope::new(EnvelopeBody::Ratchet(message)).encode()
}

/// A hostile relay that carried every group envelope so far hands them all
/// to node `to`, each as from its sender.
pub(super) fn leak_group_envelopes<S: TestStore>(net: &mut Net<S>, to: usize) {
    for (sender, bytes) in net.wire_group_envelopes.clone() {
        if sender != to {
            net.input(to, Input::Received { from: net.id(sender), bytes });
        }
    }
    net.advance(60_000);
}

/// Skipped keys held by node `i` for its sessions with node `j`.
pub(super) fn skipped_keys<S: TestStore>(net: &mut Net<S>, i: usize, j: usize) -> usize {
    let peer = net.id(j);
    let store = net.nodes[i].engine.store_mut();
    store.begin().unwrap();
    let bytes = store.sessions(&peer).unwrap();
    store.rollback();
    bytes.map(|b| crate::PairwiseSessions::from_bytes(&b).unwrap().skipped_key_count()).unwrap_or(0)
}

pub(super) fn members_of<S: TestStore>(net: &mut Net<S>, i: usize, g: &ConversationId) -> Vec<crate::engine::Member> {
    let store = net.nodes[i].engine.store_mut();
    store.begin().unwrap();
    let members = store.members(g).unwrap();
    store.rollback();
    members
}
