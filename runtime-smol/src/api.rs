//! The node behind the REST and WebSocket API: [`NodeApi`] over a
//! [`NodeHandle`], the API token file, and the server's thread.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use p2pchat_http_tide::{
    ApiConfig, ApiServer, BoxFuture, LoginLinks, NodeApi, NodeCallError, NodeInfo, PeerInfo, RelayLink, RelayStatus,
};
use p2pchat_protocol::engine::{Answer, Command, CommandOutcome, Event, Query};
use p2pchat_protocol::node::{AddressSource, PathState, RecordSource};
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
            relays: relay_links(&self.node),
        }
    }

    fn peers(&self) -> BoxFuture<Result<Vec<PeerInfo>, NodeCallError>> {
        let node = self.node.clone();
        Box::pin(async move {
            let (peers, relays) = node.peers().await.map_err(call_error)?;
            let relay_name = |index: usize| relays.get(index).cloned();
            Ok(peers
                .into_iter()
                .map(|p| {
                    let (path, direct_failed_until, relayed_via) = match p.state {
                        PathState::Direct => ("direct", None, None),
                        PathState::Dialling => ("dialling", None, None),
                        PathState::DirectFailedUntil(until) => ("direct_failed", Some(until.as_millis() / 1000), None),
                        PathState::RelayedVia(relay) => ("relayed", None, relay_name(relay)),
                        PathState::Unknown => ("unknown", None, None),
                    };
                    let address_source = match p.source {
                        Some(AddressSource::Given) => Some("given"),
                        Some(AddressSource::Record { .. }) => Some("record"),
                        None => None,
                    };
                    // Where its newest record came from, whether or not it
                    // gave an address (a `--no-direct` peer's lists only
                    // relays).
                    let record_from = match p.record {
                        Some(RecordSource::Relay(relay)) => relay_name(relay),
                        Some(RecordSource::HandedIn | RecordSource::Kept) | None => None,
                    };
                    PeerInfo {
                        peer_id: p.peer.to_string(),
                        address: p.address.map(|a| a.to_string()),
                        address_source,
                        record_from,
                        connected: p.state == PathState::Direct,
                        path,
                        direct_failed_until,
                        relayed_via,
                        last_failure: p.last_failure,
                    }
                })
                .collect())
        })
    }

    fn relay_status(&self) -> RelayStatus {
        RelayStatus {
            configured: self.node.relay().is_some(),
            relay: self.node.relay().map(ToString::to_string),
            connected: self.node.relay_connected(),
            relays: relay_links(&self.node),
        }
    }
}

/// Every relay and the node's connection to it, as the API shows them.
fn relay_links(node: &NodeHandle) -> Vec<RelayLink> {
    node.relays()
        .into_iter()
        .map(|(address, link)| RelayLink {
            address: address.to_string(),
            connected: link.connected,
            since: link.since.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            last_error: link.last_error,
        })
        .collect()
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
///
/// The file is written under a temporary name and renamed into place, so a
/// crash leaves either no token file or a whole one. A token file that
/// others may read is refused, as ssh refuses such keys.
pub fn load_or_create_token(data_dir: &Path) -> Result<Zeroizing<String>, ApiError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = data_dir.join(TOKEN_FILE);
    let err = |e: std::io::Error| ApiError::Token { path: path.clone(), reason: e.to_string() };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mode = std::fs::metadata(&path).map_err(err)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(ApiError::Token {
                    path: path.clone(),
                    reason: format!(
                        "others may read it (mode {mode:o}); run `chmod 600 {}`, or delete it to make a new token",
                        path.display()
                    ),
                });
            }
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
            let partial = data_dir.join(format!("{TOKEN_FILE}.partial"));
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&partial)
                .map_err(err)?;
            // A leftover from a crash may have been made with other modes.
            file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(err)?;
            file.write_all(token.as_bytes()).map_err(err)?;
            file.sync_all().map_err(err)?;
            std::fs::rename(&partial, &path).map_err(err)?;
            std::fs::File::open(data_dir).and_then(|dir| dir.sync_all()).map_err(err)?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn fresh_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("p2pchat-token-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_token_is_made_once_private_and_kept() {
        let dir = fresh_dir("made");
        let token = load_or_create_token(&dir).unwrap();
        assert_eq!(token.len(), 64);
        let path = dir.join(TOKEN_FILE);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!dir.join(format!("{TOKEN_FILE}.partial")).exists(), "the partial file is renamed into place");
        assert_eq!(load_or_create_token(&dir).unwrap(), token, "a second start reads the same token");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_token_file_others_may_read_or_a_broken_one_is_refused() {
        let dir = fresh_dir("refused");
        load_or_create_token(&dir).unwrap();
        let path = dir.join(TOKEN_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = load_or_create_token(&dir).unwrap_err().to_string();
        assert!(refused.contains("chmod 600"), "{refused}");
        std::fs::write(&path, "short").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let refused = load_or_create_token(&dir).unwrap_err().to_string();
        assert!(refused.contains("64 hexadecimal"), "{refused}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
