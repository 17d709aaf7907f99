//! Key exchange: starting one (after a directory lookup), answering a
//! peer's request, installing the session, retrying with backoff, and
//! replacing a session the peer no longer holds.

use super::{
    AttemptState, ControlPayload, Engine, EngineError, Event, KeyExchangeAttempt, MessageStatus, OutboxPayload, Store,
};
use crate::handshake::{self, CrossedRequests, PendingKeyExchange, Response};
use crate::ids::{ConversationId, PeerId};
use crate::session::PairwiseSessions;
use crate::time::Timestamp;
use crate::wire::{EnvelopeBody, KeyExchangeAck, KeyExchangeRequest};

/// How soon a peer whose session we do not hold may make us start a new
/// key exchange again (see [`Engine::replace_unknown_session`]).
pub(super) const REKEY_INTERVAL_MS: u64 = 60_000;

/// How soon a message under a swept session may start another re-key
/// (with any such peer: see [`Engine::replace_unknown_session`]).
const SWEPT_REKEY_INTERVAL_MS: u64 = 10_000;

impl<S: Store> Engine<S> {
    /// The peer encrypts under a session we never completed (our ack or its
    /// request was lost, and our attempt gave up): without a new key
    /// exchange it would retransmit into the void for ever. Ours replaces
    /// its session, and its queued messages follow under the new one.
    ///
    /// Only for a peer we already talk to (a 1:1 conversation, or a member
    /// of a group we are in) or once held a session with (swept as quiet),
    /// and at most once a minute per peer. `peer` may
    /// be whatever a relay wrote on its frame, and identities cost nothing:
    /// anyone else would make us look up, and dial, whatever ID and record
    /// they chose.
    pub(super) fn replace_unknown_session(&mut self, now: Timestamp, peer: PeerId) -> Result<(), EngineError> {
        let recently = self.rekeyed.get(&peer).is_some_and(|t| now.millis_since(*t) < REKEY_INTERVAL_MS)
            || self.staged.rekeyed.iter().any(|(p, _)| *p == peer);
        if recently || self.store.key_exchange(&peer)?.is_some() {
            return Ok(());
        }
        let mut attempts = 1;
        if !self.talks_to(&peer)? {
            // A peer whose quiet session we swept may write again. A relay
            // can name any of them, so these re-keys are few: one attempt
            // each (the peer's retransmission asks again), at most one
            // every SWEPT_REKEY_INTERVAL_MS in all, and only while the
            // background exchanges leave room.
            let swept = self.store.sessions(&peer)?.is_none() && self.store.last_heard(&peer)?.is_some();
            let too_soon = self.last_swept_rekey.is_some_and(|t| now.millis_since(t) < SWEPT_REKEY_INTERVAL_MS)
                || self.staged.swept_rekey.is_some();
            if !swept || too_soon || self.store.key_exchange_count()? >= self.config.max_background_key_exchanges {
                return Ok(());
            }
            self.staged.swept_rekey = Some(now);
            attempts = self.config.max_retries.saturating_add(1);
        }
        self.staged.rekeyed.push((peer, now));
        self.start_key_exchange(now, peer, attempts)
    }

    /// Whether we have a 1:1 conversation with `peer`, or share a group
    /// with it.
    fn talks_to(&self, peer: &PeerId) -> Result<bool, EngineError> {
        if self.store.conversation(&ConversationId::for_peers(&self.peer_id(), peer))?.is_some() {
            return Ok(true);
        }
        Ok(self.peers_we_talk_to()?.contains(peer))
    }

    /// Starts attempt number `attempts` with `peer`: a directory lookup first.
    pub(super) fn start_key_exchange(
        &mut self,
        now: Timestamp,
        peer: PeerId,
        attempts: u32,
    ) -> Result<(), EngineError> {
        let attempt = KeyExchangeAttempt {
            peer,
            state: AttemptState::LookingUp,
            attempts,
            deadline: now.saturating_add_millis(self.config.key_exchange_timeout_ms),
        };
        self.store.put_key_exchange(&attempt)?;
        self.staged.lookups.push(peer);
        Ok(())
    }

    pub(super) fn send_key_exchange_request(
        &mut self,
        now: Timestamp,
        mut attempt: KeyExchangeAttempt,
    ) -> Result<(), EngineError> {
        // Request timestamps strictly increase, even within one millisecond
        // or after the clock steps back a little, so a responder's freshness
        // mark never refuses a genuine new request as a replay. A mark
        // further ahead than any responder accepts came from a clock that
        // was wrong then: kept, it would make every request stale until
        // real time caught up with it, so it starts again from now.
        let at = match self.store.last_request_at()? {
            // Strictly within the skew: one past it would be stale.
            Some(last) if last >= now && last.millis_since(now) < handshake::MAX_REQUEST_CLOCK_SKEW_MS => {
                last.saturating_add_millis(1)
            }
            _ => now,
        };
        self.store.set_last_request_at(at)?;
        let (pending, request) = handshake::initiate(&self.identity, attempt.peer, at, &mut self.rng);
        attempt.state = AttemptState::AwaitingAck(pending.to_bytes());
        attempt.deadline = now.saturating_add_millis(self.config.key_exchange_timeout_ms);
        self.store.put_key_exchange(&attempt)?;
        self.transmit(attempt.peer, EnvelopeBody::KeyExchangeRequest(request), false, None);
        Ok(())
    }

    pub(super) fn key_exchange_failed(
        &mut self,
        now: Timestamp,
        mut attempt: KeyExchangeAttempt,
        reason: &str,
    ) -> Result<(), EngineError> {
        if attempt.attempts > self.config.max_retries {
            // Out of retries: chat messages waiting for this peer fail
            // (unless a session exists after all, e.g. a re-key failed);
            // receipts and control stay queued for a later session.
            self.store.delete_key_exchange(&attempt.peer)?;
            if self.store.sessions(&attempt.peer)?.is_some() {
                return Ok(());
            }
            for item in self.store.outbox_for(&attempt.peer)? {
                if let OutboxPayload::Chat(id) = &item.payload {
                    let waiting = self.store.message(id)?.is_some_and(|m| m.status == MessageStatus::Created);
                    if waiting {
                        self.fail_message(now, id, reason)?;
                        self.store.delete_outbox_item(item.seq)?;
                    }
                }
            }
            // What is still queued (receipts, sender keys, group notices)
            // must reach the peer one day. A peer behind a relay never shows
            // up as directly reachable, so try again now and then rather
            // than wait for that; each try is one more spent retry.
            if self.store.outbox_for(&attempt.peer)?.is_empty() {
                return Ok(());
            }
            let later = now.saturating_add_millis(self.config.session_retry_ms);
            let me = self.peer_id();
            if self.store.conversation(&ConversationId::for_peers(&me, &attempt.peer))?.is_none() {
                // A peer met only through a group (its roster is the admin's
                // word): no row waits for it, so its tries hold no place
                // among the exchanges under way; its items try again later,
                // within the background cap.
                for mut item in self.store.outbox_waiting_for(&attempt.peer)? {
                    item.next_attempt_at = Some(item.next_attempt_at.map_or(later, |t| t.max(later)));
                    self.store.put_outbox_item(&item)?;
                }
                return Ok(());
            }
            attempt.state = AttemptState::BackingOff;
            attempt.attempts = self.config.max_retries;
            attempt.deadline = later;
            self.store.put_key_exchange(&attempt)?;
            return Ok(());
        }
        let backoff = self.config.retry_backoff_ms.saturating_mul(1 << (attempt.attempts - 1).min(16));
        let jitter = self.rng.next_u64() % (self.config.retry_backoff_ms / 4).max(1);
        attempt.state = AttemptState::BackingOff;
        attempt.deadline = now.saturating_add_millis(backoff.saturating_add(jitter));
        self.store.put_key_exchange(&attempt)?;
        Ok(())
    }

    fn install_session(&mut self, now: Timestamp, peer: PeerId, session: crate::Session) -> Result<(), EngineError> {
        // Whichever side started it, a session now exists: our own attempt,
        // if any is still looking up or backing off, has nothing left to do.
        self.store.delete_key_exchange(&peer)?;
        let sessions = match self.load_sessions(&peer)? {
            Some(mut sessions) => match sessions.install(session) {
                Ok(()) => sessions,
                Err(e) => {
                    self.reject(peer, &e.to_string());
                    return Ok(());
                }
            },
            None => PairwiseSessions::new(session),
        };
        self.store.put_sessions(&peer, &sessions.to_bytes())?;
        self.store.note_heard(&peer, now)?;
        self.staged.events.push(Event::KeyExchangeComplete { peer_id: peer });
        self.release_waiting(now, peer)
    }

    pub(super) fn on_request(
        &mut self,
        now: Timestamp,
        from: PeerId,
        request: &KeyExchangeRequest,
    ) -> Result<(), EngineError> {
        // The request is checked before it may cancel anything of ours: a
        // stale, replayed or forged request must not end our own attempt,
        // or the messages waiting for it would wait with nothing to wake them.
        let answered = self.store.answered_request(&from)?;
        let response = match handshake::respond(&self.identity, &from, request, answered.as_ref(), now, &mut self.rng) {
            Ok(response) => response,
            Err(e) => {
                self.reject(from, &e.to_string());
                return Ok(());
            }
        };
        let ours = self.store.key_exchange(&from)?.filter(|a| matches!(a.state, AttemptState::AwaitingAck(_)));
        if ours.is_some() && CrossedRequests::resolve(&self.peer_id(), &from) == CrossedRequests::KeepOurs {
            return Ok(());
        }
        match response {
            // Only the ack is sent again: a repeat starts nothing new, so it
            // cancels nothing of ours either.
            Response::Repeat(ack) => self.transmit(from, EnvelopeBody::KeyExchangeAck(ack), false, None),
            Response::New(accepted) => {
                if let Some(ours) = ours {
                    self.store.delete_key_exchange(&ours.peer)?;
                }
                let accepted = *accepted;
                self.store.put_answered_request(&from, &accepted.answered)?;
                // The ack goes out before anything encrypted under the session.
                self.transmit(from, EnvelopeBody::KeyExchangeAck(accepted.ack), false, None);
                self.install_session(now, from, accepted.session)?;
            }
        }
        Ok(())
    }

    pub(super) fn on_ack(&mut self, now: Timestamp, from: PeerId, ack: &KeyExchangeAck) -> Result<(), EngineError> {
        let attempt = self.store.key_exchange(&from)?;
        let Some(AttemptState::AwaitingAck(bytes)) = attempt.as_ref().map(|a| &a.state) else {
            // No request of ours is waiting: a duplicate, or the loser of a crossing.
            return Ok(());
        };
        let pending = PendingKeyExchange::from_bytes(bytes)?;
        match pending.complete(ack) {
            Ok(session) => {
                self.enqueue(now, from, OutboxPayload::Control(ControlPayload::SessionConfirm))?;
                self.install_session(now, from, session)
            }
            Err(refused) => {
                self.reject(from, &refused.error.to_string());
                Ok(())
            }
        }
    }

    /// A peer that became reachable is worth trying at once, unless a
    /// request is already out.
    pub(super) fn retry_key_exchange_now(&mut self, now: Timestamp, peer: PeerId) -> Result<(), EngineError> {
        let attempt = self.store.key_exchange(&peer)?;
        if let Some(attempt) = attempt.filter(|a| a.state == AttemptState::BackingOff) {
            self.start_key_exchange(now, peer, attempt.attempts.saturating_add(1))?;
        }
        Ok(())
    }

    /// The directory found the peer: the request goes out.
    pub(super) fn on_peer_record(&mut self, now: Timestamp, peer: PeerId) -> Result<(), EngineError> {
        match self.store.key_exchange(&peer)? {
            Some(attempt) if attempt.state == AttemptState::LookingUp => self.send_key_exchange_request(now, attempt),
            _ => Ok(()),
        }
    }

    /// The directory does not know the peer: this attempt failed.
    pub(super) fn on_lookup_failed(&mut self, now: Timestamp, peer: PeerId) -> Result<(), EngineError> {
        match self.store.key_exchange(&peer)? {
            Some(attempt) if attempt.state == AttemptState::LookingUp => {
                self.key_exchange_failed(now, attempt, "peer is unknown to the directory")
            }
            _ => Ok(()),
        }
    }

    /// Attempts whose deadline passed: a backoff that is over starts the
    /// next attempt; a lookup or request that got no answer failed.
    pub(super) fn time_out_key_exchanges(&mut self, now: Timestamp) -> Result<(), EngineError> {
        for attempt in self.store.key_exchanges_due(now)? {
            if attempt.state == AttemptState::BackingOff {
                self.start_key_exchange(now, attempt.peer, attempt.attempts.saturating_add(1))?;
            } else {
                let reason =
                    format!("key exchange timed out after {} seconds", self.config.key_exchange_timeout_ms / 1000);
                self.key_exchange_failed(now, attempt, &reason)?;
            }
        }
        Ok(())
    }

    /// Items for `peer` need a session we do not hold: start a key
    /// exchange, unless one is under way, or nothing the user wrote waits
    /// and too many are under way already (`chat_waits`: a chat message of
    /// the user's is among the items).
    pub(super) fn need_session(&mut self, now: Timestamp, peer: PeerId, chat_waits: bool) -> Result<(), EngineError> {
        let attempt = self.store.key_exchange(&peer)?;
        // A new message deserves its own round of retries, not the slow
        // background ones left over from earlier failures.
        let spent = attempt
            .as_ref()
            .is_some_and(|a| a.state == AttemptState::BackingOff && a.attempts >= self.config.max_retries);
        let crowded = || -> Result<bool, EngineError> {
            Ok(self.store.key_exchange_count()? >= self.config.max_background_key_exchanges)
        };
        if attempt.is_none() && !chat_waits && crowded()? {
            // Nothing the user wrote waits for this peer: its items try
            // again later rather than add to the exchanges under way.
            let later = now.saturating_add_millis(self.config.confirmation_timeout_ms);
            for mut item in self.store.outbox_waiting_for(&peer)? {
                if item.next_attempt_at.is_none() {
                    item.next_attempt_at = Some(later);
                    self.store.put_outbox_item(&item)?;
                }
            }
        } else if attempt.is_none() || (chat_waits && spent) {
            self.start_key_exchange(now, peer, 1)?;
        }
        Ok(())
    }
}
