//! The long-running commands: `node`, `relay` and `demo`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use p2pchat_protocol::engine::{Command, CommandOutcome, EngineConfig, Event, Query};
use p2pchat_protocol::relay::RelayConfig;

use crate::config::Settings;
use crate::node::{Node, NodeConfig, NodeError};
use crate::relay_server::{RelayServer, RelayServerConfig};
use p2pchat_protocol::address::AddressPolicy;
use p2pchat_storage_sqlite::Passphrase;

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// The engine's settings from the node's.
pub fn engine_config(settings: &Settings) -> EngineConfig {
    EngineConfig {
        max_retries: settings.chat_max_retries,
        retry_backoff_ms: settings.chat_retry_backoff_ms,
        message_ttl_ms: u64::from(settings.chat_message_ttl_days) * DAY_MS,
        ..EngineConfig::default()
    }
}

/// The relay's limits from the settings.
pub fn relay_config(settings: &Settings) -> RelayConfig {
    RelayConfig {
        mailbox_max_count: settings.mailbox_max_count,
        mailbox_max_bytes: settings.mailbox_max_bytes,
        mailbox_max_count_per_sender: settings.mailbox_max_count_per_sender,
        mailbox_max_count_per_source: settings.mailbox_max_count_per_source,
        mailbox_ttl_ms: u64::from(settings.mailbox_ttl_days) * DAY_MS,
        rate_per_sec: settings.relay_rate_per_sec,
        rate_burst: settings.relay_rate_burst,
        ..RelayConfig::default()
    }
}

/// Blocks until SIGINT or SIGTERM.
pub fn wait_for_signal() -> Result<(), String> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        .map_err(|e| format!("cannot listen for signals: {e}"))?;
    let _ = signals.forever().next();
    Ok(())
}

/// Which addresses from peers' records the node may dial.
fn address_policy(settings: &Settings) -> AddressPolicy {
    if settings.allow_private_addresses {
        AddressPolicy::AllowPrivate
    } else {
        AddressPolicy::PublicOnly
    }
}

/// `p2pchat node`, with the identity key's passphrase if it has one.
pub fn node(settings: &Settings, passphrase: Option<Passphrase>) -> Result<(), String> {
    let node = Node::start(NodeConfig {
        data_dir: settings.data_dir.clone(),
        listen: settings.listen,
        no_direct: settings.no_direct,
        public_addrs: settings.public_addrs.clone(),
        address_policy: address_policy(settings),
        passphrase,
        durability: settings.durability,
        engine: engine_config(settings),
        relays: settings.relays.clone(),
    })
    .map_err(|e| e.to_string())?;
    let handle = node.handle();
    println!("node {} listening on {}", handle.peer_id(), handle.listen_addr());
    let api = crate::api::start(&handle, settings.api, &settings.data_dir, settings.api_allowed_hosts.clone())
        .map_err(|e| e.to_string())?;
    println!("API on http://{} (token: `p2pchat token`)", api.addr);
    // A one-time link is a password while it lasts: printed only to a
    // person at a terminal, never into the journal a service manager keeps
    // of a captured standard output.
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        println!("web UI: {}", api.login_link());
    } else {
        println!(
            "web UI: http://{} (sign in with the output of `p2pchat token --data-dir {}`; no one-time link is \
             printed when standard output is not a terminal)",
            api.addr,
            settings.data_dir.display()
        );
    }
    wait_for_signal()?;
    log::info!("shutting down");
    node.shutdown();
    Ok(())
}

/// `p2pchat relay`, with the identity key's passphrase if it has one.
pub fn relay(settings: &Settings, passphrase: Option<Passphrase>) -> Result<(), String> {
    let relay = RelayServer::start(RelayServerConfig {
        data_dir: settings.data_dir.clone(),
        listen: settings.listen,
        durability: settings.durability,
        relay: relay_config(settings),
        passphrase,
    })
    .map_err(|e| e.to_string())?;
    println!("relay {}", relay.address());
    println!("nodes use it with: --relay {}", relay.address());
    wait_for_signal()?;
    log::info!("shutting down");
    relay.shutdown();
    Ok(())
}

/// `p2pchat demo`: a relay and three nodes on loopback.
pub fn demo(data_dir: Option<PathBuf>, settings: &Settings) -> Result<(), String> {
    let (base, temporary) = match data_dir {
        Some(dir) => (dir, false),
        None => (std::env::temp_dir().join(format!("p2pchat-demo-{}", std::process::id())), true),
    };
    let result = run_demo(&base, settings);
    if temporary {
        let _ = std::fs::remove_dir_all(&base);
    }
    result
}

/// The group the demo makes, which its members accept at once.
const DEMO_GROUP: &str = "demo";

fn run_demo(base: &Path, settings: &Settings) -> Result<(), String> {
    let loopback = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let relay = RelayServer::start(RelayServerConfig {
        data_dir: base.join("relay"),
        listen: loopback(0),
        durability: settings.durability,
        relay: relay_config(settings),
        passphrase: None,
    })
    .map_err(|e| e.to_string())?;
    println!("relay  {}", relay.address());
    let relays = vec![relay.address().parse().map_err(|e: String| e)?];
    let mut nodes = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let (node, events) = Node::start_subscribed(NodeConfig {
            data_dir: base.join(name),
            listen: loopback(0),
            // Carol acts as if behind NAT: only the relay reaches her.
            no_direct: name == "carol",
            public_addrs: Vec::new(),
            // Everyone is on this machine.
            address_policy: AddressPolicy::AllowPrivate,
            passphrase: None,
            durability: settings.durability,
            engine: engine_config(settings),
            relays: relays.clone(),
        })
        .map_err(|e| e.to_string())?;
        let h = node.handle();
        let path = if name == "carol" { "relay only (--no-direct)" } else { "direct and relay" };
        let api = crate::api::start(&h, loopback(0), &base.join(name), Vec::new()).map_err(|e| e.to_string())?;
        println!("{name:<6} {} on {} ({path})", h.peer_id(), h.listen_addr());
        println!("       API http://{}  web UI {}", api.addr, api.login_link());
        nodes.push((name, node, events));
    }
    println!("data in {}", base.display());
    for (_, node, _) in &nodes {
        let h = node.handle();
        for _ in 0..200 {
            if h.relay_connected() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let (alice, bob, carol) = (nodes[0].1.handle(), nodes[1].1.handle(), nodes[2].1.handle());
    let admin = alice.peer_id();
    let watchers: Vec<_> = nodes
        .iter()
        .map(|(name, node, events)| {
            let (name, events, handle) = (*name, events.clone(), node.handle());
            std::thread::spawn(move || {
                while let Ok(event) = smol::block_on(events.recv()) {
                    match event {
                        Event::MessageReceived(m) => println!("{name} received: {:?}", m.content),
                        Event::MessageDelivered { message_id, .. } => {
                            println!("{name}: message {message_id} delivered")
                        }
                        // Bob and carol never wrote to alice, so her group
                        // waits for their consent; in the demo they accept
                        // her "demo" group at once. Other groups (made in
                        // the web UI) wait for an answer on each page.
                        Event::GroupInvite { conversation_id, group_name, invited_by, pending: true } => {
                            println!("{name} is invited to group {group_name:?}");
                            if invited_by == admin && group_name == DEMO_GROUP {
                                let accept = handle.command(Command::AcceptInvitation { group: conversation_id });
                                if let Err(e) = smol::block_on(accept) {
                                    eprintln!("{name} could not accept: {e}");
                                }
                            }
                        }
                        Event::GroupInvite { group_name, pending: false, .. } => {
                            println!("{name} joined group {group_name:?}")
                        }
                        _ => {}
                    }
                }
            })
        })
        .collect();
    // Show it working: alice makes a group with bob and carol and, once
    // they have joined, greets them.
    let members = vec![bob.peer_id(), carol.peer_id()];
    let outcome = smol::block_on(alice.command(Command::CreateGroup { name: DEMO_GROUP.into(), members }))
        .map_err(|e: NodeError| e.to_string())?;
    let CommandOutcome::Conversation(group) = outcome else { return Err("the group was not created".into()) };
    for member in [&bob, &carol] {
        for _ in 0..200 {
            if smol::block_on(member.query(Query::Conversation(group.id))).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    smol::block_on(
        alice.command(Command::SendGroupMessage { group: group.id, content: "hello bob and carol, from alice".into() }),
    )
    .map_err(|e| e.to_string())?;
    println!("running; press Ctrl-C to stop");
    wait_for_signal()?;
    for (_, node, _) in nodes {
        node.shutdown();
    }
    relay.shutdown();
    drop(watchers);
    Ok(())
}
