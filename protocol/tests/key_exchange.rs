//! Key exchange flows: lost and duplicated messages, crossed requests in
//! every order, and session replacement.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{rng, NOW};
use p2pchat_protocol::handshake::{self, AnsweredRequest, CrossedRequests, PendingKeyExchange, Response};
use p2pchat_protocol::wire::{KeyExchangeAck, KeyExchangeRequest, PairwisePayload};
use p2pchat_protocol::{DecryptionError, IdentityKeyPair, InstallError, PairwiseSessions, PeerId, Timestamp};
use rand_chacha::ChaCha20Rng;

/// One side's key exchange state, driven by the rules the engine follows:
/// crossed requests resolve by peer ID, a completed exchange is installed,
/// and the initiator confirms the new session with a `SessionConfirm`.
struct Node {
    identity: IdentityKeyPair,
    peer: PeerId,
    pending: Option<PendingKeyExchange>,
    answered: Option<AnsweredRequest>,
    sessions: Option<PairwiseSessions>,
}

enum Wire {
    Request(KeyExchangeRequest),
    Ack(KeyExchangeAck),
    Message(p2pchat_protocol::wire::RatchetMessage),
}

impl Node {
    fn new(identity: IdentityKeyPair, peer: PeerId) -> Self {
        Self { identity, peer, pending: None, answered: None, sessions: None }
    }

    fn initiate(&mut self, now: Timestamp, r: &mut ChaCha20Rng) -> Wire {
        let (pending, request) = handshake::initiate(&self.identity, self.peer, now, r);
        self.pending = Some(pending);
        Wire::Request(request)
    }

    fn install(&mut self, session: p2pchat_protocol::Session) {
        match &mut self.sessions {
            Some(sessions) => sessions.install(session).unwrap(),
            None => self.sessions = Some(PairwiseSessions::new(session)),
        }
    }

    fn receive(&mut self, wire: Wire, r: &mut ChaCha20Rng) -> Vec<Wire> {
        match wire {
            Wire::Request(request) => {
                if self.pending.is_some() {
                    match CrossedRequests::resolve(&self.identity.peer_id(), &self.peer) {
                        CrossedRequests::KeepOurs => return vec![],
                        CrossedRequests::AnswerTheirs => self.pending = None,
                    }
                }
                match handshake::respond(&self.identity, &self.peer, &request, self.answered.as_ref(), NOW, r).unwrap()
                {
                    Response::New(accepted) => {
                        self.answered = Some(accepted.answered);
                        self.install(accepted.session);
                        vec![Wire::Ack(accepted.ack)]
                    }
                    Response::Repeat(ack) => vec![Wire::Ack(ack)],
                }
            }
            Wire::Ack(ack) => {
                let Some(pending) = self.pending.take() else { return vec![] };
                match pending.complete(&ack) {
                    Ok(session) => {
                        self.install(session);
                        let confirm = PairwisePayload::SessionConfirm.encode();
                        vec![Wire::Message(self.sessions.as_mut().unwrap().encrypt(&confirm, r).unwrap())]
                    }
                    Err(refused) => {
                        self.pending = Some(refused.pending);
                        vec![]
                    }
                }
            }
            Wire::Message(m) => {
                self.sessions.as_mut().unwrap().decrypt(&m, NOW).unwrap();
                vec![]
            }
        }
    }

    fn sessions(&mut self) -> &mut PairwiseSessions {
        self.sessions.as_mut().unwrap()
    }
}

/// Both directions work on one shared session.
fn assert_talk(a: &mut Node, b: &mut Node, r: &mut ChaCha20Rng) {
    let m = a.sessions().encrypt(b"a to b", r).unwrap();
    assert_eq!(&b.sessions().decrypt(&m, NOW).unwrap()[..], b"a to b");
    let m = b.sessions().encrypt(b"b to a", r).unwrap();
    assert_eq!(&a.sessions().decrypt(&m, NOW).unwrap()[..], b"b to a");
    assert_eq!(a.sessions().current().id(), b.sessions().current().id());
}

fn nodes(seed: u64) -> (Node, Node, ChaCha20Rng) {
    let mut r = rng(seed);
    let x = IdentityKeyPair::generate(&mut r);
    let y = IdentityKeyPair::generate(&mut r);
    let (x_id, y_id) = (x.peer_id(), y.peer_id());
    (Node::new(x, y_id), Node::new(y, x_id), r)
}

/// Delivers every queued message in `order` (indices into the queue as it
/// stands, so any interleaving can be expressed), then drains the rest.
fn run(a: &mut Node, b: &mut Node, queue: Vec<(bool, Wire)>, order: &[usize], r: &mut ChaCha20Rng) {
    let mut queue = queue;
    for &i in order {
        if queue.is_empty() {
            break;
        }
        let (to_b, wire) = queue.remove(i.min(queue.len() - 1));
        let out = if to_b { b.receive(wire, r) } else { a.receive(wire, r) };
        queue.extend(out.into_iter().map(|w| (!to_b, w)));
    }
    while !queue.is_empty() {
        let (to_b, wire) = queue.remove(0);
        let out = if to_b { b.receive(wire, r) } else { a.receive(wire, r) };
        queue.extend(out.into_iter().map(|w| (!to_b, w)));
    }
}

#[test]
fn crossed_requests_settle_on_one_session_in_every_delivery_order() {
    // Both send a request at once; the deliveries of the two requests, the
    // ack and the confirmation interleave in every order the queue allows.
    for order in [[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 1, 1], [0, 1, 1, 1]] {
        let (mut a, mut b, mut r) = nodes(order.iter().sum::<usize>() as u64 + 100);
        let qa = a.initiate(NOW, &mut r);
        let qb = b.initiate(NOW, &mut r);
        run(&mut a, &mut b, vec![(true, qa), (false, qb)], &order, &mut r);
        assert!(a.pending.is_none() && b.pending.is_none(), "order {order:?}: an exchange is left pending");
        assert_talk(&mut a, &mut b, &mut r);
    }
}

#[test]
fn a_late_crossed_request_after_completion_does_not_split_the_sessions() {
    let (mut a, mut b, mut r) = nodes(7);
    // Make `a` the lower peer ID, whose request wins.
    if a.identity.peer_id() > b.identity.peer_id() {
        std::mem::swap(&mut a, &mut b);
    }
    let qa = a.initiate(NOW, &mut r);
    let qb = b.initiate(NOW, &mut r);
    // b answers a's request (dropping its own); a completes; only then does
    // b's request reach a, which answers it as a new exchange.
    let ack = b.receive(qa, &mut r);
    for w in ack {
        for confirm in a.receive(w, &mut r) {
            b.receive(confirm, &mut r);
        }
    }
    let late_ack = a.receive(qb, &mut r);
    assert!(a.sessions().pending().is_some(), "the late exchange waits as pending");
    for w in late_ack {
        assert!(b.receive(w, &mut r).is_empty(), "b has no pending request to complete");
    }
    assert_talk(&mut a, &mut b, &mut r);
}

#[test]
fn a_lost_ack_is_recovered_by_retransmitting_the_request() {
    let (mut a, mut b, mut r) = nodes(8);
    let Wire::Request(request) = a.initiate(NOW, &mut r) else { unreachable!() };
    let lost = b.receive(Wire::Request(request.clone()), &mut r);
    assert_eq!(lost.len(), 1);
    // The ack is lost; b already encrypts under its new, unconfirmed session.
    let early = b.sessions().encrypt(b"sent before a completed", &mut r).unwrap();
    assert!(!b.sessions().is_confirmed());
    let again = b.receive(Wire::Request(request), &mut r);
    run(&mut a, &mut b, again.into_iter().map(|w| (false, w)).collect(), &[], &mut r);
    assert_eq!(&a.sessions().decrypt(&early, NOW).unwrap()[..], b"sent before a completed");
    assert!(b.sessions().is_confirmed(), "the initiator's confirmation confirms the session");
    assert_talk(&mut a, &mut b, &mut r);
}

#[test]
fn a_duplicated_ack_cannot_complete_twice_or_reinstall() {
    let (mut a, mut b, mut r) = nodes(9);
    let q = a.initiate(NOW, &mut r);
    let mut acks = b.receive(q, &mut r);
    let Some(Wire::Ack(ack)) = acks.pop() else { panic!("expected an ack") };
    a.receive(Wire::Ack(ack.clone()), &mut r);
    let m = b.sessions().encrypt(b"once", &mut r).unwrap();
    assert_eq!(&a.sessions().decrypt(&m, NOW).unwrap()[..], b"once");
    // The duplicate finds nothing pending at a.
    assert!(a.receive(Wire::Ack(ack), &mut r).is_empty());
    assert_eq!(a.sessions().decrypt(&m, NOW), Err(DecryptionError::Duplicate { message_number: 0 }));
}

#[test]
fn a_session_with_another_peer_cannot_join_the_set() {
    let mut r = rng(10);
    let alice = IdentityKeyPair::generate(&mut r);
    let bob = IdentityKeyPair::generate(&mut r);
    let carol = IdentityKeyPair::generate(&mut r);
    let session_with = |peer: &IdentityKeyPair, r: &mut ChaCha20Rng| {
        let (pending, request) = handshake::initiate(&alice, peer.peer_id(), NOW, r);
        let accepted = common::new(handshake::respond(peer, &alice.peer_id(), &request, None, NOW, r).unwrap());
        pending.complete(&accepted.ack).unwrap()
    };
    let mut with_bob = PairwiseSessions::new(session_with(&bob, &mut r));
    assert_eq!(
        with_bob.install(session_with(&carol, &mut r)).unwrap_err(),
        InstallError::WrongPeer { expected: bob.peer_id(), got: carol.peer_id() }
    );
    with_bob.install(session_with(&bob, &mut r)).unwrap();
    assert!(with_bob.previous().is_some());
}

#[test]
fn replaced_session_decrypts_in_flight_messages_until_the_new_one_is_used() {
    let (mut a, mut b, mut r) = nodes(30);
    let q = a.initiate(NOW, &mut r);
    run(&mut a, &mut b, vec![(true, q)], &[], &mut r);
    let in_flight = a.sessions().encrypt(b"old session", &mut r).unwrap();
    let q = a.initiate(Timestamp(NOW.0 + 1), &mut r);
    // Deliver the request and ack, but hold the confirmation back.
    let ack = b.receive(q, &mut r);
    let mut confirm = Vec::new();
    for w in ack {
        confirm.extend(a.receive(w, &mut r));
    }
    assert!(b.sessions().pending().is_some(), "b keeps sending on the confirmed session until a confirms the new one");
    assert_eq!(&b.sessions().decrypt(&in_flight, NOW).unwrap()[..], b"old session");
    for w in confirm {
        b.receive(w, &mut r);
    }
    assert!(b.sessions().pending().is_none(), "the confirmation made the new session current");
    assert!(b.sessions().previous().is_none(), "and retired the old one");
    let fresh = a.sessions().encrypt(b"new session", &mut r).unwrap();
    assert_eq!(&b.sessions().decrypt(&fresh, NOW).unwrap()[..], b"new session");
    assert_eq!(b.sessions().decrypt(&in_flight, NOW), Err(DecryptionError::UnknownSession));
}

#[test]
fn a_mark_taken_while_the_responders_clock_was_far_ahead_does_not_refuse_new_requests() {
    let mut r = rng(31);
    let alice = IdentityKeyPair::generate(&mut r);
    let bob = IdentityKeyPair::generate(&mut r);
    let day_ahead = Timestamp(NOW.0 + 24 * 60 * 60 * 1000);
    // Both clocks were a day ahead: bob accepted alice's request then.
    let (_, request) = handshake::initiate(&alice, bob.peer_id(), day_ahead, &mut r);
    let accepted = common::new(handshake::respond(&bob, &alice.peer_id(), &request, None, day_ahead, &mut r).unwrap());
    // With both clocks right again, alice's new request is fresh, not a replay.
    let (_, fresh) = handshake::initiate(&alice, bob.peer_id(), NOW, &mut r);
    let answer = handshake::respond(&bob, &alice.peer_id(), &fresh, Some(&accepted.answered), NOW, &mut r);
    assert!(matches!(answer, Ok(Response::New(_))), "{:?}", answer.err());
    // The old request itself is still refused: its time is a day off.
    let replay = handshake::respond(&bob, &alice.peer_id(), &request, Some(&accepted.answered), NOW, &mut r);
    assert!(matches!(replay, Err(handshake::KeyExchangeError::Stale { .. })), "{:?}", replay.err());
}
