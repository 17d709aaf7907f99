//! The seam: what the API needs from a node. `runtime-smol` implements
//! [`NodeApi`]; this crate never sees storage, sockets or threads.

use std::future::Future;
use std::pin::Pin;

use p2pchat_protocol::engine::{Answer, Command, CommandOutcome, EngineError, Event, Query};

/// A future the API awaits on its own executor.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Why a call to the node failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeCallError {
    /// The engine refused the command or query.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The node is stopping.
    #[error("the node has stopped")]
    Stopped,
}

/// The node as the API uses it.
pub trait NodeApi: Send + Sync + 'static {
    /// Runs a command on the engine; answered after its commit.
    fn command(&self, command: Command) -> BoxFuture<Result<CommandOutcome, NodeCallError>>;
    /// Answers a read from committed state.
    fn query(&self, query: Query) -> BoxFuture<Result<Answer, NodeCallError>>;
    /// Every event from now on, through a buffer of `capacity` events. When
    /// the buffer is full the node drops the subscription: the receiver
    /// then reports the channel closed.
    fn subscribe(&self, capacity: usize) -> async_channel::Receiver<Event>;
    /// Who and where this node is.
    fn info(&self) -> NodeInfo;
    /// The peers this node knows a path to (asked of the node, which
    /// answers between batches).
    fn peers(&self) -> BoxFuture<Result<Vec<PeerInfo>, NodeCallError>>;
    /// The relay connection.
    fn relay_status(&self) -> RelayStatus;
}

/// `GET /api/node`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NodeInfo {
    /// This node's peer ID.
    pub peer_id: String,
    /// The p2pchat version.
    pub version: String,
    /// The QUIC address it listens on.
    pub quic_address: String,
    /// The API address.
    pub api_address: String,
    /// Whether it accepts direct connections (`--no-direct` turns that off).
    pub direct: bool,
    /// Its first relay, as `PEER_ID@ADDR`, if one is configured.
    pub relay: Option<String>,
    /// Whether it is connected to that relay now.
    pub relay_connected: bool,
    /// Every relay it keeps a connection to.
    pub relays: Vec<RelayLink>,
}

/// One relay and this node's connection to it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RelayLink {
    /// The relay, as `PEER_ID@ADDR`.
    pub address: String,
    /// Whether this node is connected to it now.
    pub connected: bool,
    /// Since when it is connected, or not (Unix seconds).
    pub since: u64,
    /// Why the last attempt failed or the last connection closed.
    pub last_error: Option<String>,
}

/// One entry of `GET /api/peers`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PeerInfo {
    /// The peer.
    pub peer_id: String,
    /// Its direct address, if known.
    pub address: Option<String>,
    /// Where that address came from: `given` (by the user) or `record`
    /// (the peer's signed record, from a relay).
    pub address_source: Option<&'static str>,
    /// The relay whose answer gave the record, as `PEER_ID@ADDR`.
    pub record_from: Option<String>,
    /// Whether a direct QUIC connection to it is open.
    pub connected: bool,
    /// How it is reached now: `direct` (a connection is open), `dialling`,
    /// `direct_failed` (its address failed; relays until
    /// `direct_failed_until`), `relayed` (the last message went through
    /// `relayed_via`) or `unknown` (nothing tried yet).
    pub path: &'static str,
    /// Until when the failed direct address is left alone (Unix seconds).
    pub direct_failed_until: Option<u64>,
    /// The relay the last message to it went through, as `PEER_ID@ADDR`.
    pub relayed_via: Option<String>,
    /// Why the last direct attempt failed.
    pub last_failure: Option<String>,
}

/// `GET /api/relay/status`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RelayStatus {
    /// Whether a relay is configured.
    pub configured: bool,
    /// The first relay, as `PEER_ID@ADDR`.
    pub relay: Option<String>,
    /// Whether this node is connected to the first relay now.
    pub connected: bool,
    /// Every relay, in the order configured.
    pub relays: Vec<RelayLink>,
}
