//! Long-mode robustness runner:
//! `cargo run -p keyhold-tests --bin robustness -- --scenario all --duration 10m --seed N`.
//! Prints each run's report; exits non-zero on any violation.

use std::time::Duration;

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
         (cluster scenarios: {}; with --proxies also: {})",
        Fault::ALL.map(Fault::name).join("|"),
        Fault::CLUSTER.map(Fault::name).join("|"),
        Fault::PROXY.map(Fault::name).join("|")
    );
    std::process::exit(2)
}

fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut scenarios, mut duration, mut seed, mut clients, mut failpoints, mut members) =
        (None, Duration::from_secs(30), None, 4, Vec::new(), 1);
    let mut proxies = 0;
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
            _ => usage(),
        }
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
