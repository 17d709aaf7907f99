//! The decoder fuzz target's seed corpus (`fuzz/seeds/decode/`) comes from
//! real traffic: three nodes and a relay exchange 1:1 and group messages.
//! Every envelope and relay frame they pass is a seed, and so is what the
//! envelopes carry (pairwise payloads and group chat contents, opened on a
//! copy of the recipient's state) and the state the engines store (sessions,
//! group keys, pending key exchanges). Each has the target's selector byte
//! in front.
//!
//! `P2PCHAT_WRITE_FUZZ_SEEDS=1 cargo test -p p2pchat-protocol --test
//! fuzz_seeds` writes them; without it, the test checks that every committed
//! seed still decodes, so the corpus follows the wire format.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use p2pchat_protocol::engine::{
    AttemptState, Command, CommandOutcome, ConversationStore, GroupStore, KeyExchangeStore, MemoryStore, SessionStore,
    Transaction,
};
use p2pchat_protocol::handshake::PendingKeyExchange;
use p2pchat_protocol::keys::IdentitySeed;
use p2pchat_protocol::node::{Node, NodeConfig, NodeInput, NodeOutput, Notice, RelaySpec, Reply, Ticket};
use p2pchat_protocol::relay::{MemoryRelayStore, Relay, RelayConfig, RelayFrame};
use p2pchat_protocol::wire::{ChatContent, Envelope, EnvelopeBody, PairwisePayload};
use p2pchat_protocol::{GroupSession, IdentityKeyPair, PairwiseSessions, PeerId, Timestamp};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

// The target's selector bytes.
const ENVELOPE: u8 = 0;
const PAYLOAD: u8 = 1;
const CONTENT: u8 = 2;
const FRAME: u8 = 3;
const SESSIONS: u8 = 4;
const GROUP_KEYS: u8 = 5;
const PENDING: u8 = 6;

fn tagged(selector: u8, bytes: &[u8]) -> Vec<u8> {
    let mut seed = vec![selector];
    seed.extend_from_slice(bytes);
    seed
}

/// A copy of what `node` has committed, open for reading.
fn committed(node: &Node<MemoryStore>) -> MemoryStore {
    let mut store = node.engine().store().crash_copy();
    store.begin().unwrap();
    store
}

/// What an envelope for `node` carries, opened on a copy of its state (the
/// node itself then opens the envelope as usual).
fn contents_of(node: &Node<MemoryStore>, from: PeerId, bytes: &[u8], now: Timestamp, seen: &mut BTreeSet<Vec<u8>>) {
    let Ok(envelope) = Envelope::decode(bytes) else { return };
    match envelope.body {
        EnvelopeBody::Ratchet(message) => {
            let Some(state) = committed(node).sessions(&from).unwrap() else { return };
            if let Ok(payload) = PairwiseSessions::from_bytes(&state).unwrap().decrypt(&message, now) {
                seen.insert(tagged(PAYLOAD, &payload));
            }
        }
        EnvelopeBody::Group(message) => {
            let Some(state) = committed(node).group_keys(&message.group_id).unwrap() else { return };
            if let Ok(content) = GroupSession::from_bytes(&state).unwrap().decrypt(&message, now) {
                seen.insert(tagged(CONTENT, &content));
            }
        }
        _ => {}
    }
}

/// The state `node` has stored: sessions, group keys and pending key
/// exchanges.
fn state_of(node: &Node<MemoryStore>, seen: &mut BTreeSet<Vec<u8>>) {
    let store = committed(node);
    for peer in store.session_peers().unwrap() {
        if let Some(state) = store.sessions(&peer).unwrap() {
            seen.insert(tagged(SESSIONS, &state));
        }
    }
    for conversation in store.conversations().unwrap() {
        if let Some(state) = store.group_keys(&conversation.id).unwrap() {
            seen.insert(tagged(GROUP_KEYS, &state));
        }
    }
    for attempt in store.key_exchanges().unwrap() {
        if let AttemptState::AwaitingAck(pending) = attempt.state {
            seen.insert(tagged(PENDING, &pending));
        }
    }
}

fn seed_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/decode")
}

/// Three nodes and a relay, each frame recorded as it passes.
struct Traffic {
    now: Timestamp,
    nodes: Vec<Node<MemoryStore>>,
    ids: Vec<PeerId>,
    relay: Relay<MemoryRelayStore>,
    seen: BTreeSet<Vec<u8>>,
    next_ticket: u64,
    replies: Vec<(Ticket, CommandOutcome)>,
}

impl Traffic {
    /// Applies every output until nothing moves.
    fn pump(&mut self) {
        loop {
            let mut busy = false;
            for i in 0..self.nodes.len() {
                state_of(&self.nodes[i], &mut self.seen);
                while let Some(output) = self.nodes[i].poll_output(self.now) {
                    busy = true;
                    match output {
                        NodeOutput::ConnectRelay { relay, .. } => {
                            self.relay.connected(self.ids[i]);
                            self.nodes[i].handle(self.now, NodeInput::RelayConnected { relay });
                        }
                        NodeOutput::SendToRelay { bytes, .. } => {
                            self.seen.insert(tagged(FRAME, &bytes));
                            if let Ok(RelayFrame::Forward { envelope, .. }) = RelayFrame::decode(&bytes) {
                                self.seen.insert(tagged(ENVELOPE, &envelope));
                            }
                            self.relay.handle_frame(self.now, self.ids[i], &bytes).unwrap();
                        }
                        NodeOutput::Reply { ticket, reply: Reply::Command(result) } => {
                            self.replies.push((ticket, result.unwrap()));
                        }
                        NodeOutput::Notice(Notice::InputFailed(e)) => panic!("node {i} failed: {e}"),
                        _ => {}
                    }
                }
            }
            while let Some((to, bytes)) = self.relay.poll_transmit() {
                busy = true;
                self.seen.insert(tagged(FRAME, &bytes));
                let j = self.ids.iter().position(|p| *p == to).unwrap();
                if let Ok(RelayFrame::Deliver { from, envelope, .. }) = RelayFrame::decode(&bytes) {
                    contents_of(&self.nodes[j], from, &envelope, self.now, &mut self.seen);
                }
                self.nodes[j].handle(self.now, NodeInput::RelayFrame { relay: 0, bytes });
            }
            if !busy {
                return;
            }
        }
    }

    fn command(&mut self, i: usize, command: Command) -> CommandOutcome {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        self.nodes[i].handle(self.now, NodeInput::Command { ticket, command });
        self.pump();
        let at = self.replies.iter().position(|(t, _)| *t == ticket).expect("answered");
        self.replies.remove(at).1
    }
}

/// Every envelope and frame of a short life: three nodes meet through a
/// relay, alice writes to bob, bob answers, alice makes a group with both
/// and writes to it, carol answers, bob leaves.
fn traffic() -> BTreeSet<Vec<u8>> {
    let now = Timestamp::from_millis(1_750_000_000_000);
    let relay_spec = RelaySpec { peer: PeerId([0xee; 20]), address: "relay.test:4433".into() };
    let mut ids = Vec::new();
    let nodes = (0..3u8)
        .map(|i| {
            let identity = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes([i + 1; 32]));
            ids.push(identity.peer_id());
            let config = NodeConfig { relays: vec![relay_spec.clone()], ..NodeConfig::default() };
            let rng = ChaCha20Rng::seed_from_u64(u64::from(i));
            Node::new(identity, MemoryStore::new(), config, rng, now).unwrap()
        })
        .collect();
    let relay = Relay::new(MemoryRelayStore::default(), RelayConfig::default()).unwrap();
    let mut t = Traffic { now, nodes, ids, relay, seen: BTreeSet::new(), next_ticket: 0, replies: Vec::new() };
    t.pump();
    let ids = t.ids.clone();
    let CommandOutcome::Conversation(c) = t.command(0, Command::CreateConversation { peer: ids[1] }) else { panic!() };
    t.command(0, Command::SendMessage { conversation: c.id, content: "hello bob".into() });
    t.command(1, Command::SendMessage { conversation: c.id, content: "hello alice".into() });
    let CommandOutcome::Conversation(g) =
        t.command(0, Command::CreateGroup { name: "seeds".into(), members: vec![ids[1], ids[2]] })
    else {
        panic!()
    };
    // Bob wrote to alice, so he is in; carol, who never did, accepts.
    t.command(2, Command::AcceptInvitation { group: g.id });
    t.command(0, Command::SendGroupMessage { group: g.id, content: "hello group".into() });
    t.command(2, Command::SendGroupMessage { group: g.id, content: "hello from carol".into() });
    t.command(1, Command::Leave { group: g.id });
    t.seen
}

fn decodes(seed: &[u8]) -> bool {
    match seed.split_first() {
        Some((&ENVELOPE, bytes)) => Envelope::decode(bytes).is_ok(),
        Some((&PAYLOAD, bytes)) => PairwisePayload::decode(bytes).is_ok(),
        Some((&CONTENT, bytes)) => ChatContent::decode(bytes).is_ok(),
        Some((&FRAME, bytes)) => RelayFrame::decode(bytes).is_ok(),
        Some((&SESSIONS, bytes)) => PairwiseSessions::from_bytes(bytes).is_ok(),
        Some((&GROUP_KEYS, bytes)) => GroupSession::from_bytes(bytes).is_ok(),
        Some((&PENDING, bytes)) => PendingKeyExchange::from_bytes(bytes).is_ok(),
        _ => false,
    }
}

/// FNV-1a, for stable file names.
fn name(seed: &[u8]) -> String {
    let hash = seed.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
    format!("{hash:016x}")
}

#[test]
fn the_decoder_seeds_are_real_traffic_that_still_decodes() {
    let dir = seed_dir();
    if std::env::var_os("P2PCHAT_WRITE_FUZZ_SEEDS").is_some() {
        let seeds = traffic();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for seed in &seeds {
            assert!(decodes(seed), "real traffic that does not decode");
            std::fs::write(dir.join(name(seed)), seed).unwrap();
        }
        eprintln!("wrote {} seeds to {}", seeds.len(), dir.display());
    }
    let mut kinds = BTreeSet::new();
    let mut selectors = BTreeSet::new();
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/seeds/decode exists") {
        let seed = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(decodes(&seed), "a committed seed no longer decodes: rewrite them (see the header)");
        selectors.insert(seed[0]);
        if seed[0] == ENVELOPE || seed[0] == FRAME {
            kinds.insert((seed[0], seed.get(2).copied().unwrap_or(0)));
        }
        count += 1;
    }
    // Every decoder has seeds; all four envelope kinds at least, and many
    // frame kinds.
    assert_eq!(selectors.len(), 7, "decoders without seeds among {count}: {selectors:?}");
    let envelopes = kinds.iter().filter(|(k, _)| *k == ENVELOPE).count();
    let frames = kinds.iter().filter(|(k, _)| *k == FRAME).count();
    assert!(envelopes >= 4 && frames >= 6, "too few kinds in {count} seeds: {kinds:?}");
}
