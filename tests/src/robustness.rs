//! Robustness scenarios: concurrent clients and watches against a real `keyhold-node`, one
//! fault schedule, then the linearizability checker and the watch validators over what was
//! recorded. Every random choice derives from one seed; a failure report carries the seed, the
//! fault timeline and the smallest failing sub-history.
//!
//! ```text
//!  seed ─► clients (Get/Put/Delete/CAS/Count/leases on 10 keys, unique values) ─► Recorder
//!       ─► lease-expiry client (short leases, keepalives, expiries as ops) ─► Recorder
//!       ─► watches (prefix, from revision 1 / now / mid-run; resumed after breaks) ─► WatchLogs
//!       ─► fault injector (kill -9 / SIGSTOP / SIGTERM / compaction) ─► timeline
//!  stop ─► ground truth (history read from the data dir) ─► patch unknown writes ─► checks
//! ```

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};

use crate::cluster::Cluster;
use crate::history::{Input, Op, Output, Recorder};
use crate::lin::{self, Verdict};
use crate::watch_check::{self, SeenEvent, SeenResponse, Truth, WatchLog};

/// Keys in the traffic's key space (small, so clients conflict).
const KEY_COUNT: u8 = 10;
/// Per-request client timeout; a write that times out has an unknown outcome.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Least budget for the linearizability search; a long run gets as long as its traffic ran.
pub const CHECK_BUDGET_MIN: Duration = Duration::from_secs(120);
/// TTL of traffic leases: they never expire during a run, so expiry (tested elsewhere) adds no
/// wall-clock nondeterminism to the model.
const LEASE_TTL_SECONDS: i64 = 3600;
/// Keys only the lease-expiry client writes, each with its current short lease, so a tombstone
/// of one is that lease's expiry.
const EXPIRY_KEYS: [u8; 3] = [10, 11, 12];
/// TTL of the leases the lease-expiry client leaves to expire.
const SHORT_LEASE_TTL_SECONDS: i64 = 3;
/// Keepalive period of the short leases (a third of their TTL, as etcd's clients do).
const SHORT_LEASE_KEEPALIVE: Duration = Duration::from_secs(1);
/// How long past its TTL an unkept lease may live before it counts as never expiring: a new
/// leader restores the remaining TTL, and a killed leader's restart takes a few seconds.
const EXPIRY_GRACE: Duration = Duration::from_secs(15);
/// Prefix every key lives under.
const PREFIX: &str = "k";

/// What goes wrong during a run. Process faults hit the leader (on a single member, the only
/// member).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Nothing: a baseline.
    None,
    /// kill -9 the leader, then restart it on the same data dir.
    Kill,
    /// SIGSTOP the leader past the client timeouts (and the election timeout), then SIGCONT.
    Pause,
    /// SIGTERM (ordered shutdown) the leader, then restart it.
    Restart,
    /// Compaction while a watch replays history from revision 1.
    Compaction,
    /// kill -9 a follower, then restart it (cluster only).
    KillFollower,
    /// Short leases kept alive for a while and then left to expire, while the leader is killed
    /// and restarted: no expiry before the TTL its last keepalive granted, none missed after a
    /// leader change (cluster only).
    LeaseExpiry,
    /// Cut the leader off from the majority, both ways, then heal (cluster only; needs the
    /// nodes' failpoints build).
    Partition,
    /// Cut the leader's outgoing peer traffic only (one-way partition), then heal (cluster
    /// only).
    OneWayPartition,
    /// SIGTERM every member, then start them all again (cluster only).
    RestartAll,
    /// Add a learner, promote it, remove a follower, all under traffic (cluster only).
    MemberChurn,
    /// kill -9 a proxy every client and watch of its share goes through, then restart it
    /// (runs with proxies only).
    ProxyKill,
    /// SIGSTOP the member the proxies use (their first endpoint) past the timeouts, then
    /// SIGCONT: the proxies must move to other members (runs with proxies only).
    ProxyMemberPause,
    /// Cut proxy 0 off from member 0 (the member it uses), then heal; the member stays in the
    /// cluster (runs with proxies only; the proxy's failpoints build).
    ProxyPartition,
}

impl Fault {
    /// Every single-member scenario.
    pub const ALL: [Fault; 5] = [
        Fault::None,
        Fault::Kill,
        Fault::Pause,
        Fault::Restart,
        Fault::Compaction,
    ];

    /// Every cluster scenario.
    pub const CLUSTER: [Fault; 10] = [
        Fault::None,
        Fault::Kill,
        Fault::KillFollower,
        Fault::LeaseExpiry,
        Fault::Pause,
        Fault::Partition,
        Fault::OneWayPartition,
        Fault::RestartAll,
        Fault::MemberChurn,
        Fault::Compaction,
    ];

    /// Scenarios that need proxies in front of a cluster.
    pub const PROXY: [Fault; 3] = [
        Fault::ProxyKill,
        Fault::ProxyMemberPause,
        Fault::ProxyPartition,
    ];

    /// Scenario name.
    pub fn name(self) -> &'static str {
        match self {
            Fault::None => "baseline",
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::Restart => "restart",
            Fault::Compaction => "compaction",
            Fault::KillFollower => "kill-follower",
            Fault::LeaseExpiry => "lease-expiry",
            Fault::Partition => "partition",
            Fault::OneWayPartition => "one-way-partition",
            Fault::RestartAll => "restart-all",
            Fault::MemberChurn => "member-churn",
            Fault::ProxyKill => "proxy-kill",
            Fault::ProxyMemberPause => "proxy-member-pause",
            Fault::ProxyPartition => "proxy-partition",
        }
    }

    /// Parses a scenario name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain(Self::CLUSTER)
            .chain(Self::PROXY)
            .find(|f| f.name() == s)
    }
}

/// One run's settings.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The fault.
    pub fault: Fault,
    /// Traffic duration.
    pub duration: Duration,
    /// Seed for every random choice.
    pub seed: u64,
    /// Concurrent clients.
    pub clients: usize,
    /// Server failpoints to enable (test-only builds).
    pub failpoints: Vec<String>,
    /// Cluster size (1 = a single member). Client `i` talks to member `i % members` only, so
    /// followers forward writes and ask the leader for read indexes.
    pub members: usize,
    /// `keyhold-proxy` processes in front of the cluster (0 = none). With proxies, client `i`
    /// and the watches talk to proxy `i % proxies` only, each proxy to every member.
    pub proxies: usize,
}

/// What a run found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Seed of the run.
    pub seed: u64,
    /// Operations recorded (after patching).
    pub ops: usize,
    /// Writes with unknown outcome before patching.
    pub unknown_writes: usize,
    /// Watch events received.
    pub watch_events: usize,
    /// Timestamped fault log.
    pub timeline: Vec<String>,
    /// Linearizability verdict.
    pub linearizable: Option<Verdict>,
    /// Watch guarantee violations.
    pub watch_violations: Vec<String>,
    /// Acknowledged writes missing from the persisted history.
    pub lost_writes: Vec<String>,
    /// Leases that outlived their TTL by more than [`EXPIRY_GRACE`], or whose keys were not
    /// deleted at one revision.
    pub lease_violations: Vec<String>,
    /// Lease expiries pinned to the revision that deleted their keys (lease-expiry scenario).
    pub lease_expiries: usize,
    /// Serializable reads checked against the persisted history.
    pub serializable_reads: usize,
    /// Serializable reads whose answer was not the key's state at the answer's revision.
    pub serializable_violations: Vec<String>,
    /// For a violation: the smallest failing sub-history found.
    pub failing_history: Vec<Op>,
    /// Time the linearizability check took.
    pub check_ms: u64,
    /// The fault could not be injected as planned (a run that did not test what it claims).
    pub fault_errors: Vec<String>,
}

impl Report {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.linearizable == Some(Verdict::Linearizable)
            && self.watch_violations.is_empty()
            && self.lost_writes.is_empty()
            && self.lease_violations.is_empty()
            && self.serializable_violations.is_empty()
            && self.fault_errors.is_empty()
    }

    /// A human-readable summary (printed on failure with the reproducer command).
    pub fn summary(&self, cfg: &RunConfig) -> String {
        let mut s = format!(
            "scenario={} members={} proxies={} seed={} ops={} unknown_writes={} watch_events={} linearizable={} watch_violations={} lost_writes={} lease_expiries={} lease_violations={} serializable_reads={} serializable_violations={} check_ms={}\n",
            cfg.fault.name(),
            cfg.members,
            cfg.proxies,
            self.seed,
            self.ops,
            self.unknown_writes,
            self.watch_events,
            match &self.linearizable {
                Some(Verdict::Linearizable) => "yes".to_string(),
                Some(v) => v.to_string(),
                None => "not checked".to_string(),
            },
            self.watch_violations.len(),
            self.lost_writes.len(),
            self.lease_expiries,
            self.lease_violations.len(),
            self.serializable_reads,
            self.serializable_violations.len(),
            self.check_ms,
        );
        s += &format!(
            "reproduce: cargo run -p keyhold-tests --bin robustness -- --members {} --proxies {} --scenario {} --duration {}s --seed {}{}\n",
            cfg.members,
            cfg.proxies,
            cfg.fault.name(),
            cfg.duration.as_secs(),
            self.seed,
            if cfg.failpoints.is_empty() {
                String::new()
            } else {
                format!(" --failpoints {}", cfg.failpoints.join(","))
            }
        );
        for e in &self.fault_errors {
            s += &format!("  fault error: {e}\n");
        }
        for t in &self.timeline {
            s += &format!("  fault: {t}\n");
        }
        for v in self.watch_violations.iter().take(20) {
            s += &format!("  watch: {v}\n");
        }
        for l in self.lost_writes.iter().take(20) {
            s += &format!("  lost: {l}\n");
        }
        for l in self.lease_violations.iter().take(20) {
            s += &format!("  lease: {l}\n");
        }
        for v in self.serializable_violations.iter().take(20) {
            s += &format!("  serializable: {v}\n");
        }
        if !self.failing_history.is_empty() {
            s += "  smallest failing history (last 30 ops):\n";
            let skip = self.failing_history.len().saturating_sub(30);
            for op in &self.failing_history[skip..] {
                s += &format!(
                    "    c{} [{}..{:?}] {:?} -> {:?}\n",
                    op.client, op.call, op.ret, op.input, op.output
                );
            }
        }
        s
    }
}

/// SplitMix64: small, seedable, good enough to drive choices.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

fn key(k: u8) -> String {
    format!("{PREFIX}{k}")
}

fn parse_value(v: &[u8]) -> u64 {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Whether a failed request provably had no effect (nothing to record): it never reached a
/// server, or the server refused it before proposing (`no leader` is only answered before a
/// proposal: no leader known, or the leader unreachable; a server that broke this rule would
/// show up as a linearizability violation).
fn never_sent(e: &etcd_client::Error) -> bool {
    let text = format!("{e:?}").to_lowercase();
    text.contains("connection refused")
        || text.contains("tcp connect error")
        || text.contains("etcdserver: no leader")
}

async fn connect(endpoint: &str) -> Option<Client> {
    let opts = etcd_client::ConnectOptions::new()
        .with_timeout(REQUEST_TIMEOUT)
        .with_connect_timeout(REQUEST_TIMEOUT);
    Client::connect([endpoint], Some(opts)).await.ok()
}

/// Connects `client` unless it is connected; false (after a short pause) when that failed.
async fn ensure_connected(client: &mut Option<Client>, endpoint: &str) -> bool {
    if client.is_none() {
        *client = connect(endpoint).await;
        if client.is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    client.is_some()
}

async fn run_client(id: usize, endpoint: String, seed: u64, rec: Recorder, until: Instant) {
    let mut rng = Rng::new(seed);
    let mut client = None;
    let mut counter = 0u64;
    let mut known_mod = [0i64; KEY_COUNT as usize];
    // Leases this client granted (some may be revoked: using them tests "lease not found").
    let mut leases: Vec<i64> = Vec::new();
    while Instant::now() < until {
        if !ensure_connected(&mut client, &endpoint).await {
            continue;
        }
        let k = rng.below(u64::from(KEY_COUNT)) as u8;
        counter += 1;
        let value = ((id as u64 + 1) << 32) | counter;
        let lease = (!leases.is_empty()).then(|| leases[rng.below(leases.len() as u64) as usize]);
        let input = match (rng.below(100), lease) {
            (0..=19, _) => Input::Get(k),
            (20..=26, _) => Input::SerializableGet(k),
            (27..=51, _) => Input::Put(k, value),
            (52..=59, _) => Input::Delete(k),
            (60..=71, _) => Input::CompareAndPut {
                key: k,
                expected_mod: known_mod[k as usize],
                value,
            },
            (72..=79, _) => Input::CountAll,
            (80..=84, _) | (85..=99, None) => {
                let lease_id = ((id as i64 + 1) << 40) | counter as i64;
                leases.push(lease_id);
                Input::LeaseGrant(lease_id, LEASE_TTL_SECONDS)
            }
            (85..=95, Some(l)) => Input::PutWithLease(k, value, l),
            (_, Some(l)) => Input::LeaseRevoke(l),
            (_, None) => Input::CountAll,
        };
        if let Some(Output::Get { mod_revision, .. }) = perform(&mut client, &rec, id, input).await
        {
            known_mod[k as usize] = mod_revision;
        }
    }
}

/// Runs `input` on the connected `client` and records it: an answer as it came, a failed
/// write as unknown (a failed read is dropped, it changed nothing). A refused or timed-out
/// call drops the connection (a paused server may hold it forever).
async fn perform(
    client: &mut Option<Client>,
    rec: &Recorder,
    id: usize,
    input: Input,
) -> Option<Output> {
    let c = client.as_mut()?;
    let call = rec.now();
    let result = tokio::time::timeout(REQUEST_TIMEOUT, execute(c, &input)).await;
    let ret = rec.now();
    match result {
        Ok(Ok(output)) => {
            rec.record(Op {
                client: id,
                call,
                ret: Some(ret),
                input,
                output: output.clone(),
            });
            return Some(output);
        }
        Ok(Err(e)) if never_sent(&e) => *client = None,
        failed => {
            if !input.is_read() {
                rec.record(Op {
                    client: id,
                    call,
                    ret: None,
                    input,
                    output: Output::Unknown,
                });
            }
            if failed.is_err() {
                *client = None;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    None
}

/// The lease-expiry scenario's client, one lease at a time: grant a short lease, attach 1–3 of
/// [`EXPIRY_KEYS`] to it, keep it alive a few times, then stop and wait for the server to
/// expire it. The expiry is recorded as an op whose call is the earliest time it may happen
/// (the last keepalive's call plus the TTL it answered: a member refreshes after the call, a
/// proxy answers with the TTL left); a lease whose keys outlive that by [`EXPIRY_GRACE`] is a
/// violation.
async fn run_lease_client(
    id: usize,
    endpoint: String,
    seed: u64,
    rec: Recorder,
    until: Instant,
    violations: Arc<Mutex<Vec<String>>>,
) {
    let mut rng = Rng::new(seed);
    let mut client = None;
    let mut counter = 0u64;
    while Instant::now() < until {
        if !ensure_connected(&mut client, &endpoint).await {
            continue;
        }
        counter += 1;
        let lease = ((id as i64 + 1) << 40) | counter as i64;
        let call = rec.now();
        let Some(Output::Lease { .. }) = perform(
            &mut client,
            &rec,
            id,
            Input::LeaseGrant(lease, SHORT_LEASE_TTL_SECONDS),
        )
        .await
        else {
            continue; // not granted, or unknown: a lease without keys expires unseen
        };
        let mut earliest = call + secs_to_ns(SHORT_LEASE_TTL_SECONDS);
        let attached = 1 + rng.below(EXPIRY_KEYS.len() as u64) as usize;
        for &k in &EXPIRY_KEYS[..attached] {
            counter += 1;
            let value = ((id as u64 + 1) << 32) | counter;
            ensure_connected(&mut client, &endpoint).await;
            perform(&mut client, &rec, id, Input::PutWithLease(k, value, lease)).await;
        }
        for _ in 0..rng.below(4) {
            tokio::time::sleep(SHORT_LEASE_KEEPALIVE).await;
            ensure_connected(&mut client, &endpoint).await;
            if let Some(c) = client.as_mut() {
                match keep_alive_once(c, &rec, id, lease).await {
                    Ok(Some(bound)) => earliest = earliest.max(bound),
                    Ok(None) => break, // gone already: the expiry op must come before that
                    Err(()) => client = None,
                }
            }
        }
        rec.record(Op {
            client: usize::MAX,
            call: earliest,
            ret: None,
            input: Input::LeaseExpire(lease),
            output: Output::Unknown,
        });
        // Wait for the expiry: the keys gone (nobody else writes them, so absence is enough).
        let deadline =
            Instant::now() + Duration::from_secs(SHORT_LEASE_TTL_SECONDS as u64) + EXPIRY_GRACE;
        let mut gone = false;
        while !gone && Instant::now() < deadline {
            ensure_connected(&mut client, &endpoint).await;
            let mut present = false;
            for &k in &EXPIRY_KEYS[..attached] {
                match perform(&mut client, &rec, id, Input::Get(k)).await {
                    Some(Output::Get { value: None, .. }) => {}
                    _ => present = true,
                }
            }
            gone = !present;
            if !gone {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        if !gone {
            violations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!(
                    "lease {lease:#x}: its keys still there {}s after its TTL ran out",
                    EXPIRY_GRACE.as_secs()
                ));
        }
    }
}

/// Whole seconds (a TTL) in the recorder's nanoseconds.
fn secs_to_ns(seconds: i64) -> u64 {
    Duration::from_secs(seconds.max(0) as u64).as_nanos() as u64
}

/// One keepalive that reports its TTL, recorded as a `LeaseKeepAlive` read. etcd-client
/// consumes the first answer of a keepalive stream (an error when its TTL is 0), so a second
/// keepalive on the stream carries the TTL. Returns the earliest expiry the answer allows (its
/// call time plus the answered TTL), `None` when the lease is gone, `Err` on a failed call.
async fn keep_alive_once(
    c: &mut Client,
    rec: &Recorder,
    id: usize,
    lease: i64,
) -> Result<Option<u64>, ()> {
    let call = rec.now();
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let (mut keeper, mut answers) = match c.lease_keep_alive(lease).await {
            Ok(k) => k,
            Err(etcd_client::Error::LeaseKeepAliveError(m)) if m == "lease not found" => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let second = rec.now();
        keeper.keep_alive().await?;
        let ttl = answers.message().await?.map_or(0, |a| a.ttl());
        // A second answer of TTL 0 means it expired between the two: it was alive at the first.
        Ok(Some((ttl > 0).then_some(second + secs_to_ns(ttl))))
    })
    .await;
    let ret = rec.now();
    let (alive, bound) = match answer {
        Ok(Ok(None)) => (false, None),
        Ok(Ok(Some(bound))) => (true, bound),
        _ => return Err(()),
    };
    rec.record(Op {
        client: id,
        call,
        ret: Some(ret),
        input: Input::LeaseKeepAlive(lease),
        output: Output::KeepAlive { alive },
    });
    Ok(if alive {
        Some(bound.unwrap_or(call))
    } else {
        None
    })
}

async fn execute(c: &mut Client, input: &Input) -> Result<Output, etcd_client::Error> {
    let rev = |h: Option<&etcd_client::ResponseHeader>| h.map_or(0, |h| h.revision());
    let lease_not_found = |e: &etcd_client::Error| {
        matches!(e, etcd_client::Error::GRpcStatus(s)
            if s.code() == tonic::Code::NotFound && s.message() == "etcdserver: requested lease not found")
    };
    Ok(match input {
        Input::LeaseGrant(id, ttl) => {
            let opts = etcd_client::LeaseGrantOptions::new().with_id(*id);
            let r = c.lease_grant(*ttl, Some(opts)).await?;
            Output::Lease {
                revision: rev(r.header()),
            }
        }
        Input::PutWithLease(k, v, lease) => {
            let opts = etcd_client::PutOptions::new().with_lease(*lease);
            match c.put(key(*k), v.to_string(), Some(opts)).await {
                Ok(r) => Output::Put {
                    revision: rev(r.header()),
                },
                Err(e) if lease_not_found(&e) => Output::LeaseNotFound,
                Err(e) => return Err(e),
            }
        }
        Input::LeaseKeepAlive(_) | Input::LeaseExpire(_) => {
            return Err(etcd_client::Error::InvalidArgs(
                "keepalives run in keep_alive_once; expiries are the server's".into(),
            ));
        }
        Input::LeaseRevoke(id) => match c.lease_revoke(*id).await {
            Ok(r) => Output::Lease {
                revision: rev(r.header()),
            },
            Err(e) if lease_not_found(&e) => Output::LeaseNotFound,
            Err(e) => return Err(e),
        },
        Input::Get(k) | Input::SerializableGet(k) => {
            let opts = matches!(input, Input::SerializableGet(_))
                .then(|| GetOptions::new().with_serializable());
            let r = c.get(key(*k), opts).await?;
            let kv = r.kvs().first();
            Output::Get {
                value: kv.map(|kv| parse_value(kv.value())),
                mod_revision: kv.map_or(0, |kv| kv.mod_revision()),
                revision: rev(r.header()),
            }
        }
        Input::CountAll => {
            let r = c
                .get(
                    PREFIX,
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await?;
            Output::CountAll {
                count: r.count(),
                revision: rev(r.header()),
            }
        }
        Input::Put(k, v) => {
            let r = c.put(key(*k), v.to_string(), None).await?;
            Output::Put {
                revision: rev(r.header()),
            }
        }
        Input::Delete(k) => {
            let r = c.delete(key(*k), None).await?;
            Output::Delete {
                deleted: r.deleted(),
                revision: rev(r.header()),
            }
        }
        Input::CompareAndPut {
            key: k,
            expected_mod,
            value,
        } => {
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key(*k),
                    CompareOp::Equal,
                    *expected_mod,
                )])
                .and_then([TxnOp::put(key(*k), value.to_string(), None)]);
            let r = c.txn(txn).await?;
            Output::CompareAndPut {
                succeeded: r.succeeded(),
                revision: rev(r.header()),
            }
        }
    })
}

/// Shared state of the watches of one run.
#[derive(Clone)]
struct Watches {
    endpoints: Vec<String>,
    logs: Arc<Mutex<Vec<WatchLog>>>,
    /// Highest header revision each watch has seen (events or progress).
    progress: Arc<Mutex<Vec<Arc<AtomicI64>>>>,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl Watches {
    /// Starts a watch on the next member in turn.
    fn spawn(&self, start_revision: i64, prev_kv: bool) -> tokio::task::JoinHandle<()> {
        let seen = Arc::new(AtomicI64::new(0));
        let endpoint = {
            let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
            progress.push(seen.clone());
            self.endpoints[(progress.len() - 1) % self.endpoints.len()].clone()
        };
        tokio::spawn(run_watch(
            self.clone(),
            endpoint,
            start_revision,
            prev_kv,
            seen,
        ))
    }

    /// Whether every watch has seen `revision` (or ended).
    fn caught_up(&self, revision: i64) -> bool {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .all(|p| p.load(Ordering::Relaxed) >= revision)
    }
}

async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

/// Runs one watch, resuming after breaks from the next revision; each segment is one log.
async fn run_watch(
    w: Watches,
    endpoint: String,
    start_revision: i64,
    prev_kv: bool,
    seen: Arc<AtomicI64>,
) {
    let logs = w.logs.clone();
    let mut next_start = start_revision;
    loop {
        if *w.stop.borrow() {
            seen.store(i64::MAX, Ordering::Relaxed);
            return;
        }
        let Some(mut c) = connect(&endpoint).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(next_start);
        if prev_kv {
            opts = opts.with_prev_key();
        }
        let Ok(mut stream) = c.watch(PREFIX, Some(opts)).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut log = WatchLog {
            prefix: PREFIX.as_bytes().to_vec(),
            start_revision: next_start,
            prev_kv,
            responses: Vec::new(),
        };
        let mut progress = tokio::time::interval(Duration::from_millis(300));
        let stop = stopped(w.stop.clone());
        tokio::pin!(stop);
        let ended = loop {
            tokio::select! {
                _ = &mut stop => break true,
                _ = progress.tick() => { let _ = stream.request_progress().await; }
                msg = stream.message() => match msg {
                    Ok(Some(r)) => {
                        let events: Vec<SeenEvent> = r.events().iter().filter_map(|e| {
                            let kv = e.kv()?;
                            Some(SeenEvent {
                                revision: kv.mod_revision(),
                                key: kv.key().to_vec(),
                                put: e.event_type() == etcd_client::EventType::Put,
                                value: kv.value().to_vec(),
                                create_revision: kv.create_revision(),
                                prev_value: e.prev_kv().map(|p| p.value().to_vec()),
                            })
                        }).collect();
                        if let Some(last) = events.last() {
                            next_start = last.revision + 1;
                        }
                        let canceled = r.canceled();
                        let header_revision = r.header().map_or(0, |h| h.revision());
                        seen.fetch_max(if canceled { i64::MAX } else { header_revision }, Ordering::Relaxed);
                        log.responses.push(SeenResponse {
                            header_revision: r.header().map_or(0, |h| h.revision()),
                            created: r.created(),
                            canceled,
                            compact_revision: r.compact_revision(),
                            fragment: false, // this suite never asks for fragments
                            events,
                        });
                        if canceled {
                            break true;
                        }
                    }
                    _ => break false,
                }
            }
        };
        logs.lock().unwrap_or_else(|p| p.into_inner()).push(log);
        if ended || next_start == 0 {
            // A "from now" watch that broke before any event cannot resume without guessing a
            // revision; it stops (its segment is still checked).
            seen.store(i64::MAX, Ordering::Relaxed);
            return;
        }
    }
}

/// The members a fault hits, with the fault's log lines.
struct Injector {
    cluster: Arc<Mutex<Cluster>>,
    proxies: Arc<Mutex<Vec<crate::proxy::ProxyProcess>>>,
    timeline: Arc<Mutex<Vec<String>>>,
    start: Instant,
}

impl Injector {
    fn log(&self, what: String) {
        self.timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("{:>6} ms {what}", self.start.elapsed().as_millis()));
    }

    /// Runs `f` on the proxies off the async workers.
    fn with_proxies<T>(&self, f: impl FnOnce(&mut Vec<crate::proxy::ProxyProcess>) -> T) -> T {
        tokio::task::block_in_place(|| {
            f(&mut self.proxies.lock().unwrap_or_else(|p| p.into_inner()))
        })
    }

    /// Runs `f` on the cluster off the async workers (process control blocks).
    fn with<T>(&self, f: impl FnOnce(&mut Cluster) -> T) -> T {
        tokio::task::block_in_place(|| {
            f(&mut self.cluster.lock().unwrap_or_else(|p| p.into_inner()))
        })
    }

    async fn inject(&self, fault: Fault, heal_after: Duration, watches: &Watches) {
        let leader = self.with(|c| c.wait_leader(None));
        match fault {
            Fault::None => {}
            Fault::Kill | Fault::KillFollower | Fault::LeaseExpiry => {
                let victim = if fault == Fault::KillFollower {
                    self.with(|c| c.others(leader)[0])
                } else {
                    leader
                };
                self.log(format!("kill -9 member {victim} (leader {leader})"));
                self.with(|c| c.members[victim].kill9());
                tokio::time::sleep(heal_after).await;
                self.with(|c| c.members[victim].restart());
                self.log(format!("member {victim} restarted"));
            }
            Fault::Pause => {
                self.log(format!("SIGSTOP member {leader} (leader)"));
                self.with(|c| c.members[leader].pause());
                tokio::time::sleep(heal_after + REQUEST_TIMEOUT).await;
                self.with(|c| c.members[leader].resume());
                self.log(format!("SIGCONT member {leader}"));
            }
            Fault::Restart => {
                self.log(format!("SIGTERM member {leader} (leader)"));
                self.with(|c| c.members[leader].terminate());
                tokio::time::sleep(heal_after).await;
                self.with(|c| c.members[leader].restart());
                self.log(format!("member {leader} restarted"));
            }
            Fault::Partition => {
                // Logged once in force, so the timeline shows when the partition began.
                self.with(|c| c.isolate(leader));
                self.log(format!(
                    "partition member {leader} (leader) from the others"
                ));
                tokio::time::sleep(heal_after + REQUEST_TIMEOUT).await;
                self.with(|c| c.heal());
                self.log("healed".into());
            }
            Fault::OneWayPartition => {
                self.with(|c| {
                    let others = c.others(leader);
                    c.set_peer_faults(leader, &others, &[]);
                });
                self.log(format!(
                    "member {leader} (leader) drops its outgoing peer traffic"
                ));
                tokio::time::sleep(heal_after + REQUEST_TIMEOUT).await;
                self.with(|c| c.heal());
                self.log("healed".into());
            }
            Fault::ProxyKill => {
                self.log("kill -9 proxy 0".into());
                self.with_proxies(|p| p[0].kill9());
                tokio::time::sleep(heal_after).await;
                self.with_proxies(|p| p[0].restart());
                self.log("proxy 0 restarted".into());
            }
            Fault::ProxyMemberPause => {
                self.log("SIGSTOP member 0 (the proxies' first endpoint)".into());
                self.with(|c| c.members[0].pause());
                tokio::time::sleep(heal_after + REQUEST_TIMEOUT).await;
                self.with(|c| c.members[0].resume());
                self.log("SIGCONT member 0".into());
            }
            Fault::ProxyPartition => {
                let member = self.with(|c| format!("http://{}", c.members[0].client));
                self.with_proxies(|p| p[0].block(std::slice::from_ref(&member)));
                self.log("proxy 0 cut off from member 0".into());
                tokio::time::sleep(heal_after + REQUEST_TIMEOUT).await;
                self.with_proxies(|p| p[0].block(&[]));
                self.log("healed".into());
            }
            Fault::RestartAll => {
                self.log("SIGTERM every member".into());
                self.with(|c| {
                    for m in &mut c.members {
                        m.terminate();
                    }
                });
                tokio::time::sleep(heal_after).await;
                self.with(|c| {
                    for m in &mut c.members {
                        m.restart_no_wait();
                    }
                    for m in &mut c.members {
                        m.wait_ready();
                    }
                });
                self.log("every member restarted".into());
            }
            Fault::MemberChurn => {
                // The member's own endpoint: `endpoints` are the clients' (proxies, with
                // --proxies), not indexed by member.
                let admin = self.with(|c| c.members[leader].endpoint());
                if let Err(e) = self.churn(leader, &admin).await {
                    self.log(format!("FAILED member churn: {e}"));
                }
            }
            Fault::Compaction => {
                let admin = self.with(|c| c.members[leader].endpoint());
                let Some(mut c) = connect(&admin).await else {
                    return;
                };
                let Ok(r) = c
                    .get(
                        PREFIX,
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    )
                    .await
                else {
                    return;
                };
                let rev = r.header().map_or(1, |h| h.revision());
                // A new watch from revision 1 must be cancelled with the compact revision.
                let target = (rev - 5).max(2);
                let ok = c.compact(target, None).await.is_ok();
                self.log(format!(
                    "compact {target}: {}",
                    if ok { "ok" } else { "failed" }
                ));
                watches.spawn(1, false);
                watches.spawn(target, true);
            }
        }
    }
}

impl Injector {
    /// Adds a learner, waits until it caught up, promotes it, then removes a follower.
    async fn churn(&self, leader: usize, leader_endpoint: &str) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut admin = connect(leader_endpoint)
            .await
            .ok_or("no admin connection")?;
        let (client_port, peer_port) = (crate::free_port(), crate::free_port());
        let opts = etcd_client::MemberAddOptions::new().with_is_learner();
        let added = admin
            .member_add([format!("http://127.0.0.1:{peer_port}")], Some(opts))
            .await
            .map_err(|e| format!("member add: {e}"))?;
        let id = added.member().ok_or("no member in the answer")?.id();
        self.log(format!("member add {id:x} (learner)"));
        let joined = self.with(|c| c.join(client_port, peer_port));
        let endpoint = format!("127.0.0.1:{client_port}");
        // Caught up once it serves the revision the leader had after the add.
        let target = admin
            .get("churn", None)
            .await
            .ok()
            .and_then(|r| r.header().map(|h| h.revision()))
            .unwrap_or(1);
        loop {
            let at = match connect(&endpoint).await {
                Some(mut c) => c
                    .get("churn", Some(GetOptions::new().with_serializable()))
                    .await
                    .ok()
                    .and_then(|r| r.header().map(|h| h.revision()))
                    .unwrap_or(0),
                None => 0,
            };
            if at >= target {
                break;
            }
            if Instant::now() > deadline {
                return Err("the learner did not catch up".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        while let Err(e) = admin.member_promote(id).await {
            if Instant::now() > deadline {
                return Err(format!("member promote: {e}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.log(format!("member {joined} ({id:x}) promoted"));
        let victim = self.with(|c| {
            c.members[joined].wait_ready();
            c.others(leader).into_iter().find(|&i| i != joined)
        });
        let victim = victim.ok_or("no follower to remove")?;
        let victim_id = self
            .with(|c| c.members[victim].member_id())
            .ok_or("no member id")?;
        admin
            .member_remove(victim_id)
            .await
            .map_err(|e| format!("member remove: {e}"))?;
        self.with(|c| {
            c.members[victim].terminate();
            c.removed.push(victim);
        });
        self.log(format!("member {victim} ({victim_id:x}) removed"));
        Ok(())
    }
}

/// The highest revision any reachable member reports linearizably, waiting (bounded) for the
/// cluster to have a leader again: histories are only comparable once every committed entry
/// can reach every member. `None` when no linearizable read succeeded in time.
async fn final_revision(endpoints: &[String]) -> Option<i64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut best = None;
        for e in endpoints {
            if let Some(mut c) = connect(e).await
                && let Ok(r) = c.get("final", None).await
            {
                best = best.max(Some(r.header().map_or(0, |h| h.revision())));
            }
        }
        if best.is_some() || Instant::now() >= deadline {
            return best;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (bounded) until every member has applied `revision`, so their histories can be
/// compared; returns the members that did not get there, with the revision they reached.
async fn converge(endpoints: &[String], revision: i64) -> Vec<(String, i64)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut behind = Vec::new();
    for e in endpoints {
        let mut reached = 0;
        while Instant::now() < deadline {
            let at = match connect(e).await {
                Some(mut c) => c
                    .get("final", Some(GetOptions::new().with_serializable()))
                    .await
                    .ok()
                    .and_then(|r| r.header().map(|h| h.revision()))
                    .unwrap_or(0),
                None => 0,
            };
            reached = at;
            if at >= revision {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if reached < revision {
            behind.push((e.clone(), reached));
        }
    }
    behind
}

/// Runs one scenario and checks it.
pub async fn run(cfg: &RunConfig) -> Report {
    let env: Vec<(&str, String)> = vec![("KEYHOLD_FAILPOINTS", cfg.failpoints.join(","))];
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let members = cfg.members.max(1);
    let flags: &[&str] = if members > 1 {
        crate::cluster::FAST_ELECTION
    } else {
        &[]
    };
    let cluster = tokio::task::block_in_place(|| Cluster::start_with(members, flags, &env_ref));
    let proxies: Vec<crate::proxy::ProxyProcess> = tokio::task::block_in_place(|| {
        (0..cfg.proxies)
            .map(|_| crate::proxy::ProxyProcess::start(&cluster.endpoints(), &[]))
            .collect()
    });
    // Clients and watches talk to the proxies when there are any, else to the members.
    let endpoints = if proxies.is_empty() {
        cluster.endpoints()
    } else {
        proxies.iter().map(|p| p.endpoint()).collect()
    };
    let rec = Recorder::default();
    let start = Instant::now();
    let until = start + cfg.duration;
    let mut rng = Rng::new(cfg.seed);
    let mut report = Report {
        seed: cfg.seed,
        ..Default::default()
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watch_set = Watches {
        endpoints: endpoints.clone(),
        logs: Arc::default(),
        progress: Arc::default(),
        stop: stop_rx,
    };
    let mut watches = vec![watch_set.spawn(1, true), watch_set.spawn(0, false)];
    let clients: Vec<_> = (0..cfg.clients)
        .map(|i| {
            tokio::spawn(run_client(
                i,
                endpoints[i % endpoints.len()].clone(),
                rng.next_u64(),
                rec.clone(),
                until,
            ))
        })
        .collect();
    let expiry_violations = Arc::new(Mutex::new(Vec::new()));
    // The lease-expiry client runs in its scenario, and with the planted early expiry that
    // must fail its checks (there without a leader change, so every lease shows it).
    let expiring_leases =
        cfg.fault == Fault::LeaseExpiry || cfg.failpoints.iter().any(|f| f == "early-lease-expiry");
    let lease_client = expiring_leases.then(|| {
        tokio::spawn(run_lease_client(
            cfg.clients,
            endpoints[cfg.clients % endpoints.len()].clone(),
            rng.next_u64(),
            rec.clone(),
            until,
            expiry_violations.clone(),
        ))
    });

    // Fault schedule: one fault somewhere in the middle third of the run.
    let fault_at =
        cfg.duration / 3 + Duration::from_millis(rng.below(cfg.duration.as_millis() as u64 / 3));
    let heal_after = Duration::from_millis(500 + rng.below(1000));
    let injector = Arc::new(Injector {
        cluster: Arc::new(Mutex::new(cluster)),
        proxies: Arc::new(Mutex::new(proxies)),
        timeline: Arc::default(),
        start,
    });
    let injecting = {
        let (injector, watch_set, fault) = (injector.clone(), watch_set.clone(), cfg.fault);
        tokio::spawn(async move {
            tokio::time::sleep(fault_at).await;
            injector.inject(fault, heal_after, &watch_set).await;
        })
    };
    // A third watch joins mid-run from a recent revision.
    tokio::time::sleep(cfg.duration / 2).await;
    let mid = rec
        .ops()
        .iter()
        .filter_map(|o| match o.output {
            Output::Put { revision } => Some(revision),
            _ => None,
        })
        .max()
        .unwrap_or(1);
    watches.push(watch_set.spawn(mid, true));

    for c in clients.into_iter().chain(lease_client) {
        let _ = c.await;
    }
    let _ = injecting.await;
    // Let every member and every watch catch up to the final revision, then stop the watches.
    let endpoints = injector.with(|c| c.active_endpoints());
    let final_rev = match final_revision(&endpoints).await {
        Some(r) => r,
        None => {
            report
                .lost_writes
                .push("no linearizable read succeeded within 30 s after the run".into());
            0
        }
    };
    for (member, reached) in converge(&endpoints, final_rev).await {
        report.lost_writes.push(format!(
            "member {member} reached revision {reached}, not the final {final_rev}, within 20 s"
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !watch_set.caught_up(final_rev) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop_tx.send(true);
    for w in watches {
        let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
    }

    // Ground truth from the stopped members' data dirs; every member must hold the same history.
    let dumps = injector.with(|c| {
        for m in &mut c.members {
            if m.is_running() {
                m.terminate();
            }
        }
        c.members
            .iter()
            .enumerate()
            .filter(|(i, _)| !c.removed.contains(i))
            .map(|(_, m)| m.dump_history())
            .collect::<Vec<_>>()
    });
    let comparable = |dump: &str| -> Vec<String> {
        // History at or below the compact revision may still be being reclaimed: skip it.
        let mut lines = dump.lines();
        let compact = lines
            .next()
            .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .and_then(|v| v["compact_revision"].as_i64())
            .unwrap_or(0);
        lines
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["revision"].as_i64())
                    .is_some_and(|r| r > compact)
            })
            .map(str::to_string)
            .collect()
    };
    let reference = comparable(&dumps[0]);
    for (i, d) in dumps.iter().enumerate().skip(1) {
        let d = comparable(d);
        if d != reference {
            if let Some((a, b)) = reference.iter().zip(&d).find(|(a, b)| a != b) {
                report.lost_writes.push(format!(
                    "first difference: member 0 has {a}, member {i} has {b}"
                ));
            }
            report.lost_writes.push(format!(
                "member {i}'s history differs from member 0's ({} vs {} changes)",
                d.len(),
                reference.len()
            ));
        }
    }
    let truth = Truth::parse(&dumps[0]).unwrap_or_default();
    report.timeline = injector
        .timeline
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    report.fault_errors = report
        .timeline
        .iter()
        .filter(|t| t.contains("FAILED"))
        .cloned()
        .collect();

    let mut ops = rec.ops();
    report.unknown_writes = ops
        .iter()
        .filter(|o| o.ret.is_none() && !matches!(o.input, Input::LeaseExpire(_)))
        .count();
    patch_unknown_writes(&mut ops, &truth);
    report.lease_violations =
        std::mem::take(&mut *expiry_violations.lock().unwrap_or_else(|p| p.into_inner()));
    report
        .lease_violations
        .extend(patch_lease_expiries(&mut ops, &truth));
    report.lease_expiries = ops
        .iter()
        .filter(|o| {
            matches!(
                (&o.input, &o.output),
                (Input::LeaseExpire(_), Output::Lease { .. })
            )
        })
        .count();
    // (Appended: the convergence and replica comparisons above are findings too.)
    report.lost_writes.extend(lost_writes(&ops, &truth));
    let (serializable, ops): (Vec<Op>, Vec<Op>) = ops
        .into_iter()
        .partition(|o| matches!(o.input, Input::SerializableGet(_)));
    report.serializable_reads = serializable.len();
    report.serializable_violations = serializable_violations(&serializable, &truth);
    report.ops = ops.len() + serializable.len();
    let checking = Instant::now();
    let budget = cfg.duration.max(CHECK_BUDGET_MIN);
    let verdict = tokio::task::block_in_place(|| lin::check(&ops, budget));
    report.check_ms = checking.elapsed().as_millis() as u64;
    if matches!(verdict, Verdict::Violation { .. }) {
        report.failing_history =
            tokio::task::block_in_place(|| lin::smallest_failing_prefix(&ops, budget));
    }
    // Debugging aid: the whole history and ground truth, for a violation that the smallest
    // failing prefix alone does not explain, a search that ran out of time, or a checker
    // change to try on a real history (`robustness --recheck <dir>/history.txt`).
    if let Some(dir) = std::env::var_os("KEYHOLD_TEST_DUMP_DIR") {
        let dir = std::path::Path::new(&dir).join(format!("seed-{}", cfg.seed));
        let _ = std::fs::create_dir_all(&dir);
        let mut sorted = ops.clone();
        sorted.sort_by_key(|o| o.call);
        let history: String = sorted.iter().map(|o| format!("{o}\n")).collect();
        let _ = std::fs::write(dir.join("history.txt"), history);
        let _ = std::fs::write(dir.join("truth.jsonl"), &dumps[0]);
        let _ = std::fs::write(dir.join("timeline.txt"), report.timeline.join("\n"));
    }
    report.linearizable = Some(verdict);
    let logs = watch_set
        .logs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    report.watch_events = logs
        .iter()
        .flat_map(|l| &l.responses)
        .map(|r| r.events.len())
        .sum();
    for l in &logs {
        for v in watch_check::validate(&truth, l) {
            report
                .watch_violations
                .push(format!("watch from {}: {v}", l.start_revision));
        }
    }
    report
}

/// etcd-robustness-style patching: an unknown Put (or CAS) whose unique value is in the
/// persisted history happened at that revision; one whose value is not there never happened
/// (and is removed, which keeps the search small).
fn patch_unknown_writes(ops: &mut Vec<Op>, truth: &Truth) {
    patch_unknown_deletes(ops, truth);
    let committed = |v: u64| {
        truth
            .events
            .iter()
            .find(|e| e.put && parse_value(&e.value) == v)
            .map(|e| e.revision)
    };
    ops.retain_mut(|op| {
        if op.ret.is_some() {
            return true;
        }
        match op.input {
            Input::Put(_, v) | Input::PutWithLease(_, v, _) => match committed(v) {
                Some(revision) => {
                    op.output = Output::Put { revision };
                    true
                }
                // Not in history: never happened, unless compaction may have removed it.
                None => truth.compact_revision > 0,
            },
            Input::CompareAndPut { value, .. } => match committed(value) {
                Some(revision) => {
                    op.output = Output::CompareAndPut {
                        succeeded: true,
                        revision,
                    };
                    true
                }
                None => truth.compact_revision > 0,
            },
            _ => true,
        }
    });
}

/// Every tombstone of the persisted history, with the lease its key was attached to when it was
/// deleted: the put before the tombstone wrote a unique value, and the op that wrote it names
/// the lease.
fn tombstones_with_leases<'t>(
    ops: &[Op],
    truth: &'t Truth,
) -> Vec<(&'t watch_check::TruthEvent, Option<i64>)> {
    use std::collections::{BTreeMap, HashMap};
    let lease_of: HashMap<u64, i64> = ops
        .iter()
        .filter_map(|o| match o.input {
            Input::PutWithLease(_, v, l) => Some((v, l)),
            _ => None,
        })
        .collect();
    let mut last_put: BTreeMap<&[u8], u64> = BTreeMap::new();
    let mut found = Vec::new();
    for e in &truth.events {
        if e.put {
            last_put.insert(&e.key, parse_value(&e.value));
        } else {
            let lease = last_put
                .remove(e.key.as_slice())
                .and_then(|v| lease_of.get(&v).copied());
            found.push((e, lease));
        }
    }
    found
}

/// Pins each lease expiry to the revision at which the persisted history deleted its keys (the
/// lease-expiry client's keys are written by nobody else, so the put a tombstone follows names
/// the lease). Keys deleted at more than one revision are a violation: an expiry is one revoke.
/// An expiry with no tombstone (no key left on its lease) stays unknown for the checker.
fn patch_lease_expiries(ops: &mut [Op], truth: &Truth) -> Vec<String> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut deleted_at: BTreeMap<i64, BTreeSet<i64>> = BTreeMap::new();
    for (e, lease) in tombstones_with_leases(ops, truth) {
        if let Some(lease) = lease {
            deleted_at.entry(lease).or_default().insert(e.revision);
        }
    }
    let mut violations = Vec::new();
    for op in ops.iter_mut() {
        let Input::LeaseExpire(lease) = op.input else {
            continue;
        };
        match deleted_at
            .get(&lease)
            .map(|r| r.iter().copied().collect::<Vec<_>>())
        {
            None => {}
            Some(r) if r.len() == 1 => op.output = Output::Lease { revision: r[0] },
            Some(r) => violations.push(format!(
                "lease {lease:#x}: its keys were deleted at revisions {r:?}, not at one"
            )),
        }
    }
    violations
}

/// Unknown deletes resolved from the persisted history: tombstones of a key that no
/// acknowledged delete explains, nor an acknowledged revoke of the lease the key was attached to. None means the unknown delete changed nothing (it
/// never ran, or found no key) and is dropped; exactly one for exactly one unknown delete of
/// that key means it ran at that revision. Anything else stays unknown for the checker.
fn patch_unknown_deletes(ops: &mut Vec<Op>, truth: &Truth) {
    use std::collections::{BTreeMap, BTreeSet};
    if truth.compact_revision > 0 {
        return; // tombstones below the compact revision are gone: no conclusion possible
    }
    // A delete that removed a key answers the revision of its own tombstone. A revoke answers
    // the store's revision after it even when it deleted nothing, so its revision explains a
    // tombstone only of a key attached to that lease (the put before the tombstone says).
    let deleted_at: BTreeSet<i64> = ops
        .iter()
        .filter(|o| o.ret.is_some())
        .filter_map(|o| match o.output {
            Output::Delete { deleted, revision } if deleted > 0 => Some(revision),
            _ => None,
        })
        .collect();
    // (revision, lease): several revokes may answer the same revision.
    let revoked_at: BTreeSet<(i64, i64)> = ops
        .iter()
        .filter(|o| o.ret.is_some())
        .filter_map(|o| match (&o.input, &o.output) {
            (Input::LeaseRevoke(l), Output::Lease { revision }) => Some((*revision, *l)),
            _ => None,
        })
        .collect();
    let mut unexplained: BTreeMap<Vec<u8>, Vec<i64>> = BTreeMap::new();
    for (e, lease) in tombstones_with_leases(ops, truth) {
        let by_revoke = lease.is_some_and(|l| revoked_at.contains(&(e.revision, l)));
        if !deleted_at.contains(&e.revision) && !by_revoke {
            unexplained
                .entry(e.key.clone())
                .or_default()
                .push(e.revision);
        }
    }
    let mut unknown_per_key: BTreeMap<u8, usize> = BTreeMap::new();
    for o in ops.iter().filter(|o| o.ret.is_none()) {
        if let Input::Delete(k) = o.input {
            *unknown_per_key.entry(k).or_default() += 1;
        }
    }
    let seen_before = lin::revisions_seen_before(ops);
    ops.retain_mut(|op| {
        let Input::Delete(k) = op.input else {
            return true;
        };
        if op.ret.is_some() {
            return true;
        }
        match unexplained.get(key(k).as_bytes()).map(Vec::as_slice) {
            None | Some([]) => false,
            // Only a tombstone newer than every revision answered before the call can be its.
            Some([revision])
                if unknown_per_key.get(&k) == Some(&1) && *revision > seen_before(op.call) =>
            {
                op.output = Output::Delete {
                    deleted: 1,
                    revision: *revision,
                };
                true
            }
            _ => true,
        }
    });
}

/// Serializable reads whose answer is not the key's state at the revision the answer carries,
/// per the persisted history (a serializable read may be stale, never inconsistent, and never
/// from a revision that was not committed). Reads at or below the compact revision are not
/// judged: that history is gone by design.
fn serializable_violations(reads: &[Op], truth: &Truth) -> Vec<String> {
    use std::collections::BTreeMap;
    let head = truth.events.last().map_or(1, |e| e.revision);
    // Per key, its changes in revision order: (revision, value; `None` for a tombstone).
    let mut changes: BTreeMap<&[u8], Vec<(i64, Option<u64>)>> = BTreeMap::new();
    for e in &truth.events {
        let value = e.put.then(|| parse_value(&e.value));
        changes.entry(&e.key).or_default().push((e.revision, value));
    }
    let mut found = Vec::new();
    for op in reads {
        let (
            Input::SerializableGet(k),
            Output::Get {
                value,
                mod_revision,
                revision,
            },
        ) = (&op.input, &op.output)
        else {
            continue;
        };
        let name = key(*k);
        if *revision > head {
            found.push(format!(
                "get {name} answered at revision {revision}, past the last committed {head}"
            ));
            continue;
        }
        if *revision <= truth.compact_revision {
            continue;
        }
        let history = changes.get(name.as_bytes()).map_or(&[][..], Vec::as_slice);
        let before = history.partition_point(|(r, _)| r <= revision);
        let expected = match before.checked_sub(1).map(|i| history[i]) {
            Some((r, Some(v))) => (Some(v), r),
            _ => (None, 0),
        };
        if (*value, *mod_revision) != expected {
            found.push(format!(
                "get {name} at revision {revision} answered {value:?} (mod {mod_revision}); the history holds {:?} (mod {})",
                expected.0, expected.1
            ));
        }
    }
    found
}

/// Acknowledged puts whose value is not in the persisted history at their revision (history
/// below the compact revision is gone by design and not judged).
fn lost_writes(ops: &[Op], truth: &Truth) -> Vec<String> {
    ops.iter()
        .filter(|o| o.ret.is_some())
        .filter(|o| match o.output {
            Output::Put { revision } | Output::CompareAndPut { revision, .. } => {
                revision > truth.compact_revision
            }
            _ => false,
        })
        .filter_map(|o| match (&o.input, &o.output) {
            (Input::Put(k, v) | Input::PutWithLease(k, v, _), Output::Put { revision })
            | (
                Input::CompareAndPut {
                    key: k, value: v, ..
                },
                Output::CompareAndPut {
                    succeeded: true,
                    revision,
                },
            ) => {
                let found = truth.events.iter().any(|e| {
                    e.revision == *revision
                        && e.put
                        && e.key == key(*k).as_bytes()
                        && parse_value(&e.value) == *v
                });
                (!found)
                    .then(|| format!("put {} = {v} acknowledged at revision {revision}", key(*k)))
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch_check::TruthEvent;

    fn event(revision: i64, k: u8, value: Option<u64>) -> TruthEvent {
        TruthEvent {
            revision,
            key: key(k).into_bytes(),
            put: value.is_some(),
            value: value
                .map(|v| v.to_string().into_bytes())
                .unwrap_or_default(),
            create_revision: 0,
        }
    }

    fn read(k: u8, value: Option<u64>, mod_revision: i64, revision: i64) -> Op {
        Op {
            client: 0,
            call: 0,
            ret: Some(1),
            input: Input::SerializableGet(k),
            output: Output::Get {
                value,
                mod_revision,
                revision,
            },
        }
    }

    #[test]
    fn serializable_reads_must_match_the_history_at_their_revision() {
        let truth = Truth {
            events: vec![
                event(2, 1, Some(10)),
                event(3, 1, Some(11)),
                event(4, 1, None),
            ],
            compact_revision: 0,
        };
        let consistent = [
            read(1, Some(10), 2, 2),
            read(1, Some(11), 3, 3),
            read(1, None, 0, 4),
            read(2, None, 0, 3),
        ];
        assert!(serializable_violations(&consistent, &truth).is_empty());
        let stale_at_its_revision = read(1, Some(10), 2, 3);
        let from_the_future = read(1, None, 0, 5);
        let deleted_too_early = read(1, None, 0, 3);
        for bad in [stale_at_its_revision, from_the_future, deleted_too_early] {
            assert_eq!(
                serializable_violations(std::slice::from_ref(&bad), &truth).len(),
                1,
                "{bad:?} passed"
            );
        }
    }

    /// A revoke that deleted nothing answers the revision an unknown delete just made: that
    /// revision does not explain the delete's tombstone, the delete does.
    #[test]
    fn a_revoke_of_an_empty_lease_does_not_explain_another_keys_tombstone() {
        let lease = 1 << 40;
        let op = |call: u64, ret: Option<u64>, input: Input, output: Output| Op {
            client: 0,
            call,
            ret,
            input,
            output,
        };
        let mut ops = vec![
            op(0, Some(1), Input::Put(7, 10), Output::Put { revision: 2 }),
            op(
                2,
                Some(3),
                Input::LeaseGrant(lease, 3600),
                Output::Lease { revision: 2 },
            ),
            op(4, None, Input::Delete(7), Output::Unknown),
            op(
                5,
                Some(6),
                Input::LeaseRevoke(lease),
                Output::Lease { revision: 3 },
            ),
            op(
                7,
                Some(8),
                Input::Get(7),
                Output::Get {
                    value: None,
                    mod_revision: 0,
                    revision: 3,
                },
            ),
        ];
        let truth = Truth {
            events: vec![event(2, 7, Some(10)), event(3, 7, None)],
            compact_revision: 0,
        };
        patch_unknown_writes(&mut ops, &truth);
        assert!(
            ops.iter().any(|o| o.input == Input::Delete(7)
                && o.output
                    == Output::Delete {
                        deleted: 1,
                        revision: 3
                    }),
            "the unknown delete is pinned to its tombstone: {ops:?}"
        );
        assert_eq!(
            lin::check(&ops, Duration::from_secs(5)),
            Verdict::Linearizable
        );
    }

    /// Two revokes may answer the same revision (the second deleted nothing): the tombstone is
    /// still the first one's, and an unknown delete called later is not pinned to it.
    #[test]
    fn revokes_sharing_a_revision_still_explain_their_own_tombstones() {
        let (l1, l2) = (1 << 40, (1 << 40) + 1);
        let op = |call: u64, ret: Option<u64>, input: Input, output: Output| Op {
            client: 0,
            call,
            ret,
            input,
            output,
        };
        let mut ops = vec![
            op(
                0,
                Some(1),
                Input::LeaseGrant(l1, 3600),
                Output::Lease { revision: 1 },
            ),
            op(
                2,
                Some(3),
                Input::LeaseGrant(l2, 3600),
                Output::Lease { revision: 1 },
            ),
            op(
                4,
                Some(5),
                Input::PutWithLease(8, 10, l1),
                Output::Put { revision: 2 },
            ),
            op(
                6,
                Some(7),
                Input::LeaseRevoke(l1),
                Output::Lease { revision: 3 },
            ),
            op(
                8,
                Some(9),
                Input::LeaseRevoke(l2),
                Output::Lease { revision: 3 },
            ),
            op(10, None, Input::Delete(8), Output::Unknown),
            op(
                11,
                Some(12),
                Input::Get(8),
                Output::Get {
                    value: None,
                    mod_revision: 0,
                    revision: 3,
                },
            ),
        ];
        let truth = Truth {
            events: vec![event(2, 8, Some(10)), event(3, 8, None)],
            compact_revision: 0,
        };
        patch_unknown_writes(&mut ops, &truth);
        assert!(
            !ops.iter().any(|o| o.input == Input::Delete(8)),
            "the delete found nothing to delete and is dropped: {ops:?}"
        );
        assert_eq!(
            lin::check(&ops, Duration::from_secs(5)),
            Verdict::Linearizable
        );
    }
}
