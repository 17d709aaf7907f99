//! Group membership as peers tell it: an admin's roster changes, members
//! leaving, and the reminders and copies that keep every member's view in
//! step after a leave.

use std::collections::{BTreeMap, BTreeSet};

use super::ignore_full;
use crate::engine::receiving::Handled;
use crate::engine::{ControlPayload, Engine, EngineError, Invitation, Member, MessageStatus, OutboxPayload, Store};
use crate::group::{GroupSession, MAX_GROUP_MEMBERS};
use crate::ids::{ConversationId, MessageId, PeerId};
use crate::time::Timestamp;
use crate::wire::{GroupControl, RosterEntry};

impl<S: Store> Engine<S> {
    pub(in crate::engine) fn on_group_control(
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
    pub(super) fn key_queued_for(&mut self, group: &GroupSession, peer: &PeerId) -> Result<bool, EngineError> {
        let mut queued = false;
        for item in self.store.outbox_for(peer)? {
            let OutboxPayload::Control(ControlPayload::SenderKey(d)) = &item.payload else { continue };
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
                OutboxPayload::Control(ControlPayload::SenderKey(d)) => d.group_id == group_id,
                OutboxPayload::Control(ControlPayload::Group(
                    GroupControl::Invite { group_id: g, .. }
                    | GroupControl::MemberAdded { group_id: g, .. }
                    | GroupControl::Leave { group_id: g, .. }
                    | GroupControl::MemberLeft { group_id: g, .. },
                )) => *g == group_id,
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
            let left = ControlPayload::Group(GroupControl::MemberLeft {
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
    pub(super) fn remind_of_leave(
        &mut self,
        now: Timestamp,
        peer: PeerId,
        id: ConversationId,
    ) -> Result<(), EngineError> {
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
        let leave = ControlPayload::Group(GroupControl::Leave { group_id: id, epoch });
        let queued = self
            .store
            .outbox_for(&peer)?
            .iter()
            .any(|i| matches!(&i.payload, OutboxPayload::Control(queued) if *queued == leave));
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
    pub(super) fn copy_unconfirmed(
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
}
