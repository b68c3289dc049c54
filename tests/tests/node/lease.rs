//! Leases: keepalive keeps keys, expiry and revoke delete them, TTL queries.

use std::time::Duration;

use etcd_client::{EventType, LeaseTimeToLiveOptions, PutOptions, WatchOptions};
use keyhold_tests::NodeProcess;

use crate::client;

/// Election timeout 500 ms ⇒ minimum TTL 1 s, so expiry tests stay short.
const FAST: &[&str] = &["--heartbeat-interval", "50", "--election-timeout", "500"];

#[tokio::test]
async fn keepalive_keeps_a_key_and_expiry_deletes_it() {
    let node = NodeProcess::start_with(FAST);
    let mut c = client(&node).await;
    let grant = c.lease_grant(1, None).await.expect("grant");
    assert_eq!(grant.ttl(), 1);
    let id = grant.id();
    c.put("alive", "v", Some(PutOptions::new().with_lease(id)))
        .await
        .expect("put");
    let mut w = c.watch("alive", None).await.expect("watch");
    assert!(w.message().await.expect("ok").expect("created").created());
    let (mut keeper, mut responses) = c.lease_keep_alive(id).await.expect("keepalive");
    // Keep it alive for 3 TTLs, renewing every 300 ms.
    for _ in 0..10 {
        keeper.keep_alive().await.expect("send");
        let r = responses.message().await.expect("ok").expect("response");
        assert_eq!((r.id(), r.ttl()), (id, 1));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        c.get("alive", None).await.expect("get").count(),
        1,
        "kept alive past its TTL"
    );
    drop(keeper);
    // Keepalives stopped: the lease expires and the key is deleted by one DELETE event.
    let r = tokio::time::timeout(Duration::from_secs(10), w.message())
        .await
        .expect("expiry in time");
    let r = r.expect("ok").expect("event");
    assert_eq!(r.events()[0].event_type(), EventType::Delete);
    let ttl = c.lease_time_to_live(id, None).await.expect("ttl");
    assert_eq!(ttl.ttl(), -1, "an expired lease is unknown");
}

#[tokio::test]
async fn revoke_deletes_attached_keys_and_ttl_reports_keys() {
    let node = NodeProcess::start();
    let mut c = client(&node).await;
    let id = c.lease_grant(100, None).await.expect("grant").id();
    let explicit = c
        .lease_grant(60, Some(etcd_client::LeaseGrantOptions::new().with_id(777)))
        .await
        .expect("grant");
    assert_eq!(explicit.id(), 777);
    let short = c.lease_grant(1, None).await.expect("grant");
    assert_eq!(short.ttl(), 2, "TTL raised to ceil(1.5 x election timeout)");
    for k in ["l1", "l2"] {
        c.put(k, "v", Some(PutOptions::new().with_lease(id)))
            .await
            .expect("put");
    }
    c.put("free", "v", None).await.expect("put");
    let ttl = c
        .lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .expect("ttl");
    assert_eq!(ttl.granted_ttl(), 100);
    assert!(
        ttl.ttl() > 90 && ttl.ttl() <= 100,
        "remaining TTL of a fresh 100 s lease: {}",
        ttl.ttl()
    );
    let mut keys = ttl.keys().to_vec();
    keys.sort(); // etcd returns attached keys in no particular order
    assert_eq!(keys, [b"l1".to_vec(), b"l2".to_vec()]);
    let leases: Vec<i64> = c
        .leases()
        .await
        .expect("leases")
        .leases()
        .iter()
        .map(|l| l.id())
        .collect();
    assert!(leases.contains(&id) && leases.contains(&777));
    let before = c
        .get("free", None)
        .await
        .expect("get")
        .header()
        .expect("h")
        .revision();
    let revoked = c.lease_revoke(id).await.expect("revoke");
    assert_eq!(
        revoked.header().expect("h").revision(),
        before + 1,
        "one revision for all deletes"
    );
    assert_eq!(
        c.get("l", Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .expect("get")
            .count(),
        0
    );
    assert_eq!(c.get("free", None).await.expect("get").count(), 1);
    let mut w = c
        .watch(
            "l1",
            Some(WatchOptions::new().with_start_revision(before + 1)),
        )
        .await
        .expect("watch");
    w.message().await.expect("ok").expect("created");
    let r = w.message().await.expect("ok").expect("event");
    assert_eq!(r.events()[0].event_type(), EventType::Delete);
    // A keepalive for an unknown lease answers TTL 0 (not a gRPC error); the client library
    // turns that first TTL-0 answer into "lease not found".
    match c.lease_keep_alive(id).await {
        Err(etcd_client::Error::LeaseKeepAliveError(m)) => assert_eq!(m, "lease not found"),
        other => panic!("expected a TTL-0 answer, got {other:?}"),
    }
}
