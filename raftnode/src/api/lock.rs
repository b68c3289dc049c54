//! The Lock service (`v3lockpb.Lock`), as etcd's server implements it: the lock key is
//! `<name>/<lease-id in lowercase hex>` created under the caller's lease; the owner is the key
//! with the lowest create revision under `<name>/`. Lock blocks until every earlier key is gone.

use std::sync::Arc;

use keyhold_proto::v3lockpb::lock_server::Lock;
use keyhold_proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use keyhold_store::{self as st, KeyRange};
use tonic::{Request, Response, Status};

use super::header;
use super::status::store_err;
use super::waiter::Waiter;
use crate::node::Node;

/// Lock service.
pub struct LockService {
    pub(crate) node: Arc<Node>,
}

/// Creates `key` under `lease` unless it exists; returns its create revision (etcd's
/// `Txn If create_revision(key) == 0 Then Put Else Get`).
pub(crate) async fn create_owned_key(
    node: &Node,
    key: &[u8],
    value: &[u8],
    lease: i64,
) -> Result<i64, Status> {
    let put = st::PutRequest {
        key: key.to_vec(),
        value: value.to_vec(),
        lease,
        ..Default::default()
    };
    let get = st::RangeRequest {
        key: key.to_vec(),
        ..Default::default()
    };
    let txn = st::TxnRequest {
        compare: vec![st::Compare {
            result: st::CompareResult::Equal,
            target: st::CompareTarget::Create(0),
            key: key.to_vec(),
            range_end: vec![],
        }],
        success: vec![st::RequestOp::Put(put), st::RequestOp::Range(get.clone())],
        failure: vec![st::RequestOp::Range(get)],
    };
    let resp = match node.propose(st::WriteRequest::Txn(txn)).await? {
        st::WriteResponse::Txn(t) => t,
        other => {
            return Err(super::unexpected(&other));
        }
    };
    let created = resp.responses.iter().find_map(|r| match r {
        st::ResponseOp::Range(r) => r.kvs.first().map(|kv| kv.create_revision),
        _ => None,
    });
    let created = created.ok_or_else(|| Status::internal("owned key vanished"))?;
    Ok(created)
}

/// Waits until no key under `prefix` has a create revision below `my_rev`.
pub(crate) async fn wait_for_turn(
    node: &Arc<Node>,
    prefix: &[u8],
    my_rev: i64,
) -> Result<i64, Status> {
    let end = st::prefix_end(prefix);
    loop {
        let req = st::RangeRequest {
            key: prefix.to_vec(),
            range_end: end.clone(),
            max_create_revision: my_rev - 1,
            sort_order: st::SortOrder::Descend,
            sort_target: st::SortTarget::Create,
            limit: 1,
            ..Default::default()
        };
        let resp = node.range(&req).map_err(store_err)?;
        let Some(ahead) = resp.kvs.into_iter().next() else {
            return Ok(resp.revision);
        };
        // Wait for that key's deletion, from just after the state we read.
        let mut waiter = Waiter::new(
            node.clone(),
            KeyRange::new(&ahead.key, &[]),
            resp.revision + 1,
        );
        loop {
            let events = waiter.next().await?;
            if events.iter().any(|e| e.kind == st::EventType::Delete) {
                break;
            }
        }
    }
}

/// Deletes a waiter's key when its RPC is abandoned before it owns the lock or leadership.
pub(crate) struct ReleaseOnDrop {
    pub(crate) node: Option<Arc<Node>>,
    pub(crate) key: Vec<u8>,
}

impl ReleaseOnDrop {
    pub(crate) fn disarm(mut self) {
        self.node = None;
    }
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            let del = st::DeleteRangeRequest {
                key: std::mem::take(&mut self.key),
                ..Default::default()
            };
            tokio::spawn(async move {
                let _ = node.propose(st::WriteRequest::DeleteRange(del)).await;
            });
        }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let req = req.into_inner();
        let mut key = req.name.clone();
        key.push(b'/');
        key.extend_from_slice(format!("{:x}", req.lease).as_bytes());
        let mut prefix = req.name;
        prefix.push(b'/');
        let my_rev = create_owned_key(&self.node, &key, b"", req.lease).await?;
        // If the caller gives up while waiting, release the key as etcd's mutex does.
        let guard = ReleaseOnDrop {
            node: Some(self.node.clone()),
            key: key.clone(),
        };
        let revision = wait_for_turn(&self.node, &prefix, my_rev).await?;
        guard.disarm();
        Ok(Response::new(LockResponse {
            header: header(&self.node, revision),
            key,
        }))
    }

    async fn unlock(
        &self,
        req: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let key = req.into_inner().key;
        let del = st::DeleteRangeRequest {
            key,
            ..Default::default()
        };
        let revision = match self
            .node
            .propose(st::WriteRequest::DeleteRange(del))
            .await?
        {
            st::WriteResponse::DeleteRange(d) => d.revision,
            other => {
                return Err(super::unexpected(&other));
            }
        };
        Ok(Response::new(UnlockResponse {
            header: header(&self.node, revision),
        }))
    }
}
