//! What the node knows about reaching each peer directly, and the routing
//! table: the one place that decides which path a transmit takes.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::engine::Transmit;
use crate::ids::PeerId;
use crate::time::Timestamp;

/// How long a direct dial may take before the transmits waiting for it go
/// through a relay instead. Short, unlike the engine's 10 s delivery
/// budget: a peer that does not answer a handshake within 2 s is better
/// reached through a relay, whose mailbox also covers a peer that left.
pub const DIRECT_DIAL_BUDGET_MS: u64 = 2_000;
/// How long an address whose dial failed is left alone (transmits go
/// through a relay meanwhile); it doubles with each failure in a row up to
/// [`DIRECT_RETRY_MAX_MS`], so an address behind a NAT that drops what it
/// did not ask for costs a dial budget once an hour, not once a minute.
pub const DIRECT_RETRY_AFTER_MS: u64 = 60_000;
/// The longest an address whose dials keep failing is left alone.
pub const DIRECT_RETRY_MAX_MS: u64 = 60 * 60_000;
/// The most transmits waiting for one peer's dial; more go through a relay.
pub const MAX_WAITING_FOR_DIAL: usize = 64;
/// The most peers whose path the node remembers; the least recently used
/// idle one (no connection, no dial, no address the user gave) is
/// forgotten for a newcomer. Finding it scans the table: bounded, and paid
/// only when a new peer arrives at a full table.
pub const MAX_PATHS: usize = 10_000;
/// How often, at most, the node asks a relay for the record of a peer it
/// reaches only through relays (to learn a direct address).
pub const LOOKUP_INTERVAL_MS: u64 = 60_000;

/// Where a peer's direct address came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressSource {
    /// The driver or the user gave it.
    Given,
    /// The peer's signed record, from the relay with this index (none: the
    /// user or driver handed the record in).
    Record {
        /// The relay's index in the node's list of relays.
        relay: Option<usize>,
    },
}

/// Where the newest record of a peer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordSource {
    /// A relay's answer to a lookup: the relay's index in the node's list.
    Relay(usize),
    /// Handed in by the user or driver ([`super::NodeInput::PeerRecord`]).
    HandedIn,
    /// Kept in the store from before the node started.
    Kept,
}

/// The newest record seen of a peer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RecordSeen {
    pub(crate) sequence: u64,
    pub(crate) expires_at: Timestamp,
    pub(crate) source: RecordSource,
}

impl RecordSeen {
    /// Whether a record with `sequence` and `expires_at` replaces this one:
    /// a newer one does; an older one only once this one has expired (as
    /// the relay rules, PROTOCOL.md §7a), so a peer whose clock was ahead
    /// when it signed is not shut out for as long as its record is kept.
    pub(crate) fn replaced_by(&self, sequence: u64, now: Timestamp) -> bool {
        sequence >= self.sequence || self.expires_at <= now
    }
}

/// How a peer is reached now, as the API shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathState {
    /// A direct connection is open.
    Direct,
    /// A dial is under way.
    Dialling,
    /// The direct address failed; relays are used until then.
    DirectFailedUntil(Timestamp),
    /// The last transmit went through the relay with this index.
    RelayedVia(usize),
    /// Nothing tried yet.
    Unknown,
}

/// One peer's path, as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerPath {
    /// The peer.
    pub peer: PeerId,
    /// Its direct address, if known.
    pub address: Option<SocketAddr>,
    /// Where the address came from.
    pub source: Option<AddressSource>,
    /// How it is reached now.
    pub state: PathState,
    /// Why the last direct attempt failed.
    pub last_failure: Option<String>,
    /// Where its newest record came from, if one was seen.
    pub record: Option<RecordSource>,
}

/// A dial under way and the transmits that wait for it.
#[derive(Debug)]
pub(crate) struct Dial {
    pub(crate) deadline: Timestamp,
    pub(crate) waiting: Vec<Transmit>,
}

#[derive(Debug)]
pub(crate) struct Path {
    pub(crate) connected: bool,
    pub(crate) address: Option<SocketAddr>,
    pub(crate) source: Option<AddressSource>,
    pub(crate) failed_until: Option<Timestamp>,
    /// Dials of the address that failed in a row.
    pub(crate) failures: u32,
    pub(crate) last_failure: Option<String>,
    pub(crate) dial: Option<Dial>,
    pub(crate) relayed_via: Option<usize>,
    pub(crate) last_lookup: Option<Timestamp>,
    pub(crate) last_used: Timestamp,
    /// The relays its newest record lists (those this node may dial), kept
    /// after the record expires: the peer is most likely still there.
    pub(crate) relays: Vec<super::RelaySpec>,
    /// The newest record seen.
    pub(crate) record: Option<RecordSeen>,
}

impl Path {
    fn new(now: Timestamp) -> Self {
        Self {
            connected: false,
            address: None,
            source: None,
            failed_until: None,
            failures: 0,
            last_failure: None,
            dial: None,
            relayed_via: None,
            last_lookup: None,
            last_used: now,
            relays: Vec::new(),
            record: None,
        }
    }

    /// Whether it may be forgotten for a newcomer: nothing under way, and
    /// no address the user gave.
    fn idle(&self) -> bool {
        !self.connected && self.dial.is_none() && self.source != Some(AddressSource::Given)
    }

    fn state(&self, now: Timestamp) -> PathState {
        if self.connected {
            PathState::Direct
        } else if self.dial.is_some() {
            PathState::Dialling
        } else if let Some(until) = self.failed_until.filter(|u| *u > now) {
            PathState::DirectFailedUntil(until)
        } else if let Some(relay) = self.relayed_via {
            PathState::RelayedVia(relay)
        } else {
            PathState::Unknown
        }
    }
}

/// The path a transmit takes: the routing table of `docs/ARCHITECTURE.md`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// On the open direct connection.
    Direct,
    /// Dial this address first; the transmit waits up to
    /// [`DIRECT_DIAL_BUDGET_MS`].
    Dial(SocketAddr),
    /// Wait for the dial under way.
    WaitForDial,
    /// Through a relay: forwarded if the peer is connected to it, else held
    /// in its mailbox if the transmit allows that.
    Relay,
}

/// Every peer's path.
#[derive(Debug, Default)]
pub(crate) struct Paths {
    peers: BTreeMap<PeerId, Path>,
}

impl Paths {
    /// Chooses the path for a transmit to `peer`. The rows, in order:
    /// a direct connection is open → direct; a dial is under way and has
    /// room → wait for it; a known address that has not failed recently →
    /// dial it; otherwise → a relay.
    pub(crate) fn route(&self, peer: &PeerId, now: Timestamp) -> Route {
        let Some(path) = self.peers.get(peer) else { return Route::Relay };
        if path.connected {
            return Route::Direct;
        }
        if let Some(dial) = &path.dial {
            return if dial.waiting.len() < MAX_WAITING_FOR_DIAL { Route::WaitForDial } else { Route::Relay };
        }
        match path.address {
            Some(addr) if path.failed_until.is_none_or(|until| until <= now) => Route::Dial(addr),
            _ => Route::Relay,
        }
    }

    pub(crate) fn get(&self, peer: &PeerId) -> Option<&Path> {
        self.peers.get(peer)
    }

    pub(crate) fn get_mut(&mut self, peer: &PeerId) -> Option<&mut Path> {
        self.peers.get_mut(peer)
    }

    /// The peer's path, made if new (forgetting the least recently used
    /// idle one when full).
    pub(crate) fn entry(&mut self, peer: PeerId, now: Timestamp) -> &mut Path {
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_PATHS {
            let oldest = self.peers.iter().filter(|(_, p)| p.idle()).min_by_key(|(_, p)| p.last_used).map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                self.peers.remove(&oldest);
            }
        }
        let path = self.peers.entry(peer).or_insert_with(|| Path::new(now));
        path.last_used = now;
        path
    }

    /// The earliest dial deadline.
    pub(crate) fn next_deadline(&self) -> Option<Timestamp> {
        self.peers.values().filter_map(|p| p.dial.as_ref().map(|d| d.deadline)).min()
    }

    /// Peers whose dial is past its budget.
    pub(crate) fn overdue(&self, now: Timestamp) -> Vec<PeerId> {
        self.peers.iter().filter(|(_, p)| p.dial.as_ref().is_some_and(|d| d.deadline <= now)).map(|(k, _)| *k).collect()
    }

    pub(crate) fn view(&self, now: Timestamp) -> Vec<PeerPath> {
        self.peers
            .iter()
            .map(|(peer, p)| PeerPath {
                peer: *peer,
                address: p.address,
                source: p.source,
                state: p.state(now),
                last_failure: p.last_failure.clone(),
                record: p.record.map(|r| r.source),
            })
            .collect()
    }
}
