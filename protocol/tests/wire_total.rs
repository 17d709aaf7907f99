//! Decoding is total: arbitrary bytes never panic, and every valid value
//! round-trips through exactly one encoding.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{pair, rng};
use p2pchat_protocol::wire::{ChatContent, Envelope, EnvelopeBody, PairwisePayload, PROTOCOL_VERSION};
use p2pchat_protocol::{handshake, ConversationId, GroupSession};
use proptest::prelude::*;

fn sample_envelopes() -> Vec<Vec<u8>> {
    let mut r = rng(11);
    let mut p = pair(&mut r);
    let (_, request) = handshake::initiate(&p.alice, p.bob.peer_id(), common::NOW, &mut r);
    let accepted =
        common::new(handshake::respond(&p.bob, &p.alice.peer_id(), &request, None, common::NOW, &mut r).unwrap());
    let ratchet = p.a.encrypt(b"hello", &mut r).unwrap();
    let gid = ConversationId::random_group(&mut r);
    let mut group = GroupSession::new(gid, p.alice.peer_id(), [p.bob.peer_id()], &mut r).unwrap();
    let gm = group.encrypt(b"group hello").unwrap();
    [
        EnvelopeBody::KeyExchangeRequest(request),
        EnvelopeBody::KeyExchangeAck(accepted.ack),
        EnvelopeBody::Ratchet(ratchet),
        EnvelopeBody::Group(gm),
    ]
    .into_iter()
    .map(|b| Envelope::new(b).encode())
    .collect()
}

#[test]
fn samples_round_trip() {
    for bytes in sample_envelopes() {
        assert_eq!(bytes[0], PROTOCOL_VERSION);
        let decoded = Envelope::decode(&bytes).unwrap();
        assert_eq!(decoded.encode(), bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Envelope::decode(&bytes);
        let _ = PairwisePayload::decode(&bytes);
        let _ = ChatContent::decode(&bytes);
    }

    #[test]
    fn arbitrary_bodies_after_a_valid_version_never_panic(kind in 0u8..5, tail in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut bytes = vec![PROTOCOL_VERSION, kind];
        bytes.extend(tail);
        if let Ok(env) = Envelope::decode(&bytes) {
            // Whatever decodes re-encodes to the same bytes: one encoding per value.
            prop_assert_eq!(env.encode(), bytes);
        }
    }

    #[test]
    fn mutated_valid_envelopes_never_panic(which in 0usize..4, pos in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let samples = sample_envelopes();
        let mut bytes = samples[which].clone();
        let i = pos.index(bytes.len());
        bytes[i] = byte;
        let _ = Envelope::decode(&bytes);
        let _ = Envelope::decode(&bytes[..cut.index(bytes.len())]);
    }
}
