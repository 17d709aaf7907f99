//! Scenarios of group invitations: consent, joining, caps and expiry, and
//! leaves that cross an invitation.

use super::net::{contents, group, has_left, invitations, members_of, seal_for, send_group, traces_of_group};
use super::{Net, TestStore};
use crate::engine::{
    Command, CommandOutcome, ConversationKind, EngineConfig, EngineError, Event, Input, MessageStatus, Query,
    RequestError,
};
use crate::{ConversationId, PeerId};

/// Scenario: an admin the user never wrote to (even one that wrote first)
/// invites it: the invitation waits, and the group's traffic leaves nothing
/// on the user's node until it answers. Declined, nothing is kept, and the
/// admin and the other members see the invitee leave, so their messages
/// stop waiting for it. A friend's invitation is joined at once.
pub fn a_strangers_invitation_waits_for_consent_and_a_declined_group_leaves_nothing<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 3, 61);
    net.accept_invitations = false;
    // Node 1 wrote to the admin; the admin wrote to node 2, who never answered.
    let c1 = net.conversation(1, 0);
    net.send(1, c1.id, "hi admin");
    let c2 = net.conversation(0, 2);
    net.send(0, c2.id, "hello stranger");
    let g = group(&mut net, 0, &[1, 2], "Unasked");
    let joined = |net: &Net<S>, i: usize, pending: bool| {
        net.nodes[i].events.iter().any(|e| {
            matches!(e, Event::GroupInvite { conversation_id, pending: p, .. } if *conversation_id == g.id && *p == pending)
        })
    };
    assert!(joined(&net, 1, false), "a friend's invitation is joined at once");
    assert!(joined(&net, 2, true), "a stranger's invitation is announced as waiting");
    assert!(!joined(&net, 2, false));
    let waiting = invitations(&mut net, 2);
    assert_eq!(waiting.len(), 1);
    assert_eq!((waiting[0].group_id, waiting[0].admin, waiting[0].name.as_str()), (g.id, net.id(0), "Unasked"));
    assert_eq!(waiting[0].members.len(), 3);
    // The group talks; the invitee keeps nothing of it.
    let m = send_group(&mut net, 0, g.id, "before the answer");
    send_group(&mut net, 1, g.id, "from the friend");
    net.advance(120_000);
    assert_eq!(traces_of_group(&mut net, 2, &g.id), 0, "a waiting invitation stores nothing of the group");
    assert!(net.nodes[2].engine.query(Query::Conversation(g.id)).is_err());
    assert_eq!(contents(&mut net, 1, &g.id), vec!["before the answer".to_string(), "from the friend".to_string()]);
    assert!(net.message(0, &m.id).unwrap().status < MessageStatus::Delivered, "waits for the invitee");
    // Declined: nothing stays, the admin and the friend see the invitee gone.
    net.command(2, Command::DeclineInvitation { group: g.id }).unwrap();
    net.advance(60_000);
    assert!(invitations(&mut net, 2).is_empty());
    assert_eq!(traces_of_group(&mut net, 2, &g.id), 0, "a declined group leaves nothing behind");
    assert!(has_left(&mut net, 0, &g.id, 2), "the admin learns of the decline");
    assert!(has_left(&mut net, 1, &g.id, 2), "the admin tells the other members");
    assert_eq!(net.message(0, &m.id).unwrap().status, MessageStatus::Delivered, "stops waiting for the decliner");
    let after = send_group(&mut net, 1, g.id, "after the decline");
    net.advance(60_000);
    assert_eq!(net.message(1, &after.id).unwrap().recipients, vec![(net.id(0), MessageStatus::Delivered)]);
    assert_eq!(traces_of_group(&mut net, 2, &g.id), 0);
    // Answering twice, or an invitation never received, is a clear error.
    for command in [Command::DeclineInvitation { group: g.id }, Command::AcceptInvitation { group: g.id }] {
        assert_eq!(net.command(2, command).unwrap_err(), EngineError::Request(RequestError::NoInvitation(g.id)));
    }
}

/// Scenario: the invitee accepts late: it joins, and what the members sent
/// while it waited reaches it by their retransmissions.
pub fn an_accepted_invitation_joins_and_receives_what_was_sent_while_it_waited<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 3, 62);
    net.accept_invitations = false;
    let g = group(&mut net, 0, &[1, 2], "Later");
    assert_eq!(invitations(&mut net, 1).len(), 1);
    assert_eq!(invitations(&mut net, 2).len(), 1);
    net.command(1, Command::AcceptInvitation { group: g.id }).unwrap();
    send_group(&mut net, 0, g.id, "while 2 waits");
    send_group(&mut net, 1, g.id, "from 1 while 2 waits");
    net.advance(30 * 60_000);
    assert_eq!(traces_of_group(&mut net, 2, &g.id), 0);
    let joined = match net.command(2, Command::AcceptInvitation { group: g.id }).unwrap() {
        CommandOutcome::Conversation(c) => c,
        other => panic!("{other:?}"),
    };
    assert_eq!(joined.id, g.id);
    assert!(
        matches!(joined.kind, ConversationKind::Group { ref name, admin } if name == "Later" && admin == net.id(0))
    );
    assert!(net.nodes[2].events.iter().any(|e| matches!(e, Event::ConversationCreated(c) if c.id == g.id)));
    assert!(invitations(&mut net, 2).is_empty());
    assert_eq!(members_of(&mut net, 2, &g.id).len(), 3);
    net.advance(30 * 60_000);
    let mut texts = contents(&mut net, 2, &g.id);
    texts.sort();
    assert_eq!(texts, vec!["from 1 while 2 waits".to_string(), "while 2 waits".to_string()]);
    let m = send_group(&mut net, 2, g.id, "thanks");
    net.advance(60_000);
    assert_eq!(net.message(2, &m.id).unwrap().status, MessageStatus::Delivered);
}

/// Scenario: one admin may keep only so many invitations waiting (the rest
/// are dropped at once), all admins together only so many more (the oldest
/// is dropped to make room); neither sends anything back, so a flood
/// cannot fill the outbox. One unanswered for the message TTL is declined,
/// and its admin told.
pub fn waiting_invitations_stay_within_their_caps_and_expire<S: TestStore>(make: fn() -> S) {
    let config = EngineConfig {
        max_invitations: 2,
        max_invitations_per_admin: 2,
        message_ttl_ms: 60 * 60_000,
        retention_interval_ms: 10 * 60_000,
        ..EngineConfig::default()
    };
    let mut net = Net::with_config(make, 5, 63, config);
    net.accept_invitations = false;
    let mut groups = Vec::new();
    for n in 0..3 {
        groups.push(group(&mut net, 0, &[1, 2], &format!("Spam {n}")));
        net.advance(1_000);
    }
    net.advance(60_000);
    let waiting: Vec<ConversationId> = invitations(&mut net, 1).iter().map(|i| i.group_id).collect();
    assert_eq!(waiting, vec![groups[0].id, groups[1].id], "the admin's third invitation is not taken");
    assert!(!has_left(&mut net, 0, &groups[2].id, 1), "and nothing is sent back for it");
    assert!(net.kinds(1).contains(&"chat.security.rejected"));
    let outbox_to_admin = |net: &mut Net<S>, admin: usize| {
        let peer = net.id(admin);
        let store = net.nodes[1].engine.store_mut();
        store.begin().unwrap();
        let n = store.outbox_len(&peer).unwrap();
        store.rollback();
        n
    };
    // Another admin's: the cap over everyone declines the oldest.
    net.advance(1_000);
    let other = group(&mut net, 3, &[1, 4], "Other");
    net.advance(60_000);
    let waiting: Vec<ConversationId> = invitations(&mut net, 1).iter().map(|i| i.group_id).collect();
    // The cap over everyone declines the oldest to make room for the other
    // admin's; the first admin's third, not taken but sent again, is taken
    // once it has room under its own cap, and declines the next oldest.
    assert_eq!(waiting, vec![other.id, groups[2].id]);
    assert!(!has_left(&mut net, 0, &groups[0].id, 1), "the oldest invitation was dropped, silently");
    assert!(!has_left(&mut net, 0, &groups[1].id, 1), "and so was the next");
    assert_eq!(outbox_to_admin(&mut net, 0), 0, "nothing queued for the flooding admin");
    // Unanswered for the message TTL: declined.
    net.advance(2 * 60 * 60_000);
    assert!(invitations(&mut net, 1).is_empty());
    assert!(has_left(&mut net, 0, &groups[2].id, 1));
    assert!(has_left(&mut net, 3, &other.id, 1));
    for g in groups.iter().chain([&other]) {
        assert_eq!(traces_of_group(&mut net, 1, &g.id), 0);
    }
}

/// Scenario: a member, then the admin, leave while node 3's invitation
/// waits; when node 3 accepts, neither is among the members it sends its key
/// and its messages to.
pub fn a_member_who_leaves_while_an_invitation_waits_is_not_in_the_group_accepted<S: TestStore>(make: fn() -> S) {
    let mut net = Net::new(make, 4, 65);
    net.accept_invitations = false;
    let g = group(&mut net, 0, &[1, 2, 3], "Changing");
    for i in [1, 2] {
        net.command(i, Command::AcceptInvitation { group: g.id }).unwrap();
    }
    send_group(&mut net, 2, g.id, "hello from 2, about to leave");
    net.advance(60_000);
    net.command(2, Command::Leave { group: g.id }).unwrap();
    net.advance(60_000);
    net.command(0, Command::Leave { group: g.id }).unwrap();
    net.advance(60_000);
    let waiting = invitations(&mut net, 3);
    assert_eq!(waiting.len(), 1);
    let listed: Vec<PeerId> = waiting[0].members.iter().map(|m| m.peer_id).collect();
    assert!(!listed.contains(&net.id(2)) && !listed.contains(&net.id(0)), "the leavers left the waiting roster");
    net.command(3, Command::AcceptInvitation { group: g.id }).unwrap();
    let m = send_group(&mut net, 3, g.id, "hello from 3");
    let recipients: Vec<PeerId> = m.recipients.iter().map(|(p, _)| *p).collect();
    assert_eq!(recipients, vec![net.id(1)]);
    net.advance(5 * 60_000);
    assert!(has_left(&mut net, 3, &g.id, 2), "the leave, not acknowledged while waiting, is handled in full");
    assert!(has_left(&mut net, 3, &g.id, 0));
    for i in [0, 2] {
        assert!(!contents(&mut net, i, &g.id).contains(&"hello from 3".to_string()));
    }
    assert_eq!(net.message(3, &m.id).unwrap().status, MessageStatus::Delivered);
}

/// Scenario: only the admin may report a member's leave, and only of a join
/// numbered no later than any the receiver has seen: one naming a join
/// number beyond those, the receiver or the admin changes nothing; one
/// naming a join not heard of yet is remembered as ended, so that the late
/// notice of that join does not bring the peer in.
pub fn the_admins_word_of_a_leave_counts_only_for_a_current_join<S: TestStore>(make: fn() -> S) {
    use crate::wire::{GroupControl, PairwisePayload, RosterEntry};
    let mut net = Net::new(make, 4, 66);
    let g = group(&mut net, 0, &[1, 2], "Word");
    for i in 0..3 {
        send_group(&mut net, i, g.id, &format!("hello from {i}"));
    }
    net.advance(60_000);
    let left = |peer: PeerId, epoch: u64| {
        PairwisePayload::GroupControl(GroupControl::MemberLeft {
            group_id: g.id,
            member: RosterEntry { peer_id: peer, epoch },
        })
    };
    // A member cannot.
    let before = net.nodes[2].events.len();
    let payload = left(net.id(0), 1);
    let forged = seal_for(&mut net, 1, 2, &payload);
    net.input(2, Input::Received { from: net.id(1), bytes: forged });
    assert!(net.nodes[2].events[before..]
        .iter()
        .any(|e| matches!(e, Event::SecurityRejected { reason, .. } if reason.contains("only the group's admin"))));
    // The admin's word about joins never numbered, the receiver itself or
    // the admin: nothing changes at node 1.
    let members_before = members_of(&mut net, 1, &g.id);
    for payload in [left(net.id(3), 7), left(net.id(2), 7), left(net.id(1), 1), left(net.id(0), 1)] {
        let bytes = seal_for(&mut net, 0, 1, &payload);
        net.input(1, Input::Received { from: net.id(0), bytes });
    }
    assert_eq!(members_of(&mut net, 1, &g.id), members_before);
    // A leave that overtook its join's notice: the notice then adds no one.
    let payload = left(net.id(3), 1);
    let bytes = seal_for(&mut net, 0, 1, &payload);
    net.input(1, Input::Received { from: net.id(0), bytes });
    let added = PairwisePayload::GroupControl(GroupControl::MemberAdded {
        group_id: g.id,
        member: RosterEntry { peer_id: net.id(3), epoch: 1 },
    });
    let bytes = seal_for(&mut net, 0, 1, &added);
    net.input(1, Input::Received { from: net.id(0), bytes });
    assert!(has_left(&mut net, 1, &g.id, 3), "remembered as ended, not brought in");
    // Its word about a current join: the member is gone at node 1.
    let payload = left(net.id(2), 1);
    let bytes = seal_for(&mut net, 0, 1, &payload);
    net.input(1, Input::Received { from: net.id(0), bytes });
    assert!(has_left(&mut net, 1, &g.id, 2));
}
