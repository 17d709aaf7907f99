//! The API under load: `cargo bench -p p2pchat --bench api`.
//!
//! Two nodes on loopback, each serving its API. Sixteen clients, each on one
//! keep-alive connection, `POST /api/chat/conversations/{id}/messages` to
//! alice:
//! - `latency`: at a fixed 1,000 requests per second in all, the time from
//!   each request's send to its whole answer (and, to show any queueing, from
//!   its scheduled time); once alone, and once while 100 WebSocket clients on
//!   bob each count the `chat.message.received` events and must see every
//!   message exactly once;
//! - `throughput`: as fast as the sixteen clients go.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use p2pchat::node::{Node, NodeConfig};
use p2pchat_protocol::engine::EngineConfig;
use p2pchat_storage_sqlite::Durability;

const CLIENTS: usize = 16;
const WS_CLIENTS: usize = 100;

struct ApiNode {
    node: Node,
    addr: SocketAddr,
    token: String,
}

fn start(name: &str) -> ApiNode {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("api-bench-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    let node = Node::start(NodeConfig {
        data_dir: dir.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        no_direct: false,
        public_addrs: Vec::new(),
        // Every peer is on loopback.
        address_policy: p2pchat_protocol::address::AddressPolicy::AllowPrivate,
        passphrase: None,
        durability: Durability::Normal,
        engine: EngineConfig::default(),
        relays: Vec::new(),
    })
    .unwrap();
    let api = p2pchat::api::start(&node.handle(), "127.0.0.1:0".parse().unwrap(), &dir, Vec::new()).unwrap();
    let token = std::fs::read_to_string(dir.join(p2pchat::api::TOKEN_FILE)).unwrap();
    ApiNode { node, addr: api.addr, token }
}

/// One keep-alive HTTP/1.1 connection.
struct Connection {
    addr: SocketAddr,
    token: String,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Connection {
    fn open(node: &ApiNode) -> Self {
        let stream = TcpStream::connect(node.addr).unwrap();
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Self {
            addr: node.addr,
            token: node.token.clone(),
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    /// Sends one request and reads its whole answer: (status, body).
    fn request(&mut self, method: &str, path: &str, body: &str) -> (u16, String) {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            self.token,
            body.len()
        );
        self.writer.write_all(request.as_bytes()).unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        let status: u16 = line.split(' ').nth(1).expect("a status line").parse().unwrap();
        let (mut length, mut chunked) = (0usize, false);
        loop {
            line.clear();
            self.reader.read_line(&mut line).unwrap();
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            } else if name.eq_ignore_ascii_case("transfer-encoding") && value.contains("chunked") {
                chunked = true;
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.reader.read_line(&mut line).unwrap();
                let size = usize::from_str_radix(line.trim(), 16).unwrap();
                let mut chunk = vec![0; size + 2];
                self.reader.read_exact(&mut chunk).unwrap();
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else {
            body.resize(length, 0);
            self.reader.read_exact(&mut body).unwrap();
        }
        (status, String::from_utf8(body).unwrap())
    }
}

fn json_field(body: &str, field: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(body).unwrap();
    value[field].as_str().unwrap_or_else(|| panic!("no {field} in {body}")).to_owned()
}

/// A WebSocket client on bob counting `chat.message.received` events until
/// it has seen `expected` distinct messages; returns (distinct, duplicates).
fn ws_counter(node: &ApiNode, expected: usize, ready: Arc<Barrier>) -> std::thread::JoinHandle<(usize, usize)> {
    let (addr, token) = (node.addr, node.token.clone());
    std::thread::spawn(move || {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let request = tungstenite::handshake::client::Request::builder()
            .uri(format!("ws://{addr}/api/ws?types=chat.message.received"))
            .header("Authorization", format!("Bearer {token}"))
            .body(())
            .unwrap();
        let mut ws = tungstenite::client(request, stream).expect("the WebSocket opens").0;
        ready.wait();
        let (mut seen, mut duplicates) = (HashSet::new(), 0);
        while seen.len() < expected {
            match ws.read_message() {
                Ok(tungstenite::Message::Text(text)) => {
                    // A substring, not a JSON parse: these clients share the
                    // machine with the nodes and should cost them little.
                    let at = text.find("\"message_id\":\"").expect("a message ID") + 14;
                    let id = text[at..at + 36].to_owned();
                    if !seen.insert(id) {
                        duplicates += 1;
                    }
                }
                Ok(tungstenite::Message::Close(reason)) => {
                    eprintln!("a WebSocket client was closed: {reason:?}");
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("a WebSocket client failed: {e}");
                    break;
                }
            }
        }
        (seen.len(), duplicates)
    })
}

struct Run {
    elapsed: Duration,
    /// Send to whole answer.
    service: Vec<Duration>,
    /// Scheduled time to whole answer (equal to `service` without a rate).
    scheduled: Vec<Duration>,
}

/// `count` sends from `CLIENTS` connections, at `rate` per second in all if
/// given, each answer checked.
fn post_messages(alice: &ApiNode, conversation: &str, count: usize, rate: Option<u32>) -> Run {
    let path = format!("/api/chat/conversations/{conversation}/messages");
    let body = serde_json::json!({ "content": "x".repeat(100) }).to_string();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (path, body, next) = (path.clone(), body.clone(), next.clone());
            let mut connection = Connection::open(alice);
            std::thread::spawn(move || {
                let (mut service, mut scheduled) = (Vec::new(), Vec::new());
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= count {
                        break;
                    }
                    let due = match rate {
                        Some(rate) => started + Duration::from_secs_f64(n as f64 / f64::from(rate)),
                        None => Instant::now(),
                    };
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let sent = Instant::now();
                    let (status, answer) = connection.request("POST", &path, &body);
                    let done = Instant::now();
                    assert_eq!(status, 200, "{answer}");
                    service.push(done - sent);
                    scheduled.push(done.saturating_duration_since(due));
                }
                (service, scheduled)
            })
        })
        .collect();
    let (mut service, mut scheduled) = (Vec::new(), Vec::new());
    for worker in workers {
        let (s, q) = worker.join().unwrap();
        service.extend(s);
        scheduled.extend(q);
    }
    let elapsed = started.elapsed();
    service.sort();
    scheduled.sort();
    Run { elapsed, service, scheduled }
}

fn ms(l: &[Duration], p: f64) -> f64 {
    l[((l.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1_000.0
}

fn percentiles(l: &[Duration]) -> String {
    format!("p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms", ms(l, 0.5), ms(l, 0.9), ms(l, 0.99), ms(l, 1.0))
}

fn main() {
    // `cargo bench -p p2pchat --bench api -- latency` (or `throughput`)
    // runs one half.
    let only: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wants = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let (alice, bob) = (start("alice"), start("bob"));
    let (a, b) = (alice.node.handle(), bob.node.handle());
    a.add_peer_address(b.peer_id(), b.listen_addr());
    b.add_peer_address(a.peer_id(), a.listen_addr());
    let mut setup = Connection::open(&alice);
    let (status, created) =
        setup.request("POST", "/api/chat/conversations", &format!("{{\"peer_id\":\"{}\"}}", b.peer_id()));
    assert_eq!(status, 200, "{created}");
    let conversation = json_field(&created, "conversation_id");
    // Warm up: the key exchange, and the connections' first requests.
    post_messages(&alice, &conversation, 200, None);

    if wants("latency") {
        let count = 10_000;
        let run = post_messages(&alice, &conversation, count, Some(1_000));
        println!("{CLIENTS} clients, {count} sends at 1,000 per second, no WebSocket clients:");
        println!("  send to answer:           {}", percentiles(&run.service));
        println!("  scheduled time to answer: {}", percentiles(&run.scheduled));

        let ready = Arc::new(Barrier::new(WS_CLIENTS + 1));
        let counters: Vec<_> = (0..WS_CLIENTS).map(|_| ws_counter(&bob, count, ready.clone())).collect();
        ready.wait();
        let run = post_messages(&alice, &conversation, count, Some(1_000));
        println!(
            "{CLIENTS} clients, {count} sends at 1,000 per second ({:.0} per second achieved):",
            count as f64 / run.elapsed.as_secs_f64()
        );
        println!("  send to answer:           {}", percentiles(&run.service));
        println!("  scheduled time to answer: {}", percentiles(&run.scheduled));
        let waited = Instant::now();
        let results: Vec<(usize, usize)> = counters.into_iter().map(|c| c.join().unwrap()).collect();
        let complete = results.iter().filter(|(seen, _)| *seen == count).count();
        let duplicates: usize = results.iter().map(|(_, d)| d).sum();
        println!(
            "  WebSocket fan-out on the receiver: {complete} of {WS_CLIENTS} clients saw all {count} messages, {duplicates} duplicates (the last arrived {:.0} ms after the last answer)",
            waited.elapsed().as_secs_f64() * 1_000.0
        );
        assert_eq!((complete, duplicates), (WS_CLIENTS, 0), "events were lost or repeated");
    }
    if wants("throughput") {
        let count = 20_000;
        let run = post_messages(&alice, &conversation, count, None);
        println!(
            "{CLIENTS} clients as fast as they go: {count} sends, {:.0} answered per second; send to answer {}",
            count as f64 / run.elapsed.as_secs_f64(),
            percentiles(&run.service)
        );
    }
    alice.node.shutdown();
    bob.node.shutdown();
}
