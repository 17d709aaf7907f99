//! Why a group message or sender key was refused.
//!
//! Its own module so that the group (`group`) and the sender keys it holds
//! (`sender_key`) can both name it without depending on each other.

use crate::ids::{ConversationId, PeerId};

/// Why a group message or sender key was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// The message or key is for another group.
    #[error("message is for group {got}, not {expected}")]
    WrongGroup {
        /// This group.
        expected: ConversationId,
        /// The group named.
        got: ConversationId,
    },
    /// The sender is not a current member of the group.
    #[error("{peer} is not a member of this group")]
    NotAMember {
        /// The sender named.
        peer: PeerId,
    },
    /// A sender key distribution arrived over another member's channel.
    #[error("sender key of {claimed} arrived over the channel of {channel}; only a key's owner may distribute it")]
    ForwardedKey {
        /// Whose key the distribution claims to be.
        claimed: PeerId,
        /// Who actually sent it.
        channel: PeerId,
    },
    /// No sender key with this ID is held for the sender.
    #[error("no sender key {key_id} is held for {sender}; ask the sender for it")]
    UnknownChain {
        /// The sender.
        sender: PeerId,
        /// The key ID named.
        key_id: u32,
    },
    /// The signature does not verify under the sender key's signing key.
    #[error("group message signature does not verify")]
    BadSignature,
    /// The signed ciphertext does not decrypt.
    #[error("group message ciphertext failed authentication")]
    BadMac,
    /// This message number was already decrypted (or its key expired).
    #[error("group message {message_number} from {sender} was already received (or its key expired)")]
    Duplicate {
        /// The sender.
        sender: PeerId,
        /// The message number.
        message_number: u32,
    },
    /// The message would need more skipped keys than allowed.
    #[error("group message is {skip} messages ahead of the chain; at most {max} may be skipped")]
    TooFarAhead {
        /// Keys that would have to be skipped.
        skip: u64,
        /// [`MAX_SKIP`](crate::MAX_SKIP).
        max: u32,
    },
    /// The distributed signing key is not a valid Ed25519 point.
    #[error("the distributed signing key is not a valid Ed25519 public key")]
    InvalidSigningKey,
    /// A distribution reuses a key ID with different key material.
    #[error("{sender} distributed sender key {key_id} twice with different keys")]
    ConflictingKey {
        /// The sender.
        sender: PeerId,
        /// The reused key ID.
        key_id: u32,
    },
    /// Our sending chain has used every message number.
    #[error("the sender key chain is exhausted; rotate it with GroupSession::rotate_own_key")]
    ChainExhausted,
    /// The group would exceed its member limit.
    #[error("a group has at most {max} members")]
    TooManyMembers {
        /// The limit.
        max: usize,
    },
}
