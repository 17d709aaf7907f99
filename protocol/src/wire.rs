//! The one versioned envelope for everything that crosses the network, and
//! the payloads carried inside pairwise and group ciphertexts.
//!
//! Layout: one version byte, then the postcard encoding of [`EnvelopeBody`].
//! `docs/PROTOCOL.md` spells out every byte.

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::ids::{ConversationId, MessageId, PeerId};
use crate::time::Timestamp;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u8 = 1;

/// The largest envelope accepted, in bytes. Chat content is capped at 64 KiB
/// by the engine; this leaves room for headers, group rosters and
/// signatures, while keeping a hostile peer from making us buffer more.
pub const MAX_ENVELOPE_LEN: usize = 256 * 1024;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// No bytes at all.
    #[error("empty envelope")]
    Empty,
    /// More bytes than [`MAX_ENVELOPE_LEN`].
    #[error("envelope of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Bytes received.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A version this implementation does not speak.
    #[error("unsupported protocol version {0} (this node speaks version {PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
    /// An envelope kind this implementation does not know.
    #[error("unknown envelope kind {0}")]
    UnknownKind(u32),
    /// The bytes do not decode as the structure they claim to be.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which structure failed to decode.
        what: &'static str,
        /// What postcard reported.
        reason: String,
    },
}

/// An Ed25519 signature, encoded as 64 raw bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature64(pub [u8; 64]);

impl core::fmt::Debug for Signature64 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Signature64(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…)")
    }
}

impl Serialize for Signature64 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut tuple = serializer.serialize_tuple(64)?;
        for b in &self.0 {
            tuple.serialize_element(b)?;
        }
        tuple.end()
    }
}

impl<'de> Deserialize<'de> for Signature64 {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Signature64;
            fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str("64 bytes")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Signature64, A::Error> {
                let mut out = [0u8; 64];
                for (i, slot) in out.iter_mut().enumerate() {
                    *slot = seq.next_element()?.ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                Ok(Signature64(out))
            }
        }
        deserializer.deserialize_tuple(64, Visitor)
    }
}

/// A versioned envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The body; the version is always [`PROTOCOL_VERSION`] when encoding.
    pub body: EnvelopeBody,
}

/// Every kind of envelope. The discriminant is the postcard varint that
/// follows the version byte; new kinds are only ever appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnvelopeBody {
    /// Kind 0: the initiator's signed ephemeral key.
    KeyExchangeRequest(KeyExchangeRequest),
    /// Kind 1: the responder's signed ephemeral key.
    KeyExchangeAck(KeyExchangeAck),
    /// Kind 2: a Double Ratchet message carrying a [`PairwisePayload`].
    Ratchet(RatchetMessage),
    /// Kind 3: a Sender Keys group message carrying a [`ChatContent`].
    Group(GroupMessage),
}

/// The number of envelope kinds this version knows.
const ENVELOPE_KINDS: u32 = 4;

impl Envelope {
    /// Wraps a body.
    pub fn new(body: EnvelopeBody) -> Self {
        Self { body }
    }

    /// The wire bytes: version byte ‖ postcard(body).
    pub fn encode(&self) -> Vec<u8> {
        let out = vec![PROTOCOL_VERSION];
        // Serialising into a Vec cannot fail for these types.
        match postcard::to_extend(&self.body, out) {
            Ok(bytes) => bytes,
            Err(_) => unreachable!("postcard serialisation into a Vec is infallible for envelope types"),
        }
    }

    /// Decodes wire bytes. Total: any input gives a value or a [`WireError`],
    /// never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_ENVELOPE_LEN {
            return Err(WireError::TooLarge { len: bytes.len(), max: MAX_ENVELOPE_LEN });
        }
        let (&version, rest) = bytes.split_first().ok_or(WireError::Empty)?;
        if version != PROTOCOL_VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        check_kind(rest, ENVELOPE_KINDS, "envelope kind")?;
        let body: EnvelopeBody = decode_exact(rest, "envelope body")?;
        Ok(Self { body })
    }
}

/// Refuses an enum whose leading varint names a kind this version does not
/// know, so that a newer peer's additions get a clear error rather than a
/// generic decoding failure. Returns the kind and the bytes after it.
fn check_kind<'a>(bytes: &'a [u8], known: u32, what: &'static str) -> Result<(u32, &'a [u8]), WireError> {
    let (kind, rest) = postcard::take_from_bytes::<u32>(bytes).map_err(|e| malformed(what, e))?;
    if kind >= known {
        return Err(WireError::UnknownKind(kind));
    }
    Ok((kind, rest))
}

/// Decodes `bytes` as exactly one `T`, refusing trailing bytes so that every
/// value has exactly one encoding.
/// Non-minimal varints are refused the same way: the value must re-encode
/// to the very bytes it came from.
pub(crate) fn decode_exact<'a, T: Deserialize<'a> + Serialize>(
    bytes: &'a [u8],
    what: &'static str,
) -> Result<T, WireError> {
    let (value, rest) = postcard::take_from_bytes::<T>(bytes).map_err(|e| malformed(what, e))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed { what, reason: format!("{} trailing bytes", rest.len()) });
    }
    if encode_postcard(&value) != bytes {
        return Err(WireError::Malformed { what, reason: "non-canonical encoding (a varint is not minimal)".into() });
    }
    Ok(value)
}

pub(crate) fn encode_postcard<T: Serialize>(value: &T) -> Vec<u8> {
    match postcard::to_stdvec(value) {
        Ok(bytes) => bytes,
        Err(_) => unreachable!("postcard serialisation into a Vec is infallible for protocol types"),
    }
}

fn malformed(what: &'static str, e: postcard::Error) -> WireError {
    WireError::Malformed { what, reason: e.to_string() }
}

/// The initiator's half of the key exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyExchangeRequest {
    /// The initiator's Ed25519 identity public key; it must hash to the peer
    /// ID the request came from.
    pub initiator_identity: [u8; 32],
    /// The peer this request is for.
    pub responder: PeerId,
    /// The initiator's fresh X25519 public key.
    pub ephemeral: [u8; 32],
    /// The initiator's clock when it made the request (freshness).
    pub timestamp: Timestamp,
    /// 16 random bytes (freshness, and to tell two requests apart).
    pub nonce: [u8; 16],
    /// Ed25519 signature over the request transcript (`docs/PROTOCOL.md`).
    pub signature: Signature64,
}

/// The responder's half of the key exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyExchangeAck {
    /// The responder's Ed25519 identity public key; it must hash to the peer
    /// the initiator asked for.
    pub responder_identity: [u8; 32],
    /// The initiator's ephemeral key, echoed so the ack names its request.
    pub initiator_ephemeral: [u8; 32],
    /// The request nonce, echoed likewise.
    pub request_nonce: [u8; 16],
    /// The responder's fresh X25519 public key, also its first ratchet key.
    pub ephemeral: [u8; 32],
    /// Ed25519 signature over the ack transcript (`docs/PROTOCOL.md`).
    pub signature: Signature64,
}

/// The authenticated header of a Double Ratchet message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RatchetHeader {
    /// Which key exchange this message belongs to.
    pub session_id: [u8; 16],
    /// The sender's current ratchet public key.
    pub ratchet_key: [u8; 32],
    /// How many messages the sender sent on its previous sending chain.
    pub previous_chain_length: u32,
    /// This message's number on the current sending chain.
    pub message_number: u32,
}

/// Length of [`RatchetHeader::to_bytes`].
pub const RATCHET_HEADER_LEN: usize = 16 + 32 + 4 + 4;

impl RatchetHeader {
    /// The fixed layout the header tag covers:
    /// session ID (16) ‖ ratchet key (32) ‖ PN (u32 BE) ‖ N (u32 BE).
    pub fn to_bytes(&self) -> [u8; RATCHET_HEADER_LEN] {
        let mut out = [0u8; RATCHET_HEADER_LEN];
        out[..16].copy_from_slice(&self.session_id);
        out[16..48].copy_from_slice(&self.ratchet_key);
        out[48..52].copy_from_slice(&self.previous_chain_length.to_be_bytes());
        out[52..].copy_from_slice(&self.message_number.to_be_bytes());
        out
    }
}

/// A Double Ratchet message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RatchetMessage {
    /// The header, authenticated by `header_tag`.
    pub header: RatchetHeader,
    /// First 16 bytes of HMAC-SHA256(header key, binding ‖ header bytes).
    pub header_tag: [u8; 16],
    /// NaCl secretbox output: Poly1305 tag (16) ‖ XSalsa20 ciphertext.
    pub ciphertext: Vec<u8>,
}

/// A Sender Keys group message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMessage {
    /// The group.
    pub group_id: ConversationId,
    /// The member who sent it.
    pub sender: PeerId,
    /// Which of the sender's keys encrypted it.
    pub key_id: u32,
    /// Its number on that key's chain.
    pub message_number: u32,
    /// NaCl secretbox output: Poly1305 tag (16) ‖ XSalsa20 ciphertext.
    pub ciphertext: Vec<u8>,
    /// Ed25519 signature by the sender key's signing key over the group
    /// message transcript (`docs/PROTOCOL.md`).
    pub signature: Signature64,
}

/// A chat message's content, inside a pairwise or group ciphertext.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatContent {
    /// The sender's ID for the message; retransmissions keep it.
    pub message_id: MessageId,
    /// The sender's clock when the message was created.
    pub sent_at: Timestamp,
    /// The text.
    pub content: String,
}

impl ChatContent {
    /// postcard bytes, the group plaintext (zeroized when dropped).
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(encode_postcard(self))
    }

    /// Decodes a group plaintext.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        decode_exact(bytes, "chat content")
    }
}

/// A member's sender key, sent only over the pairwise channel to each other
/// member. The chain key is secret: zeroized on drop, never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderKeyDistribution {
    /// The group.
    pub group_id: ConversationId,
    /// The member whose key this is; it must be the pairwise peer it came from.
    pub sender: PeerId,
    /// The key's ID.
    pub key_id: u32,
    /// The chain position `chain_key` belongs to.
    pub message_number: u32,
    /// The chain key at `message_number`.
    pub chain_key: [u8; 32],
    /// The public half of the key's Ed25519 signing key.
    pub signing_public: [u8; 32],
}

impl Drop for SenderKeyDistribution {
    fn drop(&mut self) {
        self.chain_key.zeroize();
    }
}

impl core::fmt::Debug for SenderKeyDistribution {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SenderKeyDistribution")
            .field("group_id", &self.group_id)
            .field("sender", &self.sender)
            .field("key_id", &self.key_id)
            .field("message_number", &self.message_number)
            .finish_non_exhaustive()
    }
}

/// A member and the join it is in: the admin numbers every join, so that
/// membership changes arriving late or twice cannot undo newer ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterEntry {
    /// The member.
    pub peer_id: PeerId,
    /// Its join number (the creator's initial members are 1).
    pub epoch: u64,
}

/// Group membership control, sent over pairwise channels only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupControl {
    /// Tells a member the whole group: sent by the admin at creation and to
    /// each invitee.
    Invite {
        /// The group.
        group_id: ConversationId,
        /// Its display name.
        name: String,
        /// The admin (its creator).
        admin: PeerId,
        /// Every current member with its join number, the admin and the
        /// recipient included.
        members: Vec<RosterEntry>,
        /// When the admin created it.
        created_at: Timestamp,
    },
    /// Tells existing members that the admin added someone.
    MemberAdded {
        /// The group.
        group_id: ConversationId,
        /// The new member and its join number.
        member: RosterEntry,
    },
    /// The sender leaves the group, ending the join numbered `epoch`.
    Leave {
        /// The group.
        group_id: ConversationId,
        /// The sender's own join number.
        epoch: u64,
    },
    /// The admin tells the members that a member left (or declined its
    /// invitation), ending the join numbered `member.epoch`.
    MemberLeft {
        /// The group.
        group_id: ConversationId,
        /// The member and the join that ended.
        member: RosterEntry,
    },
}

/// Everything that travels inside a Double Ratchet message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PairwisePayload {
    /// A 1:1 chat message.
    Chat(ChatContent),
    /// "These messages arrived" (1:1 or group).
    DeliveryReceipt {
        /// The messages confirmed.
        message_ids: Vec<MessageId>,
    },
    /// "These messages were read" (1:1 or group).
    ReadReceipt {
        /// The messages read.
        message_ids: Vec<MessageId>,
        /// When the reader marked them read.
        read_at: Timestamp,
    },
    /// The sender's own sender key for a group.
    SenderKeyDistribution(SenderKeyDistribution),
    /// "Please send me your sender key for this group."
    SenderKeyRequest {
        /// The group.
        group_id: ConversationId,
    },
    /// A group membership change.
    GroupControl(GroupControl),
    /// Sent by an initiator right after it completes a key exchange, so that
    /// the responder learns the initiator holds the new session even when
    /// nothing else is queued (see `PairwiseSessions`).
    SessionConfirm,
    /// A payload the sender keeps sending until the recipient acknowledges
    /// its `id` (group control, sender keys, read receipts): unlike chat
    /// messages, these have no delivery receipt of their own.
    Tracked {
        /// The sender's ID for it (unique per sender and recipient).
        id: u64,
        /// What it carries; never itself `Tracked` or `Ack`.
        payload: Box<PairwisePayload>,
    },
    /// "These tracked payloads arrived and were processed."
    Ack {
        /// Their IDs.
        ids: Vec<u64>,
    },
    /// One of the sender's group messages, sent to this one member over the
    /// pairwise session rather than under the sender's key: a message that a
    /// member still waits for when the sender rotates, or that the member
    /// asked for. Only the recipients at send time can ever read it, where a
    /// copy sealed again under the sender key could be read by anyone who
    /// holds that key's later positions (a member invited since).
    GroupChat {
        /// The group.
        group_id: ConversationId,
        /// The sender key the message was sealed under for the group...
        key_id: u32,
        /// ...and its position there, so that the receiver recognises the
        /// group envelope's retransmissions as this message.
        message_number: u32,
        /// The message, as it was sent to the group.
        content: ChatContent,
    },
}

/// The number of [`PairwisePayload`] kinds this version knows.
const PAIRWISE_KINDS: u32 = 10;
/// The kind number of [`PairwisePayload::Tracked`].
const TRACKED_KIND: u32 = 7;
/// The kind number of [`PairwisePayload::Ack`].
const ACK_KIND: u32 = 8;
/// The kind number of [`PairwisePayload::GroupControl`].
const GROUP_CONTROL_KIND: u32 = 5;
/// The number of [`GroupControl`] kinds this version knows.
const GROUP_CONTROL_KINDS: u32 = 4;

impl PairwisePayload {
    /// postcard bytes, the pairwise plaintext (zeroized when dropped: it may
    /// hold a sender chain key).
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(encode_postcard(self))
    }

    /// Decodes a pairwise plaintext.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let (mut kind, mut rest) = check_kind(bytes, PAIRWISE_KINDS, "pairwise payload kind")?;
        if kind == TRACKED_KIND {
            // Check the inner kind before decoding: a tracked payload holds
            // exactly one untracked payload, so nesting (and the decoder's
            // recursion) is refused up front.
            let (_, after_id) =
                postcard::take_from_bytes::<u64>(rest).map_err(|e| malformed("tracked payload ID", e))?;
            (kind, rest) = check_kind(after_id, PAIRWISE_KINDS, "tracked payload kind")?;
            if kind == TRACKED_KIND || kind == ACK_KIND {
                return Err(WireError::Malformed { what: "pairwise payload", reason: "nested tracking".into() });
            }
        }
        if kind == GROUP_CONTROL_KIND {
            check_kind(rest, GROUP_CONTROL_KINDS, "group control kind")?;
        }
        decode_exact(bytes, "pairwise payload")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_version_is_named() {
        assert_eq!(Envelope::decode(&[2, 0]), Err(WireError::UnsupportedVersion(2)));
    }

    #[test]
    fn unknown_kind_is_named() {
        assert_eq!(Envelope::decode(&[PROTOCOL_VERSION, 9]), Err(WireError::UnknownKind(9)));
    }

    #[test]
    fn empty_and_oversized_are_refused() {
        assert_eq!(Envelope::decode(&[]), Err(WireError::Empty));
        let big = vec![PROTOCOL_VERSION; MAX_ENVELOPE_LEN + 1];
        assert_eq!(
            Envelope::decode(&big),
            Err(WireError::TooLarge { len: MAX_ENVELOPE_LEN + 1, max: MAX_ENVELOPE_LEN })
        );
    }

    #[test]
    fn truncated_and_trailing_bytes_are_malformed() {
        let env = Envelope::new(EnvelopeBody::Group(GroupMessage {
            group_id: ConversationId(crate::ids::Uuid([7; 16])),
            sender: PeerId([1; 20]),
            key_id: 3,
            message_number: 4,
            ciphertext: vec![9; 40],
            signature: Signature64([5; 64]),
        }));
        let bytes = env.encode();
        assert_eq!(Envelope::decode(&bytes), Ok(env));
        assert!(matches!(Envelope::decode(&bytes[..bytes.len() - 1]), Err(WireError::Malformed { .. })));
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(Envelope::decode(&long), Err(WireError::Malformed { .. })));
    }

    #[test]
    fn unknown_payload_and_group_control_kinds_are_named() {
        assert_eq!(PairwisePayload::decode(&[10]), Err(WireError::UnknownKind(10)));
        assert_eq!(PairwisePayload::decode(&[5, 4]), Err(WireError::UnknownKind(4)));
        assert_eq!(PairwisePayload::decode(&[6]), Ok(PairwisePayload::SessionConfirm));
    }

    #[test]
    fn tracking_nests_one_level_only() {
        let inner = PairwisePayload::ReadReceipt { message_ids: vec![], read_at: Timestamp(1) };
        let tracked = PairwisePayload::Tracked { id: 3, payload: Box::new(inner) };
        assert_eq!(PairwisePayload::decode(&tracked.encode()), Ok(tracked.clone()));
        let nested = PairwisePayload::Tracked { id: 4, payload: Box::new(tracked) };
        assert!(matches!(PairwisePayload::decode(&nested.encode()), Err(WireError::Malformed { .. })));
        // A deep hand-made nesting is refused before any recursion.
        let mut deep = Vec::new();
        for _ in 0..100_000 {
            deep.extend_from_slice(&[7, 0]);
        }
        deep.push(6);
        assert!(matches!(PairwisePayload::decode(&deep), Err(WireError::Malformed { .. })));
        assert_eq!(PairwisePayload::decode(&[7, 0, 10]), Err(WireError::UnknownKind(10)));
    }

    #[test]
    fn non_minimal_varints_are_malformed() {
        let content = ChatContent {
            message_id: MessageId(crate::ids::Uuid([1; 16])),
            sent_at: Timestamp(5),
            content: "x".into(),
        };
        let mut bytes = content.encode();
        assert_eq!(ChatContent::decode(&bytes), Ok(content));
        // sent_at = 5 is the byte after the 16-byte ID; encode it as 0x85 0x00.
        bytes.splice(16..17, [0x85, 0x00]);
        assert!(matches!(ChatContent::decode(&bytes), Err(WireError::Malformed { .. })));
    }

    #[test]
    fn distribution_debug_hides_the_chain_key() {
        let d = SenderKeyDistribution {
            group_id: ConversationId(crate::ids::Uuid([0; 16])),
            sender: PeerId([0; 20]),
            key_id: 1,
            message_number: 0,
            chain_key: [0xAB; 32],
            signing_public: [0; 32],
        };
        let shown = format!("{d:?}");
        assert!(!shown.contains("171") && !shown.to_lowercase().contains("ab, ") && !shown.contains("chain_key"));
    }
}
