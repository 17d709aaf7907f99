//! The skipped-key cache's limits: the per-conversation budget with
//! oldest-first eviction, and the 7-day lifetime.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{pair, rng, NOW};
use p2pchat_protocol::wire::RatchetMessage;
use p2pchat_protocol::{
    ConversationId, DecryptionError, GroupSession, IdentityKeyPair, PairwiseSessions, Timestamp, MAX_SKIP,
    MAX_SKIPPED_KEYS, SKIPPED_KEY_MAX_AGE_MS,
};
use rand_chacha::ChaCha20Rng;

fn chain(from: &mut PairwiseSessions, count: u32, r: &mut ChaCha20Rng) -> Vec<RatchetMessage> {
    (0..count).map(|i| from.encrypt(format!("{i}").as_bytes(), r).unwrap()).collect()
}

/// Bob receives the last of `count` messages on a new chain of Alice's,
/// skipping the others, then answers so Alice's next chain is new again.
fn skip_chain(
    a: &mut PairwiseSessions,
    b: &mut PairwiseSessions,
    count: u32,
    now: Timestamp,
    r: &mut ChaCha20Rng,
) -> Vec<RatchetMessage> {
    let msgs = chain(a, count, r);
    b.decrypt(msgs.last().unwrap(), now).unwrap();
    let reply = b.encrypt(b"ack", r).unwrap();
    a.decrypt(&reply, now).unwrap();
    msgs
}

#[test]
fn the_budget_is_per_conversation_and_evicts_the_oldest_first() {
    let mut r = rng(1);
    let mut p = pair(&mut r);
    let t1 = NOW;
    let t2 = NOW.saturating_add_millis(1_000);
    let t3 = NOW.saturating_add_millis(2_000);
    let first = skip_chain(&mut p.a, &mut p.b, MAX_SKIP + 1, t1, &mut r);
    let second = skip_chain(&mut p.a, &mut p.b, MAX_SKIP + 1, t2, &mut r);
    assert_eq!(p.b.skipped_key_count(), MAX_SKIPPED_KEYS);
    // Five more skipped keys push the five oldest (the first chain's) out.
    let third = skip_chain(&mut p.a, &mut p.b, 6, t3, &mut r);
    assert_eq!(p.b.skipped_key_count(), MAX_SKIPPED_KEYS);
    for m in &first[..5] {
        assert_eq!(p.b.decrypt(m, t3), Err(DecryptionError::Duplicate { message_number: m.header.message_number }));
    }
    assert_eq!(&p.b.decrypt(&first[5], t3).unwrap()[..], b"5");
    assert_eq!(&p.b.decrypt(&second[0], t3).unwrap()[..], b"0");
    assert_eq!(&p.b.decrypt(&third[0], t3).unwrap()[..], b"0");
}

#[test]
fn a_replaced_session_keeps_its_keys_until_the_new_one_is_used() {
    let mut r = rng(2);
    let mut p = pair(&mut r);
    let old = skip_chain(&mut p.a, &mut p.b, MAX_SKIP + 1, NOW, &mut r);
    // Re-key; the old session keeps its 1,000 skipped keys for in-flight messages.
    let (pending, request) = p2pchat_protocol::handshake::initiate(&p.alice, p.bob.peer_id(), NOW, &mut r);
    let accepted = common::new(
        p2pchat_protocol::handshake::respond(&p.bob, &p.alice.peer_id(), &request, None, NOW, &mut r).unwrap(),
    );
    p.b.install(accepted.session).unwrap();
    p.a.install(pending.complete(&accepted.ack).unwrap()).unwrap();
    let later = NOW.saturating_add_millis(10);
    // A message under the new session is needed before the new session is
    // current at Bob, and retires the old session with its keys.
    let msgs = chain(&mut p.a, MAX_SKIP + 1, &mut r);
    assert_eq!(&p.b.decrypt(&old[0], later).unwrap()[..], b"0", "in flight across the re-key");
    p.b.decrypt(msgs.last().unwrap(), later).unwrap();
    assert!(p.b.skipped_key_count() <= MAX_SKIPPED_KEYS);
    assert_eq!(p.b.skipped_key_count(), MAX_SKIP as usize, "the old session's keys went with it");
}

#[test]
fn skipped_keys_expire_after_seven_days() {
    let mut r = rng(3);
    let mut p = pair(&mut r);
    let early = skip_chain(&mut p.a, &mut p.b, 4, NOW, &mut r);
    let day = 24 * 60 * 60 * 1000;
    let later_time = NOW.saturating_add_millis(2 * day);
    let late = skip_chain(&mut p.a, &mut p.b, 3, later_time, &mut r);
    assert_eq!(p.b.skipped_key_count(), 3 + 2);
    // Just under seven days after the first skip, nothing has expired.
    assert_eq!(p.b.expire_skipped_keys(NOW.saturating_add_millis(SKIPPED_KEY_MAX_AGE_MS)), 0);
    // Past it, the first chain's three keys go; the later chain's stay.
    assert_eq!(p.b.expire_skipped_keys(NOW.saturating_add_millis(SKIPPED_KEY_MAX_AGE_MS + 1)), 3);
    let now = NOW.saturating_add_millis(SKIPPED_KEY_MAX_AGE_MS + 1);
    assert!(p.b.decrypt(&early[0], now).is_err());
    assert_eq!(&p.b.decrypt(&late[0], now).unwrap()[..], b"0");
}

#[test]
fn group_skipped_keys_share_one_budget_and_expire() {
    let mut r = rng(4);
    let ids: Vec<_> = (0..4).map(|_| IdentityKeyPair::generate(&mut r).peer_id()).collect();
    let gid = ConversationId::random_group(&mut r);
    let mut groups: Vec<GroupSession> =
        ids.iter().map(|me| GroupSession::new(gid, *me, ids.clone(), &mut r).unwrap()).collect();
    for i in 0..3 {
        let d = groups[i].distribution();
        groups[3].accept_distribution(&ids[i], &d, p2pchat_protocol::Timestamp(0)).unwrap();
    }
    // Members 0, 1 and 2 each send 1,001 messages; member 3 receives only
    // the last of each, at times one second apart.
    let mut first_of = Vec::new();
    for i in 0..3 {
        let msgs: Vec<_> = (0..=MAX_SKIP).map(|n| groups[i].encrypt(format!("{i}:{n}").as_bytes()).unwrap()).collect();
        groups[3].decrypt(msgs.last().unwrap(), NOW.saturating_add_millis(1_000 * i as u64)).unwrap();
        first_of.push(msgs);
    }
    assert_eq!(groups[3].skipped_key_count(), MAX_SKIPPED_KEYS);
    // Member 0's oldest 1,000 keys were evicted first, all of them.
    assert!(groups[3].decrypt(&first_of[0][0], NOW).is_err());
    assert_eq!(&groups[3].decrypt(&first_of[1][0], NOW).unwrap()[..], b"1:0");
    let expired = groups[3].expire_skipped_keys(NOW.saturating_add_millis(1_000 + SKIPPED_KEY_MAX_AGE_MS + 1));
    assert_eq!(expired, MAX_SKIP as usize - 1, "member 1's remaining keys expire; member 2's are a second younger");
    assert_eq!(&groups[3].decrypt(&first_of[2][5], NOW).unwrap()[..], b"2:5");
}
