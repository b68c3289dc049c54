//! KV: serializable ranges from the range cache (`cache.rs`), everything else relayed. Writes
//! invalidate what they touch at once and raise the revision floor the cache must reach
//! before it answers again, so a client reads its own writes through the proxy.

use std::future::Future;
use std::sync::Arc;

use keyhold_proto::etcdserverpb as pb;
use keyhold_proto::etcdserverpb::kv_client::KvClient;
use tonic::codegen::BoxStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::cache::{RangeCache, Span, cacheable};
use crate::forward::UPSTREAM_DECODE_BYTES_MAX;
use crate::namespace::Namespace;
use crate::upstream::{Retry, Upstream, forward};

/// KV service.
pub struct KvService {
    pub upstream: Arc<Upstream>,
    pub cache: Arc<RangeCache>,
    /// `--serializable-ordering`.
    pub ordering: bool,
    /// `--namespace`.
    pub ns: Namespace,
}

fn revision_of(header: &Option<pb::ResponseHeader>) -> i64 {
    header.as_ref().map_or(0, |h| h.revision)
}

/// Every key span a txn may write (both branches, nested txns included).
fn txn_spans(t: &pb::TxnRequest, out: &mut Vec<Span>) {
    use pb::request_op::Request as Op;
    for op in t.success.iter().chain(&t.failure) {
        match &op.request {
            Some(Op::RequestPut(p)) => out.push(Span::of(&p.key, b"")),
            Some(Op::RequestDeleteRange(d)) => out.push(Span::of(&d.key, &d.range_end)),
            Some(Op::RequestTxn(t)) => txn_spans(t, out),
            Some(Op::RequestRange(_)) | None => {}
        }
    }
}

impl KvService {
    async fn range_upstream(
        &self,
        meta: &MetadataMap,
        req: &pb::RangeRequest,
    ) -> Result<pb::RangeResponse, Status> {
        let answer = self
            .upstream
            .call(Retry::Immutable, |channel| {
                let r = forward(meta, req.clone());
                async move {
                    KvClient::new(channel)
                        .max_decoding_message_size(UPSTREAM_DECODE_BYTES_MAX)
                        .range(r)
                        .await
                        .map(Response::into_inner)
                }
            })
            .await?;
        Ok(answer)
    }

    /// Relays a write and applies its effects on the cache.
    async fn write<T, F, Fut>(
        &self,
        meta: &MetadataMap,
        spans: &[Span],
        send: F,
    ) -> Result<T, Status>
    where
        F: Fn(KvClient<tonic::transport::Channel>, Request<()>) -> Fut,
        Fut: Future<Output = Result<(T, i64), Status>>,
    {
        let result = self
            .upstream
            .call(Retry::Mutable, |channel| {
                let client =
                    KvClient::new(channel).max_decoding_message_size(UPSTREAM_DECODE_BYTES_MAX);
                send(client, forward(meta, ()))
            })
            .await;
        // Invalidated whatever the outcome: a write that timed out may still be applied.
        for s in spans {
            self.cache.invalidate(s);
        }
        let (answer, revision) = result?;
        self.upstream.observe(revision);
        Ok(answer)
    }
}

/// Rebuilds an upstream request from forwarded metadata and a message.
fn with_message<T>(meta: Request<()>, message: T) -> Request<T> {
    let (m, e, ()) = meta.into_parts();
    Request::from_parts(m, e, message)
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let (meta, _, mut req) = request.into_parts();
        self.ns.range_request(&mut req)?;
        let key = cacheable(&req).then(|| {
            let token = meta.get("token").map_or(&b""[..], |t| t.as_bytes());
            RangeCache::key(token, &req)
        });
        if req.serializable
            && let Some(mut hit) = key.as_ref().and_then(|k| self.cache.get(k))
        {
            self.ns.range_response(&mut hit);
            return Ok(Response::new(hit));
        }
        let floor = self.upstream.observed();
        let mut answer = self.range_upstream(&meta, &req).await?;
        if self.ordering && req.serializable && revision_of(&answer.header) < floor {
            // That member is behind what this proxy already answered: read through the leader.
            let linearizable = pb::RangeRequest {
                serializable: false,
                ..req.clone()
            };
            answer = self.range_upstream(&meta, &linearizable).await?;
        }
        if let Some(k) = key {
            self.cache
                .insert(k, Span::of(&req.key, &req.range_end), &answer);
        }
        self.upstream.observe(revision_of(&answer.header));
        self.ns.range_response(&mut answer);
        Ok(Response::new(answer))
    }

    async fn range_stream(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<BoxStream<pb::RangeStreamResponse>>, Status> {
        let (meta, _, mut req) = request.into_parts();
        self.ns.range_request(&mut req)?;
        let stream = self
            .upstream
            .call(Retry::Immutable, |channel| {
                let r = forward(&meta, req.clone());
                async move {
                    KvClient::new(channel)
                        .max_decoding_message_size(UPSTREAM_DECODE_BYTES_MAX)
                        .range_stream(r)
                        .await
                        .map(Response::into_inner)
                }
            })
            .await?;
        let ns = self.ns.clone();
        let stream: BoxStream<pb::RangeStreamResponse> =
            Box::pin(tokio_stream::StreamExt::map(stream, move |item| {
                item.map(|mut chunk| {
                    if let Some(r) = chunk.range_response.as_mut() {
                        ns.range_response(r);
                    }
                    chunk
                })
            }));
        Ok(Response::new(stream))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let (meta, _, mut req) = request.into_parts();
        self.ns.put_request(&mut req)?;
        let spans = [Span::of(&req.key, b"")];
        let answer = self
            .write(&meta, &spans, |mut c, m| {
                let r = with_message(m, req.clone());
                async move {
                    let a = c.put(r).await?.into_inner();
                    let rev = revision_of(&a.header);
                    Ok((a, rev))
                }
            })
            .await?;
        let mut answer = answer;
        self.ns.put_response(&mut answer);
        Ok(Response::new(answer))
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let (meta, _, mut req) = request.into_parts();
        self.ns.delete_request(&mut req)?;
        let spans = [Span::of(&req.key, &req.range_end)];
        let answer = self
            .write(&meta, &spans, |mut c, m| {
                let r = with_message(m, req.clone());
                async move {
                    let a = c.delete_range(r).await?.into_inner();
                    let rev = revision_of(&a.header);
                    Ok((a, rev))
                }
            })
            .await?;
        let mut answer = answer;
        self.ns.delete_response(&mut answer);
        Ok(Response::new(answer))
    }

    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::TxnResponse>, Status> {
        let (meta, _, mut req) = request.into_parts();
        self.ns.txn_request(&mut req)?;
        let mut spans = Vec::new();
        txn_spans(&req, &mut spans);
        let answer = self
            .write(&meta, &spans, |mut c, m| {
                let r = with_message(m, req.clone());
                async move {
                    let a = c.txn(r).await?.into_inner();
                    let rev = revision_of(&a.header);
                    Ok((a, rev))
                }
            })
            .await?;
        let mut answer = answer;
        self.ns.txn_response(&mut answer);
        Ok(Response::new(answer))
    }

    async fn compact(
        &self,
        request: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        let (meta, _, req) = request.into_parts();
        let answer = self
            .write(&meta, &[], |mut c, m| {
                let r = with_message(m, req);
                async move {
                    let a = c.compact(r).await?.into_inner();
                    let rev = revision_of(&a.header);
                    Ok((a, rev))
                }
            })
            .await?;
        Ok(Response::new(answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txn_spans_cover_both_branches_and_nested_txns() {
        use pb::request_op::Request as Op;
        let put = |k: &[u8]| pb::RequestOp {
            request: Some(Op::RequestPut(pb::PutRequest {
                key: k.to_vec(),
                ..Default::default()
            })),
        };
        let nested = pb::TxnRequest {
            failure: vec![pb::RequestOp {
                request: Some(Op::RequestDeleteRange(pb::DeleteRangeRequest {
                    key: b"d".to_vec(),
                    range_end: b"e".to_vec(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        let t = pb::TxnRequest {
            success: vec![put(b"a")],
            failure: vec![
                put(b"b"),
                pb::RequestOp {
                    request: Some(Op::RequestTxn(nested)),
                },
            ],
            ..Default::default()
        };
        let mut spans = Vec::new();
        txn_spans(&t, &mut spans);
        assert_eq!(
            spans,
            vec![
                Span::of(b"a", b""),
                Span::of(b"b", b""),
                Span::of(b"d", b"e")
            ]
        );
    }
}
