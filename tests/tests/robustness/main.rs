//! CI mode of the robustness suite: every scenario, short, against a single member; and proof
//! that the checkers fail on planted server faults (failpoints, test builds only).
//!
//! Seed: `KEYHOLD_SEED` if set, else derived from the clock; always printed.

use std::time::Duration;

use keyhold_tests::lin::Verdict;
use keyhold_tests::robustness::{self, Fault, Report, RunConfig};

/// Traffic per scenario in CI.
const CI_DURATION: Duration = Duration::from_secs(4);

fn seed() -> u64 {
    std::env::var("KEYHOLD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(7, |d| d.as_nanos() as u64)
        })
}

async fn scenario(fault: Fault, failpoints: &[&str]) -> (RunConfig, Report) {
    scenario_on(1, fault, failpoints).await
}

async fn scenario_on(members: usize, fault: Fault, failpoints: &[&str]) -> (RunConfig, Report) {
    scenario_with(members, 0, fault, failpoints).await
}

async fn scenario_with(
    members: usize,
    proxies: usize,
    fault: Fault,
    failpoints: &[&str],
) -> (RunConfig, Report) {
    let cfg = RunConfig {
        fault,
        duration: CI_DURATION,
        seed: seed(),
        clients: if members > 1 { 6 } else { 4 },
        failpoints: failpoints.iter().map(|s| s.to_string()).collect(),
        members,
        proxies,
    };
    println!(
        "robustness members={members} proxies={proxies} scenario={} seed={}",
        fault.name(),
        cfg.seed
    );
    let report = robustness::run(&cfg).await;
    println!("{}", report.summary(&cfg));
    (cfg, report)
}

async fn must_pass(fault: Fault) {
    must_pass_on(1, fault).await;
}

async fn must_pass_on(members: usize, fault: Fault) {
    must_pass_with(members, 0, fault).await;
}

async fn must_pass_with(members: usize, proxies: usize, fault: Fault) {
    let (cfg, report) = scenario_with(members, proxies, fault, &[]).await;
    assert!(
        report.ops > 100,
        "too little traffic to mean anything:\n{}",
        report.summary(&cfg)
    );
    assert!(
        report.watch_events > 0,
        "watches saw nothing:\n{}",
        report.summary(&cfg)
    );
    assert!(report.passed(), "violation:\n{}", report.summary(&cfg));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn baseline() {
    must_pass(Fault::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_and_restart() {
    must_pass(Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_past_client_timeouts() {
    must_pass(Fault::Pause).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ordered_restart() {
    must_pass(Fault::Restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compaction_while_watches_catch_up() {
    must_pass(Fault::Compaction).await;
}

// Three members: clients spread over all of them (followers forward writes and ask the leader
// for read indexes), watches on different members.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_baseline() {
    must_pass_on(3, Fault::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_kill_leader() {
    must_pass_on(3, Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_kill_follower() {
    must_pass_on(3, Fault::KillFollower).await;
}

/// Short leases kept alive, then left to expire, across a leader kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_lease_expiry_across_a_leader_change() {
    must_pass_on(3, Fault::LeaseExpiry).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_pause_leader_past_the_election_timeout() {
    must_pass_on(3, Fault::Pause).await;
}

/// The leader cut off from the majority both ways. (Its two earlier reports of a lost write
/// were harness defects: see tests/README.md, track record.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_partition_leader_from_the_majority() {
    must_pass_on(3, Fault::Partition).await;
}

/// The leader's outgoing peer traffic dropped: it keeps hearing the others' votes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_one_way_partition_of_the_leader() {
    must_pass_on(3, Fault::OneWayPartition).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_restart_all_members() {
    must_pass_on(3, Fault::RestartAll).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_member_churn_under_traffic() {
    must_pass_on(3, Fault::MemberChurn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_compaction_while_watches_catch_up() {
    must_pass_on(3, Fault::Compaction).await;
}

/// A server that answers linearizable reads one revision stale must fail the checker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planted_stale_read_is_caught() {
    let (cfg, report) = scenario(Fault::None, &["stale-read"]).await;
    assert!(
        matches!(report.linearizable, Some(Verdict::Violation { .. })),
        "the checker missed stale reads:\n{}",
        report.summary(&cfg)
    );
    assert!(!report.failing_history.is_empty());
}

/// A server that drops one watch response must fail the watch validators.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planted_dropped_watch_event_is_caught() {
    let (cfg, report) = scenario(Fault::None, &["drop-watch-event"]).await;
    assert!(
        report
            .watch_violations
            .iter()
            .any(|v| v.contains("missed event")),
        "the watch validators missed a dropped event:\n{}",
        report.summary(&cfg)
    );
}

/// A leader that expires leases before their TTL ran out must fail the checker: the expiry
/// client's reads see the keys gone before the earliest time its last keepalive allows (the
/// same run without the failpoint is `baseline`, which passes).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planted_early_lease_expiry_is_caught() {
    let (cfg, report) = scenario(Fault::None, &["early-lease-expiry"]).await;
    assert!(
        matches!(report.linearizable, Some(Verdict::Violation { .. })),
        "the checker missed leases expiring early:\n{}",
        report.summary(&cfg)
    );
    assert!(!report.failing_history.is_empty());
}

/// Clients and watches through two proxies; one proxy is killed and restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxies_kill_a_proxy() {
    must_pass_with(3, 2, Fault::ProxyKill).await;
}

/// Clients and watches through two proxies; one proxy is cut off from the member it uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxies_partition_a_proxy_from_its_member() {
    must_pass_with(3, 2, Fault::ProxyPartition).await;
}

/// Clients and watches through two proxies; the member they use stops answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxies_pause_the_member_they_use() {
    must_pass_with(3, 2, Fault::ProxyMemberPause).await;
}
