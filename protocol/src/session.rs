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
use crate::ratchet::{DecryptionError, DoubleRatchet, EncryptError};
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
/// exchange, so there is no way to encrypt before one.
#[derive(Clone)]
pub struct Session {
    id: SessionId,
    role: Role,
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
        Self { id, role, local, remote, conversation_id, binding, ratchet }
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
        self.ratchet.skipped_key_count()
    }

    /// Deletes skipped keys created before `cutoff` (the 7-day retention
    /// rule); returns how many went.
    pub fn remove_skipped_keys_created_before(&mut self, cutoff: Timestamp) -> usize {
        self.ratchet.remove_skipped_keys_created_before(cutoff)
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

/// The sessions with one peer: the current one, and the one it replaced,
/// which stays usable for decryption until a message decrypts under the new
/// one (so messages in flight across a re-key are not lost).
#[derive(Clone, Debug)]
pub struct PairwiseSessions {
    current: Session,
    previous: Option<Session>,
}

impl PairwiseSessions {
    /// Starts with one session.
    pub fn new(session: Session) -> Self {
        Self { current: session, previous: None }
    }

    /// Installs a session from a new key exchange; the old current one is
    /// kept for decryption only.
    pub fn replace(&mut self, session: Session) {
        let old = core::mem::replace(&mut self.current, session);
        self.previous = Some(old);
    }

    /// The session new messages are encrypted under.
    pub fn current(&self) -> &Session {
        &self.current
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
    /// the current session retires the previous one.
    pub fn decrypt(&mut self, message: &RatchetMessage, now: Timestamp) -> Result<Zeroizing<Vec<u8>>, DecryptionError> {
        if message.header.session_id == self.current.id.0 {
            let plaintext = self.current.decrypt(message, now)?;
            self.previous = None;
            return Ok(plaintext);
        }
        match &mut self.previous {
            Some(previous) if message.header.session_id == previous.id.0 => previous.decrypt(message, now),
            _ => Err(DecryptionError::UnknownSession),
        }
    }
}
