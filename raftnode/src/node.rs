//! The node: composes the store, openraft, the client server and background drivers, and owns
//! the ordered shutdown path.
//!
//! Shutdown order: stop accepting client connections and end watch/keepalive streams → stop the
//! drivers → `raft.shutdown()` → `store.persist()` (fsync) → drop.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use keyhold_store::{KvStore, StoreOptions, WriteRequest, WriteResponse};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, SnapshotPolicy};
use tokio::sync::watch;
use tokio::sync::{mpsc, oneshot};

use crate::clock::{Clock, blocking};
use crate::config::{AutoCompaction, ValidConfig};
use crate::error::{Error, Result};
use crate::raft::log_store::LogStore;
use crate::raft::network::Network;
use crate::raft::state_machine::StateMachine;
use crate::raft::{Applied, Proposal, Raft};

/// Etcd version reported by Status and `/version`, so version-gated clients work.
pub const ETCD_COMPAT_VERSION: &str = "3.7.0";
/// Committed-but-unapplied entries beyond which writes get `too many requests`.
pub const APPLY_GAP_MAX: u64 = 5000;
/// Lessor driver tick (etcd checks expiry every 500 ms).
const LESSOR_TICK: Duration = Duration::from_millis(500);
/// How often the primary checkpoints remaining lease TTLs.
const LEASE_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(300);
/// Raft log entries between snapshots. A snapshot only makes the store durable and records what
/// it covers, so it is cheap; it exists so the log can be purged.
/// Entries are batches of up to `PROPOSAL_BYTES_MAX`, so this count stays small.
const SNAPSHOT_LOGS_SINCE_LAST: u64 = 1_000;
/// Entries kept in the log after a snapshot, for slightly lagging followers.
const LOGS_KEPT_AFTER_SNAPSHOT: u64 = 200;
/// Block cache of the store.
const STORE_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// Journal bytes the store keeps before flushing memtables; bounds what a restart after a crash
/// replays (fjall's default is 512 MiB).
const STORE_JOURNAL_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// A running member.
pub struct Node {
    /// Validated configuration.
    pub config: ValidConfig,
    /// The MVCC store.
    pub store: Arc<KvStore>,
    /// The raft handle.
    pub raft: Raft,
    /// This member's ID.
    pub member_id: u64,
    /// The cluster's ID.
    pub cluster_id: u64,
    /// Monotonic clock shared with the state machine.
    pub clock: Clock,
    /// Flips to true when shutdown starts; streams end when they see it.
    pub shutdown: watch::Receiver<bool>,
    /// Writes waiting for the proposer task.
    proposals: mpsc::Sender<Pending>,
}

/// A write waiting to be proposed, with where its outcome goes.
type Pending = (WriteRequest, oneshot::Sender<Result<WriteResponse>>);

/// Writes queued for the proposer before `propose` waits (back-pressure).
const PROPOSAL_QUEUE_MAX: usize = 4096;
/// Writes per raft entry.
const PROPOSAL_WRITES_MAX: usize = 512;
/// Encoded bytes per raft entry before the batch is closed (a single write may add up to
/// `--max-request-bytes` more; the log accepts records up to 16 MiB).
const PROPOSAL_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Raft entries proposed but not yet applied; while they are in flight, new writes accumulate
/// into the next batch.
const PROPOSALS_IN_FLIGHT_MAX: usize = 4;

fn client_write_error(e: ClientWriteError<u64, BasicNode>) -> Error {
    match e {
        ClientWriteError::ForwardToLeader(f) => {
            if f.leader_id.is_none() {
                Error::NoLeader
            } else {
                Error::LeaderChanged
            }
        }
        ClientWriteError::ChangeMembershipError(e) => Error::Internal(e.to_string()),
    }
}

/// Batches queued writes into raft entries: one entry per batch, at most
/// `PROPOSALS_IN_FLIGHT_MAX` in flight, submitted in queue order.
async fn proposer(raft: Raft, mut queue: mpsc::Receiver<Pending>) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(PROPOSALS_IN_FLIGHT_MAX));
    while let Some(first) = queue.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = postcard::to_allocvec(&first.0).map_or(0, |v| v.len());
        let mut batch = vec![first];
        while batch.len() < PROPOSAL_WRITES_MAX && bytes < PROPOSAL_BYTES_MAX {
            let Ok(next) = queue.try_recv() else { break };
            bytes += postcard::to_allocvec(&next.0).map_or(0, |v| v.len());
            batch.push(next);
        }
        let (writes, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let submitted = raft.client_write_ff(Proposal { writes }).await;
        tokio::spawn(async move {
            let outcome = match submitted {
                Err(_) => Err(Error::Stopped),
                Ok(rx) => match rx.await {
                    Err(_) => Err(Error::Stopped),
                    Ok(Err(e)) => Err(client_write_error(e)),
                    Ok(Ok(r)) => Ok(r.data),
                },
            };
            match outcome {
                Ok(Applied::Writes(results)) if results.len() == waiters.len() => {
                    for (w, r) in waiters.into_iter().zip(results) {
                        let _ = w.send(r.map_err(Error::Store));
                    }
                }
                Ok(other) => {
                    let e = Error::Internal(format!("proposal applied as {other:?}"));
                    for w in waiters {
                        let _ = w.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    for w in waiters {
                        let _ = w.send(Err(e.clone()));
                    }
                }
            }
            drop(permit);
        });
    }
}

impl Node {
    /// Request timeout for proposals (etcd: 5 s + 2 × election timeout).
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(5) + 2 * self.config.election_timeout
    }

    /// Current raft term.
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// Current leader, if known.
    pub fn leader(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }

    /// Whether this member is the leader.
    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.member_id)
    }

    /// `(committed index, applied index)`.
    pub fn raft_indexes(&self) -> (u64, u64) {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let applied = m.last_applied.map_or(0, |l| l.index);
        let committed = m.last_log_index.unwrap_or(0).max(applied);
        (committed, applied)
    }

    /// Minimum lease TTL in seconds: ceil(1.5 × election timeout), as etcd.
    pub fn min_lease_ttl(&self) -> i64 {
        let ms = self.config.election_timeout.as_millis() as i64 * 3 / 2;
        (ms + 999) / 1000
    }

    /// Proposes a write through raft and waits for its applied result. Concurrent writes are
    /// batched into one raft entry by the proposer task.
    ///
    /// # Errors
    /// Store domain errors, `NoLeader`, `Timeout`, `Stopped`, `TooManyRequests`.
    pub async fn propose(&self, req: WriteRequest) -> Result<WriteResponse> {
        let (committed, applied) = self.raft_indexes();
        if committed.saturating_sub(applied) > APPLY_GAP_MAX {
            return Err(Error::TooManyRequests);
        }
        let (tx, rx) = oneshot::channel();
        self.proposals
            .send((req, tx))
            .await
            .map_err(|_| Error::Stopped)?;
        match tokio::time::timeout(self.request_timeout(), rx).await {
            Err(_) => Err(Error::Timeout),
            Ok(Err(_)) => Err(Error::Stopped),
            Ok(Ok(result)) => result,
        }
    }

    /// ReadIndex barrier: returns once this member has applied everything committed when the
    /// call started, confirmed by a quorum. Never appends to the log.
    ///
    /// # Errors
    /// `NoLeader`, `Timeout`, `Stopped`.
    pub async fn read_barrier(&self) -> Result<()> {
        let barrier = self.raft.ensure_linearizable();
        match tokio::time::timeout(self.request_timeout(), barrier).await {
            Err(_) => Err(Error::Timeout),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)))) => {
                Err(Error::NoLeader)
            }
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => {
                Err(Error::Timeout)
            }
            Ok(Err(RaftError::Fatal(_))) => Err(Error::Stopped),
        }
    }

    /// Proposes a compaction; once applied, reclaims the compacted history's disk space in the
    /// background (so no defragment is needed to get it back).
    ///
    /// # Errors
    /// As [`Node::propose`].
    pub async fn compact(&self, revision: i64) -> Result<WriteResponse> {
        let resp = self.propose(WriteRequest::Compact { revision }).await?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let (before, started) = (store.size_bytes(), std::time::Instant::now());
            match store.reclaim_compacted() {
                Ok(false) => {}
                Ok(true) => tracing::info!(
                    revision,
                    before_bytes = before,
                    after_bytes = store.size_bytes(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "reclaimed compacted history"
                ),
                Err(e) => tracing::warn!(error = %e, "reclaiming compacted history"),
            }
        });
        Ok(resp)
    }

    /// Runs blocking store work.
    pub fn blocking<T>(&self, f: impl FnOnce(&KvStore) -> T) -> T {
        blocking(|| f(&self.store))
    }
}

/// Opens the data dir, starts raft, serves clients until `shutdown` resolves, then stops in
/// order.
///
/// # Errors
/// Startup failures (data dir, listeners); runtime failures are logged.
pub async fn run(config: ValidConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)?;
    let db = fjall::Database::builder(config.data_dir.join("db"))
        .cache_size(STORE_CACHE_BYTES)
        .max_journaling_size(STORE_JOURNAL_BYTES_MAX)
        .open()?;
    let options = StoreOptions {
        quota_bytes: config.quota_bytes,
        ..StoreOptions::default()
    };
    let store = Arc::new(KvStore::with_database(db, options)?);
    let log_store = LogStore::open(&config.data_dir.join("raft-log"))?;
    let clock = Clock::default();
    let sm = StateMachine::new(store.clone(), config.data_dir.join("snap"), clock)?;

    let member_ids: Vec<u64> = config
        .initial_cluster
        .iter()
        .map(|(_, urls)| crate::ids::member_id(urls, &config.cluster_token))
        .collect();
    let member_id = crate::ids::member_id(&config.advertise_peer_urls, &config.cluster_token);
    let cluster_id = crate::ids::cluster_id(&member_ids);

    let election_ms = config.election_timeout.as_millis() as u64;
    let raft_config = openraft::Config {
        cluster_name: config.cluster_token.clone(),
        heartbeat_interval: config.heartbeat.as_millis() as u64,
        election_timeout_min: election_ms,
        election_timeout_max: election_ms * 2,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(SNAPSHOT_LOGS_SINCE_LAST),
        max_in_snapshot_log_to_keep: LOGS_KEPT_AFTER_SNAPSHOT,
        ..Default::default()
    }
    .validate()?;
    let raft = Raft::new(member_id, Arc::new(raft_config), Network, log_store, sm).await?;
    if !raft.is_initialized().await? {
        let mut members = BTreeMap::new();
        for (_, urls) in &config.initial_cluster {
            let id = crate::ids::member_id(urls, &config.cluster_token);
            members.insert(id, BasicNode::new(urls.join(",")));
        }
        raft.initialize(members).await?;
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (proposals, queue) = mpsc::channel(PROPOSAL_QUEUE_MAX);
    let proposer_task = tokio::spawn(proposer(raft.clone(), queue));
    let node = Arc::new(Node {
        config: config.clone(),
        store,
        raft,
        member_id,
        cluster_id,
        clock,
        shutdown: shutdown_rx,
        proposals,
    });
    tracing::info!(
        name = %config.name,
        member_id = format!("{member_id:x}"),
        cluster_id = format!("{cluster_id:x}"),
        data_dir = %config.data_dir.display(),
        version = env!("CARGO_PKG_VERSION"),
        "starting keyhold-node"
    );

    let drivers = vec![
        tokio::spawn(lessor_driver(node.clone())),
        tokio::spawn(compaction_driver(node.clone())),
        tokio::spawn(crate::http::metrics_driver(node.clone())),
    ];
    let router = crate::api::router(node.clone()).merge(crate::http::router(node.clone()));
    let mut servers = Vec::new();
    for addr in &config.listen_client {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(%addr, "serving client traffic (gRPC + HTTP)");
        let app = router.clone();
        let stop = stopped(node.shutdown.clone());
        // Without TCP_NODELAY, small HTTP/2 frames meet Nagle + delayed ACK: ~40 ms per request.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!(error = %e, "setting TCP_NODELAY");
            }
        });
        servers.push(tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        }));
    }

    shutdown.await;
    tracing::info!("shutting down: closing client streams");
    let _ = shutdown_tx.send(true);
    for s in servers {
        // Streams end on the shutdown signal; do not wait forever for slow clients.
        let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
    }
    for d in drivers {
        d.abort();
    }
    proposer_task.abort();
    tracing::info!("shutting down: raft");
    if let Err(e) = node.raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    node.store.persist()?;
    tracing::info!("stopped");
    Ok(())
}

/// Prints every change in the data dir's history as one JSON object per line
/// (`revision`, `sub`, hex `key`/`value`, `put`, `create_revision`, `version`).
///
/// # Errors
/// When the data dir cannot be opened (for example, a node is running on it).
pub fn dump_history(data_dir: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write;
    let db = fjall::Database::builder(data_dir.join("db")).open()?;
    let store = KvStore::with_database(db, StoreOptions::default())?;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    writeln!(
        out,
        "{}",
        serde_json::json!({ "compact_revision": store.compact_revision()? })
    )?;
    let mut failed = None;
    store.for_each_history(|rev, kv, tombstone| {
        let line = serde_json::json!({
            "revision": rev.main,
            "sub": rev.sub,
            "key": hex(&kv.key),
            "value": hex(&kv.value),
            "put": !tombstone,
            "create_revision": kv.create_revision,
            "version": kv.version,
        });
        if let Err(e) = writeln!(out, "{line}") {
            failed = Some(e);
        }
    })?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    out.flush()?;
    Ok(())
}

/// Resolves once shutdown has started.
pub async fn stopped(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await.map(|_| ());
}

/// Leader-only: turns lease expiry into replicated revokes at a bounded rate, checkpoints
/// remaining TTLs, and promotes/demotes the lessor on leadership changes.
async fn lessor_driver(node: Arc<Node>) {
    let mut tick = tokio::time::interval(LESSOR_TICK);
    let mut was_leader = false;
    let mut last_checkpoint = node.clock.now_ms();
    loop {
        tick.tick().await;
        let now = node.clock.now_ms();
        let leader = node.is_leader();
        if leader != was_leader {
            let extend = node.config.election_timeout.as_millis() as u64;
            node.store.with_lessor(|l| {
                if leader {
                    l.promote(now, extend)
                } else {
                    l.demote()
                }
            });
            was_leader = leader;
        }
        if !leader {
            continue;
        }
        let expired = node
            .store
            .with_lessor(|l| l.expired(now, keyhold_store::limits::LEASE_REVOKES_PER_TICK_MAX));
        for id in expired {
            match node.propose(WriteRequest::LeaseRevoke { id }).await {
                Ok(_) | Err(Error::Store(keyhold_store::Error::LeaseNotFound)) => {}
                Err(e) => tracing::warn!(lease = id, error = %e, "revoking expired lease"),
            }
        }
        let interval = LEASE_CHECKPOINT_INTERVAL.as_millis() as u64;
        if now.saturating_sub(last_checkpoint) >= interval {
            last_checkpoint = now;
            let due = node
                .store
                .with_lessor(|l| l.checkpoints_due(now, interval, 1000));
            for (id, remaining_ttl) in due {
                let _ = node
                    .propose(WriteRequest::LeaseCheckpoint { id, remaining_ttl })
                    .await;
            }
        }
    }
}

/// Auto compaction (`--auto-compaction-mode/-retention`), leader only.
async fn compaction_driver(node: Arc<Node>) {
    let (period, keep) = match node.config.auto_compaction {
        AutoCompaction::Disabled => return,
        AutoCompaction::Periodic(d) => ((d / 10).max(Duration::from_secs(1)), None),
        AutoCompaction::Revision(n) => (Duration::from_secs(300), Some(n)),
    };
    let mut tick = tokio::time::interval(period);
    // (time, revision) samples for periodic mode; bounded: one per tick, retention/10 apart.
    let mut samples: std::collections::VecDeque<(u64, i64)> = Default::default();
    loop {
        tick.tick().await;
        let Ok(current) = node.store.current_revision() else {
            continue;
        };
        let target = match (keep, node.config.auto_compaction) {
            (Some(n), _) => current - n,
            (None, AutoCompaction::Periodic(d)) => {
                let now = node.clock.now_ms();
                samples.push_back((now, current));
                let horizon = now.saturating_sub(d.as_millis() as u64);
                let mut target = 0;
                while samples.front().is_some_and(|(t, _)| *t <= horizon) {
                    target = samples.pop_front().map_or(0, |s| s.1);
                }
                target
            }
            _ => 0,
        };
        let compacted = node.store.compact_revision().unwrap_or(0);
        if node.is_leader() && target > compacted && target > 1 {
            match node
                .propose(WriteRequest::Compact { revision: target })
                .await
            {
                Ok(_) => tracing::info!(revision = target, "auto compaction"),
                Err(e) => tracing::warn!(revision = target, error = %e, "auto compaction"),
            }
        }
    }
}
