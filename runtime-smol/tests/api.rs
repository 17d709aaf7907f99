//! Every endpoint over real HTTP against real nodes (in-process, over real
//! QUIC and SQLite), with each error answer, the access checks and the
//! WebSocket.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use p2pchat::node::{Node, NodeConfig};
use p2pchat_protocol::engine::EngineConfig;
use p2pchat_storage_sqlite::Durability;
use serde_json::json;
use support::{eventually, ws_connect, Answer, Client, TempDir};

struct ApiNode {
    node: Node,
    client: Client,
    _dir: TempDir,
}

impl ApiNode {
    fn start(name: &str) -> Self {
        let dir = TempDir::new(name);
        let node = Node::start(NodeConfig {
            data_dir: dir.0.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
            no_direct: false,
            public_addrs: Vec::new(),
            // Every peer is on loopback.
            address_policy: p2pchat_protocol::address::AddressPolicy::AllowPrivate,
            passphrase: None,
            durability: Durability::Normal,
            engine: EngineConfig {
                confirmation_timeout_ms: 300,
                retry_backoff_ms: 100,
                key_exchange_timeout_ms: 500,
                max_retries: 1,
                ..EngineConfig::default()
            },
            relays: Vec::new(),
        })
        .unwrap();
        let api = p2pchat::api::start(&node.handle(), "127.0.0.1:0".parse().unwrap(), &dir.0, Vec::new()).unwrap();
        let token = std::fs::read_to_string(dir.0.join(p2pchat::api::TOKEN_FILE)).unwrap();
        Self { node, client: Client { addr: api.addr, token }, _dir: dir }
    }

    fn peer(&self) -> String {
        self.node.handle().peer_id().to_string()
    }
}

/// Nodes that know each other's direct addresses.
fn nodes(names: &[&str]) -> Vec<ApiNode> {
    let nodes: Vec<ApiNode> = names.iter().map(|n| ApiNode::start(n)).collect();
    for a in &nodes {
        for b in &nodes {
            if a.peer() != b.peer() {
                a.node.handle().add_peer_address(b.node.handle().peer_id(), b.node.handle().listen_addr());
            }
        }
    }
    nodes
}

fn message_status(client: &Client, conversation: &str, id: &str) -> Option<String> {
    let page = client.get(&format!("/api/chat/conversations/{conversation}/messages?limit=500"));
    page.body["messages"]
        .as_array()?
        .iter()
        .find(|m| m["message_id"] == id)
        .map(|m| m["status"].as_str().unwrap().into())
}

#[test]
fn one_to_one_endpoints_and_their_errors() {
    let n = nodes(&["one-alice", "one-bob"]);
    let (alice, bob) = (&n[0].client, &n[1].client);

    // The node, its peers and its relay.
    let info = alice.get("/api/node");
    assert_eq!(info.status, 200);
    assert_eq!(info.body["peer_id"], n[0].peer());
    assert_eq!(info.body["direct"], true);
    assert_eq!(
        alice.get("/api/relay/status").body,
        json!({"configured": false, "relay": null, "connected": false, "relays": []})
    );
    assert_eq!(info.body["relays"], json!([]));
    // Bob's address was given to alice: nothing has been sent yet.
    let peers = alice.get("/api/peers").body;
    let bob_path = peers["peers"].as_array().unwrap().iter().find(|p| p["peer_id"] == n[1].peer()).cloned();
    let bob_path = bob_path.unwrap_or_else(|| panic!("bob is listed: {peers}"));
    assert_eq!(bob_path["address_source"], "given", "{bob_path}");
    assert!(bob_path["address"].is_string(), "{bob_path}");
    let doc = alice.get("/api/openapi.json");
    assert_eq!((doc.status, doc.body["openapi"].as_str()), (200, Some("3.0.3")));

    // Create: the reference's shape.
    let created = alice.post("/api/chat/conversations", json!({"peer_id": n[1].peer()}));
    assert_eq!(created.status, 200, "{:?}", created.body);
    assert_eq!(created.body["conversation_type"], "1on1");
    assert_eq!(created.body["peer_id"], n[1].peer());
    assert_eq!(created.body["unread_count"], 0);
    let c = created.body["conversation_id"].as_str().unwrap().to_owned();
    assert_eq!(alice.get(&format!("/api/chat/conversations/{c}")).body["conversation_id"], c);

    // Send: 1:1 sends return the message.
    let sent = alice.post(&format!("/api/chat/conversations/{c}/messages"), json!({"content": "hello bob"}));
    assert_eq!(sent.status, 200, "{:?}", sent.body);
    let first = sent.body["message_id"].as_str().unwrap().to_owned();
    assert_eq!(sent.body["message"]["message_id"], first.as_str());
    assert_eq!(sent.body["message"]["content"], "hello bob");
    assert_eq!(sent.body["message"]["sender_peer_id"], n[0].peer());
    eventually("delivered", || (message_status(alice, &c, &first)? == "delivered").then_some(()));
    for k in 0..4 {
        alice.post(&format!("/api/chat/conversations/{c}/messages"), json!({"content": format!("more {k}")}));
    }

    // Bob sees them, unread, and pages newest first.
    eventually("bob has 5", || (bob.get("/api/chat/unread").body["unread_count"] == 5).then_some(()));
    let list = bob.get("/api/chat/conversations");
    let convs = list.body["conversations"].as_array().unwrap();
    assert_eq!(convs.len(), 1);
    assert_eq!(convs[0]["unread_count"], 5);
    assert_eq!(convs[0]["last_message"]["content"], "more 3");
    let page = bob.get(&format!("/api/chat/conversations/{c}/messages?limit=2"));
    let texts: Vec<&str> =
        page.body["messages"].as_array().unwrap().iter().map(|m| m["content"].as_str().unwrap()).collect();
    assert_eq!(texts, ["more 3", "more 2"]);
    let cursor = page.body["next_cursor"].as_str().unwrap().to_owned();
    // Exactly as many as are left: the last page is full, and says it is last.
    let rest = bob.get(&format!("/api/chat/conversations/{c}/messages?limit=3&before={cursor}"));
    let texts: Vec<&str> =
        rest.body["messages"].as_array().unwrap().iter().map(|m| m["content"].as_str().unwrap()).collect();
    assert_eq!(texts, ["more 1", "more 0", "hello bob"]);
    assert_eq!(rest.body["next_cursor"], serde_json::Value::Null, "the last page has no cursor");

    // Read one, then the rest; alice sees "read".
    let read = bob.post_empty(&format!("/api/chat/messages/{first}/read"));
    assert_eq!((read.status, read.body["status"].as_str()), (200, Some("read")));
    eventually("read at alice", || (message_status(alice, &c, &first)? == "read").then_some(()));
    let all_read = bob.post_empty(&format!("/api/chat/conversations/{c}/read"));
    assert_eq!((all_read.status, all_read.body["unread_count"].as_u64()), (200, Some(0)));
    assert_eq!(bob.get("/api/chat/unread").body["unread_count"], 0);

    // Key exchange.
    let kx = alice.post("/api/chat/key-exchange", json!({"peer_id": n[1].peer()}));
    assert_eq!((kx.status, kx.body["status"].as_str()), (202, Some("initiated")));

    // 400s.
    let unknown_conv = "00000000-0000-4000-8000-000000000000";
    let cases: Vec<(Answer, u16, &str)> = vec![
        (alice.post("/api/chat/conversations", json!({"peer_id": "not-hex"})), 400, "invalid_peer_id"),
        (alice.post("/api/chat/conversations", json!({})), 400, "invalid_field"),
        (alice.request("POST", "/api/chat/conversations", Some(b"{\"peer_id\": "), &[]), 400, "invalid_json"),
        (alice.post("/api/chat/conversations", json!({"peer_id": n[0].peer()})), 400, "self_conversation"),
        (alice.post(&format!("/api/chat/conversations/{c}/messages"), json!({"content": ""})), 400, "empty_content"),
        (
            alice.post(&format!("/api/chat/conversations/{c}/messages"), json!({"content": "x".repeat(64 * 1024 + 1)})),
            400,
            "content_too_large",
        ),
        (alice.get("/api/chat/conversations/not-a-uuid"), 400, "invalid_id"),
        (alice.get(&format!("/api/chat/conversations/{c}/messages?limit=0")), 400, "invalid_limit"),
        (alice.get(&format!("/api/chat/conversations/{c}/messages?limit=x")), 400, "invalid_limit"),
        (alice.get(&format!("/api/chat/conversations/{c}/messages?before=zz")), 400, "invalid_id"),
        // 404s.
        (alice.get(&format!("/api/chat/conversations/{unknown_conv}")), 404, "not_found"),
        (alice.post_empty(&format!("/api/chat/messages/{unknown_conv}/read")), 404, "not_found"),
        (alice.get(&format!("/api/chat/groups/{c}/members")), 404, "not_found"),
        (alice.get(&format!("/api/chat/groups/{unknown_conv}/members")), 404, "not_found"),
        (alice.post(&format!("/api/chat/groups/{unknown_conv}/messages"), json!({"content": "hi"})), 404, "not_found"),
        (
            alice.post(&format!("/api/chat/groups/{unknown_conv}/invite"), json!({"peer_id": n[1].peer()})),
            404,
            "not_found",
        ),
        (alice.post_empty(&format!("/api/chat/groups/{unknown_conv}/leave")), 404, "not_found"),
        (alice.post_empty(&format!("/api/chat/messages/{unknown_conv}/retry")), 404, "not_found"),
        (alice.delete(&format!("/api/chat/conversations/{unknown_conv}")), 404, "not_found"),
        (alice.get("/api/no/such/route"), 404, "not_found"),
        // 405, 409, 413.
        (alice.request("PUT", "/api/chat/unread", None, &[]), 405, "method_not_allowed"),
        // A method the HTTP parser does not know gets the same answer.
        (alice.request("QUERY", "/api/chat/unread", None, &[]), 405, "method_not_allowed"),
        (alice.request("GET", &format!("/api/chat/unread?{}", "a".repeat(9000)), None, &[]), 431, "headers_too_large"),
        (alice.post_empty(&format!("/api/chat/messages/{first}/retry")), 409, "not_retryable"),
        (
            alice.request(
                "POST",
                &format!("/api/chat/conversations/{c}/messages"),
                Some(format!("{{\"content\": \"{}\"}}", "x".repeat(p2pchat_http_tide::MAX_BODY)).as_bytes()),
                &[],
            ),
            413,
            "payload_too_large",
        ),
        // A chunked body has no length up front: it is cut off at the cap.
        (
            alice.request(
                "POST",
                &format!("/api/chat/conversations/{c}/messages"),
                Some(&chunked(format!("{{\"content\": \"{}\"}}", "x".repeat(p2pchat_http_tide::MAX_BODY)).as_bytes())),
                &[("Transfer-Encoding", "chunked")],
            ),
            413,
            "payload_too_large",
        ),
        (
            alice.post(
                "/api/chat/groups",
                json!({"group_name": "n".repeat(257), "members": [n[1].peer(), "cd".repeat(20)]}),
            ),
            400,
            "group_name_too_long",
        ),
        // The WebSocket route refuses what is not a proper upgrade.
        (alice.get("/api/ws"), 426, "upgrade_required"),
        (
            alice.request(
                "GET",
                "/api/ws",
                None,
                &[("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")],
            ),
            400,
            "invalid_websocket_handshake",
        ),
        (
            alice.request(
                "GET",
                "/api/ws",
                None,
                &[
                    ("Connection", "Upgrade"),
                    ("Upgrade", "websocket"),
                    ("Sec-WebSocket-Version", "8"),
                    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ],
            ),
            426,
            "unsupported_websocket_version",
        ),
    ];
    for (answer, status, code) in cases {
        assert_eq!((answer.status, answer.code()), (status, code), "{:?}", answer.body);
        assert!(answer.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    // Delete.
    let deleted = bob.delete(&format!("/api/chat/conversations/{c}"));
    assert_eq!((deleted.status, deleted.body["deleted"].as_bool()), (200, Some(true)));
    assert_eq!(bob.get(&format!("/api/chat/conversations/{c}")).status, 404);
}

#[test]
fn a_failed_message_can_be_retried() {
    let n = nodes(&["retry-alice"]);
    let alice = &n[0].client;
    // A peer nobody knows: the key exchange fails, and the message with it.
    let nowhere = "ab".repeat(20);
    let c = alice.post("/api/chat/conversations", json!({"peer_id": nowhere})).body["conversation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let sent = alice.post(&format!("/api/chat/conversations/{c}/messages"), json!({"content": "anyone?"}));
    let id = sent.body["message_id"].as_str().unwrap().to_owned();
    eventually("failed", || (message_status(alice, &c, &id)? == "failed").then_some(()));
    let page = alice.get(&format!("/api/chat/conversations/{c}/messages"));
    let failed = page.body["messages"].as_array().unwrap().iter().find(|m| m["message_id"] == id.as_str()).cloned();
    assert!(failed.unwrap()["failure_reason"].as_str().is_some_and(|r| !r.is_empty()), "a failure says why");
    let retried = alice.post_empty(&format!("/api/chat/messages/{id}/retry"));
    assert_eq!(retried.status, 200, "{:?}", retried.body);
    assert_ne!(retried.body["message_id"], id.as_str(), "the copy has a new ID");
    assert_eq!(retried.body["message"]["content"], "anyone?");
}

#[test]
fn groups_through_the_api() {
    let n = nodes(&["group-alice", "group-bob", "group-carol", "group-dave"]);
    let (alice, bob, carol) = (&n[0].client, &n[1].client, &n[2].client);
    let too_few = alice.post("/api/chat/groups", json!({"group_name": "pair", "members": [n[1].peer()]}));
    assert_eq!((too_few.status, too_few.code()), (400, "too_few_members"));
    let created =
        alice.post("/api/chat/groups", json!({"group_name": "Project Team", "members": [n[1].peer(), n[2].peer()]}));
    assert_eq!(created.status, 200, "{:?}", created.body);
    assert_eq!(created.body["conversation_type"], "group");
    assert_eq!(created.body["group_name"], "Project Team");
    let g = created.body["conversation_id"].as_str().unwrap().to_owned();
    // Neither bob nor carol ever wrote to alice: the invitation waits for
    // each to accept, and nothing of the group is there until then.
    for member in [bob, carol] {
        let waiting = eventually("the invitation arrives", || {
            let list = member.get("/api/chat/invitations").body;
            (!list["invitations"].as_array()?.is_empty()).then_some(list)
        });
        let invitation = &waiting["invitations"][0];
        assert_eq!(invitation["conversation_id"], g.as_str());
        assert_eq!(
            (invitation["group_name"].as_str(), invitation["invited_by"].as_str()),
            (Some("Project Team"), Some(n[0].peer().as_str()))
        );
        assert_eq!(invitation["members"].as_array().unwrap().len(), 3);
        assert_eq!(member.get(&format!("/api/chat/conversations/{g}")).status, 404, "not joined yet");
        let accepted = member.post_empty(&format!("/api/chat/groups/{g}/accept"));
        assert_eq!(accepted.status, 200, "{:?}", accepted.body);
        assert_eq!(
            (accepted.body["conversation_id"].as_str(), accepted.body["group_name"].as_str()),
            (Some(g.as_str()), Some("Project Team"))
        );
        assert_eq!(member.get("/api/chat/invitations").body["invitations"], json!([]));
        let again = member.post_empty(&format!("/api/chat/groups/{g}/accept"));
        assert_eq!((again.status, again.code()), (404, "not_found"));
    }
    let sent = alice.post(&format!("/api/chat/groups/{g}/messages"), json!({"content": "hello team"}));
    assert_eq!(sent.status, 200);
    assert_eq!(sent.body.as_object().unwrap().keys().collect::<Vec<_>>(), ["message_id"], "group sends return the ID");
    for member in [bob, carol] {
        eventually("the group message arrives", || {
            let page = member.get(&format!("/api/chat/conversations/{g}/messages"));
            (page.body["messages"][0]["content"] == "hello team").then_some(())
        });
    }
    let reply = bob.post(&format!("/api/chat/groups/{g}/messages"), json!({"content": "hi from bob"}));
    assert_eq!(reply.status, 200);
    eventually("bob's reply reaches carol", || {
        let page = carol.get(&format!("/api/chat/conversations/{g}/messages"));
        page.body["messages"].as_array()?.iter().any(|m| m["content"] == "hi from bob").then_some(())
    });
    let members = alice.get(&format!("/api/chat/groups/{g}/members")).body;
    let list = members["members"].as_array().unwrap();
    assert_eq!(list.len(), 3);
    assert!(list.iter().any(|m| m["peer_id"] == n[0].peer() && m["is_admin"] == true));

    // Invites: not by a member, not twice.
    let by_member = bob.post(&format!("/api/chat/groups/{g}/invite"), json!({"peer_id": n[3].peer()}));
    assert_eq!((by_member.status, by_member.code()), (403, "not_admin"));
    let twice = alice.post(&format!("/api/chat/groups/{g}/invite"), json!({"peer_id": n[1].peer()}));
    assert_eq!((twice.status, twice.code()), (409, "already_member"));
    let invited = alice.post(&format!("/api/chat/groups/{g}/invite"), json!({"peer_id": n[3].peer()}));
    assert_eq!(invited.status, 200, "{:?}", invited.body);
    assert_eq!(invited.body["members"].as_array().unwrap().len(), 4);
    // Dave declines: alice, and through her bob, see him go; dave keeps nothing.
    let dave = &n[3].client;
    eventually("dave's invitation arrives", || {
        let list = dave.get("/api/chat/invitations").body;
        (!list["invitations"].as_array()?.is_empty()).then_some(())
    });
    let declined = dave.post_empty(&format!("/api/chat/groups/{g}/decline"));
    assert_eq!((declined.status, declined.body["declined"].as_bool()), (200, Some(true)), "{:?}", declined.body);
    assert_eq!(dave.get("/api/chat/invitations").body["invitations"], json!([]));
    assert_eq!(dave.get(&format!("/api/chat/conversations/{g}")).status, 404);
    let twice = dave.post_empty(&format!("/api/chat/groups/{g}/decline"));
    assert_eq!((twice.status, twice.code()), (404, "not_found"));
    for (name, member) in [("alice", alice), ("bob", bob)] {
        eventually(&format!("{name} sees dave decline"), || {
            let members = member.get(&format!("/api/chat/groups/{g}/members")).body;
            members["members"]
                .as_array()?
                .iter()
                .any(|m| m["peer_id"] == n[3].peer() && m["left_at"] != 0)
                .then_some(())
        });
    }

    // Carol leaves; alice sees it.
    let left = carol.post_empty(&format!("/api/chat/groups/{g}/leave"));
    assert_eq!((left.status, left.body["left"].as_bool()), (200, Some(true)));
    eventually("alice sees carol leave", || {
        let members = alice.get(&format!("/api/chat/groups/{g}/members")).body;
        members["members"].as_array()?.iter().any(|m| m["peer_id"] == n[2].peer() && m["left_at"] != 0).then_some(())
    });
    let after = carol.post(&format!("/api/chat/groups/{g}/messages"), json!({"content": "still here?"}));
    assert_eq!((after.status, after.code()), (409, "left_group"));
}

#[test]
fn access_checks_refuse_with_reasons() {
    let n = nodes(&["access"]);
    let c = &n[0].client;
    let none = c.request("GET", "/api/chat/unread", None, &[("Authorization", "")]);
    assert_eq!((none.status, none.code()), (401, "unauthorized"));
    let wrong = c.request("GET", "/api/chat/unread", None, &[("Authorization", "Bearer 0000")]);
    assert_eq!((wrong.status, wrong.code()), (401, "unauthorized"));
    let rebound = c.request("GET", "/api/chat/unread", None, &[("Host", "attacker.example:30069")]);
    assert_eq!((rebound.status, rebound.code()), (403, "host_not_allowed"));
    let localhost = c.request("GET", "/api/chat/unread", None, &[("Host", "localhost")]);
    assert_eq!(localhost.status, 200);
    let origin = format!("http://{}", c.addr);
    let foreign = c.request("POST", "/api/chat/key-exchange", Some(b"{}"), &[("Origin", "http://attacker.example")]);
    assert_eq!((foreign.status, foreign.code()), (403, "origin_not_allowed"));
    let own = c.request(
        "POST",
        "/api/chat/key-exchange",
        Some(json!({"peer_id": "cd".repeat(20)}).to_string().as_bytes()),
        &[("Origin", &origin)],
    );
    assert_eq!(own.status, 202, "{:?}", own.body);
    // Reads from a foreign page still need the token, which it lacks.
    let read = c.request("GET", "/api/chat/unread", None, &[("Origin", "http://attacker.example")]);
    assert_eq!(read.status, 200, "a GET with the token is not state-changing");

    // The one-time login link sets an HttpOnly cookie named after the port,
    // and works once.
    let link =
        p2pchat::api::start(&n[0].node.handle(), "127.0.0.1:0".parse().unwrap(), &n[0]._dir.0, Vec::new()).unwrap();
    let url = link.login_link();
    let path = url.split_once(&link.addr.to_string()).unwrap().1.to_owned();
    let client = Client { addr: link.addr, token: String::new() };
    let first = client.request("GET", &path, None, &[("Authorization", "")]);
    assert_eq!(first.status, 303);
    let cookie = first.header("Set-Cookie").unwrap().to_owned();
    let name = format!("p2pchat_token_{}=", link.addr.port());
    assert!(cookie.starts_with(&name) && cookie.contains("HttpOnly"), "{cookie}");
    let again = client.request("GET", &path, None, &[("Authorization", "")]);
    assert_eq!(again.status, 401, "a login link works once");
    let pair = cookie.split(';').next().unwrap();
    let with_cookie = client.request("GET", "/api/chat/unread", None, &[("Authorization", ""), ("Cookie", pair)]);
    assert_eq!(with_cookie.status, 200, "the cookie authenticates");

    // The page's own sign-in takes the token itself.
    let wrong = client.request("POST", "/auth", Some(br#"{"token": "nope"}"#), &[("Authorization", "")]);
    assert_eq!((wrong.status, wrong.code()), (401, "unauthorized"));
    let right = json!({"token": c.token}).to_string();
    let signed_in = client.request("POST", "/auth", Some(right.as_bytes()), &[("Authorization", "")]);
    assert_eq!(signed_in.status, 204);
    assert!(signed_in.header("Set-Cookie").is_some_and(|v| v.starts_with(&name) && v.contains("HttpOnly")));

    // The page loads without a token, under a strict policy, and its files
    // are the ones the binary carries.
    for (path, kind) in [("/", "text/html"), ("/app.js", "text/javascript"), ("/style.css", "text/css")] {
        let asset = client.request("GET", path, None, &[("Authorization", "")]);
        assert_eq!(asset.status, 200, "{path}");
        assert!(asset.header("Content-Type").is_some_and(|t| t.starts_with(kind)), "{path}");
        let policy = asset.header("Content-Security-Policy").unwrap_or_default();
        assert!(policy.contains("script-src 'self'") && policy.contains("default-src 'none'"), "{policy}");
    }
    let foreign_page = client.request("GET", "/", None, &[("Authorization", ""), ("Host", "evil.example")]);
    assert_eq!(foreign_page.status, 403, "the page, too, is only served under a loopback name");
}

/// `body` in HTTP/1.1 chunked encoding, in 64 KiB chunks.
fn chunked(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in body.chunks(64 * 1024) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A request is answered (here refused, 401) only after its body is read,
/// and the next request on the same keep-alive connection is answered too.
#[test]
fn a_request_is_answered_only_after_its_body_and_the_connection_goes_on() {
    use std::io::{BufRead, BufReader, Read, Write};
    let n = nodes(&["early-answer"]);
    let c = &n[0].client;
    let stream = std::net::TcpStream::connect(c.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let body = r#"{"peer_id": "00"}"#;
    let head = format!(
        "POST /api/chat/conversations HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        c.addr,
        body.len()
    );
    let read_answer = |reader: &mut BufReader<std::net::TcpStream>| -> u16 {
        let mut line = String::new();
        reader.read_line(&mut line).expect("an answer, not a hang");
        let status = line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut length = 0;
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.trim().is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut rest = vec![0; length];
        reader.read_exact(&mut rest).unwrap();
        status
    };
    // The head alone: no answer may come before the body, or the HTTP layer
    // (async-h1) would discard the late body through a buffer that can take
    // the client's next request with it.
    writer.write_all(head.as_bytes()).unwrap();
    reader.get_ref().set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut early = [0u8; 1];
    let answered_early = matches!(reader.get_mut().peek(&mut early), Ok(n) if n > 0);
    assert!(!answered_early, "the node answered before the request's body arrived");
    reader.get_ref().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    writer.write_all(body.as_bytes()).unwrap();
    assert_eq!(read_answer(&mut reader), 401, "no token");
    let next =
        format!("GET /api/chat/unread HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\r\n", c.addr, c.token);
    writer.write_all(next.as_bytes()).unwrap();
    assert_eq!(read_answer(&mut reader), 200, "the next request on the connection is answered");
}

fn next_event(ws: &mut tungstenite::WebSocket<std::net::TcpStream>) -> serde_json::Value {
    loop {
        match ws.read_message().expect("an event within 20 s") {
            tungstenite::Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            _ => continue,
        }
    }
}

#[test]
fn the_websocket_carries_every_event_of_an_exchange() {
    let mut n = nodes(&["ws-alice", "ws-bob", "ws-carol", "ws-dave"]);
    let dave = n.pop().unwrap();
    let (alice, bob) = (&n[0].client, &n[1].client);
    let mut alice_ws = ws_connect(alice, "");
    let mut bob_ws = ws_connect(bob, "");
    let mut carol_ws = ws_connect(&n[2].client, "?types=chat.group.invite");
    let c = alice.post("/api/chat/conversations", json!({"peer_id": n[1].peer()})).body["conversation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let id = alice.post(&format!("/api/chat/conversations/{c}/messages"), json!({"content": "hi"})).body["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let received = loop {
        let e = next_event(&mut bob_ws);
        if e["type"] == "chat.message.received" {
            break e;
        }
    };
    // The reference's payload fields.
    for field in ["message_id", "conversation_id", "sender_peer_id", "content", "timestamp", "status"] {
        assert!(received["payload"].get(field).is_some(), "received lacks {field}: {received}");
    }
    assert_eq!(received["payload"]["status"], "delivered");
    bob.post_empty(&format!("/api/chat/messages/{id}/read"));
    let mut seen = std::collections::BTreeSet::new();
    while !seen.contains("chat.message.read") {
        let e = next_event(&mut alice_ws);
        seen.insert(e["type"].as_str().unwrap().to_owned());
        if e["type"] == "chat.message.delivered" {
            assert_eq!(e["payload"]["message_id"], id.as_str());
        }
    }
    // `sent`: a message queued for a peer that went away after the key
    // exchange. `failed`: a message to a peer no one knows.
    let d = alice.post("/api/chat/conversations", json!({"peer_id": dave.peer()})).body["conversation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let to_dave = |text: &str| {
        alice.post(&format!("/api/chat/conversations/{d}/messages"), json!({"content": text})).body["message_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let first_to_dave = to_dave("hi dave");
    eventually("dave has it", || (message_status(alice, &d, &first_to_dave)? == "delivered").then_some(()));
    dave.node.shutdown();
    to_dave("are you there?");
    let nowhere = alice.post("/api/chat/conversations", json!({"peer_id": "ab".repeat(20)})).body["conversation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    alice.post(&format!("/api/chat/conversations/{nowhere}/messages"), json!({"content": "anyone?"}));
    while !(seen.contains("chat.message.sent") && seen.contains("chat.message.failed")) {
        let e = next_event(&mut alice_ws);
        seen.insert(e["type"].as_str().unwrap().to_owned());
        if e["type"] == "chat.message.failed" {
            assert!(e["payload"]["failure_reason"].as_str().is_some_and(|r| !r.is_empty()));
        }
    }
    for kind in [
        "chat.conversation.created",
        "chat.conversation.updated",
        "chat.message.created",
        "chat.message.sent",
        "chat.message.delivered",
        "chat.key_exchange.complete",
        "chat.message.read",
        "chat.message.failed",
    ] {
        assert!(seen.contains(kind), "alice saw no {kind}: {seen:?}");
    }
    // A group: carol, subscribed to invites only, gets just that.
    alice.post("/api/chat/groups", json!({"group_name": "g", "members": [n[1].peer(), n[2].peer()]}));
    let invite = next_event(&mut carol_ws);
    assert_eq!(invite["type"], "chat.group.invite");
    assert_eq!(invite["payload"]["group_name"], "g");
    assert_eq!(invite["payload"]["invited_by"], n[0].peer());
    assert_eq!(invite["payload"]["pending"], true, "carol never wrote to alice");
    let g = invite["payload"]["conversation_id"].as_str().unwrap().to_owned();
    assert_eq!(n[2].client.post_empty(&format!("/api/chat/groups/{g}/accept")).status, 200);
    let joined = next_event(&mut carol_ws);
    assert_eq!(
        (joined["type"].as_str(), joined["payload"]["pending"].as_bool()),
        (Some("chat.group.invite"), Some(false))
    );
    // Subscriptions can change: carol adds the messages she receives,
    // drops invites, and then gets a group message and nothing else.
    carol_ws
        .write_message(tungstenite::Message::Text(
            json!({"type": "subscribe", "types": ["chat.message.received"]}).to_string(),
        ))
        .unwrap();
    let changed = next_event(&mut carol_ws);
    assert_eq!(changed["type"], "subscribed");
    assert_eq!(changed["payload"]["types"], json!(["chat.group.invite", "chat.message.received"]));
    carol_ws
        .write_message(tungstenite::Message::Text(
            json!({"type": "unsubscribe", "types": ["chat.group.invite"]}).to_string(),
        ))
        .unwrap();
    assert_eq!(next_event(&mut carol_ws)["payload"]["types"], json!(["chat.message.received"]));
    alice.post(&format!("/api/chat/groups/{g}/messages"), json!({"content": "to the group"}));
    let got = next_event(&mut carol_ws);
    assert_eq!(
        (got["type"].as_str(), got["payload"]["content"].as_str()),
        (Some("chat.message.received"), Some("to the group"))
    );
    // An empty `?types=` is every type.
    let mut everything = ws_connect(alice, "?types=");
    alice.post("/api/chat/key-exchange", json!({"peer_id": n[2].peer()}));
    // (Receipts for the group message may come first; any type is welcome.)
    while next_event(&mut everything)["type"] != "chat.key_exchange.complete" {}
    // Unknown types are refused with a reason.
    carol_ws
        .write_message(tungstenite::Message::Text(json!({"type": "subscribe", "types": ["nope"]}).to_string()))
        .unwrap();
    let refused = next_event(&mut carol_ws);
    assert_eq!(
        (refused["type"].as_str(), refused["payload"]["code"].as_str()),
        (Some("error"), Some("unknown_event_type"))
    );
    // The list changes when a conversation goes.
    bob.delete(&format!("/api/chat/conversations/{c}"));
    loop {
        let e = next_event(&mut bob_ws);
        if e["type"] == "chat.conversations.updated" {
            break;
        }
    }
    // A client's close is answered with a close frame (a clean close).
    bob_ws.close(None).unwrap();
    let answered = loop {
        match bob_ws.read_message() {
            Ok(tungstenite::Message::Close(_)) => continue,
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break true,
            Err(e) => {
                eprintln!("closing ended with {e}");
                break false;
            }
        }
    };
    assert!(answered, "the node answers a close frame before the socket ends");
}

#[test]
fn a_websocket_from_a_foreign_origin_is_refused() {
    let n = nodes(&["ws-origin"]);
    let c = &n[0].client;
    let stream = std::net::TcpStream::connect(c.addr).unwrap();
    let request = tungstenite::handshake::client::Request::builder()
        .uri(format!("ws://{}/api/ws", c.addr))
        .header("Authorization", format!("Bearer {}", c.token))
        .header("Origin", "http://attacker.example")
        .body(())
        .unwrap();
    match tungstenite::client(request, stream) {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            assert_eq!(response.status().as_u16(), 403)
        }
        other => panic!("a foreign origin must be refused: {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_websocket_asking_for_unknown_types_is_closed_with_the_reason() {
    let n = nodes(&["ws-unknown"]);
    let made_up = format!("chat.{}", "x".repeat(300));
    let mut ws = ws_connect(&n[0].client, &format!("?types=chat.message.read,{made_up}"));
    let frame = loop {
        match ws.read_message() {
            Ok(tungstenite::Message::Close(frame)) => break frame.expect("a close frame with a reason"),
            Ok(_) => continue,
            Err(e) => panic!("the socket broke before its close frame: {e}"),
        }
    };
    assert_eq!(u16::from(frame.code), 1008);
    assert!(frame.reason.starts_with("unknown event types: chat.xxx"), "{}", frame.reason);
    assert!(frame.reason.len() <= 123, "a close reason fits its frame: {} bytes", frame.reason.len());
}

#[test]
fn a_websocket_client_that_falls_behind_is_closed_and_holds_nothing_up() {
    let n = nodes(&["ws-slow"]);
    let c = &n[0].client;
    // A small receive window, so that the kernel's socket buffers (which
    // autotune to megabytes on loopback) cannot absorb what the client does
    // not read.
    let socket = rustix::net::socket(rustix::net::AddressFamily::INET, rustix::net::SocketType::STREAM, None).unwrap();
    rustix::net::sockopt::set_socket_recv_buffer_size(&socket, 4096).unwrap();
    rustix::net::connect(&socket, &c.addr).unwrap();
    let stream = std::net::TcpStream::from(socket);
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let request = tungstenite::handshake::client::Request::builder()
        .uri(format!("ws://{}/api/ws", c.addr))
        .header("Authorization", format!("Bearer {}", c.token))
        .body(())
        .unwrap();
    let mut slow = tungstenite::client(request, stream).expect("the WebSocket opens").0;
    // The client reads nothing while more events than its buffer and the
    // server's socket buffer (at most 4 MiB) hold are produced: 16 KiB
    // messages, each at least one event; the node goes on regardless.
    let handle = n[0].node.handle();
    let conversation =
        smol::block_on(handle.command(p2pchat_protocol::engine::Command::CreateConversation {
            peer: p2pchat_protocol::PeerId([0xcd; 20]),
        }))
        .unwrap();
    let p2pchat_protocol::engine::CommandOutcome::Conversation(conversation) = conversation else { panic!() };
    for k in 0..(p2pchat_http_tide::CLIENT_BUFFER + 400) {
        let content = format!("event {k} {}", "x".repeat(16 * 1024));
        smol::block_on(
            handle.command(p2pchat_protocol::engine::Command::SendMessage { conversation: conversation.id, content }),
        )
        .unwrap();
    }
    assert_eq!(c.get("/api/chat/unread").status, 200, "the API still answers");
    // Reading now, the client finds the close frame after what was sent.
    let reason = loop {
        match slow.read_message() {
            Ok(tungstenite::Message::Close(Some(frame))) => break frame.reason.into_owned(),
            Ok(tungstenite::Message::Close(None)) => panic!("closed without a reason"),
            Ok(_) => continue,
            Err(e) => panic!("the socket broke before its close frame: {e}"),
        }
    };
    assert!(reason.contains("fell behind"), "{reason}");
}
