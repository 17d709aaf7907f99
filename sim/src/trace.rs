//! The run's trace: every step is hashed (so two runs of a seed can be
//! compared), and the last ones are kept to print when an invariant fails.

use core::fmt;
use core::hash::{Hash, Hasher};
use std::collections::VecDeque;

/// How many recent steps a failure report shows by default.
pub const TRACE_TAIL: usize = 60;

/// FNV-1a, 64-bit: fast and fixed (unlike the standard library's hasher,
/// whose keys and algorithm may change), so trace hashes can be compared
/// across builds. Steps are hashed through their derived `Hash`, which
/// feeds `usize` fields at the platform's width: hashes match between
/// machines of the same pointer width.
#[derive(Clone, Copy)]
pub(crate) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A 64-bit digest of some bytes.
pub(crate) fn digest(bytes: &[u8]) -> u64 {
    let mut h = Fnv::default();
    h.write(bytes);
    h.finish()
}

/// One step of a run.
#[derive(Clone, Debug, Hash)]
pub(crate) enum Step {
    /// An API command and whether the node accepted it.
    Command {
        /// Node index.
        node: usize,
        /// What was asked.
        what: String,
        /// The answer (an ID, or the error).
        result: String,
    },
    /// A datagram or relay frame arrived.
    Arrive {
        /// Sender (relay `r` is `usize::MAX - r`).
        from: usize,
        /// Recipient (relay `r` is `usize::MAX - r`).
        to: usize,
        /// What it is.
        what: String,
        /// Its length.
        len: usize,
        /// A digest of its bytes.
        digest: u64,
    },
    /// A datagram was dropped.
    Drop {
        /// Sender.
        from: usize,
        /// Recipient.
        to: usize,
        /// Why.
        why: &'static str,
    },
    /// A transmit's result went back to its sender.
    Result {
        /// Node index.
        node: usize,
        /// The outcome's kind: 0 delivered, 1 held by a relay, 2 failed, 3
        /// rejected.
        kind: u8,
        /// The outcome.
        outcome: String,
    },
    /// A fault started or ended.
    Fault(String),
    /// An engine event (its kind and message, if any).
    Event {
        /// Node index.
        node: usize,
        /// Its kind, as the API names it.
        kind: &'static str,
        /// The message or conversation it is about.
        about: String,
    },
    /// A node's path changed: a dial or a relay connection, made or failed.
    Path {
        /// Node index.
        node: usize,
        /// What happened.
        what: String,
    },
    /// A deadline fired.
    Timeout {
        /// Node index (relay `r` is `usize::MAX - r`).
        node: usize,
    },
}

/// A step at a virtual time.
#[derive(Clone, Debug, Hash)]
pub(crate) struct Entry {
    /// Milliseconds since the run started.
    pub at_ms: u64,
    /// The step.
    pub step: Step,
}

/// Relays count down from `usize::MAX` (relay 0 is `usize::MAX`).
fn who(i: usize) -> String {
    match usize::MAX - i {
        r @ 0..=15 => format!("relay{r}"),
        _ => format!("n{i}"),
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>10.3}s  ", self.at_ms as f64 / 1000.0)?;
        match &self.step {
            Step::Command { node, what, result } => write!(f, "n{node} {what} -> {result}"),
            Step::Arrive { from, to, what, len, digest } => {
                write!(f, "{} -> {} {what}, {len} bytes ({digest:016x})", who(*from), who(*to))
            }
            Step::Drop { from, to, why } => write!(f, "{} -> {} dropped: {why}", who(*from), who(*to)),
            Step::Result { node, outcome, .. } => write!(f, "n{node} transmit {outcome}"),
            Step::Fault(what) => write!(f, "FAULT {what}"),
            Step::Event { node, kind, about } => write!(f, "n{node} {kind} {about}"),
            Step::Path { node, what } => write!(f, "n{node} {what}"),
            Step::Timeout { node } => write!(f, "{} timeout", who(*node)),
        }
    }
}

/// What the nodes did, hashed in a form that renaming or retyping the code
/// does not change: the bytes that crossed the network (the wire format is
/// fixed by its vectors), what was dropped, which commands were accepted
/// and the IDs they gave, transmit outcomes by kind, events by their API
/// names and the message they name, and, at the end, every message each
/// node stored with its status and content. Not hashed: the wording of
/// errors and refusals, when timers fired, and the simulator's own notes,
/// which a refactor may change while behaving the same.
#[derive(Default)]
pub(crate) struct Behaviour(Fnv);

impl Behaviour {
    /// A fact: its kind, when, numbers and bytes, each length-prefixed so
    /// that no two facts feed the same bytes.
    fn fact(&mut self, tag: u8, at_ms: u64, numbers: &[u64], bytes: &[&[u8]]) {
        self.0.write(&[tag]);
        self.0.write(&at_ms.to_le_bytes());
        for n in numbers {
            self.0.write(&n.to_le_bytes());
        }
        for b in bytes {
            self.0.write(&(b.len() as u64).to_le_bytes());
            self.0.write(b);
        }
    }

    /// The behaviour a traced step shows.
    pub(crate) fn step(&mut self, at_ms: u64, step: &Step) {
        match step {
            Step::Arrive { from, to, len, digest, .. } => {
                self.fact(1, at_ms, &[*from as u64, *to as u64, *len as u64, *digest], &[]);
            }
            Step::Drop { from, to, .. } => self.fact(2, at_ms, &[*from as u64, *to as u64], &[]),
            Step::Command { node, result, .. } => {
                // The ID an accepted command gave; a refusal's wording is
                // not behaviour.
                let accepted: &[u8] = if result.starts_with(REFUSED) { b"" } else { result.as_bytes() };
                self.fact(3, at_ms, &[*node as u64, u64::from(accepted.is_empty())], &[accepted]);
            }
            Step::Result { node, kind, .. } => self.fact(4, at_ms, &[*node as u64, u64::from(*kind)], &[]),
            Step::Event { node, kind, about } => {
                let about: &[u8] = if *kind == "chat.security.rejected" { b"" } else { about.as_bytes() };
                self.fact(5, at_ms, &[*node as u64], &[kind.as_bytes(), about]);
            }
            Step::Fault(_) | Step::Path { .. } | Step::Timeout { .. } => {}
        }
    }

    /// A message node `node` holds at the end, with its status.
    pub(crate) fn stored(&mut self, at_ms: u64, node: usize, id: &[u8], status: &str, content: &[u8]) {
        self.fact(6, at_ms, &[node as u64], &[id, status.as_bytes(), content]);
    }

    pub(crate) fn hash(&self) -> u64 {
        self.0.finish()
    }
}

/// How a refused command's result starts in the trace.
pub(crate) const REFUSED: &str = "refused: ";

/// Several runs' behaviour hashes as one: each seed with its hash, in
/// seed order, so that the thread count does not matter.
pub(crate) fn combine(hashes: &std::collections::BTreeMap<u64, u64>) -> u64 {
    let mut h = Fnv::default();
    for (seed, hash) in hashes {
        h.write(&seed.to_le_bytes());
        h.write(&hash.to_le_bytes());
    }
    h.finish()
}

/// The hash of every step and the last few of them.
pub(crate) struct Trace {
    hash: Fnv,
    behaviour: Behaviour,
    tail: VecDeque<Entry>,
    keep: usize,
    steps: u64,
}

impl Trace {
    /// A trace keeping the last `keep` steps.
    pub(crate) fn new(keep: usize) -> Self {
        Self {
            hash: Fnv::default(),
            behaviour: Behaviour::default(),
            tail: VecDeque::new(),
            keep: keep.max(1),
            steps: 0,
        }
    }

    /// Records a step.
    pub(crate) fn push(&mut self, at_ms: u64, step: Step) {
        let entry = Entry { at_ms, step };
        entry.hash(&mut self.hash);
        self.behaviour.step(at_ms, &entry.step);
        self.steps += 1;
        if self.tail.len() == self.keep {
            self.tail.pop_front();
        }
        self.tail.push_back(entry);
    }

    /// The hash of the whole trace so far.
    pub(crate) fn hash(&self) -> u64 {
        self.hash.finish()
    }

    /// What the nodes did, so far (see [`Behaviour`]).
    pub(crate) fn behaviour(&mut self) -> &mut Behaviour {
        &mut self.behaviour
    }

    /// Steps recorded.
    pub(crate) fn steps(&self) -> u64 {
        self.steps
    }

    /// The most recent steps, oldest first.
    pub(crate) fn tail(&self) -> impl Iterator<Item = &Entry> {
        self.tail.iter()
    }
}

/// Names an envelope for the trace.
pub(crate) fn envelope_kind(bytes: &[u8]) -> String {
    use p2pchat_protocol::wire::{Envelope, EnvelopeBody};
    match Envelope::decode(bytes) {
        Ok(e) => match e.body {
            EnvelopeBody::KeyExchangeRequest(_) => "key exchange request".into(),
            EnvelopeBody::KeyExchangeAck(_) => "key exchange ack".into(),
            EnvelopeBody::Ratchet(m) => format!("ratchet message n={}", m.header.message_number),
            EnvelopeBody::Group(g) => format!("group message key={} n={}", g.key_id, g.message_number),
        },
        Err(e) => format!("undecodable envelope ({e})"),
    }
}

/// Names a relay frame for the trace.
pub(crate) fn frame_kind(bytes: &[u8]) -> String {
    use p2pchat_protocol::relay::RelayFrame;
    match RelayFrame::decode(bytes) {
        Ok(RelayFrame::Forward { id, mailbox_allowed, envelope, .. }) => {
            format!("Forward #{id} (mailbox {mailbox_allowed}) of {}", envelope_kind(&envelope))
        }
        Ok(RelayFrame::Deliver { mailbox_id, envelope, .. }) => {
            format!("Deliver (mailbox {mailbox_id:?}) of {}", envelope_kind(&envelope))
        }
        Ok(RelayFrame::Publish(r)) => format!("Publish #{}", r.sequence),
        Ok(RelayFrame::LookupResult { record, .. }) => format!("LookupResult (found {})", record.is_some()),
        Ok(other) => {
            let shown = format!("{other:?}");
            shown.chars().take(60).collect()
        }
        Err(e) => format!("undecodable frame ({e})"),
    }
}
