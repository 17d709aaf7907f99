//! The engine's scenario suite, generic over the store, so that every
//! `Store` implementation runs the very same scenarios (enable the
//! `testkit` feature and call [`scenario_tests!`](crate::scenario_tests)).
//!
//! The harness drives several engines over a simulated network with
//! virtual time, by the engine's driving rule: after every input, drain every
//! output. Transmits to an online node arrive at once; to an offline one
//! they fail (there is no relay here).

// Test support: a failed expectation must stop the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::{BTreeSet, VecDeque};

use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::engine::{
    Answer, Command, CommandOutcome, Conversation, ConversationKind, Engine, EngineConfig, EngineError, Event, Input,
    KeptRecord, MemoryStore, Message, MessageStatus, Query, Step, Store, Transmit, TransmitOutcome,
    KEPT_RECORD_LIFETIME_MS, MAX_KEPT_RECORDS, MAX_KEPT_RECORD_BYTES,
};
use crate::wire::{Envelope, EnvelopeBody};
use crate::{ConversationId, IdentityKeyPair, MessageId, PeerId, Timestamp};

/// What the scenarios need of a store beyond [`Store`].
pub trait TestStore: Store + Sized {
    /// The committed state only, as a crash would leave it.
    fn crash_copy(&self) -> Self;
    /// Makes the next `count` commits fail.
    fn fail_next_commits(&mut self, count: u32);
}

impl TestStore for MemoryStore {
    fn crash_copy(&self) -> Self {
        MemoryStore::crash_copy(self)
    }

    fn fail_next_commits(&mut self, count: u32) {
        MemoryStore::fail_next_commits(self, count)
    }
}

/// The scenarios' start time.
pub const NOW: Timestamp = Timestamp::from_millis(1_735_401_234_000);

fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// Defines one `#[test]` per scenario, for a store made by `$make`.
#[macro_export]
macro_rules! scenario_tests {
    ($make:expr) => {
        #[test]
        fn a_strangers_invitation_waits_for_consent_and_a_declined_group_leaves_nothing() {
            $crate::testkit::a_strangers_invitation_waits_for_consent_and_a_declined_group_leaves_nothing($make);
        }
        #[test]
        fn an_accepted_invitation_joins_and_receives_what_was_sent_while_it_waited() {
            $crate::testkit::an_accepted_invitation_joins_and_receives_what_was_sent_while_it_waited($make);
        }
        #[test]
        fn waiting_invitations_stay_within_their_caps_and_expire() {
            $crate::testkit::waiting_invitations_stay_within_their_caps_and_expire($make);
        }
        #[test]
        fn kept_peer_records_stay_within_their_cap_survive_a_restart_and_expire() {
            $crate::testkit::kept_peer_records_stay_within_their_cap_survive_a_restart_and_expire($make);
        }
        #[test]
        fn a_quiet_strangers_session_is_swept_and_its_next_message_still_arrives() {
            $crate::testkit::a_quiet_strangers_session_is_swept_and_its_next_message_still_arrives($make);
        }
        #[test]
        fn a_member_who_leaves_while_an_invitation_waits_is_not_in_the_group_accepted() {
            $crate::testkit::a_member_who_leaves_while_an_invitation_waits_is_not_in_the_group_accepted($make);
        }
        #[test]
        fn the_admins_word_of_a_leave_counts_only_for_a_current_join() {
            $crate::testkit::the_admins_word_of_a_leave_counts_only_for_a_current_join($make);
        }
        #[test]
        fn a_first_message_starts_the_key_exchange_and_is_delivered_then_read() {
            $crate::testkit::a_first_message_starts_the_key_exchange_and_is_delivered_then_read($make);
        }
        #[test]
        fn an_offline_peer_makes_the_key_exchange_time_out_retry_and_fail() {
            $crate::testkit::an_offline_peer_makes_the_key_exchange_time_out_retry_and_fail($make);
        }
        #[test]
        fn a_peer_unknown_to_the_directory_fails_after_the_retries() {
            $crate::testkit::a_peer_unknown_to_the_directory_fails_after_the_retries($make);
        }
        #[test]
        fn messages_to_an_offline_peer_are_sent_then_delivered_in_order_exactly_once() {
            $crate::testkit::messages_to_an_offline_peer_are_sent_then_delivered_in_order_exactly_once($make);
        }
        #[test]
        fn a_peer_offline_for_days_gets_what_was_sent_meanwhile_under_few_message_keys() {
            $crate::testkit::a_peer_offline_for_days_gets_what_was_sent_meanwhile_under_few_message_keys($make);
        }
        #[test]
        fn a_lost_delivery_confirmation_is_repaired_by_retransmission() {
            $crate::testkit::a_lost_delivery_confirmation_is_repaired_by_retransmission($make);
        }
        #[test]
        fn a_failed_commit_releases_nothing_and_loses_nothing() {
            $crate::testkit::a_failed_commit_releases_nothing_and_loses_nothing($make);
        }
        #[test]
        fn an_engine_rebuilt_from_its_store_carries_on() {
            $crate::testkit::an_engine_rebuilt_from_its_store_carries_on($make);
        }
        #[test]
        fn undelivered_messages_expire_to_failed_and_old_ones_are_deleted() {
            $crate::testkit::undelivered_messages_expire_to_failed_and_old_ones_are_deleted($make);
        }
        #[test]
        fn bad_commands_get_clear_errors() {
            $crate::testkit::bad_commands_get_clear_errors($make);
        }
        #[test]
        fn garbage_and_forgeries_are_rejected_without_damage() {
            $crate::testkit::garbage_and_forgeries_are_rejected_without_damage($make);
        }
        #[test]
        fn a_group_of_three_delivers_to_everyone_and_tracks_the_least_advanced_status() {
            $crate::testkit::a_group_of_three_delivers_to_everyone_and_tracks_the_least_advanced_status($make);
        }
        #[test]
        fn a_group_of_ten_with_a_member_offline_during_creation() {
            $crate::testkit::a_group_of_ten_with_a_member_offline_during_creation($make);
        }
        #[test]
        fn an_invitee_cannot_read_older_messages_and_a_leaver_cannot_read_newer_ones() {
            $crate::testkit::an_invitee_cannot_read_older_messages_and_a_leaver_cannot_read_newer_ones($make);
        }
        #[test]
        fn a_later_member_cannot_read_older_messages_caught_by_a_rotation() {
            $crate::testkit::a_later_member_cannot_read_older_messages_caught_by_a_rotation($make);
        }
        #[test]
        fn a_later_member_cannot_read_older_messages_answered_to_a_key_request() {
            $crate::testkit::a_later_member_cannot_read_older_messages_answered_to_a_key_request($make);
        }
        #[test]
        fn a_clock_that_was_once_far_ahead_does_not_block_new_sessions() {
            $crate::testkit::a_clock_that_was_once_far_ahead_does_not_block_new_sessions($make);
        }
        #[test]
        fn a_message_under_an_unknown_session_rekeys_only_known_peers_and_at_most_once_a_minute() {
            $crate::testkit::a_message_under_an_unknown_session_rekeys_only_known_peers_and_at_most_once_a_minute(
                $make,
            );
        }
        #[test]
        fn a_group_of_invented_members_cannot_grow_held_messages_or_key_exchanges_past_the_caps() {
            $crate::testkit::a_group_of_invented_members_cannot_grow_held_messages_or_key_exchanges_past_the_caps(
                $make,
            );
        }
        #[test]
        fn non_admin_invites_and_forged_control_are_refused() {
            $crate::testkit::non_admin_invites_and_forged_control_are_refused($make);
        }
        #[test]
        fn group_creation_needs_a_name_and_two_other_members() {
            $crate::testkit::group_creation_needs_a_name_and_two_other_members($make);
        }
        #[test]
        fn skipped_keys_are_cleaned_up_after_seven_days() {
            $crate::testkit::skipped_keys_are_cleaned_up_after_seven_days($make);
        }
        #[test]
        fn a_key_exchange_can_be_initiated_again() {
            $crate::testkit::a_key_exchange_can_be_initiated_again($make);
        }
        #[test]
        fn key_exchange_retries_follow_the_backoff() {
            $crate::testkit::key_exchange_retries_follow_the_backoff($make);
        }
        #[test]
        fn a_group_message_before_its_sender_key_is_held_then_read() {
            $crate::testkit::a_group_message_before_its_sender_key_is_held_then_read($make);
        }
        #[test]
        fn group_messages_from_outsiders_or_forged_are_rejected() {
            $crate::testkit::group_messages_from_outsiders_or_forged_are_rejected($make);
        }
        #[test]
        fn a_leavers_saved_keys_cannot_read_after_it_left() {
            $crate::testkit::a_leavers_saved_keys_cannot_read_after_it_left($make);
        }
        #[test]
        fn a_batch_commits_together_or_not_at_all() {
            $crate::testkit::a_batch_commits_together_or_not_at_all($make);
        }
        #[test]
        fn commands_in_a_batch_commit_together_or_not_at_all() {
            $crate::testkit::commands_in_a_batch_commit_together_or_not_at_all($make);
        }
        #[test]
        fn queries_page_newest_first_and_refuse_unknown_ids() {
            $crate::testkit::queries_page_newest_first_and_refuse_unknown_ids($make);
        }
        #[test]
        fn a_failed_commit_of_a_transmit_result_strands_nothing() {
            $crate::testkit::a_failed_commit_of_a_transmit_result_strands_nothing($make);
        }
        #[test]
        fn a_lost_invite_is_resent_until_acknowledged() {
            $crate::testkit::a_lost_invite_is_resent_until_acknowledged($make);
        }
        #[test]
        fn a_resent_member_added_after_a_leave_changes_nothing() {
            $crate::testkit::a_resent_member_added_after_a_leave_changes_nothing($make);
        }
        #[test]
        fn a_leave_before_its_join_notice_leaves_no_ghost() {
            $crate::testkit::a_leave_before_its_join_notice_leaves_no_ghost($make);
        }
        #[test]
        fn crossing_leaves_settle() {
            $crate::testkit::crossing_leaves_settle($make);
        }
        #[test]
        fn a_crash_at_any_point_loses_nothing_and_never_reuses_a_message_key() {
            $crate::testkit::a_crash_at_any_point_loses_nothing_and_never_reuses_a_message_key($make);
        }
    };
}

struct Node<S: Store> {
    engine: Engine<S>,
    identity_seed: [u8; 32],
    events: Vec<Event>,
    online: bool,
    restarts: u64,
}

/// A network of engines. Transmits to an online node arrive at once; to an
/// offline one they fail (there is no relay in these scenarios). `drop`
/// decides, per transmit, whether the network loses it.
/// Decides, per transmit (sender index, transmit), whether the network loses it.
pub type LossRule = Box<dyn FnMut(usize, &Transmit) -> bool>;

/// A network of engines over stores of type `S`.
pub struct Net<S: TestStore> {
    nodes: Vec<Node<S>>,
    now: Timestamp,
    unknown_to_directory: BTreeSet<PeerId>,
    lose: LossRule,
    delivered: Vec<(usize, usize, Vec<u8>)>,
    /// Engine calls so far, and the one after which the called node crashes
    /// before any of its outputs leave.
    calls: u64,
    crash_after_call: Option<u64>,
    /// Directory lookups answered, per node.
    lookups: Vec<u32>,
    /// Every ciphertext seen per message key: (header bytes or group
    /// position) → ciphertext. A key must never seal two different texts.
    seen_keys: std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
    /// Every distinct group envelope put on the wire, delivered or not, with
    /// its sender's index: what a relay carrying all of them would see.
    wire_group_envelopes: Vec<(usize, Vec<u8>)>,
    /// Whether each node's user accepts a waiting group invitation as soon
    /// as it arrives (most scenarios are about what follows).
    accept_invitations: bool,
    /// Invitations seen and not answered yet: (node, group).
    accepts: VecDeque<(usize, ConversationId)>,
}

impl<S: TestStore> Net<S> {
    /// `count` engines, each on a fresh store from `make`.
    pub fn new(make: fn() -> S, count: usize, seed: u64) -> Self {
        Self::with_config(make, count, seed, EngineConfig::default())
    }

    /// As [`Net::new`], with every engine on `config`.
    pub fn with_config(make: fn() -> S, count: usize, seed: u64, config: EngineConfig) -> Self {
        let mut r = rng(seed);
        let nodes = (0..count)
            .map(|i| {
                let mut identity_seed = [0u8; 32];
                rand_chacha::rand_core::RngCore::fill_bytes(&mut r, &mut identity_seed);
                let identity = IdentityKeyPair::from_seed(&crate::keys::IdentitySeed::from_bytes(identity_seed));
                let engine = Engine::new(
                    identity,
                    make(),
                    config.clone(),
                    ChaCha20Rng::seed_from_u64(seed * 1000 + i as u64),
                    NOW,
                )
                .unwrap();
                Node { engine, identity_seed, events: Vec::new(), online: true, restarts: 0 }
            })
            .collect();
        Self {
            nodes,
            now: NOW,
            unknown_to_directory: BTreeSet::new(),
            lose: Box::new(|_, _| false),
            delivered: Vec::new(),
            calls: 0,
            crash_after_call: None,
            lookups: vec![0; count],
            seen_keys: std::collections::BTreeMap::new(),
            wire_group_envelopes: Vec::new(),
            accept_invitations: true,
            accepts: VecDeque::new(),
        }
    }

    fn id(&self, i: usize) -> PeerId {
        self.nodes[i].engine.peer_id()
    }

    fn command(&mut self, i: usize, command: Command) -> Result<CommandOutcome, EngineError> {
        let out = self.nodes[i].engine.command(self.now, command);
        self.after_call(i);
        self.drain();
        out
    }

    /// Crashes node `i` if this call is the chosen crash point.
    fn after_call(&mut self, i: usize) {
        self.calls += 1;
        if self.crash_after_call == Some(self.calls) {
            self.restart(i);
        }
    }

    /// Checks that no message key seals two different ciphertexts.
    fn check_key_use(&mut self, bytes: &[u8]) {
        let Ok(envelope) = Envelope::decode(bytes) else { return };
        let (key, ciphertext) = match envelope.body {
            EnvelopeBody::Ratchet(m) => (m.header.to_bytes().to_vec(), m.ciphertext),
            EnvelopeBody::Group(g) => {
                let mut k = g.group_id.as_bytes().to_vec();
                k.extend_from_slice(&g.sender.0);
                k.extend_from_slice(&g.key_id.to_be_bytes());
                k.extend_from_slice(&g.message_number.to_be_bytes());
                (k, g.ciphertext)
            }
            _ => return,
        };
        let first = self.seen_keys.entry(key).or_insert_with(|| ciphertext.clone());
        assert_eq!(*first, ciphertext, "a message key sealed two different plaintexts");
    }

    fn input(&mut self, i: usize, input: Input) {
        self.nodes[i].engine.handle(self.now, input).unwrap();
        self.drain();
    }

    /// Delivers every output until the network is quiet.
    fn drain(&mut self) {
        let mut work: VecDeque<(usize, Input)> = VecDeque::new();
        loop {
            for i in 0..self.nodes.len() {
                while let Some(event) = self.nodes[i].engine.poll_event() {
                    if let Event::GroupInvite { conversation_id, pending: true, .. } = &event {
                        if self.accept_invitations {
                            self.accepts.push_back((i, *conversation_id));
                        }
                    }
                    self.nodes[i].events.push(event);
                }
                while let Some(peer) = self.nodes[i].engine.poll_lookup() {
                    self.lookups[i] += 1;
                    let answer = if self.unknown_to_directory.contains(&peer) {
                        Input::LookupFailed(peer)
                    } else {
                        Input::PeerRecord(peer)
                    };
                    work.push_back((i, answer));
                }
                while let Some(t) = self.nodes[i].engine.poll_transmit() {
                    self.check_key_use(&t.bytes);
                    let group = matches!(Envelope::decode(&t.bytes).map(|e| e.body), Ok(EnvelopeBody::Group(_)));
                    if group && !self.wire_group_envelopes.iter().any(|(_, b)| *b == t.bytes) {
                        self.wire_group_envelopes.push((i, t.bytes.clone()));
                    }
                    // A peer outside the network (an invented member) is
                    // never reached.
                    let Some(to) = self.nodes.iter().position(|n| n.engine.peer_id() == t.peer) else {
                        let outcome = TransmitOutcome::Failed("no such peer".into());
                        work.push_back((i, Input::TransmitResult { id: t.id, outcome }));
                        continue;
                    };
                    let lost = (self.lose)(i, &t);
                    if self.nodes[to].online && !lost {
                        self.delivered.push((i, to, t.bytes.clone()));
                        work.push_back((to, Input::Received { from: self.id(i), bytes: t.bytes }));
                        work.push_back((i, Input::TransmitResult { id: t.id, outcome: TransmitOutcome::Delivered }));
                    } else if lost && self.nodes[to].online {
                        // Lost in transit after the sender's transport took it.
                        work.push_back((i, Input::TransmitResult { id: t.id, outcome: TransmitOutcome::Delivered }));
                    } else {
                        work.push_back((
                            i,
                            Input::TransmitResult { id: t.id, outcome: TransmitOutcome::Failed("peer offline".into()) },
                        ));
                    }
                }
            }
            let Some((i, input)) = work.pop_front() else {
                // The network is quiet: the users answer their invitations.
                let Some((i, group)) = self.accepts.pop_front() else { break };
                match self.nodes[i].engine.command(self.now, Command::AcceptInvitation { group }) {
                    // A crash may have lost the invitation with its commit.
                    Ok(_) | Err(EngineError::NoInvitation(_)) => {}
                    Err(e) => panic!("node {i} could not accept its invitation: {e}"),
                }
                self.after_call(i);
                continue;
            };
            self.nodes[i].engine.handle(self.now, input).unwrap();
            self.after_call(i);
        }
    }

    /// Jumps virtual time forward to `until`, firing every deadline on the way.
    fn advance(&mut self, by_ms: u64) {
        let until = self.now.saturating_add_millis(by_ms);
        loop {
            let next = self.nodes.iter().filter_map(|n| n.engine.poll_timeout()).filter(|t| *t <= until).min();
            let Some(next) = next else { break };
            self.now = next.max(self.now);
            for i in 0..self.nodes.len() {
                if self.nodes[i].engine.poll_timeout().is_some_and(|t| t <= self.now) {
                    self.nodes[i].engine.handle(self.now, Input::Timeout).unwrap();
                    self.after_call(i);
                }
            }
            self.drain();
            for (i, node) in self.nodes.iter().enumerate() {
                // A deadline that a timeout does not move would spin forever.
                assert!(
                    node.engine.poll_timeout().is_none_or(|t| t > self.now),
                    "node {i}'s deadline did not move past {:?}",
                    self.now
                );
            }
        }
        self.now = until;
    }

    fn set_online(&mut self, i: usize, online: bool) {
        self.nodes[i].online = online;
        let me = self.id(i);
        for j in 0..self.nodes.len() {
            if j != i {
                let input = if online { Input::PeerReachable(me) } else { Input::PeerUnreachable(me) };
                self.nodes[j].engine.handle(self.now, input).unwrap();
                self.after_call(j);
            }
        }
        self.drain();
    }

    /// Drops the engine's memory and rebuilds it from what its store committed.
    fn restart(&mut self, i: usize) {
        let store = self.nodes[i].engine.store().crash_copy();
        // Outputs not yet drained die with the process; events already
        // seen by the API stay seen.
        self.nodes[i].restarts += 1;
        let identity = IdentityKeyPair::from_seed(&crate::keys::IdentitySeed::from_bytes(self.nodes[i].identity_seed));
        let seed = 7_000_000 + i as u64 * 100 + self.nodes[i].restarts;
        self.nodes[i].engine =
            Engine::new(identity, store, EngineConfig::default(), ChaCha20Rng::seed_from_u64(seed), self.now).unwrap();
        // Its user's page, reloaded, lists the invitations still waiting.
        if self.accept_invitations {
            if let Ok(Answer::Invitations(waiting)) = self.nodes[i].engine.query(Query::Invitations) {
                self.accepts.extend(waiting.into_iter().map(|w| (i, w.group_id)));
            }
        }
        // The driver tells the new engine who is reachable.
        for j in 0..self.nodes.len() {
            if j != i && self.nodes[j].online {
                let peer = self.nodes[j].engine.peer_id();
                self.nodes[i].engine.handle(self.now, Input::PeerReachable(peer)).unwrap();
            }
        }
    }

    fn conversation(&mut self, i: usize, j: usize) -> Conversation {
        let peer = self.id(j);
        match self.command(i, Command::CreateConversation { peer }).unwrap() {
            CommandOutcome::Conversation(c) => c,
            other => panic!("expected a conversation, got {other:?}"),
        }
    }

    fn send(&mut self, i: usize, conversation: ConversationId, text: &str) -> Message {
        match self.command(i, Command::SendMessage { conversation, content: text.into() }).unwrap() {
            CommandOutcome::Message(m) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    fn message(&mut self, i: usize, id: &MessageId) -> Option<Message> {
        let store = self.nodes[i].engine.store_mut();
        store.begin().unwrap();
        let m = store.message(id).unwrap();
        store.rollback();
        m
    }

    fn messages(&mut self, i: usize, conversation: &ConversationId) -> Vec<Message> {
        let store = self.nodes[i].engine.store_mut();
        store.begin().unwrap();
        let m = store.messages(conversation).unwrap();
        store.rollback();
        m
    }

    fn kinds(&self, i: usize) -> Vec<&'static str> {
        self.nodes[i].events.iter().map(Event::kind).collect()
    }
}

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
    assert!(matches!(err, EngineError::Store(_)));
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

/// Scenario: undelivered messages expire to failed and old ones are deleted.
pub fn undelivered_messages_expire_to_failed_and_old_ones_are_deleted<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 2, 8);
    let c = net.conversation(0, 1);
    let old = net.send(0, c.id, "delivered long ago");
    net.set_online(1, false);
    let stuck = net.send(0, c.id, "never delivered");
    assert_eq!(net.message(0, &stuck.id).unwrap().status, MessageStatus::Sent);
    net.advance(31 * 24 * 60 * 60 * 1000);
    assert!(net.nodes[0].events.iter().any(|e| matches!(e,
        Event::MessageFailed { message_id, failure_reason, .. } if *message_id == stuck.id && failure_reason == "expired undelivered")));
    assert!(net.message(0, &stuck.id).is_none(), "deleted after failing");
    assert!(net.message(0, &old.id).is_none(), "past the TTL");
}

/// Scenario: bad commands get clear errors.
pub fn bad_commands_get_clear_errors<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 2, 9);
    let c = net.conversation(0, 1);
    let me = net.id(0);
    assert_eq!(
        net.command(0, Command::SendMessage { conversation: c.id, content: String::new() }),
        Err(EngineError::EmptyContent)
    );
    let big = "x".repeat(64 * 1024 + 1);
    assert_eq!(
        net.command(0, Command::SendMessage { conversation: c.id, content: big }),
        Err(EngineError::ContentTooLarge { len: 64 * 1024 + 1, max: 64 * 1024 })
    );
    let nowhere = ConversationId::for_peers(&me, &PeerId([9; 20]));
    assert_eq!(
        net.command(0, Command::SendMessage { conversation: nowhere, content: "x".into() }),
        Err(EngineError::UnknownConversation(nowhere))
    );
    assert_eq!(net.command(0, Command::CreateConversation { peer: me }), Err(EngineError::SelfConversation(me)));
    let m = net.send(0, c.id, "fine");
    assert_eq!(
        net.command(0, Command::RetryMessage { message: m.id }),
        Err(EngineError::NotRetryable { id: m.id, status: "delivered" })
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

// ---- groups -------------------------------------------------------------------

fn group<S: TestStore>(net: &mut Net<S>, admin: usize, members: &[usize], name: &str) -> Conversation {
    let members = members.iter().map(|&i| net.id(i)).collect();
    match net.command(admin, Command::CreateGroup { name: name.into(), members }).unwrap() {
        CommandOutcome::Conversation(c) => c,
        other => panic!("expected a conversation, got {other:?}"),
    }
}

fn send_group<S: TestStore>(net: &mut Net<S>, i: usize, group: ConversationId, text: &str) -> Message {
    match net.command(i, Command::SendGroupMessage { group, content: text.into() }).unwrap() {
        CommandOutcome::Message(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

fn contents<S: TestStore>(net: &mut Net<S>, i: usize, c: &ConversationId) -> Vec<String> {
    net.messages(i, c).into_iter().map(|m| m.content).collect()
}

/// Scenario: a group of three delivers to everyone and tracks the least advanced status.
pub fn a_group_of_three_delivers_to_everyone_and_tracks_the_least_advanced_status<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 3, 20);
    let g = group(&mut net, 0, &[1, 2], "Project Team");
    // Sent at once: it reaches the others before their invite and keys, is
    // held, and is decrypted when the keys arrive.
    let first = send_group(&mut net, 0, g.id, "hello team");
    for i in 1..3 {
        assert_eq!(contents(&mut net, i, &g.id), vec!["hello team"], "member {i}");
        assert!(net.kinds(i).contains(&"chat.group.invite"));
    }
    assert_eq!(net.message(0, &first.id).unwrap().status, MessageStatus::Delivered);
    let reply = send_group(&mut net, 2, g.id, "hi from member 2");
    assert_eq!(contents(&mut net, 0, &g.id), vec!["hello team", "hi from member 2"]);
    assert_eq!(contents(&mut net, 1, &g.id), vec!["hello team", "hi from member 2"]);
    // Read by one member: still delivered overall; read by both: read.
    net.command(1, Command::MarkMessageRead { message: reply.id }).unwrap();
    assert_eq!(net.message(2, &reply.id).unwrap().status, MessageStatus::Delivered);
    net.command(0, Command::MarkMessageRead { message: reply.id }).unwrap();
    assert_eq!(net.message(2, &reply.id).unwrap().status, MessageStatus::Read);
}

/// Scenario: a group of ten with a member offline during creation.
pub fn a_group_of_ten_with_a_member_offline_during_creation<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 10, 21);
    net.nodes[9].online = false;
    let g = group(&mut net, 0, &[1, 2, 3, 4, 5, 6, 7, 8, 9], "Ten");
    let m = send_group(&mut net, 3, g.id, "while 9 is away");
    assert_eq!(net.message(3, &m.id).unwrap().status, MessageStatus::Sent, "one recipient holds it back");
    net.set_online(9, true);
    net.advance(60_000);
    assert_eq!(contents(&mut net, 9, &g.id), vec!["while 9 is away"]);
    assert_eq!(net.message(3, &m.id).unwrap().status, MessageStatus::Delivered);
    let from_nine = send_group(&mut net, 9, g.id, "back");
    assert_eq!(net.message(9, &from_nine.id).unwrap().status, MessageStatus::Delivered);
    for i in 0..9 {
        assert!(contents(&mut net, i, &g.id).contains(&"back".to_string()), "member {i}");
    }
}

/// The group envelopes `from` sent so far.
fn group_envelopes<S: TestStore>(net: &Net<S>, from: usize) -> Vec<Vec<u8>> {
    let mut seen = BTreeSet::new();
    net.delivered
        .iter()
        .filter(|(f, _, b)| *f == from && matches!(Envelope::decode(b).map(|e| e.body), Ok(EnvelopeBody::Group(_))))
        .filter(|(_, _, b)| seen.insert(b.clone()))
        .map(|(_, _, b)| b.clone())
        .collect()
}

/// Scenario: an invitee cannot read older messages and a leaver cannot read newer ones.
pub fn an_invitee_cannot_read_older_messages_and_a_leaver_cannot_read_newer_ones<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 4, 22);
    let g = group(&mut net, 0, &[1, 2], "Team");
    send_group(&mut net, 1, g.id, "before 3 joined");
    let old = group_envelopes(&net, 1);
    let newcomer = net.id(3);
    net.command(0, Command::Invite { group: g.id, peer: newcomer }).unwrap();
    net.advance(1_000);
    for bytes in old {
        net.input(3, Input::Received { from: net.id(1), bytes });
    }
    assert!(contents(&mut net, 3, &g.id).is_empty(), "the invitee reads nothing from before it joined");
    send_group(&mut net, 1, g.id, "welcome");
    assert_eq!(contents(&mut net, 3, &g.id), vec!["welcome"]);

    net.command(2, Command::Leave { group: g.id }).unwrap();
    net.advance(1_000);
    let before = group_envelopes(&net, 1).len();
    send_group(&mut net, 1, g.id, "after 2 left");
    let new_envelopes: Vec<Vec<u8>> = group_envelopes(&net, 1).into_iter().skip(before).collect();
    assert!(!new_envelopes.is_empty());
    for bytes in new_envelopes {
        net.input(2, Input::Received { from: net.id(1), bytes });
    }
    assert!(!contents(&mut net, 2, &g.id).contains(&"after 2 left".to_string()), "the leaver reads nothing newer");
    assert!(contents(&mut net, 0, &g.id).contains(&"after 2 left".to_string()));
    assert!(contents(&mut net, 3, &g.id).contains(&"after 2 left".to_string()));

    // Re-invited, the leaver reads again.
    let leaver = net.id(2);
    net.command(0, Command::Invite { group: g.id, peer: leaver }).unwrap();
    net.advance(1_000);
    send_group(&mut net, 3, g.id, "welcome back");
    assert!(contents(&mut net, 2, &g.id).contains(&"welcome back".to_string()));
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

/// Scenario: a group's admin lists invented members, and each "sends"
/// group messages under keys nobody holds: what is held stays within the
/// per-sender and overall caps, and the key exchanges the node starts for
/// them stay within the background cap, while the real members still talk.
pub fn a_group_of_invented_members_cannot_grow_held_messages_or_key_exchanges_past_the_caps<S: TestStore>(
    make: fn() -> S,
) {
    let config = EngineConfig {
        held_max_per_sender: 3,
        held_max_bytes_per_sender: 600,
        held_max: 7,
        held_max_bytes: 1 << 20,
        max_background_key_exchanges: 2,
        ..EngineConfig::default()
    };
    let mut net = Net::with_config(make, 3, 44, config);
    let puppets: Vec<PeerId> = (0..5u8).map(|n| PeerId([0xa0 + n; 20])).collect();
    let mut members: Vec<PeerId> = puppets.clone();
    members.extend([net.id(1), net.id(2)]);
    let g = match net.command(0, Command::CreateGroup { name: "Puppets".into(), members }).unwrap() {
        CommandOutcome::Conversation(c) => c,
        other => panic!("{other:?}"),
    };
    // The admin's own exchanges with its invented members take its
    // background slots first; the real ones get theirs as those give up.
    net.advance(600_000);
    assert!(net.kinds(1).contains(&"chat.group.invite"));
    let held = |net: &mut Net<S>, sender: Option<&PeerId>| {
        let store = net.nodes[1].engine.store_mut();
        store.begin().unwrap();
        let usage = store.held_usage(sender).unwrap();
        let exchanges = store.key_exchange_count().unwrap();
        store.rollback();
        (usage, exchanges)
    };
    // The first sends large envelopes (its bytes run out first), the others
    // small ones (their count does).
    for (i, puppet) in puppets.iter().enumerate() {
        let len = if i == 0 { 300 } else { 60 };
        for n in 0..5u32 {
            let message = crate::wire::GroupMessage {
                group_id: g.id,
                sender: *puppet,
                key_id: 7,
                message_number: n,
                ciphertext: vec![n as u8; len],
                signature: crate::wire::Signature64([0; 64]),
            };
            let bytes = Envelope::new(EnvelopeBody::Group(message)).encode();
            net.input(1, Input::Received { from: *puppet, bytes });
        }
    }
    let ((large, large_bytes), _) = held(&mut net, Some(&puppets[0]));
    assert_eq!(large, 1, "one sender's held bytes stop at its cap ({large_bytes} bytes held)");
    let ((small, _), _) = held(&mut net, Some(&puppets[1]));
    assert_eq!(small, 3, "one sender's held messages stop at its cap");
    let ((all, _), exchanges) = held(&mut net, None);
    assert_eq!(all, 7, "held messages from everyone stop at the overall cap");
    assert!(exchanges <= 2, "{exchanges} key exchanges with invented members");
    assert!(net.kinds(1).contains(&"chat.security.rejected"), "refusals are reported");
    // The real members still talk.
    send_group(&mut net, 0, g.id, "hello, real members");
    send_group(&mut net, 2, g.id, "hello from 2");
    // Node 2's own exchanges with the invented members come first; its key
    // reaches node 1 once they give up and free their places.
    net.advance(600_000);
    let texts = contents(&mut net, 1, &g.id);
    assert!(texts.contains(&"hello, real members".to_string()), "{texts:?}");
    assert!(texts.contains(&"hello from 2".to_string()), "{texts:?}");
    let (_, exchanges) = held(&mut net, None);
    assert!(exchanges <= 2 + 1, "{exchanges} key exchanges after the real traffic");
}

fn invitations<S: TestStore>(net: &mut Net<S>, i: usize) -> Vec<crate::engine::Invitation> {
    match net.nodes[i].engine.query(Query::Invitations).unwrap() {
        Answer::Invitations(all) => all,
        other => panic!("{other:?}"),
    }
}

fn has_left<S: TestStore>(net: &mut Net<S>, i: usize, group: &ConversationId, peer: usize) -> bool {
    let peer = net.id(peer);
    members_of(net, i, group).iter().any(|m| m.peer_id == peer && m.left_at.is_some())
}

/// What node `i` keeps of a group: its conversation, keys, members, messages
/// and held messages.
fn traces_of_group<S: TestStore>(net: &mut Net<S>, i: usize, group: &ConversationId) -> usize {
    let store = net.nodes[i].engine.store_mut();
    store.begin().unwrap();
    let traces = usize::from(store.conversation(group).unwrap().is_some())
        + usize::from(store.group_keys(group).unwrap().is_some())
        + store.members(group).unwrap().len()
        + store.messages(group).unwrap().len()
        + store.held_messages(group).unwrap().len();
    store.rollback();
    traces
}

/// Scenario: an admin the user never wrote to (even one that wrote first)
/// invites it: the invitation waits, and the group's traffic leaves nothing
/// on the user's node until it answers. Declined, nothing is kept, and the
/// admin and the other members see the invitee leave, so their messages
/// stop waiting for it. A friend's invitation is joined at once.
pub fn a_strangers_invitation_waits_for_consent_and_a_declined_group_leaves_nothing<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 3, 61);
    net.accept_invitations = false;
    // Node 1 wrote to the admin; the admin wrote to node 2, who never answered.
    let c1 = net.conversation(1, 0);
    net.send(1, c1.id, "hi admin");
    let c2 = net.conversation(0, 2);
    net.send(0, c2.id, "hello stranger");
    let g = group(&mut net, 0, &[1, 2], "Unasked");
    let joined = |net: &Net<S>, i: usize, pending: bool| {
        net.nodes[i].events.iter().any(|e| {
            matches!(e, Event::GroupInvite { conversation_id, pending: p, .. } if *conversation_id == g.id && *p == pending)
        })
    };
    assert!(joined(&net, 1, false), "a friend's invitation is joined at once");
    assert!(joined(&net, 2, true), "a stranger's invitation is announced as waiting");
    assert!(!joined(&net, 2, false));
    let waiting = invitations(&mut net, 2);
    assert_eq!(waiting.len(), 1);
    assert_eq!((waiting[0].group_id, waiting[0].admin, waiting[0].name.as_str()), (g.id, net.id(0), "Unasked"));
    assert_eq!(waiting[0].members.len(), 3);
    // The group talks; the invitee keeps nothing of it.
    let m = send_group(&mut net, 0, g.id, "before the answer");
    send_group(&mut net, 1, g.id, "from the friend");
    net.advance(120_000);
    assert_eq!(traces_of_group(&mut net, 2, &g.id), 0, "a waiting invitation stores nothing of the group");
    assert!(net.nodes[2].engine.query(Query::Conversation(g.id)).is_err());
    assert_eq!(contents(&mut net, 1, &g.id), vec!["before the answer".to_string(), "from the friend".to_string()]);
    assert!(net.message(0, &m.id).unwrap().status < MessageStatus::Delivered, "waits for the invitee");
    // Declined: nothing stays, the admin and the friend see the invitee gone.
    net.command(2, Command::DeclineInvitation { group: g.id }).unwrap();
    net.advance(60_000);
    assert!(invitations(&mut net, 2).is_empty());
    assert_eq!(traces_of_group(&mut net, 2, &g.id), 0, "a declined group leaves nothing behind");
    assert!(has_left(&mut net, 0, &g.id, 2), "the admin learns of the decline");
    assert!(has_left(&mut net, 1, &g.id, 2), "the admin tells the other members");
    assert_eq!(net.message(0, &m.id).unwrap().status, MessageStatus::Delivered, "stops waiting for the decliner");
    let after = send_group(&mut net, 1, g.id, "after the decline");
    net.advance(60_000);
    assert_eq!(net.message(1, &after.id).unwrap().recipients, vec![(net.id(0), MessageStatus::Delivered)]);
    assert_eq!(traces_of_group(&mut net, 2, &g.id), 0);
    // Answering twice, or an invitation never received, is a clear error.
    for command in [Command::DeclineInvitation { group: g.id }, Command::AcceptInvitation { group: g.id }] {
        assert_eq!(net.command(2, command).unwrap_err(), EngineError::NoInvitation(g.id));
    }
}

/// Scenario: the invitee accepts late: it joins, and what the members sent
/// while it waited reaches it by their retransmissions.
pub fn an_accepted_invitation_joins_and_receives_what_was_sent_while_it_waited<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 3, 62);
    net.accept_invitations = false;
    let g = group(&mut net, 0, &[1, 2], "Later");
    assert_eq!(invitations(&mut net, 1).len(), 1);
    assert_eq!(invitations(&mut net, 2).len(), 1);
    net.command(1, Command::AcceptInvitation { group: g.id }).unwrap();
    send_group(&mut net, 0, g.id, "while 2 waits");
    send_group(&mut net, 1, g.id, "from 1 while 2 waits");
    net.advance(30 * 60_000);
    assert_eq!(traces_of_group(&mut net, 2, &g.id), 0);
    let joined = match net.command(2, Command::AcceptInvitation { group: g.id }).unwrap() {
        CommandOutcome::Conversation(c) => c,
        other => panic!("{other:?}"),
    };
    assert_eq!(joined.id, g.id);
    assert!(
        matches!(joined.kind, ConversationKind::Group { ref name, admin } if name == "Later" && admin == net.id(0))
    );
    assert!(net.nodes[2].events.iter().any(|e| matches!(e, Event::ConversationCreated(c) if c.id == g.id)));
    assert!(invitations(&mut net, 2).is_empty());
    assert_eq!(members_of(&mut net, 2, &g.id).len(), 3);
    net.advance(30 * 60_000);
    let mut texts = contents(&mut net, 2, &g.id);
    texts.sort();
    assert_eq!(texts, vec!["from 1 while 2 waits".to_string(), "while 2 waits".to_string()]);
    let m = send_group(&mut net, 2, g.id, "thanks");
    net.advance(60_000);
    assert_eq!(net.message(2, &m.id).unwrap().status, MessageStatus::Delivered);
}

/// Scenario: one admin may keep only so many invitations waiting (the rest
/// are dropped at once), all admins together only so many more (the oldest
/// is dropped to make room); neither sends anything back, so a flood
/// cannot fill the outbox. One unanswered for the message TTL is declined,
/// and its admin told.
pub fn waiting_invitations_stay_within_their_caps_and_expire<S: TestStore>(make: fn() -> S) {
    let config = EngineConfig {
        max_invitations: 2,
        max_invitations_per_admin: 2,
        message_ttl_ms: 60 * 60_000,
        retention_interval_ms: 10 * 60_000,
        ..EngineConfig::default()
    };
    let mut net = Net::with_config(make, 5, 63, config);
    net.accept_invitations = false;
    let mut groups = Vec::new();
    for n in 0..3 {
        groups.push(group(&mut net, 0, &[1, 2], &format!("Spam {n}")));
        net.advance(1_000);
    }
    net.advance(60_000);
    let waiting: Vec<ConversationId> = invitations(&mut net, 1).iter().map(|i| i.group_id).collect();
    assert_eq!(waiting, vec![groups[0].id, groups[1].id], "the admin's third invitation is not taken");
    assert!(!has_left(&mut net, 0, &groups[2].id, 1), "and nothing is sent back for it");
    assert!(net.kinds(1).contains(&"chat.security.rejected"));
    let outbox_to_admin = |net: &mut Net<S>, admin: usize| {
        let peer = net.id(admin);
        let store = net.nodes[1].engine.store_mut();
        store.begin().unwrap();
        let n = store.outbox_len(&peer).unwrap();
        store.rollback();
        n
    };
    // Another admin's: the cap over everyone declines the oldest.
    net.advance(1_000);
    let other = group(&mut net, 3, &[1, 4], "Other");
    net.advance(60_000);
    let waiting: Vec<ConversationId> = invitations(&mut net, 1).iter().map(|i| i.group_id).collect();
    // The cap over everyone declines the oldest to make room for the other
    // admin's; the first admin's third, not taken but sent again, is taken
    // once it has room under its own cap, and declines the next oldest.
    assert_eq!(waiting, vec![other.id, groups[2].id]);
    assert!(!has_left(&mut net, 0, &groups[0].id, 1), "the oldest invitation was dropped, silently");
    assert!(!has_left(&mut net, 0, &groups[1].id, 1), "and so was the next");
    assert_eq!(outbox_to_admin(&mut net, 0), 0, "nothing queued for the flooding admin");
    // Unanswered for the message TTL: declined.
    net.advance(2 * 60 * 60_000);
    assert!(invitations(&mut net, 1).is_empty());
    assert!(has_left(&mut net, 0, &groups[2].id, 1));
    assert!(has_left(&mut net, 3, &other.id, 1));
    for g in groups.iter().chain([&other]) {
        assert_eq!(traces_of_group(&mut net, 1, &g.id), 0);
    }
}

/// `payload` sealed by node `from` for node `to` under their session, which
/// is advanced and saved (as `from`'s engine would), for forgeries.
fn seal_for<S: TestStore>(net: &mut Net<S>, from: usize, to: usize, payload: &crate::wire::PairwisePayload) -> Vec<u8> {
    let peer = net.id(to);
    let store = net.nodes[from].engine.store_mut();
    store.begin().unwrap();
    let bytes = store.sessions(&peer).unwrap().expect("a session to forge under");
    let mut sessions = crate::PairwiseSessions::from_bytes(&bytes).unwrap();
    let message = sessions.encrypt(&payload.encode(), &mut rng(from as u64 * 31 + to as u64)).unwrap();
    store.put_sessions(&peer, &sessions.to_bytes()).unwrap();
    store.commit().unwrap();
    Envelope::new(EnvelopeBody::Ratchet(message)).encode()
}

/// Scenario: the peer records a node keeps across restarts (a peer's
/// relays, for someone away longer than a record lives) stay within their
/// count cap, the least recently seen going first; one over the size cap
/// is not kept; a newer one replaces the old; they survive a restart; and
/// retention forgets those not seen again for 30 days.
pub fn kept_peer_records_stay_within_their_cap_survive_a_restart_and_expire<S: TestStore>(make: fn() -> S) {
    const DAY_MS: u64 = 24 * 60 * 60_000;
    let mut net = Net::new(make, 1, 71);
    let kept = |n: u32, len: usize| {
        let mut peer = [0u8; 20];
        peer[..4].copy_from_slice(&n.to_be_bytes());
        // The store keeps what it is given; the node checks signatures.
        KeptRecord { peer: PeerId(peer), seen_at: NOW.saturating_add_millis(u64::from(n)), record: vec![n as u8; len] }
    };
    let read = |net: &mut Net<S>| {
        let store = net.nodes[0].engine.store_mut();
        store.begin().unwrap();
        let records = store.kept_records().unwrap();
        store.rollback();
        records
    };
    let over = MAX_KEPT_RECORDS as u32 + 1;
    let steps = (0..over).map(|n| Step::Input(Input::KeepRecord(kept(n, 100))));
    net.nodes[0].engine.handle_batch(NOW, steps).unwrap();
    let records = read(&mut net);
    assert_eq!(records.len(), MAX_KEPT_RECORDS, "one over the cap: the least recently seen went");
    assert!(!records.iter().any(|r| r.peer == kept(0, 100).peer));
    assert!(records.contains(&kept(over - 1, 100)));

    let newer = KeptRecord { record: vec![7; 50], ..kept(5, 100) };
    let oversized = kept(over, MAX_KEPT_RECORD_BYTES + 1);
    let steps = [newer.clone(), oversized.clone()].map(|k| Step::Input(Input::KeepRecord(k)));
    net.nodes[0].engine.handle_batch(NOW, steps).unwrap();
    net.restart(0);
    let records = read(&mut net);
    assert_eq!(records.len(), MAX_KEPT_RECORDS, "kept across the restart");
    assert!(records.contains(&newer), "the newer record replaced the old");
    assert!(!records.iter().any(|r| r.peer == oversized.peer), "an oversized record is not kept");

    net.advance(KEPT_RECORD_LIFETIME_MS - 2 * DAY_MS);
    assert_eq!(read(&mut net).len(), MAX_KEPT_RECORDS, "kept while they may still be useful");
    net.advance(3 * DAY_MS);
    assert!(read(&mut net).is_empty(), "forgotten 30 days after they were last seen");
}

/// Scenario: a member, then the admin, leave while node 3's invitation
/// waits; when node 3 accepts, neither is among the members it sends its key
/// and its messages to.
pub fn a_member_who_leaves_while_an_invitation_waits_is_not_in_the_group_accepted<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 4, 65);
    net.accept_invitations = false;
    let g = group(&mut net, 0, &[1, 2, 3], "Changing");
    for i in [1, 2] {
        net.command(i, Command::AcceptInvitation { group: g.id }).unwrap();
    }
    send_group(&mut net, 2, g.id, "hello from 2, about to leave");
    net.advance(60_000);
    net.command(2, Command::Leave { group: g.id }).unwrap();
    net.advance(60_000);
    net.command(0, Command::Leave { group: g.id }).unwrap();
    net.advance(60_000);
    let waiting = invitations(&mut net, 3);
    assert_eq!(waiting.len(), 1);
    let listed: Vec<PeerId> = waiting[0].members.iter().map(|m| m.peer_id).collect();
    assert!(!listed.contains(&net.id(2)) && !listed.contains(&net.id(0)), "the leavers left the waiting roster");
    net.command(3, Command::AcceptInvitation { group: g.id }).unwrap();
    let m = send_group(&mut net, 3, g.id, "hello from 3");
    let recipients: Vec<PeerId> = m.recipients.iter().map(|(p, _)| *p).collect();
    assert_eq!(recipients, vec![net.id(1)]);
    net.advance(5 * 60_000);
    assert!(has_left(&mut net, 3, &g.id, 2), "the leave, not acknowledged while waiting, is handled in full");
    assert!(has_left(&mut net, 3, &g.id, 0));
    for i in [0, 2] {
        assert!(!contents(&mut net, i, &g.id).contains(&"hello from 3".to_string()));
    }
    assert_eq!(net.message(3, &m.id).unwrap().status, MessageStatus::Delivered);
}

/// Scenario: only the admin may report a member's leave, and only of a join
/// numbered no later than any the receiver has seen: one naming a join
/// number beyond those, the receiver or the admin changes nothing; one
/// naming a join not heard of yet is remembered as ended, so that the late
/// notice of that join does not bring the peer in.
pub fn the_admins_word_of_a_leave_counts_only_for_a_current_join<S: TestStore>(make: fn() -> S) {
    use crate::wire::{GroupControl, PairwisePayload, RosterEntry};
    let mut net = Net::new(make, 4, 66);
    let g = group(&mut net, 0, &[1, 2], "Word");
    for i in 0..3 {
        send_group(&mut net, i, g.id, &format!("hello from {i}"));
    }
    net.advance(60_000);
    let left = |peer: PeerId, epoch: u64| {
        PairwisePayload::GroupControl(GroupControl::MemberLeft {
            group_id: g.id,
            member: RosterEntry { peer_id: peer, epoch },
        })
    };
    // A member cannot.
    let before = net.nodes[2].events.len();
    let payload = left(net.id(0), 1);
    let forged = seal_for(&mut net, 1, 2, &payload);
    net.input(2, Input::Received { from: net.id(1), bytes: forged });
    assert!(net.nodes[2].events[before..]
        .iter()
        .any(|e| matches!(e, Event::SecurityRejected { reason, .. } if reason.contains("only the group's admin"))));
    // The admin's word about joins never numbered, the receiver itself or
    // the admin: nothing changes at node 1.
    let members_before = members_of(&mut net, 1, &g.id);
    for payload in [left(net.id(3), 7), left(net.id(2), 7), left(net.id(1), 1), left(net.id(0), 1)] {
        let bytes = seal_for(&mut net, 0, 1, &payload);
        net.input(1, Input::Received { from: net.id(0), bytes });
    }
    assert_eq!(members_of(&mut net, 1, &g.id), members_before);
    // A leave that overtook its join's notice: the notice then adds no one.
    let payload = left(net.id(3), 1);
    let bytes = seal_for(&mut net, 0, 1, &payload);
    net.input(1, Input::Received { from: net.id(0), bytes });
    let added = PairwisePayload::GroupControl(GroupControl::MemberAdded {
        group_id: g.id,
        member: RosterEntry { peer_id: net.id(3), epoch: 1 },
    });
    let bytes = seal_for(&mut net, 0, 1, &added);
    net.input(1, Input::Received { from: net.id(0), bytes });
    assert!(has_left(&mut net, 1, &g.id, 3), "remembered as ended, not brought in");
    // Its word about a current join: the member is gone at node 1.
    let payload = left(net.id(2), 1);
    let bytes = seal_for(&mut net, 0, 1, &payload);
    net.input(1, Input::Received { from: net.id(0), bytes });
    assert!(has_left(&mut net, 1, &g.id, 2));
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

/// A hostile relay that carried every group envelope so far hands them all
/// to node `to`, each as from its sender.
fn leak_group_envelopes<S: TestStore>(net: &mut Net<S>, to: usize) {
    for (sender, bytes) in net.wire_group_envelopes.clone() {
        if sender != to {
            net.input(to, Input::Received { from: net.id(sender), bytes });
        }
    }
    net.advance(60_000);
}

/// Scenario: messages still waiting for an offline member when another
/// member leaves reach it after the rotation, and a member invited before
/// that rotation cannot read them, even with every envelope a relay saw.
pub fn a_later_member_cannot_read_older_messages_caught_by_a_rotation<S: TestStore>(make: fn() -> S) {
    // 0 admin, 1 member, 2 offline member, 3 leaver, 4 newcomer.
    let mut net = Net::new(make, 5, 40);
    let g = group(&mut net, 0, &[1, 2, 3], "Team");
    net.advance(1_000);
    net.set_online(2, false);
    send_group(&mut net, 0, g.id, "from 0 while 2 is away");
    send_group(&mut net, 1, g.id, "from 1 while 2 is away");
    let newcomer = net.id(4);
    net.command(0, Command::Invite { group: g.id, peer: newcomer }).unwrap();
    net.advance(1_000);
    net.command(3, Command::Leave { group: g.id }).unwrap();
    net.advance(1_000);
    send_group(&mut net, 0, g.id, "welcome from 0");
    send_group(&mut net, 1, g.id, "welcome from 1");
    net.set_online(2, true);
    net.advance(120_000);
    let returned = contents(&mut net, 2, &g.id);
    for text in ["from 0 while 2 is away", "from 1 while 2 is away", "welcome from 0", "welcome from 1"] {
        assert!(returned.contains(&text.to_string()), "the returning member lacks {text:?}: {returned:?}");
    }
    leak_group_envelopes(&mut net, 4);
    let newcomer_has = contents(&mut net, 4, &g.id);
    assert!(
        !newcomer_has.iter().any(|m| m.contains("while 2 is away")),
        "a member invited later read older messages: {newcomer_has:?}"
    );
    assert!(newcomer_has.contains(&"welcome from 0".to_string()));
    assert!(newcomer_has.contains(&"welcome from 1".to_string()));
}

/// Scenario: a member that asks for a sender key gets the sender's older
/// messages it still lacks, and a member invited since cannot read them.
pub fn a_later_member_cannot_read_older_messages_answered_to_a_key_request<S: TestStore>(make: fn() -> S) {
    // 0 admin, 1 sender, 2 offline member, 3 newcomer.
    let mut net = Net::new(make, 4, 41);
    let g = group(&mut net, 0, &[1, 2], "Team");
    net.advance(1_000);
    net.set_online(2, false);
    send_group(&mut net, 1, g.id, "from 1 while 2 is away");
    let newcomer = net.id(3);
    net.command(0, Command::Invite { group: g.id, peer: newcomer }).unwrap();
    net.advance(1_000);
    send_group(&mut net, 1, g.id, "welcome from 1");
    // Pairwise traffic from 1 to the returning member (its sender key)
    // is lost for a minute, so the member asks 1 for the key while 1 keeps
    // sending it the group message.
    let blocked = std::rc::Rc::new(std::cell::Cell::new(true));
    let block = blocked.clone();
    let returning = net.id(2);
    net.lose = Box::new(move |from, t| {
        let ratchet = matches!(Envelope::decode(&t.bytes).map(|e| e.body), Ok(EnvelopeBody::Ratchet(_)));
        block.get() && from == 1 && t.peer == returning && ratchet
    });
    net.set_online(2, true);
    net.advance(60_000);
    blocked.set(false);
    net.advance(120_000);
    let returned = contents(&mut net, 2, &g.id);
    assert!(returned.contains(&"from 1 while 2 is away".to_string()), "{returned:?}");
    assert!(returned.contains(&"welcome from 1".to_string()), "{returned:?}");
    for i in 0..4 {
        eprintln!("NODE {i} {}", net.id(i));
    }
    eprintln!("LEAK {}", net.wire_group_envelopes.len());
    leak_group_envelopes(&mut net, 3);
    let newcomer_has = contents(&mut net, 3, &g.id);
    assert!(
        !newcomer_has.contains(&"from 1 while 2 is away".to_string()),
        "a member invited later read an older message: {newcomer_has:?}"
    );
    assert!(newcomer_has.contains(&"welcome from 1".to_string()));
}

/// Scenario: non admin invites and forged control are refused.
pub fn non_admin_invites_and_forged_control_are_refused<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 4, 23);
    let g = group(&mut net, 0, &[1, 2], "Team");
    let outsider = net.id(3);
    assert_eq!(
        net.command(1, Command::Invite { group: g.id, peer: outsider }),
        Err(EngineError::NotAdmin { admin: net.id(0) })
    );
    // Member 1 forges "admin added 3" over its pairwise session with 2.
    let c = net.conversation(1, 2);
    net.send(1, c.id, "a pairwise session first");
    let forged = crate::wire::GroupControl::MemberAdded {
        group_id: g.id,
        member: crate::wire::RosterEntry { peer_id: outsider, epoch: 99 },
    };
    let before = net.nodes[2].events.len();
    let member_two = net.id(2);
    let store = net.nodes[1].engine.store_mut();
    store.begin().unwrap();
    let sessions = store.sessions(&member_two).unwrap().unwrap();
    store.rollback();
    let mut sessions = crate::PairwiseSessions::from_bytes(&sessions).unwrap();
    let message = sessions.encrypt(&crate::wire::PairwisePayload::GroupControl(forged).encode(), &mut rng(99)).unwrap();
    let bytes = Envelope::new(EnvelopeBody::Ratchet(message)).encode();
    net.input(2, Input::Received { from: net.id(1), bytes });
    let rejected = net.nodes[2].events[before..]
        .iter()
        .any(|e| matches!(e, Event::SecurityRejected { reason, .. } if reason.contains("admin")));
    assert!(rejected, "a forged membership change is rejected with chat.security.rejected");
    let store = net.nodes[2].engine.store_mut();
    store.begin().unwrap();
    let members = store.members(&g.id).unwrap();
    store.rollback();
    assert!(!members.iter().any(|m| m.peer_id == outsider));
}

/// Scenario: group creation needs a name and two other members.
pub fn group_creation_needs_a_name_and_two_other_members<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 3, 24);
    let one = vec![net.id(1)];
    assert_eq!(
        net.command(0, Command::CreateGroup { name: "Pair".into(), members: one }),
        Err(EngineError::TooFewMembers { min: 2, got: 1 })
    );
    let me_and_one = vec![net.id(0), net.id(1), net.id(1)];
    assert_eq!(
        net.command(0, Command::CreateGroup { name: "Dupes".into(), members: me_and_one }),
        Err(EngineError::TooFewMembers { min: 2, got: 1 })
    );
    let two = vec![net.id(1), net.id(2)];
    assert_eq!(
        net.command(0, Command::CreateGroup { name: "  ".into(), members: two.clone() }),
        Err(EngineError::EmptyGroupName)
    );
    let long = "n".repeat(crate::engine::MAX_GROUP_NAME_LEN + 1);
    assert_eq!(
        net.command(0, Command::CreateGroup { name: long, members: two.clone() }),
        Err(EngineError::GroupNameTooLong {
            len: crate::engine::MAX_GROUP_NAME_LEN + 1,
            max: crate::engine::MAX_GROUP_NAME_LEN
        })
    );
    let longest = "n".repeat(crate::engine::MAX_GROUP_NAME_LEN);
    assert!(
        net.command(0, Command::CreateGroup { name: longest, members: two }).is_ok(),
        "the limit itself is allowed"
    );
}

/// Skipped keys held by node `i` for its sessions with node `j`.
fn skipped_keys<S: TestStore>(net: &mut Net<S>, i: usize, j: usize) -> usize {
    let peer = net.id(j);
    let store = net.nodes[i].engine.store_mut();
    store.begin().unwrap();
    let bytes = store.sessions(&peer).unwrap();
    store.rollback();
    bytes.map(|b| crate::PairwiseSessions::from_bytes(&b).unwrap().skipped_key_count()).unwrap_or(0)
}

/// Scenario: skipped keys are deleted by the retention sweep after seven days.
pub fn skipped_keys_are_cleaned_up_after_seven_days<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 2, 25);
    let c = net.conversation(0, 1);
    net.send(0, c.id, "first");
    // Lose the next two messages on the way to Bob, once each.
    let bob = net.id(1);
    let mut lost = 0;
    net.lose = Box::new(move |_from: usize, t: &Transmit| {
        let drop = t.peer == bob
            && lost < 2
            && matches!(Envelope::decode(&t.bytes).map(|e| e.body), Ok(EnvelopeBody::Ratchet(_)));
        if drop {
            lost += 1;
        }
        drop
    });
    net.send(0, c.id, "lost once");
    net.send(0, c.id, "lost once too");
    net.lose = Box::new(|_, _| false);
    net.send(0, c.id, "arrives");
    assert_eq!(skipped_keys(&mut net, 1, 0), 2, "two keys skipped over");
    // The retransmissions arrive, but on later message numbers: the two
    // skipped keys are never used, and must go after seven days.
    net.advance(60_000);
    assert_eq!(net.messages(1, &c.id).len(), 4);
    net.advance(8 * 24 * 60 * 60 * 1000);
    assert_eq!(skipped_keys(&mut net, 1, 0), 0, "the retention sweep deleted them");
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

/// Scenario: a group message that arrives before its sender's key is held,
/// the key is asked for, and the message is stored when the key comes, with
/// no wait for a retransmission.
pub fn a_group_message_before_its_sender_key_is_held_then_read<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 3, 28);
    // Lose everything member 1 sends member 2 over their pairwise session
    // while the group forms: member 2 never gets member 1's key that way.
    let two = net.id(2);
    net.lose = Box::new(move |from: usize, t: &Transmit| {
        from == 1 && t.peer == two && matches!(Envelope::decode(&t.bytes).map(|e| e.body), Ok(EnvelopeBody::Ratchet(_)))
    });
    let g = group(&mut net, 0, &[1, 2], "Late keys");
    net.lose = Box::new(|_, _| false);
    let m = send_group(&mut net, 1, g.id, "can you read this?");
    assert_eq!(contents(&mut net, 2, &g.id), vec!["can you read this?"], "released as soon as the key arrived");
    assert_eq!(net.message(1, &m.id).unwrap().status, MessageStatus::Delivered);
}

/// Scenario: members reject group messages from non-members and with bad
/// signatures, with `chat.security.rejected`.
pub fn group_messages_from_outsiders_or_forged_are_rejected<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 4, 29);
    let g = group(&mut net, 0, &[1, 2], "Closed");
    send_group(&mut net, 0, g.id, "members only");
    // An outsider makes its own keys for the same group ID.
    let mut outsider = crate::GroupSession::new(g.id, net.id(3), [net.id(1)], &mut rng(5)).unwrap();
    let forged = outsider
        .encrypt(
            &crate::wire::ChatContent {
                message_id: MessageId::random(&mut rng(6)),
                sent_at: NOW,
                content: "let me in".into(),
            }
            .encode(),
        )
        .unwrap();
    let before = net.nodes[1].events.len();
    net.input(1, Input::Received { from: net.id(3), bytes: Envelope::new(EnvelopeBody::Group(forged)).encode() });
    // A member's genuine message with a flipped ciphertext bit.
    let genuine = group_envelopes(&net, 0).pop().unwrap();
    let Ok(Envelope { body: EnvelopeBody::Group(mut tampered) }) = Envelope::decode(&genuine) else { panic!() };
    tampered.ciphertext[0] ^= 1;
    net.input(1, Input::Received { from: net.id(0), bytes: Envelope::new(EnvelopeBody::Group(tampered)).encode() });
    let reasons: Vec<String> = net.nodes[1].events[before..]
        .iter()
        .filter_map(|e| match e {
            Event::SecurityRejected { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("not a member"), "{reasons:?}");
    assert!(reasons[1].contains("signature"), "{reasons:?}");
    assert_eq!(contents(&mut net, 1, &g.id), vec!["members only"]);
}

/// Scenario: a leaver that kept a copy of its keys still cannot read what
/// the others send after it left, because they all rotated.
pub fn a_leavers_saved_keys_cannot_read_after_it_left<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 3, 31);
    let g = group(&mut net, 0, &[1, 2], "Rotation");
    send_group(&mut net, 0, g.id, "before");
    send_group(&mut net, 1, g.id, "before too");
    let store = net.nodes[2].engine.store_mut();
    store.begin().unwrap();
    let saved = store.group_keys(&g.id).unwrap().unwrap();
    store.rollback();
    net.command(2, Command::Leave { group: g.id }).unwrap();
    net.advance(1_000);
    let before: BTreeSet<Vec<u8>> = group_envelopes(&net, 0).into_iter().chain(group_envelopes(&net, 1)).collect();
    send_group(&mut net, 0, g.id, "after, from 0");
    send_group(&mut net, 1, g.id, "after, from 1");
    let mut kept = crate::GroupSession::from_bytes(&saved).unwrap();
    let after: Vec<Vec<u8>> =
        group_envelopes(&net, 0).into_iter().chain(group_envelopes(&net, 1)).filter(|b| !before.contains(b)).collect();
    assert_eq!(after.len(), 2);
    for bytes in after {
        let Ok(Envelope { body: EnvelopeBody::Group(m) }) = Envelope::decode(&bytes) else { panic!() };
        assert!(kept.decrypt(&m, net.now).is_err(), "the leaver's old keys opened a newer message");
    }
    assert_eq!(contents(&mut net, 1, &g.id), vec!["before", "before too", "after, from 0", "after, from 1"]);
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
    assert_eq!((failed.step, failed.error), (Some(1), EngineError::EmptyContent), "the failing step is named");
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
    assert_eq!(net.nodes[1].engine.query(Query::Conversation(nowhere)), Err(EngineError::UnknownConversation(nowhere)));
    assert_eq!(net.nodes[1].engine.query(Query::Members(c.id)), Err(EngineError::NotAGroup(c.id)));
    // A cursor from another conversation is refused, not an empty page.
    let other = net.send(0, c.id, "x");
    let foreign = net.nodes[2].engine.query(Query::Messages { conversation: g.id, before: Some(other.id), limit: 5 });
    assert_eq!(foreign, Err(EngineError::UnknownMessage(other.id)));
    assert!(net.nodes[1].engine.poll_transmit().is_none() && net.nodes[1].engine.poll_event().is_none());
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
    let result = Input::TransmitResult { id: t.id, outcome: TransmitOutcome::Failed("offline".into()) };
    net.nodes[0].engine.store_mut().fail_next_commits(1);
    assert!(net.nodes[0].engine.handle(net.now, result.clone()).is_err());
    net.nodes[0].engine.handle(net.now, result).unwrap();
    net.set_online(1, true);
    assert_eq!(contents(&mut net, 1, &c.id), vec!["warm", "x"]);
}

/// Scenario: group control is resent until acknowledged, so a lost invite
/// still reaches its member.
pub fn a_lost_invite_is_resent_until_acknowledged<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 3, 34);
    let two = net.id(2);
    let mut lost = 0;
    // The network loses every ratchet message from the admin to member 2
    // for a while (the transport had taken them).
    net.lose = Box::new(move |from: usize, t: &Transmit| {
        let hit = from == 0
            && t.peer == two
            && lost < 3
            && matches!(Envelope::decode(&t.bytes).map(|e| e.body), Ok(EnvelopeBody::Ratchet(_)));
        if hit {
            lost += 1;
        }
        hit
    });
    let g = group(&mut net, 0, &[1, 2], "Lossy");
    assert!(!net.kinds(2).contains(&"chat.group.invite"), "the invite was lost");
    net.advance(31_000);
    assert!(net.kinds(2).contains(&"chat.group.invite"), "the resent invite arrived");
    net.lose = Box::new(|_, _| false);
    send_group(&mut net, 0, g.id, "made it");
    net.advance(31_000);
    assert_eq!(contents(&mut net, 2, &g.id), vec!["made it"]);
}

fn members_of<S: TestStore>(net: &mut Net<S>, i: usize, g: &ConversationId) -> Vec<crate::engine::Member> {
    let store = net.nodes[i].engine.store_mut();
    store.begin().unwrap();
    let members = store.members(g).unwrap();
    store.rollback();
    members
}

/// Scenario: a membership notice resent after the member already left (its
/// acknowledgement was lost) does not bring the member back.
pub fn a_resent_member_added_after_a_leave_changes_nothing<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 4, 35);
    let g = group(&mut net, 0, &[1, 2], "Epochs");
    send_group(&mut net, 1, g.id, "hello");
    // Member 1's acknowledgements to the admin get lost for a while.
    let admin = net.id(0);
    net.lose = Box::new(move |from: usize, t: &Transmit| {
        from == 1
            && t.peer == admin
            && matches!(Envelope::decode(&t.bytes).map(|e| e.body), Ok(EnvelopeBody::Ratchet(_)))
    });
    let newcomer = net.id(3);
    net.command(0, Command::Invite { group: g.id, peer: newcomer }).unwrap();
    net.command(3, Command::Leave { group: g.id }).unwrap();
    net.lose = Box::new(|_, _| false);
    // The admin resends MemberAdded(3) to member 1, which already saw 3 leave.
    net.advance(61_000);
    let three = members_of(&mut net, 1, &g.id).into_iter().find(|m| m.peer_id == newcomer).unwrap();
    assert!(three.left_at.is_some(), "member 3 stays gone at member 1");
    let m = send_group(&mut net, 1, g.id, "after");
    assert!(!net.message(1, &m.id).unwrap().recipients.iter().any(|(p, _)| *p == newcomer));
}

/// Scenario: a leave that arrives before the notice of the join it ends is
/// remembered, so the late notice does not add a ghost member.
pub fn a_leave_before_its_join_notice_leaves_no_ghost<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 4, 36);
    let g = group(&mut net, 0, &[1, 2], "Order");
    net.set_online(2, false);
    let newcomer = net.id(3);
    net.command(0, Command::Invite { group: g.id, peer: newcomer }).unwrap();
    net.command(3, Command::Leave { group: g.id }).unwrap();
    // Member 2 comes back: the leave from 3 may overtake the admin's notice.
    let admin = net.id(0);
    let mut held_back = 0;
    net.lose = Box::new(move |from: usize, t: &Transmit| {
        let hit = from == 0
            && t.peer != admin
            && held_back < 1
            && matches!(Envelope::decode(&t.bytes).map(|e| e.body), Ok(EnvelopeBody::Ratchet(_)));
        if hit {
            held_back += 1;
        }
        hit
    });
    net.set_online(2, true);
    net.lose = Box::new(|_, _| false);
    net.advance(61_000);
    let at_two = members_of(&mut net, 2, &g.id);
    assert!(at_two.iter().find(|m| m.peer_id == newcomer).is_none_or(|m| m.left_at.is_some()), "no ghost member");
    let m = send_group(&mut net, 2, g.id, "to the real members");
    net.advance(31_000);
    assert_eq!(net.message(2, &m.id).unwrap().status, MessageStatus::Delivered);
}

/// Scenario: two members leaving at once settle: nothing is resent between
/// them afterwards.
pub fn crossing_leaves_settle<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 4, 37);
    let g = group(&mut net, 0, &[1, 2, 3], "Exodus");
    send_group(&mut net, 1, g.id, "from 1");
    send_group(&mut net, 2, g.id, "from 2");
    net.nodes[1].engine.command(net.now, Command::Leave { group: g.id }).unwrap();
    net.nodes[2].engine.command(net.now, Command::Leave { group: g.id }).unwrap();
    net.drain();
    net.advance(2 * 60 * 1000);
    let between =
        |net: &Net<S>| net.delivered.iter().filter(|(f, t, _)| (*f == 1 && *t == 2) || (*f == 2 && *t == 1)).count();
    let settled = between(&net);
    net.advance(10 * 60 * 1000);
    assert_eq!(between(&net), settled, "the two leavers keep resending to each other");
    let left: Vec<PeerId> =
        members_of(&mut net, 0, &g.id).into_iter().filter(|m| m.left_at.is_some()).map(|m| m.peer_id).collect();
    assert!(left.contains(&net.id(1)) && left.contains(&net.id(2)));
}

// ---- crashes ---------------------------------------------------------------------

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
