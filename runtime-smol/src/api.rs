//! The node behind the REST and WebSocket API: [`NodeApi`] over a
//! [`NodeHandle`], the API token file, and the server's thread.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use p2pchat_http_tide::{
    ApiConfig, ApiServer, BoxFuture, LoginLinks, NodeApi, NodeCallError, NodeInfo, PeerInfo, RelayStatus,
};
use p2pchat_protocol::engine::{Answer, Command, CommandOutcome, Event, Query};
use rand_core::RngCore;
use zeroize::Zeroizing;

use crate::node::{NodeError, NodeHandle};

/// The token file in the data directory.
pub const TOKEN_FILE: &str = "api-token";

/// The API's view of a node.
struct Adapter {
    node: NodeHandle,
    /// Known once the server is bound (port 0 picks one).
    api_address: Arc<std::sync::OnceLock<SocketAddr>>,
}

fn call_error(e: NodeError) -> NodeCallError {
    match e {
        NodeError::Engine(e) => NodeCallError::Engine(e),
        _ => NodeCallError::Stopped,
    }
}

impl NodeApi for Adapter {
    fn command(&self, command: Command) -> BoxFuture<Result<CommandOutcome, NodeCallError>> {
        let node = self.node.clone();
        Box::pin(async move { node.command(command).await.map_err(call_error) })
    }

    fn query(&self, query: Query) -> BoxFuture<Result<Answer, NodeCallError>> {
        let node = self.node.clone();
        Box::pin(async move { node.query(query).await.map_err(call_error) })
    }

    fn subscribe(&self, capacity: usize) -> async_channel::Receiver<Event> {
        self.node.subscribe_bounded(capacity)
    }

    fn info(&self) -> NodeInfo {
        NodeInfo {
            peer_id: self.node.peer_id().to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            quic_address: self.node.listen_addr().to_string(),
            api_address: self.api_address.get().map(ToString::to_string).unwrap_or_default(),
            direct: self.node.accepts_direct(),
            relay: self.node.relay().map(ToString::to_string),
            relay_connected: self.node.relay_connected(),
        }
    }

    fn peers(&self) -> Vec<PeerInfo> {
        self.node
            .peers()
            .into_iter()
            .map(|(peer, address, connected)| PeerInfo {
                peer_id: peer.to_string(),
                address: address.map(|a| a.to_string()),
                connected,
            })
            .collect()
    }

    fn relay_status(&self) -> RelayStatus {
        RelayStatus {
            configured: self.node.relay().is_some(),
            relay: self.node.relay().map(ToString::to_string),
            connected: self.node.relay_connected(),
        }
    }
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The token file could not be read or written.
    #[error("API token file {path}: {reason}")]
    Token {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The address could not be bound.
    #[error("cannot listen for the API on {addr}: {reason} (is another node using it? pick another with --api)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        reason: String,
    },
}

/// The API token, created at first use (32 random bytes as hex, mode 0600).
pub fn load_or_create_token(data_dir: &Path) -> Result<Zeroizing<String>, ApiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(TOKEN_FILE);
    let err = |e: std::io::Error| ApiError::Token { path: path.clone(), reason: e.to_string() };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let token = Zeroizing::new(text.trim().to_owned());
            if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ApiError::Token {
                    path,
                    reason: "not a token (64 hexadecimal characters); delete it to make a new one".into(),
                });
            }
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::node::create_data_dir(data_dir)
                .map_err(|e| ApiError::Token { path: path.clone(), reason: e.to_string() })?;
            let token = Zeroizing::new(random_hex());
            let mut file =
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(err)?;
            file.write_all(token.as_bytes()).map_err(err)?;
            file.sync_all().map_err(err)?;
            Ok(token)
        }
        Err(e) => Err(err(e)),
    }
}

/// 32 random bytes as hex.
pub fn random_hex() -> String {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand_core::OsRng.fill_bytes(&mut *bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A running API server.
#[derive(Debug)]
pub struct RunningApi {
    /// Where it listens.
    pub addr: SocketAddr,
    links: LoginLinks,
}

impl RunningApi {
    /// A fresh one-time login link for a browser.
    pub fn login_link(&self) -> String {
        self.links.link(random_hex())
    }
}

/// Binds the API for `node` at `addr` and serves it on its own thread.
pub fn start(
    node: &NodeHandle,
    addr: SocketAddr,
    data_dir: &Path,
    allowed_hosts: Vec<String>,
) -> Result<RunningApi, ApiError> {
    let token = load_or_create_token(data_dir)?;
    let bind_err = |e: std::io::Error| ApiError::Bind { addr, reason: e.to_string() };
    let api_address = Arc::new(std::sync::OnceLock::new());
    let adapter = Arc::new(Adapter { node: node.clone(), api_address: api_address.clone() });
    let server = ApiServer::bind(addr, adapter, ApiConfig { token, allowed_hosts }).map_err(bind_err)?;
    let addr = server.local_addr().map_err(bind_err)?;
    let _ = api_address.set(addr);
    let links = server.links();
    std::thread::Builder::new()
        .name(format!("api-{addr}"))
        .spawn(move || {
            if let Err(e) = server.run() {
                log::error!("the API server stopped: {e}");
            }
        })
        .map_err(|e| ApiError::Bind { addr, reason: e.to_string() })?;
    log::info!("API listening on http://{addr}");
    Ok(RunningApi { addr, links })
}
