//! Separate `p2pchat` processes on loopback, driven only through the API.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::json;
use support::{eventually, eventually_within, Client, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_p2pchat");

/// A child process whose stdout lines arrive on a channel; killed on drop.
struct Process {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Process {
    fn spawn(args: &[&str], dir: &Path) -> Self {
        let mut child = Command::new(BIN)
            .args(args)
            .env("P2PCHAT_LOG_DIR", dir.join("logs"))
            .env("P2PCHAT_LOG_LEVEL", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("p2pchat starts");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    /// The first line after `prefix` on a line that starts with it.
    fn wait_line(&self, prefix: &str) -> String {
        loop {
            let line =
                self.lines.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("no {prefix:?} line"));
            if let Some(rest) = line.trim_start().strip_prefix(prefix) {
                return rest.trim().to_owned();
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops it as a user would (SIGINT), and waits for it to exit.
    fn stop(&mut self) {
        let status = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill -INT failed");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "the node did not stop within 20 s of SIGINT");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct ProcNode {
    process: Process,
    client: Client,
    peer: String,
}

fn relay(dir: &Path) -> (Process, String) {
    relay_named(dir, "relay")
}

fn relay_named(dir: &Path, name: &str) -> (Process, String) {
    let data = dir.join(name);
    let p = Process::spawn(&["relay", "--data-dir", data.to_str().unwrap(), "--listen", "127.0.0.1:0"], dir);
    let address = p.wait_line("relay ");
    (p, address)
}

fn node(dir: &Path, name: &str, relay: &str, extra: &[&str], quic: u16, api: u16) -> ProcNode {
    let data = dir.join(name);
    let listen = format!("127.0.0.1:{quic}");
    let api_addr = format!("127.0.0.1:{api}");
    let mut args = vec!["node", "--data-dir", data.to_str().unwrap(), "--listen", &listen, "--api", &api_addr];
    args.extend(["--relay", relay, "--allow-private-addresses"]);
    args.extend(extra);
    let process = Process::spawn(&args, dir);
    let peer = process.wait_line("node ").split(' ').next().unwrap().to_owned();
    let addr = process.wait_line("API on http://").split(' ').next().unwrap().parse().unwrap();
    // Its standard output is a pipe, as under a service manager: no
    // one-time link there, only how to sign in.
    let web = process.wait_line("web UI:");
    assert!(!web.contains("/auth"), "a sign-in link went to a captured output: {web}");
    assert!(web.contains("p2pchat token"), "{web}");
    let token = std::fs::read_to_string(data.join(p2pchat::api::TOKEN_FILE)).unwrap();
    let client = Client { addr, token };
    eventually("registered with the relay", || {
        (client.get("/api/relay/status").body["connected"] == true).then_some(())
    });
    ProcNode { process, client, peer }
}

fn contents(client: &Client, conversation: &str) -> Vec<String> {
    let page = client.get(&format!("/api/chat/conversations/{conversation}/messages?limit=500"));
    let mut texts: Vec<String> = page.body["messages"]
        .as_array()
        .map(|m| m.iter().map(|m| m["content"].as_str().unwrap_or_default().to_owned()).collect())
        .unwrap_or_default();
    texts.reverse();
    texts
}

fn open(client: &Client, peer: &str) -> String {
    let created = client.post("/api/chat/conversations", json!({"peer_id": peer}));
    assert_eq!(created.status, 200, "{:?}", created.body);
    created.body["conversation_id"].as_str().unwrap().to_owned()
}

fn say(client: &Client, conversation: &str, text: &str) -> String {
    let sent = client.post(&format!("/api/chat/conversations/{conversation}/messages"), json!({"content": text}));
    assert_eq!(sent.status, 200, "{:?}", sent.body);
    sent.body["message_id"].as_str().unwrap().to_owned()
}

#[test]
fn two_node_processes_and_a_relay_and_a_no_direct_node() {
    let dir = TempDir::new("procs");
    let (_relay, address) = relay(&dir.0);
    let alice = node(&dir.0, "alice", &address, &[], 0, 0);
    let bob = node(&dir.0, "bob", &address, &[], 0, 0);
    let carol = node(&dir.0, "carol", &address, &["--no-direct"], 0, 0);
    assert_eq!(carol.client.get("/api/node").body["direct"], false);

    let ab = open(&alice.client, &bob.peer);
    say(&alice.client, &ab, "hello bob");
    eventually("bob has it", || (contents(&bob.client, &ab) == ["hello bob"]).then_some(()));
    say(&bob.client, &ab, "hello alice");
    eventually("alice has the reply", || (contents(&alice.client, &ab).len() == 2).then_some(()));

    // Carol cannot be dialled: alice reaches her through the relay.
    let ac = open(&alice.client, &carol.peer);
    say(&alice.client, &ac, "hello carol");
    eventually("carol has it", || (contents(&carol.client, &ac) == ["hello carol"]).then_some(()));
    say(&carol.client, &ac, "hi from behind NAT");
    eventually("alice has carol's reply", || (contents(&alice.client, &ac).len() == 2).then_some(()));
    let peers = alice.client.get("/api/peers").body;
    let carol_entry = peers["peers"].as_array().unwrap().iter().find(|p| p["peer_id"] == carol.peer.as_str()).cloned();
    // Carol publishes no address, so alice never dials her (carol may dial
    // out to alice, as a node behind NAT can).
    let carol_entry = carol_entry.expect("alice has a path for carol");
    assert!(carol_entry["address"].is_null(), "alice knows no address of carol: {peers}");
    // Her record, which lists only the relay, came from it.
    assert_eq!(carol_entry["record_from"], address.as_str(), "{peers}");

    // A group of three across both paths.
    let g = alice.client.post("/api/chat/groups", json!({"group_name": "trio", "members": [bob.peer, carol.peer]}));
    assert_eq!(g.status, 200, "{:?}", g.body);
    let g = g.body["conversation_id"].as_str().unwrap().to_owned();
    alice.client.post(&format!("/api/chat/groups/{g}/messages"), json!({"content": "hello trio"}));
    for member in [&bob.client, &carol.client] {
        eventually("the group message arrives", || (contents(member, &g) == ["hello trio"]).then_some(()));
        // Both wrote to alice before: her invitation was joined unasked.
        assert_eq!(member.get("/api/chat/invitations").body["invitations"], json!([]));
    }
    carol.client.post(&format!("/api/chat/groups/{g}/messages"), json!({"content": "carol here"}));
    eventually("carol's group message reaches bob", || (contents(&bob.client, &g).len() == 2).then_some(()));
}

#[test]
fn a_recipient_killed_mid_burst_gets_every_message_exactly_once() {
    let dir = TempDir::new("burst");
    let (_relay, address) = relay(&dir.0);
    let alice = node(&dir.0, "alice", &address, &[], 0, 0);
    let (bob_quic, bob_api) = (free_udp_port(), free_tcp_port());
    let mut bob = node(&dir.0, "bob", &address, &[], bob_quic, bob_api);
    let c = open(&alice.client, &bob.peer);
    say(&alice.client, &c, "m0");
    eventually("the session is up", || (contents(&bob.client, &c) == ["m0"]).then_some(()));

    // 200 messages; bob is killed with SIGKILL after the first 60 are sent.
    let sender = {
        let client = alice.client.clone();
        let c = c.clone();
        std::thread::spawn(move || {
            for k in 1..=200 {
                say(&client, &c, &format!("m{k}"));
                // Paced, so the kill lands mid-burst.
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let before = eventually("bob is receiving", || {
        let n = contents(&bob.client, &c).len();
        (n > 40).then_some(n)
    });
    bob.process.kill();
    assert!(before < 150, "the kill came mid-burst ({before} of 201 had arrived)");
    sender.join().unwrap();
    drop(bob);
    let bob = node(&dir.0, "bob", &address, &[], bob_quic, bob_api);
    let expected: Vec<String> = (0..=200).map(|k| format!("m{k}")).collect();
    // Alice learns that bob is back when her next retry reaches him: the
    // confirmation timeout (30 s by default) bounds the wait.
    let got = eventually_within(90, "every message arrives", || {
        let got = contents(&bob.client, &c);
        (got.len() >= expected.len()).then_some(got)
    });
    let mut sorted = got.clone();
    sorted.sort_by_key(|m| m[1..].parse::<u32>().unwrap());
    assert_eq!(sorted, expected, "each message exactly once");
    // And alice sees every one delivered.
    eventually_within(60, "all delivered at alice", || {
        let page = alice.client.get(&format!("/api/chat/conversations/{c}/messages?limit=500"));
        page.body["messages"]
            .as_array()?
            .iter()
            .all(|m| m["status"] == "delivered" || m["status"] == "read")
            .then_some(())
    });
}

#[test]
fn the_demo_comes_up_and_answers() {
    let dir = TempDir::new("demo");
    let demo = Process::spawn(&["demo", "--data-dir", dir.0.join("data").to_str().unwrap()], &dir.0);
    let mut apis = Vec::new();
    for name in ["alice ", "bob ", "carol "] {
        let _ = demo.wait_line(name);
        let line = demo.wait_line("API http://");
        let (api, ui) = line.split_once("  web UI ").unwrap();
        assert!(ui.contains("/auth?code="), "a one-time login link: {ui}");
        apis.push((name.trim(), api.parse::<std::net::SocketAddr>().unwrap()));
    }
    for (name, addr) in apis {
        let token = std::fs::read_to_string(dir.0.join("data").join(name).join(p2pchat::api::TOKEN_FILE)).unwrap();
        let client = Client { addr, token };
        let info = client.get("/api/node");
        assert_eq!(info.status, 200, "{name}: {:?}", info.body);
        eventually("the demo group exists", || {
            let list = client.get("/api/chat/conversations").body;
            list["conversations"].as_array()?.iter().any(|c| c["group_name"] == "demo").then_some(())
        });
    }
}

/// Alice and dave reach each other directly. Dave stops; alice's next
/// message cannot go directly, so it goes to dave's relay mailbox instead
/// of waiting for a direct path; alice stops too. Dave comes back and finds
/// it there; alice, back, sees it delivered (dave's receipt waited in her
/// mailbox in turn).
#[test]
fn a_message_to_a_direct_peer_that_went_away_waits_in_its_relay_mailbox() {
    let dir = TempDir::new("away");
    let (_relay, address) = relay(&dir.0);
    let (alice_quic, alice_api) = (free_udp_port(), free_tcp_port());
    let (dave_quic, dave_api) = (free_udp_port(), free_tcp_port());
    let mut alice = node(&dir.0, "alice", &address, &[], alice_quic, alice_api);
    let mut dave = node(&dir.0, "dave", &address, &[], dave_quic, dave_api);
    let c = open(&alice.client, &dave.peer);
    say(&alice.client, &c, "hello dave");
    eventually("dave has it", || (contents(&dave.client, &c) == ["hello dave"]).then_some(()));
    let peers = alice.client.get("/api/peers").body;
    let direct =
        peers["peers"].as_array().unwrap().iter().any(|p| p["peer_id"] == dave.peer.as_str() && p["connected"] == true);
    assert!(direct, "alice reached dave directly: {peers}");

    dave.process.stop();
    let id = say(&alice.client, &c, "are you there?");
    eventually_within(60, "the message is held in dave's relay mailbox", || {
        let m = alice.client.get(&format!("/api/chat/conversations/{c}/messages?limit=1")).body["messages"][0].clone();
        (m["message_id"] == id.as_str() && m["status"] == "sent" && m["waiting_reason"].is_null()).then_some(())
    });
    alice.process.stop();

    let dave = node(&dir.0, "dave", &address, &[], dave_quic, dave_api);
    eventually_within(60, "dave finds it in his mailbox", || {
        (contents(&dave.client, &c) == ["hello dave", "are you there?"]).then_some(())
    });
    drop(alice);
    let alice = node(&dir.0, "alice", &address, &[], alice_quic, alice_api);
    eventually_within(60, "alice sees it delivered", || {
        let page = alice.client.get(&format!("/api/chat/conversations/{c}/messages?limit=1")).body;
        let m = &page["messages"][0];
        (m["message_id"] == id.as_str() && (m["status"] == "delivered" || m["status"] == "read")).then_some(())
    });
}

/// The status of the newest message of a conversation, if it is `id`.
fn newest_status(client: &Client, conversation: &str, id: &str) -> Option<String> {
    let page = client.get(&format!("/api/chat/conversations/{conversation}/messages?limit=1")).body;
    let m = &page["messages"][0];
    (m["message_id"] == id).then(|| m["status"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn two_relays_and_one_killed_the_conversation_goes_on_through_the_other() {
    let dir = TempDir::new("two-relays");
    let (mut first, first_address) = relay_named(&dir.0, "relay1");
    let (_second, second_address) = relay_named(&dir.0, "relay2");
    // Neither accepts direct connections: relays are their only path.
    let extra = ["--relay", second_address.as_str(), "--no-direct"];
    let alice = node(&dir.0, "alice", &first_address, &extra, 0, 0);
    let dave = node(&dir.0, "dave", &first_address, &extra, 0, 0);
    for n in [&alice, &dave] {
        eventually("connected to both relays", || {
            let status = n.client.get("/api/relay/status").body;
            let relays = status["relays"].as_array().cloned().unwrap_or_default();
            (relays.len() == 2 && relays.iter().all(|r| r["connected"] == true)).then_some(())
        });
    }
    let c = open(&alice.client, &dave.peer);
    let first_id = say(&alice.client, &c, "one");
    eventually("dave has it", || (contents(&dave.client, &c) == ["one"]).then_some(()));
    eventually("delivered", || (newest_status(&alice.client, &c, &first_id)? == "delivered").then_some(()));

    // The first relay dies without a word: no QUIC close reaches anyone.
    first.kill();
    let id = say(&alice.client, &c, "two");
    eventually_within(15, "dave gets it through the second relay", || {
        (contents(&dave.client, &c) == ["one", "two"]).then_some(())
    });
    eventually_within(15, "alice sees it delivered", || {
        (newest_status(&alice.client, &c, &id)? == "delivered").then_some(())
    });
    let reply = say(&dave.client, &c, "three");
    eventually_within(15, "alice gets dave's reply", || {
        (contents(&alice.client, &c) == ["one", "two", "three"]).then_some(())
    });
    eventually_within(15, "dave sees it delivered", || {
        (newest_status(&dave.client, &c, &reply)? == "delivered").then_some(())
    });
    // Nothing was shown twice, and the status says which relay is down.
    assert_eq!(contents(&dave.client, &c), ["one", "two", "three"]);
    let status = alice.client.get("/api/relay/status").body;
    assert_eq!(status["relays"][0]["connected"], false, "{status}");
    assert!(status["relays"][0]["last_error"].is_string(), "{status}");
    assert_eq!(status["relays"][1]["connected"], true, "{status}");
}

/// Every message of a conversation, oldest first, page by page.
fn all_messages(client: &Client, conversation: &str) -> Vec<serde_json::Value> {
    let mut messages = Vec::new();
    let mut path = format!("/api/chat/conversations/{conversation}/messages?limit=500");
    loop {
        let page = client.get(&path).body;
        messages.extend(page["messages"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/chat/conversations/{conversation}/messages?limit=500&before={cursor}"),
            None => break,
        }
    }
    messages.reverse();
    messages
}

#[test]
fn a_returning_node_drains_a_full_mailbox_of_a_thousand_in_one_connection() {
    const HELD: usize = 1_000;
    let dir = TempDir::new("drain");
    // One sender fills the whole mailbox: its share of it is raised to the
    // mailbox's size, and its burst to what it sends at once. Dave's side
    // (batches of 64, acknowledged after each commit) is the relay's
    // default.
    let data = dir.0.join("relay");
    let relay_args = [
        "relay",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--mailbox-max-count-per-sender",
        "1000",
        "--mailbox-max-count-per-source",
        "1000",
        "--relay-rate-burst",
        "1100",
    ];
    let relay = Process::spawn(&relay_args, &dir.0);
    let address = relay.wait_line("relay ");
    let alice = node(&dir.0, "alice", &address, &[], 0, 0);
    let (dave_quic, dave_api) = (free_udp_port(), free_tcp_port());
    let mut dave = node(&dir.0, "dave", &address, &["--no-direct"], dave_quic, dave_api);
    let c = open(&alice.client, &dave.peer);
    say(&alice.client, &c, "m0");
    eventually("the session is up", || (contents(&dave.client, &c) == ["m0"]).then_some(()));

    dave.process.stop();
    for k in 1..=HELD {
        say(&alice.client, &c, &format!("m{k}"));
    }
    eventually_within(60, "every message is held in dave's mailbox", || {
        let messages = all_messages(&alice.client, &c);
        let held = messages.iter().filter(|m| m["status"] == "sent" && m["waiting_reason"].is_null()).count();
        (held == HELD).then_some(())
    });

    drop(dave);
    let dave = node(&dir.0, "dave", &address, &["--no-direct"], dave_quic, dave_api);
    let connected_since = dave.client.get("/api/relay/status").body["relays"][0]["since"].clone();
    let got = eventually_within(120, "dave drains his mailbox", || {
        let got = all_messages(&dave.client, &c);
        (got.len() > HELD).then_some(got)
    });
    let mut texts: Vec<String> = got.iter().map(|m| m["content"].as_str().unwrap().to_owned()).collect();
    texts.sort_by_key(|m| m[1..].parse::<usize>().unwrap());
    let expected: Vec<String> = (0..=HELD).map(|k| format!("m{k}")).collect();
    assert_eq!(texts, expected, "each message exactly once");
    // One connection did it: dave's relay connection is the one that was
    // open before the drain began.
    let status = dave.client.get("/api/relay/status").body;
    assert_eq!(status["relays"][0]["connected"], true, "{status}");
    assert_eq!(status["relays"][0]["since"], connected_since, "{status}");
}
