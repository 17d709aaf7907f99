//! The direct sends under way to each peer, bounded per peer, and the
//! transmits waiting for room. A driver does each send as a task of its own
//! that holds the bytes until the peer's transport acknowledges them, so
//! without a window a peer that reads slowly would make the driver hold
//! everything the engine released for it at once (up to its whole outbox).

use std::collections::{BTreeMap, VecDeque};

use crate::engine::{Transmit, TransmitId};
use crate::ids::PeerId;

/// The most direct sends under way to one peer. A send completes when the
/// peer's QUIC stack acknowledges it, which it may delay by up to 25 ms; to
/// keep thousands of small messages a second moving, that many must be
/// under way at once.
pub const MAX_DIRECT_SENDS_PER_PEER: usize = 256;
/// The most bytes of direct sends under way to one peer (one send is
/// always allowed, however large): what bounds the driver's memory for
/// large messages.
pub const MAX_DIRECT_BYTES_PER_PEER: usize = 4 * 1024 * 1024;
/// The most bytes waiting for room in one peer's window; more go through
/// a relay instead.
pub const MAX_DIRECT_WAITING_BYTES_PER_PEER: usize = 4 * 1024 * 1024;

/// What became of a transmit offered to its peer's window.
#[derive(Debug)]
pub(crate) enum Admitted {
    /// Under way: these bytes go to the driver.
    Started(Vec<u8>),
    /// Waiting for room.
    Waiting,
    /// Neither: too much waits already; it must take another path.
    Full(Transmit),
}

/// One peer's sends under way and those waiting.
#[derive(Debug, Default)]
struct Window {
    sending: usize,
    bytes: usize,
    waiting: VecDeque<Transmit>,
    waiting_bytes: usize,
}

impl Window {
    fn has_room_for(&self, len: usize) -> bool {
        self.sending == 0
            || (self.sending < MAX_DIRECT_SENDS_PER_PEER && self.bytes.saturating_add(len) <= MAX_DIRECT_BYTES_PER_PEER)
    }
}

/// Every peer's window, and the sends under way (kept for the relay
/// fallback should one fail).
#[derive(Debug, Default)]
pub(crate) struct DirectWindows {
    peers: BTreeMap<PeerId, Window>,
    in_flight: BTreeMap<TransmitId, Transmit>,
}

impl DirectWindows {
    /// Starts `transmit` if its peer's window has room and nothing waits
    /// before it; else it waits, unless too much waits already. A key
    /// exchange message (the one kind that may not wait in a mailbox) goes
    /// at once: it is small, and must not time out behind a backlog.
    pub(crate) fn admit(&mut self, transmit: Transmit) -> Admitted {
        let window = self.peers.entry(transmit.peer).or_default();
        let len = transmit.bytes.len();
        let urgent = !transmit.mailbox_allowed;
        if urgent || (window.waiting.is_empty() && window.has_room_for(len)) {
            return Admitted::Started(self.start(transmit));
        }
        if window.waiting_bytes.saturating_add(len) > MAX_DIRECT_WAITING_BYTES_PER_PEER {
            return Admitted::Full(transmit);
        }
        window.waiting_bytes += len;
        window.waiting.push_back(transmit);
        Admitted::Waiting
    }

    /// The next waiting transmit to `peer` that fits now, started: its
    /// bytes to send, with its ID.
    pub(crate) fn start_next(&mut self, peer: &PeerId) -> Option<(TransmitId, Vec<u8>)> {
        let window = self.peers.get_mut(peer)?;
        let len = window.waiting.front()?.bytes.len();
        if !window.has_room_for(len) {
            return None;
        }
        let transmit = window.waiting.pop_front()?;
        window.waiting_bytes = window.waiting_bytes.saturating_sub(len);
        let id = transmit.id;
        Some((id, self.start(transmit)))
    }

    fn start(&mut self, transmit: Transmit) -> Vec<u8> {
        let window = self.peers.entry(transmit.peer).or_default();
        window.sending += 1;
        window.bytes = window.bytes.saturating_add(transmit.bytes.len());
        let bytes = transmit.bytes.clone();
        self.in_flight.insert(transmit.id, transmit);
        bytes
    }

    /// A send's result came: its transmit, its room freed.
    pub(crate) fn finish(&mut self, id: TransmitId) -> Option<Transmit> {
        let transmit = self.in_flight.remove(&id)?;
        if let Some(window) = self.peers.get_mut(&transmit.peer) {
            window.sending = window.sending.saturating_sub(1);
            window.bytes = window.bytes.saturating_sub(transmit.bytes.len());
            if window.sending == 0 && window.waiting.is_empty() {
                self.peers.remove(&transmit.peer);
            }
        }
        Some(transmit)
    }

    /// Every transmit waiting for `peer` (its connection closed: they take
    /// another path).
    pub(crate) fn take_waiting(&mut self, peer: &PeerId) -> Vec<Transmit> {
        let Some(window) = self.peers.get_mut(peer) else { return Vec::new() };
        window.waiting_bytes = 0;
        let waiting = core::mem::take(&mut window.waiting).into();
        if window.sending == 0 {
            self.peers.remove(peer);
        }
        waiting
    }

    /// Sends under way to `peer`.
    #[cfg(test)]
    pub(crate) fn sending(&self, peer: &PeerId) -> usize {
        self.peers.get(peer).map_or(0, |w| w.sending)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn transmit(id: u64, peer: u8, len: usize) -> Transmit {
        Transmit { id: TransmitId(id), peer: PeerId([peer; 20]), bytes: vec![0; len], mailbox_allowed: true }
    }

    fn started(admitted: Admitted) -> bool {
        matches!(admitted, Admitted::Started(_))
    }

    fn waiting(admitted: Admitted) -> bool {
        matches!(admitted, Admitted::Waiting)
    }

    #[test]
    fn a_peers_window_holds_back_what_exceeds_it_in_order_and_others_are_not_held() {
        let mut windows = DirectWindows::default();
        let a = PeerId([1; 20]);
        for id in 0..MAX_DIRECT_SENDS_PER_PEER as u64 {
            assert!(started(windows.admit(transmit(id, 1, 10))));
        }
        assert!(waiting(windows.admit(transmit(100, 1, 10))), "the window is full");
        assert!(waiting(windows.admit(transmit(101, 1, 10))));
        assert!(started(windows.admit(transmit(200, 2, 10))), "another peer has a window of its own");
        let key_exchange = Transmit { mailbox_allowed: false, ..transmit(300, 1, 10) };
        assert!(started(windows.admit(key_exchange)), "a key exchange message does not wait");
        windows.finish(TransmitId(300));
        assert_eq!(windows.start_next(&a), None, "nothing fits until a send finishes");
        assert_eq!(windows.finish(TransmitId(0)).map(|t| t.id), Some(TransmitId(0)));
        assert_eq!(windows.start_next(&a).map(|(id, _)| id), Some(TransmitId(100)), "oldest first");
        assert_eq!(windows.start_next(&a), None);
        assert!(waiting(windows.admit(transmit(102, 1, 10))), "nothing overtakes what waits");
        let waiting: Vec<TransmitId> = windows.take_waiting(&a).iter().map(|t| t.id).collect();
        assert_eq!(waiting, [TransmitId(101), TransmitId(102)]);
        assert_eq!(windows.sending(&a), MAX_DIRECT_SENDS_PER_PEER);
    }

    #[test]
    fn a_peers_window_is_bounded_by_bytes_but_one_send_always_goes() {
        let mut windows = DirectWindows::default();
        let a = PeerId([1; 20]);
        assert!(started(windows.admit(transmit(1, 1, MAX_DIRECT_BYTES_PER_PEER + 1))), "one always goes");
        assert!(waiting(windows.admit(transmit(2, 1, 1))));
        windows.finish(TransmitId(1));
        assert!(windows.start_next(&a).is_some());
        assert!(waiting(windows.admit(transmit(3, 1, MAX_DIRECT_BYTES_PER_PEER))), "over the bytes");
        let over = transmit(4, 1, MAX_DIRECT_WAITING_BYTES_PER_PEER);
        assert!(matches!(windows.admit(over), Admitted::Full(t) if t.id == TransmitId(4)), "too much waits");
        windows.finish(TransmitId(2));
        assert_eq!(windows.start_next(&a).map(|(id, _)| id), Some(TransmitId(3)));
        windows.finish(TransmitId(3));
        assert!(windows.peers.is_empty(), "an idle peer's window is forgotten");
    }
}
