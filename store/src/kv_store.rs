//! `KvStore`: etcd's MVCC key-value store over fjall.
//!
//! Keyspaces (see `layout` constants below):
//! - `kv_latest`: user key → current `KeyValue` of live keys; serves reads at the current revision
//!   in one seek.
//! - `kv_history`: revision (16 bytes) → `HistoryRecord`; every change in revision order, for watch
//!   catch-up, historical reads and HashKV. Each record names the key's previous revision in the
//!   same life (create to delete), so a key's history is a chain walked back from its newest
//!   change.
//! - `kv_sparse_index`: escaped user key ++ `00 00` ++ revision → mark; an entry per delete
//!   (joining a key's lives) and per `StoreOptions::waypoint_versions`-th version of a life. A
//!   read at an older revision `R` walks each key changed since `R` back along its chain from the
//!   oldest mark above `R` (or its latest value): at most that many records per key. A put that
//!   is no waypoint writes no index entry: an entry per put in a key-ordered keyspace cost about
//!   a third of the store's CPU per put (a random memtable insert).
//! - `lease`, `lease_keys`: lease records and (lease, key) attachments, so restart needs no scan.
//! - `meta`: current and compact revision, how far compaction has swept history, alarms, and
//!   opaque entries of the raft layer (applied log id) that are written in the same batch as the
//!   data they cover.
//!
//! Beside them, the writer keeps every live key's revisions, version and lease in memory (see
//! `live_index`), so a put reads the previous value only when something asks for it.
//!
//! Readers use a fjall snapshot, so a range sees one revision even while writes are applied. The
//! single writer is a [`WriteBatch`] (or [`KvStore::apply`], a batch of one): each commits
//! exactly one fjall batch however many revisions it holds.
//!
//! A compaction takes effect when it is applied: reads and watches below its revision fail at
//! once. Removing the history it makes unreachable is a sweep of bounded steps beside the writer
//! ([`KvStore::sweep_compacted`]), resumed after a crash, so a large compaction never stalls
//! writes.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch, PersistMode, Readable};

use crate::error::{Error, Result};
use crate::keys::{self, KeyEnd, KeyRange};
use crate::lease::{LeaseRecord, Lessor};
use crate::limits;
use crate::live_index::{LiveIndex, LiveKey, Lookup};
use crate::revision::Revision;
use crate::types::*;
use crate::watch::WatchHub;

const KS_LATEST: &str = "kv_latest";
const KS_HISTORY: &str = "kv_history";
const KS_SPARSE_INDEX: &str = "kv_sparse_index";
const KS_LEASE: &str = "lease";
const KS_LEASE_KEYS: &str = "lease_keys";
const KS_META: &str = "meta";

const META_REVISION: &[u8] = b"revision";
/// The compacted revision clients see; written with the Compact request's revision.
const META_COMPACT: &[u8] = b"compact_revision";
/// History holds nothing that compaction at this revision removes.
const META_COMPACT_SWEPT: &[u8] = b"compact_swept";
/// The sweep under way: its target revision, then the last history key it handled.
const META_COMPACT_SWEEP: &[u8] = b"compact_sweep";
/// The current revision when compacted history was last reclaimed (see `KvStore::reclaim`).
const META_RECLAIMED: &[u8] = b"reclaimed_revision";
const META_ALARMS: &[u8] = b"alarms";
const META_FORMAT: &[u8] = b"format";
/// On-disk format of this store; bumped on incompatible layout changes.
const FORMAT_VERSION: &[u8] = b"keyhold-store-3";

/// Sealed memtables in one keyspace from which [`KvStore::write_may_stall`] says yes (fjall
/// halts writes at 4).
const SEALED_MEMTABLES_NEAR_STALL: usize = 2;
/// Level-0 tables in one keyspace from which [`KvStore::write_may_stall`] says yes (fjall
/// stalls writes from 20 level-0 runs; a run holds one table or more).
const L0_TABLES_NEAR_STALL: usize = 16;

/// Sparse index entry values: a delete, or a waypoint put.
const MARK_TOMBSTONE: u8 = 0;
const MARK_WAYPOINT: u8 = 1;

/// One change in `kv_history`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct HistoryRecord {
    kv: KeyValue,
    tombstone: bool,
    /// Main revision of the key's previous change in the same life (0 for a create); never a
    /// tombstone. A key changes at most once per main revision.
    prev: i64,
}

/// The key of an encoded [`HistoryRecord`], read without copying (the record starts with
/// its `KeyValue`, which starts with the key).
#[derive(serde::Deserialize)]
struct HistoryKey<'a> {
    #[serde(borrow)]
    key: &'a [u8],
}

/// The fields of an encoded [`KeyValue`] the live index keeps, read without copying the key or
/// value (same fields in the same order: postcard decodes by position).
#[derive(serde::Deserialize)]
struct KeyValueHead<'a> {
    #[serde(borrow)]
    _key: &'a [u8],
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    #[serde(borrow)]
    _value: &'a [u8],
    lease: i64,
}

impl KeyValueHead<'_> {
    /// The live index entry of an encoded `KeyValue`.
    fn live_of(encoded: &[u8]) -> Result<LiveKey> {
        let head: KeyValueHead<'_> = decode(encoded)?;
        Ok(LiveKey {
            create_revision: head.create_revision,
            mod_revision: head.mod_revision,
            version: head.version,
            lease: head.lease,
        })
    }
}

/// Options when opening a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Backend quota in bytes; 0 = no quota.
    pub quota_bytes: u64,
    /// Block cache size in bytes.
    pub cache_bytes: u64,
    /// Every this many versions of a key's life, a put also writes a sparse index entry, which
    /// bounds the records a read at an older revision walks per key (at least 1).
    pub waypoint_versions: i64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            quota_bytes: limits::QUOTA_BACKEND_BYTES_DEFAULT,
            cache_bytes: 64 * 1024 * 1024,
            waypoint_versions: limits::HISTORY_WAYPOINT_VERSIONS,
        }
    }
}

/// Context of one apply: the caller's clock and extra meta entries committed in the same batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyContext<'a> {
    /// Monotonic milliseconds (lease deadlines).
    pub now_ms: u64,
    /// Opaque `(key, value)` pairs written to `meta` atomically with the change.
    pub meta: &'a [(&'a [u8], &'a [u8])],
}

struct State {
    lessor: Lessor,
    alarms: BTreeSet<AlarmMember>,
}

/// Where loading the live index stands: the `kv_latest` view it reads (taken before any write)
/// and the last key it loaded.
struct LiveIndexLoader {
    snap: fjall::Snapshot,
    resume_after: Option<Vec<u8>>,
}

/// The MVCC store (see the module docs).
pub struct KvStore {
    db: Database,
    latest: Keyspace,
    history: Keyspace,
    sparse_index: Keyspace,
    lease: Keyspace,
    lease_keys: Keyspace,
    meta: Keyspace,
    options: StoreOptions,
    /// Held by the single writer for the whole apply, so writes are serial; it guards what
    /// only the writer reads.
    writer: Mutex<LiveIndex>,
    /// Set while the live index loads (see [`KvStore::load_live_index`]).
    live_loader: Mutex<Option<LiveIndexLoader>>,
    state: Mutex<State>,
    hub: Mutex<WatchHub>,
    /// Held by a compaction sweep step, and by a snapshot import for its whole length.
    sweeper: Mutex<()>,
    /// History entries removed by compaction since the last [`KvStore::reclaim_compacted`].
    removed_since_reclaim: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a store lock is a bug that already aborted one apply; the data in
    // fjall is still consistent (batches are atomic), so keep serving rather than cascading.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Encodes `v` into a buffer sized up front (a growing one would be copied as it grows).
fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    let len = postcard::experimental::serialized_size(v)?;
    Ok(postcard::to_extend(v, Vec::with_capacity(len))?)
}

fn decode<'a, T: serde::Deserialize<'a>>(b: &'a [u8]) -> Result<T> {
    Ok(postcard::from_bytes(b)?)
}

fn i64_at(v: Option<fjall::Slice>) -> Result<i64> {
    match v {
        None => Ok(0),
        Some(b) => Ok(i64::from_be_bytes(
            b.as_ref()
                .try_into()
                .map_err(|_| Error::Storage("bad meta integer".into()))?,
        )),
    }
}

fn lease_key(id: i64, key: &[u8]) -> Vec<u8> {
    let mut out = id.to_be_bytes().to_vec();
    out.extend_from_slice(key);
    out
}

impl KvStore {
    /// Opens (or creates) the store in `path` and loads the live index before returning. A
    /// compaction sweep left unfinished stays so until [`KvStore::sweep_compacted`] resumes it.
    ///
    /// # Errors
    /// `Storage` when the directory cannot be opened or holds another format.
    pub fn open(path: &Path, options: StoreOptions) -> Result<Self> {
        let db = Database::builder(path)
            .cache_size(options.cache_bytes)
            .open()?;
        let store = Self::with_database(db, options)?;
        store.finish_live_index_load()?;
        Ok(store)
    }

    /// Opens the store's keyspaces inside an existing database (shared with the raft log). The
    /// store is usable at once; its live index is loaded by calling
    /// [`KvStore::load_live_index`] until it says so (until then, puts read previous values
    /// from disk).
    ///
    /// # Errors
    /// `Storage` when the keyspaces cannot be opened or hold another format.
    pub fn with_database(db: Database, options: StoreOptions) -> Result<Self> {
        let ks = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default);
        let store = Self {
            latest: ks(KS_LATEST)?,
            history: ks(KS_HISTORY)?,
            sparse_index: ks(KS_SPARSE_INDEX)?,
            lease: ks(KS_LEASE)?,
            lease_keys: ks(KS_LEASE_KEYS)?,
            meta: ks(KS_META)?,
            db,
            options,
            writer: Mutex::new(LiveIndex::default()),
            live_loader: Mutex::new(None),
            state: Mutex::new(State {
                lessor: Lessor::default(),
                alarms: BTreeSet::new(),
            }),
            hub: Mutex::new(WatchHub::new(1)),
            sweeper: Mutex::new(()),
            removed_since_reclaim: std::sync::atomic::AtomicU64::new(0),
        };
        match store.meta.get(META_FORMAT)? {
            None => store.meta.insert(META_FORMAT, FORMAT_VERSION)?,
            Some(f) if f.as_ref() == FORMAT_VERSION => {}
            Some(f) => {
                return Err(Error::Storage(format!(
                    "unsupported store format {:?}",
                    String::from_utf8_lossy(&f)
                )));
            }
        }
        store.recover()?;
        store.start_live_index_load();
        Ok(store)
    }

    /// Every keyspace of the store, in a fixed order (the snapshot format depends on it).
    pub(crate) fn keyspaces(&self) -> [&Keyspace; 6] {
        [
            &self.latest,
            &self.history,
            &self.sparse_index,
            &self.lease,
            &self.lease_keys,
            &self.meta,
        ]
    }

    /// Rebuilds in-memory state (live index, lessor, alarms, watch hub revision) after an import.
    pub(crate) fn reload(&self) -> Result<()> {
        // Loaded at once: the install already costs a pass over the data. A load still running
        // from start-up carries on with the new view.
        self.start_live_index_load();
        self.finish_live_index_load()?;
        *lock(&self.state) = State {
            lessor: Lessor::default(),
            alarms: BTreeSet::new(),
        };
        self.recover()
    }

    fn recover(&self) -> Result<()> {
        let mut state = lock(&self.state);
        for item in self.lease.iter() {
            let (k, v) = item.into_inner()?;
            let id = i64_at(Some(k))?;
            state.lessor.insert(id, decode::<LeaseRecord>(&v)?, 0);
        }
        for item in self.lease_keys.iter() {
            let k = item.key()?;
            let (id, key) = k.split_at(8.min(k.len()));
            state.lessor.attach(i64_at(Some(id.into()))?, key);
        }
        if let Some(a) = self.meta.get(META_ALARMS)? {
            state.alarms = decode(&a)?;
        }
        drop(state);
        let current = self.current_revision()?;
        let mut hub = lock(&self.hub);
        if hub.is_empty() {
            *hub = WatchHub::new(current);
        } else if current > hub.last_notified() {
            // An installed snapshot jumped ahead: watchers must catch up from history.
            hub.jump_to(current);
        }
        drop(hub);
        Ok(())
    }

    /// Empties the live index and sets up its loading from a view of `kv_latest` taken under
    /// the writer lock, so every write the loader could miss is newer and already in the index.
    fn start_live_index_load(&self) {
        // Loader before writer, as in a step: a step still running on an older view must not
        // add its keys to the index emptied here.
        let mut loader = lock(&self.live_loader);
        let mut index = lock(&self.writer);
        *index = LiveIndex::loading(self.latest.approximate_len());
        let snap = self.db.snapshot();
        drop(index);
        *loader = Some(LiveIndexLoader {
            snap,
            resume_after: None,
        });
    }

    fn finish_live_index_load(&self) -> Result<()> {
        while !self.load_live_index(limits::LIVE_INDEX_LOAD_CHUNK_KEYS)? {}
        Ok(())
    }

    /// Loads up to `max_keys` more keys into the live index, beside the writer (which waits
    /// only while one step's keys are added). Returns `true` once the index is complete.
    /// [`KvStore::open`] calls it until then; a server calls it from a background thread.
    ///
    /// # Errors
    /// `Storage` on read failure; the index stays incomplete, which costs speed, not
    /// correctness.
    pub fn load_live_index(&self, max_keys: usize) -> Result<bool> {
        use std::ops::Bound::{Excluded, Unbounded};
        // Held through the step, so steps (and their last, the one that completes) are serial.
        let mut loader = lock(&self.live_loader);
        let Some(l) = loader.as_mut() else {
            return Ok(true);
        };
        let lo = l.resume_after.take().map_or(Unbounded, Excluded);
        let mut chunk = Vec::with_capacity(max_keys.min(limits::LIVE_INDEX_LOAD_CHUNK_KEYS));
        for item in l.snap.range(&self.latest, (lo, Unbounded)).take(max_keys) {
            let (key, value) = item.into_inner()?;
            chunk.push((key, KeyValueHead::live_of(&value)?));
        }
        let done = chunk.len() < max_keys;
        l.resume_after = chunk.last().map(|(key, _)| key.to_vec());
        let mut index = lock(&self.writer);
        for (key, live) in &chunk {
            index.load(key, *live);
        }
        if done {
            index.finish_loading();
            drop(index);
            *loader = None;
        }
        Ok(done)
    }

    /// Checks the writer's live index against `kv_latest`, key by key (for tests and
    /// debugging: it reads every live key).
    ///
    /// # Errors
    /// `Storage` naming the first difference, or on read failure.
    pub fn check_live_index(&self) -> Result<()> {
        let index = lock(&self.writer);
        if index.is_loading() {
            return Err(Error::Storage("live index still loading".into()));
        }
        let mut n = 0;
        for item in self.latest.iter() {
            let (key, value) = item.into_inner()?;
            let want = LiveKey::of(&decode(&value)?);
            if index.lookup(&key) != Lookup::Live(want) {
                return Err(Error::Storage(format!(
                    "live index has {:?} for key {:?}, kv_latest has {want:?}",
                    index.lookup(&key),
                    String::from_utf8_lossy(&key)
                )));
            }
            n += 1;
        }
        if index.len() != n {
            let extra = index
                .iter()
                .find(|(k, _)| matches!(self.latest.get(k), Ok(None)))
                .map(|(k, _)| String::from_utf8_lossy(k).into_owned());
            return Err(Error::Storage(format!(
                "live index holds {} keys, kv_latest {n} (for example {extra:?})",
                index.len()
            )));
        }
        Ok(())
    }

    /// Checks that the sparse index holds exactly one entry per tombstone and waypoint put in
    /// history (for tests and debugging: it reads all history).
    ///
    /// # Errors
    /// `Storage` naming the first difference, or on read failure.
    pub fn check_sparse_index(&self) -> Result<()> {
        let _writer = lock(&self.writer);
        let mut want = Vec::new();
        for item in self.history.iter() {
            let (k, v) = item.into_inner()?;
            let r = Revision::from_bytes(&k).ok_or_else(|| bad("history key"))?;
            let rec: HistoryRecord = decode(&v)?;
            if rec.tombstone {
                want.push((keys::index_key(&rec.kv.key, r), MARK_TOMBSTONE));
            } else if self.is_waypoint(&rec.kv) {
                want.push((keys::index_key(&rec.kv.key, r), MARK_WAYPOINT));
            }
        }
        want.sort();
        let mut got = Vec::new();
        for item in self.sparse_index.iter() {
            let (k, v) = item.into_inner()?;
            got.push((k.to_vec(), v.first().copied().unwrap_or(u8::MAX)));
        }
        if let Some(i) = (0..want.len().max(got.len())).find(|&i| want.get(i) != got.get(i)) {
            return Err(Error::Storage(format!(
                "sparse index entry {i}: history wants {:?}, index has {:?}",
                want.get(i),
                got.get(i)
            )));
        }
        Ok(())
    }

    /// The underlying database (the raft layer keeps its log in the same one).
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Whether a write now may be held back by fjall's backpressure, which sleeps in the
    /// writing thread (for 100 ms at a time from 4 sealed memtables in a keyspace, and from 20
    /// level-0 runs). A caller on an async worker then hands its writes to a blocking thread.
    pub fn write_may_stall(&self) -> bool {
        self.keyspaces().iter().any(|ks| {
            ks.sealed_memtable_count() >= SEALED_MEMTABLES_NEAR_STALL
                || ks.l0_table_count() >= L0_TABLES_NEAR_STALL
        })
    }

    /// Current store revision (1 on an empty store).
    ///
    /// # Errors
    /// `Storage` on read failure.
    pub fn current_revision(&self) -> Result<i64> {
        Ok(i64_at(self.meta.get(META_REVISION)?)?.max(1))
    }

    /// Compacted revision (0 when never compacted).
    ///
    /// # Errors
    /// `Storage` on read failure.
    pub fn compact_revision(&self) -> Result<i64> {
        i64_at(self.meta.get(META_COMPACT)?)
    }

    /// Reads an opaque meta entry written through [`ApplyContext::meta`].
    ///
    /// # Errors
    /// `Storage` on read failure.
    pub fn meta_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.meta.get(key)?.map(|v| v.to_vec()))
    }

    /// Writes opaque meta entries on their own (raft membership without data, for example).
    ///
    /// # Errors
    /// `Storage` on write failure.
    pub fn meta_put(&self, entries: &[(&[u8], &[u8])]) -> Result<()> {
        let _w = lock(&self.writer);
        let mut b = self.db.batch();
        for (k, v) in entries {
            b.insert(&self.meta, *k, *v);
        }
        b.commit()?;
        Ok(())
    }

    /// Bytes of the backend: on-disk tables plus data still in write buffers (the journal file
    /// itself is preallocated and sparse, so its length says nothing about the data).
    pub fn size_bytes(&self) -> u64 {
        let tables: u64 = self.keyspaces().iter().map(|ks| ks.disk_space()).sum();
        tables + self.db.write_buffer_size()
    }

    /// Approximate bytes of live data (keys and values at the current revision).
    pub fn size_in_use_bytes(&self) -> u64 {
        self.latest.disk_space() + self.lease.disk_space() + self.meta.disk_space()
    }

    /// Flushes everything to disk with fsync.
    ///
    /// # Errors
    /// `Storage` when the sync fails; the node must stop.
    pub fn persist(&self) -> Result<()> {
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// The watch hub, locked. Keep the guard short: applies wait on it.
    pub fn hub(&self) -> MutexGuard<'_, WatchHub> {
        lock(&self.hub)
    }

    /// Runs `f` on the lessor.
    pub fn with_lessor<T>(&self, f: impl FnOnce(&mut Lessor) -> T) -> T {
        f(&mut lock(&self.state).lessor)
    }

    /// Active alarms.
    pub fn alarms(&self) -> Vec<AlarmMember> {
        lock(&self.state).alarms.iter().copied().collect()
    }

    /// Rejects a write of `cost` bytes that would exceed the quota, or any quota-charged write
    /// while NOSPACE is raised. Returns `Err(NoSpace)`; the caller raises the alarm.
    ///
    /// # Errors
    /// `NoSpace` or `Corrupt`.
    pub fn check_write_admission(&self, cost: u64) -> Result<()> {
        let state = lock(&self.state);
        if state.alarms.iter().any(|a| a.alarm == AlarmType::Corrupt) {
            return Err(Error::Corrupt);
        }
        if cost == 0 {
            return Ok(());
        }
        if state.alarms.iter().any(|a| a.alarm == AlarmType::NoSpace) {
            return Err(Error::NoSpace);
        }
        drop(state);
        if self.options.quota_bytes > 0 && self.size_bytes() + cost >= self.options.quota_bytes {
            return Err(Error::NoSpace);
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Reads

    /// Range read at the request's revision (current when `revision <= 0`).
    ///
    /// # Errors
    /// `Compacted`, `FutureRevision`, `Storage`.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse> {
        let snap = self.db.snapshot();
        let current = i64_at(snap.get(&self.meta, META_REVISION)?)?.max(1);
        let compacted = i64_at(snap.get(&self.meta, META_COMPACT)?)?;
        let read = View::Snapshot {
            snap: &snap,
            store: self,
        };
        range_at(&read, req, current, compacted, &BTreeMap::new())
    }

    /// Events in `range` with revisions in `[from, to]`, at most
    /// `WATCH_BATCH_REVISIONS_MAX` distinct revisions, every revision complete. Returns the
    /// events and the next revision to read. `prev_kv` is filled when asked.
    ///
    /// # Errors
    /// `Compacted` when `from` is below the compacted revision; `Storage`.
    pub fn watch_events(
        &self,
        range: &KeyRange,
        from: i64,
        to: i64,
        prev_kv: bool,
    ) -> Result<(Vec<Event>, i64)> {
        let snap = self.db.snapshot();
        let compacted = i64_at(snap.get(&self.meta, META_COMPACT)?)?;
        if from < compacted {
            return Err(Error::Compacted);
        }
        let lo = Revision::new(from.max(0), 0).to_bytes();
        let hi = Revision::new(to.max(0), i64::MAX).to_bytes();
        let mut events = Vec::new();
        let mut revs = 0usize;
        let mut last_main = -1;
        for item in snap.range(&self.history, lo..=hi) {
            let (k, v) = item.into_inner()?;
            let rev = Revision::from_bytes(&k).ok_or_else(|| bad("history key"))?;
            if rev.main != last_main {
                if revs == limits::WATCH_BATCH_REVISIONS_MAX {
                    return Ok((events, rev.main));
                }
                revs += 1;
                last_main = rev.main;
            }
            let rec: HistoryRecord = decode(&v)?;
            if !range.contains(&rec.kv.key) {
                continue;
            }
            // The previous change in the key's life is its state just before this one (a
            // create has none); compaction keeps it, as the newest change at or below the
            // compacted revision.
            let prev = if prev_kv && rec.prev != 0 {
                let view = View::Snapshot {
                    snap: &snap,
                    store: self,
                };
                view.record_at(&rec.kv.key, rec.prev)?
                    .filter(|(_, p)| !p.tombstone)
                    .map(|(_, p)| p.kv)
            } else {
                None
            };
            let kind = if rec.tombstone {
                EventType::Delete
            } else {
                EventType::Put
            };
            events.push(Event {
                kind,
                kv: rec.kv,
                prev_kv: prev,
            });
        }
        Ok((events, to + 1))
    }

    /// HashKV: CRC-32C over history up to `revision` (0 = current), after finishing any
    /// compaction sweep. Returns `(hash, compact_revision, hashed_revision)`; equal on stores
    /// with equal history.
    ///
    /// # Errors
    /// `Compacted`, `FutureRevision`, `Storage`.
    pub fn hash_kv(&self, revision: i64) -> Result<(u32, i64, i64)> {
        // Members sweep at their own pace: hash only swept history, so that equal histories
        // hash equal (a compaction applied after the sweep finishes means one more round).
        let snap = loop {
            self.finish_compaction()?;
            let snap = self.db.snapshot();
            let swept = i64_at(snap.get(&self.meta, META_COMPACT_SWEPT)?)?;
            if swept >= i64_at(snap.get(&self.meta, META_COMPACT)?)? {
                break snap;
            }
        };
        let current = i64_at(snap.get(&self.meta, META_REVISION)?)?.max(1);
        let compacted = i64_at(snap.get(&self.meta, META_COMPACT)?)?;
        let rev = if revision <= 0 { current } else { revision };
        if rev > current {
            return Err(Error::FutureRevision);
        }
        if rev < compacted {
            return Err(Error::Compacted);
        }
        let mut crc = crc32c::crc32c(b"key");
        let hi = Revision::new(rev, i64::MAX).to_bytes();
        for item in snap.range(&self.history, ..=hi) {
            let (k, v) = item.into_inner()?;
            crc = crc32c::crc32c_append(crc, &k);
            crc = crc32c::crc32c_append(crc, &v);
        }
        Ok((crc, compacted, rev))
    }

    /// Keys attached to a lease.
    pub fn lease_keys(&self, id: i64) -> Vec<Vec<u8>> {
        lock(&self.state)
            .lessor
            .get(id)
            .map(|l| l.keys.iter().cloned().collect())
            .unwrap_or_default()
    }

    // ---------------------------------------------------------------------------------------
    // Writes

    /// Applies one replicated write in one atomic batch, together with `ctx.meta`, then hands
    /// the revision's events to the watch hub.
    ///
    /// # Errors
    /// Domain errors leave the store unchanged (the meta entries are still written, so the raft
    /// layer's applied id advances); `Storage` means the node must stop.
    pub fn apply(&self, req: &WriteRequest, ctx: ApplyContext<'_>) -> Result<WriteResponse> {
        let mut batch = self.write_batch(ctx.now_ms)?;
        let resp = batch.apply(req);
        if let Err(Error::Storage(_)) = resp {
            return resp;
        }
        batch.commit(ctx.meta)?;
        resp
    }

    /// Starts a batch of writes that are applied in order, each at its own revision, and
    /// committed together in one fjall batch (see [`WriteBatch`]). Holds the writer lock until
    /// it is committed or dropped.
    ///
    /// # Errors
    /// `Storage` when the current revision cannot be read.
    pub fn write_batch(&self, now_ms: u64) -> Result<WriteBatch<'_>> {
        let index = lock(&self.writer);
        let current = self.current_revision()?;
        // A watcher that asks for `prev_kv` after this and sees this batch catches up from
        // history instead (see `WatchHub::notify`).
        let with_prev = lock(&self.hub).wants_prev_kv();
        Ok(WriteBatch {
            txn: WriteTxn::new(self, index, current, now_ms, with_prev),
            applied: 0,
            sealed: false,
        })
    }

    /// Whether the put of `kv` also writes a sparse index entry.
    fn is_waypoint(&self, kv: &KeyValue) -> bool {
        kv.version % self.options.waypoint_versions.max(1) == 0
    }

    /// One step of the compaction sweep: reads up to `max_records` history records and removes
    /// what compaction makes unreachable, in one batch. Returns whether history is swept
    /// through the compacted revision (then there is nothing to do).
    ///
    /// A change at or below the sweep's target revision goes when a newer change of its key is
    /// at or below it too, and that change names it as `prev`; a tombstone below the target
    /// goes (a deleted key reads as absent either way). Each goes with its sparse index entry.
    /// So one pass over the history written since the previous target finds everything to
    /// remove, however large the key space. A step ends between records, so a resumed pass
    /// never misses the change a removed tombstone named. A pass keeps its target to the end: a
    /// compaction applied meanwhile starts another pass, which rereads the old target's
    /// revision (a tombstone there is kept by one pass and removed by the next).
    ///
    /// Runs beside the writer without its lock. The sweep removes only changes at or below the
    /// compacted revision that are not a key's newest one there, and reads at or above that
    /// revision never reach those: they stop at the first change at or below their revision.
    ///
    /// # Errors
    /// `Storage`: the step is not applied, and a later one redoes it.
    pub fn sweep_compacted(&self, max_records: usize) -> Result<bool> {
        let _sweeper = lock(&self.sweeper);
        let compacted = self.compact_revision()?;
        let (target, from) = match self.meta.get(META_COMPACT_SWEEP)? {
            Some(v) => {
                let (target, last) = v.split_at(8.min(v.len()));
                let target = i64_at(Some(target.into()))?;
                (target, Bound::Excluded(last.to_vec()))
            }
            None => {
                let swept = i64_at(self.meta.get(META_COMPACT_SWEPT)?)?;
                if swept >= compacted {
                    return Ok(true);
                }
                let from = Revision::new(swept, 0).to_bytes().to_vec();
                (compacted, Bound::Included(from))
            }
        };
        let to = Bound::Included(Revision::new(target, i64::MAX).to_bytes().to_vec());
        let view = View::Live { store: self };
        let mut batch = self.db.batch();
        let (mut read, mut removed) = (0usize, 0u64);
        let mut last = None;
        for item in self.history.range((from, to)) {
            if read == max_records.max(1) {
                break;
            }
            let (k, v) = item.into_inner()?;
            read += 1;
            let r = Revision::from_bytes(&k).ok_or_else(|| bad("history key"))?;
            let rec: HistoryRecord = decode(&v)?;
            if rec.prev != 0
                && let Some((prev, prev_rec)) = view.record_at(&rec.kv.key, rec.prev)?
            {
                batch.remove(&self.history, prev.to_bytes().to_vec());
                if self.is_waypoint(&prev_rec.kv) {
                    batch.remove(&self.sparse_index, keys::index_key(&rec.kv.key, prev));
                }
                removed += 1;
            }
            if rec.tombstone && r.main < target {
                batch.remove(&self.history, k.to_vec());
                batch.remove(&self.sparse_index, keys::index_key(&rec.kv.key, r));
                removed += 1;
            }
            last = Some(k);
        }
        let pass_done = read < max_records.max(1);
        match last {
            Some(last) if !pass_done => {
                let mut sweep = target.to_be_bytes().to_vec();
                sweep.extend_from_slice(&last);
                batch.insert(&self.meta, META_COMPACT_SWEEP, sweep);
            }
            _ => {
                batch.insert(
                    &self.meta,
                    META_COMPACT_SWEPT,
                    target.to_be_bytes().to_vec(),
                );
                batch.remove(&self.meta, META_COMPACT_SWEEP.to_vec());
            }
        }
        batch.commit()?;
        self.removed_since_reclaim
            .fetch_add(removed, std::sync::atomic::Ordering::Relaxed);
        Ok(pass_done && target >= compacted)
    }

    /// Runs the compaction sweep to its end (see [`KvStore::sweep_compacted`]), in steps of
    /// `limits::COMPACTION_BATCH_RECORDS_MAX` records.
    ///
    /// # Errors
    /// `Storage`.
    pub fn finish_compaction(&self) -> Result<()> {
        while !self.sweep_compacted(limits::COMPACTION_BATCH_RECORDS_MAX)? {}
        Ok(())
    }

    /// Keeps compaction sweeps out while the whole state is replaced (snapshot import).
    pub(crate) fn pause_sweeps(&self) -> MutexGuard<'_, ()> {
        lock(&self.sweeper)
    }

    /// Whether history still holds changes that the applied compaction removes.
    ///
    /// # Errors
    /// `Storage`.
    pub fn compaction_pending(&self) -> Result<bool> {
        let swept = i64_at(self.meta.get(META_COMPACT_SWEPT)?)?;
        Ok(swept < self.compact_revision()?)
    }
}

/// The encoded `HistoryRecord { kv, tombstone: false, prev }` from the encoded `kv`: postcard
/// writes a struct's fields in order, so the record is the value's bytes followed by the rest
/// (one encoding of the value per put instead of two).
fn live_history_record(encoded_kv: &[u8], prev: i64) -> Result<Vec<u8>> {
    let mut record = Vec::with_capacity(encoded_kv.len() + 11);
    record.extend_from_slice(encoded_kv);
    Ok(postcard::to_extend(&(false, prev), record)?)
}

fn bad(what: &str) -> Error {
    Error::Storage(format!("corrupt {what}"))
}

/// A read view: a snapshot for readers, or the live keyspaces for the single writer.
enum View<'a> {
    Snapshot {
        snap: &'a fjall::Snapshot,
        store: &'a KvStore,
    },
    Live {
        store: &'a KvStore,
    },
}

impl View<'_> {
    fn store(&self) -> &KvStore {
        match self {
            View::Snapshot { store, .. } | View::Live { store } => store,
        }
    }

    fn get(&self, ks: &Keyspace, key: &[u8]) -> Result<Option<fjall::Slice>> {
        Ok(match self {
            View::Snapshot { snap, .. } => snap.get(ks, key)?,
            View::Live { .. } => ks.get(key)?,
        })
    }

    fn range(&self, ks: &Keyspace, lo: Vec<u8>, hi: Option<Vec<u8>>) -> fjall::Iter {
        use std::ops::Bound::*;
        let hi = hi.map_or(Unbounded, Excluded);
        match self {
            View::Snapshot { snap, .. } => snap.range(ks, (Included(lo), hi)),
            View::Live { .. } => ks.range((Included(lo), hi)),
        }
    }

    /// Live keys in `range` at the current revision, in key order.
    fn latest_in(&self, range: &KeyRange) -> Result<Vec<KeyValue>> {
        let store = self.store();
        if range.is_empty() {
            return Ok(Vec::new());
        }
        if range.end == KeyEnd::Single {
            return Ok(match self.get(&store.latest, &range.start)? {
                Some(v) => vec![decode(&v)?],
                None => Vec::new(),
            });
        }
        let hi = match &range.end {
            KeyEnd::Before(e) => Some(e.clone()),
            _ => None,
        };
        let mut out = Vec::new();
        for item in self.range(&store.latest, range.start.clone(), hi) {
            let (_, v) = item.into_inner()?;
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    /// The record of `key` at main revision `main` and its full revision (a key changes at
    /// most once per main revision; other keys share it only inside a txn).
    fn record_at(&self, key: &[u8], main: i64) -> Result<Option<(Revision, HistoryRecord)>> {
        let store = self.store();
        // Sub-revision 0 first: a point lookup, and the only change of most revisions.
        let first = Revision::new(main, 0);
        if let Some(v) = self.get(&store.history, &first.to_bytes())?
            && decode::<HistoryKey<'_>>(&v)?.key == key
        {
            return Ok(Some((first, decode(&v)?)));
        }
        let lo = Revision::new(main, 1).to_bytes().to_vec();
        let hi = Revision::new(main + 1, 0).to_bytes().to_vec();
        for item in self.range(&store.history, lo, Some(hi)) {
            let (k, v) = item.into_inner()?;
            if decode::<HistoryKey<'_>>(&v)?.key != key {
                continue;
            }
            let rev = Revision::from_bytes(&k).ok_or_else(|| bad("history key"))?;
            return Ok(Some((rev, decode(&v)?)));
        }
        Ok(None)
    }

    /// Main revision of the oldest sparse index entry of `key` above main revision `rev`.
    fn mark_above(&self, key: &[u8], rev: i64) -> Result<Option<i64>> {
        let store = self.store();
        let lo = keys::index_key(key, Revision::new(rev + 1, 0));
        let hi = keys::index_key(key, Revision::new(i64::MAX, i64::MAX));
        let Some(item) = self.range(&store.sparse_index, lo, Some(hi)).next() else {
            return Ok(None);
        };
        let k = item.key()?;
        let (_, r) = keys::split_index_key(&k).ok_or_else(|| bad("index key"))?;
        Ok(Some(r.main))
    }

    /// The state of `key` at `rev`, given its live value now (`head`, None when deleted).
    ///
    /// Walks the key's chain back to its change at or below `rev`. In a life longer than
    /// `waypoint_versions`, the walk starts at the oldest mark above `rev` instead of the head,
    /// so it reads at most that many records; it crosses into an earlier life the same way (a
    /// life ends with a tombstone, which is a mark). Compaction keeps the change found, or
    /// removes a tombstone below the compacted revision, which reads as absent all the same.
    fn state_at(&self, key: &[u8], head: Option<KeyValue>, rev: i64) -> Result<Option<KeyValue>> {
        let waypoints = self.store().options.waypoint_versions.max(1);
        let mut at = match &head {
            Some(kv) if kv.mod_revision <= rev => return Ok(head),
            // A short life: no waypoint in it, and at most `waypoints` records to walk.
            Some(kv) if kv.version <= waypoints => kv.mod_revision,
            _ => match (self.mark_above(key, rev)?, &head) {
                (Some(mark), _) => mark,
                (None, Some(kv)) => kv.mod_revision,
                // Deleted now with no mark above `rev`: its last tombstone is at or below it.
                (None, None) => return Ok(None),
            },
        };
        loop {
            let Some((_, rec)) = self.record_at(key, at)? else {
                return Err(bad("history gap"));
            };
            if at <= rev {
                return Ok((!rec.tombstone).then_some(rec.kv));
            }
            at = if rec.prev != 0 {
                rec.prev
            } else {
                // This life began after `rev`. An earlier one that reaches above `rev` ends with
                // a tombstone there; without one, the key was absent at `rev`.
                match self.mark_above(key, rev)? {
                    Some(mark) if mark < at => mark,
                    _ => return Ok(None),
                }
            };
        }
    }

    /// Live keys in `range` at an older revision `rev`, in key order: every key live now or
    /// deleted since the last compaction, each read back to `rev` along its chain (keys not
    /// changed since `rev` cost nothing more than the current read).
    fn historical_in(&self, range: &KeyRange, rev: i64) -> Result<Vec<KeyValue>> {
        let store = self.store();
        if range.is_empty() {
            return Ok(Vec::new());
        }
        if range.end == KeyEnd::Single {
            let head = self.latest_in(range)?.pop();
            return Ok(self
                .state_at(&range.start, head, rev)?
                .into_iter()
                .collect());
        }
        // Keys in the range with marks: those not live now were deleted.
        let lo = keys::index_key_prefix(&range.start);
        let hi = match &range.end {
            KeyEnd::Single | KeyEnd::Unbounded => None,
            KeyEnd::Before(e) => Some(keys::index_key_prefix(e)),
        };
        let mut deleted: BTreeSet<Vec<u8>> = BTreeSet::new();
        for item in self.range(&store.sparse_index, lo, hi) {
            let k = item.key()?;
            let (key, _) = keys::split_index_key(&k).ok_or_else(|| bad("index key"))?;
            deleted.insert(key);
        }
        let mut out = Vec::new();
        for kv in self.latest_in(range)? {
            deleted.remove(&kv.key);
            let key = kv.key.clone();
            out.extend(self.state_at(&key, Some(kv), rev)?);
        }
        for key in deleted {
            out.extend(self.state_at(&key, None, rev)?);
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

/// Reads `req` against `view`, with `overlay` (uncommitted changes of the running txn) on top.
fn range_at(
    view: &View<'_>,
    req: &RangeRequest,
    current: i64,
    compacted: i64,
    overlay: &BTreeMap<Vec<u8>, Option<KeyValue>>,
) -> Result<RangeResponse> {
    let rev = if req.revision <= 0 {
        current
    } else {
        req.revision
    };
    if rev > current {
        return Err(Error::FutureRevision);
    }
    if rev < compacted {
        return Err(Error::Compacted);
    }
    let range = KeyRange::new(&req.key, &req.range_end);
    let mut kvs = if rev == current {
        latest_with_overlay(view, &range, overlay)?
    } else {
        view.historical_in(&range, rev)?
    };
    let count = kvs.len() as i64;
    let filtered = req.min_mod_revision > 0
        || req.max_mod_revision > 0
        || req.min_create_revision > 0
        || req.max_create_revision > 0;
    if filtered {
        kvs.retain(|kv| {
            (req.min_mod_revision == 0 || kv.mod_revision >= req.min_mod_revision)
                && (req.max_mod_revision == 0 || kv.mod_revision <= req.max_mod_revision)
                && (req.min_create_revision == 0 || kv.create_revision >= req.min_create_revision)
                && (req.max_create_revision == 0 || kv.create_revision <= req.max_create_revision)
        });
    }
    sort_kvs(&mut kvs, req.sort_order, req.sort_target);
    let mut more = false;
    if req.limit > 0 && kvs.len() as i64 > req.limit {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.count_only {
        kvs.clear();
    } else if req.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResponse {
        revision: current,
        kvs,
        more,
        count,
    })
}

/// Live keys in `range` as the writer sees them: the store's latest values with the writes not
/// yet committed (`overlay`) on top.
fn latest_with_overlay(
    view: &View<'_>,
    range: &KeyRange,
    overlay: &BTreeMap<Vec<u8>, Option<KeyValue>>,
) -> Result<Vec<KeyValue>> {
    if range.end == KeyEnd::Single
        && let Some(v) = overlay.get(&range.start)
    {
        return Ok(v.iter().cloned().collect());
    }
    let kvs = view.latest_in(range)?;
    if overlay.is_empty() || range.end == KeyEnd::Single {
        return Ok(kvs);
    }
    let mut merged: BTreeMap<Vec<u8>, KeyValue> =
        kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
    for (k, v) in overlay.iter().filter(|(k, _)| range.contains(k)) {
        match v {
            Some(kv) => merged.insert(k.clone(), kv.clone()),
            None => merged.remove(k),
        };
    }
    Ok(merged.into_values().collect())
}

fn sort_kvs(kvs: &mut [KeyValue], order: SortOrder, target: SortTarget) {
    let order = match (order, target) {
        (SortOrder::None, SortTarget::Key) => return,
        (SortOrder::None, _) => SortOrder::Ascend,
        (o, _) => o,
    };
    // Stable sorts on top of key order, so ties stay in key order as in etcd.
    match target {
        SortTarget::Key => {}
        SortTarget::Version => kvs.sort_by_key(|kv| kv.version),
        SortTarget::Create => kvs.sort_by_key(|kv| kv.create_revision),
        SortTarget::Mod => kvs.sort_by_key(|kv| kv.mod_revision),
        SortTarget::Value => kvs.sort_by(|a, b| a.value.cmp(&b.value)),
    }
    if order == SortOrder::Descend {
        kvs.reverse();
        if target != SortTarget::Key {
            // Reversing also reversed key order among ties; restore ascending keys within ties.
            let key_of = |kv: &KeyValue| -> Vec<u8> {
                match target {
                    SortTarget::Version => kv.version.to_be_bytes().to_vec(),
                    SortTarget::Create => kv.create_revision.to_be_bytes().to_vec(),
                    SortTarget::Mod => kv.mod_revision.to_be_bytes().to_vec(),
                    _ => kv.value.clone(),
                }
            };
            let mut i = 0;
            while i < kvs.len() {
                let mut j = i + 1;
                while j < kvs.len() && key_of(&kvs[j]) == key_of(&kvs[i]) {
                    j += 1;
                }
                kvs[i..j].reverse();
                i = j;
            }
        }
    }
}

/// Consecutive replicated writes applied into one fjall batch: one journal record and one set of
/// meta updates for many requests (a raft entry carries up to hundreds of them). Each request
/// still gets its own revision, reads what the requests before it wrote, and on a domain error
/// leaves no trace. Requests whose effects live outside the key space (leases, alarms,
/// compaction) or that read history are applied alone: [`WriteBatch::admits`] says when the
/// batch must be committed first.
pub struct WriteBatch<'a> {
    txn: WriteTxn<'a>,
    /// Requests applied so far (including ones that failed or changed nothing).
    applied: usize,
    /// Set by a request that must be applied alone: nothing else may join.
    sealed: bool,
}

impl WriteBatch<'_> {
    /// Whether `req` may be applied into this batch; when not, commit it and start another.
    pub fn admits(&self, req: &WriteRequest) -> bool {
        !self.sealed && (self.applied == 0 || joins_batch(req))
    }

    /// Applies `req` on top of the writes already in the batch.
    ///
    /// # Errors
    /// Domain errors (the request changed nothing); `Storage` means the batch must be dropped
    /// and the node must stop.
    ///
    /// # Panics
    /// In debug builds, when `req` is not admitted (see [`WriteBatch::admits`]).
    pub fn apply(&mut self, req: &WriteRequest) -> Result<WriteResponse> {
        debug_assert!(
            self.admits(req),
            "request applied into a batch that does not admit it"
        );
        self.applied += 1;
        self.sealed |= !joins_batch(req);
        self.txn.run_request(req)
    }

    /// Commits every applied request and `meta` in one fjall batch, then hands each revision's
    /// events to the watch hub. A compaction applied here takes effect at once; its sweep is
    /// left to [`KvStore::sweep_compacted`].
    ///
    /// # Errors
    /// `Storage`: the node must stop.
    pub fn commit(self, meta: &[(&[u8], &[u8])]) -> Result<()> {
        let store = self.txn.store;
        let committed = self.txn.commit(meta)?;
        // Still under the writer lock, so revisions reach the hub in order.
        if !committed.revisions.is_empty() {
            let mut hub = lock(&store.hub);
            for (rev, events) in &committed.revisions {
                hub.notify(*rev, events, committed.with_prev);
            }
        }
        Ok(())
    }
}

/// Whether a request may share a batch with other requests: plain key-space writes whose reads
/// are at the latest revision. The rest change state kept beside the key space (the lessor,
/// alarms, the compact revision) or read history the batch has not written yet.
fn joins_batch(req: &WriteRequest) -> bool {
    fn reads_history(t: &TxnRequest) -> bool {
        t.success.iter().chain(&t.failure).any(|op| match op {
            RequestOp::Range(r) => r.revision > 0,
            RequestOp::Txn(n) => reads_history(n),
            _ => false,
        })
    }
    match req {
        WriteRequest::Put(_) | WriteRequest::DeleteRange(_) => true,
        WriteRequest::Txn(t) => !reads_history(t),
        _ => false,
    }
}

/// Each revision a batch made, in order, with its events (what the watch hub is handed).
type RevisionEvents = Vec<(i64, Vec<Event>)>;

/// A committed [`WriteTxn`]: what is left to do, under the writer lock it still holds.
struct Committed<'a> {
    revisions: RevisionEvents,
    /// Whether put and delete events carry the previous value (`Event::prev_kv`).
    with_prev: bool,
    _writer: MutexGuard<'a, LiveIndex>,
}

/// A fjall batch operation: keyspace, key, and the value (`None` removes).
type BatchOp<'a> = (&'a Keyspace, Vec<u8>, Option<Vec<u8>>);

/// The writes of a [`WriteBatch`]: changes accumulate as batch operations and in an overlay of
/// the latest values, which later ops (of the same request and of later requests) read
/// through. A failed request is rolled back to where it started.
struct WriteTxn<'a> {
    store: &'a KvStore,
    /// The committed live keys; `overlay` holds what the batch changed on top.
    index: MutexGuard<'a, LiveIndex>,
    /// Fill events' `prev_kv` (a watcher asks for it): read the previous value of each key a
    /// put or delete changes.
    with_prev: bool,
    ops: Vec<BatchOp<'a>>,
    /// Revision in the store before the batch.
    base: i64,
    /// Revision before the current request.
    begin: i64,
    /// Next sub-revision of the current request.
    sub: i64,
    overlay: BTreeMap<Vec<u8>, Option<KeyValue>>,
    /// Overlay values the current request replaced, oldest first, to roll it back.
    undo: Vec<(Vec<u8>, Option<Option<KeyValue>>)>,
    /// Events of the current request.
    events: Vec<Event>,
    /// Events of every revision this batch made, in order.
    revisions: RevisionEvents,
    lease_attach: Vec<(i64, Vec<u8>, bool)>,
    lease_grant: Option<(i64, LeaseRecord)>,
    lease_remove: Option<i64>,
    lease_remaining: Option<(i64, i64)>,
    alarms: Option<BTreeSet<AlarmMember>>,
    compact: Option<i64>,
    now_ms: u64,
}

impl<'a> WriteTxn<'a> {
    fn new(
        store: &'a KvStore,
        index: MutexGuard<'a, LiveIndex>,
        begin: i64,
        now_ms: u64,
        with_prev: bool,
    ) -> Self {
        Self {
            store,
            index,
            with_prev,
            ops: Vec::new(),
            base: begin,
            begin,
            sub: 0,
            overlay: BTreeMap::new(),
            undo: Vec::new(),
            events: Vec::new(),
            revisions: Vec::new(),
            lease_attach: Vec::new(),
            lease_grant: None,
            lease_remove: None,
            lease_remaining: None,
            alarms: None,
            compact: None,
            now_ms,
        }
    }

    /// Runs one request; on success it becomes a revision of the batch when it changed
    /// anything, on a domain error everything it did is undone.
    fn run_request(&mut self, req: &WriteRequest) -> Result<WriteResponse> {
        let (ops, attach) = (self.ops.len(), self.lease_attach.len());
        self.undo.clear();
        let result = self.run(req);
        if result.is_ok() {
            if self.sub > 0 {
                self.begin += 1;
                self.sub = 0;
                let events = std::mem::take(&mut self.events);
                self.revisions.push((self.begin, events));
            }
            return result;
        }
        self.ops.truncate(ops);
        self.lease_attach.truncate(attach);
        self.events.clear();
        self.sub = 0;
        while let Some((key, before)) = self.undo.pop() {
            match before {
                Some(v) => self.overlay.insert(key, v),
                None => self.overlay.remove(&key),
            };
        }
        // Only a request applied alone sets these, and it failed.
        self.lease_grant = None;
        self.lease_remove = None;
        self.lease_remaining = None;
        self.alarms = None;
        self.compact = None;
        result
    }

    fn insert(&mut self, ks: &'a Keyspace, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push((ks, key, Some(value)));
    }

    fn remove(&mut self, ks: &'a Keyspace, key: Vec<u8>) {
        self.ops.push((ks, key, None));
    }

    /// Sets the latest value of `key` as later reads of the batch see it.
    fn set_latest(&mut self, key: Vec<u8>, kv: Option<KeyValue>) {
        let before = self.overlay.insert(key.clone(), kv);
        self.undo.push((key, before));
    }

    fn view(&self) -> View<'a> {
        View::Live { store: self.store }
    }

    /// Revision reads see: the new revision once something changed.
    fn read_revision(&self) -> i64 {
        if self.sub > 0 {
            self.begin + 1
        } else {
            self.begin
        }
    }

    fn compacted(&self) -> Result<i64> {
        self.store.compact_revision()
    }

    fn lease_exists(&self, id: i64) -> bool {
        lock(&self.store.state).lessor.contains(id)
    }

    fn has_alarm(&self, alarm: AlarmType) -> bool {
        lock(&self.store.state)
            .alarms
            .iter()
            .any(|a| a.alarm == alarm)
    }

    /// The key's revisions, version and lease as the batch sees them, without its value
    /// (read from disk only while the index is loading and has not got to the key).
    fn live_key(&self, key: &[u8]) -> Result<Option<LiveKey>> {
        if let Some(kv) = self.overlay.get(key) {
            return Ok(kv.as_ref().map(LiveKey::of));
        }
        Ok(match self.index.lookup(key) {
            Lookup::Live(live) => Some(live),
            Lookup::Absent => None,
            Lookup::Unknown => match self.store.latest.get(key)? {
                Some(value) => Some(KeyValueHead::live_of(&value)?),
                None => None,
            },
        })
    }

    fn get_latest(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        Ok(match self.store.latest.get(key)? {
            Some(v) => Some(decode(&v)?),
            None => None,
        })
    }

    fn run(&mut self, req: &WriteRequest) -> Result<WriteResponse> {
        let corrupt = self.has_alarm(AlarmType::Corrupt);
        let nospace = self.has_alarm(AlarmType::NoSpace);
        match req {
            WriteRequest::Alarm { .. } => {}
            WriteRequest::Put(_) | WriteRequest::LeaseGrant { .. } if corrupt || nospace => {
                return Err(if corrupt {
                    Error::Corrupt
                } else {
                    Error::NoSpace
                });
            }
            WriteRequest::Txn(t) if nospace && txn_has_put(t) => return Err(Error::NoSpace),
            _ if corrupt => return Err(Error::Corrupt),
            _ => {}
        }
        match req {
            WriteRequest::Put(p) => self.put(p).map(WriteResponse::Put),
            WriteRequest::DeleteRange(d) => self.delete_range(d).map(WriteResponse::DeleteRange),
            WriteRequest::Txn(t) => {
                let mut resp = self.txn(t)?;
                fix_txn_revisions(&mut resp, self.read_revision());
                Ok(WriteResponse::Txn(resp))
            }
            WriteRequest::Compact { revision } => {
                let rev = *revision;
                if rev <= self.compacted()? {
                    return Err(Error::Compacted);
                }
                if rev > self.begin {
                    return Err(Error::FutureRevision);
                }
                self.compact = Some(rev);
                Ok(WriteResponse::Compact {
                    revision: self.begin,
                })
            }
            WriteRequest::LeaseGrant { id, ttl } => {
                if *ttl > limits::LEASE_TTL_MAX_SECONDS {
                    return Err(Error::LeaseTtlTooLarge);
                }
                if self.lease_exists(*id) {
                    return Err(Error::LeaseExists);
                }
                let rec = LeaseRecord {
                    ttl: *ttl,
                    remaining_ttl: 0,
                };
                let store = self.store;
                self.insert(&store.lease, id.to_be_bytes().to_vec(), encode(&rec)?);
                self.lease_grant = Some((*id, rec));
                Ok(WriteResponse::LeaseGrant {
                    id: *id,
                    ttl: *ttl,
                    revision: self.begin,
                })
            }
            WriteRequest::LeaseRevoke { id } => {
                let keys = {
                    let state = lock(&self.store.state);
                    let lease = state.lessor.get(*id).ok_or(Error::LeaseNotFound)?;
                    lease.keys.iter().cloned().collect::<Vec<_>>()
                };
                self.delete_keys(&keys, false)?;
                let store = self.store;
                self.remove(&store.lease, id.to_be_bytes().to_vec());
                self.lease_remove = Some(*id);
                Ok(WriteResponse::Lease {
                    revision: self.read_revision(),
                })
            }
            WriteRequest::LeaseCheckpoint { id, remaining_ttl } => {
                let ttl = {
                    let state = lock(&self.store.state);
                    state.lessor.get(*id).map(|l| l.ttl)
                };
                if let Some(ttl) = ttl {
                    let rec = LeaseRecord {
                        ttl,
                        remaining_ttl: *remaining_ttl,
                    };
                    let store = self.store;
                    self.insert(&store.lease, id.to_be_bytes().to_vec(), encode(&rec)?);
                    self.lease_remaining = Some((*id, *remaining_ttl));
                }
                Ok(WriteResponse::Lease {
                    revision: self.begin,
                })
            }
            WriteRequest::Alarm { activate, alarm } => {
                let mut alarms = lock(&self.store.state).alarms.clone();
                if *activate {
                    alarms.insert(*alarm);
                } else {
                    alarms.remove(alarm);
                }
                let store = self.store;
                self.insert(&store.meta, META_ALARMS.to_vec(), encode(&alarms)?);
                self.alarms = Some(alarms.clone());
                Ok(WriteResponse::Alarm {
                    alarms: alarms.into_iter().collect(),
                    revision: self.begin,
                })
            }
        }
    }

    /// Writes `kv` over the key's live state `old` (None when it is created); `prev` is the
    /// event's `prev_kv`.
    fn write_kv(
        &mut self,
        kv: KeyValue,
        old: Option<LiveKey>,
        prev: Option<KeyValue>,
    ) -> Result<()> {
        let rev = Revision::new(self.begin + 1, self.sub);
        self.sub += 1;
        let store = self.store;
        let latest = encode(&kv)?;
        let history = live_history_record(&latest, old.map_or(0, |l| l.mod_revision))?;
        self.insert(&store.history, rev.to_bytes().to_vec(), history);
        self.insert(&store.latest, kv.key.clone(), latest);
        if store.is_waypoint(&kv) {
            let mark = keys::index_key(&kv.key, rev);
            self.insert(&store.sparse_index, mark, vec![MARK_WAYPOINT]);
        }
        let old_lease = old.map_or(0, |l| l.lease);
        if old_lease != kv.lease {
            if old_lease != 0 {
                self.remove(&store.lease_keys, lease_key(old_lease, &kv.key));
                self.lease_attach.push((old_lease, kv.key.clone(), false));
            }
            if kv.lease != 0 {
                self.insert(&store.lease_keys, lease_key(kv.lease, &kv.key), Vec::new());
                self.lease_attach.push((kv.lease, kv.key.clone(), true));
            }
        }
        self.set_latest(kv.key.clone(), Some(kv.clone()));
        self.events.push(Event {
            kind: EventType::Put,
            kv,
            prev_kv: prev,
        });
        Ok(())
    }

    fn put(&mut self, p: &PutRequest) -> Result<PutResponse> {
        let live = self.live_key(&p.key)?;
        if (p.ignore_value || p.ignore_lease) && live.is_none() {
            return Err(Error::KeyNotFound);
        }
        // The previous value only when something needs it: most puts do not.
        let prev = match live {
            Some(_) if p.ignore_value || p.prev_kv || self.with_prev => Some(
                self.get_latest(&p.key)?
                    .ok_or_else(|| bad("live index: a live key without a latest value"))?,
            ),
            _ => None,
        };
        let value = match &prev {
            Some(prev) if p.ignore_value => prev.value.clone(),
            _ => p.value.clone(),
        };
        let lease = if p.ignore_lease {
            live.map_or(0, |l| l.lease)
        } else {
            p.lease
        };
        if lease != 0 && !self.lease_exists(lease) {
            return Err(Error::LeaseNotFound);
        }
        let rev = self.begin + 1;
        let kv = KeyValue {
            key: p.key.clone(),
            create_revision: live.map_or(rev, |l| l.create_revision),
            mod_revision: rev,
            version: live.map_or(0, |l| l.version) + 1,
            value,
            lease,
        };
        let prev_kv = if p.prev_kv { prev.clone() } else { None };
        self.write_kv(kv, live, prev)?;
        Ok(PutResponse {
            revision: rev,
            prev_kv,
        })
    }

    /// Deletes those of `keys` that are live; returns how many it deleted and, when
    /// `return_prev`, their values. A value is read only when it is returned or a watcher
    /// wants `prev_kv`, as for puts.
    fn delete_keys(&mut self, keys: &[Vec<u8>], return_prev: bool) -> Result<(i64, Vec<KeyValue>)> {
        let mut deleted = 0;
        let mut prevs = Vec::new();
        for key in keys {
            let Some(live) = self.live_key(key)? else {
                continue;
            };
            let prev = if return_prev || self.with_prev {
                Some(
                    self.get_latest(key)?
                        .ok_or_else(|| bad("live index: a live key without a latest value"))?,
                )
            } else {
                None
            };
            let rev = Revision::new(self.begin + 1, self.sub);
            self.sub += 1;
            let store = self.store;
            let tomb = KeyValue {
                key: key.clone(),
                mod_revision: rev.main,
                ..Default::default()
            };
            let rec = HistoryRecord {
                kv: tomb.clone(),
                tombstone: true,
                prev: live.mod_revision,
            };
            self.insert(&store.history, rev.to_bytes().to_vec(), encode(&rec)?);
            let mark = keys::index_key(key, rev);
            self.insert(&store.sparse_index, mark, vec![MARK_TOMBSTONE]);
            self.remove(&store.latest, key.clone());
            if live.lease != 0 {
                self.remove(&store.lease_keys, lease_key(live.lease, key));
                self.lease_attach.push((live.lease, key.clone(), false));
            }
            self.set_latest(key.clone(), None);
            if return_prev {
                prevs.extend(prev.clone());
            }
            self.events.push(Event {
                kind: EventType::Delete,
                kv: tomb,
                prev_kv: prev,
            });
            deleted += 1;
        }
        Ok((deleted, prevs))
    }

    /// The live keys in `range`; a single key is looked up in the live index, not scanned.
    fn live_keys_in(&self, range: &KeyRange) -> Result<Vec<Vec<u8>>> {
        let range_end = match &range.end {
            KeyEnd::Single => {
                let live = self.live_key(&range.start)?.is_some();
                return Ok(if live {
                    vec![range.start.clone()]
                } else {
                    Vec::new()
                });
            }
            KeyEnd::Unbounded => vec![0],
            KeyEnd::Before(e) => e.clone(),
        };
        let req = RangeRequest {
            key: range.start.clone(),
            range_end,
            keys_only: true,
            ..Default::default()
        };
        let resp = range_at(&self.view(), &req, self.begin, 0, &self.overlay)?;
        Ok(resp.kvs.into_iter().map(|kv| kv.key).collect())
    }

    fn delete_range(&mut self, d: &DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        let range = KeyRange::new(&d.key, &d.range_end);
        let keys = self.live_keys_in(&range)?;
        let (deleted, prev_kvs) = self.delete_keys(&keys, d.prev_kv)?;
        Ok(DeleteRangeResponse {
            revision: self.read_revision(),
            deleted,
            prev_kvs,
        })
    }

    fn range(&self, r: &RangeRequest) -> Result<RangeResponse> {
        let compacted = self.compacted()?;
        let mut resp = range_at(&self.view(), r, self.begin, compacted, &self.overlay)?;
        resp.revision = self.read_revision();
        Ok(resp)
    }

    /// Evaluates the compare tree against the pre-txn state, then runs the chosen branches.
    fn txn(&mut self, t: &TxnRequest) -> Result<TxnResponse> {
        let path = self.decide(t)?;
        let mut path = path.into_iter();
        self.exec_txn(t, &mut path)
    }

    /// Branch decisions for `t` and its nested txns, in execution order, against the pre-txn
    /// state (no write has happened yet when this runs).
    fn decide(&self, t: &TxnRequest) -> Result<Vec<bool>> {
        let mut ok = true;
        for c in &t.compare {
            if !self.compare(c)? {
                ok = false;
                break;
            }
        }
        let mut out = vec![ok];
        for op in if ok { &t.success } else { &t.failure } {
            if let RequestOp::Txn(nested) = op {
                out.extend(self.decide(nested)?);
            }
        }
        Ok(out)
    }

    fn compare(&self, c: &Compare) -> Result<bool> {
        if c.range_end.is_empty() && !matches!(c.target, CompareTarget::Value(_)) {
            // One key's revisions, version or lease (what optimistic-concurrency txns such as
            // Kubernetes' compare): the live index answers without reading the value.
            let kv = self
                .live_key(&c.key)?
                .map_or_else(KeyValue::default, |l| KeyValue {
                    create_revision: l.create_revision,
                    mod_revision: l.mod_revision,
                    version: l.version,
                    lease: l.lease,
                    ..KeyValue::default()
                });
            return Ok(compare_kv(c, &kv));
        }
        let range = KeyRange::new(&c.key, &c.range_end);
        // Earlier requests of the batch are visible; this txn has written nothing yet.
        let kvs = latest_with_overlay(&self.view(), &range, &self.overlay)?;
        if kvs.is_empty() {
            if matches!(c.target, CompareTarget::Value(_)) {
                return Ok(false);
            }
            return Ok(compare_kv(c, &KeyValue::default()));
        }
        Ok(kvs.iter().all(|kv| compare_kv(c, kv)))
    }

    fn exec_txn(
        &mut self,
        t: &TxnRequest,
        path: &mut impl Iterator<Item = bool>,
    ) -> Result<TxnResponse> {
        let succeeded = path.next().ok_or_else(|| bad("txn path"))?;
        let ops = if succeeded { &t.success } else { &t.failure };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            responses.push(match op {
                RequestOp::Range(r) => ResponseOp::Range(self.range(r)?),
                RequestOp::Put(p) => ResponseOp::Put(self.put(p)?),
                RequestOp::DeleteRange(d) => ResponseOp::DeleteRange(self.delete_range(d)?),
                RequestOp::Txn(n) => ResponseOp::Txn(self.exec_txn(n, path)?),
            });
        }
        Ok(TxnResponse {
            revision: 0,
            succeeded,
            responses,
        })
    }

    /// Commits every op and `meta` in one fjall batch and updates the in-memory state; returns
    /// each new revision's events and the revision to compact to, if a compaction was applied.
    fn commit(mut self, meta: &[(&[u8], &[u8])]) -> Result<Committed<'a>> {
        let store = self.store;
        // Sized up front: a batch holds thousands of items, and growing it copies them. Buffer
        // durability is what `Database::batch` sets (the raft log is the durable record).
        let mut batch = OwnedWriteBatch::with_capacity(store.db.clone(), self.ops.len() + 8)
            .durability(Some(PersistMode::Buffer));
        for (ks, key, value) in self.ops {
            match value {
                Some(v) => batch.insert(ks, key, v),
                None => batch.remove(ks, key),
            }
        }
        if self.begin > self.base {
            batch.insert(
                &store.meta,
                META_REVISION,
                self.begin.to_be_bytes().to_vec(),
            );
        }
        if let Some(c) = self.compact {
            batch.insert(&store.meta, META_COMPACT, c.to_be_bytes().to_vec());
        }
        for (k, v) in meta {
            batch.insert(&store.meta, *k, *v);
        }
        if let Some(id) = self.lease_remove {
            for key in store.lease_keys(id) {
                batch.remove(&store.lease_keys, lease_key(id, &key));
            }
        }
        batch.commit()?;
        for (key, kv) in self.overlay {
            self.index.set(key, kv.as_ref());
        }
        let mut state = lock(&store.state);
        if let Some((id, rec)) = self.lease_grant {
            state.lessor.insert(id, rec, self.now_ms);
        }
        for (id, key, attach) in &self.lease_attach {
            if *attach {
                state.lessor.attach(*id, key);
            } else {
                state.lessor.detach(*id, key);
            }
        }
        if let Some(id) = self.lease_remove {
            state.lessor.remove(id);
        }
        if let Some((id, remaining)) = self.lease_remaining {
            state.lessor.set_remaining(id, remaining);
        }
        if let Some(alarms) = self.alarms {
            state.alarms = alarms;
        }
        Ok(Committed {
            revisions: self.revisions,
            with_prev: self.with_prev,
            _writer: self.index,
        })
    }
}

fn txn_has_put(t: &TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).any(|op| match op {
        RequestOp::Put(_) => true,
        RequestOp::Txn(n) => txn_has_put(n),
        _ => false,
    })
}

/// The txn response revision is the read revision after the whole txn; nested txn responses
/// carry the same.
fn fix_txn_revisions(resp: &mut TxnResponse, rev: i64) {
    resp.revision = rev;
    for r in &mut resp.responses {
        if let ResponseOp::Txn(n) = r {
            fix_txn_revisions(n, rev);
        }
    }
}

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    use std::cmp::Ordering;
    let ord = match &c.target {
        CompareTarget::Version(v) => kv.version.cmp(v),
        CompareTarget::Create(v) => kv.create_revision.cmp(v),
        CompareTarget::Mod(v) => kv.mod_revision.cmp(v),
        CompareTarget::Lease(v) => kv.lease.cmp(v),
        CompareTarget::Value(v) => kv.value.as_slice().cmp(v.as_slice()),
    };
    match c.result {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
    }
}

/// Checks a txn before it is proposed: op counts, empty keys, empty ops and the duplicate-key
/// rule (etcd `checkTxnReqsPermission`/`checkRequestPut` semantics).
///
/// # Errors
/// `TooManyTxnOps`, `EmptyKey`, `DuplicateKey`.
pub fn validate_txn(t: &TxnRequest, txn_ops_max: usize) -> Result<()> {
    if t.compare.len().max(t.success.len()).max(t.failure.len()) > txn_ops_max {
        return Err(Error::TooManyTxnOps);
    }
    for c in &t.compare {
        if c.key.is_empty() {
            return Err(Error::EmptyKey);
        }
    }
    for branch in [&t.success, &t.failure] {
        for op in branch {
            match op {
                RequestOp::Range(r) if r.key.is_empty() => return Err(Error::EmptyKey),
                RequestOp::Put(p) => validate_put(p)?,
                RequestOp::DeleteRange(d) if d.key.is_empty() => return Err(Error::EmptyKey),
                RequestOp::Txn(n) => validate_txn(n, txn_ops_max)?,
                _ => {}
            }
        }
        let mut puts = BTreeSet::new();
        let mut deletes = Vec::new();
        collect_writes(branch, &mut puts, &mut deletes)?;
        for range in &deletes {
            if puts.iter().any(|k| range.contains(k)) {
                return Err(Error::DuplicateKey);
            }
        }
    }
    Ok(())
}

/// Checks a put's own fields.
///
/// # Errors
/// `EmptyKey`, `ValueProvided`, `LeaseProvided`.
pub fn validate_put(p: &PutRequest) -> Result<()> {
    if p.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if p.ignore_value && !p.value.is_empty() {
        return Err(Error::ValueProvided);
    }
    if p.ignore_lease && p.lease != 0 {
        return Err(Error::LeaseProvided);
    }
    Ok(())
}

/// Puts and deletes of one branch, where a nested txn's two branches may each put the same key
/// (they are exclusive) but not a key the outer branch writes.
fn collect_writes(
    ops: &[RequestOp],
    puts: &mut BTreeSet<Vec<u8>>,
    deletes: &mut Vec<KeyRange>,
) -> Result<()> {
    for op in ops {
        match op {
            RequestOp::Put(p) => {
                if !puts.insert(p.key.clone()) {
                    return Err(Error::DuplicateKey);
                }
            }
            RequestOp::DeleteRange(d) => deletes.push(KeyRange::new(&d.key, &d.range_end)),
            RequestOp::Txn(n) => {
                let mut union = BTreeSet::new();
                for branch in [&n.success, &n.failure] {
                    let mut p = BTreeSet::new();
                    collect_writes(branch, &mut p, deletes)?;
                    if p.iter().any(|k| puts.contains(k)) {
                        return Err(Error::DuplicateKey);
                    }
                    union.extend(p);
                }
                puts.extend(union);
            }
            RequestOp::Range(_) => {}
        }
    }
    Ok(())
}

impl KvStore {
    /// Rewrites every keyspace's tables (fjall major compaction), returning the space of
    /// deleted history to the file system.
    ///
    /// # Errors
    /// `Storage` on failure.
    pub fn defragment(&self) -> Result<()> {
        // The history a compaction still has to sweep would survive the rewrite.
        self.finish_compaction()?;
        self.reclaim(&self.keyspaces())
    }

    /// Returns the space of history removed by compaction to the file system by rewriting every
    /// keyspace (a compaction leaves tombstones that the LSM would otherwise merge away only
    /// gradually, and fjall drops obsolete table files once every keyspace has moved on). Safe to
    /// run beside reads and writes.
    ///
    /// Amortized: it rewrites only once the history entries removed since the last rewrite
    /// outnumber the live keys (and `RECLAIM_ENTRIES_MIN`), so frequent small compactions do not
    /// rewrite the live data each time. Returns whether it rewrote.
    ///
    /// # Errors
    /// `Storage` on failure.
    pub fn reclaim_compacted(&self) -> Result<bool> {
        let pending = self
            .removed_since_reclaim
            .load(std::sync::atomic::Ordering::Relaxed);
        // Exact count: one pass over the live keys, far cheaper than the rewrite it decides on.
        let live = self.latest.len()? as u64;
        if pending < live.max(limits::RECLAIM_ENTRIES_MIN) {
            return Ok(false);
        }
        self.reclaim(&self.keyspaces())?;
        self.removed_since_reclaim
            .fetch_sub(pending, std::sync::atomic::Ordering::Relaxed);
        Ok(true)
    }

    /// Waits, for at most `limits::RECLAIM_COMPACTION_WAIT_MS_MAX`, until fjall runs no
    /// background compaction (a loaded store may always have one running).
    fn wait_for_background_compactions(&self) {
        let started = std::time::Instant::now();
        while self.db.active_compactions() > 0
            && started.elapsed().as_millis() < limits::RECLAIM_COMPACTION_WAIT_MS_MAX
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    fn reclaim(&self, keyspaces: &[&Keyspace]) -> Result<()> {
        for ks in keyspaces {
            // Tombstones still in the memtable would survive a compaction of the tables alone.
            ks.rotate_memtable_and_wait()?;
            // A background compaction (the flush above may start one) keeps its tables out of
            // a major compaction, and those keep the removed history: wait for background
            // compactions to end, rewrite, and again until one table is left.
            for _ in 0..limits::RECLAIM_REWRITES_MAX {
                self.wait_for_background_compactions();
                ks.major_compact()?;
                if ks.table_count() <= 1 {
                    break;
                }
            }
        }
        // fjall deletes the table files a rewrite replaced only once a later memtable rotation
        // moves its garbage collection watermark past the rewrite. Writes bring one about
        // eventually; an idle store would keep the old files (several times the live data) on
        // disk until then. A rotation needs something in the memtable: the revision reclaimed.
        self.meta
            .insert(META_RECLAIMED, self.current_revision()?.to_be_bytes())?;
        self.meta.rotate_memtable_and_wait()?;
        Ok(())
    }
}

impl KvStore {
    /// Calls `f` for every change in history, in revision order: `(revision, key-value,
    /// tombstone)`. Reads `kv_history` directly (not the watch path), for offline checks.
    ///
    /// # Errors
    /// `Storage` on read failure.
    pub fn for_each_history(&self, mut f: impl FnMut(Revision, &KeyValue, bool)) -> Result<()> {
        for item in self.history.iter() {
            let (k, v) = item.into_inner()?;
            let rev = Revision::from_bytes(&k).ok_or_else(|| bad("history key"))?;
            let rec: HistoryRecord = decode(&v)?;
            f(rev, &rec.kv, rec.tombstone);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shortcut builds exactly what encoding the record would, so history written either
    /// way reads back the same.
    #[test]
    fn live_history_record_is_the_encoded_record() {
        let kv = KeyValue {
            key: b"k".to_vec(),
            create_revision: 3,
            mod_revision: 9,
            version: 2,
            value: vec![7; 200],
            lease: 5,
        };
        for prev in [0, 8, i64::MAX] {
            let record = HistoryRecord {
                kv: kv.clone(),
                tombstone: false,
                prev,
            };
            let built = live_history_record(&encode(&kv).expect("encode"), prev).expect("build");
            assert_eq!(built, encode(&record).expect("encode"));
            assert_eq!(decode::<HistoryRecord>(&built).expect("decode"), record);
            let key = decode::<HistoryKey<'_>>(&built)
                .expect("decode the key")
                .key;
            assert_eq!(key, b"k");
        }
    }

    /// The live index reads the fields it keeps straight from an encoded value.
    #[test]
    fn key_value_head_reads_the_encoded_fields() {
        let kv = KeyValue {
            key: b"key".to_vec(),
            create_revision: 3,
            mod_revision: 9,
            version: 2,
            value: vec![7; 300],
            lease: -5,
        };
        let encoded = encode(&kv).expect("encode");
        assert_eq!(KeyValueHead::live_of(&encoded), Ok(LiveKey::of(&kv)));
    }
}
