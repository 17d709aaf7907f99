//! `p2pchat-sim`: run one seed, or a campaign of seeds.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use p2pchat_sim::{run, Bug, Options};

const USAGE: &str = "\
usage: p2pchat-sim --seed N            run one seed and print its summary
       p2pchat-sim --seeds A..B        run seeds A (inclusive) to B (exclusive)
options:
       --jobs N                        worker threads (default: the CPUs)
       --tail N                        steps shown before a failure (default 60)
       --bug stale-restart|forget-incoming|status-regress
                                       plant a deliberately wrong behaviour (to see the checker catch it)";

enum Mode {
    One(u64),
    Campaign(u64, u64),
}

struct Args {
    mode: Mode,
    jobs: usize,
    bug: Bug,
    tail: usize,
}

fn parse_u64(flag: &str, value: Option<String>) -> Result<u64, String> {
    let value = value.ok_or_else(|| format!("{flag} needs a value"))?;
    value.parse().map_err(|_| format!("{flag} takes a non-negative integer, not {value:?}"))
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut mode = None;
    let mut jobs = std::thread::available_parallelism().map_or(1, usize::from);
    let mut bug = Bug::None;
    let mut tail = 0;
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--seed" => mode = Some(Mode::One(parse_u64("--seed", args.next())?)),
            "--seeds" => {
                let value = args.next().ok_or("--seeds needs a range such as 0..2000")?;
                let (a, b) = value.split_once("..").ok_or_else(|| format!("--seeds takes A..B, not {value:?}"))?;
                let a: u64 = a.parse().map_err(|_| format!("bad start of --seeds range: {a:?}"))?;
                let b: u64 = b.parse().map_err(|_| format!("bad end of --seeds range: {b:?}"))?;
                if b <= a {
                    return Err(format!("--seeds {value}: the range is empty"));
                }
                mode = Some(Mode::Campaign(a, b));
            }
            "--jobs" => jobs = parse_u64("--jobs", args.next())?.clamp(1, 256) as usize,
            "--bug" => {
                let name = args.next().ok_or("--bug needs a name")?;
                bug = Bug::parse(&name).ok_or_else(|| format!("unknown bug {name:?}"))?;
            }
            "--tail" => tail = parse_u64("--tail", args.next())?.clamp(1, 10_000_000) as usize,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let mode = mode.ok_or("give --seed N or --seeds A..B")?;
    Ok(Args { mode, jobs, bug, tail })
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let options = Options { bug: args.bug, tail: args.tail, ..Options::default() };
    match args.mode {
        Mode::One(seed) => {
            println!("fault knobs: {}", p2pchat_sim::knobs_for(seed));
            let report = run(seed, &options);
            println!("{}", report.summary());
            if let Some(failure) = report.failure_report() {
                println!("{failure}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Mode::Campaign(a, b) => campaign(a, b, args.jobs, &options),
    }
}

#[allow(clippy::disallowed_methods, reason = "progress shows wall-clock speed; runs never see it")]
fn campaign(first: u64, end: u64, jobs: usize, options: &Options) -> ExitCode {
    let started = Instant::now();
    let mut shown = Instant::now();
    let (progress, failures) = p2pchat_sim::campaign(first..end, jobs, options, |report, progress| {
        if let Some(failure) = report.failure_report() {
            eprintln!("\n{failure}");
        }
        if shown.elapsed() >= Duration::from_secs(1) || progress.done == progress.total {
            shown = Instant::now();
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            eprint!(
                "\rseeds {}/{}  failures {}  deliveries/s {:.0}  elapsed {:.0}s ",
                progress.done,
                progress.total,
                progress.failures,
                progress.deliveries as f64 / secs,
                secs
            );
        }
    });
    eprintln!();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} seeds in {secs:.1}s: {} failed; {} messages accepted, {} deliveries ({:.0}/s)",
        progress.total,
        progress.failures,
        progress.accepted,
        progress.deliveries,
        progress.deliveries as f64 / secs.max(1e-9)
    );
    println!("behaviour hash of seeds {first}..{end}: {:016x}", progress.behaviour_hash);
    if failures.is_empty() {
        return ExitCode::SUCCESS;
    }
    let seeds: Vec<u64> = failures.iter().map(|r| r.seed).collect();
    println!("failing seeds: {seeds:?}");
    ExitCode::FAILURE
}
