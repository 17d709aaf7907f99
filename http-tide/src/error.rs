//! The one error shape of the API: `{"error": {"code": "...", "message": "..."}}`
//! with the HTTP status that goes with it.

use p2pchat_protocol::engine::EngineError;
use serde::Serialize;

use crate::node::NodeCallError;

/// An error answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// A stable, machine-readable code.
    pub code: &'static str,
    /// What happened and what to do, for people.
    pub message: String,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    /// An error with its status, code and message.
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    /// 400: the request is wrong in a way the message explains.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(400, code, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "not_found", message)
    }

    /// The JSON body.
    pub fn to_json(&self) -> String {
        let body = Body { error: Inner { code: self.code, message: &self.message } };
        serde_json::to_string(&body).unwrap_or_else(|_| String::from(r#"{"error":{"code":"internal","message":""}}"#))
    }

    /// As a tide response.
    pub fn into_response(self) -> tide::Response {
        let mut response = tide::Response::new(self.status);
        response.set_content_type(tide::http::mime::JSON);
        response.set_body(self.to_json());
        response
    }

    /// The error shape for a bare status (a 404 from the router, a 405, …).
    pub fn for_status(status: u16) -> Self {
        match status {
            400 => Self::bad_request("bad_request", "the request is malformed"),
            401 => Self::new(401, "unauthorized", "a valid bearer token is needed: see `p2pchat token`"),
            403 => Self::new(403, "forbidden", "this request is not allowed"),
            404 => Self::not_found("no such route or resource"),
            405 => Self::new(405, "method_not_allowed", "this route does not take that method"),
            413 => Self::new(413, "payload_too_large", "the request body is too large"),
            426 => Self::new(426, "upgrade_required", "this route answers WebSocket upgrade requests only"),
            s if s >= 500 => Self::new(s, "internal", "the node failed to answer; see its log"),
            s => Self::new(s, "error", "the request failed"),
        }
    }
}

impl From<NodeCallError> for ApiError {
    fn from(e: NodeCallError) -> Self {
        match e {
            NodeCallError::Engine(e) => e.into(),
            NodeCallError::Stopped => Self::new(503, "unavailable", "the node is shutting down"),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        let (status, code) = match &e {
            EngineError::UnknownConversation(_) | EngineError::UnknownMessage(_) => (404, "not_found"),
            // A 1:1 conversation's ID on a group route names no group.
            EngineError::NotAGroup(_) => (404, "not_found"),
            EngineError::NoInvitation(_) => (404, "not_found"),
            EngineError::EmptyContent => (400, "empty_content"),
            EngineError::ContentTooLarge { .. } => (400, "content_too_large"),
            EngineError::NotOneOnOne(_) => (400, "not_one_on_one"),
            EngineError::SelfConversation(_) => (400, "self_conversation"),
            EngineError::EmptyGroupName => (400, "empty_group_name"),
            EngineError::GroupNameTooLong { .. } => (400, "group_name_too_long"),
            EngineError::TooFewMembers { .. } => (400, "too_few_members"),
            EngineError::TooManyMembers { .. } => (400, "too_many_members"),
            EngineError::NotAdmin { .. } => (403, "not_admin"),
            EngineError::AlreadyMember(_) => (409, "already_member"),
            EngineError::NoOtherMembers(_) => (409, "no_other_members"),
            EngineError::LeftGroup(_) => (409, "left_group"),
            EngineError::NotRetryable { .. } => (409, "not_retryable"),
            EngineError::OutboxFull { .. } => (429, "outbox_full"),
            EngineError::Rejected(_) => (422, "rejected"),
            EngineError::Store(_) | EngineError::State(_) | EngineError::Group(_) => (500, "internal"),
        };
        Self::new(status, code, message)
    }
}
