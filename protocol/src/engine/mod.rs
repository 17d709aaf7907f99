//! The chat engine: one deterministic state machine per node, between the
//! API (commands), the transport (bytes, reachability, send results), the
//! clock (timeouts) and the store.
//!
//! # Driving rule
//!
//! Call [`Engine::command`] or [`Engine::handle`] with the current time;
//! then drain [`Engine::poll_transmit`], [`Engine::poll_lookup`] and
//! [`Engine::poll_event`] until each returns `None`; then arm a timer for
//! [`Engine::poll_timeout`] and call `handle(now, Input::Timeout)` when it
//! fires. Nothing an input causes is visible before the store transaction
//! for that input has committed; if the commit fails, the input returns the
//! error and its outputs are discarded, so no byte leaves whose ratchet step
//! was not saved.
//!
//! It covers 1:1 conversations (key exchange with lookup, timeout and
//! retries), groups (Sender Keys distributed over the pairwise sessions,
//! admin invites, leaves with key rotation, messages held until their
//! sender's key arrives), the message lifecycle, delivery and read receipts,
//! the outbox, and retention.
//!
//! # Where each job lives
//!
//! This module holds the engine's shell: the transaction around every call,
//! the staged outputs, and the dispatch of inputs. Each job is a module of
//! its own, with the state transitions it owns:
//!
//! | module | job |
//! |---|---|
//! | `api` | commands, queries, inputs, transmits: the engine's surface |
//! | `commands` | the API's commands and queries (1:1 conversations, sending, reading, deleting, retrying) |
//! | `key_exchange` | lookups, requests and acks, backoff, replacing a session the peer lost |
//! | `outbox` | queueing per peer, sealing what is due, handing out transmits |
//! | `delivery` | transmit results, retries, receipts, per-recipient and overall statuses |
//! | `receiving` | opening envelopes and dispatching their payloads |
//! | `groups` | group commands, membership, invitations, sender keys and group messages |
//! | `retention` | timers and the retention sweep |
//! | `config`, `error`, `events`, `model`, `store`, `memory` | limits, errors, events, stored records, the store traits, the in-memory store |

mod api;
mod commands;
mod config;
mod delivery;
mod error;
mod events;
mod groups;
mod key_exchange;
mod memory;
mod model;
mod outbox;
mod receiving;
mod retention;
mod store;

use std::collections::{BTreeMap, VecDeque};

pub use api::{
    Answer, BatchError, Command, CommandOutcome, ConversationSummary, Input, Query, Refusal, SendFailure, Step,
    Transmit, TransmitId, TransmitOutcome, MAX_PAGE,
};
use config::DAY_MS;
pub use config::{
    EngineConfig, KEPT_RECORD_LIFETIME_MS, MAX_BACKGROUND_KEY_EXCHANGES, MAX_CONTENT_LEN, MAX_GROUP_NAME_LEN, MAX_HELD,
    MAX_HELD_BYTES, MAX_HELD_BYTES_PER_SENDER, MAX_HELD_PER_SENDER, MAX_IDS_PER_PAYLOAD, MAX_INVITATIONS,
    MAX_INVITATIONS_PER_ADMIN, MAX_KEPT_RECORDS, MAX_KEPT_RECORD_BYTES, MAX_QUIET_PEERS, MIN_GROUP_OTHERS,
};
pub use error::{EngineError, InternalError, RequestError};
pub use events::Event;
use key_exchange::REKEY_INTERVAL_MS;
pub use memory::MemoryStore;
pub use model::{
    AttemptState, ControlPayload, Conversation, ConversationKind, HeldMessage, Invitation, KeptRecord,
    KeyExchangeAttempt, Member, Message, MessageStatus, NotControl, OutboxItem, OutboxPayload, SealedCopy,
};
use rand_core::CryptoRngCore;
pub use store::{
    ConversationStore, GroupStore, InvitationStore, KeyExchangeStore, MessageStore, OutboxStore, PeerRecordStore,
    RetentionStore, SessionStore, Store, StoreError, Transaction,
};

use crate::identity::IdentityKeyPair;
use crate::ids::PeerId;
use crate::time::Timestamp;

/// Where a transmit's payload came from, to settle its result.
#[derive(Clone, Debug)]
struct InFlight {
    peer: PeerId,
    outbox_seq: Option<u64>,
    /// The pairwise copy sent, kept for the item if it reaches no one.
    copy: Option<SealedCopy>,
}

/// Outputs of the input being handled, released only after its commit.
#[derive(Default)]
struct Staged {
    transmits: Vec<Transmit>,
    lookups: Vec<PeerId>,
    events: Vec<Event>,
    in_flight: Vec<(TransmitId, InFlight)>,
    /// Transmits whose result this input settled.
    settled: Vec<TransmitId>,
    /// Peers whose outbox is sent once the transaction's work is done (with
    /// the latest time they were marked at): a batch of receipts or
    /// messages for one peer then leaves as few envelopes as possible,
    /// under one load and save of its sessions.
    to_pump: BTreeMap<PeerId, Timestamp>,
    /// Peers this input started a replacement key exchange with.
    rekeyed: Vec<(PeerId, Timestamp)>,
    /// When this input started one with a peer whose quiet session was swept.
    swept_rekey: Option<Timestamp>,
}

/// One node's chat engine over a store `S`.
pub struct Engine<S: Store> {
    identity: IdentityKeyPair,
    store: S,
    config: EngineConfig,
    rng: Box<dyn CryptoRngCore + Send>,
    in_flight: BTreeMap<TransmitId, InFlight>,
    next_transmit: u64,
    next_deadline: Option<Timestamp>,
    staged: Staged,
    transmits: VecDeque<Transmit>,
    lookups: VecDeque<PeerId>,
    events: VecDeque<Event>,
    /// When each peer last made us replace its session: at most one such
    /// key exchange per [`REKEY_INTERVAL_MS`]. Kept in memory only: after
    /// a restart a peer gets one more.
    rekeyed: BTreeMap<PeerId, Timestamp>,
    /// When a peer whose quiet session was swept last made us re-key (in
    /// memory, like `rekeyed`).
    last_swept_rekey: Option<Timestamp>,
}

impl<S: Store> core::fmt::Debug for Engine<S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Engine").field("peer_id", &self.identity.peer_id()).finish_non_exhaustive()
    }
}

impl<S: Store> Engine<S> {
    /// An engine over `store`. `rng` must be freshly seeded on every start
    /// (from the OS in the node, from the run's seed and the restart count
    /// in the simulator): a restarted engine that replayed its randomness
    /// would reuse ephemeral keys.
    pub fn new(
        identity: IdentityKeyPair,
        store: S,
        config: EngineConfig,
        rng: impl CryptoRngCore + Send + 'static,
        now: Timestamp,
    ) -> Result<Self, EngineError> {
        // Transmit IDs start at a random point, so a result that a previous
        // run's transmit gets after a restart cannot settle a new one.
        let mut rng: Box<dyn CryptoRngCore + Send> = Box::new(rng);
        let next_transmit = rng.next_u64() >> 1;
        let mut engine = Self {
            identity,
            store,
            rng,
            config: config.sanitized(),
            in_flight: BTreeMap::new(),
            next_transmit,
            next_deadline: None,
            staged: Staged::default(),
            transmits: VecDeque::new(),
            lookups: VecDeque::new(),
            events: VecDeque::new(),
            rekeyed: BTreeMap::new(),
            last_swept_rekey: None,
        };
        engine.transact(|e| {
            // Copies that were in flight when the node stopped are unknown:
            // send them again.
            for mut item in e.store.outbox()? {
                if item.in_flight {
                    item.in_flight = false;
                    item.next_attempt_at = Some(now);
                    e.store.put_outbox_item(&item)?;
                }
            }
            if e.store.retention_due()?.is_none() {
                e.store.set_retention_due(now.saturating_add_millis(e.config.retention_interval_ms))?;
            }
            Ok(())
        })?;
        Ok(engine)
    }

    /// This node's peer ID.
    pub fn peer_id(&self) -> PeerId {
        self.identity.peer_id()
    }

    /// The store, for reads outside the engine (the API lists messages).
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The store, mutably (for read transactions by the driver).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// The next transmit, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next peer to look up in the directory, if any.
    pub fn poll_lookup(&mut self) -> Option<PeerId> {
        self.lookups.pop_front()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call `handle(now, Input::Timeout)` next.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.next_deadline
    }

    /// Runs a command.
    pub fn command(&mut self, now: Timestamp, command: Command) -> Result<CommandOutcome, EngineError> {
        self.transact(|e| e.run_command(now, command))
    }

    /// Answers a read in a transaction of its own, which is rolled back:
    /// nothing changes and nothing is released.
    pub fn query(&mut self, query: Query) -> Result<Answer, EngineError> {
        self.store.begin()?;
        let answer = self.answer(query);
        self.store.rollback();
        answer
    }

    /// Handles an input.
    pub fn handle(&mut self, now: Timestamp, input: Input) -> Result<(), EngineError> {
        self.transact(|e| e.run_input(now, input))
    }

    /// Handles several commands and inputs, in order, in one store
    /// transaction (group commit): all of them take effect, or, if one fails
    /// or the commit fails, none does (and the caller may try them one by
    /// one). Returns each command's outcome, in order.
    pub fn handle_batch(
        &mut self,
        now: Timestamp,
        steps: impl IntoIterator<Item = Step>,
    ) -> Result<Vec<CommandOutcome>, BatchError> {
        let mut failed_at = None;
        self.transact(|e| {
            let mut outcomes = Vec::new();
            for (index, step) in steps.into_iter().enumerate() {
                failed_at = Some(index);
                match step {
                    Step::Command(command) => outcomes.push(e.run_command(now, command)?),
                    Step::Input(input) => e.run_input(now, input)?,
                }
            }
            failed_at = None;
            Ok(outcomes)
        })
        .map_err(|error| BatchError { step: failed_at, error })
    }

    /// One transaction: everything `f` stages is released only if the
    /// store commits.
    fn transact<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, EngineError>) -> Result<T, EngineError> {
        self.staged = Staged::default();
        self.store.begin()?;
        let result = f(self).and_then(|value| {
            self.pump_marked()?;
            Ok((value, self.compute_deadline()?))
        });
        match result {
            Ok((value, deadline)) => match self.store.commit() {
                Ok(()) => {
                    let staged = core::mem::take(&mut self.staged);
                    self.transmits.extend(staged.transmits);
                    self.lookups.extend(staged.lookups);
                    self.events.extend(staged.events);
                    self.in_flight.extend(staged.in_flight);
                    for id in staged.settled {
                        self.in_flight.remove(&id);
                    }
                    for (peer, at) in staged.rekeyed {
                        self.rekeyed.retain(|_, t| at.millis_since(*t) < REKEY_INTERVAL_MS);
                        self.rekeyed.insert(peer, at);
                    }
                    if staged.swept_rekey.is_some() {
                        self.last_swept_rekey = staged.swept_rekey;
                    }
                    self.next_deadline = deadline;
                    Ok(value)
                }
                Err(e) => {
                    // A failed COMMIT may leave the transaction open.
                    self.store.rollback();
                    self.staged = Staged::default();
                    Err(e.into())
                }
            },
            Err(e) => {
                self.store.rollback();
                self.staged = Staged::default();
                Err(e)
            }
        }
    }

    fn compute_deadline(&self) -> Result<Option<Timestamp>, EngineError> {
        let exchanges = self.store.next_key_exchange_deadline()?;
        Ok(exchanges.into_iter().chain(self.store.next_outbox_attempt()?).chain(self.store.retention_due()?).min())
    }

    fn run_input(&mut self, now: Timestamp, input: Input) -> Result<(), EngineError> {
        match input {
            Input::Received { from, bytes } => self.receive(now, from, &bytes),
            Input::PeerReachable(peer) => {
                self.retry_key_exchange_now(now, peer)?;
                self.release_waiting(now, peer)
            }
            Input::PeerUnreachable(_) => Ok(()),
            Input::PeerRecord(peer) => self.on_peer_record(now, peer),
            Input::LookupFailed(peer) => self.on_lookup_failed(now, peer),
            Input::TransmitResult { id, outcome } => self.transmit_result(now, id, outcome),
            Input::Timeout => self.timeout(now),
            Input::KeepRecord(kept) => {
                if kept.record.len() > MAX_KEPT_RECORD_BYTES {
                    return Ok(());
                }
                self.store.put_kept_record(&kept)?;
                if self.store.kept_record_count()? > MAX_KEPT_RECORDS {
                    self.store.forget_kept_records(Timestamp(0), MAX_KEPT_RECORDS)?;
                }
                Ok(())
            }
        }
    }
}
