//! The Double Ratchet (Signal specification, with deferred ratchet-key
//! generation as in its §6.5): one state machine per session.
//!
//! Decryption is two-phase. [`DoubleRatchet::stage`] computes everything a
//! message needs without touching `self`; the caller authenticates the
//! message with the staged key and only then calls
//! [`DoubleRatchet::commit`]. A forged, replayed or corrupted message
//! therefore cannot move any chain, by construction.

use std::collections::VecDeque;

use rand_core::{CryptoRng, RngCore};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::kdf;
use crate::keys::{ChainKey, MessageKey, RootKey};
use crate::skipped::{SkippedKeys, MAX_SKIP};
use crate::time::Timestamp;
use crate::wire::RatchetHeader;

/// How many retired receiving ratchet keys are remembered, so that a late
/// message on an old chain is named as such rather than costing a DH.
const RETIRED_KEYS_KEPT: usize = 8;

/// Why a ratchet message could not be decrypted. The session is unchanged
/// after every one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecryptionError {
    /// The body's Poly1305 tag does not verify: the ciphertext was altered.
    #[error("ciphertext failed authentication: the message body was altered or corrupted")]
    BadMac,
    /// The header tag does not verify: the header or the associated data
    /// (identities, conversation, session) was altered.
    #[error("header failed authentication: the header or the conversation it claims was altered")]
    HeaderMismatch,
    /// This message number was already decrypted on this chain, or its
    /// skipped key has since been used or evicted.
    #[error("message {message_number} on this chain was already received (or its key expired)")]
    Duplicate {
        /// The message number in the header.
        message_number: u32,
    },
    /// The message would need more skipped keys than allowed.
    #[error("message is {skip} messages ahead of the chain; at most {max} may be skipped")]
    TooFarAhead {
        /// Keys that would have to be skipped.
        skip: u64,
        /// [`MAX_SKIP`].
        max: u32,
    },
    /// The message belongs to a chain this session has no keys for.
    #[error("message belongs to a ratchet chain this session holds no keys for")]
    UnknownChain,
    /// The message names a session this node does not hold.
    #[error("message belongs to a session this node does not hold (never established here, or replaced and retired)")]
    UnknownSession,
    /// The sender's ratchet key gives an all-zero (non-contributory) DH output.
    #[error("the ratchet public key is of small order and was refused")]
    InvalidRatchetKey,
}

/// Why a message could not be encrypted. The session is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncryptError {
    /// The sending chain has used every message number.
    #[error("the sending chain is exhausted; a new key exchange is needed")]
    ChainExhausted,
    /// The peer's ratchet key gives an all-zero DH output.
    #[error("the peer's ratchet public key is of small order")]
    InvalidRatchetKey,
}

/// An X25519 ratchet key pair with its public half computed once, so that
/// encrypting never recomputes it.
pub(crate) struct RatchetKeyPair {
    secret: StaticSecret,
    public: [u8; 32],
}

impl RatchetKeyPair {
    pub(crate) fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        Self::from_secret(StaticSecret::random_from_rng(rng))
    }

    pub(crate) fn from_secret(secret: StaticSecret) -> Self {
        let public = PublicKey::from(&secret).to_bytes();
        Self { secret, public }
    }

    pub(crate) fn public(&self) -> &[u8; 32] {
        &self.public
    }

    /// X25519 with `theirs`; `None` when the output is all zeros.
    pub(crate) fn diffie_hellman(&self, theirs: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*theirs));
        if !shared.was_contributory() {
            return None;
        }
        Some(Zeroizing::new(shared.to_bytes()))
    }

    pub(crate) fn secret(&self) -> crate::keys::X25519Secret {
        crate::keys::X25519Secret::from_bytes(self.secret.to_bytes())
    }
}

#[derive(Clone)]
struct Chain {
    key: ChainKey,
    next: u32,
}

/// A skipped key's identity: (sender ratchet key, message number).
pub(crate) type SkippedId = ([u8; 32], u32);

/// Keys passed over on one chain, by message number.
type SkippedOnChain = Vec<(u32, MessageKey)>;

/// One Double Ratchet state. Deliberately not `Clone`: two copies of a
/// sending chain would encrypt two plaintexts under one key and nonce.
pub(crate) struct DoubleRatchet {
    root: RootKey,
    ours: RatchetKeyPair,
    theirs: [u8; 32],
    /// `None` after a DH step on receive: the next send generates a fresh
    /// ratchet key first (deferred generation keeps receiving to one DH).
    sending: Option<Chain>,
    previous_sending_len: u32,
    receiving: Option<Chain>,
    retired: VecDeque<[u8; 32]>,
    skipped: SkippedKeys<SkippedId, MessageKey>,
}

/// What a successful decryption will change, computed without changing it.
pub(crate) struct Staged {
    pub(crate) message_key: MessageKey,
    change: Change,
}

enum Change {
    /// The key came from the skipped cache: remove it.
    Skipped(SkippedId),
    /// The current receiving chain advances.
    SameChain { chain: Chain, skipped: SkippedOnChain },
    /// A DH ratchet step: a new root and receiving chain.
    NewChain { root: RootKey, theirs: [u8; 32], chain: Chain, skipped_old: SkippedOnChain, skipped_new: SkippedOnChain },
}

/// The key and header for the next outgoing message.
pub(crate) struct SendingKey {
    pub(crate) header: RatchetHeader,
    pub(crate) message_key: MessageKey,
}

impl DoubleRatchet {
    /// The responder's state right after it sends the ack: it can send at
    /// once on the key exchange's chain, with its ephemeral as ratchet key.
    pub(crate) fn responder(root: RootKey, chain: ChainKey, ours: RatchetKeyPair, theirs: [u8; 32]) -> Self {
        Self {
            root,
            ours,
            theirs,
            sending: Some(Chain { key: chain, next: 0 }),
            previous_sending_len: 0,
            receiving: None,
            retired: VecDeque::new(),
            skipped: SkippedKeys::new(),
        }
    }

    /// The initiator's state after it checks the ack: the key exchange's chain
    /// is its receiving chain, and its first send starts a DH ratchet step.
    pub(crate) fn initiator(root: RootKey, chain: ChainKey, ours: RatchetKeyPair, theirs: [u8; 32]) -> Self {
        Self {
            root,
            ours,
            theirs,
            sending: None,
            previous_sending_len: 0,
            receiving: Some(Chain { key: chain, next: 0 }),
            retired: VecDeque::new(),
            skipped: SkippedKeys::new(),
        }
    }

    /// Derives the next message key and header; commits only if nothing fails.
    pub(crate) fn next_sending_key(
        &mut self,
        session_id: [u8; 16],
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<SendingKey, EncryptError> {
        let (fresh, chain) = match &self.sending {
            Some(chain) => (None, chain.clone()),
            None => {
                let fresh = RatchetKeyPair::generate(rng);
                let dh = fresh.diffie_hellman(&self.theirs).ok_or(EncryptError::InvalidRatchetKey)?;
                let (root, key) = kdf::ratchet_root_step(&self.root, &dh);
                (Some((fresh, root)), Chain { key, next: 0 })
            }
        };
        let next = chain.next.checked_add(1).ok_or(EncryptError::ChainExhausted)?;
        let (message_key, next_key) = kdf::ratchet_chain_step(&chain.key);
        if let Some((fresh, root)) = fresh {
            self.ours = fresh;
            self.root = root;
        }
        let header = RatchetHeader {
            session_id,
            ratchet_key: self.ours.public,
            previous_chain_length: self.previous_sending_len,
            message_number: chain.next,
        };
        self.sending = Some(Chain { key: next_key, next });
        Ok(SendingKey { header, message_key })
    }

    /// Finds the message key for `header` without changing anything.
    pub(crate) fn stage(&self, header: &RatchetHeader) -> Result<Staged, DecryptionError> {
        let n = header.message_number;
        let id = (header.ratchet_key, n);
        if let Some(key) = self.skipped.get(&id) {
            return Ok(Staged { message_key: key.clone(), change: Change::Skipped(id) });
        }
        if header.ratchet_key == self.theirs {
            let chain = self.receiving.as_ref().ok_or(DecryptionError::UnknownChain)?;
            if n < chain.next {
                return Err(DecryptionError::Duplicate { message_number: n });
            }
            let (message_key, chain, skipped) = walk(chain, n)?;
            return Ok(Staged { message_key, change: Change::SameChain { chain, skipped } });
        }
        if self.retired.contains(&header.ratchet_key) {
            // Its unused keys, if any, were in the skipped cache (step 1).
            return Err(DecryptionError::Duplicate { message_number: n });
        }
        check_skip(0, n)?;
        // A new chain: first collect what is left of the current one.
        let skipped_old = match &self.receiving {
            Some(chain) if header.previous_chain_length > chain.next => {
                skip_until(chain, header.previous_chain_length)?.1
            }
            _ => Vec::new(),
        };
        let dh = self.ours.diffie_hellman(&header.ratchet_key).ok_or(DecryptionError::InvalidRatchetKey)?;
        let (root, first) = kdf::ratchet_root_step(&self.root, &dh);
        let (message_key, chain, skipped_new) = walk(&Chain { key: first, next: 0 }, n)?;
        Ok(Staged {
            message_key,
            change: Change::NewChain { root, theirs: header.ratchet_key, chain, skipped_old, skipped_new },
        })
    }

    /// Applies a staged decryption after the message authenticated.
    pub(crate) fn commit(&mut self, staged: Staged, now: Timestamp) {
        match staged.change {
            Change::Skipped(id) => {
                self.skipped.remove(&id);
            }
            Change::SameChain { chain, skipped } => {
                self.skipped.reserve(skipped.len());
                for (n, key) in skipped {
                    self.skipped.insert((self.theirs, n), key, now);
                }
                self.receiving = Some(chain);
            }
            Change::NewChain { root, theirs, chain, skipped_old, skipped_new } => {
                self.skipped.reserve(skipped_old.len() + skipped_new.len());
                for (n, key) in skipped_old {
                    self.skipped.insert((self.theirs, n), key, now);
                }
                for (n, key) in skipped_new {
                    self.skipped.insert((theirs, n), key, now);
                }
                if self.retired.len() == RETIRED_KEYS_KEPT {
                    self.retired.pop_front();
                }
                self.retired.push_back(self.theirs);
                self.theirs = theirs;
                self.root = root;
                self.receiving = Some(chain);
                if let Some(sending) = self.sending.take() {
                    self.previous_sending_len = sending.next;
                }
            }
        }
    }

    pub(crate) fn skipped_keys(&self) -> &SkippedKeys<SkippedId, MessageKey> {
        &self.skipped
    }

    pub(crate) fn skipped_keys_mut(&mut self) -> &mut SkippedKeys<SkippedId, MessageKey> {
        &mut self.skipped
    }

    pub(crate) fn our_ratchet_key(&self) -> &RatchetKeyPair {
        &self.ours
    }
}

fn check_skip(from: u32, to: u32) -> Result<(), DecryptionError> {
    let skip = u64::from(to) - u64::from(from.min(to));
    if skip > u64::from(MAX_SKIP) {
        return Err(DecryptionError::TooFarAhead { skip, max: MAX_SKIP });
    }
    Ok(())
}

/// The keys of messages `chain.next .. end`, which are being skipped, and
/// the chain key at `end`.
fn skip_until(chain: &Chain, end: u32) -> Result<(ChainKey, SkippedOnChain), DecryptionError> {
    check_skip(chain.next, end)?;
    let mut skipped = Vec::with_capacity(end.saturating_sub(chain.next) as usize);
    let mut key = chain.key.clone();
    for i in chain.next..end {
        let (message_key, next) = kdf::ratchet_chain_step(&key);
        skipped.push((i, message_key));
        key = next;
    }
    Ok((key, skipped))
}

/// Walks `chain` to message `n` (at or after `chain.next`): the key for `n`,
/// the chain after it, and the keys skipped on the way.
fn walk(chain: &Chain, n: u32) -> Result<(MessageKey, Chain, SkippedOnChain), DecryptionError> {
    let next = n.checked_add(1).ok_or(DecryptionError::TooFarAhead { skip: u64::from(u32::MAX), max: MAX_SKIP })?;
    let (key, skipped) = skip_until(chain, n)?;
    let (message_key, key) = kdf::ratchet_chain_step(&key);
    Ok((message_key, Chain { key, next }, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::SeedableRng;

    fn rng() -> rand_chacha::ChaCha20Rng {
        rand_chacha::ChaCha20Rng::seed_from_u64(1)
    }

    #[test]
    fn exhausted_sending_chain_refuses_and_keeps_state() {
        let mut r = rng();
        let theirs = *RatchetKeyPair::generate(&mut r).public();
        let mut dr = DoubleRatchet::responder(
            RootKey::from_bytes([1; 32]),
            ChainKey::from_bytes([2; 32]),
            RatchetKeyPair::generate(&mut r),
            theirs,
        );
        if let Some(chain) = dr.sending.as_mut() {
            chain.next = u32::MAX;
        }
        assert_eq!(dr.next_sending_key([0; 16], &mut r).err(), Some(EncryptError::ChainExhausted));
        assert_eq!(dr.sending.as_ref().map(|c| c.next), Some(u32::MAX));
    }

    #[test]
    fn small_order_peer_key_refuses_to_send() {
        let mut r = rng();
        let mut dr = DoubleRatchet::initiator(
            RootKey::from_bytes([1; 32]),
            ChainKey::from_bytes([2; 32]),
            RatchetKeyPair::generate(&mut r),
            [0; 32],
        );
        let root_before = dr.root.clone();
        assert_eq!(dr.next_sending_key([0; 16], &mut r).err(), Some(EncryptError::InvalidRatchetKey));
        assert!(dr.sending.is_none());
        assert_eq!(dr.root, root_before);
    }
}

/// The persisted form of a [`DoubleRatchet`]; secrets are zeroized on drop.
#[derive(serde::Serialize, serde::Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub(crate) struct RatchetState {
    root: [u8; 32],
    our_secret: [u8; 32],
    theirs: [u8; 32],
    sending: Option<ChainState>,
    previous_sending_len: u32,
    receiving: Option<ChainState>,
    retired: Vec<[u8; 32]>,
    /// Oldest first.
    skipped: Vec<SkippedState>,
}

#[derive(serde::Serialize, serde::Deserialize, zeroize::Zeroize)]
struct ChainState {
    key: [u8; 32],
    next: u32,
}

#[derive(serde::Serialize, serde::Deserialize, zeroize::Zeroize)]
struct SkippedState {
    ratchet_key: [u8; 32],
    message_number: u32,
    message_key: [u8; 32],
    created_at: u64,
}

impl DoubleRatchet {
    pub(crate) fn to_state(&self) -> RatchetState {
        let chain = |c: &Option<Chain>| c.as_ref().map(|c| ChainState { key: *c.key.as_bytes(), next: c.next });
        RatchetState {
            root: *self.root.as_bytes(),
            our_secret: self.ours.secret.to_bytes(),
            theirs: self.theirs,
            sending: chain(&self.sending),
            previous_sending_len: self.previous_sending_len,
            receiving: chain(&self.receiving),
            retired: self.retired.iter().copied().collect(),
            skipped: self
                .skipped
                .iter_oldest_first()
                .map(|((ratchet_key, n), mk, at)| SkippedState {
                    ratchet_key: *ratchet_key,
                    message_number: *n,
                    message_key: *mk.as_bytes(),
                    created_at: at.as_millis(),
                })
                .collect(),
        }
    }

    pub(crate) fn from_state(state: &RatchetState) -> Self {
        let chain =
            |c: &Option<ChainState>| c.as_ref().map(|c| Chain { key: ChainKey::from_bytes(c.key), next: c.next });
        let mut skipped = SkippedKeys::new();
        for k in &state.skipped {
            skipped.insert(
                (k.ratchet_key, k.message_number),
                MessageKey::from_bytes(k.message_key),
                Timestamp(k.created_at),
            );
        }
        Self {
            root: RootKey::from_bytes(state.root),
            ours: RatchetKeyPair::from_secret(StaticSecret::from(state.our_secret)),
            theirs: state.theirs,
            sending: chain(&state.sending),
            previous_sending_len: state.previous_sending_len,
            receiving: chain(&state.receiving),
            retired: state.retired.iter().copied().take(RETIRED_KEYS_KEPT).collect(),
            skipped,
        }
    }
}
