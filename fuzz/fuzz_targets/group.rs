//! A group over a network the fuzzer controls: alice (the admin) makes it
//! with bob and carol; then, in any order, any node sends, alice invites
//! dave (again, after he leaves), bob, carol or dave leaves, and the network
//! delivers, drops, duplicates, reorders or alters packets while time
//! passes.
//!
//! Checked: no panic; no altered packet is accepted; every message received
//! was sent by its sender, once; and once the network heals, each message
//! between two members who were there from the start and never left has
//! arrived, unless its sender counts it failed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2pchat_fuzz::{Bytes, World};
use p2pchat_protocol::engine::{Command, CommandOutcome, MessageStatus};

const ALICE: usize = 0;
const DAVE: usize = 3;

fuzz_target!(|data: &[u8]| {
    let mut input = Bytes(data);
    let seed = u64::from(input.byte());
    let mut world = World::new(4, seed);
    let members = vec![world.ids[1], world.ids[2]];
    let group = match world.command(ALICE, Command::CreateGroup { name: "fuzz".into(), members }) {
        Some(CommandOutcome::Conversation(c)) => c.id,
        other => panic!("creating the group failed: {other:?}"),
    };
    // Who was there from the start and has not left.
    let mut steady = [true, true, true, false];
    let mut sends = 0;
    for _ in 0..96 {
        if input.is_empty() {
            break;
        }
        match input.byte() % 10 {
            0 | 1 if sends < 24 => {
                let i = input.below(4);
                sends += 1;
                let content = format!("from {i}: message {sends}");
                world.command(i, Command::SendGroupMessage { group, content });
            }
            2 => {
                world.command(ALICE, Command::Invite { group, peer: world.ids[DAVE] });
            }
            3 => {
                let i = 1 + input.below(3);
                if world.command(i, Command::Leave { group }).is_some() {
                    steady[i] = false;
                }
            }
            4 => world.advance(u64::from(input.byte()) * 250),
            _ => world.network_action(&mut input),
        }
    }
    world.settle(|w| (0..4).any(|s| steady[s] && (0..4).any(|r| r != s && steady[r] && w.owed(s, r))));
    for s in (0..4).filter(|&s| steady[s]) {
        let sent: Vec<_> = world.sent[s].iter().map(|(id, (_, content))| (*id, content.clone())).collect();
        for (id, content) in sent {
            let status = world.message(s, &id).map(|m| m.status);
            if status == Some(MessageStatus::Failed) {
                continue;
            }
            for r in (0..4).filter(|&r| r != s && steady[r]) {
                let got = world.received[r].get(&id);
                assert_eq!(
                    got.map(|(_, c)| c.as_str()),
                    Some(content.as_str()),
                    "group message {id} from node {s} (status {status:?}) never reached node {r}"
                );
            }
        }
    }
});
