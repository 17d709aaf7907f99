//! Two nodes and a relay in one process, in memory, with no runtime: the
//! shape of an embedding in another runtime.
//!
//! ```sh
//! cargo run -p p2pchat-protocol --example two_nodes
//! ```
//!
//! Every state machine follows the same driving rule: hand it what
//! happened, with the time; drain what it asks for; call `handle_timeout`
//! once its `poll_timeout` has passed. A real driver turns a node's
//! outputs into socket work (dial, send on a connection, connect to a
//! relay) and reports back what became of it. Here the network is a queue
//! that delivers every frame at once, and time is virtual: it jumps to the
//! next deadline whenever nothing else is happening. Alice and bob accept
//! no direct connections, so everything goes through the relay.

use std::collections::VecDeque;

use p2pchat_protocol::engine::{Answer, Command, CommandOutcome, Event, MemoryStore, MessageStatus, Query};
use p2pchat_protocol::node::{Node, NodeConfig, NodeInput, NodeOutput, RelaySpec, Reply, Ticket};
use p2pchat_protocol::relay::{MemoryRelayStore, Relay, RelayConfig};
use p2pchat_protocol::{IdentityKeyPair, PeerId, Timestamp};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

type Error = Box<dyn std::error::Error>;

/// Alice, bob and their relay, and the frames between them.
struct World {
    now: Timestamp,
    nodes: Vec<Node<MemoryStore>>,
    names: [&'static str; 2],
    relay: Relay<MemoryRelayStore>,
    /// Which nodes are connected to the relay (each knows it as relay 0).
    connected: [bool; 2],
    /// Frames on their way to the relay, from each node.
    to_relay: VecDeque<(usize, Vec<u8>)>,
    /// Command replies, by node and ticket.
    replies: Vec<(usize, Ticket, Reply)>,
}

impl World {
    /// Drives every machine until none has anything left to do now.
    fn settle(&mut self) -> Result<(), Error> {
        loop {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                while let Some(output) = self.nodes[i].poll_output(self.now) {
                    moved = true;
                    self.carry_out(i, output);
                }
            }
            while let Some((i, bytes)) = self.to_relay.pop_front() {
                moved = true;
                let peer = self.nodes[i].peer_id();
                self.relay.handle_frame(self.now, peer, &bytes)?;
            }
            while let Some((peer, bytes)) = self.relay.poll_transmit() {
                moved = true;
                if let Some(i) = self.nodes.iter().position(|n| n.peer_id() == peer) {
                    self.nodes[i].handle(self.now, NodeInput::RelayFrame { relay: 0, bytes });
                }
            }
            while self.relay.poll_event().is_some() {}
            if !moved {
                return Ok(());
            }
        }
    }

    /// What a driver does with a node's output.
    fn carry_out(&mut self, i: usize, output: NodeOutput) {
        match output {
            // The relay is reachable: the connection opens at once (a real
            // driver dials it, and proves the relay's peer ID by its
            // certificate).
            NodeOutput::ConnectRelay { relay, .. } => {
                self.relay.connected(self.nodes[i].peer_id());
                self.connected[i] = true;
                self.nodes[i].handle(self.now, NodeInput::RelayConnected { relay });
            }
            NodeOutput::SendToRelay { bytes, .. } if self.connected[i] => self.to_relay.push_back((i, bytes)),
            // The node gave up on the connection (its relay did not answer
            // in time): close it, and say so; it connects again later.
            NodeOutput::CloseRelay { relay } => {
                self.relay.disconnected(&self.nodes[i].peer_id());
                self.connected[i] = false;
                let reason = "closed by the node".into();
                self.nodes[i].handle(self.now, NodeInput::RelayDisconnected { relay, reason });
            }
            NodeOutput::Event(event) => show(self.names[i], &event),
            NodeOutput::Reply { ticket, reply } => self.replies.push((i, ticket, reply)),
            NodeOutput::Notice(notice) => println!("{}: notice: {notice:?}", self.names[i]),
            // No direct connections here: a dial never answers, and the
            // node's 2 s budget sends what waited for it through the relay.
            // A frame for a connection already closed is dropped, as a
            // socket would.
            NodeOutput::Dial { .. } | NodeOutput::SendDirect { .. } | NodeOutput::SendToRelay { .. } => {}
        }
    }

    /// Runs a command on node `i` and returns its outcome.
    fn command(&mut self, i: usize, ticket: u64, command: Command) -> Result<CommandOutcome, Error> {
        let ticket = Ticket(ticket);
        self.nodes[i].handle(self.now, NodeInput::Command { ticket, command });
        self.settle()?;
        let at = self.replies.iter().position(|(node, t, _)| *node == i && *t == ticket).ok_or("no reply")?;
        match self.replies.remove(at).2 {
            Reply::Command(result) => Ok(result?),
            Reply::Query(_) => Err("a query's reply to a command".into()),
        }
    }

    /// Lets virtual time run to the next deadline of any machine.
    fn next_deadline(&mut self) -> Result<(), Error> {
        let deadlines = self.nodes.iter().filter_map(Node::poll_timeout).chain(self.relay.poll_timeout());
        let Some(next) = deadlines.min() else { return Err("nothing left to wait for".into()) };
        self.now = self.now.max(next);
        for node in &mut self.nodes {
            if node.poll_timeout().is_some_and(|t| t <= self.now) {
                node.handle_timeout(self.now);
            }
        }
        if self.relay.poll_timeout().is_some_and(|t| t <= self.now) {
            self.relay.handle_timeout(self.now)?;
        }
        self.settle()
    }
}

fn show(who: &str, event: &Event) {
    match event {
        Event::MessageReceived(m) => println!("{who}: received {:?}", m.content),
        Event::MessageSent { message_id, .. } => println!("{who}: {message_id} is sent"),
        Event::MessageDelivered { message_id, .. } => println!("{who}: {message_id} is delivered"),
        _ => {}
    }
}

fn main() -> Result<(), Error> {
    let relay_peer = PeerId([0xee; 20]);
    let spec = RelaySpec { peer: relay_peer, address: format!("{relay_peer}@192.0.2.1:4433") };
    let start = Timestamp::from_millis(1_767_225_600_000);
    let mut nodes = Vec::new();
    for seed in [1u64, 2] {
        let identity = IdentityKeyPair::generate(&mut ChaCha20Rng::seed_from_u64(seed));
        let config = NodeConfig { relays: vec![spec.clone()], ..NodeConfig::default() };
        // A real embedding seeds the engine's RNG from the OS on every start.
        let rng = ChaCha20Rng::seed_from_u64(seed + 100);
        nodes.push(Node::new(identity, MemoryStore::new(), config, rng, start)?);
    }
    let mut world = World {
        now: start,
        nodes,
        names: ["alice", "bob"],
        relay: Relay::new(MemoryRelayStore::new(), RelayConfig::default())?,
        connected: [false; 2],
        to_relay: VecDeque::new(),
        replies: Vec::new(),
    };
    // Each node's first outputs connect it to its relay, where it registers
    // and publishes its record.
    world.settle()?;

    let bob = world.nodes[1].peer_id();
    let CommandOutcome::Conversation(conversation) = world.command(0, 1, Command::CreateConversation { peer: bob })?
    else {
        return Err("no conversation".into());
    };
    println!("alice: writes \"hello bob\"");
    let send = Command::SendMessage { conversation: conversation.id, content: "hello bob".into() };
    let CommandOutcome::Message(message) = world.command(0, 2, send)? else { return Err("no message".into()) };

    // The key exchange, the message and its receipt take a few round trips
    // and the dial budgets; a minute of virtual time is plenty.
    let until = start.saturating_add_millis(60_000);
    while world.now < until {
        let answer = world.nodes[0].engine_mut().query(Query::Message(message.id))?;
        if matches!(answer, Answer::Message(m) if m.status == MessageStatus::Delivered) {
            println!("done after {} virtual ms", world.now.millis_since(start));
            return Ok(());
        }
        world.next_deadline()?;
    }
    Err("the message was not delivered within a virtual minute".into())
}
