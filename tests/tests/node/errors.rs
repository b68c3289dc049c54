//! Bad input gets etcd's gRPC code and exact message.

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use keyhold_proto::etcdserverpb::RangeRequest;
use keyhold_proto::etcdserverpb::kv_client::KvClient;
use keyhold_tests::NodeProcess;
use tonic::Code;

use crate::{client, status};

#[tokio::test]
async fn invalid_requests_get_etcd_codes_and_messages() {
    let node = NodeProcess::start();
    let mut c = client(&node).await;
    let invalid = |m: &str| (Code::InvalidArgument, m.to_string());
    assert_eq!(
        status(c.put("", "v", None).await),
        invalid("etcdserver: key is not provided")
    );
    let big = vec![b'x'; 1536 * 1024 + 1];
    assert_eq!(
        status(c.put("big", big, None).await),
        invalid("etcdserver: request is too large")
    );
    assert_eq!(
        status(
            c.put("k", "v", Some(PutOptions::new().with_lease(12345)))
                .await
        ),
        (
            Code::NotFound,
            "etcdserver: requested lease not found".into()
        )
    );
    assert_eq!(
        status(
            c.put("k", "v", Some(PutOptions::new().with_ignore_value()))
                .await
        ),
        invalid("etcdserver: value is provided")
    );
    assert_eq!(
        status(
            c.put("nokey", "", Some(PutOptions::new().with_ignore_value()))
                .await
        ),
        invalid("etcdserver: key not found")
    );
    let ops: Vec<TxnOp> = (0..129)
        .map(|i| TxnOp::put(format!("k{i}"), "v", None))
        .collect();
    assert_eq!(
        status(c.txn(Txn::new().and_then(ops)).await),
        invalid("etcdserver: too many operations in txn request")
    );
    let dup = Txn::new().and_then([TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)]);
    assert_eq!(
        status(c.txn(dup).await),
        invalid("etcdserver: duplicate key given in txn request")
    );
    let empty_cmp = Txn::new().when([Compare::value("", CompareOp::Equal, "x")]);
    assert_eq!(
        status(c.txn(empty_cmp).await),
        invalid("etcdserver: key is not provided")
    );
    c.put("k", "v", None).await.expect("put");
    let future = GetOptions::new().with_revision(100);
    assert_eq!(
        status(c.get("k", Some(future)).await),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision".into()
        )
    );
    c.put("k", "v2", None).await.expect("put");
    c.compact(3, None).await.expect("compact");
    let compacted = (
        Code::OutOfRange,
        "etcdserver: mvcc: required revision has been compacted".to_string(),
    );
    assert_eq!(
        status(c.get("k", Some(GetOptions::new().with_revision(2))).await),
        compacted
    );
    assert_eq!(status(c.compact(3, None).await), compacted);
    assert_eq!(
        status(c.compact(50, None).await),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision".into()
        )
    );
    assert_eq!(
        status(c.lease_revoke(999).await),
        (
            Code::NotFound,
            "etcdserver: requested lease not found".into()
        )
    );
    assert_eq!(
        status(c.lease_grant(9_000_000_001, None).await),
        (Code::OutOfRange, "etcdserver: too large lease TTL".into())
    );
    // The node is still fine after all of that.
    assert_eq!(c.get("k", None).await.expect("get").kvs()[0].value(), b"v2");
}

#[tokio::test]
async fn invalid_sort_enum_is_refused() {
    if keyhold_tests::process::target_is_etcd() {
        return; // etcd 3.4 accepts unknown sort enums; the check is in the API Keyhold targets (3.7)
    }
    let node = NodeProcess::start();
    let mut kv = KvClient::connect(format!("http://{}", node.endpoint()))
        .await
        .expect("connect");
    let req = RangeRequest {
        key: b"a".to_vec(),
        sort_order: 7,
        ..Default::default()
    };
    let err = kv.range(req).await.expect_err("invalid sort order");
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "etcdserver: invalid sort option")
    );
    let req = RangeRequest {
        key: b"a".to_vec(),
        sort_target: 9,
        ..Default::default()
    };
    let err = kv.range(req).await.expect_err("invalid sort target");
    assert_eq!(err.message(), "etcdserver: invalid sort option");
}
