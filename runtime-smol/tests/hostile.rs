//! Hostile input against a real `p2pchat node` process. The attacker is a
//! peer with its own identity: an engine of its own for real envelopes, and
//! a QUIC connection to the victim it can send any bytes on. Each attack
//! must be refused (the victim reports `chat.security.rejected`, or the
//! transport refuses it), and afterwards the victim must still serve its API
//! and carry on a genuine conversation with nothing lost or added.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command as Process, Stdio};
use std::time::Duration;

use p2pchat::admission::Limit;
use p2pchat::tls::TlsIdentity;
use p2pchat::transport::{Inbound, PeerConnection, Transport};
use p2pchat_protocol::engine::{
    Command, CommandOutcome, Engine, EngineConfig, Input, MemoryStore, Refusal, SendFailure, SessionStore, Transaction,
    TransmitOutcome,
};
use p2pchat_protocol::keys::IdentitySeed;
use p2pchat_protocol::{ConversationId, IdentityKeyPair, PeerId, Timestamp, MAX_SKIP};
use rand_chacha::rand_core::SeedableRng;
use serde_json::json;
use support::{eventually, Client, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_p2pchat");

struct Victim {
    child: Child,
    peer: PeerId,
    quic: SocketAddr,
    client: Client,
    dir: TempDir,
}

impl Victim {
    /// How many rows of `table` the node's database holds (read beside
    /// the running node: its journal is WAL, so readers do not block it).
    fn rows(&self, table: &str) -> i64 {
        let db = self.dir.0.join("data").join("node.sqlite3");
        let conn = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0)).unwrap()
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn victim(name: &str) -> Victim {
    let dir = TempDir::new(name);
    let data = dir.0.join("data");
    let args = ["node", "--data-dir", data.to_str().unwrap(), "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"];
    let (child, lines) = spawn(&args, &dir);
    let (mut peer, mut quic, mut api) = (None, None, None);
    while api.is_none() {
        let line = lines.recv_timeout(Duration::from_secs(30)).expect("the node's start lines within 30 s");
        if let Some(rest) = line.strip_prefix("node ") {
            let mut words = rest.split(' ');
            peer = words.next().map(|p| p.parse::<PeerId>().unwrap());
            quic = words.nth(2).map(|a| a.parse::<SocketAddr>().unwrap());
        }
        if let Some(rest) = line.strip_prefix("API on http://") {
            api = rest.split(' ').next().map(|a| a.parse::<SocketAddr>().unwrap());
        }
    }
    let token = std::fs::read_to_string(data.join(p2pchat::api::TOKEN_FILE)).unwrap();
    Victim { child, peer: peer.unwrap(), quic: quic.unwrap(), client: Client { addr: api.unwrap(), token }, dir }
}

/// A `p2pchat` process with its logs in `dir`, and its stdout line by line,
/// read on a thread of its own (so that a child that never prints cannot
/// hang the test: callers wait with a timeout).
fn spawn(args: &[&str], dir: &TempDir) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Process::new(BIN)
        .args(args)
        .env("P2PCHAT_LOG_DIR", dir.0.join("logs"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    smol::block_on(async {
        let timeout = async {
            smol::Timer::after(Duration::from_secs(20)).await;
            panic!("timed out");
        };
        smol::future::or(f, timeout).await
    })
}

/// A peer whose every envelope passes through the test: it can send them,
/// hold them back, send them twice, or alter them.
struct Attacker {
    engine: Engine<MemoryStore>,
    identity_seed: [u8; 32],
    conn: PeerConnection,
    _transport: Transport,
    victim: PeerId,
    now: Timestamp,
}

impl Attacker {
    fn connect(seed: u8, victim: &Victim) -> Self {
        let identity_seed = [seed; 32];
        let identity = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(identity_seed));
        let transport =
            Transport::bind("127.0.0.1:0".parse().unwrap(), TlsIdentity::new(&identity).unwrap(), Inbound::Refused)
                .unwrap();
        let conn = block_on(transport.dial(victim.quic, victim.peer)).unwrap();
        let now = wall_clock();
        let rng = rand_chacha::ChaCha20Rng::seed_from_u64(u64::from(seed));
        let engine = Engine::new(identity, MemoryStore::new(), EngineConfig::default(), rng, now).unwrap();
        Self { engine, identity_seed, conn, _transport: transport, victim: victim.peer, now }
    }

    fn peer(&self) -> PeerId {
        IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(self.identity_seed)).peer_id()
    }

    /// The engine's envelopes for the victim, taken (not sent).
    fn take(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let mut inputs = Vec::new();
            while self.engine.poll_event().is_some() {}
            while let Some(peer) = self.engine.poll_lookup() {
                inputs.push(Input::PeerRecord(peer));
            }
            while let Some(t) = self.engine.poll_transmit() {
                out.push(t.bytes);
                inputs.push(Input::TransmitResult { id: t.id, outcome: TransmitOutcome::Delivered });
            }
            if inputs.is_empty() {
                return out;
            }
            for input in inputs {
                self.engine.handle(self.now, input).unwrap();
            }
        }
    }

    fn send(&self, bytes: &[u8]) {
        block_on(self.conn.send(bytes)).unwrap();
    }

    /// Reads one envelope from the victim into the engine.
    fn receive(&mut self) {
        let bytes = block_on(async { self.conn.accept_frame().await.unwrap().await.unwrap() });
        self.engine.handle(self.now, Input::Received { from: self.victim, bytes }).unwrap();
    }

    fn command(&mut self, command: Command) -> CommandOutcome {
        self.engine.command(self.now, command).unwrap()
    }

    /// A session with the victim: the key exchange done for real.
    fn open_session(&mut self) -> ConversationId {
        let CommandOutcome::Conversation(c) = self.command(Command::CreateConversation { peer: self.victim }) else {
            panic!()
        };
        self.command(Command::InitiateKeyExchange { peer: self.victim });
        for request in self.take() {
            self.send(&request);
        }
        self.receive(); // the acknowledgement
                        // What the acknowledgement asks for in return goes too.
        for envelope in self.take() {
            self.send(&envelope);
        }
        c.id
    }

    /// `payload` sealed under this attacker's session with the victim, as
    /// its engine would seal it (the session state is advanced and saved).
    fn forge(&mut self, payload: &p2pchat_protocol::wire::PairwisePayload) -> Vec<u8> {
        use p2pchat_protocol::wire::{Envelope, EnvelopeBody};
        let store = self.engine.store_mut();
        store.begin().unwrap();
        let bytes = store.sessions(&self.victim).unwrap().expect("a session with the victim");
        let mut sessions = p2pchat_protocol::PairwiseSessions::from_bytes(&bytes).unwrap();
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(99);
        let message = sessions.encrypt(&payload.encode(), &mut rng).unwrap();
        store.put_sessions(&self.victim, &sessions.to_bytes()).unwrap();
        store.commit().unwrap();
        Envelope::new(EnvelopeBody::Ratchet(message)).encode()
    }

    /// A genuine chat message's envelope, not yet sent.
    fn message(&mut self, conversation: ConversationId, text: &str) -> Vec<u8> {
        self.command(Command::SendMessage { conversation, content: text.into() });
        let mut envelopes = self.take();
        assert_eq!(envelopes.len(), 1, "one envelope per message in an open session");
        envelopes.remove(0)
    }
}

fn ws(client: &Client) -> tungstenite::WebSocket<std::net::TcpStream> {
    support::ws_connect(client, "?types=chat.security.rejected,chat.message.received")
}

/// The next event of `kind`, or a panic naming `what`.
fn next(socket: &mut tungstenite::WebSocket<std::net::TcpStream>, kind: &str, what: &str) -> serde_json::Value {
    loop {
        let message = socket.read_message().unwrap_or_else(|e| panic!("no {kind} for {what}: {e}"));
        if let tungstenite::Message::Text(text) = message {
            let event: serde_json::Value = serde_json::from_str(&text).unwrap();
            if event["type"] == kind {
                return event;
            }
        }
    }
}

/// Reads refusals until one whose reason contains `reason`.
fn refused(socket: &mut tungstenite::WebSocket<std::net::TcpStream>, reason: &str, what: &str) {
    loop {
        let event = next(socket, "chat.security.rejected", what);
        if event["payload"]["reason"].as_str().is_some_and(|r| r.contains(reason)) {
            return;
        }
    }
}

/// The victim's messages from the attacker, oldest first.
fn received_texts(victim: &Victim, attacker: &PeerId) -> Vec<String> {
    let list = victim.client.get("/api/chat/conversations").body;
    let Some(c) = list["conversations"].as_array().unwrap().iter().find(|c| c["peer_id"] == attacker.to_string())
    else {
        return Vec::new();
    };
    let id = c["conversation_id"].as_str().unwrap();
    let page = victim.client.get(&format!("/api/chat/conversations/{id}/messages?limit=500")).body;
    let mut texts: Vec<String> =
        page["messages"].as_array().unwrap().iter().map(|m| m["content"].as_str().unwrap().to_owned()).collect();
    texts.reverse();
    texts
}

#[test]
fn envelopes_replayed_altered_from_too_far_ahead_or_oversized_are_refused_and_nothing_is_damaged() {
    let victim = victim("hostile-envelopes");
    let mut events = ws(&victim.client);
    let mut attacker = Attacker::connect(0x61, &victim);
    let c = attacker.open_session();

    // A genuine message arrives once. Replayed, by its sender or by another
    // peer, it is refused.
    let first = attacker.message(c, "genuine 1");
    attacker.send(&first);
    assert_eq!(next(&mut events, "chat.message.received", "the genuine message")["payload"]["content"], "genuine 1");
    attacker.send(&first);
    refused(&mut events, "already received", "a genuine envelope replayed by its sender");
    let thief = Attacker::connect(0x66, &victim);
    thief.send(&first);
    let refusal = next(&mut events, "chat.security.rejected", "a genuine envelope replayed by another peer");
    assert_eq!(refusal["payload"]["peer_id"], thief.peer().to_string());

    // Every bit of a genuine envelope's header and body matters.
    let second = attacker.message(c, "genuine 2");
    for at in [1, second.len() / 2, second.len() - 1] {
        let mut altered = second.clone();
        altered[at] ^= 0x04;
        attacker.send(&altered);
        next(&mut events, "chat.security.rejected", &format!("an envelope altered at byte {at}"));
    }
    // Bytes that are no envelope at all.
    attacker.send(b"\x01garbage that is not postcard");
    next(&mut events, "chat.security.rejected", "garbage");

    // A message from further ahead in the chain than MAX_SKIP allows.
    for n in 0..=MAX_SKIP {
        attacker.message(c, &format!("skipped {n}"));
    }
    let ahead = attacker.message(c, "too far ahead");
    attacker.send(&ahead);
    refused(&mut events, "ahead of the chain", "a message beyond MAX_SKIP");

    // Oversized: an envelope over the limit, which the transport still
    // carries, is refused by the victim unread; a frame over the
    // transport's limit cannot even be sent.
    let mut oversized = vec![1u8; p2pchat_protocol::wire::MAX_ENVELOPE_LEN + 1];
    oversized[0] = 1;
    attacker.send(&oversized);
    refused(&mut events, "exceeds the", "an oversized envelope");
    let too_big = vec![1u8; p2pchat::transport::MAX_FRAME_LEN + 1];
    assert!(block_on(attacker.conn.send(&too_big)).is_err(), "a frame over the transport's limit");
    // Written all the same, past our transport's checks: the victim closes
    // the connection, naming the limit.
    let (_endpoint, raw) = raw_connection(&victim, 0x64);
    block_on(async {
        let mut stream = raw.open_uni().await.unwrap();
        if stream.write_all(&too_big).await.is_ok() {
            let _ = stream.finish();
        }
        raw.closed().await
    });
    let closed = raw.close_reason().unwrap().to_string();
    assert!(closed.contains("a frame over the"), "{closed}");

    // The genuine second message, untouched, still arrives; the replay and
    // the forgeries left nothing behind.
    attacker.send(&second);
    assert_eq!(next(&mut events, "chat.message.received", "the genuine second")["payload"]["content"], "genuine 2");
    assert_eq!(received_texts(&victim, &attacker.peer()), ["genuine 1", "genuine 2"]);
    assert_eq!(victim.client.get("/api/node").status, 200, "the victim still serves");
}

/// A connection to the victim made with quinn directly (with the identity
/// `seed`), so that the test can break rules our own transport keeps.
fn raw_connection(victim: &Victim, seed: u8) -> (quinn::Endpoint, quinn::Connection) {
    let identity = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes([seed; 32]));
    let tls = TlsIdentity::new(&identity).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls.client_config(victim.peer).unwrap()).unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let runtime = std::sync::Arc::new(quinn::SmolRuntime);
    let endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime).unwrap();
    let config = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
    let conn = block_on(async { endpoint.connect_with(config, victim.quic, "p2pchat").unwrap().await.unwrap() });
    (endpoint, conn)
}

/// Connections from a test endpoint at `from` with the identity `seed`.
fn dial(victim: &Victim, seed: [u8; 32], from: [u8; 4]) -> (Transport, PeerConnection) {
    let identity = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(seed));
    let t = Transport::bind((from, 0).into(), TlsIdentity::new(&identity).unwrap(), Inbound::Refused).unwrap();
    let conn = block_on(t.dial(victim.quic, victim.peer)).unwrap();
    (t, conn)
}

/// A fresh identity for the `n`th connection of a flood.
fn flood_seed(tag: u8, n: u16) -> [u8; 32] {
    let mut seed = [tag; 32];
    seed[..2].copy_from_slice(&n.to_le_bytes());
    seed
}

#[test]
fn floods_of_connections_are_refused_and_streams_do_not_stop_the_node() {
    let victim = victim("hostile-connections");
    let mut events = ws(&victim.client);
    // Streams: the victim gives a connection credit for 16 open at once; a
    // peer cannot open a 17th until one of them is done. (This connection
    // stays open, and counts against the limits below.)
    let (_endpoint, raw) = raw_connection(&victim, 0x65);
    block_on(async {
        let mut held = Vec::new();
        for _ in 0..16 {
            let mut stream = raw.open_uni().await.unwrap();
            stream.write_all(b"unfinished").await.unwrap();
            held.push(stream);
        }
        let seventeenth = async { Some(raw.open_uni().await) };
        let a_second = async {
            smol::Timer::after(Duration::from_secs(1)).await;
            None
        };
        assert!(smol::future::or(seventeenth, a_second).await.is_none(), "a 17th stream opened");
        // Once they are done, new ones may open.
        for mut stream in held {
            stream.finish().unwrap();
        }
        let mut seventeenth = raw.open_uni().await.unwrap();
        seventeenth.write_all(b"the seventeenth").await.unwrap();
        seventeenth.finish().unwrap();
    });
    // Each of the seventeen frames, junk, is refused.
    for n in 0..17 {
        next(&mut events, "chat.security.rejected", &format!("held stream {n}'s frame"));
    }
    let open = |conns: &[(Transport, PeerConnection)]| conns.iter().filter(|(_, c)| !c.is_closed()).count();
    let refused = |conns: &[(Transport, PeerConnection)], limit: Limit| {
        conns.iter().filter(|(_, c)| c.refusal() == Some(limit)).count()
    };
    // Each flood is held to its limit, the rest refused with the limit's
    // name; what was held before goes on being served.
    let flood = Attacker::connect(0x62, &victim);
    // One peer, connection after connection: 16 held (its first among them).
    let same_peer: Vec<_> = (0..60).map(|_| dial(&victim, [0x62; 32], [127, 0, 0, 1])).collect();
    eventually("one peer's connections over 16 refused", || {
        (open(&same_peer) == 15 && refused(&same_peer, Limit::ConnectionsFromPeer) == 45).then_some(())
    });
    // One host with a fresh identity for each: 64 held.
    let same_host: Vec<_> = (0..80).map(|n| dial(&victim, flood_seed(0x70, n), [127, 0, 0, 2])).collect();
    eventually("one address's connections over 64 refused", || {
        (open(&same_host) == 64 && refused(&same_host, Limit::ConnectionsFromAddress) == 16).then_some(())
    });
    // A crowd on ten addresses: 256 held in all (the raw connection, the
    // peer's 16 and the host's 64 among them).
    let crowd: Vec<_> =
        (0..300u16).map(|n| dial(&victim, flood_seed(0x71, n), [127, 0, 1, 1 + (n % 10) as u8])).collect();
    let room = 256 - 1 - 16 - 64;
    eventually("connections over 256 in all refused", || {
        (open(&crowd) == room && refused(&crowd, Limit::Connections) == 300 - room).then_some(())
    });
    let (_t, late) = dial(&victim, flood_seed(0x72, 0), [127, 0, 2, 1]);
    eventually("a newcomer refused while the node is full", || {
        (late.refusal() == Some(Limit::Connections)).then_some(())
    });
    assert!(!flood.conn.is_closed() && raw.close_reason().is_none(), "what was held first is still served");
    // A burst of frames from one peer on as many streams as it likes: they
    // go 16 at a time, and each junk frame is refused.
    let sent = block_on(async {
        let tasks: Vec<_> = (0..200)
            .map(|n| {
                let conn = flood.conn.clone();
                smol::spawn(async move { conn.send(format!("junk {n}").as_bytes()).await })
            })
            .collect();
        let mut sent = 0;
        for task in tasks {
            sent += usize::from(task.await.is_ok());
        }
        sent
    });
    assert_eq!(sent, 200, "every frame was taken (and acknowledged) by the victim's transport");
    for n in 0..sent {
        next(&mut events, "chat.security.rejected", &format!("junk frame {n}"));
    }
    // The slots come back as the flood's connections close: a newcomer is
    // served again.
    for (_, conn) in same_peer.iter().chain(&same_host).chain(&crowd) {
        conn.close();
    }
    drop((same_peer, same_host, crowd));
    let mut genuine = eventually("a newcomer served once the flood has gone", || {
        let newcomer = Attacker::connect(0x63, &victim);
        std::thread::sleep(Duration::from_millis(500));
        (!newcomer.conn.is_closed()).then_some(newcomer)
    });
    let c = genuine.open_session();
    let message = genuine.message(c, "still here?");
    genuine.send(&message);
    eventually("the genuine message", || (received_texts(&victim, &genuine.peer()) == ["still here?"]).then_some(()));
    assert_eq!(victim.client.get("/api/node").status, 200);
}

#[test]
fn bad_api_requests_to_a_running_node_are_refused_with_reasons() {
    let victim = victim("hostile-api");
    let c = &victim.client;
    let cases = [
        (c.request("POST", "/api/chat/conversations", Some(b"{\"peer_id\": "), &[]), 400, "invalid_json"),
        (c.request("GET", "/api/chat/unread", None, &[("Authorization", "")]), 401, "unauthorized"),
        (c.request("GET", "/api/chat/unread", None, &[("Authorization", "Bearer wrong")]), 401, "unauthorized"),
        (c.request("GET", "/api/chat/unread", None, &[("Host", "attacker.example")]), 403, "host_not_allowed"),
        (
            c.request("POST", "/api/chat/key-exchange", Some(b"{}"), &[("Origin", "http://attacker.example")]),
            403,
            "origin_not_allowed",
        ),
        (
            c.request("POST", "/api/chat/conversations", Some(&vec![b' '; p2pchat_http_tide::MAX_BODY + 1]), &[]),
            413,
            "payload_too_large",
        ),
    ];
    for (answer, status, code) in cases {
        assert_eq!((answer.status, answer.code()), (status, code), "{:?}", answer.body);
    }
    let created = c.post("/api/chat/conversations", json!({"peer_id": "ab".repeat(20)}));
    assert_eq!(created.status, 200, "the node still serves: {:?}", created.body);
}

/// A `p2pchat relay` process with `extra` flags, and what clients need of it.
struct RelayProcess {
    child: Child,
    peer: PeerId,
    addr: SocketAddr,
    /// `PEER@ADDR`, as records list it.
    address: String,
    _dir: TempDir,
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RelayProcess {
    fn start(name: &str, extra: &[&str]) -> Self {
        let dir = TempDir::new(name);
        let data = dir.0.join("relay");
        let mut args = vec!["relay", "--data-dir", data.to_str().unwrap(), "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let (child, lines) = spawn(&args, &dir);
        let address = loop {
            let line = lines.recv_timeout(Duration::from_secs(30)).expect("the relay's address within 30 s");
            if let Some(rest) = line.strip_prefix("relay ") {
                break rest.trim().to_owned();
            }
        };
        let (peer, addr) = address.split_once('@').unwrap();
        let (peer, addr) = (peer.parse().unwrap(), addr.parse().unwrap());
        Self { child, peer, addr, address, _dir: dir }
    }

    /// The relay process's resident memory, in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }
}

/// A client of the relay with the identity `seed`: connected, its
/// registration and record sent (not yet read back).
struct RelayUser {
    peer: PeerId,
    conn: PeerConnection,
    client: p2pchat_protocol::relay::RelayClient,
    now: Timestamp,
    _transport: Transport,
}

impl RelayUser {
    fn connect(relay: &RelayProcess, seed: u8) -> Self {
        Self::connect_from(relay, seed, [127, 0, 0, 1])
    }

    /// As [`RelayUser::connect`], from the loopback address `ip`.
    fn connect_from(relay: &RelayProcess, seed: u8, ip: [u8; 4]) -> Self {
        use p2pchat_protocol::relay::{PeerRecord, RelayClient};
        let now = wall_clock();
        let identity = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes([seed; 32]));
        let transport =
            Transport::bind((ip, 0).into(), TlsIdentity::new(&identity).unwrap(), Inbound::Refused).unwrap();
        let conn = block_on(transport.dial(relay.addr, relay.peer)).unwrap();
        let mut client = RelayClient::new();
        let expires = now.saturating_add_millis(600_000);
        let record = PeerRecord::sign(&identity, Vec::new(), vec![relay.address.clone()], now, expires, 1);
        for frame in client.on_connect(now, record) {
            block_on(conn.send(&frame.encode())).unwrap();
        }
        Self { peer: identity.peer_id(), conn, client, now, _transport: transport }
    }

    /// Reads frames until `done` says enough, handing each to the client.
    fn read(&mut self, done: &mut dyn FnMut(&p2pchat_protocol::relay::ClientAction) -> bool) {
        loop {
            let bytes = block_on(async { self.conn.accept_frame().await.unwrap().await.unwrap() });
            for action in self.client.on_frame(self.now, &bytes).unwrap() {
                if done(&action) {
                    return;
                }
            }
        }
    }

    fn published(&mut self) {
        self.read(&mut |a| matches!(a, p2pchat_protocol::relay::ClientAction::Published { .. }));
    }

    /// Forwards `count` envelopes of `len` bytes to `to`; returns the
    /// relay's answers, once all have come.
    fn forward(&mut self, to: PeerId, count: u64, len: usize) -> Vec<TransmitOutcome> {
        use p2pchat_protocol::engine::{Transmit, TransmitId};
        use p2pchat_protocol::relay::ClientAction;
        for n in 0..count {
            let transmit = Transmit { id: TransmitId(n), peer: to, bytes: vec![7; len], mailbox_allowed: true };
            block_on(self.conn.send(&self.client.forward(wall_clock(), transmit).encode())).unwrap();
        }
        let mut outcomes = Vec::new();
        self.read(&mut |a| {
            if let ClientAction::ToEngine(Input::TransmitResult { outcome, .. }) = a {
                outcomes.push(outcome.clone());
            }
            outcomes.len() as u64 == count
        });
        outcomes
    }
}

#[test]
fn a_relay_client_over_its_mailbox_quota_is_refused_and_the_relay_goes_on() {
    use p2pchat_protocol::relay::ClientAction;

    let relay = RelayProcess::start("hostile-relay", &["--mailbox-max-count", "5"]);
    // The recipient registers, then goes offline.
    let mut recipient = RelayUser::connect(&relay, 0x65);
    recipient.published();
    let recipient_id = recipient.peer;
    recipient.conn.close();
    drop(recipient);
    std::thread::sleep(Duration::from_secs(1));

    // Twenty envelopes for it; its mailbox holds five.
    let mut attacker = RelayUser::connect(&relay, 0x64);
    let outcomes = attacker.forward(recipient_id, 20, 3);
    let held = outcomes.iter().filter(|o| **o == TransmitOutcome::HeldByRelay).count();
    let refused: Vec<_> = outcomes.iter().filter(|o| matches!(o, TransmitOutcome::Failed(_))).collect();
    assert_eq!((held, refused.len()), (5, 15), "the mailbox holds its quota and no more: {outcomes:?}");
    assert!(
        refused.iter().all(|o| matches!(o, TransmitOutcome::Failed(SendFailure::Relay(Refusal::Quota)))),
        "refused with the reason: {refused:?}"
    );

    // The relay goes on: the recipient comes back and gets exactly the five.
    let mut back = RelayUser::connect(&relay, 0x65);
    let mut delivered = 0;
    back.read(&mut |a| {
        if matches!(a, ClientAction::ToEngine(Input::Received { .. })) {
            delivered += 1;
        }
        delivered == 5
    });
}

#[test]
fn strangers_cannot_lock_honest_senders_out_of_a_mailbox_with_one_identity_or_many() {
    let relay = RelayProcess::start("hostile-relay-share", &[]);
    let mut recipient = RelayUser::connect(&relay, 0x80);
    recipient.published();
    let recipient_id = recipient.peer;
    recipient.conn.close();
    drop(recipient);
    std::thread::sleep(Duration::from_secs(1));
    let held = |outcomes: &[TransmitOutcome]| outcomes.iter().filter(|o| **o == TransmitOutcome::HeldByRelay).count();
    let full = |outcomes: &[TransmitOutcome]| {
        outcomes.iter().filter(|o| matches!(o, TransmitOutcome::Failed(SendFailure::Relay(Refusal::Quota)))).count()
    };
    // One identity: 100 of the mailbox's 1,000 entries, then refused.
    let mut stranger = RelayUser::connect(&relay, 0x81);
    let outcomes = stranger.forward(recipient_id, 110, 3);
    assert_eq!((held(&outcomes), full(&outcomes)), (100, 10), "one sender's share: {outcomes:?}");
    // More identities from the same address: 250 in all, then refused.
    let mut from_address = 100;
    for seed in [0x82, 0x83] {
        let mut puppet = RelayUser::connect(&relay, seed);
        let outcomes = puppet.forward(recipient_id, 100, 3);
        from_address += held(&outcomes);
    }
    assert_eq!(from_address, 250, "one address's share of a mailbox");
    // An honest sender at another address still gets through.
    let mut honest = RelayUser::connect_from(&relay, 0x84, [127, 0, 0, 2]);
    assert_eq!(honest.forward(recipient_id, 1, 3), vec![TransmitOutcome::HeldByRelay]);
    // And the recipient gets the honest message with the rest when it returns.
    let mut back = RelayUser::connect(&relay, 0x80);
    let mut delivered = 0;
    back.read(&mut |a| {
        if matches!(a, p2pchat_protocol::relay::ClientAction::ToEngine(Input::Received { .. })) {
            delivered += 1;
        }
        delivered == 64 // the first batch
    });
}

#[test]
fn a_relay_peer_that_never_reads_cannot_grow_the_relays_memory() {
    use p2pchat_protocol::relay::{ClientAction, RelayFrame};

    let relay = RelayProcess::start("hostile-relay-reader", &[]);
    // 64 envelopes of 256 KiB (16 MiB) wait in the recipient's mailbox.
    let mut owner = RelayUser::connect(&relay, 0x70);
    owner.published();
    let owner_id = owner.peer;
    owner.conn.close();
    drop(owner);
    std::thread::sleep(Duration::from_secs(1));
    let mut filler = RelayUser::connect(&relay, 0x71);
    let len = p2pchat_protocol::wire::MAX_ENVELOPE_LEN;
    let outcomes = filler.forward(owner_id, 64, len);
    assert!(outcomes.iter().all(|o| *o == TransmitOutcome::HeldByRelay), "{outcomes:?}");
    let before = relay.rss();

    // The owner comes back, never reads a stream, and asks for its mailbox
    // 200 times: each ask used to queue the whole batch again.
    let owner = RelayUser::connect(&relay, 0x70);
    for _ in 0..200 {
        block_on(owner.conn.send(&RelayFrame::FetchMailbox.encode())).unwrap();
    }
    // An honest client is still served meanwhile.
    let mut honest = RelayUser::connect(&relay, 0x72);
    honest.published();
    let lookup = honest.client.lookup(wall_clock(), owner_id);
    block_on(honest.conn.send(&lookup.encode())).unwrap();
    honest.read(&mut |a| matches!(a, ClientAction::ToEngine(Input::PeerRecord(_) | Input::LookupFailed(_))));
    std::thread::sleep(Duration::from_secs(2));
    let after = relay.rss();
    eprintln!("relay RSS: {} MiB with the full mailbox, {} MiB after 200 fetches", before >> 20, after >> 20);
    assert!(
        after < before + 64 * 1024 * 1024,
        "the relay grew from {} MiB to {} MiB under a reader that never reads",
        before >> 20,
        after >> 20
    );

    // Forwards to a registered peer that never reads fill its queue past
    // the byte limit: the relay disconnects it, saying why.
    let mut sender = RelayUser::connect(&relay, 0x73);
    sender.published();
    for n in 0..64u64 {
        use p2pchat_protocol::engine::{Transmit, TransmitId};
        let transmit = Transmit { id: TransmitId(n), peer: owner_id, bytes: vec![9; len], mailbox_allowed: true };
        block_on(sender.conn.send(&sender.client.forward(wall_clock(), transmit).encode())).unwrap();
    }
    let reason = eventually("the relay closes a connection that does not read", || owner.conn.close_reason());
    assert!(reason.contains("does not read"), "{reason}");
    let last = relay.rss();
    eprintln!("relay RSS: {} MiB after 16 MiB of forwards to the reader that does not read", last >> 20);
    assert!(last < before + 64 * 1024 * 1024, "the relay holds no more than its limits");
}

#[test]
fn forged_group_traffic_is_refused_member_by_member() {
    use p2pchat_protocol::wire::{
        Envelope, EnvelopeBody, GroupControl, PairwisePayload, RosterEntry, SenderKeyDistribution,
    };
    use p2pchat_protocol::GroupSession;

    let victim = victim("hostile-group");
    let mut events = ws(&victim.client);
    // The victim makes a group with the attacker (a member, not the admin)
    // and one more member.
    let mut member = Attacker::connect(0x66, &victim);
    member.open_session();
    let other = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes([0x67; 32])).peer_id();
    let created = victim.client.post(
        "/api/chat/groups",
        json!({"group_name": "targets", "members": [member.peer().to_string(), other.to_string()]}),
    );
    assert_eq!(created.status, 200, "{:?}", created.body);
    let group: ConversationId = created.body["conversation_id"].as_str().unwrap().parse().unwrap();

    // An invite by a member who is not the admin.
    let added = PairwisePayload::GroupControl(GroupControl::MemberAdded {
        group_id: group,
        member: RosterEntry { peer_id: PeerId([0x68; 20]), epoch: 2 },
    });
    let forged = member.forge(&added);
    member.send(&forged);
    refused(&mut events, "only the group's admin may add members", "an invite by a non-admin");

    // A sender key of another member, passed on by this one.
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
    let others_session = GroupSession::new(group, other, [victim.peer, member.peer()], &mut rng).unwrap();
    let mut distribution: SenderKeyDistribution = others_session.distribution_for(&victim.peer);
    distribution.sender = other;
    let forwarded = member.forge(&PairwisePayload::SenderKeyDistribution(distribution));
    member.send(&forwarded);
    refused(&mut events, "only a key's owner may distribute it", "a sender key forwarded by a third party");

    // A group message signed by a peer that is not a member.
    let outsider = Attacker::connect(0x69, &victim);
    let mut outsiders_session =
        GroupSession::new(group, outsider.peer(), [victim.peer, member.peer()], &mut rng).unwrap();
    let message = outsiders_session.encrypt(b"let me in").unwrap();
    outsider.send(&Envelope::new(EnvelopeBody::Group(message)).encode());
    refused(&mut events, "is not a member of this group", "a group message from a non-member");

    // Nothing changed: the members are the three the victim chose.
    let members = victim.client.get(&format!("/api/chat/groups/{group}/members")).body;
    let mut ids: Vec<String> =
        members["members"].as_array().unwrap().iter().map(|m| m["peer_id"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    let mut expected = vec![victim.peer.to_string(), member.peer().to_string(), other.to_string()];
    expected.sort();
    assert_eq!(ids, expected);
    assert!(received_texts(&victim, &outsider.peer()).is_empty());
}

#[test]
fn a_strangers_invitations_wait_within_their_cap_and_store_nothing_of_the_group() {
    use p2pchat_protocol::wire::{
        Envelope, EnvelopeBody, GroupControl, GroupMessage, PairwisePayload, RosterEntry, Signature64,
    };

    let victim = victim("hostile-invites");
    let mut events = ws(&victim.client);
    // A stranger opens a session (even writing first: a conversation the
    // stranger opened is no consent) and invites the victim into groups of
    // invented members, more than one admin may keep waiting.
    let mut stranger = Attacker::connect(0x71, &victim);
    let chat = stranger.open_session();
    let hello = stranger.message(chat, "hi, join my groups");
    stranger.send(&hello);
    next(&mut events, "chat.message.received", "the stranger's first message");
    let puppets: Vec<RosterEntry> = (0..200u8).map(|n| RosterEntry { peer_id: PeerId([n; 20]), epoch: 1 }).collect();
    let mut groups = Vec::new();
    for n in 0..8u8 {
        let group_id = ConversationId::random_group(&mut rand_chacha::ChaCha20Rng::seed_from_u64(u64::from(n)));
        let mut members = puppets.clone();
        members.push(RosterEntry { peer_id: victim.peer, epoch: 1 });
        members.push(RosterEntry { peer_id: stranger.peer(), epoch: 1 });
        let invite = PairwisePayload::GroupControl(GroupControl::Invite {
            group_id,
            name: format!("spam {n}"),
            admin: stranger.peer(),
            members,
            created_at: stranger.now,
        });
        let forged = stranger.forge(&invite);
        stranger.send(&forged);
        groups.push(group_id);
    }
    refused(&mut events, "too many of this peer's group invitations are waiting", "invitations over the cap");
    let waiting = support::eventually("the invitations are listed", || {
        let list = victim.client.get("/api/chat/invitations").body;
        (list["invitations"].as_array()?.len() == 5).then_some(list)
    });
    for invitation in waiting["invitations"].as_array().unwrap() {
        assert_eq!(invitation["invited_by"], stranger.peer().to_string());
        assert_eq!(invitation["members"].as_array().unwrap().len(), 202);
    }
    // The stranger, and its puppets, "send" group messages: with no group
    // joined none is held, and no group, member or key exchange appears.
    let senders = std::iter::once(stranger.peer()).chain(puppets.iter().take(20).map(|p| p.peer_id));
    for (i, sender) in senders.enumerate() {
        let message = GroupMessage {
            group_id: groups[0],
            sender,
            key_id: 1,
            message_number: i as u32,
            ciphertext: vec![0x5a; 4_000],
            signature: Signature64([0; 64]),
        };
        stranger.send(&Envelope::new(EnvelopeBody::Group(message)).encode());
    }
    refused(&mut events, "group message whose sender is not the peer it came from", "a puppet's message");
    let conversations = victim.client.get("/api/chat/conversations").body;
    let kinds: Vec<&str> = conversations["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["conversation_type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["1on1"], "only the stranger's own 1:1 conversation");
    for group in &groups {
        let members = victim.client.get(&format!("/api/chat/groups/{group}/members"));
        assert_eq!((members.status, members.code()), (404, "not_found"), "no group {group} here");
    }
    let peers = victim.client.get("/api/peers").body;
    assert!(
        peers["peers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| puppets.iter().all(|m| p["peer_id"] != m.peer_id.to_string())),
        "no puppet is looked up or dialled: {peers}"
    );
    // On disk: the five invitations, no member row, and nothing queued in
    // answer to the three dropped over the cap or to the puppets.
    assert_eq!(victim.rows("chat_invitations"), 5);
    assert_eq!(victim.rows("chat_group_members"), 0);
    assert_eq!(victim.rows("chat_held_messages"), 0);
    assert_eq!(victim.rows("chat_key_exchanges"), 0);
    let queued = victim.rows("chat_outbox");
    assert!(queued <= 2, "{queued} items queued (receipts and acknowledgements for the stranger at most)");
    // The victim declines one: it is gone, and the stranger is told.
    let first = waiting["invitations"][0]["conversation_id"].as_str().unwrap().to_owned();
    let declined = victim.client.post_empty(&format!("/api/chat/groups/{first}/decline"));
    assert_eq!(declined.status, 200, "{:?}", declined.body);
    assert_eq!(victim.client.get("/api/chat/invitations").body["invitations"].as_array().unwrap().len(), 4);
}

/// The time now, as the relay client takes it.
fn wall_clock() -> Timestamp {
    Timestamp::from_millis(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
    )
}
