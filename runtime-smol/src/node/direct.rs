//! Direct connections to peers: the open connections to each peer, one dial
//! at a time per peer, and sending a transmit within its deadline.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use p2pchat_protocol::engine::{Input, Transmit, TransmitOutcome};
use p2pchat_protocol::PeerId;

use super::NodeHandle;
use crate::admission::Limit;
use crate::transport::{by, PeerConnection, Transport};

/// How long a frame may take to be acknowledged (dial included) before the
/// transmit fails; a connection on which nothing was acknowledged that
/// whole time is given up (the peer may have gone without closing it).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a peer that refused our connection over one of its limits is
/// not dialled again: its refusal is an answer, and dialling at once would
/// only cost both sides another handshake.
const REFUSED_BACKOFF: Duration = Duration::from_secs(10);

/// Why a transmit could not be sent directly; its text becomes the
/// message's failure reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum DeliveryError {
    /// The directory has no address for the peer.
    #[error("no path to the peer")]
    NoPath,
    /// The dial failed.
    #[error("cannot reach the peer: {0}")]
    Unreachable(String),
    /// The peer refused our connection over one of its limits.
    #[error("the peer refused our connection ({0}); not dialling it again for {secs} s", secs = REFUSED_BACKOFF.as_secs())]
    Refused(Limit),
    /// The dial did not finish in time.
    #[error("could not connect to the peer within {} s", SEND_TIMEOUT.as_secs())]
    ConnectTimeout,
    /// The frame could not be sent.
    #[error("sending failed: {0}")]
    Send(String),
    /// The frame was not acknowledged in time.
    #[error("no answer from the peer within {} s", SEND_TIMEOUT.as_secs())]
    NoAnswer,
}

/// Which side dialled a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Direction {
    /// This node dialled.
    Outgoing,
    /// The peer dialled.
    Incoming,
}

/// The last dial to a peer that failed, and when: transmits that waited
/// for that dial share its answer instead of dialling again one by one.
type LastFailure = Option<(Instant, DeliveryError)>;

/// Every peer's open connections, and the dials in progress.
#[derive(Debug, Default)]
pub(super) struct DirectPeers {
    /// Oldest first; frames go out on the newest. A peer usually has one;
    /// two when both sides dialled at once (both are kept, as neither side
    /// can tell which one the other would drop).
    connections: Mutex<BTreeMap<PeerId, Vec<PeerConnection>>>,
    /// One dial at a time to each peer: a burst of transmits to a peer with
    /// no connection waits for a single dial instead of opening one each.
    gates: Mutex<BTreeMap<PeerId, Arc<smol::lock::Mutex<LastFailure>>>>,
    /// Peers that refused our connection, with when we may dial again and
    /// the limit they named.
    refused: Mutex<BTreeMap<PeerId, (Instant, Limit)>>,
}

/// Our use of a dial gate; the gate goes when nobody else holds it (a dial
/// still running holds it too, and leaves it for the next use to remove).
struct GateUse<'a> {
    direct: &'a DirectPeers,
    peer: PeerId,
    gate: Arc<smol::lock::Mutex<LastFailure>>,
}

impl Drop for GateUse<'_> {
    fn drop(&mut self) {
        let mut gates = lock(&self.direct.gates);
        // Clones are made under this lock: two holders are the map and us.
        if Arc::strong_count(&self.gate) == 2 {
            gates.remove(&self.peer);
        }
    }
}

/// The maps hold plain values, complete after every statement that changes
/// them, so a panic elsewhere leaves nothing half-done behind a poisoned
/// lock.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl DirectPeers {
    /// Whether `peer` has an open connection.
    pub(super) fn connected(&self, peer: &PeerId) -> bool {
        self.open_connections(peer) > 0
    }

    /// How many open connections `peer` has, either way.
    pub(super) fn open_connections(&self, peer: &PeerId) -> usize {
        lock(&self.connections).get(peer).map_or(0, |conns| conns.iter().filter(|c| !c.is_closed()).count())
    }

    /// Every peer with a connection (open or not yet forgotten).
    pub(super) fn peers(&self) -> Vec<PeerId> {
        lock(&self.connections).keys().copied().collect()
    }

    /// The newest open connection to `peer`.
    fn open_connection(&self, peer: &PeerId) -> Option<PeerConnection> {
        lock(&self.connections).get(peer)?.iter().rev().find(|c| !c.is_closed()).cloned()
    }

    /// A new connection: remember it, and read its frames (each in its own
    /// task). The engine hears the peer is reachable when the peer dialled
    /// (it may have restarted, and be worth retrying at once) or, for our
    /// own dial, once a frame on it was acknowledged (see
    /// [`DirectPeers::deliver`]): a connection the peer then refuses is no
    /// sign of life. It hears the peer is unreachable when its last
    /// connection closes.
    pub(super) fn adopt(self: &Arc<Self>, conn: PeerConnection, direction: Direction, node: &NodeHandle) {
        let peer = conn.peer();
        lock(&self.connections).entry(peer).or_default().push(conn.clone());
        if direction == Direction::Incoming {
            node.input(Input::PeerReachable(peer));
        }
        let (direct, node) = (self.clone(), node.clone());
        smol::spawn(async move {
            loop {
                match conn.accept_frame().await {
                    Ok(frame) => {
                        let node = node.clone();
                        smol::spawn(async move {
                            match frame.await {
                                Ok(bytes) => node.input(Input::Received { from: peer, bytes }),
                                Err(e) => log::info!("a frame from {peer} failed: {e}"),
                            }
                        })
                        .detach();
                    }
                    Err(e) => {
                        log::info!("a connection to {peer} closed: {e}");
                        if direction == Direction::Outgoing {
                            direct.note_refusal(&conn);
                        }
                        if direct.forget(&conn) {
                            node.input(Input::PeerUnreachable(peer));
                        }
                        return;
                    }
                }
            }
        })
        .detach();
    }

    /// Remembers that the peer refused `conn` (one we dialled), if it did.
    fn note_refusal(&self, conn: &PeerConnection) {
        if let Some(limit) = conn.refusal() {
            let now = Instant::now();
            let mut refused = lock(&self.refused);
            refused.retain(|_, (until, _)| *until > now);
            refused.insert(conn.peer(), (now + REFUSED_BACKOFF, limit));
        }
    }

    /// Forgets a closed connection (and any others found closed); true if
    /// none to its peer is left.
    fn forget(&self, conn: &PeerConnection) -> bool {
        let peer = conn.peer();
        let mut map = lock(&self.connections);
        let left = map.get_mut(&peer).map_or(0, |conns| {
            conns.retain(|c| c.id() != conn.id() && !c.is_closed());
            conns.len()
        });
        if left == 0 {
            map.remove(&peer);
        }
        left == 0
    }

    /// The limit `peer` refused us over, while we leave it alone. A refusal
    /// is looked for on the peer's closed connections too, as their readers
    /// may not have got to it yet.
    fn refused_by(&self, peer: &PeerId) -> Option<DeliveryError> {
        let closed: Vec<PeerConnection> = lock(&self.connections)
            .get(peer)
            .map(|conns| conns.iter().filter(|c| c.is_closed()).cloned().collect())
            .unwrap_or_default();
        for conn in &closed {
            self.note_refusal(conn);
        }
        let refused = lock(&self.refused);
        let (until, limit) = refused.get(peer)?;
        (Instant::now() < *until).then_some(DeliveryError::Refused(*limit))
    }

    fn gate(&self, peer: PeerId) -> GateUse<'_> {
        let gate = lock(&self.gates).entry(peer).or_default().clone();
        GateUse { direct: self, peer, gate }
    }

    /// An open connection to `peer`, dialling one if there is none; true
    /// with it if this call dialled it.
    async fn connect(
        self: &Arc<Self>,
        transport: &Arc<Transport>,
        node: &NodeHandle,
        peer: PeerId,
    ) -> Result<(PeerConnection, bool), DeliveryError> {
        if let Some(conn) = self.open_connection(&peer) {
            return Ok((conn, false));
        }
        if let Some(refusal) = self.refused_by(&peer) {
            return Err(refusal);
        }
        let asked = Instant::now();
        let gate = self.gate(peer);
        let mut last_failure = gate.gate.lock_arc().await;
        if let Some(conn) = self.open_connection(&peer) {
            return Ok((conn, false));
        }
        if let Some((at, why)) = last_failure.as_ref() {
            if *at >= asked {
                return Err(why.clone());
            }
        }
        if let Some(refusal) = self.refused_by(&peer) {
            return Err(refusal);
        }
        let Some(addr) = node.directory.get(&peer) else {
            *last_failure = Some((Instant::now(), DeliveryError::NoPath));
            return Err(DeliveryError::NoPath);
        };
        // The dial runs on its own, to its own deadline, holding the gate:
        // a transmit that stops waiting does not cancel it, and those queued
        // behind it get its outcome.
        let (tx, rx) = smol::channel::bounded(1);
        let (direct, transport, node) = (self.clone(), transport.clone(), node.clone());
        smol::spawn(async move {
            let dialled = match by(Instant::now() + SEND_TIMEOUT, transport.dial(addr, peer)).await {
                Some(Ok(conn)) => {
                    direct.adopt(conn.clone(), Direction::Outgoing, &node);
                    Ok(conn)
                }
                Some(Err(e)) => Err(DeliveryError::Unreachable(e.to_string())),
                None => Err(DeliveryError::ConnectTimeout),
            };
            *last_failure = dialled.as_ref().err().map(|why| (Instant::now(), why.clone()));
            drop(last_failure);
            let _ = tx.try_send(dialled);
        })
        .detach();
        match rx.recv().await {
            Ok(dialled) => dialled.map(|conn| (conn, true)),
            Err(_) => Err(DeliveryError::ConnectTimeout),
        }
    }

    /// Sends a transmit directly, dialling if needed. Within
    /// [`SEND_TIMEOUT`] every transmit gets its result, and the engine's
    /// retries do the rest. A connection slow but moving (frames queued
    /// behind flow control are acknowledged one by one) is kept; one on
    /// which nothing was acknowledged the whole time is closed.
    pub(super) async fn deliver(
        self: &Arc<Self>,
        transport: &Arc<Transport>,
        node: &NodeHandle,
        transmit: &Transmit,
    ) -> TransmitOutcome {
        let started = Instant::now();
        let deadline = started + SEND_TIMEOUT;
        let (conn, dialled) = match by(deadline, self.connect(transport, node, transmit.peer)).await {
            Some(Ok(connected)) => connected,
            Some(Err(why)) => return TransmitOutcome::Failed(why.to_string()),
            None => return TransmitOutcome::Failed(DeliveryError::ConnectTimeout.to_string()),
        };
        match by(deadline, conn.send(&transmit.bytes)).await {
            Some(Ok(())) => {
                if dialled {
                    // The peer took a frame on our new connection: it is
                    // back, and whatever waits for it may go now.
                    node.input(Input::PeerReachable(transmit.peer));
                }
                TransmitOutcome::Delivered
            }
            // A closed connection is forgotten by its reader; a refused
            // frame leaves the connection as good as it was.
            Some(Err(e)) => match conn.refusal() {
                Some(limit) => TransmitOutcome::Failed(DeliveryError::Refused(limit).to_string()),
                None => TransmitOutcome::Failed(DeliveryError::Send(e.to_string()).to_string()),
            },
            None => {
                if !conn.acknowledged_since(started) {
                    conn.close();
                }
                TransmitOutcome::Failed(DeliveryError::NoAnswer.to_string())
            }
        }
    }
}
