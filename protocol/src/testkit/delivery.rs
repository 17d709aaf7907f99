//! Scenarios of delivery: the outbox to an offline peer, retransmission,
//! transmit results, and failed commits that must lose nothing.

use super::net::contents;
use super::{Net, TestStore};
use crate::engine::{
    Command, EngineError, Input, InternalError, MessageStatus, SendFailure, Transmit, TransmitOutcome,
};
use crate::MessageId;

/// Scenario: messages to an offline peer are sent then delivered in order exactly once.
pub fn messages_to_an_offline_peer_are_sent_then_delivered_in_order_exactly_once<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 2, 4);
    let c = net.conversation(0, 1);
    net.send(0, c.id, "while online");
    net.set_online(1, false);
    let ids: Vec<MessageId> = (0..5).map(|i| net.send(0, c.id, &format!("queued {i}")).id).collect();
    for id in &ids {
        assert_eq!(net.message(0, id).unwrap().status, MessageStatus::Sent);
    }
    assert!(net.kinds(0).contains(&"chat.message.sent"));
    net.advance(60 * 60 * 1000);
    net.set_online(1, true);
    for id in &ids {
        assert_eq!(net.message(0, id).unwrap().status, MessageStatus::Delivered);
    }
    let at_bob: Vec<String> = net.messages(1, &c.id).into_iter().map(|m| m.content).collect();
    assert_eq!(at_bob, vec!["while online", "queued 0", "queued 1", "queued 2", "queued 3", "queued 4"]);
}

/// Scenario: messages to a peer that stays offline for three days, retried
/// every 30 s and reaching no one, are sent again as the same sealed copies
/// (sealed afresh only after 6 days), so the sending chain does not run
/// thousands of keys past what the peer may skip, and everything arrives
/// when it returns.
pub fn a_peer_offline_for_days_gets_what_was_sent_meanwhile_under_few_message_keys<S: TestStore>(make: fn() -> S) {
    const DAY_MS: u64 = 24 * 60 * 60_000;
    let mut net = Net::new(make, 2, 14);
    let c = net.conversation(0, 1);
    net.send(0, c.id, "while online");
    net.set_online(1, false);
    let keys_before = net.seen_keys.len();
    let ids: Vec<MessageId> = (0..3).map(|i| net.send(0, c.id, &format!("queued {i}")).id).collect();
    net.advance(3 * DAY_MS);
    let sealed = net.seen_keys.len() - keys_before;
    // One seal per message, sent again as it is for 6 days (sealing afresh
    // on each of the 8,640 retries would take 25,920).
    assert_eq!(sealed, 3, "{sealed} message keys used for 3 messages in 3 days");
    net.set_online(1, true);
    net.advance(60_000);
    for id in &ids {
        assert_eq!(net.message(0, id).unwrap().status, MessageStatus::Delivered);
    }
    let at_bob: Vec<String> = net.messages(1, &c.id).into_iter().map(|m| m.content).collect();
    assert_eq!(at_bob, vec!["while online", "queued 0", "queued 1", "queued 2"]);
}

/// Scenario: a lost delivery confirmation is repaired by retransmission.
pub fn a_lost_delivery_confirmation_is_repaired_by_retransmission<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 2, 5);
    let c = net.conversation(0, 1);
    net.send(0, c.id, "warm up");
    let bob = net.id(1);
    let mut dropped = 0;
    // Lose Bob's next delivery receipt.
    net.lose = Box::new(move |_from: usize, t: &Transmit| {
        let is_receipt_from_bob = t.peer != bob && dropped == 0;
        if is_receipt_from_bob {
            dropped += 1;
        }
        is_receipt_from_bob
    });
    let m = net.send(0, c.id, "confirm me");
    assert_eq!(net.message(0, &m.id).unwrap().status, MessageStatus::Created);
    net.lose = Box::new(|_, _| false);
    net.advance(31_000);
    assert_eq!(net.message(0, &m.id).unwrap().status, MessageStatus::Delivered);
    let copies = net.messages(1, &c.id).into_iter().filter(|x| x.id == m.id).count();
    assert_eq!(copies, 1, "the retransmission is stored once");
    assert_eq!(net.kinds(1).iter().filter(|k| **k == "chat.message.received").count(), 2);
}

/// Scenario: a failed commit releases nothing and loses nothing.
pub fn a_failed_commit_releases_nothing_and_loses_nothing<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 2, 6);
    let c = net.conversation(0, 1);
    net.send(0, c.id, "before");
    let events_before = net.nodes[0].events.len();
    net.nodes[0].engine.store_mut().fail_next_commits(1);
    let err = net.nodes[0]
        .engine
        .command(net.now, Command::SendMessage { conversation: c.id, content: "lost?".into() })
        .unwrap_err();
    assert!(matches!(err, EngineError::Internal(InternalError::Store(_))));
    assert!(net.nodes[0].engine.poll_transmit().is_none(), "no bytes leave before a commit");
    assert!(net.nodes[0].engine.poll_event().is_none());
    assert_eq!(net.nodes[0].events.len(), events_before);
    assert_eq!(net.messages(0, &c.id).len(), 1, "nothing of the failed command was stored");
    // The same command again works, and the session is still in step.
    let m = net.send(0, c.id, "after");
    assert_eq!(net.message(0, &m.id).unwrap().status, MessageStatus::Delivered);
    let at_bob: Vec<String> = net.messages(1, &c.id).into_iter().map(|m| m.content).collect();
    assert_eq!(at_bob, vec!["before", "after"]);
}

/// Scenario: an engine rebuilt from its store carries on.
pub fn an_engine_rebuilt_from_its_store_carries_on<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 2, 7);
    let c = net.conversation(0, 1);
    net.send(0, c.id, "one");
    net.restart(0);
    net.restart(1);
    let m = net.send(0, c.id, "two");
    assert_eq!(net.message(0, &m.id).unwrap().status, MessageStatus::Delivered);
    let r = net.send(1, c.id, "three");
    assert_eq!(net.message(1, &r.id).unwrap().status, MessageStatus::Delivered);
    let at_bob: Vec<String> = net.messages(1, &c.id).into_iter().map(|m| m.content).collect();
    assert_eq!(at_bob, vec!["one", "two", "three"]);
}

/// Scenario: a transmit result whose commit fails leaves the message to be
/// sent again, not stranded.
pub fn a_failed_commit_of_a_transmit_result_strands_nothing<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 2, 33);
    let c = net.conversation(0, 1);
    net.send(0, c.id, "warm");
    net.nodes[1].online = false;
    let m = net.nodes[0].engine.command(net.now, Command::SendMessage { conversation: c.id, content: "x".into() });
    assert!(m.is_ok());
    let t = net.nodes[0].engine.poll_transmit().unwrap();
    while net.nodes[0].engine.poll_transmit().is_some() {}
    while net.nodes[0].engine.poll_event().is_some() {}
    let result = Input::TransmitResult { id: t.id, outcome: TransmitOutcome::Failed(SendFailure::NoConnection) };
    net.nodes[0].engine.store_mut().fail_next_commits(1);
    assert!(net.nodes[0].engine.handle(net.now, result.clone()).is_err());
    net.nodes[0].engine.handle(net.now, result).unwrap();
    net.set_online(1, true);
    assert_eq!(contents(&mut net, 1, &c.id), vec!["warm", "x"]);
}
