//! The node's side of a relay connection: it turns the engine's transmits
//! and lookups into relay frames, and the relay's answers into engine
//! inputs. Sans-IO like the rest: the node moves the frames.

use std::collections::BTreeMap;

use super::frame::{PublishRefusal, RelayFrame};
use super::record::PeerRecord;
use crate::engine::{Input, SendFailure, Transmit, TransmitId, TransmitOutcome};
use crate::ids::PeerId;
use crate::time::Timestamp;
use crate::wire::WireError;

/// What the node does with a relay frame's meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAction {
    /// Hand this to the engine.
    ToEngine(Input),
    /// Send this to the relay once the engine has handled (and committed)
    /// the input before it: a mailbox entry is deleted only after it is safe.
    AfterEngine(RelayFrame),
    /// A verified record of a peer, for the node's dialler and directory.
    Record(PeerRecord),
    /// The relay stored this node's newest record.
    Published {
        /// Its sequence.
        sequence: u64,
    },
    /// The relay refused this node's newest record: publish again after a
    /// `Rate` refusal; the others are the node's bug or the relay's policy,
    /// to be logged.
    PublishRefused {
        /// Its sequence.
        sequence: u64,
        /// Why.
        reason: PublishRefusal,
    },
    /// The relay says this connection comes from `address`. Unchecked: the
    /// node decides whether it is an address to publish.
    Observed {
        /// As the relay wrote it.
        address: String,
    },
}

/// How long a relay may stay silent while a forward or a lookup waits for
/// its answer. A relay answers a forward as soon as it reads it (one over
/// its rate too), and any frame from it counts as a sign of life; silence
/// this long while a forward waits means the relay is gone (a crash leaves
/// the connection looking open until QUIC's 30 s idle timeout) or lost a
/// frame, and the node moves on to another relay. A lookup over the relay's rate is never answered, so
/// an unanswered lookup only counts as found nothing.
pub const RELAY_ANSWER_TIMEOUT_MS: u64 = 5_000;

/// How long a relay may leave a connection's registration unanswered. It
/// is answered before anything else, but the node may be busy itself (its
/// queue can hold a thousand frames), so it gets longer than a forward.
pub const RELAY_REGISTRATION_TIMEOUT_MS: u64 = 15_000;

/// The most peers whose newest record sequence a client remembers.
const MAX_KNOWN_SEQUENCES: usize = 10_000;

/// One node's relay client state.
#[derive(Debug, Default)]
pub struct RelayClient {
    /// Lookups the relay has not answered yet, with when they were asked.
    lookups: BTreeMap<PeerId, Timestamp>,
    /// Forwards the relay has not answered yet, with when they were sent.
    pending: BTreeMap<u64, Timestamp>,
    /// When this connection's registration was asked for, until the relay
    /// answers it: a relay that never does is not serving this node.
    registering: Option<Timestamp>,
    /// The sequence of the newest record this node published.
    published: u64,
    /// The highest record sequence seen per peer, with that record's
    /// expiry: older answers are stale while it lasts. At most
    /// [`MAX_KNOWN_SEQUENCES`], expired ones forgotten first.
    sequences: std::collections::BTreeMap<PeerId, (u64, Timestamp)>,
}

impl RelayClient {
    /// A client with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// The frames to send on (re)connecting: register (which also brings
    /// the mailbox) and publish our record.
    pub fn on_connect(&mut self, now: Timestamp, record: PeerRecord) -> Vec<RelayFrame> {
        self.published = self.published.max(record.sequence);
        self.registering = Some(now);
        vec![RelayFrame::Register, RelayFrame::Publish(record)]
    }

    /// Whether the relay has left this connection's registration
    /// unanswered for [`RELAY_REGISTRATION_TIMEOUT_MS`].
    pub fn registration_overdue(&self, now: Timestamp) -> bool {
        self.registering.is_some_and(|asked| now.millis_since(asked) >= RELAY_REGISTRATION_TIMEOUT_MS)
    }

    /// A newly signed record of this node (at start, and whenever its
    /// addresses change), to publish. Sequences follow the clock in
    /// milliseconds and always increase, so a reinstalled node's records
    /// are newer than those it published before.
    pub fn publish(
        &mut self,
        identity: &crate::IdentityKeyPair,
        direct_addresses: Vec<String>,
        relay_addresses: Vec<String>,
        now: Timestamp,
        lifetime_ms: u64,
    ) -> RelayFrame {
        self.published = now.as_millis().max(self.published.saturating_add(1));
        let expires_at = now.saturating_add_millis(lifetime_ms);
        RelayFrame::Publish(PeerRecord::sign(
            identity,
            direct_addresses,
            relay_addresses,
            now,
            expires_at,
            self.published,
        ))
    }

    /// An engine transmit, sent through the relay.
    pub fn forward(&mut self, now: Timestamp, transmit: Transmit) -> RelayFrame {
        self.pending.insert(transmit.id.0, now);
        RelayFrame::Forward {
            to: transmit.peer,
            id: transmit.id.0,
            mailbox_allowed: transmit.mailbox_allowed,
            envelope: transmit.bytes,
        }
    }

    /// An engine lookup, asked of the relay.
    pub fn lookup(&mut self, now: Timestamp, peer: PeerId) -> RelayFrame {
        self.lookups.entry(peer).or_insert(now);
        RelayFrame::Lookup { peer }
    }

    /// When the oldest unanswered request runs out of time.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        let request = self.pending.values().chain(self.lookups.values()).min();
        let request = request.map(|asked| asked.saturating_add_millis(RELAY_ANSWER_TIMEOUT_MS));
        let registration = self.registering.map(|asked| asked.saturating_add_millis(RELAY_REGISTRATION_TIMEOUT_MS));
        request.into_iter().chain(registration).min()
    }

    /// Fails every request unanswered for [`RELAY_ANSWER_TIMEOUT_MS`] (a late
    /// answer is then ignored): forwards as failed transmits, lookups as
    /// found nothing.
    pub fn expire(&mut self, now: Timestamp) -> Vec<Input> {
        let overdue = |asked: &Timestamp| now.millis_since(*asked) >= RELAY_ANSWER_TIMEOUT_MS;
        let forwards: Vec<u64> = self.pending.iter().filter(|(_, t)| overdue(t)).map(|(id, _)| *id).collect();
        let lookups: Vec<PeerId> = self.lookups.iter().filter(|(_, t)| overdue(t)).map(|(p, _)| *p).collect();
        let reason = SendFailure::RelayDidNotAnswer { seconds: RELAY_ANSWER_TIMEOUT_MS / 1000 };
        let mut inputs = Vec::new();
        for id in forwards {
            self.pending.remove(&id);
            let outcome = TransmitOutcome::Failed(reason.clone());
            inputs.push(Input::TransmitResult { id: TransmitId(id), outcome });
        }
        for peer in lookups {
            self.lookups.remove(&peer);
            inputs.push(Input::LookupFailed(peer));
        }
        inputs
    }

    /// A request of this client's that never reached the relay (the driver
    /// could not queue it): forgotten, and what the engine must hear about
    /// it returned: a forward failed with `reason`, a lookup found nothing.
    /// `None` for a frame that asked nothing, or whose answer came already.
    pub fn withdraw(&mut self, frame: &RelayFrame, reason: SendFailure) -> Option<Input> {
        match frame {
            RelayFrame::Forward { id, .. } => self
                .pending
                .remove(id)
                .map(|_| Input::TransmitResult { id: TransmitId(*id), outcome: TransmitOutcome::Failed(reason) }),
            RelayFrame::Lookup { peer } => self.lookups.remove(peer).map(|_| Input::LookupFailed(*peer)),
            _ => None,
        }
    }

    /// The relay connection closed: every unanswered forward failed (the
    /// engine keeps the messages and tries again when the peer is
    /// reachable), and every unanswered lookup found nothing.
    pub fn on_disconnect(&mut self) -> Vec<Input> {
        self.registering = None;
        let forwards = core::mem::take(&mut self.pending).into_keys().map(|id| Input::TransmitResult {
            id: TransmitId(id),
            outcome: TransmitOutcome::Failed(SendFailure::RelayClosed),
        });
        let lookups = core::mem::take(&mut self.lookups).into_keys().map(Input::LookupFailed);
        forwards.chain(lookups).collect()
    }

    /// A frame from the relay.
    pub fn on_frame(&mut self, now: Timestamp, bytes: &[u8]) -> Result<Vec<ClientAction>, WireError> {
        let frame = RelayFrame::decode(bytes)?;
        // Any frame is a sign of life: the relay is busy (a mailbox drains
        // one acknowledged frame at a time), not gone, so what waits for an
        // answer gets its full time again.
        for asked in self.pending.values_mut().chain(self.lookups.values_mut()).chain(&mut self.registering) {
            *asked = (*asked).max(now);
        }
        if let RelayFrame::Forwarded { id } | RelayFrame::Held { id } | RelayFrame::Refused { id, .. } = &frame {
            if self.pending.remove(id).is_none() {
                return Ok(Vec::new()); // not ours, or already settled
            }
        }
        let result = |id: u64, outcome: TransmitOutcome| {
            vec![ClientAction::ToEngine(Input::TransmitResult { id: TransmitId(id), outcome })]
        };
        Ok(match frame {
            RelayFrame::Forwarded { id } => result(id, TransmitOutcome::Delivered),
            RelayFrame::Held { id } => result(id, TransmitOutcome::HeldByRelay),
            RelayFrame::Refused { id, reason } if reason.is_permanent() => {
                result(id, TransmitOutcome::Rejected(reason))
            }
            RelayFrame::Refused { id, reason } => result(id, TransmitOutcome::Failed(SendFailure::Relay(reason))),
            RelayFrame::Deliver { from, mailbox_id, envelope } => {
                let mut actions = vec![ClientAction::ToEngine(Input::Received { from, bytes: envelope })];
                if let Some(id) = mailbox_id {
                    actions.push(ClientAction::AfterEngine(RelayFrame::MailboxAck { ids: vec![id] }));
                }
                actions
            }
            RelayFrame::LookupResult { peer, record } => {
                if self.lookups.remove(&peer).is_none() {
                    return Ok(Vec::new());
                }
                // Every reader checks the record itself: the relay is not
                // trusted, and an answer older than one already seen is stale.
                // (Once the newest seen has expired, any valid record does,
                // as the relay itself rules.)
                let known = self.sequences.get(&peer).copied();
                let valid = record.as_ref().is_some_and(|r| {
                    r.peer_id == peer
                        && r.verify(now, None).is_ok()
                        && known.is_none_or(|(k, expires_at)| r.sequence >= k || expires_at <= now)
                });
                match record {
                    Some(record) if valid => {
                        if self.sequences.len() >= MAX_KNOWN_SEQUENCES && !self.sequences.contains_key(&peer) {
                            self.sequences.retain(|_, (_, expires_at)| *expires_at > now);
                            if self.sequences.len() >= MAX_KNOWN_SEQUENCES {
                                self.sequences.pop_first();
                            }
                        }
                        self.sequences.insert(peer, (record.sequence, record.expires_at));
                        vec![ClientAction::Record(record), ClientAction::ToEngine(Input::PeerRecord(peer))]
                    }
                    _ => vec![ClientAction::ToEngine(Input::LookupFailed(peer))],
                }
            }
            // Only the answer about the newest record matters: an older one's
            // fate changes nothing.
            RelayFrame::Published { sequence } if sequence == self.published => {
                vec![ClientAction::Published { sequence }]
            }
            RelayFrame::PublishRefused { sequence, reason } if sequence == self.published => {
                vec![ClientAction::PublishRefused { sequence, reason }]
            }
            RelayFrame::Published { .. } | RelayFrame::PublishRefused { .. } => Vec::new(),
            RelayFrame::Registered => {
                self.registering = None;
                Vec::new()
            }
            RelayFrame::Observed { address } => vec![ClientAction::Observed { address }],
            // Node-to-relay frames arriving here are ignored.
            RelayFrame::Register
            | RelayFrame::Publish(_)
            | RelayFrame::Lookup { .. }
            | RelayFrame::Forward { .. }
            | RelayFrame::FetchMailbox
            | RelayFrame::MailboxAck { .. } => Vec::new(),
        })
    }
}
