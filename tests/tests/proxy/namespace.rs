//! `--namespace`: clients of the proxy see only the keys under the prefix, without it.

use etcd_client::{GetOptions, PutOptions, WatchOptions};
use keyhold_tests::proxy::ProxyProcess;
use keyhold_tests::{NodeProcess, etcdctl};

use super::client;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_confines_kv_watch_and_lease_to_its_prefix() {
    let node = NodeProcess::start();
    let member = node.client.to_string();
    let proxy = ProxyProcess::start(std::slice::from_ref(&member), &["--namespace", "tenant/"]);
    let mut direct = client(&member).await;
    let mut c = client(&proxy.endpoint()).await;
    direct.put("outside", "x", None).await.expect("put");

    let mut watch = c.watch("k", None).await.expect("watch");
    assert!(
        watch
            .message()
            .await
            .expect("ok")
            .expect("created")
            .created()
    );
    let lease = c.lease_grant(60, None).await.expect("grant").id();
    c.put("k", "v1", Some(PutOptions::new().with_lease(lease)))
        .await
        .expect("put");
    let stored = direct.get("tenant/k", None).await.expect("get");
    assert_eq!(stored.kvs()[0].value(), b"v1", "stored under the prefix");
    let ttl = c
        .lease_time_to_live(
            lease,
            Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
        )
        .await
        .expect("ttl");
    assert_eq!(ttl.keys(), [b"k".to_vec()], "attached keys, stripped");

    // Reads see keys without the prefix, and nothing outside the namespace.
    let r = c.get("k", None).await.expect("get");
    assert_eq!(r.kvs()[0].key(), b"k");
    let all = c
        .get("\0", Some(GetOptions::new().with_from_key()))
        .await
        .expect("get");
    let keys: Vec<&[u8]> = all.kvs().iter().map(|kv| kv.key()).collect();
    assert_eq!(keys, vec![&b"k"[..]]);

    // A write straight to the member inside the namespace reaches the proxy's watchers,
    // stripped; prev_kv too.
    direct.put("tenant/k", "v2", None).await.expect("put");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let r = watch.message().await.expect("ok").expect("events");
        seen.extend(r.events().iter().map(|e| {
            let kv = e.kv().expect("kv");
            (kv.key().to_vec(), kv.value().to_vec())
        }));
    }
    assert_eq!(
        seen,
        vec![
            (b"k".to_vec(), b"v1".to_vec()),
            (b"k".to_vec(), b"v2".to_vec())
        ]
    );
    let prev = c
        .put("k", "v3", Some(PutOptions::new().with_prev_key()))
        .await
        .expect("put");
    assert_eq!(prev.prev_key().expect("prev").key(), b"k");

    // etcdctl through the proxy, and a prefix watch from a revision.
    let out = etcdctl(&proxy.endpoint(), &["get", "", "--prefix", "--keys-only"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains('k') && !listed.contains("outside") && !listed.contains("tenant"),
        "{listed}"
    );
    let mut w = c
        .watch(
            "",
            Some(WatchOptions::new().with_prefix().with_start_revision(1)),
        )
        .await
        .expect("watch");
    assert!(w.message().await.expect("ok").expect("created").created());
    let r = w.message().await.expect("ok").expect("events");
    assert!(r.events().iter().all(|e| e.kv().expect("kv").key() == b"k"));
    let empty = c.get("", None).await;
    assert!(empty.is_err(), "an empty key is refused inside a namespace");
}
