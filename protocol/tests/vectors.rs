//! Known-answer vectors: a deterministic generator that runs the real
//! sessions from fixed seeds, recomputes every step from the `kdf` functions
//! and raw primitives alongside them (asserting the two agree), and writes
//! JSON. The test regenerates the files and compares them byte for byte;
//! `P2PCHAT_WRITE_VECTORS=1 cargo test -p p2pchat-protocol --test vectors`
//! rewrites them. `check_vectors.py` beside the files checks them
//! independently, from `docs/PROTOCOL.md` alone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use crypto_secretbox::aead::{Aead, KeyInit};
use crypto_secretbox::XSalsa20Poly1305;
use p2pchat_protocol::handshake;
use p2pchat_protocol::keys::{ChainKey, IdentitySeed, MessageKey, RootKey, SenderChainKey, X25519Secret};
use p2pchat_protocol::sender_key::group_message_transcript;
use p2pchat_protocol::wire::{
    ChatContent, Envelope, EnvelopeBody, GroupMessage, PairwisePayload, RatchetMessage, SenderKeyDistribution,
};
use p2pchat_protocol::{
    kdf, ConversationId, GroupError, GroupSession, IdentityKeyPair, MessageId, PairwiseSessions, PeerId, Timestamp,
    MAX_SKIP,
};
use rand_chacha::rand_core::{CryptoRng, RngCore, SeedableRng};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// An RNG that remembers what it handed out, so the generator can name the
/// ephemeral and ratchet secrets a session drew.
struct TapRng {
    inner: rand_chacha::ChaCha20Rng,
    last32: Option<[u8; 32]>,
}

impl RngCore for TapRng {
    fn next_u32(&mut self) -> u32 {
        self.inner.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.inner.fill_bytes(dest);
        if dest.len() == 32 {
            self.last32 = Some(dest.try_into().unwrap());
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_chacha::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
impl CryptoRng for TapRng {}

fn h(bytes: impl AsRef<[u8]>) -> Value {
    Value::String(hex::encode(bytes))
}

fn public_of(secret: &[u8; 32]) -> [u8; 32] {
    handshake::x25519_public_of(&X25519Secret::from_bytes(*secret))
}

fn x25519(secret: &[u8; 32], public: &[u8; 32]) -> [u8; 32] {
    x25519_dalek::StaticSecret::from(*secret).diffie_hellman(&x25519_dalek::PublicKey::from(*public)).to_bytes()
}

fn secretbox(key: &[u8; 32], nonce: &[u8; 24], plaintext: &[u8]) -> Vec<u8> {
    XSalsa20Poly1305::new(key.into()).encrypt(nonce.into(), plaintext).unwrap()
}

const T0: Timestamp = Timestamp::from_millis(1_735_401_234_000);

fn kdf_vectors() -> Value {
    let seq = |start: u8| -> [u8; 32] { core::array::from_fn(|i| start.wrapping_add(i as u8)) };
    let ck = ChainKey::from_bytes(seq(0));
    let (mk, next) = kdf::ratchet_chain_step(&ck);
    let rk = RootKey::from_bytes(seq(0x20));
    let dh = seq(0x40);
    let (rk2, ck2) = kdf::ratchet_root_step(&rk, &dh);
    let th = seq(0x60);
    let (kx_rk, kx_ck) = kdf::kx_root_step(&th, &dh);
    let keys = kdf::expand_ratchet_message_key(&MessageKey::from_bytes(seq(0x80)));
    let binding = seq(0xA0);
    let header = [0xC0u8; 56];
    let tag = kdf::ratchet_header_tag(&keys.header_key, &binding, &header);
    let sck = SenderChainKey::from_bytes(seq(0xE0));
    let (smk, snext) = kdf::sender_chain_step(&sck);
    let skeys = kdf::expand_sender_message_key(&smk);
    let identity = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(seq(0x10)));
    let other = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(seq(0x30)));
    let sb_plain = b"secretbox known answer";
    json!({
        "ratchet_chain_step": { "chain_key": h(ck.as_bytes()), "message_key": h(mk.as_bytes()), "next_chain_key": h(next.as_bytes()) },
        "ratchet_root_step": { "root_key": h(rk.as_bytes()), "dh": h(dh), "next_root_key": h(rk2.as_bytes()), "chain_key": h(ck2.as_bytes()) },
        "kx_root_step": { "transcript_hash": h(th), "dh": h(dh), "root_key": h(kx_rk.as_bytes()), "chain_key": h(kx_ck.as_bytes()) },
        "ratchet_message_keys": { "message_key": h(seq(0x80)), "cipher_key": h(keys.cipher_key.as_bytes()), "nonce": h(keys.nonce), "header_key": h(keys.header_key.as_bytes()) },
        "ratchet_header_tag": { "header_key": h(keys.header_key.as_bytes()), "binding": h(binding), "header": h(header), "tag": h(tag) },
        "sender_chain_step": { "chain_key": h(sck.as_bytes()), "message_key": h(smk.as_bytes()), "next_chain_key": h(snext.as_bytes()) },
        "sender_message_keys": { "message_key": h(smk.as_bytes()), "cipher_key": h(skeys.cipher_key.as_bytes()), "nonce": h(skeys.nonce) },
        "peer_id": { "identity_public": h(identity.public().to_bytes()), "peer_id": identity.peer_id().to_string() },
        "conversation_id": {
            "peer_a": identity.peer_id().to_string(),
            "peer_b": other.peer_id().to_string(),
            "conversation_id": ConversationId::for_peers(&identity.peer_id(), &other.peer_id()).to_string(),
        },
        "secretbox": { "key": h(keys.cipher_key.as_bytes()), "nonce": h(keys.nonce), "plaintext": h(sb_plain), "ciphertext": h(secretbox(keys.cipher_key.as_bytes(), &keys.nonce, sb_plain)) },
    })
}

/// A mirror of one direction's chain, kept from the KDF functions alone.
struct Mirror {
    root: RootKey,
    chain: ChainKey,
    n: u32,
}

struct Party {
    name: &'static str,
    identity: IdentityKeyPair,
    sessions: PairwiseSessions,
    ratchet_secret: [u8; 32],
}

/// Encrypts through the real session and checks every derived value against
/// the mirror; returns the vector entry.
fn ratchet_message(
    from: &mut Party,
    to_name: &str,
    to_ratchet_public: [u8; 32],
    mirror: &mut Mirror,
    payload: &PairwisePayload,
    rng: &mut TapRng,
) -> (Value, RatchetMessage) {
    let before = from.sessions.current().our_ratchet_public_key();
    let plaintext = payload.encode();
    rng.last32 = None;
    let m = from.sessions.encrypt(&plaintext, rng).unwrap();
    let mut dh_step = Value::Null;
    if m.header.ratchet_key != before || rng.last32.is_some() {
        let secret = rng.last32.expect("a DH step draws a new ratchet secret");
        assert_eq!(public_of(&secret), m.header.ratchet_key);
        let dh = x25519(&secret, &to_ratchet_public);
        let (root, chain) = kdf::ratchet_root_step(&mirror.root, &dh);
        dh_step = json!({
            "sender_ratchet_secret": h(secret),
            "sender_ratchet_public": h(m.header.ratchet_key),
            "receiver_ratchet_public": h(to_ratchet_public),
            "dh": h(dh),
            "root_key_before": h(mirror.root.as_bytes()),
            "root_key_after": h(root.as_bytes()),
            "chain_key": h(chain.as_bytes()),
        });
        from.ratchet_secret = secret;
        *mirror = Mirror { root, chain, n: 0 };
    }
    assert_eq!(m.header.message_number, mirror.n);
    let (mk, next) = kdf::ratchet_chain_step(&mirror.chain);
    let keys = kdf::expand_ratchet_message_key(&mk);
    let binding = *from.sessions.current().binding();
    let header_bytes = m.header.to_bytes();
    assert_eq!(kdf::ratchet_header_tag(&keys.header_key, &binding, &header_bytes), m.header_tag);
    assert_eq!(secretbox(keys.cipher_key.as_bytes(), &keys.nonce, &plaintext), m.ciphertext);
    let entry = json!({
        "sender": from.name,
        "receiver": to_name,
        "dh_step": dh_step,
        "chain_key": h(mirror.chain.as_bytes()),
        "message_key": h(mk.as_bytes()),
        "next_chain_key": h(next.as_bytes()),
        "cipher_key": h(keys.cipher_key.as_bytes()),
        "nonce": h(keys.nonce),
        "header_key": h(keys.header_key.as_bytes()),
        "header": {
            "session_id": h(m.header.session_id),
            "ratchet_key": h(m.header.ratchet_key),
            "previous_chain_length": m.header.previous_chain_length,
            "message_number": m.header.message_number,
        },
        "header_bytes": h(header_bytes),
        "binding": h(binding),
        "header_tag": h(m.header_tag),
        "plaintext": h(&plaintext[..]),
        "ciphertext": h(&m.ciphertext),
        "envelope": h(Envelope::new(EnvelopeBody::Ratchet(m.clone())).encode()),
    });
    mirror.chain = next;
    mirror.n += 1;
    (entry, m)
}

fn chat(rng: &mut TapRng, at: u64, text: &str) -> PairwisePayload {
    PairwisePayload::Chat(ChatContent {
        message_id: MessageId::random(rng),
        sent_at: Timestamp(T0.0 + at),
        content: text.to_owned(),
    })
}

fn generate() -> Vec<(&'static str, Value)> {
    let mut rng = TapRng { inner: rand_chacha::ChaCha20Rng::seed_from_u64(0x7032_7063_6861_7400), last32: None };
    let alice_id = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(
        Sha256::digest(b"p2pchat test vector identity: alice").into(),
    ));
    let bob_id = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(
        Sha256::digest(b"p2pchat test vector identity: bob").into(),
    ));
    let carol_id = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(
        Sha256::digest(b"p2pchat test vector identity: carol").into(),
    ));

    // ---- key exchange
    let (pending, request) = handshake::initiate(&alice_id, bob_id.peer_id(), T0, &mut rng);
    let alice_eph = *pending.ephemeral_secret().as_bytes();
    rng.last32 = None;
    let handshake::Response::New(accepted) =
        handshake::respond(&bob_id, &alice_id.peer_id(), &request, None, T0.saturating_add_millis(40), &mut rng)
            .unwrap()
    else {
        panic!("a first request is new")
    };
    let bob_eph = rng.last32.unwrap();
    assert_eq!(public_of(&bob_eph), accepted.ack.ephemeral);
    let pending_bytes = pending.to_bytes();
    let alice_session = pending.complete(&accepted.ack).unwrap();
    let req_t = handshake::request_transcript(&alice_id.peer_id(), &request);
    let ack_t = handshake::ack_transcript(&alice_id.peer_id(), &bob_id.peer_id(), &request, &accepted.ack.ephemeral);
    let th = handshake::transcript_hash(&ack_t);
    let dh0 = x25519(&alice_eph, &accepted.ack.ephemeral);
    assert_eq!(dh0, x25519(&bob_eph, &request.ephemeral));
    let (rk1, ck_b) = kdf::kx_root_step(&th, &dh0);
    let conversation_id = ConversationId::for_peers(&alice_id.peer_id(), &bob_id.peer_id());
    let binding: [u8; 32] = Sha256::new()
        .chain_update(kdf::labels::RATCHET_AD)
        .chain_update(alice_id.public().to_bytes())
        .chain_update(bob_id.public().to_bytes())
        .chain_update(conversation_id.as_bytes())
        .chain_update(&th[..16])
        .finalize()
        .into();
    assert_eq!(&binding, alice_session.binding());
    assert_eq!(alice_session.id().0, th[..16]);
    let key_exchange = json!({
        "alice": { "seed": h(alice_id.seed().as_bytes()), "identity_public": h(alice_id.public().to_bytes()), "peer_id": alice_id.peer_id().to_string() },
        "bob": { "seed": h(bob_id.seed().as_bytes()), "identity_public": h(bob_id.public().to_bytes()), "peer_id": bob_id.peer_id().to_string() },
        "request": {
            "ephemeral_secret": h(alice_eph),
            "ephemeral_public": h(request.ephemeral),
            "timestamp_ms": request.timestamp.as_millis(),
            "nonce": h(request.nonce),
            "transcript": h(&req_t),
            "signature": h(request.signature.0),
            "envelope": h(Envelope::new(EnvelopeBody::KeyExchangeRequest(request.clone())).encode()),
        },
        "ack": {
            "ephemeral_secret": h(bob_eph),
            "ephemeral_public": h(accepted.ack.ephemeral),
            "transcript": h(&ack_t),
            "signature": h(accepted.ack.signature.0),
            "envelope": h(Envelope::new(EnvelopeBody::KeyExchangeAck(accepted.ack.clone())).encode()),
        },
        "dh": h(dh0),
        "transcript_hash": h(th),
        "root_key": h(rk1.as_bytes()),
        "responder_chain_key": h(ck_b.as_bytes()),
        "session_id": h(&th[..16]),
        "conversation_id": conversation_id.to_string(),
        "binding": h(binding),
        "refusals": kx_refusals(&alice_id, &bob_id, &carol_id, &request, &accepted.ack, &pending_bytes),
    });

    // ---- ratchet: Bob sends first on the key exchange chain; Alice answers
    // with a DH step and three messages delivered out of order; Bob answers
    // with a DH step of his own.
    let mut alice = Party {
        name: "alice",
        identity: alice_id,
        sessions: PairwiseSessions::new(alice_session),
        ratchet_secret: alice_eph,
    };
    let mut bob = Party {
        name: "bob",
        identity: bob_id,
        sessions: PairwiseSessions::new(accepted.session),
        ratchet_secret: bob_eph,
    };
    let mut bob_mirror = Mirror { root: rk1.clone(), chain: ck_b, n: 0 };
    // Alice's mirror starts at the same root; her first send is a DH step.
    let mut alice_mirror = Mirror { root: rk1, chain: ChainKey::from_bytes([0; 32]), n: 0 };
    let mut messages = Vec::new();
    let mut wire = Vec::new();
    let p = chat(&mut rng, 100, "hello alice, the key exchange just finished");
    let (e, m) = ratchet_message(&mut bob, "alice", request.ephemeral, &mut bob_mirror, &p, &mut rng);
    messages.push(e);
    wire.push((0usize, m));
    for (i, text) in ["first from alice", "second from alice", "third from alice"].iter().enumerate() {
        let p = chat(&mut rng, 200 + i as u64, text);
        let theirs = public_of(&bob.ratchet_secret);
        let (e, m) = ratchet_message(&mut alice, "bob", theirs, &mut alice_mirror, &p, &mut rng);
        messages.push(e);
        wire.push((1, m));
    }
    // Bob's root moves when he receives Alice's new chain.
    let dh_recv = x25519(&bob.ratchet_secret, &public_of(&alice.ratchet_secret));
    let (root_after_receive, _) = kdf::ratchet_root_step(&bob_mirror.root, &dh_recv);
    bob_mirror.root = root_after_receive;
    let delivery_order = [0usize, 1, 3, 2];
    for &i in &delivery_order[..] {
        let (to_alice, m) = (&wire[i].0, &wire[i].1);
        let receiver = if *to_alice == 0 { &mut alice } else { &mut bob };
        let got = receiver.sessions.decrypt(m, T0.saturating_add_millis(500)).unwrap();
        assert_eq!(hex::encode(&got[..]), messages[i]["plaintext"].as_str().unwrap());
    }

    // ---- group: Bob creates a group with Alice and Carol; his sender key
    // reaches Alice inside a ratchet message (with a DH step at Bob).
    let gid = ConversationId::random_group(&mut rng);
    let members = [alice.identity.peer_id(), bob.identity.peer_id(), carol_id.peer_id()];
    let mut bob_group = GroupSession::new(gid, bob.identity.peer_id(), members, &mut rng).unwrap();
    let mut alice_group = GroupSession::new(gid, alice.identity.peer_id(), members, &mut rng).unwrap();
    let distribution: SenderKeyDistribution = bob_group.distribution();
    // Tracked, as every sender key distribution travels (§4.2).
    let dist_payload = PairwisePayload::Tracked {
        id: 1,
        payload: Box::new(PairwisePayload::SenderKeyDistribution(distribution.clone())),
    };
    let theirs = public_of(&alice.ratchet_secret);
    let (e, m) = ratchet_message(&mut bob, "alice", theirs, &mut bob_mirror, &dist_payload, &mut rng);
    messages.push(e);
    let message_4 = m.clone();
    let got = alice.sessions.decrypt(&m, T0.saturating_add_millis(600)).unwrap();
    let PairwisePayload::Tracked { payload, .. } = PairwisePayload::decode(&got).unwrap() else { panic!() };
    let PairwisePayload::SenderKeyDistribution(received) = *payload else { panic!() };
    alice_group.accept_distribution(&bob.identity.peer_id(), &received, p2pchat_protocol::Timestamp(0)).unwrap();

    let mut group_messages = Vec::new();
    let mut group_wire = Vec::new();
    let mut chain = SenderChainKey::from_bytes(distribution.chain_key);
    for (i, text) in ["hello group", "second group message"].iter().enumerate() {
        let content = ChatContent {
            message_id: MessageId::random(&mut rng),
            sent_at: Timestamp(T0.0 + 700 + i as u64),
            content: (*text).to_owned(),
        };
        let plaintext = content.encode();
        let gm = bob_group.encrypt(&plaintext).unwrap();
        let (mk, next) = kdf::sender_chain_step(&chain);
        let keys = kdf::expand_sender_message_key(&mk);
        assert_eq!(secretbox(keys.cipher_key.as_bytes(), &keys.nonce, &plaintext), gm.ciphertext);
        group_messages.push(json!({
            "message_number": gm.message_number,
            "chain_key": h(chain.as_bytes()),
            "message_key": h(mk.as_bytes()),
            "next_chain_key": h(next.as_bytes()),
            "cipher_key": h(keys.cipher_key.as_bytes()),
            "nonce": h(keys.nonce),
            "plaintext": h(&plaintext[..]),
            "ciphertext": h(&gm.ciphertext),
            "transcript": h(group_message_transcript(&gm)),
            "signature": h(gm.signature.0),
            "envelope": h(Envelope::new(EnvelopeBody::Group(gm.clone())).encode()),
        }));
        group_wire.push(gm);
        chain = next;
    }
    let group_order = [1usize, 0];
    for &i in &group_order {
        let got = alice_group.decrypt(&group_wire[i], T0.saturating_add_millis(800)).unwrap();
        assert_eq!(hex::encode(&got[..]), group_messages[i]["plaintext"].as_str().unwrap());
    }
    let group_refusal_vectors = group_refusals(&mut alice_group, &mut bob_group, &group_wire[0], carol_id.peer_id());
    let distribution_refusal_vectors = distribution_refusals(&mut alice_group, &distribution, carol_id.peer_id());
    let ratchet = json!({
        "key_exchange": "key_exchange.json",
        "alice_identity_public": h(alice.identity.public().to_bytes()),
        "bob_identity_public": h(bob.identity.public().to_bytes()),
        "messages": messages,
        "delivery_order": [0, 1, 3, 2, 4],
        "timeline": ["send 0", "send 1", "send 2", "send 3", "deliver 0", "deliver 1", "deliver 3", "deliver 2", "send 4", "deliver 4"],
        "note": "messages[4] carries the group's sender key distribution, tracked (see group.json)",
        "refusals": ratchet_refusals(&mut alice, &mut bob, &message_4, accepted.ack.ephemeral),
    });
    let group = json!({
        "group_id": gid.to_string(),
        "members": members.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "sender": bob.identity.peer_id().to_string(),
        "distribution": {
            "carried_by": "ratchet.json messages[4]",
            "payload": h(&dist_payload.encode()[..]),
            "key_id": distribution.key_id,
            "message_number": distribution.message_number,
            "chain_key": h(distribution.chain_key),
            "signing_public": h(distribution.signing_public),
        },
        "messages": group_messages,
        "delivery_order": group_order,
        "refusals": group_refusal_vectors,
        "distribution_refusals": distribution_refusal_vectors,
    });
    vec![
        ("kdf", kdf_vectors()),
        ("key_exchange", key_exchange),
        ("ratchet", ratchet),
        ("group", group),
        ("relay", relay_vectors()),
        ("payloads", payload_vectors()),
    ]
}

/// Relay frames (§7a), each with its fields and its encoding; the frames
/// whose layout is easiest to get wrong: options, lists, strings, and the
/// newest kinds.
/// A signed peer record (§7a) from a fixed identity, with its fields as the
/// vectors write them.
fn peer_record() -> (IdentitySeed, p2pchat_protocol::relay::PeerRecord, Value) {
    use p2pchat_protocol::relay::PeerRecord;
    let seed = IdentitySeed::from_bytes(core::array::from_fn(|i| 0x90 + i as u8));
    let identity = IdentityKeyPair::from_seed(&seed);
    let record = PeerRecord::sign(
        &identity,
        vec!["198.51.100.20:30070".into(), "[2001:db8::20]:30070".into()],
        vec!["relay.example.net:30071".into()],
        T0,
        Timestamp(T0.0 + 24 * 60 * 60 * 1000),
        5,
    );
    let fields = json!({
        "peer_id": h(record.peer_id.0),
        "identity_key": h(record.identity_key),
        "direct_addresses": record.direct_addresses,
        "relay_addresses": record.relay_addresses,
        "timestamp": record.timestamp.0,
        "expires_at": record.expires_at.0,
        "sequence": record.sequence,
        "signature": h(record.signature.0),
    });
    (seed, record, fields)
}

fn relay_vectors() -> Value {
    use p2pchat_protocol::relay::{PublishRefusal, Refusal, RelayFrame};
    let peer = PeerId([0x5a; 20]);
    let (seed, record, record_fields) = peer_record();
    record.verify_signature().unwrap();
    let frames = [
        (json!({"kind": "Register"}), RelayFrame::Register),
        (json!({"kind": "Registered"}), RelayFrame::Registered),
        (json!({"kind": "Publish", "record": record_fields.clone()}), RelayFrame::Publish(record.clone())),
        (
            json!({"kind": "LookupResult", "peer": h(record.peer_id.0), "record": record_fields.clone()}),
            RelayFrame::LookupResult { peer: record.peer_id, record: Some(record.clone()) },
        ),
        (
            json!({"kind": "LookupResult", "peer": h(peer.0), "record": null}),
            RelayFrame::LookupResult { peer, record: None },
        ),
        (json!({"kind": "Forwarded", "id": 300}), RelayFrame::Forwarded { id: 300 }),
        (json!({"kind": "Held", "id": 301}), RelayFrame::Held { id: 301 }),
        (json!({"kind": "FetchMailbox"}), RelayFrame::FetchMailbox),
        (json!({"kind": "Published", "sequence": 5}), RelayFrame::Published { sequence: 5 }),
        (
            json!({"kind": "PublishRefused", "sequence": 5, "reason": "TooManyFromAddress"}),
            RelayFrame::PublishRefused { sequence: 5, reason: PublishRefusal::TooManyFromAddress },
        ),
        (json!({"kind": "Lookup", "peer": h(peer.0)}), RelayFrame::Lookup { peer }),
        (
            json!({"kind": "Forward", "to": h(peer.0), "id": 300, "mailbox_allowed": true, "envelope": h([1, 2, 3])}),
            RelayFrame::Forward { to: peer, id: 300, mailbox_allowed: true, envelope: vec![1, 2, 3] },
        ),
        (
            json!({"kind": "Refused", "id": 7, "reason": "UnknownRecipient"}),
            RelayFrame::Refused { id: 7, reason: Refusal::UnknownRecipient },
        ),
        (
            json!({"kind": "Deliver", "from": h(peer.0), "mailbox_id": 129, "envelope": h([0xff])}),
            RelayFrame::Deliver { from: peer, mailbox_id: Some(129), envelope: vec![0xff] },
        ),
        (
            json!({"kind": "Deliver", "from": h(peer.0), "mailbox_id": null, "envelope": h([])}),
            RelayFrame::Deliver { from: peer, mailbox_id: None, envelope: vec![] },
        ),
        (json!({"kind": "MailboxAck", "ids": [1, 128, 70000]}), RelayFrame::MailboxAck { ids: vec![1, 128, 70_000] }),
        (
            json!({"kind": "Observed", "address": "203.0.113.7:50000"}),
            RelayFrame::Observed { address: "203.0.113.7:50000".into() },
        ),
        (
            json!({"kind": "Observed", "address": "[2001:db8::7]:443"}),
            RelayFrame::Observed { address: "[2001:db8::7]:443".into() },
        ),
    ];
    let frames: Vec<Value> = frames
        .into_iter()
        .map(|(mut fields, frame)| {
            let encoding = frame.encode();
            assert_eq!(RelayFrame::decode(&encoding).unwrap(), frame, "the encoding decodes back");
            fields["encoding"] = h(&encoding);
            fields
        })
        .collect();
    let record_vector = json!({
        "identity_seed": h(seed.as_bytes()),
        "record": record_fields,
        "transcript": h(record.transcript()),
        "encoding": h(postcard::to_stdvec(&record).unwrap()),
    });
    json!({
        "frames": frames,
        "peer_record": record_vector,
        "refusals": relay_refusals(),
        "record_refusals": record_refusals(),
    })
}

/// One vector per pairwise payload kind and per group control kind (§4.2):
/// the fields as the text names them, and the postcard encoding. Each
/// encoding must decode back to the same payload.
fn payload_vectors() -> Value {
    use p2pchat_protocol::wire::{GroupControl, RosterEntry};
    let group = ConversationId(p2pchat_protocol::Uuid([0x47; 16]));
    let m1 = MessageId(p2pchat_protocol::Uuid([0x11; 16]));
    let m2 = MessageId(p2pchat_protocol::Uuid([0x12; 16]));
    let admin = PeerId([0xad; 20]);
    let member = PeerId([0x3e; 20]);
    let roster = |peer: PeerId, epoch: u64| json!({"peer_id": h(peer.0), "epoch": epoch});
    let chat = ChatContent { message_id: m1, sent_at: T0, content: "héllo ✓".into() };
    let chat_fields = json!({"message_id": h(m1.0 .0), "sent_at": T0.0, "content": "héllo ✓"});
    let distribution = SenderKeyDistribution {
        group_id: group,
        sender: member,
        key_id: 2,
        message_number: 300,
        chain_key: [0xc4; 32],
        signing_public: [0x5b; 32],
    };
    let controls = [
        (
            json!({"kind": "Invite", "group_id": h(group.0 .0), "name": "Project Team", "admin": h(admin.0),
                   "members": [roster(admin, 1), roster(member, 1)], "created_at": T0.0}),
            GroupControl::Invite {
                group_id: group,
                name: "Project Team".into(),
                admin,
                members: vec![RosterEntry { peer_id: admin, epoch: 1 }, RosterEntry { peer_id: member, epoch: 1 }],
                created_at: T0,
            },
        ),
        (
            json!({"kind": "MemberAdded", "group_id": h(group.0 .0), "member": roster(member, 2)}),
            GroupControl::MemberAdded { group_id: group, member: RosterEntry { peer_id: member, epoch: 2 } },
        ),
        (
            json!({"kind": "Leave", "group_id": h(group.0 .0), "epoch": 2}),
            GroupControl::Leave { group_id: group, epoch: 2 },
        ),
        (
            json!({"kind": "MemberLeft", "group_id": h(group.0 .0), "member": roster(member, 2)}),
            GroupControl::MemberLeft { group_id: group, member: RosterEntry { peer_id: member, epoch: 2 } },
        ),
    ];
    let mut payloads: Vec<(Value, PairwisePayload)> = vec![
        (json!({"kind": "Chat", "chat": chat_fields}), PairwisePayload::Chat(chat.clone())),
        (
            json!({"kind": "DeliveryReceipt", "message_ids": [h(m1.0 .0), h(m2.0 .0)]}),
            PairwisePayload::DeliveryReceipt { message_ids: vec![m1, m2] },
        ),
        (
            json!({"kind": "ReadReceipt", "message_ids": [h(m1.0 .0)], "read_at": T0.0 + 5_000}),
            PairwisePayload::ReadReceipt { message_ids: vec![m1], read_at: Timestamp(T0.0 + 5_000) },
        ),
        (
            json!({"kind": "SenderKeyDistribution", "group_id": h(group.0 .0), "sender": h(member.0), "key_id": 2,
                   "message_number": 300, "chain_key": h([0xc4; 32]), "signing_public": h([0x5b; 32])}),
            PairwisePayload::SenderKeyDistribution(distribution),
        ),
        (
            json!({"kind": "SenderKeyRequest", "group_id": h(group.0 .0)}),
            PairwisePayload::SenderKeyRequest { group_id: group },
        ),
    ];
    for (fields, control) in controls {
        payloads.push((json!({"kind": "GroupControl", "control": fields}), PairwisePayload::GroupControl(control)));
    }
    payloads.push((json!({"kind": "SessionConfirm"}), PairwisePayload::SessionConfirm));
    payloads.push((
        json!({"kind": "Tracked", "id": 70_000, "payload": {"kind": "SenderKeyRequest", "group_id": h(group.0 .0)}}),
        PairwisePayload::Tracked {
            id: 70_000,
            payload: Box::new(PairwisePayload::SenderKeyRequest { group_id: group }),
        },
    ));
    payloads.push((json!({"kind": "Ack", "ids": [1, 70_000]}), PairwisePayload::Ack { ids: vec![1, 70_000] }));
    payloads.push((
        json!({"kind": "GroupChat", "group_id": h(group.0 .0), "key_id": 2, "message_number": 300, "chat": chat_fields}),
        PairwisePayload::GroupChat { group_id: group, key_id: 2, message_number: 300, content: chat },
    ));
    let payloads: Vec<Value> = payloads
        .into_iter()
        .map(|(mut fields, payload)| {
            let encoding = payload.encode();
            assert_eq!(PairwisePayload::decode(&encoding).unwrap(), payload, "the encoding decodes back");
            fields["encoding"] = h(&encoding[..]);
            fields
        })
        .collect();
    json!({ "payloads": payloads, "refusals": payload_refusals() })
}

/// The name §8 gives a decoding refusal.
fn refusal_name(error: &p2pchat_protocol::wire::WireError) -> &'static str {
    use p2pchat_protocol::wire::WireError;
    match error {
        WireError::Empty => "empty",
        WireError::TooLarge { .. } => "too large",
        WireError::UnsupportedVersion(_) => "unsupported version",
        WireError::UnknownKind(_) => "unknown kind",
        WireError::Malformed { .. } => "malformed",
    }
}

/// Refusal vectors: each input, how to decode it, and the refusal this
/// implementation gives (which the independent checker must give too). An
/// input over the size limits is written as its first bytes and the length
/// it is padded to with zero bytes (`pad_to`), not as half a megabyte of hex.
fn refusals(decode_as: &str, cases: Vec<(&str, Vec<u8>)>, decode: impl Fn(&[u8]) -> Option<&'static str>) -> Value {
    let entries: Vec<Value> = cases
        .into_iter()
        .map(|(name, input)| {
            let refusal = decode(&input).unwrap_or_else(|| panic!("{name}: decoded; it must be refused"));
            let mut entry = json!({"name": name, "decode_as": decode_as, "refusal": refusal});
            if input.len() > 1024 {
                let head = input.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                entry["input"] = h(&input[..head]);
                entry["pad_to"] = json!(input.len());
            } else {
                entry["input"] = h(&input);
            }
            entry
        })
        .collect();
    Value::Array(entries)
}

fn payload_refusals() -> Value {
    let cat = |parts: &[&[u8]]| parts.concat();
    let cases = vec![
        ("an empty payload (malformed: only an envelope or frame is refused as empty)", vec![]),
        ("unknown payload kind 10", vec![0x0a]),
        ("unknown group control kind 4", vec![0x05, 0x04]),
        ("a Tracked payload holding a Tracked payload", vec![0x07, 0x01, 0x07, 0x01, 0x06]),
        ("a Tracked payload holding an Ack", vec![0x07, 0x01, 0x08, 0x00]),
        ("a trailing byte after SessionConfirm", vec![0x06, 0x00]),
        ("a non-minimal varint (Ack id 1 as 0x81 0x00)", vec![0x08, 0x01, 0x81, 0x00]),
        ("a DeliveryReceipt cut short", cat(&[&[0x01, 0x01], &[0x11; 15]])),
        ("a list longer than the input", vec![0x08, 0xff, 0xff, 0xff, 0xff, 0x0f]),
        ("Chat content that is not UTF-8", cat(&[&[0x00], &[0x11; 16], &[0x00, 0x01, 0xff]])),
    ];
    let mut entries =
        refusals("PairwisePayload", cases, |b| PairwisePayload::decode(b).err().map(|e| refusal_name(&e)));
    let mut too_large = vec![0u8; p2pchat_protocol::wire::MAX_ENVELOPE_LEN + 1];
    too_large[0] = 0x01;
    too_large[1] = 0x02;
    let envelopes = vec![
        ("an empty envelope", vec![]),
        ("an envelope one byte over 262,144", too_large),
        ("an envelope of version 2", vec![0x02, 0x02]),
        ("an unknown envelope kind 4", vec![0x01, 0x04]),
        ("a ratchet envelope cut short", vec![0x01, 0x02, 0x00]),
    ];
    let more = refusals("Envelope", envelopes, |b| Envelope::decode(b).err().map(|e| refusal_name(&e)));
    if let (Value::Array(all), Value::Array(more)) = (&mut entries, more) {
        all.extend(more);
    }
    entries
}

fn relay_refusals() -> Value {
    use p2pchat_protocol::relay::{RelayFrame, MAX_FRAME_LEN};
    let cat = |parts: &[&[u8]]| parts.concat();
    let cases = vec![
        ("empty", vec![]),
        ("unsupported version 2", vec![0x02, 0x00]),
        ("unknown frame kind 15", vec![0x01, 0x0f]),
        ("a trailing byte after Register", vec![0x01, 0x00, 0x00]),
        ("a bool byte 2 (Forward.mailbox_allowed)", cat(&[&[0x01, 0x05], &[0x5a; 20], &[0x01, 0x02, 0x00]])),
        ("an option tag 2 (LookupResult.record)", cat(&[&[0x01, 0x04], &[0x5a; 20], &[0x02]])),
        ("unknown refusal 6", vec![0x01, 0x08, 0x01, 0x06]),
        ("unknown publish refusal 8", vec![0x01, 0x0d, 0x05, 0x08]),
        ("an Observed address cut short", vec![0x01, 0x0e, 0x05, b'1', b'.', b'2']),
        ("a frame one byte over 263,168", {
            let mut frame = vec![0u8; MAX_FRAME_LEN + 1];
            frame[0] = 0x01;
            frame
        }),
    ];
    refusals("RelayFrame", cases, |b| RelayFrame::decode(b).err().map(|e| refusal_name(&e)))
}

/// Peer record refusals (§7a): each record has exactly one defect, and is
/// refused with the name this implementation gives, which the checker must
/// give too.
fn record_refusals() -> Value {
    use p2pchat_protocol::identity::IdentityError;
    use p2pchat_protocol::relay::{PeerRecord, RecordError};
    use p2pchat_protocol::wire::Signature64;
    let (seed, good, _) = peer_record();
    let owner = IdentityKeyPair::from_seed(&seed);
    let other = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes([0x33; 32]));
    let resign = |mut record: PeerRecord, by: &IdentityKeyPair| {
        record.signature = Signature64([0; 64]);
        record.signature = Signature64(by.sign(&record.transcript()));
        record
    };
    let peer_of = |key: &[u8; 32]| {
        let digest = Sha256::digest(key);
        PeerId(digest[..20].try_into().unwrap())
    };
    let not_a_point = not_a_point();
    let ok_until = good.expires_at;
    let mut cases: Vec<(&str, PeerRecord, Timestamp, Option<u64>)> = Vec::new();
    cases.push(("signed by another identity", resign(good.clone(), &other), T0, None));
    let mut foreign_key = good.clone();
    foreign_key.identity_key = other.public().to_bytes();
    cases.push(("a key that does not hash to the peer ID", resign(foreign_key, &other), T0, None));
    let mut bad_point = good.clone();
    bad_point.identity_key = not_a_point;
    bad_point.peer_id = peer_of(&not_a_point);
    cases.push(("a key that is not a curve point", bad_point, T0, None));
    let mut flipped = good.clone();
    flipped.signature.0[10] ^= 0x01;
    cases.push(("a signature with one bit flipped", flipped, T0, None));
    let mut altered = good.clone();
    altered.sequence += 1;
    cases.push(("a field changed after signing", altered, T0, None));
    let mut malleable = good.clone();
    malleate(&mut malleable.signature.0);
    cases.push(("a signature with S not below l", malleable, T0, None));
    cases.push(("expired (now is its expiry)", good.clone(), ok_until, None));
    cases.push(("older than the one held", good.clone(), T0, Some(good.sequence + 1)));
    cases.push(("the very sequence held", good.clone(), T0, Some(good.sequence)));
    let mut identity_point = good.clone();
    identity_point.identity_key = [0; 32];
    identity_point.identity_key[0] = 1;
    identity_point.peer_id = peer_of(&identity_point.identity_key);
    cases.push(("a key of small order (the identity point)", identity_point, T0, None));
    let mut many = good.clone();
    many.direct_addresses = (0..17).map(|i| format!("198.51.100.{i}:30070")).collect();
    cases.push(("17 direct addresses", resign(many, &owner), T0, None));
    let mut long = good.clone();
    long.relay_addresses = vec![format!("{}.example:1", "a".repeat(247))];
    cases.push(("a relay address of 257 bytes", resign(long, &owner), T0, None));
    let entries: Vec<Value> = cases
        .into_iter()
        .map(|(name, record, now, known)| {
            let refusal = match record.verify(now, known) {
                Ok(()) => panic!("{name}: verified; it must be refused"),
                Err(RecordError::TooLarge) => "too large",
                Err(RecordError::Expired { .. }) => "expired",
                Err(RecordError::Stale { .. }) => "stale",
                Err(RecordError::Identity(IdentityError::PeerIdMismatch { .. })) => "identity mismatch",
                Err(RecordError::Identity(IdentityError::InvalidPublicKey)) => "invalid key",
                Err(RecordError::Identity(IdentityError::BadSignature)) => "bad signature",
            };
            json!({"name": name, "record": h(record.encode()), "now": now.0, "known_sequence": known, "refusal": refusal})
        })
        .collect();
    Value::Array(entries)
}

/// The name §8 gives a key exchange refusal.
fn kx_refusal_name(error: &handshake::KeyExchangeError) -> &'static str {
    use handshake::KeyExchangeError;
    use p2pchat_protocol::identity::IdentityError;
    match error {
        KeyExchangeError::NotForUs { .. } => "not for us",
        KeyExchangeError::Identity(IdentityError::PeerIdMismatch { .. }) => "identity mismatch",
        KeyExchangeError::Identity(IdentityError::InvalidPublicKey) => "invalid key",
        KeyExchangeError::Identity(IdentityError::BadSignature) => "bad signature",
        KeyExchangeError::Stale { .. } => "stale",
        KeyExchangeError::Replayed { .. } => "replayed",
        KeyExchangeError::AckMismatch => "ack mismatch",
        KeyExchangeError::InvalidEphemeralKey => "invalid ephemeral key",
    }
}

/// The first 32-byte string (a little-endian y, sign bit clear) that does
/// not encode a curve point.
fn not_a_point() -> [u8; 32] {
    (2u8..)
        .map(|y| core::array::from_fn(|i| if i == 0 { y } else { 0 }))
        .find(|bytes: &[u8; 32]| ed25519_dalek::VerifyingKey::from_bytes(bytes).is_err())
        .unwrap()
}

/// `S + l`: a signature the same equation accepts, which strict
/// verification refuses.
fn malleate(signature: &mut [u8; 64]) {
    let l: [u8; 32] =
        hex::decode("edd3f55c1a631258d69cf7a2def9de1400000000000000000000000000000010").unwrap().try_into().unwrap();
    let mut carry = 0u16;
    for (s_byte, l_byte) in signature[32..].iter_mut().zip(l) {
        let sum = u16::from(*s_byte) + u16::from(l_byte) + carry;
        *s_byte = sum as u8;
        carry = sum >> 8;
    }
}

/// Key exchange refusals (§5.1): requests Bob must refuse, each with the
/// transport's `from`, Bob's clock and the freshness mark he holds; acks
/// Alice must refuse while her request of `key_exchange.json` is pending.
fn kx_refusals(
    alice: &IdentityKeyPair,
    bob: &IdentityKeyPair,
    carol: &IdentityKeyPair,
    request: &p2pchat_protocol::wire::KeyExchangeRequest,
    ack: &p2pchat_protocol::wire::KeyExchangeAck,
    pending: &[u8],
) -> Value {
    use p2pchat_protocol::wire::{KeyExchangeAck, KeyExchangeRequest, Signature64};
    let now = T0.saturating_add_millis(40);
    let sign_request = |mut r: KeyExchangeRequest, by: &IdentityKeyPair, from: &PeerId| {
        r.signature = Signature64([0; 64]);
        r.signature = Signature64(by.sign(&handshake::request_transcript(from, &r)));
        r
    };
    let sign_ack = |mut a: KeyExchangeAck| {
        a.signature =
            Signature64(bob.sign(&handshake::ack_transcript(&alice.peer_id(), &bob.peer_id(), request, &a.ephemeral)));
        a
    };
    let mark = |t: Timestamp, nonce: [u8; 16]| handshake::AnsweredRequest {
        mark: handshake::RequestMark { timestamp: t, nonce },
        ack: KeyExchangeAck { initiator_ephemeral: [0x77; 32], ..ack.clone() },
    };
    let a = alice.peer_id();
    let invalid = not_a_point();
    let invalid_id = PeerId(Sha256::digest(invalid)[..20].try_into().unwrap());
    let mut to_carol = request.clone();
    to_carol.responder = carol.peer_id();
    let mut bad_key = request.clone();
    bad_key.initiator_identity = invalid;
    let mut flipped = request.clone();
    flipped.signature.0[3] ^= 0x80;
    let mut malleable = request.clone();
    malleable.signature.0 = {
        let mut s = request.signature.0;
        malleate(&mut s);
        s
    };
    let mut zero_ephemeral = request.clone();
    zero_ephemeral.ephemeral = [0; 32];
    let mut nonce_above = request.nonce;
    nonce_above[15] = nonce_above[15].wrapping_add(1);
    type Case = (&'static str, KeyExchangeRequest, PeerId, Timestamp, Option<handshake::AnsweredRequest>);
    let requests: Vec<Case> = vec![
        ("addressed to another peer", sign_request(to_carol, alice, &a), a, now, None),
        ("from a peer whose key it is not", request.clone(), carol.peer_id(), now, None),
        ("an identity key that is not a curve point", bad_key, invalid_id, now, None),
        ("more than 10 minutes old", request.clone(), a, T0.saturating_add_millis(600_001), None),
        ("older than the mark held", request.clone(), a, now, Some(mark(T0.saturating_add_millis(1), [0; 16]))),
        ("equal time, nonce below the mark's", request.clone(), a, now, Some(mark(T0, nonce_above))),
        ("the marked request with another ephemeral key", request.clone(), a, now, Some(mark(T0, request.nonce))),
        ("a signature with one bit flipped", flipped, a, now, None),
        ("a signature with S not below l", malleable, a, now, None),
        ("an ephemeral key of small order", sign_request(zero_ephemeral, alice, &a), a, now, None),
    ];
    let mut entries = Vec::new();
    for (name, r, from, at, last) in requests {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
        let error = match handshake::respond(bob, &from, &r, last.as_ref(), at, &mut rng) {
            Err(error) => error,
            Ok(_) => panic!("{name}: accepted; it must be refused"),
        };
        let mark = last.map(|l| {
            json!({"timestamp_ms": l.mark.timestamp.as_millis(), "nonce": h(l.mark.nonce),
                   "initiator_ephemeral": h(l.ack.initiator_ephemeral)})
        });
        entries.push(json!({
            "name": name, "to": "bob", "from": from.to_string(), "now_ms": at.as_millis(), "mark": mark,
            "envelope": h(Envelope::new(EnvelopeBody::KeyExchangeRequest(r)).encode()),
            "refusal": kx_refusal_name(&error),
        }));
    }
    let mut other_nonce = ack.clone();
    other_nonce.request_nonce[0] ^= 1;
    let mut other_ephemeral = ack.clone();
    other_ephemeral.initiator_ephemeral[0] ^= 1;
    let mut carols = ack.clone();
    carols.responder_identity = carol.public().to_bytes();
    let mut flipped_ack = ack.clone();
    flipped_ack.signature.0[40] ^= 0x04;
    let acks = vec![
        ("an ack naming another nonce", other_nonce),
        ("an ack naming another ephemeral key of ours", other_ephemeral),
        ("an ack from another identity", carols),
        ("an ack with one signature bit flipped", flipped_ack),
        ("an ack with an ephemeral key of small order", sign_ack(KeyExchangeAck { ephemeral: [0; 32], ..ack.clone() })),
    ];
    for (name, a) in acks {
        let pending = handshake::PendingKeyExchange::from_bytes(pending).unwrap();
        let error = match pending.complete(&a) {
            Err(refused) => refused.error,
            Ok(_) => panic!("{name}: accepted; it must be refused"),
        };
        entries.push(json!({
            "name": name, "to": "alice",
            "envelope": h(Envelope::new(EnvelopeBody::KeyExchangeAck(a)).encode()),
            "refusal": kx_refusal_name(&error),
        }));
    }
    Value::Array(entries)
}

/// Ratchet refusals (§6.3): envelopes Alice must refuse once she has
/// received every message of `ratchet.json`, each altered in one way from a
/// fresh message Bob sends after message 4 (or a replay), with the refusal
/// this implementation gives.
fn ratchet_refusals(alice: &mut Party, bob: &mut Party, replay: &RatchetMessage, retired_key: [u8; 32]) -> Value {
    use p2pchat_protocol::DecryptionError;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(11);
    let payload = chat(&mut TapRng { inner: rand_chacha::ChaCha20Rng::seed_from_u64(12), last32: None }, 900, "five");
    let fresh = bob.sessions.encrypt(&payload.encode(), &mut rng).unwrap();
    let altered = |change: &dyn Fn(&mut RatchetMessage)| {
        let mut m = fresh.clone();
        change(&mut m);
        m
    };
    let cases: Vec<(&str, RatchetMessage)> = vec![
        ("a replay of message 4", replay.clone()),
        ("a ciphertext bit flipped", altered(&|m| m.ciphertext[0] ^= 1)),
        ("a header tag bit flipped", altered(&|m| m.header_tag[0] ^= 1)),
        ("a message number changed in the header", altered(&|m| m.header.message_number += 1)),
        ("a previous chain length changed in the header", altered(&|m| m.header.previous_chain_length += 1)),
        ("a session ID this node does not hold", altered(&|m| m.header.session_id[0] ^= 1)),
        ("1,001 keys ahead on the current chain", altered(&|m| m.header.message_number += 1_001)),
        ("a ratchet key of small order", altered(&|m| m.header.ratchet_key = [0; 32])),
        (
            "a new chain whose first message is number 1,001",
            altered(&|m| {
                m.header.ratchet_key = public_of(&[0x55; 32]);
                m.header.message_number = 1_001;
            }),
        ),
        (
            "a new chain after a previous chain length 1,001 past the current chain",
            altered(&|m| {
                m.header.ratchet_key = public_of(&[0x55; 32]);
                m.header.previous_chain_length = 1 + 1_001;
                m.header.message_number = 0;
            }),
        ),
        (
            "a later number on Bob's retired first chain",
            altered(&|m| {
                m.header.ratchet_key = retired_key;
                m.header.message_number = 7;
            }),
        ),
    ];
    let entries: Vec<Value> = cases
        .into_iter()
        .map(|(name, m)| {
            let error = match alice.sessions.decrypt(&m, T0.saturating_add_millis(1_000)) {
                Err(error) => error,
                Ok(_) => panic!("{name}: opened; it must be refused"),
            };
            let refusal = match error {
                DecryptionError::BadMac => "bad MAC",
                DecryptionError::HeaderMismatch => "header mismatch",
                DecryptionError::Duplicate { .. } => "duplicate",
                DecryptionError::TooFarAhead { .. } => "too far ahead",
                DecryptionError::UnknownChain => "unknown chain",
                DecryptionError::UnknownSession => "unknown session",
                DecryptionError::InvalidRatchetKey => "invalid ratchet key",
            };
            json!({"name": name, "envelope": h(Envelope::new(EnvelopeBody::Ratchet(m)).encode()), "refusal": refusal})
        })
        .collect();
    Value::Array(entries)
}

/// Group message refusals (§7.3): envelopes Alice must refuse once she has
/// received both group messages, with the refusal this implementation gives.
fn group_refusals(alice: &mut GroupSession, bob: &mut GroupSession, replay: &GroupMessage, carol: PeerId) -> Value {
    let content = |text: &str| {
        ChatContent { message_id: MessageId(p2pchat_protocol::Uuid([0x42; 16])), sent_at: T0, content: text.into() }
            .encode()
    };
    let fresh = bob.encrypt(&content("three")).unwrap();
    let mut far = fresh.clone();
    for _ in 0..=MAX_SKIP {
        far = bob.encrypt(&content("far")).unwrap();
    }
    let altered = |change: &dyn Fn(&mut GroupMessage)| {
        let mut m = fresh.clone();
        change(&mut m);
        m
    };
    let cases: Vec<(&str, GroupMessage)> = vec![
        ("a replay of group message 0", replay.clone()),
        ("for another group", altered(&|m| m.group_id.0 .0[15] ^= 1)),
        ("from a peer that is not a member", altered(&|m| m.sender = PeerId([0x99; 20]))),
        ("from a member whose key is not held", altered(&|m| m.sender = carol)),
        ("naming a key ID not held", altered(&|m| m.key_id += 1)),
        ("a ciphertext bit flipped (the signature covers it)", altered(&|m| m.ciphertext[0] ^= 1)),
        ("a signature bit flipped", altered(&|m| m.signature.0[5] ^= 1)),
        ("1,001 keys past the chain, signed", far),
    ];
    let entries: Vec<Value> = cases
        .into_iter()
        .map(|(name, m)| {
            let error = match alice.decrypt(&m, T0.saturating_add_millis(1_000)) {
                Err(error) => error,
                Ok(_) => panic!("{name}: opened; it must be refused"),
            };
            let refusal = match error {
                GroupError::WrongGroup { .. } => "wrong group",
                GroupError::NotAMember { .. } => "not a member",
                GroupError::UnknownChain { .. } => "unknown chain",
                GroupError::BadSignature => "bad signature",
                GroupError::Duplicate { .. } => "duplicate",
                GroupError::TooFarAhead { .. } => "too far ahead",
                GroupError::BadMac => "bad MAC",
                other => panic!("{name}: refused as {other:?}"),
            };
            json!({"name": name, "envelope": h(Envelope::new(EnvelopeBody::Group(m)).encode()), "refusal": refusal})
        })
        .collect();
    Value::Array(entries)
}

/// Distribution refusals (§7.4): sender key distributions Alice must refuse
/// once she holds Bob's key, each with the peer whose pairwise session it
/// arrived over, tracked as every distribution travels.
fn distribution_refusals(alice: &mut GroupSession, held: &SenderKeyDistribution, carol: PeerId) -> Value {
    let stranger = PeerId([0x99; 20]);
    let altered = |change: &dyn Fn(&mut SenderKeyDistribution)| {
        let mut d = held.clone();
        change(&mut d);
        d
    };
    let cases: Vec<(&str, PeerId, SenderKeyDistribution)> = vec![
        ("Bob's key over Carol's session", carol, held.clone()),
        ("for another group", held.sender, altered(&|d| d.group_id.0 .0[15] ^= 1)),
        ("a non-member's own key", stranger, altered(&|d| d.sender = stranger)),
        ("Bob's key ID with another signing key", held.sender, altered(&|d| d.signing_public[0] ^= 1)),
        (
            "a new key whose signing key is of small order",
            held.sender,
            altered(&|d| {
                d.key_id = d.key_id.wrapping_add(1);
                d.signing_public = [0; 32];
                d.signing_public[0] = 1;
            }),
        ),
    ];
    let entries: Vec<Value> = cases
        .into_iter()
        .map(|(name, from, d)| {
            let error = match alice.accept_distribution(&from, &d, T0.saturating_add_millis(1_000)) {
                Err(error) => error,
                Ok(()) => panic!("{name}: accepted; it must be refused"),
            };
            let refusal = match error {
                GroupError::WrongGroup { .. } => "wrong group",
                GroupError::ForwardedKey { .. } => "forwarded key",
                GroupError::NotAMember { .. } => "not a member",
                GroupError::ConflictingKey { .. } => "conflicting key",
                GroupError::InvalidSigningKey => "invalid signing key",
                other => panic!("{name}: refused as {other:?}"),
            };
            let payload =
                PairwisePayload::Tracked { id: 2, payload: Box::new(PairwisePayload::SenderKeyDistribution(d)) };
            json!({"name": name, "from": from.to_string(), "payload": h(&payload.encode()[..]), "refusal": refusal})
        })
        .collect();
    Value::Array(entries)
}

#[test]
fn vectors_reproduce_byte_for_byte() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let write = std::env::var_os("P2PCHAT_WRITE_VECTORS").is_some();
    for (name, value) in generate() {
        let text = serde_json::to_string_pretty(&value).unwrap() + "\n";
        let path = dir.join(format!("{name}.json"));
        if write {
            std::fs::write(&path, &text).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("{}: {e}; run P2PCHAT_WRITE_VECTORS=1 cargo test -p p2pchat-protocol --test vectors", path.display())
        });
        assert!(on_disk == text, "{} differs from what the generator produces now", path.display());
    }
}

#[test]
fn generation_is_deterministic() {
    let a: Vec<String> = generate().into_iter().map(|(_, v)| v.to_string()).collect();
    let b: Vec<String> = generate().into_iter().map(|(_, v)| v.to_string()).collect();
    assert_eq!(a, b);
}
