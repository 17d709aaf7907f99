//! Direct connections to peers, as the node asks for them: dials, each
//! peer's open connections, sends within a deadline, and what happens on
//! them reported back as node inputs. Which peer to dial, and when, is the
//! node's choice (`protocol::node`), not this module's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use p2pchat_protocol::engine::{SendFailure, TransmitId, TransmitOutcome};
use p2pchat_protocol::node::NodeInput;
use p2pchat_protocol::PeerId;

use smol::channel;

use super::Inputs;
use crate::transport::{by, PeerConnection, Transport};

/// Frames of one connection being read or waiting for the node at once:
/// as many as the peer may have streams open.
const FRAMES_IN_HAND: usize = crate::transport::MAX_STREAMS as usize;

/// How long a dial may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a frame may take to be acknowledged before the send fails; a
/// connection on which nothing was acknowledged that whole time is given up
/// (the peer may have gone without closing it).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Which side dialled a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Direction {
    /// This node dialled.
    Outgoing,
    /// The peer dialled.
    Incoming,
}

/// Every peer's open connections.
#[derive(Debug, Default)]
pub(super) struct DirectPeers {
    /// Oldest first; frames go out on the newest. A peer usually has one;
    /// two when both sides dialled at once (both are kept, as neither side
    /// can tell which one the other would drop).
    connections: Mutex<BTreeMap<PeerId, Vec<PeerConnection>>>,
}

/// The map holds plain values, complete after every statement that changes
/// it, so a panic elsewhere leaves nothing half-done behind a poisoned lock.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl DirectPeers {
    /// How many open connections `peer` has, either way.
    pub(super) fn open_connections(&self, peer: &PeerId) -> usize {
        lock(&self.connections).get(peer).map_or(0, |conns| conns.iter().filter(|c| !c.is_closed()).count())
    }

    /// The newest open connection to `peer`.
    fn open_connection(&self, peer: &PeerId) -> Option<PeerConnection> {
        lock(&self.connections).get(peer)?.iter().rev().find(|c| !c.is_closed()).cloned()
    }

    /// Dials `peer` at `addr` (its certificate must prove `peer`); the
    /// outcome reaches the node as `DirectUp` or `DialFailed`.
    pub(super) fn dial(self: &Arc<Self>, transport: &Arc<Transport>, inputs: &Inputs, peer: PeerId, addr: SocketAddr) {
        let (direct, transport, inputs) = (self.clone(), transport.clone(), inputs.clone());
        smol::spawn(async move {
            let reason = match by(Instant::now() + DIAL_TIMEOUT, transport.dial(addr, peer)).await {
                Some(Ok(conn)) => return direct.adopt(conn, Direction::Outgoing, &inputs),
                Some(Err(e)) => format!("cannot reach the peer at {addr}: {e}"),
                None => format!("no answer from the peer at {addr} within {} s", DIAL_TIMEOUT.as_secs()),
            };
            log::info!("dialling {peer} failed: {reason}");
            inputs.control(NodeInput::DialFailed { peer, reason });
        })
        .detach();
    }

    /// A new connection: remember it, tell the node, and read its frames
    /// (each in its own task). When the last connection to the peer closes
    /// the node hears it; if the peer refused one we dialled over one of its
    /// limits, the node hears that as a failed dial, and leaves the address
    /// alone for a while rather than dialling into the same refusal.
    pub(super) fn adopt(self: &Arc<Self>, conn: PeerConnection, direction: Direction, inputs: &Inputs) {
        let peer = conn.peer();
        {
            // Told under the lock, so the node hears of connections opening
            // and closing in the order they did.
            let mut connections = lock(&self.connections);
            connections.entry(peer).or_default().push(conn.clone());
            inputs.control(NodeInput::DirectUp { peer });
        }
        let (direct, inputs) = (self.clone(), inputs.clone());
        smol::spawn(async move {
            // A place for each frame being read or waiting for the node: a
            // stream is accepted only when one is free, so a peer whose
            // frames the node has not taken yet is held back by QUIC's flow
            // control instead of filling memory.
            let (places, freed) = channel::bounded::<()>(FRAMES_IN_HAND);
            loop {
                if places.send(()).await.is_err() {
                    return;
                }
                match conn.accept_frame().await {
                    Ok(frame) => {
                        let (inputs, freed) = (inputs.clone(), freed.clone());
                        smol::spawn(async move {
                            match frame.await {
                                Ok(bytes) => inputs.data(NodeInput::DirectReceived { from: peer, bytes }).await,
                                Err(e) => log::info!("a frame from {peer} failed: {e}"),
                            }
                            let _ = freed.try_recv();
                        })
                        .detach();
                    }
                    Err(e) => {
                        log::info!("a connection to {peer} closed: {e}");
                        direct.forget(&conn, &inputs);
                        if let (Direction::Outgoing, Some(limit)) = (direction, conn.refusal()) {
                            let reason = format!("the peer refused our connection ({limit})");
                            inputs.control(NodeInput::DialFailed { peer, reason });
                        }
                        return;
                    }
                }
            }
        })
        .detach();
    }

    /// Forgets a closed connection (and any others found closed); if none
    /// to its peer is left, tells the node (under the lock, so a connection
    /// adopted meanwhile is announced after this).
    fn forget(&self, conn: &PeerConnection, inputs: &Inputs) {
        let peer = conn.peer();
        let mut map = lock(&self.connections);
        let left = map.get_mut(&peer).map_or(0, |conns| {
            conns.retain(|c| c.id() != conn.id() && !c.is_closed());
            conns.len()
        });
        if left == 0 {
            map.remove(&peer);
            inputs.control(NodeInput::DirectDown { peer });
        }
    }

    /// Sends a frame on the newest open connection to `peer`; the outcome
    /// reaches the node as `DirectSent` within [`SEND_TIMEOUT`]. A
    /// connection slow but moving (frames queued behind flow control are
    /// acknowledged one by one) is kept; one on which nothing was
    /// acknowledged the whole time is closed.
    pub(super) fn send(self: &Arc<Self>, inputs: &Inputs, peer: PeerId, id: TransmitId, bytes: Vec<u8>) {
        let Some(conn) = self.open_connection(&peer) else {
            let outcome = TransmitOutcome::Failed(SendFailure::NoConnection);
            return inputs.control(NodeInput::DirectSent { id, outcome });
        };
        let inputs = inputs.clone();
        smol::spawn(async move {
            let started = Instant::now();
            let outcome = match by(started + SEND_TIMEOUT, conn.send(&bytes)).await {
                Some(Ok(())) => TransmitOutcome::Delivered,
                // A closed connection is forgotten by its reader; a refused
                // frame leaves the connection as good as it was.
                Some(Err(e)) => match conn.refusal() {
                    Some(limit) => TransmitOutcome::Failed(SendFailure::PeerRefused(limit.to_string())),
                    None => TransmitOutcome::Failed(SendFailure::Transport(e.to_string())),
                },
                None => {
                    if !conn.acknowledged_since(started) {
                        conn.close();
                    }
                    TransmitOutcome::Failed(SendFailure::PeerDidNotAnswer { seconds: SEND_TIMEOUT.as_secs() })
                }
            };
            inputs.control(NodeInput::DirectSent { id, outcome });
        })
        .detach();
    }
}
