//! Every key derivation in the protocol, with its exact domain labels.
//!
//! `docs/PROTOCOL.md` lists the same labels and layouts; the two must agree
//! byte for byte, which the known-answer vectors check.

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::keys::{ChainKey, CipherKey, HeaderKey, MessageKey, RootKey, SenderChainKey, SenderMessageKey};

/// Domain-separation labels. Each is ASCII and never a prefix of another
/// used in the same position.
pub mod labels {
    /// SHA-256 prefix deriving a 1:1 conversation ID.
    pub const CONVERSATION_ID: &[u8] = b"p2pchat/v1/conversation-id";
    /// Signature transcript prefix of a key exchange request.
    pub const KX_REQUEST: &[u8] = b"p2pchat/v1/kx-request";
    /// Signature transcript prefix of a key exchange acknowledgement.
    pub const KX_ACK: &[u8] = b"p2pchat/v1/kx-ack";
    /// SHA-256 prefix hashing the key exchange transcript into the HKDF salt.
    pub const KX_TRANSCRIPT: &[u8] = b"p2pchat/v1/kx-transcript";
    /// HKDF info deriving the first root key from the ephemeral DH output.
    pub const KX_ROOT: &[u8] = b"p2pchat/v1/kx-root";
    /// SHA-256 prefix of a session's associated-data binding.
    pub const RATCHET_AD: &[u8] = b"p2pchat/v1/ratchet-ad";
    /// HKDF info of the Double Ratchet root step.
    pub const RATCHET_ROOT: &[u8] = b"p2pchat/v1/ratchet-root";
    /// HKDF info expanding a ratchet message key.
    pub const RATCHET_MESSAGE: &[u8] = b"p2pchat/v1/ratchet-message";
    /// HMAC input deriving a sender-key message key from its chain key.
    pub const SENDER_MESSAGE: &[u8] = b"p2pchat/v1/sender-key/message";
    /// HMAC input deriving the next sender-key chain key.
    pub const SENDER_CHAIN: &[u8] = b"p2pchat/v1/sender-key/chain";
    /// HKDF info expanding a sender-key message key.
    pub const SENDER_KEYS: &[u8] = b"p2pchat/v1/sender-key/keys";
    /// Signature transcript prefix of a group message.
    pub const GROUP_MESSAGE: &[u8] = b"p2pchat/v1/group-message";
}

/// HMAC input of the Double Ratchet chain step that yields the message key.
pub const RATCHET_MESSAGE_KEY_INPUT: u8 = 0x01;
/// HMAC input of the Double Ratchet chain step that yields the next chain key.
pub const RATCHET_CHAIN_KEY_INPUT: u8 = 0x02;

type HmacSha256 = Hmac<Sha256>;

/// The key exchange's output:
/// `HKDF-SHA256(salt = transcript hash, ikm = ephemeral DH, info = "p2pchat/v1/kx-root")`,
/// 64 bytes split into the first root key and the responder's first sending
/// chain key (which is the initiator's first receiving chain key).
pub fn kx_root_step(transcript_hash: &[u8; 32], dh: &[u8; 32]) -> (RootKey, ChainKey) {
    let mut okm = Zeroizing::new([0u8; 64]);
    let hk = Hkdf::<Sha256>::new(Some(transcript_hash), dh);
    expand_into(&hk, labels::KX_ROOT, okm.as_mut());
    let (root, chain) = split_64(&okm);
    (RootKey::from_bytes(*root), ChainKey::from_bytes(*chain))
}

/// The Double Ratchet root step `KDF_RK`:
/// `HKDF-SHA256(salt = root key, ikm = dh, info = "p2pchat/v1/ratchet-root")`,
/// 64 bytes split into the next root key and a chain key.
pub fn ratchet_root_step(root: &RootKey, dh: &[u8; 32]) -> (RootKey, ChainKey) {
    let mut okm = Zeroizing::new([0u8; 64]);
    let hk = Hkdf::<Sha256>::new(Some(root.as_bytes()), dh);
    expand_into(&hk, labels::RATCHET_ROOT, okm.as_mut());
    let (root, chain) = split_64(&okm);
    (RootKey::from_bytes(*root), ChainKey::from_bytes(*chain))
}

/// The Double Ratchet chain step `KDF_CK`: message key = HMAC-SHA256(ck, 0x01),
/// next chain key = HMAC-SHA256(ck, 0x02).
pub fn ratchet_chain_step(chain: &ChainKey) -> (MessageKey, ChainKey) {
    let (mk, next) = hmac_pair(chain.as_bytes(), &[RATCHET_MESSAGE_KEY_INPUT], &[RATCHET_CHAIN_KEY_INPUT]);
    (MessageKey::from_bytes(mk), ChainKey::from_bytes(next))
}

/// The sender-key chain step: message key = HMAC-SHA256(ck, "…/sender-key/message"),
/// next chain key = HMAC-SHA256(ck, "…/sender-key/chain").
pub fn sender_chain_step(chain: &SenderChainKey) -> (SenderMessageKey, SenderChainKey) {
    let (mk, next) = hmac_pair(chain.as_bytes(), labels::SENDER_MESSAGE, labels::SENDER_CHAIN);
    (SenderMessageKey::from_bytes(mk), SenderChainKey::from_bytes(next))
}

/// What one ratchet message key expands into.
pub struct RatchetMessageKeys {
    /// XSalsa20-Poly1305 key for the body.
    pub cipher_key: CipherKey,
    /// XSalsa20-Poly1305 nonce for the body.
    pub nonce: [u8; 24],
    /// HMAC-SHA256 key authenticating the header and associated data.
    pub header_key: HeaderKey,
}

impl core::fmt::Debug for RatchetMessageKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("RatchetMessageKeys { .. }")
    }
}

/// `HKDF-Expand(prk = message key, info = "p2pchat/v1/ratchet-message", L = 88)`
/// split as cipher key (32) ‖ nonce (24) ‖ header key (32).
pub fn expand_ratchet_message_key(mk: &MessageKey) -> RatchetMessageKeys {
    let mut okm = Zeroizing::new([0u8; 88]);
    expand_prk(mk.as_bytes(), labels::RATCHET_MESSAGE, okm.as_mut());
    let mut cipher_key = Zeroizing::new([0u8; 32]);
    let mut nonce = [0u8; 24];
    let mut header_key = Zeroizing::new([0u8; 32]);
    cipher_key.copy_from_slice(&okm[..32]);
    nonce.copy_from_slice(&okm[32..56]);
    header_key.copy_from_slice(&okm[56..]);
    RatchetMessageKeys {
        cipher_key: CipherKey::from_bytes(*cipher_key),
        nonce,
        header_key: HeaderKey::from_bytes(*header_key),
    }
}

/// The header tag: the first 16 bytes of HMAC-SHA256(header key, binding ‖ header).
pub fn ratchet_header_tag(header_key: &HeaderKey, binding: &[u8; 32], header: &[u8]) -> [u8; 16] {
    let mut mac = new_hmac(header_key.as_bytes());
    mac.update(binding);
    mac.update(header);
    let full = mac.finalize().into_bytes();
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&full[..16]);
    tag
}

/// What one sender-key message key expands into.
pub struct SenderMessageKeys {
    /// XSalsa20-Poly1305 key.
    pub cipher_key: CipherKey,
    /// XSalsa20-Poly1305 nonce.
    pub nonce: [u8; 24],
}

impl core::fmt::Debug for SenderMessageKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("SenderMessageKeys { .. }")
    }
}

/// `HKDF-Expand(prk = sender message key, info = "p2pchat/v1/sender-key/keys", L = 56)`
/// split as cipher key (32) ‖ nonce (24).
pub fn expand_sender_message_key(mk: &SenderMessageKey) -> SenderMessageKeys {
    let mut okm = Zeroizing::new([0u8; 56]);
    expand_prk(mk.as_bytes(), labels::SENDER_KEYS, okm.as_mut());
    let mut cipher_key = Zeroizing::new([0u8; 32]);
    let mut nonce = [0u8; 24];
    cipher_key.copy_from_slice(&okm[..32]);
    nonce.copy_from_slice(&okm[32..]);
    SenderMessageKeys { cipher_key: CipherKey::from_bytes(*cipher_key), nonce }
}

/// Splits a 64-byte KDF output into two 32-byte keys.
fn split_64(okm: &[u8; 64]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let mut first = Zeroizing::new([0u8; 32]);
    let mut second = Zeroizing::new([0u8; 32]);
    first.copy_from_slice(&okm[..32]);
    second.copy_from_slice(&okm[32..]);
    (first, second)
}

fn new_hmac(key: &[u8; 32]) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"))
}

/// Two HMACs under one key, sharing the padded-key setup.
fn hmac_pair(key: &[u8; 32], first: &[u8], second: &[u8]) -> ([u8; 32], [u8; 32]) {
    let keyed = new_hmac(key);
    let mut a = keyed.clone();
    a.update(first);
    let mut b = keyed;
    b.update(second);
    (a.finalize().into_bytes().into(), b.finalize().into_bytes().into())
}

fn expand_prk(prk: &[u8; 32], info: &[u8], okm: &mut [u8]) {
    let hk = Hkdf::<Sha256>::from_prk(prk).unwrap_or_else(|_| unreachable!("a 32-byte PRK is long enough for SHA-256"));
    expand_into(&hk, info, okm);
}

fn expand_into(hk: &Hkdf<Sha256>, info: &[u8], okm: &mut [u8]) {
    hk.expand(info, okm)
        .unwrap_or_else(|_| unreachable!("every caller asks for at most 88 bytes, far below HKDF's limit"));
}
