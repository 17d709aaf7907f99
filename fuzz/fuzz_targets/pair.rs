//! Two engines in a 1:1 conversation over a network the fuzzer controls:
//! sends from either side, deliveries, drops, duplicates, reorders, altered
//! bytes and time passing, in any order.
//!
//! Checked: no panic; no altered packet is accepted; every message received
//! was sent by its sender, and is received once; and once the network heals,
//! every message its sender does not count as failed has arrived, with its
//! exact content.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2pchat_fuzz::{Bytes, World};
use p2pchat_protocol::engine::{Command, CommandOutcome, MessageStatus};

fuzz_target!(|data: &[u8]| {
    let mut input = Bytes(data);
    let seed = u64::from(input.byte());
    let mut world = World::new(2, seed);
    let conversations: Vec<_> = (0..2)
        .map(|i| match world.command(i, Command::CreateConversation { peer: world.ids[1 - i] }) {
            Some(CommandOutcome::Conversation(c)) => c.id,
            other => panic!("creating a conversation failed: {other:?}"),
        })
        .collect();
    let mut sends = 0;
    for _ in 0..96 {
        if input.is_empty() {
            break;
        }
        match input.byte() % 8 {
            0 | 1 if sends < 24 => {
                let i = input.below(2);
                sends += 1;
                let content = format!("from {i}: message {sends}");
                world.command(i, Command::SendMessage { conversation: conversations[i], content });
            }
            2 => world.advance(u64::from(input.byte()) * 250),
            _ => world.network_action(&mut input),
        }
    }
    world.settle(|w| w.owed(0, 1) || w.owed(1, 0));
    for i in 0..2 {
        let sent: Vec<_> = world.sent[i].iter().map(|(id, (_, content))| (*id, content.clone())).collect();
        for (id, content) in sent {
            let status = world.message(i, &id).map(|m| m.status);
            if status == Some(MessageStatus::Failed) {
                continue;
            }
            let got = world.received[1 - i].get(&id);
            assert_eq!(
                got.map(|(_, c)| c.as_str()),
                Some(content.as_str()),
                "message {id} from node {i} (status {status:?}) never arrived intact"
            );
        }
    }
});
