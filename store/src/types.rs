//! Store-level request and response types. They mirror etcd's `etcdserverpb`/`mvccpb` messages
//! field for field but carry no protobuf or gRPC types, so the store stays independent of the API
//! layer. They are serde types because write requests travel through the raft log.

use serde::{Deserialize, Serialize};

/// A key's state at one revision (`mvccpb.KeyValue`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// The user key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Revision of the put that created this generation of the key.
    pub create_revision: i64,
    /// Revision of the last change.
    pub mod_revision: i64,
    /// Puts since creation (1 on creation).
    pub version: i64,
    /// The value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Attached lease, 0 for none.
    pub lease: i64,
}

/// Kind of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    /// A put.
    Put,
    /// A delete (the event's `kv` holds only `key` and `mod_revision`).
    Delete,
}

/// One change, as watchers see it (`mvccpb.Event`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Put or delete.
    pub kind: EventType,
    /// The key after the change.
    pub kv: KeyValue,
    /// The key before the change, when it existed and is still in history.
    pub prev_kv: Option<KeyValue>,
}

/// Sort order of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SortOrder {
    /// Key order (the default), unless a non-key target is given.
    #[default]
    None,
    /// Ascending on the target.
    Ascend,
    /// Descending on the target.
    Descend,
}

/// What a range is sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SortTarget {
    /// Key bytes.
    #[default]
    Key,
    /// Version.
    Version,
    /// Create revision.
    Create,
    /// Mod revision.
    Mod,
    /// Value bytes.
    Value,
}

/// `RangeRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    /// First key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Range end (etcd conventions).
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    /// Max keys returned, 0 = unlimited.
    pub limit: i64,
    /// Revision to read at, `<= 0` = current.
    pub revision: i64,
    /// Sort order.
    pub sort_order: SortOrder,
    /// Sort target.
    pub sort_target: SortTarget,
    /// Omit values.
    pub keys_only: bool,
    /// Return only the count.
    pub count_only: bool,
    /// Inclusive lower bound on mod revision (0 = none).
    pub min_mod_revision: i64,
    /// Inclusive upper bound on mod revision (0 = none).
    pub max_mod_revision: i64,
    /// Inclusive lower bound on create revision (0 = none).
    pub min_create_revision: i64,
    /// Inclusive upper bound on create revision (0 = none).
    pub max_create_revision: i64,
}

/// `RangeResponse`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResponse {
    /// Store revision when the range was read.
    pub revision: i64,
    /// Matching keys.
    pub kvs: Vec<KeyValue>,
    /// More keys exist past `limit`.
    pub more: bool,
    /// Keys in the range, ignoring limit and filters.
    pub count: i64,
}

/// `PutRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRequest {
    /// Key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Lease to attach, 0 for none.
    pub lease: i64,
    /// Return the previous key-value.
    pub prev_kv: bool,
    /// Keep the current value.
    pub ignore_value: bool,
    /// Keep the current lease.
    pub ignore_lease: bool,
}

/// `PutResponse`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutResponse {
    /// Revision after the put.
    pub revision: i64,
    /// Previous key-value, when asked for and present.
    pub prev_kv: Option<KeyValue>,
}

/// `DeleteRangeRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeRequest {
    /// First key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Range end (etcd conventions).
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    /// Return deleted key-values.
    pub prev_kv: bool,
}

/// `DeleteRangeResponse`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeResponse {
    /// Revision after the delete.
    pub revision: i64,
    /// Keys deleted.
    pub deleted: i64,
    /// Deleted key-values, when asked for.
    pub prev_kvs: Vec<KeyValue>,
}

/// Comparison operator of a txn compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareResult {
    /// `==`
    Equal,
    /// `>`
    Greater,
    /// `<`
    Less,
    /// `!=`
    NotEqual,
}

/// What a compare looks at, with the operand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    /// Key version.
    Version(i64),
    /// Create revision.
    Create(i64),
    /// Mod revision.
    Mod(i64),
    /// Value bytes.
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Attached lease.
    Lease(i64),
}

/// `Compare`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    /// Operator.
    pub result: CompareResult,
    /// Target and operand.
    pub target: CompareTarget,
    /// Key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Range end: with a range, every key in it must satisfy the compare.
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
}

/// `RequestOp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestOp {
    /// A read.
    Range(RangeRequest),
    /// A put.
    Put(PutRequest),
    /// A delete.
    DeleteRange(DeleteRangeRequest),
    /// A nested txn.
    Txn(TxnRequest),
}

/// `ResponseOp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseOp {
    /// Range result.
    Range(RangeResponse),
    /// Put result.
    Put(PutResponse),
    /// Delete result.
    DeleteRange(DeleteRangeResponse),
    /// Nested txn result.
    Txn(TxnResponse),
}

/// `TxnRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRequest {
    /// Conjunction of compares.
    pub compare: Vec<Compare>,
    /// Ops when every compare holds.
    pub success: Vec<RequestOp>,
    /// Ops otherwise.
    pub failure: Vec<RequestOp>,
}

/// `TxnResponse`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    /// Revision after the txn.
    pub revision: i64,
    /// Whether the success branch ran.
    pub succeeded: bool,
    /// One response per executed op.
    pub responses: Vec<ResponseOp>,
}

/// Alarm kinds (`AlarmType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AlarmType {
    /// The backend quota was exceeded.
    NoSpace,
    /// A corruption check failed.
    Corrupt,
}

/// A raised alarm on one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AlarmMember {
    /// Member that raised it.
    pub member_id: u64,
    /// What it is.
    pub alarm: AlarmType,
}

/// A replicated write, as proposed through raft and applied by [`crate::KvStore::apply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteRequest {
    /// Put.
    Put(PutRequest),
    /// DeleteRange.
    DeleteRange(DeleteRangeRequest),
    /// Txn (may be read-only when proposed for linearizability).
    Txn(TxnRequest),
    /// Compact history at `revision`.
    Compact {
        /// Compact revision.
        revision: i64,
    },
    /// Grant a lease (`id` chosen by the proposing member).
    LeaseGrant {
        /// Lease ID.
        id: i64,
        /// TTL in seconds (already raised to the minimum).
        ttl: i64,
    },
    /// Revoke a lease and delete its keys.
    LeaseRevoke {
        /// Lease ID.
        id: i64,
    },
    /// Record a lease's remaining TTL so a new leader does not reset it.
    LeaseCheckpoint {
        /// Lease ID.
        id: i64,
        /// Remaining TTL in seconds.
        remaining_ttl: i64,
    },
    /// Raise or clear an alarm.
    Alarm {
        /// Activate (true) or deactivate.
        activate: bool,
        /// Alarm and member.
        alarm: AlarmMember,
    },
}

impl WriteRequest {
    /// Whether applying this request touches only keys it names one by one: no key range (in
    /// an operation or a comparison), no history scan, no lease's whole key set. Its cost is
    /// then bounded by its size, so the caller may apply it without leaving an async worker.
    pub fn is_point(&self) -> bool {
        fn op(op: &RequestOp) -> bool {
            match op {
                RequestOp::Range(r) => r.range_end.is_empty(),
                RequestOp::Put(_) => true,
                RequestOp::DeleteRange(d) => d.range_end.is_empty(),
                RequestOp::Txn(t) => txn(t),
            }
        }
        fn txn(t: &TxnRequest) -> bool {
            t.compare.iter().all(|c| c.range_end.is_empty())
                && t.success.iter().chain(&t.failure).all(op)
        }
        match self {
            Self::Put(_)
            | Self::LeaseGrant { .. }
            | Self::LeaseCheckpoint { .. }
            | Self::Alarm { .. } => true,
            Self::DeleteRange(d) => d.range_end.is_empty(),
            Self::Txn(t) => txn(t),
            Self::Compact { .. } | Self::LeaseRevoke { .. } => false,
        }
    }
}

/// Result of a [`WriteRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteResponse {
    /// Put result.
    Put(PutResponse),
    /// Delete result.
    DeleteRange(DeleteRangeResponse),
    /// Txn result.
    Txn(TxnResponse),
    /// Compaction done; the store revision after it.
    Compact {
        /// Store revision.
        revision: i64,
    },
    /// Lease granted.
    LeaseGrant {
        /// Lease ID.
        id: i64,
        /// Effective TTL.
        ttl: i64,
        /// Store revision.
        revision: i64,
    },
    /// Lease revoked (or checkpointed).
    Lease {
        /// Store revision after the change.
        revision: i64,
    },
    /// Alarm change done; the alarms now active.
    Alarm {
        /// Active alarms.
        alarms: Vec<AlarmMember>,
        /// Store revision.
        revision: i64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_requests_name_each_key_they_touch() {
        let put = || PutRequest {
            key: b"k".to_vec(),
            ..PutRequest::default()
        };
        let delete = |range_end: &[u8]| DeleteRangeRequest {
            key: b"a".to_vec(),
            range_end: range_end.to_vec(),
            prev_kv: false,
        };
        let range = |range_end: &[u8]| RangeRequest {
            key: b"a".to_vec(),
            range_end: range_end.to_vec(),
            ..RangeRequest::default()
        };
        let txn = |compare_end: &[u8], success: Vec<RequestOp>| {
            WriteRequest::Txn(TxnRequest {
                compare: vec![Compare {
                    result: CompareResult::Equal,
                    target: CompareTarget::Version(0),
                    key: b"a".to_vec(),
                    range_end: compare_end.to_vec(),
                }],
                success,
                failure: vec![RequestOp::Put(put())],
            })
        };
        assert!(WriteRequest::Put(put()).is_point());
        assert!(WriteRequest::DeleteRange(delete(b"")).is_point());
        assert!(!WriteRequest::DeleteRange(delete(b"z")).is_point());
        assert!(
            txn(
                b"",
                vec![RequestOp::Range(range(b"")), RequestOp::Put(put())]
            )
            .is_point()
        );
        assert!(!txn(b"z", vec![]).is_point());
        assert!(!txn(b"", vec![RequestOp::Range(range(b"\0"))]).is_point());
        let nested = txn(b"", vec![RequestOp::DeleteRange(delete(b"z"))]);
        let WriteRequest::Txn(nested) = nested else {
            unreachable!("built as a txn")
        };
        assert!(!txn(b"", vec![RequestOp::Txn(nested)]).is_point());
        assert!(WriteRequest::LeaseGrant { id: 1, ttl: 5 }.is_point());
        assert!(!WriteRequest::LeaseRevoke { id: 1 }.is_point());
        assert!(!WriteRequest::Compact { revision: 3 }.is_point());
    }

    /// `KeyValue` as it was encoded before its byte fields were marked `serde_bytes`.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct KeyValueAsSequence {
        key: Vec<u8>,
        create_revision: i64,
        mod_revision: i64,
        version: i64,
        value: Vec<u8>,
        lease: i64,
    }

    /// Byte fields encode as postcard byte strings, which are the same bytes as the `u8`
    /// sequences written by earlier builds: stores and raft logs on disk stay readable.
    #[test]
    fn byte_fields_keep_the_on_disk_encoding() {
        let kv = KeyValue {
            key: b"key".to_vec(),
            create_revision: 2,
            mod_revision: 300,
            version: 7,
            value: vec![0xff; 300],
            lease: -1,
        };
        let old = KeyValueAsSequence {
            key: kv.key.clone(),
            create_revision: 2,
            mod_revision: 300,
            version: 7,
            value: kv.value.clone(),
            lease: -1,
        };
        let new_bytes = postcard::to_allocvec(&kv).expect("encode");
        assert_eq!(new_bytes, postcard::to_allocvec(&old).expect("encode"));
        assert_eq!(
            postcard::from_bytes::<KeyValue>(&new_bytes).expect("decode"),
            kv
        );
    }
}
