//! Conversions between etcd's protobuf messages and the store's types. Requests are validated
//! here where the check is about the wire form (enum values); semantic checks live in the store.

use keyhold_proto::etcdserverpb as pb;
use keyhold_proto::mvccpb;
use keyhold_store as st;

use crate::error::{Error, Result};

/// Store key-value → protobuf.
pub fn kv_to_pb(kv: st::KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: kv.key,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: kv.value,
        lease: kv.lease,
    }
}

/// Store event → protobuf (`prev_kv` only when asked).
pub fn event_to_pb(e: st::Event, prev_kv: bool) -> mvccpb::Event {
    mvccpb::Event {
        r#type: match e.kind {
            st::EventType::Put => mvccpb::event::EventType::Put as i32,
            st::EventType::Delete => mvccpb::event::EventType::Delete as i32,
        },
        kv: Some(kv_to_pb(e.kv)),
        prev_kv: if prev_kv {
            e.prev_kv.map(kv_to_pb)
        } else {
            None
        },
    }
}

/// Range request → store, rejecting unknown sort enums.
pub fn range_from_pb(r: pb::RangeRequest) -> Result<st::RangeRequest> {
    use pb::range_request::{SortOrder, SortTarget};
    let sort_order = match SortOrder::try_from(r.sort_order) {
        Ok(SortOrder::None) => st::SortOrder::None,
        Ok(SortOrder::Ascend) => st::SortOrder::Ascend,
        Ok(SortOrder::Descend) => st::SortOrder::Descend,
        Err(_) => return Err(st::Error::InvalidSortOption.into()),
    };
    let sort_target = match SortTarget::try_from(r.sort_target) {
        Ok(SortTarget::Key) => st::SortTarget::Key,
        Ok(SortTarget::Version) => st::SortTarget::Version,
        Ok(SortTarget::Create) => st::SortTarget::Create,
        Ok(SortTarget::Mod) => st::SortTarget::Mod,
        Ok(SortTarget::Value) => st::SortTarget::Value,
        Err(_) => return Err(st::Error::InvalidSortOption.into()),
    };
    if r.key.is_empty() {
        return Err(st::Error::EmptyKey.into());
    }
    Ok(st::RangeRequest {
        key: r.key,
        range_end: r.range_end,
        limit: r.limit,
        revision: r.revision,
        sort_order,
        sort_target,
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
    })
}

/// Put request → store.
pub fn put_from_pb(p: pb::PutRequest) -> st::PutRequest {
    st::PutRequest {
        key: p.key,
        value: p.value,
        lease: p.lease,
        prev_kv: p.prev_kv,
        ignore_value: p.ignore_value,
        ignore_lease: p.ignore_lease,
    }
}

/// Delete request → store.
pub fn delete_from_pb(d: pb::DeleteRangeRequest) -> Result<st::DeleteRangeRequest> {
    if d.key.is_empty() {
        return Err(st::Error::EmptyKey.into());
    }
    Ok(st::DeleteRangeRequest {
        key: d.key,
        range_end: d.range_end,
        prev_kv: d.prev_kv,
    })
}

fn compare_from_pb(c: pb::Compare) -> Result<st::Compare> {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    let result = match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => st::CompareResult::Equal,
        Ok(CompareResult::Greater) => st::CompareResult::Greater,
        Ok(CompareResult::Less) => st::CompareResult::Less,
        Ok(CompareResult::NotEqual) => st::CompareResult::NotEqual,
        Err(_) => return Err(Error::Internal("invalid compare result".into())),
    };
    let int = |u: &Option<TargetUnion>| match u {
        Some(TargetUnion::Version(v) | TargetUnion::CreateRevision(v))
        | Some(TargetUnion::ModRevision(v) | TargetUnion::Lease(v)) => *v,
        _ => 0,
    };
    let target = match CompareTarget::try_from(c.target) {
        Ok(CompareTarget::Version) => st::CompareTarget::Version(int(&c.target_union)),
        Ok(CompareTarget::Create) => st::CompareTarget::Create(int(&c.target_union)),
        Ok(CompareTarget::Mod) => st::CompareTarget::Mod(int(&c.target_union)),
        Ok(CompareTarget::Lease) => st::CompareTarget::Lease(int(&c.target_union)),
        Ok(CompareTarget::Value) => st::CompareTarget::Value(match c.target_union {
            Some(TargetUnion::Value(v)) => v,
            _ => Vec::new(),
        }),
        Err(_) => return Err(Error::Internal("invalid compare target".into())),
    };
    Ok(st::Compare {
        result,
        target,
        key: c.key,
        range_end: c.range_end,
    })
}

/// Txn request → store (recursively). Empty ops are `key not found`, as in etcd.
pub fn txn_from_pb(t: pb::TxnRequest) -> Result<st::TxnRequest> {
    let ops = |ops: Vec<pb::RequestOp>| -> Result<Vec<st::RequestOp>> {
        ops.into_iter()
            .map(|op| match op.request {
                Some(pb::request_op::Request::RequestRange(r)) => {
                    Ok(st::RequestOp::Range(range_from_pb(r)?))
                }
                Some(pb::request_op::Request::RequestPut(p)) => {
                    Ok(st::RequestOp::Put(put_from_pb(p)))
                }
                Some(pb::request_op::Request::RequestDeleteRange(d)) => {
                    Ok(st::RequestOp::DeleteRange(delete_from_pb(d)?))
                }
                Some(pb::request_op::Request::RequestTxn(t)) => {
                    Ok(st::RequestOp::Txn(txn_from_pb(t)?))
                }
                None => Err(st::Error::KeyNotFound.into()),
            })
            .collect()
    };
    Ok(st::TxnRequest {
        compare: t
            .compare
            .into_iter()
            .map(compare_from_pb)
            .collect::<Result<_>>()?,
        success: ops(t.success)?,
        failure: ops(t.failure)?,
    })
}

/// A header carrying only a revision (responses nested in a txn).
fn rev_header(revision: i64) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// Range response → protobuf, with `header`.
pub fn range_to_pb(r: st::RangeResponse, header: Option<pb::ResponseHeader>) -> pb::RangeResponse {
    pb::RangeResponse {
        header,
        kvs: r.kvs.into_iter().map(kv_to_pb).collect(),
        more: r.more,
        count: r.count,
    }
}

/// Put response → protobuf.
pub fn put_to_pb(r: st::PutResponse, header: Option<pb::ResponseHeader>) -> pb::PutResponse {
    pb::PutResponse {
        header,
        prev_kv: r.prev_kv.map(kv_to_pb),
    }
}

/// Delete response → protobuf.
pub fn delete_to_pb(
    r: st::DeleteRangeResponse,
    header: Option<pb::ResponseHeader>,
) -> pb::DeleteRangeResponse {
    pb::DeleteRangeResponse {
        header,
        deleted: r.deleted,
        prev_kvs: r.prev_kvs.into_iter().map(kv_to_pb).collect(),
    }
}

/// Txn response → protobuf; nested responses get revision-only headers.
pub fn txn_to_pb(r: st::TxnResponse, header: Option<pb::ResponseHeader>) -> pb::TxnResponse {
    use pb::response_op::Response;
    let responses = r
        .responses
        .into_iter()
        .map(|op| pb::ResponseOp {
            response: Some(match op {
                st::ResponseOp::Range(x) => {
                    let h = rev_header(x.revision);
                    Response::ResponseRange(range_to_pb(x, h))
                }
                st::ResponseOp::Put(x) => {
                    let h = rev_header(x.revision);
                    Response::ResponsePut(put_to_pb(x, h))
                }
                st::ResponseOp::DeleteRange(x) => {
                    let h = rev_header(x.revision);
                    Response::ResponseDeleteRange(delete_to_pb(x, h))
                }
                st::ResponseOp::Txn(x) => {
                    let h = rev_header(x.revision);
                    Response::ResponseTxn(txn_to_pb(x, h))
                }
            }),
        })
        .collect();
    pb::TxnResponse {
        header,
        succeeded: r.succeeded,
        responses,
    }
}

/// Whether a txn writes anything (on either branch, recursively).
pub fn txn_writes(t: &st::TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).any(|op| match op {
        st::RequestOp::Put(_) | st::RequestOp::DeleteRange(_) => true,
        st::RequestOp::Txn(n) => txn_writes(n),
        st::RequestOp::Range(_) => false,
    })
}

/// Whether every range in a read-only txn is serializable.
pub fn txn_serializable(t: &pb::TxnRequest) -> bool {
    t.success
        .iter()
        .chain(&t.failure)
        .all(|op| match &op.request {
            Some(pb::request_op::Request::RequestRange(r)) => r.serializable,
            Some(pb::request_op::Request::RequestTxn(n)) => txn_serializable(n),
            _ => true,
        })
}
