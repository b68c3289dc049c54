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
        let mut r = range_from_pb(req)?;
        if !serializable {
            self.node.read_barrier().await?;
        }
        metrics::counter!("etcd_mvcc_range_total").increment(1);
        if crate::failpoints::enabled("stale-read") && !serializable && r.revision == 0 {
            r.revision = (self.node.store.current_revision().unwrap_or(1) - 1).max(1);
        }
        let resp = self.node.range(&r).map_err(store_err)?;
        let h = header(&self.node, resp.revision);
        Ok(Response::new(range_to_pb(resp, h)))
    }

    /// etcd 3.7's streamed range: pages read at the revision pinned by the first page, chunk
    /// sizes doubling from 10 keys up to `--max-request-bytes`; header, `more` and `count` only
    /// on the last message. Custom sorts and revision filters are `Unimplemented`, as in etcd.
    async fn range_stream(
        &self,
        req: Request<pb::RangeRequest>,
    ) -> Result<Response<BoxStream<pb::RangeStreamResponse>>, Status> {
        let req = req.into_inner();
        let serializable = req.serializable;
        let r = range_from_pb(req)?;
        let sorted = r.sort_target != st::SortTarget::Key || r.sort_order == st::SortOrder::Descend;
        let filtered = r.min_mod_revision != 0
            || r.max_mod_revision != 0
            || r.min_create_revision != 0
            || r.max_create_revision != 0;
        if sorted || filtered {
            return Err(Status::unimplemented(
                "RangeStream does not support sorting or revision filters",
            ));
        }
        if !serializable {
            self.node.read_barrier().await?;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(RANGE_STREAM_QUEUE_MAX);
        let node = self.node.clone();
        tokio::spawn(async move {
            if let Err(e) = stream_range(&node, r, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        crate::probe::mark(crate::probe::Stage::PutHandlerStarted, 0);
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
                let resp = Response::new(put_to_pb(r, h));
                crate::probe::mark(crate::probe::Stage::PutHandlerReturned, 0);
                Ok(resp)
            }
            other => Err(super::unexpected(&other)),
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
            other => Err(super::unexpected(&other)),
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
            other => Err(super::unexpected(&other)),
        }
    }

    async fn compact(
        &self,
        req: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        let req = req.into_inner();
        match self.node.compact(req.revision, req.physical).await? {
            st::WriteResponse::Compact { revision } => Ok(Response::new(pb::CompactionResponse {
                header: header(&self.node, revision),
            })),
            other => Err(super::unexpected(&other)),
        }
    }
}

/// Messages buffered per RangeStream before it waits for the client.
const RANGE_STREAM_QUEUE_MAX: usize = 4;
/// Keys in the first RangeStream chunk; later chunks double while they stay under the byte limit.
const RANGE_STREAM_FIRST_CHUNK_KEYS: i64 = 10;

async fn stream_range(
    node: &Node,
    mut r: st::RangeRequest,
    tx: &tokio::sync::mpsc::Sender<Result<pb::RangeStreamResponse, Status>>,
) -> Result<(), Status> {
    let limit = r.limit;
    let mut chunk = RANGE_STREAM_FIRST_CHUNK_KEYS;
    let mut sent = 0i64;
    let mut pinned: Option<(i64, i64)> = None; // (revision, count)
    loop {
        let want = if limit > 0 {
            chunk.min(limit - sent)
        } else {
            chunk
        };
        let page = st::RangeRequest {
            limit: want,
            ..r.clone()
        };
        let resp = node.range(&page).map_err(store_err)?;
        let (revision, count) = *pinned.get_or_insert((resp.revision, resp.count));
        r.revision = revision;
        let n = resp.kvs.len() as i64;
        sent += n;
        let last_key = resp.kvs.last().map(|kv| kv.key.clone());
        let done = !resp.more || n == 0 || (limit > 0 && sent >= limit) || r.count_only;
        let bytes: usize = resp
            .kvs
            .iter()
            .map(|kv| kv.key.len() + kv.value.len())
            .sum();
        let mut msg = range_to_pb(resp, None);
        if done {
            msg.header = header(node, revision);
            msg.count = count;
            msg.more = limit > 0 && count > limit;
        } else {
            msg.count = 0;
            msg.more = false;
        }
        if tx
            .send(Ok(pb::RangeStreamResponse {
                range_response: Some(msg),
            }))
            .await
            .is_err()
            || done
        {
            return Ok(());
        }
        if bytes * 2 < node.config.max_request_bytes {
            chunk *= 2;
        }
        // Next page starts just after the last key sent.
        let mut next = last_key.unwrap_or_default();
        next.push(0);
        r.key = next;
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
