//! The one error shape of the API: `{"error": {"code": "...", "message": "..."}}`
//! with the HTTP status that goes with it.

use p2pchat_protocol::engine::{EngineError, RequestError};
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
            EngineError::Request(request) => match request {
                RequestError::UnknownConversation(_) | RequestError::UnknownMessage(_) => (404, "not_found"),
                // A 1:1 conversation's ID on a group route names no group.
                RequestError::NotAGroup(_) => (404, "not_found"),
                RequestError::NoInvitation(_) => (404, "not_found"),
                RequestError::EmptyContent => (400, "empty_content"),
                RequestError::ContentTooLarge { .. } => (400, "content_too_large"),
                RequestError::NotOneOnOne(_) => (400, "not_one_on_one"),
                RequestError::SelfConversation(_) => (400, "self_conversation"),
                RequestError::EmptyGroupName => (400, "empty_group_name"),
                RequestError::GroupNameTooLong { .. } => (400, "group_name_too_long"),
                RequestError::TooFewMembers { .. } => (400, "too_few_members"),
                RequestError::TooManyMembers { .. } => (400, "too_many_members"),
                RequestError::NotAdmin { .. } => (403, "not_admin"),
                RequestError::AlreadyMember(_) => (409, "already_member"),
                RequestError::NoOtherMembers(_) => (409, "no_other_members"),
                RequestError::LeftGroup(_) => (409, "left_group"),
                RequestError::NotRetryable { .. } => (409, "not_retryable"),
                RequestError::OutboxFull { .. } => (429, "outbox_full"),
            },
            EngineError::Internal(_) => (500, "internal"),
        };
        Self::new(status, code, message)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use p2pchat_protocol::engine::{InternalError, StoreError};
    use p2pchat_protocol::{ConversationId, MessageId, PeerId, Uuid};

    use super::*;

    /// Every error the engine can give, with the status and code the API has
    /// always answered it with, and its message (the engine's own words).
    #[test]
    fn each_engine_error_keeps_its_status_code_and_message() {
        let c = ConversationId(Uuid([1; 16]));
        let m = MessageId(Uuid([2; 16]));
        let p = PeerId([3; 20]);
        let request = [
            (RequestError::UnknownConversation(c), 404, "not_found"),
            (RequestError::UnknownMessage(m), 404, "not_found"),
            (RequestError::NotAGroup(c), 404, "not_found"),
            (RequestError::NoInvitation(c), 404, "not_found"),
            (RequestError::EmptyContent, 400, "empty_content"),
            (RequestError::ContentTooLarge { len: 2, max: 1 }, 400, "content_too_large"),
            (RequestError::NotOneOnOne(c), 400, "not_one_on_one"),
            (RequestError::SelfConversation(p), 400, "self_conversation"),
            (RequestError::EmptyGroupName, 400, "empty_group_name"),
            (RequestError::GroupNameTooLong { len: 2, max: 1 }, 400, "group_name_too_long"),
            (RequestError::TooFewMembers { min: 2, got: 1 }, 400, "too_few_members"),
            (RequestError::TooManyMembers { max: 1 }, 400, "too_many_members"),
            (RequestError::NotAdmin { admin: p }, 403, "not_admin"),
            (RequestError::AlreadyMember(p), 409, "already_member"),
            (RequestError::NoOtherMembers(c), 409, "no_other_members"),
            (RequestError::LeftGroup(c), 409, "left_group"),
            (RequestError::NotRetryable { id: m, status: "delivered" }, 409, "not_retryable"),
            (RequestError::OutboxFull { peer: p, max: 1 }, 429, "outbox_full"),
        ];
        for (error, status, code) in request {
            let message = error.to_string();
            let api = ApiError::from(EngineError::from(error));
            assert_eq!((api.status, api.code, api.message), (status, code, message));
        }
        let internal = EngineError::from(StoreError::Unavailable("disk full".into()));
        assert!(matches!(internal, EngineError::Internal(InternalError::Store(_))));
        let api = ApiError::from(internal);
        assert_eq!((api.status, api.code, api.message.as_str()), (500, "internal", "storage unavailable: disk full"));
    }
}
