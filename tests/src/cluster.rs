//! A cluster of `keyhold-node` processes on loopback: N members with ports chosen at run time,
//! each with its own data dir and log, all killed by PID on drop. Faults beyond the process
//! ones ([`NodeProcess`]): partitions through the nodes' test-only transport fault switch
//! (`POST /debug/peer-faults`, in builds with the `failpoints` feature), one-way or both ways.

use std::time::{Duration, Instant};

use crate::process::{NodeProcess, free_port};

/// How long a cluster may take to elect a leader and answer `/health` on every member.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Flags that make elections fast in tests (heartbeat 50 ms, election 500 ms).
pub const FAST_ELECTION: &[&str] = &["--heartbeat-interval", "50", "--election-timeout", "500"];

/// N members started together as a new cluster.
pub struct Cluster {
    /// The members, in `--initial-cluster` order (`m0`, `m1`, ...), then members that joined.
    pub members: Vec<NodeProcess>,
    /// `--initial-cluster-token`.
    pub token: String,
    /// Indexes of members removed from the cluster (their processes are stopped).
    pub removed: Vec<usize>,
    flags: Vec<String>,
    env: Vec<(String, String)>,
}

/// The cluster flags of member `name` in `initial_cluster` with state `state`.
fn cluster_args(name: &str, initial_cluster: &str, state: &str, token: &str) -> Vec<String> {
    [
        "--name",
        name,
        "--initial-cluster",
        initial_cluster,
        "--initial-cluster-state",
        state,
        "--initial-cluster-token",
        token,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Cluster {
    /// Starts `n` members with [`FAST_ELECTION`] timing and waits until all are healthy.
    pub fn start(n: usize) -> Self {
        Self::start_with(n, FAST_ELECTION, &[])
    }

    /// Starts `n` members with extra flags and environment.
    pub fn start_with(n: usize, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_each(n, extra_args, env, |_| Vec::new())
    }

    /// Starts `n` members with shared extra flags plus `own(i)` for member `i` (e.g. its own
    /// certificate files), and waits until every one is healthy.
    pub fn start_each(
        n: usize,
        extra_args: &[&str],
        env: &[(&str, &str)],
        own: impl Fn(usize) -> Vec<String>,
    ) -> Self {
        let mut cluster = Self::spawn(n, extra_args, env, own);
        for m in &mut cluster.members {
            m.wait_ready();
        }
        cluster
    }

    /// Starts `n` members with [`FAST_ELECTION`] timing without waiting for any to be healthy
    /// (for tests where some never will be).
    pub fn start_unchecked(n: usize, own: impl Fn(usize) -> Vec<String>) -> Self {
        Self::spawn(n, FAST_ELECTION, &[], own)
    }

    fn spawn(
        n: usize,
        extra_args: &[&str],
        env: &[(&str, &str)],
        own: impl Fn(usize) -> Vec<String>,
    ) -> Self {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let token = format!("keyhold-test-{}", free_port());
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<NodeProcess> = ports
            .iter()
            .enumerate()
            .map(|(i, (c, p))| {
                let mut args = cluster_args(&format!("m{i}"), &initial, "new", &token);
                args.extend(own(i));
                NodeProcess::member(*c, *p, args, extra_args, env)
            })
            .collect();
        for m in &mut members {
            m.spawn_no_wait();
        }
        Self {
            members,
            token,
            removed: Vec::new(),
            flags: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Starts a member on `client_port`/`peer_port` that joins the running cluster with
    /// `--initial-cluster-state existing` (after a `member add` of its peer URL); returns its
    /// index. Does not wait: a learner is not healthy until promoted.
    pub fn join(&mut self, client_port: u16, peer_port: u16) -> usize {
        let i = self.members.len();
        let mut initial: Vec<String> = self
            .members
            .iter()
            .enumerate()
            .filter(|(j, _)| !self.removed.contains(j))
            .map(|(j, m)| format!("m{j}={}", m.peer_url()))
            .collect();
        initial.push(format!("m{i}=http://127.0.0.1:{peer_port}"));
        let args = cluster_args(
            &format!("m{i}"),
            &initial.join(","),
            "existing",
            &self.token,
        );
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut m = NodeProcess::member(client_port, peer_port, args, &flags, &env);
        m.spawn_no_wait();
        self.members.push(m);
        i
    }

    /// Client endpoints of the members that are still part of the cluster.
    pub fn active_endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.removed.contains(i))
            .map(|(_, m)| m.endpoint())
            .collect()
    }

    /// Every member's client endpoint.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(NodeProcess::endpoint).collect()
    }

    /// The index of the member that reports itself leader, if exactly one running member does.
    pub fn leader(&self) -> Option<usize> {
        self.leader_among(None)
    }

    /// As [`Cluster::leader`], ignoring member `not` (a deposed leader cut off from the others
    /// may still believe it leads).
    pub fn leader_among(&self, not: Option<usize>) -> Option<usize> {
        let leaders: Vec<usize> = self
            .members
            .iter()
            .enumerate()
            .filter(|(i, m)| {
                Some(*i) != not && m.is_running() && m.metric("etcd_server_is_leader") == Some(1.0)
            })
            .map(|(i, _)| i)
            .collect();
        match leaders.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// Waits until one running member (other than `not`) leads; returns its index.
    pub fn wait_leader(&self, not: Option<usize>) -> usize {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(l) = self.leader_among(not) {
                return l;
            }
            assert!(Instant::now() < deadline, "no leader elected in time");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Indexes of running members other than `i`.
    pub fn others(&self, i: usize) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&j| j != i && self.members[j].is_running() && !self.removed.contains(&j))
            .collect()
    }

    /// Member IDs by index (from each member's `/metrics`).
    pub fn member_ids(&self) -> Vec<u64> {
        self.members
            .iter()
            .map(|m| m.member_id().expect("member id from /metrics"))
            .collect()
    }

    /// Makes member `at` drop peer traffic to `to` and from `from` (indexes); replaces its
    /// earlier faults. Logged with the time.
    pub fn set_peer_faults(&self, at: usize, to: &[usize], from: &[usize]) {
        self.apply_peer_faults(&self.member_ids(), at, to, from);
    }

    /// [`Self::set_peer_faults`] with the member IDs already known (a multi-member fault is
    /// applied in a few milliseconds, not one `/metrics` round per member per call).
    fn apply_peer_faults(&self, ids: &[u64], at: usize, to: &[usize], from: &[usize]) {
        let hex = |list: &[usize]| {
            list.iter()
                .map(|&i| format!("{:x}", ids[i]))
                .collect::<Vec<_>>()
                .join(",")
        };
        let path = format!(
            "/debug/peer-faults?drop_to={}&drop_from={}",
            hex(to),
            hex(from)
        );
        let (code, body) = self.members[at]
            .http_post(&path)
            .expect("peer-faults endpoint");
        assert_eq!(
            code, 200,
            "peer-faults: {body} (is the failpoints feature on?)"
        );
        eprintln!(
            "[fault {:?}] member {at}: drop to {to:?}, from {from:?}",
            std::time::SystemTime::now()
        );
    }

    /// Cuts member `i` off from every other member, both ways.
    pub fn isolate(&self, i: usize) {
        let ids = self.member_ids();
        let others: Vec<usize> = (0..self.members.len()).filter(|&j| j != i).collect();
        self.apply_peer_faults(&ids, i, &others, &others);
        for &j in &others {
            self.apply_peer_faults(&ids, j, &[i], &[i]);
        }
    }

    /// Removes every peer fault.
    pub fn heal(&self) {
        for i in 0..self.members.len() {
            if self.members[i].is_running() {
                self.apply_peer_faults(&[], i, &[], &[]);
            }
        }
    }
}
