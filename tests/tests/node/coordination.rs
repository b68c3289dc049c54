//! Server-side Lock and Election services (`v3lockpb`, `v3electionpb`), and KV.RangeStream.

use std::time::Duration;

use etcd_client::{GetOptions, LockOptions, ProclaimOptions, ResignOptions};
use keyhold_tests::NodeProcess;

use crate::{client, status};

const WAIT: Duration = Duration::from_secs(10);
/// How long a blocked call is given to (wrongly) complete before we call it blocked.
const BLOCKED: Duration = Duration::from_millis(300);

#[tokio::test]
async fn lock_is_exclusive_until_unlocked() {
    let node = NodeProcess::start();
    let mut c = client(&node).await;
    let l1 = c.lease_grant(60, None).await.expect("grant").id();
    let l2 = c.lease_grant(60, None).await.expect("grant").id();
    let held = c
        .lock("L", Some(LockOptions::new().with_lease(l1)))
        .await
        .expect("lock");
    assert_eq!(held.key(), format!("L/{l1:x}").as_bytes());
    let mut c2 = client(&node).await;
    let second =
        tokio::spawn(async move { c2.lock("L", Some(LockOptions::new().with_lease(l2))).await });
    tokio::time::sleep(BLOCKED).await;
    assert!(
        !second.is_finished(),
        "a second locker must wait while the lock is held"
    );
    c.unlock(held.key()).await.expect("unlock");
    let got = tokio::time::timeout(WAIT, second)
        .await
        .expect("second lock in time")
        .expect("join");
    assert_eq!(got.expect("lock").key(), format!("L/{l2:x}").as_bytes());
    // Unknown lease: the lock key cannot be created.
    let err = c
        .lock("L2", Some(LockOptions::new().with_lease(424242)))
        .await;
    assert_eq!(status(err).1, "etcdserver: requested lease not found");
}

#[tokio::test]
async fn election_campaign_proclaim_observe_resign() {
    let node = NodeProcess::start();
    let mut c = client(&node).await;
    let l1 = c.lease_grant(60, None).await.expect("grant").id();
    let l2 = c.lease_grant(60, None).await.expect("grant").id();
    let won = c.campaign("E", "v1", l1).await.expect("campaign");
    let leader = won.leader().expect("leader key").clone();
    assert_eq!(leader.key(), format!("E/{l1:x}").as_bytes());
    let now = c.leader("E").await.expect("leader");
    assert_eq!(now.kv().expect("kv").value(), b"v1");
    let mut observe = c.observe("E").await.expect("observe");
    let first = tokio::time::timeout(WAIT, observe.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("msg");
    assert_eq!(first.kv().expect("kv").value(), b"v1");
    c.proclaim(
        "v2",
        Some(ProclaimOptions::new().with_leader(leader.clone())),
    )
    .await
    .expect("proclaim");
    let next = tokio::time::timeout(WAIT, observe.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("msg");
    assert_eq!(next.kv().expect("kv").value(), b"v2");
    let mut c2 = client(&node).await;
    let challenger = tokio::spawn(async move { c2.campaign("E", "w1", l2).await });
    tokio::time::sleep(BLOCKED).await;
    assert!(
        !challenger.is_finished(),
        "a second candidate waits for the leader to resign"
    );
    c.resign(Some(ResignOptions::new().with_leader(leader.clone())))
        .await
        .expect("resign");
    let won2 = tokio::time::timeout(WAIT, challenger)
        .await
        .expect("in time")
        .expect("join")
        .expect("campaign");
    assert_eq!(
        won2.leader().expect("leader").key(),
        format!("E/{l2:x}").as_bytes()
    );
    let next = tokio::time::timeout(WAIT, observe.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("msg");
    assert_eq!(
        next.kv().expect("kv").value(),
        b"w1",
        "observers see the new leader"
    );
    // The old leader key no longer leads.
    let stale = c
        .proclaim("v3", Some(ProclaimOptions::new().with_leader(leader)))
        .await;
    assert_eq!(status(stale).1, "election: not leader");
}

#[tokio::test]
async fn range_stream_returns_the_same_keys_in_chunks() {
    if keyhold_tests::process::target_is_etcd() {
        return; // RangeStream is etcd 3.7; the reference etcd here is 3.4
    }
    let node = NodeProcess::start();
    let mut c = client(&node).await;
    for i in 0..150 {
        c.put(format!("rs/{i:03}"), format!("v{i}"), None)
            .await
            .expect("put");
    }
    let whole = c
        .get("rs/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get");
    let mut stream = c
        .kv_client()
        .get_stream("rs/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("stream");
    let mut keys = Vec::new();
    let mut chunks = 0;
    let mut last = None;
    while let Some(chunk) = stream.message().await.expect("chunk") {
        chunks += 1;
        keys.extend(chunk.kvs().iter().map(|kv| kv.key().to_vec()));
        last = Some(chunk);
    }
    let last = last.expect("a final chunk");
    assert!(chunks > 1, "150 keys come in more than one chunk");
    assert_eq!(last.count(), 150);
    assert_eq!(
        last.header().expect("header on the last chunk").revision(),
        whole.header().expect("h").revision()
    );
    let want: Vec<Vec<u8>> = whole.kvs().iter().map(|kv| kv.key().to_vec()).collect();
    assert_eq!(keys, want);
    let limited = GetOptions::new().with_prefix().with_limit(25);
    let mut stream = c
        .kv_client()
        .get_stream("rs/", Some(limited))
        .await
        .expect("stream");
    let mut n = 0;
    let mut more = false;
    while let Some(chunk) = stream.message().await.expect("chunk") {
        n += chunk.kvs().len();
        more = chunk.more();
    }
    assert_eq!((n, more), (25, true));
}
