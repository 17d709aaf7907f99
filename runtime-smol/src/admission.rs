//! How much other endpoints may hold open here at once: handshakes in
//! progress and connections, in all, per source address and per peer. Over
//! a limit, a dialler is refused (never left waiting) and what is already
//! open goes on being served.
//!
//! Identities cost nothing to make, so a per-peer limit alone would let one
//! host fill every slot with fresh identities: the per-address limits bound
//! what one host can take (an IPv6 host counts per /64, the block it is
//! usually given), and the totals bound the memory a crowd can make us hold
//! (see `docs/ARCHITECTURE.md` for the sums).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use p2pchat_protocol::PeerId;

/// The limits on incoming handshakes and connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IncomingLimits {
    /// Handshakes in progress, in all. More are refused before any TLS
    /// work, so a flood of diallers cannot buy our CPU; past half of it,
    /// diallers must first prove their address (a QUIC retry), so spoofed
    /// packets cannot fill it.
    pub handshakes: usize,
    /// Handshakes in progress from one IP address.
    pub handshakes_per_address: usize,
    /// Incoming connections held open, in all.
    pub connections: usize,
    /// Incoming connections held open from one IP address (a NAT may hide
    /// several genuine peers behind one).
    pub connections_per_address: usize,
    /// Incoming connections held open from one peer. A genuine peer holds
    /// one or two (a dial each way at the same moment), plus, until the
    /// 30 s idle timeout, those it left behind by restarting.
    pub connections_per_peer: usize,
}

impl IncomingLimits {
    /// A chat node's: it talks to its contacts and group members.
    pub const NODE: Self = Self {
        handshakes: 64,
        handshakes_per_address: 16,
        connections: 256,
        connections_per_address: 64,
        connections_per_peer: 16,
    };

    /// A relay's: every client behind NAT holds a connection to it, and a
    /// carrier's NAT may put many of them behind one address.
    pub const RELAY: Self = Self {
        handshakes: 256,
        handshakes_per_address: 32,
        connections: 1024,
        connections_per_address: 256,
        connections_per_peer: 16,
    };
}

/// Which limit a refused dialler met. Its text is the reason phrase the
/// dialler is given, and read back by [`Limit::from_reason`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Limit {
    /// Too many handshakes in progress.
    #[error("too many handshakes in progress")]
    Handshakes,
    /// Too many handshakes in progress from the dialler's address.
    #[error("too many handshakes in progress from this address")]
    HandshakesFromAddress,
    /// Too many connections held open.
    #[error("too many connections in all")]
    Connections,
    /// Too many connections held open from the dialler's address.
    #[error("too many connections from this address")]
    ConnectionsFromAddress,
    /// Too many connections held open from the dialling peer.
    #[error("too many connections from this peer")]
    ConnectionsFromPeer,
}

impl Limit {
    const ALL: [Limit; 5] = [
        Limit::Handshakes,
        Limit::HandshakesFromAddress,
        Limit::Connections,
        Limit::ConnectionsFromAddress,
        Limit::ConnectionsFromPeer,
    ];

    /// The limit a reason phrase names; `None` for any other text (the
    /// phrase comes from the other side, so nothing else of it is kept).
    pub fn from_reason(reason: &[u8]) -> Option<Limit> {
        Self::ALL.into_iter().find(|limit| limit.to_string().as_bytes() == reason)
    }
}

/// The address a dialler is counted under: IPv4 as it is, IPv6 by its /64.
fn counted_address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// The counts behind [`Admission`].
#[derive(Debug, Default)]
struct Counts {
    handshakes: usize,
    handshakes_by_address: BTreeMap<IpAddr, usize>,
    connections: usize,
    connections_by_address: BTreeMap<IpAddr, usize>,
    connections_by_peer: BTreeMap<PeerId, usize>,
}

/// Counts what is held open against the [`IncomingLimits`].
#[derive(Debug)]
pub(crate) struct Admission {
    limits: IncomingLimits,
    counts: Mutex<Counts>,
}

/// A handshake in progress; counted until dropped.
pub(crate) struct HandshakeTicket {
    admission: Arc<Admission>,
    address: IpAddr,
}

/// An incoming connection held open; counted until dropped.
pub(crate) struct Slot {
    admission: Arc<Admission>,
    address: IpAddr,
    peer: PeerId,
}

impl Admission {
    pub(crate) fn new(limits: IncomingLimits) -> Arc<Self> {
        Arc::new(Self { limits, counts: Mutex::default() })
    }

    /// The counts are plain numbers, consistent after every statement that
    /// changes them, so a panic elsewhere cannot leave them half-changed.
    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether so many handshakes are in progress that new diallers should
    /// prove their address first.
    pub(crate) fn under_pressure(&self) -> bool {
        self.counts().handshakes * 2 >= self.limits.handshakes
    }

    pub(crate) fn start_handshake(self: &Arc<Self>, ip: IpAddr) -> Result<HandshakeTicket, Limit> {
        let address = counted_address(ip);
        let mut counts = self.counts();
        let from_address = counts.handshakes_by_address.get(&address).copied().unwrap_or(0);
        if counts.handshakes >= self.limits.handshakes {
            return Err(Limit::Handshakes);
        }
        if from_address >= self.limits.handshakes_per_address {
            return Err(Limit::HandshakesFromAddress);
        }
        counts.handshakes += 1;
        counts.handshakes_by_address.insert(address, from_address + 1);
        Ok(HandshakeTicket { admission: self.clone(), address })
    }

    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr, peer: PeerId) -> Result<Slot, Limit> {
        let address = counted_address(ip);
        let mut counts = self.counts();
        let from_peer = counts.connections_by_peer.get(&peer).copied().unwrap_or(0);
        let from_address = counts.connections_by_address.get(&address).copied().unwrap_or(0);
        if from_peer >= self.limits.connections_per_peer {
            return Err(Limit::ConnectionsFromPeer);
        }
        if from_address >= self.limits.connections_per_address {
            return Err(Limit::ConnectionsFromAddress);
        }
        if counts.connections >= self.limits.connections {
            return Err(Limit::Connections);
        }
        counts.connections += 1;
        counts.connections_by_peer.insert(peer, from_peer + 1);
        counts.connections_by_address.insert(address, from_address + 1);
        Ok(Slot { admission: self.clone(), address, peer })
    }
}

/// Takes one from a count, dropping the entry at zero so the maps hold only
/// addresses and peers with something open.
fn release<K: Ord>(map: &mut BTreeMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        let mut counts = self.admission.counts();
        counts.handshakes = counts.handshakes.saturating_sub(1);
        release(&mut counts.handshakes_by_address, &self.address);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.admission.counts();
        counts.connections = counts.connections.saturating_sub(1);
        release(&mut counts.connections_by_address, &self.address);
        release(&mut counts.connections_by_peer, &self.peer);
    }
}

/// Refusals, logged at most once per [`RefusalLog::EVERY`] with a count of
/// those in between, so that a flood cannot fill the log.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    state: Mutex<(Option<Instant>, usize)>,
}

impl RefusalLog {
    const EVERY: Duration = Duration::from_secs(10);

    pub(crate) fn record(&self, from: SocketAddr, why: impl std::fmt::Display) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (last, unlogged) = &mut *state;
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < Self::EVERY) {
            *unlogged += 1;
            return;
        }
        if *unlogged > 0 {
            log::info!("refused a connection from {from}: {why} ({unlogged} more refused since the last line)");
        } else {
            log::info!("refused a connection from {from}: {why}");
        }
        *state = (Some(now), 0);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        p2pchat_protocol::IdentityKeyPair::from_seed(&p2pchat_protocol::keys::IdentitySeed::from_bytes([n; 32]))
            .peer_id()
    }

    fn address(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    const ROOMY: IncomingLimits = IncomingLimits {
        handshakes: 100,
        handshakes_per_address: 100,
        connections: 100,
        connections_per_address: 100,
        connections_per_peer: 100,
    };

    #[test]
    fn handshakes_are_held_to_their_limits_and_come_back_when_they_end() {
        let admission = Admission::new(IncomingLimits { handshakes: 3, handshakes_per_address: 2, ..ROOMY });
        let first = admission.start_handshake(address(1)).unwrap();
        let _second = admission.start_handshake(address(1)).unwrap();
        assert_eq!(admission.start_handshake(address(1)).err(), Some(Limit::HandshakesFromAddress));
        let _third = admission.start_handshake(address(2)).unwrap();
        assert!(admission.under_pressure());
        assert_eq!(admission.start_handshake(address(3)).err(), Some(Limit::Handshakes));
        drop(first);
        assert!(admission.start_handshake(address(1)).is_ok());
    }

    #[test]
    fn connections_are_held_to_each_limit_and_come_back_on_close() {
        let limits = IncomingLimits { connections: 4, connections_per_address: 3, connections_per_peer: 2, ..ROOMY };
        let admission = Admission::new(limits);
        let a1 = admission.admit(address(1), peer(1)).unwrap();
        let _a2 = admission.admit(address(1), peer(1)).unwrap();
        assert_eq!(admission.admit(address(2), peer(1)).err(), Some(Limit::ConnectionsFromPeer));
        let _b1 = admission.admit(address(1), peer(2)).unwrap();
        assert_eq!(admission.admit(address(1), peer(3)).err(), Some(Limit::ConnectionsFromAddress));
        let _c1 = admission.admit(address(2), peer(3)).unwrap();
        assert_eq!(admission.admit(address(3), peer(4)).err(), Some(Limit::Connections));
        drop(a1);
        let _d1 = admission.admit(address(3), peer(4)).unwrap();
        assert_eq!(admission.admit(address(4), peer(5)).err(), Some(Limit::Connections));
    }

    #[test]
    fn an_ipv6_host_counts_by_its_64_block() {
        let admission = Admission::new(IncomingLimits { connections_per_address: 1, ..ROOMY });
        let _first = admission.admit("2001:db8:1:2::1".parse().unwrap(), peer(1)).unwrap();
        let same_block = admission.admit("2001:db8:1:2:ffff::9".parse().unwrap(), peer(2));
        assert_eq!(same_block.err(), Some(Limit::ConnectionsFromAddress));
        assert!(admission.admit("2001:db8:1:3::1".parse().unwrap(), peer(3)).is_ok());
        let _v4 = admission.admit(address(9), peer(4)).unwrap();
        let mapped = admission.admit("::ffff:127.0.0.9".parse().unwrap(), peer(5));
        assert_eq!(mapped.err(), Some(Limit::ConnectionsFromAddress), "an IPv4-mapped address is its IPv4 one");
    }

    #[test]
    fn a_limit_is_read_back_from_its_reason_and_nothing_else_is() {
        for limit in Limit::ALL {
            assert_eq!(Limit::from_reason(limit.to_string().as_bytes()), Some(limit));
        }
        assert_eq!(Limit::from_reason(b"too many connections from this peer!"), None);
        assert_eq!(Limit::from_reason(b""), None);
    }

    #[test]
    fn refusals_are_not_all_logged() {
        let log = RefusalLog::default();
        let from = SocketAddr::from(([127, 0, 0, 1], 1));
        for _ in 0..5 {
            log.record(from, Limit::Connections);
        }
        let (last, unlogged) = *log.state.lock().unwrap();
        assert!(last.is_some());
        assert_eq!(unlogged, 4, "one line, four counted for the next");
    }
}
