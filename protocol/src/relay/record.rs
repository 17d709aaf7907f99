//! Signed peer records: how a node tells others where it can be reached.

use serde::{Deserialize, Serialize};

use crate::identity::{IdentityError, IdentityKeyPair, IdentityPublicKey};
use crate::ids::PeerId;
use crate::time::Timestamp;
use crate::wire::{decode_exact, encode_postcard, Signature64, WireError, PROTOCOL_VERSION};

/// Signature transcript prefix of a peer record.
pub const PEER_RECORD_LABEL: &[u8] = b"p2pchat/v1/peer-record";

/// The most addresses of each kind a record may list, and their longest text.
pub const MAX_ADDRESSES: usize = 16;
/// The longest address, in bytes.
pub const MAX_ADDRESS_LEN: usize = 256;

/// Why a peer record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The key does not hash to the peer ID, is invalid, or the signature
    /// does not verify.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The record's expiry has passed.
    #[error("peer record expired at {expires_at:?}")]
    Expired {
        /// Its expiry.
        expires_at: Timestamp,
    },
    /// A record with the same or a higher sequence number is already known.
    #[error("peer record sequence {got} is not newer than {known}")]
    Stale {
        /// The known sequence.
        known: u64,
        /// The offered sequence.
        got: u64,
    },
    /// Too many or too long addresses.
    #[error(
        "peer record lists more than {MAX_ADDRESSES} addresses of a kind, or one longer than {MAX_ADDRESS_LEN} bytes"
    )]
    TooLarge,
}

/// What a node publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// The node.
    pub peer_id: PeerId,
    /// Its identity key (hashes to `peer_id`).
    pub identity_key: [u8; 32],
    /// Addresses it can be dialled at directly.
    pub direct_addresses: Vec<String>,
    /// Relays it is registered with.
    pub relay_addresses: Vec<String>,
    /// When it was signed (the node's clock).
    pub timestamp: Timestamp,
    /// When it stops being valid.
    pub expires_at: Timestamp,
    /// Increases with every record the node publishes.
    pub sequence: u64,
    /// Ed25519 over the record transcript.
    pub signature: Signature64,
}

impl PeerRecord {
    /// A signed record.
    pub fn sign(
        identity: &IdentityKeyPair,
        direct_addresses: Vec<String>,
        relay_addresses: Vec<String>,
        now: Timestamp,
        expires_at: Timestamp,
        sequence: u64,
    ) -> Self {
        let mut record = Self {
            peer_id: identity.peer_id(),
            identity_key: identity.public().to_bytes(),
            direct_addresses,
            relay_addresses,
            timestamp: now,
            expires_at,
            sequence,
            signature: Signature64([0; 64]),
        };
        record.signature = Signature64(identity.sign(&record.transcript()));
        record
    }

    /// `"p2pchat/v1/peer-record" ‖ version ‖ postcard(record with a zero signature)`.
    pub fn transcript(&self) -> Vec<u8> {
        let unsigned = Self { signature: Signature64([0; 64]), ..self.clone() };
        let mut t = PEER_RECORD_LABEL.to_vec();
        t.push(PROTOCOL_VERSION);
        t.extend_from_slice(&encode_postcard(&unsigned));
        t
    }

    /// Checks the record as every reader must: sizes, the key against the
    /// peer ID, the signature, the expiry, and that it is newer than
    /// `known_sequence`.
    pub fn verify(&self, now: Timestamp, known_sequence: Option<u64>) -> Result<(), RecordError> {
        self.verify_signature()?;
        if self.expires_at <= now {
            return Err(RecordError::Expired { expires_at: self.expires_at });
        }
        if let Some(known) = known_sequence {
            if self.sequence <= known {
                return Err(RecordError::Stale { known, got: self.sequence });
            }
        }
        Ok(())
    }

    /// Checks sizes, the key against the peer ID and the signature, but not
    /// the expiry: for a record this node kept itself, whose peer is most
    /// likely still on the relays it lists after it expired.
    pub fn verify_signature(&self) -> Result<(), RecordError> {
        let too_many = |a: &Vec<String>| a.len() > MAX_ADDRESSES || a.iter().any(|s| s.len() > MAX_ADDRESS_LEN);
        if too_many(&self.direct_addresses) || too_many(&self.relay_addresses) {
            return Err(RecordError::TooLarge);
        }
        let key = IdentityPublicKey::from_bytes_for(&self.identity_key, &self.peer_id)?;
        key.verify(&self.transcript(), &self.signature.0)?;
        Ok(())
    }

    /// The record as kept and as carried in frames (postcard).
    pub fn encode(&self) -> Vec<u8> {
        encode_postcard(self)
    }

    /// Decodes a record encoded by [`PeerRecord::encode`] (checks nothing
    /// but the encoding).
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        decode_exact(bytes, "peer record")
    }
}
