//! Every route, registered from one table ([`ROUTES`]); the OpenAPI
//! document is checked against the same table.

use std::future::Future;
use std::pin::Pin;

use async_std::io::ReadExt;
use p2pchat_protocol::engine::{Answer, Command, CommandOutcome, ConversationSummary, Query, MAX_PAGE};
use p2pchat_protocol::{ConversationId, MessageId, PeerId};
use serde::de::DeserializeOwned;
use serde_json::json;
use tide::{Request, Response};

use crate::error::ApiError;
use crate::views::{ConversationView, GroupRequest, InvitationView, MemberView, MessageView, PeerRequest, SendRequest};
use crate::{State, MAX_BODY};

/// An HTTP method of a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// GET
    Get,
    /// POST
    Post,
    /// DELETE
    Delete,
}

impl Method {
    /// Lower case, as OpenAPI names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Post => "post",
            Self::Delete => "delete",
        }
    }
}

type Handler = fn(Request<State>) -> Pin<Box<dyn Future<Output = tide::Result> + Send>>;

/// One route.
#[derive(Clone, Copy)]
pub struct Route {
    /// Its method.
    pub method: Method,
    /// Its path, with parameters as OpenAPI writes them (`{id}`).
    pub path: &'static str,
    handler: Handler,
}

impl core::fmt::Debug for Route {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} {}", self.method.as_str(), self.path)
    }
}

macro_rules! route {
    ($method:ident, $path:literal, $handler:ident) => {
        Route { method: Method::$method, path: $path, handler: |req| Box::pin(answer(req, $handler)) }
    };
}

/// Every route of the API. The WebSocket (`/api/ws`), the page and the
/// login link are registered beside these, and documented too.
pub const ROUTES: &[Route] = &[
    route!(Get, "/api/chat/conversations", list_conversations),
    route!(Post, "/api/chat/conversations", create_conversation),
    route!(Get, "/api/chat/conversations/{id}", get_conversation),
    route!(Delete, "/api/chat/conversations/{id}", delete_conversation),
    route!(Post, "/api/chat/conversations/{id}/read", mark_conversation_read),
    route!(Get, "/api/chat/conversations/{id}/messages", list_messages),
    route!(Post, "/api/chat/conversations/{id}/messages", send_message),
    route!(Post, "/api/chat/messages/{id}/read", mark_message_read),
    route!(Post, "/api/chat/messages/{id}/retry", retry_message),
    route!(Post, "/api/chat/groups", create_group),
    route!(Post, "/api/chat/groups/{id}/messages", send_group_message),
    route!(Post, "/api/chat/groups/{id}/invite", invite),
    route!(Post, "/api/chat/groups/{id}/leave", leave),
    route!(Get, "/api/chat/invitations", invitations),
    route!(Post, "/api/chat/groups/{id}/accept", accept_invitation),
    route!(Post, "/api/chat/groups/{id}/decline", decline_invitation),
    route!(Get, "/api/chat/groups/{id}/members", members),
    route!(Post, "/api/chat/key-exchange", key_exchange),
    route!(Get, "/api/chat/unread", unread),
    route!(Get, "/api/peers", peers),
    route!(Get, "/api/relay/status", relay_status),
    route!(Get, "/api/node", node),
    route!(Get, "/api/openapi.json", openapi),
];

/// Paths served outside [`ROUTES`] (documented in the OpenAPI document as
/// well): the WebSocket, the login link.
pub const OTHER_ROUTES: &[(Method, &str)] = &[
    (Method::Get, "/api/ws"),
    (Method::Get, "/auth"),
    (Method::Post, "/auth"),
    (Method::Get, "/"),
    (Method::Get, "/app.js"),
    (Method::Get, "/style.css"),
];

pub(crate) fn register(app: &mut tide::Server<State>) {
    for route in ROUTES {
        let path = route.path.replace('{', ":").replace('}', "");
        let handler = route.handler;
        let mut at = app.at(&path);
        match route.method {
            Method::Get => at.get(handler),
            Method::Post => at.post(handler),
            Method::Delete => at.delete(handler),
        };
    }
    app.at("/api/ws").get(crate::ws::endpoint);
    app.at("/auth").get(|req: Request<State>| async move { Ok(login(&req)) });
    app.at("/auth").post(|req: Request<State>| async move { Ok(login_with_token(req).await) });
    crate::ui::register(app);
}

/// Runs a handler and turns its error into the JSON error answer.
async fn answer<F, Fut>(req: Request<State>, handler: F) -> tide::Result
where
    F: FnOnce(Request<State>) -> Fut,
    Fut: Future<Output = Result<Response, ApiError>>,
{
    Ok(handler(req).await.unwrap_or_else(ApiError::into_response))
}

fn ok(value: serde_json::Value) -> Result<Response, ApiError> {
    with_status(200, value)
}

fn with_status(status: u16, value: serde_json::Value) -> Result<Response, ApiError> {
    let mut response = Response::new(status);
    response.set_content_type(tide::http::mime::JSON);
    response.set_body(value.to_string());
    Ok(response)
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes: 413 beyond it, 400
/// for anything that is not the expected JSON (tide's `body_json` reads
/// without a limit and answers 422).
async fn body<T: DeserializeOwned>(req: &mut Request<State>) -> Result<T, ApiError> {
    let too_large =
        || ApiError::new(413, "payload_too_large", format!("the request body is over the {MAX_BODY}-byte limit"));
    if req.len().is_some_and(|len| len > MAX_BODY) {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    req.take_body()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| ApiError::bad_request("bad_body", format!("the request body could not be read: {e}")))?;
    if bytes.len() > MAX_BODY {
        return Err(too_large());
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => {
                ApiError::bad_request("invalid_field", format!("the request body is not as expected: {e}"))
            }
            _ => ApiError::bad_request("invalid_json", format!("the request body is not valid JSON: {e}")),
        }
    })
}

fn peer_id(s: &str) -> Result<PeerId, ApiError> {
    s.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_peer_id",
            format!("{s:?} is not a peer ID (40 lowercase hexadecimal characters)"),
        )
    })
}

fn conversation_id(req: &Request<State>) -> Result<ConversationId, ApiError> {
    let raw = req.param("id").unwrap_or_default();
    raw.parse().map_err(|_| ApiError::bad_request("invalid_id", format!("{raw:?} is not a conversation ID (a UUID)")))
}

fn message_id(raw: &str) -> Result<MessageId, ApiError> {
    raw.parse().map_err(|_| ApiError::bad_request("invalid_id", format!("{raw:?} is not a message ID (a UUID)")))
}

async fn command(req: &Request<State>, command: Command) -> Result<CommandOutcome, ApiError> {
    Ok(req.state().node().command(command).await?)
}

async fn query(req: &Request<State>, query: Query) -> Result<Answer, ApiError> {
    Ok(req.state().node().query(query).await?)
}

fn unexpected(what: &str) -> ApiError {
    ApiError::new(500, "internal", format!("the node answered a {what} with something else"))
}

fn conversation_json(req: &Request<State>, summary: &ConversationSummary) -> serde_json::Value {
    json!(ConversationView::new(summary, req.state().me()))
}

fn message_json(req: &Request<State>, message: &p2pchat_protocol::engine::Message) -> serde_json::Value {
    json!(MessageView::new(message, req.state().me()))
}

async fn list_conversations(req: Request<State>) -> Result<Response, ApiError> {
    match query(&req, Query::Conversations).await? {
        Answer::Conversations(all) => {
            let list: Vec<_> = all.iter().map(|s| conversation_json(&req, s)).collect();
            ok(json!({ "conversations": list }))
        }
        _ => Err(unexpected("conversation list")),
    }
}

async fn create_conversation(mut req: Request<State>) -> Result<Response, ApiError> {
    let request: PeerRequest = body(&mut req).await?;
    let peer = peer_id(&request.peer_id)?;
    match command(&req, Command::CreateConversation { peer }).await? {
        CommandOutcome::Conversation(conversation) => {
            get_summary(&req, conversation.id).await.and_then(|s| ok(conversation_json(&req, &s)))
        }
        _ => Err(unexpected("new conversation")),
    }
}

async fn get_summary(req: &Request<State>, id: ConversationId) -> Result<ConversationSummary, ApiError> {
    match query(req, Query::Conversation(id)).await? {
        Answer::Conversation(summary) => Ok(summary),
        _ => Err(unexpected("conversation")),
    }
}

async fn get_conversation(req: Request<State>) -> Result<Response, ApiError> {
    let id = conversation_id(&req)?;
    let summary = get_summary(&req, id).await?;
    ok(conversation_json(&req, &summary))
}

async fn delete_conversation(req: Request<State>) -> Result<Response, ApiError> {
    let id = conversation_id(&req)?;
    command(&req, Command::DeleteConversation { conversation: id }).await?;
    ok(json!({ "conversation_id": id.to_string(), "deleted": true }))
}

async fn mark_conversation_read(req: Request<State>) -> Result<Response, ApiError> {
    let id = conversation_id(&req)?;
    command(&req, Command::MarkConversationRead { conversation: id }).await?;
    let summary = get_summary(&req, id).await?;
    ok(conversation_json(&req, &summary))
}

#[derive(serde::Deserialize)]
struct PageQuery {
    limit: Option<String>,
    before: Option<String>,
}

async fn list_messages(req: Request<State>) -> Result<Response, ApiError> {
    let id = conversation_id(&req)?;
    let page: PageQuery = req
        .query()
        .map_err(|_| ApiError::bad_request("invalid_query", "the query string is malformed; use ?limit=&before="))?;
    let limit = match page.limit.as_deref() {
        None => 50,
        Some(raw) => match raw.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_limit",
                    format!("limit must be a whole number from 1 to {MAX_PAGE}; got {raw:?}"),
                ))
            }
        },
    };
    let before = page.before.as_deref().map(message_id).transpose()?;
    match query(&req, Query::Messages { conversation: id, before, limit }).await? {
        Answer::Messages { messages, more } => {
            let next_cursor = more.then(|| messages.last().map(|m| m.id.to_string())).flatten();
            let list: Vec<_> = messages.iter().map(|m| message_json(&req, m)).collect();
            ok(json!({ "messages": list, "next_cursor": next_cursor }))
        }
        _ => Err(unexpected("message page")),
    }
}

async fn send_message(mut req: Request<State>) -> Result<Response, ApiError> {
    let id = conversation_id(&req)?;
    let request: SendRequest = body(&mut req).await?;
    match command(&req, Command::SendMessage { conversation: id, content: request.content }).await? {
        CommandOutcome::Message(m) => ok(json!({ "message_id": m.id.to_string(), "message": message_json(&req, &m) })),
        _ => Err(unexpected("sent message")),
    }
}

async fn mark_message_read(req: Request<State>) -> Result<Response, ApiError> {
    let id = message_id(req.param("id").unwrap_or_default())?;
    command(&req, Command::MarkMessageRead { message: id }).await?;
    match query(&req, Query::Message(id)).await? {
        Answer::Message(m) => ok(message_json(&req, &m)),
        _ => Err(unexpected("message")),
    }
}

async fn retry_message(req: Request<State>) -> Result<Response, ApiError> {
    let id = message_id(req.param("id").unwrap_or_default())?;
    match command(&req, Command::RetryMessage { message: id }).await? {
        CommandOutcome::Message(m) => ok(json!({ "message_id": m.id.to_string(), "message": message_json(&req, &m) })),
        _ => Err(unexpected("retried message")),
    }
}

async fn create_group(mut req: Request<State>) -> Result<Response, ApiError> {
    let request: GroupRequest = body(&mut req).await?;
    let members = request.members.iter().map(|m| peer_id(m)).collect::<Result<Vec<_>, _>>()?;
    match command(&req, Command::CreateGroup { name: request.group_name, members }).await? {
        CommandOutcome::Conversation(conversation) => {
            get_summary(&req, conversation.id).await.and_then(|s| ok(conversation_json(&req, &s)))
        }
        _ => Err(unexpected("new group")),
    }
}

async fn send_group_message(mut req: Request<State>) -> Result<Response, ApiError> {
    let id = conversation_id(&req)?;
    let request: SendRequest = body(&mut req).await?;
    match command(&req, Command::SendGroupMessage { group: id, content: request.content }).await? {
        CommandOutcome::Message(m) => ok(json!({ "message_id": m.id.to_string() })),
        _ => Err(unexpected("sent group message")),
    }
}

async fn members_json(req: &Request<State>, id: ConversationId) -> Result<serde_json::Value, ApiError> {
    match query(req, Query::Members(id)).await? {
        Answer::Members(members) => {
            let group = id.to_string();
            let list: Vec<_> = members.iter().map(|m| MemberView::new(&group, m)).collect();
            Ok(json!({ "members": list }))
        }
        _ => Err(unexpected("member list")),
    }
}

async fn invite(mut req: Request<State>) -> Result<Response, ApiError> {
    let id = conversation_id(&req)?;
    let request: PeerRequest = body(&mut req).await?;
    let peer = peer_id(&request.peer_id)?;
    command(&req, Command::Invite { group: id, peer }).await?;
    ok(members_json(&req, id).await?)
}

async fn leave(req: Request<State>) -> Result<Response, ApiError> {
    let id = conversation_id(&req)?;
    command(&req, Command::Leave { group: id }).await?;
    ok(json!({ "conversation_id": id.to_string(), "left": true }))
}

async fn invitations(req: Request<State>) -> Result<Response, ApiError> {
    match query(&req, Query::Invitations).await? {
        Answer::Invitations(all) => {
            ok(json!({ "invitations": all.iter().map(InvitationView::new).collect::<Vec<_>>() }))
        }
        _ => Err(unexpected("invitation list")),
    }
}

async fn accept_invitation(req: Request<State>) -> Result<Response, ApiError> {
    let id = conversation_id(&req)?;
    match command(&req, Command::AcceptInvitation { group: id }).await? {
        CommandOutcome::Conversation(conversation) => {
            get_summary(&req, conversation.id).await.and_then(|s| ok(conversation_json(&req, &s)))
        }
        _ => Err(unexpected("joined group")),
    }
}

async fn decline_invitation(req: Request<State>) -> Result<Response, ApiError> {
    let id = conversation_id(&req)?;
    command(&req, Command::DeclineInvitation { group: id }).await?;
    ok(json!({ "conversation_id": id.to_string(), "declined": true }))
}

async fn members(req: Request<State>) -> Result<Response, ApiError> {
    let id = conversation_id(&req)?;
    ok(members_json(&req, id).await?)
}

async fn key_exchange(mut req: Request<State>) -> Result<Response, ApiError> {
    let request: PeerRequest = body(&mut req).await?;
    let peer = peer_id(&request.peer_id)?;
    command(&req, Command::InitiateKeyExchange { peer }).await?;
    with_status(202, json!({ "peer_id": peer.to_string(), "status": "initiated" }))
}

async fn unread(req: Request<State>) -> Result<Response, ApiError> {
    match query(&req, Query::UnreadTotal).await? {
        Answer::Unread(n) => ok(json!({ "unread_count": n })),
        _ => Err(unexpected("unread count")),
    }
}

async fn peers(req: Request<State>) -> Result<Response, ApiError> {
    let peers = req.state().node().peers().await?;
    ok(json!({ "peers": peers }))
}

async fn relay_status(req: Request<State>) -> Result<Response, ApiError> {
    ok(json!(req.state().node().relay_status()))
}

async fn node(req: Request<State>) -> Result<Response, ApiError> {
    ok(json!(req.state().node().info()))
}

async fn openapi(_req: Request<State>) -> Result<Response, ApiError> {
    let mut response = Response::new(200);
    response.set_content_type(tide::http::mime::JSON);
    response.set_body(crate::OPENAPI);
    Ok(response)
}

/// `GET /auth?code=...`: spends a one-time code, sets the token cookie
/// (HttpOnly, this port's name) and opens the page.
fn login(req: &Request<State>) -> Response {
    let code = req.url().query_pairs().find(|(k, _)| k == "code").map(|(_, v)| v.into_owned());
    let state = req.state();
    if !code.is_some_and(|c| state.redeem(&c)) {
        return ApiError::new(
            401,
            "invalid_login_link",
            "this login link is unknown, used or expired; `p2pchat token` prints the token, and a restarted node prints a new link",
        )
        .into_response();
    }
    let mut response = Response::new(303);
    response.insert_header("Location", "/");
    response.insert_header("Set-Cookie", token_cookie(state));
    response
}

/// The cookie that carries the token for this node's page.
fn token_cookie(state: &State) -> String {
    format!("{}={}; HttpOnly; SameSite=Strict; Path=/", state.cookie_name(), state.token())
}

/// `POST /auth` with `{"token": "..."}`: the page's own login, for when the
/// printed link is spent or expired; sets the same cookie as the link.
async fn login_with_token(mut req: Request<State>) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TokenLogin {
        token: String,
    }
    let login: TokenLogin = match body(&mut req).await {
        Ok(login) => login,
        Err(e) => return e.into_response(),
    };
    let state = req.state();
    if !state.token_matches(login.token.trim()) {
        return ApiError::new(401, "unauthorized", "the token is wrong; `p2pchat token` prints this node's")
            .into_response();
    }
    let mut response = Response::new(204);
    response.insert_header("Set-Cookie", token_cookie(state));
    response
}
