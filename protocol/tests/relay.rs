//! The relay with nodes on a simulated network in virtual time: nodes with
//! no direct path reach each other only through the relay, each driven
//! through the node's driving rule (the routing that ships).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

use p2pchat_protocol::engine::{
    Command, CommandOutcome, Conversation, EngineError, Input, MemoryStore, Message, MessageStatus, MessageStore,
    SendFailure, Transaction, TransmitOutcome,
};
use p2pchat_protocol::node::{
    Node, NodeConfig, NodeInput, NodeOutput, Notice, RelaySpec, Reply, Ticket, RELAY_BACKOFF_MAX_MS,
};
use p2pchat_protocol::relay::{
    ClientAction, MailboxEntry, MemoryRelayStore, PeerRecord, PublishRefusal, RecordError, Refusal, Relay, RelayConfig,
    RelayFrame, RelayStore, RelayStoreError, Source, Usage, MAILBOX_BATCH_BYTES, MAILBOX_RESEND_INTERVAL_MS,
};
use p2pchat_protocol::testkit::NOW;
use p2pchat_protocol::{ConversationId, IdentityKeyPair, MessageId, PeerId, Timestamp};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// One simulated machine: a [`Node`] whose only way out is the relay.
struct Machine {
    node: Node<MemoryStore>,
    online: bool,
}

/// Nodes and one relay, driven through the node's driving rule: there are
/// no direct paths, so everything goes through the relay the node chose.
struct World {
    relay: Relay<MemoryRelayStore>,
    nodes: Vec<Machine>,
    ids: Vec<PeerId>,
    /// Nodes whose relay connection is up.
    registered: BTreeSet<usize>,
    now: Timestamp,
    /// Drop the mailbox acknowledgements nodes send (a connection that dies
    /// before they get through).
    drop_acks: bool,
    replies: Vec<(usize, Ticket, Result<CommandOutcome, EngineError>)>,
    next_ticket: u64,
}

impl World {
    fn new(count: usize, config: RelayConfig) -> Self {
        let relay_spec = RelaySpec { peer: PeerId([0xee; 20]), address: "relay.test:4433".into() };
        let mut ids = Vec::new();
        let nodes = (0..count)
            .map(|i| {
                let mut r = ChaCha20Rng::seed_from_u64(100 + i as u64);
                let identity = IdentityKeyPair::generate(&mut r);
                ids.push(identity.peer_id());
                let config = NodeConfig { relays: vec![relay_spec.clone()], ..NodeConfig::default() };
                Machine { node: Node::new(identity, MemoryStore::new(), config, r, NOW).unwrap(), online: true }
            })
            .collect();
        let relay = Relay::new(MemoryRelayStore::new(), config).unwrap();
        let mut world = Self {
            relay,
            nodes,
            ids,
            registered: BTreeSet::new(),
            now: NOW,
            drop_acks: false,
            replies: Vec::new(),
            next_ticket: 0,
        };
        world.drain();
        world
    }

    fn id(&self, i: usize) -> PeerId {
        self.ids[i]
    }

    /// Node `i` is back online; returns once its relay connection is up
    /// again (after its reconnection backoff) and its mailbox drained.
    fn connect(&mut self, i: usize) {
        self.nodes[i].online = true;
        let deadline = self.now.saturating_add_millis(RELAY_BACKOFF_MAX_MS + 1);
        while !self.registered.contains(&i) && self.now < deadline {
            let next = self.nodes[i].node.poll_timeout().unwrap_or(deadline).min(deadline);
            self.advance(next.millis_since(self.now));
        }
        assert!(self.registered.contains(&i), "node {i} reconnects to the relay");
    }

    /// Node `i` goes offline: its relay connection closes, and attempts to
    /// reconnect fail until [`World::connect`].
    fn disconnect(&mut self, i: usize) {
        self.nodes[i].online = false;
        self.close(i);
        self.drain();
    }

    fn close(&mut self, i: usize) {
        if self.registered.remove(&i) {
            self.relay.disconnected(&self.ids[i]);
            let reason = "the relay connection closed".into();
            self.nodes[i].node.handle(self.now, NodeInput::RelayDisconnected { relay: 0, reason });
        }
    }

    /// The relay restarts from `store`: every connection dies with it.
    fn restart_relay(&mut self, store: MemoryRelayStore) {
        self.relay = Relay::new(store, RelayConfig::default()).unwrap();
        for i in std::mem::take(&mut self.registered) {
            let reason = "the relay restarted".into();
            self.nodes[i].node.handle(self.now, NodeInput::RelayDisconnected { relay: 0, reason });
        }
    }

    /// Applies every output until nothing moves.
    fn drain(&mut self) {
        loop {
            let mut busy = false;
            for i in 0..self.nodes.len() {
                while let Some(output) = self.nodes[i].node.poll_output(self.now) {
                    busy = true;
                    self.apply(i, output);
                }
            }
            while self.relay.poll_event().is_some() {}
            while let Some((to, bytes)) = self.relay.poll_transmit() {
                busy = true;
                let i = self.ids.iter().position(|id| *id == to).unwrap();
                if self.registered.contains(&i) {
                    self.nodes[i].node.handle(self.now, NodeInput::RelayFrame { relay: 0, bytes });
                }
            }
            if !busy {
                break;
            }
        }
    }

    fn apply(&mut self, i: usize, output: NodeOutput) {
        let (now, id, online) = (self.now, self.ids[i], self.nodes[i].online);
        let node = &mut self.nodes[i].node;
        match output {
            // No direct paths in this world.
            NodeOutput::Dial { peer, .. } => {
                node.handle(now, NodeInput::DialFailed { peer, reason: "no direct path".into() });
            }
            NodeOutput::SendDirect { id, .. } => {
                let outcome = TransmitOutcome::Failed(SendFailure::NoConnection);
                node.handle(now, NodeInput::DirectSent { id, outcome });
            }
            NodeOutput::ConnectRelay { relay, .. } if relay == 0 && online => {
                self.relay.connected(id);
                self.registered.insert(i);
                node.handle(now, NodeInput::RelayConnected { relay });
            }
            NodeOutput::ConnectRelay { relay, .. } => {
                node.handle(now, NodeInput::RelayDisconnected { relay, reason: "no answer".into() });
            }
            NodeOutput::CloseRelay { .. } => self.close(i),
            NodeOutput::SendToRelay { bytes, .. } => {
                let ack = matches!(RelayFrame::decode(&bytes), Ok(RelayFrame::MailboxAck { .. }));
                if self.registered.contains(&i) && !(ack && self.drop_acks) {
                    self.relay.handle_frame(now, id, &bytes).unwrap();
                }
            }
            NodeOutput::Reply { ticket, reply: Reply::Command(result) } => self.replies.push((i, ticket, result)),
            NodeOutput::Notice(Notice::InputFailed(e)) => panic!("node {i}'s engine failed: {e}"),
            NodeOutput::Notice(Notice::PublishRefused { reason, .. }) => panic!("publish refused: {reason:?}"),
            NodeOutput::Event(_) | NodeOutput::Reply { .. } | NodeOutput::Notice(_) => {}
        }
    }

    /// Lets `by_ms` of virtual time pass, firing every deadline on the way.
    fn advance(&mut self, by_ms: u64) {
        let until = self.now.saturating_add_millis(by_ms);
        loop {
            self.drain();
            let next = self
                .nodes
                .iter()
                .filter_map(|m| m.node.poll_timeout())
                .chain(self.relay.poll_timeout())
                .filter(|t| *t <= until)
                .min();
            let Some(next) = next else { break };
            self.now = next.max(self.now);
            for machine in &mut self.nodes {
                if machine.node.poll_timeout().is_some_and(|t| t <= self.now) {
                    machine.node.handle_timeout(self.now);
                }
            }
            if self.relay.poll_timeout().is_some_and(|t| t <= self.now) {
                self.relay.handle_timeout(self.now).unwrap();
            }
        }
        self.now = until;
        self.drain();
    }

    fn command(&mut self, i: usize, command: Command) -> CommandOutcome {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        self.nodes[i].node.handle(self.now, NodeInput::Command { ticket, command });
        self.drain();
        let at = self.replies.iter().position(|(node, t, _)| *node == i && *t == ticket).expect("answered");
        self.replies.remove(at).2.unwrap()
    }

    fn conversation(&mut self, i: usize, j: usize) -> Conversation {
        let peer = self.id(j);
        let CommandOutcome::Conversation(c) = self.command(i, Command::CreateConversation { peer }) else { panic!() };
        c
    }

    fn send(&mut self, i: usize, c: &ConversationId, text: &str) -> Message {
        let command = Command::SendMessage { conversation: *c, content: text.into() };
        let CommandOutcome::Message(m) = self.command(i, command) else { panic!() };
        m
    }

    fn message(&mut self, i: usize, id: &MessageId) -> Option<Message> {
        let store = self.nodes[i].node.engine_mut().store_mut();
        store.begin().unwrap();
        let m = store.message(id).unwrap();
        store.rollback();
        m
    }

    fn contents(&mut self, i: usize, c: &ConversationId) -> Vec<String> {
        let store = self.nodes[i].node.engine_mut().store_mut();
        store.begin().unwrap();
        let m = store.messages(c).unwrap();
        store.rollback();
        m.into_iter().map(|m| m.content).collect()
    }
}

#[test]
fn delivery_through_the_relay_with_no_direct_path() {
    let mut w = World::new(2, RelayConfig::default());
    let c = w.conversation(0, 1);
    let m = w.send(0, &c.id, "via the relay");
    assert_eq!(w.message(0, &m.id).unwrap().status, MessageStatus::Delivered);
    assert_eq!(w.contents(1, &c.id), vec!["via the relay"]);
}

#[test]
fn the_mailbox_delivers_after_the_sender_has_gone_offline() {
    let mut w = World::new(2, RelayConfig::default());
    let c = w.conversation(0, 1);
    w.send(0, &c.id, "hello");
    w.disconnect(1);
    let m = w.send(0, &c.id, "left in the mailbox");
    assert_eq!(w.message(0, &m.id).unwrap().status, MessageStatus::Sent, "held by the relay");
    w.disconnect(0);
    w.advance(60 * 60 * 1000);
    w.connect(1);
    assert_eq!(w.contents(1, &c.id), vec!["hello", "left in the mailbox"]);
    // Bob's receipt waits in Alice's mailbox in turn.
    w.connect(0);
    assert_eq!(w.message(0, &m.id).unwrap().status, MessageStatus::Delivered);
}

#[test]
fn mailbox_order_and_exactly_once_across_reconnects() {
    let mut w = World::new(2, RelayConfig::default());
    let c = w.conversation(0, 1);
    w.send(0, &c.id, "first");
    w.disconnect(1);
    for i in 0..5 {
        w.send(0, &c.id, &format!("queued {i}"));
    }
    // Alice leaves: only the mailbox can deliver now.
    w.disconnect(0);
    // Bob's first connection dies before its acknowledgements get through.
    w.drop_acks = true;
    w.connect(1);
    w.disconnect(1);
    w.drop_acks = false;
    w.connect(1);
    let expected: Vec<String> =
        ["first"].into_iter().map(String::from).chain((0..5).map(|i| format!("queued {i}"))).collect();
    assert_eq!(w.contents(1, &c.id), expected);
    let store = w.relay.store();
    let mut store = store.crash_copy();
    store.begin().unwrap();
    assert!(store.mailbox(&w.id(1)).unwrap().is_empty(), "acknowledged entries are deleted");
}

#[test]
fn quota_refusals_leave_messages_sent_with_the_reason() {
    let config = RelayConfig { mailbox_max_count: 2, ..RelayConfig::default() };
    let mut w = World::new(2, config);
    let c = w.conversation(0, 1);
    w.send(0, &c.id, "hello");
    w.disconnect(1);
    let held: Vec<Message> = (0..2).map(|i| w.send(0, &c.id, &format!("held {i}"))).collect();
    let refused = w.send(0, &c.id, "over quota");
    let at_alice = w.message(0, &refused.id).unwrap();
    assert_eq!(at_alice.status, MessageStatus::Sent);
    assert_eq!(at_alice.waiting_reason.as_deref(), Some(Refusal::Quota.as_str()));
    for m in &held {
        assert_eq!(w.message(0, &m.id).unwrap().waiting_reason, None);
    }
    // When Bob is back, everything arrives: the held ones from the mailbox,
    // the refused one from Alice's outbox on its next try.
    w.connect(1);
    w.advance(31_000);
    assert_eq!(w.message(0, &refused.id).unwrap().status, MessageStatus::Delivered);
    assert_eq!(w.contents(1, &c.id), vec!["hello", "held 0", "held 1", "over quota"]);
}

#[test]
fn rate_refusals_leave_messages_sent_and_they_go_later() {
    let config = RelayConfig { rate_burst: 6, rate_per_sec: 1, ..RelayConfig::default() };
    let mut w = World::new(2, config);
    let c = w.conversation(0, 1);
    let sent: Vec<Message> = (0..6).map(|i| w.send(0, &c.id, &format!("burst {i}"))).collect();
    let over = sent.iter().filter(|m| w.message(0, &m.id).unwrap().waiting_reason.is_some()).count();
    assert!(over > 0, "a burst beyond the limit is refused");
    let reasons: Vec<Option<String>> = sent.iter().map(|m| w.message(0, &m.id).unwrap().waiting_reason).collect();
    assert!(reasons.iter().flatten().all(|r| r == Refusal::Rate.as_str()), "{reasons:?}");
    // A reconnect later sends them again, within the rate.
    w.advance(60_000);
    w.disconnect(1);
    w.connect(1);
    for m in &sent {
        assert_eq!(w.message(0, &m.id).unwrap().status, MessageStatus::Delivered);
    }
}

#[test]
fn too_large_refusals_fail_the_message_at_once() {
    let config = RelayConfig { max_envelope_len: 600, ..RelayConfig::default() };
    let mut w = World::new(2, config);
    let c = w.conversation(0, 1);
    let m = w.send(0, &c.id, &"x".repeat(2_000));
    let at_alice = w.message(0, &m.id).unwrap();
    assert_eq!(at_alice.status, MessageStatus::Failed);
    assert_eq!(at_alice.failure_reason.as_deref(), Some(Refusal::TooLarge.as_str()));
    let ok = w.send(0, &c.id, "small");
    assert_eq!(w.message(0, &ok.id).unwrap().status, MessageStatus::Delivered);
}

#[test]
fn the_default_envelope_limit_fits_the_largest_message() {
    let mut w = World::new(2, RelayConfig::default());
    let c = w.conversation(0, 1);
    let m = w.send(0, &c.id, &"y".repeat(64 * 1024));
    assert_eq!(w.message(0, &m.id).unwrap().status, MessageStatus::Delivered);
}

#[test]
fn a_relay_restarted_from_its_store_keeps_its_mailbox() {
    let mut w = World::new(2, RelayConfig::default());
    let c = w.conversation(0, 1);
    w.send(0, &c.id, "before");
    w.disconnect(1);
    w.send(0, &c.id, "kept across the restart");
    let store = w.relay.store().crash_copy();
    // Every connection dies with the relay; the sender stays away, so only
    // the relay's mailbox can bring the message.
    w.nodes[0].online = false;
    w.restart_relay(store);
    w.connect(1);
    assert_eq!(w.contents(1, &c.id), vec!["before", "kept across the restart"]);
}

#[test]
fn mailbox_entries_expire_after_the_ttl() {
    let mut w = World::new(2, RelayConfig::default());
    let c = w.conversation(0, 1);
    w.send(0, &c.id, "hello");
    w.disconnect(1);
    w.send(0, &c.id, "too late");
    // Alice goes too, so no fresh copy follows the first into the mailbox.
    w.disconnect(0);
    w.advance(8 * DAY_MS);
    let mut store = w.relay.store().crash_copy();
    store.begin().unwrap();
    assert!(store.mailbox(&w.id(1)).unwrap().is_empty());
}

// ---- the directory ------------------------------------------------------------

fn record(identity: &IdentityKeyPair, sequence: u64, expires_in: u64) -> PeerRecord {
    PeerRecord::sign(
        identity,
        vec!["10.0.0.1:4433".into()],
        vec![],
        NOW,
        NOW.saturating_add_millis(expires_in),
        sequence,
    )
}

#[test]
fn directory_records_are_checked_by_every_reader() {
    let mut r = ChaCha20Rng::seed_from_u64(9);
    let alice = IdentityKeyPair::generate(&mut r);
    let mallory = IdentityKeyPair::generate(&mut r);
    let good = record(&alice, 5, DAY_MS);
    assert_eq!(good.verify(NOW, Some(4)), Ok(()));
    // A wrong key: Mallory's key under Alice's peer ID.
    let mut wrong_key = good.clone();
    wrong_key.identity_key = mallory.public().to_bytes();
    assert!(matches!(wrong_key.verify(NOW, None), Err(RecordError::Identity(_))));
    // A stale sequence.
    assert_eq!(good.verify(NOW, Some(5)), Err(RecordError::Stale { known: 5, got: 5 }));
    // An expired record.
    let expired = record(&alice, 6, 10);
    assert!(matches!(expired.verify(NOW.saturating_add_millis(11), None), Err(RecordError::Expired { .. })));
    // A bad signature.
    let mut tampered = good.clone();
    tampered.direct_addresses = vec!["203.0.113.9:4433".into()];
    assert!(matches!(tampered.verify(NOW, None), Err(RecordError::Identity(_))));
}

#[test]
fn the_relay_keeps_only_the_newest_valid_record_and_readers_refuse_bad_answers() {
    let mut r = ChaCha20Rng::seed_from_u64(10);
    let alice = IdentityKeyPair::generate(&mut r);
    let bob = IdentityKeyPair::generate(&mut r);
    let mut relay = Relay::new(MemoryRelayStore::new(), RelayConfig::default()).unwrap();
    for peer in [alice.peer_id(), bob.peer_id()] {
        relay.connected(peer);
        relay.handle_frame(NOW, peer, &RelayFrame::Register.encode()).unwrap();
    }
    while relay.poll_transmit().is_some() {}
    // Every publish is answered, and a refusal says why.
    let publish = |relay: &mut Relay<MemoryRelayStore>, from: PeerId, rec: PeerRecord| {
        relay.handle_frame(NOW, from, &RelayFrame::Publish(rec).encode()).unwrap();
        while relay.poll_event().is_some() {}
        let (to, bytes) = relay.poll_transmit().unwrap();
        assert_eq!(to, from);
        assert_eq!(relay.poll_transmit(), None);
        RelayFrame::decode(&bytes).unwrap()
    };
    let refused = |sequence, reason| RelayFrame::PublishRefused { sequence, reason };
    // Records valid for longer than the relay keeps them are refused.
    assert_eq!(
        publish(&mut relay, alice.peer_id(), record(&alice, 1, 30 * DAY_MS)),
        refused(1, PublishRefusal::LifetimeTooLong)
    );
    assert_eq!(publish(&mut relay, alice.peer_id(), record(&alice, 2, DAY_MS)), RelayFrame::Published { sequence: 2 });
    assert_eq!(publish(&mut relay, alice.peer_id(), record(&alice, 1, DAY_MS)), refused(1, PublishRefusal::Stale));
    assert_eq!(publish(&mut relay, bob.peer_id(), record(&alice, 3, DAY_MS)), refused(3, PublishRefusal::OtherPeer));
    let mut tampered = record(&alice, 4, DAY_MS);
    tampered.direct_addresses = vec!["203.0.113.9:4433".into()];
    assert_eq!(publish(&mut relay, alice.peer_id(), tampered), refused(4, PublishRefusal::Invalid));
    let lookup = |relay: &mut Relay<MemoryRelayStore>, peer: PeerId| {
        relay.handle_frame(NOW, bob.peer_id(), &RelayFrame::Lookup { peer }.encode()).unwrap();
        let (_, bytes) = relay.poll_transmit().unwrap();
        match RelayFrame::decode(&bytes).unwrap() {
            RelayFrame::LookupResult { record, .. } => record,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(lookup(&mut relay, alice.peer_id()).map(|r| r.sequence), Some(2));
    // A reader refuses a forged answer even if a relay sends one.
    let mut client = p2pchat_protocol::relay::RelayClient::new();
    let _ = client.lookup(NOW, alice.peer_id());
    let newer_record = record(&alice, 7, DAY_MS);
    let newer = RelayFrame::LookupResult { peer: alice.peer_id(), record: Some(newer_record.clone()) };
    assert_eq!(
        client.on_frame(NOW, &newer.encode()).unwrap(),
        vec![ClientAction::Record(newer_record), ClientAction::ToEngine(Input::PeerRecord(alice.peer_id()))]
    );
    // An older record than one the reader has seen is stale.
    let _ = client.lookup(NOW, alice.peer_id());
    let older = RelayFrame::LookupResult { peer: alice.peer_id(), record: Some(record(&alice, 3, DAY_MS)) };
    assert_eq!(
        client.on_frame(NOW, &older.encode()).unwrap(),
        vec![ClientAction::ToEngine(Input::LookupFailed(alice.peer_id()))]
    );
    let _ = client.lookup(NOW, alice.peer_id());
    let mut forged = record(&alice, 9, DAY_MS);
    forged.relay_addresses = vec!["evil.test:1".into()];
    let answer = RelayFrame::LookupResult { peer: alice.peer_id(), record: Some(forged) };
    let actions = client.on_frame(NOW, &answer.encode()).unwrap();
    assert_eq!(actions, vec![ClientAction::ToEngine(Input::LookupFailed(alice.peer_id()))]);
}

#[test]
fn the_relay_holds_no_mailbox_for_a_peer_it_does_not_know() {
    let mut w = World::new(2, RelayConfig::default());
    let c = w.conversation(0, 1);
    w.send(0, &c.id, "hello");
    let stranger = PeerId([7; 20]);
    let frame = RelayFrame::Forward { to: stranger, id: 99, mailbox_allowed: true, envelope: vec![1; 100] };
    let alice = w.id(0);
    w.relay.handle_frame(w.now, alice, &frame.encode()).unwrap();
    let answers: Vec<RelayFrame> =
        std::iter::from_fn(|| w.relay.poll_transmit()).map(|(_, b)| RelayFrame::decode(&b).unwrap()).collect();
    assert_eq!(answers, vec![RelayFrame::Refused { id: 99, reason: Refusal::UnknownRecipient }]);
    let mut store = w.relay.store().crash_copy();
    store.begin().unwrap();
    assert!(store.mailbox(&stranger).unwrap().is_empty());
}

#[test]
fn published_sequences_always_increase() {
    let mut r = ChaCha20Rng::seed_from_u64(11);
    let alice = IdentityKeyPair::generate(&mut r);
    let mut client = p2pchat_protocol::relay::RelayClient::new();
    let seq = |frame: RelayFrame| match frame {
        RelayFrame::Publish(record) => {
            assert_eq!(record.verify(NOW, None), Ok(()));
            record.sequence
        }
        other => panic!("{other:?}"),
    };
    let first = seq(client.publish(&alice, vec![], vec![], NOW, DAY_MS));
    let same_instant = seq(client.publish(&alice, vec!["10.0.0.2:1".into()], vec![], NOW, DAY_MS));
    let clock_back = seq(client.publish(&alice, vec![], vec![], Timestamp(NOW.0 - 5_000), DAY_MS));
    assert!(first < same_instant && same_instant < clock_back);
}

#[test]
fn the_byte_quota_refuses_what_would_overflow_it() {
    let config = RelayConfig { mailbox_max_bytes: 1_500, ..RelayConfig::default() };
    let mut w = World::new(2, config);
    let c = w.conversation(0, 1);
    w.send(0, &c.id, "hello");
    w.disconnect(1);
    let small = w.send(0, &c.id, "fits");
    let big = w.send(0, &c.id, &"z".repeat(2_000));
    assert_eq!(w.message(0, &small.id).unwrap().waiting_reason, None, "held");
    assert_eq!(w.message(0, &big.id).unwrap().waiting_reason.as_deref(), Some(Refusal::Quota.as_str()));
}

#[test]
fn a_group_message_travels_through_the_relay() {
    let mut w = World::new(3, RelayConfig::default());
    let members = vec![w.id(1), w.id(2)];
    let CommandOutcome::Conversation(g) = w.command(0, Command::CreateGroup { name: "Relayed".into(), members }) else {
        panic!()
    };
    for i in 1..3 {
        w.command(i, Command::AcceptInvitation { group: g.id });
    }
    let command = Command::SendGroupMessage { group: g.id, content: "x".repeat(64 * 1024) };
    let CommandOutcome::Message(m) = w.command(0, command) else { panic!() };
    w.advance(31_000);
    assert_eq!(w.message(0, &m.id).unwrap().status, MessageStatus::Delivered);
    for i in 1..3 {
        assert_eq!(w.contents(i, &g.id).len(), 1, "member {i}");
    }
}

#[test]
fn a_reader_refuses_expired_and_wrong_key_answers() {
    let mut r = ChaCha20Rng::seed_from_u64(12);
    let alice = IdentityKeyPair::generate(&mut r);
    let mallory = IdentityKeyPair::generate(&mut r);
    let mut client = p2pchat_protocol::relay::RelayClient::new();
    let answer = |client: &mut p2pchat_protocol::relay::RelayClient, now: Timestamp, rec: PeerRecord| {
        let _ = client.lookup(NOW, alice.peer_id());
        let frame = RelayFrame::LookupResult { peer: alice.peer_id(), record: Some(rec) };
        client.on_frame(now, &frame.encode()).unwrap()
    };
    let failed = vec![ClientAction::ToEngine(Input::LookupFailed(alice.peer_id()))];
    // Expired by the reader's clock, even though the relay still sent it.
    assert_eq!(answer(&mut client, NOW.saturating_add_millis(DAY_MS + 1), record(&alice, 1, DAY_MS)), failed);
    // Mallory's record relabelled with Alice's peer ID: the key does not hash to it.
    let mut wrong_key = record(&mallory, 2, DAY_MS);
    wrong_key.peer_id = alice.peer_id();
    assert_eq!(answer(&mut client, NOW, wrong_key), failed);
    // Mallory's own, valid record as an answer about Alice.
    assert_eq!(answer(&mut client, NOW, record(&mallory, 3, DAY_MS)), failed);
    // An answer nobody asked for is ignored.
    let unasked = RelayFrame::LookupResult { peer: alice.peer_id(), record: Some(record(&alice, 4, DAY_MS)) };
    assert_eq!(client.on_frame(NOW, &unasked.encode()).unwrap(), vec![]);
}

#[test]
fn a_reader_takes_an_older_record_only_once_the_newest_it_saw_has_expired() {
    let mut r = ChaCha20Rng::seed_from_u64(13);
    let alice = IdentityKeyPair::generate(&mut r);
    let mut client = p2pchat_protocol::relay::RelayClient::new();
    let answer = |client: &mut p2pchat_protocol::relay::RelayClient, now: Timestamp, rec: PeerRecord| {
        let _ = client.lookup(now, alice.peer_id());
        let frame = RelayFrame::LookupResult { peer: alice.peer_id(), record: Some(rec) };
        client.on_frame(now, &frame.encode()).unwrap()
    };
    let found = |rec: &PeerRecord| {
        vec![ClientAction::Record(rec.clone()), ClientAction::ToEngine(Input::PeerRecord(alice.peer_id()))]
    };
    let failed = vec![ClientAction::ToEngine(Input::LookupFailed(alice.peer_id()))];
    // Signed while alice's clock ran an hour ahead, valid for a minute.
    let ahead = record(&alice, 3_600_000, 60_000);
    assert_eq!(answer(&mut client, NOW, ahead.clone()), found(&ahead));
    // A lower sequence is stale while that one lasts …
    let corrected = record(&alice, 1_000, DAY_MS);
    assert_eq!(answer(&mut client, NOW, corrected.clone()), failed);
    // … and the newest valid record once it has expired.
    assert_eq!(answer(&mut client, NOW.saturating_add_millis(60_001), corrected.clone()), found(&corrected));
}

#[test]
fn all_mailboxes_together_stay_within_the_total_byte_cap() {
    let config = RelayConfig { mailbox_total_max_bytes: 2_500, ..RelayConfig::default() };
    let mut w = World::new(3, config);
    let to_bob = w.conversation(0, 1);
    let to_carol = w.conversation(0, 2);
    w.send(0, &to_bob.id, "hello");
    w.send(0, &to_carol.id, "hello");
    w.disconnect(1);
    w.disconnect(2);
    let for_bob = w.send(0, &to_bob.id, &"b".repeat(1_500));
    let for_carol = w.send(0, &to_carol.id, &"c".repeat(1_500));
    assert_eq!(w.message(0, &for_bob.id).unwrap().waiting_reason, None, "held");
    assert_eq!(w.message(0, &for_carol.id).unwrap().waiting_reason.as_deref(), Some(Refusal::Quota.as_str()));
}

#[test]
fn a_repeated_register_does_not_resend_the_mailbox() {
    let mut w = World::new(2, RelayConfig::default());
    let c = w.conversation(0, 1);
    w.send(0, &c.id, "hello");
    w.disconnect(1);
    w.send(0, &c.id, "held");
    let bob = w.id(1);
    w.relay.connected(bob);
    let delivers = |w: &mut World| {
        w.relay.handle_frame(w.now, bob, &RelayFrame::Register.encode()).unwrap();
        std::iter::from_fn(|| w.relay.poll_transmit())
            .filter(|(_, b)| matches!(RelayFrame::decode(b), Ok(RelayFrame::Deliver { .. })))
            .count()
    };
    assert_eq!(delivers(&mut w), 1, "the first registration brings the mailbox");
    for _ in 0..10 {
        assert_eq!(delivers(&mut w), 0, "a repeated one does not");
    }
}

/// A relay store whose commits fail on demand.
#[derive(Default)]
struct FailingStore {
    inner: MemoryRelayStore,
    fail_commit: bool,
}

impl RelayStore for FailingStore {
    fn begin(&mut self) -> Result<(), RelayStoreError> {
        self.inner.begin()
    }
    fn commit(&mut self) -> Result<(), RelayStoreError> {
        if self.fail_commit {
            return Err(RelayStoreError::Unavailable("disk full".into()));
        }
        self.inner.commit()
    }
    fn rollback(&mut self) {
        self.inner.rollback()
    }
    fn mailbox(&self, peer: &PeerId) -> Result<Vec<MailboxEntry>, RelayStoreError> {
        self.inner.mailbox(peer)
    }
    fn mailbox_after(&self, peer: &PeerId, after: u64, limit: usize) -> Result<Vec<MailboxEntry>, RelayStoreError> {
        self.inner.mailbox_after(peer, after, limit)
    }
    fn record_count(&self) -> Result<usize, RelayStoreError> {
        self.inner.record_count()
    }
    fn mailbox_usage(&self, peer: &PeerId) -> Result<Usage, RelayStoreError> {
        self.inner.mailbox_usage(peer)
    }
    fn mailbox_usage_by_sender(&self, recipient: &PeerId, sender: &PeerId) -> Result<Usage, RelayStoreError> {
        self.inner.mailbox_usage_by_sender(recipient, sender)
    }
    fn mailbox_usage_by_source(&self, recipient: &PeerId, source: &Source) -> Result<Usage, RelayStoreError> {
        self.inner.mailbox_usage_by_source(recipient, source)
    }
    fn source_usage(&self, source: &Source) -> Result<Usage, RelayStoreError> {
        self.inner.source_usage(source)
    }
    fn mailbox_total(&self) -> Result<Usage, RelayStoreError> {
        self.inner.mailbox_total()
    }
    fn put_mailbox_entry(&mut self, entry: &MailboxEntry) -> Result<(), RelayStoreError> {
        self.inner.put_mailbox_entry(entry)
    }
    fn delete_mailbox_entry(&mut self, peer: &PeerId, id: u64) -> Result<(), RelayStoreError> {
        self.inner.delete_mailbox_entry(peer, id)
    }
    fn delete_mailbox_before(&mut self, cutoff: Timestamp) -> Result<usize, RelayStoreError> {
        self.inner.delete_mailbox_before(cutoff)
    }
    fn oldest_mailbox_entry(&self) -> Result<Option<Timestamp>, RelayStoreError> {
        self.inner.oldest_mailbox_entry()
    }
    fn next_mailbox_id(&mut self) -> Result<u64, RelayStoreError> {
        self.inner.next_mailbox_id()
    }
    fn record(&self, peer: &PeerId) -> Result<Option<PeerRecord>, RelayStoreError> {
        self.inner.record(peer)
    }
    fn put_record(&mut self, record: &PeerRecord, source: &Source, seen_at: Timestamp) -> Result<(), RelayStoreError> {
        self.inner.put_record(record, source, seen_at)
    }
    fn touch_record(&mut self, peer: &PeerId, seen_at: Timestamp) -> Result<(), RelayStoreError> {
        self.inner.touch_record(peer, seen_at)
    }
    fn records_from_source(&self, source: &Source) -> Result<usize, RelayStoreError> {
        self.inner.records_from_source(source)
    }
    fn idle_records(&self, seen_before: Timestamp, limit: usize) -> Result<Vec<PeerId>, RelayStoreError> {
        self.inner.idle_records(seen_before, limit)
    }
    fn delete_record(&mut self, peer: &PeerId) -> Result<(), RelayStoreError> {
        self.inner.delete_record(peer)
    }
    fn delete_expired_records(&mut self, now: Timestamp, seen_before: Timestamp) -> Result<usize, RelayStoreError> {
        self.inner.delete_expired_records(now, seen_before)
    }
}

#[test]
fn a_failed_commit_leaves_no_registration_and_spends_no_tokens() {
    let config = RelayConfig { rate_burst: 3, rate_per_sec: 0, ..RelayConfig::default() };
    let mut relay = Relay::new(FailingStore::default(), config).unwrap();
    let peer = PeerId([5; 20]);
    relay.connected(peer);
    relay.store_mut().fail_commit = true;
    for _ in 0..5 {
        assert!(relay.handle_frame(NOW, peer, &RelayFrame::Register.encode()).is_err());
    }
    assert_eq!(relay.poll_transmit(), None, "nothing released");
    relay.store_mut().fail_commit = false;
    // Still unregistered: a forward is refused as such, not as over the rate.
    let forward = RelayFrame::Forward { to: PeerId([6; 20]), id: 1, mailbox_allowed: true, envelope: vec![0; 10] };
    relay.handle_frame(NOW, peer, &forward.encode()).unwrap();
    let (_, bytes) = relay.poll_transmit().unwrap();
    assert_eq!(RelayFrame::decode(&bytes).unwrap(), RelayFrame::Refused { id: 1, reason: Refusal::NotRegistered });
    // The other two tokens of the burst are still there: register, then look up.
    relay.handle_frame(NOW, peer, &RelayFrame::Register.encode()).unwrap();
    relay.handle_frame(NOW, peer, &RelayFrame::Lookup { peer }.encode()).unwrap();
    let answers: Vec<RelayFrame> =
        std::iter::from_fn(|| relay.poll_transmit()).map(|(_, b)| RelayFrame::decode(&b).unwrap()).collect();
    assert_eq!(answers, vec![RelayFrame::Registered, RelayFrame::LookupResult { peer, record: None }]);
}

fn frames(relay: &mut Relay<MemoryRelayStore>) -> Vec<(PeerId, RelayFrame)> {
    std::iter::from_fn(|| relay.poll_transmit()).map(|(to, b)| (to, RelayFrame::decode(&b).unwrap())).collect()
}

#[test]
fn every_frame_costs_a_token_even_refused_or_undecodable() {
    let config = RelayConfig { rate_burst: 4, rate_per_sec: 0, max_envelope_len: 10, ..RelayConfig::default() };
    let mut relay = Relay::new(MemoryRelayStore::new(), config).unwrap();
    let peer = PeerId([8; 20]);
    relay.connected(peer);
    relay.handle_frame(NOW, peer, &RelayFrame::Register.encode()).unwrap(); // 1
    let too_large = RelayFrame::Forward { to: peer, id: 1, mailbox_allowed: true, envelope: vec![0; 11] };
    relay.handle_frame(NOW, peer, &too_large.encode()).unwrap(); // 2
    relay.handle_frame(NOW, peer, &[1, 200, 200]).unwrap(); // 3: undecodable
    relay.handle_frame(NOW, peer, &RelayFrame::MailboxAck { ids: vec![1] }.encode()).unwrap(); // 4
    let _ = frames(&mut relay);
    let fits = RelayFrame::Forward { to: peer, id: 2, mailbox_allowed: true, envelope: vec![0; 5] };
    relay.handle_frame(NOW, peer, &fits.encode()).unwrap();
    assert_eq!(frames(&mut relay), vec![(peer, RelayFrame::Refused { id: 2, reason: Refusal::Rate })]);
    // A peer with no open connection gets nothing, not even a rate bucket.
    let stranger = PeerId([9; 20]);
    relay.handle_frame(NOW, stranger, &RelayFrame::Register.encode()).unwrap();
    assert_eq!(frames(&mut relay), vec![]);
}

#[test]
fn an_overlapping_reconnect_keeps_the_peer_registered_and_gets_the_mailbox_again() {
    let mut w = World::new(2, RelayConfig::default());
    let c = w.conversation(0, 1);
    w.send(0, &c.id, "hello");
    w.disconnect(1);
    w.send(0, &c.id, "held");
    let bob = w.id(1);
    // Two connections; the first one's mailbox copy is lost with it.
    w.relay.connected(bob);
    w.relay.handle_frame(w.now, bob, &RelayFrame::Register.encode()).unwrap();
    let first = frames(&mut w.relay).into_iter().filter(|(_, f)| matches!(f, RelayFrame::Deliver { .. })).count();
    assert_eq!(first, 1);
    w.relay.connected(bob);
    w.relay.disconnected(&bob); // the old connection closes after the new one opened
    w.relay.handle_frame(w.now, bob, &RelayFrame::Register.encode()).unwrap();
    let again = frames(&mut w.relay).into_iter().filter(|(_, f)| matches!(f, RelayFrame::Deliver { .. })).count();
    assert_eq!(again, 1, "the new connection gets the unacknowledged entry again");
    // And bob is still reachable: a forward to him is passed on at once.
    let alice = w.id(0);
    let forward = RelayFrame::Forward { to: bob, id: 77, mailbox_allowed: true, envelope: vec![1; 20] };
    w.relay.handle_frame(w.now, alice, &forward.encode()).unwrap();
    assert!(frames(&mut w.relay).contains(&(alice, RelayFrame::Forwarded { id: 77 })));
}

#[test]
fn the_mailbox_goes_out_in_acknowledged_batches() {
    // One sender fills the mailbox: its own share is raised to the whole.
    let config = RelayConfig {
        mailbox_max_count_per_sender: 1_000,
        mailbox_max_count_per_source: 1_000,
        ..RelayConfig::default()
    };
    let total = 150u64;
    let (mut relay, _, bob_id) = full_mailbox(config, total, 30);
    let mut now = NOW.saturating_add_millis(total * 1_000 + 60_000);
    relay.connected(bob_id);
    relay.handle_frame(now, bob_id, &RelayFrame::Register.encode()).unwrap();
    let mut received = 0;
    loop {
        let ids: Vec<u64> = frames(&mut relay)
            .into_iter()
            .filter_map(|(_, f)| match f {
                RelayFrame::Deliver { mailbox_id: Some(id), .. } => Some(id),
                _ => None,
            })
            .collect();
        if ids.is_empty() {
            break;
        }
        assert!(ids.len() <= p2pchat_protocol::relay::MAILBOX_BATCH, "a batch of {}", ids.len());
        // Nothing more comes until the batch is acknowledged; a fetch right
        // away sends nothing, one after the resend interval sends the
        // unacknowledged batch again, and no more.
        relay.handle_frame(now, bob_id, &RelayFrame::FetchMailbox.encode()).unwrap();
        assert_eq!(frames(&mut relay).len(), 0, "a fetch within the interval sends nothing");
        now = now.saturating_add_millis(MAILBOX_RESEND_INTERVAL_MS);
        relay.handle_frame(now, bob_id, &RelayFrame::FetchMailbox.encode()).unwrap();
        let resent = frames(&mut relay).len();
        assert_eq!(resent, ids.len(), "a fetch sends the unacknowledged batch again, and no more");
        received += ids.len() as u64;
        relay.handle_frame(now, bob_id, &RelayFrame::MailboxAck { ids }.encode()).unwrap();
    }
    assert_eq!(received, total);
}

/// A relay whose mailbox for one offline recipient holds `count` entries
/// of `entry_len` bytes, deposited a second apart by one sender: the relay,
/// the sender and the recipient.
fn full_mailbox(config: RelayConfig, count: u64, entry_len: usize) -> (Relay<MemoryRelayStore>, PeerId, PeerId) {
    let mut relay = Relay::new(MemoryRelayStore::new(), config).unwrap();
    let mut r = ChaCha20Rng::seed_from_u64(41);
    let bob = IdentityKeyPair::generate(&mut r);
    let (alice, bob_id) = (PeerId([1; 20]), bob.peer_id());
    for peer in [alice, bob_id] {
        relay.connected(peer);
        relay.handle_frame(NOW, peer, &RelayFrame::Register.encode()).unwrap();
    }
    relay.handle_frame(NOW, bob_id, &RelayFrame::Publish(record(&bob, 1, DAY_MS)).encode()).unwrap();
    relay.disconnected(&bob_id);
    for id in 0..count {
        let f = RelayFrame::Forward { to: bob_id, id, mailbox_allowed: true, envelope: vec![id as u8; entry_len] };
        relay.handle_frame(NOW.saturating_add_millis(id * 1000), alice, &f.encode()).unwrap();
    }
    let _ = frames(&mut relay);
    (relay, alice, bob_id)
}

fn delivered_bytes(frames: &[(PeerId, RelayFrame)]) -> usize {
    frames
        .iter()
        .map(|(_, f)| match f {
            RelayFrame::Deliver { envelope, .. } => envelope.len(),
            _ => 0,
        })
        .sum()
}

#[test]
fn a_storm_of_fetches_costs_the_relay_one_batch_per_interval() {
    let (mut relay, _, bob) = full_mailbox(RelayConfig::default(), 64, 200 * 1024);
    let now = NOW.saturating_add_millis(100_000);
    relay.connected(bob);
    relay.handle_frame(now, bob, &RelayFrame::Register.encode()).unwrap();
    let first = frames(&mut relay);
    // A batch is bounded by bytes too: five entries of 200 KiB fit in 1 MiB.
    assert_eq!(delivered_bytes(&first), 5 * 200 * 1024);
    assert!(delivered_bytes(&first) <= MAILBOX_BATCH_BYTES);
    // Two hundred fetches that never read: nothing more within the interval,
    // then one batch again.
    let mut sent = 0;
    for i in 0..200u64 {
        relay.handle_frame(now.saturating_add_millis(i * 10), bob, &RelayFrame::FetchMailbox.encode()).unwrap();
        sent += delivered_bytes(&frames(&mut relay));
    }
    assert_eq!(sent, 0, "fetches within the resend interval send nothing");
    let later = now.saturating_add_millis(MAILBOX_RESEND_INTERVAL_MS);
    for _ in 0..200 {
        relay.handle_frame(later, bob, &RelayFrame::FetchMailbox.encode()).unwrap();
        sent += delivered_bytes(&frames(&mut relay));
    }
    assert_eq!(sent, 5 * 200 * 1024, "one resend of the batch in flight, however many fetches");
}

#[test]
fn acknowledgements_over_the_rate_still_drain_the_mailbox_and_name_only_entries_in_flight() {
    // One frame a second: the sender fills the mailbox a second apart.
    let config = RelayConfig { rate_burst: 3, rate_per_sec: 1, ..RelayConfig::default() };
    let (mut relay, _, bob) = full_mailbox(config, 64, 10);
    let now = NOW.saturating_add_millis(100_000);
    relay.connected(bob);
    relay.handle_frame(now, bob, &RelayFrame::Register.encode()).unwrap(); // token 1
    let ids: Vec<u64> = frames(&mut relay)
        .into_iter()
        .filter_map(|(_, f)| match f {
            RelayFrame::Deliver { mailbox_id, .. } => mailbox_id,
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 64);
    // Spend the rest of the tokens, then acknowledge over the rate.
    for _ in 0..2 {
        relay.handle_frame(now, bob, &RelayFrame::Lookup { peer: bob }.encode()).unwrap();
    }
    let _ = frames(&mut relay);
    // IDs that are not in flight delete nothing.
    relay.handle_frame(now, bob, &RelayFrame::MailboxAck { ids: vec![u64::MAX, 999_999] }.encode()).unwrap();
    assert_eq!(mailbox_len(&mut relay, &bob), 64);
    relay.handle_frame(now, bob, &RelayFrame::MailboxAck { ids }.encode()).unwrap();
    assert_eq!(mailbox_len(&mut relay, &bob), 0, "an acknowledgement over the rate is still taken");
}

fn mailbox_len(relay: &mut Relay<MemoryRelayStore>, peer: &PeerId) -> usize {
    relay.store_mut().begin().unwrap();
    let len = relay.store().mailbox(peer).unwrap().len();
    relay.store_mut().rollback();
    len
}

#[test]
fn reconnecting_does_not_refill_the_rate() {
    let config = RelayConfig { rate_burst: 3, rate_per_sec: 1, ..RelayConfig::default() };
    let mut relay = Relay::new(MemoryRelayStore::new(), config).unwrap();
    let peer = PeerId([8; 20]);
    relay.connected(peer);
    for _ in 0..3 {
        relay.handle_frame(NOW, peer, &RelayFrame::Register.encode()).unwrap();
    }
    relay.disconnected(&peer);
    relay.connected(peer);
    relay.handle_frame(NOW, peer, &RelayFrame::Register.encode()).unwrap();
    let forward = RelayFrame::Forward { to: peer, id: 5, mailbox_allowed: true, envelope: vec![0; 5] };
    let _ = frames(&mut relay);
    relay.handle_frame(NOW, peer, &forward.encode()).unwrap();
    assert_eq!(frames(&mut relay), vec![(peer, RelayFrame::Refused { id: 5, reason: Refusal::Rate })]);
    // Refilled with time, as before.
    let later = NOW.saturating_add_millis(2_000);
    relay.handle_frame(later, peer, &RelayFrame::Register.encode()).unwrap();
    relay.handle_frame(later, peer, &forward.encode()).unwrap();
    assert!(frames(&mut relay).contains(&(peer, RelayFrame::Forwarded { id: 5 })));
}

#[test]
fn publishing_the_same_record_again_is_accepted_and_the_records_table_is_bounded() {
    let config = RelayConfig { max_records: 1, ..RelayConfig::default() };
    let mut relay = Relay::new(MemoryRelayStore::new(), config).unwrap();
    let mut r = ChaCha20Rng::seed_from_u64(14);
    let (alice, bob) = (IdentityKeyPair::generate(&mut r), IdentityKeyPair::generate(&mut r));
    for peer in [alice.peer_id(), bob.peer_id()] {
        relay.connected(peer);
        relay.handle_frame(NOW, peer, &RelayFrame::Register.encode()).unwrap();
    }
    let _ = frames(&mut relay);
    let mine = record(&alice, 5, DAY_MS);
    for _ in 0..2 {
        relay.handle_frame(NOW, alice.peer_id(), &RelayFrame::Publish(mine.clone()).encode()).unwrap();
        assert_eq!(frames(&mut relay), vec![(alice.peer_id(), RelayFrame::Published { sequence: 5 })]);
    }
    relay.handle_frame(NOW, bob.peer_id(), &RelayFrame::Publish(record(&bob, 1, DAY_MS)).encode()).unwrap();
    assert_eq!(
        frames(&mut relay),
        vec![(bob.peer_id(), RelayFrame::PublishRefused { sequence: 1, reason: PublishRefusal::Full })]
    );
}

mod hostile {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic_the_relay_or_the_client(
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..400), 1..10),
        ) {
            let mut relay = Relay::new(MemoryRelayStore::new(), RelayConfig::default()).unwrap();
            let peer = PeerId([3; 20]);
            relay.connected(peer);
            relay.handle_frame(NOW, peer, &RelayFrame::Register.encode()).unwrap();
            let mut client = p2pchat_protocol::relay::RelayClient::new();
            for mut bytes in frames {
                if let Some(first) = bytes.first_mut() {
                    *first = 1; // mostly past the version check
                }
                relay.handle_frame(NOW, peer, &bytes).unwrap();
                let _ = client.on_frame(NOW, &bytes);
            }
        }
    }
}

/// A relay with `config`, and helpers to connect peers from sources and
/// read the answer to each frame.
struct QuotaRelay {
    relay: Relay<MemoryRelayStore>,
    now: Timestamp,
}

impl QuotaRelay {
    fn new(config: RelayConfig) -> Self {
        Self { relay: Relay::new(MemoryRelayStore::new(), config).unwrap(), now: NOW }
    }

    /// Connects and registers `peer` from `source`.
    fn join(&mut self, peer: PeerId, source: u8) {
        self.relay.connected_from(peer, Source([source; 16]));
        self.relay.handle_frame(self.now, peer, &RelayFrame::Register.encode()).unwrap();
        let _ = frames(&mut self.relay);
    }

    /// Connects `peer` from `source` without registering: a stranger here.
    fn visit(&mut self, peer: PeerId, source: u8) {
        self.relay.connected_from(peer, Source([source; 16]));
    }

    fn lookup(&mut self, from: PeerId, peer: PeerId) -> Option<PeerRecord> {
        self.relay.handle_frame(self.now, from, &RelayFrame::Lookup { peer }.encode()).unwrap();
        match frames(&mut self.relay).into_iter().map(|(_, f)| f).next() {
            Some(RelayFrame::LookupResult { record, .. }) => record,
            other => panic!("expected a lookup result, got {other:?}"),
        }
    }

    /// `identity` joins from `source`, publishes its record, and leaves;
    /// returns the relay's answer.
    fn publish(&mut self, identity: &IdentityKeyPair, source: u8) -> RelayFrame {
        let peer = identity.peer_id();
        self.join(peer, source);
        let record = PeerRecord::sign(identity, vec![], vec![], self.now, self.now.saturating_add_millis(DAY_MS), 1);
        self.relay.handle_frame(self.now, peer, &RelayFrame::Publish(record).encode()).unwrap();
        let answer = frames(&mut self.relay).into_iter().map(|(_, f)| f).next().unwrap();
        self.relay.disconnected(&peer);
        answer
    }

    /// Forwards `len` bytes from `from` to `to`; returns the answer.
    fn forward(&mut self, from: PeerId, to: PeerId, len: usize) -> RelayFrame {
        let f = RelayFrame::Forward { to, id: 1, mailbox_allowed: true, envelope: vec![0; len] };
        self.relay.handle_frame(self.now, from, &f.encode()).unwrap();
        frames(&mut self.relay).into_iter().map(|(_, f)| f).find(|f| !matches!(f, RelayFrame::Deliver { .. })).unwrap()
    }
}

fn identity(n: u64) -> IdentityKeyPair {
    IdentityKeyPair::generate(&mut ChaCha20Rng::seed_from_u64(1_000 + n))
}

const HELD: RelayFrame = RelayFrame::Held { id: 1 };
const QUOTA: RelayFrame = RelayFrame::Refused { id: 1, reason: Refusal::Quota };

#[test]
fn a_stranger_cannot_fill_a_mailbox_with_one_identity_or_many_and_honest_senders_still_get_through() {
    let mut r = QuotaRelay::new(RelayConfig { rate_burst: 100_000, ..RelayConfig::default() });
    let victim = identity(0);
    assert_eq!(r.publish(&victim, 1), RelayFrame::Published { sequence: 1 });
    let victim = victim.peer_id();
    // One identity: its share of the mailbox, then refused.
    let stranger = PeerId([0x51; 20]);
    r.join(stranger, 66);
    let answers: Vec<RelayFrame> = (0..150).map(|_| r.forward(stranger, victim, 10)).collect();
    assert_eq!(answers.iter().filter(|a| **a == HELD).count(), 100, "one sender's share");
    assert!(answers[100..].iter().all(|a| *a == QUOTA));
    // Many identities from the same address: that address's share, then refused.
    let mut held_from_address = 100;
    for n in 0..10u8 {
        let puppet = PeerId([n; 20]);
        r.join(puppet, 66);
        held_from_address += (0..100).filter(|_| r.forward(puppet, victim, 10) == HELD).count();
    }
    assert_eq!(held_from_address, 250, "one address's share of a mailbox, whatever identities it uses");
    // An honest sender elsewhere still gets through.
    let honest = PeerId([0x77; 20]);
    r.join(honest, 9);
    assert_eq!(r.forward(honest, victim, 10), HELD);
}

#[test]
fn puppet_recipients_at_one_address_cannot_take_the_relays_whole_mailbox_space() {
    let config = RelayConfig { source_max_bytes: 1_000, rate_burst: 100_000, ..RelayConfig::default() };
    let mut r = QuotaRelay::new(config);
    // Ten puppet recipients, all published from the attacker's address.
    let puppets: Vec<PeerId> = (0..10)
        .map(|n| {
            let id = identity(100 + n);
            assert_eq!(r.publish(&id, 66), RelayFrame::Published { sequence: 1 });
            id.peer_id()
        })
        .collect();
    let attacker = PeerId([0x51; 20]);
    r.join(attacker, 66);
    let held: usize = puppets.iter().map(|p| (0..5).filter(|_| r.forward(attacker, *p, 100) == HELD).count()).sum();
    assert_eq!(held, 10, "1,000 bytes from one address across every mailbox");
    // Someone at another address deposits as before.
    let honest = PeerId([0x77; 20]);
    r.join(honest, 9);
    assert_eq!(r.forward(honest, puppets[0], 100), HELD);
}

#[test]
fn records_are_capped_per_address_and_a_full_relay_evicts_only_idle_records_with_empty_mailboxes() {
    let config = RelayConfig {
        max_records: 3,
        max_records_per_source: 2,
        record_idle_ms: 60_000,
        rate_burst: 100_000,
        ..RelayConfig::default()
    };
    let mut r = QuotaRelay::new(config);
    let published = RelayFrame::Published { sequence: 1 };
    let (a, b, c) = (identity(200), identity(201), identity(202));
    assert_eq!(r.publish(&a, 66), published);
    assert_eq!(r.publish(&b, 66), published);
    assert_eq!(
        r.publish(&c, 66),
        RelayFrame::PublishRefused { sequence: 1, reason: PublishRefusal::TooManyFromAddress }
    );
    assert_eq!(r.publish(&c, 7), published);
    // Full, and everyone was seen just now: refused.
    let newcomer = identity(203);
    assert_eq!(r.publish(&newcomer, 8), RelayFrame::PublishRefused { sequence: 1, reason: PublishRefusal::Full });
    // a's mailbox holds an entry; an hour later b comes back for a moment;
    // a minute after that, c has been away the longest and its mailbox is
    // empty: its record goes to make room, and only it.
    let sender = PeerId([0x77; 20]);
    r.join(sender, 9);
    assert_eq!(r.forward(sender, a.peer_id(), 10), HELD);
    r.now = r.now.saturating_add_millis(3_600_000);
    r.join(b.peer_id(), 66);
    r.relay.disconnected(&b.peer_id());
    r.now = r.now.saturating_add_millis(60_000);
    assert_eq!(r.publish(&newcomer, 8), published, "an idle record makes room");
    let lookup = |r: &mut QuotaRelay, peer: PeerId| {
        r.relay.handle_frame(r.now, sender, &RelayFrame::Lookup { peer }.encode()).unwrap();
        match frames(&mut r.relay).into_iter().map(|(_, f)| f).next().unwrap() {
            RelayFrame::LookupResult { record, .. } => record.is_some(),
            other => panic!("{other:?}"),
        }
    };
    assert!(!lookup(&mut r, c.peer_id()), "the idle record was evicted");
    assert!(lookup(&mut r, a.peer_id()), "a record whose mailbox holds entries is kept");
    assert!(lookup(&mut r, b.peer_id()), "a record seen within the idle time is kept");
    // Nothing else is idle: the next newcomer is refused.
    assert_eq!(r.publish(&identity(204), 10), RelayFrame::PublishRefused { sequence: 1, reason: PublishRefusal::Full });
}

const NOT_REGISTERED: RelayFrame = RelayFrame::Refused { id: 1, reason: Refusal::NotRegistered };

#[test]
fn a_stranger_reaches_the_relays_members_within_its_share_and_no_one_else() {
    let mut r = QuotaRelay::new(RelayConfig { rate_burst: 100_000, ..RelayConfig::default() });
    // A member away (its record is here) and a member online.
    let away = identity(300);
    assert_eq!(r.publish(&away, 1), RelayFrame::Published { sequence: 1 });
    let away = away.peer_id();
    let online = identity(301).peer_id();
    r.join(online, 2);
    // A stranger: connected, authenticated, never registered here.
    let stranger = PeerId([0x5a; 20]);
    r.visit(stranger, 3);
    assert_eq!(r.forward(stranger, online, 10), RelayFrame::Forwarded { id: 1 }, "passed on to a member online");
    assert_eq!(r.forward(stranger, away, 10), HELD, "deposited for a member away");
    // A member answers the stranger while it is connected.
    assert_eq!(r.forward(online, stranger, 10), RelayFrame::Forwarded { id: 1 }, "a member's answer to a visitor");
    // Between two non-members the relay is nobody's proxy, even when both
    // are connected.
    let other = PeerId([0x6b; 20]);
    r.visit(other, 5);
    assert_eq!(r.forward(stranger, other, 10), NOT_REGISTERED);
    assert_eq!(r.forward(stranger, PeerId([0x6c; 20]), 10), NOT_REGISTERED);
    // And a stranger's share of a member's mailbox is a sender's share.
    let held = 1 + (0..150).filter(|_| r.forward(stranger, away, 10) == HELD).count();
    assert_eq!(held, 100, "one sender's share, stranger or not");
}

#[test]
fn a_members_mailbox_outlives_its_record_until_the_mailbox_lifetime_since_it_was_last_seen() {
    let mut r = QuotaRelay::new(RelayConfig { rate_burst: 100_000, ..RelayConfig::default() });
    let member = identity(310);
    // Its record is valid for a day; it is last seen now.
    assert_eq!(r.publish(&member, 1), RelayFrame::Published { sequence: 1 });
    let member = member.peer_id();
    let sender = PeerId([0x33; 20]);
    r.join(sender, 4);
    // Three days later the record has expired, and is no longer handed
    // out, but the member's mailbox still takes deposits.
    r.now = NOW.saturating_add_millis(3 * DAY_MS);
    r.relay.handle_timeout(r.now).unwrap();
    assert_eq!(r.lookup(sender, member), None, "an expired record is not handed out");
    assert_eq!(r.forward(sender, member, 10), HELD);
    // A mailbox lifetime (7 days) after it was last seen, it is no member.
    let ttl = RelayConfig::default().mailbox_ttl_ms;
    r.now = NOW.saturating_add_millis(ttl + 2 * 60 * 60 * 1000);
    r.relay.handle_timeout(r.now).unwrap();
    assert_eq!(r.forward(sender, member, 10), RelayFrame::Refused { id: 1, reason: Refusal::UnknownRecipient });
}

#[test]
fn a_relay_that_stays_silent_fails_a_forward_but_a_busy_one_does_not() {
    use p2pchat_protocol::engine::{Transmit, TransmitId, TransmitOutcome};
    use p2pchat_protocol::relay::{RelayClient, RELAY_ANSWER_TIMEOUT_MS};
    let transmit =
        |id| Transmit { id: TransmitId(id), peer: PeerId([1; 20]), bytes: vec![0; 10], mailbox_allowed: true };
    let mut client = RelayClient::new();
    let _ = client.forward(NOW, transmit(1));
    // The relay is busy (a mailbox drains one frame at a time) but talks.
    let busy = NOW.saturating_add_millis(RELAY_ANSWER_TIMEOUT_MS - 1);
    client.on_frame(busy, &RelayFrame::Registered.encode()).unwrap();
    assert_eq!(client.expire(NOW.saturating_add_millis(RELAY_ANSWER_TIMEOUT_MS + 1)), vec![]);
    // Then silence, for the whole time.
    let silent = busy.saturating_add_millis(RELAY_ANSWER_TIMEOUT_MS);
    let expired = client.expire(silent);
    assert!(
        matches!(&expired[..], [Input::TransmitResult { id: TransmitId(1), outcome: TransmitOutcome::Failed(_) }]),
        "{expired:?}"
    );
    // A late answer is ignored.
    assert_eq!(client.on_frame(silent, &RelayFrame::Forwarded { id: 1 }.encode()).unwrap(), vec![]);
}

#[test]
fn a_relay_tells_a_registering_peer_the_address_its_connection_comes_from() {
    let mut relay = Relay::new(MemoryRelayStore::new(), RelayConfig::default()).unwrap();
    let (peer, other) = (PeerId([1; 20]), PeerId([2; 20]));
    // A dual-stack socket shows an IPv4 peer as IPv4-mapped IPv6; the peer
    // is told the IPv4 address others would dial.
    relay.connected_at(peer, "[::ffff:198.51.100.4]:40001".parse().unwrap());
    relay.connected(other);
    relay.handle_frame(NOW, peer, &RelayFrame::Register.encode()).unwrap();
    relay.handle_frame(NOW, other, &RelayFrame::Register.encode()).unwrap();
    let mut frames = Vec::new();
    while let Some((to, bytes)) = relay.poll_transmit() {
        frames.push((to, RelayFrame::decode(&bytes).unwrap()));
    }
    assert_eq!(
        frames,
        [
            (peer, RelayFrame::Registered),
            (peer, RelayFrame::Observed { address: "198.51.100.4:40001".into() }),
            // A driver that knows no address tells nothing.
            (other, RelayFrame::Registered),
        ]
    );
    // The observation is the relay's to send: one from a node is refused.
    relay.handle_frame(NOW, peer, &RelayFrame::Observed { address: "192.0.2.1:1".into() }.encode()).unwrap();
    assert!(relay.poll_transmit().is_none());
    assert!(matches!(relay.poll_event(), Some(p2pchat_protocol::relay::RelayEvent::Rejected { .. })));
}
