//! One run: nodes, relays and a network in virtual time, each node the
//! same `protocol::node::Node` the binary ships, driven by its rule (after
//! every input, drain every output), with faults and a workload drawn from
//! the seed. The network decides only whether bytes arrive; which path they
//! take is the nodes' choice.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use p2pchat_protocol::address::AddressPolicy;
use p2pchat_protocol::engine::{
    Answer, Command, CommandOutcome, ConversationKind, ConversationStore, Event, GroupStore, KeyExchangeStore, Message,
    MessageStatus, MessageStore, OutboxStore, Query, SendFailure, SessionStore, Transaction, TransmitId,
    TransmitOutcome,
};
use p2pchat_protocol::keys::IdentitySeed;
use p2pchat_protocol::node::{Node, NodeConfig, NodeInput, NodeOutput, Notice, RelaySpec, Reply, Ticket};
use p2pchat_protocol::relay::{MemoryRelayStore, PublishRefusal, Relay, RelayConfig, RelayFrame};
use p2pchat_protocol::wire::{Envelope, EnvelopeBody, GroupMessage};
use p2pchat_protocol::{ConversationId, GroupSession, IdentityKeyPair, MessageId, PairwiseSessions, PeerId, Timestamp};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use crate::checker::{Checker, Violation};
use crate::knobs::Knobs;
use crate::rng::{stream, SimRng};
use crate::store::{Bug, SimStore};
use crate::trace::{digest, envelope_kind, frame_kind, Step, Trace, REFUSED};

/// Virtual time at the start of every run.
pub const START: Timestamp = Timestamp::from_millis(1_767_225_600_000);
/// How long the network is left to settle after it heals.
const SETTLE_MS: u64 = 20 * 60 * 1000;
/// Any relay, where a node index is expected (relays are all on the same
/// side of a partition).
const RELAY: usize = usize::MAX;
/// A run that takes more steps than this is stuck in a loop.
const MAX_STEPS: u64 = 3_000_000;
/// Bounded state is checked every this many steps (and at the end).
const BOUNDS_EVERY: u64 = 2_000;
/// The stale-restart bug keeps a copy of the store every this many calls.
const STALE_EVERY: u64 = 5;
/// In the never-online-together workload, how long before the heal a
/// message between n0 and n1 must have been accepted to be required to
/// have arrived: absences end at least this long before it.
const TOGETHER_SETTLE_MS: u64 = 30 * 3_600_000;
/// How long a dial to a peer the network does not reach takes to fail (a
/// handshake that is never answered), counted after its round trip.
const DIAL_TIMEOUT_MS: u64 = 3_000;
/// Relay `r` where a node index is expected (in traces).
const fn relay_who(r: usize) -> usize {
    usize::MAX - r
}

/// Relay `r`'s peer ID (relays have no identity in the simulation: they
/// are never dialled by certificate).
fn relay_peer(r: usize) -> PeerId {
    PeerId([0xe0 + r as u8; 20])
}

/// Relay `r`'s address as records list it.
fn relay_address(r: usize) -> String {
    format!("{}@10.255.0.{}:4433", relay_peer(r), r + 1)
}

/// A relay of the run.
struct SimRelay {
    relay: Relay<MemoryRelayStore>,
    /// It runs and the network reaches it.
    up: bool,
    /// It keeps its connections but answers nothing (a wedged process):
    /// frames to it are lost.
    silent: bool,
}

/// What the queue holds.
enum Ev {
    /// A datagram on direct connection `link` arrives; `transmit` is set
    /// on the original copy (not a duplicate), whose sender learns the
    /// outcome.
    Datagram { from: usize, to: usize, link: u64, bytes: Vec<u8>, transmit: Option<(u32, TransmitId)> },
    /// A direct send's outcome reaches its sender (if still the same process).
    Result { node: usize, incarnation: u32, id: TransmitId, outcome: TransmitOutcome },
    /// A node's dial of another reaches its end (a handshake round trip).
    Dialled { from: usize, to: usize, incarnation: u32 },
    /// A dial the network did not carry times out.
    DialTimedOut { from: usize, to: usize, incarnation: u32 },
    /// A node's connection attempt to a relay (its link `link`; `relay`
    /// if it is one of the run's) reaches its end.
    RelayDialled { node: usize, link: usize, relay: Option<usize>, incarnation: u32 },
    /// A node closes its relay connection `conn` on link `link` (the relay
    /// left a request unanswered).
    CloseRelay { node: usize, link: usize, conn: u64 },
    /// A frame on a node's relay connection `conn` reaches relay `relay`.
    ToRelay { from: usize, relay: usize, conn: u64, bytes: Vec<u8> },
    /// A frame from a relay reaches a node on its link `link`, connection `conn`.
    FromRelay { to: usize, link: usize, conn: u64, bytes: Vec<u8> },
    /// The next API operation.
    Operation,
    /// A fault starts or ends.
    Fault(Fault),
    /// The crash planned for this node happens now if no call triggered it.
    CrashNow(usize),
    /// A node's user accepts a group invitation shown to it.
    Accept { node: usize, group: ConversationId },
    /// A node's user starts a key exchange with another (while both are
    /// online, before they part).
    KeyExchange { from: usize, to: usize },
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
    RelayDown(usize),
    RelayUp(usize),
    RelaySilent(usize),
    RelayAnswers(usize),
}

struct Machine {
    identity_seed: [u8; 32],
    peer: PeerId,
    node: Node<SimStore>,
    skew_ms: i64,
    /// It accepts direct connections (it is not behind NAT).
    direct: bool,
    /// The process runs.
    up: bool,
    /// The network reaches it.
    online: bool,
    incarnation: u32,
    /// Its open relay connections: by the node's link index, the relay and
    /// the connection.
    relay_conns: BTreeMap<usize, (usize, u64)>,
    crash_pending: bool,
    /// Node calls so far (for the stale-restart bug's snapshots).
    calls: u64,
    next_ticket: u64,
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
    /// The hash of what the nodes did, in a form a refactor that keeps the
    /// behaviour does not change (see `trace::Behaviour`).
    pub behaviour_hash: u64,
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
    /// In the never-online-together workload, the messages between n0
    /// and n1 that had arrived before the heal.
    pub delivered_apart: usize,
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
    nodes: Vec<Machine>,
    /// Open direct connections, by their ends (lower index first).
    links: BTreeMap<(usize, usize), u64>,
    relays: Vec<SimRelay>,
    /// Two nodes whose direct path silently drops everything.
    blackholed: Option<(usize, usize)>,
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
    /// In the never-online-together workload, the 1:1 messages between n0
    /// and n1: their sender and when they were accepted.
    together_messages: Vec<(MessageId, usize, Timestamp)>,
    /// How many of those had arrived by the heal.
    together_delivered: usize,
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
            let direct = i >= knobs.relay_only;
            // An in-memory store cannot fail, so neither can the first start.
            let node = match Node::new(identity, store, node_config(i, direct, knobs.relays), rng, node_now) {
                Ok(node) => node,
                Err(e) => unreachable!("a fresh node on an empty in-memory store failed: {e}"),
            };
            nodes.push(Machine {
                identity_seed,
                peer,
                node,
                skew_ms,
                direct,
                up: true,
                online: true,
                incarnation: 0,
                relay_conns: BTreeMap::new(),
                crash_pending: false,
                calls: 0,
                next_ticket: 0,
                inbox: Vec::new(),
                conversations: BTreeSet::new(),
            });
        }
        let relays = (0..knobs.relays)
            .map(|_| match Relay::new(MemoryRelayStore::new(), RelayConfig::default()) {
                Ok(relay) => SimRelay { relay, up: true, silent: false },
                Err(e) => unreachable!("a relay on an empty in-memory store failed: {e}"),
            })
            .collect();
        // Two nodes that take direct connections, if there are two.
        let blackholed = (knobs.blackholed_pair && knobs.nodes - knobs.relay_only >= 2)
            .then(|| (knobs.relay_only, knobs.relay_only + 1));
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
            links: BTreeMap::new(),
            relays,
            blackholed,
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
            together_messages: Vec::new(),
            together_delivered: 0,
        };
        world.schedule_faults();
        world.schedule(0, Ev::Operation);
        world
    }

    /// Runs to the end (or the first broken invariant) and reports.
    #[allow(clippy::disallowed_methods, reason = "the report's wall-clock time; the run never reads it")]
    pub(crate) fn run(mut self) -> Report {
        let started = Instant::now();
        // Each node's first outputs connect it to its relays.
        for i in 0..self.nodes.len() {
            self.run_node(i);
        }
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
                Next::NodeTimeout(i) => {
                    self.trace(Step::Timeout { node: i });
                    let now = self.node_now(i);
                    self.timed(|w| w.nodes[i].node.handle_timeout(now));
                    self.run_node(i);
                    self.note_call(i);
                    // A deadline a timeout does not move would spin for ever.
                    let stuck = self.nodes[i].up && self.nodes[i].node.poll_timeout().is_some_and(|t| t <= now);
                    if stuck && self.failure.is_none() {
                        self.fail(format!("n{i}'s deadline did not move past its timeout"));
                    }
                }
                Next::RelayTimeout(r) => {
                    self.trace(Step::Timeout { node: relay_who(r) });
                    let now = self.now;
                    let result = self.timed(|w| w.relays[r].relay.handle_timeout(now));
                    if let Err(e) = result {
                        self.fail(format!("relay {r} failed: {e}"));
                    }
                    self.drain_relay(r);
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
            behaviour_hash: self.trace.behaviour().hash(),
            steps: self.trace.steps(),
            accepted: self.checker.accepted(),
            deliveries: self.checker.deliveries(),
            failed,
            dh_steps: self.checker.dh_steps(),
            virtual_ms: self.now.millis_since(START),
            protocol_time: self.protocol_time,
            total_time: started.elapsed(),
            delivered_apart: self.together_delivered,
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
            if let (true, Some(deadline)) = (node.up, node.node.poll_timeout()) {
                let global = (deadline.as_millis() as i64 - node.skew_ms).max(0) as u64;
                consider(Timestamp::from_millis(global).max(self.now), Next::NodeTimeout(i));
            }
        }
        for (r, relay) in self.relays.iter().enumerate() {
            if let Some(deadline) = relay.relay.poll_timeout() {
                consider(deadline.max(self.now), Next::RelayTimeout(r));
            }
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

    #[allow(clippy::disallowed_methods, reason = "profiling only; the run never reads it")]
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
        self.schedule_relay_spells(self.knobs.relay_outages, span, Fault::RelayDown, Fault::RelayUp);
        self.schedule_relay_spells(self.knobs.silent_relays, span, Fault::RelaySilent, Fault::RelayAnswers);
        if self.knobs.never_together {
            self.schedule_never_together();
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
                // Its first outputs connect to the relay; what the engine
                // queued while starting follows the paths it finds.
                self.run_node(i);
                // The user's page, reloaded, lists the invitations still
                // waiting (their events may have died with the process).
                if let Ok(Answer::Invitations(waiting)) = self.nodes[i].node.engine_mut().query(Query::Invitations) {
                    for invitation in waiting {
                        let after = self.work.range(0, 10_000);
                        self.schedule(after, Ev::Accept { node: i, group: invitation.group_id });
                    }
                }
            }
            Fault::RelayDown(r) => self.relays[r].up = false,
            Fault::RelayUp(r) => self.relays[r].up = true,
            Fault::RelaySilent(r) => self.relays[r].silent = true,
            Fault::RelayAnswers(r) => self.relays[r].silent = false,
        }
        self.refresh();
    }

    /// `count` spells, each of one relay, starting within `span` and lasting
    /// 1 s to 2 min: `start(r)`, then `end(r)`.
    fn schedule_relay_spells(&mut self, count: u32, span: u64, start: fn(usize) -> Fault, end: fn(usize) -> Fault) {
        for _ in 0..count {
            let at = self.faults.range(0, span);
            let length = self.faults.range(1_000, 120_000);
            let r = self.faults.index(self.relays.len());
            self.schedule(at, Ev::Fault(start(r)));
            self.schedule(at + length, Ev::Fault(end(r)));
        }
    }

    /// Nodes 0 and 1 set up their session while both are online, in the
    /// first virtual hour; from then on n0 is online only in even hours
    /// and n1 only in odd ones, and each is away once for one to two and a
    /// half days. The absences end at least [`TOGETHER_SETTLE_MS`] before
    /// the workload does.
    fn schedule_never_together(&mut self) {
        const HOUR_MS: u64 = 3_600_000;
        self.schedule(1_000, Ev::KeyExchange { from: 0, to: 1 });
        let span = self.knobs.operation_gap_ms * u64::from(self.knobs.operations);
        let hours = span / HOUR_MS;
        let last_away = hours.saturating_sub(TOGETHER_SETTLE_MS / HOUR_MS + 1);
        let mut away = [(0, 0); 2];
        for (node, spell) in away.iter_mut().enumerate() {
            let length = self.faults.range(24, 60);
            let start = self.faults.range(2, last_away.saturating_sub(length).max(2));
            *spell = (start, (start + length).min(last_away));
            self.trace(Step::Fault(format!("n{node} away from hour {} to hour {}", spell.0, spell.1)));
        }
        for hour in 1..=hours {
            let online = |node: usize| hour % 2 == node as u64 && !(away[node].0..away[node].1).contains(&hour);
            // Whoever leaves goes first, so the two are never online at once.
            let (leaving, coming): (Vec<usize>, Vec<usize>) = (0..2).partition(|&node| !online(node));
            for node in leaving {
                self.schedule(hour * HOUR_MS, Ev::Fault(Fault::Offline(node)));
            }
            for node in coming {
                self.schedule(hour * HOUR_MS, Ev::Fault(Fault::Online(node)));
            }
        }
    }

    /// Before the heal: every message between n0 and n1 accepted at least
    /// [`TOGETHER_SETTLE_MS`] ago reached its recipient, or failed, though
    /// the two were never online together since they set up their session.
    fn check_never_together(&mut self) -> Result<(), Violation> {
        let settled = self.now.as_millis().saturating_sub(TOGETHER_SETTLE_MS);
        for (id, sender, at) in self.together_messages.clone() {
            if at.as_millis() > settled || self.checker.unannounced(&id).is_empty() {
                continue;
            }
            // Only a message that never had a session may fail: the key
            // exchange needs both online at once, which they never are
            // after the first hour. Anything else would be a lost session.
            let stored = self.stored_message(sender, &id);
            let no_session = stored.as_ref().is_some_and(|m| {
                m.status == MessageStatus::Failed
                    && m.failure_reason.as_deref().is_some_and(|r| r.contains("key exchange"))
            });
            if !no_session {
                return Err(Violation(format!(
                    "message {id} from n{sender}, accepted {} h before the heal, has not reached its recipient \
                     though both were online in turn (it is {:?}: {:?})",
                    self.now.millis_since(at) / 3_600_000,
                    stored.as_ref().map(|m| m.status),
                    stored.as_ref().and_then(|m| m.failure_reason.clone()),
                )));
            }
        }
        self.together_delivered =
            self.together_messages.iter().filter(|(id, _, _)| self.checker.unannounced(id).is_empty()).count();
        Ok(())
    }

    fn heal(&mut self) {
        self.trace(Step::Fault("heal".into()));
        self.healed = true;
        self.knobs.loss_ppm = 0;
        self.knobs.duplicate_ppm = 0;
        self.partition.clear();
        for relay in &mut self.relays {
            relay.up = true;
            relay.silent = false;
        }
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

    /// The network carries datagrams between `a` and `b`.
    fn path(&self, a: usize, b: usize) -> bool {
        let ok = |i: usize| self.nodes[i].up && self.nodes[i].online;
        a != b && ok(a) && ok(b) && self.together(a, b)
    }

    /// A dial from `a` reaches `b`: the path works and `b` accepts direct
    /// connections (a node behind NAT can dial out, but not be dialled).
    fn dialable(&self, a: usize, b: usize) -> bool {
        self.path(a, b) && self.nodes[b].direct
    }

    fn relay_reachable(&self, i: usize, r: usize) -> bool {
        self.relays[r].up && self.nodes[i].up && self.nodes[i].online && self.together(i, RELAY)
    }

    /// The direct path between `a` and `b` drops everything, silently.
    fn blackholed(&self, a: usize, b: usize) -> bool {
        self.blackholed == Some(Self::link_key(a, b))
    }

    /// Closes the connections the network no longer carries, telling the
    /// ends that are still running (as their transports would, at once).
    fn refresh(&mut self) {
        for i in 0..self.nodes.len() {
            let links: Vec<(usize, usize)> = self.nodes[i].relay_conns.iter().map(|(&l, &(r, _))| (l, r)).collect();
            for (link, r) in links {
                if !self.relay_reachable(i, r) {
                    self.disconnect_relay(i, link);
                }
            }
        }
        let broken: Vec<(usize, usize)> = self.links.keys().copied().filter(|&(a, b)| !self.path(a, b)).collect();
        for (a, b) in broken {
            self.links.remove(&(a, b));
            self.trace(Step::Path { node: a, what: format!("direct connection with n{b} closed") });
            let (peer_a, peer_b) = (self.nodes[a].peer, self.nodes[b].peer);
            self.call(a, NodeInput::DirectDown { peer: peer_b });
            self.call(b, NodeInput::DirectDown { peer: peer_a });
        }
    }

    fn disconnect_relay(&mut self, i: usize, link: usize) {
        let Some((r, _)) = self.nodes[i].relay_conns.remove(&link) else { return };
        let peer = self.nodes[i].peer;
        self.timed(|w| w.relays[r].relay.disconnected(&peer));
        self.trace(Step::Path { node: i, what: format!("connection to relay {r} closed") });
        self.call(i, NodeInput::RelayDisconnected { relay: link, reason: "the relay connection closed".into() });
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
            _ => self.nodes[i].node.engine().store().crash_copy(),
        };
        let direct = self.nodes[i].direct;
        let node = &mut self.nodes[i];
        node.up = false;
        node.incarnation += 1;
        let identity = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(node.identity_seed));
        let rng = ChaCha20Rng::from_seed(self.keys.bytes32());
        let now = self.node_now(i);
        let relays = self.relays.len();
        match self.timed(|_| Node::new(identity, store, node_config(i, direct, relays), rng, now)) {
            Ok(node) => self.nodes[i].node = node,
            Err(e) => return self.fail(format!("n{i} did not restart from its store: {e}")),
        }
        // Its connections died with it.
        let peer = self.nodes[i].peer;
        for (_, (r, _)) in std::mem::take(&mut self.nodes[i].relay_conns) {
            self.timed(|w| w.relays[r].relay.disconnected(&peer));
        }
        let down_for = self.faults.range(100, 5_000);
        self.schedule(down_for, Ev::Fault(Fault::Restarted(i)));
        self.refresh();
    }

    // ---- the driving rule ----

    /// Hands node `i` an input and drains its outputs.
    fn call(&mut self, i: usize, input: NodeInput) {
        // A node that crashed during an earlier input of the same batch
        // takes no more of it: those inputs died with the process.
        if !self.nodes[i].up {
            return;
        }
        let now = self.node_now(i);
        self.timed(|w| w.nodes[i].node.handle(now, input));
        self.run_node(i);
        self.note_call(i);
    }

    /// The planted bug restarts from a copy a few calls old, as if the last
    /// commits had not been durable: it keeps one every few calls.
    fn note_call(&mut self, i: usize) {
        if self.options.bug == Bug::StaleRestart && self.nodes[i].up {
            self.nodes[i].calls += 1;
            if self.nodes[i].calls.is_multiple_of(STALE_EVERY) {
                self.snapshots[i] = Some(self.nodes[i].node.engine().store().crash_copy());
            }
        }
    }

    /// Drains node `i`'s outputs. Its first poll runs the waiting engine
    /// work (one commit); a planned crash strikes right after that, before
    /// any output leaves.
    fn run_node(&mut self, i: usize) {
        loop {
            if !self.nodes[i].up || self.failure.is_some() {
                return;
            }
            let now = self.node_now(i);
            let Some(output) = self.timed(|w| w.nodes[i].node.poll_output(now)) else { return };
            if !self.release(i, output) {
                return;
            }
        }
    }

    /// Releases one output of node `i`, or crashes it first if a crash is
    /// planned (the output dies with the process). False if it crashed.
    fn release(&mut self, i: usize, output: NodeOutput) -> bool {
        if self.nodes[i].crash_pending {
            self.crash(i);
            return false;
        }
        self.output(i, output);
        true
    }

    fn output(&mut self, i: usize, output: NodeOutput) {
        let incarnation = self.nodes[i].incarnation;
        match output {
            NodeOutput::Dial { peer, addr } => {
                let Some(j) = self.index(&peer).filter(|&j| addr.to_string() == address_of(j)) else {
                    return self.fail(format!("n{i} dialled {peer} at {addr}, which it never published"));
                };
                self.trace(Step::Path { node: i, what: format!("dials n{j}") });
                let after = 2 * self.latency();
                self.schedule(after, Ev::Dialled { from: i, to: j, incarnation });
            }
            NodeOutput::SendDirect { peer, id, bytes } => self.send_direct(i, peer, id, bytes),
            NodeOutput::ConnectRelay { relay: link, spec } => {
                let relay = (0..self.relays.len()).find(|&r| relay_peer(r) == spec.peer);
                if relay.is_some_and(|r| spec.address != relay_address(r)) {
                    return self
                        .fail(format!("n{i} dialled relay {} at {}, which no one listed", spec.peer, spec.address));
                }
                let after = 2 * self.knobs.relay_latency_ms;
                self.schedule(after, Ev::RelayDialled { node: i, link, relay, incarnation });
            }
            NodeOutput::CloseRelay { relay: link } => {
                if let Some(&(_, conn)) = self.nodes[i].relay_conns.get(&link) {
                    self.schedule(0, Ev::CloseRelay { node: i, link, conn });
                }
            }
            NodeOutput::SendToRelay { relay: link, bytes } => {
                if let Ok(RelayFrame::Forward { envelope, .. }) = RelayFrame::decode(&bytes) {
                    self.on_wire(&envelope);
                }
                self.send_to_relay(i, link, bytes);
            }
            NodeOutput::Event(event) => self.on_event(i, event),
            // Only the workload's commands have tickets; `command` takes
            // their replies.
            NodeOutput::Reply { .. } => {}
            NodeOutput::Notice(Notice::InputFailed(e)) => self.fail(format!("n{i}'s engine failed: {e}")),
            NodeOutput::Notice(Notice::BadRelayFrame { error, .. }) => {
                self.fail(format!("n{i} could not read the relay's frame: {error}"))
            }
            NodeOutput::Notice(Notice::PublishRefused { reason, .. }) if reason != PublishRefusal::Rate => {
                self.fail(format!("n{i}'s record was refused: {}", reason.as_str()))
            }
            NodeOutput::Notice(Notice::DirectFellBack { peer, reason }) => {
                let j = self.index(&peer).unwrap_or(RELAY);
                self.trace(Step::Path { node: i, what: format!("to n{j} through the relay: {reason}") });
            }
            NodeOutput::Notice(_) => {}
        }
    }

    /// An envelope leaves a node, directly or inside a relay frame: the
    /// checker sees every one.
    fn on_wire(&mut self, envelope: &[u8]) {
        let result = self.checker.on_envelope(envelope);
        self.check(result);
        if let Ok(Envelope { body: EnvelopeBody::Group(message) }) = Envelope::decode(envelope) {
            // Checked once the step is over, when its sender's API has
            // accepted the message.
            self.fresh_group_messages.push(message);
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
        let store = self.nodes[i].node.engine_mut().store_mut();
        store.begin().ok()?;
        let message = store.message(id).ok().flatten();
        store.rollback();
        message
    }

    fn index(&self, peer: &PeerId) -> Option<usize> {
        self.nodes.iter().position(|n| n.peer == *peer)
    }

    fn link_key(a: usize, b: usize) -> (usize, usize) {
        (a.min(b), a.max(b))
    }

    /// A datagram on the open connection with `peer`, lost, duplicated or
    /// late as the knobs say; with no connection, the send fails at once.
    fn send_direct(&mut self, i: usize, peer: PeerId, id: TransmitId, bytes: Vec<u8>) {
        self.on_wire(&bytes);
        let incarnation = self.nodes[i].incarnation;
        let link = self.index(&peer).and_then(|j| self.links.get(&Self::link_key(i, j)).map(|l| (j, *l)));
        let Some((j, link)) = link else {
            let outcome = TransmitOutcome::Failed(SendFailure::NoConnection);
            return self.schedule(0, Ev::Result { node: i, incarnation, id, outcome });
        };
        if self.net.chance(self.knobs.loss_ppm) {
            self.trace(Step::Drop { from: i, to: j, why: "lost" });
            let timeout = 3 * (self.knobs.latency_ms + self.knobs.jitter_ms) + 10;
            let outcome = TransmitOutcome::Failed(SendFailure::Unacknowledged);
            return self.schedule(timeout, Ev::Result { node: i, incarnation, id, outcome });
        }
        if self.net.chance(self.knobs.duplicate_ppm) {
            let later = self.latency();
            let bytes = bytes.clone();
            self.schedule(later, Ev::Datagram { from: i, to: j, link, bytes, transmit: None });
        }
        let after = self.latency();
        self.schedule(after, Ev::Datagram { from: i, to: j, link, bytes, transmit: Some((incarnation, id)) });
    }

    fn send_to_relay(&mut self, i: usize, link: usize, bytes: Vec<u8>) {
        if let Some(&(relay, conn)) = self.nodes[i].relay_conns.get(&link) {
            // One ordered stream per connection: a constant latency keeps order.
            let after = self.knobs.relay_latency_ms;
            self.schedule(after, Ev::ToRelay { from: i, relay, conn, bytes });
        }
    }

    fn drain_relay(&mut self, r: usize) {
        while self.timed(|w| w.relays[r].relay.poll_event()).is_some() {}
        while let Some((peer, bytes)) = self.timed(|w| w.relays[r].relay.poll_transmit()) {
            let Some(j) = self.index(&peer) else { continue };
            let link = self.nodes[j].relay_conns.iter().find(|(_, &(relay, _))| relay == r);
            if let Some((&link, &(_, conn))) = link {
                let after = self.knobs.relay_latency_ms;
                self.schedule(after, Ev::FromRelay { to: j, link, conn, bytes });
            }
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Datagram { from, to, link, bytes, transmit } => self.datagram(from, to, link, bytes, transmit),
            Ev::Result { node, incarnation, id, outcome } => {
                if self.nodes[node].up && self.nodes[node].incarnation == incarnation {
                    let kind = match &outcome {
                        TransmitOutcome::Delivered => 0,
                        TransmitOutcome::HeldByRelay => 1,
                        TransmitOutcome::Failed(_) => 2,
                        TransmitOutcome::Rejected(_) => 3,
                    };
                    self.trace(Step::Result { node, kind, outcome: format!("{outcome:?}") });
                    self.call(node, NodeInput::DirectSent { id, outcome });
                }
            }
            Ev::Dialled { from, to, incarnation } => self.dialled(from, to, incarnation),
            Ev::DialTimedOut { from, to, incarnation } => {
                if self.nodes[from].up && self.nodes[from].incarnation == incarnation {
                    self.trace(Step::Path { node: from, what: format!("dial of n{to} timed out") });
                    let peer = self.nodes[to].peer;
                    self.call(from, NodeInput::DialFailed { peer, reason: "the handshake timed out".into() });
                }
            }
            Ev::RelayDialled { node, link, relay, incarnation } => self.relay_dialled(node, link, relay, incarnation),
            Ev::CloseRelay { node, link, conn } => {
                if self.nodes[node].relay_conns.get(&link).is_some_and(|&(_, c)| c == conn) {
                    self.disconnect_relay(node, link);
                }
            }
            Ev::ToRelay { from, relay, conn, bytes } => {
                if !self.nodes[from].relay_conns.values().any(|&(r, c)| r == relay && c == conn) {
                    return;
                }
                if self.relays[relay].silent {
                    return self.trace(Step::Drop { from, to: relay_who(relay), why: "the relay is wedged" });
                }
                self.trace(Step::Arrive {
                    from,
                    to: relay_who(relay),
                    what: frame_kind(&bytes),
                    len: bytes.len(),
                    digest: digest(&bytes),
                });
                let (now, peer) = (self.now, self.nodes[from].peer);
                if let Err(e) = self.timed(|w| w.relays[relay].relay.handle_frame(now, peer, &bytes)) {
                    return self.fail(format!("relay {relay} failed: {e}"));
                }
                self.drain_relay(relay);
            }
            Ev::FromRelay { to, link, conn, bytes } => self.frame_from_relay(to, link, conn, bytes),
            Ev::Operation => {
                self.operation();
                // What the commands caused leaves now that the checker
                // knows what was accepted.
                for i in 0..self.nodes.len() {
                    self.run_node(i);
                }
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
                self.run_node(node);
            }
            Ev::KeyExchange { from, to } => {
                let peer = self.nodes[to].peer;
                self.command(from, Command::InitiateKeyExchange { peer });
                self.run_node(from);
            }
            Ev::Heal => {
                if self.knobs.never_together {
                    let result = self.check_never_together();
                    self.check(result);
                }
                self.heal();
            }
        }
    }

    /// A dial's handshake is over: connected if the network carries it and
    /// the peer accepts direct connections, else it times out later.
    fn dialled(&mut self, from: usize, to: usize, incarnation: u32) {
        if !self.nodes[from].up || self.nodes[from].incarnation != incarnation {
            return;
        }
        // A blackholed path answers no handshake: the dial times out.
        if !self.dialable(from, to) || self.blackholed(from, to) {
            return self.schedule(DIAL_TIMEOUT_MS, Ev::DialTimedOut { from, to, incarnation });
        }
        let key = Self::link_key(from, to);
        let new = !self.links.contains_key(&key);
        if new {
            self.next_conn += 1;
            self.links.insert(key, self.next_conn);
            self.trace(Step::Path { node: from, what: format!("connected to n{to}") });
        }
        let link = self.links.get(&key).copied();
        let (peer_from, peer_to) = (self.nodes[from].peer, self.nodes[to].peer);
        self.call(from, NodeInput::DirectUp { peer: peer_to });
        // The dialler may have crashed in that call, which closed the
        // connection: the other end then never hears of it.
        if new && self.links.get(&key).copied() == link {
            self.call(to, NodeInput::DirectUp { peer: peer_from });
        }
    }

    fn relay_dialled(&mut self, i: usize, link: usize, relay: Option<usize>, incarnation: u32) {
        let node = &self.nodes[i];
        if !node.up || node.incarnation != incarnation || node.relay_conns.contains_key(&link) {
            return;
        }
        let Some(r) = relay.filter(|&r| self.relay_reachable(i, r)) else {
            self.trace(Step::Path { node: i, what: format!("cannot reach relay {relay:?}") });
            let reason = "the relay did not answer".to_owned();
            return self.call(i, NodeInput::RelayDisconnected { relay: link, reason });
        };
        self.next_conn += 1;
        self.nodes[i].relay_conns.insert(link, (r, self.next_conn));
        let peer = self.nodes[i].peer;
        self.timed(|w| w.relays[r].relay.connected(peer));
        self.trace(Step::Path { node: i, what: format!("connected to relay {r}") });
        self.call(i, NodeInput::RelayConnected { relay: link });
    }

    fn datagram(&mut self, from: usize, to: usize, link: u64, bytes: Vec<u8>, transmit: Option<(u32, TransmitId)>) {
        let back = self.latency();
        if self.links.get(&Self::link_key(from, to)) != Some(&link) || !self.path(from, to) {
            self.trace(Step::Drop { from, to, why: "the connection closed" });
            if let Some((incarnation, id)) = transmit {
                let outcome = TransmitOutcome::Failed(SendFailure::ConnectionClosed);
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
                TransmitOutcome::Failed(SendFailure::Unacknowledged)
            } else {
                TransmitOutcome::Delivered
            };
            self.schedule(back, Ev::Result { node: from, incarnation, id, outcome });
        }
        self.call(to, NodeInput::DirectReceived { from: peer, bytes });
    }

    fn frame_from_relay(&mut self, i: usize, link: usize, conn: u64, bytes: Vec<u8>) {
        let Some(&(r, c)) = self.nodes[i].relay_conns.get(&link) else { return };
        if c != conn || !self.nodes[i].up {
            return;
        }
        self.trace(Step::Arrive {
            from: relay_who(r),
            to: i,
            what: frame_kind(&bytes),
            len: bytes.len(),
            digest: digest(&bytes),
        });
        self.call(i, NodeInput::RelayFrame { relay: link, bytes });
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
                        if self.knobs.never_together && i + j == 1 {
                            self.together_messages.push((m.id, i, self.now));
                        }
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
        let ticket = Ticket(self.nodes[i].next_ticket);
        self.nodes[i].next_ticket += 1;
        let incarnation = self.nodes[i].incarnation;
        self.timed(|w| w.nodes[i].node.handle(now, NodeInput::Command { ticket, command }));
        // Earlier outputs leave first; the command's reply comes straight
        // after its commit, and what it caused waits for the caller's
        // `run_node`, so the checker hears of an accepted message before
        // anything about it.
        let reply = loop {
            if !self.nodes[i].up || self.failure.is_some() {
                return None;
            }
            let now = self.node_now(i);
            match self.timed(|w| w.nodes[i].node.poll_output(now)) {
                Some(NodeOutput::Reply { ticket: t, reply: Reply::Command(result) }) if t == ticket => break result,
                Some(output) => {
                    if !self.release(i, output) {
                        return None;
                    }
                }
                None => {
                    self.fail(format!("n{i} (incarnation {incarnation}) gave no reply to a command"));
                    return None;
                }
            }
        };
        self.note_call(i);
        let shown = match &reply {
            Ok(CommandOutcome::Message(m)) => format!("message {}", m.id),
            Ok(CommandOutcome::Conversation(c)) => format!("conversation {}", c.id),
            Ok(CommandOutcome::Done) => "done".into(),
            Err(e) => format!("{REFUSED}{e}"),
        };
        self.trace(Step::Command { node: i, what, result: shown });
        match reply {
            Ok(outcome) => Some(outcome),
            Err(p2pchat_protocol::engine::EngineError::Internal(p2pchat_protocol::engine::InternalError::Store(e))) => {
                self.fail(format!("n{i}'s store failed: {e}"));
                None
            }
            Err(_) => None,
        }
    }

    // ---- the end ----

    fn count_failed(&mut self) -> usize {
        let mut failed = 0;
        for node in &mut self.nodes {
            let store = node.node.engine_mut().store_mut();
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
        let at = self.now.millis_since(START);
        for (i, messages) in stores.iter().enumerate() {
            let mut ids: Vec<&MessageId> = messages.keys().collect();
            ids.sort();
            for id in ids {
                let m = &messages[id];
                let (content, status) = (m.content.as_bytes(), m.status.as_str());
                self.trace.behaviour().stored(at, i, &id.0 .0, status, content);
            }
        }
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
            let store = self.nodes[i].node.engine_mut().store_mut();
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
            let store = node.node.engine_mut().store_mut();
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
    fn check_bounds(&mut self) -> Result<Vec<BTreeMap<MessageId, Message>>, Violation> {
        let mut stores = Vec::with_capacity(self.nodes.len());
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let store = node.node.engine_mut().store_mut();
            let read = |e: p2pchat_protocol::engine::StoreError| Violation(format!("n{i}'s store: {e}"));
            store.begin().map_err(read)?;
            let mut messages = BTreeMap::new();
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
        for (r, relay) in self.relays.iter_mut().enumerate() {
            let relay_store = relay.relay.store_mut();
            let read = |e: p2pchat_protocol::relay::RelayStoreError| Violation(format!("relay {r}'s store: {e}"));
            p2pchat_protocol::relay::RelayStore::begin(relay_store).map_err(read)?;
            let mut quota = Ok(());
            for node in &self.nodes {
                match p2pchat_protocol::relay::RelayStore::mailbox_usage(relay_store, &node.peer) {
                    Ok(u) if u.count > config.mailbox_max_count || u.bytes > config.mailbox_max_bytes => {
                        quota = Err(Violation(format!(
                            "a mailbox of relay {r} holds {} entries, {} bytes: over quota",
                            u.count, u.bytes
                        )));
                    }
                    Ok(_) => {}
                    Err(e) => quota = Err(read(e)),
                }
            }
            p2pchat_protocol::relay::RelayStore::rollback(relay_store);
            quota?;
        }
        Ok(stores)
    }
}

/// Node `i`'s configuration: every relay, starting from relay `i` (so
/// nodes prefer different ones and a sender's relay is often not its
/// recipient's first), its address if it accepts direct connections, and
/// private addresses allowed (the simulated network uses 10.0.0.0/8).
fn node_config(i: usize, direct: bool, relays: usize) -> NodeConfig {
    let relays = (0..relays).map(|k| (i + k) % relays);
    NodeConfig {
        relays: relays.map(|r| RelaySpec { peer: relay_peer(r), address: relay_address(r) }).collect(),
        direct_addresses: if direct { vec![address_of(i)] } else { Vec::new() },
        address_policy: AddressPolicy::AllowPrivate,
        ..NodeConfig::default()
    }
}

/// Where node `i` accepts direct connections.
fn address_of(i: usize) -> String {
    format!("10.0.0.{i}:4433")
}

fn bound(node: usize, what: &str, value: usize, max: usize) -> Result<(), Violation> {
    if value > max {
        return Err(Violation(format!("n{node} holds {value} {what}; the bound is {max}")));
    }
    Ok(())
}

enum Next {
    Queued((Timestamp, u64)),
    NodeTimeout(usize),
    RelayTimeout(usize),
}
