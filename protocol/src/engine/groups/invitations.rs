//! Group invitations: an invitation from an admin the user never wrote to
//! waits for the user's answer (bounded per admin and in all); accepting
//! joins the group, declining tells the admin.

use std::collections::{BTreeMap, BTreeSet};

use super::ignore_full;
use crate::engine::receiving::Handled;
use crate::engine::{
    ControlPayload, Conversation, ConversationKind, Engine, EngineError, Event, Invitation, Member, RequestError,
    Store, MAX_GROUP_NAME_LEN,
};
use crate::group::{GroupSession, MAX_GROUP_MEMBERS};
use crate::ids::{ConversationId, PeerId};
use crate::time::Timestamp;
use crate::wire::GroupControl;

impl<S: Store> Engine<S> {
    pub(super) fn on_invite(
        &mut self,
        now: Timestamp,
        from: PeerId,
        invitation: Invitation,
    ) -> Result<Handled, EngineError> {
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

    pub(in crate::engine) fn accept_invitation(
        &mut self,
        now: Timestamp,
        id: ConversationId,
    ) -> Result<Conversation, EngineError> {
        let invitation = self.store.invitation(&id)?.ok_or(RequestError::NoInvitation(id))?;
        let admin = invitation.admin;
        self.store.delete_invitation(&id)?;
        if !self.join(now, invitation)? {
            // Another admin's group of that ID was joined meanwhile.
            return Err(RequestError::NoInvitation(id).into());
        }
        // What the admin sent while the invitation waited was refused
        // unacknowledged; asking for its key has it send that again now
        // (over the pairwise session) rather than at its next retry. The
        // other members resend on their own schedule.
        ignore_full(self.request_key(now, admin, id))?;
        self.pump(now, admin)?;
        self.conversation(&id)
    }

    pub(in crate::engine) fn decline_invitation(
        &mut self,
        now: Timestamp,
        id: ConversationId,
    ) -> Result<(), EngineError> {
        let invitation = self.store.invitation(&id)?.ok_or(RequestError::NoInvitation(id))?;
        self.decline(now, &invitation)
    }

    /// Forgets an invitation and tells its admin, as a leave of the join it
    /// offered; the admin tells the other members. Nothing goes to the
    /// members themselves, who may be strangers (or inventions).
    pub(super) fn decline(&mut self, now: Timestamp, invitation: &Invitation) -> Result<(), EngineError> {
        self.store.delete_invitation(&invitation.group_id)?;
        self.staged.events.push(Event::ConversationsUpdated);
        let epoch = invitation.epoch_of(&self.peer_id()).unwrap_or(0);
        let leave = ControlPayload::Group(GroupControl::Leave { group_id: invitation.group_id, epoch });
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
        let mut stored =
            Conversation::new(group_id, ConversationKind::Group { name: name.clone(), admin }, created_at, now);
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
}
