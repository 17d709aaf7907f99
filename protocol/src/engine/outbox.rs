//! The outbox: what waits for each peer, bounded per peer, sealed into as
//! few envelopes as possible when the peer's turn comes, and handed to the
//! transport as transmits.

use super::delivery::UNSENT_COPY_REUSE_MS;
use super::{
    Engine, EngineError, InFlight, MessageStatus, OutboxItem, OutboxPayload, RequestError, SealedCopy, Store, Transmit,
    TransmitId, MAX_IDS_PER_PAYLOAD,
};
use crate::ids::PeerId;
use crate::session::PairwiseSessions;
use crate::time::Timestamp;
use crate::wire::{ChatContent, Envelope, EnvelopeBody, PairwisePayload};

impl<S: Store> Engine<S> {
    /// Queues something for `peer`, within the per-peer limit.
    pub(super) fn enqueue(&mut self, now: Timestamp, peer: PeerId, payload: OutboxPayload) -> Result<(), EngineError> {
        // Receipts and acks still waiting to go out absorb new ones.
        let mergeable = matches!(payload, OutboxPayload::Delivered(_) | OutboxPayload::Ack(_));
        let waiting = if mergeable { self.store.outbox_waiting_for(&peer)? } else { Vec::new() };
        for mut item in waiting {
            match (&mut item.payload, &payload) {
                (OutboxPayload::Delivered(ids), OutboxPayload::Delivered(more)) if ids.len() < MAX_IDS_PER_PAYLOAD => {
                    ids.extend(more.iter().filter(|m| !ids.contains(m)).copied().collect::<Vec<_>>());
                }
                (OutboxPayload::Ack(ids), OutboxPayload::Ack(more)) if ids.len() < MAX_IDS_PER_PAYLOAD => {
                    ids.extend(more.iter().filter(|m| !ids.contains(m)).copied().collect::<Vec<_>>());
                }
                _ => continue,
            }
            // The payload grew: a copy sealed before would leave the new IDs out.
            item.unsent_copy = None;
            item.next_attempt_at = Some(now);
            self.store.put_outbox_item(&item)?;
            return Ok(());
        }
        if self.store.outbox_len(&peer)? >= self.config.max_outbox_per_peer {
            return Err(RequestError::OutboxFull { peer, max: self.config.max_outbox_per_peer }.into());
        }
        self.enqueue_unbounded(now, peer, payload)
    }

    pub(super) fn enqueue_ack(&mut self, now: Timestamp, peer: PeerId, id: u64) -> Result<(), EngineError> {
        self.enqueue(now, peer, OutboxPayload::Ack(vec![id]))
    }

    /// Queues regardless of the limit: for what must always go out (a leave).
    pub(super) fn enqueue_unbounded(
        &mut self,
        now: Timestamp,
        peer: PeerId,
        payload: OutboxPayload,
    ) -> Result<(), EngineError> {
        let seq = self.store.next_seq()?;
        let item = OutboxItem {
            seq,
            peer,
            payload,
            queued_at: now,
            next_attempt_at: Some(now),
            in_flight: false,
            unsent_copy: None,
        };
        self.store.put_outbox_item(&item)?;
        Ok(())
    }

    pub(super) fn load_sessions(&self, peer: &PeerId) -> Result<Option<PairwiseSessions>, EngineError> {
        match self.store.sessions(peer)? {
            Some(bytes) => Ok(Some(PairwiseSessions::from_bytes(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Marks `peer`'s outbox to be sent when the transaction's work is done
    /// (see [`Staged::to_pump`]).
    pub(super) fn pump(&mut self, now: Timestamp, peer: PeerId) -> Result<(), EngineError> {
        let at = self.staged.to_pump.entry(peer).or_insert(now);
        *at = (*at).max(now);
        Ok(())
    }

    /// Sends the outboxes marked by [`Engine::pump`].
    pub(super) fn pump_marked(&mut self) -> Result<(), EngineError> {
        while let Some((peer, now)) = self.staged.to_pump.pop_first() {
            self.pump_now(now, peer)?;
        }
        Ok(())
    }

    /// Sends whatever is due for `peer`, in order, or starts a key exchange
    /// if there is no session yet.
    pub(super) fn pump_now(&mut self, now: Timestamp, peer: PeerId) -> Result<(), EngineError> {
        let due = self.store.outbox_due_for(&peer, now)?;
        if due.is_empty() {
            return Ok(());
        }
        let mut sessions = self.load_sessions(&peer)?;
        let mut needs_session = false;
        let mut chat_waits = false;
        // In queue order, so a sender key leaves before the group messages
        // it opens.
        for mut item in due {
            let bytes = if let OutboxPayload::Group { message_id } = &item.payload {
                // Already encrypted for the whole group: no pairwise session needed.
                let Some(envelope) = self.store.group_envelope(message_id)? else {
                    self.store.delete_outbox_item(item.seq)?; // its message is gone
                    continue;
                };
                envelope
            } else {
                let Some(sessions) = sessions.as_mut() else {
                    needs_session = true;
                    // Only a chat message the user sent to this peer: group
                    // copies are made for every waiting member at once
                    // (a roster may be invented), so they wait within the
                    // background cap like sender keys.
                    chat_waits |= matches!(item.payload, OutboxPayload::Chat(_));
                    item.next_attempt_at = None; // `release_waiting` sends it
                    self.store.put_outbox_item(&item)?;
                    continue;
                };
                let Some(payload) = self.payload_for(&item)? else {
                    self.store.delete_outbox_item(item.seq)?;
                    continue;
                };
                let session = sessions.current().id().0;
                let reusable = item
                    .unsent_copy
                    .take()
                    .filter(|copy| copy.session == session && now.millis_since(copy.sealed_at) < UNSENT_COPY_REUSE_MS);
                let copy = match reusable {
                    Some(copy) => copy,
                    None => match sessions.encrypt(&payload.encode(), &mut self.rng) {
                        Ok(message) => SealedCopy {
                            session,
                            sealed_at: now,
                            envelope: Envelope::new(EnvelopeBody::Ratchet(message)).encode(),
                        },
                        Err(_) => {
                            // An exhausted chain or a broken peer key: wait
                            // for a fresh session.
                            needs_session = true;
                            item.next_attempt_at = None;
                            self.store.put_outbox_item(&item)?;
                            continue;
                        }
                    },
                };
                item.in_flight = true;
                item.next_attempt_at = None;
                self.store.put_outbox_item(&item)?;
                self.transmit_copy(peer, copy, item.seq);
                continue;
            };
            item.in_flight = true;
            item.next_attempt_at = None;
            self.store.put_outbox_item(&item)?;
            self.transmit_bytes(peer, bytes, true, Some(item.seq));
        }
        if let Some(sessions) = &sessions {
            self.store.put_sessions(&peer, &sessions.to_bytes())?;
        }
        if needs_session {
            self.need_session(now, peer, chat_waits)?;
        }
        Ok(())
    }

    /// After a session appears, or the peer becomes reachable, everything
    /// waiting for it goes out now.
    pub(super) fn release_waiting(&mut self, now: Timestamp, peer: PeerId) -> Result<(), EngineError> {
        for mut item in self.store.outbox_waiting_for(&peer)? {
            item.next_attempt_at = Some(now);
            self.store.put_outbox_item(&item)?;
        }
        self.pump(now, peer)
    }

    fn payload_for(&self, item: &OutboxItem) -> Result<Option<PairwisePayload>, EngineError> {
        Ok(match &item.payload {
            OutboxPayload::Chat(id) => match self.store.message(id)? {
                Some(m) if m.status != MessageStatus::Failed => Some(PairwisePayload::Chat(ChatContent {
                    message_id: m.id,
                    sent_at: m.timestamp,
                    content: m.content,
                })),
                _ => None,
            },
            OutboxPayload::Delivered(ids) => Some(PairwisePayload::DeliveryReceipt { message_ids: ids.clone() }),
            OutboxPayload::Ack(ids) => Some(PairwisePayload::Ack { ids: ids.clone() }),
            OutboxPayload::Read { message_ids, read_at } => Some(tracked(
                item.seq,
                PairwisePayload::ReadReceipt { message_ids: message_ids.clone(), read_at: *read_at },
            )),
            OutboxPayload::Control(control) if control.is_tracked() => Some(tracked(item.seq, control.to_pairwise())),
            OutboxPayload::Control(control) => Some(control.to_pairwise()),
            OutboxPayload::GroupCopy { message_id } => match self.store.message(message_id)? {
                Some(m) if m.status != MessageStatus::Failed => {
                    let (key_id, message_number) = m.group_position.unwrap_or_default();
                    Some(PairwisePayload::GroupChat {
                        group_id: m.conversation_id,
                        key_id,
                        message_number,
                        content: ChatContent { message_id: m.id, sent_at: m.timestamp, content: m.content },
                    })
                }
                _ => None,
            },
            OutboxPayload::Group { .. } => None,
        })
    }

    pub(super) fn transmit(
        &mut self,
        peer: PeerId,
        body: EnvelopeBody,
        mailbox_allowed: bool,
        outbox_seq: Option<u64>,
    ) {
        self.transmit_bytes(peer, Envelope::new(body).encode(), mailbox_allowed, outbox_seq);
    }

    fn transmit_bytes(&mut self, peer: PeerId, bytes: Vec<u8>, mailbox_allowed: bool, outbox_seq: Option<u64>) {
        self.next_transmit += 1;
        let id = TransmitId(self.next_transmit);
        self.staged.transmits.push(Transmit { id, peer, bytes, mailbox_allowed });
        self.staged.in_flight.push((id, InFlight { peer, outbox_seq, copy: None }));
    }

    /// Sends outbox item `seq`'s pairwise copy, remembering it in case it
    /// reaches no one.
    fn transmit_copy(&mut self, peer: PeerId, copy: SealedCopy, seq: u64) {
        self.next_transmit += 1;
        let id = TransmitId(self.next_transmit);
        let transmit = Transmit { id, peer, bytes: copy.envelope.clone(), mailbox_allowed: true };
        self.staged.transmits.push(transmit);
        self.staged.in_flight.push((id, InFlight { peer, outbox_seq: Some(seq), copy: Some(copy) }));
    }
}

/// Whether an outbox item is sent as [`PairwisePayload::Tracked`] and kept
/// until acknowledged: group control, sender keys and read receipts.
pub(super) fn is_tracked(payload: &OutboxPayload) -> bool {
    match payload {
        OutboxPayload::Read { .. } => true,
        OutboxPayload::Control(control) => control.is_tracked(),
        _ => false,
    }
}

fn tracked(id: u64, payload: PairwisePayload) -> PairwisePayload {
    PairwisePayload::Tracked { id, payload: Box::new(payload) }
}
