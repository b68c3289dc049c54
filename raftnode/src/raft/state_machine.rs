//! The raft state machine: applies committed entries to the MVCC store, writing the applied log
//! id (and membership) in the same fjall batch as the data, so a crash never re-applies or skips
//! an entry. Snapshots record what the durable store covers (so the log can be purged); a full
//! export is installed from files under `<data-dir>/snap` when one is received.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use keyhold_store::{Error as StoreError, KvStore, WriteBatch, WriteRequest};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
    StoredMembership,
};

use super::log_store::Durability;
use super::proposals::ProposalWaiters;
use super::{
    Applied, AppliedState, Forwarded, META_APPLIED, META_MEMBERSHIP, META_PARTIAL, Member,
    StorageError, TypeConfig, encode,
};
use crate::clock::Clock;

const SNAP_DATA: &str = "current.data";
const SNAP_META: &str = "current.meta";
const SNAP_INCOMING: &str = "incoming.data";
/// Where a new `current.meta` is written before it is renamed over the old one.
const SNAP_META_NEXT: &str = "next.meta";

/// Replaces the current snapshot's metadata by a rename: a reader on another task (openraft
/// asks for the current snapshot to send it to a peer while a new one is being built) sees the
/// old record or the new one, never a truncated file. A truncated read once failed to decode,
/// and the error stopped the leader's raft core.
fn write_snapshot_meta(dir: &std::path::Path, bytes: &[u8]) -> io::Result<()> {
    let next = dir.join(SNAP_META_NEXT);
    std::fs::write(&next, bytes)?;
    std::fs::rename(next, dir.join(SNAP_META))
}

/// Writes up to which a call to `apply` whose writes all name their keys one by one
/// ([`WriteRequest::is_point`]) runs on the async worker instead of a blocking thread (about
/// 1,000 puts take a few milliseconds).
const APPLY_INLINE_WRITES_MAX: usize = 1024;

/// State machine over the shared store.
#[derive(Clone)]
pub struct StateMachine {
    store: Arc<KvStore>,
    dir: PathBuf,
    clock: Clock,
    /// Signalled after a compaction is applied or a snapshot installed, so the node sweeps
    /// the compacted history and reclaims its disk space (in the background, off the apply
    /// path).
    compacted: Arc<tokio::sync::Notify>,
    /// The raft log's durable end: a leader's entries are applied only once they are on its disk.
    durability: Arc<Durability>,
    /// Clients of this member's own proposals, answered as their entries apply.
    waiters: Arc<ProposalWaiters>,
}

fn sm_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_state_machine(&io::Error::other(e.to_string())).into()
}

fn snap_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_snapshot(None, &io::Error::other(e.to_string())).into()
}

impl StateMachine {
    /// A state machine applying to `store`, keeping snapshots in `snapshot_dir`.
    ///
    /// # Errors
    /// When the snapshot directory cannot be created.
    pub fn new(
        store: Arc<KvStore>,
        snapshot_dir: PathBuf,
        clock: Clock,
        compacted: Arc<tokio::sync::Notify>,
        durability: Arc<Durability>,
        waiters: Arc<ProposalWaiters>,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(&snapshot_dir)?;
        Ok(Self {
            store,
            dir: snapshot_dir,
            clock,
            compacted,
            durability,
            waiters,
        })
    }

    fn decode_meta(
        applied: Option<Vec<u8>>,
        membership: Option<Vec<u8>>,
    ) -> Result<AppliedState, StorageError> {
        let applied = match applied {
            Some(b) => postcard::from_bytes::<Option<LogId<u64>>>(&b).map_err(sm_err)?,
            None => None,
        };
        let membership = match membership {
            Some(b) => postcard::from_bytes(&b).map_err(sm_err)?,
            None => StoredMembership::default(),
        };
        Ok((applied, membership))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    /// The state machine is persistent, so a snapshot needs no copy of the data to let the log
    /// be purged: it makes the store durable and records what it covers. The data (a full
    /// [`KvStore::export`]) is produced when a peer has to receive it, as etcd streams its
    /// database only on demand; the snapshot file written here holds the metadata only.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (store, dir) = (self.store.clone(), self.dir.clone());
        let meta = tokio::task::spawn_blocking(move || -> Result<_, StorageError> {
            // Durable before the log is purged up to this point.
            store.persist().map_err(snap_err)?;
            let applied = store.meta_get(META_APPLIED).map_err(snap_err)?;
            let membership = store.meta_get(META_MEMBERSHIP).map_err(snap_err)?;
            let (applied, membership) = Self::decode_meta(applied, membership)?;
            let snapshot_id = match applied {
                Some(l) => format!("{}-{}", l.leader_id.term, l.index),
                None => "empty".to_string(),
            };
            let meta = SnapshotMeta {
                last_log_id: applied,
                last_membership: membership,
                snapshot_id,
            };
            std::fs::write(dir.join(SNAP_DATA), b"")
                .and_then(|_| write_snapshot_meta(&dir, &encode(&meta)))
                .map_err(snap_err)?;
            Ok(meta)
        })
        .await
        .map_err(snap_err)??;
        let file = tokio::fs::File::open(self.dir.join(SNAP_DATA))
            .await
            .map_err(snap_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}

/// Applies committed entries: as many of their writes as possible go into one store batch
/// (one fjall batch and one applied-id update for many writes). A write that must be applied
/// alone closes the batch; the batch then records how far into its entry it got
/// (`META_PARTIAL`), so a restart skips those writes instead of applying them twice.
fn apply_entries(
    store: &KvStore,
    compacted: &tokio::sync::Notify,
    now_ms: u64,
    entries: Vec<Entry<TypeConfig>>,
) -> Result<Vec<Applied>, StorageError> {
    // A snapshot is exported when it is sent, so an installed one may already cover entries
    // past the log id raft knows it by; those are skipped, not applied twice.
    let floor = match store.meta_get(META_APPLIED).map_err(sm_err)? {
        Some(b) => postcard::from_bytes::<Option<LogId<u64>>>(&b)
            .map_err(sm_err)?
            .map(|l| l.index),
        None => None,
    };
    // Writes of an entry applied before a crash (only this path writes it).
    let partial = match store.meta_get(META_PARTIAL).map_err(sm_err)? {
        Some(b) => postcard::from_bytes::<(LogId<u64>, usize)>(&b).ok(),
        None => None,
    };
    let mut out = Vec::with_capacity(entries.len());
    let mut batch = store.write_batch(now_ms).map_err(sm_err)?;
    // The last entry whose every write is in `batch`, and a membership to record with it.
    let mut last: Option<LogId<u64>> = None;
    let mut membership: Option<Vec<u8>> = None;
    let mut compactions = false;
    let commit = |batch: WriteBatch<'_>,
                  last: Option<LogId<u64>>,
                  membership: &Option<Vec<u8>>,
                  partial: Option<(LogId<u64>, usize)>|
     -> Result<(), StorageError> {
        let applied = last.map(|l| encode(&Some(l)));
        let partial = partial.map(|p| encode(&p));
        let mut meta: Vec<(&[u8], &[u8])> = Vec::with_capacity(3);
        if let Some(a) = &applied {
            meta.push((META_APPLIED, a));
        }
        if let Some(m) = membership {
            meta.push((META_MEMBERSHIP, m));
        }
        if let Some(p) = &partial {
            meta.push((META_PARTIAL, p));
        }
        batch.commit(&meta).map_err(sm_err)
    };
    for entry in entries {
        // (Index 0 is the initial membership: applied when nothing is.)
        if floor.is_some_and(|f| entry.log_id.index <= f) {
            out.push(Applied::Nothing);
            continue;
        }
        match entry.payload {
            EntryPayload::Blank => out.push(Applied::Nothing),
            EntryPayload::Membership(m) => {
                let stored = StoredMembership::new(Some(entry.log_id), m);
                membership = Some(encode(&stored));
                out.push(Applied::Nothing);
            }
            EntryPayload::Normal(proposal) => {
                let done = match partial {
                    Some((id, n)) if id == entry.log_id => n,
                    _ => 0,
                };
                let mut results = Vec::with_capacity(proposal.writes.len());
                for (i, req) in proposal.writes.iter().enumerate() {
                    if i < done {
                        results.push(Err(StoreError::Storage("applied before a restart".into())));
                        continue;
                    }
                    if !batch.admits(req) {
                        commit(batch, last, &membership, Some((entry.log_id, i)))?;
                        batch = store.write_batch(now_ms).map_err(sm_err)?;
                    }
                    match batch.apply(req) {
                        Err(StoreError::Storage(e)) => {
                            return Err(
                                StorageIOError::apply(entry.log_id, &io::Error::other(e)).into()
                            );
                        }
                        result => {
                            compactions |=
                                result.is_ok() && matches!(req, WriteRequest::Compact { .. });
                            results.push(result);
                        }
                    }
                }
                out.push(Applied::Writes(results));
            }
        }
        last = Some(entry.log_id);
    }
    if last.is_some() {
        commit(batch, last, &membership, None)?;
    }
    if compactions {
        compacted.notify_one();
    }
    Ok(out)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<AppliedState, StorageError> {
        let applied = self.store.meta_get(META_APPLIED).map_err(sm_err)?;
        let membership = self.store.meta_get(META_MEMBERSHIP).map_err(sm_err)?;
        Self::decode_meta(applied, membership)
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let (store, compacted) = (self.store.clone(), self.compacted.clone());
        let now_ms = self.clock.now_ms();
        let entries: Vec<_> = entries.into_iter().collect();
        crate::probe::mark(
            crate::probe::Stage::ApplyStarted,
            entries.last().map_or(0, |e| e.log_id.index),
        );
        // A leader acknowledges its own appends before their fsync, so raft may commit an entry
        // this member has not synced yet (see `log_store`): nothing of it shows before it has.
        if let Some(last) = entries.last()
            && !self.durability.wait(last.log_id.index, None).await
        {
            return Err(sm_err("the raft log flusher stopped"));
        }
        // Point writes apply in about the time two thread hand-offs take, so a bounded run of
        // them runs here. A larger run, one with a write whose cost has no bound (a range
        // delete, a compaction, a lease revoke), or any run while fjall may throttle writes
        // goes to a blocking thread in one hand-off (not `block_in_place`, which moves this
        // worker's whole core to another thread each call).
        let mut writes = 0;
        let mut points = true;
        for entry in &entries {
            if let EntryPayload::Normal(p) = &entry.payload {
                writes += p.writes.len();
                points &= p.writes.iter().all(WriteRequest::is_point);
            }
        }
        let last = entries.last().map_or(0, |e| e.log_id.index);
        // Entries whose clients wait here: this member's own proposals, and runs of writes it
        // forwarded (see `proposals`).
        let mut proposals: Vec<(usize, u64, u64)> = Vec::new();
        let mut runs: Vec<(usize, u64, Forwarded)> = Vec::new();
        for (at, e) in entries.iter().enumerate() {
            if let EntryPayload::Normal(p) = &e.payload {
                if p.id != 0 {
                    proposals.push((at, p.id, e.log_id.index));
                }
                runs.extend(
                    self.waiters
                        .own_runs(&p.forwarded)
                        .map(|f| (at, e.log_id.index, *f)),
                );
            }
        }
        let mut applied = if points && writes <= APPLY_INLINE_WRITES_MAX && !store.write_may_stall()
        {
            apply_entries(&store, &compacted, now_ms, entries)
        } else {
            tokio::task::spawn_blocking(move || apply_entries(&store, &compacted, now_ms, entries))
                .await
                .map_err(sm_err)?
        };
        crate::probe::mark(crate::probe::Stage::ApplyDone, last);
        if let Ok(applied) = &mut applied {
            self.waiters.applied_through(last);
            for (at, index, run) in runs {
                if let Some(a) = applied.get(at) {
                    self.waiters.applied_run(&run, index, a);
                }
            }
            for (at, id, index) in proposals {
                if let Some(a) = applied.get_mut(at) {
                    self.waiters.applied(id, index, a);
                }
            }
        }
        applied
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let f = tokio::fs::File::create(self.dir.join(SNAP_INCOMING))
            .await
            .map_err(snap_err)?;
        Ok(Box::new(f))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, Member>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        snapshot.sync_all().await.map_err(snap_err)?;
        drop(snapshot);
        let (store, dir, meta_bytes) = (self.store.clone(), self.dir.clone(), encode(meta));
        tokio::task::spawn_blocking(move || -> Result<(), StorageError> {
            let incoming = dir.join(SNAP_INCOMING);
            let mut input = io::BufReader::new(std::fs::File::open(&incoming).map_err(snap_err)?);
            store.import(&mut input).map_err(snap_err)?;
            // The store now holds the state; like a built snapshot, the current one carries no
            // data copy (it would double the disk used).
            drop(input);
            std::fs::write(dir.join(SNAP_DATA), b"").map_err(snap_err)?;
            std::fs::remove_file(&incoming).map_err(snap_err)?;
            write_snapshot_meta(&dir, &meta_bytes).map_err(snap_err)
        })
        .await
        .map_err(snap_err)??;
        // The installed state may carry a compaction its sender had not swept yet.
        self.compacted.notify_one();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let meta_path = self.dir.join(SNAP_META);
        let Ok(bytes) = tokio::fs::read(&meta_path).await else {
            return Ok(None);
        };
        let meta: SnapshotMeta<u64, Member> = postcard::from_bytes(&bytes).map_err(snap_err)?;
        let file = tokio::fs::File::open(self.dir.join(SNAP_DATA))
            .await
            .map_err(snap_err)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(file),
        }))
    }
}
