//! The raft log store over [`Wal`]: segmented append-only files with grouped fsyncs.
//!
//! `append` writes the entries and hands them to the flusher thread, which fdatasyncs once for
//! everything queued since its last fsync, without blocking further appends, and then records
//! them as durable and completes their callbacks in order (group commit). The state machine
//! lives in a separate fjall database whose journal is never on this fsync path. A failed fsync
//! stops the process: serving from an unknown disk state could lose acknowledged writes.
//!
//! # The leader writes its log in parallel with replication
//!
//! openraft 0.9 waits for an append's callback before it replicates the entries, so calling it
//! after the fsync puts the leader's fsync and the followers' one after another on every
//! write's path. As in etcd (raft thesis §10.2.1), the leader's own appends are acknowledged
//! once written, and its fsync runs while the followers write theirs. Raft may then count the
//! leader's copy towards a commit before it is durable, so nothing may act on such a commit
//! until it is: [`Durability`] tracks the last synced entry, and
//! - the state machine applies an entry (and so answers its client or a read) only once the
//!   entry is durable here;
//! - an AppendEntries carries a commit index no higher than what is durable here, so no
//!   follower applies an entry that a crash of this leader could lose.
//!
//! Followers, candidates and membership entries keep the callback after the fsync: a follower's
//! acknowledgement is a promise to the leader, and a configuration change must be durable on
//! a quorum before the next one is proposed.

use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, StorageIOError, Vote};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::wal::Wal;
use super::{StorageError, TypeConfig, encode};
use crate::probe::{self, Stage};

/// Appends waiting for the flusher; a full queue makes `append` wait (back-pressure).
const FLUSH_QUEUE_MAX: usize = 4096;

/// Persisted raft metadata (the WAL's state file).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LogMeta {
    vote: Option<Vote<u64>>,
    last_purged: Option<LogId<u64>>,
}

/// One append waiting for the flusher: the segment it went to, its last entry, the truncation
/// epoch it was written in, and the callback when raft waits for the fsync.
struct PendingFlush {
    file: Arc<File>,
    last: LogId<u64>,
    epoch: u64,
    callback: Option<LogFlushed<TypeConfig>>,
}

/// What of the log is known to be on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DurableLog {
    /// Every entry up to this index is synced (0: none).
    pub index: u64,
    /// The ID of the entry at `index`, when known (not right after a truncation).
    pub last: Option<LogId<u64>>,
    /// Bumped by every truncation: a flush of entries written before it no longer speaks for
    /// the log.
    epoch: u64,
    /// The flusher has stopped (shutdown): waiting for more is pointless.
    closed: bool,
}

impl DurableLog {
    /// Durable up to `index`, whose entry is `last` (tests build what they compare against).
    #[cfg(test)]
    pub(crate) fn at(index: u64, last: Option<LogId<u64>>) -> Self {
        Self {
            index,
            last,
            ..Self::default()
        }
    }
}

/// The durable end of the raft log, shared by the log store (which advances it), the state
/// machine (which applies only durable entries) and the network (which announces only durable
/// commits). See the module docs.
#[derive(Debug)]
pub struct Durability {
    state: watch::Sender<DurableLog>,
}

impl Durability {
    fn new(last: Option<LogId<u64>>) -> Self {
        let (state, _) = watch::channel(DurableLog {
            index: last.map_or(0, |l| l.index),
            last,
            epoch: 0,
            closed: false,
        });
        Self { state }
    }

    /// What is durable now.
    pub fn get(&self) -> DurableLog {
        *self.state.borrow()
    }

    fn epoch(&self) -> u64 {
        self.state.borrow().epoch
    }

    /// Entries up to `last`, written in `epoch`, are synced.
    fn synced(&self, last: LogId<u64>, epoch: u64) {
        self.state.send_if_modified(|d| {
            if d.epoch != epoch || d.index >= last.index {
                return false;
            }
            d.index = last.index;
            d.last = Some(last);
            true
        });
    }

    /// Entries from `from` on were removed (synchronously and durably, by the WAL). The entries
    /// before `from` are untouched, so what was durable of them stays durable.
    fn truncated(&self, from: u64) {
        self.state.send_modify(|d| {
            d.epoch += 1;
            if d.index >= from {
                d.index = from.saturating_sub(1);
                d.last = None;
            }
        });
    }

    fn close(&self) {
        self.state.send_modify(|d| d.closed = true);
    }

    /// Waits until every entry up to `index` is durable, for at most `timeout` (`None`: for as
    /// long as the flusher runs). Returns whether it is.
    pub async fn wait(&self, index: u64, timeout: Option<Duration>) -> bool {
        let mut rx = self.state.subscribe();
        let durable = async move {
            rx.wait_for(|d| d.index >= index || d.closed)
                .await
                .is_ok_and(|d| d.index >= index)
        };
        match timeout {
            None => durable.await,
            Some(t) => tokio::time::timeout(t, durable).await.unwrap_or(false),
        }
    }
}

/// The raft log store (cheap to clone; clones share the files and the flusher).
#[derive(Clone)]
pub struct LogStore {
    wal: Wal,
    meta: Arc<Mutex<LogMeta>>,
    flush_tx: mpsc::SyncSender<PendingFlush>,
    durability: Arc<Durability>,
    /// This member's ID: appends of its own entries while it leads skip the fsync wait.
    me: u64,
}

fn read_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::read_logs(&io::Error::other(e.to_string())).into()
}

fn write_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_logs(&io::Error::other(e.to_string())).into()
}

/// Syncs each segment the batch wrote to once, then records the batch as durable and completes
/// the callbacks in order.
fn flush(batch: Vec<PendingFlush>, durability: &Durability) {
    let delay = crate::failpoints::log_fsync_delay();
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
    let mut synced: Vec<*const File> = Vec::new();
    for pending in &batch {
        let ptr = Arc::as_ptr(&pending.file);
        if synced.contains(&ptr) {
            continue;
        }
        probe::mark(
            Stage::FsyncStarted,
            batch.last().map_or(0, |p| p.last.index),
        );
        if let Err(e) = pending.file.sync_data() {
            tracing::error!(error = %e, "fsync of the raft log failed; stopping");
            std::process::exit(1);
        }
        synced.push(ptr);
    }
    for pending in batch {
        durability.synced(pending.last, pending.epoch);
        probe::mark(Stage::LogSynced, pending.last.index);
        if let Some(callback) = pending.callback {
            callback.log_io_completed(Ok(()));
        }
    }
}

impl LogStore {
    /// Opens the log in `dir` for member `me` and starts the flusher thread. Everything found
    /// in the log is synced first (a killed process may have left writes in the page cache
    /// only), so it all counts as durable.
    ///
    /// # Errors
    /// I/O errors, corruption, or failure to spawn the thread.
    pub fn open(dir: &Path, me: u64) -> io::Result<Self> {
        let wal = Wal::open(dir)?;
        let meta: LogMeta = match wal.read_state()? {
            Some(b) => postcard::from_bytes(&b).map_err(io::Error::other)?,
            None => LogMeta::default(),
        };
        if let Some(p) = meta.last_purged {
            wal.purge(p.index)?;
        }
        wal.sync()?;
        let last = match wal.bounds() {
            Some((_, last)) => match wal.read(last, last + 1)?.pop() {
                Some((_, payload)) => {
                    let entry: Entry<TypeConfig> =
                        postcard::from_bytes(&payload).map_err(io::Error::other)?;
                    Some(entry.log_id)
                }
                None => meta.last_purged,
            },
            None => meta.last_purged,
        };
        let durability = Arc::new(Durability::new(last));
        let (flush_tx, flush_rx) = mpsc::sync_channel::<PendingFlush>(FLUSH_QUEUE_MAX);
        let flusher_durability = durability.clone();
        std::thread::Builder::new()
            .name("raft-log-flusher".into())
            .spawn(move || {
                while let Ok(first) = flush_rx.recv() {
                    let mut batch = vec![first];
                    batch.extend(flush_rx.try_iter());
                    flush(batch, &flusher_durability);
                }
                flusher_durability.close();
            })?;
        Ok(Self {
            wal,
            meta: Arc::new(Mutex::new(meta)),
            flush_tx,
            durability,
            me,
        })
    }

    /// The durable end of this log (see the module docs).
    pub fn durability(&self) -> Arc<Durability> {
        self.durability.clone()
    }

    /// Whether `entries` are this member's own, appended while it leads with a committed vote:
    /// the only appends acknowledged before their fsync. A member leads a term at most once,
    /// and a follower has saved a later vote before it appends anything, so the vote and the
    /// entries' leader together tell a leader's append from a follower's.
    fn leads(&self, entries: &[Entry<TypeConfig>]) -> bool {
        let Some(vote) = self.meta().vote else {
            return false;
        };
        vote.committed
            && vote.leader_id.node_id == self.me
            && entries.iter().all(|e| {
                e.log_id.leader_id == vote.leader_id
                    && !matches!(e.payload, EntryPayload::Membership(_))
            })
    }

    fn meta(&self) -> LogMeta {
        self.meta.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update_meta(&self, durable: bool, f: impl FnOnce(&mut LogMeta)) -> Result<(), StorageError> {
        let mut meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut meta);
        self.wal
            .write_state(&encode(&*meta), durable)
            .map_err(write_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        use std::ops::Bound::*;
        let start = match range.start_bound() {
            Included(i) => *i,
            Excluded(i) => i + 1,
            Unbounded => 0,
        };
        let end = match range.end_bound() {
            Included(i) => i + 1,
            Excluded(i) => *i,
            Unbounded => u64::MAX,
        };
        let records = self.wal.read(start, end).map_err(read_err)?;
        let mut out = Vec::with_capacity(records.len());
        for (index, payload) in records {
            let entry: Entry<TypeConfig> = postcard::from_bytes(&payload).map_err(read_err)?;
            // Pair check with the index `append` wrote it at.
            assert_eq!(entry.log_id.index, index, "raft log record/index mismatch");
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged = self.meta().last_purged;
        let last = match self.wal.bounds() {
            Some((_, last)) => {
                let e = self.try_get_log_entries(last..=last).await?;
                e.last().map(|e| e.log_id).or(last_purged)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    /// Syncs the log first: a leader's last appends may still wait for the flusher, and under
    /// a new vote this member may acknowledge them to another leader at once.
    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        self.wal.sync().map_err(write_err)?;
        self.update_meta(true, |m| m.vote = Some(*vote))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        Ok(self.meta().vote)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        let (first, last) = (first.log_id.index, last.log_id);
        let early = self.leads(&entries);
        let payloads: Vec<Vec<u8>> = entries.iter().map(encode).collect();
        let epoch = self.durability.epoch();
        let file = self.wal.append(first, &payloads).map_err(write_err)?;
        probe::mark(Stage::LogAppended, last.index);
        let callback = if early {
            callback.log_io_completed(Ok(()));
            None
        } else {
            Some(callback)
        };
        self.flush_tx
            .send(PendingFlush {
                file,
                last,
                epoch,
                callback,
            })
            .map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        self.wal.truncate(log_id.index).map_err(write_err)?;
        self.durability.truncated(log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        // Record the purge durably before files go, so a crash never leaves an unexplained gap.
        self.update_meta(true, |m| m.last_purged = Some(log_id))?;
        self.wal.purge(log_id.index).map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, Membership};

    fn id(term: u64, node: u64, index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(term, node), index)
    }

    fn entry(log_id: LogId<u64>) -> Entry<TypeConfig> {
        Entry {
            log_id,
            payload: EntryPayload::Blank,
        }
    }

    #[test]
    fn durability_follows_flushes_and_truncations() {
        let d = Durability::new(None);
        assert_eq!(d.get().index, 0);
        d.synced(id(1, 1, 5), 0);
        assert_eq!((d.get().index, d.get().last), (5, Some(id(1, 1, 5))));
        // A flush never moves it back.
        d.synced(id(1, 1, 3), 0);
        assert_eq!(d.get().index, 5);
        // Entries from 4 on are gone: only 1..=3 are known durable, and which entry 3 is
        // is not recorded.
        d.truncated(4);
        assert_eq!((d.get().index, d.get().last), (3, None));
        // A flush of entries written before the truncation says nothing about the log now.
        d.synced(id(1, 1, 8), 0);
        assert_eq!(d.get().index, 3);
        d.synced(id(2, 2, 6), 1);
        assert_eq!((d.get().index, d.get().last), (6, Some(id(2, 2, 6))));
        // A truncation past the durable end changes nothing but the epoch.
        d.truncated(9);
        assert_eq!((d.get().index, d.get().last), (6, Some(id(2, 2, 6))));
    }

    #[tokio::test]
    async fn waiting_for_durability_ends_when_it_is_reached_or_the_flusher_stops() {
        let d = Arc::new(Durability::new(Some(id(1, 1, 2))));
        assert!(d.wait(2, Some(Duration::from_millis(1))).await);
        assert!(!d.wait(3, Some(Duration::from_millis(1))).await);
        let flusher = d.clone();
        let waiter = tokio::spawn(async move { flusher.wait(4, None).await });
        d.synced(id(1, 1, 4), 0);
        assert!(waiter.await.expect("waiter runs"));
        let waiter = {
            let d = d.clone();
            tokio::spawn(async move { d.wait(10, None).await })
        };
        d.close();
        assert!(!waiter.await.expect("waiter runs"));
    }

    #[tokio::test]
    async fn only_a_leaders_own_entries_skip_the_fsync_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = LogStore::open(dir.path(), 1).expect("opens");
        let own = [entry(id(2, 1, 1)), entry(id(2, 1, 2))];
        assert!(!log.leads(&own), "no vote yet");
        log.save_vote(&Vote::new(2, 1)).await.expect("saves");
        assert!(!log.leads(&own), "a candidate's vote is not committed");
        log.save_vote(&Vote::new_committed(2, 1))
            .await
            .expect("saves");
        assert!(log.leads(&own));
        assert!(
            !log.leads(&[entry(id(1, 1, 1))]),
            "entries of an earlier term of this member are replicated ones"
        );
        let membership = Entry {
            log_id: id(2, 1, 3),
            payload: EntryPayload::Membership(Membership::new(
                vec![[1u64].into_iter().collect()],
                None,
            )),
        };
        assert!(!log.leads(&[entry(id(2, 1, 3)), membership]));
        log.save_vote(&Vote::new_committed(3, 2))
            .await
            .expect("saves");
        assert!(
            !log.leads(&[entry(id(3, 2, 3))]),
            "a follower's appends wait for the fsync"
        );
    }

    #[test]
    fn a_reopened_log_is_durable_up_to_its_last_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let wal = Wal::open(dir.path()).expect("opens");
            let payloads: Vec<Vec<u8>> = (1..=3).map(|i| encode(&entry(id(4, 2, i)))).collect();
            wal.append(1, &payloads).expect("appends");
        }
        let log = LogStore::open(dir.path(), 1).expect("reopens");
        let durable = log.durability().get();
        assert_eq!((durable.index, durable.last), (3, Some(id(4, 2, 3))));
        let empty = tempfile::tempdir().expect("tempdir");
        let log = LogStore::open(empty.path(), 1).expect("opens");
        assert_eq!(log.durability().get().index, 0);
    }
}
