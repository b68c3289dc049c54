//! openraft's network over the QUIC peer plane ([`crate::peer`]). Snapshots are streamed from
//! a consistent read view of the store at send time (the state machine's snapshots carry no
//! data, see `state_machine.rs`), a chunk at a time, never whole in memory.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keyhold_store::KvStore;
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::storage::Snapshot;
use openraft::{LogId, OptionalSend, Vote};

use super::log_store::{Durability, DurableLog};
use super::{Member, TypeConfig};
use crate::peer::wire::{self, PeerRequest, PeerResponse, SNAPSHOT_CHUNK_BYTES};
use crate::peer::{PeerError, Peers, RequestStream};
use crate::probe::{self, Stage};

/// Snapshot chunks exported ahead of the network (bounds the sender's memory).
const SNAPSHOT_CHUNKS_AHEAD_MAX: usize = 4;
/// How long a receiver may take to install a streamed snapshot before the sender gives up.
const SNAPSHOT_INSTALL_TIMEOUT: Duration = Duration::from_secs(600);
/// How long an AppendEntries waits for this leader's own fsync to reach the commit index it
/// announces; past it, the message announces only what is durable (the next one carries the
/// rest).
const COMMIT_DURABLE_WAIT_MAX: Duration = Duration::from_millis(50);
/// Retry backoff towards an unreachable peer: doubling from the first to the last.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Creates per-peer clients.
#[derive(Clone)]
pub struct Network {
    peers: Arc<Peers>,
    store: Arc<KvStore>,
    durability: Arc<Durability>,
}

impl Network {
    /// A network over `peers`, exporting snapshots from `store`; commits are announced only as
    /// far as `durability` says this member's log is synced.
    pub fn new(peers: Arc<Peers>, store: Arc<KvStore>, durability: Arc<Durability>) -> Self {
        Self {
            peers,
            store,
            durability,
        }
    }
}

/// A client to one peer.
pub struct PeerClient {
    target: u64,
    addr: Option<SocketAddr>,
    peers: Arc<Peers>,
    store: Arc<KvStore>,
    durability: Arc<Durability>,
    /// The stream this client's AppendEntries go on, kept between them (openraft sends one at
    /// a time per follower).
    append_stream: Option<RequestStream>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &Member) -> Self::Network {
        PeerClient {
            target,
            addr: node.peer_addr(),
            peers: self.peers.clone(),
            store: self.store.clone(),
            durability: self.durability.clone(),
            append_stream: None,
        }
    }
}

/// The commit to announce when `commit` is not durable here yet: the last durable entry, which
/// precedes it in this leader's log (none when that entry is not known, right after a
/// truncation).
fn durable_commit(commit: LogId<u64>, durable: DurableLog) -> Option<LogId<u64>> {
    if durable.index >= commit.index {
        return Some(commit);
    }
    durable
        .last
        .filter(|l| l.index == durable.index && *l <= commit)
}

type RpcErr<E = openraft::error::Infallible> = RPCError<u64, Member, RaftError<u64, E>>;

impl PeerClient {
    fn addr(&self) -> Result<SocketAddr, Unreachable> {
        self.addr.ok_or_else(|| {
            Unreachable::new(&std::io::Error::other(format!(
                "member {:x} has no usable peer URL",
                self.target
            )))
        })
    }

    async fn call(&self, request: PeerRequest, option: &RPCOption) -> Result<PeerResponse, RpcErr> {
        let addr = self.addr().map_err(RPCError::Unreachable)?;
        self.peers
            .call(self.target, addr, request, option.hard_ttl())
            .await
            .map_err(rpc_error)
    }
}

fn rpc_error<E: std::error::Error>(e: PeerError) -> RPCError<u64, Member, E> {
    match e {
        PeerError::Unreachable(..) => RPCError::Unreachable(Unreachable::new(&e)),
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

fn unexpected<E: std::error::Error>(target: u64, r: &PeerResponse) -> RPCError<u64, Member, E> {
    let e = std::io::Error::other(format!("member {target:x} answered {r:?}"));
    RPCError::Network(NetworkError::new(&e))
}

/// Sends export chunks into a bounded channel from the blocking export thread.
struct ChunkWriter {
    buf: Vec<u8>,
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= SNAPSHOT_CHUNK_BYTES {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(SNAPSHOT_CHUNK_BYTES));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::other("snapshot receiver went away"))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcErr> {
        // The leader's own fsync runs in parallel with replication (see `log_store`): a commit
        // is announced only once this member's copy of it is durable.
        if let Some(commit) = rpc.leader_commit {
            let durability = &self.durability;
            if durability.get().index < commit.index
                && !durability
                    .wait(commit.index, Some(COMMIT_DURABLE_WAIT_MAX))
                    .await
            {
                rpc.leader_commit = durable_commit(commit, durability.get());
            }
        }
        let last = rpc.entries.last().map_or(0, |e| e.log_id.index);
        probe::mark(Stage::AppendSending, last);
        let addr = self.addr().map_err(RPCError::Unreachable)?;
        let answer = self
            .peers
            .call_on(
                &mut self.append_stream,
                self.target,
                addr,
                &PeerRequest::AppendEntries(rpc),
                option.hard_ttl(),
            )
            .await
            .map_err(rpc_error);
        probe::mark(Stage::AppendAnswered, last);
        match answer? {
            PeerResponse::AppendEntries(Ok(r)) => Ok(r),
            PeerResponse::AppendEntries(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(self.target, &other)),
        }
    }

    /// Chunked snapshots are not used: [`PeerClient::full_snapshot`] streams instead.
    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcErr<InstallSnapshotError>> {
        let e = std::io::Error::other("chunked snapshots are not used");
        Err(RPCError::Network(NetworkError::new(&e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcErr> {
        match self.call(PeerRequest::Vote(rpc), &option).await? {
            PeerResponse::Vote(Ok(r)) => Ok(r),
            PeerResponse::Vote(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(self.target, &other)),
        }
    }

    /// Streams the store's current state: a consistent export taken now, which covers at least
    /// what `snapshot.meta` names (the receiver skips entries the export already holds).
    async fn full_snapshot(
        &mut self,
        vote: Vote<u64>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
        let network =
            |e: String| StreamingError::Network(NetworkError::new(&std::io::Error::other(e)));
        let addr = self.addr()?;
        let meta = snapshot.meta.clone();
        let request = PeerRequest::Snapshot { vote, meta };
        let (mut send, mut recv) = match self.peers.open(self.target, addr, &request).await {
            Ok(s) => s,
            Err(e @ PeerError::Unreachable(..)) => {
                return Err(StreamingError::Unreachable(Unreachable::new(&e)));
            }
            Err(e) => return Err(network(e.to_string())),
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(SNAPSHOT_CHUNKS_AHEAD_MAX);
        let store = self.store.clone();
        let exporter = tokio::task::spawn_blocking(move || {
            let mut w = ChunkWriter {
                buf: Vec::with_capacity(SNAPSHOT_CHUNK_BYTES),
                tx,
            };
            store
                .export(&mut w, &[])
                .map_err(|e| e.to_string())
                .and_then(|_| w.flush().map_err(|e| e.to_string()))
        });
        tokio::pin!(cancel);
        let started = std::time::Instant::now();
        let mut bytes = 0u64;
        loop {
            let chunk = tokio::select! {
                c = rx.recv() => c,
                closed = &mut cancel => {
                    let _ = send.reset(3u32.into());
                    return Err(StreamingError::Closed(closed));
                }
            };
            let Some(chunk) = chunk else { break };
            bytes += chunk.len() as u64;
            wire::write_raw(&mut send, &chunk)
                .await
                .map_err(|e| network(e.to_string()))?;
        }
        exporter
            .await
            .map_err(|e| network(e.to_string()))?
            .map_err(network)?;
        wire::write_raw(&mut send, &[])
            .await
            .map_err(|e| network(e.to_string()))?;
        let _ = send.finish();
        tracing::info!(
            target = format!("{:x}", self.target),
            bytes,
            took_ms = started.elapsed().as_millis() as u64,
            "snapshot sent"
        );
        let answer = tokio::time::timeout(
            SNAPSHOT_INSTALL_TIMEOUT,
            crate::peer::await_answer(self.target, &mut recv),
        )
        .await
        .map_err(|_| network("snapshot install timed out".into()))?;
        match answer {
            Ok(PeerResponse::Snapshot(r)) => Ok(r),
            Ok(other) => Err(network(format!("unexpected answer {other:?}"))),
            Err(e) => Err(network(e.to_string())),
        }
    }

    fn backoff(&self) -> Backoff {
        let mut next = BACKOFF_MIN;
        Backoff::new(std::iter::from_fn(move || {
            let now = next;
            next = (next * 2).min(BACKOFF_MAX);
            Some(now)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn id(term: u64, index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    #[test]
    fn a_commit_is_announced_only_as_far_as_it_is_durable() {
        // Durable past the commit: announced as is.
        assert_eq!(
            durable_commit(id(2, 5), DurableLog::at(7, Some(id(2, 7)))),
            Some(id(2, 5))
        );
        assert_eq!(
            durable_commit(id(2, 5), DurableLog::at(5, Some(id(2, 5)))),
            Some(id(2, 5))
        );
        // Not yet: the last durable entry instead.
        assert_eq!(
            durable_commit(id(3, 9), DurableLog::at(6, Some(id(2, 6)))),
            Some(id(2, 6))
        );
        // The durable entry is not known (right after a truncation): nothing.
        assert_eq!(durable_commit(id(3, 9), DurableLog::at(6, None)), None);
    }
}
