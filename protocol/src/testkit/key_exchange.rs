//! Scenarios of key exchange: lookups, timeouts, retries and backoff, and
//! replacing a session a peer no longer holds.

use super::net::contents;
use super::{Net, TestStore};
use crate::engine::{Command, CommandOutcome, EngineConfig, Input, MessageStatus};
use crate::wire::{Envelope, EnvelopeBody};
use crate::{ConversationId, PeerId};

/// Scenario: a first message starts the key exchange and is delivered then read.
pub fn a_first_message_starts_the_key_exchange_and_is_delivered_then_read<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 2, 1);
    let c = net.conversation(0, 1);
    let sent = net.send(0, c.id, "hello bob");
    let at_alice = net.message(0, &sent.id).unwrap();
    assert_eq!(at_alice.status, MessageStatus::Delivered, "direct path: created straight to delivered");
    assert!(at_alice.delivered_at.is_some());
    assert!(net.kinds(0).contains(&"chat.key_exchange.complete"));
    assert!(net.kinds(1).contains(&"chat.key_exchange.complete"));
    let received = net.message(1, &sent.id).unwrap();
    assert_eq!(received.content, "hello bob");
    assert_eq!(received.sender, net.id(0));
    assert!(net.kinds(1).contains(&"chat.message.received"));
    assert!(net.kinds(1).contains(&"chat.conversation.created"));

    net.command(1, Command::MarkMessageRead { message: sent.id }).unwrap();
    let at_alice = net.message(0, &sent.id).unwrap();
    assert_eq!(at_alice.status, MessageStatus::Read);
    assert!(at_alice.read_at.is_some());
    assert!(net.kinds(0).contains(&"chat.message.read"));
    // Bob's reply goes over the same session, no new key exchange.
    let reply = net.send(1, c.id, "hi alice");
    assert_eq!(net.message(1, &reply.id).unwrap().status, MessageStatus::Delivered);
    assert_eq!(net.kinds(0).iter().filter(|k| **k == "chat.key_exchange.complete").count(), 1);
}

/// Scenario: an offline peer makes the key exchange time out retry and fail.
pub fn an_offline_peer_makes_the_key_exchange_time_out_retry_and_fail<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 2, 2);
    net.nodes[1].online = false;
    let c = net.conversation(0, 1);
    let m = net.send(0, c.id, "anyone there?");
    assert_eq!(net.message(0, &m.id).unwrap().status, MessageStatus::Created);
    // 4 attempts of 10 s each, with backoffs of about 2, 4 and 8 s between them.
    net.advance(60_000);
    let failed = net.message(0, &m.id).unwrap();
    assert_eq!(failed.status, MessageStatus::Failed);
    assert_eq!(failed.failure_reason.as_deref(), Some("key exchange timed out after 10 seconds"));
    assert!(net.kinds(0).contains(&"chat.message.failed"));
    assert!(net.delivered.is_empty(), "nothing reached the offline peer");
}

/// Scenario: a peer unknown to the directory fails after the retries.
pub fn a_peer_unknown_to_the_directory_fails_after_the_retries<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 2, 3);
    let bob = net.id(1);
    net.unknown_to_directory.insert(bob);
    let c = net.conversation(0, 1);
    let m = net.send(0, c.id, "hello?");
    net.advance(30_000);
    let failed = net.message(0, &m.id).unwrap();
    assert_eq!(failed.status, MessageStatus::Failed);
    assert_eq!(failed.failure_reason.as_deref(), Some("peer is unknown to the directory"));
    // The failed message can be retried as a copy once the peer is known.
    net.unknown_to_directory.clear();
    let CommandOutcome::Message(copy) = net.command(0, Command::RetryMessage { message: m.id }).unwrap() else {
        panic!()
    };
    assert_ne!(copy.id, m.id);
    assert_eq!(net.message(0, &copy.id).unwrap().status, MessageStatus::Delivered);
    assert_eq!(net.message(0, &m.id).unwrap().status, MessageStatus::Failed, "the failed one stays failed");
}

/// Scenario: a node whose clock was once a day ahead (it started a key
/// exchange then, which nobody accepted) starts sessions again as soon as
/// its clock is right, not a day later.
pub fn a_clock_that_was_once_far_ahead_does_not_block_new_sessions<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 3, 42);
    net.nodes[2].online = false;
    let ahead = net.now.saturating_add_millis(24 * 60 * 60 * 1000);
    let away = net.id(2);
    net.nodes[0].engine.command(ahead, Command::CreateConversation { peer: away }).unwrap();
    let c = ConversationId::for_peers(&net.id(0), &away);
    net.nodes[0].engine.command(ahead, Command::SendMessage { conversation: c, content: "hello".into() }).unwrap();
    // Its request, stamped a day ahead, goes nowhere.
    let engine = &mut net.nodes[0].engine;
    while let Some(peer) = engine.poll_lookup() {
        engine.handle(ahead, Input::PeerRecord(peer)).unwrap();
    }
    let mut requests = 0;
    while let Some(t) = engine.poll_transmit() {
        requests +=
            usize::from(matches!(Envelope::decode(&t.bytes).map(|e| e.body), Ok(EnvelopeBody::KeyExchangeRequest(_))));
    }
    assert_eq!(requests, 1);
    let c = net.conversation(0, 1);
    let m = net.send(0, c.id, "my clock is right again");
    net.advance(60_000);
    assert_eq!(contents(&mut net, 1, &c.id), vec!["my clock is right again"]);
    assert_eq!(net.message(0, &m.id).unwrap().status, MessageStatus::Delivered);
    assert!(!net.kinds(1).contains(&"chat.security.rejected"), "{:?}", net.kinds(1));
}

/// Scenario: a ratchet message under a session this node does not hold
/// makes it start a new key exchange only with a peer it already talks to,
/// and at most once a minute; from anyone else (a relay can name any
/// sender) it starts no lookup and no dial.
pub fn a_message_under_an_unknown_session_rekeys_only_known_peers_and_at_most_once_a_minute<S: TestStore>(
    make: fn() -> S,
) {
    let mut net = Net::new(make, 3, 43);
    let c01 = net.conversation(0, 1);
    net.send(0, c01.id, "hello 1");
    let c21 = net.conversation(2, 1);
    net.send(2, c21.id, "hello from 2");
    // Envelopes under sessions node 0 does not hold.
    let foreign: Vec<Vec<u8>> = net
        .delivered
        .iter()
        .filter(|(from, to, b)| {
            matches!((*from, *to), (1, 2) | (2, 1))
                && matches!(Envelope::decode(b).map(|e| e.body), Ok(EnvelopeBody::Ratchet(_)))
        })
        .map(|(_, _, b)| b.clone())
        .collect();
    assert!(foreign.len() >= 2);
    let exchanges = |net: &mut Net<S>| {
        let store = net.nodes[0].engine.store_mut();
        store.begin().unwrap();
        let n = store.key_exchanges().unwrap().len();
        store.rollback();
        n
    };

    // As if from node 2, with whom node 0 has no conversation: nothing.
    let lookups = net.lookups[0];
    net.input(0, Input::Received { from: net.id(2), bytes: foreign[0].clone() });
    assert_eq!(net.lookups[0], lookups, "a stranger made the node look it up");
    assert_eq!(exchanges(&mut net), 0, "a stranger made the node start a key exchange");
    assert!(net.kinds(0).contains(&"chat.security.rejected"));

    // As if from node 1, a contact: one new key exchange, then none for a minute.
    net.input(0, Input::Received { from: net.id(1), bytes: foreign[0].clone() });
    assert_eq!(net.lookups[0], lookups + 1, "a contact's unknown session is replaced");
    net.input(0, Input::Received { from: net.id(1), bytes: foreign[1].clone() });
    assert_eq!(net.lookups[0], lookups + 1, "twice within a minute");
    net.advance(61_000);
    net.input(0, Input::Received { from: net.id(1), bytes: foreign[1].clone() });
    assert_eq!(net.lookups[0], lookups + 2, "again after a minute");
    // The conversation carries on.
    let m = net.send(0, c01.id, "still here");
    net.advance(10_000);
    assert_eq!(net.message(0, &m.id).unwrap().status, MessageStatus::Delivered);
}

/// Scenario: a stranger opens a session with node 0 and says nothing for
/// longer than the message TTL: node 0 sweeps the session (and keeps those
/// of the peers it talks to). When the stranger writes at last, under the
/// session node 0 dropped, a new key exchange carries the message.
pub fn a_quiet_strangers_session_is_swept_and_its_next_message_still_arrives<S: TestStore>(make: fn() -> S) {
    let config =
        EngineConfig { message_ttl_ms: 2 * 60 * 60_000, retention_interval_ms: 30 * 60_000, ..EngineConfig::default() };
    let mut net = Net::with_config(make, 4, 64, config);
    let (node0, stranger, friend, other) = (net.id(0), net.id(1), net.id(2), net.id(3));
    // The strangers keep a conversation (so their own sessions stay) but
    // only exchange keys; the friend writes.
    let c1 = net.conversation(1, 0);
    net.command(1, Command::InitiateKeyExchange { peer: node0 }).unwrap();
    net.conversation(3, 0);
    net.command(3, Command::InitiateKeyExchange { peer: node0 }).unwrap();
    let c2 = net.conversation(2, 0);
    net.send(2, c2.id, "hello from a friend");
    let sessions_of = |net: &mut Net<S>, i: usize, peer: &PeerId| {
        let store = net.nodes[i].engine.store_mut();
        store.begin().unwrap();
        let found = (store.sessions(peer).unwrap().is_some(), store.last_heard(peer).unwrap().is_some());
        store.rollback();
        found
    };
    assert_eq!(sessions_of(&mut net, 0, &stranger), (true, true));
    assert!(net.messages(0, &c1.id).is_empty(), "node 0 has no conversation with the stranger");
    // While its session lives, a message from it under a session node 0
    // does not hold (here, the friend's) starts nothing: only a swept
    // session may be replaced for a peer node 0 does not talk to.
    let foreign = net
        .delivered
        .iter()
        .find(|(from, to, b)| {
            (*from, *to) == (2, 0) && matches!(Envelope::decode(b).map(|e| e.body), Ok(EnvelopeBody::Ratchet(_)))
        })
        .map(|(_, _, b)| b.clone())
        .unwrap();
    let lookups = net.lookups[0];
    net.input(0, Input::Received { from: stranger, bytes: foreign.clone() });
    assert_eq!(net.lookups[0], lookups, "a stranger with a live session cannot make node 0 re-key");
    // A month of silence, in this configuration three hours.
    net.advance(3 * 60 * 60_000);
    assert_eq!(sessions_of(&mut net, 0, &stranger), (false, true), "swept, remembered as heard of");
    assert_eq!(sessions_of(&mut net, 0, &friend), (true, true), "a peer node 0 talks to keeps its session");
    assert_eq!(sessions_of(&mut net, 1, &node0), (true, true), "the stranger keeps its own");
    assert_eq!(sessions_of(&mut net, 0, &other), (false, true));
    // Anyone (a relay) naming swept peers gets one re-key per 10 s in all.
    let lookups = net.lookups[0];
    net.input(0, Input::Received { from: other, bytes: foreign.clone() });
    net.input(0, Input::Received { from: stranger, bytes: foreign });
    assert_eq!(net.lookups[0], lookups + 1, "one re-key for two swept peers within 10 s");
    net.advance(11_000);
    // The stranger writes under the session node 0 dropped.
    let m = net.send(1, c1.id, "hello after a long silence");
    net.advance(60_000);
    assert_eq!(contents(&mut net, 0, &c1.id), vec!["hello after a long silence".to_string()]);
    assert!(net.message(1, &m.id).unwrap().status >= MessageStatus::Delivered);
    assert_eq!(sessions_of(&mut net, 0, &stranger), (true, true));
}

/// Scenario: an explicit re-initiation replaces the session; messages in
/// flight under the old one still arrive, and both sides carry on.
pub fn a_key_exchange_can_be_initiated_again<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 2, 26);
    let c = net.conversation(0, 1);
    net.send(0, c.id, "old session");
    let bob = net.id(1);
    net.command(0, Command::InitiateKeyExchange { peer: bob }).unwrap();
    let completions = net.kinds(0).iter().filter(|k| **k == "chat.key_exchange.complete").count();
    assert_eq!(completions, 2, "a second key exchange completed");
    let m = net.send(0, c.id, "new session");
    assert_eq!(net.message(0, &m.id).unwrap().status, MessageStatus::Delivered);
    let r = net.send(1, c.id, "reply");
    assert_eq!(net.message(1, &r.id).unwrap().status, MessageStatus::Delivered);
    assert_eq!(contents(&mut net, 1, &c.id), vec!["old session", "new session", "reply"]);
}

/// Scenario: the key exchange is retried 1 + max_retries times with
/// doubling backoff, and only then do waiting messages fail.
pub fn key_exchange_retries_follow_the_backoff<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 2, 27);
    net.nodes[1].online = false;
    let c = net.conversation(0, 1);
    let m = net.send(0, c.id, "hello?");
    assert_eq!(net.lookups[0], 1);
    // Attempts start at about 0, 12, 26 and 44 s (10 s timeouts, backoffs
    // of 2, 4 and 8 s plus at most a quarter of the base as jitter each).
    net.advance(11_000);
    assert_eq!(net.lookups[0], 1, "the first attempt is still waiting out its backoff");
    net.advance(2_000);
    assert_eq!(net.lookups[0], 2);
    net.advance(37_000);
    assert_eq!(net.lookups[0], 4);
    assert_eq!(net.message(0, &m.id).unwrap().status, MessageStatus::Created, "no failure before the last timeout");
    net.advance(10_000);
    assert_eq!(net.message(0, &m.id).unwrap().status, MessageStatus::Failed);
    assert_eq!(net.lookups[0], 4, "1 + max_retries attempts, no more");
}
