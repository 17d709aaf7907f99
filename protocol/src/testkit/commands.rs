//! Scenarios of commands and queries: clear errors, batches that commit
//! together or not at all, pages, and hostile bytes that change nothing.

use super::net::{contents, group};
use super::{Net, TestStore};
use crate::engine::{Command, CommandOutcome, EngineError, Event, Input, MessageStatus, RequestError, Step, Transmit};
use crate::wire::{Envelope, EnvelopeBody};
use crate::{ConversationId, PeerId};

/// Scenario: bad commands get clear errors.
pub fn bad_commands_get_clear_errors<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 2, 9);
    let c = net.conversation(0, 1);
    let me = net.id(0);
    assert_eq!(
        net.command(0, Command::SendMessage { conversation: c.id, content: String::new() }),
        Err(EngineError::Request(RequestError::EmptyContent))
    );
    let big = "x".repeat(64 * 1024 + 1);
    assert_eq!(
        net.command(0, Command::SendMessage { conversation: c.id, content: big }),
        Err(EngineError::Request(RequestError::ContentTooLarge { len: 64 * 1024 + 1, max: 64 * 1024 }))
    );
    let nowhere = ConversationId::for_peers(&me, &PeerId([9; 20]));
    assert_eq!(
        net.command(0, Command::SendMessage { conversation: nowhere, content: "x".into() }),
        Err(EngineError::Request(RequestError::UnknownConversation(nowhere)))
    );
    assert_eq!(
        net.command(0, Command::CreateConversation { peer: me }),
        Err(EngineError::Request(RequestError::SelfConversation(me)))
    );
    let m = net.send(0, c.id, "fine");
    assert_eq!(
        net.command(0, Command::RetryMessage { message: m.id }),
        Err(EngineError::Request(RequestError::NotRetryable { id: m.id, status: "delivered" }))
    );
}

/// Scenario: garbage and forgeries are rejected without damage.
pub fn garbage_and_forgeries_are_rejected_without_damage<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 3, 10);
    let c = net.conversation(0, 1);
    net.send(0, c.id, "before");
    let alice = net.id(0);
    let carol = net.id(2);
    // Garbage, and a genuine envelope replayed by a third party.
    net.input(1, Input::Received { from: alice, bytes: vec![1, 2, 3] });
    let (_, _, genuine) = net
        .delivered
        .iter()
        .find(|(from, to, bytes)| {
            *from == 0 && *to == 1 && matches!(Envelope::decode(bytes).map(|e| e.body), Ok(EnvelopeBody::Ratchet(_)))
        })
        .cloned()
        .unwrap();
    net.input(1, Input::Received { from: carol, bytes: genuine.clone() });
    let rejected = net.nodes[1].events.iter().filter(|e| e.kind() == "chat.security.rejected").count();
    assert_eq!(rejected, 2, "garbage and a third party's copy are rejected");
    // The same ciphertext again from its sender (a replay, or a relay
    // redelivering its mailbox) is refused as a duplicate: no second copy.
    let events_before = net.nodes[1].events.len();
    net.input(1, Input::Received { from: alice, bytes: genuine });
    let after: Vec<_> = net.nodes[1].events[events_before..].to_vec();
    assert!(
        matches!(after.as_slice(), [Event::SecurityRejected { peer_id, reason }]
            if *peer_id == alice && reason.contains("already received")),
        "{after:?}"
    );
    let m = net.send(0, c.id, "after");
    assert_eq!(net.message(0, &m.id).unwrap().status, MessageStatus::Delivered);
    assert_eq!(net.messages(1, &c.id).len(), 2);
}

/// Scenario: inputs handled as one batch commit together or not at all.
pub fn a_batch_commits_together_or_not_at_all<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 2, 32);
    let c = net.conversation(0, 1);
    net.send(0, c.id, "warm");
    // Capture two messages from 0 to 1 without delivering them.
    net.nodes[1].online = false;
    net.send(0, c.id, "a");
    net.send(0, c.id, "b");
    net.nodes[1].online = true;
    // Take them from 0's outbox by reconnecting, and hand them to 1 as one
    // batch whose first commit fails: refused whole, then accepted whole.
    let from = net.id(0);
    let to = net.id(1);
    let mut transmits = Vec::new();
    net.nodes[0].engine.handle(net.now, Input::PeerReachable(to)).unwrap();
    while let Some(t) = net.nodes[0].engine.poll_transmit() {
        transmits.push(t);
    }
    assert_eq!(transmits.len(), 2);
    let inputs: Vec<Step> =
        transmits.iter().map(|t| Step::Input(Input::Received { from, bytes: t.bytes.clone() })).collect();
    net.nodes[1].engine.store_mut().fail_next_commits(1);
    assert!(net.nodes[1].engine.handle_batch(net.now, inputs.clone()).is_err());
    assert!(net.nodes[1].engine.poll_transmit().is_none(), "a failed batch sends nothing");
    assert_eq!(contents(&mut net, 1, &c.id), vec!["warm"], "nothing of a failed batch stays");
    net.nodes[1].engine.handle_batch(net.now, inputs).unwrap();
    assert_eq!(contents(&mut net, 1, &c.id), vec!["warm", "a", "b"]);
    // Both messages are confirmed by one receipt: the outbox is sent once,
    // when the batch's work is done.
    let receipts: Vec<Transmit> = std::iter::from_fn(|| net.nodes[1].engine.poll_transmit()).collect();
    assert_eq!(receipts.len(), 1, "one delivery receipt for the whole batch");
}

/// Scenario: commands in one batch share one transaction: each gets its
/// outcome, and one bad command undoes the whole batch.
pub fn commands_in_a_batch_commit_together_or_not_at_all<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 2, 34);
    let c = net.conversation(0, 1);
    net.send(0, c.id, "warm");
    let send = |text: &str| Step::Command(Command::SendMessage { conversation: c.id, content: text.into() });
    let bad = vec![send("a"), send(""), send("b")];
    let failed = net.nodes[0].engine.handle_batch(net.now, bad).unwrap_err();
    assert_eq!(
        (failed.step, failed.error),
        (Some(1), EngineError::Request(RequestError::EmptyContent)),
        "the failing step is named"
    );
    assert!(net.nodes[0].engine.poll_transmit().is_none(), "a failed batch sends nothing");
    assert!(net.nodes[0].engine.poll_event().is_none(), "a failed batch reports nothing");
    assert_eq!(contents(&mut net, 0, &c.id), vec!["warm"], "nothing of a failed batch stays");
    let outcomes = net.nodes[0].engine.handle_batch(net.now, vec![send("a"), send("b"), send("c")]).unwrap();
    let texts: Vec<String> = outcomes
        .into_iter()
        .map(|o| match o {
            CommandOutcome::Message(m) => m.content,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(texts, vec!["a", "b", "c"]);
    net.drain();
    assert_eq!(contents(&mut net, 1, &c.id), vec!["warm", "a", "b", "c"]);
}

/// Scenario: reads page newest first, refuse unknown or foreign IDs, and
/// change nothing.
pub fn queries_page_newest_first_and_refuse_unknown_ids<S: TestStore>(make: fn() -> S) {
    use crate::engine::{Answer, Query};
    let mut net = Net::new(make, 4, 35);
    let c = net.conversation(0, 1);
    for n in 0..7 {
        net.send(0, c.id, &format!("m{n}"));
        net.now = net.now.saturating_add_millis(1);
    }
    let g = group(&mut net, 0, &[1, 2, 3], "team");
    let page = |net: &mut Net<S>, before, limit| match net.nodes[1]
        .engine
        .query(Query::Messages { conversation: c.id, before, limit })
        .unwrap()
    {
        Answer::Messages { messages, more } => (messages, more),
        other => panic!("{other:?}"),
    };
    let (first, more) = page(&mut net, None, 3);
    assert_eq!(first.iter().map(|m| m.content.as_str()).collect::<Vec<_>>(), vec!["m6", "m5", "m4"]);
    assert!(more, "older messages follow");
    let (rest, more) = page(&mut net, first.last().map(|m| m.id), 10);
    assert_eq!(rest.iter().map(|m| m.content.as_str()).collect::<Vec<_>>(), vec!["m3", "m2", "m1", "m0"]);
    assert!(!more, "a short page is the last");
    // A last page that is exactly full says so too.
    let (exact, more) = page(&mut net, first.last().map(|m| m.id), 4);
    assert_eq!(exact.len(), 4);
    assert!(!more, "nothing is older than m0");
    assert_eq!(net.nodes[1].engine.query(Query::UnreadTotal).unwrap(), Answer::Unread(7));
    match net.nodes[1].engine.query(Query::Conversations).unwrap() {
        Answer::Conversations(all) => {
            assert_eq!(all.len(), 2);
            let one = all.iter().find(|s| s.conversation.id == c.id).unwrap();
            assert_eq!(one.last_message.as_ref().map(|m| m.content.as_str()), Some("m6"));
        }
        other => panic!("{other:?}"),
    }
    match net.nodes[1].engine.query(Query::Members(g.id)).unwrap() {
        Answer::Members(members) => assert_eq!(members.len(), 4),
        other => panic!("{other:?}"),
    }
    let nowhere = ConversationId(crate::ids::Uuid([9; 16]));
    assert_eq!(
        net.nodes[1].engine.query(Query::Conversation(nowhere)),
        Err(EngineError::Request(RequestError::UnknownConversation(nowhere)))
    );
    assert_eq!(
        net.nodes[1].engine.query(Query::Members(c.id)),
        Err(EngineError::Request(RequestError::NotAGroup(c.id)))
    );
    // A cursor from another conversation is refused, not an empty page.
    let other = net.send(0, c.id, "x");
    let foreign = net.nodes[2].engine.query(Query::Messages { conversation: g.id, before: Some(other.id), limit: 5 });
    assert_eq!(foreign, Err(EngineError::Request(RequestError::UnknownMessage(other.id))));
    assert!(net.nodes[1].engine.poll_transmit().is_none() && net.nodes[1].engine.poll_event().is_none());
}
