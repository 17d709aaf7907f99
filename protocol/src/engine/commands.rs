//! Commands and queries from the API: conversations, sending, reading,
//! deleting and retrying, and the reads the API lists. Group commands are in
//! `groups`.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    Answer, Command, CommandOutcome, Conversation, ConversationKind, ConversationSummary, Engine, EngineError, Event,
    Message, MessageStatus, OutboxPayload, Query, RequestError, Store, MAX_CONTENT_LEN, MAX_IDS_PER_PAYLOAD, MAX_PAGE,
};
use crate::ids::{ConversationId, MessageId, PeerId};
use crate::time::Timestamp;

impl<S: Store> Engine<S> {
    pub(super) fn run_command(&mut self, now: Timestamp, command: Command) -> Result<CommandOutcome, EngineError> {
        match command {
            Command::CreateConversation { peer } => {
                self.create_conversation(now, peer).map(CommandOutcome::Conversation)
            }
            Command::SendMessage { conversation, content } => {
                self.send_message(now, conversation, content).map(CommandOutcome::Message)
            }
            Command::MarkMessageRead { message } => {
                self.mark_read(now, &[message])?;
                Ok(CommandOutcome::Done)
            }
            Command::MarkConversationRead { conversation } => {
                self.conversation(&conversation)?;
                let me = self.peer_id();
                let unread: Vec<MessageId> = self
                    .store
                    .messages(&conversation)?
                    .into_iter()
                    .filter(|m| !m.is_outgoing(&me) && m.read_at.is_none())
                    .map(|m| m.id)
                    .collect();
                self.mark_read(now, &unread)?;
                Ok(CommandOutcome::Done)
            }
            Command::DeleteConversation { conversation } => {
                let existing = self.conversation(&conversation)?;
                if matches!(existing.kind, ConversationKind::Group { .. }) && !existing.left {
                    // The others must stop waiting for us and rotate.
                    self.leave(now, conversation)?;
                }
                let ids: BTreeSet<MessageId> = self.store.messages(&conversation)?.iter().map(|m| m.id).collect();
                for item in self.store.outbox()? {
                    if let Some(id) = item.payload.message_id() {
                        if ids.contains(&id) {
                            self.store.delete_outbox_item(item.seq)?;
                        }
                    }
                }
                self.store.delete_conversation(&conversation)?;
                self.staged.events.push(Event::ConversationsUpdated);
                Ok(CommandOutcome::Done)
            }
            Command::RetryMessage { message } => {
                let old = self.store.message(&message)?.ok_or(RequestError::UnknownMessage(message))?;
                if old.status != MessageStatus::Failed || !old.is_outgoing(&self.peer_id()) {
                    return Err(RequestError::NotRetryable { id: message, status: old.status.as_str() }.into());
                }
                // The copy goes the way its conversation's messages go.
                let retried = match self.conversation(&old.conversation_id)?.kind {
                    ConversationKind::OneOnOne { .. } => self.send_message(now, old.conversation_id, old.content),
                    ConversationKind::Group { .. } => self.send_group_message(now, old.conversation_id, old.content),
                };
                retried.map(CommandOutcome::Message)
            }
            Command::CreateGroup { name, members } => {
                self.create_group(now, name, members).map(CommandOutcome::Conversation)
            }
            Command::SendGroupMessage { group, content } => {
                self.send_group_message(now, group, content).map(CommandOutcome::Message)
            }
            Command::Invite { group, peer } => {
                self.invite(now, group, peer)?;
                Ok(CommandOutcome::Done)
            }
            Command::Leave { group } => {
                self.leave(now, group)?;
                Ok(CommandOutcome::Done)
            }
            Command::AcceptInvitation { group } => {
                Ok(CommandOutcome::Conversation(self.accept_invitation(now, group)?))
            }
            Command::DeclineInvitation { group } => {
                self.decline_invitation(now, group)?;
                Ok(CommandOutcome::Done)
            }
            Command::InitiateKeyExchange { peer } => {
                if peer == self.peer_id() {
                    return Err(RequestError::SelfConversation(peer).into());
                }
                if self.store.key_exchange(&peer)?.is_none() {
                    self.start_key_exchange(now, peer, 1)?;
                }
                Ok(CommandOutcome::Done)
            }
        }
    }

    pub(super) fn answer(&self, query: Query) -> Result<Answer, EngineError> {
        let summary = |conversation: Conversation| -> Result<ConversationSummary, EngineError> {
            let last_message = match &conversation.last_message_id {
                Some(id) => self.store.message(id)?,
                None => None,
            };
            Ok(ConversationSummary { conversation, last_message })
        };
        Ok(match query {
            Query::Conversations => {
                let mut all = self.store.conversations()?;
                all.sort_by(|a, b| {
                    let active = |c: &Conversation| c.last_message_at.unwrap_or(c.created_at).max(c.updated_at);
                    active(b).cmp(&active(a)).then_with(|| a.id.cmp(&b.id))
                });
                Answer::Conversations(all.into_iter().map(summary).collect::<Result<_, _>>()?)
            }
            Query::Conversation(id) => Answer::Conversation(summary(self.conversation(&id)?)?),
            Query::Messages { conversation, before, limit } => {
                self.conversation(&conversation)?;
                if let Some(before) = &before {
                    // A cursor from another conversation (or a deleted
                    // message) is a client's mistake, not an empty page.
                    match self.store.message(before)? {
                        Some(m) if m.conversation_id == conversation => {}
                        _ => return Err(RequestError::UnknownMessage(*before).into()),
                    }
                }
                let limit = limit.clamp(1, MAX_PAGE);
                // One more than asked tells whether another page follows.
                let mut messages = self.store.messages_page(&conversation, before.as_ref(), limit + 1)?;
                let more = messages.len() > limit;
                messages.truncate(limit);
                Answer::Messages { messages, more }
            }
            Query::Message(id) => Answer::Message(self.store.message(&id)?.ok_or(RequestError::UnknownMessage(id))?),
            Query::Members(id) => {
                let conversation = self.conversation(&id)?;
                if !matches!(conversation.kind, ConversationKind::Group { .. }) {
                    return Err(RequestError::NotAGroup(id).into());
                }
                Answer::Members(self.store.members(&id)?)
            }
            Query::UnreadTotal => {
                Answer::Unread(self.store.conversations()?.iter().map(|c| u64::from(c.unread_count)).sum())
            }
            Query::Invitations => Answer::Invitations(self.store.invitations()?),
        })
    }

    pub(super) fn conversation(&self, id: &ConversationId) -> Result<Conversation, EngineError> {
        Ok(self.store.conversation(id)?.ok_or(RequestError::UnknownConversation(*id))?)
    }

    pub(super) fn create_conversation(&mut self, now: Timestamp, peer: PeerId) -> Result<Conversation, EngineError> {
        if peer == self.peer_id() {
            return Err(RequestError::SelfConversation(peer).into());
        }
        let id = ConversationId::for_peers(&self.peer_id(), &peer);
        if let Some(existing) = self.store.conversation(&id)? {
            // Group IDs are version 4 UUIDs and 1:1 IDs version 8, so this
            // holds; a store that says otherwise is corrupt.
            if existing.kind != (ConversationKind::OneOnOne { peer }) {
                return Err(RequestError::NotOneOnOne(id).into());
            }
            return Ok(existing);
        }
        let conversation = Conversation::new(id, ConversationKind::OneOnOne { peer }, now, now);
        self.store.put_conversation(&conversation)?;
        self.staged.events.push(Event::ConversationCreated(conversation.clone()));
        Ok(conversation)
    }

    fn send_message(&mut self, now: Timestamp, id: ConversationId, content: String) -> Result<Message, EngineError> {
        check_content(&content)?;
        let conversation = self.conversation(&id)?;
        let ConversationKind::OneOnOne { peer } = conversation.kind else {
            return Err(RequestError::NotOneOnOne(id).into());
        };
        let message_id = MessageId::random(&mut self.rng);
        let message = self.record_outgoing(now, conversation, message_id, content, &[peer], None)?;
        self.enqueue(now, peer, OutboxPayload::Chat(message.id))?;
        self.pump(now, peer)?;
        Ok(self.store.message(&message.id)?.unwrap_or(message))
    }

    fn mark_read(&mut self, now: Timestamp, ids: &[MessageId]) -> Result<(), EngineError> {
        let me = self.peer_id();
        let mut by_sender: BTreeMap<PeerId, Vec<MessageId>> = BTreeMap::new();
        let mut touched: BTreeMap<ConversationId, u32> = BTreeMap::new();
        for id in ids {
            let mut message = self.store.message(id)?.ok_or(RequestError::UnknownMessage(*id))?;
            if message.is_outgoing(&me) || message.read_at.is_some() {
                continue;
            }
            message.read_at = Some(now);
            message.status = MessageStatus::Read;
            self.store.put_message(&message)?;
            by_sender.entry(message.sender).or_default().push(message.id);
            *touched.entry(message.conversation_id).or_default() += 1;
        }
        for (conversation_id, count) in touched {
            let mut conversation = self.conversation(&conversation_id)?;
            conversation.unread_count = conversation.unread_count.saturating_sub(count);
            conversation.updated_at = now;
            self.store.put_conversation(&conversation)?;
            self.conversation_updated(conversation)?;
        }
        for (sender, message_ids) in by_sender {
            for chunk in message_ids.chunks(MAX_IDS_PER_PAYLOAD) {
                self.enqueue(now, sender, OutboxPayload::Read { message_ids: chunk.to_vec(), read_at: now })?;
            }
            self.pump(now, sender)?;
        }
        Ok(())
    }

    pub(super) fn conversation_updated(&mut self, conversation: Conversation) -> Result<(), EngineError> {
        let members = match conversation.kind {
            ConversationKind::Group { .. } => self.store.members(&conversation.id)?,
            ConversationKind::OneOnOne { .. } => Vec::new(),
        };
        self.staged.events.push(Event::ConversationUpdated { conversation, members });
        Ok(())
    }
}

/// Refuses empty content and content over [`MAX_CONTENT_LEN`].
pub(super) fn check_content(content: &str) -> Result<(), EngineError> {
    if content.is_empty() {
        return Err(RequestError::EmptyContent.into());
    }
    if content.len() > MAX_CONTENT_LEN {
        return Err(RequestError::ContentTooLarge { len: content.len(), max: MAX_CONTENT_LEN }.into());
    }
    Ok(())
}
