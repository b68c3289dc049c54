//! The watch hub: which watchers exist, which are synced, and delivery of committed revisions.
//!
//! ```text
//!   apply(rev N) ──commit──► notify(N, events) ──► synced watcher in range? ──► sink.offer()
//!                                                        │ offer refused (slow consumer)
//!                                                        ▼
//!                                            unsynced, next_rev = N ──► owner replays history
//!                                            (KvStore::watch_events) then try_sync()
//! ```
//!
//! A watcher is *synced* when every committed revision before its `next_rev` has been handed to
//! its sink; the hub then offers it each new revision. An *unsynced* watcher is behind: its owner
//! reads history from `next_rev` and calls [`WatchHub::try_sync`], which succeeds only once the
//! owner has read past the last revision the hub notified, so no revision is skipped or repeated.
//! A sink that refuses an offer makes its watcher unsynced instead of dropping events: slow
//! consumers are delayed, never lossy, and memory stays bounded by the sink's own queue.
//!
//! Put events carry the previous value only while some watcher asks for `prev_kv`
//! ([`WatchHub::wants_prev_kv`]; the writer reads it then). A `prev_kv` watcher offered a
//! revision written without it is made unsynced the same way, and history gives it the values.

use std::collections::HashMap;
use std::sync::Arc;

use crate::keys::KeyRange;
use crate::types::Event;

/// Identifies a watcher inside one hub (not the client's per-stream `watch_id`).
pub type WatcherId = u64;

/// Where a synced watcher's events go.
pub trait WatchSink: Send + Sync {
    /// Offers one revision's events for watcher `id`; `false` means "full, not taken".
    fn offer(&self, id: WatcherId, revision: i64, events: Vec<Event>) -> bool;

    /// Watcher `id` was made unsynced without an offer: its owner must replay history.
    fn resync(&self, id: WatcherId);
}

struct Watcher {
    range: KeyRange,
    /// Wants each put's previous value.
    prev_kv: bool,
    next_rev: i64,
    synced: bool,
    sink: Arc<dyn WatchSink>,
}

/// Result of [`WatchHub::try_sync`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    /// The watcher now receives new revisions from the hub.
    Synced,
    /// History up to this revision must be read first.
    Behind(i64),
    /// No such watcher (cancelled).
    Gone,
}

/// Registry of watchers (see the module docs).
pub struct WatchHub {
    watchers: HashMap<WatcherId, Watcher>,
    /// Watchers with `prev_kv`.
    prev_kv_watchers: usize,
    last_notified: i64,
    next_id: WatcherId,
}

impl WatchHub {
    pub(crate) fn new(current_revision: i64) -> Self {
        Self {
            watchers: HashMap::new(),
            prev_kv_watchers: 0,
            last_notified: current_revision,
            next_id: 1,
        }
    }

    /// The newest revision handed to synced watchers.
    pub fn last_notified(&self) -> i64 {
        self.last_notified
    }

    /// Whether put events must carry the previous value: some watcher asks for `prev_kv`.
    pub fn wants_prev_kv(&self) -> bool {
        self.prev_kv_watchers > 0
    }

    /// Adds a watcher. `start_revision` 0 means "from the next revision"; `prev_kv` asks for
    /// each put's previous value. Returns its id and its first revision to deliver; the watcher
    /// is synced iff that revision is in the future.
    pub fn register(
        &mut self,
        range: KeyRange,
        start_revision: i64,
        prev_kv: bool,
        sink: Arc<dyn WatchSink>,
    ) -> (WatcherId, i64) {
        let next_rev = if start_revision <= 0 {
            self.last_notified + 1
        } else {
            start_revision
        };
        let synced = next_rev > self.last_notified;
        let id = self.next_id;
        self.next_id += 1;
        self.prev_kv_watchers += usize::from(prev_kv);
        self.watchers.insert(
            id,
            Watcher {
                range,
                prev_kv,
                next_rev,
                synced,
                sink,
            },
        );
        (id, next_rev)
    }

    /// Removes a watcher; later notifications skip it.
    pub fn cancel(&mut self, id: WatcherId) -> bool {
        let Some(w) = self.watchers.remove(&id) else {
            return false;
        };
        self.prev_kv_watchers -= usize::from(w.prev_kv);
        true
    }

    /// Whether the watcher exists and is synced.
    pub fn is_synced(&self, id: WatcherId) -> bool {
        self.watchers.get(&id).is_some_and(|w| w.synced)
    }

    /// The next revision the watcher expects.
    pub fn next_revision(&self, id: WatcherId) -> Option<i64> {
        self.watchers.get(&id).map(|w| w.next_rev)
    }

    /// Records that the owner delivered history up to `next_rev - 1` and tries to sync.
    pub fn try_sync(&mut self, id: WatcherId, next_rev: i64) -> SyncState {
        let Some(w) = self.watchers.get_mut(&id) else {
            return SyncState::Gone;
        };
        w.next_rev = next_rev;
        if next_rev > self.last_notified {
            w.synced = true;
            SyncState::Synced
        } else {
            SyncState::Behind(self.last_notified)
        }
    }

    /// Moves the notified revision forward without events (after a snapshot install): every
    /// watcher becomes unsynced and catches up from history.
    pub(crate) fn jump_to(&mut self, revision: i64) {
        self.last_notified = revision.max(self.last_notified);
        for w in self.watchers.values_mut() {
            w.synced = false;
        }
    }

    /// Delivers one committed revision's events to every synced watcher whose range they touch.
    /// `with_prev`: events carry their previous values; when they do not, a `prev_kv`
    /// watcher they touch is made unsynced, to read them from history.
    pub(crate) fn notify(&mut self, revision: i64, events: &[Event], with_prev: bool) {
        assert!(
            revision > self.last_notified,
            "revisions notified out of order"
        );
        self.last_notified = revision;
        for (id, w) in &mut self.watchers {
            if !w.synced || w.next_rev > revision {
                continue;
            }
            let matching: Vec<Event> = events
                .iter()
                .filter(|e| w.range.contains(&e.kv.key))
                .cloned()
                .collect();
            if matching.is_empty() {
                continue;
            }
            if w.prev_kv && !with_prev {
                w.synced = false;
                w.next_rev = revision;
                w.sink.resync(*id);
                continue;
            }
            if w.sink.offer(*id, revision, matching) {
                w.next_rev = revision + 1;
            } else {
                w.synced = false;
                w.next_rev = revision;
            }
        }
    }

    /// Number of watchers registered.
    pub fn len(&self) -> usize {
        self.watchers.len()
    }

    /// Whether no watcher is registered.
    pub fn is_empty(&self) -> bool {
        self.watchers.is_empty()
    }
}
