//! The frames between a node and its relay. Like envelopes: one version
//! byte, then postcard; decoding is total and canonical.

use serde::{Deserialize, Serialize};

use super::record::PeerRecord;
pub use crate::engine::Refusal;
use crate::ids::PeerId;
use crate::wire::{decode_exact, encode_postcard, WireError, MAX_ENVELOPE_LEN, PROTOCOL_VERSION};

/// The number of [`RelayFrame`] kinds this version knows.
const RELAY_FRAME_KINDS: u32 = 15;

/// The largest frame: an envelope of [`MAX_ENVELOPE_LEN`] plus headers.
pub const MAX_FRAME_LEN: usize = MAX_ENVELOPE_LEN + 1024;

/// Why the relay did not store a published record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PublishRefusal {
    /// The publisher has not registered on this connection. Register first.
    NotRegistered,
    /// The publisher is over its rate limit. Try again later.
    Rate,
    /// The record is for another peer than the connection's.
    OtherPeer,
    /// The record stays valid longer than this relay keeps records. Sign one
    /// with a shorter lifetime.
    LifetimeTooLong,
    /// The record failed verification (key, signature, expiry or size).
    Invalid,
    /// The relay holds a record with this sequence or a higher one. Sign a
    /// new record with a higher sequence.
    Stale,
    /// The relay holds as many records as it is configured for, and none
    /// it may evict. Use another relay, or try again later.
    Full,
    /// The relay holds as many records published from the publisher's
    /// network address as it keeps for one address. Use another relay.
    TooManyFromAddress,
}

impl PublishRefusal {
    /// The reason as shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotRegistered => "publish before registering",
            Self::Rate => "publishing too fast for the relay's rate limit",
            Self::OtherPeer => "peer record for another peer",
            Self::LifetimeTooLong => "peer record valid for longer than this relay keeps records",
            Self::Invalid => "peer record failed verification",
            Self::Stale => "peer record not newer than the one the relay holds",
            Self::Full => "the relay holds as many peer records as it keeps",
            Self::TooManyFromAddress => "the relay holds as many peer records from this address as it keeps",
        }
    }
}

/// Every frame. New kinds are only appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayFrame {
    /// Node → relay: mark me reachable (my peer ID is the connection's).
    Register,
    /// Relay → node: registered.
    Registered,
    /// Node → relay: store my signed record.
    Publish(PeerRecord),
    /// Node → relay: what do you know of this peer?
    Lookup {
        /// The peer.
        peer: PeerId,
    },
    /// Relay → node: the answer to a lookup.
    LookupResult {
        /// The peer asked about.
        peer: PeerId,
        /// Its newest valid record, if any.
        record: Option<PeerRecord>,
    },
    /// Node → relay: pass this envelope to `to`, or hold it.
    Forward {
        /// The recipient.
        to: PeerId,
        /// The sender's ID for this request, echoed in the answer.
        id: u64,
        /// Whether it may wait in the recipient's mailbox.
        mailbox_allowed: bool,
        /// The opaque envelope.
        envelope: Vec<u8>,
    },
    /// Relay → node: passed on to the connected recipient.
    Forwarded {
        /// The request.
        id: u64,
    },
    /// Relay → node: stored in the recipient's mailbox.
    Held {
        /// The request.
        id: u64,
    },
    /// Relay → node: refused.
    Refused {
        /// The request.
        id: u64,
        /// Why.
        reason: Refusal,
    },
    /// Relay → node: an envelope for you.
    Deliver {
        /// Its sender (as its connection authenticated it).
        from: PeerId,
        /// Set when it came from your mailbox: acknowledge it to delete it.
        mailbox_id: Option<u64>,
        /// The opaque envelope.
        envelope: Vec<u8>,
    },
    /// Node → relay: send me my mailbox again.
    FetchMailbox,
    /// Node → relay: these mailbox entries arrived; delete them.
    MailboxAck {
        /// Their IDs.
        ids: Vec<u64>,
    },
    /// Relay → node: your record with this sequence is stored.
    Published {
        /// The record's sequence.
        sequence: u64,
    },
    /// Relay → node: your record with this sequence was not stored.
    PublishRefused {
        /// The record's sequence.
        sequence: u64,
        /// Why.
        reason: PublishRefusal,
    },
    /// Relay → node, after `Registered`: the address this connection comes
    /// from as the relay sees it (`ip:port`, after any NAT on the way). A
    /// node that takes direct connections may publish it.
    Observed {
        /// The address, written like a socket address.
        address: String,
    },
}

impl RelayFrame {
    /// version byte ‖ postcard.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![PROTOCOL_VERSION];
        out.extend_from_slice(&encode_postcard(self));
        out
    }

    /// Decodes a frame; total, canonical-only.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_FRAME_LEN {
            return Err(WireError::TooLarge { len: bytes.len(), max: MAX_FRAME_LEN });
        }
        let (&version, rest) = bytes.split_first().ok_or(WireError::Empty)?;
        if version != PROTOCOL_VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        let (kind, _) = postcard::take_from_bytes::<u32>(rest)
            .map_err(|e| WireError::Malformed { what: "relay frame kind", reason: e.to_string() })?;
        if kind >= RELAY_FRAME_KINDS {
            return Err(WireError::UnknownKind(kind));
        }
        decode_exact(rest, "relay frame")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_malformed_frames_are_named() {
        assert_eq!(RelayFrame::decode(&[PROTOCOL_VERSION, 15]), Err(WireError::UnknownKind(15)));
        assert_eq!(RelayFrame::decode(&[PROTOCOL_VERSION, 12, 7]), Ok(RelayFrame::Published { sequence: 7 }));
        assert_eq!(RelayFrame::decode(&[PROTOCOL_VERSION, 11, 0]), Ok(RelayFrame::MailboxAck { ids: vec![] }));
        assert!(matches!(RelayFrame::decode(&[PROTOCOL_VERSION, 5]), Err(WireError::Malformed { .. })));
    }
}
