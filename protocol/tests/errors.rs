//! One test for every error variant reachable through the public API, each
//! also checking that the refused input changed nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{pair, rng, NOW};
use p2pchat_protocol::handshake::{self, KeyExchangeError, RequestMark, Response, MAX_REQUEST_CLOCK_SKEW_MS};
use p2pchat_protocol::identity::IdentityError;
use p2pchat_protocol::wire::{KeyExchangeAck, Signature64};
use p2pchat_protocol::{
    ConversationId, DecryptionError, GroupError, GroupSession, IdentityKeyPair, PairwiseSessions, PeerId, Timestamp,
    MAX_SKIP,
};

// ---- Double Ratchet -------------------------------------------------------

#[test]
fn bad_mac_when_the_body_is_altered_and_session_still_works() {
    let mut r = rng(1);
    let mut p = pair(&mut r);
    let mut m = p.a.encrypt(b"hello", &mut r).unwrap();
    let last = m.ciphertext.len() - 1;
    m.ciphertext[last] ^= 1;
    assert_eq!(p.b.decrypt(&m, NOW), Err(DecryptionError::BadMac));
    m.ciphertext[last] ^= 1;
    assert_eq!(&p.b.decrypt(&m, NOW).unwrap()[..], b"hello");
}

#[test]
fn header_mismatch_for_every_altered_header_byte() {
    let mut r = rng(2);
    let mut p = pair(&mut r);
    let m1 = p.a.encrypt(b"one", &mut r).unwrap();
    let m = p.a.encrypt(b"two", &mut r).unwrap();
    // previous_chain_length and the tag itself are covered only by the tag.
    for bit in [0u32, 7, 31] {
        let mut t = m.clone();
        t.header.previous_chain_length ^= 1 << bit;
        assert_eq!(p.b.decrypt(&t, NOW), Err(DecryptionError::HeaderMismatch), "pn bit {bit}");
    }
    for i in 0..16 {
        let mut t = m.clone();
        t.header_tag[i] ^= 0x80;
        assert_eq!(p.b.decrypt(&t, NOW), Err(DecryptionError::HeaderMismatch), "tag byte {i}");
    }
    // The message number selects another key: the tag cannot match either.
    let mut t = m.clone();
    t.header.message_number = 0;
    assert_eq!(p.b.decrypt(&t, NOW), Err(DecryptionError::HeaderMismatch));
    // A different ratchet key means a DH step whose keys do not match.
    for i in 0..32 {
        let mut t = m.clone();
        t.header.ratchet_key[i] ^= 0x01;
        let err = p.b.decrypt(&t, NOW).unwrap_err();
        assert!(
            matches!(err, DecryptionError::HeaderMismatch | DecryptionError::InvalidRatchetKey),
            "ratchet key byte {i}: {err:?}"
        );
    }
    assert_eq!(&p.b.decrypt(&m, NOW).unwrap()[..], b"two");
    assert_eq!(&p.b.decrypt(&m1, NOW).unwrap()[..], b"one");
}

#[test]
fn header_mismatch_when_replayed_into_another_conversation() {
    // Same peers' messages under another session's binding fail the tag.
    let mut r = rng(3);
    let mut p = pair(&mut r);
    let mut q = pair(&mut r);
    let mut m = p.a.encrypt(b"for p", &mut r).unwrap();
    m.header.session_id = q.b.current().id().0;
    assert_eq!(q.b.decrypt(&m, NOW), Err(DecryptionError::HeaderMismatch));
}

#[test]
fn duplicate_is_refused() {
    let mut r = rng(4);
    let mut p = pair(&mut r);
    let m = p.a.encrypt(b"once", &mut r).unwrap();
    p.b.decrypt(&m, NOW).unwrap();
    assert_eq!(p.b.decrypt(&m, NOW), Err(DecryptionError::Duplicate { message_number: 0 }));
    // Also for a message decrypted out of order from the skipped cache.
    let m1 = p.a.encrypt(b"1", &mut r).unwrap();
    let m2 = p.a.encrypt(b"2", &mut r).unwrap();
    p.b.decrypt(&m2, NOW).unwrap();
    p.b.decrypt(&m1, NOW).unwrap();
    assert_eq!(p.b.decrypt(&m1, NOW), Err(DecryptionError::Duplicate { message_number: 1 }));
}

#[test]
fn too_far_ahead_is_refused_but_max_skip_is_fine() {
    let mut r = rng(5);
    let mut p = pair(&mut r);
    let mut msgs = Vec::new();
    for i in 0..=(MAX_SKIP + 1) {
        msgs.push(p.a.encrypt(format!("{i}").as_bytes(), &mut r).unwrap());
    }
    let last = msgs.last().unwrap();
    assert_eq!(
        p.b.decrypt(last, NOW),
        Err(DecryptionError::TooFarAhead { skip: u64::from(MAX_SKIP) + 1, max: MAX_SKIP })
    );
    let at_limit = &msgs[MAX_SKIP as usize];
    assert_eq!(&p.b.decrypt(at_limit, NOW).unwrap()[..], format!("{MAX_SKIP}").as_bytes());
    assert_eq!(p.b.current().skipped_key_count(), MAX_SKIP as usize);
    assert_eq!(&p.b.decrypt(&msgs[0], NOW).unwrap()[..], b"0");
}

#[test]
fn unknown_chain_before_any_receiving_chain() {
    let mut r = rng(6);
    let alice = IdentityKeyPair::generate(&mut r);
    let bob = IdentityKeyPair::generate(&mut r);
    let (pending, request) = handshake::initiate(&alice, bob.peer_id(), NOW, &mut r);
    let accepted = common::new(handshake::respond(&bob, &alice.peer_id(), &request, None, NOW, &mut r).unwrap());
    let mut b = PairwiseSessions::new(accepted.session);
    let mut a = PairwiseSessions::new(pending.complete(&accepted.ack).unwrap());
    // Bob (the responder) holds Alice's ephemeral as her ratchet key but no
    // receiving chain for it: Alice never sends under it.
    let mut m = a.encrypt(b"a1", &mut r).unwrap();
    m.header.ratchet_key = request.ephemeral;
    assert_eq!(b.decrypt(&m, NOW), Err(DecryptionError::UnknownChain));
}

#[test]
fn replay_on_a_retired_chain_is_a_duplicate() {
    let mut r = rng(16);
    let mut p = pair(&mut r);
    let a1 = p.a.encrypt(b"a1", &mut r).unwrap();
    p.b.decrypt(&a1, NOW).unwrap();
    let b1 = p.b.encrypt(b"b1", &mut r).unwrap();
    p.a.decrypt(&b1, NOW).unwrap();
    let a2 = p.a.encrypt(b"a2", &mut r).unwrap();
    p.b.decrypt(&a2, NOW).unwrap();
    // a1's chain is now retired at Bob, and its one key was used.
    assert_eq!(p.b.decrypt(&a1, NOW), Err(DecryptionError::Duplicate { message_number: 0 }));
}

#[test]
fn unknown_session_is_refused() {
    let mut r = rng(7);
    let mut p = pair(&mut r);
    let mut m = p.a.encrypt(b"x", &mut r).unwrap();
    m.header.session_id = [0xEE; 16];
    assert_eq!(p.b.decrypt(&m, NOW), Err(DecryptionError::UnknownSession));
}

#[test]
fn invalid_ratchet_key_is_refused() {
    let mut r = rng(8);
    let mut p = pair(&mut r);
    let mut m = p.a.encrypt(b"x", &mut r).unwrap();
    m.header.ratchet_key = [0; 32]; // a small-order point: DH output is all zero
    assert_eq!(p.b.decrypt(&m, NOW), Err(DecryptionError::InvalidRatchetKey));
}

// ---- Key exchange ----------------------------------------------------------

fn ids() -> (IdentityKeyPair, IdentityKeyPair, rand_chacha::ChaCha20Rng) {
    let mut r = rng(20);
    (IdentityKeyPair::generate(&mut r), IdentityKeyPair::generate(&mut r), r)
}

#[test]
fn request_for_someone_else_is_refused() {
    let (alice, bob, mut r) = ids();
    let carol = IdentityKeyPair::generate(&mut r);
    let (_, request) = handshake::initiate(&alice, carol.peer_id(), NOW, &mut r);
    let err = handshake::respond(&bob, &alice.peer_id(), &request, None, NOW, &mut r).unwrap_err();
    assert_eq!(err, KeyExchangeError::NotForUs { addressed: carol.peer_id(), local: bob.peer_id() });
}

#[test]
fn identity_key_not_matching_the_sender_is_refused() {
    let (alice, bob, mut r) = ids();
    let mallory = IdentityKeyPair::generate(&mut r);
    let (_, request) = handshake::initiate(&mallory, bob.peer_id(), NOW, &mut r);
    let err = handshake::respond(&bob, &alice.peer_id(), &request, None, NOW, &mut r).unwrap_err();
    assert_eq!(
        err,
        KeyExchangeError::Identity(IdentityError::PeerIdMismatch {
            expected: alice.peer_id(),
            actual: mallory.peer_id()
        })
    );
}

#[test]
fn invalid_identity_point_is_refused() {
    // A y coordinate with no point on the curve, hashed to make the peer ID match.
    let bad = not_a_point();
    assert!(p2pchat_protocol::IdentityPublicKey::from_bytes(&bad).is_err());
    let from = p2pchat_protocol::identity::peer_id_of(&bad);
    let (_, bob, mut r) = ids();
    let (_, mut request) = handshake::initiate(&IdentityKeyPair::generate(&mut r), bob.peer_id(), NOW, &mut r);
    request.initiator_identity = bad;
    let err = handshake::respond(&bob, &from, &request, None, NOW, &mut r).unwrap_err();
    assert_eq!(err, KeyExchangeError::Identity(IdentityError::InvalidPublicKey));
}

#[test]
fn non_canonical_and_small_order_identity_keys_are_refused() {
    // The identity point (small order), and y = p + 1 (a non-canonical
    // encoding of the point with y = 1, which also has small order, so both
    // rules apply); and a non-canonical encoding of a large-order point.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    assert!(p2pchat_protocol::IdentityPublicKey::from_bytes(&identity).is_err());
    let (alice, _, _) = ids();
    let canonical = alice.public().to_bytes();
    // Adding p to y only fits when y < 2^255 - 19 - p, i.e. y < 19: build
    // such a key by searching small y values that decode to a large-order point.
    let non_canonical = (2u8..19)
        .map(|y| {
            let mut b = [0xffu8; 32];
            b[0] = 0xed + y; // y + p, little-endian: p = 2^255 - 19
            b[31] = 0x7f;
            b
        })
        .find(|b| {
            let mut reduced = [0u8; 32];
            reduced[0] = b[0].wrapping_sub(0xed);
            p2pchat_protocol::IdentityPublicKey::from_bytes(&reduced).is_ok()
        });
    assert!(p2pchat_protocol::IdentityPublicKey::from_bytes(&canonical).is_ok());
    let non_canonical = non_canonical.expect("some y < 19 is a large-order point");
    assert_eq!(
        p2pchat_protocol::IdentityPublicKey::from_bytes(&non_canonical).unwrap_err(),
        IdentityError::InvalidPublicKey
    );
}

/// The first y coordinate (little-endian, small) that decodes to no point.
fn not_a_point() -> [u8; 32] {
    (2u8..=255)
        .map(|y| {
            let mut b = [0u8; 32];
            b[0] = y;
            b
        })
        .find(|b| p2pchat_protocol::IdentityPublicKey::from_bytes(b).is_err())
        .expect("some small y is off the curve")
}

#[test]
fn bad_request_signature_is_refused() {
    let (alice, bob, mut r) = ids();
    let (_, mut request) = handshake::initiate(&alice, bob.peer_id(), NOW, &mut r);
    request.nonce[0] ^= 1;
    let err = handshake::respond(&bob, &alice.peer_id(), &request, None, NOW, &mut r).unwrap_err();
    assert_eq!(err, KeyExchangeError::Identity(IdentityError::BadSignature));
}

#[test]
fn replayed_request_is_refused_but_a_retransmission_gets_the_same_ack() {
    let (alice, bob, mut r) = ids();
    let (_, request) = handshake::initiate(&alice, bob.peer_id(), NOW, &mut r);
    let accepted = common::new(handshake::respond(&bob, &alice.peer_id(), &request, None, NOW, &mut r).unwrap());
    assert_eq!(accepted.answered.mark, RequestMark { timestamp: NOW, nonce: request.nonce });
    let last = Some(&accepted.answered);
    // The same request again (its ack was lost): the same ack, no new session.
    match handshake::respond(&bob, &alice.peer_id(), &request, last, NOW, &mut r).unwrap() {
        Response::Repeat(ack) => assert_eq!(ack, accepted.ack),
        Response::New(_) => panic!("a retransmitted request must not make a new session"),
    }
    // A forged copy with the same freshness fields but a bad signature is refused.
    let mut forged = request.clone();
    forged.signature.0[0] ^= 1;
    assert_eq!(
        handshake::respond(&bob, &alice.peer_id(), &forged, last, NOW, &mut r).unwrap_err(),
        KeyExchangeError::Identity(IdentityError::BadSignature)
    );
    // An older request is refused as a replay; a newer one is accepted.
    let (_, older) = handshake::initiate(&alice, bob.peer_id(), Timestamp(NOW.0 - 1), &mut r);
    assert_eq!(
        handshake::respond(&bob, &alice.peer_id(), &older, last, NOW, &mut r).unwrap_err(),
        KeyExchangeError::Replayed { initiator: alice.peer_id() }
    );
    let (_, newer) = handshake::initiate(&alice, bob.peer_id(), Timestamp(NOW.0 + 1), &mut r);
    assert!(matches!(handshake::respond(&bob, &alice.peer_id(), &newer, last, NOW, &mut r), Ok(Response::New(_))));
}

#[test]
fn request_far_from_our_clock_is_refused() {
    let (alice, bob, mut r) = ids();
    let later = Timestamp(NOW.0 + MAX_REQUEST_CLOCK_SKEW_MS + 1);
    let (_, request) = handshake::initiate(&alice, bob.peer_id(), later, &mut r);
    let err = handshake::respond(&bob, &alice.peer_id(), &request, None, NOW, &mut r).unwrap_err();
    assert_eq!(err, KeyExchangeError::Stale { skew_ms: MAX_REQUEST_CLOCK_SKEW_MS + 1 });
}

#[test]
fn ack_for_another_request_is_refused_and_pending_survives() {
    let (alice, bob, mut r) = ids();
    let (pending, request) = handshake::initiate(&alice, bob.peer_id(), NOW, &mut r);
    let (_, other) = handshake::initiate(&alice, bob.peer_id(), Timestamp(NOW.0 + 5), &mut r);
    let wrong = common::new(handshake::respond(&bob, &alice.peer_id(), &other, None, NOW, &mut r).unwrap());
    let refused = pending.complete(&wrong.ack).unwrap_err();
    assert_eq!(refused.error, KeyExchangeError::AckMismatch);
    let mut forged = wrong.ack.clone();
    forged.initiator_ephemeral = request.ephemeral;
    forged.request_nonce = request.nonce;
    let refused = refused.pending.complete(&forged).unwrap_err();
    assert_eq!(refused.error, KeyExchangeError::Identity(IdentityError::BadSignature));
    let right = common::new(handshake::respond(&bob, &alice.peer_id(), &request, None, NOW, &mut r).unwrap());
    assert!(refused.pending.complete(&right.ack).is_ok());
}

#[test]
fn ack_from_the_wrong_identity_is_refused() {
    let (alice, bob, mut r) = ids();
    let mallory = IdentityKeyPair::generate(&mut r);
    let (pending, request) = handshake::initiate(&alice, bob.peer_id(), NOW, &mut r);
    // Mallory signs a well-formed ack for Alice's request with her own key.
    let ephemeral = handshake::x25519_public_of(&p2pchat_protocol::keys::X25519Secret::from_bytes([9; 32]));
    let transcript = handshake::ack_transcript(&alice.peer_id(), &mallory.peer_id(), &request, &ephemeral);
    let ack = KeyExchangeAck {
        responder_identity: mallory.public().to_bytes(),
        initiator_ephemeral: request.ephemeral,
        request_nonce: request.nonce,
        ephemeral,
        signature: Signature64(mallory.sign(&transcript)),
    };
    assert_eq!(
        pending.complete(&ack).unwrap_err().error,
        KeyExchangeError::Identity(IdentityError::PeerIdMismatch {
            expected: bob.peer_id(),
            actual: mallory.peer_id()
        })
    );
}

#[test]
fn small_order_ephemeral_is_refused_on_both_sides() {
    let (alice, bob, mut r) = ids();
    // A request whose ephemeral key is the identity point: the DH is zero.
    let (_, mut request) = handshake::initiate(&alice, bob.peer_id(), NOW, &mut r);
    request.ephemeral = [0; 32];
    request.signature = Signature64(alice.sign(&handshake::request_transcript(&alice.peer_id(), &request)));
    let err = handshake::respond(&bob, &alice.peer_id(), &request, None, NOW, &mut r).unwrap_err();
    assert_eq!(err, KeyExchangeError::InvalidEphemeralKey);
    // An ack, properly signed by Bob, whose ephemeral key is the identity point.
    let (pending, request) = handshake::initiate(&alice, bob.peer_id(), NOW, &mut r);
    let transcript = handshake::ack_transcript(&alice.peer_id(), &bob.peer_id(), &request, &[0; 32]);
    let ack = KeyExchangeAck {
        responder_identity: bob.public().to_bytes(),
        initiator_ephemeral: request.ephemeral,
        request_nonce: request.nonce,
        ephemeral: [0; 32],
        signature: Signature64(bob.sign(&transcript)),
    };
    assert_eq!(pending.complete(&ack).unwrap_err().error, KeyExchangeError::InvalidEphemeralKey);
}

// ---- Sender Keys -----------------------------------------------------------

struct Trio {
    ids: Vec<PeerId>,
    groups: Vec<GroupSession>,
}

fn trio(seed: u64) -> (Trio, rand_chacha::ChaCha20Rng) {
    let mut r = rng(seed);
    let ids: Vec<PeerId> = (0..3).map(|_| IdentityKeyPair::generate(&mut r).peer_id()).collect();
    let gid = ConversationId::random_group(&mut r);
    let mut groups: Vec<GroupSession> =
        ids.iter().map(|me| GroupSession::new(gid, *me, ids.clone(), &mut r).unwrap()).collect();
    for i in 0..3 {
        let d = groups[i].distribution();
        for (j, g) in groups.iter_mut().enumerate() {
            if i != j {
                g.accept_distribution(&ids[i], &d, p2pchat_protocol::Timestamp(0)).unwrap();
            }
        }
    }
    (Trio { ids, groups }, r)
}

#[test]
fn group_wrong_group_not_a_member_and_unknown_chain() {
    let (mut t, _) = trio(40);
    let (mut other, _) = trio(41);
    let m = other.groups[0].encrypt(b"elsewhere").unwrap();
    assert!(matches!(t.groups[1].decrypt(&m, NOW), Err(GroupError::WrongGroup { .. })));
    let mut m = t.groups[0].encrypt(b"hi").unwrap();
    let stranger = PeerId([0x55; 20]);
    m.sender = stranger;
    assert_eq!(t.groups[1].decrypt(&m, NOW), Err(GroupError::NotAMember { peer: stranger }));
    let mut m = t.groups[0].encrypt(b"hi").unwrap();
    m.key_id = m.key_id.wrapping_add(1);
    assert_eq!(t.groups[1].decrypt(&m, NOW), Err(GroupError::UnknownChain { sender: t.ids[0], key_id: m.key_id }));
}

#[test]
fn group_bad_signature_duplicate_and_too_far_ahead() {
    let (mut t, _) = trio(42);
    let m = t.groups[0].encrypt(b"hi").unwrap();
    let mut forged = m.clone();
    forged.ciphertext[0] ^= 1;
    assert_eq!(t.groups[1].decrypt(&forged, NOW), Err(GroupError::BadSignature));
    let mut forged = m.clone();
    forged.message_number += 1;
    assert_eq!(t.groups[1].decrypt(&forged, NOW), Err(GroupError::BadSignature));
    assert_eq!(&t.groups[1].decrypt(&m, NOW).unwrap()[..], b"hi");
    assert_eq!(t.groups[1].decrypt(&m, NOW), Err(GroupError::Duplicate { sender: t.ids[0], message_number: 0 }));
    let mut last = None;
    for _ in 0..(MAX_SKIP + 2) {
        last = Some(t.groups[0].encrypt(b"x").unwrap());
    }
    assert_eq!(
        t.groups[1].decrypt(&last.unwrap(), NOW),
        Err(GroupError::TooFarAhead { skip: u64::from(MAX_SKIP) + 1, max: MAX_SKIP })
    );
}

#[test]
fn group_forwarded_invalid_and_conflicting_keys() {
    let (mut t, mut r) = trio(43);
    let d0 = t.groups[0].distribution();
    // Member 1 forwards member 0's key to member 2.
    assert_eq!(
        t.groups[2].accept_distribution(&t.ids[1], &d0, p2pchat_protocol::Timestamp(0)),
        Err(GroupError::ForwardedKey { claimed: t.ids[0], channel: t.ids[1] })
    );
    let mut bad = d0.clone();
    bad.key_id ^= 1;
    bad.signing_public = not_a_point();
    assert_eq!(
        t.groups[2].accept_distribution(&t.ids[0], &bad, p2pchat_protocol::Timestamp(0)),
        Err(GroupError::InvalidSigningKey)
    );
    let mut conflicting = d0.clone();
    conflicting.signing_public = IdentityKeyPair::generate(&mut r).public().to_bytes();
    assert_eq!(
        t.groups[2].accept_distribution(&t.ids[0], &conflicting, p2pchat_protocol::Timestamp(0)),
        Err(GroupError::ConflictingKey { sender: t.ids[0], key_id: d0.key_id })
    );
    let (other, _) = trio(47);
    let elsewhere = other.groups[0].distribution();
    assert!(matches!(
        t.groups[2].accept_distribution(&other.ids[0], &elsewhere, p2pchat_protocol::Timestamp(0)),
        Err(GroupError::WrongGroup { .. })
    ));
    let stranger = PeerId([0x66; 20]);
    let mut from_stranger = d0.clone();
    from_stranger.sender = stranger;
    assert_eq!(
        t.groups[2].accept_distribution(&stranger, &from_stranger, p2pchat_protocol::Timestamp(0)),
        Err(GroupError::NotAMember { peer: stranger })
    );
    // Member 0's key still works at member 2.
    let m = t.groups[0].encrypt(b"still fine").unwrap();
    assert_eq!(&t.groups[2].decrypt(&m, NOW).unwrap()[..], b"still fine");
}

#[test]
fn group_too_many_members_is_refused() {
    let mut r = rng(44);
    let gid = ConversationId::random_group(&mut r);
    let me = PeerId([0; 20]);
    let many: Vec<PeerId> = (0..1000u32)
        .map(|i| {
            let mut id = [1u8; 20];
            id[..4].copy_from_slice(&i.to_be_bytes());
            PeerId(id)
        })
        .collect();
    assert_eq!(GroupSession::new(gid, me, many.clone(), &mut r).unwrap_err(), GroupError::TooManyMembers { max: 1000 });
    let mut g = GroupSession::new(gid, me, many[..999].to_vec(), &mut r).unwrap();
    assert_eq!(g.add_member(PeerId([9; 20])), Err(GroupError::TooManyMembers { max: 1000 }));
}

#[test]
fn departed_member_cannot_read_after_leaving() {
    let (mut t, mut r) = trio(45);
    let leaver = t.ids[2];
    for i in 0..2 {
        let d = t.groups[i].remove_member(&leaver, &mut r).unwrap();
        let other = 1 - i;
        t.groups[other].accept_distribution(&t.ids[i], &d, p2pchat_protocol::Timestamp(0)).unwrap();
    }
    for i in 0..2 {
        let m = t.groups[i].encrypt(b"after the leave").unwrap();
        assert!(t.groups[2].decrypt(&m, NOW).is_err(), "the leaver must not read it");
        assert_eq!(&t.groups[1 - i].decrypt(&m, NOW).unwrap()[..], b"after the leave");
    }
}

#[test]
fn previous_sender_keys_keep_in_flight_messages_readable_up_to_three() {
    let (mut t, mut r) = trio(46);
    let mut in_flight = Vec::new();
    // Member 0 rotates four times (by removing and re-adding member 2),
    // leaving one message in flight under each key.
    for _ in 0..4 {
        in_flight.push(t.groups[0].encrypt(b"in flight").unwrap());
        let d = t.groups[0].remove_member(&t.ids[2], &mut r).unwrap();
        t.groups[0].add_member(t.ids[2]).unwrap();
        t.groups[1].accept_distribution(&t.ids[0], &d, p2pchat_protocol::Timestamp(0)).unwrap();
    }
    // Current key + 3 previous: the newest three in-flight messages decrypt,
    // the oldest (a fourth previous key) is gone.
    assert!(matches!(t.groups[1].decrypt(&in_flight[0], NOW), Err(GroupError::UnknownChain { .. })));
    for m in &in_flight[1..] {
        assert_eq!(&t.groups[1].decrypt(m, NOW).unwrap()[..], b"in flight");
    }
}
