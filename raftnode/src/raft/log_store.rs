//! The raft log store over [`Wal`]: segmented append-only files with grouped fsyncs.
//!
//! `append` writes the entries and hands the flush callback to the flusher thread, which
//! fdatasyncs once for everything queued since its last fsync, without blocking further appends,
//! and then completes those callbacks in order (group commit). The state machine lives in a
//! separate fjall database whose journal is never on this fsync path. A failed fsync stops the
//! process: serving from an unknown disk state could lose acknowledged writes.

use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageIOError, Vote};
use serde::{Deserialize, Serialize};

use super::wal::Wal;
use super::{StorageError, TypeConfig, encode};

/// Flush callbacks waiting for the flusher; a full queue makes `append` wait (back-pressure).
const FLUSH_QUEUE_MAX: usize = 4096;

/// Persisted raft metadata (the WAL's state file).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LogMeta {
    vote: Option<Vote<u64>>,
    last_purged: Option<LogId<u64>>,
}

/// The raft log store (cheap to clone; clones share the files and the flusher).
#[derive(Clone)]
pub struct LogStore {
    wal: Wal,
    meta: Arc<Mutex<LogMeta>>,
    flush_tx: mpsc::SyncSender<(Arc<File>, LogFlushed<TypeConfig>)>,
}

fn read_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::read_logs(&io::Error::other(e.to_string())).into()
}

fn write_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_logs(&io::Error::other(e.to_string())).into()
}

impl LogStore {
    /// Opens the log in `dir` and starts the flusher thread.
    ///
    /// # Errors
    /// I/O errors, corruption, or failure to spawn the thread.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let wal = Wal::open(dir)?;
        let meta: LogMeta = match wal.read_state()? {
            Some(b) => postcard::from_bytes(&b).map_err(io::Error::other)?,
            None => LogMeta::default(),
        };
        if let Some(p) = meta.last_purged {
            wal.purge(p.index)?;
        }
        let (flush_tx, flush_rx) =
            mpsc::sync_channel::<(Arc<File>, LogFlushed<TypeConfig>)>(FLUSH_QUEUE_MAX);
        std::thread::Builder::new()
            .name("raft-log-flusher".into())
            .spawn(move || {
                while let Ok(first) = flush_rx.recv() {
                    let mut done = vec![first];
                    done.extend(flush_rx.try_iter());
                    let mut synced: Vec<*const File> = Vec::new();
                    for (file, _) in &done {
                        let ptr = Arc::as_ptr(file);
                        if synced.contains(&ptr) {
                            continue;
                        }
                        if let Err(e) = file.sync_data() {
                            tracing::error!(error = %e, "fsync of the raft log failed; stopping");
                            std::process::exit(1);
                        }
                        synced.push(ptr);
                    }
                    for (_, callback) in done {
                        callback.log_io_completed(Ok(()));
                    }
                }
            })?;
        Ok(Self {
            wal,
            meta: Arc::new(Mutex::new(meta)),
            flush_tx,
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

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
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
        let mut first = None;
        let payloads: Vec<Vec<u8>> = entries
            .into_iter()
            .map(|e| {
                first.get_or_insert(e.log_id.index);
                encode(&e)
            })
            .collect();
        let Some(first) = first else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        let file = self.wal.append(first, &payloads).map_err(write_err)?;
        self.flush_tx.send((file, callback)).map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        self.wal.truncate(log_id.index).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        // Record the purge durably before files go, so a crash never leaves an unexplained gap.
        self.update_meta(true, |m| m.last_purged = Some(log_id))?;
        self.wal.purge(log_id.index).map_err(write_err)
    }
}
