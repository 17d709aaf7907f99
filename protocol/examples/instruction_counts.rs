//! Group encrypt and decrypt next to the operations they are measured
//! against, each in its own `#[inline(never)]` function, so that callgrind
//! can count the instructions of each exactly (a count does not depend on
//! how busy the machine is, unlike a timing):
//!
//! ```sh
//! cargo build --release -p p2pchat-protocol --example instruction_counts
//! for f in group_decrypt verify_strict megolm_decrypt group_encrypt sign megolm_encrypt; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null --toggle-collect="*measure_$f*" \
//!     target/release/examples/instruction_counts 2>&1 | grep Collected | sed "s/^/$f /"
//! done
//! ```
//!
//! Each function runs its operation 100 times. Valgrind does not emulate
//! SHA-NI, so SHA-256 counts as its portable code here and weighs more than
//! it does on hardware.
#![allow(clippy::unwrap_used, missing_docs)]
use ed25519_dalek::{Signer, SigningKey};
use p2pchat_protocol::{ConversationId, GroupSession, IdentityKeyPair, Timestamp};
use rand_chacha::rand_core::SeedableRng;
use std::hint::black_box;

#[inline(never)]
fn measure_group_decrypt(r: &mut GroupSession, msgs: &[p2pchat_protocol::wire::GroupMessage]) {
    for m in msgs {
        black_box(r.decrypt(m, Timestamp(0)).unwrap());
    }
}
#[inline(never)]
fn measure_group_encrypt(s: &mut GroupSession, n: usize) {
    for _ in 0..n {
        black_box(s.encrypt(&[0x42; 100]).unwrap());
    }
}
#[inline(never)]
fn measure_verify_strict(k: &ed25519_dalek::VerifyingKey, sig: &ed25519_dalek::Signature, n: usize) {
    for _ in 0..n {
        black_box(k.verify_strict(&[0x42; 100], sig).is_ok());
    }
}
#[inline(never)]
fn measure_sign(k: &SigningKey, n: usize) {
    for _ in 0..n {
        black_box(k.sign(&[0x42; 100]));
    }
}
#[inline(never)]
fn measure_megolm_decrypt(i: &mut vodozemac::megolm::InboundGroupSession, msgs: &[vodozemac::megolm::MegolmMessage]) {
    for m in msgs {
        black_box(i.decrypt(m).unwrap());
    }
}
#[inline(never)]
fn measure_megolm_encrypt(o: &mut vodozemac::megolm::GroupSession, n: usize) {
    for _ in 0..n {
        black_box(o.encrypt([0x42; 100]));
    }
}

fn main() {
    let n = 100;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let ids: Vec<_> = (0..3).map(|_| IdentityKeyPair::generate(&mut rng).peer_id()).collect();
    let gid = ConversationId::random_group(&mut rng);
    let mut s = GroupSession::new(gid, ids[0], ids.clone(), &mut rng).unwrap();
    let mut r = GroupSession::new(gid, ids[1], ids.clone(), &mut rng).unwrap();
    r.accept_distribution(&ids[0], &s.distribution(), p2pchat_protocol::Timestamp(0)).unwrap();
    let msgs: Vec<_> = (0..n).map(|_| s.encrypt(&[0x42; 100]).unwrap()).collect();
    measure_group_decrypt(&mut r, &msgs);
    measure_group_encrypt(&mut s, n);
    let k = SigningKey::from_bytes(&[7; 32]);
    let sig = k.sign(&[0x42; 100]);
    measure_verify_strict(&k.verifying_key(), &sig, n);
    measure_sign(&k, n);
    let mut o = vodozemac::megolm::GroupSession::new(vodozemac::megolm::SessionConfig::version_1());
    let mut i =
        vodozemac::megolm::InboundGroupSession::new(&o.session_key(), vodozemac::megolm::SessionConfig::version_1());
    let mm: Vec<_> = (0..n).map(|_| o.encrypt([0x42; 100])).collect();
    measure_megolm_decrypt(&mut i, &mm);
    measure_megolm_encrypt(&mut o, n);
}
