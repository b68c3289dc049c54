//! Watch coalescing: every client watcher of the same key range (and the same caller
//! identity) shares one upstream watch.
//!
//! ```text
//!  client stream ─create─► StreamTask ─subscribe─► WatchHub ─► Group (one upstream watch,
//!        ▲                    │                                  prev_kv + progress_notify)
//!        │                    └─► watcher task ◄──Feed (bounded)──┘  fan-out, back-pressured
//!        └──── responses ◄────────┘  (catch-up from an older start revision on its own
//!                                     upstream watch first, then the shared feed)
//! ```
//!
//! A group knows `next_rev`, the first revision it has not delivered yet. A watcher joins at
//! `join = next_rev` (taken under the group lock, so it sees exactly the events from `join`);
//! a watcher that starts earlier first replays `[start, join)` on a watch of its own, then
//! drains the shared feed, so there is no gap and no duplicate. When the member under a group
//! fails, the group reopens its watch on another member from `next_rev`: clients see no second
//! `created`. A slow client fills its watcher's bounded feed and back-pressures the group; no
//! event is dropped. Filters and `prev_kv` are applied per watcher; client `watch_id`s are
//! honoured; progress requests are answered per client stream from what every watcher of the
//! stream has already sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
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

/// Feed items queued per watcher before the group waits for it (back-pressure).
const FEED_QUEUE_MAX: usize = 64;
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

type Joined = (
    u64,
    i64,
    Option<pb::ResponseHeader>,
    mpsc::Receiver<Arc<Feed>>,
);

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
    tx: mpsc::Sender<Arc<Feed>>,
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
    fn join(&self, group: &Group) -> Result<Joined, Option<Feed>> {
        let _groups = self.groups();
        let mut st = group.state();
        if st.closed {
            return Err(st.failure.clone());
        }
        let join = st.next_rev.ok_or(None)?;
        let (tx, rx) = mpsc::channel(FEED_QUEUE_MAX);
        let id = st.next_sub;
        st.next_sub += 1;
        st.subscribers.insert(id, Subscriber { tx });
        self.watchers.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("keyhold_proxy_watchers").increment(1.0);
        Ok((id, join, st.last_header, rx))
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
    fn end_group(&self, group: &Group, last: Feed) -> Vec<mpsc::Sender<Arc<Feed>>> {
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
        st.subscribers.drain().map(|(_, s)| s.tx).collect()
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
            Pumped::Over(last) => {
                let shared = Arc::new(last.clone());
                for s in hub.end_group(&group, last) {
                    let _ = s.send(shared.clone()).await;
                }
                group.started.send_replace(true);
                return;
            }
            Pumped::Failed(status) => {
                if group.key.require_leader && status.message() == "etcdserver: no leader" {
                    let last = Feed::End(status);
                    let shared = Arc::new(last.clone());
                    for s in hub.end_group(&group, last) {
                        let _ = s.send(shared.clone()).await;
                    }
                    group.started.send_replace(true);
                    return;
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
                Some(Feed::Progress {
                    header: resp.header,
                    epoch,
                })
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
            let targets: Vec<mpsc::Sender<Arc<Feed>>> =
                st.subscribers.values().map(|s| s.tx.clone()).collect();
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
        for t in targets {
            // Back-pressure: a full watcher feed makes the group wait (nothing is dropped).
            let _ = t.send(feed.clone()).await;
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
                e
            })
            .collect()
    }
}

/// What a client stream knows about one of its watchers.
struct WatcherHandle {
    group: Arc<Group>,
    sub: u64,
    task: tokio::task::JoinHandle<()>,
    /// Every event up to this revision has been queued to the client.
    delivered: Arc<AtomicI64>,
    /// Feed epoch last processed.
    epoch: Arc<AtomicU64>,
}

type Out = mpsc::Sender<Result<pb::WatchResponse, Status>>;

/// Runs one watcher: catch-up from `start` (when older than `join`), then the shared feed.
#[allow(clippy::too_many_arguments)]
async fn run_watcher(
    upstream: Arc<Upstream>,
    key: GroupKey,
    opts: Options,
    start: i64,
    join: i64,
    mut feed: mpsc::Receiver<Arc<Feed>>,
    out: Out,
    delivered: Arc<AtomicI64>,
    epoch: Arc<AtomicU64>,
) {
    // Boxed: an idle watcher's task should not carry the catch-up's state.
    if start < join
        && !Box::pin(catch_up(
            &upstream, &key, &opts, start, join, &out, &delivered,
        ))
        .await
    {
        return;
    }
    let from = start.max(join);
    while let Some(item) = feed.recv().await {
        let item = Arc::unwrap_or_clone(item);
        let sent = match item {
            Feed::Events {
                header,
                events,
                epoch: e,
            } => {
                let last = events
                    .iter()
                    .filter_map(|ev| ev.kv.as_ref().map(|kv| kv.mod_revision))
                    .max()
                    .unwrap_or(0);
                let mine = opts.filter(&events, from);
                let ok = mine.is_empty() || opts.send_events(&out, header, mine).await;
                delivered.fetch_max(last, Ordering::Relaxed);
                epoch.store(e, Ordering::Relaxed);
                ok
            }
            Feed::Progress { header, epoch: e } => {
                let rev = header.as_ref().map_or(0, |h| h.revision);
                let ok = !opts.progress_notify
                    || out
                        .send(Ok(pb::WatchResponse {
                            header,
                            watch_id: opts.watch_id,
                            ..Default::default()
                        }))
                        .await
                        .is_ok();
                delivered.fetch_max(rev, Ordering::Relaxed);
                epoch.store(e, Ordering::Relaxed);
                ok
            }
            Feed::Cancel {
                header,
                reason,
                compact_revision,
            } => {
                let _ = out
                    .send(Ok(pb::WatchResponse {
                        header,
                        watch_id: opts.watch_id,
                        canceled: true,
                        cancel_reason: reason,
                        compact_revision,
                        ..Default::default()
                    }))
                    .await;
                false
            }
            Feed::End(status) => {
                let _ = out.send(Err(status)).await;
                false
            }
        };
        if !sent {
            return;
        }
    }
}

/// Replays `[start, join)` on a watch of the watcher's own; false when the watcher ended.
async fn catch_up(
    upstream: &Upstream,
    key: &GroupKey,
    opts: &Options,
    start: i64,
    join: i64,
    out: &Out,
    delivered: &AtomicI64,
) -> bool {
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
                delivered.fetch_max(from - 1, Ordering::Relaxed);
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
            Ok(Some(done)) => return done,
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
}

struct StreamTask {
    hub: Arc<WatchHub>,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    require_leader: bool,
    out: Out,
    watchers: HashMap<i64, WatcherHandle>,
    next_auto_id: i64,
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

    async fn handle(&mut self, req: pb::WatchRequest) -> bool {
        use pb::watch_request::RequestUnion;
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(RequestUnion::CancelRequest(c)) => {
                let Some(w) = self.watchers.remove(&c.watch_id) else {
                    return true;
                };
                w.task.abort();
                self.hub.leave(&w.group, Some(w.sub));
                let header = w.group.state().last_header;
                self.send(pb::WatchResponse {
                    header,
                    watch_id: c.watch_id,
                    canceled: true,
                    ..Default::default()
                })
                .await
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                self.progress().await;
                true
            }
            None => true,
        }
    }

    async fn create(&mut self, c: pb::WatchCreateRequest) -> bool {
        use pb::watch_create_request::FilterType;
        let key = if c.key.is_empty() { vec![0] } else { c.key };
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
        // Join a started group (a group that closes meanwhile is replaced).
        let joined = async {
            loop {
                let group = self.hub.group(gkey.clone());
                let mut started = group.started.subscribe();
                let _ = started.wait_for(|s| *s).await;
                match self.hub.join(&group) {
                    Ok(j) => return Ok((group, j)),
                    Err(Some(refused)) => return Err(refused),
                    Err(None) => tokio::task::yield_now().await,
                }
            }
        };
        let (group, (sub, join, header, feed)) =
            match tokio::time::timeout(START_TIMEOUT, joined).await {
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
        let delivered = Arc::new(AtomicI64::new(start.min(join) - 1));
        let epoch = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run_watcher(
            self.hub.upstream.clone(),
            gkey,
            opts,
            start,
            join,
            feed,
            self.out.clone(),
            delivered.clone(),
            epoch.clone(),
        ));
        self.watchers.insert(
            watch_id,
            WatcherHandle {
                group,
                sub,
                task,
                delivered,
                epoch,
            },
        );
        true
    }

    /// Answers a progress request with a revision every watcher of this stream has sent all
    /// events up to (after asking the members for fresh progress).
    async fn progress(&self) {
        if self.watchers.is_empty() {
            // Nothing to hold back: the current revision, from a linearizable read.
            let probe = pb::RangeRequest {
                key: vec![0],
                count_only: true,
                ..Default::default()
            };
            let meta = tonic::metadata::MetadataMap::new();
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
            if let Ok(a) = answer {
                let _ = self
                    .send(pb::WatchResponse {
                        header: a.header,
                        watch_id: -1,
                        ..Default::default()
                    })
                    .await;
            }
            return;
        }
        let asked: Vec<(u64, &WatcherHandle)> = self
            .watchers
            .values()
            .map(|w| {
                let e = w.group.state().epoch;
                let _ = w.group.progress.try_send(());
                (e, w)
            })
            .collect();
        let deadline = tokio::time::Instant::now() + PROGRESS_WAIT;
        while tokio::time::Instant::now() < deadline
            && asked
                .iter()
                .any(|(e, w)| w.epoch.load(Ordering::Relaxed) <= *e && !w.task.is_finished())
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let revision = self
            .watchers
            .values()
            .map(|w| w.delivered.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        let header = self
            .watchers
            .values()
            .next()
            .and_then(|w| w.group.state().last_header)
            .map(|mut h| {
                h.revision = revision;
                h
            });
        let _ = self
            .send(pb::WatchResponse {
                header,
                watch_id: -1,
                ..Default::default()
            })
            .await;
    }

    fn close(&mut self) {
        for (_, w) in self.watchers.drain() {
            w.task.abort();
            self.hub.leave(&w.group, Some(w.sub));
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
        let mut task = StreamTask {
            hub: self.hub.clone(),
            token,
            require_leader,
            out,
            watchers: HashMap::new(),
            next_auto_id: 0,
        };
        tokio::spawn(async move {
            let mut input_open = true;
            loop {
                let go_on = tokio::select! {
                    msg = input.next(), if input_open => match msg {
                        Some(Ok(req)) => task.handle(req).await,
                        // A half-closed request stream keeps its watchers (etcd#18230).
                        None => { input_open = false; true }
                        Some(Err(_)) => false,
                    },
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
