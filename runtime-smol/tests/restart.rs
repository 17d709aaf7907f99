//! A node killed with SIGKILL mid-conversation and reopened from its files
//! carries on: nothing its peer sent is lost or stored twice.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use p2pchat::node::{Node, NodeConfig};
use p2pchat_protocol::engine::{
    Command, CommandOutcome, ConversationStore, EngineConfig, Event, MessageStore, Transaction,
};
use p2pchat_protocol::PeerId;
use p2pchat_storage_sqlite::{Durability, MasterKey, SqliteStore};

const DIR_ENV: &str = "P2PCHAT_RESTART_TEST_DIR";

fn config(dir: PathBuf) -> NodeConfig {
    NodeConfig {
        data_dir: dir,
        listen: "127.0.0.1:0".parse().unwrap(),
        no_direct: false,
        public_addrs: Vec::new(),
        // Every peer is on loopback.
        address_policy: p2pchat_protocol::address::AddressPolicy::AllowPrivate,
        passphrase: None,
        durability: Durability::Normal,
        engine: EngineConfig { confirmation_timeout_ms: 300, retry_backoff_ms: 200, ..EngineConfig::default() },
        relays: Vec::new(),
    }
}

/// The child: a node that prints its peer ID and address, learns peers'
/// addresses from stdin, and runs until it is killed.
#[test]
#[ignore = "the child process of the restart test"]
fn restart_test_child() {
    let Ok(dir) = std::env::var(DIR_ENV) else { return };
    let node = Node::start(config(PathBuf::from(dir))).unwrap();
    let handle = node.handle();
    println!("ready {} {}", handle.peer_id(), handle.listen_addr());
    for line in std::io::stdin().lines() {
        let line = line.unwrap();
        let mut parts = line.split_whitespace();
        if let (Some("peer"), Some(peer), Some(addr)) = (parts.next(), parts.next(), parts.next()) {
            handle.add_peer_address(peer.parse().unwrap(), addr.parse().unwrap());
        }
    }
    std::thread::sleep(Duration::from_secs(3600));
}

struct Child_ {
    child: Child,
    stdin: ChildStdin,
    peer: PeerId,
    addr: std::net::SocketAddr,
}

fn spawn_bob(dir: &PathBuf) -> Child_ {
    let mut child = Process::new(std::env::current_exe().unwrap())
        .args(["--exact", "restart_test_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(DIR_ENV, dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stdin = child.stdin.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // The test harness may print the test's name on the same line.
            if let Some(at) = line.find("ready ") {
                let _ = tx.send(line[at + "ready ".len()..].to_owned());
            }
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(30)).expect("the child node started");
    let mut parts = ready.split_whitespace();
    let peer = parts.next().unwrap().parse().unwrap();
    let addr = parts.next().unwrap().parse().unwrap();
    Child_ { child, stdin, peer, addr }
}

fn wait_delivered(events: &smol::channel::Receiver<Event>, ids: &[p2pchat_protocol::MessageId]) {
    let mut left: Vec<_> = ids.to_vec();
    smol::block_on(async {
        let deadline = async {
            smol::Timer::after(Duration::from_secs(30)).await;
            false
        };
        let all = async {
            while !left.is_empty() {
                match events.recv().await {
                    Ok(Event::MessageDelivered { message_id, .. }) => left.retain(|id| *id != message_id),
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
            true
        };
        assert!(smol::future::or(all, deadline).await, "every message was delivered within 30 s");
    });
}

#[test]
fn a_node_killed_mid_conversation_carries_on_from_its_files() {
    let base = std::env::temp_dir().join(format!("p2pchat-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (alice_dir, bob_dir) = (base.join("alice"), base.join("bob"));
    let alice = Node::start(config(alice_dir)).unwrap();
    let a = alice.handle();
    let events = a.subscribe();

    let mut bob = spawn_bob(&bob_dir);
    writeln!(bob.stdin, "peer {} {}", a.peer_id(), a.listen_addr()).unwrap();
    a.add_peer_address(bob.peer, bob.addr);
    let CommandOutcome::Conversation(c) =
        smol::block_on(a.command(Command::CreateConversation { peer: bob.peer })).unwrap()
    else {
        panic!("a conversation")
    };
    let send =
        |text: String| match smol::block_on(a.command(Command::SendMessage { conversation: c.id, content: text }))
            .unwrap()
        {
            CommandOutcome::Message(m) => m.id,
            other => panic!("{other:?}"),
        };
    let mut sent = Vec::new();
    for n in 0..5 {
        sent.push(send(format!("before the crash {n}")));
    }
    wait_delivered(&events, &sent);

    // SIGKILL, no shutdown; meanwhile Alice keeps writing.
    bob.child.kill().unwrap();
    bob.child.wait().unwrap();
    let mut later = Vec::new();
    for n in 0..5 {
        later.push(send(format!("after the crash {n}")));
    }

    // Bob reopens from his files (same identity, a new port) and catches up.
    let mut bob = spawn_bob(&bob_dir);
    writeln!(bob.stdin, "peer {} {}", a.peer_id(), a.listen_addr()).unwrap();
    a.add_peer_address(bob.peer, bob.addr);
    wait_delivered(&events, &later);
    bob.child.kill().unwrap();
    bob.child.wait().unwrap();
    alice.shutdown();

    // Bob's database holds all ten, each once, with its text.
    let identity = p2pchat_storage_sqlite::load_identity(&bob_dir.join("identity.key")).unwrap();
    let mut store =
        SqliteStore::open(&bob_dir.join("node.sqlite3"), MasterKey::derive(&identity.seed()), Durability::Normal)
            .unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    store.begin().unwrap();
    let conversation = store.conversations().unwrap().into_iter().find(|x| x.id == c.id).expect("bob's side");
    let texts: Vec<String> = store.messages(&conversation.id).unwrap().into_iter().map(|m| m.content).collect();
    store.rollback();
    // All ten, once each. Frames travel on parallel streams, so the five
    // sent while Bob was down may arrive in any order among themselves
    // (each carries its send time); none is lost or doubled.
    let before: Vec<String> = (0..5).map(|n| format!("before the crash {n}")).collect();
    assert_eq!(texts[..5], before[..], "the first five, stored before the crash, are still there");
    let mut after: Vec<String> = texts[5..].to_vec();
    after.sort();
    let expected: Vec<String> = (0..5).map(|n| format!("after the crash {n}")).collect();
    assert_eq!(after, expected, "the five sent during the crash, once each");
    assert_eq!(texts.len(), 10);
    let _ = std::fs::remove_dir_all(&base);
}
