//! Txn: compare targets, branches, nested txns, reads seeing earlier writes.

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};
use keyhold_tests::NodeProcess;

use crate::client;

#[tokio::test]
async fn compares_branches_and_nesting() {
    let node = NodeProcess::start();
    let mut c = client(&node).await;
    c.put("k", "v", None).await.expect("put");
    let txn = Txn::new()
        .when([
            Compare::value("k", CompareOp::Equal, "v"),
            Compare::version("k", CompareOp::Equal, 1),
        ])
        .and_then([TxnOp::put("k", "w", None), TxnOp::get("k", None)])
        .or_else([TxnOp::get("k", None)]);
    let r = c.txn(txn).await.expect("txn");
    assert!(r.succeeded());
    assert_eq!(r.header().expect("h").revision(), 3);
    match &r.op_responses()[1] {
        TxnOpResponse::Get(g) => {
            assert_eq!(g.kvs()[0].value(), b"w", "later ops see earlier writes")
        }
        other => panic!("{other:?}"),
    }
    let failing = Txn::new()
        .when([Compare::mod_revision("k", CompareOp::Less, 3)])
        .and_then([TxnOp::put("x", "no", None)])
        .or_else([TxnOp::get("k", None)]);
    let r = c.txn(failing).await.expect("txn");
    assert!(!r.succeeded());
    assert_eq!(
        r.header().expect("h").revision(),
        3,
        "a read-only branch does not bump"
    );
    // Absent key: VALUE compare is false, CREATE == 0 is true.
    let r = c
        .txn(Txn::new().when([Compare::value("absent", CompareOp::Equal, "")]))
        .await
        .expect("txn");
    assert!(!r.succeeded());
    let r = c
        .txn(Txn::new().when([Compare::create_revision("absent", CompareOp::Equal, 0)]))
        .await
        .expect("txn");
    assert!(r.succeeded());
    // Range compare: every key in range must satisfy it.
    c.put("r1", "1", None).await.expect("put");
    c.put("r2", "2", None).await.expect("put");
    let all_gt0 = Compare::value("r", CompareOp::Greater, "0").with_prefix();
    assert!(
        c.txn(Txn::new().when([all_gt0]))
            .await
            .expect("txn")
            .succeeded()
    );
    let all_gt1 = Compare::value("r", CompareOp::Greater, "1").with_prefix();
    assert!(
        !c.txn(Txn::new().when([all_gt1]))
            .await
            .expect("txn")
            .succeeded()
    );
    // LEASE compare.
    let lease = c.lease_grant(60, None).await.expect("grant").id();
    c.put(
        "leased",
        "v",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("put");
    let r = c
        .txn(Txn::new().when([Compare::lease("leased", CompareOp::Equal, lease)]))
        .await
        .expect("txn");
    assert!(r.succeeded());
    // Nested txn: its compare sees the state before the outer txn.
    let nested = Txn::new()
        .when([Compare::value("k", CompareOp::Equal, "w")])
        .and_then([TxnOp::put("n", "inner", None)]);
    let outer = Txn::new().and_then([TxnOp::put("k", "z", None), TxnOp::txn(nested)]);
    let r = c.txn(outer).await.expect("txn");
    assert!(r.succeeded());
    let n = c.get("n", None).await.expect("get");
    assert_eq!(n.kvs()[0].value(), b"inner");
    assert_eq!(n.kvs()[0].mod_revision(), r.header().expect("h").revision());
    let k = c.get("k", Some(GetOptions::new())).await.expect("get");
    assert_eq!(
        k.kvs()[0].mod_revision(),
        n.kvs()[0].mod_revision(),
        "one revision for the whole tree"
    );
}
