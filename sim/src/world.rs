//! One run: engines, a relay and a network in virtual time, driven by the
//! engine's rule (after every input, drain every output), with faults and
//! a workload drawn from the seed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use p2pchat_protocol::engine::{
    Answer, Command, CommandOutcome, ConversationKind, Engine, EngineConfig, Event, Input, Message, Query, Store,
    Transmit, TransmitId, TransmitOutcome,
};
use p2pchat_protocol::keys::IdentitySeed;
use p2pchat_protocol::relay::{
    ClientAction, MemoryRelayStore, PublishRefusal, Relay, RelayClient, RelayConfig, RelayFrame,
};
use p2pchat_protocol::wire::{Envelope, EnvelopeBody, GroupMessage};
use p2pchat_protocol::{ConversationId, GroupSession, IdentityKeyPair, MessageId, PairwiseSessions, PeerId, Timestamp};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use crate::checker::{Checker, Violation};
use crate::knobs::Knobs;
use crate::rng::{stream, SimRng};
use crate::store::{Bug, SimStore};
use crate::trace::{digest, envelope_kind, frame_kind, Step, Trace};

/// Virtual time at the start of every run.
pub const START: Timestamp = Timestamp::from_millis(1_767_225_600_000);
/// How long the network is left to settle after it heals.
const SETTLE_MS: u64 = 20 * 60 * 1000;
/// The relay, where a node index is expected.
const RELAY: usize = usize::MAX;
/// A run that takes more steps than this is stuck in a loop.
const MAX_STEPS: u64 = 3_000_000;
/// Bounded state is checked every this many steps (and at the end).
const BOUNDS_EVERY: u64 = 2_000;
/// The stale-restart bug keeps a copy of the store every this many calls.
const STALE_EVERY: u64 = 5;
/// How long records published to the relay stay valid.
const RECORD_LIFETIME_MS: u64 = 24 * 60 * 60 * 1000;

/// What the queue holds.
enum Ev {
    /// A direct datagram arrives; `transmit` is set on the original copy
    /// (not a duplicate), whose sender learns the outcome.
    Datagram { from: usize, to: usize, bytes: Vec<u8>, transmit: Option<(u32, TransmitId)> },
    /// A transmit's outcome reaches its sender (if still the same process).
    Result { node: usize, incarnation: u32, id: TransmitId, outcome: TransmitOutcome },
    /// A directory answer reaches a node.
    Lookup { node: usize, incarnation: u32, input: Input },
    /// A frame on a node's relay connection `conn` reaches the relay.
    ToRelay { from: usize, conn: u64, bytes: Vec<u8> },
    /// A frame from the relay reaches a node on connection `conn`.
    FromRelay { to: usize, conn: u64, bytes: Vec<u8> },
    /// The next API operation.
    Operation,
    /// A fault starts or ends.
    Fault(Fault),
    /// The crash planned for this node happens now if no call triggered it.
    CrashNow(usize),
    /// A node's user accepts a group invitation shown to it.
    Accept { node: usize, group: ConversationId },
    /// The workload is over: everything heals.
    Heal,
}

#[derive(Clone, Debug)]
enum Fault {
    Offline(usize),
    Online(usize),
    Partition(Vec<bool>),
    EndPartition,
    Crash(usize),
    Restarted(usize),
    RelayDown,
    RelayUp,
}

struct Node {
    identity_seed: [u8; 32],
    peer: PeerId,
    engine: Engine<SimStore>,
    skew_ms: i64,
    direct: bool,
    /// The process runs.
    up: bool,
    /// The network reaches it.
    online: bool,
    incarnation: u32,
    relay_conn: Option<u64>,
    client: RelayClient,
    crash_pending: bool,
    /// Engine calls so far (for the stale-restart bug's snapshots).
    calls: u64,
    /// Direct reachability last told to the engine, per peer.
    told: Vec<bool>,
    /// Messages received, for mark-read operations.
    inbox: Vec<MessageId>,
    conversations: BTreeSet<ConversationId>,
}

/// A group as the workload believes it is (the engines are the truth).
struct SimGroup {
    id: ConversationId,
    admin: usize,
    members: BTreeSet<usize>,
}

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// A deliberately wrong behaviour, to show the checker catches it.
    pub bug: Bug,
    /// Fixed knobs instead of drawn ones (the benchmark's profile).
    pub knobs: Option<Knobs>,
    /// Measure the time spent inside the protocol's calls.
    pub profile: bool,
    /// How many of the last steps a failure report shows
    /// ([`TRACE_TAIL`](crate::TRACE_TAIL) when zero).
    pub tail: usize,
}

/// A broken invariant with what led to it.
#[derive(Clone, Debug)]
pub struct Failure {
    /// What broke.
    pub violation: String,
    /// Virtual milliseconds into the run.
    pub at_ms: u64,
    /// The last steps before it, readable.
    pub tail: Vec<String>,
}

/// The outcome of one run.
#[derive(Clone, Debug)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Its fault knobs.
    pub knobs: Knobs,
    /// The hash of the whole trace: equal seeds give equal hashes.
    pub trace_hash: u64,
    /// Steps in the trace.
    pub steps: u64,
    /// Messages accepted by the nodes' APIs.
    pub accepted: usize,
    /// Messages stored by recipients.
    pub deliveries: u64,
    /// Accepted messages that ended failed (with a reason).
    pub failed: usize,
    /// DH ratchet steps seen on the wire.
    pub dh_steps: u64,
    /// Virtual time the run covered.
    pub virtual_ms: u64,
    /// Wall time inside protocol calls (engines, relay, relay clients), when profiled.
    pub protocol_time: Duration,
    /// Wall time of the whole run.
    pub total_time: Duration,
    /// The broken invariant, if one broke.
    pub failure: Option<Failure>,
}

/// The world of one run.
pub(crate) struct World {
    seed: u64,
    knobs: Knobs,
    options: Options,
    now: Timestamp,
    queue: BTreeMap<(Timestamp, u64), Ev>,
    next_seq: u64,
    nodes: Vec<Node>,
    relay: Relay<MemoryRelayStore>,
    relay_up: bool,
    /// Which side of the current partition each node is on (the relay is on
    /// side `false`); empty when there is none.
    partition: Vec<bool>,
    next_conn: u64,
    healed: bool,
    net: SimRng,
    faults: SimRng,
    work: SimRng,
    keys: SimRng,
    checker: Checker,
    trace: Trace,
    groups: Vec<SimGroup>,
    operations_left: u32,
    failure: Option<Failure>,
    next_bounds_check: u64,
    /// Group messages put on the wire during the current step.
    fresh_group_messages: Vec<GroupMessage>,
    protocol_time: Duration,
    /// Snapshots of each node's committed store, for the stale-restart bug.
    snapshots: Vec<Option<SimStore>>,
}

impl World {
    /// Builds the run for `seed`.
    pub(crate) fn new(seed: u64, options: Options) -> Self {
        let knobs = options.knobs.clone().unwrap_or_else(|| Knobs::draw(&mut SimRng::new(seed, stream::KNOBS)));
        let mut keys = SimRng::new(seed, stream::KEYS);
        let mut faults = SimRng::new(seed, stream::FAULTS);
        let mut nodes = Vec::with_capacity(knobs.nodes);
        for i in 0..knobs.nodes {
            let identity_seed = keys.bytes32();
            let identity = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(identity_seed));
            let peer = identity.peer_id();
            let store = SimStore::new(options.bug, peer);
            let rng = ChaCha20Rng::from_seed(keys.bytes32());
            let skew_ms = faults.range(0, 2 * knobs.max_skew_ms) as i64 - knobs.max_skew_ms as i64;
            let node_now = Timestamp::from_millis((START.as_millis() as i64 + skew_ms) as u64);
            // An in-memory store cannot fail, so neither can the first start.
            let engine = match Engine::new(identity, store, EngineConfig::default(), rng, node_now) {
                Ok(engine) => engine,
                Err(e) => unreachable!("a fresh engine on an empty in-memory store failed: {e}"),
            };
            nodes.push(Node {
                identity_seed,
                peer,
                engine,
                skew_ms,
                direct: i >= knobs.relay_only,
                up: true,
                online: true,
                incarnation: 0,
                relay_conn: None,
                client: RelayClient::new(),
                crash_pending: false,
                calls: 0,
                told: vec![false; knobs.nodes],
                inbox: Vec::new(),
                conversations: BTreeSet::new(),
            });
        }
        let relay = match Relay::new(MemoryRelayStore::new(), RelayConfig::default()) {
            Ok(relay) => relay,
            Err(e) => unreachable!("a relay on an empty in-memory store failed: {e}"),
        };
        let snapshots = (0..knobs.nodes).map(|_| None).collect();
        let operations_left = knobs.operations;
        let peers = nodes.iter().map(|n| n.peer).collect();
        let keep = if options.tail == 0 { crate::TRACE_TAIL } else { options.tail };
        let mut world = Self {
            seed,
            knobs,
            options,
            now: START,
            queue: BTreeMap::new(),
            next_seq: 0,
            nodes,
            relay,
            relay_up: true,
            partition: Vec::new(),
            next_conn: 0,
            healed: false,
            net: SimRng::new(seed, stream::NETWORK),
            faults,
            work: SimRng::new(seed, stream::WORKLOAD),
            keys,
            checker: Checker::new(peers),
            trace: Trace::new(keep),
            groups: Vec::new(),
            operations_left,
            failure: None,
            next_bounds_check: BOUNDS_EVERY,
            fresh_group_messages: Vec::new(),
            protocol_time: Duration::ZERO,
            snapshots,
        };
        world.schedule_faults();
        world.schedule(0, Ev::Operation);
        world
    }

    /// Runs to the end (or the first broken invariant) and reports.
    pub(crate) fn run(mut self) -> Report {
        let started = Instant::now();
        self.refresh();
        let settle_until = |w: &Self| w.healed.then(|| w.now.saturating_add_millis(SETTLE_MS));
        let mut deadline: Option<Timestamp> = None;
        while self.failure.is_none() {
            if deadline.is_none() {
                deadline = settle_until(&self);
            }
            for message in std::mem::take(&mut self.fresh_group_messages) {
                let result = self.check_opened_by_anyone(&message);
                self.check(result);
            }
            if self.failure.is_some() {
                break;
            }
            let Some((at, what)) = self.next_step() else { break };
            if deadline.is_some_and(|d| at > d) {
                break;
            }
            self.now = self.now.max(at);
            if self.trace.steps() >= MAX_STEPS {
                self.fail(format!("the run did not settle within {MAX_STEPS} steps"));
                break;
            }
            if self.trace.steps() >= self.next_bounds_check {
                self.next_bounds_check = self.trace.steps() + BOUNDS_EVERY;
                if let Err(v) = self.check_bounds() {
                    self.fail(v.0);
                    break;
                }
            }
            match what {
                Next::Queued(key) => {
                    if let Some(ev) = self.queue.remove(&key) {
                        self.handle(ev);
                    }
                }
                Next::EngineTimeout(i) => {
                    self.trace(Step::Timeout { node: i });
                    let now = self.node_now(i);
                    let result = self.timed(|w| w.nodes[i].engine.handle(now, Input::Timeout));
                    self.after_call(i, result.map(|_| ()));
                    // A deadline a timeout does not move would spin for ever.
                    let stuck = self.nodes[i].up && self.nodes[i].engine.poll_timeout().is_some_and(|t| t <= now);
                    if stuck && self.failure.is_none() {
                        self.fail(format!("n{i}'s deadline did not move past its timeout"));
                    }
                }
                Next::RelayTimeout => {
                    self.trace(Step::Timeout { node: RELAY });
                    let now = self.now;
                    let result = self.timed(|w| w.relay.handle_timeout(now));
                    if let Err(e) = result {
                        self.fail(format!("the relay failed: {e}"));
                    }
                    self.drain_relay();
                }
            }
        }
        if self.failure.is_none() {
            if let Err(v) = self.final_checks() {
                self.fail(v.0);
            }
        }
        let failed = self.count_failed();
        Report {
            seed: self.seed,
            knobs: self.knobs.clone(),
            trace_hash: self.trace.hash(),
            steps: self.trace.steps(),
            accepted: self.checker.accepted(),
            deliveries: self.checker.deliveries(),
            failed,
            dh_steps: self.checker.dh_steps(),
            virtual_ms: self.now.millis_since(START),
            protocol_time: self.protocol_time,
            total_time: started.elapsed(),
            failure: self.failure,
        }
    }

    // ---- time and scheduling ----

    fn node_now(&self, i: usize) -> Timestamp {
        Timestamp::from_millis((self.now.as_millis() as i64 + self.nodes[i].skew_ms) as u64)
    }

    fn schedule(&mut self, after_ms: u64, ev: Ev) {
        self.next_seq += 1;
        self.queue.insert((self.now.saturating_add_millis(after_ms), self.next_seq), ev);
    }

    fn next_step(&self) -> Option<(Timestamp, Next)> {
        let mut best = self.queue.keys().next().map(|&(at, seq)| (at, Next::Queued((at, seq))));
        let mut consider = |at: Timestamp, next: Next| {
            if best.as_ref().is_none_or(|(b, _)| at < *b) {
                best = Some((at, next));
            }
        };
        for (i, node) in self.nodes.iter().enumerate() {
            if let (true, Some(deadline)) = (node.up, node.engine.poll_timeout()) {
                let global = (deadline.as_millis() as i64 - node.skew_ms).max(0) as u64;
                consider(Timestamp::from_millis(global).max(self.now), Next::EngineTimeout(i));
            }
        }
        if let Some(deadline) = self.relay.poll_timeout() {
            consider(deadline.max(self.now), Next::RelayTimeout);
        }
        best
    }

    fn latency(&mut self) -> u64 {
        let base = self.knobs.latency_ms + self.net.range(0, self.knobs.jitter_ms);
        // A long tail: now and then a datagram takes much longer.
        if self.net.chance(20_000) {
            base + self.net.range(0, 20 * (self.knobs.jitter_ms + self.knobs.latency_ms))
        } else {
            base
        }
    }

    fn timed<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        if !self.options.profile {
            return f(self);
        }
        let started = Instant::now();
        let out = f(self);
        self.protocol_time += started.elapsed();
        out
    }

    fn trace(&mut self, step: Step) {
        let at = self.now.millis_since(START);
        self.trace.push(at, step);
    }

    fn fail(&mut self, violation: String) {
        if self.failure.is_some() {
            return;
        }
        let tail = self.trace.tail().map(ToString::to_string).collect();
        self.failure = Some(Failure { violation, at_ms: self.now.millis_since(START), tail });
    }

    fn check(&mut self, result: Result<(), Violation>) {
        if let Err(v) = result {
            self.fail(v.0);
        }
    }

    // ---- faults ----

    fn schedule_faults(&mut self) {
        let span = self.knobs.operation_gap_ms * u64::from(self.knobs.operations);
        let n = self.knobs.nodes;
        for _ in 0..self.knobs.partitions {
            let at = self.faults.range(0, span);
            let side: Vec<bool> = (0..n).map(|_| self.faults.range(0, 1) == 1).collect();
            let length = self.faults.range(1_000, 120_000);
            self.schedule(at, Ev::Fault(Fault::Partition(side)));
            self.schedule(at + length, Ev::Fault(Fault::EndPartition));
        }
        for _ in 0..self.knobs.offline_spells {
            let at = self.faults.range(0, span);
            let node = self.faults.index(n);
            let length = self.faults.range(1_000, 180_000);
            self.schedule(at, Ev::Fault(Fault::Offline(node)));
            self.schedule(at + length, Ev::Fault(Fault::Online(node)));
        }
        for _ in 0..self.knobs.crashes {
            let at = self.faults.range(0, span);
            let node = self.faults.index(n);
            self.schedule(at, Ev::Fault(Fault::Crash(node)));
        }
        for _ in 0..self.knobs.relay_outages {
            let at = self.faults.range(0, span);
            let length = self.faults.range(1_000, 120_000);
            self.schedule(at, Ev::Fault(Fault::RelayDown));
            self.schedule(at + length, Ev::Fault(Fault::RelayUp));
        }
    }

    fn fault(&mut self, fault: Fault) {
        if self.healed && !matches!(fault, Fault::Restarted(_)) {
            return;
        }
        self.trace(Step::Fault(format!("{fault:?}")));
        match fault {
            Fault::Offline(i) => self.nodes[i].online = false,
            Fault::Online(i) => self.nodes[i].online = true,
            Fault::Partition(side) => self.partition = side,
            Fault::EndPartition => self.partition.clear(),
            Fault::Crash(i) => {
                // The crash strikes during the node's next call, after its
                // commit and before its outputs leave, or soon regardless.
                self.nodes[i].crash_pending = true;
                let soon = self.faults.range(0, 10_000);
                self.schedule(soon, Ev::CrashNow(i));
            }
            Fault::Restarted(i) => {
                self.nodes[i].up = true;
                // Connections first, then whatever the engine queued while
                // starting leaves over them.
                self.refresh();
                self.drain(i);
                // The user's page, reloaded, lists the invitations still
                // waiting (their events may have died with the process).
                if let Ok(Answer::Invitations(waiting)) = self.nodes[i].engine.query(Query::Invitations) {
                    for invitation in waiting {
                        let after = self.work.range(0, 10_000);
                        self.schedule(after, Ev::Accept { node: i, group: invitation.group_id });
                    }
                }
            }
            Fault::RelayDown => self.relay_up = false,
            Fault::RelayUp => self.relay_up = true,
        }
        self.refresh();
    }

    fn heal(&mut self) {
        self.trace(Step::Fault("heal".into()));
        self.healed = true;
        self.knobs.loss_ppm = 0;
        self.knobs.duplicate_ppm = 0;
        self.partition.clear();
        self.relay_up = true;
        for node in &mut self.nodes {
            node.online = true;
        }
        self.refresh();
    }

    /// Same side of the partition (the relay is on side `false`).
    fn together(&self, a: usize, b: usize) -> bool {
        let side = |i: usize| if i == RELAY { false } else { self.partition.get(i).copied().unwrap_or(false) };
        side(a) == side(b)
    }

    fn direct(&self, a: usize, b: usize) -> bool {
        let ok = |i: usize| self.nodes[i].up && self.nodes[i].online && self.nodes[i].direct;
        a != b && ok(a) && ok(b) && self.together(a, b)
    }

    fn relay_reachable(&self, i: usize) -> bool {
        self.relay_up && self.nodes[i].up && self.nodes[i].online && self.together(i, RELAY)
    }

    /// Brings connections and the engines' reachability in line with the
    /// network as it now is.
    fn refresh(&mut self) {
        for i in 0..self.nodes.len() {
            let want = self.relay_reachable(i);
            match (want, self.nodes[i].relay_conn) {
                (true, None) => self.connect_relay(i),
                (false, Some(_)) => self.disconnect_relay(i),
                _ => {}
            }
        }
        for i in 0..self.nodes.len() {
            if !self.nodes[i].up {
                continue;
            }
            for j in 0..self.nodes.len() {
                let reach = self.direct(i, j);
                if reach == self.nodes[i].told[j] || i == j {
                    continue;
                }
                self.nodes[i].told[j] = reach;
                let peer = self.nodes[j].peer;
                let input = if reach { Input::PeerReachable(peer) } else { Input::PeerUnreachable(peer) };
                self.call(i, input);
            }
        }
    }

    fn connect_relay(&mut self, i: usize) {
        self.next_conn += 1;
        let conn = self.next_conn;
        self.nodes[i].relay_conn = Some(conn);
        let peer = self.nodes[i].peer;
        let now = self.node_now(i);
        let identity = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(self.nodes[i].identity_seed));
        let direct = if self.nodes[i].direct { vec![format!("10.0.0.{i}:4433")] } else { Vec::new() };
        let frames = self.timed(|w| {
            w.relay.connected(peer);
            let client = &mut w.nodes[i].client;
            match client.publish(&identity, direct, vec!["relay.sim:4433".into()], now, RECORD_LIFETIME_MS) {
                RelayFrame::Publish(record) => client.on_connect(record),
                _ => Vec::new(),
            }
        });
        for frame in frames {
            self.send_to_relay(i, &frame);
        }
    }

    fn disconnect_relay(&mut self, i: usize) {
        self.nodes[i].relay_conn = None;
        let peer = self.nodes[i].peer;
        let inputs = self.timed(|w| {
            w.relay.disconnected(&peer);
            w.nodes[i].client.on_disconnect()
        });
        if self.nodes[i].up {
            for input in inputs {
                self.call(i, input);
            }
        }
    }

    fn crash(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.crash_pending = false;
        if !node.up {
            return;
        }
        self.trace(Step::Fault(format!("n{i} crashed")));
        self.checker.on_crash(i);
        let store = match (self.options.bug, self.snapshots[i].take()) {
            (Bug::StaleRestart, Some(old)) => old,
            _ => self.nodes[i].engine.store().crash_copy(),
        };
        let node = &mut self.nodes[i];
        node.up = false;
        node.incarnation += 1;
        node.told = vec![false; self.knobs.nodes];
        let identity = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(node.identity_seed));
        let rng = ChaCha20Rng::from_seed(self.keys.bytes32());
        let now = self.node_now(i);
        match self.timed(|_| Engine::new(identity, store, EngineConfig::default(), rng, now)) {
            Ok(engine) => self.nodes[i].engine = engine,
            Err(e) => return self.fail(format!("n{i} did not restart from its store: {e}")),
        }
        // Its relay connection died with it.
        if self.nodes[i].relay_conn.take().is_some() {
            let peer = self.nodes[i].peer;
            self.timed(|w| w.relay.disconnected(&peer));
        }
        self.nodes[i].client = RelayClient::new();
        let down_for = self.faults.range(100, 5_000);
        self.schedule(down_for, Ev::Fault(Fault::Restarted(i)));
        self.refresh();
    }

    // ---- the driving rule ----

    fn call(&mut self, i: usize, input: Input) {
        // A node that crashed during an earlier input of the same batch
        // takes no more of it: those inputs died with the process.
        if !self.nodes[i].up {
            return;
        }
        let now = self.node_now(i);
        let result = self.timed(|w| w.nodes[i].engine.handle(now, input));
        self.after_call(i, result);
    }

    /// After a call: crash now if planned, else release every output.
    fn after_call(&mut self, i: usize, result: Result<(), p2pchat_protocol::engine::EngineError>) {
        if let Err(e) = result {
            return self.fail(format!("n{i}'s engine failed: {e}"));
        }
        // The planted bug restarts from a copy a few calls old, as if the
        // last commits had not been durable.
        if self.options.bug == Bug::StaleRestart {
            self.nodes[i].calls += 1;
            if self.nodes[i].calls.is_multiple_of(STALE_EVERY) {
                self.snapshots[i] = Some(self.nodes[i].engine.store().crash_copy());
            }
        }
        if self.nodes[i].crash_pending {
            return self.crash(i);
        }
        self.drain(i);
    }

    fn drain(&mut self, i: usize) {
        while let Some(event) = self.timed(|w| w.nodes[i].engine.poll_event()) {
            self.on_event(i, event);
        }
        while let Some(peer) = self.timed(|w| w.nodes[i].engine.poll_lookup()) {
            let j = self.index(&peer);
            let incarnation = self.nodes[i].incarnation;
            if j.is_some_and(|j| self.direct(i, j)) {
                self.schedule(0, Ev::Lookup { node: i, incarnation, input: Input::PeerRecord(peer) });
            } else if self.nodes[i].relay_conn.is_some() {
                let frame = self.timed(|w| w.nodes[i].client.lookup(peer));
                self.send_to_relay(i, &frame);
            } else {
                self.schedule(0, Ev::Lookup { node: i, incarnation, input: Input::LookupFailed(peer) });
            }
        }
        while let Some(transmit) = self.timed(|w| w.nodes[i].engine.poll_transmit()) {
            self.route(i, transmit);
        }
    }

    fn on_event(&mut self, i: usize, event: Event) {
        let about = match &event {
            Event::MessageReceived(m) | Event::MessageCreated(m) | Event::MessageUpdated(m) => m.id.to_string(),
            Event::MessageSent { message_id, .. }
            | Event::MessageDelivered { message_id, .. }
            | Event::MessageRead { message_id, .. }
            | Event::MessageFailed { message_id, .. } => message_id.to_string(),
            Event::SecurityRejected { reason, .. } => reason.clone(),
            _ => String::new(),
        };
        self.trace(Step::Event { node: i, kind: event.kind(), about });
        match &event {
            Event::MessageReceived(m) => {
                self.nodes[i].inbox.push(m.id);
                self.nodes[i].conversations.insert(m.conversation_id);
            }
            Event::GroupInvite { conversation_id, pending: true, .. } => {
                // The user reads the invitation and accepts it, soon.
                let after = self.work.range(0, 10_000);
                self.schedule(after, Ev::Accept { node: i, group: *conversation_id });
            }
            Event::GroupInvite { conversation_id, pending: false, .. } => {
                if let Some(g) = self.groups.iter_mut().find(|g| g.id == *conversation_id) {
                    g.members.insert(i);
                }
            }
            _ => {}
        }
        if let Event::MessageDelivered { message_id, .. } | Event::MessageRead { message_id, .. } = &event {
            for r in self.checker.unannounced(message_id) {
                if let Some(m) = self.stored_message(r, message_id) {
                    let result = self.checker.on_stored(r, &m);
                    self.check(result);
                }
            }
        }
        let result = self.checker.on_event(i, &event);
        self.check(result);
    }

    /// A message as node `i`'s store holds it (outside any call).
    fn stored_message(&mut self, i: usize, id: &MessageId) -> Option<Message> {
        let store = self.nodes[i].engine.store_mut();
        store.begin().ok()?;
        let message = store.message(id).ok().flatten();
        store.rollback();
        message
    }

    fn index(&self, peer: &PeerId) -> Option<usize> {
        self.nodes.iter().position(|n| n.peer == *peer)
    }

    /// Direct first, the relay as the fallback.
    fn route(&mut self, i: usize, transmit: Transmit) {
        let result = self.checker.on_envelope(&transmit.bytes);
        self.check(result);
        if let Ok(Envelope { body: EnvelopeBody::Group(message) }) = Envelope::decode(&transmit.bytes) {
            // Checked once the step is over, when its sender's API has
            // accepted the message.
            self.fresh_group_messages.push(message);
        }
        let incarnation = self.nodes[i].incarnation;
        let Some(j) = self.index(&transmit.peer) else {
            let outcome = TransmitOutcome::Failed("unknown peer".into());
            return self.schedule(0, Ev::Result { node: i, incarnation, id: transmit.id, outcome });
        };
        if self.direct(i, j) {
            if self.net.chance(self.knobs.loss_ppm) {
                self.trace(Step::Drop { from: i, to: j, why: "lost" });
                let timeout = 3 * (self.knobs.latency_ms + self.knobs.jitter_ms) + 10;
                let outcome = TransmitOutcome::Failed("no acknowledgement from the peer".into());
                return self.schedule(timeout, Ev::Result { node: i, incarnation, id: transmit.id, outcome });
            }
            if self.net.chance(self.knobs.duplicate_ppm) {
                let later = self.latency();
                let bytes = transmit.bytes.clone();
                self.schedule(later, Ev::Datagram { from: i, to: j, bytes, transmit: None });
            }
            let after = self.latency();
            let ev = Ev::Datagram { from: i, to: j, bytes: transmit.bytes, transmit: Some((incarnation, transmit.id)) };
            return self.schedule(after, ev);
        }
        if self.nodes[i].relay_conn.is_some() {
            let frame = self.timed(|w| w.nodes[i].client.forward(transmit));
            return self.send_to_relay(i, &frame);
        }
        let outcome = TransmitOutcome::Failed("no path to the peer".into());
        self.schedule(0, Ev::Result { node: i, incarnation, id: transmit.id, outcome });
    }

    fn send_to_relay(&mut self, i: usize, frame: &RelayFrame) {
        if let Some(conn) = self.nodes[i].relay_conn {
            let bytes = frame.encode();
            // One ordered stream per connection: a constant latency keeps order.
            let after = self.knobs.relay_latency_ms;
            self.schedule(after, Ev::ToRelay { from: i, conn, bytes });
        }
    }

    fn drain_relay(&mut self) {
        while self.timed(|w| w.relay.poll_event()).is_some() {}
        while let Some((peer, bytes)) = self.timed(|w| w.relay.poll_transmit()) {
            let Some(j) = self.index(&peer) else { continue };
            if let Some(conn) = self.nodes[j].relay_conn {
                let after = self.knobs.relay_latency_ms;
                self.schedule(after, Ev::FromRelay { to: j, conn, bytes });
            }
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Datagram { from, to, bytes, transmit } => self.datagram(from, to, bytes, transmit),
            Ev::Result { node, incarnation, id, outcome } => {
                if self.nodes[node].up && self.nodes[node].incarnation == incarnation {
                    self.trace(Step::Result { node, outcome: format!("{outcome:?}") });
                    self.call(node, Input::TransmitResult { id, outcome });
                }
            }
            Ev::Lookup { node, incarnation, input } => {
                if self.nodes[node].up && self.nodes[node].incarnation == incarnation {
                    self.call(node, input);
                }
            }
            Ev::ToRelay { from, conn, bytes } => {
                if self.nodes[from].relay_conn != Some(conn) {
                    return;
                }
                self.trace(Step::Arrive {
                    from,
                    to: RELAY,
                    what: frame_kind(&bytes),
                    len: bytes.len(),
                    digest: digest(&bytes),
                });
                let (now, peer) = (self.now, self.nodes[from].peer);
                if let Err(e) = self.timed(|w| w.relay.handle_frame(now, peer, &bytes)) {
                    return self.fail(format!("the relay failed: {e}"));
                }
                self.drain_relay();
            }
            Ev::FromRelay { to, conn, bytes } => self.frame_from_relay(to, conn, &bytes),
            Ev::Operation => {
                self.operation();
                if self.operations_left > 0 {
                    self.operations_left -= 1;
                    let gap = self.work.range(0, 2 * self.knobs.operation_gap_ms);
                    self.schedule(gap, Ev::Operation);
                } else {
                    // Time for in-flight faults to play out, then heal.
                    self.schedule(1_000, Ev::Heal);
                }
            }
            Ev::Fault(fault) => self.fault(fault),
            Ev::CrashNow(i) => {
                if self.nodes[i].crash_pending {
                    self.crash(i);
                }
            }
            Ev::Accept { node, group } => {
                // Answered already (a restarted node's page lists it again).
                self.command(node, Command::AcceptInvitation { group });
            }
            Ev::Heal => self.heal(),
        }
    }

    fn datagram(&mut self, from: usize, to: usize, bytes: Vec<u8>, transmit: Option<(u32, TransmitId)>) {
        let back = self.latency();
        if !self.direct(from, to) {
            self.trace(Step::Drop { from, to, why: "no path on arrival" });
            if let Some((incarnation, id)) = transmit {
                let outcome = TransmitOutcome::Failed("the connection to the peer closed".into());
                self.schedule(back, Ev::Result { node: from, incarnation, id, outcome });
            }
            return;
        }
        self.trace(Step::Arrive { from, to, what: envelope_kind(&bytes), len: bytes.len(), digest: digest(&bytes) });
        let peer = self.nodes[from].peer;
        // The transport acknowledges on arrival, whatever the application
        // then does with it (a crash may follow); the acknowledgement itself
        // can be lost, and then the sender believes the datagram was.
        if let Some((incarnation, id)) = transmit {
            let outcome = if self.net.chance(self.knobs.loss_ppm / 2) {
                TransmitOutcome::Failed("no acknowledgement from the peer".into())
            } else {
                TransmitOutcome::Delivered
            };
            self.schedule(back, Ev::Result { node: from, incarnation, id, outcome });
        }
        self.call(to, Input::Received { from: peer, bytes });
    }

    fn frame_from_relay(&mut self, i: usize, conn: u64, bytes: &[u8]) {
        if self.nodes[i].relay_conn != Some(conn) || !self.nodes[i].up {
            return;
        }
        self.trace(Step::Arrive {
            from: RELAY,
            to: i,
            what: frame_kind(bytes),
            len: bytes.len(),
            digest: digest(bytes),
        });
        let now = self.node_now(i);
        let actions = match self.timed(|w| w.nodes[i].client.on_frame(now, bytes)) {
            Ok(actions) => actions,
            Err(e) => return self.fail(format!("n{i} could not read the relay's frame: {e}")),
        };
        let incarnation = self.nodes[i].incarnation;
        for action in actions {
            // A crash during the engine's call ends this connection's work.
            if self.nodes[i].incarnation != incarnation || self.failure.is_some() {
                return;
            }
            match action {
                ClientAction::ToEngine(input) => self.call(i, input),
                ClientAction::AfterEngine(frame) => self.send_to_relay(i, &frame),
                ClientAction::Record(_) | ClientAction::Published { .. } => {}
                ClientAction::PublishRefused { reason, .. } => {
                    if reason != PublishRefusal::Rate {
                        return self.fail(format!("n{i}'s record was refused: {}", reason.as_str()));
                    }
                }
            }
        }
    }

    // ---- the workload ----

    fn operation(&mut self) {
        let up: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.nodes[i].up).collect();
        if up.is_empty() {
            return;
        }
        let i = up[self.work.index(up.len())];
        let n = self.nodes.len();
        let roll = self.work.range(0, 99);
        match roll {
            0..=39 => {
                let j = (i + 1 + self.work.index(n - 1)) % n;
                let peer = self.nodes[j].peer;
                if let Some(CommandOutcome::Conversation(c)) = self.command(i, Command::CreateConversation { peer }) {
                    self.nodes[i].conversations.insert(c.id);
                    let content = format!("m{} n{i}->n{j}", self.operations_left);
                    if let Some(CommandOutcome::Message(m)) =
                        self.command(i, Command::SendMessage { conversation: c.id, content })
                    {
                        self.checker.on_accepted(i, &m, vec![j]);
                    }
                }
            }
            40..=64 => {
                let mine: Vec<ConversationId> =
                    self.groups.iter().filter(|g| g.members.contains(&i)).map(|g| g.id).collect();
                if mine.is_empty() {
                    return;
                }
                let group = mine[self.work.index(mine.len())];
                let content = format!("g{} n{i}", self.operations_left);
                if let Some(CommandOutcome::Message(m)) = self.command(i, Command::SendGroupMessage { group, content })
                {
                    let recipients = self.recipients(&m);
                    self.checker.on_accepted(i, &m, recipients);
                }
            }
            65..=74 => {
                let inbox = &self.nodes[i].inbox;
                if inbox.is_empty() {
                    return;
                }
                let message = inbox[self.work.index(inbox.len())];
                self.command(i, Command::MarkMessageRead { message });
            }
            75..=79 => {
                let conversations: Vec<ConversationId> = self.nodes[i].conversations.iter().copied().collect();
                if conversations.is_empty() {
                    return;
                }
                let conversation = conversations[self.work.index(conversations.len())];
                self.command(i, Command::MarkConversationRead { conversation });
            }
            80..=86 => {
                let size = self.work.range(2, (n as u64 - 1).min(4)) as usize;
                let mut others: Vec<usize> = (0..n).filter(|&j| j != i).collect();
                while others.len() > size {
                    let k = self.work.index(others.len());
                    others.remove(k);
                }
                let members = others.iter().map(|&j| self.nodes[j].peer).collect();
                let name = format!("group {}", self.groups.len());
                if let Some(CommandOutcome::Conversation(c)) = self.command(i, Command::CreateGroup { name, members }) {
                    let mut all: BTreeSet<usize> = others.into_iter().collect();
                    all.insert(i);
                    self.groups.push(SimGroup { id: c.id, admin: i, members: all });
                }
            }
            87..=91 => {
                let mine: Vec<usize> = (0..self.groups.len()).filter(|&k| self.groups[k].admin == i).collect();
                if mine.is_empty() {
                    return;
                }
                let g = &self.groups[mine[self.work.index(mine.len())]];
                let outside: Vec<usize> = (0..n).filter(|j| !g.members.contains(j)).collect();
                if outside.is_empty() {
                    return;
                }
                let (group, j) = (g.id, outside[self.work.index(outside.len())]);
                let peer = self.nodes[j].peer;
                self.command(i, Command::Invite { group, peer });
            }
            92..=95 => {
                let mine: Vec<ConversationId> =
                    self.groups.iter().filter(|g| g.members.contains(&i) && g.admin != i).map(|g| g.id).collect();
                if mine.is_empty() {
                    return;
                }
                let group = mine[self.work.index(mine.len())];
                if self.command(i, Command::Leave { group }).is_some() {
                    self.checker.on_left(i, group);
                    if let Some(g) = self.groups.iter_mut().find(|g| g.id == group) {
                        g.members.remove(&i);
                    }
                }
            }
            _ => {
                let j = (i + 1 + self.work.index(n - 1)) % n;
                let peer = self.nodes[j].peer;
                self.command(i, Command::InitiateKeyExchange { peer });
            }
        }
    }

    fn recipients(&self, message: &Message) -> Vec<usize> {
        message.recipients.iter().filter_map(|(peer, _)| self.index(peer)).collect()
    }

    /// An API command; `None` if the node refused it (a clear error is
    /// fine: the workload asks for things that may not be allowed).
    fn command(&mut self, i: usize, command: Command) -> Option<CommandOutcome> {
        // An operation of several commands may have crashed the node.
        if !self.nodes[i].up {
            return None;
        }
        let what = format!("{command:?}");
        let what = what.chars().take(120).collect::<String>();
        let now = self.node_now(i);
        let result = self.timed(|w| w.nodes[i].engine.command(now, command));
        let shown = match &result {
            Ok(CommandOutcome::Message(m)) => format!("message {}", m.id),
            Ok(CommandOutcome::Conversation(c)) => format!("conversation {}", c.id),
            Ok(CommandOutcome::Done) => "done".into(),
            Err(e) => format!("refused: {e}"),
        };
        self.trace(Step::Command { node: i, what, result: shown });
        match result {
            Ok(outcome) => {
                self.after_call(i, Ok(()));
                Some(outcome)
            }
            Err(p2pchat_protocol::engine::EngineError::Store(e)) => {
                self.fail(format!("n{i}'s store failed: {e}"));
                None
            }
            Err(_) => {
                self.after_call(i, Ok(()));
                None
            }
        }
    }

    // ---- the end ----

    fn count_failed(&mut self) -> usize {
        let mut failed = 0;
        for node in &mut self.nodes {
            let store = node.engine.store_mut();
            if store.begin().is_err() {
                continue;
            }
            let me = node.peer;
            if let Ok(conversations) = store.conversations() {
                for c in conversations {
                    if let Ok(messages) = store.messages(&c.id) {
                        failed += messages
                            .iter()
                            .filter(|m| m.sender == me && m.status == p2pchat_protocol::engine::MessageStatus::Failed)
                            .count();
                    }
                }
            }
            store.rollback();
        }
        failed
    }

    /// Quiescence: the checker's final rules, and bounded state everywhere.
    fn final_checks(&mut self) -> Result<(), Violation> {
        self.check_confidentiality()?;
        let stores = self.check_bounds()?;
        self.checker.at_quiescence(&stores)?;
        self.check_nothing_left()
    }

    /// Every node's group keys, as stored now, tried on every group message
    /// that went on the wire: each one they open must have been sent while
    /// the node was a recipient (see [`Checker::on_opened`]). Run on every
    /// group message as it leaves too, since keys move on and skipped ones
    /// expire.
    fn check_confidentiality(&mut self) -> Result<(), Violation> {
        let messages = self.checker.group_messages().to_vec();
        for message in &messages {
            self.check_opened_by_anyone(message)?;
        }
        Ok(())
    }

    fn check_opened_by_anyone(&mut self, message: &GroupMessage) -> Result<(), Violation> {
        let now = self.now;
        for i in 0..self.nodes.len() {
            let store = self.nodes[i].engine.store_mut();
            if store.begin().is_err() {
                continue;
            }
            let keys = store.group_keys(&message.group_id);
            store.rollback();
            let Ok(Some(bytes)) = keys else { continue };
            let Ok(mut group) = GroupSession::from_bytes(&bytes) else { continue };
            // A copy: nothing is saved, so the node's state is untouched.
            if let Ok(plaintext) = group.decrypt(message, now) {
                self.checker.on_opened(i, &plaintext)?;
            }
        }
        Ok(())
    }

    /// Once the network has healed and settled, nothing is left queued or
    /// exchanging keys: an item that stays would be retried for ever.
    fn check_nothing_left(&mut self) -> Result<(), Violation> {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let store = node.engine.store_mut();
            let read = |e: p2pchat_protocol::engine::StoreError| Violation(format!("n{i}'s store: {e}"));
            store.begin().map_err(read)?;
            let result = (|| {
                let outbox = store.outbox().map_err(read)?;
                if let Some(item) = outbox.first() {
                    return Err(Violation(format!(
                        "n{i} still has {} queued items after the network healed and settled, the first {:?} for {}",
                        outbox.len(),
                        item.payload,
                        item.peer
                    )));
                }
                if let Some(attempt) = store.key_exchanges().map_err(read)?.first() {
                    return Err(Violation(format!("n{i} is still exchanging keys with {}", attempt.peer)));
                }
                Ok(())
            })();
            store.rollback();
            result?;
        }
        Ok(())
    }

    /// Bounded state in every store: skipped keys, previous sender keys,
    /// mailboxes. Returns each node's messages.
    fn check_bounds(&mut self) -> Result<Vec<HashMap<MessageId, Message>>, Violation> {
        let mut stores = Vec::with_capacity(self.nodes.len());
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let store = node.engine.store_mut();
            let read = |e: p2pchat_protocol::engine::StoreError| Violation(format!("n{i}'s store: {e}"));
            store.begin().map_err(read)?;
            let mut messages = HashMap::new();
            let result = (|| {
                for c in store.conversations().map_err(read)? {
                    for m in store.messages(&c.id).map_err(read)? {
                        messages.insert(m.id, m);
                    }
                    if let ConversationKind::Group { .. } = c.kind {
                        if let Some(bytes) = store.group_keys(&c.id).map_err(read)? {
                            let group = GroupSession::from_bytes(&bytes)
                                .map_err(|e| Violation(format!("n{i}'s group keys do not restore: {e}")))?;
                            bound(
                                i,
                                "skipped group keys",
                                group.skipped_key_count(),
                                p2pchat_protocol::MAX_SKIPPED_KEYS,
                            )?;
                            bound(
                                i,
                                "previous sender keys of a member",
                                group.most_previous_sender_keys(),
                                p2pchat_protocol::group::MAX_PREVIOUS_SENDER_KEYS,
                            )?;
                        }
                    }
                }
                for peer in store.session_peers().map_err(read)? {
                    if let Some(bytes) = store.sessions(&peer).map_err(read)? {
                        let sessions = PairwiseSessions::from_bytes(&bytes)
                            .map_err(|e| Violation(format!("n{i}'s sessions do not restore: {e}")))?;
                        bound(
                            i,
                            "skipped keys with a peer",
                            sessions.skipped_key_count(),
                            p2pchat_protocol::MAX_SKIPPED_KEYS,
                        )?;
                    }
                }
                Ok(())
            })();
            store.rollback();
            result?;
            stores.push(messages);
        }
        let config = RelayConfig::default();
        let relay_store = self.relay.store_mut();
        let read = |e: p2pchat_protocol::relay::RelayStoreError| Violation(format!("the relay's store: {e}"));
        p2pchat_protocol::relay::RelayStore::begin(relay_store).map_err(read)?;
        let mut quota = Ok(());
        for node in &self.nodes {
            match p2pchat_protocol::relay::RelayStore::mailbox_usage(relay_store, &node.peer) {
                Ok(u) if u.count > config.mailbox_max_count || u.bytes > config.mailbox_max_bytes => {
                    quota =
                        Err(Violation(format!("a mailbox holds {} entries, {} bytes: over quota", u.count, u.bytes)));
                }
                Ok(_) => {}
                Err(e) => quota = Err(read(e)),
            }
        }
        p2pchat_protocol::relay::RelayStore::rollback(relay_store);
        quota?;
        Ok(stores)
    }
}

fn bound(node: usize, what: &str, value: usize, max: usize) -> Result<(), Violation> {
    if value > max {
        return Err(Violation(format!("n{node} holds {value} {what}; the bound is {max}")));
    }
    Ok(())
}

enum Next {
    Queued((Timestamp, u64)),
    EngineTimeout(usize),
    RelayTimeout,
}
