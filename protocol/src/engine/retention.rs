//! Timers and retention: what a timeout makes due (key exchanges, outbox
//! attempts, the daily sweep), and the sweep itself (expired messages,
//! quiet sessions, old held messages, invitations and kept records).

use std::collections::BTreeSet;

use super::{
    ConversationKind, Engine, EngineError, InternalError, MessageStatus, Store, KEPT_RECORD_LIFETIME_MS,
    MAX_KEPT_RECORDS, MAX_QUIET_PEERS,
};
use crate::ids::{MessageId, PeerId};
use crate::time::Timestamp;

impl<S: Store> Engine<S> {
    pub(super) fn timeout(&mut self, now: Timestamp) -> Result<(), EngineError> {
        self.time_out_key_exchanges(now)?;
        for peer in self.store.peers_due(now)? {
            match self.pump_now(now, peer) {
                // One unreadable sessions row parks that peer's items (its
                // deadline must not stay in the past) and spares the others.
                Err(EngineError::Internal(InternalError::State(e))) => {
                    for mut item in self.store.outbox_waiting_for(&peer)? {
                        item.next_attempt_at = None;
                        self.store.put_outbox_item(&item)?;
                    }
                    self.reject(peer, &format!("stored session is unusable: {e}"));
                }
                other => other?,
            }
        }
        if self.store.retention_due()?.is_some_and(|due| due <= now) {
            self.retention(now)?;
            self.store.set_retention_due(now.saturating_add_millis(self.config.retention_interval_ms))?;
        }
        Ok(())
    }

    /// Deletes messages past their TTL (failing those still undelivered
    /// first), skipped keys past seven days and peer records not seen for
    /// [`KEPT_RECORD_LIFETIME_MS`].
    fn retention(&mut self, now: Timestamp) -> Result<(), EngineError> {
        let cutoff = Timestamp(now.as_millis().saturating_sub(self.config.message_ttl_ms));
        let me = self.peer_id();
        let expired = self.store.messages_stored_before(cutoff)?;
        let expired_ids: BTreeSet<MessageId> = expired.iter().map(|m| m.id).collect();
        let mut touched = BTreeSet::new();
        for message in &expired {
            if message.is_outgoing(&me) && matches!(message.status, MessageStatus::Created | MessageStatus::Sent) {
                self.fail_message(now, &message.id, "expired undelivered")?;
            }
            self.store.delete_message(&message.id)?;
            touched.insert(message.conversation_id);
        }
        // Keep the unread count and last message true to what is left.
        for id in touched {
            let Some(mut conversation) = self.store.conversation(&id)? else { continue };
            let left = self.store.messages(&id)?;
            conversation.unread_count = left
                .iter()
                .filter(|m| !m.is_outgoing(&me) && m.read_at.is_none())
                .count()
                .try_into()
                .unwrap_or(u32::MAX);
            conversation.last_message_id = left.last().map(|m| m.id);
            conversation.last_message_at = left.last().map(|m| m.stored_at);
            self.store.put_conversation(&conversation)?;
        }
        for item in self.store.outbox()? {
            if item.payload.message_id().is_some_and(|id| expired_ids.contains(&id)) {
                self.store.delete_outbox_item(item.seq)?;
            }
        }
        for item in self.store.outbox()? {
            let control = item.payload.message_id().is_none();
            if control && item.queued_at < cutoff {
                self.store.delete_outbox_item(item.seq)?;
            }
        }
        self.sweep_quiet_sessions(cutoff)?;
        let records_cutoff = Timestamp(now.as_millis().saturating_sub(KEPT_RECORD_LIFETIME_MS));
        self.store.forget_kept_records(records_cutoff, MAX_KEPT_RECORDS)?;
        for peer in self.store.session_peers()? {
            // One unreadable row must not stop the sweep for everyone else.
            let Ok(Some(mut sessions)) = self.load_sessions(&peer) else { continue };
            if sessions.expire_skipped_keys(now) > 0 {
                self.store.put_sessions(&peer, &sessions.to_bytes())?;
            }
        }
        self.group_retention(now)
    }

    /// Deletes the sessions of peers not heard from since `cutoff` that
    /// nothing of the user's needs: no 1:1 conversation, no shared group, no
    /// waiting invitation, nothing queued, no key exchange under way. A
    /// stranger's key exchange costs it nothing but leaves us a session
    /// (with up to thousands of skipped keys); this is how those go. The
    /// record of when the peer was last heard from stays (up to
    /// [`MAX_QUIET_PEERS`]), so a message it sends later, under the session
    /// we dropped, starts a new key exchange rather than being lost.
    fn sweep_quiet_sessions(&mut self, cutoff: Timestamp) -> Result<(), EngineError> {
        let quiet = self.store.quiet_session_peers(cutoff)?;
        if !quiet.is_empty() {
            let needed = self.peers_we_talk_to()?;
            for peer in quiet {
                let in_use = needed.contains(&peer)
                    || self.store.invitation_count(Some(&peer))? > 0
                    || self.store.outbox_len(&peer)? > 0
                    || self.store.key_exchange(&peer)?.is_some();
                if !in_use {
                    self.store.delete_sessions(&peer)?;
                }
            }
        }
        self.store.forget_quiet_peers(MAX_QUIET_PEERS)?;
        Ok(())
    }

    /// The peers of our 1:1 conversations and the members of the groups we
    /// are in.
    pub(super) fn peers_we_talk_to(&self) -> Result<BTreeSet<PeerId>, EngineError> {
        let mut peers = BTreeSet::new();
        for conversation in self.store.conversations()? {
            match conversation.kind {
                ConversationKind::OneOnOne { peer } => {
                    peers.insert(peer);
                }
                ConversationKind::Group { .. } if !conversation.left => {
                    let members = self.store.members(&conversation.id)?;
                    peers.extend(members.into_iter().filter(|m| m.left_at.is_none()).map(|m| m.peer_id));
                }
                ConversationKind::Group { .. } => {}
            }
        }
        Ok(peers)
    }
}
