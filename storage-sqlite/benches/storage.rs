//! Storage throughput and paging latency: `cargo bench -p p2pchat-storage-sqlite --bench storage`.
//!
//! 1. Storing received messages, each with its ratchet-state update (a
//!    1.2 KB sealed state), one transaction per step, with WAL and
//!    `synchronous=NORMAL`, then `FULL`.
//! 2. Reading one page of 50 messages, newest first, from a conversation of
//!    100,000 messages: the first page and pages deep in the history.
//!
//! Files live under the target directory (on disk, not tmpfs), so commits
//! pay for real syncs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Instant;

use p2pchat_protocol::engine::{
    Conversation, ConversationKind, ConversationStore, Message, MessageStatus, MessageStore, SessionStore, Transaction,
};
use p2pchat_protocol::keys::IdentitySeed;
use p2pchat_protocol::{ConversationId, MessageId, PeerId, Timestamp, Uuid};
use p2pchat_storage_sqlite::{Durability, MasterKey, SqliteStore};

const PEER: PeerId = PeerId([4; 20]);
const CONVERSATION: ConversationId = ConversationId(Uuid([9; 16]));

fn key() -> MasterKey {
    MasterKey::derive(&IdentitySeed::from_bytes([3; 32]))
}

fn message(n: u64) -> Message {
    Message {
        id: MessageId(Uuid(u128::from(n).to_be_bytes())),
        conversation_id: CONVERSATION,
        sender: PEER,
        content: "a hundred bytes of message text, more or less, as a typical chat line would be in use!!".into(),
        timestamp: Timestamp(n),
        status: MessageStatus::Delivered,
        sent_at: None,
        delivered_at: Some(Timestamp(n)),
        read_at: None,
        failure_reason: None,
        waiting_reason: None,
        recipients: vec![],
        stored_at: Timestamp(n),
        group_position: None,
    }
}

fn fresh(name: &str, durability: Durability) -> (SqliteStore, PathBuf) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("storage-bench");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
    let mut store = SqliteStore::open(&path, key(), durability).unwrap();
    store.begin().unwrap();
    store
        .put_conversation(&Conversation {
            id: CONVERSATION,
            kind: ConversationKind::OneOnOne { peer: PEER },
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
            last_message_at: None,
            last_message_id: None,
            unread_count: 0,
            left: false,
        })
        .unwrap();
    store.commit().unwrap();
    (store, path)
}

fn receive_rate(durability: Durability, steps: u64) -> f64 {
    let (mut store, _) = fresh(&format!("receive-{durability:?}.sqlite3"), durability);
    let state = vec![0x42u8; 1_200];
    let started = Instant::now();
    for n in 1..=steps {
        store.begin().unwrap();
        store.put_message(&message(n)).unwrap();
        store.put_sessions(&PEER, &state).unwrap();
        store.commit().unwrap();
    }
    steps as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let normal = receive_rate(Durability::Normal, 20_000);
    println!("received message + ratchet state, one transaction each, WAL synchronous=NORMAL: {normal:.0} per second");
    let full = receive_rate(Durability::Full, 3_000);
    println!("received message + ratchet state, one transaction each, WAL synchronous=FULL:   {full:.0} per second");
    println!("  (NORMAL/FULL = {:.1}x)", normal / full);

    let (mut store, _) = fresh("paging.sqlite3", Durability::Normal);
    let total = 100_000u64;
    let started = Instant::now();
    for chunk in (1..=total).collect::<Vec<_>>().chunks(10_000) {
        store.begin().unwrap();
        for &n in chunk {
            store.put_message(&message(n)).unwrap();
        }
        store.commit().unwrap();
    }
    println!("filled one conversation with {total} messages in {:.1}s", started.elapsed().as_secs_f64());
    let rounds = 2_000u32;
    for (what, before) in [("the newest page", None), ("a page 60,000 messages back", Some(40_000u64))] {
        let before = before.map(|n| message(n).id);
        store.begin().unwrap();
        let page = store.messages_page(&CONVERSATION, before.as_ref(), 50).unwrap();
        assert_eq!(page.len(), 50);
        let started = Instant::now();
        for _ in 0..rounds {
            let page = store.messages_page(&CONVERSATION, before.as_ref(), 50).unwrap();
            std::hint::black_box(page);
        }
        let per = started.elapsed().as_secs_f64() / f64::from(rounds);
        store.rollback();
        println!("one page of 50 from {total} messages, {what}: {:.3} ms", per * 1_000.0);
    }
}
