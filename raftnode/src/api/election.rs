//! The Election service (`v3electionpb.Election`), as etcd's server implements it: a candidate's
//! key is `<name>/<lease-id in lowercase hex>` with its proposal as value, created under its
//! lease; the leader is the key with the lowest create revision under `<name>/`.

use std::sync::Arc;

use keyhold_proto::v3electionpb::election_server::Election;
use keyhold_proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ProclaimResponse, ResignRequest, ResignResponse,
};
use keyhold_store::{self as st, KeyRange};
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::convert::kv_to_pb;
use super::lock::{ReleaseOnDrop, create_owned_key, wait_for_turn};
use super::status::store_err;
use super::waiter::Waiter;
use super::{current_header, header};
use crate::node::Node;

/// Leader changes buffered per Observe stream.
const OBSERVE_QUEUE_MAX: usize = 16;

/// Election service.
pub struct ElectionService {
    pub(crate) node: Arc<Node>,
}

fn not_leader() -> Status {
    Status::unknown("election: not leader")
}

fn prefix_of(name: &[u8]) -> Vec<u8> {
    let mut p = name.to_vec();
    p.push(b'/');
    p
}

/// The current leader's key-value under `name/`, if any, and the store revision read.
fn leader_of(node: &Node, name: &[u8]) -> Result<(Option<st::KeyValue>, i64), Status> {
    let prefix = prefix_of(name);
    let req = st::RangeRequest {
        key: prefix.clone(),
        range_end: st::prefix_end(&prefix),
        sort_order: st::SortOrder::Ascend,
        sort_target: st::SortTarget::Create,
        limit: 1,
        ..Default::default()
    };
    let resp = node.range(&req).map_err(store_err)?;
    Ok((resp.kvs.into_iter().next(), resp.revision))
}

/// `Txn If create_revision(key) == rev Then op`: true when the guard held.
async fn guarded(node: &Node, leader: &LeaderKey, op: st::RequestOp) -> Result<i64, Status> {
    let txn = st::TxnRequest {
        compare: vec![st::Compare {
            result: st::CompareResult::Equal,
            target: st::CompareTarget::Create(leader.rev),
            key: leader.key.clone(),
            range_end: vec![],
        }],
        success: vec![op],
        failure: vec![],
    };
    match node.propose(st::WriteRequest::Txn(txn)).await? {
        st::WriteResponse::Txn(t) if t.succeeded => Ok(t.revision),
        st::WriteResponse::Txn(_) => Err(not_leader()),
        other => Err(super::unexpected(&other)),
    }
}

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(
        &self,
        req: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let req = req.into_inner();
        let prefix = prefix_of(&req.name);
        let mut key = prefix.clone();
        key.extend_from_slice(format!("{:x}", req.lease).as_bytes());
        let rev = create_owned_key(&self.node, &key, &req.value, req.lease).await?;
        let leader = LeaderKey {
            name: req.name.clone(),
            key: key.clone(),
            rev,
            lease: req.lease,
        };
        // A resumed campaign with a new proposal updates the value, as etcd's Campaign does.
        let current = self.node.blocking(|s| {
            s.range(&st::RangeRequest {
                key: key.clone(),
                ..Default::default()
            })
        });
        if current
            .map_err(store_err)?
            .kvs
            .first()
            .is_some_and(|kv| kv.value != req.value)
        {
            let put = st::PutRequest {
                key: key.clone(),
                value: req.value.clone(),
                lease: req.lease,
                ..Default::default()
            };
            guarded(&self.node, &leader, st::RequestOp::Put(put)).await?;
        }
        let guard = ReleaseOnDrop {
            node: Some(self.node.clone()),
            key,
        };
        let revision = wait_for_turn(&self.node, &prefix, rev).await?;
        guard.disarm();
        Ok(Response::new(CampaignResponse {
            header: header(&self.node, revision),
            leader: Some(leader),
        }))
    }

    async fn proclaim(
        &self,
        req: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let req = req.into_inner();
        let leader = req.leader.ok_or_else(not_leader)?;
        let put = st::PutRequest {
            key: leader.key.clone(),
            value: req.value,
            lease: leader.lease,
            ..Default::default()
        };
        let revision = guarded(&self.node, &leader, st::RequestOp::Put(put)).await?;
        Ok(Response::new(ProclaimResponse {
            header: header(&self.node, revision),
        }))
    }

    async fn leader(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        let name = req.into_inner().name;
        self.node.read_barrier().await?;
        match leader_of(&self.node, &name)? {
            (Some(kv), revision) => Ok(Response::new(LeaderResponse {
                header: header(&self.node, revision),
                kv: Some(kv_to_pb(kv)),
            })),
            (None, _) => Err(Status::unknown("election: no leader")),
        }
    }

    async fn observe(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<BoxStream<LeaderResponse>>, Status> {
        let name = req.into_inner().name;
        let node = self.node.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(OBSERVE_QUEUE_MAX);
        tokio::spawn(async move {
            if let Err(e) = observe(node, name, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn resign(
        &self,
        req: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let Some(leader) = req.into_inner().leader else {
            return Ok(Response::new(ResignResponse {
                header: current_header(&self.node),
            }));
        };
        let del = st::DeleteRangeRequest {
            key: leader.key.clone(),
            ..Default::default()
        };
        let revision = guarded(&self.node, &leader, st::RequestOp::DeleteRange(del)).await?;
        Ok(Response::new(ResignResponse {
            header: header(&self.node, revision),
        }))
    }
}

/// Streams the leader each time it changes (new leader or new proclaimed value).
async fn observe(
    node: Arc<Node>,
    name: Vec<u8>,
    tx: &tokio::sync::mpsc::Sender<Result<LeaderResponse, Status>>,
) -> Result<(), Status> {
    let prefix = prefix_of(&name);
    let range = KeyRange::new(&prefix, &st::prefix_end(&prefix));
    loop {
        let (leader, revision) = leader_of(&node, &name)?;
        let mut waiter = Waiter::new(node.clone(), range.clone(), revision + 1);
        let Some(mut leader) = leader else {
            waiter.next().await?; // someone campaigned; look again
            continue;
        };
        let send = |kv: &st::KeyValue, rev: i64| LeaderResponse {
            header: header(&node, rev),
            kv: Some(kv_to_pb(kv.clone())),
        };
        if tx.send(Ok(send(&leader, revision))).await.is_err() {
            return Ok(());
        }
        'same_leader: loop {
            for e in waiter.next().await? {
                if e.kv.key != leader.key {
                    continue;
                }
                match e.kind {
                    st::EventType::Delete => break 'same_leader,
                    st::EventType::Put => {
                        leader = e.kv.clone();
                        if tx.send(Ok(send(&leader, e.kv.mod_revision))).await.is_err() {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}
