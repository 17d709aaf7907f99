//! The node database as a peer, a bug or a disk could leave it: a real
//! database (conversations, messages, an outbox, a key exchange, a group)
//! whose rows the fuzzer overwrites, deletes, or whose schema version it
//! moves back or forward, then opened and read through the engine.
//!
//! Checked: opening, starting the engine on it and every read answer with a
//! value or a typed error, never a panic; sealed rows that were altered are
//! refused, not misread.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use p2pchat_fuzz::corrupt::{corrupted_copy, scratch_dir, snapshot, template_path};
use p2pchat_fuzz::Bytes;
use p2pchat_protocol::engine::{Answer, Command, CommandOutcome, Engine, EngineConfig, Input, Query};
use p2pchat_protocol::keys::IdentitySeed;
use p2pchat_protocol::{IdentityKeyPair, PeerId, Timestamp};
use p2pchat_storage_sqlite::{Durability, MasterKey, SqliteStore};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const SEED: [u8; 32] = [7; 32];
const NOW: Timestamp = Timestamp::from_millis(1_750_000_000_000);

fn engine_on(store: SqliteStore) -> Option<Engine<SqliteStore>> {
    let identity = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(SEED));
    Engine::new(identity, store, EngineConfig::default(), ChaCha20Rng::seed_from_u64(1), NOW).ok()
}

fn key() -> MasterKey {
    MasterKey::derive(&IdentitySeed::from_bytes(SEED))
}

fn scratch() -> PathBuf {
    scratch_dir("storage")
}

/// The database every input starts from, made once per process.
fn template() -> &'static [u8] {
    static TEMPLATE: OnceLock<Vec<u8>> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let path = template_path(&scratch());
        let store = SqliteStore::open(&path, key(), Durability::Normal).expect("a new database");
        let mut engine = engine_on(store).expect("an engine on a new database");
        let peer = PeerId([0x11; 20]);
        let c = match engine.command(NOW, Command::CreateConversation { peer }) {
            Ok(CommandOutcome::Conversation(c)) => c.id,
            other => panic!("{other:?}"),
        };
        for n in 0..3 {
            engine.command(NOW, Command::SendMessage { conversation: c, content: format!("message {n}") }).ok();
        }
        let members = vec![PeerId([0x22; 20]), PeerId([0x33; 20])];
        engine.command(NOW, Command::CreateGroup { name: "group".into(), members }).ok();
        drop(engine);
        snapshot(&path)
    })
}

fuzz_target!(|data: &[u8]| {
    let mut input = Bytes(data);
    let Some(path) = corrupted_copy(template(), &scratch(), &mut input) else { return };
    let Ok(store) = SqliteStore::open(&path, key(), Durability::Normal) else { return };
    let Some(mut engine) = engine_on(store) else { return };
    let conversations = match engine.query(Query::Conversations) {
        Ok(Answer::Conversations(all)) => all,
        _ => Vec::new(),
    };
    for summary in &conversations {
        let id = summary.conversation.id;
        let _ = engine.query(Query::Messages { conversation: id, before: None, limit: 50 });
        let _ = engine.query(Query::Members(id));
        let _ = engine.command(NOW, Command::SendMessage { conversation: id, content: "after".into() });
    }
    let _ = engine.query(Query::UnreadTotal);
    let _ = engine.handle(NOW.saturating_add_millis(3_600_000), Input::Timeout);
    while engine.poll_transmit().is_some() || engine.poll_event().is_some() || engine.poll_lookup().is_some() {}
});
