//! The relay database as a bug, a disk or a hand could leave it: a real
//! database (two published records, a mailbox holding envelopes for an
//! offline peer) whose rows the fuzzer overwrites, deletes, or whose schema
//! version it moves back or forward, then opened by a relay that serves it:
//! the offline peer comes back and takes its mailbox, another looks it up,
//! and the sweep runs.
//!
//! Checked: opening, starting the relay and every frame and sweep end in a
//! value or a typed error, never a panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use p2pchat_fuzz::corrupt::{corrupted_copy, scratch_dir, snapshot, template_path};
use p2pchat_fuzz::Bytes;
use p2pchat_protocol::engine::{Transmit, TransmitId};
use p2pchat_protocol::keys::IdentitySeed;
use p2pchat_protocol::relay::{ClientAction, PeerRecord, Relay, RelayClient, RelayConfig, RelayStore};
use p2pchat_protocol::{IdentityKeyPair, Timestamp};
use p2pchat_storage_sqlite::{Durability, SqliteRelayStore};

const NOW: Timestamp = Timestamp::from_millis(1_750_000_000_000);

fn identity(n: u8) -> IdentityKeyPair {
    IdentityKeyPair::from_seed(&IdentitySeed::from_bytes([n; 32]))
}

fn scratch() -> PathBuf {
    scratch_dir("relay-store")
}

/// A client of `relay`, registered with its record published; the relay's
/// answers are handed back to it until there are none.
fn register<S: RelayStore>(relay: &mut Relay<S>, who: &IdentityKeyPair) -> RelayClient {
    let peer = who.peer_id();
    relay.connected(peer);
    let mut client = RelayClient::new();
    let record = PeerRecord::sign(who, Vec::new(), vec!["relay".into()], NOW, NOW.saturating_add_millis(3_600_000), 1);
    for frame in client.on_connect(NOW, record) {
        let _ = relay.handle_frame(NOW, peer, &frame.encode());
    }
    answer(relay, &mut client, who);
    client
}

/// Hands the relay's frames for `who` to its client, and the client's
/// acknowledgements back, until the relay has nothing more to say.
fn answer<S: RelayStore>(relay: &mut Relay<S>, client: &mut RelayClient, who: &IdentityKeyPair) {
    let peer = who.peer_id();
    for _ in 0..16 {
        let mut replies = Vec::new();
        while let Some((to, bytes)) = relay.poll_transmit() {
            if to != peer {
                continue;
            }
            for action in client.on_frame(NOW, &bytes).unwrap_or_default() {
                if let ClientAction::AfterEngine(frame) = action {
                    replies.push(frame);
                }
            }
        }
        if replies.is_empty() {
            return;
        }
        for frame in replies {
            let _ = relay.handle_frame(NOW, peer, &frame.encode());
        }
    }
}

/// The database every input starts from, made once per process: bob
/// published his record and went offline, and alice left three envelopes in
/// his mailbox.
fn template() -> &'static [u8] {
    static TEMPLATE: OnceLock<Vec<u8>> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let path = template_path(&scratch());
        let store = SqliteRelayStore::open(&path, Durability::Normal).expect("a new database");
        let mut relay = Relay::new(store, RelayConfig::default()).expect("a relay on a new database");
        let (alice, bob) = (identity(1), identity(2));
        register(&mut relay, &bob);
        relay.disconnected(&bob.peer_id());
        let mut client = register(&mut relay, &alice);
        for n in 0..3u64 {
            let transmit = Transmit {
                id: TransmitId(n),
                peer: bob.peer_id(),
                bytes: vec![1, 2, 3, n as u8],
                mailbox_allowed: true,
            };
            let _ = relay.handle_frame(NOW, alice.peer_id(), &client.forward(NOW, transmit).encode());
        }
        answer(&mut relay, &mut client, &alice);
        drop(relay);
        snapshot(&path)
    })
}

fuzz_target!(|data: &[u8]| {
    let mut input = Bytes(data);
    let Some(path) = corrupted_copy(template(), &scratch(), &mut input) else { return };
    let Ok(store) = SqliteRelayStore::open(&path, Durability::Normal) else { return };
    let Ok(mut relay) = Relay::new(store, RelayConfig::default()) else { return };
    let (alice, bob, carol) = (identity(1), identity(2), identity(3));
    // Bob comes back for his mailbox; carol looks him up and writes to him.
    register(&mut relay, &bob);
    let mut client = register(&mut relay, &carol);
    let _ = relay.handle_frame(NOW, carol.peer_id(), &client.lookup(NOW, bob.peer_id()).encode());
    let transmit = Transmit { id: TransmitId(9), peer: alice.peer_id(), bytes: vec![9], mailbox_allowed: true };
    let _ = relay.handle_frame(NOW, carol.peer_id(), &client.forward(NOW, transmit).encode());
    answer(&mut relay, &mut client, &carol);
    // Days later: records and mailboxes past their time are swept.
    let _ = relay.handle_timeout(NOW.saturating_add_millis(30 * 24 * 3_600_000));
    while relay.poll_transmit().is_some() || relay.poll_event().is_some() {}
});
