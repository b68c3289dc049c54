//! The raft log on its own fjall keyspace, with grouped fsyncs.
//!
//! `append` writes entries into the OS buffers and hands the flush callback to the flusher
//! thread, which fsyncs once for everything queued since its last fsync and then completes those
//! callbacks in order. Under load one fsync covers many appends (group commit); an idle append
//! costs one fsync. A failed fsync stops the process: serving from an unknown disk state could
//! lose acknowledged writes.

use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::sync::mpsc;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageIOError, Vote};

use super::{StorageError, TypeConfig, encode};

const KS_LOG: &str = "raft_log";
const KS_RAFT_META: &str = "raft_meta";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";
/// Flush callbacks waiting for the flusher; a full queue makes `append` wait (back-pressure).
const FLUSH_QUEUE_MAX: usize = 4096;

/// The raft log store (cheap to clone; clones share the keyspaces and the flusher).
#[derive(Clone)]
pub struct LogStore {
    db: Database,
    log: Keyspace,
    meta: Keyspace,
    flush_tx: mpsc::SyncSender<LogFlushed<TypeConfig>>,
}

fn read_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::read_logs(&io::Error::other(e.to_string())).into()
}

fn write_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_logs(&io::Error::other(e.to_string())).into()
}

impl LogStore {
    /// Opens the log keyspaces in `db` and starts the flusher thread.
    ///
    /// # Errors
    /// fjall errors opening the keyspaces or spawning the thread.
    pub fn open(db: Database) -> io::Result<Self> {
        let log = db
            .keyspace(KS_LOG, KeyspaceCreateOptions::default)
            .map_err(io::Error::other)?;
        let meta = db
            .keyspace(KS_RAFT_META, KeyspaceCreateOptions::default)
            .map_err(io::Error::other)?;
        let (flush_tx, flush_rx) = mpsc::sync_channel::<LogFlushed<TypeConfig>>(FLUSH_QUEUE_MAX);
        let flush_db = db.clone();
        std::thread::Builder::new()
            .name("raft-log-flusher".into())
            .spawn(move || {
                while let Ok(first) = flush_rx.recv() {
                    let mut done = vec![first];
                    done.extend(flush_rx.try_iter());
                    if let Err(e) = flush_db.persist(PersistMode::SyncData) {
                        tracing::error!(error = %e, "fsync of the raft log failed; stopping");
                        std::process::exit(1);
                    }
                    for callback in done {
                        callback.log_io_completed(Ok(()));
                    }
                }
            })?;
        Ok(Self {
            db,
            log,
            meta,
            flush_tx,
        })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        match self.meta.get(key).map_err(read_err)? {
            None => Ok(None),
            Some(v) => postcard::from_bytes(&v).map(Some).map_err(read_err),
        }
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
            Included(i) => Some(i + 1),
            Excluded(i) => Some(*i),
            Unbounded => None,
        };
        let lo = start.to_be_bytes().to_vec();
        let iter = match end {
            Some(e) => self.log.range(lo..e.to_be_bytes().to_vec()),
            None => self.log.range(lo..),
        };
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item.into_inner().map_err(read_err)?;
            let entry: Entry<TypeConfig> = postcard::from_bytes(&v).map_err(read_err)?;
            // Pair check with the key written by `append`.
            assert_eq!(
                k.as_ref(),
                entry.log_id.index.to_be_bytes(),
                "log key/index mismatch"
            );
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId<u64>> = self.get_meta(KEY_PURGED)?;
        let last = match self.log.last_key_value() {
            Some(g) => {
                let (_, v) = g.into_inner().map_err(read_err)?;
                let e: Entry<TypeConfig> = postcard::from_bytes(&v).map_err(read_err)?;
                Some(e.log_id)
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

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        self.meta
            .insert(KEY_VOTE, encode(vote))
            .map_err(write_err)?;
        self.db.persist(PersistMode::SyncData).map_err(write_err)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), StorageError> {
        self.meta
            .insert(KEY_COMMITTED, encode(&committed))
            .map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError> {
        Ok(self
            .get_meta::<Option<LogId<u64>>>(KEY_COMMITTED)?
            .flatten())
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
        let mut batch = self.db.batch();
        for entry in entries {
            batch.insert(
                &self.log,
                entry.log_id.index.to_be_bytes().to_vec(),
                encode(&entry),
            );
        }
        batch.commit().map_err(write_err)?;
        self.flush_tx.send(callback).map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        let mut batch = self.db.batch();
        for item in self.log.range(log_id.index.to_be_bytes().to_vec()..) {
            batch.remove(&self.log, item.key().map_err(read_err)?);
        }
        batch.commit().map_err(write_err)?;
        self.db.persist(PersistMode::SyncData).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        let mut batch = self.db.batch();
        batch.insert(&self.meta, KEY_PURGED, encode(&log_id));
        for item in self.log.range(..=log_id.index.to_be_bytes().to_vec()) {
            batch.remove(&self.log, item.key().map_err(read_err)?);
        }
        batch.commit().map_err(write_err)
    }
}
