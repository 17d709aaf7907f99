//! Whole nodes in-process, over real QUIC on loopback and real SQLite
//! files, driven through the node handle.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use p2pchat::node::{Node, NodeConfig};
use p2pchat_protocol::engine::{Command, CommandOutcome, EngineConfig, Event, RequestError};
use p2pchat_storage_sqlite::Durability;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("p2pchat-nodes-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(dir: &TempDir) -> Node {
    Node::start(NodeConfig {
        data_dir: dir.0.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        no_direct: false,
        public_addrs: Vec::new(),
        // Every peer is on loopback.
        address_policy: p2pchat_protocol::address::AddressPolicy::AllowPrivate,
        passphrase: None,
        durability: Durability::Normal,
        // Quick retries, so a test waits seconds, not minutes.
        engine: EngineConfig {
            confirmation_timeout_ms: 300,
            retry_backoff_ms: 200,
            key_exchange_timeout_ms: 1_000,
            ..EngineConfig::default()
        },
        relays: Vec::new(),
    })
    .unwrap()
}

fn send(
    node: &p2pchat::node::NodeHandle,
    conversation: p2pchat_protocol::ConversationId,
    text: &str,
) -> p2pchat_protocol::MessageId {
    match smol::block_on(node.command(Command::SendMessage { conversation, content: text.into() })).unwrap() {
        CommandOutcome::Message(m) => m.id,
        other => panic!("a message, not {other:?}"),
    }
}

/// Waits (up to 15 s) for an event matching `want`.
#[track_caller]
fn wait_for(events: &smol::channel::Receiver<Event>, want: impl Fn(&Event) -> bool) -> Event {
    smol::block_on(async {
        let deadline = async {
            smol::Timer::after(Duration::from_secs(15)).await;
            None
        };
        let search = async {
            loop {
                let event = events.recv().await.ok()?;
                if want(&event) {
                    return Some(event);
                }
            }
        };
        smol::future::or(search, deadline).await
    })
    .unwrap_or_else(|| panic!("the event did not come within 15 s"))
}

#[test]
fn two_nodes_message_directly() {
    let (alice_dir, bob_dir) = (TempDir::new("alice"), TempDir::new("bob"));
    let (alice, bob) = (start(&alice_dir), start(&bob_dir));
    let (a, b) = (alice.handle(), bob.handle());
    a.add_peer_address(b.peer_id(), b.listen_addr());
    b.add_peer_address(a.peer_id(), a.listen_addr());
    let (a_events, b_events) = (a.subscribe(), b.subscribe());

    let CommandOutcome::Conversation(c) =
        smol::block_on(a.command(Command::CreateConversation { peer: b.peer_id() })).unwrap()
    else {
        panic!("a conversation")
    };
    let text = "hello bob, over QUIC";
    let CommandOutcome::Message(m) =
        smol::block_on(a.command(Command::SendMessage { conversation: c.id, content: text.into() })).unwrap()
    else {
        panic!("a message")
    };
    let received = wait_for(&b_events, |e| matches!(e, Event::MessageReceived(r) if r.id == m.id));
    let Event::MessageReceived(r) = received else { unreachable!() };
    assert_eq!(r.content, text);
    assert_eq!(r.sender, a.peer_id());
    wait_for(&a_events, |e| matches!(e, Event::MessageDelivered { message_id, .. } if *message_id == m.id));

    // A bad command gets the engine's clear error through the handle.
    let err =
        smol::block_on(a.command(Command::SendMessage { conversation: c.id, content: String::new() })).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    alice.shutdown();
    bob.shutdown();
}

#[test]
fn a_message_to_an_offline_peer_waits_in_the_queue_and_goes_when_it_is_back() {
    let (alice_dir, bob_dir) = (TempDir::new("alice-q"), TempDir::new("bob-q"));
    let (alice, bob) = (start(&alice_dir), start(&bob_dir));
    let (a, b) = (alice.handle(), bob.handle());
    a.add_peer_address(b.peer_id(), b.listen_addr());
    b.add_peer_address(a.peer_id(), a.listen_addr());
    let a_events = a.subscribe();
    let b_events = b.subscribe();
    let CommandOutcome::Conversation(c) =
        smol::block_on(a.command(Command::CreateConversation { peer: b.peer_id() })).unwrap()
    else {
        panic!("a conversation")
    };
    let first = send(&a, c.id, "first");
    wait_for(&b_events, |e| matches!(e, Event::MessageReceived(r) if r.id == first));

    // Bob stops; Alice's next message is sent into her queue.
    let bob_peer = b.peer_id();
    bob.shutdown();
    let second = send(&a, c.id, "while you were away");
    wait_for(&a_events, |e| matches!(e, Event::MessageSent { message_id, .. } if *message_id == second));

    // Bob comes back (same data directory, a new port); the queued message
    // arrives once, and Alice sees it delivered.
    let bob = start(&bob_dir);
    let b = bob.handle();
    assert_eq!(b.peer_id(), bob_peer, "the same identity from the same data directory");
    let b_events = b.subscribe();
    a.add_peer_address(b.peer_id(), b.listen_addr());
    let got = wait_for(&b_events, |e| matches!(e, Event::MessageReceived(r) if r.id == second));
    let Event::MessageReceived(r) = got else { unreachable!() };
    assert_eq!(r.content, "while you were away");
    wait_for(&a_events, |e| matches!(e, Event::MessageDelivered { message_id, .. } if *message_id == second));
    // Bob's store still has the first message too: nothing lost across the restart.
    alice.shutdown();
    bob.shutdown();
}

/// Waits (up to 15 s) until `node` has no open connection to `peer`.
fn eventually_none(node: &p2pchat::node::NodeHandle, peer: p2pchat_protocol::PeerId) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while node.open_connections(peer) > 0 {
        assert!(std::time::Instant::now() < deadline, "the connection did not close within 15 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_burst_to_a_peer_with_no_connection_shares_one_dial() {
    let (alice_dir, bob_dir) = (TempDir::new("alice-burst"), TempDir::new("bob-burst"));
    let (alice, bob) = (start(&alice_dir), start(&bob_dir));
    let (a, b) = (alice.handle(), bob.handle());
    a.add_peer_address(b.peer_id(), b.listen_addr());
    b.add_peer_address(a.peer_id(), a.listen_addr());
    let CommandOutcome::Conversation(c) =
        smol::block_on(a.command(Command::CreateConversation { peer: b.peer_id() })).unwrap()
    else {
        panic!("a conversation")
    };
    let a_events = a.subscribe();
    let first = send(&a, c.id, "first");
    wait_for(&a_events, |e| matches!(e, Event::MessageDelivered { message_id, .. } if *message_id == first));

    // Bob restarts on a new port: Alice's connection is gone, and a burst
    // of sends at once (committed together, so transmitted together) finds
    // none.
    bob.shutdown();
    let bob = start(&bob_dir);
    let b = bob.handle();
    let b_events = b.subscribe();
    eventually_none(&a, b.peer_id());
    a.add_peer_address(b.peer_id(), b.listen_addr());
    let burst = smol::block_on(async {
        let sends: Vec<_> = (0..40)
            .map(|n| {
                let a = a.clone();
                smol::spawn(async move {
                    a.command(Command::SendMessage { conversation: c.id, content: format!("burst {n}") }).await
                })
            })
            .collect();
        let mut ids = Vec::new();
        for send in sends {
            match send.await.unwrap() {
                CommandOutcome::Message(m) => ids.push(m.id),
                other => panic!("a message, not {other:?}"),
            }
        }
        ids
    });
    let mut unseen: std::collections::BTreeSet<_> = burst.into_iter().collect();
    while !unseen.is_empty() {
        if let Event::MessageReceived(r) = wait_for(&b_events, |e| matches!(e, Event::MessageReceived(_))) {
            unseen.remove(&r.id);
        }
    }
    // One dial carried the burst (two connections at most, had Bob dialled
    // Alice at the same moment), not one per message.
    assert!(
        (1..=2).contains(&a.open_connections(b.peer_id())),
        "{} connections to Bob",
        a.open_connections(b.peer_id())
    );
    assert!(b.open_connections(a.peer_id()) <= 2, "{} connections to Alice", b.open_connections(a.peer_id()));
    alice.shutdown();
    bob.shutdown();
}

#[test]
fn a_peer_that_refuses_our_connection_is_not_dialled_again_at_once() {
    use p2pchat::admission::IncomingLimits;
    use p2pchat::transport::{Inbound, Transport, TransportError};

    let alice_dir = TempDir::new("alice-refused");
    let alice = start(&alice_dir);
    let a = alice.handle();
    // A peer that takes no connection from anyone: each one is refused over
    // its per-peer limit, once the dialler is known.
    let full = IncomingLimits { connections_per_peer: 0, ..IncomingLimits::NODE };
    let identity =
        p2pchat_protocol::IdentityKeyPair::from_seed(&p2pchat_protocol::keys::IdentitySeed::from_bytes([9; 32]));
    let mallory = Transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        p2pchat::tls::TlsIdentity::new(&identity).unwrap(),
        Inbound::Limited(full),
    )
    .unwrap();
    a.add_peer_address(mallory.peer_id(), mallory.local_addr().unwrap());
    let CommandOutcome::Conversation(c) =
        smol::block_on(a.command(Command::CreateConversation { peer: mallory.peer_id() })).unwrap()
    else {
        panic!("a conversation")
    };
    send(&a, c.id, "are you there?");
    // Alice's key exchange tries again every second or so; after the first
    // refusal her dials stop for 10 s.
    // Counts the dials Mallory refuses, until `enough` of them or the end
    // of `window`.
    let refusals = |enough: usize, window: Duration| {
        smol::block_on(async {
            let mut refused = 0;
            let count = async {
                while let Some(handshake) = mallory.accept().await {
                    if let Err(TransportError::OverLimit { .. }) = handshake.await {
                        refused += 1;
                        if refused == enough {
                            return;
                        }
                    }
                }
            };
            let end = async {
                smol::Timer::after(window).await;
            };
            smol::future::or(count, end).await;
            refused
        })
    };
    assert_eq!(refusals(1, Duration::from_secs(20)), 1, "the first dial, refused, within 20 s");
    let refused = refusals(usize::MAX, Duration::from_secs(4));
    assert_eq!(refused, 0, "dials after the refusal");
    alice.shutdown();
}

#[test]
fn a_second_node_on_one_data_directory_is_refused() {
    let dir = TempDir::new("twice");
    let first = start(&dir);
    let err = Node::start(NodeConfig {
        data_dir: dir.0.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        no_direct: false,
        public_addrs: Vec::new(),
        // Every peer is on loopback.
        address_policy: p2pchat_protocol::address::AddressPolicy::AllowPrivate,
        passphrase: None,
        durability: Durability::Normal,
        engine: EngineConfig::default(),
        relays: Vec::new(),
    })
    .err()
    .expect("refused");
    assert!(err.to_string().contains("another p2pchat process"), "{err}");
    first.shutdown();
}

fn relay_config(dir: &TempDir, relay: &p2pchat::relay_server::RelayServer, no_direct: bool) -> NodeConfig {
    NodeConfig {
        data_dir: dir.0.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        no_direct,
        public_addrs: Vec::new(),
        // Every peer is on loopback.
        address_policy: p2pchat_protocol::address::AddressPolicy::AllowPrivate,
        passphrase: None,
        durability: Durability::Normal,
        engine: EngineConfig {
            confirmation_timeout_ms: 300,
            retry_backoff_ms: 200,
            key_exchange_timeout_ms: 1_000,
            ..EngineConfig::default()
        },
        relays: vec![relay.address().parse().unwrap()],
    }
}

fn bob_config(dir: &TempDir, relay: &p2pchat::relay_server::RelayServer) -> NodeConfig {
    relay_config(dir, relay, true)
}

fn start_with(dir: &TempDir, relay: &p2pchat::relay_server::RelayServer, no_direct: bool) -> Node {
    Node::start(relay_config(dir, relay, no_direct)).unwrap()
}

/// Waits (up to 15 s) until every node is registered with its relay.
fn wait_registered(nodes: &[&p2pchat::node::NodeHandle]) {
    for _ in 0..300 {
        if nodes.iter().all(|n| n.relay_connected()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the nodes did not register with the relay within 15 s");
}

fn start_relay(dir: &TempDir) -> p2pchat::relay_server::RelayServer {
    p2pchat::relay_server::RelayServer::start(p2pchat::relay_server::RelayServerConfig {
        data_dir: dir.0.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        durability: Durability::Normal,
        relay: p2pchat_protocol::relay::RelayConfig::default(),
        passphrase: None,
    })
    .unwrap()
}

/// Sends `text` from `a` to `b`'s peer, retrying the first command until
/// the relay connection is up (a conversation needs no network).
fn conversation(a: &p2pchat::node::NodeHandle, peer: p2pchat_protocol::PeerId) -> p2pchat_protocol::ConversationId {
    match smol::block_on(a.command(Command::CreateConversation { peer })).unwrap() {
        CommandOutcome::Conversation(c) => c.id,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_no_direct_node_is_reached_only_through_the_relay() {
    let (relay_dir, alice_dir, bob_dir) = (TempDir::new("relay-r"), TempDir::new("alice-r"), TempDir::new("bob-r"));
    let relay = start_relay(&relay_dir);
    let alice = start_with(&alice_dir, &relay, false);
    let bob = start_with(&bob_dir, &relay, true);
    let (a, b) = (alice.handle(), bob.handle());
    let (a_events, b_events) = (a.subscribe(), b.subscribe());
    wait_registered(&[&a, &b]);
    let c = conversation(&a, b.peer_id());
    let m = send(&a, c, "through the relay");
    let got = wait_for(&b_events, |e| matches!(e, Event::MessageReceived(r) if r.id == m));
    let Event::MessageReceived(r) = got else { unreachable!() };
    assert_eq!(r.content, "through the relay");
    wait_for(&a_events, |e| matches!(e, Event::MessageDelivered { message_id, .. } if *message_id == m));
    // Bob accepts no direct connection: a dial to him is refused.
    let probe = p2pchat::transport::Transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        p2pchat::tls::TlsIdentity::new(&p2pchat_protocol::IdentityKeyPair::from_seed(
            &p2pchat_protocol::keys::IdentitySeed::from_bytes([9; 32]),
        ))
        .unwrap(),
        p2pchat::transport::Inbound::Refused,
    )
    .unwrap();
    assert!(smol::block_on(probe.dial(b.listen_addr(), b.peer_id())).is_err());
    alice.shutdown();
    bob.shutdown();
    relay.shutdown();
}

#[test]
fn a_record_listing_a_loopback_or_private_address_is_not_dialled_by_default() {
    let (relay_dir, alice_dir, bob_dir) = (TempDir::new("relay-p"), TempDir::new("alice-p"), TempDir::new("bob-p"));
    let relay = start_relay(&relay_dir);
    // Alice keeps the default policy; Bob accepts direct connections and
    // publishes his loopback address. Alice accepts no direct connections,
    // so any connection between them would be one she dialled.
    let alice = Node::start(NodeConfig {
        address_policy: p2pchat_protocol::address::AddressPolicy::PublicOnly,
        passphrase: None,
        ..relay_config(&alice_dir, &relay, true)
    })
    .unwrap();
    let bob = start_with(&bob_dir, &relay, false);
    let (a, b) = (alice.handle(), bob.handle());
    let (a_events, b_events) = (a.subscribe(), b.subscribe());
    wait_registered(&[&a, &b]);
    let c = conversation(&a, b.peer_id());
    let m = send(&a, c, "through the relay, not to 127.0.0.1");
    wait_for(&b_events, |e| matches!(e, Event::MessageReceived(r) if r.id == m));
    wait_for(&a_events, |e| matches!(e, Event::MessageDelivered { message_id, .. } if *message_id == m));
    // Alice looked Bob up and got his record, but took no address from it
    // and never dialled him.
    let (peers, _) = smol::block_on(a.peers()).unwrap();
    assert!(
        peers.iter().all(|p| p.peer != b.peer_id() || p.address.is_none()),
        "alice took bob's loopback address from his record: {peers:?}"
    );
    assert_eq!(a.open_connections(b.peer_id()), 0, "alice dialled bob's loopback address");
    alice.shutdown();
    bob.shutdown();
    relay.shutdown();
}

#[test]
fn a_message_waits_in_the_relay_mailbox_after_its_sender_went_offline() {
    let (relay_dir, alice_dir, bob_dir) = (TempDir::new("relay-m"), TempDir::new("alice-m"), TempDir::new("bob-m"));
    let relay = start_relay(&relay_dir);
    let alice = start_with(&alice_dir, &relay, true);
    let bob = start_with(&bob_dir, &relay, true);
    let (a, b) = (alice.handle(), bob.handle());
    let (a_events, b_events) = (a.subscribe(), b.subscribe());
    wait_registered(&[&a, &b]);
    let c = conversation(&a, b.peer_id());
    let first = send(&a, c, "hello");
    wait_for(&b_events, |e| matches!(e, Event::MessageReceived(r) if r.id == first));
    // Bob goes offline; Alice's next message is held by the relay.
    bob.shutdown();
    let held = send(&a, c, "held for you");
    wait_for(&a_events, |e| matches!(e, Event::MessageSent { message_id, .. } if *message_id == held));
    // Alice goes offline too; Bob comes back and gets it from the mailbox.
    alice.shutdown();
    let (bob, b_events) = Node::start_subscribed(bob_config(&bob_dir, &relay)).unwrap();
    let got = wait_for(&b_events, |e| matches!(e, Event::MessageReceived(r) if r.id == held));
    let Event::MessageReceived(r) = got else { unreachable!() };
    assert_eq!(r.content, "held for you");
    bob.shutdown();
    relay.shutdown();
}

#[test]
fn a_group_of_four_over_direct_and_relay_paths() {
    let relay_dir = TempDir::new("relay-g");
    let relay = start_relay(&relay_dir);
    let dirs: Vec<TempDir> = ["alice-g", "bob-g", "carol-g", "dave-g"].iter().map(|n| TempDir::new(n)).collect();
    // Alice and Bob accept direct connections; Carol and Dave only the relay.
    let nodes: Vec<Node> = dirs.iter().enumerate().map(|(i, d)| start_with(d, &relay, i >= 2)).collect();
    let handles: Vec<_> = nodes.iter().map(Node::handle).collect();
    let events: Vec<_> = handles.iter().map(|h| h.subscribe()).collect();
    wait_registered(&handles.iter().collect::<Vec<_>>());
    let members = handles[1..].iter().map(|h| h.peer_id()).collect();
    let group = match smol::block_on(handles[0].command(Command::CreateGroup { name: "four".into(), members })).unwrap()
    {
        CommandOutcome::Conversation(c) => c.id,
        other => panic!("{other:?}"),
    };
    // Everyone speaks once; everyone else hears each, once.
    let mut sent = Vec::new();
    for (i, h) in handles.iter().enumerate() {
        if i > 0 {
            // None of them ever wrote to alice: each accepts her invitation.
            wait_for(
                &events[i],
                |e| matches!(e, Event::GroupInvite { conversation_id, pending: true, .. } if *conversation_id == group),
            );
            smol::block_on(h.command(Command::AcceptInvitation { group })).unwrap();
        }
        let text = format!("hello from member {i}");
        let id = match smol::block_on(h.command(Command::SendGroupMessage { group, content: text.clone() })).unwrap() {
            CommandOutcome::Message(m) => m.id,
            other => panic!("{other:?}"),
        };
        sent.push((i, id, text));
    }
    // Each member collects what it receives (in whatever order it comes)
    // until it has everyone else's message.
    for (j, e) in events.iter().enumerate() {
        let mut got: std::collections::BTreeMap<p2pchat_protocol::MessageId, String> = Default::default();
        let expected: Vec<_> = sent.iter().filter(|(i, _, _)| *i != j).collect();
        while !expected.iter().all(|(_, id, _)| got.contains_key(id)) {
            if let Event::MessageReceived(r) = wait_for(e, |ev| matches!(ev, Event::MessageReceived(_))) {
                assert!(got.insert(r.id, r.content).is_none(), "member {j} got a message twice");
            }
        }
        for (i, id, text) in expected {
            assert_eq!(&got[id], text, "member {j} got member {i}'s message intact");
        }
    }
    for node in nodes {
        node.shutdown();
    }
    relay.shutdown();
}

#[test]
fn a_node_answering_for_another_peer_is_refused() {
    let (alice_dir, bob_dir, mallory_dir) = (TempDir::new("alice-w"), TempDir::new("bob-w"), TempDir::new("mallory-w"));
    let (alice, bob, mallory) = (start(&alice_dir), start(&bob_dir), start(&mallory_dir));
    let (a, b, m) = (alice.handle(), bob.handle(), mallory.handle());
    let (a_events, m_events) = (a.subscribe(), m.subscribe());
    // Alice is told Bob lives at Mallory's address.
    a.add_peer_address(b.peer_id(), m.listen_addr());
    let c = match smol::block_on(a.command(Command::CreateConversation { peer: b.peer_id() })).unwrap() {
        CommandOutcome::Conversation(c) => c.id,
        other => panic!("{other:?}"),
    };
    let id = send(&a, c, "for bob only");
    // Mallory's certificate is not Bob's: no connection, so the key
    // exchange never starts and the message fails with a reason.
    let failed = wait_for(&a_events, |e| matches!(e, Event::MessageFailed { message_id, .. } if *message_id == id));
    let Event::MessageFailed { failure_reason, .. } = failed else { unreachable!() };
    assert!(!failure_reason.is_empty());
    assert!(m_events.try_recv().is_err(), "Mallory got nothing: {:?}", m_events.try_recv());
    alice.shutdown();
    bob.shutdown();
    mallory.shutdown();
}

#[test]
fn concurrent_commands_each_get_their_own_answer_and_a_bad_one_spoils_none() {
    let dir = TempDir::new("concurrent");
    let node = start(&dir);
    let handle = node.handle();
    let peer = p2pchat_protocol::PeerId([7; 20]);
    let c = conversation(&handle, peer);
    // Sent together, they share engine batches; the empty one fails alone.
    let texts: Vec<String> = (0..40).map(|n| if n == 17 { String::new() } else { format!("m{n}") }).collect();
    let answers = smol::block_on(async {
        let calls: Vec<_> = texts
            .iter()
            .map(|t| {
                let handle = handle.clone();
                let content = t.clone();
                smol::spawn(async move { handle.command(Command::SendMessage { conversation: c, content }).await })
            })
            .collect();
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await);
        }
        answers
    });
    for (text, answer) in texts.iter().zip(answers) {
        match answer {
            Ok(CommandOutcome::Message(m)) => assert_eq!(&m.content, text),
            Err(p2pchat::node::NodeError::Engine(p2pchat_protocol::engine::EngineError::Request(
                RequestError::EmptyContent,
            ))) => {
                assert!(text.is_empty())
            }
            other => panic!("{text:?}: {other:?}"),
        }
    }
    node.shutdown();
}

#[test]
fn a_peer_on_another_relay_is_reached_through_its_relay_online_and_offline() {
    let dirs = (TempDir::new("relay-1"), TempDir::new("relay-2"), TempDir::new("alice-2r"), TempDir::new("dave-2r"));
    let (r1_dir, r2_dir, alice_dir, dave_dir) = dirs;
    let (r1, r2) = (start_relay(&r1_dir), start_relay(&r2_dir));
    // Alice is on R1 only, dave on R2 only; neither can be dialled.
    let alice = start_with(&alice_dir, &r1, true);
    let (dave, d_events) = Node::start_subscribed(relay_config(&dave_dir, &r2, true)).unwrap();
    let (a, d) = (alice.handle(), dave.handle());
    let a_events = a.subscribe();
    wait_registered(&[&a, &d]);
    // Alice is given dave's record (as a contact card would carry it).
    a.add_peer_record(smol::block_on(d.own_record()).unwrap());

    let c = conversation(&a, d.peer_id());
    let m = send(&a, c, "hello from another relay");
    wait_for(&d_events, |e| matches!(e, Event::MessageReceived(r) if r.id == m));
    wait_for(&a_events, |e| matches!(e, Event::MessageDelivered { message_id, .. } if *message_id == m));

    // Dave goes away; what alice sends waits in his mailbox on R2.
    dave.shutdown();
    let away = send(&a, c, "while you were away");
    wait_for(&a_events, |e| matches!(e, Event::MessageSent { message_id, .. } if *message_id == away));
    let (dave, d_events) = Node::start_subscribed(relay_config(&dave_dir, &r2, true)).unwrap();
    wait_for(&d_events, |e| matches!(e, Event::MessageReceived(r) if r.id == away));
    wait_for(&a_events, |e| matches!(e, Event::MessageDelivered { message_id, .. } if *message_id == away));
    // R1 never saw dave: alice reached him through R2 both times.
    let (peers, relays) = smol::block_on(a.peers()).unwrap();
    let path = peers.iter().find(|p| p.peer == d.peer_id()).expect("alice has a path to dave");
    let p2pchat_protocol::node::PathState::RelayedVia(via) = path.state else { panic!("{path:?}") };
    assert_eq!(relays[via], r2.address(), "{relays:?}");
    alice.shutdown();
    dave.shutdown();
    r1.shutdown();
    r2.shutdown();
}

/// Waits (up to 10 s) until `node` publishes exactly `want`.
fn wait_published(node: &p2pchat::node::NodeHandle, want: &[String]) {
    let mut published = Vec::new();
    for _ in 0..200 {
        published = smol::block_on(node.own_record()).unwrap().direct_addresses;
        if published == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} publishes {published:?}, not {want:?}", node.peer_id());
}

#[test]
fn a_node_listening_on_every_interface_publishes_only_addresses_others_can_dial() {
    let dirs = ["relay-pa", "alice-pa", "bob-pa", "carol-pa", "dave-pa"].map(TempDir::new);
    let [relay_dir, alice_dir, bob_dir, carol_dir, dave_dir] = &dirs;
    let relay = start_relay(relay_dir);
    let alice = start_with(alice_dir, &relay, true);
    let every_interface = |config: NodeConfig| NodeConfig { listen: "0.0.0.0:0".parse().unwrap(), ..config };
    // Bob listens on 0.0.0.0 and says nothing else: he publishes the
    // address the relay sees his connection come from, never 0.0.0.0.
    let bob = Node::start(every_interface(relay_config(bob_dir, &relay, false))).unwrap();
    // Carol gives her public address: it comes first, and the relay's
    // observation of the same address adds nothing.
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let carol_public: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let carol = Node::start(NodeConfig {
        listen: format!("0.0.0.0:{port}").parse().unwrap(),
        public_addrs: vec![carol_public],
        ..relay_config(carol_dir, &relay, false)
    })
    .unwrap();
    // Dave takes no direct connections: he publishes nothing, observed or not.
    let dave = Node::start(every_interface(relay_config(dave_dir, &relay, true))).unwrap();
    let (a, b, c, d) = (alice.handle(), bob.handle(), carol.handle(), dave.handle());
    let a_events = a.subscribe();
    wait_registered(&[&a, &b, &c, &d]);
    let bob_observed: std::net::SocketAddr = format!("127.0.0.1:{}", b.listen_addr().port()).parse().unwrap();
    wait_published(&b, &[bob_observed.to_string()]);
    wait_published(&c, &[carol_public.to_string()]);
    // Bob's observed address was published after dave's registration was
    // answered too; dave's record still lists nothing.
    assert_eq!(smol::block_on(d.own_record()).unwrap().direct_addresses, Vec::<String>::new());
    // Alice looks each up through the relay and dials what they publish.
    for (peer, published) in [(b.peer_id(), bob_observed), (c.peer_id(), carol_public)] {
        let m = send(&a, conversation(&a, peer), "hello");
        wait_for(&a_events, |e| matches!(e, Event::MessageDelivered { message_id, .. } if *message_id == m));
        let (peers, _) = smol::block_on(a.peers()).unwrap();
        let path = peers.iter().find(|p| p.peer == peer).expect("alice has a path");
        assert_eq!(path.address, Some(published), "{path:?}");
        assert_eq!(path.state, p2pchat_protocol::node::PathState::Direct, "{path:?}");
    }
    for node in [alice, bob, carol, dave] {
        node.shutdown();
    }
    relay.shutdown();
}
