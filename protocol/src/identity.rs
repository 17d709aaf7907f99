//! Long-term Ed25519 identities and the peer IDs derived from them.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::PeerId;

/// Why an identity key or signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The 32 bytes are not a valid compressed Ed25519 point.
    #[error("the identity public key is not a valid Ed25519 point")]
    InvalidPublicKey,
    /// The identity key does not hash to the peer ID it claims to be.
    #[error("identity key hashes to {actual}, but the message claims to come from {expected}")]
    PeerIdMismatch {
        /// The peer ID the caller expected.
        expected: PeerId,
        /// The peer ID the presented key hashes to.
        actual: PeerId,
    },
    /// Strict Ed25519 verification failed.
    #[error("the Ed25519 signature does not verify under the identity key")]
    BadSignature,
}

/// A node's long-term Ed25519 identity key pair. The secret half is zeroized
/// on drop and never printed.
pub struct IdentityKeyPair {
    signing: SigningKey,
    public: IdentityPublicKey,
}

impl IdentityKeyPair {
    /// A fresh identity from the caller's RNG.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        Self::from_signing_key(SigningKey::generate(rng))
    }

    /// An identity from its 32-byte Ed25519 seed (for restoring from storage).
    pub fn from_seed(seed: &crate::keys::IdentitySeed) -> Self {
        Self::from_signing_key(SigningKey::from_bytes(seed.as_bytes()))
    }

    fn from_signing_key(signing: SigningKey) -> Self {
        let public = IdentityPublicKey::from_verifying_key(signing.verifying_key());
        Self { signing, public }
    }

    /// The 32-byte Ed25519 seed, for sealing into storage.
    pub fn seed(&self) -> crate::keys::IdentitySeed {
        crate::keys::IdentitySeed::from_bytes(self.signing.to_bytes())
    }

    /// The public half.
    pub fn public(&self) -> &IdentityPublicKey {
        &self.public
    }

    /// This identity's peer ID.
    pub fn peer_id(&self) -> PeerId {
        self.public.peer_id()
    }

    /// An Ed25519 signature over `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }
}

impl core::fmt::Debug for IdentityKeyPair {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IdentityKeyPair").field("peer_id", &self.public.peer_id).finish_non_exhaustive()
    }
}

/// An Ed25519 identity public key, already decompressed and with its peer ID
/// computed, so that verification costs only the verification.
#[derive(Clone, PartialEq, Eq)]
pub struct IdentityPublicKey {
    key: VerifyingKey,
    peer_id: PeerId,
}

impl IdentityPublicKey {
    /// Parses a compressed Ed25519 public key.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, IdentityError> {
        let key = parse_verifying_key(bytes).ok_or(IdentityError::InvalidPublicKey)?;
        Ok(Self::from_verifying_key(key))
    }

    /// Parses a key and checks that it hashes to `expected`.
    pub fn from_bytes_for(bytes: &[u8; 32], expected: &PeerId) -> Result<Self, IdentityError> {
        let actual = peer_id_of(bytes);
        if actual != *expected {
            return Err(IdentityError::PeerIdMismatch { expected: *expected, actual });
        }
        Self::from_bytes(bytes)
    }

    fn from_verifying_key(key: VerifyingKey) -> Self {
        let peer_id = peer_id_of(key.as_bytes());
        Self { key, peer_id }
    }

    /// The compressed 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The peer ID: the first 20 bytes of SHA-256 of the compressed key.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Strict Ed25519 verification (rejects small-order and non-canonical inputs).
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> Result<(), IdentityError> {
        let signature = Signature::from_bytes(signature);
        self.key.verify_strict(message, &signature).map_err(|_| IdentityError::BadSignature)
    }
}

impl core::fmt::Debug for IdentityPublicKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "IdentityPublicKey({})", self.peer_id)
    }
}

impl Serialize for IdentityPublicKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_bytes().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for IdentityPublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = <[u8; 32]>::deserialize(deserializer)?;
        Self::from_bytes(&bytes).map_err(serde::de::Error::custom)
    }
}

/// Parses an Ed25519 public key strictly: the encoding must be canonical (so
/// each key has one peer ID) and the point must not be of small order.
pub(crate) fn parse_verifying_key(bytes: &[u8; 32]) -> Option<VerifyingKey> {
    let key = VerifyingKey::from_bytes(bytes).ok()?;
    if key.is_weak() || key.to_edwards().compress().to_bytes() != *bytes {
        return None;
    }
    Some(key)
}

/// The peer ID of a compressed Ed25519 public key.
pub fn peer_id_of(public_key: &[u8; 32]) -> PeerId {
    let digest = Sha256::digest(public_key);
    let mut id = [0u8; 20];
    id.copy_from_slice(&digest[..20]);
    PeerId(id)
}
