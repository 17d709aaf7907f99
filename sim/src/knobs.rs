//! The fault knobs of one run, all drawn from its seed.

use core::fmt;

use crate::rng::SimRng;

/// How hostile one run's network and nodes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Knobs {
    /// Nodes in the run.
    pub nodes: usize,
    /// Nodes with no direct path (behind NAT): reachable only through the relay.
    pub relay_only: usize,
    /// Base one-way latency of a direct path, in milliseconds.
    pub latency_ms: u64,
    /// Uniform jitter added to each direct datagram (reorders them).
    pub jitter_ms: u64,
    /// One-way latency between a node and the relay.
    pub relay_latency_ms: u64,
    /// Direct datagrams lost, in parts per million (up to 30%).
    pub loss_ppm: u32,
    /// Direct datagrams duplicated, in parts per million.
    pub duplicate_ppm: u32,
    /// Partitions during the run (each heals).
    pub partitions: u32,
    /// Times a node goes offline (and comes back).
    pub offline_spells: u32,
    /// Crashes (the node restarts from its store).
    pub crashes: u32,
    /// Relays in the run (every node uses each, preferring a different
    /// one first).
    pub relays: usize,
    /// Relay outages (one relay each: its connections close).
    pub relay_outages: u32,
    /// Spells of a relay that keeps its connections but answers nothing
    /// (a wedged process).
    pub silent_relays: u32,
    /// Two nodes that accept direct connections have a direct path that
    /// silently drops everything, for the whole run, while the relay path
    /// works.
    pub blackholed_pair: bool,
    /// Nodes 0 and 1 are never online at the same time after setting up
    /// their session: n0 in even virtual hours, n1 in odd ones, each also
    /// away for days; the run lasts several virtual days.
    pub never_together: bool,
    /// The largest clock skew of a node, either way, in milliseconds.
    pub max_skew_ms: u64,
    /// API operations in the workload.
    pub operations: u32,
    /// Mean milliseconds between operations.
    pub operation_gap_ms: u64,
}

impl Knobs {
    /// Draws a run's knobs.
    pub fn draw(rng: &mut SimRng) -> Self {
        let nodes = rng.range(3, 6) as usize;
        Self {
            nodes,
            relay_only: rng.range(1, (nodes / 2) as u64) as usize,
            latency_ms: rng.range(1, 150),
            jitter_ms: rng.range(0, 100),
            relay_latency_ms: rng.range(1, 80),
            loss_ppm: rng.range(0, 300_000) as u32,
            duplicate_ppm: rng.range(0, 50_000) as u32,
            partitions: rng.range(0, 3) as u32,
            offline_spells: rng.range(0, 6) as u32,
            crashes: rng.range(0, 4) as u32,
            relay_outages: rng.range(0, 2) as u32,
            max_skew_ms: rng.range(0, 120_000),
            operations: rng.range(40, 120) as u32,
            operation_gap_ms: rng.range(200, 5_000),
            relays: rng.range(2, 3) as usize,
            silent_relays: rng.range(0, 1) as u32,
            blackholed_pair: rng.chance(250_000),
            never_together: false,
        }
        .with_never_together(rng.chance(100_000))
    }

    /// With `on`, the never-online-together workload: three nodes (n2 a
    /// bystander that is always online), no crashes or partitions, and
    /// operations spread over about five virtual days.
    pub fn with_never_together(self, on: bool) -> Self {
        if !on {
            return self;
        }
        Self {
            nodes: 3,
            relay_only: 1,
            partitions: 0,
            offline_spells: 0,
            crashes: 0,
            never_together: true,
            operations: 150,
            operation_gap_ms: 45 * 60 * 1000,
            ..self
        }
    }

    /// The fixed benchmark profile: a mildly faulty network, so that the
    /// measured work is mostly the protocol's, with receipts and groups.
    pub fn benchmark() -> Self {
        Self {
            nodes: 5,
            relay_only: 1,
            latency_ms: 20,
            jitter_ms: 10,
            relay_latency_ms: 10,
            loss_ppm: 20_000,
            duplicate_ppm: 5_000,
            partitions: 0,
            offline_spells: 1,
            crashes: 1,
            relay_outages: 0,
            max_skew_ms: 1_000,
            operations: 200,
            operation_gap_ms: 500,
            relays: 2,
            silent_relays: 0,
            blackholed_pair: false,
            never_together: false,
        }
    }
}

impl fmt::Display for Knobs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "nodes={} relay_only={} latency={}ms jitter={}ms relay_latency={}ms loss={:.1}% duplicate={:.1}% \
             partitions={} offline_spells={} crashes={} relays={} relay_outages={} silent_relays={} \
             blackholed_pair={} never_together={} max_skew={}ms operations={} gap={}ms",
            self.nodes,
            self.relay_only,
            self.latency_ms,
            self.jitter_ms,
            self.relay_latency_ms,
            f64::from(self.loss_ppm) / 10_000.0,
            f64::from(self.duplicate_ppm) / 10_000.0,
            self.partitions,
            self.offline_spells,
            self.crashes,
            self.relays,
            self.relay_outages,
            self.silent_relays,
            self.blackholed_pair,
            self.never_together,
            self.max_skew_ms,
            self.operations,
            self.operation_gap_ms,
        )
    }
}
