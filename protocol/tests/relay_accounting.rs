//! The relay's per-peer accounting under any sequence of frames, connects,
//! disconnects and time: what one peer can make the relay send it stays
//! within one batch per request and one resend per interval, whatever it
//! acknowledges, and every entry held is delivered once it reads.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};

use p2pchat_protocol::relay::{
    MemoryRelayStore, PeerRecord, Relay, RelayConfig, RelayFrame, RelayStore, MAILBOX_BATCH, MAILBOX_BATCH_BYTES,
    MAILBOX_RESEND_INTERVAL_MS,
};
use p2pchat_protocol::testkit::NOW;
use p2pchat_protocol::{IdentityKeyPair, PeerId, Timestamp};
use proptest::prelude::*;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

#[derive(Clone, Debug)]
enum Op {
    /// The sender forwards an envelope of this many bytes to recipient `to`.
    Forward {
        to: usize,
        len: usize,
    },
    Connect(usize),
    Disconnect(usize),
    Register(usize),
    Fetch(usize),
    /// The recipient acknowledges everything it was sent.
    AckAll(usize),
    /// The recipient acknowledges IDs it may never have been sent.
    AckAny(usize, Vec<u64>),
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize, prop_oneof![1..2_000usize, 100_000..262_144usize])
            .prop_map(|(to, len)| Op::Forward { to, len }),
        1 => (0..2usize).prop_map(Op::Connect),
        1 => (0..2usize).prop_map(Op::Disconnect),
        1 => (0..2usize).prop_map(Op::Register),
        3 => (0..2usize).prop_map(Op::Fetch),
        2 => (0..2usize).prop_map(Op::AckAll),
        1 => (0..2usize, proptest::collection::vec(0..200u64, 0..5)).prop_map(|(p, ids)| Op::AckAny(p, ids)),
        2 => (0..20_000u64).prop_map(Op::Wait),
    ]
}

struct Harness {
    relay: Relay<MemoryRelayStore>,
    now: Timestamp,
    sender: PeerId,
    recipients: [PeerId; 2],
    connections: [u32; 2],
    /// Mailbox IDs each recipient was sent and has not acknowledged.
    unacked: [BTreeSet<u64>; 2],
    /// Deliver bytes sent to each recipient because of fetches, by the
    /// time of the fetch.
    fetched: [Vec<(Timestamp, usize)>; 2],
    next_id: u64,
}

impl Harness {
    fn new() -> Self {
        // A rate high enough that the test's own frames are never refused.
        let config = RelayConfig { rate_burst: 1_000_000, rate_per_sec: 1_000_000, ..RelayConfig::default() };
        let mut relay = Relay::new(MemoryRelayStore::new(), config).unwrap();
        let mut r = ChaCha20Rng::seed_from_u64(77);
        let identities: Vec<IdentityKeyPair> = (0..2).map(|_| IdentityKeyPair::generate(&mut r)).collect();
        let sender = PeerId([1; 20]);
        relay.connected(sender);
        relay.handle_frame(NOW, sender, &RelayFrame::Register.encode()).unwrap();
        for identity in &identities {
            let peer = identity.peer_id();
            relay.connected(peer);
            relay.handle_frame(NOW, peer, &RelayFrame::Register.encode()).unwrap();
            let record =
                PeerRecord::sign(identity, Vec::new(), Vec::new(), NOW, NOW.saturating_add_millis(86_400_000), 1);
            relay.handle_frame(NOW, peer, &RelayFrame::Publish(record).encode()).unwrap();
            relay.disconnected(&peer);
        }
        while relay.poll_transmit().is_some() {}
        let recipients = [identities[0].peer_id(), identities[1].peer_id()];
        Self {
            relay,
            now: NOW,
            sender,
            recipients,
            connections: [0; 2],
            unacked: [BTreeSet::new(), BTreeSet::new()],
            fetched: [Vec::new(), Vec::new()],
            next_id: 0,
        }
    }

    /// Applies a frame from `from` and checks what the relay sent for it.
    fn frame(&mut self, from: PeerId, frame: RelayFrame, fetch_by: Option<usize>) -> Result<(), TestCaseError> {
        self.relay.handle_frame(self.now, from, &frame.encode()).unwrap();
        let mut sent: BTreeMap<PeerId, (usize, usize, usize)> = BTreeMap::new();
        while let Some((to, bytes)) = self.relay.poll_transmit() {
            if let RelayFrame::Deliver { mailbox_id: Some(id), envelope, .. } = RelayFrame::decode(&bytes).unwrap() {
                let entry = sent.entry(to).or_default();
                entry.0 += 1;
                entry.1 += envelope.len();
                entry.2 = entry.2.max(envelope.len());
                if let Some(i) = self.recipients.iter().position(|p| *p == to) {
                    self.unacked[i].insert(id);
                }
            }
        }
        for (to, (count, bytes, largest)) in sent {
            prop_assert!(count <= MAILBOX_BATCH, "{count} mailbox entries to {to} at once");
            prop_assert!(bytes <= MAILBOX_BATCH_BYTES.max(largest), "{bytes} mailbox bytes to {to} at once");
            if let Some(i) = fetch_by.filter(|i| self.recipients[*i] == to) {
                self.fetched[i].push((self.now, bytes));
            }
        }
        // Within any resend interval, fetches make the relay send at most
        // one batch (or one large entry).
        for fetched in &self.fetched {
            let recent: usize = fetched
                .iter()
                .filter(|(at, _)| self.now.millis_since(*at) < MAILBOX_RESEND_INTERVAL_MS)
                .map(|(_, b)| *b)
                .sum();
            prop_assert!(recent <= MAILBOX_BATCH_BYTES.max(262_144), "{recent} bytes fetched within one interval");
        }
        Ok(())
    }

    fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Forward { to, len } => {
                self.next_id += 1;
                let frame = RelayFrame::Forward {
                    to: self.recipients[to],
                    id: self.next_id,
                    mailbox_allowed: true,
                    envelope: vec![to as u8; len],
                };
                let sender = self.sender;
                self.frame(sender, frame, None)?;
            }
            Op::Connect(i) => {
                self.relay.connected(self.recipients[i]);
                self.connections[i] += 1;
            }
            Op::Disconnect(i) => {
                if self.connections[i] > 0 {
                    self.relay.disconnected(&self.recipients[i]);
                    self.connections[i] -= 1;
                }
            }
            Op::Register(i) => self.frame(self.recipients[i], RelayFrame::Register, None)?,
            Op::Fetch(i) => self.frame(self.recipients[i], RelayFrame::FetchMailbox, Some(i))?,
            Op::AckAll(i) => {
                let ids: Vec<u64> = std::mem::take(&mut self.unacked[i]).into_iter().collect();
                self.frame(self.recipients[i], RelayFrame::MailboxAck { ids }, None)?;
            }
            Op::AckAny(i, ids) => self.frame(self.recipients[i], RelayFrame::MailboxAck { ids }, None)?,
            Op::Wait(ms) => self.now = self.now.saturating_add_millis(ms),
        }
        Ok(())
    }

    fn held(&mut self, i: usize) -> usize {
        let store = self.relay.store_mut();
        store.begin().unwrap();
        let n = store.mailbox(&self.recipients[i]).unwrap().len();
        store.rollback();
        n
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn what_a_peer_can_make_the_relay_send_is_bounded_and_its_mailbox_drains(
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let mut h = Harness::new();
        for op in ops {
            h.apply(op)?;
        }
        // Each recipient comes back on a new connection and reads: it gets
        // every entry and its mailbox empties, batch by batch.
        for i in 0..2 {
            h.unacked[i].clear();
            h.relay.connected(h.recipients[i]);
            h.frame(h.recipients[i], RelayFrame::Register, None)?;
            let mut rounds = 0;
            while h.held(i) > 0 {
                rounds += 1;
                prop_assert!(rounds < 1_000, "the mailbox does not drain");
                let ids: Vec<u64> = std::mem::take(&mut h.unacked[i]).into_iter().collect();
                prop_assert!(!ids.is_empty(), "entries held but none in flight");
                h.frame(h.recipients[i], RelayFrame::MailboxAck { ids }, None)?;
            }
        }
    }
}
