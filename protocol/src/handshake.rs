//! The signed ephemeral X25519 key exchange between two Ed25519 identities.
//!
//! ```text
//! initiator                                   responder
//!   e_i ← X25519 key pair
//!   request(IK_i, responder, E_i, t, nonce, sig_i) ──▶ verify IK_i ↦ sender's peer ID,
//!                                                      sig_i, freshness (t, nonce)
//!                                                      e_r ← X25519 key pair
//!            ◀── ack(IK_r, E_i, nonce, E_r, sig_r)     session (can send at once)
//!   verify IK_r ↦ responder, sig_r
//!   session
//! ```
//!
//! Both sides derive the first root key and the responder's first chain key
//! from `X25519(e_i, E_r)` with HKDF, salted with the transcript hash. The
//! exact transcripts are in `docs/PROTOCOL.md`.

use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use x25519_dalek::StaticSecret;

use crate::identity::{IdentityError, IdentityKeyPair, IdentityPublicKey};
use crate::ids::PeerId;
use crate::kdf::{self, labels};
use crate::ratchet::{DoubleRatchet, RatchetKeyPair};
use crate::session::{Role, Session, SessionId};
use crate::time::Timestamp;
use crate::wire::{KeyExchangeAck, KeyExchangeRequest, Signature64, PROTOCOL_VERSION};

/// How far a request's timestamp may be ahead of the responder's clock, or
/// behind it: 10 minutes. Requests are only answered live (never from a
/// mailbox), so an honest one is seconds old; the margin absorbs clock skew.
pub const MAX_REQUEST_CLOCK_SKEW_MS: u64 = 10 * 60 * 1000;

/// Why a key exchange message was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyExchangeError {
    /// The identity key is invalid or does not match the expected peer.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The request names another peer as responder.
    #[error("key exchange request is addressed to {addressed}, not to this node ({local})")]
    NotForUs {
        /// Whom the request names.
        addressed: PeerId,
        /// This node.
        local: PeerId,
    },
    /// The request is not newer than the newest one already accepted from
    /// this initiator: a replay, or a stale retransmission.
    #[error("key exchange request from {initiator} is not newer than one already accepted (replay refused)")]
    Replayed {
        /// The initiator.
        initiator: PeerId,
    },
    /// The request's timestamp is too far from the responder's clock.
    #[error(
        "key exchange request timestamp is {skew_ms} ms from this node's clock (limit {MAX_REQUEST_CLOCK_SKEW_MS} ms)"
    )]
    Stale {
        /// The distance between the two clocks, in milliseconds.
        skew_ms: u64,
    },
    /// The ack does not answer the request this node has pending.
    #[error("key exchange ack does not answer the pending request")]
    AckMismatch,
    /// An ephemeral key gives an all-zero DH output.
    #[error("ephemeral public key is of small order and was refused")]
    InvalidEphemeralKey,
}

/// The newest request accepted from one initiator: persisted by the caller,
/// and passed back to [`respond`] so that old requests cannot be replayed.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct RequestMark {
    /// The request's timestamp (the initiator's clock).
    pub timestamp: Timestamp,
    /// The request's nonce, which orders requests with equal timestamps.
    pub nonce: [u8; 16],
}

impl core::fmt::Debug for RequestMark {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "RequestMark({:?}, ", self.timestamp)?;
        crate::ids::write_hex(f, &self.nonce)?;
        f.write_str(")")
    }
}

/// What to do when both peers sent each other a request at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrossedRequests {
    /// Our peer ID is the lower: keep our pending request and ignore theirs;
    /// they will answer ours.
    KeepOurs,
    /// Our peer ID is the higher: drop our pending request and answer theirs.
    AnswerTheirs,
}

impl CrossedRequests {
    /// The rule: the request from the lower peer ID wins. Both sides compute
    /// the same answer, so exactly one session results.
    pub fn resolve(local: &PeerId, remote: &PeerId) -> Self {
        if local < remote {
            Self::KeepOurs
        } else {
            Self::AnswerTheirs
        }
    }
}

/// An initiator's request awaiting its ack. Holds the ephemeral secret
/// (zeroized on drop).
pub struct PendingKeyExchange {
    local: IdentityPublicKey,
    responder: PeerId,
    ephemeral: RatchetKeyPair,
    request: KeyExchangeRequest,
}

impl core::fmt::Debug for PendingKeyExchange {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PendingKeyExchange")
            .field("responder", &self.responder)
            .field("timestamp", &self.request.timestamp)
            .finish_non_exhaustive()
    }
}

/// Starts a key exchange with `responder`.
pub fn initiate(
    identity: &IdentityKeyPair,
    responder: PeerId,
    now: Timestamp,
    rng: &mut (impl RngCore + CryptoRng),
) -> (PendingKeyExchange, KeyExchangeRequest) {
    let ephemeral = RatchetKeyPair::generate(rng);
    let mut nonce = [0u8; 16];
    rng.fill_bytes(&mut nonce);
    let mut request = KeyExchangeRequest {
        initiator_identity: identity.public().to_bytes(),
        responder,
        ephemeral: *ephemeral.public(),
        timestamp: now,
        nonce,
        signature: Signature64([0; 64]),
    };
    request.signature = Signature64(identity.sign(&request_transcript(&identity.peer_id(), &request)));
    let pending =
        PendingKeyExchange { local: identity.public().clone(), responder, ephemeral, request: request.clone() };
    (pending, request)
}

impl PendingKeyExchange {
    /// The peer this exchange is with.
    pub fn responder(&self) -> PeerId {
        self.responder
    }

    /// The request, for retransmission.
    pub fn request(&self) -> &KeyExchangeRequest {
        &self.request
    }

    /// The ephemeral secret (for known-answer vectors).
    pub fn ephemeral_secret(&self) -> crate::keys::X25519Secret {
        self.ephemeral.secret()
    }

    /// Checks the ack and derives the session. The exchange is consumed, so
    /// a duplicated ack cannot complete it twice; a refused ack hands it back
    /// still pending, so a forged ack cannot cancel it.
    pub fn complete(self, ack: &KeyExchangeAck) -> Result<Session, Box<AckRefused>> {
        match self.check_ack(ack) {
            Ok((root, chain, hash, responder)) => {
                let ratchet = DoubleRatchet::initiator(root, chain, self.ephemeral, ack.ephemeral);
                Ok(Session::new(session_id(&hash), Role::Initiator, &self.local, &responder, ratchet))
            }
            Err(error) => Err(Box::new(AckRefused { error, pending: self })),
        }
    }

    fn check_ack(
        &self,
        ack: &KeyExchangeAck,
    ) -> Result<(crate::keys::RootKey, crate::keys::ChainKey, [u8; 32], IdentityPublicKey), KeyExchangeError> {
        let responder = IdentityPublicKey::from_bytes_for(&ack.responder_identity, &self.responder)?;
        if ack.initiator_ephemeral != self.request.ephemeral || ack.request_nonce != self.request.nonce {
            return Err(KeyExchangeError::AckMismatch);
        }
        let transcript = ack_transcript(&self.local.peer_id(), &self.responder, &self.request, &ack.ephemeral);
        responder.verify(&transcript, &ack.signature.0)?;
        let dh = self.ephemeral.diffie_hellman(&ack.ephemeral).ok_or(KeyExchangeError::InvalidEphemeralKey)?;
        let hash = transcript_hash(&transcript);
        let (root, chain) = kdf::kx_root_step(&hash, &dh);
        Ok((root, chain, hash, responder))
    }
}

/// An ack that [`PendingKeyExchange::complete`] refused, with the exchange,
/// still pending.
pub struct AckRefused {
    /// Why the ack was refused.
    pub error: KeyExchangeError,
    /// The exchange, unchanged.
    pub pending: PendingKeyExchange,
}

impl core::fmt::Debug for AckRefused {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AckRefused").field("error", &self.error).field("pending", &self.pending).finish()
    }
}

impl core::fmt::Display for AckRefused {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(&self.error, f)
    }
}

impl std::error::Error for AckRefused {}

/// What a responder keeps per initiator: the newest request it accepted
/// (the freshness mark) and the ack it sent, so that a retransmitted request
/// (the ack was lost) gets the same ack again rather than a refusal.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AnsweredRequest {
    /// The freshness mark.
    pub mark: RequestMark,
    /// The ack sent for it (public data).
    pub ack: KeyExchangeAck,
}

/// A request accepted by [`respond`].
pub struct Accepted {
    /// The new session; install it with
    /// [`PairwiseSessions::install`](crate::PairwiseSessions::install).
    pub session: Session,
    /// The ack to send back.
    pub ack: KeyExchangeAck,
    /// Persist with the session, replacing the previous record for this initiator.
    pub answered: AnsweredRequest,
}

impl core::fmt::Debug for Accepted {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Accepted")
            .field("session", &self.session)
            .field("mark", &self.answered.mark)
            .finish_non_exhaustive()
    }
}

/// How [`respond`] answered.
#[derive(Debug)]
pub enum Response {
    /// A new request: a new session and its ack.
    New(Box<Accepted>),
    /// The very request answered last time, retransmitted because the ack was
    /// lost: send this ack again; nothing else changes.
    Repeat(KeyExchangeAck),
}

/// Answers a request that arrived from `from` (the peer ID the transport
/// authenticated). `last` is what was recorded for the newest request
/// already accepted from that initiator. Nothing is returned to persist
/// unless every check passes.
pub fn respond(
    identity: &IdentityKeyPair,
    from: &PeerId,
    request: &KeyExchangeRequest,
    last: Option<&AnsweredRequest>,
    now: Timestamp,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<Response, KeyExchangeError> {
    let local = identity.peer_id();
    if request.responder != local {
        return Err(KeyExchangeError::NotForUs { addressed: request.responder, local });
    }
    let initiator = IdentityPublicKey::from_bytes_for(&request.initiator_identity, from)?;
    // The cheap freshness checks come before the signature, so a flood of
    // stale or replayed requests costs no Ed25519 verifications.
    let skew_ms = request.timestamp.as_millis().abs_diff(now.as_millis());
    if skew_ms > MAX_REQUEST_CLOCK_SKEW_MS {
        return Err(KeyExchangeError::Stale { skew_ms });
    }
    let mark = RequestMark { timestamp: request.timestamp, nonce: request.nonce };
    // A mark further ahead of our clock than any request we would accept
    // now was taken while our clock was wrong. Kept, it would refuse every
    // genuine request until real time caught up with it; the requests it
    // guarded against are refused as stale anyway, since they carry its
    // far-off time.
    let last = last.filter(|l| l.mark.timestamp.millis_since(now) <= MAX_REQUEST_CLOCK_SKEW_MS);
    if let Some(last) = last {
        let repeat = mark == last.mark && request.ephemeral == last.ack.initiator_ephemeral;
        if repeat {
            initiator.verify(&request_transcript(from, request), &request.signature.0)?;
            return Ok(Response::Repeat(last.ack.clone()));
        }
        if mark <= last.mark {
            return Err(KeyExchangeError::Replayed { initiator: *from });
        }
    }
    initiator.verify(&request_transcript(from, request), &request.signature.0)?;
    let ephemeral = RatchetKeyPair::generate(rng);
    let dh = ephemeral.diffie_hellman(&request.ephemeral).ok_or(KeyExchangeError::InvalidEphemeralKey)?;
    let transcript = ack_transcript(from, &local, request, ephemeral.public());
    let hash = transcript_hash(&transcript);
    let ack = KeyExchangeAck {
        responder_identity: identity.public().to_bytes(),
        initiator_ephemeral: request.ephemeral,
        request_nonce: request.nonce,
        ephemeral: *ephemeral.public(),
        signature: Signature64(identity.sign(&transcript)),
    };
    let (root, chain) = kdf::kx_root_step(&hash, &dh);
    let ratchet = DoubleRatchet::responder(root, chain, ephemeral, request.ephemeral);
    let session = Session::new(session_id(&hash), Role::Responder, &initiator, identity.public(), ratchet);
    let answered = AnsweredRequest { mark, ack: ack.clone() };
    Ok(Response::New(Box::new(Accepted { session, ack, answered })))
}

/// `"p2pchat/v1/kx-request" ‖ version ‖ initiator ID ‖ responder ID ‖ E_i ‖ t (u64 BE) ‖ nonce`.
pub fn request_transcript(initiator: &PeerId, request: &KeyExchangeRequest) -> Vec<u8> {
    let mut t = Vec::with_capacity(labels::KX_REQUEST.len() + 1 + 20 + 20 + 32 + 8 + 16);
    t.extend_from_slice(labels::KX_REQUEST);
    t.push(PROTOCOL_VERSION);
    t.extend_from_slice(&initiator.0);
    t.extend_from_slice(&request.responder.0);
    t.extend_from_slice(&request.ephemeral);
    t.extend_from_slice(&request.timestamp.as_millis().to_be_bytes());
    t.extend_from_slice(&request.nonce);
    t
}

/// `"p2pchat/v1/kx-ack" ‖ version ‖ initiator ID ‖ responder ID ‖ E_i ‖ t (u64 BE) ‖ nonce ‖ E_r`.
pub fn ack_transcript(
    initiator: &PeerId,
    responder: &PeerId,
    request: &KeyExchangeRequest,
    responder_ephemeral: &[u8; 32],
) -> Vec<u8> {
    let mut t = Vec::with_capacity(labels::KX_ACK.len() + 1 + 20 + 20 + 32 + 8 + 16 + 32);
    t.extend_from_slice(labels::KX_ACK);
    t.push(PROTOCOL_VERSION);
    t.extend_from_slice(&initiator.0);
    t.extend_from_slice(&responder.0);
    t.extend_from_slice(&request.ephemeral);
    t.extend_from_slice(&request.timestamp.as_millis().to_be_bytes());
    t.extend_from_slice(&request.nonce);
    t.extend_from_slice(responder_ephemeral);
    t
}

/// `SHA-256("p2pchat/v1/kx-transcript" ‖ ack transcript)`.
pub fn transcript_hash(ack_transcript: &[u8]) -> [u8; 32] {
    Sha256::new().chain_update(labels::KX_TRANSCRIPT).chain_update(ack_transcript).finalize().into()
}

fn session_id(hash: &[u8; 32]) -> SessionId {
    let mut id = [0u8; 16];
    id.copy_from_slice(&hash[..16]);
    SessionId(id)
}

/// The X25519 public key of a secret (for known-answer vectors).
pub fn x25519_public_of(secret: &crate::keys::X25519Secret) -> [u8; 32] {
    x25519_dalek::PublicKey::from(&StaticSecret::from(*secret.as_bytes())).to_bytes()
}

/// The persisted form of a [`PendingKeyExchange`].
#[derive(serde::Serialize, serde::Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
struct PendingState {
    local: [u8; 32],
    ephemeral_secret: [u8; 32],
    #[zeroize(skip)]
    request: KeyExchangeRequest,
}

impl PendingKeyExchange {
    /// The pending exchange as bytes (with its ephemeral secret: seal it).
    pub fn to_bytes(&self) -> zeroize::Zeroizing<Vec<u8>> {
        crate::state::encode(&PendingState {
            local: self.local.to_bytes(),
            ephemeral_secret: *self.ephemeral.secret().as_bytes(),
            request: self.request.clone(),
        })
    }

    /// Restores an exchange saved by [`PendingKeyExchange::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, crate::state::StateError> {
        let state: PendingState = crate::state::decode(bytes, "pending key exchange")?;
        let local = IdentityPublicKey::from_bytes(&state.local)
            .map_err(|_| crate::state::StateError::InvalidKey("local identity"))?;
        Ok(Self {
            local,
            responder: state.request.responder,
            ephemeral: RatchetKeyPair::from_secret(StaticSecret::from(state.ephemeral_secret)),
            request: state.request.clone(),
        })
    }
}
