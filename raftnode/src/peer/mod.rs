//! The peer plane: members talk raft, forwarded client requests and snapshots over QUIC.
//!
//! ```text
//!  member A                                   member B
//!  Peers::call ──► one QUIC connection per peer ──► server::serve ──► handle (raft / node)
//!                  request streams, each: envelope ─► answer, envelope ─► answer, ...
//! ```
//!
//! A request stream carries one request at a time and is kept open between requests: each
//! replication task (one per follower) keeps one for its AppendEntries and heartbeats, and other
//! calls take a kept stream from a small pool, or open one when none is idle. Streams are
//! independent, so a snapshot (a stream of its own, ended with its data), a large append or a
//! slow forwarded write never delays a heartbeat: there is no head-of-line blocking. Keeping
//! streams saves, per request, opening, accepting and ending a stream and the task the
//! receiver starts for each stream.
//!
//! - [`wire`]: messages and length-prefixed frames with a size limit.
//! - [`tls`]: mutual TLS from certificate files, or auto TLS.
//! - [`server`]: the accept loop and request handlers.

pub mod server;
pub mod tls;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use wire::{Answer, EnvelopeRef, PeerRequest, PeerResponse};

use crate::error::Error;

/// How long dialing a peer may take before the request counts as unreachable.
const DIAL_TIMEOUT: Duration = Duration::from_secs(1);
/// After a failed dial, further dials to the same address wait this long at first...
const REDIAL_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// ...doubling up to this bound.
const REDIAL_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Request streams kept open per peer between calls (a stream serves one call at a time; more
/// calls at once open more streams, and those beyond this are ended after their call).
const IDLE_STREAMS_PER_PEER_MAX: usize = 8;

/// Why a peer request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// The request never left this member (no connection): safe to retry anywhere.
    #[error("peer {0:x} unreachable: {1}")]
    Unreachable(u64, String),
    /// The request may or may not have been handled (stream broken, timed out).
    #[error("peer {0:x} failed: {1}")]
    Failed(u64, String),
    /// The peer handled the request and answered with an error.
    #[error(transparent)]
    Remote(Error),
}

/// Test-only transport faults (set through the failpoints HTTP endpoint): traffic to or from
/// the listed members is dropped, which partitions this member from them (one-way when only
/// one direction is listed).
#[derive(Debug, Default)]
pub struct Faults {
    drop_to: RwLock<HashSet<u64>>,
    drop_from: RwLock<HashSet<u64>>,
}

impl Faults {
    /// Replaces the dropped destinations and sources.
    pub fn set(&self, to: HashSet<u64>, from: HashSet<u64>) {
        if let Ok(mut d) = self.drop_to.write() {
            *d = to;
        }
        if let Ok(mut d) = self.drop_from.write() {
            *d = from;
        }
    }

    fn drops_to(&self, id: u64) -> bool {
        self.drop_to.read().is_ok_and(|d| d.contains(&id))
    }

    /// Whether requests from `id` are dropped.
    pub fn drops_from(&self, id: u64) -> bool {
        self.drop_from.read().is_ok_and(|d| d.contains(&id))
    }
}

/// A request stream kept open for a sequence of requests to one peer, each answered before
/// the next is sent: one per replication task (its AppendEntries and heartbeats), and the idle
/// pool [`Peers::call`] draws on. Per request it saves opening, accepting and closing a stream,
/// and the task the peer starts for each stream it accepts.
pub struct RequestStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

/// One cached connection slot per peer address; dials to one address are serialized, dials to
/// different addresses are not (a dead peer never delays heartbeats to live ones).
#[derive(Default)]
struct Slot {
    conn: Option<quinn::Connection>,
    /// Next dial not before this instant, and the current backoff.
    retry: Option<(tokio::time::Instant, Duration)>,
}

/// This member's side of the peer plane: the QUIC endpoint (listening and dialing on one UDP
/// socket) and the connections it holds.
pub struct Peers {
    me: u64,
    cluster_id: AtomicU64,
    endpoint: quinn::Endpoint,
    slots: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Slot>>>>,
    /// Request streams kept between calls, per peer address.
    idle: Mutex<HashMap<SocketAddr, Vec<RequestStream>>>,
    /// Test-only transport faults.
    pub faults: Faults,
}

impl Peers {
    /// Binds the peer endpoint.
    ///
    /// # Errors
    /// When the UDP socket cannot be bound.
    pub fn bind(
        me: u64,
        listen: SocketAddr,
        tls: tls::PeerTls,
    ) -> std::io::Result<(Arc<Self>, quinn::Endpoint)> {
        let mut endpoint = quinn::Endpoint::server(tls.server, listen)?;
        endpoint.set_default_client_config(tls.client);
        let peers = Arc::new(Self {
            me,
            cluster_id: AtomicU64::new(0),
            endpoint: endpoint.clone(),
            slots: Mutex::default(),
            idle: Mutex::default(),
            faults: Faults::default(),
        });
        Ok((peers, endpoint))
    }

    /// Sets the cluster ID sent with every request.
    pub fn set_cluster_id(&self, id: u64) {
        self.cluster_id.store(id, Ordering::Relaxed);
    }

    fn slot(&self, addr: SocketAddr) -> Arc<tokio::sync::Mutex<Slot>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(addr).or_default().clone()
    }

    async fn connection(
        &self,
        target: u64,
        addr: SocketAddr,
    ) -> Result<quinn::Connection, PeerError> {
        let unreachable = |e: String| PeerError::Unreachable(target, e);
        let slot = self.slot(addr);
        let mut slot = slot.lock().await;
        if let Some(c) = &slot.conn {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
            slot.conn = None;
        }
        if let Some((not_before, _)) = slot.retry
            && tokio::time::Instant::now() < not_before
        {
            return Err(unreachable("backing off after a failed dial".into()));
        }
        let dial = async {
            let host = addr.ip().to_string();
            let connecting = self
                .endpoint
                .connect(addr, &host)
                .map_err(|e| e.to_string())?;
            connecting.await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(DIAL_TIMEOUT, dial).await {
            Ok(Ok(conn)) => {
                slot.conn = Some(conn.clone());
                slot.retry = None;
                Ok(conn)
            }
            failed => {
                let backoff = slot
                    .retry
                    .map_or(REDIAL_BACKOFF_MIN, |(_, b)| (b * 2).min(REDIAL_BACKOFF_MAX));
                slot.retry = Some((tokio::time::Instant::now() + backoff, backoff));
                Err(unreachable(match failed {
                    Ok(Err(e)) => e,
                    _ => "dial timed out".into(),
                }))
            }
        }
    }

    /// Opens a request stream to `target` and sends `request` on it (the stream stays open for
    /// callers that send more frames, such as snapshots).
    ///
    /// # Errors
    /// `Unreachable` when no stream could be opened.
    pub async fn open(
        &self,
        target: u64,
        addr: SocketAddr,
        request: &PeerRequest,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), PeerError> {
        self.check_faults(target)?;
        let conn = self.connection(target, addr).await?;
        let (mut send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| PeerError::Unreachable(target, e.to_string()))?;
        self.write_request(target, &mut send, request).await?;
        Ok((send, recv))
    }

    fn check_faults(&self, target: u64) -> Result<(), PeerError> {
        if self.faults.drops_to(target) {
            return Err(PeerError::Unreachable(
                target,
                "dropped by a test fault".into(),
            ));
        }
        Ok(())
    }

    async fn write_request(
        &self,
        target: u64,
        send: &mut quinn::SendStream,
        request: &PeerRequest,
    ) -> Result<(), PeerError> {
        let envelope = EnvelopeRef {
            from: self.me,
            cluster_id: self.cluster_id.load(Ordering::Relaxed),
            request,
        };
        wire::write_frame(send, &envelope)
            .await
            .map_err(|e| PeerError::Unreachable(target, e.to_string()))
    }

    /// Sends `request` on `stream`, a request stream kept open between calls, and waits up to
    /// `timeout` for its answer. A missing or broken stream (its connection closed) is replaced
    /// by a new one before anything counts as failed. After a failure or a timeout the stream
    /// is dropped, since its answer may still arrive and would be read as the next call's.
    ///
    /// # Errors
    /// See [`PeerError`].
    pub async fn call_on(
        &self,
        stream: &mut Option<RequestStream>,
        target: u64,
        addr: SocketAddr,
        request: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, PeerError> {
        let reused = stream.take();
        let exchange = async {
            let mut sent = None;
            if let Some(mut s) = reused
                && self.check_faults(target).is_ok()
                && self
                    .write_request(target, &mut s.send, request)
                    .await
                    .is_ok()
            {
                sent = Some(s);
            }
            let mut open = match sent {
                Some(s) => s,
                None => {
                    let (send, recv) = self.open(target, addr, request).await?;
                    RequestStream { send, recv }
                }
            };
            let answer: Answer = wire::read_frame(&mut open.recv)
                .await
                .map_err(|e| PeerError::Failed(target, e.to_string()))?;
            Ok((open, answer))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok((open, answer))) => {
                *stream = Some(open);
                answer.map_err(PeerError::Remote)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(PeerError::Failed(target, "timed out".into())),
        }
    }

    /// Sends `request` to `target` and waits up to `timeout` for its answer, on a request
    /// stream kept from an earlier call when one is idle, and keeps the stream for a later
    /// call afterwards.
    ///
    /// # Errors
    /// See [`PeerError`].
    pub async fn call(
        &self,
        target: u64,
        addr: SocketAddr,
        request: PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, PeerError> {
        let mut stream = self.idle_stream(addr);
        let answer = self
            .call_on(&mut stream, target, addr, &request, timeout)
            .await;
        if let Some(s) = stream {
            self.keep_idle(addr, s);
        }
        answer
    }

    fn idle_stream(&self, addr: SocketAddr) -> Option<RequestStream> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.get_mut(&addr).and_then(Vec::pop)
    }

    /// Keeps `stream` for a later call to `addr`, unless enough are kept already (then it is
    /// dropped, which ends it; the peer ends its side in turn).
    fn keep_idle(&self, addr: SocketAddr, stream: RequestStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let kept = idle.entry(addr).or_default();
        if kept.len() < IDLE_STREAMS_PER_PEER_MAX {
            kept.push(stream);
        }
    }

    /// Whether this member holds a live connection to `addr` (a peer that is running and
    /// reachable; used by the strict reconfiguration check).
    pub fn connected(&self, addr: SocketAddr) -> bool {
        let slot = {
            let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.get(&addr).cloned()
        };
        slot.and_then(|s| {
            s.try_lock()
                .ok()
                .map(|s| s.conn.as_ref().is_some_and(|c| c.close_reason().is_none()))
        })
        .unwrap_or(false)
    }

    /// Closes every connection (shutdown).
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
    }
}

/// Reads the answer frame of a request stream.
///
/// # Errors
/// `Failed` when the stream breaks, `Remote` when the peer answered an error.
pub async fn await_answer(
    target: u64,
    recv: &mut quinn::RecvStream,
) -> Result<PeerResponse, PeerError> {
    let answer: Answer = wire::read_frame(recv)
        .await
        .map_err(|e| PeerError::Failed(target, e.to_string()))?;
    wire::take_end(recv);
    answer.map_err(PeerError::Remote)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeerTlsConfig;
    use wire::Envelope;

    /// A caller (member 1) and a peer (member 2) that answers each read index request with how
    /// many requests its stream has carried. Returns the caller, the peer's address, the count
    /// of streams the peer accepted, and the peer's task, which ends with how many STOP_SENDING
    /// frames it sent once its connection is closed.
    fn caller_and_peer() -> (
        Arc<Peers>,
        SocketAddr,
        Arc<AtomicU64>,
        tokio::task::JoinHandle<u64>,
    ) {
        let local: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let hosts = ["127.0.0.1".to_string()];
        let tls = || tls::build(&PeerTlsConfig::Auto, &hosts).expect("tls");
        let (client, _) = Peers::bind(1, local, tls()).expect("bind");
        let (_server, endpoint) = Peers::bind(2, local, tls()).expect("bind");
        let addr = endpoint.local_addr().expect("addr");
        let streams = Arc::new(AtomicU64::new(0));
        let accepted = streams.clone();
        let answering = tokio::spawn(async move {
            let conn = endpoint
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("conn");
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut answered = 0;
                    while let Ok(Some(envelope)) =
                        wire::read_frame_or_end::<Envelope>(&mut recv).await
                    {
                        assert!(matches!(envelope.request, PeerRequest::ReadIndex));
                        answered += 1;
                        let answer: Answer = Ok(PeerResponse::ReadIndex(answered));
                        wire::write_frame(&mut send, &answer).await.expect("answer");
                    }
                    let _ = send.finish();
                });
            }
            conn.stats().frame_tx.stop_sending
        });
        (client, addr, streams, answering)
    }

    /// Calls one after another share one kept stream, and neither end sends STOP_SENDING (one
    /// more packet and wakeup of the other member per request). Calls at once use one stream
    /// each, and are kept for later calls up to the bound.
    #[tokio::test]
    async fn calls_share_kept_streams_and_nothing_is_stopped() {
        let (client, addr, streams, answering) = caller_and_peer();
        let timeout = Duration::from_secs(5);
        for n in 1..=20 {
            let answer = client
                .call(2, addr, PeerRequest::ReadIndex, timeout)
                .await
                .expect("call");
            assert!(
                matches!(answer, PeerResponse::ReadIndex(i) if i == n),
                "{answer:?}"
            );
        }
        assert_eq!(
            streams.load(Ordering::SeqCst),
            1,
            "one stream for calls in turn"
        );
        let at_once = IDLE_STREAMS_PER_PEER_MAX + 4;
        let calls = (0..at_once).map(|_| client.call(2, addr, PeerRequest::ReadIndex, timeout));
        for answer in futures::future::join_all(calls).await {
            assert!(
                matches!(answer, Ok(PeerResponse::ReadIndex(_))),
                "{answer:?}"
            );
        }
        let opened = streams.load(Ordering::SeqCst) as usize;
        assert!(
            opened > 1 && opened <= at_once,
            "{opened} streams for {at_once} calls at once"
        );
        let kept = client
            .idle
            .lock()
            .expect("idle")
            .get(&addr)
            .map_or(0, Vec::len);
        assert!(kept <= IDLE_STREAMS_PER_PEER_MAX, "{kept} streams kept");
        let conn = client
            .slot(addr)
            .lock()
            .await
            .conn
            .clone()
            .expect("connection");
        assert_eq!(
            conn.stats().frame_tx.stop_sending,
            0,
            "the caller stopped a stream"
        );
        client.idle.lock().expect("idle").clear();
        conn.close(0u32.into(), b"done");
        let stopped = answering.await.expect("server task");
        assert_eq!(stopped, 0, "the server stopped a stream");
    }

    /// Requests sent with `call_on` share one stream, answered in order; a test fault drops the
    /// stream, and the next call after it opens a new one.
    #[tokio::test]
    async fn requests_on_a_kept_stream_share_it_until_it_fails() {
        let (client, addr, streams, _answering) = caller_and_peer();
        let timeout = Duration::from_secs(5);
        let mut stream = None;
        for n in 1..=20 {
            let answer = client
                .call_on(&mut stream, 2, addr, &PeerRequest::ReadIndex, timeout)
                .await
                .expect("call");
            assert!(
                matches!(answer, PeerResponse::ReadIndex(i) if i == n),
                "{answer:?}"
            );
            assert!(stream.is_some());
        }
        assert_eq!(streams.load(Ordering::SeqCst), 1, "one stream for all");
        client.faults.set(HashSet::from([2]), HashSet::new());
        let failed = client
            .call_on(&mut stream, 2, addr, &PeerRequest::ReadIndex, timeout)
            .await;
        assert!(
            matches!(failed, Err(PeerError::Unreachable(2, _))),
            "{failed:?}"
        );
        assert!(stream.is_none(), "a failed call drops its stream");
        client.faults.set(HashSet::new(), HashSet::new());
        let answer = client
            .call_on(&mut stream, 2, addr, &PeerRequest::ReadIndex, timeout)
            .await
            .expect("call");
        assert!(matches!(answer, PeerResponse::ReadIndex(1)), "{answer:?}");
        assert_eq!(
            streams.load(Ordering::SeqCst),
            2,
            "a new stream after the failure"
        );
    }
}
