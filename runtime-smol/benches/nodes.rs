//! Two nodes on loopback, a one-way stream of 100-byte messages, each
//! committed at both ends before its delivery receipt makes it `delivered`:
//! `cargo bench -p p2pchat --bench nodes`.
//!
//! Reports sustained throughput (messages per second until the last is
//! delivered) and latency percentiles (send command to `delivered` at the
//! sender) at a fixed 1,000 messages per second, with `synchronous=NORMAL`
//! and `FULL`, over a direct connection; and, with `NORMAL`, through a relay
//! only (both nodes `--no-direct`, the relay's per-sender rate limit lifted
//! so it measures the path, not the limit).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use p2pchat::node::{Node, NodeConfig};
use p2pchat::relay_server::{RelayServer, RelayServerConfig};
use p2pchat_protocol::engine::{Command, CommandOutcome, EngineConfig, Event};
use p2pchat_storage_sqlite::Durability;

fn bench_dir(name: &str, durability: Durability) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("node-bench-{name}-{durability:?}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A relay on loopback with no per-sender rate limit to speak of.
fn start_relay(durability: Durability) -> RelayServer {
    RelayServer::start(RelayServerConfig {
        data_dir: bench_dir("relay", durability),
        listen: "127.0.0.1:0".parse().unwrap(),
        durability,
        relay: p2pchat_protocol::relay::RelayConfig {
            rate_per_sec: 1_000_000,
            rate_burst: 1_000_000,
            ..p2pchat_protocol::relay::RelayConfig::default()
        },
        passphrase: None,
    })
    .unwrap()
}

/// A node; with a relay, reachable only through it.
fn start(name: &str, durability: Durability, relay: Option<&RelayServer>) -> Node {
    Node::start(NodeConfig {
        data_dir: bench_dir(name, durability),
        listen: "127.0.0.1:0".parse().unwrap(),
        no_direct: relay.is_some(),
        public_addrs: Vec::new(),
        // Every peer is on loopback.
        address_policy: p2pchat_protocol::address::AddressPolicy::AllowPrivate,
        passphrase: None,
        durability,
        engine: EngineConfig::default(),
        relays: relay.map(|r| r.address().parse().unwrap()).into_iter().collect(),
    })
    .unwrap()
}

/// Sends in flight at once.
const WINDOW: usize = 64;

fn run(durability: Durability, count: usize, rate: Option<u32>, via_relay: bool) -> (f64, Vec<Duration>) {
    let relay = via_relay.then(|| start_relay(durability));
    let (alice, bob) = (start("alice", durability, relay.as_ref()), start("bob", durability, relay.as_ref()));
    let (a, b) = (alice.handle(), bob.handle());
    if via_relay {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !(a.relay_connected() && b.relay_connected()) {
            assert!(Instant::now() < deadline, "the nodes did not connect to the relay");
            std::thread::sleep(Duration::from_millis(20));
        }
    } else {
        a.add_peer_address(b.peer_id(), b.listen_addr());
        b.add_peer_address(a.peer_id(), a.listen_addr());
    }
    let events = a.subscribe();
    let c = match smol::block_on(a.command(Command::CreateConversation { peer: b.peer_id() })).unwrap() {
        CommandOutcome::Conversation(c) => c.id,
        other => panic!("{other:?}"),
    };
    let text = "x".repeat(100);
    // Warm up: the key exchange and the first message.
    let first =
        match smol::block_on(a.command(Command::SendMessage { conversation: c, content: text.clone() })).unwrap() {
            CommandOutcome::Message(m) => m.id,
            other => panic!("{other:?}"),
        };
    smol::block_on(async {
        while let Ok(e) = events.recv().await {
            if matches!(e, Event::MessageDelivered { message_id, .. } if message_id == first) {
                break;
            }
        }
    });
    let started = Instant::now();
    let collector = std::thread::spawn({
        let events = events.clone();
        move || {
            let mut delivered = HashMap::new();
            while delivered.len() < count {
                match smol::block_on(events.recv()) {
                    Ok(Event::MessageDelivered { message_id, .. }) => {
                        delivered.insert(message_id, Instant::now());
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            delivered
        }
    });
    // A window of sends in flight, as from an API with many clients: each
    // task takes the next message number, waits for its slot at a fixed
    // rate (if any), and sends.
    let next = std::cell::Cell::new(0usize);
    let sent_at = std::cell::RefCell::new(HashMap::new());
    let executor = smol::LocalExecutor::new();
    let tasks: Vec<_> = (0..WINDOW)
        .map(|_| {
            executor.spawn(async {
                loop {
                    let n = next.get();
                    if n >= count {
                        break;
                    }
                    next.set(n + 1);
                    if let Some(rate) = rate {
                        smol::Timer::at(started + Duration::from_secs_f64(n as f64 / f64::from(rate))).await;
                    }
                    let at = Instant::now();
                    match a.command(Command::SendMessage { conversation: c, content: text.clone() }).await.unwrap() {
                        CommandOutcome::Message(m) => sent_at.borrow_mut().insert(m.id, at),
                        other => panic!("{other:?}"),
                    };
                }
            })
        })
        .collect();
    smol::block_on(executor.run(async {
        for task in tasks {
            task.await;
        }
    }));
    drop(executor);
    let sent_at = sent_at.into_inner();
    let delivered = collector.join().unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies: Vec<Duration> =
        delivered.iter().filter_map(|(id, t)| sent_at.get(id).map(|s| *t - *s)).collect();
    latencies.sort();
    alice.shutdown();
    bob.shutdown();
    if let Some(relay) = relay {
        relay.shutdown();
    }
    (count as f64 / elapsed, latencies)
}

fn pct(l: &[Duration], p: f64) -> f64 {
    l[((l.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1_000.0
}

fn main() {
    // `cargo bench -p p2pchat --bench nodes -- throughput` (or `latency`)
    // runs one half.
    let only: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wants = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let paths = [(Durability::Normal, false), (Durability::Full, false), (Durability::Normal, true)];
    for (durability, via_relay) in paths {
        let name = if via_relay { format!("{durability:?}, relay only") } else { format!("{durability:?}") };
        if wants("throughput") {
            // Through a relay fewer: the path is slower, and a sender keeps
            // at most 10,000 messages queued for one peer.
            let count = if via_relay { 5_000 } else { 20_000 };
            let (throughput, _) = run(durability, count, None, via_relay);
            println!("{name}: {count} messages, {WINDOW} sends in flight: {throughput:.0} delivered per second");
        }
        if wants("latency") {
            let (_, l) = run(durability, 3_000, Some(1_000), via_relay);
            println!(
                "{name}: at 1,000 messages per second, send to delivered: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                pct(&l, 0.5),
                pct(&l, 0.9),
                pct(&l, 0.99),
                pct(&l, 1.0)
            );
        }
    }
}
