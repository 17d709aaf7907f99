//! A deterministic network simulator for the p2pchat protocol core.
//!
//! One seed decides everything in a run: the fault knobs, the network's
//! latency, loss and duplication, the fault schedule (partitions, nodes
//! going offline, crashes with restarts from the store, relay outages,
//! clock skew), the workload, and every engine's randomness. Nodes (the
//! same `protocol::node::Node` the binary ships, routing included) and
//! two or three relays, each on its in-memory store, are driven in virtual time by their
//! driving rules; a checker holds them to the invariants after every step
//! and once the network has healed and gone quiet. The same seed gives the
//! same trace, bit for bit.
#![forbid(unsafe_code)]

mod checker;
mod knobs;
mod rng;
mod store;
mod trace;
mod world;

pub use checker::Violation;
pub use knobs::Knobs;
pub use store::Bug;
pub use trace::TRACE_TAIL;
pub use world::{Failure, Options, Report, START};

/// The fault knobs a seed draws (what a run of it prints first).
pub fn knobs_for(seed: u64) -> Knobs {
    Knobs::draw(&mut rng::SimRng::new(seed, rng::stream::KNOBS))
}

/// Runs one seed.
pub fn run(seed: u64, options: &Options) -> Report {
    world::World::new(seed, options.clone()).run()
}

/// Where a campaign stands, for its progress line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    /// Seeds finished.
    pub done: u64,
    /// Seeds in the campaign.
    pub total: u64,
    /// Seeds that broke an invariant.
    pub failures: u64,
    /// Deliveries so far.
    pub deliveries: u64,
    /// Messages accepted so far.
    pub accepted: u64,
    /// Once every seed is done: their behaviour hashes as one, in seed
    /// order, whatever the thread count.
    pub behaviour_hash: u64,
}

/// Runs `seeds` on `jobs` threads. `on_report` sees every report as it
/// comes (in completion order) with the progress so far; the failing
/// reports are returned, in seed order.
pub fn campaign(
    seeds: core::ops::Range<u64>,
    jobs: usize,
    options: &Options,
    mut on_report: impl FnMut(&Report, &Progress),
) -> (Progress, Vec<Report>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let total = seeds.end.saturating_sub(seeds.start);
    let next = AtomicU64::new(seeds.start);
    let end = seeds.end;
    let (tx, rx) = std::sync::mpsc::channel::<Report>();
    let mut progress = Progress { total, ..Progress::default() };
    let mut failures = Vec::new();
    let mut behaviours = std::collections::BTreeMap::new();
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            let tx = tx.clone();
            let next = &next;
            scope.spawn(move || loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end || tx.send(run(seed, options)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        for report in rx {
            progress.done += 1;
            progress.deliveries += report.deliveries;
            progress.accepted += report.accepted as u64;
            behaviours.insert(report.seed, report.behaviour_hash);
            if report.failure.is_some() {
                progress.failures += 1;
            }
            on_report(&report, &progress);
            if report.failure.is_some() {
                failures.push(report);
            }
        }
    });
    failures.sort_by_key(|r| r.seed);
    progress.behaviour_hash = trace::combine(&behaviours);
    (progress, failures)
}

impl Report {
    /// One line: what the run did.
    pub fn summary(&self) -> String {
        format!(
            "seed {}: {} — {} messages accepted, {} deliveries, {} failed with a reason, {} DH ratchet steps, \
             {:.1} virtual minutes, {} steps, trace {:016x}, behaviour {:016x}",
            self.seed,
            if self.failure.is_some() { "FAILED" } else { "ok" },
            self.accepted,
            self.deliveries,
            self.failed,
            self.dh_steps,
            self.virtual_ms as f64 / 60_000.0,
            self.steps,
            self.trace_hash,
            self.behaviour_hash,
        )
    }

    /// Everything needed to reproduce and read a failure.
    pub fn failure_report(&self) -> Option<String> {
        let failure = self.failure.as_ref()?;
        let mut out = format!(
            "seed {} FAILED at {:.3}s: {}\nfault knobs: {}\nreproduce: cargo run --release -p p2pchat-sim -- --seed {}\nlast {} steps:\n",
            self.seed,
            failure.at_ms as f64 / 1000.0,
            failure.violation,
            self.knobs,
            self.seed,
            failure.tail.len(),
        );
        for line in &failure.tail {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
        Some(out)
    }
}
