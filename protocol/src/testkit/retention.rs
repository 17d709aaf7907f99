//! Scenarios of retention: expiry, skipped-key clean-up and kept peer
//! records.

use super::net::skipped_keys;
use super::{Net, TestStore, NOW};
use crate::engine::{
    Event, Input, KeptRecord, MessageStatus, Step, Transmit, KEPT_RECORD_LIFETIME_MS, MAX_KEPT_RECORDS,
    MAX_KEPT_RECORD_BYTES,
};
use crate::wire::{Envelope, EnvelopeBody};
use crate::PeerId;

/// Scenario: undelivered messages expire to failed and old ones are deleted.
pub fn undelivered_messages_expire_to_failed_and_old_ones_are_deleted<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 2, 8);
    let c = net.conversation(0, 1);
    let old = net.send(0, c.id, "delivered long ago");
    net.set_online(1, false);
    let stuck = net.send(0, c.id, "never delivered");
    assert_eq!(net.message(0, &stuck.id).unwrap().status, MessageStatus::Sent);
    net.advance(31 * 24 * 60 * 60 * 1000);
    assert!(net.nodes[0].events.iter().any(|e| matches!(e,
        Event::MessageFailed { message_id, failure_reason, .. } if *message_id == stuck.id && failure_reason == "expired undelivered")));
    assert!(net.message(0, &stuck.id).is_none(), "deleted after failing");
    assert!(net.message(0, &old.id).is_none(), "past the TTL");
}

/// Scenario: skipped keys are deleted by the retention sweep after seven days.
pub fn skipped_keys_are_cleaned_up_after_seven_days<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 2, 25);
    let c = net.conversation(0, 1);
    net.send(0, c.id, "first");
    // Lose the next two messages on the way to Bob, once each.
    let bob = net.id(1);
    let mut lost = 0;
    net.lose = Box::new(move |_from: usize, t: &Transmit| {
        let drop = t.peer == bob
            && lost < 2
            && matches!(Envelope::decode(&t.bytes).map(|e| e.body), Ok(EnvelopeBody::Ratchet(_)));
        if drop {
            lost += 1;
        }
        drop
    });
    net.send(0, c.id, "lost once");
    net.send(0, c.id, "lost once too");
    net.lose = Box::new(|_, _| false);
    net.send(0, c.id, "arrives");
    assert_eq!(skipped_keys(&mut net, 1, 0), 2, "two keys skipped over");
    // The retransmissions arrive, but on later message numbers: the two
    // skipped keys are never used, and must go after seven days.
    net.advance(60_000);
    assert_eq!(net.messages(1, &c.id).len(), 4);
    net.advance(8 * 24 * 60 * 60 * 1000);
    assert_eq!(skipped_keys(&mut net, 1, 0), 0, "the retention sweep deleted them");
}

/// Scenario: the peer records a node keeps across restarts (a peer's
/// relays, for someone away longer than a record lives) stay within their
/// count cap, the least recently seen going first; one over the size cap
/// is not kept; a newer one replaces the old; they survive a restart; and
/// retention forgets those not seen again for 30 days.
pub fn kept_peer_records_stay_within_their_cap_survive_a_restart_and_expire<S: TestStore>(make: fn() -> S) {
    const DAY_MS: u64 = 24 * 60 * 60_000;
    let mut net = Net::new(make, 1, 71);
    let kept = |n: u32, len: usize| {
        let mut peer = [0u8; 20];
        peer[..4].copy_from_slice(&n.to_be_bytes());
        // The store keeps what it is given; the node checks signatures.
        KeptRecord { peer: PeerId(peer), seen_at: NOW.saturating_add_millis(u64::from(n)), record: vec![n as u8; len] }
    };
    let read = |net: &mut Net<S>| {
        let store = net.nodes[0].engine.store_mut();
        store.begin().unwrap();
        let records = store.kept_records().unwrap();
        store.rollback();
        records
    };
    let over = MAX_KEPT_RECORDS as u32 + 1;
    let steps = (0..over).map(|n| Step::Input(Input::KeepRecord(kept(n, 100))));
    net.nodes[0].engine.handle_batch(NOW, steps).unwrap();
    let records = read(&mut net);
    assert_eq!(records.len(), MAX_KEPT_RECORDS, "one over the cap: the least recently seen went");
    assert!(!records.iter().any(|r| r.peer == kept(0, 100).peer));
    assert!(records.contains(&kept(over - 1, 100)));

    let newer = KeptRecord { record: vec![7; 50], ..kept(5, 100) };
    let oversized = kept(over, MAX_KEPT_RECORD_BYTES + 1);
    let steps = [newer.clone(), oversized.clone()].map(|k| Step::Input(Input::KeepRecord(k)));
    net.nodes[0].engine.handle_batch(NOW, steps).unwrap();
    net.restart(0);
    let records = read(&mut net);
    assert_eq!(records.len(), MAX_KEPT_RECORDS, "kept across the restart");
    assert!(records.contains(&newer), "the newer record replaced the old");
    assert!(!records.iter().any(|r| r.peer == oversized.peer), "an oversized record is not kept");

    net.advance(KEPT_RECORD_LIFETIME_MS - 2 * DAY_MS);
    assert_eq!(read(&mut net).len(), MAX_KEPT_RECORDS, "kept while they may still be useful");
    net.advance(3 * DAY_MS);
    assert!(read(&mut net).is_empty(), "forgotten 30 days after they were last seen");
}
