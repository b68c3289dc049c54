//! Lease: grants, revokes and TTL queries relayed; keepalives coalesced.
//!
//! ```text
//!  client streams ──keepalive(id)──► Keepalives ──(renewal due?)──► one upstream LeaseKeepAlive
//!        ▲                              │ fresh: answer now                     stream
//!        └──── answer (TTL left) ◄──────┴──── renewal answer pays every waiter ◄─┘
//! ```
//!
//! A lease is renewed upstream only when a client asks and the last renewal is older than a
//! third of its TTL; younger renewals answer at once with the TTL the member still grants
//! (counted from when the renewal was *sent*, so it is never more than the truth). Renewals
//! happen only on client demand, so a lease nobody keeps alive expires within one TTL, and a
//! client that sends one keepalive and half-closes still gets its answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use keyhold_proto::etcdserverpb as pb;
use keyhold_proto::etcdserverpb::lease_client::LeaseClient;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::forward::unary;
use crate::upstream::Retry::{Immutable, Mutable};
use crate::upstream::Upstream;

/// Renewals waiting to go upstream.
const RENEWAL_QUEUE_MAX: usize = 4096;
/// Answers queued towards one client stream.
const OUT_QUEUE_MAX: usize = 16;
/// Keepalives one client stream may have waiting for an answer.
const PENDING_PER_STREAM_MAX: usize = 1024;
/// A renewal unanswered for this long is sent again (on the next keepalive).
const RENEWAL_TIMEOUT: Duration = Duration::from_secs(3);
/// A client keepalive unanswered for this long fails with `request timed out`.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Delay before reopening the upstream stream after a failure.
const RECONNECT_DELAY: Duration = Duration::from_millis(100);
/// Leases tracked at once (each keepalive of an untracked lease beyond it goes upstream alone).
const LEASES_MAX: usize = 1_000_000;

#[derive(Default)]
struct LeaseState {
    /// TTL granted by the last renewal, seconds (0 = none yet).
    ttl: i64,
    /// When that renewal was sent.
    renewed: Option<Instant>,
    header: Option<pb::ResponseHeader>,
    waiters: Vec<oneshot::Sender<pb::LeaseKeepAliveResponse>>,
    /// When the outstanding renewal was sent.
    in_flight: Option<Instant>,
}

/// The keepalive coalescer (one per proxy).
pub struct Keepalives {
    leases: Mutex<HashMap<i64, LeaseState>>,
    renewals: mpsc::Sender<i64>,
}

impl Keepalives {
    /// The coalescer and the upstream stream task's input.
    pub fn new() -> (Arc<Self>, mpsc::Receiver<i64>) {
        let (renewals, rx) = mpsc::channel(RENEWAL_QUEUE_MAX);
        (
            Arc::new(Self {
                leases: Mutex::default(),
                renewals,
            }),
            rx,
        )
    }

    fn leases(&self) -> MutexGuard<'_, HashMap<i64, LeaseState>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers one client keepalive for lease `id`.
    async fn keepalive(self: Arc<Self>, id: i64) -> Result<pb::LeaseKeepAliveResponse, Error> {
        let rx = {
            let mut leases = self.leases();
            if leases.len() >= LEASES_MAX && !leases.contains_key(&id) {
                leases.retain(|_, l| !l.waiters.is_empty() || l.in_flight.is_some());
                if leases.len() >= LEASES_MAX {
                    return Err(Error::TooManyRequests);
                }
            }
            let lease = leases.entry(id).or_default();
            let now = Instant::now();
            if let Some(at) = lease.renewed {
                let age = now - at;
                let ttl = Duration::from_secs(lease.ttl.max(0) as u64);
                // Fresh (younger than a third of the TTL) and at least a whole second left:
                // short leases are always renewed upstream, never answered with TTL 0.
                if lease.ttl > 0 && age < ttl / 3 && (ttl - age).as_secs() >= 1 {
                    metrics::counter!("keyhold_proxy_keepalives_coalesced_total").increment(1);
                    return Ok(pb::LeaseKeepAliveResponse {
                        header: lease.header,
                        id,
                        ttl: (ttl - age).as_secs() as i64,
                    });
                }
            }
            if lease.in_flight.is_none_or(|t| now - t > RENEWAL_TIMEOUT) {
                self.renewals
                    .try_send(id)
                    .map_err(|_| Error::TooManyRequests)?;
                lease.in_flight = Some(now);
            }
            let (tx, rx) = oneshot::channel();
            lease.waiters.push(tx);
            rx
        };
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(Error::Stopped),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// An upstream renewal answer: pays every waiter of that lease.
    fn renewed(&self, answer: pb::LeaseKeepAliveResponse) {
        let mut leases = self.leases();
        let Some(mut lease) = leases.remove(&answer.id) else {
            return;
        };
        for w in lease.waiters.drain(..) {
            let _ = w.send(answer);
        }
        if answer.ttl > 0 {
            lease.ttl = answer.ttl;
            lease.renewed = lease.in_flight.take().or(Some(Instant::now()));
            lease.header = answer.header;
            leases.insert(answer.id, lease);
        }
        // A lease that is gone (TTL 0) is forgotten.
    }

    /// Forgets lease `id` (revoked through this proxy).
    fn forget(&self, id: i64) {
        self.leases().remove(&id);
    }

    /// Leases with a renewal on the way (sent again after a reconnect).
    fn in_flight(&self) -> Vec<i64> {
        self.leases()
            .iter()
            .filter(|(_, l)| l.in_flight.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Runs the upstream keepalive stream until `stop` fires, reopening it on another member
    /// after a failure.
    pub async fn run_upstream(
        self: Arc<Self>,
        upstream: Arc<Upstream>,
        mut renewals: mpsc::Receiver<i64>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let (member, channel) = upstream.pick();
            let (tx, rx) = mpsc::channel::<pb::LeaseKeepAliveRequest>(RENEWAL_QUEUE_MAX);
            for id in self.in_flight() {
                let _ = tx.try_send(pb::LeaseKeepAliveRequest { id });
            }
            let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
            let mut client = LeaseClient::new(channel);
            let opened = tokio::select! {
                r = client.lease_keep_alive(requests) => r,
                _ = stop.changed() => return,
            };
            if let Ok(responses) = opened {
                let mut responses = responses.into_inner();
                loop {
                    tokio::select! {
                        id = renewals.recv() => match id {
                            Some(id) => {
                                metrics::counter!("keyhold_proxy_keepalive_renewals_total").increment(1);
                                if tx.send(pb::LeaseKeepAliveRequest { id }).await.is_err() {
                                    break;
                                }
                            }
                            None => return,
                        },
                        answer = responses.next() => match answer {
                            Some(Ok(a)) => self.renewed(a),
                            _ => break,
                        },
                        () = upstream.unhealthy(member) => break,
                        _ = stop.changed() => return,
                    }
                }
            }
            upstream.failed(member);
            tokio::select! {
                _ = tokio::time::sleep(RECONNECT_DELAY) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

/// Lease service.
pub struct LeaseService {
    pub upstream: Arc<Upstream>,
    pub keepalives: Arc<Keepalives>,
    /// `--namespace` (TimeToLive lists only this namespace's keys).
    pub ns: crate::namespace::Namespace,
}

#[tonic::async_trait]
impl pb::lease_server::Lease for LeaseService {
    unary!(
        lease_grant,
        pb::LeaseGrantRequest,
        pb::LeaseGrantResponse,
        LeaseClient,
        Mutable
    );
    async fn lease_time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let (meta, _, message) = request.into_parts();
        let mut answer = self
            .upstream
            .call(Immutable, |channel| {
                let req = crate::upstream::forward(&meta, message);
                async move {
                    LeaseClient::new(channel)
                        .lease_time_to_live(req)
                        .await
                        .map(Response::into_inner)
                }
            })
            .await?;
        self.ns.lease_keys(&mut answer.keys);
        Ok(Response::new(answer))
    }
    unary!(
        lease_leases,
        pb::LeaseLeasesRequest,
        pb::LeaseLeasesResponse,
        LeaseClient,
        Immutable
    );

    async fn lease_revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let (meta, _, message) = request.into_parts();
        self.keepalives.forget(message.id);
        let answer = self
            .upstream
            .call(Mutable, |channel| {
                let req = crate::upstream::forward(&meta, message);
                async move {
                    LeaseClient::new(channel)
                        .lease_revoke(req)
                        .await
                        .map(Response::into_inner)
                }
            })
            .await?;
        self.keepalives.forget(message.id);
        Ok(Response::new(answer))
    }

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<BoxStream<pb::LeaseKeepAliveResponse>>, Status> {
        let mut input = request.into_inner();
        let keepalives = self.keepalives.clone();
        let (tx, rx) = mpsc::channel(OUT_QUEUE_MAX);
        tokio::spawn(async move {
            let mut pending = FuturesUnordered::new();
            let mut input_open = true;
            loop {
                if !input_open && pending.is_empty() {
                    break;
                }
                tokio::select! {
                    msg = input.next(), if input_open && pending.len() < PENDING_PER_STREAM_MAX => match msg {
                        Some(Ok(r)) => pending.push(keepalives.clone().keepalive(r.id)),
                        // Half-closed: answer what was asked, then end.
                        None => input_open = false,
                        Some(Err(_)) => break,
                    },
                    Some(answer) = pending.next() => {
                        let out = answer.map_err(Status::from);
                        let failed = out.is_err();
                        if tx.send(out).await.is_err() || failed {
                            break;
                        }
                    }
                    _ = tx.closed() => break,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(id: i64, ttl: i64) -> pb::LeaseKeepAliveResponse {
        pb::LeaseKeepAliveResponse {
            header: None,
            id,
            ttl,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_renewal_answers_every_waiter_and_fresh_ones_answer_locally() {
        let (ka, mut renewals) = Keepalives::new();
        let a = tokio::spawn(ka.clone().keepalive(7));
        let b = tokio::spawn(ka.clone().keepalive(7));
        tokio::task::yield_now().await;
        assert_eq!(renewals.recv().await, Some(7));
        assert!(
            renewals.try_recv().is_err(),
            "one renewal for two keepalives"
        );
        ka.renewed(answer(7, 30));
        assert_eq!(a.await.expect("join").expect("answer").ttl, 30);
        assert_eq!(b.await.expect("join").expect("answer").ttl, 30);
        tokio::time::advance(Duration::from_secs(4)).await;
        let local = ka.clone().keepalive(7).await.expect("answer");
        assert_eq!(local.ttl, 26, "TTL left since the renewal was sent");
        assert!(
            renewals.try_recv().is_err(),
            "fresh renewal: nothing sent upstream"
        );
        tokio::time::advance(Duration::from_secs(7)).await;
        let c = tokio::spawn(ka.clone().keepalive(7));
        tokio::task::yield_now().await;
        assert_eq!(
            renewals.recv().await,
            Some(7),
            "older than TTL/3: renewed upstream"
        );
        ka.renewed(answer(7, 0));
        assert_eq!(
            c.await.expect("join").expect("answer").ttl,
            0,
            "a lost lease answers TTL 0"
        );
        assert!(ka.leases().is_empty(), "and is forgotten");
    }
}
