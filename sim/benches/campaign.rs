//! The simulator's throughput on a fixed mixed workload, and where its time
//! goes: `cargo bench -p p2pchat-sim --bench campaign`.
//!
//! The workload is `Knobs::benchmark()` (five nodes, one behind NAT, 2%
//! loss, one crash and one offline spell, 200 operations of 1:1 and group
//! messages with receipts and reads) over seeds 0..30, on one thread, with
//! the time inside protocol calls (engines, relay, relay clients, and their
//! in-memory stores) measured apart from the simulator's own (scheduling,
//! the network model, invariant checks, tracing).

#![allow(clippy::disallowed_methods, reason = "a benchmark measures wall-clock time")]

use std::time::{Duration, Instant};

use p2pchat_sim::{run, Knobs, Options};

fn main() {
    let options = Options { knobs: Some(Knobs::benchmark()), profile: true, ..Options::default() };
    let seeds = 0..30u64;
    let started = Instant::now();
    let (mut deliveries, mut dh_steps, mut accepted) = (0u64, 0u64, 0usize);
    let (mut protocol, mut total) = (Duration::ZERO, Duration::ZERO);
    for seed in seeds.clone() {
        let report = run(seed, &options);
        if let Some(failure) = report.failure_report() {
            eprintln!("{failure}");
            std::process::exit(1);
        }
        deliveries += report.deliveries;
        dh_steps += report.dh_steps;
        accepted += report.accepted;
        protocol += report.protocol_time;
        total += report.total_time;
    }
    let wall = started.elapsed().as_secs_f64();
    let share = protocol.as_secs_f64() / total.as_secs_f64().max(1e-9);
    println!(
        "fixed workload: {} seeds, {accepted} messages accepted, {deliveries} deliveries",
        seeds.end - seeds.start
    );
    println!("  deliveries per second (one thread): {:.0}", deliveries as f64 / wall);
    println!("  DH ratchet steps per delivery:      {:.2}", dh_steps as f64 / deliveries.max(1) as f64);
    println!("  time in protocol calls:             {:.1}%", share * 100.0);
    println!("  simulator overhead:                 {:.1}%", (1.0 - share) * 100.0);

    // A drawn campaign, as CI and the long command run it.
    let jobs = std::thread::available_parallelism().map_or(1, usize::from);
    let started = Instant::now();
    let (progress, failures) = p2pchat_sim::campaign(0..200, jobs, &Options::default(), |_, _| {});
    let secs = started.elapsed().as_secs_f64();
    println!(
        "drawn campaign: 200 seeds on {jobs} threads in {secs:.1}s ({} failed, {:.0} deliveries/s); 10,000 seeds ≈ {:.1} min",
        failures.len(),
        progress.deliveries as f64 / secs,
        secs * 50.0 / 60.0
    );
}
