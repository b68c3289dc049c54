//! Faults: a partitioned leader, a paused leader, lease expiry across a leader change.

use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use keyhold_tests::Cluster;

use crate::{client, hash_kvs, status, wait_revision};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_stops_serving_and_the_majority_goes_on() {
    let cluster = Cluster::start(3);
    let old = cluster.wait_leader(None);
    let eps = cluster.endpoints();
    let mut c = client(&eps[old]).await;
    c.put("p", "before", None).await.expect("put");

    cluster.isolate(old);
    let new = cluster.wait_leader(Some(old));
    let mut majority = client(&eps[new]).await;
    let r = majority
        .put("p", "during", None)
        .await
        .expect("majority write");
    let during = r.header().expect("header").revision();

    // The minority side refuses linearizable reads and writes with etcd's errors (no stale
    // value, no acknowledged write that the majority never sees).
    let (code, msg) = status(c.get("p", None).await);
    assert_eq!(code, tonic::Code::Unavailable, "{msg}");
    assert!(msg.starts_with("etcdserver: "), "{msg}");
    let (code, msg) = status(c.put("p", "minority", None).await);
    assert_eq!(code, tonic::Code::Unavailable, "{msg}");
    assert!(
        [
            "etcdserver: request timed out",
            "etcdserver: no leader",
            "etcdserver: leader changed"
        ]
        .contains(&msg.as_str()),
        "{msg}"
    );

    cluster.heal();
    wait_revision(&eps, during).await;
    let got = c.get("p", None).await.expect("read after heal");
    assert_eq!(got.kvs()[0].value(), b"during");
    let top = got.header().expect("header").revision();
    wait_revision(&eps, top).await;
    let hashes = hash_kvs(&eps, top).await;
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_serves_no_stale_read_after_it_resumes() {
    let cluster = Cluster::start(3);
    let old = cluster.wait_leader(None);
    let eps = cluster.endpoints();
    let mut on_old = client(&eps[old]).await;
    on_old.put("s", "before", None).await.expect("put");

    cluster.members[old].pause();
    // Past the election timeout (500 ms): the others elect a leader and write.
    let new = cluster.wait_leader(Some(old));
    let mut on_new = client(&eps[new]).await;
    on_new
        .put("s", "after", None)
        .await
        .expect("put on the new leader");
    cluster.members[old].resume();

    // The first linearizable read on the old leader either fails or sees the new value.
    match on_old.get("s", None).await {
        Ok(r) => assert_eq!(r.kvs()[0].value(), b"after", "stale read"),
        Err(e) => eprintln!("old leader refused the read: {e}"),
    }
    // Once it has learned of the new term it serves linearizable reads again (clients retry
    // `Unavailable`, as etcd's do).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let got = loop {
        match on_old.get("s", None).await {
            Ok(r) => break r,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never recovered: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(got.kvs()[0].value(), b"after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_survives_a_leader_change_while_kept_alive_then_expires() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(None);
    let follower = cluster.others(leader)[0];
    let eps = cluster.endpoints();
    let mut c = client(&eps[follower]).await;
    let lease = c.lease_grant(5, None).await.expect("grant").id();
    c.put(
        "leased",
        "v",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("put with lease");
    // Keepalives through a follower (forwarded to the leader).
    let (mut keeper, mut answers) = c.lease_keep_alive(lease).await.expect("keepalive");
    let keep = tokio::spawn(async move {
        for _ in 0..8 {
            keeper.keep_alive().await.expect("send keepalive");
            let a = answers.message().await.expect("answer").expect("message");
            assert!(a.ttl() > 0, "lease lost while kept alive");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.members[leader].kill9();
    cluster.wait_leader(Some(leader));
    keep.await.expect("kept alive across the leader change");
    let got = c
        .get("leased", Some(GetOptions::new().with_serializable()))
        .await
        .expect("get");
    assert_eq!(got.count(), 1, "key deleted while its lease was kept alive");

    // Keepalives stopped: the remaining TTL counts down from where it was (not reset by the
    // leader change) and the key goes within the TTL plus the revoke delay.
    let stopped = Instant::now();
    let ttl = c.lease_time_to_live(lease, None).await.expect("ttl").ttl();
    assert!((0..=5).contains(&ttl), "remaining TTL {ttl}");
    loop {
        let got = c.get("leased", None).await.expect("get");
        if got.count() == 0 {
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(5 + 3),
            "key outlived its lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrenewed_lease_keeps_its_remaining_ttl_across_a_leader_change() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(None);
    let follower = cluster.others(leader)[0];
    let eps = cluster.endpoints();
    let mut c = client(&eps[follower]).await;
    let granted = Instant::now();
    let lease = c.lease_grant(8, None).await.expect("grant").id();
    c.put(
        "unrenewed",
        "v",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("put with lease");
    // Past half the TTL the leader checkpoints the remaining TTL through raft; then it dies.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    cluster.members[leader].kill9();
    cluster.wait_leader(Some(leader));
    // The new leader resumes from the checkpoint (about 4 s left), not from the full 8 s that
    // a leader change without checkpoints would grant.
    let ttl = loop {
        match c.lease_time_to_live(lease, None).await {
            Ok(r) => break r.ttl(),
            Err(e) => {
                assert!(granted.elapsed() < Duration::from_secs(8), "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(
        (0..=5).contains(&ttl),
        "remaining TTL after the leader change: {ttl}"
    );
    loop {
        let got = c
            .get("unrenewed", Some(GetOptions::new().with_serializable()))
            .await;
        if got.is_ok_and(|r| r.count() == 0) {
            break;
        }
        assert!(
            granted.elapsed() < Duration::from_secs(8 + 3),
            "the lease outlived its TTL: the leader change reset it"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The leader syncs its raft log while the followers sync theirs, and nothing it commits shows
/// before its own copy is durable. With the leader's fsyncs held back (test-only switch), a write
/// reaches a follower's log at once, yet no member serves it and the client has no answer until
/// the leader's fsync completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_shows_only_once_the_leaders_own_copy_is_durable() {
    const FSYNC_DELAY_MS: u64 = 4000;
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader(None);
    let eps = cluster.endpoints();
    let mut c = client(&eps[leader]).await;
    // Members publish their names and client URLs through raft once they run: membership
    // entries, whose appends wait for the fsync even on the leader. Let those settle first.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = c.member_list().await.expect("member list");
        if list.members().len() == 3 && list.members().iter().all(|m| !m.client_urls().is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", list.members());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = c.put("d", "before", None).await.expect("put");
    let before = before.header().expect("header").revision();
    wait_revision(&eps, before).await;
    let follower = cluster.others(leader)[0];
    let mut f = client(&eps[follower]).await;
    let start = f.status().await.expect("status");
    let (logged, term) = (start.raft_index(), start.raft_term());

    let (code, body) = cluster.members[leader]
        .http_post(&format!("/debug/log-fsync-delay?ms={FSYNC_DELAY_MS}"))
        .expect("log-fsync-delay endpoint");
    assert_eq!(code, 200, "log-fsync-delay: {body}");
    let delayed = Instant::now();
    let put = tokio::spawn(async move { c.put("d", "after", None).await });

    // Replication does not wait for the leader's fsync: the entry reaches the follower's log.
    let deadline = Instant::now() + Duration::from_millis(FSYNC_DELAY_MS / 2);
    loop {
        let s = f.status().await.expect("status");
        // (A leader that waited for its own fsync before replicating would also stop sending
        // heartbeats, and a follower would take over.)
        assert_eq!(
            s.raft_term(),
            term,
            "an election while the leader's fsync was held back"
        );
        if s.raft_index() > logged {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the write did not reach a follower's log while the leader's fsync was held back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // But it is committed by a quorum that includes the leader's durable copy only, so no
    // member shows it yet and the client is still waiting.
    assert_eq!(
        served(&eps, "d").await,
        vec![(b"before".to_vec(), before); eps.len()],
        "a member served the write early"
    );
    assert!(
        delayed.elapsed() < Duration::from_millis(FSYNC_DELAY_MS),
        "the checks took longer than the fsync delay; they proved nothing"
    );
    assert!(
        !put.is_finished(),
        "the write was answered before the leader's fsync"
    );

    let after = put.await.expect("put task").expect("put after the fsync");
    let after = after.header().expect("header").revision();
    assert!(delayed.elapsed() >= Duration::from_millis(FSYNC_DELAY_MS));
    assert_eq!(after, before + 1);
    cluster.members[leader]
        .http_post("/debug/log-fsync-delay?ms=0")
        .expect("log-fsync-delay endpoint");
    wait_revision(&eps, after).await;
    assert_eq!(
        served(&eps, "d").await,
        vec![(b"after".to_vec(), after); eps.len()]
    );
}

/// What each member serves for `key` on a serializable read: its value and the header revision.
async fn served(endpoints: &[String], key: &str) -> Vec<(Vec<u8>, i64)> {
    let mut out = Vec::new();
    for ep in endpoints {
        let r = client(ep)
            .await
            .get(key, Some(GetOptions::new().with_serializable()))
            .await
            .expect("serializable get");
        let value = r
            .kvs()
            .first()
            .map(|kv| kv.value().to_vec())
            .unwrap_or_default();
        out.push((value, r.header().expect("header").revision()));
    }
    out
}
