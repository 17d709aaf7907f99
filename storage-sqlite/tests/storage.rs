//! What the SQLite stores promise beyond the scenario suite: nothing
//! readable at rest, the identity file rules, migrations, paging, the
//! relay's store across restarts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use p2pchat_protocol::engine::{
    AttemptState, ControlPayload, Conversation, ConversationKind, ConversationStore, GroupStore, KeptRecord,
    KeyExchangeAttempt, KeyExchangeStore, Message, MessageStatus, MessageStore, OutboxItem, OutboxPayload, OutboxStore,
    PeerRecordStore, SessionStore, Transaction,
};
use p2pchat_protocol::keys::IdentitySeed;
use p2pchat_protocol::relay::{MailboxEntry, RelayStore, Source, Usage};
use p2pchat_protocol::wire::SenderKeyDistribution;
use p2pchat_protocol::{ConversationId, MessageId, PeerId, Timestamp, Uuid};
use p2pchat_storage_sqlite::{
    load_or_create_identity, node_schema, Durability, MasterKey, Migration, SqliteRelayStore, SqliteStore,
    StorageError, IDENTITY_FILE,
};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("p2pchat-storage-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn key(seed: u8) -> MasterKey {
    MasterKey::derive(&IdentitySeed::from_bytes([seed; 32]))
}

fn conversation(id: ConversationId, peer: PeerId) -> Conversation {
    Conversation {
        id,
        kind: ConversationKind::OneOnOne { peer },
        created_at: Timestamp(1),
        updated_at: Timestamp(1),
        last_message_at: None,
        last_message_id: None,
        unread_count: 0,
        left: false,
    }
}

fn message(n: u128, conversation: ConversationId, content: &str, at: u64) -> Message {
    Message {
        id: MessageId(Uuid(n.to_be_bytes())),
        conversation_id: conversation,
        sender: PeerId([2; 20]),
        content: content.into(),
        timestamp: Timestamp(at),
        status: MessageStatus::Delivered,
        sent_at: None,
        delivered_at: Some(Timestamp(at)),
        read_at: None,
        failure_reason: None,
        waiting_reason: None,
        recipients: vec![],
        stored_at: Timestamp(at),
        group_position: None,
    }
}

fn raw_bytes(db: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        if let Ok(bytes) = std::fs::read(&p) {
            all.extend_from_slice(&bytes);
        }
    }
    all
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_copied_database_reveals_neither_keys_nor_message_text() {
    let dir = TempDir::new("at-rest");
    let db = dir.path("node.sqlite3");
    let text = "the quarterly numbers are terrible, sell before friday";
    let deleted_text = "this message will be deleted and must not linger";
    let session_secret = [0x5au8; 32];
    let group_secret = [0xa7u8; 32];
    let exchange_secret = [0x3cu8; 32];
    let queued_key = [0x66u8; 32];
    let queued_distribution = || {
        ControlPayload::SenderKey(SenderKeyDistribution {
            group_id: ConversationId(Uuid([10; 16])),
            sender: PeerId([4; 20]),
            key_id: 1,
            message_number: 0,
            chain_key: queued_key,
            signing_public: [0x21; 32],
        })
    };
    let group_name = "Project Nightingale launch";
    let peer_address = "198.51.100.77:40404";
    let conv = ConversationId(Uuid([9; 16]));
    let peer = PeerId([4; 20]);
    {
        let mut store = SqliteStore::open(&db, key(1), Durability::Normal).unwrap();
        store.begin().unwrap();
        store.put_conversation(&conversation(conv, peer)).unwrap();
        store.put_message(&message(1, conv, text, 10)).unwrap();
        store.put_message(&message(2, conv, deleted_text, 11)).unwrap();
        store.put_sessions(&peer, &[session_secret, session_secret].concat()).unwrap();
        store.put_group_keys(&conv, &group_secret).unwrap();
        let attempt = KeyExchangeAttempt {
            peer,
            state: AttemptState::AwaitingAck(exchange_secret.to_vec().into()),
            attempts: 1,
            deadline: Timestamp(5),
        };
        store.put_key_exchange(&attempt).unwrap();
        // A queued sender key (control payloads carry them) and a group's name.
        let item = OutboxItem {
            seq: 1,
            peer,
            payload: OutboxPayload::Control(queued_distribution()),
            queued_at: Timestamp(1),
            next_attempt_at: Some(Timestamp(2)),
            in_flight: false,
            unsent_copy: None,
        };
        store.put_outbox_item(&item).unwrap();
        let group = ConversationId(Uuid([10; 16]));
        let mut named = conversation(group, peer);
        named.kind = ConversationKind::Group { name: group_name.into(), admin: peer };
        store.put_conversation(&named).unwrap();
        // Where a peer is reached (its kept record) is metadata.
        let kept = KeptRecord { peer, seen_at: Timestamp(3), record: peer_address.as_bytes().to_vec() };
        store.put_kept_record(&kept).unwrap();
        store.commit().unwrap();
        store.begin().unwrap();
        store.delete_message(&message(2, conv, deleted_text, 11).id).unwrap();
        store.commit().unwrap();
        // Everything reads back (so the search below is not vacuous).
        store.begin().unwrap();
        assert_eq!(store.message(&message(1, conv, text, 10).id).unwrap().unwrap().content, text);
        assert_eq!(&store.sessions(&peer).unwrap().unwrap()[..32], &session_secret);
        assert_eq!(&store.group_keys(&conv).unwrap().unwrap()[..], &group_secret);
        assert_eq!(store.key_exchanges().unwrap()[0].state, AttemptState::AwaitingAck(exchange_secret.to_vec().into()));
        assert_eq!(store.outbox().unwrap()[0].payload, OutboxPayload::Control(queued_distribution()));
        assert_eq!(store.kept_records().unwrap()[0].record, peer_address.as_bytes());
        assert!(
            matches!(&store.conversation(&group).unwrap().unwrap().kind, ConversationKind::Group { name, .. } if name == group_name)
        );
        store.rollback();
        // The files are the owner's alone.
        assert_eq!(std::fs::metadata(&db).unwrap().permissions().mode() & 0o777, 0o600);
        // Searched while open (the WAL still holds the recent pages) …
        let bytes = raw_bytes(&db);
        assert!(bytes.len() > 4096, "the files are there");
        for (what, needle) in [
            ("message text", text.as_bytes()),
            ("deleted message text", deleted_text.as_bytes()),
            ("ratchet state", &session_secret[..]),
            ("sender key", &group_secret[..]),
            ("pending key exchange", &exchange_secret[..]),
            ("queued sender key", &queued_key[..]),
            ("group name", group_name.as_bytes()),
            ("peer's address", peer_address.as_bytes()),
        ] {
            assert!(!contains(&bytes, needle), "the {what} is readable in the database or its WAL");
        }
    }
    // … and after a checkpoint at close.
    let bytes = raw_bytes(&db);
    assert!(!contains(&bytes, text.as_bytes()) && !contains(&bytes, &session_secret));
    // Another identity's key does not open it.
    assert!(matches!(SqliteStore::open(&db, key(2), Durability::Normal), Err(StorageError::WrongKey)));
}

#[test]
fn the_identity_file_is_created_private_reused_and_never_replaced() {
    let dir = TempDir::new("identity");
    let first = load_or_create_identity(&dir.0).unwrap();
    let file = dir.path(IDENTITY_FILE);
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let again = load_or_create_identity(&dir.0).unwrap();
    assert_eq!(first.peer_id(), again.peer_id(), "re-used, not regenerated");

    // Readable by others: refused, with the fix in the message.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = load_or_create_identity(&dir.0).unwrap_err().to_string();
    assert!(err.contains("644") && err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Corrupt: refused, and left as it was.
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[30] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let err = load_or_create_identity(&dir.0).unwrap_err().to_string();
    assert!(err.contains("corrupt") && err.contains("not replaced"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), bytes, "never silently replaced");

    // Truncated: refused too.
    std::fs::write(&file, &bytes[..40]).unwrap();
    let err = load_or_create_identity(&dir.0).unwrap_err().to_string();
    assert!(err.contains("not a p2pchat identity file"), "{err}");
}

/// A test-only next version: a new table and a column, to exercise the
/// upgrade path past the newest real version.
const TEST_NEXT: Migration = Migration {
    name: "test-only: message reactions",
    sql: "CREATE TABLE chat_reactions (message_id TEXT NOT NULL, emoji TEXT NOT NULL);
          ALTER TABLE chat_conversations ADD COLUMN muted INTEGER DEFAULT 0;",
};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/node-v1.sqlite3")
}

/// The fixture's contents: one conversation and one message, sealed under
/// seed 7's key.
const FIXTURE_TEXT: &str = "written by schema version 1";

#[test]
#[ignore = "writes the committed fixture; run with --ignored after a deliberate schema change"]
fn write_the_version_1_fixture() {
    let path = fixture();
    let _ = std::fs::remove_file(&path);
    let mut store = SqliteStore::open(&path, key(7), Durability::Full).unwrap();
    let conv = ConversationId(Uuid([1; 16]));
    store.begin().unwrap();
    store.put_conversation(&conversation(conv, PeerId([3; 20]))).unwrap();
    store.put_message(&message(42, conv, FIXTURE_TEXT, 100)).unwrap();
    store.commit().unwrap();
    drop(store);
    // One file, no WAL beside it.
    let conn = rusqlite_free_checkpoint(&path);
    assert!(conn);
}

/// Opening with the plain schema again checkpoints the WAL into the file.
fn rusqlite_free_checkpoint(path: &Path) -> bool {
    let store = SqliteStore::open(path, key(7), Durability::Full);
    drop(store);
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    !Path::new(&wal).exists()
}

#[test]
fn an_older_database_is_upgraded_and_a_newer_one_refused() {
    let dir = TempDir::new("migrate");
    let db = dir.path("node.sqlite3");
    std::fs::copy(fixture(), &db).unwrap();
    // Version 1 → every real version → one more (the test migration); the
    // data stays readable.
    let real = node_schema().version();
    let schema = node_schema().with(TEST_NEXT);
    let mut store = SqliteStore::open_with(&db, key(7), Durability::Normal, &schema).unwrap();
    store.begin().unwrap();
    let m = store.message(&MessageId(Uuid(42u128.to_be_bytes()))).unwrap().expect("the fixture's message");
    assert_eq!(m.content, FIXTURE_TEXT);
    store.rollback();
    drop(store);
    // The test migration's objects exist: the table and the new column.
    let conn = rusqlite_open(&db);
    assert_eq!(conn.0, real + 1, "at the test version");
    assert!(conn.1, "the new table and column exist");
    // Now one version ahead: this build refuses it, clearly.
    let err = SqliteStore::open(&db, key(7), Durability::Normal).unwrap_err();
    assert!(
        matches!(err, StorageError::NewerSchema { found, supported, .. } if found == real + 1 && supported == real),
        "{err}"
    );
    assert!(err.to_string().contains("newer than this p2pchat supports"), "{err}");
}

/// (user_version, whether the test version's objects exist), read through a
/// store opened on that schema.
fn rusqlite_open(db: &Path) -> (u32, bool) {
    let schema = node_schema().with(TEST_NEXT);
    let store = SqliteStore::open_with(db, key(7), Durability::Normal, &schema).unwrap();
    let has = store.table_has_column("chat_conversations", "muted").unwrap()
        && store.table_has_column("chat_reactions", "emoji").unwrap();
    (store.schema_version().unwrap(), has)
}

#[test]
fn a_failed_migration_leaves_the_database_at_its_version() {
    let dir = TempDir::new("failed-migration");
    let db = dir.path("node.sqlite3");
    std::fs::copy(fixture(), &db).unwrap();
    let broken = Migration { name: "test-only: broken", sql: "CREATE TABLE chat_messages (x INTEGER);" };
    let real = node_schema().version();
    let err = SqliteStore::open_with(&db, key(7), Durability::Normal, &node_schema().with(broken)).unwrap_err();
    assert!(matches!(err, StorageError::Migration { to, .. } if to == real + 1), "{err}");
    let store = SqliteStore::open(&db, key(7), Durability::Normal).unwrap();
    assert_eq!(store.schema_version().unwrap(), real, "the real upgrades committed, the broken one did not");
}

#[test]
fn key_exchange_deadlines_and_held_counts_come_from_sql_and_survive_an_upgrade() {
    use p2pchat_protocol::engine::HeldMessage;
    let dir = TempDir::new("deadlines");
    let db = dir.path("node.sqlite3");
    let attempt = |peer: u8, deadline: u64| KeyExchangeAttempt {
        peer: PeerId([peer; 20]),
        state: AttemptState::AwaitingAck(vec![peer; 8].into()),
        attempts: 1,
        deadline: Timestamp(deadline),
    };
    // Two key exchanges as version 1 left them: sealed rows, no deadline
    // column filled (the migration adds it empty).
    {
        let mut store = SqliteStore::open(&db, key(7), Durability::Normal).unwrap();
        store.begin().unwrap();
        store.put_key_exchange(&attempt(1, 500)).unwrap();
        store.put_key_exchange(&attempt(2, 300)).unwrap();
        store.commit().unwrap();
    }
    rusqlite::Connection::open(&db).unwrap().execute("UPDATE chat_key_exchanges SET deadline = NULL", []).unwrap();
    let mut store = SqliteStore::open(&db, key(7), Durability::Normal).unwrap();
    store.begin().unwrap();
    assert_eq!(store.next_key_exchange_deadline().unwrap(), Some(Timestamp(300)), "filled when opened");
    assert_eq!(store.key_exchange_count().unwrap(), 2);
    assert_eq!(store.key_exchange(&PeerId([1; 20])).unwrap(), Some(attempt(1, 500)));
    assert_eq!(store.key_exchanges_due(Timestamp(400)).unwrap(), vec![attempt(2, 300)]);
    store.put_key_exchange(&attempt(2, 900)).unwrap();
    assert_eq!(store.next_key_exchange_deadline().unwrap(), Some(Timestamp(500)));
    // Held messages are counted per sender and in all, and swept by age.
    let group = ConversationId(Uuid([9; 16]));
    for (seq, sender, len, at) in [(1, 3, 100, 10), (2, 3, 50, 20), (3, 4, 7, 30)] {
        let held = HeldMessage {
            seq,
            group_id: group,
            sender: PeerId([sender; 20]),
            envelope: vec![seq as u8; len],
            received_at: Timestamp(at),
        };
        store.put_held_message(&held).unwrap();
    }
    assert_eq!(store.held_usage(Some(&PeerId([3; 20]))).unwrap(), (2, 150));
    assert_eq!(store.held_usage(None).unwrap(), (3, 157));
    assert!(store.is_held(&group, &PeerId([4; 20]), &[3; 7]).unwrap());
    assert!(!store.is_held(&group, &PeerId([3; 20]), &[3; 7]).unwrap());
    assert_eq!(store.delete_held_before(Timestamp(25)).unwrap(), 2);
    assert_eq!(store.held_usage(None).unwrap(), (1, 7));
    store.rollback();
}

#[test]
fn a_conversation_pages_newest_first() {
    let dir = TempDir::new("paging");
    let mut store = SqliteStore::open(&dir.path("node.sqlite3"), key(1), Durability::Normal).unwrap();
    let conv = ConversationId(Uuid([5; 16]));
    let other = ConversationId(Uuid([6; 16]));
    store.begin().unwrap();
    store.put_conversation(&conversation(conv, PeerId([4; 20]))).unwrap();
    store.put_conversation(&conversation(other, PeerId([5; 20]))).unwrap();
    for n in 0..120u128 {
        store.put_message(&message(n, conv, &format!("m{n}"), n as u64)).unwrap();
        store.put_message(&message(1_000 + n, other, "elsewhere", n as u64)).unwrap();
    }
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = store.messages_page(&conv, before.as_ref(), 50).unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 50);
        before = page.last().map(|m| m.id);
        seen.extend(page.into_iter().map(|m| m.content));
    }
    store.rollback();
    let expected: Vec<String> = (0..120).rev().map(|n| format!("m{n}")).collect();
    assert_eq!(seen, expected);
}

#[test]
fn the_outbox_and_retention_queries_follow_the_trait() {
    let dir = TempDir::new("outbox");
    let mut store = SqliteStore::open(&dir.path("node.sqlite3"), key(1), Durability::Normal).unwrap();
    let (a, b) = (PeerId([1; 20]), PeerId([2; 20]));
    let item = |seq, peer, at: Option<u64>, in_flight| OutboxItem {
        seq,
        peer,
        payload: OutboxPayload::Ack(vec![seq]),
        queued_at: Timestamp(0),
        next_attempt_at: at.map(Timestamp),
        in_flight,
        unsent_copy: None,
    };
    store.begin().unwrap();
    store.put_outbox_item(&item(3, b, Some(50), false)).unwrap();
    store.put_outbox_item(&item(1, a, Some(100), false)).unwrap();
    store.put_outbox_item(&item(2, a, Some(10), true)).unwrap();
    store.put_outbox_item(&item(4, b, None, false)).unwrap();
    assert_eq!(store.next_outbox_attempt().unwrap(), Some(Timestamp(50)));
    assert_eq!(store.peers_due(Timestamp(60)).unwrap(), vec![b]);
    assert_eq!(store.peers_due(Timestamp(100)).unwrap(), vec![a, b]);
    assert_eq!(store.outbox_for(&a).unwrap().iter().map(|i| i.seq).collect::<Vec<_>>(), vec![1, 2]);
    // The indexed shortcuts answer as the trait's filters over `outbox_for` do.
    let seqs = |items: Vec<OutboxItem>| items.iter().map(|i| i.seq).collect::<Vec<_>>();
    store.put_outbox_item(&item(5, a, Some(20), false)).unwrap();
    assert_eq!(seqs(store.outbox_waiting_for(&a).unwrap()), vec![1, 5], "in-flight items are not waiting");
    assert_eq!(seqs(store.outbox_waiting_for(&b).unwrap()), vec![3, 4], "parked items are waiting");
    assert_eq!(seqs(store.outbox_due_for(&a, Timestamp(60)).unwrap()), vec![5]);
    assert_eq!(seqs(store.outbox_due_for(&a, Timestamp(100)).unwrap()), vec![1, 5], "due at the very moment");
    assert_eq!(seqs(store.outbox_due_for(&b, Timestamp(u64::MAX)).unwrap()), vec![3], "parked items are never due");
    assert_eq!(store.outbox_len(&a).unwrap(), 3);
    assert_eq!(store.outbox_len(&PeerId([9; 20])).unwrap(), 0);
    store.delete_outbox_item(5).unwrap();
    store.delete_outbox_item(3).unwrap();
    assert_eq!(store.outbox().unwrap().iter().map(|i| i.seq).collect::<Vec<_>>(), vec![1, 2, 4]);
    // Retention: messages stored before a cutoff, by injected time.
    let conv = ConversationId(Uuid([8; 16]));
    store.put_conversation(&conversation(conv, a)).unwrap();
    for (n, at) in [(1u128, 100u64), (2, 200), (3, 300)] {
        store.put_message(&message(n, conv, "x", at)).unwrap();
    }
    let old: Vec<u64> = store.messages_stored_before(Timestamp(250)).unwrap().iter().map(|m| m.stored_at.0).collect();
    assert_eq!(old, vec![100, 200]);
    // Deleting the conversation takes its messages with it.
    store.delete_conversation(&conv).unwrap();
    assert!(store.messages_stored_before(Timestamp(1_000)).unwrap().is_empty());
    store.commit().unwrap();
    // Reads outside a transaction are a misuse, said as such.
    assert!(store.outbox().is_err());
}

#[test]
fn checkpoints_run_off_the_commit_path() {
    let dir = TempDir::new("checkpoint");
    let db = dir.path("node.sqlite3");
    let mut store = SqliteStore::open(&db, key(1), Durability::Normal).unwrap();
    let conv = ConversationId(Uuid([8; 16]));
    store.begin().unwrap();
    store.put_conversation(&conversation(conv, PeerId([1; 20]))).unwrap();
    store.commit().unwrap();
    let size = || std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    let before = size();
    // Far below the writer's own 64 MiB checkpoint: only the checkpoint
    // thread copies these pages into the database file.
    for n in 0..600u128 {
        store.begin().unwrap();
        store.put_message(&message(n, conv, &"x".repeat(100), n as u64)).unwrap();
        store.commit().unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while size() <= before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(size() > before, "the database file did not grow ({before} → {} bytes): no checkpoint ran", size());
}

#[test]
fn the_relay_store_keeps_its_mailbox_across_a_restart() {
    let dir = TempDir::new("relay");
    let db = dir.path("relay.sqlite3");
    let (alice, bob) = (PeerId([1; 20]), PeerId([2; 20]));
    {
        let mut store = SqliteRelayStore::open(&db, Durability::Normal).unwrap();
        store.begin().unwrap();
        for n in 0..3u64 {
            let id = store.next_mailbox_id().unwrap();
            let entry = MailboxEntry {
                id,
                recipient: bob,
                from: alice,
                source: Source([n as u8; 16]),
                envelope: vec![n as u8; 40],
                stored_at: Timestamp(n * 10),
            };
            store.put_mailbox_entry(&entry).unwrap();
        }
        store.commit().unwrap();
    }
    let mut store = SqliteRelayStore::open(&db, Durability::Normal).unwrap();
    store.begin().unwrap();
    assert_eq!(store.mailbox(&bob).unwrap().len(), 3);
    assert_eq!(store.mailbox_usage(&bob).unwrap(), Usage { count: 3, bytes: 120 });
    assert_eq!(store.mailbox_after(&bob, 1, 1).unwrap().iter().map(|e| e.id).collect::<Vec<_>>(), vec![2]);
    assert_eq!(store.oldest_mailbox_entry().unwrap(), Some(Timestamp(0)));
    assert_eq!(store.delete_mailbox_before(Timestamp(15)).unwrap(), 2);
    assert_eq!(store.next_mailbox_id().unwrap(), 4, "IDs never repeat across restarts");
    // The counters follow the sweep.
    assert_eq!(store.mailbox_usage(&bob).unwrap(), Usage { count: 1, bytes: 40 });
    assert_eq!(store.mailbox_total().unwrap(), Usage { count: 1, bytes: 40 });
    assert_eq!(store.source_usage(&Source([0; 16])).unwrap(), Usage::default());
    assert_eq!(store.source_usage(&Source([2; 16])).unwrap(), Usage { count: 1, bytes: 40 });
    store.commit().unwrap();
}

#[test]
fn the_relay_stores_counters_match_its_mailbox_through_deposits_deletions_sweeps_and_an_upgrade() {
    use p2pchat_storage_sqlite::{relay_schema, Schema};
    let dir = TempDir::new("relay-counters");
    let db = dir.path("relay.sqlite3");
    // A version 1 database with three entries, as the previous release wrote it.
    let v1 = Schema { kind: "relay", migrations: relay_schema().migrations[..1].to_vec() };
    {
        let store = SqliteRelayStore::open_with(&db, Durability::Normal, &v1).unwrap();
        drop(store);
        let conn = rusqlite::Connection::open(&db).unwrap();
        for (recipient, id, len) in [("02", 1, 10), ("02", 2, 20), ("03", 3, 30)] {
            let recipient = recipient.repeat(20);
            conn.execute(
                "INSERT INTO relay_mailbox (recipient, id, sender, envelope, stored_at) VALUES (?1, ?2, ?3, ?4, 5)",
                rusqlite::params![recipient, id, "01".repeat(20), vec![0u8; len]],
            )
            .unwrap();
        }
        conn.execute("INSERT INTO relay_meta (name, value) VALUES ('next_mailbox_id', 3)", []).unwrap();
    }
    let mut store = SqliteRelayStore::open(&db, Durability::Normal).unwrap();
    let (alice, bob, carol) = (PeerId([1; 20]), PeerId([2; 20]), PeerId([3; 20]));
    store.begin().unwrap();
    assert_eq!(store.mailbox_usage(&bob).unwrap(), Usage { count: 2, bytes: 30 }, "counted when upgraded");
    assert_eq!(store.mailbox_usage(&carol).unwrap(), Usage { count: 1, bytes: 30 });
    assert_eq!(store.mailbox_total().unwrap(), Usage { count: 3, bytes: 60 });
    // Deposits from two sources, then deletions: every counter agrees with
    // the rows, and a mailbox emptied leaves no counter behind.
    let here = Source([7; 16]);
    for n in 0..4u64 {
        let id = store.next_mailbox_id().unwrap();
        let entry = MailboxEntry {
            id,
            recipient: bob,
            from: alice,
            source: here,
            envelope: vec![1; 100],
            stored_at: Timestamp(n),
        };
        store.put_mailbox_entry(&entry).unwrap();
    }
    assert_eq!(store.mailbox_usage(&bob).unwrap(), Usage { count: 6, bytes: 430 });
    assert_eq!(store.mailbox_usage_by_sender(&bob, &alice).unwrap(), Usage { count: 6, bytes: 430 });
    assert_eq!(store.mailbox_usage_by_source(&bob, &here).unwrap(), Usage { count: 4, bytes: 400 });
    assert_eq!(store.source_usage(&here).unwrap(), Usage { count: 4, bytes: 400 });
    assert_eq!(store.mailbox_total().unwrap(), Usage { count: 7, bytes: 460 });
    for entry in store.mailbox(&carol).unwrap() {
        store.delete_mailbox_entry(&carol, entry.id).unwrap();
    }
    assert_eq!(store.mailbox_usage(&carol).unwrap(), Usage::default());
    assert_eq!(store.mailbox_total().unwrap(), Usage { count: 6, bytes: 430 });
    store.commit().unwrap();
    // A rolled-back deposit leaves the counters as they were.
    store.begin().unwrap();
    let id = store.next_mailbox_id().unwrap();
    let entry =
        MailboxEntry { id, recipient: bob, from: alice, source: here, envelope: vec![1; 9], stored_at: Timestamp(9) };
    store.put_mailbox_entry(&entry).unwrap();
    store.rollback();
    store.begin().unwrap();
    assert_eq!(store.mailbox_total().unwrap(), Usage { count: 6, bytes: 430 });
    store.rollback();
}

#[test]
fn the_wal_is_truncated_once_commits_pause_so_superseded_session_state_does_not_linger() {
    let dir = TempDir::new("wal-truncate");
    let db = dir.path("node.sqlite3");
    let mut store = SqliteStore::open(&db, key(1), Durability::Normal).unwrap();
    let peer = PeerId([4; 20]);
    // A burst of session updates, as a conversation makes.
    for n in 0..50u8 {
        store.begin().unwrap();
        store.put_sessions(&peer, &[n; 2_000]).unwrap();
        store.commit().unwrap();
    }
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    let wal = PathBuf::from(wal);
    assert!(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) > 0, "the burst went through the WAL");
    // Once commits pause, the WAL is reset to nothing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the WAL still holds {} bytes",
            std::fs::metadata(&wal).unwrap().len()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The newest state is intact.
    store.begin().unwrap();
    assert_eq!(store.sessions(&peer).unwrap().unwrap().as_slice(), &[49u8; 2_000][..]);
    store.rollback();
}

#[test]
fn a_passphrase_wraps_the_identity_key_and_only_it_opens_it() {
    use p2pchat_storage_sqlite::{
        identity_is_wrapped, load_or_create_identity_with, set_identity_passphrase, Passphrase,
    };
    let pass = |s: &str| Passphrase::new(s.as_bytes().to_vec()).unwrap();
    let dir = TempDir::new("passphrase");
    let plain = load_or_create_identity(&dir.0).unwrap();
    let file = dir.0.join("identity.key");
    let seed_bytes = std::fs::read(&file).unwrap()[20..52].to_vec();
    assert!(!identity_is_wrapped(&dir.0).unwrap());
    // Wrapped: the same identity, and the seed no longer in the file.
    let wrapped = set_identity_passphrase(&dir.0, None, Some(&pass("correct horse\n"))).unwrap();
    assert_eq!(wrapped.peer_id(), plain.peer_id());
    assert!(identity_is_wrapped(&dir.0).unwrap());
    let bytes = std::fs::read(&file).unwrap();
    assert!(!bytes.windows(32).any(|w| w == seed_bytes.as_slice()), "the seed is still in the file");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions()) & 0o777,
        0o600
    );
    // Without the passphrase, or with a wrong one: refused, clearly.
    let err = load_or_create_identity(&dir.0).unwrap_err();
    assert!(matches!(err, StorageError::PassphraseNeeded { .. }), "{err}");
    assert!(err.to_string().contains("--passphrase-fd"), "{err}");
    let err = load_or_create_identity_with(&dir.0, Some(&pass("wrong"))).unwrap_err();
    assert!(matches!(err, StorageError::WrongPassphrase { .. }), "{err}");
    // An altered byte fails too, and the file is not replaced.
    let mut altered = bytes.clone();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    std::fs::write(&file, &altered).unwrap();
    let err = load_or_create_identity_with(&dir.0, Some(&pass("correct horse"))).unwrap_err();
    assert!(matches!(err, StorageError::WrongPassphrase { .. }), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), altered);
    // A file asking for a ruinous scrypt cost is refused before any work.
    for (at, value) in [(20, 30u8), (24, 64), (28, 9)] {
        let mut costly = bytes.clone();
        costly[at] = value;
        std::fs::write(&file, &costly).unwrap();
        let err = load_or_create_identity_with(&dir.0, Some(&pass("correct horse"))).unwrap_err().to_string();
        assert!(err.contains("scrypt cost"), "{err}");
    }
    std::fs::write(&file, &bytes).unwrap();
    // The right one (a trailing newline is not part of it) opens it.
    let opened = load_or_create_identity_with(&dir.0, Some(&pass("correct horse"))).unwrap();
    assert_eq!(opened.peer_id(), plain.peer_id());
    // Changed, then removed.
    set_identity_passphrase(&dir.0, Some(&pass("correct horse")), Some(&pass("battery staple"))).unwrap();
    assert!(load_or_create_identity_with(&dir.0, Some(&pass("correct horse"))).is_err());
    set_identity_passphrase(&dir.0, Some(&pass("battery staple")), None).unwrap();
    assert!(!identity_is_wrapped(&dir.0).unwrap());
    assert_eq!(load_or_create_identity(&dir.0).unwrap().peer_id(), plain.peer_id());
    // An empty passphrase protects nothing.
    assert!(matches!(Passphrase::new(b"\n".to_vec()), Err(StorageError::EmptyPassphrase)));
    // A new identity may be created wrapped.
    let fresh = TempDir::new("passphrase-new");
    let made = load_or_create_identity_with(&fresh.0, Some(&pass("from the start"))).unwrap();
    assert!(identity_is_wrapped(&fresh.0).unwrap());
    assert_eq!(
        load_or_create_identity_with(&fresh.0, Some(&pass("from the start"))).unwrap().peer_id(),
        made.peer_id()
    );
}

#[test]
fn quiet_peers_come_from_sql_and_their_records_outlive_their_sessions_within_a_cap() {
    let dir = TempDir::new("quiet");
    let db = dir.path("node.sqlite3");
    let (a, b, c) = (PeerId([1; 20]), PeerId([2; 20]), PeerId([3; 20]));
    const HOUR: u64 = 3_600_000;
    {
        let mut store = SqliteStore::open(&db, key(7), Durability::Normal).unwrap();
        store.begin().unwrap();
        for peer in [a, b, c] {
            store.put_sessions(&peer, &[peer.0[0]; 64]).unwrap();
        }
        store.note_heard(&a, Timestamp(10 * HOUR)).unwrap();
        store.note_heard(&b, Timestamp(50 * HOUR)).unwrap();
        store.commit().unwrap();
    }
    // A database of version 2 had sessions and no record of when: the
    // upgrade counts them as heard when it runs.
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute("DELETE FROM chat_peer_activity WHERE peer_id = ?1", [c.to_string()])
        .unwrap();
    let mut store = SqliteStore::open(&db, key(7), Durability::Normal).unwrap();
    store.begin().unwrap();
    // c has no record: never quiet. a was heard before the cutoff.
    assert_eq!(store.quiet_session_peers(Timestamp(30 * HOUR)).unwrap(), vec![a]);
    assert_eq!(store.quiet_session_peers(Timestamp(60 * HOUR)).unwrap(), vec![a, b]);
    // At most one write an hour per peer; an older time never moves it back.
    store.note_heard(&a, Timestamp(10 * HOUR + 600_000)).unwrap();
    assert_eq!(store.last_heard(&a).unwrap(), Some(Timestamp(10 * HOUR)));
    store.note_heard(&a, Timestamp(5 * HOUR)).unwrap();
    assert_eq!(store.last_heard(&a).unwrap(), Some(Timestamp(10 * HOUR)));
    store.note_heard(&a, Timestamp(12 * HOUR)).unwrap();
    assert_eq!(store.last_heard(&a).unwrap(), Some(Timestamp(12 * HOUR)));
    // Sweeping a's sessions keeps its record; the cap then keeps only the
    // newest records of peers without sessions.
    store.delete_sessions(&a).unwrap();
    store.delete_sessions(&b).unwrap();
    assert!(store.sessions(&a).unwrap().is_none());
    assert_eq!(store.session_peers().unwrap(), vec![c]);
    assert_eq!(store.forget_quiet_peers(1).unwrap(), 1);
    assert_eq!(store.last_heard(&a).unwrap(), None, "the older record went");
    assert_eq!(store.last_heard(&b).unwrap(), Some(Timestamp(50 * HOUR)));
    assert_eq!(store.forget_quiet_peers(0).unwrap(), 1);
    assert_eq!(store.last_heard(&b).unwrap(), None);
    store.commit().unwrap();
    // The migration itself: a version 2 database's sessions get a record.
    let v2 = dir.path("v2.sqlite3");
    std::fs::copy(fixture(), &v2).unwrap();
    let conn = rusqlite::Connection::open(&v2).unwrap();
    conn.execute_batch(node_schema().migrations[1].sql).unwrap();
    conn.pragma_update(None, "user_version", 2).unwrap();
    conn.execute(
        "INSERT INTO chat_ratchet_state (peer_id, encrypted_state, nonce) VALUES (?1, x'00', x'00')",
        [c.to_string()],
    )
    .unwrap();
    drop(conn);
    let mut upgraded = SqliteStore::open(&v2, key(7), Durability::Normal).unwrap();
    upgraded.begin().unwrap();
    let heard = upgraded.last_heard(&c).unwrap().expect("a record for the old session");
    let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(heard.as_millis().abs_diff(wall) < 120_000, "counted as heard at the upgrade: {heard:?}");
    upgraded.rollback();
}
