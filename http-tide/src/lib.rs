//! The p2pchat REST and WebSocket API on tide.
//!
//! - Routes are registered from one table ([`routes::ROUTES`]), which the
//!   OpenAPI document (`openapi.json`, served at `/api/openapi.json`) is
//!   checked against.
//! - Every error is `{"error": {"code": "...", "message": "..."}}`.
//! - Requests need the node's token; `Host` and `Origin` are checked.
//! - The node is reached only through the [`NodeApi`] trait: tide and
//!   async-std stay inside this crate, and swapping the HTTP framework
//!   touches nothing else.
#![forbid(unsafe_code)]

mod error;
mod guard;
mod node;
pub mod routes;
mod views;
mod ws;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use error::ApiError;
pub use node::{BoxFuture, NodeApi, NodeCallError, NodeInfo, PeerInfo, RelayStatus};
use p2pchat_protocol::PeerId;
pub use views::{ConversationView, EventView, GroupRequest, MemberView, MessageView, PeerRequest, SendRequest};
pub use ws::{CLIENT_BUFFER, EVENT_TYPES};

/// The largest request body accepted. A message's text is at most 64 KiB,
/// which JSON escaping can make up to six times longer.
pub const MAX_BODY: usize = 512 * 1024;

/// How long a one-time login link stays valid.
const LOGIN_LINK_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// The OpenAPI document.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// How the API is set up.
#[derive(Clone)]
pub struct ApiConfig {
    /// The token every request must carry.
    pub token: zeroize::Zeroizing<String>,
    /// `Host` names accepted besides loopback ones.
    pub allowed_hosts: Vec<String>,
}

impl core::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ApiConfig").field("allowed_hosts", &self.allowed_hosts).finish_non_exhaustive()
    }
}

/// Shared by every request.
#[derive(Clone)]
pub(crate) struct State(Arc<Inner>);

struct Inner {
    node: Arc<dyn NodeApi>,
    me: PeerId,
    config: ApiConfig,
    port: u16,
    /// One-time login codes and when they were made.
    login_codes: Mutex<BTreeMap<String, Instant>>,
}

impl State {
    pub(crate) fn node(&self) -> &dyn NodeApi {
        &*self.0.node
    }

    pub(crate) fn me(&self) -> &PeerId {
        &self.0.me
    }

    pub(crate) fn host_allowed(&self, host: &str) -> bool {
        guard::host_allowed(host, &self.0.config.allowed_hosts)
    }

    pub(crate) fn token_matches(&self, presented: &str) -> bool {
        guard::constant_time_eq(presented.as_bytes(), self.0.config.token.as_bytes())
    }

    pub(crate) fn token(&self) -> &str {
        &self.0.config.token
    }

    /// Browsers share cookies between ports of one host: the port in the
    /// name keeps three nodes on one machine apart.
    pub(crate) fn cookie_name(&self) -> String {
        format!("p2pchat_token_{}", self.0.port)
    }

    /// Spends a one-time login code: true if it was valid.
    pub(crate) fn redeem(&self, code: &str) -> bool {
        let Ok(mut codes) = self.0.login_codes.lock() else { return false };
        codes.retain(|_, made| made.elapsed() < LOGIN_LINK_LIFETIME);
        let found = codes.keys().find(|k| guard::constant_time_eq(k.as_bytes(), code.as_bytes())).cloned();
        found.is_some_and(|k| codes.remove(&k).is_some())
    }
}

/// A bound API server, ready to run.
pub struct ApiServer {
    app: tide::Server<State>,
    listener: std::net::TcpListener,
    state: State,
}

impl core::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ApiServer").field("addr", &self.listener.local_addr().ok()).finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Binds `addr` (port 0 picks one) for `node`.
    pub fn bind(addr: SocketAddr, node: Arc<dyn NodeApi>, config: ApiConfig) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)?;
        let port = listener.local_addr()?.port();
        let me = node.info().peer_id.parse().map_err(|_| std::io::Error::other("the node reported a bad peer ID"))?;
        let state = State(Arc::new(Inner { node, me, config, port, login_codes: Mutex::default() }));
        let mut app = tide::with_state(state.clone());
        // Outermost first: the error shape covers every answer below it.
        app.with(guard::json_errors);
        app.with(guard::host_check);
        app.with(guard::origin_check);
        app.with(guard::token_check);
        routes::register(&mut app);
        Ok(Self { app, listener, state })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle that mints login links while the server runs.
    pub fn links(&self) -> LoginLinks {
        LoginLinks { state: self.state.clone(), port: self.listener.local_addr().map(|a| a.port()).unwrap_or(0) }
    }

    /// Serves until the process ends, on async-std's executor.
    pub fn run(self) -> std::io::Result<()> {
        let listener = async_std::net::TcpListener::from(self.listener);
        async_std::task::block_on(self.app.listen(listener))
    }
}

/// Mints one-time login links for a running server: each opens the page
/// once and sets an HttpOnly cookie with the token.
#[derive(Clone)]
pub struct LoginLinks {
    state: State,
    port: u16,
}

impl core::fmt::Debug for LoginLinks {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LoginLinks").field("port", &self.port).finish()
    }
}

impl LoginLinks {
    /// A fresh link for `code` (fresh randomness).
    pub fn link(&self, code: String) -> String {
        let link = format!("http://127.0.0.1:{}/auth?code={code}", self.port);
        if let Ok(mut codes) = self.state.0.login_codes.lock() {
            codes.insert(code, Instant::now());
        }
        link
    }
}
