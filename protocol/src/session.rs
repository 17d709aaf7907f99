//! A pairwise session: a Double Ratchet bound to two identities, one
//! conversation and one key exchange.

use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::aead;
use crate::identity::IdentityPublicKey;
use crate::ids::{ConversationId, PeerId};
use crate::kdf::{self, labels};
use crate::ratchet::{DecryptionError, DoubleRatchet, EncryptError, RatchetState};
use crate::skipped::{enforce_shared_budget, SKIPPED_KEY_MAX_AGE_MS};
use crate::state::{self, StateError};
use crate::time::Timestamp;
use crate::wire::RatchetMessage;

/// Identifies one key exchange: the first 16 bytes of its transcript hash.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct SessionId(pub [u8; 16]);

impl core::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("SessionId(")?;
        crate::ids::write_hex(f, &self.0)?;
        f.write_str(")")
    }
}

/// Which side of the key exchange this session was on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// Sent the request.
    Initiator,
    /// Sent the ack.
    Responder,
}

/// An established 1:1 session. It can only exist after a completed key
/// exchange, so there is no way to encrypt before one. It is deliberately not
/// `Clone`: two copies would reuse message keys.
pub struct Session {
    id: SessionId,
    role: Role,
    /// Both identity keys, kept for persistence (the binding covers them).
    initiator: [u8; 32],
    responder: [u8; 32],
    local: PeerId,
    remote: PeerId,
    conversation_id: ConversationId,
    binding: [u8; 32],
    ratchet: DoubleRatchet,
}

impl Session {
    pub(crate) fn new(
        id: SessionId,
        role: Role,
        initiator: &IdentityPublicKey,
        responder: &IdentityPublicKey,
        ratchet: DoubleRatchet,
    ) -> Self {
        let (local, remote) = match role {
            Role::Initiator => (initiator.peer_id(), responder.peer_id()),
            Role::Responder => (responder.peer_id(), initiator.peer_id()),
        };
        let conversation_id = ConversationId::for_peers(&local, &remote);
        let binding = associated_data(initiator, responder, &conversation_id, &id);
        Self {
            id,
            role,
            initiator: initiator.to_bytes(),
            responder: responder.to_bytes(),
            local,
            remote,
            conversation_id,
            binding,
            ratchet,
        }
    }

    /// The key exchange this session came from.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// Which side of the key exchange this node was on.
    pub fn role(&self) -> Role {
        self.role
    }

    /// This node.
    pub fn local_peer(&self) -> PeerId {
        self.local
    }

    /// The other node.
    pub fn remote_peer(&self) -> PeerId {
        self.remote
    }

    /// The 1:1 conversation this session encrypts.
    pub fn conversation_id(&self) -> ConversationId {
        self.conversation_id
    }

    /// The associated-data binding every header tag covers.
    pub fn binding(&self) -> &[u8; 32] {
        &self.binding
    }

    /// Encrypts one message. On error nothing changed.
    pub fn encrypt(
        &mut self,
        plaintext: &[u8],
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<RatchetMessage, EncryptError> {
        let sealed = self.ratchet.next_sending_key(self.id.0, rng)?;
        let keys = kdf::expand_ratchet_message_key(&sealed.message_key);
        let header_tag = kdf::ratchet_header_tag(&keys.header_key, &self.binding, &sealed.header.to_bytes());
        let ciphertext = aead::seal(&keys.cipher_key, &keys.nonce, plaintext);
        Ok(RatchetMessage { header: sealed.header, header_tag, ciphertext })
    }

    /// Decrypts one message. The state moves only if the message
    /// authenticates; on error the session is exactly as it was.
    pub fn decrypt(&mut self, message: &RatchetMessage, now: Timestamp) -> Result<Zeroizing<Vec<u8>>, DecryptionError> {
        if message.header.session_id != self.id.0 {
            return Err(DecryptionError::UnknownSession);
        }
        let staged = self.ratchet.stage(&message.header)?;
        let keys = kdf::expand_ratchet_message_key(&staged.message_key);
        let expected = kdf::ratchet_header_tag(&keys.header_key, &self.binding, &message.header.to_bytes());
        if !bool::from(expected.ct_eq(&message.header_tag)) {
            return Err(DecryptionError::HeaderMismatch);
        }
        let plaintext =
            aead::open(&keys.cipher_key, &keys.nonce, &message.ciphertext).ok_or(DecryptionError::BadMac)?;
        self.ratchet.commit(staged, now);
        Ok(plaintext)
    }

    /// How many skipped message keys are cached.
    pub fn skipped_key_count(&self) -> usize {
        self.ratchet.skipped_keys().len()
    }

    /// This node's current ratchet public key (for test vectors and logs).
    pub fn our_ratchet_public_key(&self) -> [u8; 32] {
        *self.ratchet.our_ratchet_key().public()
    }
}

impl core::fmt::Debug for Session {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("role", &self.role)
            .field("local", &self.local)
            .field("remote", &self.remote)
            .field("conversation_id", &self.conversation_id)
            .finish_non_exhaustive()
    }
}

/// `SHA-256("p2pchat/v1/ratchet-ad" ‖ initiator identity ‖ responder identity
/// ‖ conversation ID ‖ session ID)`.
fn associated_data(
    initiator: &IdentityPublicKey,
    responder: &IdentityPublicKey,
    conversation_id: &ConversationId,
    session_id: &SessionId,
) -> [u8; 32] {
    Sha256::new()
        .chain_update(labels::RATCHET_AD)
        .chain_update(initiator.to_bytes())
        .chain_update(responder.to_bytes())
        .chain_update(conversation_id.as_bytes())
        .chain_update(session_id.0)
        .finalize()
        .into()
}

/// Why a session could not be installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstallError {
    /// A session with this ID is already held (a duplicated ack or request).
    #[error("session {0:?} is already installed; a repeated key exchange message changes nothing")]
    AlreadyInstalled(SessionId),
    /// The session is with another peer.
    #[error("session is with {got}, not with {expected}")]
    WrongPeer {
        /// The peer these sessions are with.
        expected: PeerId,
        /// The peer the new session is with.
        got: PeerId,
    },
}

/// All sessions with one peer.
///
/// - `current` encrypts. It is *confirmed* once the peer is known to hold it:
///   at once for a session this node initiated (the ack proves it), and on
///   the first message that decrypts under it for one this node answered.
/// - `pending` is a session this node answered while `current` was
///   confirmed: the initiator may never complete it (its ack may be lost, or
///   the request was the loser of crossed requests), so it takes over only
///   when a message decrypts under it.
/// - `previous` is the session the current one replaced, kept for decryption
///   until a message decrypts under the current one, so messages in flight
///   across a re-key are not lost.
///
/// The skipped-key budget ([`MAX_SKIPPED_KEYS`](crate::MAX_SKIPPED_KEYS)) is
/// shared by all three.
pub struct PairwiseSessions {
    current: Session,
    confirmed: bool,
    pending: Option<Session>,
    previous: Option<Session>,
}

impl core::fmt::Debug for PairwiseSessions {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PairwiseSessions")
            .field("current", &self.current)
            .field("confirmed", &self.confirmed)
            .field("pending", &self.pending)
            .field("previous", &self.previous)
            .finish()
    }
}

impl PairwiseSessions {
    /// Starts with one session.
    pub fn new(session: Session) -> Self {
        let confirmed = session.role == Role::Initiator;
        Self { current: session, confirmed, pending: None, previous: None }
    }

    /// Installs a session from a new key exchange with the same peer.
    pub fn install(&mut self, session: Session) -> Result<(), InstallError> {
        if session.remote != self.current.remote {
            return Err(InstallError::WrongPeer { expected: self.current.remote, got: session.remote });
        }
        if self.sessions().any(|held| held.id == session.id) {
            return Err(InstallError::AlreadyInstalled(session.id));
        }
        match session.role {
            Role::Initiator => {
                // The peer answered our request, so it holds this session; any
                // session we answered meanwhile lost the crossing.
                self.pending = None;
                self.promote(session, true);
            }
            Role::Responder if self.confirmed => self.pending = Some(session),
            Role::Responder => self.promote(session, false),
        }
        Ok(())
    }

    fn promote(&mut self, session: Session, confirmed: bool) {
        let old = core::mem::replace(&mut self.current, session);
        self.previous = Some(old);
        self.confirmed = confirmed;
    }

    fn sessions(&self) -> impl Iterator<Item = &Session> {
        core::iter::once(&self.current).chain(self.pending.iter()).chain(self.previous.iter())
    }

    fn sessions_mut(&mut self) -> impl Iterator<Item = &mut Session> {
        core::iter::once(&mut self.current).chain(self.pending.iter_mut()).chain(self.previous.iter_mut())
    }

    /// The session new messages are encrypted under.
    pub fn current(&self) -> &Session {
        &self.current
    }

    /// Whether the peer is known to hold the current session.
    pub fn is_confirmed(&self) -> bool {
        self.confirmed
    }

    /// A session this node answered that has not yet taken over.
    pub fn pending(&self) -> Option<&Session> {
        self.pending.as_ref()
    }

    /// The replaced session, while it is still kept.
    pub fn previous(&self) -> Option<&Session> {
        self.previous.as_ref()
    }

    /// Encrypts under the current session.
    pub fn encrypt(
        &mut self,
        plaintext: &[u8],
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<RatchetMessage, EncryptError> {
        self.current.encrypt(plaintext, rng)
    }

    /// Decrypts under whichever session the message names. A success under
    /// the current session confirms it and retires the previous one; a
    /// success under the pending one makes it the current one and retires
    /// the session it replaces.
    pub fn decrypt(&mut self, message: &RatchetMessage, now: Timestamp) -> Result<Zeroizing<Vec<u8>>, DecryptionError> {
        let id = message.header.session_id;
        let plaintext = if id == self.current.id.0 {
            let plaintext = self.current.decrypt(message, now)?;
            self.confirmed = true;
            self.previous = None;
            plaintext
        } else if let Some(pending) = self.pending.as_mut().filter(|p| p.id.0 == id) {
            let plaintext = pending.decrypt(message, now)?;
            if let Some(pending) = self.pending.take() {
                // A message under the new session retires the old one at once.
                self.current = pending;
                self.confirmed = true;
                self.previous = None;
            }
            plaintext
        } else if let Some(previous) = self.previous.as_mut().filter(|p| p.id.0 == id) {
            previous.decrypt(message, now)?
        } else {
            return Err(DecryptionError::UnknownSession);
        };
        self.enforce_skipped_key_budget();
        Ok(plaintext)
    }

    /// Evicts the oldest skipped keys across all sessions beyond the shared
    /// budget.
    fn enforce_skipped_key_budget(&mut self) {
        enforce_shared_budget(self.sessions_mut().map(|s| s.ratchet.skipped_keys_mut()).collect());
    }

    /// Skipped keys cached across all sessions with this peer.
    pub fn skipped_key_count(&self) -> usize {
        self.sessions().map(Session::skipped_key_count).sum()
    }

    /// Deletes skipped keys older than [`SKIPPED_KEY_MAX_AGE_MS`] (the 7-day
    /// retention rule) from every session; returns how many went.
    pub fn expire_skipped_keys(&mut self, now: Timestamp) -> usize {
        let cutoff = Timestamp(now.as_millis().saturating_sub(SKIPPED_KEY_MAX_AGE_MS));
        self.sessions_mut().map(|s| s.ratchet.skipped_keys_mut().remove_created_before(cutoff)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{ChainKey, RootKey};
    use crate::ratchet::RatchetKeyPair;
    use rand_core::SeedableRng;
    use x25519_dalek::StaticSecret;

    /// A responder session whose ratchet is fixed, so two sessions differ only
    /// in the identities and conversation their binding covers.
    fn fixed_session(initiator: &IdentityPublicKey, responder: &IdentityPublicKey) -> Session {
        let ratchet = DoubleRatchet::responder(
            RootKey::from_bytes([1; 32]),
            ChainKey::from_bytes([2; 32]),
            RatchetKeyPair::from_secret(StaticSecret::from([3; 32])),
            *RatchetKeyPair::from_secret(StaticSecret::from([4; 32])).public(),
        );
        Session::new(SessionId([5; 16]), Role::Responder, initiator, responder, ratchet)
    }

    #[test]
    fn the_binding_covers_identities_and_conversation() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let ids: Vec<_> = (0..3).map(|_| crate::IdentityKeyPair::generate(&mut rng).public().clone()).collect();
        let message = fixed_session(&ids[0], &ids[1]).encrypt(b"bound", &mut rng).unwrap();
        // A receiver with the very same ratchet state but another identity
        // (hence another binding and conversation) refuses the header.
        let make_receiver = |initiator: &IdentityPublicKey, responder: &IdentityPublicKey| {
            let ratchet = DoubleRatchet::initiator(
                RootKey::from_bytes([1; 32]),
                ChainKey::from_bytes([2; 32]),
                RatchetKeyPair::from_secret(StaticSecret::from([4; 32])),
                *RatchetKeyPair::from_secret(StaticSecret::from([3; 32])).public(),
            );
            Session::new(SessionId([5; 16]), Role::Initiator, initiator, responder, ratchet)
        };
        let mut right = make_receiver(&ids[0], &ids[1]);
        let mut wrong_initiator = make_receiver(&ids[2], &ids[1]);
        let mut swapped = make_receiver(&ids[1], &ids[0]);
        assert_eq!(wrong_initiator.decrypt(&message, Timestamp(0)).unwrap_err(), DecryptionError::HeaderMismatch);
        assert_eq!(swapped.decrypt(&message, Timestamp(0)).unwrap_err(), DecryptionError::HeaderMismatch);
        assert_eq!(&right.decrypt(&message, Timestamp(0)).unwrap()[..], b"bound");
    }

    #[test]
    fn a_session_id_already_held_is_not_installed_again() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(4);
        let a = crate::IdentityKeyPair::generate(&mut rng).public().clone();
        let b = crate::IdentityKeyPair::generate(&mut rng).public().clone();
        let mut sessions = PairwiseSessions::new(fixed_session(&a, &b));
        assert_eq!(
            sessions.install(fixed_session(&a, &b)).unwrap_err(),
            InstallError::AlreadyInstalled(SessionId([5; 16]))
        );
        assert!(sessions.previous().is_none() && sessions.pending().is_none());
    }
}

/// The persisted form of a [`Session`].
#[derive(serde::Serialize, serde::Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
struct SessionState {
    id: [u8; 16],
    initiator_role: bool,
    initiator: [u8; 32],
    responder: [u8; 32],
    ratchet: RatchetState,
}

/// The persisted form of a [`PairwiseSessions`].
#[derive(serde::Serialize, serde::Deserialize)]
struct PairwiseState {
    current: SessionState,
    confirmed: bool,
    pending: Option<SessionState>,
    previous: Option<SessionState>,
}

impl Session {
    fn to_state(&self) -> SessionState {
        SessionState {
            id: self.id.0,
            initiator_role: self.role == Role::Initiator,
            initiator: self.initiator,
            responder: self.responder,
            ratchet: self.ratchet.to_state(),
        }
    }

    fn from_state(state: &SessionState) -> Result<Self, StateError> {
        let initiator = IdentityPublicKey::from_bytes(&state.initiator)
            .map_err(|_| StateError::InvalidKey("initiator identity"))?;
        let responder = IdentityPublicKey::from_bytes(&state.responder)
            .map_err(|_| StateError::InvalidKey("responder identity"))?;
        let role = if state.initiator_role { Role::Initiator } else { Role::Responder };
        let ratchet = DoubleRatchet::from_state(&state.ratchet);
        Ok(Self::new(SessionId(state.id), role, &initiator, &responder, ratchet))
    }
}

impl PairwiseSessions {
    /// Everything needed to restore these sessions, secrets included: seal it
    /// before it is stored.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        state::encode(&PairwiseState {
            current: self.current.to_state(),
            confirmed: self.confirmed,
            pending: self.pending.as_ref().map(Session::to_state),
            previous: self.previous.as_ref().map(Session::to_state),
        })
    }

    /// Restores sessions saved by [`PairwiseSessions::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let state: PairwiseState = state::decode(bytes, "pairwise sessions")?;
        Ok(Self {
            current: Session::from_state(&state.current)?,
            confirmed: state.confirmed,
            pending: state.pending.as_ref().map(Session::from_state).transpose()?,
            previous: state.previous.as_ref().map(Session::from_state).transpose()?,
        })
    }
}
