//! One group's encryption state: our sender key, and every other member's.
//!
//! Membership here is cryptographic membership: whose keys we accept and to
//! whom our key goes. The engine decides who is a member (admin invites,
//! leaves) and tells this type.

use std::collections::{BTreeMap, VecDeque};

use rand_core::{CryptoRng, RngCore};
use zeroize::Zeroizing;

pub use crate::group_error::GroupError;
use crate::ids::{ConversationId, PeerId};
use crate::sender_key::{ReceivingSenderKey, ReceivingSenderKeyState, SenderKey, SenderKeyState};
use crate::skipped::{enforce_shared_budget, SKIPPED_KEY_MAX_AGE_MS};
use crate::state::{self, StateError};
use crate::time::Timestamp;
use crate::wire::{GroupMessage, SenderKeyDistribution};

/// Previous sender keys kept per member, for messages still in flight after
/// a rotation.
pub const MAX_PREVIOUS_SENDER_KEYS: usize = 3;

/// The most members a group may have, its creator included.
pub const MAX_GROUP_MEMBERS: usize = 1_000;

#[derive(Default)]
struct MemberKeys {
    current: Option<ReceivingSenderKey>,
    /// Newest last.
    previous: VecDeque<ReceivingSenderKey>,
}

impl MemberKeys {
    fn find_mut(&mut self, key_id: u32) -> Option<&mut ReceivingSenderKey> {
        self.current.iter_mut().chain(self.previous.iter_mut().rev()).find(|k| k.key_id() == key_id)
    }

    fn keys(&self) -> impl Iterator<Item = &ReceivingSenderKey> {
        self.current.iter().chain(self.previous.iter())
    }

    fn keys_mut(&mut self) -> impl Iterator<Item = &mut ReceivingSenderKey> {
        self.current.iter_mut().chain(self.previous.iter_mut())
    }
}

/// A group's sender keys, seen from one member.
pub struct GroupSession {
    group_id: ConversationId,
    me: PeerId,
    own: SenderKey,
    members: BTreeMap<PeerId, MemberKeys>,
    /// For each member not yet known to hold our current key, the
    /// distribution it is entitled to: our chain where it stood when the key
    /// was made or the member joined. A member whose copy was lost (it
    /// arrived before the member's invite, say) gets this one again, and so
    /// can still read from where it joined, but never earlier. Dropped once
    /// the member confirms a message under the key, so our older chain
    /// positions do not outlive their use.
    entitled: BTreeMap<PeerId, SenderKeyDistribution>,
}

impl core::fmt::Debug for GroupSession {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GroupSession")
            .field("group_id", &self.group_id)
            .field("me", &self.me)
            .field("members", &self.members.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl GroupSession {
    /// Joins (or creates) a group with the given other members, generating
    /// our own sender key.
    pub fn new(
        group_id: ConversationId,
        me: PeerId,
        others: impl IntoIterator<Item = PeerId>,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Self, GroupError> {
        let members: BTreeMap<PeerId, MemberKeys> =
            others.into_iter().filter(|p| *p != me).map(|p| (p, MemberKeys::default())).collect();
        if members.len() + 1 > MAX_GROUP_MEMBERS {
            return Err(GroupError::TooManyMembers { max: MAX_GROUP_MEMBERS });
        }
        let own = SenderKey::generate(group_id, me, None, rng);
        let entitled = members.keys().map(|p| (*p, own.distribution())).collect();
        Ok(Self { group_id, me, own, members, entitled })
    }

    /// The group.
    pub fn group_id(&self) -> ConversationId {
        self.group_id
    }

    /// The other members, in peer ID order.
    pub fn members(&self) -> impl Iterator<Item = &PeerId> {
        self.members.keys()
    }

    /// Whether we hold a current sender key for `peer`.
    pub fn has_key_for(&self, peer: &PeerId) -> bool {
        self.members.get(peer).is_some_and(|m| m.current.is_some())
    }

    /// Our sender key's ID.
    pub fn own_key_id(&self) -> u32 {
        self.own.key_id()
    }

    /// Our current sender key, to send to each member over its pairwise channel.
    pub fn distribution(&self) -> SenderKeyDistribution {
        self.own.distribution()
    }

    /// The distribution to send `peer`: from where it became entitled to our
    /// current key, or our current position once it confirmed holding it.
    pub fn distribution_for(&self, peer: &PeerId) -> SenderKeyDistribution {
        self.entitled.get(peer).cloned().unwrap_or_else(|| self.own.distribution())
    }

    /// Whether `peer` is not yet known to hold our current key.
    pub fn awaits_confirmation(&self, peer: &PeerId) -> bool {
        self.entitled.contains_key(peer)
    }

    /// `peer` confirmed a message under our current key, so it holds the key.
    pub fn key_confirmed(&mut self, peer: &PeerId) {
        self.entitled.remove(peer);
    }

    /// Encrypts and signs a message for every current member.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<GroupMessage, GroupError> {
        self.own.encrypt(plaintext)
    }

    /// Adds a member (the engine has checked the admin's authority).
    pub fn add_member(&mut self, peer: PeerId) -> Result<(), GroupError> {
        if peer == self.me || self.members.contains_key(&peer) {
            return Ok(());
        }
        if self.members.len() + 2 > MAX_GROUP_MEMBERS {
            return Err(GroupError::TooManyMembers { max: MAX_GROUP_MEMBERS });
        }
        self.members.insert(peer, MemberKeys::default());
        self.entitled.insert(peer, self.own.distribution());
        Ok(())
    }

    /// Removes a member, forgets its keys, and rotates our own sender key so
    /// that it cannot read what we send next. Returns the new distribution
    /// for the remaining members, or `None` if `peer` was not a member.
    pub fn remove_member(
        &mut self,
        peer: &PeerId,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Option<SenderKeyDistribution> {
        self.members.remove(peer)?;
        self.entitled.remove(peer);
        Some(self.rotate_own_key(rng))
    }

    /// Replaces our sender key with a fresh one (after a member leaves, or
    /// when the chain is exhausted); returns its distribution for every
    /// current member.
    pub fn rotate_own_key(&mut self, rng: &mut (impl RngCore + CryptoRng)) -> SenderKeyDistribution {
        self.own = SenderKey::generate(self.group_id, self.me, Some(self.own.key_id()), rng);
        let distribution = self.own.distribution();
        self.entitled = self.members.keys().map(|p| (*p, distribution.clone())).collect();
        distribution
    }

    /// Accepts a sender key that arrived over `channel_peer`'s pairwise
    /// session. Only a member's own key, from that member, is accepted.
    pub fn accept_distribution(
        &mut self,
        channel_peer: &PeerId,
        d: &SenderKeyDistribution,
        now: Timestamp,
    ) -> Result<(), GroupError> {
        if d.group_id != self.group_id {
            return Err(GroupError::WrongGroup { expected: self.group_id, got: d.group_id });
        }
        if d.sender != *channel_peer {
            return Err(GroupError::ForwardedKey { claimed: d.sender, channel: *channel_peer });
        }
        let member = self.members.get_mut(&d.sender).ok_or(GroupError::NotAMember { peer: d.sender })?;
        if let Some(existing) = member.find_mut(d.key_id) {
            if existing.signing_public() != d.signing_public {
                return Err(GroupError::ConflictingKey { sender: d.sender, key_id: d.key_id });
            }
            // A key we hold: a copy from further along adds nothing; one
            // from earlier opens the positions we skipped past.
            existing.extend_back(d, now)?;
            self.enforce_skipped_key_budget();
            return Ok(());
        }
        let incoming = ReceivingSenderKey::from_distribution(d)?;
        if let Some(old) = member.current.replace(incoming) {
            if member.previous.len() == MAX_PREVIOUS_SENDER_KEYS {
                member.previous.pop_front();
            }
            member.previous.push_back(old);
        }
        Ok(())
    }

    /// Verifies and decrypts a group message. Nothing changes unless the
    /// signature verifies and the ciphertext authenticates.
    pub fn decrypt(&mut self, message: &GroupMessage, now: Timestamp) -> Result<Zeroizing<Vec<u8>>, GroupError> {
        if message.group_id != self.group_id {
            return Err(GroupError::WrongGroup { expected: self.group_id, got: message.group_id });
        }
        let sender = message.sender;
        let member = self.members.get_mut(&sender).ok_or(GroupError::NotAMember { peer: sender })?;
        let key = member.find_mut(message.key_id).ok_or(GroupError::UnknownChain { sender, key_id: message.key_id })?;
        key.verify(message)?;
        let staged = key.stage(&sender, message.message_number)?;
        let plaintext = ReceivingSenderKey::open(&staged, &message.ciphertext)?;
        key.commit(staged, now);
        self.enforce_skipped_key_budget();
        Ok(plaintext)
    }

    /// Skipped keys cached for this group, across every member's keys.
    pub fn skipped_key_count(&self) -> usize {
        self.members.values().flat_map(MemberKeys::keys).map(|k| k.skipped_keys().len()).sum()
    }

    /// The most previous sender-key states kept for any one member (at
    /// most [`MAX_PREVIOUS_SENDER_KEYS`]).
    pub fn most_previous_sender_keys(&self) -> usize {
        self.members.values().map(|m| m.previous.len()).max().unwrap_or(0)
    }

    /// One budget of [`MAX_SKIPPED_KEYS`](crate::MAX_SKIPPED_KEYS) for the
    /// whole group conversation: beyond it, the oldest cached key in the
    /// group goes first.
    fn enforce_skipped_key_budget(&mut self) {
        enforce_shared_budget(
            self.members.values_mut().flat_map(MemberKeys::keys_mut).map(|k| k.skipped_keys_mut()).collect(),
        );
    }

    /// Deletes skipped keys older than [`SKIPPED_KEY_MAX_AGE_MS`] (the 7-day
    /// retention rule); returns how many went.
    pub fn expire_skipped_keys(&mut self, now: Timestamp) -> usize {
        let cutoff = Timestamp(now.as_millis().saturating_sub(SKIPPED_KEY_MAX_AGE_MS));
        self.members
            .values_mut()
            .flat_map(MemberKeys::keys_mut)
            .map(|k| k.skipped_keys_mut().remove_created_before(cutoff))
            .sum()
    }
}

/// The persisted form of a [`GroupSession`].
#[derive(serde::Serialize, serde::Deserialize)]
struct GroupState {
    group_id: [u8; 16],
    me: [u8; 20],
    own: SenderKeyState,
    members: Vec<MemberState>,
    /// (member, what it is entitled to).
    entitled: Vec<([u8; 20], SenderKeyDistribution)>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct MemberState {
    peer: [u8; 20],
    current: Option<ReceivingSenderKeyState>,
    /// Oldest first.
    previous: Vec<ReceivingSenderKeyState>,
}

impl GroupSession {
    /// Everything needed to restore this group's keys, secrets included:
    /// seal it before it is stored.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        state::encode(&GroupState {
            group_id: *self.group_id.as_bytes(),
            me: self.me.0,
            own: self.own.to_state(),
            members: self
                .members
                .iter()
                .map(|(peer, keys)| MemberState {
                    peer: peer.0,
                    current: keys.current.as_ref().map(ReceivingSenderKey::to_state),
                    previous: keys.previous.iter().map(ReceivingSenderKey::to_state).collect(),
                })
                .collect(),
            entitled: self.entitled.iter().map(|(p, d)| (p.0, d.clone())).collect(),
        })
    }

    /// Restores a group saved by [`GroupSession::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let state: GroupState = state::decode(bytes, "group session")?;
        let mut members = BTreeMap::new();
        for m in &state.members {
            let keys = MemberKeys {
                current: m.current.as_ref().map(ReceivingSenderKey::from_state).transpose()?,
                previous: m
                    .previous
                    .iter()
                    .take(MAX_PREVIOUS_SENDER_KEYS)
                    .map(ReceivingSenderKey::from_state)
                    .collect::<Result<_, _>>()?,
            };
            members.insert(PeerId(m.peer), keys);
        }
        Ok(Self {
            group_id: ConversationId(crate::ids::Uuid(state.group_id)),
            me: PeerId(state.me),
            own: SenderKey::from_state(&state.own),
            entitled: state.entitled.iter().map(|(p, d)| (PeerId(*p), d.clone())).collect(),
            members,
        })
    }
}
