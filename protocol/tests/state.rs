//! Persisted state restores to a working equivalent: conversations carry on
//! after a save and restore, and corrupt state is refused with a clear error.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{pair, rng, NOW};
use p2pchat_protocol::handshake::{self, PendingKeyExchange};
use p2pchat_protocol::state::STATE_VERSION;
use p2pchat_protocol::{ConversationId, GroupSession, IdentityKeyPair, PairwiseSessions, StateError};

#[test]
fn pairwise_sessions_carry_on_after_a_restore() {
    let mut r = rng(1);
    let mut p = pair(&mut r);
    // Traffic both ways, leaving two skipped keys at Bob.
    let m0 = p.a.encrypt(b"0", &mut r).unwrap();
    let m1 = p.a.encrypt(b"1", &mut r).unwrap();
    let m2 = p.a.encrypt(b"2", &mut r).unwrap();
    p.b.decrypt(&m2, NOW).unwrap();
    let reply = p.b.encrypt(b"r", &mut r).unwrap();
    p.a.decrypt(&reply, NOW).unwrap();

    let saved_b = p.b.to_bytes();
    let saved_a = p.a.to_bytes();
    let mut b = PairwiseSessions::from_bytes(&saved_b).unwrap();
    let mut a = PairwiseSessions::from_bytes(&saved_a).unwrap();
    assert_eq!(*b.to_bytes(), *saved_b, "a restore is exact");
    assert_eq!(b.skipped_key_count(), 2);
    assert_eq!(b.is_confirmed(), p.b.is_confirmed());
    // Skipped keys survive; so does the duplicate check.
    assert_eq!(&b.decrypt(&m0, NOW).unwrap()[..], b"0");
    assert_eq!(&b.decrypt(&m1, NOW).unwrap()[..], b"1");
    assert!(b.decrypt(&m2, NOW).is_err());
    // And the chains go on, with DH steps, both ways.
    for round in 0..3 {
        let m = a.encrypt(format!("a{round}").as_bytes(), &mut r).unwrap();
        assert_eq!(&b.decrypt(&m, NOW).unwrap()[..], format!("a{round}").as_bytes());
        let m = b.encrypt(format!("b{round}").as_bytes(), &mut r).unwrap();
        assert_eq!(&a.decrypt(&m, NOW).unwrap()[..], format!("b{round}").as_bytes());
    }
}

#[test]
fn groups_carry_on_after_a_restore() {
    let mut r = rng(2);
    let ids: Vec<_> = (0..3).map(|_| IdentityKeyPair::generate(&mut r).peer_id()).collect();
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
    let early = groups[0].encrypt(b"early").unwrap();
    let later = groups[0].encrypt(b"later").unwrap();
    groups[1].decrypt(&later, NOW).unwrap();
    // Member 0 rotates once, so member 1 holds a previous key too.
    let d = groups[0].rotate_own_key(&mut r);
    groups[1].accept_distribution(&ids[0], &d, p2pchat_protocol::Timestamp(0)).unwrap();

    let saved = groups[1].to_bytes();
    let mut restored = GroupSession::from_bytes(&saved).unwrap();
    assert_eq!(*restored.to_bytes(), *saved);
    assert_eq!(&restored.decrypt(&early, NOW).unwrap()[..], b"early", "skipped key of a previous sender key");
    assert!(restored.decrypt(&later, NOW).is_err(), "duplicate after restore");
    let fresh = groups[0].encrypt(b"fresh").unwrap();
    assert_eq!(&restored.decrypt(&fresh, NOW).unwrap()[..], b"fresh");
    // The restored member's own key still reaches the others.
    let own = restored.encrypt(b"from the restored member").unwrap();
    assert_eq!(&groups[2].decrypt(&own, NOW).unwrap()[..], b"from the restored member");
}

#[test]
fn a_pending_key_exchange_completes_after_a_restore() {
    let mut r = rng(3);
    let alice = IdentityKeyPair::generate(&mut r);
    let bob = IdentityKeyPair::generate(&mut r);
    let (pending, request) = handshake::initiate(&alice, bob.peer_id(), NOW, &mut r);
    let restored = PendingKeyExchange::from_bytes(&pending.to_bytes()).unwrap();
    drop(pending);
    let accepted = common::new(handshake::respond(&bob, &alice.peer_id(), &request, None, NOW, &mut r).unwrap());
    let mut a = PairwiseSessions::new(restored.complete(&accepted.ack).unwrap());
    let mut b = PairwiseSessions::new(accepted.session);
    let m = a.encrypt(b"restored", &mut r).unwrap();
    assert_eq!(&b.decrypt(&m, NOW).unwrap()[..], b"restored");
}

#[test]
fn corrupt_state_is_refused() {
    let mut r = rng(4);
    let p = pair(&mut r);
    let saved = p.a.to_bytes();
    let mut other_version = saved.to_vec();
    other_version[0] = STATE_VERSION + 1;
    assert_eq!(
        PairwiseSessions::from_bytes(&other_version).unwrap_err(),
        StateError::UnsupportedVersion(STATE_VERSION + 1)
    );
    assert!(matches!(PairwiseSessions::from_bytes(&saved[..saved.len() - 1]), Err(StateError::Malformed { .. })));
    assert!(matches!(PairwiseSessions::from_bytes(&[]), Err(StateError::Malformed { .. })));
    let mut trailing = saved.to_vec();
    trailing.push(0);
    assert!(matches!(PairwiseSessions::from_bytes(&trailing), Err(StateError::Malformed { .. })));
    // An identity key that is not a point.
    let mut bad_key = saved.to_vec();
    // Layout: version, session ID (16), role (1), initiator identity (32)...
    bad_key[18..50].copy_from_slice(&[0u8; 32]);
    assert!(matches!(PairwiseSessions::from_bytes(&bad_key), Err(StateError::InvalidKey(_))));
}
