//! `GET /api/ws`: the node's events as `{"type": ..., "payload": ...}`.
//!
//! A client takes every type, or names some with `?types=a,b` or by
//! sending `{"type": "subscribe", "types": [...]}` (and `unsubscribe`).
//! Each client has a buffer of [`CLIENT_BUFFER`] events; a client too slow
//! to keep up is closed with code 1008 and a reason, so it cannot hold up
//! the node.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use async_std::stream::StreamExt;
use serde::Deserialize;
use tide::Request;
use tide_websockets::tungstenite::protocol::frame::coding::CloseCode;
use tide_websockets::tungstenite::protocol::CloseFrame;
use tide_websockets::{Message, WebSocket, WebSocketConnection};

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

pub(crate) fn endpoint() -> WebSocket<State, impl Fn(Request<State>, WebSocketConnection) -> ConnectionFuture + Clone> {
    WebSocket::new(|req: Request<State>, conn: WebSocketConnection| -> ConnectionFuture { Box::pin(serve(req, conn)) })
}

type ConnectionFuture = std::pin::Pin<Box<dyn std::future::Future<Output = tide::Result<()>> + Send>>;

async fn serve(req: Request<State>, conn: WebSocketConnection) -> tide::Result<()> {
    let state = req.state().clone();
    let filter: Filter = Arc::default();
    let initial = req.url().query_pairs().find(|(k, _)| k == "types").map(|(_, v)| v.into_owned());
    if let Some(types) = initial {
        let types: Vec<String> = types.split(',').filter(|t| !t.is_empty()).map(str::to_owned).collect();
        if let Some(unknown) = unknown_types(&types) {
            close(&conn, CloseCode::Policy, &format!("unknown event types: {unknown}")).await;
            return Ok(());
        }
        if let Ok(mut f) = filter.lock() {
            *f = Some(types.into_iter().collect());
        }
    }
    let events = state.node().subscribe(CLIENT_BUFFER);
    // The reader drops `gone` when the client closes or breaks the socket.
    let (gone, client_gone) = async_channel::bounded::<()>(1);
    async_std::task::spawn(read_client(conn.clone(), filter.clone(), gone));
    loop {
        let event = async { Some(events.recv().await) };
        let client_gone = async {
            let _ = client_gone.recv().await;
            None
        };
        let next = futures_lite::future::or(event, client_gone).await;
        let Some(event) = next else { return Ok(()) };
        let Ok(event) = event else {
            // The node dropped the subscription: the buffer overflowed (or
            // the node is stopping).
            let reason = format!("the client fell behind: more than {CLIENT_BUFFER} events waited");
            close(&conn, CloseCode::Policy, &reason).await;
            return Ok(());
        };
        let wanted = filter.lock().map(|f| f.as_ref().is_none_or(|set| set.contains(event.kind()))).unwrap_or(true);
        if !wanted {
            continue;
        }
        let view = EventView::new(&event, state.me());
        if conn.send_json(&view).await.is_err() {
            return Ok(());
        }
    }
}

/// Reads the client's subscription changes until it goes away.
async fn read_client(mut conn: WebSocketConnection, filter: Filter, _gone: async_channel::Sender<()>) {
    while let Some(Ok(message)) = conn.next().await {
        let Message::Text(text) = message else {
            if matches!(message, Message::Close(_)) {
                return;
            }
            continue;
        };
        let parsed: Result<ClientMessage, _> = serde_json::from_str(&text);
        let reply = match parsed {
            Ok(m) if m.kind == "subscribe" || m.kind == "unsubscribe" => match unknown_types(&m.types) {
                Some(unknown) => error_reply("unknown_event_type", &format!("unknown event types: {unknown}")),
                None => {
                    let Ok(mut f) = filter.lock() else { return };
                    // No filter means every type.
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
                r#"send {"type": "subscribe" | "unsubscribe", "types": [...]} or {"type": "ping"}"#,
            ),
        };
        if conn.send_json(&reply).await.is_err() {
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

async fn close(conn: &WebSocketConnection, code: CloseCode, reason: &str) {
    let frame = CloseFrame { code, reason: reason.to_owned().into() };
    let _ = conn.send(Message::Close(Some(frame))).await;
}
