//! The engine's scenario suite on the in-memory store. The suite itself
//! lives in `p2pchat_protocol::testkit`, so other stores run it too.

use p2pchat_protocol::engine::MemoryStore;

p2pchat_protocol::scenario_tests!(MemoryStore::new);

mod hostile_input {
    //! Arbitrary and mutated bytes from a peer never panic the engine and
    //! never break the conversation.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use p2pchat_protocol::engine::{
        Command, CommandOutcome, Engine, EngineConfig, Input, MemoryStore, MessageStatus, MessageStore, Transaction,
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

/// A key exchange request that fails its checks (here, one from too long
/// ago) must not cancel the receiver's own attempt, even where the crossing
/// rule would have it answer the peer's request instead: the messages
/// waiting for that attempt would be left `created`, with nothing to wake
/// them. Found by the `pair` fuzz target.
#[test]
#[allow(clippy::unwrap_used, clippy::panic)]
fn a_stale_request_does_not_cancel_our_own_key_exchange() {
    use p2pchat_protocol::engine::{
        Command, CommandOutcome, Engine, EngineConfig, Input, MemoryStore, TransmitOutcome,
    };
    use p2pchat_protocol::handshake::CrossedRequests;
    use p2pchat_protocol::keys::IdentitySeed;
    use p2pchat_protocol::{IdentityKeyPair, Timestamp};
    use rand_chacha::rand_core::SeedableRng;

    let start = Timestamp::from_millis(1_750_000_000_000);
    let mut engines: Vec<Engine<MemoryStore>> = (1..=2u8)
        .map(|i| {
            let identity = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes([i; 32]));
            let rng = rand_chacha::ChaCha20Rng::seed_from_u64(u64::from(i));
            Engine::new(identity, MemoryStore::new(), EngineConfig::default(), rng, start).unwrap()
        })
        .collect();
    // `a` is the side that, on crossed requests, answers the peer's.
    let ids = [engines[0].peer_id(), engines[1].peer_id()];
    let (a, b) = match CrossedRequests::resolve(&ids[0], &ids[1]) {
        CrossedRequests::AnswerTheirs => (0, 1),
        CrossedRequests::KeepOurs => (1, 0),
    };
    // Every transmit of `i`, reported taken, with lookups answered.
    let take = |engine: &mut Engine<MemoryStore>, now: Timestamp| {
        let mut out = Vec::new();
        loop {
            let mut inputs = Vec::new();
            while let Some(peer) = engine.poll_lookup() {
                inputs.push(Input::PeerRecord(peer));
            }
            while let Some(t) = engine.poll_transmit() {
                out.push(t.bytes);
                inputs.push(Input::TransmitResult { id: t.id, outcome: TransmitOutcome::Delivered });
            }
            if inputs.is_empty() {
                return out;
            }
            for input in inputs {
                engine.handle(now, input).unwrap();
            }
        }
    };
    // `b` asks for a key exchange now; its request is held back for 20 minutes.
    engines[b].command(start, Command::InitiateKeyExchange { peer: ids[a] }).unwrap();
    let stale = take(&mut engines[b], start);
    assert_eq!(stale.len(), 1);
    // Twenty minutes on, `a` writes to `b`, which starts `a`'s own exchange.
    let later = start.saturating_add_millis(20 * 60 * 1000);
    let CommandOutcome::Conversation(c) =
        engines[a].command(later, Command::CreateConversation { peer: ids[b] }).unwrap()
    else {
        panic!()
    };
    let CommandOutcome::Message(m) =
        engines[a].command(later, Command::SendMessage { conversation: c.id, content: "hello".into() }).unwrap()
    else {
        panic!()
    };
    let request = take(&mut engines[a], later);
    // The stale request arrives: refused, and `a`'s attempt stands.
    engines[a].handle(later, Input::Received { from: ids[b], bytes: stale[0].clone() }).unwrap();
    let rejected = std::iter::from_fn(|| engines[a].poll_event())
        .any(|e| matches!(e, p2pchat_protocol::engine::Event::SecurityRejected { .. }));
    assert!(rejected, "the stale request is refused");
    // Meanwhile `b`'s own attempt ran out of time and retries (its new
    // requests lost), so `b` answers `a`'s request.
    while let Some(deadline) = engines[b].poll_timeout().filter(|t| *t <= later) {
        engines[b].handle(deadline, Input::Timeout).unwrap();
        take(&mut engines[b], deadline);
    }
    // `a`'s own request completes the exchange, and the message goes.
    for bytes in request {
        engines[b].handle(later, Input::Received { from: ids[a], bytes }).unwrap();
    }
    for bytes in take(&mut engines[b], later) {
        engines[a].handle(later, Input::Received { from: ids[b], bytes }).unwrap();
    }
    let sent = take(&mut engines[a], later);
    assert!(!sent.is_empty(), "the waiting message is sent under the new session");
    for bytes in sent {
        engines[b].handle(later, Input::Received { from: ids[a], bytes }).unwrap();
    }
    let arrived = std::iter::from_fn(|| engines[b].poll_event()).any(
        |e| matches!(e, p2pchat_protocol::engine::Event::MessageReceived(r) if r.id == m.id && r.content == "hello"),
    );
    assert!(arrived, "the message that waited arrives");
}
