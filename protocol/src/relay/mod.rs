//! The relay: forwarding between connected peers, a mailbox for offline
//! ones, and the peer directory, as a sans-IO state machine.
//!
//! # Driving rule
//!
//! Tell the relay about connections (`connected`, `disconnected`, with the
//! peer ID the transport authenticated) and frames (`handle_frame`); call
//! `handle_timeout` when `poll_timeout` passes; after every call, drain
//! `poll_transmit` and `poll_event`. Each call is one [`RelayStore`]
//! transaction, and nothing it causes is released before the commit: a
//! "held" answer is never sent for an envelope the store did not keep.
//!
//! The relay sees peer IDs and opaque envelopes only; it cannot read them.

mod client;
mod frame;
mod memory;
mod record;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

pub use client::{ClientAction, RelayClient, RELAY_ANSWER_TIMEOUT_MS, RELAY_REGISTRATION_TIMEOUT_MS};
pub use frame::{PublishRefusal, Refusal, RelayFrame, MAX_FRAME_LEN};
pub use memory::MemoryRelayStore;
pub use record::{PeerRecord, RecordError, MAX_ADDRESSES, MAX_ADDRESS_LEN, PEER_RECORD_LABEL};

use crate::ids::PeerId;
use crate::time::Timestamp;
use crate::wire::MAX_ENVELOPE_LEN;

/// A storage failure; the call is discarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayStoreError {
    /// The store could not do what was asked.
    #[error("relay storage unavailable: {0}")]
    Unavailable(String),
    /// A read or write outside a transaction.
    #[error("relay storage misused: {0}")]
    Misuse(&'static str),
}

/// Where a peer's connection comes from, as the driver sees it: an IPv4
/// address, or an IPv6 /64 (one host's usual share). Identities cost
/// nothing and addresses do, so the relay keeps quotas per source as well
/// as per sender. Opaque to the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Source(pub [u8; 16]);

impl Source {
    /// The source of a connection from `ip`.
    pub fn of_ip(ip: std::net::IpAddr) -> Self {
        match ip {
            std::net::IpAddr::V4(v4) => Self(v4.to_ipv6_mapped().octets()),
            std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(v4.to_ipv6_mapped().octets()),
                None => {
                    let mut prefix = [0u8; 16];
                    prefix[..8].copy_from_slice(&v6.octets()[..8]);
                    Self(prefix)
                }
            },
        }
    }

    /// For a driver that knows no address: each peer is its own source.
    pub fn of_peer(peer: &PeerId) -> Self {
        let mut bytes = [0xff; 16];
        bytes[..16].copy_from_slice(&peer.0[..16]);
        Self(bytes)
    }
}

/// One envelope waiting in a mailbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MailboxEntry {
    /// Its ID, increasing in arrival order.
    pub id: u64,
    /// Whose mailbox.
    pub recipient: PeerId,
    /// Who sent it.
    pub from: PeerId,
    /// Where the sender's connection came from.
    pub source: Source,
    /// The opaque envelope.
    pub envelope: Vec<u8>,
    /// When it arrived.
    pub stored_at: Timestamp,
}

/// Entries and bytes held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Entries.
    pub count: usize,
    /// Envelope bytes.
    pub bytes: usize,
}

/// Transactional storage for a relay's mailbox and directory.
pub trait RelayStore {
    /// Opens a transaction.
    fn begin(&mut self) -> Result<(), RelayStoreError>;
    /// Commits it; on failure the relay calls `rollback`.
    fn commit(&mut self) -> Result<(), RelayStoreError>;
    /// Discards it.
    fn rollback(&mut self);
    /// A peer's mailbox, oldest first.
    fn mailbox(&self, peer: &PeerId) -> Result<Vec<MailboxEntry>, RelayStoreError>;
    /// Up to `limit` of `peer`'s entries with an ID above `after`, oldest first.
    fn mailbox_after(&self, peer: &PeerId, after: u64, limit: usize) -> Result<Vec<MailboxEntry>, RelayStoreError>;
    /// How many peers have a record.
    fn record_count(&self) -> Result<usize, RelayStoreError>;
    /// What a peer's mailbox holds. Called on every deposit: a store keeps
    /// it counted rather than summing the mailbox.
    fn mailbox_usage(&self, peer: &PeerId) -> Result<Usage, RelayStoreError>;
    /// What `sender` holds in `recipient`'s mailbox.
    fn mailbox_usage_by_sender(&self, recipient: &PeerId, sender: &PeerId) -> Result<Usage, RelayStoreError>;
    /// What senders from `source` hold in `recipient`'s mailbox.
    fn mailbox_usage_by_source(&self, recipient: &PeerId, source: &Source) -> Result<Usage, RelayStoreError>;
    /// What senders from `source` hold in all mailboxes together (kept
    /// counted, like [`RelayStore::mailbox_usage`]).
    fn source_usage(&self, source: &Source) -> Result<Usage, RelayStoreError>;
    /// What all mailboxes hold together (kept counted).
    fn mailbox_total(&self) -> Result<Usage, RelayStoreError>;
    /// Stores an entry.
    fn put_mailbox_entry(&mut self, entry: &MailboxEntry) -> Result<(), RelayStoreError>;
    /// Deletes an entry of `peer`'s mailbox (no-op if absent).
    fn delete_mailbox_entry(&mut self, peer: &PeerId, id: u64) -> Result<(), RelayStoreError>;
    /// Deletes every entry stored before `cutoff`; returns how many.
    fn delete_mailbox_before(&mut self, cutoff: Timestamp) -> Result<usize, RelayStoreError>;
    /// When the oldest entry was stored.
    fn oldest_mailbox_entry(&self) -> Result<Option<Timestamp>, RelayStoreError>;
    /// A fresh, increasing entry ID.
    fn next_mailbox_id(&mut self) -> Result<u64, RelayStoreError>;
    /// The newest record of a peer.
    fn record(&self, peer: &PeerId) -> Result<Option<PeerRecord>, RelayStoreError>;
    /// Stores a record published over a connection from `source`, its peer
    /// seen at `seen_at`.
    fn put_record(&mut self, record: &PeerRecord, source: &Source, seen_at: Timestamp) -> Result<(), RelayStoreError>;
    /// Notes that a peer with a record registered at `seen_at` (no-op for a
    /// peer without one).
    fn touch_record(&mut self, peer: &PeerId, seen_at: Timestamp) -> Result<(), RelayStoreError>;
    /// How many records were published from `source`.
    fn records_from_source(&self, source: &Source) -> Result<usize, RelayStoreError>;
    /// Up to `limit` peers whose record was last seen before `seen_before`
    /// and whose mailbox is empty, least recently seen first: the records a
    /// full relay may evict.
    fn idle_records(&self, seen_before: Timestamp, limit: usize) -> Result<Vec<PeerId>, RelayStoreError>;
    /// Deletes a peer's record (no-op if absent).
    fn delete_record(&mut self, peer: &PeerId) -> Result<(), RelayStoreError>;
    /// Deletes the records that expired at or before `now` and whose peer
    /// was last seen before `seen_before`; returns how many.
    fn delete_expired_records(&mut self, now: Timestamp, seen_before: Timestamp) -> Result<usize, RelayStoreError>;
}

/// Relay limits; all configurable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayConfig {
    /// Most entries held per recipient.
    pub mailbox_max_count: usize,
    /// Most bytes held per recipient.
    pub mailbox_max_bytes: usize,
    /// Most bytes held in all mailboxes together, so many recipients cannot
    /// fill the relay's disk between them.
    pub mailbox_total_max_bytes: usize,
    /// How long an entry is held: 7 days.
    pub mailbox_ttl_ms: u64,
    /// The longest a published record may stay valid: 7 days.
    pub record_max_lifetime_ms: u64,
    /// Forwards per second a peer may sustain.
    pub rate_per_sec: u64,
    /// Forwards a peer may make in a burst.
    pub rate_burst: u64,
    /// The largest envelope accepted. The default exceeds what a 64 KiB
    /// message can produce; more than a frame can carry is clamped.
    pub max_envelope_len: usize,
    /// The most peer records held (each opens a mailbox).
    pub max_records: usize,
    /// Most entries one sender may hold in one recipient's mailbox.
    pub mailbox_max_count_per_sender: usize,
    /// Most bytes one sender may hold in one recipient's mailbox.
    pub mailbox_max_bytes_per_sender: usize,
    /// Most entries senders from one source may hold in one recipient's
    /// mailbox, whatever identities they use.
    pub mailbox_max_count_per_source: usize,
    /// Most bytes senders from one source may hold in one recipient's
    /// mailbox.
    pub mailbox_max_bytes_per_source: usize,
    /// Most bytes senders from one source may hold in all mailboxes.
    pub source_max_bytes: usize,
    /// Most records published from one source.
    pub max_records_per_source: usize,
    /// How long a record's peer must have been away (not registered)
    /// before a full relay may evict its record for a newcomer's; a record
    /// whose mailbox holds entries is never evicted.
    pub record_idle_ms: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            mailbox_max_count: 1_000,
            mailbox_max_bytes: 64 * 1024 * 1024,
            mailbox_total_max_bytes: 1024 * 1024 * 1024,
            mailbox_ttl_ms: 7 * 24 * 60 * 60 * 1000,
            record_max_lifetime_ms: 7 * 24 * 60 * 60 * 1000,
            rate_per_sec: 50,
            rate_burst: 200,
            max_envelope_len: MAX_ENVELOPE_LEN,
            max_records: 100_000,
            mailbox_max_count_per_sender: 100,
            mailbox_max_bytes_per_sender: 16 * 1024 * 1024,
            mailbox_max_count_per_source: 250,
            mailbox_max_bytes_per_source: 32 * 1024 * 1024,
            source_max_bytes: 128 * 1024 * 1024,
            max_records_per_source: 256,
            // Long enough that a phone or laptop closed for a weekend keeps
            // its record; records live at most 7 days anyway.
            record_idle_ms: 3 * 24 * 60 * 60 * 1000,
        }
    }
}

/// What the relay reports to its operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayEvent {
    /// A forward was refused.
    Refused {
        /// The sender.
        from: PeerId,
        /// Why.
        reason: Refusal,
    },
    /// A frame or record was refused as malformed or invalid.
    Rejected {
        /// The sender.
        from: PeerId,
        /// Why.
        reason: String,
    },
}

/// Why a relay call failed; nothing changed and nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] RelayStoreError),
}

/// A token bucket in thousandths of a token, refilled on injected time.
#[derive(Clone, Debug)]
struct Bucket {
    milli_tokens: u64,
    at: Timestamp,
}

/// What one call staged; released only when its transaction commits.
#[derive(Default)]
struct Staged {
    transmits: Vec<(PeerId, Vec<u8>)>,
    events: Vec<RelayEvent>,
    /// In-memory changes to undo, newest last, if the transaction fails:
    /// a failed call must not leave a peer registered or its tokens spent.
    undo: Vec<Undo>,
}

enum Undo {
    Peer(PeerId, PeerState),
    Bucket(PeerId, Option<Bucket>),
}

/// A connected peer.
#[derive(Clone, Debug, Default)]
struct PeerState {
    /// Open connections (a reconnect may overlap the old connection).
    connections: u32,
    registered: bool,
    /// A connection opened since the mailbox was last sent from its start.
    fresh: bool,
    /// The highest mailbox ID sent in the current pass over the mailbox.
    sent_up_to: u64,
    /// Where its newest connection comes from.
    source: Option<Source>,
    /// Its newest connection's address as the driver saw it, told to the
    /// peer on `Register`.
    observed: Option<std::net::SocketAddr>,
    /// The entries of the batch in flight, not yet acknowledged.
    batch: BTreeSet<u64>,
    /// When that batch last went out.
    batch_sent_at: Option<Timestamp>,
}

/// The relay state machine.
pub struct Relay<S: RelayStore> {
    store: S,
    config: RelayConfig,
    /// Connected peers.
    connected: BTreeMap<PeerId, PeerState>,
    buckets: BTreeMap<PeerId, Bucket>,
    staged: Staged,
    transmits: VecDeque<(PeerId, Vec<u8>)>,
    events: VecDeque<RelayEvent>,
    next_deadline: Option<Timestamp>,
    /// When records are next swept (set by the first call with a time).
    record_sweep_at: Option<Timestamp>,
}

impl<S: RelayStore> core::fmt::Debug for Relay<S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Relay").field("connected", &self.connected.len()).finish_non_exhaustive()
    }
}

impl<S: RelayStore> Relay<S> {
    /// A relay over `store` (which keeps its mailbox across restarts).
    pub fn new(store: S, mut config: RelayConfig) -> Result<Self, RelayError> {
        config.max_envelope_len = config.max_envelope_len.min(MAX_ENVELOPE_LEN);
        let mut relay = Self {
            store,
            config,
            connected: BTreeMap::new(),
            buckets: BTreeMap::new(),
            staged: Staged::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            next_deadline: None,
            record_sweep_at: None,
        };
        relay.transact(|_| Ok(()))?;
        Ok(relay)
    }

    /// The store (for a restart: keep it, drop the relay).
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The store, mutably: for the driver's own maintenance between calls
    /// (nothing may be left open in it).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// The next frame to send: (to, bytes).
    pub fn poll_transmit(&mut self) -> Option<(PeerId, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<RelayEvent> {
        self.events.pop_front()
    }

    /// When to call `handle_timeout`.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.next_deadline
    }

    /// A connection opened (the transport authenticated its peer ID). A
    /// peer may hold several at once (a reconnect can overlap the old one):
    /// it stays registered, and its next `Register` sends the mailbox again
    /// from the start, since entries sent on a dying connection may be lost.
    pub fn connected(&mut self, peer: PeerId) {
        self.connected_from(peer, Source::of_peer(&peer));
    }

    /// [`Relay::connected`], from a known network source (quotas are kept
    /// per source as well as per peer).
    pub fn connected_from(&mut self, peer: PeerId, source: Source) {
        let state = self.connected.entry(peer).or_default();
        state.connections = state.connections.saturating_add(1);
        state.fresh = true;
        state.source = Some(source);
        state.observed = None;
    }

    /// [`Relay::connected`], from the address `remote` (after any NAT on
    /// the way): quotas are kept per its [`Source`], and the peer is told
    /// the address in [`RelayFrame::Observed`] when it registers, so it can
    /// publish where others may reach it.
    pub fn connected_at(&mut self, peer: PeerId, remote: std::net::SocketAddr) {
        // A dual-stack socket shows IPv4 peers as IPv4-mapped IPv6; the
        // peer is told the address others would dial.
        let remote = match remote.ip() {
            std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => std::net::SocketAddr::new(v4.into(), remote.port()),
                None => remote,
            },
            std::net::IpAddr::V4(_) => remote,
        };
        self.connected_from(peer, Source::of_ip(remote.ip()));
        if let Some(state) = self.connected.get_mut(&peer) {
            state.observed = Some(remote);
        }
    }

    /// Where `peer`'s newest connection comes from.
    fn source_of(&self, peer: &PeerId) -> Source {
        self.connected.get(peer).and_then(|s| s.source).unwrap_or_else(|| Source::of_peer(peer))
    }

    /// A connection closed; with the peer's last one goes its
    /// registration. Its rate state stays until the bucket has refilled, so
    /// reconnecting does not buy a fresh burst.
    pub fn disconnected(&mut self, peer: &PeerId) {
        let Some(state) = self.connected.get_mut(peer) else { return };
        state.connections = state.connections.saturating_sub(1);
        if state.connections == 0 {
            self.connected.remove(peer);
        }
    }

    /// A frame from a connected peer. Frames from a peer with no open
    /// connection (late ones, after the close) are dropped unread.
    pub fn handle_frame(&mut self, now: Timestamp, from: PeerId, bytes: &[u8]) -> Result<(), RelayError> {
        if !self.connected.contains_key(&from) {
            return Ok(());
        }
        self.record_sweep_at.get_or_insert(now.saturating_add_millis(RECORD_SWEEP_INTERVAL_MS));
        self.transact(|r| r.on_frame(now, from, bytes))
    }

    /// Expires old mailbox entries and records.
    ///
    /// A member's record outlives its expiry for as long as its mailbox
    /// would keep an entry (the mailbox's TTL from when the member was last
    /// seen), so deposits for someone away for days still find their
    /// mailbox; such records are swept at most once per
    /// [`RECORD_SWEEP_INTERVAL_MS`].
    pub fn handle_timeout(&mut self, now: Timestamp) -> Result<(), RelayError> {
        let cutoff = Timestamp(now.as_millis().saturating_sub(self.config.mailbox_ttl_ms));
        let sweep = self.record_sweep_at.is_none_or(|at| at <= now);
        self.transact(|r| {
            r.store.delete_mailbox_before(cutoff)?;
            if sweep {
                r.store.delete_expired_records(now, cutoff)?;
            }
            Ok(())
        })?;
        if sweep {
            self.record_sweep_at = Some(now.saturating_add_millis(RECORD_SWEEP_INTERVAL_MS));
        }
        Ok(())
    }

    fn transact(&mut self, f: impl FnOnce(&mut Self) -> Result<(), RelayError>) -> Result<(), RelayError> {
        self.staged = Staged::default();
        self.store.begin()?;
        let result = f(self).and_then(|()| {
            let oldest = self.store.oldest_mailbox_entry()?;
            let mailbox = oldest.map(|at| at.saturating_add_millis(self.config.mailbox_ttl_ms.saturating_add(1)));
            Ok(mailbox.into_iter().chain(self.record_sweep_at).min())
        });
        match result {
            Ok(deadline) => match self.store.commit() {
                Ok(()) => {
                    let staged = core::mem::take(&mut self.staged);
                    self.transmits.extend(staged.transmits);
                    self.events.extend(staged.events);
                    self.next_deadline = deadline;
                    Ok(())
                }
                Err(e) => {
                    self.abort();
                    Err(e.into())
                }
            },
            Err(e) => {
                self.abort();
                Err(e)
            }
        }
    }

    /// Rolls back the store and undoes the call's in-memory changes.
    fn abort(&mut self) {
        self.store.rollback();
        let staged = core::mem::take(&mut self.staged);
        for undo in staged.undo.into_iter().rev() {
            match undo {
                Undo::Peer(peer, state) => {
                    if let Some(current) = self.connected.get_mut(&peer) {
                        *current = state;
                    }
                }
                Undo::Bucket(peer, Some(bucket)) => {
                    self.buckets.insert(peer, bucket);
                }
                Undo::Bucket(peer, None) => {
                    self.buckets.remove(&peer);
                }
            }
        }
    }

    fn send(&mut self, to: PeerId, frame: &RelayFrame) {
        self.staged.transmits.push((to, frame.encode()));
    }

    fn on_frame(&mut self, now: Timestamp, from: PeerId, bytes: &[u8]) -> Result<(), RelayError> {
        // Every frame costs a token, even one that does not decode, so no
        // kind of frame makes the relay work without limit.
        let within_rate = self.take_token(now, from);
        let frame = match RelayFrame::decode(bytes) {
            Ok(frame) => frame,
            Err(e) => {
                self.staged.events.push(RelayEvent::Rejected { from, reason: e.to_string() });
                return Ok(());
            }
        };
        // An acknowledgement releases work rather than making it (it names
        // only entries in flight, at most one batch), so it is taken even
        // over the rate: refused, the drain of a full mailbox would stall.
        let releases_work = matches!(frame, RelayFrame::MailboxAck { .. });
        if !within_rate && !releases_work {
            self.staged.events.push(RelayEvent::Refused { from, reason: Refusal::Rate });
            // Requests that expect an answer get one, so the node is not
            // left waiting.
            match &frame {
                RelayFrame::Publish(record) => {
                    let sequence = record.sequence;
                    self.send(from, &RelayFrame::PublishRefused { sequence, reason: PublishRefusal::Rate });
                }
                RelayFrame::Forward { id, .. } => {
                    self.send(from, &RelayFrame::Refused { id: *id, reason: Refusal::Rate });
                }
                _ => {}
            }
            return Ok(());
        }
        match frame {
            RelayFrame::Register => {
                let Some(state) = self.connected.get_mut(&from) else { return Ok(()) };
                let before = state.clone();
                let fresh = state.fresh || !state.registered;
                state.registered = true;
                state.fresh = false;
                if fresh {
                    state.sent_up_to = 0;
                    state.batch.clear();
                    state.batch_sent_at = None;
                }
                self.staged.undo.push(Undo::Peer(from, before));
                let observed = state.observed;
                self.store.touch_record(&from, now)?;
                self.send(from, &RelayFrame::Registered);
                if let Some(address) = observed {
                    self.send(from, &RelayFrame::Observed { address: address.to_string() });
                }
                // The mailbox comes with the first registration on a new
                // connection; a repeated Register does not resend it
                // (FetchMailbox asks for that).
                if fresh {
                    self.deliver_mailbox(now, &from, false)?;
                }
            }
            RelayFrame::FetchMailbox => {
                // The batch in flight again (its copies may be lost), at most
                // once per interval: each fetch is two bytes, and the batch
                // it asks for can be a megabyte.
                let Some(state) = self.connected.get(&from).filter(|s| s.registered) else { return Ok(()) };
                let recently = state.batch_sent_at.is_some_and(|at| now.millis_since(at) < MAILBOX_RESEND_INTERVAL_MS);
                if !state.batch.is_empty() && recently {
                    self.staged.events.push(RelayEvent::Rejected {
                        from,
                        reason: "mailbox fetched again within the resend interval".into(),
                    });
                    return Ok(());
                }
                self.deliver_mailbox(now, &from, true)?;
            }
            RelayFrame::MailboxAck { ids } => {
                let Some(state) = self.connected.get_mut(&from).filter(|s| s.registered) else { return Ok(()) };
                let before = state.clone();
                let acknowledged: Vec<u64> =
                    ids.into_iter().take(MAX_ACK_IDS).filter(|id| state.batch.remove(id)).collect();
                if acknowledged.is_empty() {
                    return Ok(()); // nothing in flight named: costs nothing more
                }
                self.staged.undo.push(Undo::Peer(from, before));
                for id in acknowledged {
                    self.store.delete_mailbox_entry(&from, id)?;
                }
                self.deliver_mailbox(now, &from, false)?;
            }
            RelayFrame::Publish(record) => {
                let sequence = record.sequence;
                let answer = match self.check_publish(now, from, &record)? {
                    None => {
                        let source = self.source_of(&from);
                        self.store.put_record(&record, &source, now)?;
                        RelayFrame::Published { sequence }
                    }
                    Some(reason) => {
                        self.staged.events.push(RelayEvent::Rejected { from, reason: reason.as_str().into() });
                        RelayFrame::PublishRefused { sequence, reason }
                    }
                };
                self.send(from, &answer);
            }
            RelayFrame::Lookup { peer } => {
                let record = self.store.record(&peer)?.filter(|r| r.expires_at > now);
                self.send(from, &RelayFrame::LookupResult { peer, record });
            }
            RelayFrame::Forward { to, id, mailbox_allowed, envelope } => {
                self.forward(now, from, to, id, mailbox_allowed, envelope)?;
            }
            RelayFrame::Registered
            | RelayFrame::LookupResult { .. }
            | RelayFrame::Forwarded { .. }
            | RelayFrame::Held { .. }
            | RelayFrame::Refused { .. }
            | RelayFrame::Deliver { .. }
            | RelayFrame::Published { .. }
            | RelayFrame::PublishRefused { .. }
            | RelayFrame::Observed { .. } => {
                self.staged
                    .events
                    .push(RelayEvent::Rejected { from, reason: "a relay-to-node frame sent to the relay".into() });
            }
        }
        Ok(())
    }

    /// Why a published record may not be stored, if it may not.
    fn check_publish(
        &mut self,
        now: Timestamp,
        from: PeerId,
        record: &PeerRecord,
    ) -> Result<Option<PublishRefusal>, RelayError> {
        if !self.is_registered(&from) {
            return Ok(Some(PublishRefusal::NotRegistered));
        }
        if record.peer_id != from {
            return Ok(Some(PublishRefusal::OtherPeer));
        }
        if record.expires_at.millis_since(now) > self.config.record_max_lifetime_ms {
            return Ok(Some(PublishRefusal::LifetimeTooLong));
        }
        // An expired record no longer counts against a new one.
        let held = self.store.record(&record.peer_id)?.filter(|r| r.expires_at > now);
        if held.as_ref() == Some(record) {
            return Ok(None); // the same record again, on a reconnect
        }
        let known = held.as_ref().map(|r| r.sequence);
        match record.verify(now, known) {
            Ok(()) => {}
            Err(RecordError::Stale { .. }) => return Ok(Some(PublishRefusal::Stale)),
            Err(_) => return Ok(Some(PublishRefusal::Invalid)),
        }
        // A new record (a replacement costs nothing more) is counted
        // against its source, and needs room.
        if held.is_none() && self.store.record(&record.peer_id)?.is_none() {
            let source = self.source_of(&from);
            if self.store.records_from_source(&source)? >= self.config.max_records_per_source {
                return Ok(Some(PublishRefusal::TooManyFromAddress));
            }
            if self.store.record_count()? >= self.config.max_records && !self.evict_idle_record(now)? {
                return Ok(Some(PublishRefusal::Full));
            }
        }
        Ok(None)
    }

    /// Makes room for one record by deleting that of a peer away for at
    /// least [`RelayConfig::record_idle_ms`] with an empty mailbox; false if
    /// there is none.
    fn evict_idle_record(&mut self, now: Timestamp) -> Result<bool, RelayError> {
        let seen_before = Timestamp(now.as_millis().saturating_sub(self.config.record_idle_ms));
        let idle = self.store.idle_records(seen_before, 16)?;
        let Some(peer) = idle.into_iter().find(|p| !self.connected.contains_key(p)) else { return Ok(false) };
        self.store.delete_record(&peer)?;
        Ok(true)
    }

    fn refuse(&mut self, from: PeerId, id: u64, reason: Refusal) {
        self.staged.events.push(RelayEvent::Refused { from, reason });
        self.send(from, &RelayFrame::Refused { id, reason });
    }

    fn forward(
        &mut self,
        now: Timestamp,
        from: PeerId,
        to: PeerId,
        id: u64,
        mailbox_allowed: bool,
        envelope: Vec<u8>,
    ) -> Result<(), RelayError> {
        // A peer that is not registered here may still reach the relay's
        // members (registered now, or holding a record): a sender reaches
        // a recipient through the recipient's relays. Between two
        // non-members the relay is no one's free proxy.
        let from_member = self.is_registered(&from) || self.store.record(&from)?.is_some();
        let to_member = self.is_registered(&to) || self.store.record(&to)?.is_some();
        if !from_member && !to_member {
            self.refuse(from, id, Refusal::NotRegistered);
            return Ok(());
        }
        if envelope.len() > self.config.max_envelope_len {
            self.refuse(from, id, Refusal::TooLarge);
            return Ok(());
        }
        // Passed on to a member connected now, or to a visitor connected now
        // when a member writes to it (a member's answer to someone who came
        // to this relay to reach it).
        if self.is_registered(&to) || (from_member && self.connected.contains_key(&to)) {
            self.send(to, &RelayFrame::Deliver { from, mailbox_id: None, envelope });
            self.send(from, &RelayFrame::Forwarded { id });
            return Ok(());
        }
        if !mailbox_allowed {
            self.refuse(from, id, Refusal::RecipientOffline);
            return Ok(());
        }
        // A mailbox only for a member, a peer that published a record here
        // (kept while its mailbox could hold anything): an invented peer ID
        // gets none.
        if self.store.record(&to)?.is_none() {
            self.refuse(from, id, Refusal::UnknownRecipient);
            return Ok(());
        }
        let source = self.source_of(&from);
        if !self.room_for(&to, &from, &source, envelope.len())? {
            self.refuse(from, id, Refusal::Quota);
            return Ok(());
        }
        let entry =
            MailboxEntry { id: self.store.next_mailbox_id()?, recipient: to, from, source, envelope, stored_at: now };
        self.store.put_mailbox_entry(&entry)?;
        self.send(from, &RelayFrame::Held { id });
        Ok(())
    }

    /// Whether `to`'s mailbox takes `len` more bytes from `from` (at
    /// `source`): within the recipient's quota, the sender's and its
    /// source's share of it, the source's total across all mailboxes, and
    /// the relay's. Per recipient alone, a stranger with free identities
    /// could fill anyone's mailbox and lock honest senders out.
    fn room_for(&self, to: &PeerId, from: &PeerId, source: &Source, len: usize) -> Result<bool, RelayError> {
        let c = &self.config;
        let fits = |usage: Usage, max_count: usize, max_bytes: usize| {
            usage.count < max_count && usage.bytes.saturating_add(len) <= max_bytes
        };
        Ok(fits(self.store.mailbox_usage(to)?, c.mailbox_max_count, c.mailbox_max_bytes)
            && fits(
                self.store.mailbox_usage_by_sender(to, from)?,
                c.mailbox_max_count_per_sender,
                c.mailbox_max_bytes_per_sender,
            )
            && fits(
                self.store.mailbox_usage_by_source(to, source)?,
                c.mailbox_max_count_per_source,
                c.mailbox_max_bytes_per_source,
            )
            && fits(self.store.source_usage(source)?, usize::MAX, c.source_max_bytes)
            && fits(self.store.mailbox_total()?, usize::MAX, c.mailbox_total_max_bytes))
    }

    fn is_registered(&self, peer: &PeerId) -> bool {
        self.connected.get(peer).is_some_and(|s| s.registered)
    }

    /// Sends the next batch of the mailbox once the previous one is
    /// acknowledged: at most [`MAILBOX_BATCH`] entries and
    /// [`MAILBOX_BATCH_BYTES`] (or one larger entry) in flight, so one
    /// request never makes the relay send a whole mailbox at once. With
    /// `resend`, a batch still in flight goes again instead.
    fn deliver_mailbox(&mut self, now: Timestamp, peer: &PeerId, resend: bool) -> Result<(), RelayError> {
        let Some(state) = self.connected.get(peer).filter(|s| s.registered) else { return Ok(()) };
        let expired_before = now.as_millis().saturating_sub(self.config.mailbox_ttl_ms);
        // Expired but not yet swept: never delivered.
        let live = |e: &MailboxEntry| e.stored_at.as_millis() >= expired_before;
        let mut state = state.clone();
        let before = state.clone();
        let mut out = Vec::new();
        if !state.batch.is_empty() {
            if !resend {
                return Ok(());
            }
            // From just before the batch's first entry: expired entries
            // not yet swept may lie before it.
            let first = state.batch.first().copied().unwrap_or(1);
            let in_flight = self.store.mailbox_after(peer, first.saturating_sub(1), MAILBOX_BATCH)?;
            let held: BTreeSet<u64> = in_flight.iter().map(|e| e.id).collect();
            state.batch.retain(|id| held.contains(id)); // swept meanwhile
            out.extend(in_flight.into_iter().filter(|e| state.batch.contains(&e.id) && live(e)));
        }
        // The next batch; each pass moves past at least one entry, so
        // entries that expired unswept are skipped until one is live.
        while state.batch.is_empty() {
            let candidates = self.store.mailbox_after(peer, state.sent_up_to, MAILBOX_BATCH)?;
            if candidates.is_empty() {
                break;
            }
            let mut bytes = 0usize;
            for entry in candidates {
                if !state.batch.is_empty() && bytes.saturating_add(entry.envelope.len()) > MAILBOX_BATCH_BYTES {
                    break;
                }
                state.sent_up_to = entry.id;
                if live(&entry) {
                    bytes = bytes.saturating_add(entry.envelope.len());
                    state.batch.insert(entry.id);
                    out.push(entry);
                }
            }
        }
        if !out.is_empty() {
            state.batch_sent_at = Some(now);
        }
        if state.batch != before.batch || state.sent_up_to != before.sent_up_to || !out.is_empty() {
            self.staged.undo.push(Undo::Peer(*peer, before));
            self.connected.insert(*peer, state);
        }
        for entry in out {
            self.send(
                *peer,
                &RelayFrame::Deliver { from: entry.from, mailbox_id: Some(entry.id), envelope: entry.envelope },
            );
        }
        Ok(())
    }

    /// Refills and takes one token; false when the peer is over its rate.
    fn take_token(&mut self, now: Timestamp, peer: PeerId) -> bool {
        let capacity = self.config.rate_burst.saturating_mul(1000);
        if !self.buckets.contains_key(&peer) && self.buckets.len() >= BUCKET_PRUNE_AT {
            self.prune_buckets(now);
        }
        self.staged.undo.push(Undo::Bucket(peer, self.buckets.get(&peer).cloned()));
        let bucket = self.buckets.entry(peer).or_insert(Bucket { milli_tokens: capacity, at: now });
        let refill = now.millis_since(bucket.at).saturating_mul(self.config.rate_per_sec);
        bucket.milli_tokens = bucket.milli_tokens.saturating_add(refill).min(capacity);
        bucket.at = now.max(bucket.at);
        if bucket.milli_tokens < 1000 {
            return false;
        }
        bucket.milli_tokens -= 1000;
        true
    }

    /// Forgets the buckets that have refilled (as good as none) of peers
    /// with no connection: the rate state outlives a connection only while
    /// it still limits something.
    fn prune_buckets(&mut self, now: Timestamp) {
        let capacity = self.config.rate_burst.saturating_mul(1000);
        let rate = self.config.rate_per_sec;
        let full = |b: &Bucket| b.milli_tokens.saturating_add(now.millis_since(b.at).saturating_mul(rate)) >= capacity;
        let gone: Vec<PeerId> = self
            .buckets
            .iter()
            .filter(|(peer, bucket)| !self.connected.contains_key(peer) && full(bucket))
            .map(|(peer, _)| *peer)
            .collect();
        for peer in gone {
            let bucket = self.buckets.remove(&peer);
            self.staged.undo.push(Undo::Bucket(peer, bucket));
        }
    }
}

/// The most mailbox IDs one acknowledgement is taken to name.
pub const MAX_ACK_IDS: usize = 1_000;

/// How often records past their expiry are looked at for deletion (a
/// member's stays while its mailbox could hold anything).
pub const RECORD_SWEEP_INTERVAL_MS: u64 = 60 * 60 * 1000;

/// Mailbox entries sent before the node acknowledges them.
pub const MAILBOX_BATCH: usize = 64;

/// Envelope bytes sent before the node acknowledges them (a single larger
/// entry still goes alone).
pub const MAILBOX_BATCH_BYTES: usize = 1024 * 1024;

/// How soon `FetchMailbox` may have the batch in flight sent again.
pub const MAILBOX_RESEND_INTERVAL_MS: u64 = 10_000;

/// Rate buckets held before the refilled ones of disconnected peers are
/// forgotten.
const BUCKET_PRUNE_AT: usize = 4_096;
