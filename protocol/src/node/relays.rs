//! The node's connections to its relays: each one's state, its client,
//! and reconnection with backoff.

use crate::ids::PeerId;
use crate::relay::RelayClient;
use crate::time::Timestamp;

/// The first wait before reconnecting to a relay that failed.
pub const RELAY_BACKOFF_MIN_MS: u64 = 1_000;
/// The longest wait between reconnection attempts.
pub const RELAY_BACKOFF_MAX_MS: u64 = 30_000;
/// How long a connection must have lasted for its end to reset the
/// backoff: a relay that accepts connections and closes them at once
/// (refusing us, or crashing in a loop) is not reconnected to every second.
pub const RELAY_STABLE_MS: u64 = 10_000;

/// A relay the node keeps a connection to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelaySpec {
    /// The relay's peer ID, which its connection must prove.
    pub peer: PeerId,
    /// How others reach it, as listed in this node's record
    /// (`PEER_ID@HOST:PORT`).
    pub address: String,
}

impl RelaySpec {
    /// A relay address as records list it, `PEER_ID@HOST:PORT`, if it
    /// parses and `policy` lets the node dial it (a record's relays are
    /// its peer's word, like its direct addresses).
    pub fn parse(address: &str, policy: crate::address::AddressPolicy) -> Option<Self> {
        let (peer, addr) = address.split_once('@')?;
        let peer: PeerId = peer.parse().ok()?;
        let addr: std::net::SocketAddr = addr.parse().ok()?;
        policy.permits(&addr).then(|| Self { peer, address: address.to_owned() })
    }
}

/// One relay's connection, as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayStatus {
    /// The relay.
    pub relay: RelaySpec,
    /// Connected to it now (registration follows at once).
    pub connected: bool,
    /// Since when it is connected, or since when it is not.
    pub since: Timestamp,
    /// Why the last connection failed or closed.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkState {
    /// Not connected; the next attempt is due then.
    Down { retry_at: Timestamp },
    /// The driver is connecting.
    Connecting,
    /// Connected (its first frames register and publish).
    Up,
    /// The node asked the driver to close the connection, and waits to
    /// hear it closed before connecting again.
    Closing,
}

#[derive(Debug)]
pub(crate) struct RelayLink {
    pub(crate) spec: RelaySpec,
    pub(crate) state: LinkState,
    pub(crate) client: RelayClient,
    backoff_ms: u64,
    since: Timestamp,
    last_error: Option<String>,
    /// While connected, when this node's record is published again (before
    /// the one the relay holds expires).
    pub(crate) republish_at: Option<Timestamp>,
    /// A relay of someone else's, connected to only to reach its members:
    /// never registered with, connected when needed, not kept up.
    pub(crate) visiting: bool,
    /// Forwards waiting for this link to connect, with the relays each has
    /// tried.
    pub(crate) waiting: Vec<(crate::engine::Transmit, Vec<PeerId>)>,
    /// When a forward last went through it.
    pub(crate) last_used: Timestamp,
    /// The address this node's connection came from, as the relay last
    /// said it saw it.
    pub(crate) observed: Option<std::net::SocketAddr>,
    /// Whether the relay has said so on the current connection: it is
    /// heard once per connection, so a relay cannot make the node sign
    /// and publish records without end.
    pub(crate) observed_heard: bool,
    /// Whether the node registered again on the current connection, after
    /// the relay said it had lost the registration.
    pub(crate) reregistered: bool,
}

impl RelayLink {
    pub(crate) fn new(spec: RelaySpec, now: Timestamp) -> Self {
        Self {
            spec,
            state: LinkState::Down { retry_at: now },
            client: RelayClient::new(),
            backoff_ms: RELAY_BACKOFF_MIN_MS,
            since: now,
            last_error: None,
            republish_at: None,
            visiting: false,
            waiting: Vec::new(),
            last_used: now,
            observed: None,
            observed_heard: false,
            reregistered: false,
        }
    }

    /// A link to a peer's relay, connecting now.
    pub(crate) fn visiting(spec: RelaySpec, now: Timestamp) -> Self {
        Self { state: LinkState::Connecting, visiting: true, ..Self::new(spec, now) }
    }

    pub(crate) fn is_up(&self) -> bool {
        self.state == LinkState::Up
    }

    pub(crate) fn is_connecting(&self) -> bool {
        self.state == LinkState::Connecting
    }

    /// A visiting link not in use, free for another relay.
    pub(crate) fn reusable(&self) -> bool {
        self.visiting && matches!(self.state, LinkState::Down { .. }) && self.waiting.is_empty()
    }

    pub(crate) fn connected(&mut self, now: Timestamp) {
        self.state = LinkState::Up;
        self.observed_heard = false;
        self.reregistered = false;
        self.since = now;
        self.last_error = None;
    }

    /// The connection failed or closed: try again after the backoff, which
    /// doubles up to [`RELAY_BACKOFF_MAX_MS`], and starts again from
    /// [`RELAY_BACKOFF_MIN_MS`] after a connection that lasted
    /// [`RELAY_STABLE_MS`].
    pub(crate) fn disconnected(&mut self, now: Timestamp, reason: String) {
        let was_closing = self.state == LinkState::Closing;
        if matches!(self.state, LinkState::Up | LinkState::Closing) {
            if now.millis_since(self.since) >= RELAY_STABLE_MS {
                self.backoff_ms = RELAY_BACKOFF_MIN_MS;
            }
            self.since = now;
        }
        self.state = LinkState::Down { retry_at: now.saturating_add_millis(self.backoff_ms) };
        self.republish_at = None;
        self.backoff_ms = (self.backoff_ms * 2).min(RELAY_BACKOFF_MAX_MS);
        // Why the node closed it says more than the transport's close.
        if !was_closing {
            self.last_error = Some(reason);
        }
    }

    /// The node gave up on the connection: it is closing.
    pub(crate) fn closing(&mut self, why: &str) {
        self.state = LinkState::Closing;
        self.republish_at = None;
        self.last_error = Some(why.into());
    }

    /// A visiting link's relay may be dialled again (its backoff is over).
    pub(crate) fn retry_due(&self, now: Timestamp) -> bool {
        matches!(self.state, LinkState::Down { retry_at } if retry_at <= now)
    }

    /// For a visiting link that is up with nothing under way, when it
    /// becomes idle long enough to close.
    pub(crate) fn idle_visit_until(&self) -> Option<Timestamp> {
        let idle = self.visiting && self.is_up() && self.waiting.is_empty() && self.client.next_deadline().is_none();
        idle.then(|| self.last_used.saturating_add_millis(super::VISIT_IDLE_MS))
    }

    /// Whether an attempt is due; if so, it is under way from now.
    pub(crate) fn start_if_due(&mut self, now: Timestamp) -> bool {
        match self.state {
            LinkState::Down { retry_at } if retry_at <= now && !self.visiting => {
                self.state = LinkState::Connecting;
                true
            }
            _ => false,
        }
    }

    /// When this link needs the node next: a reconnection attempt, or the
    /// oldest request its relay has not answered.
    pub(crate) fn next_deadline(&self) -> Option<Timestamp> {
        match self.state {
            LinkState::Down { .. } if self.visiting => None,
            LinkState::Down { retry_at } => Some(retry_at),
            LinkState::Connecting | LinkState::Closing => None,
            LinkState::Up => {
                [self.client.next_deadline(), self.republish_at, self.idle_visit_until()].into_iter().flatten().min()
            }
        }
    }

    pub(crate) fn status(&self) -> RelayStatus {
        RelayStatus {
            relay: self.spec.clone(),
            connected: self.is_up(),
            since: self.since,
            last_error: self.last_error.clone(),
        }
    }
}
