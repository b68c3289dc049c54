//! The node: composes the store, openraft, the client server and background drivers, and owns
//! the ordered shutdown path.
//!
//! Shutdown order: stop accepting client connections and end watch/keepalive streams → stop the
//! drivers → `raft.shutdown()` → stop the journal writeback → `store.persist()` (fsync) → drop.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use keyhold_store::{KvStore, StoreOptions, WriteRequest, WriteResponse};
use openraft::SnapshotPolicy;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use tokio::sync::watch;
use tokio::sync::{mpsc, oneshot};

use crate::clock::{Clock, blocking};
use crate::config::{AutoCompaction, ValidConfig, parse_url};
use crate::error::{Error, Result};
use crate::peer::wire::{PeerRequest, PeerResponse};
use crate::peer::{PeerError, Peers};
use crate::raft::log_store::LogStore;
use crate::raft::network::Network;
use crate::raft::proposals::{self, ProposalWaiters, Waiter};
use crate::raft::state_machine::StateMachine;
use crate::raft::{Applied, Forwarded, Member, Proposal, Raft};
use crate::writeback::JournalWriteback;

/// Etcd version reported by Status and `/version`, so version-gated clients work.
pub const ETCD_COMPAT_VERSION: &str = "3.7.0";
/// Committed-but-unapplied entries beyond which writes get `too many requests`.
pub const APPLY_GAP_MAX: u64 = 5000;
/// Lessor driver tick (etcd checks expiry every 500 ms).
const LESSOR_TICK: Duration = Duration::from_millis(500);
/// Longest drift of a lease's remaining TTL before the leader checkpoints it through raft
/// (shorter leases checkpoint at half their TTL; see `Lessor::checkpoints_due`).
const LEASE_CHECKPOINT_DRIFT_MAX: Duration = Duration::from_secs(300);
/// Lease checkpoints proposed per lessor tick.
const LEASE_CHECKPOINTS_PER_TICK_MAX: usize = 1000;
/// Raft log entries between snapshots. A snapshot only makes the store durable and records what
/// it covers, so it is cheap; it exists so the log can be purged.
/// Entries are batches of up to `PROPOSAL_BYTES_MAX`, so this count stays small.
const SNAPSHOT_LOGS_SINCE_LAST: u64 = 1_000;
/// Entries kept in the log after a snapshot, for slightly lagging followers.
const LOGS_KEPT_AFTER_SNAPSHOT: u64 = 200;
/// Entries per append-entries message (each up to ~6 MiB; see `peer::wire::FRAME_BYTES_MAX`).
const RAFT_PAYLOAD_ENTRIES_MAX: u64 = 16;
/// Read-index rounds in flight at once (each is one quorum confirmation).
const READ_ROUNDS_IN_FLIGHT_MAX: usize = 4;
/// Linearizable reads waiting for the next read-index round.
const READ_INDEX_QUEUE_MAX: usize = 4096;
/// Meta key of the cluster ID, learned at bootstrap or from a peer when joining.
const META_CLUSTER_ID: &[u8] = b"member/cluster_id";
/// How long a joining member keeps asking peers for the cluster ID before giving up.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Retry interval of a member publishing its name and client URLs.
pub(crate) const PUBLISH_RETRY: Duration = Duration::from_millis(100);
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
    /// Linearizable reads waiting for a read index.
    reads: mpsc::Sender<ReadWaiter>,
    /// The peer plane.
    pub peers: Arc<Peers>,
    /// Held for writing while leadership is being moved (MoveLeader): proposals and read-index
    /// rounds, which would refresh the followers' leader leases, wait (read side).
    transfer_gate: Arc<tokio::sync::RwLock<()>>,
    /// Clients of this member's proposals, shared with its state machine.
    waiters: Arc<ProposalWaiters>,
}

/// Writes waiting to be proposed together (a client's write, or a follower's forwarded
/// proposal, never split between entries), with where each outcome goes: the index of the raft
/// entry that carried it and what applying it produced.
struct Pending {
    writes: Vec<WriteRequest>,
    waiters: Vec<Waiter>,
    /// The follower and its proposal ID, when the writes were forwarded.
    forwarded: Option<(u64, u64)>,
}

impl Pending {
    fn one(req: WriteRequest, waiter: Waiter) -> Self {
        Self {
            writes: vec![req],
            waiters: vec![waiter],
            forwarded: None,
        }
    }
}

/// Groups of writes queued for the proposer before `propose` waits (back-pressure): a
/// client's write each, or a follower's forwarded proposal (at most `PROPOSAL_WRITES_MAX`).
const PROPOSAL_QUEUE_MAX: usize = 4096;
/// Writes per raft entry, before the last group added (a group is never split).
const PROPOSAL_WRITES_MAX: usize = 512;
/// Encoded bytes per raft entry before the batch is closed (a single write may add up to
/// `--max-request-bytes` more; the log accepts records up to 16 MiB).
const PROPOSAL_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Raft entries proposed but not yet applied; while they are in flight, new writes accumulate
/// into the next batch.
const PROPOSALS_IN_FLIGHT_MAX: usize = 4;
/// While the member applies writes, a compaction sweep pauses at least this many times as long
/// as its last step took, so it uses at most a fifth of a core beside the load (an idle member
/// sweeps at `--compaction-sleep-interval`).
const SWEEP_PAUSE_PER_STEP_UNDER_LOAD: u32 = 4;

fn client_write_error(e: ClientWriteError<u64, Member>) -> Error {
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

/// Routes work to the leader: proposes locally when this member leads, forwards over the peer
/// plane otherwise.
#[derive(Clone)]
struct Router {
    raft: Raft,
    peers: Arc<Peers>,
    me: u64,
    timeout: Duration,
    gate: Arc<tokio::sync::RwLock<()>>,
    /// Clients of this member's proposals, shared with its state machine.
    waiters: Arc<ProposalWaiters>,
}

impl Router {
    fn leader(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }

    /// The leader's ID and peer address.
    fn leader_addr(&self) -> Result<(u64, std::net::SocketAddr)> {
        let leader = self.leader().ok_or(Error::NoLeader)?;
        let addr = member_addr(&self.raft, leader).ok_or(Error::NoLeader)?;
        Ok((leader, addr))
    }

    /// Sends `request` to the leader. When raft learns of another leader (or loses the one it
    /// had) before the answer arrives, the call ends with `leader changed` at once instead of
    /// waiting out the timeout on a leader that may be dead.
    async fn to_leader(&self, request: PeerRequest) -> Result<PeerResponse> {
        let (leader, addr) = self.leader_addr()?;
        // Server metrics change only with leadership, votes and membership; raft's full
        // metrics are sent on every turn of its core, several times per write.
        let mut server = self.raft.server_metrics();
        let deposed = async move {
            let _ = server.wait_for(|m| m.current_leader != Some(leader)).await;
        };
        let call = self.peers.call(leader, addr, request, self.timeout);
        tokio::select! {
            r = call => match r {
                Ok(r) => Ok(r),
                Err(PeerError::Remote(e)) => Err(e),
                // Whether a forwarded request ran is unknown: as a proposal that timed out.
                Err(PeerError::Failed(..)) => Err(Error::Timeout),
                Err(PeerError::Unreachable(..)) => Err(Error::LeaderUnreachable),
            },
            _ = deposed => Err(Error::LeaderChanged),
        }
    }

    /// Proposes `proposal` (forwarding its writes when this member does not lead) and answers
    /// `waiters`, one per write, with the index of the (last) entry that carried them and each
    /// write's outcome, once this member has applied them (so a serializable read here sees the
    /// write). This member's state machine usually answers first, as it applies the entry
    /// ([`ProposalWaiters`]); the answer from raft or from the leader is the fallback.
    async fn submit(&self, mut proposal: Proposal, waiters: Vec<Waiter>) {
        let id = self.waiters.register(waiters);
        let outcome = if self.leader() == Some(self.me) {
            proposal.id = id;
            match self.raft.client_write_ff(proposal).await {
                Err(_) => Err(Error::Stopped),
                Ok(rx) => match rx.await {
                    Err(_) => Err(Error::Stopped),
                    Ok(Err(e)) => Err(client_write_error(e)),
                    Ok(Ok(r)) => Ok((r.log_id.index, r.data)),
                },
            }
        } else {
            // Runs other followers forwarded here stay unnamed: this member's own run covers
            // their writes, and they fall back to this member's answer.
            let count = proposal.writes.len() as u32;
            proposal.id = 0;
            proposal.forwarded = vec![Forwarded {
                member: self.me,
                id,
                first: 0,
                count,
            }];
            match self.to_leader(PeerRequest::Forward(proposal)).await {
                Ok(PeerResponse::Forward { index, applied }) => {
                    self.wait_applied(index).await.map(|()| (index, applied))
                }
                Ok(other) => Err(Error::Internal(format!("leader answered {other:?}"))),
                Err(e) => Err(e),
            }
        };
        if let Some(waiters) = self.waiters.take(id) {
            if let Ok((index, _)) = &outcome {
                crate::probe::mark(crate::probe::Stage::ProposalApplied, *index);
            }
            proposals::answer(waiters, outcome);
        }
    }

    /// Waits until this member has applied `index`. Every linearizable read and forwarded
    /// write passes here, and the index is usually applied already: that case only looks at the
    /// metrics (openraft's `Wait` clones all of them, membership included, on every check).
    /// Raft's data metrics are watched: they change only when its log or apply progress does.
    async fn wait_applied(&self, index: u64) -> Result<()> {
        let applied = |m: &openraft::metrics::RaftDataMetrics<u64>| {
            index == 0 || m.last_applied.is_some_and(|l| l.index >= index)
        };
        let mut metrics = self.raft.data_metrics();
        if applied(&metrics.borrow()) {
            return Ok(());
        }
        match tokio::time::timeout(self.timeout, metrics.wait_for(applied)).await {
            Err(_) => Err(Error::Timeout),
            // The sender went away: raft has stopped.
            Ok(Err(_)) => Err(Error::Stopped),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// A read index confirmed by a quorum: from raft when this member leads, from the leader
    /// otherwise.
    async fn read_index(&self) -> Result<u64> {
        if self.leader() == Some(self.me) {
            return leader_read_index(&self.raft).await;
        }
        match self.to_leader(PeerRequest::ReadIndex).await? {
            PeerResponse::ReadIndex(i) => Ok(i),
            other => Err(Error::Internal(format!("leader answered {other:?}"))),
        }
    }
}

/// The read index on the leader (a heartbeat round confirms leadership; never a log append).
async fn leader_read_index(raft: &Raft) -> Result<u64> {
    match raft.get_read_log_id().await {
        Ok((read, _applied)) => Ok(read.map_or(0, |l| l.index)),
        Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
            Err(if f.leader_id.is_some() {
                Error::LeaderChanged
            } else {
                Error::NoLeader
            })
        }
        Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => Err(Error::Timeout),
        Err(RaftError::Fatal(_)) => Err(Error::Stopped),
    }
}

/// The peer address of member `id` from the current membership.
fn member_addr(raft: &Raft, id: u64) -> Option<std::net::SocketAddr> {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    let member = m.membership_config.membership().get_node(&id)?;
    member.peer_addr()
}

/// Batches queued writes into raft entries: one entry per batch, at most
/// `PROPOSALS_IN_FLIGHT_MAX` in flight, submitted in queue order.
async fn proposer(router: Router, mut queue: mpsc::Receiver<Pending>) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(PROPOSALS_IN_FLIGHT_MAX));
    while let Some(first) = queue.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let size = |p: &Pending| postcard::experimental::serialized_size(&p.writes).unwrap_or(0);
        let mut bytes = size(&first);
        let mut writes = first.writes.len();
        let mut batch = vec![first];
        while writes < PROPOSAL_WRITES_MAX && bytes < PROPOSAL_BYTES_MAX {
            let Ok(next) = queue.try_recv() else { break };
            bytes += size(&next);
            writes += next.writes.len();
            batch.push(next);
        }
        let mut proposal = Proposal {
            writes: Vec::with_capacity(writes),
            id: 0,
            forwarded: Vec::new(),
        };
        let mut waiters = Vec::with_capacity(writes);
        for group in batch {
            if let Some((member, id)) = group.forwarded {
                proposal.forwarded.push(Forwarded {
                    member,
                    id,
                    first: proposal.writes.len() as u32,
                    count: group.writes.len() as u32,
                });
            }
            proposal.writes.extend(group.writes);
            waiters.extend(group.waiters);
        }
        let router = router.clone();
        tokio::spawn(async move {
            let gate = router.gate.clone();
            let _open = gate.read().await;
            router.submit(proposal, waiters).await;
            drop(permit);
        });
    }
}

/// Who asked for a read index: a linearizable read on this member, or a follower's read
/// (`PeerRequest::ReadIndex`), which only a leader may answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadFor {
    Local,
    Follower,
}

/// A read waiting for a read index.
type ReadWaiter = (ReadFor, oneshot::Sender<Result<u64>>);

/// Serves read indexes in rounds: every read queued when a round starts shares that round's
/// read index (one quorum confirmation for many reads, as etcd batches ReadIndex). Up to
/// `READ_ROUNDS_IN_FLIGHT_MAX` rounds overlap, so reads arriving during a round do not wait for
/// it to end. A round only ever serves reads queued before it started.
///
/// On the leader the followers' requests join the same rounds, so one heartbeat round confirms
/// leadership for the reads of every member instead of one per follower request. A follower
/// forwards its local reads; a follower's request that reaches a member that no longer leads
/// is refused, never forwarded again (two members that each think the other leads would pass
/// it back and forth).
async fn read_indexer(router: Router, mut queue: mpsc::Receiver<ReadWaiter>) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(READ_ROUNDS_IN_FLIGHT_MAX));
    while let Some(first) = queue.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut waiters = vec![first];
        while let Ok(next) = queue.try_recv() {
            waiters.push(next);
        }
        let router = router.clone();
        tokio::spawn(async move {
            let _open = router.gate.read().await;
            let leader = router.leader();
            let index = if leader == Some(router.me) {
                leader_read_index(&router.raft).await
            } else {
                let refused = match leader {
                    Some(_) => Error::LeaderChanged,
                    None => Error::NoLeader,
                };
                let (local, followers): (Vec<_>, Vec<_>) = std::mem::take(&mut waiters)
                    .into_iter()
                    .partition(|(from, _)| *from == ReadFor::Local);
                for (_, w) in followers {
                    let _ = w.send(Err(refused.clone()));
                }
                waiters = local;
                if waiters.is_empty() {
                    return;
                }
                router.read_index().await
            };
            for (_, w) in waiters {
                let _ = w.send(index.clone());
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
        // The state machine's own count runs ahead of raft's metrics (see `ProposalWaiters`).
        let applied = m
            .last_applied
            .map_or(0, |l| l.index)
            .max(self.waiters.applied_index());
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
        self.propose_at(req).await.map(|(_, resp)| resp)
    }

    /// [`Node::propose`], also returning the log index the request was applied at.
    async fn propose_at(&self, req: WriteRequest) -> Result<(u64, WriteResponse)> {
        crate::probe::mark(crate::probe::Stage::ProposeStarted, 0);
        let result = self.propose_queued(req).await;
        let index = result.as_ref().map_or(0, |(index, _)| *index);
        crate::probe::mark(crate::probe::Stage::ProposeReturned, index);
        result
    }

    async fn propose_queued(&self, req: WriteRequest) -> Result<(u64, WriteResponse)> {
        let (committed, applied) = self.raft_indexes();
        if committed.saturating_sub(applied) > APPLY_GAP_MAX {
            return Err(Error::TooManyRequests);
        }
        let (tx, rx) = oneshot::channel();
        self.proposals
            .send(Pending::one(req, tx))
            .await
            .map_err(|_| Error::Stopped)?;
        match tokio::time::timeout(self.request_timeout(), rx).await {
            Err(_) => Err(Error::Timeout),
            Ok(Err(_)) => Err(Error::Stopped),
            Ok(Ok(result)) => result.and_then(|(index, r)| Ok((index, r.map_err(Error::Store)?))),
        }
    }

    /// ReadIndex barrier: returns once this member has applied everything committed when the
    /// call started, confirmed by a quorum (through the leader when this member follows).
    /// Never appends to the log.
    ///
    /// # Errors
    /// `NoLeader`, `Timeout`, `Stopped`, `LearnerNotSupported`.
    pub async fn read_barrier(&self) -> Result<()> {
        self.refuse_learner()?;
        let barrier = async {
            let index = self.queue_read(ReadFor::Local).await?;
            self.router().wait_applied(index).await
        };
        match tokio::time::timeout(self.request_timeout(), barrier).await {
            Err(_) => Err(Error::Timeout),
            Ok(r) => r,
        }
    }

    fn router(&self) -> Router {
        Router {
            raft: self.raft.clone(),
            peers: self.peers.clone(),
            me: self.member_id,
            timeout: self.request_timeout(),
            gate: self.transfer_gate.clone(),
            waiters: self.waiters.clone(),
        }
    }

    /// Whether this member is a learner (it does not vote, and refuses what etcd learners
    /// refuse).
    pub fn is_learner(&self) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        membership.get_node(&self.member_id).is_some()
            && !membership.voter_ids().any(|id| id == self.member_id)
    }

    /// etcd learners serve only serializable reads and maintenance status.
    ///
    /// # Errors
    /// `LearnerNotSupported` on a learner.
    pub fn refuse_learner(&self) -> Result<()> {
        if self.is_learner() {
            return Err(Error::LearnerNotSupported);
        }
        Ok(())
    }

    /// Sends `request` to the leader over the peer plane.
    ///
    /// # Errors
    /// `NoLeader`, `Timeout`, or the leader's error.
    pub async fn to_leader(&self, request: PeerRequest) -> Result<PeerResponse> {
        self.router().to_leader(request).await
    }

    /// Leader side of a forwarded proposal. Its writes join this member's own proposal queue
    /// as one group, so the proposer packs writes from every member into the same raft entries
    /// (a follower's small batch would otherwise be an entry of its own) and keeps the group in
    /// one entry, which names the follower's run of it (see [`ProposalWaiters`]). Returns the
    /// index of that entry, which the follower waits to apply, and the writes' outcomes.
    ///
    /// The proposer takes the MoveLeader gate itself; holding it here too could deadlock
    /// behind a waiting transfer.
    ///
    /// # Errors
    /// `LeaderChanged` when this member does not lead; `Timeout`; for a failure after some of
    /// the writes were committed, the failure (their outcome is unknown to the client, as for a
    /// write that timed out).
    pub async fn lead_proposal(&self, proposal: Proposal) -> Result<(u64, Applied)> {
        if !self.is_leader() {
            return Err(Error::LeaderChanged);
        }
        // The follower's run, when the forward names one covering every write.
        let n = proposal.writes.len();
        let forwarded = match proposal.forwarded.as_slice() {
            [f] if f.writes() == (0..n) => Some((f.member, f.id)),
            _ => None,
        };
        let (waiters, outcomes): (Vec<_>, Vec<_>) = (0..n).map(|_| oneshot::channel()).unzip();
        let group = Pending {
            writes: proposal.writes,
            waiters,
            forwarded,
        };
        self.proposals
            .send(group)
            .await
            .map_err(|_| Error::Stopped)?;
        let collect = async {
            let mut last = 0;
            let mut results = Vec::with_capacity(outcomes.len());
            for rx in outcomes {
                let (index, result) = rx.await.map_err(|_| Error::Stopped)??;
                last = last.max(index);
                results.push(result);
            }
            Ok((last, Applied::Writes(results)))
        };
        tokio::time::timeout(self.request_timeout(), collect)
            .await
            .map_err(|_| Error::Timeout)?
    }

    /// Leader side of a follower's read index.
    ///
    /// # Errors
    /// `LeaderChanged`, `NoLeader`, `Timeout`.
    pub async fn lead_read_index(&self) -> Result<u64> {
        self.queue_read(ReadFor::Follower).await
    }

    /// The read index of the next read-index round (see [`read_indexer`]).
    async fn queue_read(&self, from: ReadFor) -> Result<u64> {
        let (tx, rx) = oneshot::channel();
        self.reads
            .send((from, tx))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Moves leadership to voter `target` (etcd's MoveLeader). openraft 0.9 has no TimeoutNow,
    /// so the leader quiesces instead: once `target` has the whole log, the other followers'
    /// election timers are turned off, this leader stops heartbeats and proposals for one
    /// leader lease (`election_timeout_max`, after which followers grant votes again), and
    /// `target` campaigns; its log is the longest, so it wins. Writes wait (not fail) meanwhile.
    ///
    /// # Errors
    /// `NotLeader` on a follower, `BadLeaderTransferee`, `LeaderTransferTimeout`.
    pub async fn move_leader(&self, target: u64) -> Result<()> {
        if !self.is_leader() {
            return Err(Error::NotLeader);
        }
        let listed = crate::membership::list(self);
        if !listed.iter().any(|m| m.id == target && !m.is_learner) {
            return Err(Error::BadLeaderTransferee);
        }
        if target == self.member_id {
            return Ok(());
        }
        let others: Vec<u64> = listed
            .iter()
            .filter(|m| m.id != target && m.id != self.member_id)
            .map(|m| m.id)
            .collect();
        let deadline = tokio::time::Instant::now() + self.request_timeout();
        let _quiet = tokio::time::timeout_at(deadline, self.transfer_gate.write())
            .await
            .map_err(|_| Error::LeaderTransferTimeout)?;
        let router = self.router();
        let set_elect = |enabled: bool| {
            let (router, others) = (router.clone(), others.clone());
            async move {
                for id in others {
                    if let Some(addr) = member_addr(&router.raft, id) {
                        let req = PeerRequest::SetElect { enabled };
                        let _ = router.peers.call(id, addr, req, router.timeout).await;
                    }
                }
            }
        };
        let transfer = async {
            // The target must hold the whole log, or it could not win.
            let mut metrics = self.raft.metrics();
            metrics
                .wait_for(|m| {
                    let last = m.last_log_index;
                    m.replication
                        .as_ref()
                        .is_some_and(|r| r.get(&target).cloned().flatten().map(|l| l.index) == last)
                })
                .await
                .map_err(|_| Error::Stopped)?;
            set_elect(false).await;
            self.raft.runtime_config().heartbeat(false);
            let lease = Duration::from_millis(self.raft.config().election_timeout_max);
            tokio::time::sleep(lease + self.config.heartbeat).await;
            let addr = member_addr(&self.raft, target).ok_or(Error::BadLeaderTransferee)?;
            router
                .peers
                .call(target, addr, PeerRequest::Campaign, router.timeout)
                .await
                .map_err(|_| Error::LeaderTransferTimeout)?;
            let mut metrics = self.raft.metrics();
            metrics
                .wait_for(|m| m.current_leader == Some(target))
                .await
                .map_err(|_| Error::Stopped)?;
            Ok(())
        };
        let outcome = tokio::time::timeout_at(deadline, transfer).await;
        self.raft.runtime_config().heartbeat(true);
        set_elect(true).await;
        match outcome {
            Ok(r) => r,
            Err(_) => Err(Error::LeaderTransferTimeout),
        }
    }

    /// Renews a lease on the leader: remaining TTL, 0 when unknown or expired.
    ///
    /// # Errors
    /// `LeaderChanged` when this member does not lead.
    pub fn lead_lease_renew(&self, id: i64) -> Result<i64> {
        if !self.is_leader() {
            return Err(Error::LeaderChanged);
        }
        self.promote_lessor_if_leading();
        let now = self.clock.now_ms();
        let (checkpointed, ttl) = self.store.with_lessor(|l| {
            let checkpointed = l.get(id).is_some_and(|x| x.remaining_ttl > 0);
            (checkpointed, l.renew(id, now).unwrap_or(0))
        });
        if checkpointed && ttl > 0 {
            // The members still hold the checkpointed remaining TTL; clear it through raft so a
            // new leader does not resume a renewed lease from the old checkpoint (as etcd 3.5+).
            // Best effort: a full queue leaves it to the next checkpoint.
            let (tx, _) = oneshot::channel();
            let clear = WriteRequest::LeaseCheckpoint {
                id,
                remaining_ttl: 0,
            };
            let _ = self.proposals.try_send(Pending::one(clear, tx));
        }
        Ok(ttl)
    }

    /// Remaining TTL of a lease as the leader (the only member that expires leases) sees it.
    ///
    /// # Errors
    /// `LeaderChanged` when this member does not lead.
    pub fn lead_lease_remaining(&self, id: i64) -> Result<Option<i64>> {
        if !self.is_leader() {
            return Err(Error::LeaderChanged);
        }
        self.promote_lessor_if_leading();
        let now = self.clock.now_ms();
        Ok(self.store.with_lessor(|l| l.remaining_seconds(id, now)))
    }

    /// Renews a lease wherever this member is: locally on the leader, through the leader
    /// otherwise.
    ///
    /// # Errors
    /// `NoLeader`, `Timeout`, `LeaderChanged`.
    pub async fn lease_renew(&self, id: i64) -> Result<i64> {
        if self.is_leader() {
            return self.lead_lease_renew(id);
        }
        match self.to_leader(PeerRequest::LeaseRenew { id }).await? {
            PeerResponse::LeaseRenew(ttl) => Ok(ttl),
            other => Err(Error::Internal(format!("leader answered {other:?}"))),
        }
    }

    /// Remaining TTL of a lease, from the leader.
    ///
    /// # Errors
    /// `NoLeader`, `Timeout`, `LeaderChanged`.
    pub async fn lease_remaining(&self, id: i64) -> Result<Option<i64>> {
        if self.is_leader() {
            return self.lead_lease_remaining(id);
        }
        match self.to_leader(PeerRequest::LeaseRemaining { id }).await? {
            PeerResponse::LeaseRemaining(ttl) => Ok(ttl),
            other => Err(Error::Internal(format!("leader answered {other:?}"))),
        }
    }

    /// Makes the lessor primary as soon as this member leads (the lessor driver also does,
    /// on its tick), so keepalives reaching a new leader renew real deadlines.
    fn promote_lessor_if_leading(&self) {
        let now = self.clock.now_ms();
        let extend = self.config.election_timeout.as_millis() as u64;
        self.store.with_lessor(|l| {
            if !l.is_primary() {
                l.promote(now, extend);
            }
        });
    }

    /// Proposes a compaction. It takes effect when applied; every member then sweeps the
    /// history it makes unreachable and reclaims the disk space in the background (see
    /// `sweep_driver`), so no defragment is needed. With `physical` (etcd's flag), answers once
    /// this member's sweep is done.
    ///
    /// # Errors
    /// As [`Node::propose`]; `Timeout` when this member does not apply it in time.
    pub async fn compact(&self, revision: i64, physical: bool) -> Result<WriteResponse> {
        let (index, resp) = self.propose_at(WriteRequest::Compact { revision }).await?;
        if physical {
            // Applied on the leader; a follower may still be behind it.
            tokio::time::timeout(self.request_timeout(), self.router().wait_applied(index))
                .await
                .map_err(|_| Error::Timeout)??;
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.finish_compaction())
                .await
                .map_err(|_| Error::Stopped)??;
        }
        Ok(resp)
    }

    /// Runs blocking store work.
    pub fn blocking<T>(&self, f: impl FnOnce(&KvStore) -> T) -> T {
        blocking(|| f(&self.store))
    }

    /// Reads a range from the store. A single-key read is one memtable or block-cache lookup,
    /// cheaper than handing this worker's core to another thread (`block_in_place` cost a
    /// loaded member more CPU than the reads themselves), so it runs inline; scans run as
    /// blocking work.
    ///
    /// # Errors
    /// The store's range errors (compacted, future revision, storage).
    pub fn range(
        &self,
        r: &keyhold_store::RangeRequest,
    ) -> keyhold_store::Result<keyhold_store::RangeResponse> {
        if r.range_end.is_empty() {
            self.store.range(r)
        } else {
            self.blocking(|s| s.range(r))
        }
    }
}

/// Loads the store's live index on a blocking thread while the member starts and serves (until
/// it is done, puts read previous values from disk; a restart does not wait for a full scan).
fn spawn_live_index_load(store: Arc<KvStore>) {
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        loop {
            match store.load_live_index(keyhold_store::limits::LIVE_INDEX_LOAD_CHUNK_KEYS) {
                Ok(false) => {}
                Ok(true) => {
                    let elapsed_ms = started.elapsed().as_millis() as u64;
                    tracing::info!(elapsed_ms, "live index loaded");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "loading the live index failed; puts keep reading previous values from disk");
                    return;
                }
            }
        }
    });
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
    spawn_live_index_load(store.clone());
    let journal_writeback = JournalWriteback::start(config.data_dir.join("db"))?;
    let member_id = crate::ids::member_id(&config.advertise_peer_urls, &config.cluster_token);
    let log_store = LogStore::open(&config.data_dir.join("raft-log"), member_id)?;
    let clock = Clock::default();
    let compacted = Arc::new(tokio::sync::Notify::new());
    let waiters = Arc::new(ProposalWaiters::new(member_id));
    let sm = StateMachine::new(
        store.clone(),
        config.data_dir.join("snap"),
        clock,
        compacted.clone(),
        log_store.durability(),
        waiters.clone(),
    )?;

    let hosts: Vec<String> = config
        .advertise_peer_urls
        .iter()
        .filter_map(|u| parse_url(u).ok())
        .map(|a| a.ip().to_string())
        .collect();
    let tls = crate::peer::tls::build(&config.peer_tls, &hosts)?;
    let (peers, endpoint) = Peers::bind(member_id, config.listen_peer, tls)?;
    tracing::info!(addr = %config.listen_peer, "serving peer traffic (QUIC)");

    let election_ms = config.election_timeout.as_millis() as u64;
    let raft_config = openraft::Config {
        cluster_name: config.cluster_token.clone(),
        heartbeat_interval: config.heartbeat.as_millis() as u64,
        // A follower that has a leader refuses votes for `election_timeout_max` after the last
        // heartbeat (openraft's leader lease), and campaigns `election_timeout_max` plus a
        // random `[min, max)` after it. These make that silence 0.95–1.1 × `--election-timeout`,
        // as etcd's followers wait one election timeout, and the first campaign after a leader
        // dies wins (its lease has run out on every follower).
        election_timeout_min: election_ms * 2 / 5,
        election_timeout_max: election_ms * 11 / 20,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(SNAPSHOT_LOGS_SINCE_LAST),
        max_in_snapshot_log_to_keep: LOGS_KEPT_AFTER_SNAPSHOT,
        max_payload_entries: RAFT_PAYLOAD_ENTRIES_MAX,
        ..Default::default()
    }
    .validate()?;
    let network = Network::new(peers.clone(), store.clone(), log_store.durability());
    let raft = Raft::new(member_id, Arc::new(raft_config), network, log_store, sm).await?;
    let cluster_id = cluster_id(&config, &store, &raft, &peers).await?;
    peers.set_cluster_id(cluster_id);

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (proposals, queue) = mpsc::channel(PROPOSAL_QUEUE_MAX);
    let (reads, read_queue) = mpsc::channel(READ_INDEX_QUEUE_MAX);
    let node = Arc::new(Node {
        config: config.clone(),
        store,
        raft,
        member_id,
        cluster_id,
        clock,
        shutdown: shutdown_rx,
        proposals,
        reads,
        peers: peers.clone(),
        transfer_gate: Arc::default(),
        waiters,
    });
    let peer_server = tokio::spawn(crate::peer::server::serve(endpoint, node.clone()));
    tracing::info!(
        name = %config.name,
        member_id = format!("{member_id:x}"),
        cluster_id = format!("{cluster_id:x}"),
        data_dir = %config.data_dir.display(),
        version = env!("CARGO_PKG_VERSION"),
        "starting keyhold-node"
    );

    let drivers = vec![
        tokio::spawn(proposer(node.router(), queue)),
        tokio::spawn(read_indexer(node.router(), read_queue)),
        tokio::spawn(lessor_driver(node.clone())),
        tokio::spawn(compaction_driver(node.clone())),
        tokio::spawn(sweep_driver(
            node.store.clone(),
            compacted,
            config.compaction_batch_limit,
            config.compaction_sleep_interval,
        )),
        tokio::spawn(crate::membership::publish(node.clone())),
        tokio::spawn(crate::http::metrics_driver(node.clone())),
    ];
    let router = crate::api::router(node.clone())
        .merge(crate::http::router(node.clone()))
        .merge(crate::failpoints::router(node.clone()));
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
        #[cfg(feature = "latency-probe")]
        let listener = crate::probe::TimedListener(listener);
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
    tracing::info!("shutting down: raft");
    if let Err(e) = node.raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    peers.close();
    peer_server.abort();
    journal_writeback.stop();
    node.store.persist()?;
    tracing::info!("stopped");
    Ok(())
}

/// Initializes raft for a new cluster and settles the cluster ID: computed from the initial
/// members for a new cluster, asked of the peers when joining an existing one, then kept in
/// the store.
async fn cluster_id(
    config: &ValidConfig,
    store: &KvStore,
    raft: &Raft,
    peers: &Peers,
) -> anyhow::Result<u64> {
    if let Some(b) = store.meta_get(META_CLUSTER_ID)?
        && let Ok(bytes) = <[u8; 8]>::try_from(b.as_slice())
    {
        return Ok(u64::from_be_bytes(bytes));
    }
    let initialized = raft.is_initialized().await?;
    let id = if config.join_existing {
        if initialized {
            anyhow::bail!("data dir has raft state but no cluster ID; remove it to join anew");
        }
        ask_cluster_id(config, peers).await?
    } else {
        let mut members = BTreeMap::new();
        for (name, urls) in &config.initial_cluster {
            let id = crate::ids::member_id(urls, &config.cluster_token);
            let member = Member {
                name: name.clone(),
                peer_urls: urls.clone(),
                client_urls: Vec::new(),
            };
            members.insert(id, member);
        }
        if !initialized {
            // Every member of a new cluster initializes with the same membership; openraft
            // accepts that, and the first election settles the leader.
            raft.initialize(members.clone()).await?;
        }
        let ids: Vec<u64> = members.keys().copied().collect();
        crate::ids::cluster_id(&ids)
    };
    store.meta_put(&[(META_CLUSTER_ID, &id.to_be_bytes())])?;
    Ok(id)
}

/// A member joining an existing cluster learns the cluster ID from any reachable peer of
/// `--initial-cluster`.
async fn ask_cluster_id(config: &ValidConfig, peers: &Peers) -> anyhow::Result<u64> {
    let me = crate::ids::member_id(&config.advertise_peer_urls, &config.cluster_token);
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    loop {
        for (_, urls) in &config.initial_cluster {
            let id = crate::ids::member_id(urls, &config.cluster_token);
            let Some(addr) = urls.first().and_then(|u| parse_url(u).ok()) else {
                continue;
            };
            if id == me {
                continue;
            }
            match peers
                .call(id, addr, PeerRequest::Hello, Duration::from_secs(2))
                .await
            {
                Ok(PeerResponse::Hello { cluster_id, .. }) if cluster_id != 0 => {
                    return Ok(cluster_id);
                }
                other => {
                    tracing::info!(peer = format!("{id:x}"), answer = ?other, "asking for the cluster ID")
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("no member of --initial-cluster answered within {JOIN_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The pause after a sweep step that took `step`: the configured `interval`, or, when writes
/// were applied since the previous step, at least `SWEEP_PAUSE_PER_STEP_UNDER_LOAD` steps' time.
fn sweep_pause(interval: Duration, step: Duration, writes_seen: bool) -> Duration {
    if writes_seen {
        interval.max(step * SWEEP_PAUSE_PER_STEP_UNDER_LOAD)
    } else {
        interval
    }
}

/// Sweeps the history each applied compaction makes unreachable, in steps of
/// `--compaction-batch-limit` records at least `--compaction-sleep-interval` apart (writes go
/// on beside each step; see `sweep_pause` for the pace under load), then reclaims its disk
/// space. Runs at start-up first, to finish a sweep that a stop or a snapshot install left
/// behind.
async fn sweep_driver(
    store: Arc<KvStore>,
    compacted: Arc<tokio::sync::Notify>,
    batch: usize,
    pause: Duration,
) {
    loop {
        let started = std::time::Instant::now();
        let mut steps = 0u64;
        let mut revision = store.current_revision().unwrap_or(0);
        loop {
            let s = store.clone();
            steps += 1;
            let step_started = std::time::Instant::now();
            match tokio::task::spawn_blocking(move || s.sweep_compacted(batch)).await {
                Ok(Ok(true)) => break,
                Ok(Ok(false)) => {
                    let now = store.current_revision().unwrap_or(0);
                    let writes_seen = now != revision;
                    revision = now;
                    tokio::time::sleep(sweep_pause(pause, step_started.elapsed(), writes_seen))
                        .await;
                }
                Ok(Err(e)) => {
                    // The step left no trace; the next compaction (or restart) redoes it.
                    tracing::warn!(error = %e, "compaction sweep");
                    break;
                }
                Err(_) => return,
            }
        }
        if steps > 1 {
            tracing::info!(
                steps,
                took_ms = started.elapsed().as_millis() as u64,
                "compaction sweep done"
            );
        }
        let s = store.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let (before, started) = (s.size_bytes(), std::time::Instant::now());
            match s.reclaim_compacted() {
                Ok(false) => {}
                Ok(true) => tracing::info!(
                    before_bytes = before,
                    after_bytes = s.size_bytes(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "reclaimed compacted history"
                ),
                Err(e) => tracing::warn!(error = %e, "reclaiming compacted history"),
            }
        })
        .await;
        compacted.notified().await;
    }
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
    // Server metrics, not raft's full ones: those are sent on every turn of raft's core.
    let mut server = node.raft.server_metrics();
    loop {
        // Leadership changes are handled at once; expiry and checkpoints on the tick.
        let ticked = tokio::select! {
            _ = tick.tick() => true,
            changed = server.changed() => {
                if changed.is_err() {
                    return;
                }
                false
            }
        };
        let now = node.clock.now_ms();
        // From the server metrics that woke this loop: openraft sends its full metrics, which
        // `is_leader` reads, only after them, so a promotion read from those could be missed
        // until the next tick, and a lease granted meanwhile extended by the late promotion.
        let leader = server.borrow_and_update().current_leader == Some(node.member_id);
        if leader != was_leader {
            let extend = node.config.election_timeout.as_millis() as u64;
            let leases = node.store.with_lessor(|l| {
                if !leader {
                    l.demote()
                } else if !l.is_primary() {
                    l.promote(now, extend)
                }
                l.count()
            });
            if leader {
                tracing::info!(leases, "lessor promoted: expiring leases from now on");
            } else {
                tracing::info!(leases, "lessor demoted");
            }
            was_leader = leader;
        }
        if !leader || !ticked {
            continue;
        }
        let horizon = if crate::failpoints::enabled("early-lease-expiry") {
            now + crate::failpoints::EARLY_LEASE_EXPIRY_MS
        } else {
            now
        };
        let expired = node
            .store
            .with_lessor(|l| l.expired(horizon, keyhold_store::limits::LEASE_REVOKES_PER_TICK_MAX));
        for id in expired {
            tracing::debug!(lease = id, "revoking expired lease");
            match node.propose(WriteRequest::LeaseRevoke { id }).await {
                Ok(_) | Err(Error::Store(keyhold_store::Error::LeaseNotFound)) => {}
                Err(e) => tracing::warn!(lease = id, error = %e, "revoking expired lease"),
            }
        }
        let drift_cap = LEASE_CHECKPOINT_DRIFT_MAX.as_millis() as u64;
        let due = node
            .store
            .with_lessor(|l| l.checkpoints_due(now, drift_cap, LEASE_CHECKPOINTS_PER_TICK_MAX));
        // Proposed together: the proposer batches them into few raft entries.
        let checkpoints = due.into_iter().map(|(id, remaining_ttl)| {
            node.propose(WriteRequest::LeaseCheckpoint { id, remaining_ttl })
        });
        for r in futures::future::join_all(checkpoints).await {
            if let Err(e) = r {
                tracing::debug!(error = %e, "lease checkpoint");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_beside_writes_pauses_longer_than_its_steps() {
        let ms = Duration::from_millis;
        assert_eq!(
            sweep_pause(ms(10), ms(6), false),
            ms(10),
            "idle: the interval"
        );
        assert_eq!(sweep_pause(ms(10), ms(6), true), ms(24));
        assert_eq!(
            sweep_pause(ms(50), ms(6), true),
            ms(50),
            "never below the interval"
        );
    }
}
