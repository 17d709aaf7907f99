//! The engine's scenario suite on the in-memory store. The suite itself
//! lives in `p2pchat_protocol::testkit`, so other stores run it too.

use p2pchat_protocol::engine::MemoryStore;

p2pchat_protocol::scenario_tests!(MemoryStore::new);

mod hostile_input {
    //! Arbitrary and mutated bytes from a peer never panic the engine and
    //! never break the conversation.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use p2pchat_protocol::engine::{
        Command, CommandOutcome, Engine, EngineConfig, Input, MemoryStore, MessageStatus, Store,
    };
    use p2pchat_protocol::testkit::NOW;
    use p2pchat_protocol::IdentityKeyPair;
    use proptest::prelude::*;
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn engine(seed: u64) -> Engine<MemoryStore> {
        let mut r = ChaCha20Rng::seed_from_u64(seed);
        Engine::new(IdentityKeyPair::generate(&mut r), MemoryStore::new(), EngineConfig::default(), r, NOW).unwrap()
    }

    /// Runs two engines until quiet; returns every envelope Alice sent Bob.
    fn pump(a: &mut Engine<MemoryStore>, b: &mut Engine<MemoryStore>, seen: &mut Vec<Vec<u8>>) {
        loop {
            let mut busy = false;
            for (from, to, record) in [(0, 1, true), (1, 0, false)] {
                let (src, dst) = if from == 0 { (&mut *a, &mut *b) } else { (&mut *b, &mut *a) };
                let src_id = src.peer_id();
                let mut work = Vec::new();
                while let Some(peer) = src.poll_lookup() {
                    work.push((true, Input::PeerRecord(peer)));
                }
                while let Some(t) = src.poll_transmit() {
                    if record {
                        seen.push(t.bytes.clone());
                    }
                    work.push((false, Input::Received { from: src_id, bytes: t.bytes }));
                    work.push((
                        true,
                        Input::TransmitResult {
                            id: t.id,
                            outcome: p2pchat_protocol::engine::TransmitOutcome::Delivered,
                        },
                    ));
                }
                while src.poll_event().is_some() {}
                for (to_src, input) in work {
                    busy = true;
                    if to_src {
                        src.handle(NOW, input).unwrap()
                    } else {
                        dst.handle(NOW, input).unwrap()
                    }
                }
                let _ = to;
            }
            if !busy {
                break;
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn garbage_never_panics_or_breaks_the_session(
            junk in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..8),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>(), 1u8..=255), 1..8),
        ) {
            let mut a = engine(1);
            let mut b = engine(2);
            let mut seen = Vec::new();
            let peer = b.peer_id();
            let CommandOutcome::Conversation(c) = a.command(NOW, Command::CreateConversation { peer }).unwrap() else { panic!() };
            a.command(NOW, Command::SendMessage { conversation: c.id, content: "first".into() }).unwrap();
            pump(&mut a, &mut b, &mut seen);
            let alice = a.peer_id();
            for bytes in junk {
                b.handle(NOW, Input::Received { from: alice, bytes }).unwrap();
            }
            for (which, at, xor) in flips {
                let mut bytes = which.get(&seen).clone();
                let i = at.index(bytes.len());
                bytes[i] ^= xor;
                b.handle(NOW, Input::Received { from: alice, bytes }).unwrap();
            }
            while b.poll_transmit().is_some() {}
            let CommandOutcome::Message(m) =
                a.command(NOW, Command::SendMessage { conversation: c.id, content: "after".into() }).unwrap() else { panic!() };
            pump(&mut a, &mut b, &mut seen);
            let store = a.store_mut();
            store.begin().unwrap();
            let status = store.message(&m.id).unwrap().unwrap().status;
            store.rollback();
            prop_assert_eq!(status, MessageStatus::Delivered);
        }
    }
}
