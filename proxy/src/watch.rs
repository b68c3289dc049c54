//! Watch coalescing: every client watcher of the same key range (and the same caller
//! identity) shares one upstream watch.
//!
//! ```text
//!  client stream ─create─► StreamTask ─subscribe─► WatchHub ─► Group (one upstream watch,
//!        ▲                    ▲                                  prev_kv + progress_notify)
//!        │                    └──── (watcher slot, Feed) ◄────────┘  fan-out into each
//!        └──── responses ◄────┘  filters, prev_kv, fragments        stream's bounded queue
//!                                (a watcher from an older start revision first replays on
//!                                 its own upstream watch; its shared feed waits meanwhile)
//! ```
//!
//! A watcher is a few fields in its stream's task, not a task of its own: an idle watcher costs
//! about 600 bytes of resident memory (BENCHMARKS.md).
//!
//! A group knows `next_rev`, the first revision it has not delivered yet. A watcher joins at
//! `join = next_rev` (taken under the group lock, so it sees exactly the events from `join`);
//! a watcher that starts earlier first replays `[start, join)` on a watch of its own, then
//! drains the shared feed, so there is no gap and no duplicate. When the member under a group
//! fails, the group reopens its watch on another member from `next_rev`: clients see no second
//! `created`. A slow client fills its stream's bounded queue and back-pressures the group; no
//! event is dropped. Filters and `prev_kv` are applied per watcher; client `watch_id`s are
//! honoured; progress requests are answered per client stream from what every watcher of the
//! stream has already sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use keyhold_proto::etcdserverpb as pb;
use keyhold_proto::etcdserverpb::watch_client::WatchClient;
use keyhold_proto::mvccpb;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use crate::upstream::{Upstream, forward};

/// Feed items queued per client stream before a group waits for it (back-pressure).
const STREAM_FEED_QUEUE_MAX: usize = 256;
/// Shared-feed items held for one watcher while it catches up; a fuller hold makes the stream
/// wait for the catch-up to finish.
const CATCH_UP_HOLD_MAX: usize = 1024;
/// Responses queued towards one client stream.
const OUT_QUEUE_MAX: usize = 128;
/// Watchers one client stream may hold (as on a member).
const WATCHERS_PER_STREAM_MAX: usize = 100_000;
/// How long a create waits for its group's upstream watch to start.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a progress request waits for fresh progress from the members.
const PROGRESS_WAIT: Duration = Duration::from_secs(1);
/// Delay before a group reopens its upstream watch after a failure.
const RESUME_DELAY: Duration = Duration::from_millis(100);
/// Responses larger than this are split for watchers that asked for `fragment` (a member's
/// default: `--max-request-bytes` 1.5 MiB plus 512 KiB).
const FRAGMENT_BYTES: usize = 2 * 1024 * 1024;

/// What a group is keyed by: the caller (auth token, `hasleader`) and the exact range.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct GroupKey {
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    require_leader: bool,
    key: Vec<u8>,
    range_end: Vec<u8>,
}

/// What joining gives: the subscriber id, the join revision and the group's last header.
type Joined = (u64, i64, Option<pb::ResponseHeader>);

/// What a client stream's task receives from groups: a feed item for one of its watchers.
enum Delivery {
    Feed { slot: u64, feed: Arc<Feed> },
}

/// A finished catch-up: the watcher's slot and how far it got (`None`: the watcher ended).
/// Sent on an unbounded channel: at most one per watcher, and the catch-up must never wait
/// for the stream task (which may be waiting for it).
type CaughtUp = (u64, Option<i64>);

/// What a group hands its watchers.
#[derive(Clone)]
enum Feed {
    Events {
        header: Option<pb::ResponseHeader>,
        events: Arc<Vec<mvccpb::Event>>,
        epoch: u64,
    },
    /// Every event up to `header.revision` was delivered.
    Progress {
        header: Option<pb::ResponseHeader>,
        epoch: u64,
    },
    /// The upstream watch was cancelled (compaction, permissions): the watcher ends.
    Cancel {
        header: Option<pb::ResponseHeader>,
        reason: String,
        compact_revision: i64,
    },
    /// The client stream ends with this status (`hasleader` and the leader is gone).
    End(Status),
}

struct Subscriber {
    stream: mpsc::Sender<Delivery>,
    slot: u64,
}

#[derive(Default)]
struct GroupState {
    /// First revision not delivered yet (`None` until the upstream watch is created).
    next_rev: Option<i64>,
    last_header: Option<pb::ResponseHeader>,
    subscribers: HashMap<u64, Subscriber>,
    next_sub: u64,
    closed: bool,
    /// Upstream responses processed (progress requests wait for it to move).
    epoch: u64,
    /// Why the upstream watch ended for good (given to watchers that try to join after).
    failure: Option<Feed>,
}

struct Group {
    key: GroupKey,
    state: Mutex<GroupState>,
    started: watch::Sender<bool>,
    /// Asks the upstream watch for a progress notification.
    progress: mpsc::Sender<()>,
    closing: tokio::sync::Notify,
}

impl Group {
    fn state(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// All groups of the proxy.
pub struct WatchHub {
    upstream: Arc<Upstream>,
    groups: Mutex<HashMap<GroupKey, Arc<Group>>>,
    watchers: AtomicI64,
}

impl WatchHub {
    /// An empty hub over `upstream`.
    pub fn new(upstream: Arc<Upstream>) -> Arc<Self> {
        Arc::new(Self {
            upstream,
            groups: Mutex::default(),
            watchers: AtomicI64::new(0),
        })
    }

    fn groups(&self) -> MutexGuard<'_, HashMap<GroupKey, Arc<Group>>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The group for `key`, started if new.
    fn group(self: &Arc<Self>, key: GroupKey) -> Arc<Group> {
        let mut groups = self.groups();
        if let Some(g) = groups.get(&key) {
            return g.clone();
        }
        let (progress_tx, progress_rx) = mpsc::channel(1);
        let group = Arc::new(Group {
            key: key.clone(),
            state: Mutex::default(),
            started: watch::channel(false).0,
            progress: progress_tx,
            closing: tokio::sync::Notify::new(),
        });
        groups.insert(key, group.clone());
        metrics::gauge!("keyhold_proxy_upstream_watches").set(groups.len() as f64);
        tokio::spawn(run_group(self.clone(), group.clone(), progress_rx));
        group
    }

    /// Joins `group`: the subscriber id, the join revision, the last header and the feed; or
    /// `Err(Some(why))` when the group's upstream watch was refused, `Err(None)` when the group
    /// closed meanwhile (join a new one).
    fn join(
        &self,
        group: &Group,
        stream: &mpsc::Sender<Delivery>,
        slot: u64,
    ) -> Result<Joined, Option<Feed>> {
        let _groups = self.groups();
        let mut st = group.state();
        if st.closed {
            return Err(st.failure.clone());
        }
        let join = st.next_rev.ok_or(None)?;
        let id = st.next_sub;
        st.next_sub += 1;
        st.subscribers.insert(
            id,
            Subscriber {
                stream: stream.clone(),
                slot,
            },
        );
        self.watchers.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("keyhold_proxy_watchers").increment(1.0);
        Ok((id, join, st.last_header))
    }

    /// Leaves `group`; the last one out closes its upstream watch.
    fn leave(&self, group: &Group, sub: Option<u64>) {
        let mut groups = self.groups();
        let mut st = group.state();
        if let Some(id) = sub
            && st.subscribers.remove(&id).is_some()
        {
            self.watchers.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!("keyhold_proxy_watchers").decrement(1.0);
        }
        if st.subscribers.is_empty() && !st.closed {
            st.closed = true;
            if groups
                .get(&group.key)
                .is_some_and(|g| std::ptr::eq(&**g, group))
            {
                groups.remove(&group.key);
            }
            metrics::gauge!("keyhold_proxy_upstream_watches").set(groups.len() as f64);
            group.closing.notify_one();
        }
    }

    /// Removes a group whose upstream watch ended for good; its watchers get `last`.
    fn end_group(&self, group: &Group, last: Feed) -> Vec<(mpsc::Sender<Delivery>, u64)> {
        let mut groups = self.groups();
        let mut st = group.state();
        st.closed = true;
        st.failure = Some(last);
        if groups
            .get(&group.key)
            .is_some_and(|g| std::ptr::eq(&**g, group))
        {
            groups.remove(&group.key);
        }
        metrics::gauge!("keyhold_proxy_upstream_watches").set(groups.len() as f64);
        let n = st.subscribers.len() as i64;
        self.watchers.fetch_sub(n, Ordering::Relaxed);
        metrics::gauge!("keyhold_proxy_watchers").decrement(n as f64);
        st.subscribers
            .drain()
            .map(|(_, s)| (s.stream, s.slot))
            .collect()
    }

    /// Upstream watches open (groups) and client watchers, for `/metrics` and tests.
    pub fn counts(&self) -> (usize, i64) {
        (self.groups().len(), self.watchers.load(Ordering::Relaxed))
    }
}

fn create_request(key: &GroupKey, start_revision: i64) -> pb::WatchRequest {
    pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: key.key.clone(),
                range_end: key.range_end.clone(),
                start_revision,
                prev_kv: true,
                progress_notify: true,
                ..Default::default()
            },
        )),
    }
}

fn upstream_request<T>(key: &GroupKey, message: T) -> Request<T> {
    let mut meta = tonic::metadata::MetadataMap::new();
    if let Some(t) = &key.token {
        meta.insert("token", t.clone());
    }
    if key.require_leader {
        meta.insert(
            "hasleader",
            tonic::metadata::MetadataValue::from_static("true"),
        );
    }
    forward(&meta, message)
}

/// One group's upstream watch: opened, fanned out, resumed elsewhere after a failure, closed
/// when the last watcher leaves.
async fn run_group(hub: Arc<WatchHub>, group: Arc<Group>, mut progress: mpsc::Receiver<()>) {
    loop {
        let start = group.state().next_rev.unwrap_or(0);
        let (member, channel) = hub.upstream.pick();
        let (tx, rx) = mpsc::channel(4);
        let _ = tx.send(create_request(&group.key, start)).await;
        let mut client = WatchClient::new(channel)
            .max_decoding_message_size(crate::forward::UPSTREAM_DECODE_BYTES_MAX);
        let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
        let opened = tokio::select! {
            r = client.watch(upstream_request(&group.key, requests)) => r,
            _ = group.closing.notified() => return,
        };
        let ended = match opened {
            Ok(r) => tokio::select! {
                p = pump(&hub, &group, r.into_inner(), &tx, &mut progress) => p,
                () = hub.upstream.unhealthy(member) => {
                    Pumped::Failed(Status::unavailable("member failed its health check"))
                }
            },
            Err(s) => Pumped::Failed(s),
        };
        match ended {
            Pumped::Closed => return,
            Pumped::Over(last) => return end_group(&hub, &group, last).await,
            Pumped::Failed(status) => {
                if group.key.require_leader && status.message() == "etcdserver: no leader" {
                    return end_group(&hub, &group, Feed::End(status)).await;
                }
                hub.upstream.failed(member);
                metrics::counter!("keyhold_proxy_watch_resumes_total").increment(1);
                tracing::info!(range = ?String::from_utf8_lossy(&group.key.key), error = %status.message(), "upstream watch failed; resuming on another member");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RESUME_DELAY) => {}
            _ = group.closing.notified() => return,
        }
    }
}

/// Ends a group for good: every watcher gets `last` (a cancel, or the end of its stream), and
/// watchers still waiting to join see it too.
async fn end_group(hub: &WatchHub, group: &Group, last: Feed) {
    let feed = Arc::new(last.clone());
    for (stream, slot) in hub.end_group(group, last) {
        let d = Delivery::Feed {
            slot,
            feed: feed.clone(),
        };
        let _ = stream.send(d).await;
    }
    group.started.send_replace(true);
}

enum Pumped {
    /// The last watcher left.
    Closed,
    /// The watch cannot go on (compaction, permission); watchers get this.
    Over(Feed),
    /// The member or connection failed: resume elsewhere.
    Failed(Status),
}

async fn pump(
    hub: &WatchHub,
    group: &Group,
    mut responses: Streaming<pb::WatchResponse>,
    requests: &mpsc::Sender<pb::WatchRequest>,
    progress: &mut mpsc::Receiver<()>,
) -> Pumped {
    loop {
        let resp = tokio::select! {
            r = responses.next() => r,
            Some(()) = progress.recv() => {
                let ask = pb::WatchRequest {
                    request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
                        pb::WatchProgressRequest {},
                    )),
                };
                let _ = requests.send(ask).await;
                continue;
            }
            _ = group.closing.notified() => return Pumped::Closed,
        };
        let resp = match resp {
            Some(Ok(r)) => r,
            Some(Err(s)) => return Pumped::Failed(s),
            None => return Pumped::Failed(Status::unavailable("upstream watch stream ended")),
        };
        if resp.canceled || resp.compact_revision != 0 {
            return Pumped::Over(Feed::Cancel {
                header: resp.header,
                reason: resp.cancel_reason,
                compact_revision: resp.compact_revision,
            });
        }
        let header_rev = resp.header.as_ref().map_or(0, |h| h.revision);
        // Decide under the lock what this response means and who gets it.
        let (feed, targets) = {
            let mut st = group.state();
            st.epoch += 1;
            let epoch = st.epoch;
            st.last_header = resp.header;
            let feed = if resp.created {
                if st.next_rev.is_none() {
                    st.next_rev = Some(header_rev + 1);
                }
                None
            } else if resp.events.is_empty() {
                let next = st.next_rev.unwrap_or(0).max(header_rev + 1);
                st.next_rev = Some(next);
                // After a resume the new member may be behind what the group already
                // delivered: progress never claims less than that (a bookmark below a delivered
                // event would make a client resuming from it see the event twice).
                let mut header = resp.header;
                if let Some(h) = header.as_mut() {
                    h.revision = next - 1;
                }
                Some(Feed::Progress { header, epoch })
            } else {
                let last = resp
                    .events
                    .iter()
                    .filter_map(|e| e.kv.as_ref().map(|kv| kv.mod_revision))
                    .max()
                    .unwrap_or(header_rev);
                let next = st.next_rev.unwrap_or(0);
                // After a resume the member may repeat nothing, but be safe: drop anything
                // already delivered.
                let events: Vec<mvccpb::Event> = resp
                    .events
                    .into_iter()
                    .filter(|e| e.kv.as_ref().is_some_and(|kv| kv.mod_revision >= next))
                    .collect();
                st.next_rev = Some(next.max(last + 1));
                (!events.is_empty()).then(|| Feed::Events {
                    header: resp.header,
                    events: Arc::new(events),
                    epoch,
                })
            };
            let targets: Vec<(mpsc::Sender<Delivery>, u64)> = st
                .subscribers
                .values()
                .map(|s| (s.stream.clone(), s.slot))
                .collect();
            (feed, targets)
        };
        if resp.created {
            group.started.send_replace(true);
            continue;
        }
        let Some(feed) = feed else { continue };
        let feed = Arc::new(feed);
        if matches!(*feed, Feed::Events { .. }) {
            metrics::counter!("keyhold_proxy_events_coalesced_total")
                .increment(targets.len().saturating_sub(1) as u64);
        }
        for (stream, slot) in targets {
            // Back-pressure: a full stream queue makes the group wait (nothing is dropped).
            let d = Delivery::Feed {
                slot,
                feed: feed.clone(),
            };
            let _ = stream.send(d).await;
        }
        let _ = hub;
    }
}

/// Per-watcher options from the create request.
#[derive(Clone)]
struct Options {
    watch_id: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    fragment: bool,
    /// Bytes of namespace prefix stripped from event keys.
    strip: usize,
}

impl Options {
    /// Sends `events` to the client as one response, or in fragments when asked and large.
    async fn send_events(
        &self,
        out: &Out,
        header: Option<pb::ResponseHeader>,
        events: Vec<mvccpb::Event>,
    ) -> bool {
        use prost::Message;
        let resp = pb::WatchResponse {
            header,
            watch_id: self.watch_id,
            events,
            ..Default::default()
        };
        if !self.fragment || resp.events.len() < 2 || resp.encoded_len() < FRAGMENT_BYTES {
            return out.send(Ok(resp)).await.is_ok();
        }
        let mut parts: Vec<Vec<mvccpb::Event>> = vec![Vec::new()];
        let mut bytes = 0;
        for e in resp.events {
            let size = e.encoded_len() + 8;
            if bytes + size > FRAGMENT_BYTES && parts.last().is_some_and(|p| !p.is_empty()) {
                parts.push(Vec::new());
                bytes = 0;
            }
            bytes += size;
            if let Some(p) = parts.last_mut() {
                p.push(e);
            }
        }
        let n = parts.len();
        for (i, events) in parts.into_iter().enumerate() {
            let part = pb::WatchResponse {
                header: resp.header,
                watch_id: self.watch_id,
                fragment: i + 1 < n,
                events,
                ..Default::default()
            };
            if out.send(Ok(part)).await.is_err() {
                return false;
            }
        }
        true
    }

    fn filter(&self, events: &[mvccpb::Event], from: i64) -> Vec<mvccpb::Event> {
        use mvccpb::event::EventType;
        events
            .iter()
            .filter(|e| e.kv.as_ref().is_some_and(|kv| kv.mod_revision >= from))
            .filter(|e| {
                let put = e.r#type == EventType::Put as i32;
                !(put && self.no_put || !put && self.no_delete)
            })
            .map(|e| {
                let mut e = e.clone();
                if !self.prev_kv {
                    e.prev_kv = None;
                }
                if self.strip > 0 {
                    for kv in e.kv.iter_mut().chain(e.prev_kv.iter_mut()) {
                        kv.key.drain(..self.strip.min(kv.key.len()));
                    }
                }
                e
            })
            .collect()
    }
}

/// One watcher of a client stream.
struct Watcher {
    slot: u64,
    group: Arc<Group>,
    sub: u64,
    opts: Options,
    /// Shared-feed events before this revision are not this watcher's.
    from: i64,
    /// Every event up to this revision has been queued to the client.
    delivered: i64,
    /// Group epoch of the last feed item handled.
    epoch: u64,
    /// While catching up: the catch-up task and the shared feed held back meanwhile.
    catch_up: Option<(
        tokio::task::JoinHandle<()>,
        std::collections::VecDeque<Arc<Feed>>,
    )>,
}

type Out = mpsc::Sender<Result<pb::WatchResponse, Status>>;

/// Replays `[start, join)` on a watch of the watcher's own, straight to the client, then tells
/// the stream task (which holds the watcher's shared feed meanwhile) how far it got; `None`
/// when the watcher ended (cancelled, compacted, client gone).
async fn catch_up(
    upstream: Arc<Upstream>,
    key: GroupKey,
    opts: Options,
    (start, join): (i64, i64),
    out: Out,
    (done, slot): (mpsc::UnboundedSender<CaughtUp>, u64),
) {
    let delivered = catch_up_range(&upstream, &key, &opts, start, join, &out).await;
    let _ = done.send((slot, delivered));
}

async fn catch_up_range(
    upstream: &Upstream,
    key: &GroupKey,
    opts: &Options,
    start: i64,
    join: i64,
    out: &Out,
) -> Option<i64> {
    let mut from = start;
    loop {
        let (member, channel) = upstream.pick();
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.send(create_request(key, from)).await;
        metrics::gauge!("keyhold_proxy_catch_up_watches").increment(1.0);
        let result = async {
            let mut responses = WatchClient::new(channel)
                .max_decoding_message_size(crate::forward::UPSTREAM_DECODE_BYTES_MAX)
                .watch(upstream_request(
                    key,
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                ))
                .await?
                .into_inner();
            while let Some(resp) = responses.next().await {
                let resp = resp?;
                if resp.compact_revision != 0 || resp.canceled {
                    let _ = out
                        .send(Ok(pb::WatchResponse {
                            header: resp.header,
                            watch_id: opts.watch_id,
                            canceled: true,
                            cancel_reason: resp.cancel_reason,
                            compact_revision: resp.compact_revision,
                            ..Default::default()
                        }))
                        .await;
                    return Ok(Some(false));
                }
                let before: Vec<mvccpb::Event> = resp
                    .events
                    .iter()
                    .filter(|e| e.kv.as_ref().is_some_and(|kv| kv.mod_revision < join))
                    .cloned()
                    .collect();
                let reached = resp.events.len() > before.len()
                    || (resp.events.is_empty()
                        && !resp.created
                        && resp.header.as_ref().is_some_and(|h| h.revision >= join - 1));
                if let Some(last) = before
                    .iter()
                    .filter_map(|e| e.kv.as_ref())
                    .map(|kv| kv.mod_revision)
                    .max()
                {
                    from = last + 1;
                }
                let mine = opts.filter(&before, start);
                if !mine.is_empty() && !opts.send_events(out, resp.header, mine).await {
                    return Ok(Some(false));
                }
                if reached || from >= join {
                    return Ok(Some(true));
                }
                if resp.created || resp.events.is_empty() {
                    // Ask where the member stands, so an idle range ends its catch-up (again
                    // after a short pause when that member was still behind).
                    if !resp.created {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let _ = tx
                        .send(pb::WatchRequest {
                            request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
                                pb::WatchProgressRequest {},
                            )),
                        })
                        .await;
                }
            }
            Ok::<_, Status>(None)
        }
        .await;
        metrics::gauge!("keyhold_proxy_catch_up_watches").decrement(1.0);
        match result {
            Ok(Some(true)) => return Some(join - 1),
            Ok(Some(false)) => return None,
            Ok(None) | Err(_) => {
                upstream.failed(member);
                tokio::time::sleep(RESUME_DELAY).await;
            }
        }
    }
}

/// Watch service.
pub struct WatchService {
    pub hub: Arc<WatchHub>,
    /// `--namespace`.
    pub ns: crate::namespace::Namespace,
}

/// A progress request waiting for fresh progress from the members.
struct ProgressWait {
    deadline: tokio::time::Instant,
    /// (watch slot, group epoch when asked).
    asked: Vec<(u64, u64)>,
}

/// One client stream: its watchers and their deliveries.
struct StreamTask {
    hub: Arc<WatchHub>,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    require_leader: bool,
    out: Out,
    /// Where groups deliver for this stream.
    feed_tx: mpsc::Sender<Delivery>,
    /// Where catch-ups report.
    caught_up_tx: mpsc::UnboundedSender<CaughtUp>,
    watchers: HashMap<i64, Watcher>,
    by_slot: HashMap<u64, i64>,
    next_slot: u64,
    next_auto_id: i64,
    progress_wait: Option<ProgressWait>,
    ns: crate::namespace::Namespace,
}

impl StreamTask {
    async fn send(&self, resp: pb::WatchResponse) -> bool {
        self.out.send(Ok(resp)).await.is_ok()
    }

    async fn create_failed(&self, reason: &str) -> bool {
        self.send(pb::WatchResponse {
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: reason.to_string(),
            ..Default::default()
        })
        .await
    }

    fn remove(&mut self, watch_id: i64) -> Option<Watcher> {
        let w = self.watchers.remove(&watch_id)?;
        self.by_slot.remove(&w.slot);
        if let Some((task, _)) = &w.catch_up {
            task.abort();
        }
        self.hub.leave(&w.group, Some(w.sub));
        Some(w)
    }

    async fn handle(&mut self, req: pb::WatchRequest) -> bool {
        use pb::watch_request::RequestUnion;
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(RequestUnion::CancelRequest(c)) => {
                let Some(w) = self.remove(c.watch_id) else {
                    return true;
                };
                let header = w.group.state().last_header;
                self.send(pb::WatchResponse {
                    header,
                    watch_id: c.watch_id,
                    canceled: true,
                    ..Default::default()
                })
                .await
            }
            Some(RequestUnion::ProgressRequest(_)) => self.progress().await,
            None => true,
        }
    }

    async fn create(&mut self, mut c: pb::WatchCreateRequest) -> bool {
        use pb::watch_create_request::FilterType;
        if c.key.is_empty() {
            c.key = vec![0];
        }
        self.ns.watch_create(&mut c);
        let key = c.key;
        if c.start_revision < 0 {
            return self
                .create_failed("mvcc: required revision has been compacted")
                .await;
        }
        if !c.range_end.is_empty() && c.range_end != [0] && c.range_end <= key {
            return self.create_failed("mvcc: watcher range is empty").await;
        }
        if self.watchers.len() >= WATCHERS_PER_STREAM_MAX {
            return self.create_failed("etcdserver: too many requests").await;
        }
        let watch_id = if c.watch_id != 0 {
            if self.watchers.contains_key(&c.watch_id) {
                return self
                    .create_failed("mvcc: duplicate watch ID provided on the WatchStream")
                    .await;
            }
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_auto_id) {
                self.next_auto_id += 1;
            }
            self.next_auto_id
        };
        let gkey = GroupKey {
            token: self.token.clone(),
            require_leader: self.require_leader,
            key,
            range_end: c.range_end,
        };
        let slot = self.next_slot;
        self.next_slot += 1;
        // Join a started group (a group that closes meanwhile is replaced).
        let joined = async {
            loop {
                let group = self.hub.group(gkey.clone());
                let mut started = group.started.subscribe();
                let _ = started.wait_for(|s| *s).await;
                match self.hub.join(&group, &self.feed_tx, slot) {
                    Ok(j) => return Ok((group, j)),
                    Err(Some(refused)) => return Err(refused),
                    Err(None) => tokio::task::yield_now().await,
                }
            }
        };
        let (group, (sub, join, header)) = match tokio::time::timeout(START_TIMEOUT, joined).await {
            Ok(Ok(j)) => j,
            Ok(Err(Feed::End(status))) => {
                let _ = self.out.send(Err(status)).await;
                return false;
            }
            Ok(Err(Feed::Cancel { reason, .. })) => return self.create_failed(&reason).await,
            Ok(Err(_)) | Err(_) => {
                let group = self.hub.group(gkey.clone());
                self.hub.leave(&group, None);
                return self.create_failed("etcdserver: request timed out").await;
            }
        };
        let filters = |f: FilterType| c.filters.contains(&(f as i32));
        let opts = Options {
            watch_id,
            prev_kv: c.prev_kv,
            no_put: filters(FilterType::Noput),
            no_delete: filters(FilterType::Nodelete),
            progress_notify: c.progress_notify,
            fragment: c.fragment,
            strip: self.ns.len(),
        };
        let start = if c.start_revision == 0 {
            join
        } else {
            c.start_revision
        };
        let mut created_header = header;
        if let Some(h) = created_header.as_mut() {
            h.revision = join - 1;
        }
        if !self
            .send(pb::WatchResponse {
                header: created_header,
                watch_id,
                created: true,
                ..Default::default()
            })
            .await
        {
            self.hub.leave(&group, Some(sub));
            return false;
        }
        let catch_up_task = (start < join).then(|| {
            let task = tokio::spawn(catch_up(
                self.hub.upstream.clone(),
                gkey,
                opts.clone(),
                (start, join),
                self.out.clone(),
                (self.caught_up_tx.clone(), slot),
            ));
            (task, std::collections::VecDeque::new())
        });
        self.by_slot.insert(slot, watch_id);
        self.watchers.insert(
            watch_id,
            Watcher {
                slot,
                group,
                sub,
                opts,
                from: start.max(join),
                delivered: start.min(join) - 1,
                epoch: 0,
                catch_up: catch_up_task,
            },
        );
        true
    }

    /// Handles one delivery; false when the stream must end.
    async fn deliver(
        &mut self,
        d: Delivery,
        caught_up: &mut mpsc::UnboundedReceiver<CaughtUp>,
    ) -> bool {
        match d {
            Delivery::Feed { slot, feed } => {
                let Some(&watch_id) = self.by_slot.get(&slot) else {
                    return true; // cancelled meanwhile
                };
                let Some(w) = self.watchers.get_mut(&watch_id) else {
                    return true;
                };
                if let Some((_, held)) = w.catch_up.as_mut() {
                    held.push_back(feed);
                    if held.len() < CATCH_UP_HOLD_MAX {
                        return true;
                    }
                    // Too much held: wait for the catch-up (this stream and its groups pause).
                    return self.wait_catch_up(watch_id, caught_up).await;
                }
                self.apply(watch_id, &feed).await
            }
        }
    }

    /// A catch-up finished (ignored when already handled by `wait_catch_up`).
    async fn on_caught_up(&mut self, (slot, delivered): CaughtUp) -> bool {
        let Some(&watch_id) = self.by_slot.get(&slot) else {
            return true;
        };
        if self
            .watchers
            .get(&watch_id)
            .is_none_or(|w| w.catch_up.is_none())
        {
            return true;
        }
        self.caught_up(watch_id, delivered).await
    }

    /// Blocks until watcher `watch_id`'s catch-up ends (its hold is full), then hands the
    /// watcher its held feed.
    async fn wait_catch_up(
        &mut self,
        watch_id: i64,
        caught_up: &mut mpsc::UnboundedReceiver<CaughtUp>,
    ) -> bool {
        let Some(slot) = self.watchers.get(&watch_id).map(|w| w.slot) else {
            return true;
        };
        // Other watchers' catch-ups may finish first: handle those on the way.
        while let Some(done) = caught_up.recv().await {
            let mine = done.0 == slot;
            if !self.on_caught_up(done).await {
                return false;
            }
            if mine {
                break;
            }
        }
        true
    }

    async fn caught_up(&mut self, watch_id: i64, delivered: Option<i64>) -> bool {
        let Some(reached) = delivered else {
            // The catch-up ended the watcher (it already told the client why).
            self.remove(watch_id);
            return true;
        };
        let held = match self.watchers.get_mut(&watch_id) {
            Some(w) => {
                w.delivered = w.delivered.max(reached);
                w.catch_up.take().map(|(_, held)| held).unwrap_or_default()
            }
            None => return true,
        };
        for feed in held {
            if !self.apply(watch_id, &feed).await {
                return false;
            }
        }
        true
    }

    /// Sends one shared-feed item to watcher `watch_id`'s client.
    async fn apply(&mut self, watch_id: i64, feed: &Feed) -> bool {
        let Some(w) = self.watchers.get_mut(&watch_id) else {
            return true;
        };
        match feed {
            Feed::Events {
                header,
                events,
                epoch,
            } => {
                let last = events
                    .iter()
                    .filter_map(|ev| ev.kv.as_ref().map(|kv| kv.mod_revision))
                    .max()
                    .unwrap_or(0);
                let mine = w.opts.filter(events, w.from);
                w.delivered = w.delivered.max(last);
                w.epoch = *epoch;
                let opts = w.opts.clone();
                mine.is_empty() || opts.send_events(&self.out, *header, mine).await
            }
            Feed::Progress { header, epoch } => {
                let rev = header.as_ref().map_or(0, |h| h.revision);
                w.delivered = w.delivered.max(rev);
                w.epoch = *epoch;
                !w.opts.progress_notify
                    || self
                        .out
                        .send(Ok(pb::WatchResponse {
                            header: *header,
                            watch_id,
                            ..Default::default()
                        }))
                        .await
                        .is_ok()
            }
            Feed::Cancel {
                header,
                reason,
                compact_revision,
            } => {
                let resp = pb::WatchResponse {
                    header: *header,
                    watch_id,
                    canceled: true,
                    cancel_reason: reason.clone(),
                    compact_revision: *compact_revision,
                    ..Default::default()
                };
                self.remove(watch_id);
                self.send(resp).await
            }
            Feed::End(status) => {
                let _ = self.out.send(Err(status.clone())).await;
                false
            }
        }
    }

    /// A progress request: with no watchers, the current revision; otherwise ask the members
    /// for fresh progress and answer (in `progress_due`) once every watcher has heard back.
    async fn progress(&mut self) -> bool {
        if self.watchers.is_empty() {
            let probe = pb::RangeRequest {
                key: vec![0],
                count_only: true,
                ..Default::default()
            };
            let mut meta = tonic::metadata::MetadataMap::new();
            if let Some(t) = &self.token {
                meta.insert("token", t.clone());
            }
            let answer = self
                .hub
                .upstream
                .call(crate::upstream::Retry::Immutable, |channel| {
                    let req = forward(&meta, probe.clone());
                    async move {
                        keyhold_proto::etcdserverpb::kv_client::KvClient::new(channel)
                            .range(req)
                            .await
                            .map(Response::into_inner)
                    }
                })
                .await;
            return match answer {
                Ok(a) => {
                    self.send(pb::WatchResponse {
                        header: a.header,
                        watch_id: -1,
                        ..Default::default()
                    })
                    .await
                }
                Err(_) => true,
            };
        }
        let asked = self
            .watchers
            .values()
            .map(|w| {
                let e = w.group.state().epoch;
                let _ = w.group.progress.try_send(());
                (w.slot, e)
            })
            .collect();
        self.progress_wait = Some(ProgressWait {
            deadline: tokio::time::Instant::now() + PROGRESS_WAIT,
            asked,
        });
        true
    }

    /// Answers a waiting progress request once every watcher it asked about has handled a
    /// newer feed item (or the wait timed out): the lowest revision every watcher of this
    /// stream has queued all events up to.
    async fn progress_due(&mut self, timed_out: bool) -> bool {
        let Some(wait) = &self.progress_wait else {
            return true;
        };
        let fresh = wait.asked.iter().all(|(slot, e)| {
            self.by_slot
                .get(slot)
                .and_then(|id| self.watchers.get(id))
                .is_none_or(|w| w.epoch > *e && w.catch_up.is_none())
        });
        if !fresh && !timed_out {
            return true;
        }
        self.progress_wait = None;
        let revision = self.watchers.values().map(|w| w.delivered).min();
        let Some(revision) = revision else {
            return true;
        };
        let header = self
            .watchers
            .values()
            .next()
            .and_then(|w| w.group.state().last_header)
            .map(|mut h| {
                h.revision = revision;
                h
            });
        self.send(pb::WatchResponse {
            header,
            watch_id: -1,
            ..Default::default()
        })
        .await
    }

    fn close(&mut self) {
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            self.remove(id);
        }
    }
}

#[tonic::async_trait]
impl pb::watch_server::Watch for WatchService {
    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<BoxStream<pb::WatchResponse>>, Status> {
        let token = request.metadata().get("token").cloned();
        let require_leader = request
            .metadata()
            .get("hasleader")
            .is_some_and(|v| v.as_bytes() == b"true");
        let mut input = request.into_inner();
        let (out, rx) = mpsc::channel(OUT_QUEUE_MAX);
        let (feed_tx, mut feed_rx) = mpsc::channel(STREAM_FEED_QUEUE_MAX);
        let (caught_up_tx, mut caught_up_rx) = mpsc::unbounded_channel();
        let mut task = StreamTask {
            hub: self.hub.clone(),
            token,
            require_leader,
            out,
            feed_tx,
            caught_up_tx,
            watchers: HashMap::new(),
            by_slot: HashMap::new(),
            next_slot: 0,
            next_auto_id: 0,
            progress_wait: None,
            ns: self.ns.clone(),
        };
        tokio::spawn(async move {
            let mut input_open = true;
            loop {
                let deadline = task.progress_wait.as_ref().map(|w| w.deadline);
                let go_on = tokio::select! {
                    msg = input.next(), if input_open => match msg {
                        Some(Ok(req)) => task.handle(req).await,
                        // A half-closed request stream keeps its watchers (etcd#18230).
                        None => { input_open = false; true }
                        Some(Err(_)) => false,
                    },
                    Some(d) = feed_rx.recv() => {
                        task.deliver(d, &mut caught_up_rx).await && task.progress_due(false).await
                    }
                    Some(done) = caught_up_rx.recv() => {
                        task.on_caught_up(done).await && task.progress_due(false).await
                    }
                    () = async {
                        match deadline {
                            Some(d) => tokio::time::sleep_until(d).await,
                            None => std::future::pending().await,
                        }
                    } => task.progress_due(true).await,
                    _ = task.out.closed() => false,
                };
                if !go_on {
                    break;
                }
            }
            task.close();
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
