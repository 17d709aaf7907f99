//! The HTTP API as a client could misuse it: any method, any route with
//! real, unknown or malformed IDs, with or without the token, from a foreign
//! Host or Origin, and any body, through every middleware and handler, to a
//! real engine.
//!
//! Checked: no panic; no answer is a 5xx (the engine's store cannot fail
//! here, so a 5xx would be a client's mistake taken for the node's); every
//! error answer is the JSON error shape, and every API answer is JSON.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use p2pchat_fuzz::Bytes;
use p2pchat_http_tide::{ApiConfig, ApiServer, BoxFuture, NodeApi, NodeCallError, NodeInfo, PeerInfo, RelayStatus};
use p2pchat_protocol::engine::{Answer, Command, CommandOutcome, Engine, EngineConfig, Event, MemoryStore, Query};
use p2pchat_protocol::keys::IdentitySeed;
use p2pchat_protocol::{IdentityKeyPair, Timestamp};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const NOW: Timestamp = Timestamp::from_millis(1_750_000_000_000);

/// A node: one engine on the memory store, answering at once.
struct FuzzNode {
    engine: Mutex<Engine<MemoryStore>>,
    peer_id: String,
    _events: async_channel::Sender<Event>,
    events: async_channel::Receiver<Event>,
}

impl NodeApi for FuzzNode {
    fn command(&self, command: Command) -> BoxFuture<Result<CommandOutcome, NodeCallError>> {
        let outcome = match self.engine.lock() {
            Ok(mut engine) => {
                let outcome = engine.command(NOW, command).map_err(NodeCallError::from);
                while engine.poll_transmit().is_some()
                    || engine.poll_event().is_some()
                    || engine.poll_lookup().is_some()
                {}
                outcome
            }
            Err(_) => Err(NodeCallError::Stopped),
        };
        Box::pin(async move { outcome })
    }

    fn query(&self, query: Query) -> BoxFuture<Result<Answer, NodeCallError>> {
        let answer = match self.engine.lock() {
            Ok(mut engine) => engine.query(query).map_err(NodeCallError::from),
            Err(_) => Err(NodeCallError::Stopped),
        };
        Box::pin(async move { answer })
    }

    fn subscribe(&self, _capacity: usize) -> async_channel::Receiver<Event> {
        self.events.clone()
    }

    fn info(&self) -> NodeInfo {
        NodeInfo {
            peer_id: self.peer_id.clone(),
            version: "fuzz".into(),
            quic_address: "127.0.0.1:1".into(),
            api_address: "127.0.0.1:2".into(),
            direct: true,
            relay: None,
            relay_connected: false,
            relays: Vec::new(),
        }
    }

    fn peers(&self) -> BoxFuture<Result<Vec<PeerInfo>, NodeCallError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn relay_status(&self) -> RelayStatus {
        RelayStatus { configured: false, relay: None, connected: false, relays: Vec::new() }
    }
}

fn server() -> &'static ApiServer {
    static SERVER: OnceLock<ApiServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let identity = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes([9; 32]));
        let engine =
            Engine::new(identity, MemoryStore::new(), EngineConfig::default(), ChaCha20Rng::seed_from_u64(9), NOW)
                .expect("an engine on the memory store");
        let peer_id = engine.peer_id().to_string();
        let (tx, rx) = async_channel::unbounded();
        let node = FuzzNode { engine: Mutex::new(engine), peer_id, _events: tx, events: rx };
        let config = ApiConfig { token: TOKEN.to_owned().into(), allowed_hosts: Vec::new() };
        ApiServer::bind("127.0.0.1:0".parse().expect("an address"), Arc::new(node), config).expect("a bound server")
    })
}

const METHODS: &[&str] = &["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"];
const PATHS: &[&str] = &[
    "/api/chat/conversations",
    "/api/chat/conversations/{id}",
    "/api/chat/conversations/{id}/read",
    "/api/chat/conversations/{id}/messages",
    "/api/chat/conversations/{id}/messages?limit={n}&before={id}",
    "/api/chat/messages/{id}/read",
    "/api/chat/messages/{id}/retry",
    "/api/chat/groups",
    "/api/chat/groups/{id}/messages",
    "/api/chat/groups/{id}/invite",
    "/api/chat/groups/{id}/leave",
    "/api/chat/groups/{id}/members",
    "/api/chat/key-exchange",
    "/api/chat/unread",
    "/api/peers",
    "/api/relay/status",
    "/api/node",
    "/api/openapi.json",
    "/api/ws?types={n}",
    "/auth?code={n}",
    "/auth",
    "/",
    "/nothing/{id}",
];

/// An ID for a path: one the node knows, a well-formed unknown one, or junk.
fn id(input: &mut Bytes<'_>, known: &[String]) -> String {
    match input.byte() % 4 {
        0 | 1 if !known.is_empty() => known[input.below(known.len())].clone(),
        2 => "7c9e6679-7425-40de-944b-e07fc1f90ae7".into(),
        _ => {
            let len = input.below(12);
            (0..len).map(|_| char::from(b'0' + input.byte() % 75)).filter(|c| c.is_ascii_alphanumeric()).collect()
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let server = server();
    let mut input = Bytes(data);
    // What the node knows, so that paths can name real conversations.
    let (_, listing) = server.answer(
        "GET",
        "/api/chat/conversations",
        &[("Host", "127.0.0.1"), ("Authorization", &format!("Bearer {TOKEN}"))],
        Vec::new(),
    );
    let known: Vec<String> = serde_json::from_slice::<serde_json::Value>(&listing)
        .ok()
        .and_then(|v| v["conversations"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|c| c["conversation_id"].as_str().map(str::to_owned))
        .collect();
    let method = METHODS[input.below(METHODS.len())];
    let mut path = PATHS[input.below(PATHS.len())].to_owned();
    while path.contains("{id}") {
        path = path.replacen("{id}", &id(&mut input, &known), 1);
    }
    path = path.replace("{n}", &input.byte().to_string());
    let bearer = format!("Bearer {TOKEN}");
    let mut headers: Vec<(&str, &str)> = vec![("Host", "127.0.0.1")];
    let flags = input.byte();
    if flags & 1 == 0 {
        headers.push(("Authorization", &bearer));
    } else if flags & 2 == 0 {
        headers.push(("Authorization", "Bearer wrong"));
    }
    if flags & 4 != 0 {
        headers[0] = ("Host", "evil.example");
    }
    if flags & 8 != 0 {
        headers.push(("Origin", "http://evil.example"));
    }
    if flags & 16 != 0 {
        headers.push(("Content-Type", "application/json"));
    }
    let body = input.0.to_vec();
    let (status, answer) = server.answer(method, &path, &headers, body);
    assert!(status < 500, "{method} {path} answered {status}: {}", String::from_utf8_lossy(&answer));
    // The access checks hold whatever else the request is.
    let foreign_host = flags & 4 != 0;
    let foreign_origin = flags & 8 != 0 && !matches!(method, "GET" | "HEAD");
    let no_token = flags & 1 != 0;
    if foreign_host || foreign_origin {
        assert_eq!(status, 403, "{method} {path} from a foreign Host or Origin was not refused");
    } else if no_token && path.starts_with("/api/") {
        assert_eq!(status, 401, "{method} {path} without the token was not refused");
    }
    let is_api = path.starts_with("/api/") || path.starts_with("/auth");
    if status >= 400 || (is_api && !answer.is_empty() && status != 101) {
        let value: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_else(|e| {
            panic!("{method} {path} answered {status} without JSON ({e}): {:?}", String::from_utf8_lossy(&answer))
        });
        if status >= 400 {
            assert!(
                value["error"]["code"].is_string() && value["error"]["message"].is_string(),
                "{method} {path} answered {status} without the error shape: {value}"
            );
        }
    }
});
