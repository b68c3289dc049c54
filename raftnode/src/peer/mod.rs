//! The peer plane: members talk raft, forwarded client requests and snapshots over QUIC.
//!
//! ```text
//!  member A                                   member B
//!  Peers::call ──► one QUIC connection per peer ──► server::serve ──► handle (raft / node)
//!                  one bidirectional stream per request: envelope ─► answer
//! ```
//!
//! Every request is its own QUIC stream, so a snapshot or a large append never delays a
//! heartbeat or a forwarded write: streams are independent, there is no head-of-line blocking.
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

use wire::{Answer, Envelope, PeerRequest, PeerResponse};

use crate::error::Error;

/// How long dialing a peer may take before the request counts as unreachable.
const DIAL_TIMEOUT: Duration = Duration::from_secs(1);
/// After a failed dial, further dials to the same address wait this long at first...
const REDIAL_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// ...doubling up to this bound.
const REDIAL_BACKOFF_MAX: Duration = Duration::from_secs(1);

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
        request: PeerRequest,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), PeerError> {
        if self.faults.drops_to(target) {
            return Err(PeerError::Unreachable(
                target,
                "dropped by a test fault".into(),
            ));
        }
        let conn = self.connection(target, addr).await?;
        let (mut send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| PeerError::Unreachable(target, e.to_string()))?;
        let envelope = Envelope {
            from: self.me,
            cluster_id: self.cluster_id.load(Ordering::Relaxed),
            request,
        };
        wire::write_frame(&mut send, &envelope)
            .await
            .map_err(|e| PeerError::Unreachable(target, e.to_string()))?;
        Ok((send, recv))
    }

    /// Sends `request` to `target` and waits up to `timeout` for its answer.
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
        let exchange = async {
            let (mut send, mut recv) = self.open(target, addr, request).await?;
            let _ = send.finish();
            await_answer(target, &mut recv).await
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(PeerError::Failed(target, "timed out".into())),
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

    /// Both ends read each stream to its end, so neither sends STOP_SENDING: a request costs
    /// one packet each way, not two. (A current-thread runtime keeps each frame and its end in
    /// one packet, which a multi-threaded one usually but not always does.)
    #[tokio::test]
    async fn a_request_stream_is_read_to_its_end_on_both_sides() {
        let local: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let hosts = ["127.0.0.1".to_string()];
        let tls = || tls::build(&PeerTlsConfig::Auto, &hosts).expect("tls");
        let (client, _) = Peers::bind(1, local, tls()).expect("bind");
        let (_server, endpoint) = Peers::bind(2, local, tls()).expect("bind");
        let addr = endpoint.local_addr().expect("addr");
        let answering = tokio::spawn(async move {
            let conn = endpoint
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("conn");
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let envelope: Envelope = wire::read_frame(&mut recv).await.expect("request");
                assert!(matches!(envelope.request, PeerRequest::ReadIndex));
                wire::take_end(&mut recv);
                let answer: Answer = Ok(PeerResponse::ReadIndex(7));
                wire::write_frame(&mut send, &answer).await.expect("answer");
                send.finish().expect("finish");
            }
            conn.stats().frame_tx.stop_sending
        });
        for _ in 0..20 {
            let answer = client
                .call(2, addr, PeerRequest::ReadIndex, Duration::from_secs(5))
                .await
                .expect("call");
            assert!(matches!(answer, PeerResponse::ReadIndex(7)));
        }
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
        conn.close(0u32.into(), b"done");
        let stopped = answering.await.expect("server task");
        assert_eq!(stopped, 0, "the server stopped a stream");
    }
}
