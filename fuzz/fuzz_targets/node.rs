//! Two nodes and two relays, with a driver the fuzzer controls: which
//! piece of pending work happens next and whether it succeeds (dials,
//! direct sends, relay connections, frames each way, a full queue to a
//! relay), connections closing, time passing, messages sent either way,
//! nodes restarting from their stores, and frames from a hostile relay.
//!
//! Checked: no panic; no message is handed to its recipient twice, or with
//! other content than was sent; and once the network heals, every message
//! its sender does not count as failed has arrived.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2pchat_fuzz::nodes::NodeWorld;
use p2pchat_fuzz::Bytes;
use p2pchat_protocol::engine::MessageStatus;

fuzz_target!(|data: &[u8]| {
    let mut input = Bytes(data);
    let seed = u64::from(input.byte());
    let mut world = NodeWorld::new(seed);
    let mut sends = 0;
    for _ in 0..256 {
        if input.is_empty() {
            break;
        }
        match input.byte() % 9 {
            0 | 1 if sends < 24 => {
                let from = input.below(2);
                world.send(from, format!("m{sends} from {from}"));
                sends += 1;
            }
            2 | 3 => world.step(usize::from(input.byte()), true),
            4 => world.step(usize::from(input.byte()), false),
            5 => world.close(input.byte()),
            6 => world.advance(u64::from(input.byte()) * 500),
            7 => {
                let (to, relay) = (input.below(2), input.below(2));
                let len = input.below(64);
                let bytes = (0..len).map(|_| input.byte()).collect();
                world.hostile_frame(to, relay, bytes);
            }
            8 => match input.byte() % 3 {
                0 => world.restart(input.below(2)),
                // A node dies before it has stored what it was just handed.
                _ => world.step_then_restart(usize::from(input.byte()), input.below(2)),
            },
            _ => world.step(0, true),
        }
    }
    world.settle();
    for from in 0..2 {
        let to = 1 - from;
        let sent: Vec<_> = world.sent[from].iter().map(|(id, content)| (*id, content.clone())).collect();
        for (id, content) in sent {
            let received = world.received[to].get(&id).cloned();
            if let Some((got, copies)) = &received {
                assert_eq!(*got, content, "message {id} arrived altered");
                assert_eq!(*copies, 1, "message {id} was handed over {copies} times");
            }
            let status = world.status(from, id);
            if status != Some(MessageStatus::Failed) {
                assert!(received.is_some(), "message {id} ({status:?}) never arrived after the network healed");
            }
        }
    }
});
