//! The Lease service. Grants and revokes are replicated; keepalives renew the primary's
//! in-memory deadline only (not replicated), as in etcd.

use std::sync::Arc;

use keyhold_proto::etcdserverpb as pb;
use keyhold_proto::etcdserverpb::lease_server::Lease;
use keyhold_store as st;
use tokio_stream::StreamExt;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use super::{admit, current_header, header};
use crate::error::Error;
use crate::node::Node;

/// Responses buffered per keepalive stream before the stream waits for the client.
const KEEPALIVE_QUEUE_MAX: usize = 16;
/// Pause before retrying a renewal that met a leader change.
const KEEPALIVE_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// Lease service.
pub struct LeaseService {
    pub(crate) node: Arc<Node>,
}

/// Renews lease `id` on the leader (through it, on a follower); TTL 0 when the lease is
/// unknown or expired (not an error).
async fn keepalive(node: &Node, id: i64) -> Result<pb::LeaseKeepAliveResponse, Status> {
    // The header is filled before the renewal, so it never postdates a revoke.
    let h = current_header(node);
    // A renewal is idempotent, so one that meets a leader change is retried (within the request
    // timeout) instead of ending the client's stream.
    let deadline = tokio::time::Instant::now() + node.request_timeout();
    loop {
        match node.lease_renew(id).await {
            Ok(ttl) => return Ok(pb::LeaseKeepAliveResponse { header: h, id, ttl }),
            Err(
                Error::NoLeader | Error::LeaderChanged | Error::LeaderUnreachable | Error::Timeout,
            ) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(KEEPALIVE_RETRY).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let req = req.into_inner();
        if req.ttl > st::limits::LEASE_TTL_MAX_SECONDS {
            return Err(super::status::store_err(st::Error::LeaseTtlTooLarge));
        }
        let id = if req.id == 0 {
            rand::random::<i64>() & i64::MAX
        } else {
            req.id
        };
        let ttl = req.ttl.max(self.node.min_lease_ttl());
        admit(&self.node, st::limits::QUOTA_LEASE_GRANT_BYTES).await?;
        match self
            .node
            .propose(st::WriteRequest::LeaseGrant { id, ttl })
            .await?
        {
            st::WriteResponse::LeaseGrant { id, ttl, revision } => {
                Ok(Response::new(pb::LeaseGrantResponse {
                    header: header(&self.node, revision),
                    id,
                    ttl,
                    error: String::new(),
                }))
            }
            other => Err(super::unexpected(&other)),
        }
    }

    async fn lease_revoke(
        &self,
        req: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let id = req.into_inner().id;
        admit(&self.node, 0).await?;
        match self
            .node
            .propose(st::WriteRequest::LeaseRevoke { id })
            .await?
        {
            st::WriteResponse::Lease { revision } => Ok(Response::new(pb::LeaseRevokeResponse {
                header: header(&self.node, revision),
            })),
            other => Err(super::unexpected(&other)),
        }
    }

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<BoxStream<pb::LeaseKeepAliveResponse>>, Status> {
        let mut input = req.into_inner();
        let node = self.node.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(KEEPALIVE_QUEUE_MAX);
        tokio::spawn(async move {
            let stopped = crate::node::stopped(node.shutdown.clone());
            tokio::pin!(stopped);
            loop {
                let msg = tokio::select! {
                    m = input.next() => m,
                    _ = &mut stopped => break,
                };
                // A client that half-closes after its last request still gets every answer.
                let Some(Ok(msg)) = msg else { break };
                let resp = keepalive(&node, msg.id).await;
                let failed = resp.is_err();
                if tx.send(resp).await.is_err() || failed {
                    break;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let req = req.into_inner();
        let h = current_header(&self.node);
        // Only the leader knows the remaining TTL (followers hold no deadlines).
        let remaining = self.node.lease_remaining(req.id).await?;
        let found = self.node.store.with_lessor(|l| {
            let lease = l.get(req.id)?;
            let keys = if req.keys {
                lease.keys.iter().cloned().collect()
            } else {
                Vec::new()
            };
            Some((remaining.unwrap_or(0), lease.ttl, keys))
        });
        let resp = match found {
            Some((ttl, granted_ttl, keys)) => pb::LeaseTimeToLiveResponse {
                header: h,
                id: req.id,
                ttl,
                granted_ttl,
                keys,
            },
            None => pb::LeaseTimeToLiveResponse {
                header: h,
                id: req.id,
                ttl: -1,
                granted_ttl: 0,
                keys: vec![],
            },
        };
        Ok(Response::new(resp))
    }

    async fn lease_leases(
        &self,
        _req: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        let ids = self.node.store.with_lessor(|l| l.ids());
        Ok(Response::new(pb::LeaseLeasesResponse {
            header: current_header(&self.node),
            leases: ids.into_iter().map(|id| pb::LeaseStatus { id }).collect(),
        }))
    }
}
