//! `GET /api/ws`: the node's events as `{"type": ..., "payload": ...}`.
//!
//! A client takes every type, or names some with `?types=a,b` or by
//! sending `{"type": "subscribe", "types": [...]}` (and `unsubscribe`).
//! Each client has a buffer of [`CLIENT_BUFFER`] events; a client too slow
//! to keep up is closed with code 1008 and a reason, so it cannot hold up
//! the node.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use async_tungstenite::tungstenite::Message;
use async_tungstenite::WebSocketStream;
use futures_util::{SinkExt, StreamExt};
use p2pchat_protocol::engine::Event;
use p2pchat_protocol::PeerId;
use serde::Deserialize;
use tide::Request;

use crate::error::ApiError;
use crate::views::EventView;
use crate::State;

/// Every event type, the reference's eleven and the engine's additions.
pub const EVENT_TYPES: &[&str] = &[
    "chat.conversation.created",
    "chat.conversation.updated",
    "chat.conversations.updated",
    "chat.message.created",
    "chat.message.received",
    "chat.message.sent",
    "chat.message.delivered",
    "chat.message.read",
    "chat.message.failed",
    "chat.group.invite",
    "chat.key_exchange.complete",
    "chat.message.updated",
    "chat.security.rejected",
];

/// Events buffered per client before it counts as too slow.
pub const CLIENT_BUFFER: usize = 1024;

/// Which types a client takes: `None` is all.
type Filter = Arc<Mutex<Option<BTreeSet<String>>>>;

#[derive(Deserialize)]
struct ClientMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    types: Vec<String>,
}

/// A send to a client that takes longer than this ends the connection: a
/// client that stops reading must not keep its task and socket forever.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the node pings each client, whatever else it sends.
const PING_INTERVAL: Duration = Duration::from_secs(30);

/// A client that sends nothing for this long (not even the pong every
/// WebSocket client owes a ping) is taken for gone and its socket closed.
const READ_TIMEOUT: Duration = Duration::from_secs(90);

/// Replies to a client's own messages waiting to be written.
const REPLY_BUFFER: usize = 16;

/// `GET /api/ws`: checks the upgrade request, answers 101 and serves the
/// socket on a task of its own.
///
/// The handshake is done here rather than by tide-websockets: its connection
/// type shares one lock between reading and writing and takes it with a
/// blocking wait, so a client that stopped reading could block an executor
/// thread; and it answers a request without `Sec-WebSocket-Key` with a 500.
pub(crate) async fn endpoint(req: Request<State>) -> tide::Result {
    // The same test async-h1 applies before it hands the connection over.
    let connection = req.header("Connection").map(|v| v.as_str()).unwrap_or("");
    let upgrade = connection.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        && req
            .header("Upgrade")
            .is_some_and(|v| v.as_str().split(',').any(|t| t.trim().eq_ignore_ascii_case("websocket")));
    if !upgrade {
        let mut response = ApiError::for_status(426).into_response();
        response.insert_header("Upgrade", "websocket");
        return Ok(response);
    }
    if req.header("Sec-WebSocket-Version").map(|v| v.as_str().trim()) != Some("13") {
        let mut response = ApiError::new(
            426,
            "unsupported_websocket_version",
            "this server speaks WebSocket version 13 (RFC 6455) only",
        )
        .into_response();
        response.insert_header("Upgrade", "websocket");
        response.insert_header("Sec-WebSocket-Version", "13");
        return Ok(response);
    }
    let key = req.header("Sec-WebSocket-Key").map(|k| k.as_str().trim().to_owned()).unwrap_or_default();
    if !is_websocket_key(&key) {
        return Ok(ApiError::bad_request(
            "invalid_websocket_handshake",
            "the upgrade request needs a Sec-WebSocket-Key: 16 bytes in base64",
        )
        .into_response());
    }
    // Subscribed before the 101 goes out, so that a client which fetches
    // the state as soon as the socket opens misses no event in between.
    let filter: Filter = Arc::default();
    let start = match initial_types(&req) {
        Ok(types) => {
            if let Ok(mut f) = filter.lock() {
                *f = types;
            }
            Ok(req.state().hub().subscribe(filter.clone()))
        }
        Err(reason) => Err(reason),
    };
    let mut response = tide::Response::new(101);
    response.insert_header("Upgrade", "websocket");
    response.insert_header("Connection", "Upgrade");
    response.insert_header(
        "Sec-WebSocket-Accept",
        async_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()),
    );
    let http: &mut tide::http::Response = response.as_mut();
    let upgraded = http.recv_upgrade().await;
    async_std::task::spawn(async move {
        let Some(connection) = upgraded.await else { return };
        let socket = WebSocketStream::from_raw_socket(connection, Role::Server, None).await;
        match start {
            Ok(subscription) => serve(socket, filter, subscription).await,
            Err(reason) => {
                let (mut sink, _) = socket.split();
                close(&mut sink, &reason).await;
            }
        }
    });
    Ok(response)
}

/// Whether `key` is 16 bytes in base64 (RFC 6455, section 4.1).
fn is_websocket_key(key: &str) -> bool {
    let body = key.strip_suffix("==").unwrap_or("");
    body.len() == 22 && body.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// The types `?types=a,b` asks for: `None` (every type) without the query
/// or with an empty one; the reason if it names a type that does not exist.
fn initial_types(req: &Request<State>) -> Result<Option<BTreeSet<String>>, String> {
    let Some(types) = req.url().query_pairs().find(|(k, _)| k == "types").map(|(_, v)| v.into_owned()) else {
        return Ok(None);
    };
    let types: Vec<String> = types.split(',').filter(|t| !t.is_empty()).map(str::to_owned).collect();
    if let Some(unknown) = unknown_types(&types) {
        return Err(format!("unknown event types: {unknown}"));
    }
    Ok((!types.is_empty()).then(|| types.into_iter().collect()))
}

/// Events the hub's own subscription holds before the node counts it as
/// behind; the hub only serializes and hands out, so this is slack for a
/// busy executor, not a client's buffer.
const HUB_BUFFER: usize = 16 * 1024;

const FELL_BEHIND: &str = "the client fell behind: more than 1024 events waited";
// The close reason names the buffer's size.
const _: () = assert!(CLIENT_BUFFER == 1024);

/// Fans the node's events out to the WebSocket clients: one subscription to
/// the node, each event serialized once, and a bounded queue per client.
#[derive(Default)]
pub(crate) struct Hub {
    clients: Mutex<Vec<Subscriber>>,
}

struct Subscriber {
    filter: Filter,
    frames: async_channel::Sender<Arc<str>>,
    /// Why the hub dropped this client, for its close frame.
    dropped: Arc<Mutex<Option<&'static str>>>,
}

impl Subscriber {
    fn wants(&self, kind: &str) -> bool {
        self.filter.lock().map(|f| f.as_ref().is_none_or(|set| set.contains(kind))).unwrap_or(true)
    }
}

/// A client's end of the hub.
struct Subscription {
    frames: async_channel::Receiver<Arc<str>>,
    dropped: Arc<Mutex<Option<&'static str>>>,
}

impl Hub {
    fn subscribe(&self, filter: Filter) -> Subscription {
        let (tx, frames) = async_channel::bounded(CLIENT_BUFFER);
        let dropped = Arc::default();
        if let Ok(mut clients) = self.clients.lock() {
            clients.push(Subscriber { filter, frames: tx, dropped: Arc::clone(&dropped) });
        }
        Subscription { frames, dropped }
    }

    /// Queues `event` for every client that wants it; a client whose queue
    /// is full is dropped, with [`FELL_BEHIND`] as its reason.
    fn dispatch(&self, event: &Event, me: &PeerId) {
        let Ok(mut clients) = self.clients.lock() else { return };
        clients.retain(|c| !c.frames.is_closed());
        let kind = event.kind();
        let mut frame: Option<Arc<str>> = None;
        clients.retain(|client| {
            if !client.wants(kind) {
                return true;
            }
            let frame = match &frame {
                Some(frame) => Arc::clone(frame),
                None => match serde_json::to_string(&EventView::new(event, me)) {
                    Ok(json) => Arc::clone(frame.insert(json.into())),
                    Err(e) => {
                        log::error!("an event could not be serialized: {e}");
                        return true;
                    }
                },
            };
            match client.frames.try_send(frame) {
                Ok(()) => true,
                Err(async_channel::TrySendError::Full(_)) => {
                    if let Ok(mut dropped) = client.dropped.lock() {
                        *dropped = Some(FELL_BEHIND);
                    }
                    false
                }
                Err(async_channel::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// Drops every client, saying why.
    fn drop_all(&self, reason: &'static str) {
        let Ok(mut clients) = self.clients.lock() else { return };
        for client in clients.drain(..) {
            if let Ok(mut dropped) = client.dropped.lock() {
                *dropped = Some(reason);
            }
        }
    }
}

/// Feeds the hub from the node for as long as the server runs.
pub(crate) async fn pump(state: State) {
    loop {
        let events = state.node().subscribe(HUB_BUFFER);
        while let Ok(event) = events.recv().await {
            state.hub().dispatch(&event, state.me());
        }
        // The node dropped the subscription: the hub fell behind (the
        // executor was starved) or the node is stopping. Clients cannot tell
        // what they missed, so they are closed and may reconnect.
        state.hub().drop_all("the node's event stream was interrupted; reconnect");
        async_std::task::sleep(std::time::Duration::from_millis(100)).await;
    }
}

type Socket = WebSocketStream<tide::http::upgrade::Connection>;
type Sink = futures_util::stream::SplitSink<Socket, Message>;

/// What the writer does next.
enum Next {
    Event(Result<Arc<str>, async_channel::RecvError>),
    Reply(Result<String, async_channel::RecvError>),
    Ping,
}

/// Serves one client until either side ends: the writer (events, replies,
/// pings, and the close frame when the hub drops the client) and the
/// reader (the client's own messages) run together, and when one returns
/// the other is dropped with it, so the socket is closed.
async fn serve(socket: Socket, filter: Filter, subscription: Subscription) {
    let (mut sink, stream) = socket.split();
    let (replies, pending_replies) = async_channel::bounded::<String>(REPLY_BUFFER);
    let writer = write_client(&mut sink, &subscription, &pending_replies);
    let reader = read_client(stream, filter, replies);
    futures_lite::future::or(writer, reader).await;
}

/// Writes events and replies to the client, and a ping every
/// [`PING_INTERVAL`], until the hub drops the client (then it sends the
/// close frame), a write fails or times out, or the reader ends.
async fn write_client(sink: &mut Sink, subscription: &Subscription, pending_replies: &async_channel::Receiver<String>) {
    let mut next_ping = std::time::Instant::now() + PING_INTERVAL;
    loop {
        // A steady stream of events must not crowd out the pings.
        let next = if std::time::Instant::now() >= next_ping {
            Next::Ping
        } else {
            let event = async { Next::Event(subscription.frames.recv().await) };
            let reply = async { Next::Reply(pending_replies.recv().await) };
            let ping = async {
                async_std::task::sleep(next_ping.saturating_duration_since(std::time::Instant::now())).await;
                Next::Ping
            };
            futures_lite::future::or(futures_lite::future::or(event, reply), ping).await
        };
        let message = match next {
            Next::Event(Ok(frame)) => {
                // Once dropped by the hub, what is still queued is moot: the
                // client must refetch anyway, so it learns that at once.
                if subscription.dropped.lock().ok().and_then(|d| *d).is_some() {
                    continue;
                }
                Message::Text(String::from(&*frame))
            }
            Next::Event(Err(_)) => {
                let reason = subscription.dropped.lock().ok().and_then(|d| *d).unwrap_or(FELL_BEHIND);
                close(sink, reason).await;
                return;
            }
            Next::Reply(Ok(text)) => Message::Text(text),
            // The reader ended: the client closed or broke the socket.
            Next::Reply(Err(_)) => return,
            Next::Ping => {
                next_ping = std::time::Instant::now() + PING_INTERVAL;
                Message::Ping(Vec::new())
            }
        };
        if !send(sink, message).await {
            return;
        }
    }
}

/// Writes one message within [`SEND_TIMEOUT`]; false if the client is gone
/// or too slow.
async fn send(sink: &mut Sink, message: Message) -> bool {
    let sent = async { sink.send(message).await.is_ok() };
    let timed_out = async {
        async_std::task::sleep(SEND_TIMEOUT).await;
        false
    };
    futures_lite::future::or(sent, timed_out).await
}

/// Reads the client's messages until it goes away or falls silent for
/// [`READ_TIMEOUT`]; its replies go to the writer. (tungstenite answers
/// pings and close frames itself while this half reads.)
async fn read_client(
    mut stream: futures_util::stream::SplitStream<Socket>,
    filter: Filter,
    replies: async_channel::Sender<String>,
) {
    loop {
        let next = async { Some(stream.next().await) };
        let silent = async {
            async_std::task::sleep(READ_TIMEOUT).await;
            None
        };
        let Some(Some(Ok(message))) = futures_lite::future::or(next, silent).await else { return };
        let text = match message {
            Message::Text(text) => text,
            // Reading on after a close lets tungstenite send its answer;
            // the read after that ends the loop.
            Message::Close(_) | Message::Ping(_) | Message::Pong(_) => continue,
            Message::Binary(_) => String::new(),
        };
        let reply = match serde_json::from_str::<ClientMessage>(&text) {
            Ok(m) if m.kind == "subscribe" || m.kind == "unsubscribe" => match unknown_types(&m.types) {
                Some(unknown) => error_reply("unknown_event_type", &format!("unknown event types: {unknown}")),
                None => {
                    let Ok(mut f) = filter.lock() else { return };
                    // No filter means every type; the first `subscribe` of
                    // such a client narrows it to what it names.
                    let mut set = match f.take() {
                        Some(set) => set,
                        None if m.kind == "subscribe" => BTreeSet::new(),
                        None => EVENT_TYPES.iter().map(|t| (*t).to_owned()).collect(),
                    };
                    for t in m.types {
                        if m.kind == "subscribe" {
                            set.insert(t);
                        } else {
                            set.remove(&t);
                        }
                    }
                    *f = Some(set.clone());
                    serde_json::json!({ "type": "subscribed", "payload": { "types": set } })
                }
            },
            Ok(m) if m.kind == "ping" => serde_json::json!({ "type": "pong", "payload": {} }),
            _ => error_reply(
                "invalid_message",
                r#"send text frames of JSON: {"type": "subscribe" | "unsubscribe", "types": [...]} or {"type": "ping"}"#,
            ),
        };
        if replies.send(reply.to_string()).await.is_err() {
            return;
        }
    }
}

fn error_reply(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({ "type": "error", "payload": { "code": code, "message": message } })
}

fn unknown_types(types: &[String]) -> Option<String> {
    let unknown: Vec<&str> = types.iter().map(String::as_str).filter(|t| !EVENT_TYPES.contains(t)).collect();
    (!unknown.is_empty()).then(|| unknown.join(", "))
}

/// Sends a close frame with code 1008 (policy) and `reason`, cut to the
/// 123 bytes a close frame has room for.
async fn close(sink: &mut Sink, reason: &str) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let frame = CloseFrame { code: CloseCode::Policy, reason: reason[..end].to_owned().into() };
    let _ = send(sink, Message::Close(Some(frame))).await;
}
