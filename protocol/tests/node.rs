//! The node's routing, relay links and group commit, driven through its
//! public driving rule against a real in-memory relay: which path each
//! transmit takes, what happens when one fails, and how a returning node
//! drains its mailbox.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

use p2pchat_protocol::address::AddressPolicy;
use p2pchat_protocol::engine::{
    Answer, Command, CommandOutcome, Event, KeptRecord, MemoryStore, MessageStatus, PeerRecordStore, Query,
    SendFailure, Transaction, TransmitId, TransmitOutcome,
};
use p2pchat_protocol::node::{
    AddressSource, Node, NodeConfig, NodeInput, NodeOutput, Notice, PathState, RelaySpec, Reply, Ticket,
    DIRECT_DIAL_BUDGET_MS, HELD_FOR_A_PATH_RETRY_MS, LOOKUP_INTERVAL_MS, MAX_DIRECT_BYTES_PER_PEER,
    MAX_DIRECT_SENDS_PER_PEER, RELAY_BACKOFF_MAX_MS,
};
use p2pchat_protocol::relay::{
    MemoryRelayStore, Relay, RelayConfig, RelayFrame, RelayStore, RELAY_ANSWER_TIMEOUT_MS,
    RELAY_REGISTRATION_TIMEOUT_MS,
};
use p2pchat_protocol::{IdentityKeyPair, MessageId, PeerId, Timestamp};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const START: Timestamp = Timestamp::from_millis(1_767_225_600_000);

/// What the test network does with direct dials.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dials {
    /// They connect at once.
    Connect,
    /// They are never answered.
    Blackhole,
}

/// A direct send not answered yet: (from, to, its ID, its bytes).
type HeldSend = (usize, usize, TransmitId, Vec<u8>);

/// Nodes and one relay, with every output applied at once.
struct Net {
    now: Timestamp,
    nodes: Vec<Node<MemoryStore>>,
    peers: Vec<PeerId>,
    relay: Relay<MemoryRelayStore>,
    /// Nodes the relay cannot be reached from.
    cut_off: BTreeSet<usize>,
    /// Nodes whose relay connection closes as soon as it opens.
    closes_at_once: BTreeSet<usize>,
    /// Nodes whose frames to the relay are lost (on a connection that
    /// stays up).
    frames_lost: BTreeSet<usize>,
    registered: BTreeSet<usize>,
    dials: Dials,
    /// Direct sends fail even on an open connection.
    direct_sends_fail: bool,
    /// Direct sends wait here, unanswered, until the test settles them
    /// (a peer that reads slowly).
    direct_sends_held: Option<Vec<HeldSend>>,
    /// Nodes whose queue to the relay is full: the driver gives their
    /// frames back unsent.
    relay_queue_full: BTreeSet<usize>,
    direct: BTreeSet<(usize, usize)>,
    log: Vec<(Timestamp, usize, NodeOutput)>,
    next_ticket: u64,
    configs: Vec<NodeConfig>,
    restarts: u64,
}

impl Net {
    fn new(count: usize, dials: Dials) -> Self {
        Self::new_with(count, dials, |_, _| {})
    }

    /// Like [`Net::new`], with each node's config adjusted first.
    fn new_with(count: usize, dials: Dials, configure: impl Fn(usize, &mut NodeConfig)) -> Self {
        let relay_spec = RelaySpec { peer: PeerId([0xee; 20]), address: "relay.test:4433".into() };
        let mut nodes = Vec::new();
        let mut peers = Vec::new();
        let mut configs = Vec::new();
        for i in 0..count {
            let identity = IdentityKeyPair::generate(&mut ChaCha20Rng::seed_from_u64(100 + i as u64));
            peers.push(identity.peer_id());
            let mut config = NodeConfig {
                relays: vec![relay_spec.clone()],
                direct_addresses: vec![format!("10.0.0.{i}:4433")],
                address_policy: AddressPolicy::AllowPrivate,
                ..NodeConfig::default()
            };
            configure(i, &mut config);
            configs.push(config.clone());
            let rng = ChaCha20Rng::seed_from_u64(200 + i as u64);
            nodes.push(Node::new(identity, MemoryStore::new(), config, rng, START).unwrap());
        }
        let relay = Relay::new(MemoryRelayStore::new(), RelayConfig::default()).unwrap();
        let mut net = Self {
            now: START,
            nodes,
            peers,
            relay,
            cut_off: BTreeSet::new(),
            closes_at_once: BTreeSet::new(),
            frames_lost: BTreeSet::new(),
            registered: BTreeSet::new(),
            dials,
            direct_sends_fail: false,
            direct_sends_held: None,
            relay_queue_full: BTreeSet::new(),
            direct: BTreeSet::new(),
            log: Vec::new(),
            next_ticket: 0,
            configs,
            restarts: 0,
        };
        net.pump();
        net
    }

    fn index(&self, peer: &PeerId) -> usize {
        self.peers.iter().position(|p| p == peer).unwrap()
    }

    /// Applies every output until nothing moves.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                while let Some(output) = self.nodes[i].poll_output(self.now) {
                    moved = true;
                    self.log.push((self.now, i, output.clone()));
                    self.apply(i, output);
                }
            }
            while let Some((peer, bytes)) = self.relay.poll_transmit() {
                moved = true;
                let j = self.index(&peer);
                if self.registered.contains(&j) {
                    self.nodes[j].handle(self.now, NodeInput::RelayFrame { relay: 0, bytes });
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn apply(&mut self, i: usize, output: NodeOutput) {
        let now = self.now;
        match output {
            NodeOutput::Dial { peer, .. } => {
                if self.dials == Dials::Connect {
                    let j = self.index(&peer);
                    self.direct.insert((i.min(j), i.max(j)));
                    self.nodes[i].handle(now, NodeInput::DirectUp { peer });
                    let me = self.peers[i];
                    self.nodes[j].handle(now, NodeInput::DirectUp { peer: me });
                }
            }
            NodeOutput::SendDirect { peer, id, bytes } if self.direct_sends_held.is_some() => {
                let j = self.index(&peer);
                if let Some(held) = self.direct_sends_held.as_mut() {
                    held.push((i, j, id, bytes));
                }
            }
            NodeOutput::SendDirect { peer, id, bytes } => {
                let j = self.index(&peer);
                let open = self.direct.contains(&(i.min(j), i.max(j)));
                let outcome = if open && !self.direct_sends_fail {
                    let from = self.peers[i];
                    self.nodes[j].handle(now, NodeInput::DirectReceived { from, bytes });
                    TransmitOutcome::Delivered
                } else {
                    TransmitOutcome::Failed(SendFailure::ConnectionClosed)
                };
                self.nodes[i].handle(now, NodeInput::DirectSent { id, outcome });
            }
            // Only relay 0 exists here: any other a record names is down.
            NodeOutput::ConnectRelay { relay, .. } if relay != 0 => {
                let reason = "no answer".into();
                self.nodes[i].handle(now, NodeInput::RelayDisconnected { relay, reason });
            }
            NodeOutput::ConnectRelay { relay, .. } => {
                if self.cut_off.contains(&i) {
                    let reason = "the relay did not answer".into();
                    self.nodes[i].handle(now, NodeInput::RelayDisconnected { relay, reason });
                } else if self.closes_at_once.contains(&i) {
                    self.nodes[i].handle(now, NodeInput::RelayConnected { relay });
                    let reason = "the relay closed the connection".into();
                    self.nodes[i].handle(now, NodeInput::RelayDisconnected { relay, reason });
                } else {
                    // Every node sits behind a NAT that maps it to a port
                    // of its own on one public address.
                    let public = std::net::SocketAddr::from(([203, 0, 113, 7], 50_000 + i as u16));
                    self.relay.connected_at(self.peers[i], public);
                    self.registered.insert(i);
                    self.nodes[i].handle(now, NodeInput::RelayConnected { relay });
                }
            }
            NodeOutput::CloseRelay { relay } => {
                self.registered.remove(&i);
                self.relay.disconnected(&self.peers[i]);
                let reason = "closed by the node".into();
                self.nodes[i].handle(now, NodeInput::RelayDisconnected { relay, reason });
            }
            NodeOutput::SendToRelay { relay, bytes } if self.relay_queue_full.contains(&i) => {
                self.nodes[i].handle(now, NodeInput::RelayFrameUnsent { relay, bytes });
            }
            NodeOutput::SendToRelay { bytes, .. } => {
                if self.registered.contains(&i) && !self.frames_lost.contains(&i) {
                    self.relay.handle_frame(now, self.peers[i], &bytes).unwrap();
                }
            }
            NodeOutput::Notice(Notice::InputFailed(e)) => panic!("n{i}'s engine failed: {e}"),
            NodeOutput::Event(_) | NodeOutput::Reply { .. } | NodeOutput::Notice(_) => {}
        }
    }

    /// Lets `ms` of virtual time pass, firing every deadline on the way.
    fn advance(&mut self, ms: u64) {
        let until = self.now.saturating_add_millis(ms);
        loop {
            self.pump();
            let next = self.nodes.iter().filter_map(|n| n.poll_timeout()).chain(self.relay.poll_timeout()).min();
            let Some(next) = next.filter(|t| *t <= until) else { break };
            self.now = self.now.max(next);
            for node in &mut self.nodes {
                if node.poll_timeout().is_some_and(|t| t <= self.now) {
                    node.handle_timeout(self.now);
                }
            }
            if self.relay.poll_timeout().is_some_and(|t| t <= self.now) {
                self.relay.handle_timeout(self.now).unwrap();
            }
        }
        self.now = until;
        self.pump();
    }

    /// Takes node `i` off the relay: its connection closes, and attempts to
    /// reconnect fail until `reconnect`.
    fn cut_off(&mut self, i: usize) {
        self.cut_off.insert(i);
        self.registered.remove(&i);
        self.relay.disconnected(&self.peers[i]);
        let reason = "the relay connection closed".into();
        self.nodes[i].handle(self.now, NodeInput::RelayDisconnected { relay: 0, reason });
        self.pump();
    }

    /// Node `i` crashes and starts again from what its store committed.
    fn restart(&mut self, i: usize) {
        self.registered.remove(&i);
        self.relay.disconnected(&self.peers[i]);
        for (a, b) in std::mem::take(&mut self.direct) {
            if a == i || b == i {
                let other = if a == i { b } else { a };
                self.nodes[other].handle(self.now, NodeInput::DirectDown { peer: self.peers[i] });
            } else {
                self.direct.insert((a, b));
            }
        }
        self.restarts += 1;
        let store = self.nodes[i].engine().store().crash_copy();
        let identity = IdentityKeyPair::generate(&mut ChaCha20Rng::seed_from_u64(100 + i as u64));
        let rng = ChaCha20Rng::seed_from_u64(1_000 * self.restarts + i as u64);
        self.nodes[i] = Node::new(identity, store, self.configs[i].clone(), rng, self.now).unwrap();
        self.pump();
    }

    fn reconnect(&mut self, i: usize) {
        self.cut_off.remove(&i);
    }

    fn command(&mut self, i: usize, command: Command) -> CommandOutcome {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        self.nodes[i].handle(self.now, NodeInput::Command { ticket, command });
        self.pump();
        self.log
            .iter()
            .find_map(|(_, node, output)| match output {
                NodeOutput::Reply { ticket: t, reply: Reply::Command(result) } if *node == i && *t == ticket => {
                    Some(result.clone().unwrap())
                }
                _ => None,
            })
            .expect("every command is answered")
    }

    /// Node `i` sends `text` to node `j` in their 1:1 conversation.
    fn send(&mut self, i: usize, j: usize, text: &str) -> MessageId {
        let CommandOutcome::Conversation(c) = self.command(i, Command::CreateConversation { peer: self.peers[j] })
        else {
            panic!("a conversation")
        };
        let command = Command::SendMessage { conversation: c.id, content: text.into() };
        let CommandOutcome::Message(m) = self.command(i, command) else { panic!("a message") };
        m.id
    }

    fn received(&self, j: usize) -> Vec<String> {
        self.log
            .iter()
            .filter_map(|(_, node, output)| match output {
                NodeOutput::Event(Event::MessageReceived(m)) if *node == j => Some(m.content.clone()),
                _ => None,
            })
            .collect()
    }

    fn status(&mut self, i: usize, id: MessageId) -> MessageStatus {
        self.message(i, id).status
    }

    /// The relay frames node `i` sent, decoded.
    fn frames_from(&self, i: usize) -> Vec<RelayFrame> {
        self.log
            .iter()
            .filter_map(|(_, node, output)| match output {
                NodeOutput::SendToRelay { bytes, .. } if *node == i => Some(RelayFrame::decode(bytes).unwrap()),
                _ => None,
            })
            .collect()
    }

    fn connect_relay_times(&self, i: usize) -> Vec<u64> {
        self.log
            .iter()
            .filter(|(_, n, o)| *n == i && matches!(o, NodeOutput::ConnectRelay { .. }))
            .map(|(at, _, _)| at.millis_since(START))
            .collect()
    }

    fn lookups_of(&self, i: usize, peer: PeerId) -> usize {
        self.frames_from(i).iter().filter(|f| matches!(f, RelayFrame::Lookup { peer: p } if *p == peer)).count()
    }

    fn message(&mut self, i: usize, id: MessageId) -> p2pchat_protocol::engine::Message {
        match self.nodes[i].engine_mut().query(Query::Message(id)).unwrap() {
            Answer::Message(m) => m,
            other => panic!("unexpected answer {other:?}"),
        }
    }

    /// Alice's first message to bob, delivered: their session is up (the
    /// key exchange is interactive, so it happens while both are online).
    fn first_message_delivered(&mut self) {
        let first = self.send(0, 1, "first");
        self.advance(3 * DIRECT_DIAL_BUDGET_MS);
        assert_eq!(self.status(0, first), MessageStatus::Delivered);
    }

    fn give_address(&mut self, i: usize, j: usize) {
        let addr = format!("10.0.0.{j}:4433").parse().unwrap();
        self.nodes[i].handle(self.now, NodeInput::PeerAddress { peer: self.peers[j], addr });
    }
}

#[test]
fn an_open_direct_connection_carries_everything() {
    let mut net = Net::new(2, Dials::Connect);
    net.give_address(0, 1);
    let id = net.send(0, 1, "hi bob");
    net.advance(1_000);
    assert_eq!(net.received(1), ["hi bob"]);
    assert_eq!(net.status(0, id), MessageStatus::Delivered);
    let forwards = net.frames_from(0).into_iter().filter(|f| matches!(f, RelayFrame::Forward { .. })).count();
    assert_eq!(forwards, 0, "nothing went through the relay");
    let dials = net.log.iter().filter(|(_, n, o)| *n == 0 && matches!(o, NodeOutput::Dial { .. })).count();
    assert_eq!(dials, 1, "one dial served every transmit");
    assert_eq!(net.nodes[0].peers(net.now)[0].state, PathState::Direct);
}

#[test]
fn a_dial_that_does_not_connect_within_its_budget_sends_through_the_relay() {
    let mut net = Net::new(2, Dials::Blackhole);
    net.give_address(0, 1);
    let id = net.send(0, 1, "are you there?");
    net.advance(DIRECT_DIAL_BUDGET_MS - 1);
    assert!(net.received(1).is_empty(), "the transmit waits for its dial within the budget");
    net.advance(1);
    assert_eq!(net.received(1), ["are you there?"], "past the budget, the relay carried it");
    // Bob's receipt waits for his own dial of alice's published address,
    // then takes the relay too.
    net.advance(DIRECT_DIAL_BUDGET_MS);
    assert_eq!(net.status(0, id), MessageStatus::Delivered);
    assert!(
        matches!(net.nodes[0].peers(net.now)[0].state, PathState::DirectFailedUntil(_)),
        "the address is left alone for a while"
    );
    // The next message does not wait for another dial.
    let before = net.log.len();
    net.send(0, 1, "still there?");
    assert_eq!(net.received(1).len(), 2);
    assert!(!net.log[before..].iter().any(|(_, _, o)| matches!(o, NodeOutput::Dial { .. })));
}

#[test]
fn a_failed_direct_send_goes_through_the_relay_at_once() {
    let mut net = Net::new(2, Dials::Connect);
    net.direct_sends_fail = true;
    net.give_address(0, 1);
    net.send(0, 1, "hello");
    // No time passes: the fallback does not wait for a retry.
    assert_eq!(net.received(1), ["hello"]);
    let fell_back =
        net.log.iter().any(|(_, n, o)| *n == 0 && matches!(o, NodeOutput::Notice(Notice::DirectFellBack { .. })));
    assert!(fell_back);
}

#[test]
fn a_peer_that_is_away_gets_its_mailbox_and_acknowledges_it_in_one_frame() {
    let mut net = Net::new(2, Dials::Blackhole);
    net.first_message_delivered();
    net.cut_off(1);
    let later: Vec<MessageId> = (0..5).map(|k| net.send(0, 1, &format!("later {k}"))).collect();
    net.advance(10_000);
    assert_eq!(net.received(1).len(), 1, "bob is away");
    for id in &later {
        assert_eq!(net.status(0, *id), MessageStatus::Sent, "held in bob's mailbox");
    }
    let acks_before = net.frames_from(1).iter().filter(|f| matches!(f, RelayFrame::MailboxAck { .. })).count();
    net.reconnect(1);
    net.advance(RELAY_BACKOFF_MAX_MS);
    assert_eq!(net.received(1).len(), 6, "bob got his mailbox: {:?}", net.received(1));
    let acks: Vec<Vec<u64>> = net
        .frames_from(1)
        .into_iter()
        .filter_map(|f| match f {
            RelayFrame::MailboxAck { ids } => Some(ids),
            _ => None,
        })
        .skip(acks_before)
        .collect();
    assert_eq!(acks.len(), 1, "one acknowledgement for the whole batch: {acks:?}");
    assert_eq!(acks[0].len(), 5);
    net.advance(1_000);
    for id in later {
        assert_eq!(net.status(0, id), MessageStatus::Delivered, "bob's receipts came back");
    }
}

#[test]
fn a_relay_that_cannot_be_reached_is_retried_with_doubling_backoff() {
    let mut net = Net::new(1, Dials::Blackhole);
    net.cut_off(0);
    net.advance(200_000);
    let attempts = net.connect_relay_times(0);
    let gaps: Vec<u64> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    // The first attempt connected; the cut-off came at once, then
    // 1 s, 2 s, 4 s ... up to 30 s between attempts.
    assert_eq!(&gaps[..7], &[1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000], "attempts at {attempts:?}");
    assert!(!net.nodes[0].relays()[0].connected);
    assert_eq!(net.nodes[0].relays()[0].last_error.as_deref(), Some("the relay did not answer"));
}

#[test]
fn a_relay_that_closes_every_connection_at_once_is_not_redialled_every_second() {
    let mut net = Net::new(1, Dials::Blackhole);
    net.closes_at_once.insert(0);
    net.cut_off(0);
    net.advance(120_000);
    let attempts = net.connect_relay_times(0);
    let gaps: Vec<u64> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(&gaps[..6], &[1_000, 2_000, 4_000, 8_000, 16_000, 30_000], "attempts at {attempts:?}");
}

#[test]
fn a_forward_the_relay_never_answers_goes_again_once_a_relay_answers() {
    let mut net = Net::new(2, Dials::Blackhole);
    net.first_message_delivered();
    // Frames from alice to the relay are lost from now on, on a connection
    // that stays up: nothing will ever answer her forward.
    net.frames_lost.insert(0);
    let before = net.log.len();
    let id = net.send(0, 1, "lost on the way");
    net.advance(RELAY_ANSWER_TIMEOUT_MS - 1);
    let closed =
        |net: &Net| net.log[before..].iter().any(|(_, n, o)| *n == 0 && matches!(o, NodeOutput::CloseRelay { .. }));
    assert!(!closed(&net), "still waiting for the relay's answer");
    net.advance(1);
    assert!(closed(&net), "a relay that leaves a forward unanswered is given up on");
    // With no relay of her own left, the transmit waits for one (it does
    // not go back to the engine, which would seal it again).
    assert_eq!(net.status(0, id), MessageStatus::Created);
    net.frames_lost.clear();
    net.advance(RELAY_BACKOFF_MAX_MS);
    assert_eq!(net.received(1), ["first", "lost on the way"]);
    assert_eq!(net.status(0, id), MessageStatus::Delivered);
}

#[test]
fn messages_written_during_two_days_offline_arrive_when_the_node_is_back() {
    const DAY_MS: u64 = 24 * 60 * 60 * 1000;
    let mut net = Net::new(2, Dials::Blackhole);
    net.first_message_delivered();
    net.cut_off(0);
    let ids: Vec<MessageId> = (0..5).map(|k| net.send(0, 1, &format!("offline {k}"))).collect();
    net.advance(2 * DAY_MS);
    // Every engine retry in two days would have sealed each message again
    // under a new key, thousands of keys past what bob may skip.
    assert_eq!(net.received(1), ["first"]);
    net.reconnect(0);
    net.advance(RELAY_BACKOFF_MAX_MS + 3 * DIRECT_DIAL_BUDGET_MS);
    let expected: Vec<String> =
        std::iter::once("first".to_owned()).chain((0..5).map(|k| format!("offline {k}"))).collect();
    assert_eq!(net.received(1), expected);
    for id in ids {
        assert_eq!(net.status(0, id), MessageStatus::Delivered);
    }
}

#[test]
fn a_peer_whose_recorded_address_fails_is_looked_up_again_at_most_once_a_minute() {
    let mut net = Net::new(2, Dials::Blackhole);
    let bob = net.peers[1];
    // Alice learns bob's address from his record (her engine looks him up
    // to exchange keys), dials it in vain, and goes through the relay.
    net.first_message_delivered();
    assert_eq!(net.lookups_of(0, bob), 1, "the key exchange's lookup");
    for k in 0..5 {
        net.send(0, 1, &format!("more {k}"));
        net.advance(1_000);
    }
    assert_eq!(net.lookups_of(0, bob), 1, "not again within the minute");
    // A minute on, the address is dialled again, fails again, and this time
    // the record is asked for again: bob may have moved.
    net.advance(LOOKUP_INTERVAL_MS);
    net.send(0, 1, "a minute later");
    net.advance(DIRECT_DIAL_BUDGET_MS);
    assert_eq!(net.lookups_of(0, bob), 2);
}

#[test]
fn a_node_connected_for_days_keeps_its_record_fresh_for_those_who_look_it_up() {
    const DAY_MS: u64 = 24 * 60 * 60 * 1000;
    let mut net = Net::new(2, Dials::Blackhole);
    net.advance(2 * DAY_MS);
    let publishes = net.frames_from(0).iter().filter(|f| matches!(f, RelayFrame::Publish(_))).count();
    assert_eq!(publishes, 5, "at connection, then every half of its 24 h lifetime");
    // Two days on, bob still finds alice's record and reaches her.
    let id = net.send(1, 0, "still there?");
    net.advance(3 * DIRECT_DIAL_BUDGET_MS);
    assert_eq!(net.received(0), ["still there?"]);
    assert_eq!(net.status(1, id), MessageStatus::Delivered);
}

#[test]
fn a_record_naming_relays_that_are_down_costs_one_try_each_then_the_nodes_own_relay() {
    let mut net = Net::new(2, Dials::Blackhole);
    // Bob's record, as a card would carry it, names two relays that never
    // answer (and none of alice's).
    let bob = IdentityKeyPair::generate(&mut ChaCha20Rng::seed_from_u64(101));
    let relays = vec![format!("{}@10.9.9.2:4433", PeerId([0x22; 20])), format!("{}@10.9.9.3:4433", PeerId([0x33; 20]))];
    let record = p2pchat_protocol::relay::PeerRecord::sign(
        &bob,
        vec![],
        relays,
        net.now,
        net.now.saturating_add_millis(60_000),
        1,
    );
    net.nodes[0].handle(net.now, NodeInput::PeerRecord { record });
    let id = net.send(0, 1, "through whatever works");
    // (Bob's own record, which alice's relay also returns, lists a direct
    // address: the message waits out a dial before the relay takes it.)
    net.advance(3 * DIRECT_DIAL_BUDGET_MS);
    let visits = |net: &Net| {
        net.log
            .iter()
            .filter(|(_, n, o)| *n == 0 && matches!(o, NodeOutput::ConnectRelay { relay, .. } if *relay != 0))
            .count()
    };
    assert_eq!(visits(&net), 2, "each of bob's relays tried once");
    assert_eq!(net.received(1), ["through whatever works"], "then alice's own relay, where bob is too");
    assert_eq!(net.status(0, id), MessageStatus::Delivered);
}

#[test]
fn a_node_publishes_the_address_its_relay_sees_once_and_only_if_it_takes_direct_connections() {
    // Alice takes direct connections; bob does not (he publishes nothing).
    let mut net = Net::new_with(2, Dials::Connect, |i, config| {
        config.publish_observed = i == 0;
        if i == 1 {
            config.direct_addresses.clear();
        }
    });
    let (alice, bob) = (net.peers[0], net.peers[1]);
    let publishes = |net: &Net, i| net.frames_from(i).iter().filter(|f| matches!(f, RelayFrame::Publish(_))).count();
    let stored = |net: &mut Net, peer| {
        let store = net.relay.store_mut();
        store.begin().unwrap();
        let record = store.record(&peer);
        store.rollback();
        record.unwrap().expect("the relay holds the record").direct_addresses
    };
    let nat = "203.0.113.7:50000".to_owned();
    // Alice's configured address comes first; the relay's observation is
    // published in a second record, at once.
    assert_eq!(net.nodes[0].published_addresses(), ["10.0.0.0:4433".to_owned(), nat.clone()]);
    assert_eq!(stored(&mut net, alice), ["10.0.0.0:4433".to_owned(), nat.clone()]);
    assert_eq!(publishes(&net, 0), 2);
    assert_eq!(stored(&mut net, bob), Vec::<String>::new());
    assert_eq!(publishes(&net, 1), 1);
    // Reconnecting to a relay that sees the same address signs nothing new
    // beyond the record every connection publishes.
    net.cut_off(0);
    net.reconnect(0);
    net.advance(RELAY_BACKOFF_MAX_MS);
    assert_eq!(publishes(&net, 0), 3);
    assert_eq!(net.nodes[0].own_record(net.now).direct_addresses, ["10.0.0.0:4433".to_owned(), nat]);
}

#[test]
fn a_relay_cannot_make_a_node_publish_what_no_one_can_dial_or_sign_records_without_end() {
    let mut net = Net::new_with(1, Dials::Connect, |_, config| config.publish_observed = true);
    let before = net.frames_from(0).len();
    let now = net.now;
    for address in ["0.0.0.0:4433", "198.51.100.1:0", "not an address", "198.51.100.2:4433"] {
        let bytes = RelayFrame::Observed { address: address.into() }.encode();
        net.nodes[0].handle(now, NodeInput::RelayFrame { relay: 0, bytes });
        net.pump();
    }
    // The relay already said what it sees on this connection: nothing else
    // it says then is heard, so no frame went out.
    assert_eq!(net.frames_from(0).len(), before);
    assert_eq!(net.nodes[0].published_addresses(), ["10.0.0.0:4433".to_owned(), "203.0.113.7:50000".to_owned()]);
    // On a new connection, an address no one could dial is refused with a
    // notice and not published.
    net.cut_off(0);
    net.reconnect(0);
    net.frames_lost.insert(0); // the relay's own Observed never comes
    net.advance(RELAY_BACKOFF_MAX_MS);
    let bytes = RelayFrame::Observed { address: "0.0.0.0:4433".into() }.encode();
    net.nodes[0].handle(net.now, NodeInput::RelayFrame { relay: 0, bytes });
    net.pump();
    let refused =
        net.log.iter().any(|(_, _, o)| matches!(o, NodeOutput::Notice(Notice::ObservedAddressRefused { .. })));
    assert!(refused);
    assert_eq!(net.nodes[0].published_addresses(), ["10.0.0.0:4433".to_owned(), "203.0.113.7:50000".to_owned()]);
}

#[test]
fn a_forward_the_driver_cannot_queue_is_held_in_the_node_and_goes_once_the_queue_drains() {
    let mut net = Net::new(2, Dials::Blackhole);
    net.first_message_delivered();
    // Alice's queue to the relay is full: her forward comes back unsent.
    net.relay_queue_full.insert(0);
    let id = net.send(0, 1, "second");
    net.advance(1_000);
    assert_eq!(net.received(1), ["first"]);
    // Held in the node, the same bytes: not failed back to the engine, which
    // would seal the message again for its retry.
    let message = net.message(0, id);
    assert_eq!(message.status, MessageStatus::Created, "{message:?}");
    // The relay connection stays up: a congested queue is not a dead relay.
    let closed = net.log.iter().any(|(_, n, o)| *n == 0 && matches!(o, NodeOutput::CloseRelay { .. }));
    assert!(!closed);
    // Once the queue drains, the node's next try takes it, once.
    net.relay_queue_full.clear();
    net.advance(HELD_FOR_A_PATH_RETRY_MS + 3 * DIRECT_DIAL_BUDGET_MS);
    assert_eq!(net.received(1), ["first", "second"]);
    assert_eq!(net.status(0, id), MessageStatus::Delivered);
}

#[test]
fn an_acknowledgement_the_driver_cannot_queue_closes_the_relay_connection_to_start_afresh() {
    let mut net = Net::new(1, Dials::Blackhole);
    let bytes = RelayFrame::MailboxAck { ids: vec![1] }.encode();
    let now = net.now;
    net.nodes[0].handle(now, NodeInput::RelayFrameUnsent { relay: 0, bytes });
    net.pump();
    // Dropped, it would leave the relay waiting for it, and the mailbox
    // stalled; a new connection sends the mailbox again from its start.
    let closed = net.log.iter().any(|(_, _, o)| matches!(o, NodeOutput::CloseRelay { relay: 0 }));
    assert!(closed);
    net.advance(RELAY_BACKOFF_MAX_MS);
    assert!(net.nodes[0].relays()[0].connected);
}

#[test]
fn a_relay_that_never_answers_the_registration_is_given_up_on_and_one_that_lost_it_is_asked_again() {
    let mut net = Net::new(1, Dials::Blackhole);
    // A relay connection on which nothing the node sends arrives: the
    // registration goes unanswered, and the node does not stay on it.
    net.cut_off(0);
    net.frames_lost.insert(0);
    net.reconnect(0);
    let before = net.log.len();
    net.advance(RELAY_BACKOFF_MAX_MS + RELAY_REGISTRATION_TIMEOUT_MS);
    let closed = net.log[before..].iter().any(|(_, _, o)| matches!(o, NodeOutput::CloseRelay { relay: 0 }));
    assert!(closed, "an unanswered registration closes the connection");
    // A relay that says the node is not registered (it lost the
    // registration) is asked to register again.
    net.frames_lost.clear();
    net.advance(RELAY_BACKOFF_MAX_MS);
    let before = net.frames_from(0).len();
    let bytes = RelayFrame::PublishRefused {
        sequence: u64::MAX, // not the newest: ignored
        reason: p2pchat_protocol::relay::PublishRefusal::NotRegistered,
    }
    .encode();
    let now = net.now;
    net.nodes[0].handle(now, NodeInput::RelayFrame { relay: 0, bytes });
    net.pump();
    assert_eq!(net.frames_from(0).len(), before, "an answer about an older record changes nothing");
    let newest = net
        .frames_from(0)
        .iter()
        .rev()
        .find_map(|f| match f {
            RelayFrame::Publish(record) => Some(record.sequence),
            _ => None,
        })
        .unwrap();
    let bytes =
        RelayFrame::PublishRefused { sequence: newest, reason: p2pchat_protocol::relay::PublishRefusal::NotRegistered }
            .encode();
    net.nodes[0].handle(now, NodeInput::RelayFrame { relay: 0, bytes });
    net.pump();
    let sent: Vec<RelayFrame> = net.frames_from(0)[before..].to_vec();
    let [RelayFrame::Register, RelayFrame::Publish(record)] = sent.as_slice() else { panic!("{sent:?}") };
    // Lost again on the same connection: the relay is not serving this
    // node, and the connection is made afresh rather than asked again.
    let bytes = RelayFrame::PublishRefused {
        sequence: record.sequence,
        reason: p2pchat_protocol::relay::PublishRefusal::NotRegistered,
    }
    .encode();
    let before = net.log.len();
    net.nodes[0].handle(now, NodeInput::RelayFrame { relay: 0, bytes });
    net.pump();
    let closed = net.log[before..].iter().any(|(_, _, o)| matches!(o, NodeOutput::CloseRelay { relay: 0 }));
    assert!(closed);
}

#[test]
fn an_address_that_keeps_failing_is_dialled_ever_more_rarely() {
    let mut net = Net::new(2, Dials::Blackhole);
    net.give_address(0, 1);
    let mut waits = Vec::new();
    for k in 0..4 {
        net.send(0, 1, &format!("m{k}"));
        net.advance(DIRECT_DIAL_BUDGET_MS);
        // The driver gives up on the same dial later: no second failure.
        let (now, peer) = (net.now, net.peers[1]);
        net.nodes[0].handle(now, NodeInput::DialFailed { peer, reason: "no answer within 10 s".into() });
        net.pump();
        let failed_at = net.now;
        let PathState::DirectFailedUntil(until) = net.nodes[0].peers(net.now)[0].state else {
            panic!("the dial failed: {:?}", net.nodes[0].peers(net.now))
        };
        waits.push(until.millis_since(failed_at));
        net.advance(until.millis_since(failed_at));
    }
    assert_eq!(waits, [60_000, 120_000, 240_000, 480_000]);
    // Every message still went, through the relay.
    assert_eq!(net.received(1), ["m0", "m1", "m2", "m3"]);
}

/// Bob's record as a card would carry it: his direct address and two relays
/// of his that alice does not use (and that never answer here), valid for a
/// minute.
fn bobs_card(net: &Net) -> p2pchat_protocol::relay::PeerRecord {
    let bob = IdentityKeyPair::generate(&mut ChaCha20Rng::seed_from_u64(101));
    let relays = vec![format!("{}@10.9.9.2:4433", PeerId([0x22; 20])), format!("{}@10.9.9.3:4433", PeerId([0x33; 20]))];
    let expires = net.now.saturating_add_millis(60_000);
    p2pchat_protocol::relay::PeerRecord::sign(&bob, vec!["10.0.0.1:4433".into()], relays, net.now, expires, 1)
}

#[test]
fn a_restarted_node_still_knows_the_record_it_last_saw_even_once_expired() {
    let mut net = Net::new(2, Dials::Blackhole);
    let record = bobs_card(&net);
    net.nodes[0].handle(net.now, NodeInput::PeerRecord { record });
    net.pump();
    // Two days on, the record long expired, alice restarts.
    net.advance(2 * 24 * 60 * 60_000);
    net.restart(0);
    let restarted_at = net.now;
    let bob = net.peers[1];
    let path = net.nodes[0].peers(net.now).into_iter().find(|p| p.peer == bob).expect("bob is still known");
    assert_eq!(path.address, Some("10.0.0.1:4433".parse().unwrap()));
    assert_eq!(path.source, Some(AddressSource::Record { relay: None }));
    let id = net.send(0, 1, "after the restart");
    net.advance(3 * DIRECT_DIAL_BUDGET_MS);
    // Each of bob's relays from the kept record is tried (a record from
    // alice's own relay would list only that relay), then alice's own.
    let visits = net
        .log
        .iter()
        .filter(|(at, n, o)| {
            *at >= restarted_at && *n == 0 && matches!(o, NodeOutput::ConnectRelay { relay, .. } if *relay != 0)
        })
        .count();
    assert_eq!(visits, 2, "the relays of the kept record are tried");
    assert_eq!(net.received(1), ["after the restart"]);
    assert_eq!(net.status(0, id), MessageStatus::Delivered);
}

#[test]
fn a_kept_record_that_does_not_verify_is_refused_on_start() {
    let net = Net::new(1, Dials::Blackhole);
    let mut record = bobs_card(&net);
    record.direct_addresses = vec!["10.6.6.6:4433".into()]; // no longer what bob signed
    let bob = record.peer_id;
    let mut store = MemoryStore::new();
    store.begin().unwrap();
    store.put_kept_record(&KeptRecord { peer: bob, seen_at: net.now, record: record.encode() }).unwrap();
    store.commit().unwrap();
    let identity = IdentityKeyPair::generate(&mut ChaCha20Rng::seed_from_u64(100));
    let mut node = Node::new(identity, store, net.configs[0].clone(), ChaCha20Rng::seed_from_u64(9), net.now).unwrap();
    let mut refused = false;
    while let Some(output) = node.poll_output(net.now) {
        refused |= matches!(output, NodeOutput::Notice(Notice::RecordRefused { peer, .. }) if peer == bob);
    }
    assert!(refused, "the tampered record is reported");
    assert!(node.peers(net.now).iter().all(|p| p.peer != bob), "and not used");
}

#[test]
fn a_peer_that_reads_slowly_has_at_most_a_window_of_direct_sends_under_way_and_loses_nothing() {
    let mut net = Net::new(2, Dials::Connect);
    net.give_address(0, 1);
    net.first_message_delivered();
    net.direct_sends_held = Some(Vec::new());
    let count = MAX_DIRECT_SENDS_PER_PEER + 8;
    let ids: Vec<MessageId> = (0..count).map(|n| net.send(0, 1, &format!("m{n}"))).collect();
    let held = |net: &Net| net.direct_sends_held.as_ref().map_or(0, |h| h.iter().filter(|s| s.0 == 0).count());
    assert_eq!(held(&net), MAX_DIRECT_SENDS_PER_PEER, "the rest wait in the node, not in the driver");
    // Bob's transport takes one: one more leaves, the oldest waiting first.
    let (i, j, id, bytes) = net.direct_sends_held.as_mut().unwrap().remove(0);
    assert_eq!((i, j), (0, 1));
    net.nodes[j].handle(net.now, NodeInput::DirectReceived { from: net.peers[i], bytes });
    net.nodes[i].handle(net.now, NodeInput::DirectSent { id, outcome: TransmitOutcome::Delivered });
    net.pump();
    assert_eq!(held(&net), MAX_DIRECT_SENDS_PER_PEER);
    // The connection closes and bob cannot be dialled again: what waited
    // takes another path (a dial, then the relay); what was under way
    // fails back to the relay as the driver reports it.
    let under_way = net.direct_sends_held.replace(Vec::new()).unwrap();
    net.direct.clear();
    net.dials = Dials::Blackhole;
    net.nodes[0].handle(net.now, NodeInput::DirectDown { peer: net.peers[1] });
    net.nodes[1].handle(net.now, NodeInput::DirectDown { peer: net.peers[0] });
    net.advance(DIRECT_DIAL_BUDGET_MS + 1);
    assert_eq!(held(&net), 0, "nothing more on the closed connection");
    let forwards = |net: &Net| net.frames_from(0).iter().filter(|f| matches!(f, RelayFrame::Forward { .. })).count();
    assert_eq!(forwards(&net), count - 1 - MAX_DIRECT_SENDS_PER_PEER, "the waiting ones");
    for (i, _, id, _) in under_way {
        let outcome = TransmitOutcome::Failed(SendFailure::ConnectionClosed);
        net.nodes[i].handle(net.now, NodeInput::DirectSent { id, outcome });
    }
    net.direct_sends_held = None;
    // (Over 200 forwards at once pass the relay's per-sender burst: the
    // rest are refused for now and go again after the engine's 30 s.)
    net.advance(120_000);
    let mut expected: Vec<String> =
        std::iter::once("first".into()).chain((0..count).map(|n| format!("m{n}"))).collect();
    let mut received = net.received(1);
    received.sort();
    expected.sort();
    assert_eq!(received, expected, "each exactly once");
    let statuses: Vec<MessageStatus> = ids.iter().map(|id| net.status(0, *id)).collect();
    assert!(statuses.iter().all(|s| *s == MessageStatus::Delivered), "{statuses:?}");
}

#[test]
fn an_older_record_replaces_the_newest_seen_only_once_that_one_has_expired() {
    let mut net = Net::new(1, Dials::Blackhole);
    let bob = IdentityKeyPair::generate(&mut ChaCha20Rng::seed_from_u64(77));
    let signed = |net: &Net, address: &str, sequence: u64| {
        let expires = net.now.saturating_add_millis(60_000);
        p2pchat_protocol::relay::PeerRecord::sign(&bob, vec![address.into()], vec![], net.now, expires, sequence)
    };
    let address_of_bob =
        |net: &Net| net.nodes[0].peers(net.now).iter().find(|p| p.peer == bob.peer_id()).unwrap().address;
    // Signed while bob's clock was an hour ahead.
    let ahead = signed(&net, "10.0.0.7:4433", 3_600_000);
    net.nodes[0].handle(net.now, NodeInput::PeerRecord { record: ahead });
    // His clock corrected, he signs a lower sequence: stale while the first
    // lasts, neither used nor kept …
    let corrected = signed(&net, "10.0.0.8:4433", 1_000);
    net.nodes[0].handle(net.now, NodeInput::PeerRecord { record: corrected });
    assert_eq!(address_of_bob(&net), Some("10.0.0.7:4433".parse().unwrap()));
    net.pump();
    net.restart(0);
    assert_eq!(address_of_bob(&net), Some("10.0.0.7:4433".parse().unwrap()), "the stale one was not kept");
    // … and taken once it expired, and kept for after a restart.
    net.advance(61_000);
    let corrected = signed(&net, "10.0.0.8:4433", 1_001);
    net.nodes[0].handle(net.now, NodeInput::PeerRecord { record: corrected });
    assert_eq!(address_of_bob(&net), Some("10.0.0.8:4433".parse().unwrap()));
    net.pump();
    net.restart(0);
    assert_eq!(address_of_bob(&net), Some("10.0.0.8:4433".parse().unwrap()));
}

#[test]
fn what_a_slow_peer_cannot_take_goes_through_the_relay_and_everything_arrives_exactly_once() {
    let mut net = Net::new(2, Dials::Connect);
    net.give_address(0, 1);
    net.first_message_delivered();
    net.direct_sends_held = Some(Vec::new());
    let big = "x".repeat(60 * 1024);
    let ids: Vec<MessageId> = (0..150).map(|n| net.send(0, 1, &format!("{n} {big}"))).collect();
    let under_way: usize = net.direct_sends_held.as_ref().unwrap().iter().filter(|s| s.0 == 0).map(|s| s.3.len()).sum();
    assert!(under_way <= MAX_DIRECT_BYTES_PER_PEER, "{under_way} bytes under way");
    let forwards = net.frames_from(0).iter().filter(|f| matches!(f, RelayFrame::Forward { .. })).count();
    assert!(forwards > 0, "more than the window and its waiting room hold goes through the relay");
    // The peer catches up: everything arrives, once.
    for (i, j, id, bytes) in net.direct_sends_held.take().unwrap() {
        net.nodes[j].handle(net.now, NodeInput::DirectReceived { from: net.peers[i], bytes });
        net.nodes[i].handle(net.now, NodeInput::DirectSent { id, outcome: TransmitOutcome::Delivered });
    }
    net.advance(120_000);
    assert_eq!(net.received(1).len(), 1 + ids.len(), "each exactly once");
    for id in ids {
        assert_eq!(net.status(0, id), MessageStatus::Delivered);
    }
}
