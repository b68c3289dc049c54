//! The Watch service: one task per client stream multiplexes that stream's watchers.
//!
//! ```text
//!  client ──requests──► stream task ──register──► WatchHub (store)
//!                           ▲   │                   │ notify(rev) for synced watchers
//!                           │   └─catch-up (history)│
//!                           └──── deliveries queue ◄┘ (bounded; a full queue makes the watcher
//!                                                      unsynced: it catches up from history)
//! ```
//!
//! Ordering rules: a watcher's `created` response is sent before any of its events (the task
//! sends it before it reads the queue again); queued deliveries are drained before a catch-up
//! reads history, so a watcher's events go out in revision order; progress responses go through
//! the same queue as events, enqueued under the hub lock, so they never overtake an event.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use keyhold_proto::etcdserverpb as pb;
use keyhold_proto::etcdserverpb::watch_server::Watch;
use keyhold_store::{self as st, KeyRange, SyncState, WatchSink, WatcherId};
use prost::Message;
use tokio::sync::{Notify, mpsc};
use tokio_stream::StreamExt;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert::event_to_pb;
use super::status::cancel_reason;
use super::{current_header, header};
use crate::node::Node;

/// Deliveries queued per stream between the hub and the stream task.
const DELIVERY_QUEUE_MAX: usize = 128;
/// Responses queued per stream towards the client.
const OUT_QUEUE_MAX: usize = 16;
/// How often a stream re-checks for unsynced watchers (etcd's sync loop runs every 100 ms).
const CATCH_UP_TICK: Duration = Duration::from_millis(100);
/// Watchers one stream may hold.
const WATCHERS_PER_STREAM_MAX: usize = 100_000;
/// Extra room above `--max-request-bytes` before a response is fragmented (as etcd).
const FRAGMENT_OVERHEAD_BYTES: usize = 512 * 1024;

/// Watch service.
pub struct WatchService {
    pub(crate) node: Arc<Node>,
}

enum Delivery {
    Events {
        watcher: WatcherId,
        revision: i64,
        events: Vec<st::Event>,
    },
    Progress {
        watch_id: i64,
        revision: i64,
    },
}

struct StreamSink {
    tx: mpsc::Sender<Delivery>,
    wake: Arc<Notify>,
}

impl WatchSink for StreamSink {
    fn offer(&self, watcher: WatcherId, revision: i64, events: Vec<st::Event>) -> bool {
        match self.tx.try_send(Delivery::Events {
            watcher,
            revision,
            events,
        }) {
            Ok(()) => true,
            Err(_) => {
                self.wake.notify_one();
                false
            }
        }
    }
    fn resync(&self, _watcher: WatcherId) {
        self.wake.notify_one();
    }
}

struct Watcher {
    hub_id: WatcherId,
    range: KeyRange,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    fragment: bool,
    /// An event went out since the last progress tick.
    sent_since_tick: bool,
}

struct StreamTask {
    node: Arc<Node>,
    out: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    sink: Arc<StreamSink>,
    rx: mpsc::Receiver<Delivery>,
    watchers: BTreeMap<i64, Watcher>,
    by_hub: HashMap<WatcherId, i64>,
    next_auto_id: i64,
}

/// The client went away; the task ends.
struct Closed;

type Sent = Result<(), Closed>;

#[tonic::async_trait]
impl Watch for WatchService {
    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<BoxStream<pb::WatchResponse>>, Status> {
        let input = req.into_inner();
        let (out, out_rx) = mpsc::channel(OUT_QUEUE_MAX);
        let (tx, rx) = mpsc::channel(DELIVERY_QUEUE_MAX);
        let wake = Arc::new(Notify::new());
        let task = StreamTask {
            node: self.node.clone(),
            out,
            sink: Arc::new(StreamSink {
                tx,
                wake: wake.clone(),
            }),
            rx,
            watchers: BTreeMap::new(),
            by_hub: HashMap::new(),
            next_auto_id: 0,
        };
        tokio::spawn(task.run(input, wake));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out_rx),
        )))
    }
}

impl StreamTask {
    async fn run(mut self, mut input: Streaming<pb::WatchRequest>, wake: Arc<Notify>) {
        let stopped = crate::node::stopped(self.node.shutdown.clone());
        tokio::pin!(stopped);
        let mut catch_up = tokio::time::interval(CATCH_UP_TICK);
        let mut progress = tokio::time::interval(self.node.config.progress_notify_interval);
        progress.reset();
        let mut input_open = true;
        loop {
            let step = tokio::select! {
                biased;
                _ = &mut stopped => Err(Closed),
                _ = self.out.closed() => Err(Closed),
                msg = input.next(), if input_open => match msg {
                    Some(Ok(req)) => self.handle(req).await,
                    // A half-closed request stream keeps its watchers (etcd#18230).
                    None => { input_open = false; Ok(()) }
                    Some(Err(_)) => Err(Closed),
                },
                Some(d) = self.rx.recv() => self.deliver(d).await,
                _ = wake.notified() => self.catch_up_all().await,
                _ = catch_up.tick() => self.catch_up_all().await,
                _ = progress.tick() => { self.progress_tick(); Ok(()) }
            };
            if step.is_err() {
                break;
            }
        }
        let mut hub = self.node.store.hub();
        for w in self.watchers.values() {
            hub.cancel(w.hub_id);
        }
    }

    async fn send(&self, resp: pb::WatchResponse) -> Sent {
        self.out.send(Ok(resp)).await.map_err(|_| Closed)
    }

    async fn create_failed(&self, reason: String) -> Sent {
        self.send(pb::WatchResponse {
            header: current_header(&self.node),
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: reason,
            ..Default::default()
        })
        .await
    }

    async fn handle(&mut self, req: pb::WatchRequest) -> Sent {
        use pb::watch_request::RequestUnion;
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(RequestUnion::CancelRequest(c)) => {
                let Some(w) = self.watchers.remove(&c.watch_id) else {
                    return Ok(());
                };
                self.node.store.hub().cancel(w.hub_id);
                self.by_hub.remove(&w.hub_id);
                self.send(pb::WatchResponse {
                    header: current_header(&self.node),
                    watch_id: c.watch_id,
                    canceled: true,
                    ..Default::default()
                })
                .await
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                let hub = self.node.store.hub();
                if self.watchers.values().all(|w| hub.is_synced(w.hub_id)) {
                    let revision = hub.last_notified();
                    // Queued behind every event already delivered; dropped (as etcd does when a
                    // watcher is unsynced) if the queue is full.
                    let _ = self.sink.tx.try_send(Delivery::Progress {
                        watch_id: -1,
                        revision,
                    });
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    async fn create(&mut self, c: pb::WatchCreateRequest) -> Sent {
        use pb::watch_create_request::FilterType;
        let key = if c.key.is_empty() { vec![0] } else { c.key };
        let range = KeyRange::new(&key, &c.range_end);
        if c.start_revision < 0 {
            return self
                .create_failed(cancel_reason(&st::Error::Compacted))
                .await;
        }
        if range.is_empty() {
            return self
                .create_failed("mvcc: watcher range is empty".into())
                .await;
        }
        if self.watchers.len() >= WATCHERS_PER_STREAM_MAX {
            return self
                .create_failed("etcdserver: too many requests".into())
                .await;
        }
        let watch_id = if c.watch_id != 0 {
            if self.watchers.contains_key(&c.watch_id) {
                return self
                    .create_failed("mvcc: duplicate watch ID provided on the WatchStream".into())
                    .await;
            }
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_auto_id) {
                self.next_auto_id += 1;
            }
            self.next_auto_id
        };
        let sink: Arc<dyn WatchSink> = self.sink.clone();
        let (hub_id, revision) = {
            let mut hub = self.node.store.hub();
            let (id, _) = hub.register(range.clone(), c.start_revision, c.prev_kv, sink);
            (id, hub.last_notified())
        };
        let filters = |f: FilterType| c.filters.contains(&(f as i32));
        self.watchers.insert(
            watch_id,
            Watcher {
                hub_id,
                range,
                prev_kv: c.prev_kv,
                no_put: filters(FilterType::Noput),
                no_delete: filters(FilterType::Nodelete),
                progress_notify: c.progress_notify,
                fragment: c.fragment,
                sent_since_tick: false,
            },
        );
        self.by_hub.insert(hub_id, watch_id);
        self.send(pb::WatchResponse {
            header: header(&self.node, revision),
            watch_id,
            created: true,
            ..Default::default()
        })
        .await?;
        self.catch_up(watch_id).await
    }

    async fn deliver(&mut self, d: Delivery) -> Sent {
        match d {
            Delivery::Events {
                watcher,
                revision,
                events,
            } => {
                let Some(&watch_id) = self.by_hub.get(&watcher) else {
                    return Ok(());
                };
                self.send_events(watch_id, revision, events).await
            }
            Delivery::Progress { watch_id, revision } => {
                if watch_id != -1 && !self.watchers.contains_key(&watch_id) {
                    return Ok(());
                }
                self.send(pb::WatchResponse {
                    header: header(&self.node, revision),
                    watch_id,
                    ..Default::default()
                })
                .await
            }
        }
    }

    async fn send_events(&mut self, watch_id: i64, revision: i64, events: Vec<st::Event>) -> Sent {
        let Some(w) = self.watchers.get_mut(&watch_id) else {
            return Ok(());
        };
        let events: Vec<_> = events
            .into_iter()
            .filter(|e| match e.kind {
                st::EventType::Put => !w.no_put,
                st::EventType::Delete => !w.no_delete,
            })
            .map(|e| event_to_pb(e, w.prev_kv))
            .collect();
        if events.is_empty() {
            return Ok(());
        }
        w.sent_since_tick = true;
        if crate::failpoints::enabled("drop-watch-event") {
            static SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            if SENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 19 {
                return Ok(());
            }
        }
        let fragment = w.fragment;
        let resp = pb::WatchResponse {
            header: header(&self.node, revision),
            watch_id,
            events,
            ..Default::default()
        };
        let limit = self.node.config.max_request_bytes + FRAGMENT_OVERHEAD_BYTES;
        if !fragment || resp.events.len() < 2 || resp.encoded_len() < limit {
            return self.send(resp).await;
        }
        let mut chunk = Vec::new();
        let mut chunk_bytes = 0;
        let total = resp.events.len();
        for (i, e) in resp.events.into_iter().enumerate() {
            let size = e.encoded_len() + 8;
            if !chunk.is_empty() && chunk_bytes + size > limit {
                let part = pb::WatchResponse {
                    header: resp.header,
                    watch_id,
                    fragment: true,
                    events: std::mem::take(&mut chunk),
                    ..Default::default()
                };
                self.send(part).await?;
                chunk_bytes = 0;
            }
            chunk_bytes += size;
            chunk.push(e);
            if i + 1 == total {
                let last = pb::WatchResponse {
                    header: resp.header,
                    watch_id,
                    events: std::mem::take(&mut chunk),
                    ..Default::default()
                };
                self.send(last).await?;
            }
        }
        Ok(())
    }

    /// Drains queued deliveries (they are older than anything history would give), then
    /// brings every unsynced watcher up to date.
    async fn catch_up_all(&mut self) -> Sent {
        while let Ok(d) = self.rx.try_recv() {
            self.deliver(d).await?;
        }
        let behind: Vec<i64> = {
            let hub = self.node.store.hub();
            self.watchers
                .iter()
                .filter(|(_, w)| !hub.is_synced(w.hub_id))
                .map(|(id, _)| *id)
                .collect()
        };
        for watch_id in behind {
            self.catch_up(watch_id).await?;
        }
        Ok(())
    }

    /// Replays history for one unsynced watcher until the hub accepts it as synced.
    async fn catch_up(&mut self, watch_id: i64) -> Sent {
        loop {
            let Some(w) = self.watchers.get(&watch_id) else {
                return Ok(());
            };
            let (hub_id, range, prev_kv) = (w.hub_id, w.range.clone(), w.prev_kv);
            let (next, last) = {
                let mut hub = self.node.store.hub();
                let Some(next) = hub.next_revision(hub_id) else {
                    return Ok(());
                };
                if hub.is_synced(hub_id) {
                    return Ok(());
                }
                let last = hub.last_notified();
                if next > last && hub.try_sync(hub_id, next) == SyncState::Synced {
                    return Ok(());
                }
                (next, last)
            };
            match self
                .node
                .blocking(|s| s.watch_events(&range, next, last, prev_kv))
            {
                Err(st::Error::Compacted) => {
                    let compact_revision = self.node.store.compact_revision().unwrap_or(0);
                    self.node.store.hub().cancel(hub_id);
                    self.watchers.remove(&watch_id);
                    self.by_hub.remove(&hub_id);
                    return self
                        .send(pb::WatchResponse {
                            header: current_header(&self.node),
                            watch_id,
                            canceled: true,
                            compact_revision,
                            ..Default::default()
                        })
                        .await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "reading watch history");
                    return Err(Closed);
                }
                Ok((events, next_rev)) => {
                    if !events.is_empty() {
                        self.send_events(watch_id, last, events).await?;
                    }
                    if self.node.store.hub().try_sync(hub_id, next_rev) == SyncState::Synced {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Progress notifications for watchers that asked, were synced and got no event lately.
    fn progress_tick(&mut self) {
        let hub = self.node.store.hub();
        let revision = hub.last_notified();
        for (watch_id, w) in &mut self.watchers {
            if w.progress_notify && !w.sent_since_tick && hub.is_synced(w.hub_id) {
                let _ = self.sink.tx.try_send(Delivery::Progress {
                    watch_id: *watch_id,
                    revision,
                });
            }
            w.sent_since_tick = false;
        }
    }
}
