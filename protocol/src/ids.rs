//! Identifiers that both ends of a conversation agree on.

use core::fmt;
use core::str::FromStr;

use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::kdf::labels;

/// Why a textual identifier could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdParseError {
    /// The text has the wrong length.
    #[error("expected {expected} characters, got {got}")]
    Length {
        /// Characters the format needs.
        expected: usize,
        /// Characters that were given.
        got: usize,
    },
    /// The text contains something other than lowercase or uppercase hex
    /// digits (and, for UUIDs, dashes in the usual places).
    #[error("not a valid identifier: expected hexadecimal digits in the canonical layout")]
    Syntax,
}

/// A peer's identity on the network: the first 20 bytes of
/// SHA-256(Ed25519 identity public key), shown as 40 lowercase hex characters.
///
/// Peer IDs are self-certifying: whoever presents an identity key can be
/// checked against the ID without asking anyone.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PeerId(pub [u8; 20]);

impl PeerId {
    /// The raw 20 bytes.
    pub const fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({self})")
    }
}

impl FromStr for PeerId {
    type Err = IdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 20];
        decode_hex(s, &mut out)?;
        Ok(Self(out))
    }
}

/// A 128-bit identifier printed as a canonical UUID
/// (`8-4-4-4-12` lowercase hex digits).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// A random (version 4) UUID drawn from `rng`.
    pub fn random(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        let mut bytes = [0u8; 16];
        rng.fill_bytes(&mut bytes);
        Self::with_version(bytes, 4)
    }

    /// Sets the version nibble and the RFC 9562 variant bits.
    const fn with_version(mut bytes: [u8; 16], version: u8) -> Self {
        bytes[6] = (bytes[6] & 0x0f) | (version << 4);
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        Self(bytes)
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write_hex(f, &b[0..4])?;
        f.write_str("-")?;
        write_hex(f, &b[4..6])?;
        f.write_str("-")?;
        write_hex(f, &b[6..8])?;
        f.write_str("-")?;
        write_hex(f, &b[8..10])?;
        f.write_str("-")?;
        write_hex(f, &b[10..16])
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Uuid {
    type Err = IdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 36 {
            return Err(IdParseError::Length { expected: 36, got: s.len() });
        }
        let raw = s.as_bytes();
        if [8, 13, 18, 23].iter().any(|&i| raw.get(i) != Some(&b'-')) {
            return Err(IdParseError::Syntax);
        }
        let digits: String = s.chars().filter(|&c| c != '-').collect();
        let mut out = [0u8; 16];
        decode_hex(&digits, &mut out)?;
        Ok(Self(out))
    }
}

/// Identifies a conversation, the same on every participant.
///
/// A 1:1 conversation's ID is derived from both peer IDs (see
/// [`ConversationId::for_peers`]); a group's is chosen at random by its creator.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConversationId(pub Uuid);

impl ConversationId {
    /// The 1:1 conversation between two peers: the first 16 bytes of
    /// SHA-256(label ‖ lower peer ID ‖ higher peer ID), stamped as a version 8
    /// UUID. Both peers compute the same value without talking.
    pub fn for_peers(a: &PeerId, b: &PeerId) -> Self {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let digest =
            Sha256::new().chain_update(labels::CONVERSATION_ID).chain_update(lo.0).chain_update(hi.0).finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        Self(Uuid::with_version(bytes, 8))
    }

    /// A fresh random group ID (version 4 UUID).
    pub fn random_group(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        Self(Uuid::random(rng))
    }

    /// The raw 16 bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0 .0
    }

    /// Whether this can be a group's ID: groups use random (version 4)
    /// UUIDs, 1:1 conversations derived (version 8) ones, so a peer cannot
    /// pass a group off under a 1:1 conversation's ID.
    pub const fn is_group_id(&self) -> bool {
        self.0 .0[6] >> 4 == 4
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConversationId({})", self.0)
    }
}

impl FromStr for ConversationId {
    type Err = IdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self)
    }
}

/// Identifies one chat message, chosen at random by its sender.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MessageId(pub Uuid);

impl MessageId {
    /// A fresh random message ID.
    pub fn random(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        Self(Uuid::random(rng))
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0)
    }
}

impl FromStr for MessageId {
    type Err = IdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self)
    }
}

pub(crate) fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

fn decode_hex(s: &str, out: &mut [u8]) -> Result<(), IdParseError> {
    let raw = s.as_bytes();
    if raw.len() != out.len() * 2 {
        return Err(IdParseError::Length { expected: out.len() * 2, got: raw.len() });
    }
    for (byte, pair) in out.iter_mut().zip(raw.chunks_exact(2)) {
        let hi = hex_value(pair[0]).ok_or(IdParseError::Syntax)?;
        let lo = hex_value(pair[1]).ok_or(IdParseError::Syntax)?;
        *byte = (hi << 4) | lo;
    }
    Ok(())
}

const fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_round_trips_through_text() {
        let id = PeerId([0xab; 20]);
        let text = id.to_string();
        assert_eq!(text.len(), 40);
        assert_eq!(text.parse::<PeerId>(), Ok(id));
        assert_eq!("zz".parse::<PeerId>(), Err(IdParseError::Length { expected: 40, got: 2 }));
        assert_eq!("g".repeat(40).parse::<PeerId>(), Err(IdParseError::Syntax));
    }

    #[test]
    fn conversation_id_is_symmetric_and_a_version_8_uuid() {
        let a = PeerId([1; 20]);
        let b = PeerId([2; 20]);
        let ab = ConversationId::for_peers(&a, &b);
        assert_eq!(ab, ConversationId::for_peers(&b, &a));
        assert_ne!(ab, ConversationId::for_peers(&a, &PeerId([3; 20])));
        let text = ab.to_string();
        assert_eq!(text.as_bytes()[14], b'8');
        assert_eq!(text.parse::<ConversationId>(), Ok(ab));
        assert_eq!("not-a-uuid".parse::<Uuid>(), Err(IdParseError::Length { expected: 36, got: 10 }));
        assert_eq!("x".repeat(36).parse::<Uuid>(), Err(IdParseError::Syntax));
    }
}
