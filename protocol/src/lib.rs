//! The cryptographic core of p2pchat: identities, the signed key exchange,
//! the Double Ratchet, Sender Keys and the wire format.
//!
//! This crate is sans-IO. It never touches sockets, threads, clocks, files,
//! the OS random source or async: time comes in as a [`Timestamp`], and
//! randomness from an RNG the caller seeds. The same inputs give the same
//! outputs, byte for byte. Every state change is commit-on-success: an
//! operation that returns an error leaves its state exactly as it was.
//!
//! Secrets are zeroized on drop and never printed by `Debug`.
//!
//! The byte layouts, KDF labels and signature transcripts are specified in
//! `docs/PROTOCOL.md`, with known-answer vectors in `protocol/tests/vectors`.
//!
//! # A complete 1:1 exchange
//!
//! ```
//! use p2pchat_protocol::{handshake, IdentityKeyPair, PairwiseSessions, Timestamp};
//! use p2pchat_protocol::wire::{Envelope, EnvelopeBody};
//! use rand_chacha::rand_core::SeedableRng;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
//! let now = Timestamp::from_millis(1_735_401_234_000);
//! let alice = IdentityKeyPair::generate(&mut rng);
//! let bob = IdentityKeyPair::generate(&mut rng);
//!
//! // Alice starts the key exchange; the request crosses the network.
//! let (pending, request) = handshake::initiate(&alice, bob.peer_id(), now, &mut rng);
//! let wire = Envelope::new(EnvelopeBody::KeyExchangeRequest(request)).encode();
//! let EnvelopeBody::KeyExchangeRequest(request) = Envelope::decode(&wire)?.body else { unreachable!() };
//!
//! // Bob checks it (and that it is newer than any he accepted from Alice).
//! let handshake::Response::New(accepted) = handshake::respond(&bob, &alice.peer_id(), &request, None, now, &mut rng)?
//! else { unreachable!("a first request is new") };
//! let mut bob_sessions = PairwiseSessions::new(accepted.session);
//!
//! // Alice checks the ack and has her session too.
//! let mut alice_sessions = PairwiseSessions::new(pending.complete(&accepted.ack)?);
//! assert_eq!(alice_sessions.current().conversation_id(), bob_sessions.current().conversation_id());
//!
//! // Messages both ways, one of them out of order.
//! let m1 = alice_sessions.encrypt(b"hi bob", &mut rng)?;
//! let m2 = alice_sessions.encrypt(b"are you there?", &mut rng)?;
//! assert_eq!(&bob_sessions.decrypt(&m2, now)?[..], b"are you there?");
//! assert_eq!(&bob_sessions.decrypt(&m1, now)?[..], b"hi bob");
//! let reply = bob_sessions.encrypt(b"hi alice", &mut rng)?;
//! assert_eq!(&alice_sessions.decrypt(&reply, now)?[..], b"hi alice");
//!
//! // A replay is refused and changes nothing.
//! assert!(bob_sessions.decrypt(&m1, now).is_err());
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod address;
mod aead;
pub mod engine;
pub mod group;
mod group_error;
pub mod handshake;
pub mod identity;
pub mod ids;
pub mod kdf;
pub mod keys;
pub mod node;
pub mod ratchet;
pub mod relay;
pub mod sender_key;
pub mod session;
mod skipped;
pub mod state;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod time;
pub mod wire;

pub use group::GroupError;
pub use group::GroupSession;
pub use identity::{IdentityKeyPair, IdentityPublicKey};
pub use ids::{ConversationId, MessageId, PeerId, Uuid};
pub use ratchet::{DecryptionError, EncryptError};
pub use sender_key::SenderKey;
pub use session::{InstallError, PairwiseSessions, Session, SessionId};
pub use skipped::{MAX_SKIP, MAX_SKIPPED_KEYS, SKIPPED_KEY_MAX_AGE_MS};
pub use state::StateError;
pub use time::Timestamp;
