//! An in-server watcher: waits for events on a key range, in revision order, with no gaps —
//! the same synced/unsynced handoff as client watch streams, for RPCs that block on changes
//! (Lock, Election). Dropping it cancels the hub registration.

use std::sync::Arc;
use std::time::Duration;

use keyhold_store::{self as st, KeyRange, SyncState, WatchSink, WatcherId};
use tokio::sync::{Notify, mpsc};
use tonic::Status;

use super::status::store_err;
use crate::node::Node;

/// Revisions queued for one waiter before it falls back to reading history.
const WAITER_QUEUE_MAX: usize = 64;
/// Re-check period for an unsynced waiter.
const WAITER_TICK: Duration = Duration::from_millis(100);

struct Sink {
    tx: mpsc::Sender<Vec<st::Event>>,
    wake: Arc<Notify>,
}

impl WatchSink for Sink {
    fn offer(&self, _id: WatcherId, _revision: i64, events: Vec<st::Event>) -> bool {
        let ok = self.tx.try_send(events).is_ok();
        if !ok {
            self.wake.notify_one();
        }
        ok
    }

    fn resync(&self, _id: WatcherId) {
        self.wake.notify_one();
    }
}

/// Waits for events in a range from a start revision.
pub struct Waiter {
    node: Arc<Node>,
    hub_id: WatcherId,
    range: KeyRange,
    rx: mpsc::Receiver<Vec<st::Event>>,
    wake: Arc<Notify>,
}

impl Waiter {
    /// Starts waiting for events in `range` with revision `>= start_revision`.
    pub fn new(node: Arc<Node>, range: KeyRange, start_revision: i64) -> Self {
        let (tx, rx) = mpsc::channel(WAITER_QUEUE_MAX);
        let wake = Arc::new(Notify::new());
        let sink: Arc<dyn WatchSink> = Arc::new(Sink {
            tx,
            wake: wake.clone(),
        });
        let (hub_id, _) =
            node.store
                .hub()
                .register(range.clone(), start_revision.max(1), false, sink);
        Self {
            node,
            hub_id,
            range,
            rx,
            wake,
        }
    }

    /// The next non-empty batch of events, in revision order.
    ///
    /// # Errors
    /// A compacted start revision, or a storage failure.
    pub async fn next(&mut self) -> Result<Vec<st::Event>, Status> {
        loop {
            // Queued batches are older than anything history would give: take them first.
            if let Ok(events) = self.rx.try_recv() {
                return Ok(events);
            }
            if let Some(events) = self.catch_up()? {
                return Ok(events);
            }
            tokio::select! {
                Some(events) = self.rx.recv() => return Ok(events),
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(WAITER_TICK) => {}
            }
        }
    }

    /// Reads history while unsynced; `Some` when it found events.
    fn catch_up(&mut self) -> Result<Option<Vec<st::Event>>, Status> {
        let (next, last) = {
            let mut hub = self.node.store.hub();
            if hub.is_synced(self.hub_id) {
                return Ok(None);
            }
            let Some(next) = hub.next_revision(self.hub_id) else {
                return Ok(None);
            };
            let last = hub.last_notified();
            if next > last && hub.try_sync(self.hub_id, next) == SyncState::Synced {
                return Ok(None);
            }
            (next, last)
        };
        let (events, next_rev) = self
            .node
            .blocking(|s| s.watch_events(&self.range, next, last, false))
            .map_err(store_err)?;
        self.node.store.hub().try_sync(self.hub_id, next_rev);
        Ok((!events.is_empty()).then_some(events))
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.node.store.hub().cancel(self.hub_id);
    }
}
