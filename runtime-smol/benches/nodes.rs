//! Two nodes on loopback, a one-way stream of 100-byte messages, each
//! committed at both ends before its delivery receipt makes it `delivered`:
//! `cargo bench -p p2pchat --bench nodes`.
//!
//! Reports sustained throughput (messages per second until the last is
//! delivered) and latency percentiles (send command to `delivered` at the
//! sender) at a fixed 1,000 messages per second, with `synchronous=NORMAL`
//! and `FULL`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use p2pchat::node::{Node, NodeConfig};
use p2pchat_protocol::engine::{Command, CommandOutcome, EngineConfig, Event};
use p2pchat_storage_sqlite::Durability;

fn start(name: &str, durability: Durability) -> Node {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("node-bench-{name}-{durability:?}"));
    let _ = std::fs::remove_dir_all(&dir);
    Node::start(NodeConfig {
        data_dir: dir,
        listen: "127.0.0.1:0".parse().unwrap(),
        no_direct: false,
        durability,
        engine: EngineConfig::default(),
        relays: Vec::new(),
    })
    .unwrap()
}

fn run(durability: Durability, count: usize, rate: Option<u32>) -> (f64, Vec<Duration>) {
    let (alice, bob) = (start("alice", durability), start("bob", durability));
    let (a, b) = (alice.handle(), bob.handle());
    a.add_peer_address(b.peer_id(), b.listen_addr());
    b.add_peer_address(a.peer_id(), a.listen_addr());
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
    let mut sent_at = HashMap::new();
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
    for n in 0..count {
        if let Some(rate) = rate {
            let due = started + Duration::from_secs_f64(n as f64 / f64::from(rate));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let at = Instant::now();
        let id =
            match smol::block_on(a.command(Command::SendMessage { conversation: c, content: text.clone() })).unwrap() {
                CommandOutcome::Message(m) => m.id,
                other => panic!("{other:?}"),
            };
        sent_at.insert(id, at);
    }
    let delivered = collector.join().unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies: Vec<Duration> =
        delivered.iter().filter_map(|(id, t)| sent_at.get(id).map(|s| *t - *s)).collect();
    latencies.sort();
    alice.shutdown();
    bob.shutdown();
    (count as f64 / elapsed, latencies)
}

fn pct(l: &[Duration], p: f64) -> f64 {
    l[((l.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1_000.0
}

fn main() {
    for durability in [Durability::Normal, Durability::Full] {
        let (throughput, _) = run(durability, 5_000, None);
        println!("{durability:?}: 5,000 messages as fast as the sender goes: {throughput:.0} delivered per second");
        let (_, l) = run(durability, 3_000, Some(1_000));
        println!(
            "{durability:?}: at 1,000 messages per second, send to delivered: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            pct(&l, 0.5),
            pct(&l, 0.9),
            pct(&l, 0.99),
            pct(&l, 1.0)
        );
    }
}
