//! The range cache: serializable `Range` answers kept in moka (bounded by bytes), invalidated
//! by the proxy's own upstream watch on the whole key space, so a write made anywhere (through
//! another proxy, or straight to a member) evicts what it changed.
//!
//! ```text
//!  feed: one upstream watch ["\0", "\0") ──events──► Index::invalidate(key) ──► feed_rev = r
//!  Range(serializable) ──► Index::get: live feed, entry valid at max(entry rev, feed_rev)
//!                          ≥ the highest revision this proxy has answered with ──► hit
//! ```
//!
//! Freshness rules (all under the index lock, so an insert and an invalidation never cross):
//! an answer at revision R is stored only if R ≥ feed_rev (nothing the feed already processed
//! can be missing from it), and is served as valid at max(R, feed_rev) only while that is at
//! least every revision the proxy has already returned: a client never reads through the cache
//! something older than what it saw (or wrote) through this proxy. While the feed is down
//! nothing is served or stored; if it cannot resume where it stopped (compaction) the cache is
//! emptied. Entries are keyed by the caller's auth token and the whole request, so nobody
//! reads through the cache what they could not read upstream.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use keyhold_proto::etcdserverpb as pb;
use keyhold_proto::etcdserverpb::watch_client::WatchClient;
use prost::Message;
use tokio_stream::StreamExt;

use crate::upstream::Upstream;

/// Retry delay of the invalidation feed after a failure.
const FEED_RETRY: Duration = Duration::from_millis(200);
/// Retry delay when the feed is refused (e.g. auth on and the proxy may not watch everything).
const FEED_REFUSED_RETRY: Duration = Duration::from_secs(5);
/// Index entries beyond this multiple of the cache's entry count trigger a prune.
const INDEX_SLACK: u64 = 2;
/// Bytes counted per entry on top of the encoded response (key and bookkeeping).
const ENTRY_OVERHEAD_BYTES: u32 = 128;

type CacheKey = Arc<Vec<u8>>;

/// Hit and miss counters, registered once (the macros look the name up on every call).
fn counters() -> &'static (metrics::Counter, metrics::Counter) {
    static COUNTERS: std::sync::OnceLock<(metrics::Counter, metrics::Counter)> =
        std::sync::OnceLock::new();
    COUNTERS.get_or_init(|| {
        (
            metrics::counter!("keyhold_proxy_cache_hits_total"),
            metrics::counter!("keyhold_proxy_cache_misses_total"),
        )
    })
}

/// The key span a request covers, in etcd's range conventions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Span {
    /// One key (`range_end` empty).
    Key(Vec<u8>),
    /// `[start, end)`; `None` = to the end of the key space (`range_end` = `"\0"`).
    Range(Vec<u8>, Option<Vec<u8>>),
}

impl Span {
    /// The span of `key` / `range_end` as etcd reads them.
    pub fn of(key: &[u8], range_end: &[u8]) -> Self {
        match range_end {
            [] => Span::Key(key.to_vec()),
            [0] => Span::Range(key.to_vec(), None),
            end => Span::Range(key.to_vec(), Some(end.to_vec())),
        }
    }

    fn contains(&self, key: &[u8]) -> bool {
        match self {
            Span::Key(k) => k == key,
            Span::Range(start, end) => {
                key >= start.as_slice() && end.as_ref().is_none_or(|e| key < e.as_slice())
            }
        }
    }

    fn overlaps(&self, other: &Span) -> bool {
        match (self, other) {
            (Span::Key(k), s) | (s, Span::Key(k)) => s.contains(k),
            (Span::Range(a0, a1), Span::Range(b0, b1)) => {
                let a_before_b_ends = b1.as_ref().is_none_or(|e| a0 < e);
                let b_before_a_ends = a1.as_ref().is_none_or(|e| b0 < e);
                a_before_b_ends && b_before_a_ends
            }
        }
    }
}

struct Cached {
    response: pb::RangeResponse,
    revision: i64,
}

#[derive(Default)]
struct Index {
    /// The feed is connected and has reported where it stands.
    live: bool,
    /// Every event up to this revision has invalidated what it touched.
    feed_rev: i64,
    points: BTreeMap<Vec<u8>, Vec<CacheKey>>,
    ranges: Vec<(Span, CacheKey)>,
}

/// The cache (shared by every client connection of the proxy).
pub struct RangeCache {
    entries: moka::sync::Cache<CacheKey, Arc<Cached>>,
    index: Mutex<Index>,
    upstream: Arc<Upstream>,
    enabled: bool,
}

impl RangeCache {
    /// A cache of at most `bytes` (0 disables it).
    pub fn new(bytes: u64, upstream: Arc<Upstream>) -> Arc<Self> {
        let entries = moka::sync::Cache::builder()
            .max_capacity(bytes.max(1))
            .weigher(|k: &CacheKey, v: &Arc<Cached>| {
                (k.len() as u32)
                    .saturating_add(v.response.encoded_len() as u32)
                    .saturating_add(ENTRY_OVERHEAD_BYTES)
            })
            .build();
        Arc::new(Self {
            entries,
            index: Mutex::default(),
            upstream,
            enabled: bytes > 0,
        })
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cache key of `req` for the caller holding `token`.
    pub fn key(token: &[u8], req: &pb::RangeRequest) -> CacheKey {
        let mut normalized = req.clone();
        normalized.serializable = true;
        let mut k = Vec::with_capacity(token.len() + 1 + normalized.encoded_len());
        k.extend_from_slice(token);
        k.push(0);
        normalized.encode(&mut k).expect("Vec grows");
        Arc::new(k)
    }

    /// A fresh cached answer, if there is one.
    pub fn get(&self, key: &CacheKey) -> Option<pb::RangeResponse> {
        if !self.enabled {
            return None;
        }
        let index = self.index();
        let hit = index
            .live
            .then(|| self.entries.get(key))
            .flatten()
            .and_then(|c| {
                let valid_at = c.revision.max(index.feed_rev);
                (valid_at >= self.upstream.observed()).then(|| {
                    let mut r = c.response.clone();
                    if let Some(h) = r.header.as_mut() {
                        h.revision = valid_at;
                    }
                    r
                })
            });
        drop(index);
        let (hits, misses) = counters();
        if hit.is_some() {
            hits.increment(1);
        } else {
            misses.increment(1);
        }
        hit
    }

    /// Stores an answer obtained from a member (skipped if the feed may already have
    /// invalidated something it holds).
    pub fn insert(&self, key: CacheKey, span: Span, response: &pb::RangeResponse) {
        if !self.enabled {
            return;
        }
        let revision = response.header.as_ref().map_or(0, |h| h.revision);
        let mut index = self.index();
        if !index.live || revision < index.feed_rev {
            return;
        }
        let cached = Arc::new(Cached {
            response: response.clone(),
            revision,
        });
        self.entries.insert(key.clone(), cached);
        match span {
            Span::Key(k) => index.points.entry(k).or_default().push(key),
            range => index.ranges.push((range, key)),
        }
        let indexed = index.points.len() as u64 + index.ranges.len() as u64;
        if indexed > INDEX_SLACK * self.entries.entry_count() + 1024 {
            let entries = &self.entries;
            index.points.retain(|_, keys| {
                keys.retain(|k| entries.contains_key(k));
                !keys.is_empty()
            });
            index.ranges.retain(|(_, k)| entries.contains_key(k));
        }
    }

    /// Drops every entry that `span` could have changed (a write through this proxy, or an
    /// event of the feed).
    pub fn invalidate(&self, span: &Span) {
        if self.enabled {
            Self::invalidate_locked(&mut self.index(), &self.entries, span);
        }
    }

    fn invalidate_locked(
        index: &mut Index,
        entries: &moka::sync::Cache<CacheKey, Arc<Cached>>,
        span: &Span,
    ) {
        let doomed_points: Vec<Vec<u8>> = match span {
            Span::Key(k) => index
                .points
                .contains_key(k)
                .then(|| k.clone())
                .into_iter()
                .collect(),
            Span::Range(start, end) => {
                let upper = end
                    .as_ref()
                    .map_or(Bound::Unbounded, |e| Bound::Excluded(e.clone()));
                index
                    .points
                    .range((Bound::Included(start.clone()), upper))
                    .map(|(k, _)| k.clone())
                    .collect()
            }
        };
        for k in doomed_points {
            for key in index.points.remove(&k).unwrap_or_default() {
                entries.invalidate(&key);
            }
        }
        index.ranges.retain(|(s, key)| {
            let hit = s.overlaps(span);
            if hit {
                entries.invalidate(key);
            }
            !hit
        });
    }

    fn feed_events(&self, keys: &[Vec<u8>], through: i64) {
        let mut index = self.index();
        for k in keys {
            Self::invalidate_locked(&mut index, &self.entries, &Span::Key(k.clone()));
        }
        index.feed_rev = index.feed_rev.max(through);
    }

    fn feed_live(&self, live: bool, revision: Option<i64>) {
        let mut index = self.index();
        index.live = live;
        if let Some(r) = revision {
            index.feed_rev = index.feed_rev.max(r);
        }
    }

    fn clear(&self) {
        let mut index = self.index();
        index.live = false;
        index.feed_rev = 0;
        index.points.clear();
        index.ranges.clear();
        self.entries.invalidate_all();
    }

    fn feed_rev(&self) -> i64 {
        self.index().feed_rev
    }

    /// Cached entries and their weighted size (for metrics).
    pub fn usage(&self) -> (u64, u64) {
        self.entries.run_pending_tasks();
        (self.entries.entry_count(), self.entries.weighted_size())
    }

    /// Runs the invalidation feed until `stop` fires: one upstream watch on every key, resumed
    /// on another member from the next revision after a failure.
    pub async fn run_feed(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        if !self.enabled {
            return;
        }
        loop {
            let delay = tokio::select! {
                d = self.feed_once() => d,
                _ = stop.changed() => return,
            };
            self.feed_live(false, None);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// One feed connection; returns how long to wait before the next.
    async fn feed_once(&self) -> Duration {
        let (member, channel) = self.upstream.pick();
        let from = self.feed_rev();
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: vec![0],
                    range_end: vec![0],
                    start_revision: if from > 0 { from + 1 } else { 0 },
                    progress_notify: true,
                    ..Default::default()
                },
            )),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx.send(create).await;
        // `hasleader`: a member cut off from the leader cannot feed the cache (its history
        // would stop while writes go on elsewhere).
        let mut requests = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        requests.metadata_mut().insert(
            "hasleader",
            tonic::metadata::MetadataValue::from_static("true"),
        );
        let mut responses = match WatchClient::new(channel).watch(requests).await {
            Ok(r) => r.into_inner(),
            Err(_) => {
                self.upstream.failed(member);
                return FEED_RETRY;
            }
        };
        loop {
            let msg = tokio::select! {
                m = responses.next() => m,
                () = self.upstream.unhealthy(member) => break,
            };
            let Some(Ok(resp)) = msg else { break };
            let header_rev = resp.header.as_ref().map_or(0, |h| h.revision);
            if resp.compact_revision != 0 {
                tracing::info!(
                    compacted = resp.compact_revision,
                    "cache feed cannot resume; emptying the range cache"
                );
                self.clear();
                return FEED_RETRY;
            }
            if resp.canceled {
                tracing::warn!(reason = %resp.cancel_reason, "cache feed refused; cache off");
                self.clear();
                return FEED_REFUSED_RETRY;
            }
            if resp.created {
                // Resuming: live once the feed is where it was; fresh: live at the member's
                // current revision.
                self.feed_live(true, (from == 0).then_some(header_rev));
                continue;
            }
            if resp.events.is_empty() {
                // A progress notification: every event up to it was delivered.
                self.feed_events(&[], header_rev);
                continue;
            }
            let through = resp
                .events
                .iter()
                .filter_map(|e| e.kv.as_ref().map(|kv| kv.mod_revision))
                .max()
                .unwrap_or(0);
            let keys: Vec<Vec<u8>> = resp
                .events
                .into_iter()
                .filter_map(|e| e.kv.map(|kv| kv.key))
                .collect();
            self.feed_events(&keys, through);
        }
        drop(tx);
        self.upstream.failed(member);
        FEED_RETRY
    }
}

/// Whether a `Range` may be answered from or stored in the cache.
pub fn cacheable(req: &pb::RangeRequest) -> bool {
    req.revision == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream() -> Arc<Upstream> {
        use clap::Parser;
        let config = crate::config::Config::parse_from([
            "keyhold-proxy",
            "--endpoints",
            "127.0.0.1:1",
            "--listen-addr",
            "127.0.0.1:0",
            "--cache-bytes",
            "1048576",
        ])
        .validate()
        .expect("config");
        Upstream::new(&config).expect("upstream")
    }

    fn answer(revision: i64, value: &[u8]) -> pb::RangeResponse {
        pb::RangeResponse {
            header: Some(pb::ResponseHeader {
                revision,
                ..Default::default()
            }),
            kvs: vec![keyhold_proto::mvccpb::KeyValue {
                key: b"k".to_vec(),
                value: value.to_vec(),
                ..Default::default()
            }],
            count: 1,
            ..Default::default()
        }
    }

    fn get(key: &[u8], end: &[u8]) -> pb::RangeRequest {
        pb::RangeRequest {
            key: key.to_vec(),
            range_end: end.to_vec(),
            serializable: true,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn nothing_is_served_or_stored_without_a_live_feed() {
        let cache = RangeCache::new(1 << 20, upstream());
        let k = RangeCache::key(b"", &get(b"k", b""));
        cache.insert(k.clone(), Span::Key(b"k".to_vec()), &answer(5, b"v"));
        assert!(cache.get(&k).is_none());
        cache.feed_live(true, Some(5));
        cache.insert(k.clone(), Span::Key(b"k".to_vec()), &answer(5, b"v"));
        assert_eq!(
            cache.get(&k).map(|r| r.kvs[0].value.clone()),
            Some(b"v".to_vec())
        );
        cache.feed_live(false, None);
        assert!(cache.get(&k).is_none(), "a feed gap stops serving");
    }

    #[tokio::test]
    async fn events_invalidate_points_prefixes_and_from_key_ranges() {
        let cache = RangeCache::new(1 << 20, upstream());
        cache.feed_live(true, Some(5));
        let point = RangeCache::key(b"", &get(b"k", b""));
        let prefix = RangeCache::key(b"", &get(b"k", b"l"));
        let from_key = RangeCache::key(b"", &get(b"a", b"\0"));
        let other = RangeCache::key(b"", &get(b"z", b""));
        cache.insert(point.clone(), Span::of(b"k", b""), &answer(5, b"v"));
        cache.insert(prefix.clone(), Span::of(b"k", b"l"), &answer(5, b"v"));
        cache.insert(from_key.clone(), Span::of(b"a", b"\0"), &answer(5, b"v"));
        cache.insert(other.clone(), Span::of(b"z", b""), &answer(5, b"v"));
        cache.feed_events(&[b"k".to_vec()], 6);
        assert!(cache.get(&point).is_none());
        assert!(cache.get(&prefix).is_none());
        assert!(
            cache.get(&from_key).is_none(),
            "\"\\0\" range end covers every later key"
        );
        let kept = cache.get(&other).expect("untouched key stays cached");
        assert_eq!(
            kept.header.map(|h| h.revision),
            Some(6),
            "valid at the feed revision"
        );
    }

    #[tokio::test]
    async fn answers_older_than_the_feed_or_than_what_was_returned_are_not_used() {
        let up = upstream();
        let cache = RangeCache::new(1 << 20, up.clone());
        cache.feed_live(true, Some(10));
        let k = RangeCache::key(b"", &get(b"k", b""));
        cache.insert(k.clone(), Span::Key(b"k".to_vec()), &answer(9, b"old"));
        assert!(
            cache.get(&k).is_none(),
            "an answer behind the feed may miss an event"
        );
        cache.insert(k.clone(), Span::Key(b"k".to_vec()), &answer(10, b"v"));
        assert!(cache.get(&k).is_some());
        up.observe(11);
        assert!(cache.get(&k).is_none(), "the proxy already answered at 11");
        cache.feed_events(&[], 11);
        assert!(cache.get(&k).is_some());
    }

    #[tokio::test]
    async fn identities_do_not_share_entries() {
        let cache = RangeCache::new(1 << 20, upstream());
        cache.feed_live(true, Some(1));
        let alice = RangeCache::key(b"alice-token", &get(b"k", b""));
        let bob = RangeCache::key(b"bob-token", &get(b"k", b""));
        cache.insert(alice.clone(), Span::Key(b"k".to_vec()), &answer(1, b"v"));
        assert!(cache.get(&alice).is_some());
        assert!(cache.get(&bob).is_none());
    }

    #[test]
    fn spans_overlap_as_etcd_ranges_do() {
        let a = Span::of(b"a", b"c");
        assert!(a.overlaps(&Span::of(b"b", b"")));
        assert!(!a.overlaps(&Span::of(b"c", b"")));
        assert!(a.overlaps(&Span::of(b"b", b"\0")));
        assert!(!a.overlaps(&Span::of(b"c", b"d")));
        assert!(Span::of(b"", b"\0").overlaps(&Span::of(b"zzz", b"")));
    }
}
