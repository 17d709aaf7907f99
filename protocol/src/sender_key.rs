//! Sender Keys: one symmetric chain plus one Ed25519 signing key per
//! (group, sender), as in Signal's group messaging.
//!
//! A sender encrypts each group message once with its chain and signs it; every
//! member holds the sender's chain and verifying key (received over the
//! pairwise channel) and decrypts. Receivers verify the signature before any
//! state moves, and, as with the Double Ratchet, stage before they commit.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::{CryptoRng, RngCore};

use crate::aead;
use crate::group_error::GroupError;
use crate::ids::{ConversationId, PeerId};
use crate::kdf::{self, labels};
use crate::keys::{SenderChainKey, SenderMessageKey};
use crate::skipped::{SkippedKeys, MAX_SKIP};
use crate::time::Timestamp;
use crate::wire::{GroupMessage, SenderKeyDistribution, Signature64, PROTOCOL_VERSION};

/// Our own sending state for one group.
pub struct SenderKey {
    group_id: ConversationId,
    owner: PeerId,
    key_id: u32,
    chain: SenderChainKey,
    next: u32,
    signing: SigningKey,
}

impl core::fmt::Debug for SenderKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SenderKey")
            .field("group_id", &self.group_id)
            .field("key_id", &self.key_id)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl SenderKey {
    /// A fresh sender key whose ID differs from `previous_key_id`.
    pub fn generate(
        group_id: ConversationId,
        owner: PeerId,
        previous_key_id: Option<u32>,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Self {
        let mut key_id = rng.next_u32();
        while Some(key_id) == previous_key_id {
            key_id = rng.next_u32();
        }
        let mut chain = [0u8; 32];
        rng.fill_bytes(&mut chain);
        let signing = SigningKey::generate(rng);
        Self { group_id, owner, key_id, chain: SenderChainKey::from_bytes(chain), next: 0, signing }
    }

    /// This key's ID.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The next message number.
    pub fn next_message_number(&self) -> u32 {
        self.next
    }

    /// The distribution for other members, at the current chain position (so
    /// a new member cannot read what was sent before).
    pub fn distribution(&self) -> SenderKeyDistribution {
        SenderKeyDistribution {
            group_id: self.group_id,
            sender: self.owner,
            key_id: self.key_id,
            message_number: self.next,
            chain_key: *self.chain.as_bytes(),
            signing_public: self.signing.verifying_key().to_bytes(),
        }
    }

    /// Encrypts and signs one group message.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<GroupMessage, GroupError> {
        let next = self.next.checked_add(1).ok_or(GroupError::ChainExhausted)?;
        let (message_key, next_chain) = kdf::sender_chain_step(&self.chain);
        let keys = kdf::expand_sender_message_key(&message_key);
        let ciphertext = aead::seal(&keys.cipher_key, &keys.nonce, plaintext);
        let mut message = GroupMessage {
            group_id: self.group_id,
            sender: self.owner,
            key_id: self.key_id,
            message_number: self.next,
            ciphertext,
            signature: Signature64([0; 64]),
        };
        message.signature = Signature64(self.signing.sign(&group_message_transcript(&message)).to_bytes());
        self.chain = next_chain;
        self.next = next;
        Ok(message)
    }
}

/// `"p2pchat/v1/group-message" ‖ version ‖ group ID ‖ sender ID ‖ key ID (u32 BE)
/// ‖ message number (u32 BE) ‖ ciphertext`.
pub fn group_message_transcript(message: &GroupMessage) -> Vec<u8> {
    let mut t = Vec::with_capacity(labels::GROUP_MESSAGE.len() + 1 + 16 + 20 + 8 + message.ciphertext.len());
    t.extend_from_slice(labels::GROUP_MESSAGE);
    t.push(PROTOCOL_VERSION);
    t.extend_from_slice(message.group_id.as_bytes());
    t.extend_from_slice(&message.sender.0);
    t.extend_from_slice(&message.key_id.to_be_bytes());
    t.extend_from_slice(&message.message_number.to_be_bytes());
    t.extend_from_slice(&message.ciphertext);
    t
}

/// A sender key held for another member.
pub(crate) struct ReceivingSenderKey {
    key_id: u32,
    chain: SenderChainKey,
    next: u32,
    /// The earliest position we ever held a key for: everything from here
    /// on was either read (its key deleted) or is cached as skipped.
    start: u32,
    verifying: VerifyingKey,
    skipped: SkippedKeys<u32, SenderMessageKey>,
}

pub(crate) struct StagedSender {
    message_key: SenderMessageKey,
    change: SenderChange,
}

enum SenderChange {
    Skipped(u32),
    Advance { chain: SenderChainKey, next: u32, skipped: Vec<(u32, SenderMessageKey)> },
}

impl ReceivingSenderKey {
    pub(crate) fn from_distribution(d: &SenderKeyDistribution) -> Result<Self, GroupError> {
        let verifying = crate::identity::parse_verifying_key(&d.signing_public).ok_or(GroupError::InvalidSigningKey)?;
        Ok(Self {
            key_id: d.key_id,
            chain: SenderChainKey::from_bytes(d.chain_key),
            next: d.message_number,
            start: d.message_number,
            verifying,
            skipped: SkippedKeys::new(),
        })
    }

    pub(crate) fn key_id(&self) -> u32 {
        self.key_id
    }

    pub(crate) fn signing_public(&self) -> [u8; 32] {
        self.verifying.to_bytes()
    }

    pub(crate) fn verify(&self, message: &GroupMessage) -> Result<(), GroupError> {
        let signature = Signature::from_bytes(&message.signature.0);
        self.verifying
            .verify_strict(&group_message_transcript(message), &signature)
            .map_err(|_| GroupError::BadSignature)
    }

    pub(crate) fn stage(&self, sender: &PeerId, n: u32) -> Result<StagedSender, GroupError> {
        if let Some(key) = self.skipped.get(&n) {
            return Ok(StagedSender { message_key: key.clone(), change: SenderChange::Skipped(n) });
        }
        if n < self.next {
            return Err(GroupError::Duplicate { sender: *sender, message_number: n });
        }
        let skip = u64::from(n - self.next);
        if skip > u64::from(MAX_SKIP) {
            return Err(GroupError::TooFarAhead { skip, max: MAX_SKIP });
        }
        let next = n.checked_add(1).ok_or(GroupError::TooFarAhead { skip, max: MAX_SKIP })?;
        let mut skipped = Vec::with_capacity(skip as usize);
        let (mut message_key, mut chain) = kdf::sender_chain_step(&self.chain);
        for i in self.next..n {
            skipped.push((i, message_key));
            (message_key, chain) = kdf::sender_chain_step(&chain);
        }
        Ok(StagedSender { message_key, change: SenderChange::Advance { chain, next, skipped } })
    }

    pub(crate) fn open(staged: &StagedSender, ciphertext: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, GroupError> {
        let keys = kdf::expand_sender_message_key(&staged.message_key);
        aead::open(&keys.cipher_key, &keys.nonce, ciphertext).ok_or(GroupError::BadMac)
    }

    pub(crate) fn commit(&mut self, staged: StagedSender, now: Timestamp) {
        match staged.change {
            SenderChange::Skipped(n) => {
                self.skipped.remove(&n);
            }
            SenderChange::Advance { chain, next, skipped } => {
                self.skipped.reserve(skipped.len());
                for (n, key) in skipped {
                    self.skipped.insert(n, key, now);
                }
                self.chain = chain;
                self.next = next;
            }
        }
    }

    /// Another copy of this key that starts earlier than any we held:
    /// copies may arrive out of order (one from where a member became
    /// entitled to the key, a later one after a request). Only the
    /// positions before our earliest become skipped keys: those from there
    /// on were read (their keys deleted, and they stay deleted) or are
    /// cached already. Its chain must lead to ours.
    pub(crate) fn extend_back(&mut self, d: &SenderKeyDistribution, now: Timestamp) -> Result<(), GroupError> {
        if d.message_number >= self.start {
            return Ok(()); // nothing earlier than what we held
        }
        let span = self.next - d.message_number;
        if span > MAX_SKIP {
            return Err(GroupError::TooFarAhead { skip: u64::from(span), max: MAX_SKIP });
        }
        let mut chain = SenderChainKey::from_bytes(d.chain_key);
        let mut earlier = Vec::with_capacity((self.start - d.message_number) as usize);
        for n in d.message_number..self.next {
            let (message_key, next) = kdf::sender_chain_step(&chain);
            if n < self.start {
                earlier.push((n, message_key));
            }
            chain = next;
        }
        if chain != self.chain {
            return Err(GroupError::ConflictingKey { sender: d.sender, key_id: d.key_id });
        }
        for (n, key) in earlier {
            self.skipped.insert(n, key, now);
        }
        self.start = d.message_number;
        Ok(())
    }

    pub(crate) fn skipped_keys(&self) -> &SkippedKeys<u32, SenderMessageKey> {
        &self.skipped
    }

    pub(crate) fn skipped_keys_mut(&mut self) -> &mut SkippedKeys<u32, SenderMessageKey> {
        &mut self.skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::SeedableRng;

    fn setup() -> (SenderKey, ReceivingSenderKey) {
        let mut r = rand_chacha::ChaCha20Rng::seed_from_u64(9);
        let gid = ConversationId::random_group(&mut r);
        let own = SenderKey::generate(gid, PeerId([1; 20]), None, &mut r);
        let recv = ReceivingSenderKey::from_distribution(&own.distribution()).unwrap();
        (own, recv)
    }

    #[test]
    fn validly_signed_but_undecryptable_ciphertext_is_bad_mac() {
        let (mut own, mut recv) = setup();
        let mut m = own.encrypt(b"hello").unwrap();
        m.ciphertext[0] ^= 1;
        m.signature = Signature64(own.signing.sign(&group_message_transcript(&m)).to_bytes());
        recv.verify(&m).unwrap();
        let staged = recv.stage(&m.sender, m.message_number).unwrap();
        assert_eq!(ReceivingSenderKey::open(&staged, &m.ciphertext).err(), Some(GroupError::BadMac));
        // Not committed: the original still decrypts.
        m.ciphertext[0] ^= 1;
        let staged = recv.stage(&m.sender, m.message_number).unwrap();
        let plain = ReceivingSenderKey::open(&staged, &m.ciphertext).unwrap();
        recv.commit(staged, Timestamp(0));
        assert_eq!(&plain[..], b"hello");
    }

    fn read(recv: &mut ReceivingSenderKey, m: &GroupMessage) -> Result<Vec<u8>, GroupError> {
        let staged = recv.stage(&m.sender, m.message_number)?;
        let plain = ReceivingSenderKey::open(&staged, &m.ciphertext)?;
        recv.commit(staged, Timestamp(0));
        Ok(plain.to_vec())
    }

    #[test]
    fn an_earlier_copy_opens_only_positions_never_held() {
        let mut r = rand_chacha::ChaCha20Rng::seed_from_u64(10);
        let gid = ConversationId::random_group(&mut r);
        let mut own = SenderKey::generate(gid, PeerId([1; 20]), None, &mut r);
        let from_start = own.distribution();
        let early: Vec<GroupMessage> = (0..4).map(|i| own.encrypt(&[i]).unwrap()).collect();
        // The later copy arrives first: positions 0..4 are unreadable.
        let mut recv = ReceivingSenderKey::from_distribution(&own.distribution()).unwrap();
        let later = own.encrypt(b"later").unwrap();
        assert_eq!(read(&mut recv, &later).unwrap(), b"later");
        assert!(matches!(read(&mut recv, &early[1]), Err(GroupError::Duplicate { .. })));
        // The copy from the start opens them, once each.
        recv.extend_back(&from_start, Timestamp(0)).unwrap();
        for (i, m) in early.iter().enumerate() {
            assert_eq!(read(&mut recv, m).unwrap(), vec![i as u8]);
        }
        // The same early copy again (a retransmission) brings nothing back:
        // read positions stay unreadable.
        recv.extend_back(&from_start, Timestamp(0)).unwrap();
        assert!(matches!(read(&mut recv, &early[0]), Err(GroupError::Duplicate { .. })));
        assert!(matches!(read(&mut recv, &later), Err(GroupError::Duplicate { .. })));
        // A copy whose chain does not lead to ours is refused.
        let other = SenderKey::generate(gid, PeerId([1; 20]), None, &mut r).distribution();
        let forged = SenderKeyDistribution { key_id: from_start.key_id, message_number: 0, ..other };
        let mut fresh = ReceivingSenderKey::from_distribution(&own.distribution()).unwrap();
        assert!(matches!(fresh.extend_back(&forged, Timestamp(0)), Err(GroupError::ConflictingKey { .. })));
    }

    #[test]
    fn exhausted_chain_refuses() {
        let (mut own, _) = setup();
        own.next = u32::MAX;
        assert_eq!(own.encrypt(b"x").err(), Some(GroupError::ChainExhausted));
        assert_eq!(own.next, u32::MAX);
    }
}

/// The persisted form of our own [`SenderKey`].
#[derive(serde::Serialize, serde::Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub(crate) struct SenderKeyState {
    group_id: [u8; 16],
    owner: [u8; 20],
    key_id: u32,
    chain: [u8; 32],
    next: u32,
    signing_seed: [u8; 32],
}

/// The persisted form of a [`ReceivingSenderKey`].
#[derive(serde::Serialize, serde::Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub(crate) struct ReceivingSenderKeyState {
    key_id: u32,
    chain: [u8; 32],
    next: u32,
    /// See [`ReceivingSenderKey`]'s `start`.
    start: u32,
    signing_public: [u8; 32],
    /// Oldest first.
    skipped: Vec<SenderSkippedState>,
}

#[derive(serde::Serialize, serde::Deserialize, zeroize::Zeroize)]
struct SenderSkippedState {
    message_number: u32,
    message_key: [u8; 32],
    created_at: u64,
}

impl SenderKey {
    pub(crate) fn to_state(&self) -> SenderKeyState {
        SenderKeyState {
            group_id: *self.group_id.as_bytes(),
            owner: self.owner.0,
            key_id: self.key_id,
            chain: *self.chain.as_bytes(),
            next: self.next,
            signing_seed: self.signing.to_bytes(),
        }
    }

    pub(crate) fn from_state(state: &SenderKeyState) -> Self {
        Self {
            group_id: ConversationId(crate::ids::Uuid(state.group_id)),
            owner: PeerId(state.owner),
            key_id: state.key_id,
            chain: SenderChainKey::from_bytes(state.chain),
            next: state.next,
            signing: SigningKey::from_bytes(&state.signing_seed),
        }
    }
}

impl ReceivingSenderKey {
    pub(crate) fn to_state(&self) -> ReceivingSenderKeyState {
        ReceivingSenderKeyState {
            key_id: self.key_id,
            chain: *self.chain.as_bytes(),
            next: self.next,
            start: self.start,
            signing_public: self.verifying.to_bytes(),
            skipped: self
                .skipped
                .iter_oldest_first()
                .map(|(n, key, at)| SenderSkippedState {
                    message_number: *n,
                    message_key: *key.as_bytes(),
                    created_at: at.as_millis(),
                })
                .collect(),
        }
    }

    pub(crate) fn from_state(state: &ReceivingSenderKeyState) -> Result<Self, crate::state::StateError> {
        let verifying = crate::identity::parse_verifying_key(&state.signing_public)
            .ok_or(crate::state::StateError::InvalidKey("sender signing key"))?;
        let mut skipped = SkippedKeys::new();
        for k in &state.skipped {
            skipped.insert(k.message_number, SenderMessageKey::from_bytes(k.message_key), Timestamp(k.created_at));
        }
        Ok(Self {
            key_id: state.key_id,
            chain: SenderChainKey::from_bytes(state.chain),
            next: state.next,
            start: state.start.min(state.next),
            verifying,
            skipped,
        })
    }
}
