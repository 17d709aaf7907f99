//! No `Debug` output may carry secret bytes. Snapshot the key types exactly,
//! and check that composite types print no byte arrays at all.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{pair, rng, NOW};
use p2pchat_protocol::keys::{
    ChainKey, CipherKey, HeaderKey, IdentitySeed, MessageKey, RootKey, SenderChainKey, SenderMessageKey, X25519Secret,
};
use p2pchat_protocol::{handshake, kdf, ConversationId, GroupSession, IdentityKeyPair};

const SECRET: [u8; 32] = [0xA7; 32];

/// The ways 0xA7 bytes could appear in a formatted value.
fn assert_no_secret(shown: &str) {
    assert!(!shown.contains("167"), "decimal secret byte in {shown}");
    assert!(!shown.to_lowercase().contains("a7a7"), "hex secret bytes in {shown}");
}

/// No run of eight or more comma-separated numbers (an array of bytes).
fn assert_no_byte_arrays(shown: &str) {
    let mut run = 0;
    for part in shown.split(',') {
        if part.trim().trim_start_matches('[').trim_end_matches(']').parse::<u64>().is_ok() {
            run += 1;
            assert!(run < 8, "byte array in {shown}");
        } else {
            run = 0;
        }
    }
    let hex_run = shown.chars().fold((0usize, 0usize), |(cur, max), c| {
        let cur = if c.is_ascii_hexdigit() { cur + 1 } else { 0 };
        (cur, max.max(cur))
    });
    // Peer IDs (40 hex digits) may show; nothing longer may.
    assert!(hex_run.1 <= 40, "long hex run in {shown}");
}

#[test]
fn key_types_print_only_their_name() {
    assert_eq!(format!("{:?}", RootKey::from_bytes(SECRET)), "RootKey(..)");
    assert_eq!(format!("{:?}", ChainKey::from_bytes(SECRET)), "ChainKey(..)");
    assert_eq!(format!("{:?}", MessageKey::from_bytes(SECRET)), "MessageKey(..)");
    assert_eq!(format!("{:#?}", SenderChainKey::from_bytes(SECRET)), "SenderChainKey(..)");
    assert_eq!(format!("{:?}", SenderMessageKey::from_bytes(SECRET)), "SenderMessageKey(..)");
    assert_eq!(format!("{:?}", CipherKey::from_bytes(SECRET)), "CipherKey(..)");
    assert_eq!(format!("{:?}", HeaderKey::from_bytes(SECRET)), "HeaderKey(..)");
    assert_eq!(format!("{:?}", IdentitySeed::from_bytes(SECRET)), "IdentitySeed(..)");
    assert_eq!(format!("{:?}", X25519Secret::from_bytes(SECRET)), "X25519Secret(..)");
    let expanded = kdf::expand_ratchet_message_key(&MessageKey::from_bytes(SECRET));
    assert_eq!(format!("{expanded:?}"), "RatchetMessageKeys { .. }");
    let expanded = kdf::expand_sender_message_key(&SenderMessageKey::from_bytes(SECRET));
    assert_eq!(format!("{expanded:?}"), "SenderMessageKeys { .. }");
}

#[test]
fn identity_prints_its_peer_id_only() {
    let id = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(SECRET));
    let shown = format!("{id:?} {id:#?}");
    assert_no_secret(&shown);
    assert!(shown.contains(&id.peer_id().to_string()));
}

#[test]
fn sessions_handshakes_and_groups_print_no_key_material() {
    let mut r = rng(1);
    let mut p = pair(&mut r);
    let m = p.a.encrypt(b"x", &mut r).unwrap();
    p.b.decrypt(&m, NOW).unwrap();
    assert_no_byte_arrays(&format!("{:?} {:#?} {:?}", p.a, p.b, p.a.current()));

    let (pending, request) = handshake::initiate(&p.alice, p.bob.peer_id(), NOW, &mut r);
    let response = handshake::respond(&p.bob, &p.alice.peer_id(), &request, None, NOW, &mut r).unwrap();
    assert_no_byte_arrays(&format!("{pending:?} {response:#?}"));
    let accepted = common::new(response);
    let mut ack = accepted.ack.clone();
    ack.ephemeral = [0; 32];
    let refused = pending.complete(&ack).unwrap_err();
    assert_no_byte_arrays(&format!("{refused:?} {refused}"));

    let gid = ConversationId::random_group(&mut r);
    let group = GroupSession::new(gid, p.alice.peer_id(), [p.bob.peer_id()], &mut r).unwrap();
    let mut dist = group.distribution();
    dist.chain_key = SECRET;
    let shown = format!("{group:?} {dist:?} {dist:#?}");
    assert_no_byte_arrays(&shown);
    assert_no_secret(&shown);
}
