//! Groups: creation, invites, leaves, Sender Keys over the pairwise
//! sessions, and group messages (held while their sender's key is missing).

use super::MessageStatus;
use std::collections::{BTreeMap, BTreeSet};

use super::{
    check_content, Conversation, ConversationKind, Engine, EngineError, Event, Handled, HeldMessage, Invitation,
    Member, Message, OutboxPayload, Store, MAX_CONTENT_LEN, MAX_GROUP_NAME_LEN, MIN_GROUP_OTHERS,
};
use crate::group::{GroupError, GroupSession, MAX_GROUP_MEMBERS};
use crate::ids::{ConversationId, MessageId, PeerId};
use crate::skipped::SKIPPED_KEY_MAX_AGE_MS;
use crate::time::Timestamp;
use crate::wire::{
    ChatContent, Envelope, EnvelopeBody, GroupControl, GroupMessage, PairwisePayload, RosterEntry,
    SenderKeyDistribution,
};

impl<S: Store> Engine<S> {
    pub(super) fn load_group(&self, id: &ConversationId) -> Result<Option<GroupSession>, EngineError> {
        match self.store.group_keys(id)? {
            Some(bytes) => Ok(Some(GroupSession::from_bytes(&bytes)?)),
            None => Ok(None),
        }
    }

    fn save_group(&mut self, group: &GroupSession) -> Result<(), EngineError> {
        self.store.put_group_keys(&group.group_id(), &group.to_bytes())?;
        Ok(())
    }

    /// A group this node is in: its conversation, admin and keys.
    fn joined_group(&self, id: &ConversationId) -> Result<(Conversation, PeerId, GroupSession), EngineError> {
        let conversation = self.conversation(id)?;
        let ConversationKind::Group { admin, .. } = conversation.kind else {
            return Err(EngineError::NotAGroup(*id));
        };
        if conversation.left {
            return Err(EngineError::LeftGroup(*id));
        }
        let group = self.load_group(id)?.ok_or(EngineError::LeftGroup(*id))?;
        Ok((conversation, admin, group))
    }

    /// Current members (not left), this node included.
    fn current_members(&self, id: &ConversationId) -> Result<Vec<Member>, EngineError> {
        Ok(self.store.members(id)?.into_iter().filter(|m| m.left_at.is_none()).collect())
    }

    fn others(&self, id: &ConversationId) -> Result<Vec<PeerId>, EngineError> {
        let me = self.peer_id();
        Ok(self.current_members(id)?.into_iter().map(|m| m.peer_id).filter(|p| *p != me).collect())
    }

    fn enqueue_control(&mut self, now: Timestamp, peer: PeerId, payload: &PairwisePayload) -> Result<(), EngineError> {
        self.enqueue(now, peer, OutboxPayload::Control(payload.encode().to_vec()))
    }

    fn send_own_key(&mut self, now: Timestamp, group: &GroupSession, peer: PeerId) -> Result<(), EngineError> {
        self.enqueue_control(now, peer, &PairwisePayload::SenderKeyDistribution(group.distribution_for(&peer)))
    }

    fn invite_payload(&self, conversation: &Conversation, admin: PeerId) -> Result<PairwisePayload, EngineError> {
        let ConversationKind::Group { name, .. } = &conversation.kind else {
            return Err(EngineError::NotAGroup(conversation.id));
        };
        Ok(PairwisePayload::GroupControl(GroupControl::Invite {
            group_id: conversation.id,
            name: name.clone(),
            admin,
            members: self
                .current_members(&conversation.id)?
                .into_iter()
                .map(|m| RosterEntry { peer_id: m.peer_id, epoch: m.epoch })
                .collect(),
            created_at: conversation.created_at,
        }))
    }

    fn members_changed(&mut self, now: Timestamp, id: &ConversationId) -> Result<(), EngineError> {
        let mut conversation = self.conversation(id)?;
        conversation.updated_at = now;
        self.store.put_conversation(&conversation)?;
        self.conversation_updated(conversation)
    }

    // ---- commands ------------------------------------------------------------

    pub(super) fn create_group(
        &mut self,
        now: Timestamp,
        name: String,
        members: Vec<PeerId>,
    ) -> Result<Conversation, EngineError> {
        let name = name.trim().to_owned();
        if name.is_empty() {
            return Err(EngineError::EmptyGroupName);
        }
        if name.len() > MAX_GROUP_NAME_LEN {
            return Err(EngineError::GroupNameTooLong { len: name.len(), max: MAX_GROUP_NAME_LEN });
        }
        let me = self.peer_id();
        let others: BTreeSet<PeerId> = members.into_iter().filter(|p| *p != me).collect();
        if others.len() < MIN_GROUP_OTHERS {
            return Err(EngineError::TooFewMembers { min: MIN_GROUP_OTHERS, got: others.len() });
        }
        if others.len() + 1 > MAX_GROUP_MEMBERS {
            return Err(EngineError::TooManyMembers { max: MAX_GROUP_MEMBERS });
        }
        let id = ConversationId::random_group(&mut self.rng);
        let conversation = Conversation {
            id,
            kind: ConversationKind::Group { name, admin: me },
            created_at: now,
            updated_at: now,
            last_message_at: None,
            last_message_id: None,
            unread_count: 0,
            left: false,
        };
        self.store.put_conversation(&conversation)?;
        for peer in core::iter::once(me).chain(others.iter().copied()) {
            let member = Member { peer_id: peer, joined_at: now, is_admin: peer == me, left_at: None, epoch: 1 };
            self.store.put_member(&id, &member)?;
        }
        let group = GroupSession::new(id, me, others.iter().copied(), &mut self.rng)?;
        self.save_group(&group)?;
        let invite = self.invite_payload(&conversation, me)?;
        for peer in others {
            self.enqueue_control(now, peer, &invite)?;
            self.send_own_key(now, &group, peer)?;
            self.pump(now, peer)?;
        }
        self.staged.events.push(Event::ConversationCreated(conversation.clone()));
        Ok(conversation)
    }

    pub(super) fn send_group_message(
        &mut self,
        now: Timestamp,
        id: ConversationId,
        content: String,
    ) -> Result<Message, EngineError> {
        check_content(&content)?;
        let (conversation, _, mut group) = self.joined_group(&id)?;
        let recipients = self.others(&id)?;
        if recipients.is_empty() {
            return Err(EngineError::NoOtherMembers(id));
        }
        let message_id = MessageId::random(&mut self.rng);
        let plaintext = ChatContent { message_id, sent_at: now, content: content.clone() }.encode();
        let encrypted = group.encrypt(&plaintext)?;
        self.save_group(&group)?;
        let position = Some((encrypted.key_id, encrypted.message_number));
        let message = self.record_outgoing(now, conversation, message_id, content, &recipients, position)?;
        self.store.put_group_envelope(&message_id, &Envelope::new(EnvelopeBody::Group(encrypted)).encode())?;
        for peer in recipients {
            // Our key goes to a member lazily, before our first message to
            // it under that key, and again until the member acknowledges it.
            if group.awaits_confirmation(&peer) && !self.key_queued_for(&group, &peer)? {
                if let Err(e) = self.send_own_key(now, &group, peer) {
                    self.recipient_failed(now, &message_id, &peer, e)?;
                    continue;
                }
            }
            if let Err(e) = self.enqueue(now, peer, OutboxPayload::Group { message_id }) {
                self.recipient_failed(now, &message_id, &peer, e)?;
                continue;
            }
            self.pump(now, peer)?;
        }
        Ok(self.store.message(&message_id)?.unwrap_or(message))
    }

    pub(super) fn invite(&mut self, now: Timestamp, id: ConversationId, peer: PeerId) -> Result<(), EngineError> {
        let me = self.peer_id();
        let (conversation, admin, mut group) = self.joined_group(&id)?;
        if admin != me {
            return Err(EngineError::NotAdmin { admin });
        }
        if peer == me {
            return Err(EngineError::SelfConversation(peer));
        }
        let existing = self.others(&id)?;
        if existing.contains(&peer) {
            return Err(EngineError::AlreadyMember(peer));
        }
        if existing.len() + 2 > MAX_GROUP_MEMBERS {
            return Err(EngineError::TooManyMembers { max: MAX_GROUP_MEMBERS });
        }
        let epoch = self
            .store
            .members(&id)?
            .iter()
            .map(|m| m.epoch)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or(EngineError::TooManyMembers { max: MAX_GROUP_MEMBERS })?;
        self.store.put_member(&id, &Member { peer_id: peer, joined_at: now, is_admin: false, left_at: None, epoch })?;
        group.add_member(peer)?;
        self.save_group(&group)?;
        let added = PairwisePayload::GroupControl(GroupControl::MemberAdded {
            group_id: id,
            member: RosterEntry { peer_id: peer, epoch },
        });
        for other in existing {
            self.enqueue_control(now, other, &added)?;
            self.pump(now, other)?;
        }
        let invite = self.invite_payload(&conversation, admin)?;
        self.enqueue_control(now, peer, &invite)?;
        self.send_own_key(now, &group, peer)?;
        self.pump(now, peer)?;
        self.members_changed(now, &id)
    }

    pub(super) fn leave(&mut self, now: Timestamp, id: ConversationId) -> Result<(), EngineError> {
        let (mut conversation, _, _) = self.joined_group(&id)?;
        let me = self.peer_id();
        let mine = self.store.members(&id)?.into_iter().find(|m| m.peer_id == me);
        let epoch = mine.as_ref().map_or(0, |m| m.epoch);
        let leave = PairwisePayload::GroupControl(GroupControl::Leave { group_id: id, epoch });
        // Members refuse our messages once our leave reaches them, and our
        // keys go with it: what has not reached everyone by now never will.
        let mut undelivered = BTreeSet::new();
        for message in self.store.messages(&id)? {
            if message.is_outgoing(&me) && message.status < MessageStatus::Delivered {
                self.fail_message(
                    now,
                    &message.id,
                    "this node left the group before the message reached every member",
                )?;
                undelivered.insert(message.id);
            }
        }
        // Nor do our keys or key requests for the group matter any more.
        for item in self.store.outbox()? {
            let ours = match &item.payload {
                OutboxPayload::Group { message_id } | OutboxPayload::GroupCopy { message_id } => {
                    undelivered.contains(message_id)
                }
                OutboxPayload::Control(bytes) => match PairwisePayload::decode(bytes) {
                    Ok(PairwisePayload::SenderKeyDistribution(d)) => d.group_id == id,
                    Ok(PairwisePayload::SenderKeyRequest { group_id }) => group_id == id,
                    _ => false,
                },
                _ => false,
            };
            if ours {
                self.store.delete_outbox_item(item.seq)?;
            }
        }
        for peer in self.others(&id)? {
            // A leave always goes out, whatever else is queued for the peer.
            self.enqueue_unbounded(now, peer, OutboxPayload::Control(leave.encode().to_vec()))?;
            self.pump(now, peer)?;
        }
        if let Some(mut member) = mine {
            member.left_at = Some(now);
            self.store.put_member(&id, &member)?;
        }
        conversation.left = true;
        conversation.updated_at = now;
        self.store.put_conversation(&conversation)?;
        // Our keys for the group go: nothing sent after we left is ours to read.
        self.store.delete_group_keys(&id)?;
        self.conversation_updated(conversation)
    }

    // ---- pairwise group traffic ------------------------------------------------

    pub(super) fn on_group_control(
        &mut self,
        now: Timestamp,
        from: PeerId,
        control: GroupControl,
    ) -> Result<Handled, EngineError> {
        match control {
            GroupControl::Invite { group_id, name, admin, members, created_at } => {
                let invitation = Invitation { group_id, name, admin, members, created_at, received_at: now };
                self.on_invite(now, from, invitation)
            }
            GroupControl::MemberAdded { group_id, member } => self.on_member_added(now, from, group_id, member),
            GroupControl::Leave { group_id, epoch } => self.on_leave(now, from, group_id, epoch),
            GroupControl::MemberLeft { group_id, member } => self.on_member_left(now, from, group_id, member),
        }
    }

    /// Whether our current sender key is already queued for `peer` in this
    /// group; queued distributions of older keys are dropped.
    fn key_queued_for(&mut self, group: &GroupSession, peer: &PeerId) -> Result<bool, EngineError> {
        let mut queued = false;
        for item in self.store.outbox_for(peer)? {
            let OutboxPayload::Control(bytes) = &item.payload else { continue };
            let Ok(PairwisePayload::SenderKeyDistribution(d)) = PairwisePayload::decode(bytes) else { continue };
            if d.group_id != group.group_id() {
                continue;
            }
            if d.key_id == group.own_key_id() {
                queued = true;
            } else {
                self.store.delete_outbox_item(item.seq)?;
            }
        }
        Ok(queued)
    }

    fn on_member_added(
        &mut self,
        now: Timestamp,
        from: PeerId,
        group_id: ConversationId,
        added: RosterEntry,
    ) -> Result<Handled, EngineError> {
        let Ok((_, admin, mut group)) = self.joined_group(&group_id) else {
            // Our own invite may still be on its way, also when we left and
            // the admin invited us back (this notice can overtake that
            // invite, whose roster predates it). Left for good, we are
            // still sent this only until our leave reaches the admin,
            // which then drops everything queued for us.
            return Ok(Handled::NotYet);
        };
        if from != admin {
            self.reject(from, "only the group's admin may add members");
            return Ok(Handled::Done);
        }
        if added.peer_id == self.peer_id() {
            return Ok(Handled::Done);
        }
        let known = self.store.members(&group_id)?.into_iter().find(|m| m.peer_id == added.peer_id);
        if known.as_ref().is_some_and(|m| m.epoch >= added.epoch) {
            // A repeat, or older than a leave we already saw.
            return Ok(Handled::Done);
        }
        if let Some(old) = known.filter(|m| m.left_at.is_none()) {
            // A newer join of a current member: its old join ended (its leave
            // has not reached us), so that ends here first, with rotation.
            self.on_leave(now, added.peer_id, group_id, old.epoch)?;
            let Ok((_, _, reloaded)) = self.joined_group(&group_id) else { return Ok(Handled::Done) };
            group = reloaded;
        }
        if let Err(e) = group.add_member(added.peer_id) {
            self.reject(from, &e.to_string());
            return Ok(Handled::Done);
        }
        let member =
            Member { peer_id: added.peer_id, joined_at: now, is_admin: false, left_at: None, epoch: added.epoch };
        self.store.put_member(&group_id, &member)?;
        self.save_group(&group)?;
        self.members_changed(now, &group_id)?;
        Ok(Handled::Done)
    }

    fn on_leave(
        &mut self,
        now: Timestamp,
        from: PeerId,
        group_id: ConversationId,
        epoch: u64,
    ) -> Result<Handled, EngineError> {
        // A group we are not in (left, deleted, or never joined) has nothing
        // to leave.
        let Ok((_, admin, mut group)) = self.joined_group(&group_id) else {
            return self.leave_while_invited(from, group_id, from, epoch);
        };
        let members = self.store.members(&group_id)?;
        if admin == self.peer_id() && epoch > members.iter().map(|m| m.epoch).max().unwrap_or(0) {
            self.reject(from, "leave naming a join the admin never issued");
            return Ok(Handled::Done);
        }
        let known = members.into_iter().find(|m| m.peer_id == from);
        let mut member = match known {
            // A leave of a join we have not heard of: remember it, so the
            // admin's late notice of that join does not bring the peer back.
            None => {
                let tombstone = Member { peer_id: from, joined_at: now, is_admin: false, left_at: Some(now), epoch };
                self.store.put_member(&group_id, &tombstone)?;
                return Ok(Handled::Done);
            }
            Some(m) if m.epoch > epoch => return Ok(Handled::Done), // ends an older join
            Some(mut m) if m.left_at.is_some() => {
                if m.epoch < epoch {
                    m.epoch = epoch;
                    self.store.put_member(&group_id, &m)?;
                }
                return Ok(Handled::Done); // a repeat
            }
            Some(m) => m,
        };
        member.left_at = Some(now);
        member.epoch = epoch;
        self.store.put_member(&group_id, &member)?;
        // Our messages stop waiting for the leaver, and nothing more goes to it.
        let me = self.peer_id();
        let mut ours = BTreeSet::new();
        for message in self.store.messages(&group_id)? {
            if message.is_outgoing(&me) {
                self.drop_recipient(now, &message.id, &from, "every recipient left the group")?;
                ours.insert(message.id);
            }
        }
        for item in self.store.outbox_for(&from)? {
            let for_this_group = match &item.payload {
                OutboxPayload::Group { message_id } | OutboxPayload::GroupCopy { message_id } => {
                    ours.contains(message_id)
                }
                OutboxPayload::Control(bytes) => match PairwisePayload::decode(bytes) {
                    Ok(PairwisePayload::SenderKeyDistribution(d)) => d.group_id == group_id,
                    Ok(PairwisePayload::GroupControl(
                        GroupControl::Invite { group_id: g, .. }
                        | GroupControl::MemberAdded { group_id: g, .. }
                        | GroupControl::Leave { group_id: g, .. }
                        | GroupControl::MemberLeft { group_id: g, .. },
                    )) => g == group_id,
                    _ => false,
                },
                _ => false,
            };
            if for_this_group {
                self.store.delete_outbox_item(item.seq)?;
            }
        }
        // Everyone left rotates (the new key goes out lazily, before each
        // member's next message), so the leaver cannot read what follows.
        if group.remove_member(&from, &mut self.rng).is_some() {
            self.save_group(&group)?;
            self.copy_unconfirmed(now, &group_id, None)?;
        }
        if admin == me {
            // The admin tells every member: a leaver tells only the members
            // it knows, and an invitee that declines tells only the admin.
            let left = PairwisePayload::GroupControl(GroupControl::MemberLeft {
                group_id,
                member: RosterEntry { peer_id: from, epoch },
            });
            for other in self.others(&group_id)? {
                // A member whose queue is full misses it, not the others.
                ignore_full(self.enqueue_control(now, other, &left))?;
                self.pump(now, other)?;
            }
        }
        self.members_changed(now, &group_id)?;
        Ok(Handled::Done)
    }

    /// A leave (the leaver's own, or the admin's word of it) for a group
    /// whose invitation waits: the leaver goes from the waiting roster at
    /// once, so that accepting never sends it our key, and the notice is
    /// not acknowledged, so that it comes again, to be handled in full,
    /// once the user accepts.
    fn leave_while_invited(
        &mut self,
        from: PeerId,
        group_id: ConversationId,
        leaver: PeerId,
        epoch: u64,
    ) -> Result<Handled, EngineError> {
        let Some(mut invitation) = self.store.invitation(&group_id)? else { return Ok(Handled::Done) };
        if from != leaver && from != invitation.admin {
            self.reject(from, "only the group's admin may report a member's leave");
            return Ok(Handled::Done);
        }
        // Our own leave is ours to send, and the admin's is its own to send
        // (its word of it is ignored, as in a joined group); the admin's own
        // leave goes from the roster like anyone's.
        if leaver == self.peer_id() || (leaver == invitation.admin && from != leaver) {
            return Ok(Handled::Done);
        }
        let before = invitation.members.len();
        invitation.members.retain(|m| !(m.peer_id == leaver && m.epoch <= epoch));
        if invitation.members.len() != before {
            self.store.put_invitation(&invitation)?;
        }
        Ok(Handled::NotYet)
    }

    /// The admin's word that a member left (or declined its invitation).
    fn on_member_left(
        &mut self,
        now: Timestamp,
        from: PeerId,
        group_id: ConversationId,
        member: RosterEntry,
    ) -> Result<Handled, EngineError> {
        let Ok((_, admin, _)) = self.joined_group(&group_id) else {
            return self.leave_while_invited(from, group_id, member.peer_id, member.epoch);
        };
        if from != admin {
            self.reject(from, "only the group's admin may report a member's leave");
            return Ok(Handled::Done);
        }
        if member.peer_id == self.peer_id() || member.peer_id == admin {
            // Our own leave is ours to send, and the admin leaves by itself.
            return Ok(Handled::Done);
        }
        // Only a join numbered no later than any we have seen: a number
        // beyond them would bar a later join for ever. A leave of a join
        // not heard of yet is remembered (the notice of that join may come
        // after it, its copies travelling apart), but only while the group
        // keeps a bounded number of member records, so that the admin's
        // word cannot grow them without end.
        let members = self.store.members(&group_id)?;
        let newest = members.iter().map(|m| m.epoch).max().unwrap_or(0);
        let known = members.iter().any(|m| m.peer_id == member.peer_id);
        if member.epoch > newest || (!known && members.len() >= 2 * MAX_GROUP_MEMBERS) {
            return Ok(Handled::Done);
        }
        self.on_leave(now, member.peer_id, group_id, member.epoch)
    }

    /// A member still sends us group traffic after we left: it never heard
    /// (it joined after our leave went out, or our notice was lost). It
    /// gets our leave again, or it would send to us for ever.
    fn remind_of_leave(&mut self, now: Timestamp, peer: PeerId, id: ConversationId) -> Result<(), EngineError> {
        let left = self.store.conversation(&id)?.is_some_and(|c| c.left);
        if !left {
            return Ok(());
        }
        // Only peers we already deal with: a member we knew, or a peer we
        // hold a session with. Anyone else naming the group (a relay can
        // put any sender on a frame) would make us queue work for invented
        // peers and tell them we were in the group.
        let members = self.store.members(&id)?;
        if !members.iter().any(|m| m.peer_id == peer) && self.store.sessions(&peer)?.is_none() {
            return Ok(());
        }
        let me = self.peer_id();
        let epoch = members.into_iter().find(|m| m.peer_id == me).map_or(0, |m| m.epoch);
        let leave = PairwisePayload::GroupControl(GroupControl::Leave { group_id: id, epoch }).encode().to_vec();
        let queued = self
            .store
            .outbox_for(&peer)?
            .iter()
            .any(|i| matches!(&i.payload, OutboxPayload::Control(b) if *b == leave));
        if !queued {
            self.enqueue_unbounded(now, peer, OutboxPayload::Control(leave))?;
            self.pump(now, peer)?;
        }
        Ok(())
    }

    /// Our messages that a member has not confirmed may be out of its
    /// reach under our sender key: sealed under the key we just dropped
    /// (which nobody can ask us for again), or before the position from
    /// which the member holds it. Each such member gets them over its
    /// pairwise session instead, in place of the group envelope. Sealing them
    /// again under our current key would let a member invited since read
    /// them (it holds that key from where it joined), so they never are.
    fn copy_unconfirmed(
        &mut self,
        now: Timestamp,
        id: &ConversationId,
        only_for: Option<PeerId>,
    ) -> Result<(), EngineError> {
        let me = self.peer_id();
        let waiting = |s: &MessageStatus| matches!(s, MessageStatus::Created | MessageStatus::Sent);
        let mut copies: BTreeMap<PeerId, BTreeSet<MessageId>> = BTreeMap::new();
        for message in self.store.messages(id)? {
            if !message.is_outgoing(&me) || !waiting(&message.status) {
                continue;
            }
            for (peer, status) in &message.recipients {
                if waiting(status) && only_for.is_none_or(|p| p == *peer) {
                    copies.entry(*peer).or_default().insert(message.id);
                }
            }
        }
        for (peer, messages) in copies {
            let mut queued = BTreeSet::new();
            for item in self.store.outbox_for(&peer)? {
                match &item.payload {
                    OutboxPayload::Group { message_id } if messages.contains(message_id) => {
                        self.store.delete_outbox_item(item.seq)?;
                    }
                    OutboxPayload::GroupCopy { message_id } => {
                        queued.insert(*message_id);
                    }
                    _ => {}
                }
            }
            for message_id in messages.difference(&queued) {
                if let Err(e) = self.enqueue(now, peer, OutboxPayload::GroupCopy { message_id: *message_id }) {
                    self.recipient_failed(now, message_id, &peer, e)?;
                }
            }
            self.pump(now, peer)?;
        }
        Ok(())
    }

    fn on_invite(&mut self, now: Timestamp, from: PeerId, invitation: Invitation) -> Result<Handled, EngineError> {
        let me = self.peer_id();
        let Invitation { group_id, admin, .. } = invitation;
        if from != admin {
            self.reject(from, "group invite not sent by the group's admin");
            return Ok(Handled::Done);
        }
        if !group_id.is_group_id() {
            self.reject(from, "group invite with an ID that is not a group ID");
            return Ok(Handled::Done);
        }
        if invitation.name.len() > MAX_GROUP_NAME_LEN {
            self.reject(from, "group invite with a name over the length limit");
            return Ok(Handled::Done);
        }
        let roster: BTreeSet<PeerId> = invitation.members.iter().map(|m| m.peer_id).collect();
        let Some(my_epoch) = invitation.epoch_of(&me) else {
            self.reject(from, "group invite with a roster that does not hold this node");
            return Ok(Handled::Done);
        };
        if roster.len() > MAX_GROUP_MEMBERS || !roster.contains(&admin) {
            self.reject(from, "group invite with a roster that is too large or lacks its admin");
            return Ok(Handled::Done);
        }
        let existing = self.store.conversation(&group_id)?;
        if let Some(existing) = &existing {
            let same_admin = matches!(existing.kind, ConversationKind::Group { admin: a, .. } if a == admin);
            if !same_admin {
                self.reject(from, "group invite that conflicts with a known group");
                return Ok(Handled::Done);
            }
            let mine = self.store.members(&group_id)?.into_iter().find(|m| m.peer_id == me);
            if mine.is_some_and(|m| m.epoch >= my_epoch) {
                return Ok(Handled::Done); // a repeat, or an invite older than our leave
            }
        }
        let in_group = existing.is_some_and(|c| !c.left);
        if !in_group && !self.chose_to_deal_with(&admin)? {
            return self.hold_invitation(invitation);
        }
        self.join(now, invitation).map(|_| Handled::Done)
    }

    /// Whether the user has chosen to deal with `peer`: written to it in a
    /// 1:1 conversation, or joined a group it administers. Anyone may open
    /// a 1:1 conversation with us by sending a message, so receiving one
    /// is not enough.
    fn chose_to_deal_with(&self, peer: &PeerId) -> Result<bool, EngineError> {
        let me = self.peer_id();
        let direct = ConversationId::for_peers(&me, peer);
        if self.store.has_message_from(&direct, &me)? {
            return Ok(true);
        }
        for conversation in self.store.conversations()? {
            if !conversation.left
                && matches!(conversation.kind, ConversationKind::Group { admin, .. } if admin == *peer)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Keeps an invitation for the user's answer, within the caps.
    fn hold_invitation(&mut self, invitation: Invitation) -> Result<Handled, EngineError> {
        let me = self.peer_id();
        if let Some(waiting) = self.store.invitation(&invitation.group_id)? {
            if waiting.admin != invitation.admin {
                self.reject(invitation.admin, "group invite that conflicts with a waiting invitation");
            } else if waiting.epoch_of(&me) < invitation.epoch_of(&me) {
                // A newer invitation (we left and were invited again): its
                // roster, under the first one's wait.
                self.store.put_invitation(&Invitation { received_at: waiting.received_at, ..invitation })?;
            }
            return Ok(Handled::Done);
        }
        // Over a cap, nothing is sent back: a reply per refused invitation
        // would let a stranger's flood fill our outbox instead. Not
        // acknowledged either, so the admin sends it again later: taken once
        // the user has answered one of its others, rather than lost while
        // the admin's sender key for that group goes unheard for ever.
        if self.store.invitation_count(Some(&invitation.admin))? >= self.config.max_invitations_per_admin {
            self.reject(invitation.admin, "too many of this peer's group invitations are waiting; not taken yet");
            return Ok(Handled::NotYet);
        }
        while self.store.invitation_count(None)? >= self.config.max_invitations {
            let Some(oldest) = self.store.oldest_invitation()? else { break };
            self.store.delete_invitation(&oldest)?;
            self.staged.events.push(Event::ConversationsUpdated);
        }
        self.store.put_invitation(&invitation)?;
        self.staged.events.push(Event::GroupInvite {
            conversation_id: invitation.group_id,
            group_name: invitation.name,
            invited_by: invitation.admin,
            pending: true,
        });
        Ok(Handled::Done)
    }

    pub(super) fn accept_invitation(
        &mut self,
        now: Timestamp,
        id: ConversationId,
    ) -> Result<Conversation, EngineError> {
        let invitation = self.store.invitation(&id)?.ok_or(EngineError::NoInvitation(id))?;
        let admin = invitation.admin;
        self.store.delete_invitation(&id)?;
        if !self.join(now, invitation)? {
            // Another admin's group of that ID was joined meanwhile.
            return Err(EngineError::NoInvitation(id));
        }
        // What the admin sent while the invitation waited was refused
        // unacknowledged; asking for its key has it send that again now
        // (over the pairwise session) rather than at its next retry. The
        // other members resend on their own schedule.
        ignore_full(self.request_key(now, admin, id))?;
        self.pump(now, admin)?;
        self.conversation(&id)
    }

    pub(super) fn decline_invitation(&mut self, now: Timestamp, id: ConversationId) -> Result<(), EngineError> {
        let invitation = self.store.invitation(&id)?.ok_or(EngineError::NoInvitation(id))?;
        self.decline(now, &invitation)
    }

    /// Forgets an invitation and tells its admin, as a leave of the join it
    /// offered; the admin tells the other members. Nothing goes to the
    /// members themselves, who may be strangers (or inventions).
    fn decline(&mut self, now: Timestamp, invitation: &Invitation) -> Result<(), EngineError> {
        self.store.delete_invitation(&invitation.group_id)?;
        self.staged.events.push(Event::ConversationsUpdated);
        let epoch = invitation.epoch_of(&self.peer_id()).unwrap_or(0);
        let leave = PairwisePayload::GroupControl(GroupControl::Leave { group_id: invitation.group_id, epoch });
        // Within the admin's outbox cap: one whose queue is full is not told.
        ignore_full(self.enqueue_control(now, invitation.admin, &leave))?;
        self.pump(now, invitation.admin)
    }

    /// Joins the group an invitation describes; `false` if a group of that
    /// ID with another admin is known (the invitation is then refused).
    fn join(&mut self, now: Timestamp, invitation: Invitation) -> Result<bool, EngineError> {
        let me = self.peer_id();
        let Invitation { group_id, name, admin, members, created_at, .. } = invitation;
        // Whatever waited for this group is answered by joining it (or was
        // another admin's claim to its ID).
        if let Some(waiting) = self.store.invitation(&group_id)? {
            self.store.delete_invitation(&group_id)?;
            if waiting.admin != admin {
                self.reject(waiting.admin, "group invite that conflicts with a known group");
            }
            self.staged.events.push(Event::ConversationsUpdated);
        }
        let roster: BTreeMap<PeerId, u64> = members.iter().map(|m| (m.peer_id, m.epoch)).collect();
        let my_epoch = roster.get(&me).copied().unwrap_or(0);
        let old = self.store.conversation(&group_id)?;
        if let Some(old) = &old {
            if !matches!(old.kind, ConversationKind::Group { admin: a, .. } if a == admin) {
                self.reject(admin, "group invite that conflicts with a known group");
                return Ok(false);
            }
            // Joined meanwhile under this invitation or a newer one.
            let mine = self.store.members(&group_id)?.into_iter().find(|m| m.peer_id == me);
            if !old.left && mine.is_some_and(|m| m.epoch >= my_epoch) {
                return Ok(true);
            }
        }
        let mut stored = Conversation {
            id: group_id,
            kind: ConversationKind::Group { name: name.clone(), admin },
            created_at,
            updated_at: now,
            last_message_at: None,
            last_message_id: None,
            unread_count: 0,
            left: false,
        };
        if let Some(old) = &old {
            stored.last_message_at = old.last_message_at;
            stored.last_message_id = old.last_message_id;
            stored.unread_count = old.unread_count;
        }
        self.store.put_conversation(&stored)?;
        for member in self.store.members(&group_id)? {
            if !roster.contains_key(&member.peer_id) && member.left_at.is_none() {
                self.store.put_member(&group_id, &Member { left_at: Some(now), ..member })?;
            }
        }
        let known_members = self.store.members(&group_id)?;
        let mut others = Vec::new();
        for (peer, epoch) in &roster {
            // The admin's roster may be older than a leave we already saw.
            let gone = known_members.iter().any(|m| m.peer_id == *peer && m.left_at.is_some() && m.epoch >= *epoch);
            if gone && *peer != me {
                continue;
            }
            let member =
                Member { peer_id: *peer, joined_at: now, is_admin: *peer == admin, left_at: None, epoch: *epoch };
            self.store.put_member(&group_id, &member)?;
            if *peer != me {
                others.push(*peer);
            }
        }
        // Nothing is sent on joining: our key goes to each member before our
        // first message to it, and a member's key is asked for when one of
        // its messages cannot be read. So an invite, however large its
        // roster, costs no traffic to peers we may not know.
        let group = GroupSession::new(group_id, me, others.iter().copied(), &mut self.rng)?;
        self.save_group(&group)?;
        if old.is_some() {
            self.conversation_updated(stored)?;
        } else {
            self.staged.events.push(Event::ConversationCreated(stored));
        }
        self.staged.events.push(Event::GroupInvite {
            conversation_id: group_id,
            group_name: name,
            invited_by: admin,
            pending: false,
        });
        self.release_held(now, &group_id)?;
        Ok(true)
    }

    pub(super) fn on_distribution(
        &mut self,
        now: Timestamp,
        from: PeerId,
        distribution: &SenderKeyDistribution,
    ) -> Result<Handled, EngineError> {
        let Ok((_, _, mut group)) = self.joined_group(&distribution.group_id) else {
            // Usually a key that overtook its group's invite: not
            // acknowledged, so the sender sends it again later.
            self.remind_of_leave(now, from, distribution.group_id)?;
            return Ok(Handled::NotYet);
        };
        match group.accept_distribution(&from, distribution, now) {
            Ok(()) => {}
            // The admin's notice of this member may still be on its way.
            Err(GroupError::NotAMember { .. }) => return Ok(Handled::NotYet),
            Err(e) => {
                self.reject(from, &e.to_string());
                return Ok(Handled::Done);
            }
        }
        self.save_group(&group)?;
        self.release_held(now, &distribution.group_id)?;
        Ok(Handled::Done)
    }

    /// The peer acknowledged our sender key: it holds it.
    pub(super) fn own_key_acknowledged(
        &mut self,
        peer: &PeerId,
        distribution: &SenderKeyDistribution,
    ) -> Result<(), EngineError> {
        if let Some(mut group) = self.load_group(&distribution.group_id)? {
            if group.own_key_id() == distribution.key_id {
                group.key_confirmed(peer);
                self.save_group(&group)?;
            }
        }
        Ok(())
    }

    pub(super) fn on_key_request(
        &mut self,
        now: Timestamp,
        from: PeerId,
        id: ConversationId,
    ) -> Result<(), EngineError> {
        let Ok((_, _, group)) = self.joined_group(&id) else { return Ok(()) };
        if !self.others(&id)?.contains(&from) {
            self.reject(from, "sender key request from a peer that is not a member");
            return Ok(());
        }
        self.send_own_key(now, &group, from)?;
        // The member may hold our key only from a later position than some
        // of our messages it still lacks (copies of keys and messages cross
        // in flight): those go to it over the pairwise session.
        self.copy_unconfirmed(now, &id, Some(from))?;
        self.pump(now, from)
    }

    // ---- group messages --------------------------------------------------------

    pub(super) fn on_group_message(
        &mut self,
        now: Timestamp,
        from: PeerId,
        bytes: &[u8],
        message: GroupMessage,
    ) -> Result<(), EngineError> {
        if from != message.sender {
            self.reject(from, "group message whose sender is not the peer it came from");
            return Ok(());
        }
        if self.joined_group(&message.group_id).is_err() {
            // Not (or no longer) in the group, or its invite is still on the
            // way: nothing is held. The sender retransmits until confirmed,
            // and the copy after the invite decrypts.
            return self.remind_of_leave(now, from, message.group_id);
        }
        match self.open_group_message(now, &message)? {
            Err(GroupError::UnknownChain { .. }) => self.hold(now, from, bytes, &message),
            Err(e) => {
                self.reject(from, &e.to_string());
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Decrypts and stores a group message; the inner result is the
    /// cryptographic refusal, if any.
    fn open_group_message(
        &mut self,
        now: Timestamp,
        message: &GroupMessage,
    ) -> Result<Result<(), GroupError>, EngineError> {
        let Ok((conversation, _, mut group)) = self.joined_group(&message.group_id) else {
            return Ok(Err(GroupError::NotAMember { peer: self.peer_id() }));
        };
        let sender = message.sender;
        let plaintext = match group.decrypt(message, now) {
            Ok(plaintext) => plaintext,
            Err(GroupError::Duplicate { .. }) => {
                // A retransmission: confirm again if we stored it.
                let position = Some((message.key_id, message.message_number));
                let stored = self
                    .store
                    .messages(&message.group_id)?
                    .into_iter()
                    .find(|m| m.sender == sender && m.group_position == position);
                match stored {
                    Some(stored) => self.enqueue(now, sender, OutboxPayload::Delivered(vec![stored.id]))?,
                    // Our copy of the key starts after this position: we
                    // can never read it. Asking for the key makes the
                    // sender send it again where we can.
                    None => self.request_key(now, sender, message.group_id)?,
                }
                self.pump(now, sender)?;
                return Ok(Ok(()));
            }
            Err(e) => return Ok(Err(e)),
        };
        self.save_group(&group)?;
        let Ok(chat) = ChatContent::decode(&plaintext) else {
            self.reject(sender, "group message content does not decode");
            return Ok(Ok(()));
        };
        let position = Some((message.key_id, message.message_number));
        self.store_group_chat(now, conversation, sender, chat, position).map(Ok)
    }

    /// One of a member's group messages, sent to us alone over the pairwise
    /// session (see [`Engine::copy_unconfirmed`]).
    pub(super) fn on_group_copy(
        &mut self,
        now: Timestamp,
        from: PeerId,
        group_id: ConversationId,
        position: (u32, u32),
        chat: ChatContent,
    ) -> Result<(), EngineError> {
        let Ok((conversation, _, _)) = self.joined_group(&group_id) else {
            // As for the group envelope: nothing is kept, the sender sends
            // it again until we confirm it.
            return self.remind_of_leave(now, from, group_id);
        };
        if !self.others(&group_id)?.contains(&from) {
            self.reject(from, "group message from a peer that is not a member");
            return Ok(());
        }
        // The copy names where the group envelope of the message stood,
        // so that the envelope's retransmissions (our copy of the key may
        // start after it) are recognised and confirmed, not taken for a
        // key we lack.
        self.store_group_chat(now, conversation, from, chat, Some(position))
    }

    /// Stores a member's group message, or confirms again one we hold: the
    /// group envelope and a pairwise copy of the same message can both
    /// arrive. `position` is where the envelope stood on the sender's
    /// chain, by which its retransmissions are recognised.
    fn store_group_chat(
        &mut self,
        now: Timestamp,
        conversation: Conversation,
        sender: PeerId,
        chat: ChatContent,
        position: Option<(u32, u32)>,
    ) -> Result<(), EngineError> {
        if let Some(mut stored) = self.store.message(&chat.message_id)? {
            if stored.sender != sender || stored.conversation_id != conversation.id || stored.content != chat.content {
                self.reject(sender, "group message reusing another message's ID");
                return Ok(());
            }
            if position.is_some() && stored.group_position != position {
                stored.group_position = position;
                self.store.put_message(&stored)?;
            }
            self.enqueue(now, sender, OutboxPayload::Delivered(vec![stored.id]))?;
            return self.pump(now, sender);
        }
        if chat.content.len() > MAX_CONTENT_LEN {
            self.reject(sender, "group message too large");
            return Ok(());
        }
        let stored = self.record_incoming(now, conversation, sender, chat, position)?;
        self.enqueue(now, sender, OutboxPayload::Delivered(vec![stored.id]))?;
        self.pump(now, sender)
    }

    fn hold(&mut self, now: Timestamp, from: PeerId, bytes: &[u8], message: &GroupMessage) -> Result<(), EngineError> {
        if self.store.is_held(&message.group_id, &message.sender, bytes)? {
            return Ok(()); // a retransmission of one already held
        }
        // Counted in the store, not by loading what is held: every held
        // message would otherwise cost a read of all the others.
        let (from_sender, sender_bytes) = self.store.held_usage(Some(&message.sender))?;
        let (all, all_bytes) = self.store.held_usage(None)?;
        let limits = &self.config;
        let over = bytes.len() > MAX_CONTENT_LEN + 1024
            || from_sender >= limits.held_max_per_sender
            || sender_bytes.saturating_add(bytes.len()) > limits.held_max_bytes_per_sender
            || all >= limits.held_max
            || all_bytes.saturating_add(bytes.len()) > limits.held_max_bytes;
        if over {
            self.reject(from, "too many group messages held for a missing sender key");
            return Ok(());
        }
        let seq = self.store.next_seq()?;
        let held = HeldMessage {
            seq,
            group_id: message.group_id,
            sender: message.sender,
            envelope: bytes.to_vec(),
            received_at: now,
        };
        self.store.put_held_message(&held)?;
        // Ask the sender for its key (one request queued at a time).
        self.request_key(now, message.sender, message.group_id)?;
        self.pump(now, message.sender)?;
        Ok(())
    }

    /// Asks a member for its sender key, unless a request is already queued.
    fn request_key(&mut self, now: Timestamp, peer: PeerId, group_id: ConversationId) -> Result<(), EngineError> {
        let request = PairwisePayload::SenderKeyRequest { group_id };
        let bytes = request.encode();
        let queued = self
            .store
            .outbox_for(&peer)?
            .iter()
            .any(|i| matches!(&i.payload, OutboxPayload::Control(b) if *b == bytes[..]));
        if queued {
            return Ok(());
        }
        self.enqueue_control(now, peer, &request)
    }

    /// Retries the held messages of a group after a key or an invite arrived.
    fn release_held(&mut self, now: Timestamp, id: &ConversationId) -> Result<(), EngineError> {
        for held in self.store.held_messages(id)? {
            let Ok(Envelope { body: EnvelopeBody::Group(message) }) = Envelope::decode(&held.envelope) else {
                self.store.delete_held_message(held.seq)?;
                continue;
            };
            match self.open_group_message(now, &message)? {
                Err(GroupError::UnknownChain { .. }) => {}
                Err(e) => {
                    self.store.delete_held_message(held.seq)?;
                    self.reject(held.sender, &e.to_string());
                }
                Ok(()) => self.store.delete_held_message(held.seq)?,
            }
        }
        Ok(())
    }

    /// Group part of the retention sweep: held messages past seven days, and
    /// skipped group keys past seven days.
    pub(super) fn group_retention(&mut self, now: Timestamp) -> Result<(), EngineError> {
        let cutoff = Timestamp(now.as_millis().saturating_sub(SKIPPED_KEY_MAX_AGE_MS));
        self.store.delete_held_before(cutoff)?;
        // An invitation left unanswered for the message TTL is declined. At
        // most the waiting cap of them (100) expire per TTL: a flood evicts
        // its own invitations silently long before.
        let cutoff = Timestamp(now.as_millis().saturating_sub(self.config.message_ttl_ms));
        for id in self.store.invitations_received_before(cutoff)? {
            match self.store.invitation(&id) {
                Ok(Some(invitation)) => self.decline(now, &invitation)?,
                Ok(None) => {}
                // One unreadable row must not stop the sweep.
                Err(super::StoreError::Corrupt(_)) => self.store.delete_invitation(&id)?,
                Err(e) => return Err(e.into()),
            }
        }
        for conversation in self.store.conversations()? {
            // One unreadable row must not stop the sweep for the others.
            let Ok(Some(mut group)) = self.load_group(&conversation.id) else { continue };
            if group.expire_skipped_keys(now) > 0 {
                self.save_group(&group)?;
            }
        }
        Ok(())
    }
}

/// A best-effort send: an outbox already full for that peer is not an error.
fn ignore_full(result: Result<(), EngineError>) -> Result<(), EngineError> {
    match result {
        Err(EngineError::OutboxFull { .. }) => Ok(()),
        other => other,
    }
}
