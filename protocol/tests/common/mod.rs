//! Helpers shared by the scenario tests.
#![allow(dead_code, unreachable_pub, missing_docs, clippy::panic)]

use p2pchat_protocol::handshake::{self, Accepted, Response};
use p2pchat_protocol::{IdentityKeyPair, PairwiseSessions, Timestamp};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

pub const NOW: Timestamp = Timestamp::from_millis(1_735_401_234_000);

pub fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

pub struct Pair {
    pub alice: IdentityKeyPair,
    pub bob: IdentityKeyPair,
    pub a: PairwiseSessions,
    pub b: PairwiseSessions,
}

/// Alice initiates, Bob responds.
pub fn pair(rng: &mut ChaCha20Rng) -> Pair {
    let alice = IdentityKeyPair::generate(rng);
    let bob = IdentityKeyPair::generate(rng);
    let (pending, request) = handshake::initiate(&alice, bob.peer_id(), NOW, rng);
    let accepted = new(handshake::respond(&bob, &alice.peer_id(), &request, None, NOW, rng).unwrap());
    let a = PairwiseSessions::new(pending.complete(&accepted.ack).unwrap());
    let b = PairwiseSessions::new(accepted.session);
    Pair { alice, bob, a, b }
}

/// The session of a response that must be a new one.
pub fn new(response: Response) -> Accepted {
    match response {
        Response::New(accepted) => *accepted,
        Response::Repeat(_) => panic!("expected a new session, got a repeated ack"),
    }
}
