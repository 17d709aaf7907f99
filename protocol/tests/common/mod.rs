//! Helpers shared by the scenario tests.
#![allow(dead_code, unreachable_pub, missing_docs)]

use p2pchat_protocol::{handshake, IdentityKeyPair, PairwiseSessions, Timestamp};
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
    let accepted = handshake::respond(&bob, &alice.peer_id(), &request, None, NOW, rng).unwrap();
    let a = PairwiseSessions::new(pending.complete(&accepted.ack).unwrap());
    let b = PairwiseSessions::new(accepted.session);
    Pair { alice, bob, a, b }
}
