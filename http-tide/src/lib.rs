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
mod ui;
mod views;
mod ws;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use error::ApiError;
pub use node::{BoxFuture, NodeApi, NodeCallError, NodeInfo, PeerInfo, RelayLink, RelayStatus};
use p2pchat_protocol::PeerId;
pub use views::{
    ConversationView, EventView, GroupRequest, InvitationView, MemberView, MessageView, PeerRequest, SendRequest,
};
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
    hub: ws::Hub,
}

impl State {
    pub(crate) fn node(&self) -> &dyn NodeApi {
        &*self.0.node
    }

    pub(crate) fn me(&self) -> &PeerId {
        &self.0.me
    }

    pub(crate) fn hub(&self) -> &ws::Hub {
        &self.0.hub
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
        let state =
            State(Arc::new(Inner { node, me, config, port, login_codes: Mutex::default(), hub: ws::Hub::default() }));
        let mut app = tide::with_state(state.clone());
        // Outermost first: the error shape covers every answer below it.
        app.with(guard::json_errors);
        app.with(guard::body_first);
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

    /// Answers one request without a socket, through every middleware and
    /// route the server runs (for fuzzing and tests; plain types, so no
    /// tide type leaves this crate). Blocks until the answer is complete.
    pub fn answer(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, Vec<u8>) {
        use tide::http::{Method, Request as HttpRequest, Url};
        let Ok(method) = method.parse::<Method>() else { return (405, Vec::new()) };
        let Ok(url) = Url::parse("http://127.0.0.1").and_then(|base| base.join(path)) else {
            return (400, Vec::new());
        };
        let mut request = HttpRequest::new(method, url);
        for (name, value) in headers {
            request.append_header(*name, *value);
        }
        request.set_body(body);
        async_std::task::block_on(async {
            let mut response: tide::http::Response = self.app.respond(request).await.unwrap_or_else(|e| {
                let mut r = tide::http::Response::new(500);
                r.set_body(e.to_string());
                r
            });
            let status = u16::from(response.status());
            let bytes = response.body_bytes().await.unwrap_or_default();
            (status, bytes)
        })
    }

    /// Serves until the process ends, on async-std's executor.
    ///
    /// The accept loop is ours rather than tide's so that every connection
    /// gets `TCP_NODELAY`: async-h1 writes an answer's head and body
    /// separately, and with Nagle's algorithm on, the body waits for the
    /// client's delayed acknowledgement (40 ms on Linux) on keep-alive
    /// connections.
    pub fn run(self) -> std::io::Result<()> {
        let listener = async_std::net::TcpListener::from(self.listener);
        let app = self.app;
        async_std::task::spawn(ws::pump(self.state));
        async_std::task::block_on(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => serve_connection(app.clone(), stream, peer),
                    Err(e) => {
                        // Out of file descriptors, or a connection reset
                        // before it was accepted: wait, and go on.
                        log::warn!("the API could not accept a connection: {e}");
                        async_std::task::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        })
    }
}

/// Answers one connection's requests (keep-alive, and WebSocket upgrades) on
/// its own task.
fn serve_connection(app: tide::Server<State>, stream: async_std::net::TcpStream, peer: SocketAddr) {
    if let Err(e) = stream.set_nodelay(true) {
        log::debug!("TCP_NODELAY refused on an API connection: {e}");
    }
    let local = stream.local_addr().ok();
    async_std::task::spawn(async move {
        let served = async_h1::accept(stream.clone(), |mut req| {
            req.set_local_addr(local);
            req.set_peer_addr(Some(peer));
            let app = app.clone();
            async move { app.respond(req).await }
        })
        .await;
        if let Err(e) = served {
            log::debug!("an API connection from {peer} ended: {e}");
            // async-h1 gives up on a request it cannot parse (a method
            // outside its list, a head over 8 KiB, HTTP/1.0) by closing the
            // connection. The client is owed an answer in the API's error
            // shape; an I/O error means it is gone and is owed nothing.
            if e.downcast_ref::<std::io::Error>().is_none() {
                let _ = answer_unparsed(stream, &e.to_string()).await;
            }
        }
    });
}

/// Answers a request async-h1 could not parse, and ends the connection.
async fn answer_unparsed(mut stream: async_std::net::TcpStream, reason: &str) -> std::io::Result<()> {
    use async_std::io::WriteExt;
    let error = if reason.contains("Invalid HTTP method") {
        ApiError::for_status(405)
    } else if reason.contains("Head byte length") {
        ApiError::new(431, "headers_too_large", "the request line and headers must be under 8 KiB (8,192 bytes)")
    } else {
        ApiError::bad_request("malformed_request", format!("the request is not valid HTTP/1.1: {reason}"))
    };
    let body = error.to_json();
    let reason_phrase = match error.status {
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Bad Request",
    };
    let head = format!(
        "HTTP/1.1 {} {reason_phrase}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        error.status,
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.flush().await?;
    // Closing with the rest of the request unread would make the kernel
    // reset the connection, and the client could lose the answer: end the
    // sending side, and read what is left for a moment.
    stream.shutdown(std::net::Shutdown::Write)?;
    let drain = async {
        use async_std::io::ReadExt;
        let mut buf = [0u8; 8192];
        let mut left: usize = 1024 * 1024;
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = async_std::future::timeout(Duration::from_secs(1), drain).await;
    Ok(())
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
