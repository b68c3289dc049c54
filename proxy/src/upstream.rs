//! The storage members behind the proxy: one lazily connected channel per member, liveness
//! from the gRPC health protocol plus HTTP/2 keepalive pings, and the retry rules.
//!
//! Requests go to the *preferred* member (sticky, so one client's reads see one member's
//! history); when it fails they move on to the next healthy one. Immutable requests (reads) are
//! retried on another member after `Unavailable`; mutable ones only when the request provably
//! never left the proxy (the connection could not be made), so a write is never applied twice.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::config::ValidConfig;
use crate::error::{Error, Result};

/// How often each member's health is checked.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A health check that takes longer counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Failed health checks in a row that mark a member unhealthy.
const PROBE_FAILURES_MAX: u32 = 2;
/// How often long-lived streams check that their member is still healthy.
const STREAM_HEALTH_POLL: Duration = Duration::from_millis(250);
/// Connecting to a member gives up after this long (the request then moves on).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether a request may be repeated on another member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Reads: repeated on another member after `Unavailable`.
    Immutable,
    /// Writes: repeated only when they never reached a member.
    Mutable,
}

/// One storage member.
pub struct Member {
    /// `http://host:port`.
    pub url: String,
    channel: Channel,
    healthy: AtomicBool,
    /// Test-only fault (failpoints builds): the proxy acts as if partitioned from this member.
    blocked: AtomicBool,
    /// Health checks failed in a row.
    probe_failures: std::sync::atomic::AtomicU32,
}

/// The member set.
pub struct Upstream {
    members: Vec<Member>,
    preferred: AtomicUsize,
    /// Highest store revision seen in any answer (bounds how old a cached or reordered read
    /// may be; see `cache.rs` and `--serializable-ordering`).
    observed: AtomicI64,
}

/// Whether `status` proves the request never reached a member (no connection was made).
pub fn never_sent(status: &Status) -> bool {
    status.code() == Code::Unavailable && {
        let m = status.message();
        m.contains("connect") || m.contains("Connection refused") || m.contains("dns error")
    }
}

/// Whether `status` says the member (not the request) is at fault, so another may do better.
fn member_unavailable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown)
        && status.message() != "etcdserver: request timed out"
}

/// Metadata keys that belong to one HTTP/2 hop and are not forwarded.
fn hop_header(key: &str) -> bool {
    key.starts_with("grpc-")
        || matches!(
            key,
            "content-type" | "te" | "user-agent" | "host" | "accept-encoding"
        )
}

/// Copies a client's metadata (auth `token`, `hasleader`, ...) onto an upstream request.
pub fn forward<T>(meta: &MetadataMap, message: T) -> Request<T> {
    let mut req = Request::new(message);
    let out = req.metadata_mut();
    for kv in meta.iter() {
        if let tonic::metadata::KeyAndValueRef::Ascii(k, v) = kv
            && !hop_header(k.as_str())
        {
            out.append(k.clone(), v.clone());
        }
    }
    req
}

impl Upstream {
    /// Channels to every endpoint (connected on first use).
    ///
    /// # Errors
    /// An endpoint URL tonic cannot parse.
    pub fn new(config: &ValidConfig) -> anyhow::Result<Arc<Self>> {
        let mut members = Vec::new();
        for url in &config.endpoints {
            let mut endpoint = Endpoint::from_shared(url.clone())?;
            if url.starts_with("https://") {
                let tls = config
                    .upstream_tls
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("{url}: no TLS configuration"))?;
                endpoint = endpoint.tls_config(tls)?;
            }
            let channel = endpoint
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(config.dial_keepalive_time)
                .keep_alive_timeout(config.dial_keepalive_timeout)
                .keep_alive_while_idle(true)
                .connect_lazy();
            members.push(Member {
                url: url.clone(),
                channel,
                healthy: AtomicBool::new(true),
                blocked: AtomicBool::new(false),
                probe_failures: std::sync::atomic::AtomicU32::new(0),
            });
        }
        Ok(Arc::new(Self {
            members,
            preferred: AtomicUsize::new(0),
            observed: AtomicI64::new(0),
        }))
    }

    /// The members, in configuration order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Channels of the members not cut off by a test fault, in configuration order.
    pub fn reachable_channels(&self) -> Vec<Channel> {
        self.members
            .iter()
            .filter(|m| !m.blocked.load(Ordering::Relaxed))
            .map(|m| m.channel.clone())
            .collect()
    }

    /// The preferred member's index and channel.
    pub fn pick(&self) -> (usize, Channel) {
        let mut i = self.preferred.load(Ordering::Relaxed) % self.members.len();
        if self.members[i].blocked.load(Ordering::Relaxed) {
            self.move_preference_from(i);
            i = self.preferred.load(Ordering::Relaxed) % self.members.len();
        }
        (i, self.members[i].channel.clone())
    }

    /// Marks member `i` failed and moves the preference to the next healthy member.
    pub fn failed(&self, i: usize) {
        if self.members[i].healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(member = %self.members[i].url, "member marked unhealthy");
            metrics::gauge!("keyhold_proxy_endpoint_healthy", "endpoint" => self.members[i].url.clone())
                .set(0.0);
        }
        self.move_preference_from(i);
    }

    fn move_preference_from(&self, i: usize) {
        let n = self.members.len();
        for step in 1..=n {
            let j = (i + step) % n;
            if self.healthy(j) {
                let _ = self
                    .preferred
                    .compare_exchange(i, j, Ordering::Relaxed, Ordering::Relaxed);
                return;
            }
        }
        // Nobody healthy: try the next one anyway (it may be back before the prober knows).
        let _ =
            self.preferred
                .compare_exchange(i, (i + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Order in which a request tries the members: the preferred one, then the other healthy
    /// ones, then the unhealthy ones (the prober may be behind).
    fn attempt_order(&self) -> Vec<usize> {
        let n = self.members.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut order: Vec<usize> = (0..n).map(|s| (first + s) % n).collect();
        order.sort_by_key(|&i| i != first && !self.healthy(i));
        order
    }

    /// Runs `call` against members until one answers, following the retry rule of `retry`.
    ///
    /// # Errors
    /// The last member's error when none answered.
    pub async fn call<T, F, Fut>(&self, retry: Retry, mut call: F) -> Result<T>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = std::result::Result<T, Status>>,
    {
        let mut last = None;
        for i in self.attempt_order() {
            if self.members[i].blocked.load(Ordering::Relaxed) {
                self.failed(i);
                last = Some(Status::unavailable("test fault: cannot connect to member"));
                continue;
            }
            match call(self.members[i].channel.clone()).await {
                Ok(v) => return Ok(v),
                Err(s) => {
                    let again = match retry {
                        Retry::Immutable => member_unavailable(&s),
                        Retry::Mutable => never_sent(&s),
                    };
                    if member_unavailable(&s) {
                        self.failed(i);
                    }
                    if !again {
                        return Err(Error::Upstream(s));
                    }
                    last = Some(s);
                }
            }
        }
        Err(last.map_or_else(|| Error::NoEndpoint("no members".into()), Error::Upstream))
    }

    /// Whether member `i` passed its last health check.
    pub fn healthy(&self, i: usize) -> bool {
        self.members[i].healthy.load(Ordering::Relaxed)
            && !self.members[i].blocked.load(Ordering::Relaxed)
    }

    /// Test-only (failpoints builds): cut the proxy off from the members at these URLs (an
    /// empty list heals). Returns how many members are now blocked.
    pub fn block(&self, urls: &[String]) -> usize {
        let mut n = 0;
        for (i, m) in self.members.iter().enumerate() {
            let blocked = urls.iter().any(|u| u == &m.url);
            m.blocked.store(blocked, Ordering::Relaxed);
            if blocked {
                n += 1;
                self.failed(i);
            }
        }
        n
    }

    /// Resolves once member `i` is marked unhealthy while another member is healthy (polled;
    /// long-lived streams use it to leave a member that stopped answering before their own
    /// HTTP/2 keepalive notices; with nowhere better to go they stay).
    pub async fn unhealthy(&self, i: usize) {
        let mut tick = tokio::time::interval(STREAM_HEALTH_POLL);
        loop {
            tick.tick().await;
            if !self.healthy(i) && (0..self.members.len()).any(|j| j != i && self.healthy(j)) {
                return;
            }
        }
    }

    /// Notes a revision seen in an answer.
    pub fn observe(&self, revision: i64) {
        self.observed.fetch_max(revision, Ordering::Relaxed);
    }

    /// Highest revision seen in any answer.
    pub fn observed(&self) -> i64 {
        self.observed.load(Ordering::Relaxed)
    }

    /// Checks every member's health once a second until `stop` fires.
    pub async fn probe(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::health_client::HealthClient;
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            for (i, m) in self.members.iter().enumerate() {
                let mut client = HealthClient::new(m.channel.clone());
                let check = client.check(HealthCheckRequest {
                    service: String::new(),
                });
                let ok = !m.blocked.load(Ordering::Relaxed)
                    && matches!(
                        tokio::time::timeout(PROBE_TIMEOUT, check).await,
                        Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32
                    );
                // One slow answer on a loaded machine is not a dead member: two failed checks
                // in a row are (a failed request marks it at once, see `call`).
                let failures = if ok {
                    m.probe_failures.store(0, Ordering::Relaxed);
                    0
                } else {
                    m.probe_failures.fetch_add(1, Ordering::Relaxed) + 1
                };
                let ok = ok || (failures < PROBE_FAILURES_MAX && m.healthy.load(Ordering::Relaxed));
                let was = m.healthy.swap(ok, Ordering::Relaxed);
                metrics::gauge!("keyhold_proxy_endpoint_healthy", "endpoint" => m.url.clone())
                    .set(if ok { 1.0 } else { 0.0 });
                if ok && !was {
                    tracing::info!(member = %m.url, "member healthy again");
                }
                if !ok {
                    if was {
                        tracing::warn!(member = %m.url, "member failed its health check");
                    }
                    self.move_preference_from(i);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connection_failures_count_as_never_sent() {
        let refused = Status::unavailable("error trying to connect: tcp connect error");
        assert!(never_sent(&refused));
        assert!(!never_sent(&Status::unavailable("etcdserver: no leader")));
        assert!(!never_sent(&Status::unavailable(
            "etcdserver: request timed out"
        )));
        assert!(!never_sent(&Status::invalid_argument("connect")));
    }

    #[test]
    fn forwarding_keeps_credentials_and_drops_hop_headers() {
        let mut meta = MetadataMap::new();
        meta.insert("token", "abc".parse().expect("value"));
        meta.insert("hasleader", "true".parse().expect("value"));
        meta.insert("te", "trailers".parse().expect("value"));
        meta.insert("grpc-timeout", "5S".parse().expect("value"));
        let req = forward(&meta, ());
        let out = req.metadata();
        assert_eq!(out.get("token").and_then(|v| v.to_str().ok()), Some("abc"));
        assert_eq!(
            out.get("hasleader").and_then(|v| v.to_str().ok()),
            Some("true")
        );
        assert!(out.get("te").is_none() && out.get("grpc-timeout").is_none());
    }
}
