//! The crash scenario: a node crashed after every engine call of a
//! scripted conversation loses nothing and never reuses a message key.

use super::net::{group, send_group};
use super::{Net, TestStore};
use crate::engine::{Command, MessageStatus};
use crate::{ConversationId, MessageId};

/// A scripted 1:1 and group conversation. Returns the IDs of every message
/// whose send command succeeded, with its sender.
fn script<S: TestStore>(net: &mut Net<S>) -> Vec<(usize, MessageId, ConversationId)> {
    let mut sent = Vec::new();
    let c = net.conversation(0, 1);
    for text in ["one", "two", "three"] {
        sent.push((0, net.send(0, c.id, text).id, c.id));
    }
    // Bob opens the conversation himself: after a crash, Alice's first
    // messages may still be waiting for a retry.
    net.conversation(1, 0);
    sent.push((1, net.send(1, c.id, "reply").id, c.id));
    net.set_online(1, false);
    sent.push((0, net.send(0, c.id, "while away").id, c.id));
    net.advance(5_000);
    net.set_online(1, true);
    net.command(1, Command::MarkConversationRead { conversation: c.id }).unwrap();
    let g = group(net, 0, &[1, 2], "Crash test");
    // Let invites and keys settle (a crash may have cost a retry).
    net.advance(60_000);
    for i in 0..3 {
        sent.push((i, send_group(net, i, g.id, &format!("group {i}")).id, g.id));
    }
    sent
}

/// Scenario: a crash at any point loses nothing and never reuses a message key.
pub fn a_crash_at_any_point_loses_nothing_and_never_reuses_a_message_key<S: TestStore>(make: fn() -> S) {
    let calls = {
        let mut net = Net::new(make, 3, 30);
        script(&mut net);
        net.advance(10 * 60 * 1000);
        net.calls
    };
    assert!(calls > 50, "the script makes {calls} engine calls");
    for crash_at in 1..=calls {
        let mut net = Net::new(make, 3, 30);
        net.crash_after_call = Some(crash_at);
        let sent = script(&mut net);
        // Time for retries, timeouts and retransmissions to settle.
        net.advance(10 * 60 * 1000);
        for (sender, id, conversation) in sent {
            let recipients: Vec<usize> = if conversation == ConversationId::for_peers(&net.id(0), &net.id(1)) {
                vec![1 - sender]
            } else {
                (0..3).filter(|&i| i != sender).collect()
            };
            for r in recipients {
                let copies = net.messages(r, &conversation).into_iter().filter(|m| m.id == id).count();
                assert_eq!(copies, 1, "crash after call {crash_at}: message {id} at node {r}");
            }
            let status = net.message(sender, &id).unwrap().status;
            assert!(
                status >= MessageStatus::Delivered && status != MessageStatus::Failed,
                "crash after call {crash_at}: {status:?}"
            );
        }
    }
}
