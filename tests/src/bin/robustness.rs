//! Long-mode robustness runner:
//! `cargo run -p keyhold-tests --bin robustness -- --scenario all --duration 10m --seed N`.
//! Prints each run's report; exits non-zero on any violation. `--recheck FILE` checks a history
//! that a run with `KEYHOLD_TEST_DUMP_DIR` wrote, with the checker and with its search alone.

use std::time::{Duration, Instant};

use keyhold_tests::history::Op;
use keyhold_tests::lin::{self, Verdict};
use keyhold_tests::robustness::{self, Fault, RunConfig};

fn parse_duration(s: &str) -> Option<Duration> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return None,
    })
}

fn usage() -> ! {
    eprintln!(
        "usage: robustness [--members 1|3] [--proxies N] [--scenario all|{}] [--duration 30s|10m] [--seed N] [--clients N] [--failpoints a,b]\n\
         robustness --recheck <history.txt> [--duration budget]   (a history KEYHOLD_TEST_DUMP_DIR wrote)\n\
         (cluster scenarios: {}; with --proxies also: {})",
        Fault::ALL.map(Fault::name).join("|"),
        Fault::CLUSTER.map(Fault::name).join("|"),
        Fault::PROXY.map(Fault::name).join("|")
    );
    std::process::exit(2)
}

/// `--recheck FILE`: checks a history that `KEYHOLD_TEST_DUMP_DIR` wrote, with [`lin::check`]
/// and with the search alone, and prints both verdicts and times.
fn recheck(path: &str, budget: Duration) -> std::process::ExitCode {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{path}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let ops: Result<Vec<Op>, String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::parse)
        .collect();
    let ops = match ops {
        Ok(ops) => ops,
        Err(e) => {
            eprintln!("{path}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let unknown = ops.iter().filter(|o| o.ret.is_none()).count();
    println!("{path}: {} ops, {unknown} without a return", ops.len());
    let started = Instant::now();
    let verdict = lin::check(&ops, budget);
    println!("check: {verdict} in {} ms", started.elapsed().as_millis());
    let started = Instant::now();
    let searched = lin::search(&ops, budget);
    println!(
        "search alone: {searched} in {} ms",
        started.elapsed().as_millis()
    );
    if verdict == Verdict::Linearizable {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut scenarios, mut duration, mut seed, mut clients, mut failpoints, mut members) =
        (None, Duration::from_secs(30), None, 4, Vec::new(), 1);
    let mut proxies = 0;
    let mut recheck_file = None;
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--scenario" if v == "all" => scenarios = None,
            "--scenario" => scenarios = Some(vec![Fault::parse(&v).unwrap_or_else(|| usage())]),
            "--members" => members = v.parse().unwrap_or_else(|_| usage()),
            "--proxies" => proxies = v.parse().unwrap_or_else(|_| usage()),
            "--duration" => duration = parse_duration(&v).unwrap_or_else(|| usage()),
            "--seed" => seed = Some(v.parse().unwrap_or_else(|_| usage())),
            "--clients" => clients = v.parse().unwrap_or_else(|_| usage()),
            "--failpoints" => failpoints = v.split(',').map(str::to_string).collect(),
            "--recheck" => recheck_file = Some(v),
            _ => usage(),
        }
    }
    if let Some(path) = recheck_file {
        return recheck(&path, duration.max(robustness::CHECK_BUDGET_MIN));
    }
    let scenarios = scenarios.unwrap_or_else(|| {
        if members > 1 && proxies > 0 {
            Fault::CLUSTER.into_iter().chain(Fault::PROXY).collect()
        } else if members > 1 {
            Fault::CLUSTER.to_vec()
        } else {
            Fault::ALL.to_vec()
        }
    });
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut failed = false;
    for (i, fault) in scenarios.into_iter().enumerate() {
        let cfg = RunConfig {
            fault,
            duration,
            seed: seed.wrapping_add(i as u64),
            clients,
            failpoints: failpoints.clone(),
            members,
            proxies,
        };
        let report = rt.block_on(robustness::run(&cfg));
        print!("{}", report.summary(&cfg));
        failed |= !report.passed();
    }
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
