//! The decoder fuzz target's seed corpus (`fuzz/seeds/decode/`) comes from
//! real traffic: three engines and a relay exchange 1:1 and group messages,
//! and every envelope and relay frame they pass is a seed (with the target's
//! selector byte in front: 0 for an envelope, 3 for a relay frame).
//!
//! `P2PCHAT_WRITE_FUZZ_SEEDS=1 cargo test -p p2pchat-protocol --test
//! fuzz_seeds` writes them; without it, the test checks that every committed
//! seed still decodes, so the corpus follows the wire format.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use p2pchat_protocol::engine::{Command, CommandOutcome, Engine, EngineConfig, MemoryStore};
use p2pchat_protocol::keys::IdentitySeed;
use p2pchat_protocol::relay::{
    ClientAction, MemoryRelayStore, PeerRecord, Relay, RelayClient, RelayConfig, RelayFrame,
};
use p2pchat_protocol::wire::Envelope;
use p2pchat_protocol::{IdentityKeyPair, PeerId, Timestamp};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

const ENVELOPE: u8 = 0;
const FRAME: u8 = 3;

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
        to_relay.extend(clients[i].on_connect(record).into_iter().map(|f| (i, f)));
    }
    let pump = |engines: &mut Vec<Engine<MemoryStore>>,
                clients: &mut Vec<RelayClient>,
                relay: &mut Relay<MemoryRelayStore>,
                to_relay: &mut Vec<(usize, RelayFrame)>,
                seen: &mut BTreeSet<Vec<u8>>| {
        for _ in 0..100 {
            for i in 0..3 {
                while engines[i].poll_event().is_some() {}
                while let Some(peer) = engines[i].poll_lookup() {
                    to_relay.push((i, clients[i].lookup(peer)));
                }
                while let Some(t) = engines[i].poll_transmit() {
                    let mut seed = vec![ENVELOPE];
                    seed.extend_from_slice(&t.bytes);
                    seen.insert(seed);
                    to_relay.push((i, clients[i].forward(t)));
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
                        ClientAction::ToEngine(input) => engines[j].handle(now, input).unwrap(),
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
        Some((&FRAME, bytes)) => RelayFrame::decode(bytes).is_ok(),
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
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/seeds/decode exists") {
        let seed = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(decodes(&seed), "a committed seed no longer decodes: rewrite them (see the header)");
        if seed[0] == ENVELOPE {
            kinds.insert(("envelope", seed.get(2).copied().unwrap_or(0)));
        } else {
            kinds.insert(("frame", seed.get(2).copied().unwrap_or(0)));
        }
        count += 1;
    }
    // All four envelope kinds at least, and many frame kinds.
    let envelopes = kinds.iter().filter(|(k, _)| *k == "envelope").count();
    let frames = kinds.iter().filter(|(k, _)| *k == "frame").count();
    assert!(envelopes >= 4 && frames >= 6, "too few kinds in {count} seeds: {kinds:?}");
}
