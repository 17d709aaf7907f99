//! p2pchat's primitives against vodozemac (Olm for 1:1, Megolm for groups),
//! measured in the same run, with the ratio printed for each pair.
//!
//! `cargo bench -p p2pchat-protocol --bench crypto`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
#![allow(clippy::disallowed_methods, reason = "a benchmark measures wall-clock time")]

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use criterion::{black_box, BatchSize, Criterion};
use ed25519_dalek::{Signer, SigningKey};
use p2pchat_protocol::{handshake, ConversationId, GroupSession, IdentityKeyPair, PairwiseSessions, Timestamp};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;
use vodozemac::olm::{Account, OlmMessage, Session as OlmSession, SessionConfig};

const NOW: Timestamp = Timestamp::from_millis(1_735_401_234_000);
const MSG: [u8; 100] = [0x42; 100];

fn p2p_pair(rng: &mut ChaCha20Rng) -> (PairwiseSessions, PairwiseSessions) {
    let alice = IdentityKeyPair::generate(rng);
    let bob = IdentityKeyPair::generate(rng);
    let (pending, request) = handshake::initiate(&alice, bob.peer_id(), NOW, rng);
    let handshake::Response::New(accepted) =
        handshake::respond(&bob, &alice.peer_id(), &request, None, NOW, rng).unwrap()
    else {
        panic!("a first request is new")
    };
    let mut a = PairwiseSessions::new(pending.complete(&accepted.ack).unwrap());
    let mut b = PairwiseSessions::new(accepted.session);
    // One round trip so both sides sit on established chains.
    let m = a.encrypt(b"warm", rng).unwrap();
    b.decrypt(&m, NOW).unwrap();
    let m = b.encrypt(b"warm", rng).unwrap();
    a.decrypt(&m, NOW).unwrap();
    let m = a.encrypt(b"warm", rng).unwrap();
    b.decrypt(&m, NOW).unwrap();
    (a, b)
}

fn olm_pair() -> (OlmSession, OlmSession) {
    let alice = Account::new();
    let mut bob = Account::new();
    bob.generate_one_time_keys(1);
    let otk = *bob.one_time_keys().values().next().unwrap();
    let mut a = alice.create_outbound_session(SessionConfig::version_1(), bob.curve25519_key(), otk);
    let OlmMessage::PreKey(pre) = a.encrypt("warm") else { panic!("first Olm message is a pre-key message") };
    let mut b = bob.create_inbound_session(alice.curve25519_key(), &pre).unwrap().session;
    let m = b.encrypt("warm");
    a.decrypt(&m).unwrap();
    let m = a.encrypt("warm");
    b.decrypt(&m).unwrap();
    (a, b)
}

fn bench_pairwise(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let mut g = c.benchmark_group("encrypt_existing_chain");
    let (mut a, _) = p2p_pair(&mut rng);
    g.bench_function("p2pchat", |bench| bench.iter(|| black_box(a.encrypt(black_box(&MSG), &mut rng).unwrap())));
    let (mut oa, _) = olm_pair();
    g.bench_function("vodozemac", |bench| bench.iter(|| black_box(oa.encrypt(black_box(MSG)))));
    g.finish();

    let mut g = c.benchmark_group("decrypt_existing_chain");
    let (mut a, mut b) = p2p_pair(&mut rng);
    g.bench_function("p2pchat", |bench| {
        bench.iter_batched(
            || a.encrypt(&MSG, &mut rng).unwrap(),
            |m| black_box(b.decrypt(&m, NOW).unwrap()),
            BatchSize::SmallInput,
        )
    });
    let (mut oa, mut ob) = olm_pair();
    g.bench_function("vodozemac", |bench| {
        bench.iter_batched(|| oa.encrypt(MSG), |m| black_box(ob.decrypt(&m).unwrap()), BatchSize::SmallInput)
    });
    g.finish();

    // The first message after receiving from the peer starts a new chain:
    // a fresh ratchet key pair and one DH.
    let mut g = c.benchmark_group("encrypt_new_chain");
    let (mut a, mut b) = p2p_pair(&mut rng);
    g.bench_function("p2pchat", |bench| {
        bench.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let m = b.encrypt(&MSG, &mut rng).unwrap();
                a.decrypt(&m, NOW).unwrap();
                let start = Instant::now();
                let reply = black_box(a.encrypt(&MSG, &mut rng).unwrap());
                total += start.elapsed();
                // Delivered, so the next round starts a new chain again.
                b.decrypt(&reply, NOW).unwrap();
            }
            total
        })
    });
    let (mut oa, mut ob) = olm_pair();
    g.bench_function("vodozemac", |bench| {
        bench.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let m = ob.encrypt(MSG);
                oa.decrypt(&m).unwrap();
                let start = Instant::now();
                let reply = black_box(oa.encrypt(MSG));
                total += start.elapsed();
                ob.decrypt(&reply).unwrap();
            }
            total
        })
    });
    // What a new chain must cost at least: one key pair and one DH.
    let peer = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::random_from_rng(&mut rng));
    g.bench_function("x25519_keypair_plus_dh", |bench| {
        bench.iter(|| {
            let secret = x25519_dalek::StaticSecret::random_from_rng(&mut rng);
            let public = x25519_dalek::PublicKey::from(&secret);
            black_box((public, secret.diffie_hellman(&peer)))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("ping_pong");
    let (mut a, mut b) = p2p_pair(&mut rng);
    g.bench_function("p2pchat", |bench| {
        bench.iter(|| {
            let m = a.encrypt(&MSG, &mut rng).unwrap();
            b.decrypt(&m, NOW).unwrap();
            let m = b.encrypt(&MSG, &mut rng).unwrap();
            black_box(a.decrypt(&m, NOW).unwrap())
        })
    });
    let (mut oa, mut ob) = olm_pair();
    g.bench_function("vodozemac", |bench| {
        bench.iter(|| {
            let m = oa.encrypt(MSG);
            ob.decrypt(&m).unwrap();
            let m = ob.encrypt(MSG);
            black_box(oa.decrypt(&m).unwrap())
        })
    });
    g.finish();

    for skip in [100usize, 1000] {
        let mut g = c.benchmark_group(format!("decrypt_after_skipping_{skip}"));
        // Sessions cannot be cloned (a copy could reuse keys), so each
        // iteration gets a fresh pair; setting it up is not timed.
        g.bench_function("p2pchat", |bench| {
            bench.iter_batched(
                || {
                    let (mut a, b) = p2p_pair(&mut rng);
                    let last = (0..=skip).map(|_| a.encrypt(&MSG, &mut rng).unwrap()).last().unwrap();
                    (b, last)
                },
                |(mut b, last)| black_box(b.decrypt(&last, NOW).unwrap()),
                BatchSize::SmallInput,
            )
        });
        let (mut oa, ob) = olm_pair();
        let mut last = None;
        for _ in 0..=skip {
            last = Some(oa.encrypt(MSG));
        }
        let last = last.unwrap();
        let pickle = ob.pickle().encrypt(&[0; 32]);
        g.bench_function("vodozemac", |bench| {
            bench.iter_batched(
                || OlmSession::from_pickle(vodozemac::olm::SessionPickle::from_encrypted(&pickle, &[0; 32]).unwrap()),
                |mut b| black_box(b.decrypt(&last).unwrap()),
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

fn p2p_group(rng: &mut ChaCha20Rng) -> (GroupSession, GroupSession) {
    let ids: Vec<_> = (0..3).map(|_| IdentityKeyPair::generate(rng).peer_id()).collect();
    let gid = ConversationId::random_group(rng);
    let sender = GroupSession::new(gid, ids[0], ids.clone(), rng).unwrap();
    let mut receiver = GroupSession::new(gid, ids[1], ids.clone(), rng).unwrap();
    receiver.accept_distribution(&ids[0], &sender.distribution(), p2pchat_protocol::Timestamp(0)).unwrap();
    (sender, receiver)
}

fn bench_group(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let mut g = c.benchmark_group("group_encrypt");
    let (mut s, _) = p2p_group(&mut rng);
    g.bench_function("p2pchat", |bench| bench.iter(|| black_box(s.encrypt(black_box(&MSG)).unwrap())));
    let mut out = vodozemac::megolm::GroupSession::new(vodozemac::megolm::SessionConfig::version_1());
    g.bench_function("vodozemac", |bench| bench.iter(|| black_box(out.encrypt(black_box(MSG)))));
    let signing = SigningKey::from_bytes(&[7; 32]);
    g.bench_function("ed25519_sign", |bench| bench.iter(|| black_box(signing.sign(black_box(&MSG)))));
    g.finish();

    let mut g = c.benchmark_group("group_decrypt");
    let (mut s, mut r) = p2p_group(&mut rng);
    g.bench_function("p2pchat", |bench| {
        bench.iter_batched(
            || s.encrypt(&MSG).unwrap(),
            |m| black_box(r.decrypt(&m, NOW).unwrap()),
            BatchSize::SmallInput,
        )
    });
    let mut out = vodozemac::megolm::GroupSession::new(vodozemac::megolm::SessionConfig::version_1());
    let mut inbound =
        vodozemac::megolm::InboundGroupSession::new(&out.session_key(), vodozemac::megolm::SessionConfig::version_1());
    g.bench_function("vodozemac", |bench| {
        bench.iter_batched(|| out.encrypt(MSG), |m| black_box(inbound.decrypt(&m).unwrap()), BatchSize::SmallInput)
    });
    let verifying = signing.verifying_key();
    let signature = signing.sign(&MSG);
    g.bench_function("ed25519_verify_strict", |bench| {
        bench.iter(|| verifying.verify_strict(black_box(&MSG), &signature).is_ok())
    });
    g.finish();
}

fn criterion_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/criterion")
}

/// The median of a benchmark measured in this run (older results on disk
/// are ignored, so a filtered run prints only what it measured).
fn median_ns(group: &str, function: &str, since: SystemTime) -> Option<f64> {
    let path = criterion_dir().join(group).join(function).join("new/estimates.json");
    if std::fs::metadata(&path).ok()?.modified().ok()? < since {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["median"]["point_estimate"].as_f64()
}

fn print_ratios(since: SystemTime) {
    println!(
        "\n{:<30} {:>12} {:>12} {:>8}   (ratio below 1: p2pchat is faster)",
        "operation", "p2pchat", "reference", "ratio"
    );
    let rows = [
        ("encrypt_existing_chain", "vodozemac"),
        ("decrypt_existing_chain", "vodozemac"),
        ("encrypt_new_chain", "vodozemac"),
        ("encrypt_new_chain", "x25519_keypair_plus_dh"),
        ("ping_pong", "vodozemac"),
        ("decrypt_after_skipping_100", "vodozemac"),
        ("decrypt_after_skipping_1000", "vodozemac"),
        ("group_encrypt", "vodozemac"),
        ("group_encrypt", "ed25519_sign"),
        ("group_decrypt", "vodozemac"),
        ("group_decrypt", "ed25519_verify_strict"),
    ];
    for (group, reference) in rows {
        match (median_ns(group, "p2pchat", since), median_ns(group, reference, since)) {
            (Some(ours), Some(theirs)) => println!(
                "{:<30} {:>10.2}µs {:>10.2}µs {:>7.2}x   p2pchat / {reference}",
                group,
                ours / 1000.0,
                theirs / 1000.0,
                ours / theirs
            ),
            _ => println!("{group:<32} (not measured in this run)"),
        }
    }
}

fn main() {
    let started = SystemTime::now();
    let mut c = Criterion::default()
        .output_directory(&criterion_dir())
        .warm_up_time(Duration::from_millis(800))
        .measurement_time(Duration::from_secs(2))
        .sample_size(40)
        .configure_from_args();
    bench_pairwise(&mut c);
    bench_group(&mut c);
    c.final_summary();
    print_ratios(started);
}
