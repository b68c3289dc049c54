//! The KV service: Range (local read after a ReadIndex barrier unless serializable), and
//! Put/DeleteRange/Txn/Compact proposed through raft. Read-only txns never touch the log.

use std::sync::Arc;

use keyhold_proto::etcdserverpb as pb;
use keyhold_proto::etcdserverpb::kv_server::Kv;
use keyhold_store as st;
use prost::Message;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::convert::*;
use super::status::store_err;
use super::{admit, header};
use crate::error::Error;
use crate::node::Node;

/// KV service.
pub struct KvService {
    pub(crate) node: Arc<Node>,
}

fn check_size(node: &Node, len: usize) -> Result<(), Status> {
    if len > node.config.max_request_bytes {
        return Err(Error::RequestTooLarge.into());
    }
    Ok(())
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        req: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let req = req.into_inner();
        let serializable = req.serializable;
        let r = range_from_pb(req)?;
        if !serializable {
            self.node.read_barrier().await?;
        }
        metrics::counter!("etcd_mvcc_range_total").increment(1);
        let resp = self.node.blocking(|s| s.range(&r)).map_err(store_err)?;
        let h = header(&self.node, resp.revision);
        Ok(Response::new(range_to_pb(resp, h)))
    }

    async fn range_stream(
        &self,
        _req: Request<pb::RangeRequest>,
    ) -> Result<Response<BoxStream<pb::RangeStreamResponse>>, Status> {
        Err(Status::unimplemented("RangeStream is not implemented yet"))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let req = req.into_inner();
        check_size(&self.node, req.encoded_len())?;
        let p = put_from_pb(req);
        st::validate_put(&p).map_err(store_err)?;
        admit(
            &self.node,
            st::limits::QUOTA_PUT_OVERHEAD_BYTES + (p.key.len() + p.value.len()) as u64,
        )
        .await?;
        metrics::counter!("etcd_mvcc_put_total").increment(1);
        match self.node.propose(st::WriteRequest::Put(p)).await? {
            st::WriteResponse::Put(r) => {
                let h = header(&self.node, r.revision);
                Ok(Response::new(put_to_pb(r, h)))
            }
            other => Err(Status::internal(format!(
                "unexpected apply result {other:?}"
            ))),
        }
    }

    async fn delete_range(
        &self,
        req: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let req = req.into_inner();
        check_size(&self.node, req.encoded_len())?;
        let d = delete_from_pb(req)?;
        admit(&self.node, 0).await?;
        metrics::counter!("etcd_mvcc_delete_total").increment(1);
        match self.node.propose(st::WriteRequest::DeleteRange(d)).await? {
            st::WriteResponse::DeleteRange(r) => {
                let h = header(&self.node, r.revision);
                Ok(Response::new(delete_to_pb(r, h)))
            }
            other => Err(Status::internal(format!(
                "unexpected apply result {other:?}"
            ))),
        }
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let req = req.into_inner();
        check_size(&self.node, req.encoded_len())?;
        let serializable = txn_serializable(&req);
        let t = txn_from_pb(req)?;
        st::validate_txn(&t, self.node.config.max_txn_ops).map_err(store_err)?;
        metrics::counter!("etcd_mvcc_txn_total").increment(1);
        let resp = if txn_writes(&t) {
            admit(&self.node, txn_put_cost(&t)).await?;
            self.node.propose(st::WriteRequest::Txn(t)).await?
        } else {
            if !serializable {
                self.node.read_barrier().await?;
            }
            let req = st::WriteRequest::Txn(t);
            self.node
                .blocking(|s| s.apply(&req, st::ApplyContext::default()))
                .map_err(store_err)?
        };
        match resp {
            st::WriteResponse::Txn(r) => {
                let h = header(&self.node, r.revision);
                Ok(Response::new(txn_to_pb(r, h)))
            }
            other => Err(Status::internal(format!(
                "unexpected apply result {other:?}"
            ))),
        }
    }

    async fn compact(
        &self,
        req: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        let revision = req.into_inner().revision;
        match self
            .node
            .propose(st::WriteRequest::Compact { revision })
            .await?
        {
            st::WriteResponse::Compact { revision } => Ok(Response::new(pb::CompactionResponse {
                header: header(&self.node, revision),
            })),
            other => Err(Status::internal(format!(
                "unexpected apply result {other:?}"
            ))),
        }
    }
}

/// Quota cost of a txn: the sum of its puts (etcd's cost model).
fn txn_put_cost(t: &st::TxnRequest) -> u64 {
    t.success
        .iter()
        .chain(&t.failure)
        .map(|op| match op {
            st::RequestOp::Put(p) => {
                st::limits::QUOTA_PUT_OVERHEAD_BYTES + (p.key.len() + p.value.len()) as u64
            }
            st::RequestOp::Txn(n) => txn_put_cost(n),
            _ => 0,
        })
        .sum()
}
