//! Crash safety: a child process stores messages under load and is killed
//! with SIGKILL at random moments, 50 times, half of them committing with
//! `synchronous=NORMAL` and half with `FULL`. After each kill the database
//! passes `PRAGMA integrity_check`, holds every step the child reported as
//! committed, and no step is half-applied.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use p2pchat_protocol::engine::{
    Conversation, ConversationKind, ConversationStore, Message, MessageStatus, MessageStore, SessionStore, Transaction,
};
use p2pchat_protocol::keys::IdentitySeed;
use p2pchat_protocol::{ConversationId, MessageId, PeerId, Timestamp, Uuid};
use p2pchat_storage_sqlite::{Durability, MasterKey, SqliteStore};

const DB_ENV: &str = "P2PCHAT_KILL_TEST_DB";
const FULL_ENV: &str = "P2PCHAT_KILL_TEST_FULL";
const KILLS: u32 = 50;
const PEER: PeerId = PeerId([4; 20]);
const CONVERSATION: ConversationId = ConversationId(Uuid([9; 16]));

fn key() -> MasterKey {
    MasterKey::derive(&IdentitySeed::from_bytes([11; 32]))
}

fn message(n: u64) -> Message {
    Message {
        id: MessageId(Uuid(u128::from(n).to_be_bytes())),
        conversation_id: CONVERSATION,
        sender: PEER,
        content: format!("step {n} {}", "x".repeat(200)),
        timestamp: Timestamp(n),
        status: MessageStatus::Delivered,
        sent_at: None,
        delivered_at: None,
        read_at: None,
        failure_reason: None,
        waiting_reason: None,
        recipients: vec![],
        stored_at: Timestamp(n),
        group_position: None,
    }
}

/// The "ratchet state" of step `n`: its number, padded like a real state.
fn state(n: u64) -> Vec<u8> {
    let mut s = n.to_le_bytes().to_vec();
    s.resize(1_200, (n % 251) as u8);
    s
}

fn step_of(state: &[u8]) -> u64 {
    u64::from_le_bytes(state[..8].try_into().unwrap())
}

/// The child: one step per transaction (a received message and its
/// ratchet-state update), reporting each step after its commit.
#[test]
#[ignore = "the child process of the kill test"]
fn kill_test_child() {
    let Ok(path) = std::env::var(DB_ENV) else { return };
    let durability = if std::env::var_os(FULL_ENV).is_some() { Durability::Full } else { Durability::Normal };
    let mut store = SqliteStore::open(Path::new(&path), key(), durability).unwrap();
    store.begin().unwrap();
    let mut n = store.sessions(&PEER).unwrap().map_or(0, |s| step_of(&s));
    if store.conversation(&CONVERSATION).unwrap().is_none() {
        let c = Conversation {
            id: CONVERSATION,
            kind: ConversationKind::OneOnOne { peer: PEER },
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
            last_message_at: None,
            last_message_id: None,
            unread_count: 0,
            left: false,
        };
        store.put_conversation(&c).unwrap();
    }
    store.commit().unwrap();
    loop {
        n += 1;
        store.begin().unwrap();
        store.put_message(&message(n)).unwrap();
        store.put_sessions(&PEER, &state(n)).unwrap();
        store.commit().unwrap();
        println!("committed {n}");
    }
}

fn check(path: &Path, reported: u64) -> u64 {
    let conn_check = {
        let mut store = SqliteStore::open(path, key(), Durability::Normal).unwrap();
        store.begin().unwrap();
        let sessions = store.sessions(&PEER).unwrap();
        let last = sessions.as_ref().map_or(0, |s| step_of(s));
        let messages = store.messages(&CONVERSATION).unwrap();
        store.rollback();
        (last, messages)
    };
    let (last, messages) = conn_check;
    assert!(last >= reported, "step {reported} was reported committed, but the state is at {last}");
    // All or nothing: exactly the messages 1..=last, each with its text.
    assert_eq!(messages.len() as u64, last, "messages and ratchet state disagree");
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(m, &message(i as u64 + 1));
    }
    last
}

fn integrity(path: &Path) -> String {
    SqliteStore::open(path, key(), Durability::Normal).unwrap().integrity_check().unwrap()
}

#[test]
fn kills_at_random_moments_lose_nothing_committed_and_leave_nothing_half_done() {
    let dir = std::env::temp_dir().join(format!("p2pchat-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db: PathBuf = dir.join("node.sqlite3");
    let exe = std::env::current_exe().unwrap();
    // A fixed sequence of kill points: reproducible, and varied.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut total = 0;
    for round in 0..KILLS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let after = 1 + x % 120;
        let mut command = Command::new(&exe);
        command.args(["--exact", "kill_test_child", "--ignored", "--nocapture", "--test-threads=1"]).env(DB_ENV, &db);
        // Every other round commits with synchronous=FULL.
        if round % 2 == 1 {
            command.env(FULL_ENV, "1");
        }
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut reported = 0;
        let mut seen = 0;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("committed ") {
                reported = n.parse().unwrap();
                seen += 1;
                if seen == after {
                    break;
                }
            }
        }
        // SIGKILL mid-stream: the child is writing its next steps.
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(integrity(&db), "ok", "round {round}");
        total = check(&db, reported);
    }
    assert!(total >= u64::from(KILLS), "the child made progress: {total} steps");
    let _ = std::fs::remove_dir_all(&dir);
}
