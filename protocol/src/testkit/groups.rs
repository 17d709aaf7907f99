//! Scenarios of groups: delivery and statuses, who can read what across
//! joins, leaves and rotations, sender keys, caps against invented members,
//! and control that must be resent or refused.

use std::collections::BTreeSet;

use super::net::{contents, group, group_envelopes, leak_group_envelopes, members_of, send_group};
use super::{rng, Net, TestStore, NOW};
use crate::engine::{
    Command, CommandOutcome, EngineConfig, EngineError, Event, Input, MessageStatus, RequestError, Transmit,
};
use crate::wire::{Envelope, EnvelopeBody};
use crate::{MessageId, PeerId};

/// Scenario: a group of three delivers to everyone and tracks the least advanced status.
pub fn a_group_of_three_delivers_to_everyone_and_tracks_the_least_advanced_status<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 3, 20);
    let g = group(&mut net, 0, &[1, 2], "Project Team");
    // Sent at once: it reaches the others before their invite and keys, is
    // held, and is decrypted when the keys arrive.
    let first = send_group(&mut net, 0, g.id, "hello team");
    for i in 1..3 {
        assert_eq!(contents(&mut net, i, &g.id), vec!["hello team"], "member {i}");
        assert!(net.kinds(i).contains(&"chat.group.invite"));
    }
    assert_eq!(net.message(0, &first.id).unwrap().status, MessageStatus::Delivered);
    let reply = send_group(&mut net, 2, g.id, "hi from member 2");
    assert_eq!(contents(&mut net, 0, &g.id), vec!["hello team", "hi from member 2"]);
    assert_eq!(contents(&mut net, 1, &g.id), vec!["hello team", "hi from member 2"]);
    // Read by one member: still delivered overall; read by both: read.
    net.command(1, Command::MarkMessageRead { message: reply.id }).unwrap();
    assert_eq!(net.message(2, &reply.id).unwrap().status, MessageStatus::Delivered);
    net.command(0, Command::MarkMessageRead { message: reply.id }).unwrap();
    assert_eq!(net.message(2, &reply.id).unwrap().status, MessageStatus::Read);
}

/// Scenario: a group of ten with a member offline during creation.
pub fn a_group_of_ten_with_a_member_offline_during_creation<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 10, 21);
    net.nodes[9].online = false;
    let g = group(&mut net, 0, &[1, 2, 3, 4, 5, 6, 7, 8, 9], "Ten");
    let m = send_group(&mut net, 3, g.id, "while 9 is away");
    assert_eq!(net.message(3, &m.id).unwrap().status, MessageStatus::Sent, "one recipient holds it back");
    net.set_online(9, true);
    net.advance(60_000);
    assert_eq!(contents(&mut net, 9, &g.id), vec!["while 9 is away"]);
    assert_eq!(net.message(3, &m.id).unwrap().status, MessageStatus::Delivered);
    let from_nine = send_group(&mut net, 9, g.id, "back");
    assert_eq!(net.message(9, &from_nine.id).unwrap().status, MessageStatus::Delivered);
    for i in 0..9 {
        assert!(contents(&mut net, i, &g.id).contains(&"back".to_string()), "member {i}");
    }
}

/// Scenario: an invitee cannot read older messages and a leaver cannot read newer ones.
pub fn an_invitee_cannot_read_older_messages_and_a_leaver_cannot_read_newer_ones<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 4, 22);
    let g = group(&mut net, 0, &[1, 2], "Team");
    send_group(&mut net, 1, g.id, "before 3 joined");
    let old = group_envelopes(&net, 1);
    let newcomer = net.id(3);
    net.command(0, Command::Invite { group: g.id, peer: newcomer }).unwrap();
    net.advance(1_000);
    for bytes in old {
        net.input(3, Input::Received { from: net.id(1), bytes });
    }
    assert!(contents(&mut net, 3, &g.id).is_empty(), "the invitee reads nothing from before it joined");
    send_group(&mut net, 1, g.id, "welcome");
    assert_eq!(contents(&mut net, 3, &g.id), vec!["welcome"]);

    net.command(2, Command::Leave { group: g.id }).unwrap();
    net.advance(1_000);
    let before = group_envelopes(&net, 1).len();
    send_group(&mut net, 1, g.id, "after 2 left");
    let new_envelopes: Vec<Vec<u8>> = group_envelopes(&net, 1).into_iter().skip(before).collect();
    assert!(!new_envelopes.is_empty());
    for bytes in new_envelopes {
        net.input(2, Input::Received { from: net.id(1), bytes });
    }
    assert!(!contents(&mut net, 2, &g.id).contains(&"after 2 left".to_string()), "the leaver reads nothing newer");
    assert!(contents(&mut net, 0, &g.id).contains(&"after 2 left".to_string()));
    assert!(contents(&mut net, 3, &g.id).contains(&"after 2 left".to_string()));

    // Re-invited, the leaver reads again.
    let leaver = net.id(2);
    net.command(0, Command::Invite { group: g.id, peer: leaver }).unwrap();
    net.advance(1_000);
    send_group(&mut net, 3, g.id, "welcome back");
    assert!(contents(&mut net, 2, &g.id).contains(&"welcome back".to_string()));
}

/// Scenario: a group's admin lists invented members, and each "sends"
/// group messages under keys nobody holds: what is held stays within the
/// per-sender and overall caps, and the key exchanges the node starts for
/// them stay within the background cap, while the real members still talk.
pub fn a_group_of_invented_members_cannot_grow_held_messages_or_key_exchanges_past_the_caps<S: TestStore>(
    make: fn() -> S,
) {
    let config = EngineConfig {
        held_max_per_sender: 3,
        held_max_bytes_per_sender: 600,
        held_max: 7,
        held_max_bytes: 1 << 20,
        max_background_key_exchanges: 2,
        ..EngineConfig::default()
    };
    let mut net = Net::with_config(make, 3, 44, config);
    let puppets: Vec<PeerId> = (0..5u8).map(|n| PeerId([0xa0 + n; 20])).collect();
    let mut members: Vec<PeerId> = puppets.clone();
    members.extend([net.id(1), net.id(2)]);
    let g = match net.command(0, Command::CreateGroup { name: "Puppets".into(), members }).unwrap() {
        CommandOutcome::Conversation(c) => c,
        other => panic!("{other:?}"),
    };
    // The admin's own exchanges with its invented members take its
    // background slots first; the real ones get theirs as those give up.
    net.advance(600_000);
    assert!(net.kinds(1).contains(&"chat.group.invite"));
    let held = |net: &mut Net<S>, sender: Option<&PeerId>| {
        let store = net.nodes[1].engine.store_mut();
        store.begin().unwrap();
        let usage = store.held_usage(sender).unwrap();
        let exchanges = store.key_exchange_count().unwrap();
        store.rollback();
        (usage, exchanges)
    };
    // The first sends large envelopes (its bytes run out first), the others
    // small ones (their count does).
    for (i, puppet) in puppets.iter().enumerate() {
        let len = if i == 0 { 300 } else { 60 };
        for n in 0..5u32 {
            let message = crate::wire::GroupMessage {
                group_id: g.id,
                sender: *puppet,
                key_id: 7,
                message_number: n,
                ciphertext: vec![n as u8; len],
                signature: crate::wire::Signature64([0; 64]),
            };
            let bytes = Envelope::new(EnvelopeBody::Group(message)).encode();
            net.input(1, Input::Received { from: *puppet, bytes });
        }
    }
    let ((large, large_bytes), _) = held(&mut net, Some(&puppets[0]));
    assert_eq!(large, 1, "one sender's held bytes stop at its cap ({large_bytes} bytes held)");
    let ((small, _), _) = held(&mut net, Some(&puppets[1]));
    assert_eq!(small, 3, "one sender's held messages stop at its cap");
    let ((all, _), exchanges) = held(&mut net, None);
    assert_eq!(all, 7, "held messages from everyone stop at the overall cap");
    assert!(exchanges <= 2, "{exchanges} key exchanges with invented members");
    assert!(net.kinds(1).contains(&"chat.security.rejected"), "refusals are reported");
    // The real members still talk.
    send_group(&mut net, 0, g.id, "hello, real members");
    send_group(&mut net, 2, g.id, "hello from 2");
    // Node 2's own exchanges with the invented members come first; its key
    // reaches node 1 once they give up and free their places.
    net.advance(600_000);
    let texts = contents(&mut net, 1, &g.id);
    assert!(texts.contains(&"hello, real members".to_string()), "{texts:?}");
    assert!(texts.contains(&"hello from 2".to_string()), "{texts:?}");
    let (_, exchanges) = held(&mut net, None);
    assert!(exchanges <= 2 + 1, "{exchanges} key exchanges after the real traffic");
}

/// Scenario: messages still waiting for an offline member when another
/// member leaves reach it after the rotation, and a member invited before
/// that rotation cannot read them, even with every envelope a relay saw.
pub fn a_later_member_cannot_read_older_messages_caught_by_a_rotation<S: TestStore>(make: fn() -> S) {
    // 0 admin, 1 member, 2 offline member, 3 leaver, 4 newcomer.
    let mut net = Net::new(make, 5, 40);
    let g = group(&mut net, 0, &[1, 2, 3], "Team");
    net.advance(1_000);
    net.set_online(2, false);
    send_group(&mut net, 0, g.id, "from 0 while 2 is away");
    send_group(&mut net, 1, g.id, "from 1 while 2 is away");
    let newcomer = net.id(4);
    net.command(0, Command::Invite { group: g.id, peer: newcomer }).unwrap();
    net.advance(1_000);
    net.command(3, Command::Leave { group: g.id }).unwrap();
    net.advance(1_000);
    send_group(&mut net, 0, g.id, "welcome from 0");
    send_group(&mut net, 1, g.id, "welcome from 1");
    net.set_online(2, true);
    net.advance(120_000);
    let returned = contents(&mut net, 2, &g.id);
    for text in ["from 0 while 2 is away", "from 1 while 2 is away", "welcome from 0", "welcome from 1"] {
        assert!(returned.contains(&text.to_string()), "the returning member lacks {text:?}: {returned:?}");
    }
    leak_group_envelopes(&mut net, 4);
    let newcomer_has = contents(&mut net, 4, &g.id);
    assert!(
        !newcomer_has.iter().any(|m| m.contains("while 2 is away")),
        "a member invited later read older messages: {newcomer_has:?}"
    );
    assert!(newcomer_has.contains(&"welcome from 0".to_string()));
    assert!(newcomer_has.contains(&"welcome from 1".to_string()));
}

/// Scenario: a member that asks for a sender key gets the sender's older
/// messages it still lacks, and a member invited since cannot read them.
pub fn a_later_member_cannot_read_older_messages_answered_to_a_key_request<S: TestStore>(make: fn() -> S) {
    // 0 admin, 1 sender, 2 offline member, 3 newcomer.
    let mut net = Net::new(make, 4, 41);
    let g = group(&mut net, 0, &[1, 2], "Team");
    net.advance(1_000);
    net.set_online(2, false);
    send_group(&mut net, 1, g.id, "from 1 while 2 is away");
    let newcomer = net.id(3);
    net.command(0, Command::Invite { group: g.id, peer: newcomer }).unwrap();
    net.advance(1_000);
    send_group(&mut net, 1, g.id, "welcome from 1");
    // Pairwise traffic from 1 to the returning member (its sender key)
    // is lost for a minute, so the member asks 1 for the key while 1 keeps
    // sending it the group message.
    let blocked = std::rc::Rc::new(std::cell::Cell::new(true));
    let block = blocked.clone();
    let returning = net.id(2);
    net.lose = Box::new(move |from, t| {
        let ratchet = matches!(Envelope::decode(&t.bytes).map(|e| e.body), Ok(EnvelopeBody::Ratchet(_)));
        block.get() && from == 1 && t.peer == returning && ratchet
    });
    net.set_online(2, true);
    net.advance(60_000);
    blocked.set(false);
    net.advance(120_000);
    let returned = contents(&mut net, 2, &g.id);
    assert!(returned.contains(&"from 1 while 2 is away".to_string()), "{returned:?}");
    assert!(returned.contains(&"welcome from 1".to_string()), "{returned:?}");
    for i in 0..4 {
        eprintln!("NODE {i} {}", net.id(i));
    }
    eprintln!("LEAK {}", net.wire_group_envelopes.len());
    leak_group_envelopes(&mut net, 3);
    let newcomer_has = contents(&mut net, 3, &g.id);
    assert!(
        !newcomer_has.contains(&"from 1 while 2 is away".to_string()),
        "a member invited later read an older message: {newcomer_has:?}"
    );
    assert!(newcomer_has.contains(&"welcome from 1".to_string()));
}

/// Scenario: non admin invites and forged control are refused.
pub fn non_admin_invites_and_forged_control_are_refused<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 4, 23);
    let g = group(&mut net, 0, &[1, 2], "Team");
    let outsider = net.id(3);
    assert_eq!(
        net.command(1, Command::Invite { group: g.id, peer: outsider }),
        Err(EngineError::Request(RequestError::NotAdmin { admin: net.id(0) }))
    );
    // Member 1 forges "admin added 3" over its pairwise session with 2.
    let c = net.conversation(1, 2);
    net.send(1, c.id, "a pairwise session first");
    let forged = crate::wire::GroupControl::MemberAdded {
        group_id: g.id,
        member: crate::wire::RosterEntry { peer_id: outsider, epoch: 99 },
    };
    let before = net.nodes[2].events.len();
    let member_two = net.id(2);
    let store = net.nodes[1].engine.store_mut();
    store.begin().unwrap();
    let sessions = store.sessions(&member_two).unwrap().unwrap();
    store.rollback();
    let mut sessions = crate::PairwiseSessions::from_bytes(&sessions).unwrap();
    let message = sessions.encrypt(&crate::wire::PairwisePayload::GroupControl(forged).encode(), &mut rng(99)).unwrap();
    let bytes = Envelope::new(EnvelopeBody::Ratchet(message)).encode();
    net.input(2, Input::Received { from: net.id(1), bytes });
    let rejected = net.nodes[2].events[before..]
        .iter()
        .any(|e| matches!(e, Event::SecurityRejected { reason, .. } if reason.contains("admin")));
    assert!(rejected, "a forged membership change is rejected with chat.security.rejected");
    let store = net.nodes[2].engine.store_mut();
    store.begin().unwrap();
    let members = store.members(&g.id).unwrap();
    store.rollback();
    assert!(!members.iter().any(|m| m.peer_id == outsider));
}

/// Scenario: group creation needs a name and two other members.
pub fn group_creation_needs_a_name_and_two_other_members<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 3, 24);
    let one = vec![net.id(1)];
    assert_eq!(
        net.command(0, Command::CreateGroup { name: "Pair".into(), members: one }),
        Err(EngineError::Request(RequestError::TooFewMembers { min: 2, got: 1 }))
    );
    let me_and_one = vec![net.id(0), net.id(1), net.id(1)];
    assert_eq!(
        net.command(0, Command::CreateGroup { name: "Dupes".into(), members: me_and_one }),
        Err(EngineError::Request(RequestError::TooFewMembers { min: 2, got: 1 }))
    );
    let two = vec![net.id(1), net.id(2)];
    assert_eq!(
        net.command(0, Command::CreateGroup { name: "  ".into(), members: two.clone() }),
        Err(EngineError::Request(RequestError::EmptyGroupName))
    );
    let long = "n".repeat(crate::engine::MAX_GROUP_NAME_LEN + 1);
    assert_eq!(
        net.command(0, Command::CreateGroup { name: long, members: two.clone() }),
        Err(EngineError::Request(RequestError::GroupNameTooLong {
            len: crate::engine::MAX_GROUP_NAME_LEN + 1,
            max: crate::engine::MAX_GROUP_NAME_LEN
        }))
    );
    let longest = "n".repeat(crate::engine::MAX_GROUP_NAME_LEN);
    assert!(
        net.command(0, Command::CreateGroup { name: longest, members: two }).is_ok(),
        "the limit itself is allowed"
    );
}

/// Scenario: a group message that arrives before its sender's key is held,
/// the key is asked for, and the message is stored when the key comes, with
/// no wait for a retransmission.
pub fn a_group_message_before_its_sender_key_is_held_then_read<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 3, 28);
    // Lose everything member 1 sends member 2 over their pairwise session
    // while the group forms: member 2 never gets member 1's key that way.
    let two = net.id(2);
    net.lose = Box::new(move |from: usize, t: &Transmit| {
        from == 1 && t.peer == two && matches!(Envelope::decode(&t.bytes).map(|e| e.body), Ok(EnvelopeBody::Ratchet(_)))
    });
    let g = group(&mut net, 0, &[1, 2], "Late keys");
    net.lose = Box::new(|_, _| false);
    let m = send_group(&mut net, 1, g.id, "can you read this?");
    assert_eq!(contents(&mut net, 2, &g.id), vec!["can you read this?"], "released as soon as the key arrived");
    assert_eq!(net.message(1, &m.id).unwrap().status, MessageStatus::Delivered);
}

/// Scenario: members reject group messages from non-members and with bad
/// signatures, with `chat.security.rejected`.
pub fn group_messages_from_outsiders_or_forged_are_rejected<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 4, 29);
    let g = group(&mut net, 0, &[1, 2], "Closed");
    send_group(&mut net, 0, g.id, "members only");
    // An outsider makes its own keys for the same group ID.
    let mut outsider = crate::GroupSession::new(g.id, net.id(3), [net.id(1)], &mut rng(5)).unwrap();
    let forged = outsider
        .encrypt(
            &crate::wire::ChatContent {
                message_id: MessageId::random(&mut rng(6)),
                sent_at: NOW,
                content: "let me in".into(),
            }
            .encode(),
        )
        .unwrap();
    let before = net.nodes[1].events.len();
    net.input(1, Input::Received { from: net.id(3), bytes: Envelope::new(EnvelopeBody::Group(forged)).encode() });
    // A member's genuine message with a flipped ciphertext bit.
    let genuine = group_envelopes(&net, 0).pop().unwrap();
    let Ok(Envelope { body: EnvelopeBody::Group(mut tampered) }) = Envelope::decode(&genuine) else { panic!() };
    tampered.ciphertext[0] ^= 1;
    net.input(1, Input::Received { from: net.id(0), bytes: Envelope::new(EnvelopeBody::Group(tampered)).encode() });
    let reasons: Vec<String> = net.nodes[1].events[before..]
        .iter()
        .filter_map(|e| match e {
            Event::SecurityRejected { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("not a member"), "{reasons:?}");
    assert!(reasons[1].contains("signature"), "{reasons:?}");
    assert_eq!(contents(&mut net, 1, &g.id), vec!["members only"]);
}

/// Scenario: a leaver that kept a copy of its keys still cannot read what
/// the others send after it left, because they all rotated.
pub fn a_leavers_saved_keys_cannot_read_after_it_left<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 3, 31);
    let g = group(&mut net, 0, &[1, 2], "Rotation");
    send_group(&mut net, 0, g.id, "before");
    send_group(&mut net, 1, g.id, "before too");
    let store = net.nodes[2].engine.store_mut();
    store.begin().unwrap();
    let saved = store.group_keys(&g.id).unwrap().unwrap();
    store.rollback();
    net.command(2, Command::Leave { group: g.id }).unwrap();
    net.advance(1_000);
    let before: BTreeSet<Vec<u8>> = group_envelopes(&net, 0).into_iter().chain(group_envelopes(&net, 1)).collect();
    send_group(&mut net, 0, g.id, "after, from 0");
    send_group(&mut net, 1, g.id, "after, from 1");
    let mut kept = crate::GroupSession::from_bytes(&saved).unwrap();
    let after: Vec<Vec<u8>> =
        group_envelopes(&net, 0).into_iter().chain(group_envelopes(&net, 1)).filter(|b| !before.contains(b)).collect();
    assert_eq!(after.len(), 2);
    for bytes in after {
        let Ok(Envelope { body: EnvelopeBody::Group(m) }) = Envelope::decode(&bytes) else { panic!() };
        assert!(kept.decrypt(&m, net.now).is_err(), "the leaver's old keys opened a newer message");
    }
    assert_eq!(contents(&mut net, 1, &g.id), vec!["before", "before too", "after, from 0", "after, from 1"]);
}

/// Scenario: group control is resent until acknowledged, so a lost invite
/// still reaches its member.
pub fn a_lost_invite_is_resent_until_acknowledged<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 3, 34);
    let two = net.id(2);
    let mut lost = 0;
    // The network loses every ratchet message from the admin to member 2
    // for a while (the transport had taken them).
    net.lose = Box::new(move |from: usize, t: &Transmit| {
        let hit = from == 0
            && t.peer == two
            && lost < 3
            && matches!(Envelope::decode(&t.bytes).map(|e| e.body), Ok(EnvelopeBody::Ratchet(_)));
        if hit {
            lost += 1;
        }
        hit
    });
    let g = group(&mut net, 0, &[1, 2], "Lossy");
    assert!(!net.kinds(2).contains(&"chat.group.invite"), "the invite was lost");
    net.advance(31_000);
    assert!(net.kinds(2).contains(&"chat.group.invite"), "the resent invite arrived");
    net.lose = Box::new(|_, _| false);
    send_group(&mut net, 0, g.id, "made it");
    net.advance(31_000);
    assert_eq!(contents(&mut net, 2, &g.id), vec!["made it"]);
}

/// Scenario: a membership notice resent after the member already left (its
/// acknowledgement was lost) does not bring the member back.
pub fn a_resent_member_added_after_a_leave_changes_nothing<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 4, 35);
    let g = group(&mut net, 0, &[1, 2], "Epochs");
    send_group(&mut net, 1, g.id, "hello");
    // Member 1's acknowledgements to the admin get lost for a while.
    let admin = net.id(0);
    net.lose = Box::new(move |from: usize, t: &Transmit| {
        from == 1
            && t.peer == admin
            && matches!(Envelope::decode(&t.bytes).map(|e| e.body), Ok(EnvelopeBody::Ratchet(_)))
    });
    let newcomer = net.id(3);
    net.command(0, Command::Invite { group: g.id, peer: newcomer }).unwrap();
    net.command(3, Command::Leave { group: g.id }).unwrap();
    net.lose = Box::new(|_, _| false);
    // The admin resends MemberAdded(3) to member 1, which already saw 3 leave.
    net.advance(61_000);
    let three = members_of(&mut net, 1, &g.id).into_iter().find(|m| m.peer_id == newcomer).unwrap();
    assert!(three.left_at.is_some(), "member 3 stays gone at member 1");
    let m = send_group(&mut net, 1, g.id, "after");
    assert!(!net.message(1, &m.id).unwrap().recipients.iter().any(|(p, _)| *p == newcomer));
}

/// Scenario: a leave that arrives before the notice of the join it ends is
/// remembered, so the late notice does not add a ghost member.
pub fn a_leave_before_its_join_notice_leaves_no_ghost<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 4, 36);
    let g = group(&mut net, 0, &[1, 2], "Order");
    net.set_online(2, false);
    let newcomer = net.id(3);
    net.command(0, Command::Invite { group: g.id, peer: newcomer }).unwrap();
    net.command(3, Command::Leave { group: g.id }).unwrap();
    // Member 2 comes back: the leave from 3 may overtake the admin's notice.
    let admin = net.id(0);
    let mut held_back = 0;
    net.lose = Box::new(move |from: usize, t: &Transmit| {
        let hit = from == 0
            && t.peer != admin
            && held_back < 1
            && matches!(Envelope::decode(&t.bytes).map(|e| e.body), Ok(EnvelopeBody::Ratchet(_)));
        if hit {
            held_back += 1;
        }
        hit
    });
    net.set_online(2, true);
    net.lose = Box::new(|_, _| false);
    net.advance(61_000);
    let at_two = members_of(&mut net, 2, &g.id);
    assert!(at_two.iter().find(|m| m.peer_id == newcomer).is_none_or(|m| m.left_at.is_some()), "no ghost member");
    let m = send_group(&mut net, 2, g.id, "to the real members");
    net.advance(31_000);
    assert_eq!(net.message(2, &m.id).unwrap().status, MessageStatus::Delivered);
}

/// Scenario: two members leaving at once settle: nothing is resent between
/// them afterwards.
pub fn crossing_leaves_settle<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 4, 37);
    let g = group(&mut net, 0, &[1, 2, 3], "Exodus");
    send_group(&mut net, 1, g.id, "from 1");
    send_group(&mut net, 2, g.id, "from 2");
    net.nodes[1].engine.command(net.now, Command::Leave { group: g.id }).unwrap();
    net.nodes[2].engine.command(net.now, Command::Leave { group: g.id }).unwrap();
    net.drain();
    net.advance(2 * 60 * 1000);
    let between =
        |net: &Net<S>| net.delivered.iter().filter(|(f, t, _)| (*f == 1 && *t == 2) || (*f == 2 && *t == 1)).count();
    let settled = between(&net);
    net.advance(10 * 60 * 1000);
    assert_eq!(between(&net), settled, "the two leavers keep resending to each other");
    let left: Vec<PeerId> =
        members_of(&mut net, 0, &g.id).into_iter().filter(|m| m.left_at.is_some()).map(|m| m.peer_id).collect();
    assert!(left.contains(&net.id(1)) && left.contains(&net.id(2)));
}
