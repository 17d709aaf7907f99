//! The decoder fuzz target's seed corpus (`fuzz/seeds/decode/`) comes from
//! real traffic: three engines and a relay exchange 1:1 and group messages.
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

use p2pchat_protocol::engine::{Command, CommandOutcome, Engine, EngineConfig, Input, MemoryStore, Store};
use p2pchat_protocol::handshake::PendingKeyExchange;
use p2pchat_protocol::keys::IdentitySeed;
use p2pchat_protocol::relay::{
    ClientAction, MemoryRelayStore, PeerRecord, Relay, RelayClient, RelayConfig, RelayFrame,
};
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

/// A copy of what `engine` has committed, open for reading.
fn committed(engine: &Engine<MemoryStore>) -> MemoryStore {
    let mut store = engine.store().crash_copy();
    store.begin().unwrap();
    store
}

/// What an envelope for `engine` carries, opened on a copy of its state
/// (the engine itself then opens the envelope as usual).
fn contents_of(engine: &Engine<MemoryStore>, from: PeerId, bytes: &[u8], now: Timestamp, seen: &mut BTreeSet<Vec<u8>>) {
    let Ok(envelope) = Envelope::decode(bytes) else { return };
    match envelope.body {
        EnvelopeBody::Ratchet(message) => {
            let Some(state) = committed(engine).sessions(&from).unwrap() else { return };
            if let Ok(payload) = PairwiseSessions::from_bytes(&state).unwrap().decrypt(&message, now) {
                seen.insert(tagged(PAYLOAD, &payload));
            }
        }
        EnvelopeBody::Group(message) => {
            let Some(state) = committed(engine).group_keys(&message.group_id).unwrap() else { return };
            if let Ok(content) = GroupSession::from_bytes(&state).unwrap().decrypt(&message, now) {
                seen.insert(tagged(CONTENT, &content));
            }
        }
        _ => {}
    }
}

/// The state `engine` has stored: sessions, group keys and pending key
/// exchanges.
fn state_of(engine: &Engine<MemoryStore>, seen: &mut BTreeSet<Vec<u8>>) {
    let store = committed(engine);
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
        if let Some(pending) = attempt.pending {
            seen.insert(tagged(PENDING, &pending));
        }
    }
}

fn seed_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/decode")
}

/// Every envelope and frame of a short life: three nodes meet through a
/// relay, alice writes to bob, bob answers, alice makes a group with both
/// and writes to it, carol answers.
fn traffic() -> BTreeSet<Vec<u8>> {
    let now = Timestamp::from_millis(1_750_000_000_000);
    let identities: Vec<IdentityKeyPair> =
        (1..=3u8).map(|i| IdentityKeyPair::from_seed(&IdentitySeed::from_bytes([i; 32]))).collect();
    let ids: Vec<PeerId> = identities.iter().map(IdentityKeyPair::peer_id).collect();
    let mut engines: Vec<Engine<MemoryStore>> = (0..3u8)
        .map(|i| {
            let identity = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes([i + 1; 32]));
            let rng = ChaCha20Rng::seed_from_u64(u64::from(i));
            Engine::new(identity, MemoryStore::new(), EngineConfig::default(), rng, now).unwrap()
        })
        .collect();
    let mut clients: Vec<RelayClient> = (0..3).map(|_| RelayClient::new()).collect();
    let mut relay = Relay::new(MemoryRelayStore::default(), RelayConfig::default()).unwrap();
    let mut seen = BTreeSet::new();
    let mut to_relay: Vec<(usize, RelayFrame)> = Vec::new();
    for i in 0..3 {
        relay.connected(ids[i]);
        let record = PeerRecord::sign(
            &identities[i],
            Vec::new(),
            vec!["relay".into()],
            now,
            now.saturating_add_millis(3_600_000),
            1,
        );
        to_relay.extend(clients[i].on_connect(now, record).into_iter().map(|f| (i, f)));
    }
    let pump = |engines: &mut Vec<Engine<MemoryStore>>,
                clients: &mut Vec<RelayClient>,
                relay: &mut Relay<MemoryRelayStore>,
                to_relay: &mut Vec<(usize, RelayFrame)>,
                seen: &mut BTreeSet<Vec<u8>>| {
        for _ in 0..100 {
            for i in 0..3 {
                state_of(&engines[i], seen);
                while engines[i].poll_event().is_some() {}
                while let Some(peer) = engines[i].poll_lookup() {
                    to_relay.push((i, clients[i].lookup(now, peer)));
                }
                while let Some(t) = engines[i].poll_transmit() {
                    let mut seed = vec![ENVELOPE];
                    seed.extend_from_slice(&t.bytes);
                    seen.insert(seed);
                    to_relay.push((i, clients[i].forward(now, t)));
                }
            }
            if to_relay.is_empty() {
                return;
            }
            for (i, frame) in std::mem::take(to_relay) {
                let bytes = frame.encode();
                let mut seed = vec![FRAME];
                seed.extend_from_slice(&bytes);
                seen.insert(seed);
                relay.handle_frame(now, ids[i], &bytes).unwrap();
            }
            while let Some((to, bytes)) = relay.poll_transmit() {
                let mut seed = vec![FRAME];
                seed.extend_from_slice(&bytes);
                seen.insert(seed);
                let j = ids.iter().position(|p| *p == to).unwrap();
                for action in clients[j].on_frame(now, &bytes).unwrap() {
                    match action {
                        ClientAction::ToEngine(input) => {
                            if let Input::Received { from, bytes } = &input {
                                contents_of(&engines[j], *from, bytes, now, seen);
                            }
                            engines[j].handle(now, input).unwrap();
                        }
                        ClientAction::AfterEngine(frame) => to_relay.push((j, frame)),
                        _ => {}
                    }
                }
            }
        }
    };
    pump(&mut engines, &mut clients, &mut relay, &mut to_relay, &mut seen);
    let send =
        |engines: &mut Vec<Engine<MemoryStore>>, i: usize, command: Command| engines[i].command(now, command).unwrap();
    let CommandOutcome::Conversation(c) = send(&mut engines, 0, Command::CreateConversation { peer: ids[1] }) else {
        panic!()
    };
    send(&mut engines, 0, Command::SendMessage { conversation: c.id, content: "hello bob".into() });
    pump(&mut engines, &mut clients, &mut relay, &mut to_relay, &mut seen);
    send(&mut engines, 1, Command::SendMessage { conversation: c.id, content: "hello alice".into() });
    pump(&mut engines, &mut clients, &mut relay, &mut to_relay, &mut seen);
    let CommandOutcome::Conversation(g) =
        send(&mut engines, 0, Command::CreateGroup { name: "seeds".into(), members: vec![ids[1], ids[2]] })
    else {
        panic!()
    };
    pump(&mut engines, &mut clients, &mut relay, &mut to_relay, &mut seen);
    // Bob wrote to alice, so he is in; carol, who never did, accepts.
    send(&mut engines, 2, Command::AcceptInvitation { group: g.id });
    send(&mut engines, 0, Command::SendGroupMessage { group: g.id, content: "hello group".into() });
    pump(&mut engines, &mut clients, &mut relay, &mut to_relay, &mut seen);
    send(&mut engines, 2, Command::SendGroupMessage { group: g.id, content: "hello from carol".into() });
    pump(&mut engines, &mut clients, &mut relay, &mut to_relay, &mut seen);
    send(&mut engines, 1, Command::Leave { group: g.id });
    pump(&mut engines, &mut clients, &mut relay, &mut to_relay, &mut seen);
    seen
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
