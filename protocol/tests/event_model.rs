//! Event-model tests: random interleavings of send, deliver, drop, duplicate,
//! reorder and tamper, checked against a simple reference model.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{pair, rng, NOW};
use p2pchat_protocol::wire::{Envelope, EnvelopeBody};
use p2pchat_protocol::{ConversationId, GroupSession, IdentityKeyPair, PairwiseSessions, PeerId, Timestamp};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Party 0 (Alice) or 1 (Bob) sends a fresh message.
    Send(usize),
    /// Deliver the in-flight message at this index (any order: reordering).
    Deliver(prop::sample::Index),
    /// Lose it.
    Drop(prop::sample::Index),
    /// Deliver a copy of an already-delivered message again.
    Replay(prop::sample::Index),
    /// Deliver it with one byte of its wire encoding changed.
    Tamper(prop::sample::Index, prop::sample::Index, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..2).prop_map(Op::Send),
        3 => any::<prop::sample::Index>().prop_map(Op::Deliver),
        1 => any::<prop::sample::Index>().prop_map(Op::Drop),
        1 => any::<prop::sample::Index>().prop_map(Op::Replay),
        1 => (any::<prop::sample::Index>(), any::<prop::sample::Index>(), 1u8..=255).prop_map(|(m, p, x)| Op::Tamper(m, p, x)),
    ]
}

struct InFlight {
    to: usize,
    wire: Vec<u8>,
    plaintext: Vec<u8>,
}

fn receive(sessions: &mut PairwiseSessions, wire: &[u8], now: Timestamp) -> Option<Vec<u8>> {
    let env = Envelope::decode(wire).ok()?;
    let EnvelopeBody::Ratchet(m) = env.body else { return None };
    sessions.decrypt(&m, now).ok().map(|p| p.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn pairwise_sessions_match_the_model(seed in any::<u64>(), ops in proptest::collection::vec(op(), 1..160)) {
        let mut r = rng(seed);
        let p = pair(&mut r);
        let mut parties = [p.a, p.b];
        let mut in_flight: Vec<InFlight> = Vec::new();
        let mut delivered: Vec<InFlight> = Vec::new();
        let mut counter = 0u32;
        let mut now = NOW;
        for op in ops {
            now = now.saturating_add_millis(7);
            match op {
                Op::Send(from) => {
                    counter += 1;
                    let plaintext = format!("message {counter} from {from}").into_bytes();
                    let m = parties[from].encrypt(&plaintext, &mut r).unwrap();
                    in_flight.push(InFlight { to: 1 - from, wire: Envelope::new(EnvelopeBody::Ratchet(m)).encode(), plaintext });
                }
                Op::Deliver(i) if !in_flight.is_empty() => {
                    let msg = in_flight.remove(i.index(in_flight.len()));
                    let got = receive(&mut parties[msg.to], &msg.wire, now);
                    prop_assert_eq!(got.as_deref(), Some(&msg.plaintext[..]), "untampered message must decrypt exactly");
                    delivered.push(msg);
                }
                Op::Drop(i) if !in_flight.is_empty() => {
                    in_flight.remove(i.index(in_flight.len()));
                }
                Op::Replay(i) if !delivered.is_empty() => {
                    let msg = &delivered[i.index(delivered.len())];
                    prop_assert!(receive(&mut parties[msg.to], &msg.wire, now).is_none(), "a replay must be refused");
                }
                Op::Tamper(i, pos, xor) if !in_flight.is_empty() => {
                    let msg = &in_flight[i.index(in_flight.len())];
                    let mut wire = msg.wire.clone();
                    let at = pos.index(wire.len());
                    wire[at] ^= xor;
                    let same_value = Envelope::decode(&wire).ok() == Envelope::decode(&msg.wire).ok();
                    if !same_value {
                        prop_assert!(receive(&mut parties[msg.to], &wire, now).is_none(), "a tampered message must be refused");
                    }
                }
                _ => {}
            }
        }
        // Everything still in flight arrives, in any order, exactly once.
        while let Some(msg) = in_flight.pop() {
            let got = receive(&mut parties[msg.to], &msg.wire, now);
            prop_assert_eq!(got.as_deref(), Some(&msg.plaintext[..]));
            prop_assert!(receive(&mut parties[msg.to], &msg.wire, now).is_none());
        }
        // And the session still works both ways.
        for from in 0..2 {
            let m = parties[from].encrypt(b"still alive", &mut r).unwrap();
            prop_assert_eq!(&parties[1 - from].decrypt(&m, now).unwrap()[..], b"still alive");
        }
    }
}

#[derive(Debug, Clone)]
enum GroupOp {
    Send(prop::sample::Index),
    Deliver(prop::sample::Index),
    Drop(prop::sample::Index),
    Replay(prop::sample::Index),
    Tamper(prop::sample::Index, prop::sample::Index, u8),
    Leave(prop::sample::Index),
}

fn group_op() -> impl Strategy<Value = GroupOp> {
    prop_oneof![
        3 => any::<prop::sample::Index>().prop_map(GroupOp::Send),
        4 => any::<prop::sample::Index>().prop_map(GroupOp::Deliver),
        1 => any::<prop::sample::Index>().prop_map(GroupOp::Drop),
        1 => any::<prop::sample::Index>().prop_map(GroupOp::Replay),
        1 => (any::<prop::sample::Index>(), any::<prop::sample::Index>(), 1u8..=255).prop_map(|(m, p, x)| GroupOp::Tamper(m, p, x)),
        1 => any::<prop::sample::Index>().prop_map(GroupOp::Leave),
    ]
}

#[derive(Clone)]
struct GroupDelivery {
    from: usize,
    to: usize,
    wire: Vec<u8>,
    plaintext: Vec<u8>,
}

fn receive_group(g: &mut GroupSession, wire: &[u8], now: Timestamp) -> Option<Vec<u8>> {
    let env = Envelope::decode(wire).ok()?;
    let EnvelopeBody::Group(m) = env.body else { return None };
    g.decrypt(&m, now).ok().map(|p| p.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn groups_match_the_model(
        seed in any::<u64>(),
        size in 3usize..=6,
        ops in proptest::collection::vec(group_op(), 1..120),
    ) {
        let mut r = rng(seed);
        let ids: Vec<PeerId> = (0..size).map(|_| IdentityKeyPair::generate(&mut r).peer_id()).collect();
        let gid = ConversationId::random_group(&mut r);
        let mut groups: Vec<GroupSession> = ids.iter().map(|me| GroupSession::new(gid, *me, ids.clone(), &mut r).unwrap()).collect();
        // Distribution goes over the (reliable, authenticated) pairwise channel.
        let distribute = |groups: &mut Vec<GroupSession>, from: usize, to: &[usize], d: &p2pchat_protocol::wire::SenderKeyDistribution| {
            for &j in to {
                groups[j].accept_distribution(&ids[from], d, p2pchat_protocol::Timestamp(0)).unwrap();
            }
        };
        let mut members: Vec<usize> = (0..size).collect();
        for &i in &members {
            let d = groups[i].distribution();
            let others: Vec<usize> = members.iter().copied().filter(|&j| j != i).collect();
            distribute(&mut groups, i, &others, &d);
        }
        let mut departed: Vec<usize> = Vec::new();
        let mut leaves = 0;
        let mut in_flight: Vec<GroupDelivery> = Vec::new();
        let mut delivered: Vec<GroupDelivery> = Vec::new();
        let mut counter = 0u32;
        let mut now = NOW;
        for op in ops {
            now = now.saturating_add_millis(11);
            match op {
                GroupOp::Send(i) => {
                    let from = members[i.index(members.len())];
                    counter += 1;
                    let plaintext = format!("group message {counter} from {from}").into_bytes();
                    let m = groups[from].encrypt(&plaintext).unwrap();
                    let wire = Envelope::new(EnvelopeBody::Group(m)).encode();
                    for &to in members.iter().filter(|&&j| j != from) {
                        in_flight.push(GroupDelivery { from, to, wire: wire.clone(), plaintext: plaintext.clone() });
                    }
                    // The departed must not be able to read anything sent now.
                    for &gone in &departed {
                        prop_assert!(receive_group(&mut groups[gone], &wire, now).is_none(), "a departed member read a new message");
                    }
                }
                GroupOp::Deliver(i) if !in_flight.is_empty() => {
                    let d = in_flight.remove(i.index(in_flight.len()));
                    let got = receive_group(&mut groups[d.to], &d.wire, now);
                    if members.contains(&d.from) {
                        prop_assert_eq!(got.as_deref(), Some(&d.plaintext[..]), "member message must decrypt exactly");
                        delivered.push(d);
                    } else if members.contains(&d.to) {
                        // Its sender has left: remaining members no longer accept its keys.
                        prop_assert!(got.is_none(), "a message from a departed member was accepted");
                    }
                }
                GroupOp::Drop(i) if !in_flight.is_empty() => {
                    in_flight.remove(i.index(in_flight.len()));
                }
                GroupOp::Replay(i) if !delivered.is_empty() => {
                    let d = delivered[i.index(delivered.len())].clone();
                    prop_assert!(receive_group(&mut groups[d.to], &d.wire, now).is_none(), "a replay was accepted");
                }
                GroupOp::Tamper(i, pos, xor) if !in_flight.is_empty() => {
                    let d = &in_flight[i.index(in_flight.len())];
                    let mut wire = d.wire.clone();
                    let at = pos.index(wire.len());
                    wire[at] ^= xor;
                    if Envelope::decode(&wire).ok() != Envelope::decode(&d.wire).ok() {
                        prop_assert!(receive_group(&mut groups[d.to], &wire, now).is_none(), "a tampered message was accepted");
                    }
                }
                GroupOp::Leave(i) if members.len() > 2 && leaves < 3 => {
                    let leaver = members.remove(i.index(members.len()));
                    departed.push(leaver);
                    leaves += 1;
                    for k in 0..members.len() {
                        let m = members[k];
                        let d = groups[m].remove_member(&ids[leaver], &mut r).unwrap();
                        let others: Vec<usize> = members.iter().copied().filter(|&j| j != m).collect();
                        distribute(&mut groups, m, &others, &d);
                    }
                }
                _ => {}
            }
        }
        // Whatever is left arrives at current members exactly once.
        for d in in_flight.drain(..) {
            if members.contains(&d.from) && members.contains(&d.to) {
                let got = receive_group(&mut groups[d.to], &d.wire, now);
                prop_assert_eq!(got.as_deref(), Some(&d.plaintext[..]));
                prop_assert!(receive_group(&mut groups[d.to], &d.wire, now).is_none());
            }
        }
    }
}
