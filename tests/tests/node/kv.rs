//! KV: revisions, every range option, put and delete options, response headers.

use etcd_client::{DeleteOptions, GetOptions, PutOptions, SortOrder, SortTarget};
use keyhold_tests::NodeProcess;

use crate::client;

fn keys(r: &etcd_client::GetResponse) -> Vec<String> {
    r.kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

#[tokio::test]
async fn revisions_and_headers_follow_etcd() {
    let node = NodeProcess::start();
    let mut c = client(&node).await;
    let r = c.put("a", "1", None).await.expect("put");
    let h = r.header().expect("header");
    assert_eq!(
        h.revision(),
        2,
        "a fresh store is at revision 1; the first write makes 2"
    );
    assert_ne!(h.cluster_id(), 0);
    assert_ne!(h.member_id(), 0);
    assert!(h.raft_term() >= 1);
    c.put("a", "2", None).await.expect("put");
    let g = c.get("a", None).await.expect("get");
    let kv = &g.kvs()[0];
    assert_eq!(
        (kv.create_revision(), kv.mod_revision(), kv.version()),
        (2, 3, 2)
    );
    assert_eq!(g.header().expect("h").revision(), 3);
    let old = c
        .get("a", Some(GetOptions::new().with_revision(2)))
        .await
        .expect("get");
    assert_eq!(old.kvs()[0].value(), b"1");
    assert_eq!(
        old.header().expect("h").revision(),
        3,
        "header carries the current revision"
    );
    let d = c.delete("missing", None).await.expect("delete");
    assert_eq!(
        (d.deleted(), d.header().expect("h").revision()),
        (0, 3),
        "no-op delete keeps the revision"
    );
}

#[tokio::test]
async fn range_options() {
    let node = NodeProcess::start();
    let mut c = client(&node).await;
    for (k, v) in [("k1", "c"), ("k2", "a"), ("k3", "b"), ("l1", "z")] {
        c.put(k, v, None).await.expect("put");
    }
    c.put("k1", "d", None).await.expect("put"); // k1: version 2, mod 6
    let prefix = || GetOptions::new().with_prefix();
    assert_eq!(
        keys(&c.get("k", Some(prefix())).await.expect("get")),
        ["k1", "k2", "k3"]
    );
    let r = c.get("k", Some(prefix().with_limit(2))).await.expect("get");
    assert_eq!(
        (keys(&r), r.more(), r.count()),
        (vec!["k1".into(), "k2".into()], true, 3)
    );
    let r = c
        .get("k2", Some(GetOptions::new().with_from_key()))
        .await
        .expect("get");
    assert_eq!(keys(&r), ["k2", "k3", "l1"]);
    let r = c
        .get("k1", Some(GetOptions::new().with_range("k3")))
        .await
        .expect("get");
    assert_eq!(keys(&r), ["k1", "k2"]);
    let r = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .expect("get");
    assert_eq!(r.count(), 4);
    let by_value = prefix().with_sort(SortTarget::Value, SortOrder::Ascend);
    assert_eq!(
        keys(&c.get("k", Some(by_value)).await.expect("get")),
        ["k2", "k3", "k1"]
    );
    let by_mod_desc = prefix().with_sort(SortTarget::Mod, SortOrder::Descend);
    assert_eq!(
        keys(&c.get("k", Some(by_mod_desc)).await.expect("get")),
        ["k1", "k3", "k2"]
    );
    let by_key_desc = prefix()
        .with_sort(SortTarget::Key, SortOrder::Descend)
        .with_limit(1);
    assert_eq!(
        keys(&c.get("k", Some(by_key_desc)).await.expect("get")),
        ["k3"]
    );
    let r = c
        .get("k", Some(prefix().with_keys_only()))
        .await
        .expect("get");
    assert!(r.kvs().iter().all(|kv| kv.value().is_empty()));
    let r = c
        .get("k", Some(prefix().with_count_only()))
        .await
        .expect("get");
    assert_eq!((r.kvs().len(), r.count()), (0, 3));
    let r = c
        .get("k", Some(prefix().with_min_mod_revision(4)))
        .await
        .expect("get");
    assert_eq!(
        (keys(&r), r.count()),
        (vec!["k1".into(), "k3".into()], 3),
        "count ignores filters"
    );
    let r = c
        .get("k", Some(prefix().with_max_create_revision(3)))
        .await
        .expect("get");
    assert_eq!(keys(&r), ["k1", "k2"]);
    let r = c
        .get("k", Some(prefix().with_revision(3)))
        .await
        .expect("get");
    assert_eq!(keys(&r), ["k1", "k2"], "historical range");
    let r = c
        .get("k", Some(prefix().with_serializable()))
        .await
        .expect("get");
    assert_eq!(r.count(), 3);
}

#[tokio::test]
async fn put_and_delete_options() {
    let node = NodeProcess::start();
    let mut c = client(&node).await;
    let r = c
        .put("p", "v1", Some(PutOptions::new().with_prev_key()))
        .await
        .expect("put");
    assert!(r.prev_key().is_none());
    let r = c
        .put("p", "v2", Some(PutOptions::new().with_prev_key()))
        .await
        .expect("put");
    assert_eq!(r.prev_key().expect("prev").value(), b"v1");
    let lease = c.lease_grant(60, None).await.expect("grant").id();
    c.put("p", "v3", Some(PutOptions::new().with_lease(lease)))
        .await
        .expect("put");
    c.put(
        "p",
        "",
        Some(PutOptions::new().with_ignore_value().with_lease(lease)),
    )
    .await
    .expect("ignore value");
    let kv = c.get("p", None).await.expect("get").kvs()[0].clone();
    assert_eq!(
        (kv.value(), kv.lease()),
        (&b"v3"[..], lease),
        "value kept, lease as given"
    );
    c.put("p", "v4", Some(PutOptions::new().with_ignore_lease()))
        .await
        .expect("ignore lease");
    let kv = c.get("p", None).await.expect("get").kvs()[0].clone();
    assert_eq!(
        (kv.value(), kv.lease()),
        (&b"v4"[..], lease),
        "lease kept, value as given"
    );
    c.put("p", "", Some(PutOptions::new().with_ignore_value()))
        .await
        .expect("ignore value");
    let kv = c.get("p", None).await.expect("get").kvs()[0].clone();
    assert_eq!(
        (kv.value(), kv.lease()),
        (&b"v4"[..], 0),
        "lease 0 without ignore_lease detaches"
    );
    c.put("q1", "x", None).await.expect("put");
    c.put("q2", "y", None).await.expect("put");
    let d = c
        .delete(
            "q",
            Some(DeleteOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .expect("delete");
    assert_eq!(d.deleted(), 2);
    let prev: Vec<_> = d.prev_kvs().iter().map(|kv| kv.value().to_vec()).collect();
    assert_eq!(prev, [b"x".to_vec(), b"y".to_vec()]);
    let rev = d.header().expect("h").revision();
    let r = c.put("q1", "again", None).await.expect("put");
    assert_eq!(
        r.header().expect("h").revision(),
        rev + 1,
        "one revision for the whole delete"
    );
    let kv = c.get("q1", None).await.expect("get").kvs()[0].clone();
    assert_eq!(
        (kv.version(), kv.create_revision()),
        (1, rev + 1),
        "a deleted key starts a new generation"
    );
}
