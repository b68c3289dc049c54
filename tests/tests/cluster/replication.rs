//! Replication: client semantics on every member, crash of the leader under load, catch-up of
//! a lagging member by snapshot.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{EventType, GetOptions};
use keyhold_tests::{Cluster, etcdctl};

use crate::{client, hash_kvs, wait_revision};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_on_a_follower_read_on_another_watch_on_the_leader() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader(None);
    let followers = cluster.others(leader);
    let (f1, f2) = (followers[0], followers[1]);
    let eps = cluster.endpoints();

    let mut watcher = client(&eps[leader]).await;
    let mut stream = watcher.watch("replicated", None).await.expect("watch");

    let mut writer = client(&eps[f1]).await;
    let put = writer
        .put("replicated", "v1", None)
        .await
        .expect("put on a follower");
    let rev = put.header().expect("header").revision();
    let ids = cluster.member_ids();
    assert_eq!(put.header().expect("header").member_id(), ids[f1]);

    // A serializable read on the member that took the write sees it at once (the follower
    // answers only after applying the forwarded write itself).
    let local = writer
        .get("replicated", Some(GetOptions::new().with_serializable()))
        .await
        .expect("serializable get");
    assert_eq!(local.kvs()[0].value(), b"v1");

    // A linearizable read on the other follower (ReadIndex through the leader).
    let mut reader = client(&eps[f2]).await;
    let got = reader
        .get("replicated", None)
        .await
        .expect("linearizable get");
    assert_eq!(got.kvs()[0].value(), b"v1");
    assert!(got.header().expect("header").revision() >= rev);

    let resp = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("watch event in time")
        .expect("stream")
        .expect("message");
    let resp = if resp.created() && resp.events().is_empty() {
        tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("watch event in time")
            .expect("stream")
            .expect("message")
    } else {
        resp
    };
    assert_eq!(resp.events().len(), 1);
    assert_eq!(resp.events()[0].event_type(), EventType::Put);
    assert_eq!(resp.events()[0].kv().expect("kv").mod_revision(), rev);

    // Every member lists the same three members, with names and client URLs (which each member
    // publishes through raft once it runs, as etcd members do).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for e in &eps {
        let mut c = client(e).await;
        loop {
            let list = c.member_list().await.expect("member list");
            let mut names: Vec<&str> = list.members().iter().map(|m| m.name()).collect();
            names.sort_unstable();
            let published = list.members().iter().all(|m| m.client_urls().len() == 1);
            if names == ["m0", "m1", "m2"] && published {
                assert!(list.members().iter().all(|m| !m.is_learner()));
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "on {e}: {:?}",
                list.members()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Status: one leader, every member names the same one; HashKV agrees.
    let mut leaders = Vec::new();
    for e in &eps {
        let mut c = client(e).await;
        let s = c.status().await.expect("status");
        leaders.push(s.leader());
        assert!(s.raft_index() >= s.raft_applied_index().min(s.raft_index()));
    }
    assert!(leaders.iter().all(|l| *l == ids[leader]), "{leaders:x?}");
    wait_revision(&eps, rev).await;
    let hashes = hash_kvs(&eps, rev).await;
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");

    // etcdctl against all endpoints works as against etcd.
    let out = etcdctl(&eps.join(","), &["endpoint", "health"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_leader_under_load_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(None);
    let eps = cluster.endpoints();
    // (key, value, revision) of every acknowledged put; each writer talks to one member.
    let acked: Arc<Mutex<Vec<(String, String, i64)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..12 {
        let ep = eps[w % 3].clone();
        let (acked, stop) = (acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut c = client(&ep).await;
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (k, v) = (format!("load/{w}/{}", i % 20), format!("{w}-{i}"));
                i += 1;
                if let Ok(Ok(r)) =
                    tokio::time::timeout(Duration::from_secs(3), c.put(k.clone(), v.clone(), None))
                        .await
                {
                    let rev = r.header().expect("header").revision();
                    acked.lock().expect("lock").push((k, v, rev));
                }
            }
        }));
    }
    let wait_acked = |n: usize| {
        let acked = acked.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while acked.lock().expect("lock").len() < n {
                assert!(tokio::time::Instant::now() < deadline, "load stalled");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_acked(300).await;
    let before_kill = acked.lock().expect("lock").len();
    cluster.members[leader].kill9();
    let killed_at = Instant::now();
    let new_leader = cluster.wait_leader(Some(leader));
    // The first write after the kill through a surviving member.
    wait_acked(before_kill + 50).await;
    eprintln!(
        "leader {leader} killed; member {new_leader} leads after {:?}",
        killed_at.elapsed()
    );
    cluster.members[leader].restart();
    eprintln!("killed member restarted after {:?}", killed_at.elapsed());
    let so_far = acked.lock().expect("lock").len();
    wait_acked(so_far + 100).await;
    eprintln!("load continued; checking");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }

    let acked = acked.lock().expect("lock").clone();
    let top = acked.iter().map(|a| a.2).max().expect("writes");
    wait_revision(&eps, top).await;
    let mut latest: BTreeMap<String, (String, i64)> = BTreeMap::new();
    for (k, v, rev) in &acked {
        let e = latest.entry(k.clone()).or_insert((v.clone(), *rev));
        if *rev > e.1 {
            *e = (v.clone(), *rev);
        }
    }
    for e in &eps {
        let mut c = client(e).await;
        // Every acknowledged write is in the history of every member, at its revision.
        for (k, (v, rev)) in &latest {
            let got = c
                .get(
                    k.as_str(),
                    Some(GetOptions::new().with_revision(*rev).with_serializable()),
                )
                .await
                .expect("historical get");
            assert_eq!(
                got.kvs().first().map(|kv| kv.value().to_vec()),
                Some(v.as_bytes().to_vec()),
                "{e}: {k}@{rev}"
            );
        }
    }
    let hashes = hash_kvs(&eps, top).await;
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_behind_a_log_purge_catches_up_by_snapshot() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(None);
    let lagging = cluster.others(leader)[0];
    let eps = cluster.endpoints();
    cluster.members[lagging].kill9();
    // More single-write entries than a snapshot interval (1000) plus the entries kept after it
    // (200), so the leader purges what the stopped member lacks.
    let mut c = client(&eps[leader]).await;
    let mut rev = 0;
    for i in 0..1500 {
        let r = c
            .put(format!("snap/{}", i % 100), format!("v{i}"), None)
            .await
            .expect("put");
        rev = r.header().expect("header").revision();
    }
    cluster.members[lagging].restart_no_wait();
    wait_revision(&eps[lagging..=lagging], rev).await;
    let log = cluster.members[lagging].log();
    assert!(
        log.contains("snapshot received"),
        "the member caught up without a snapshot:\n{log}"
    );
    let hashes = hash_kvs(&eps, rev).await;
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");
    // The received export is not kept once installed (the store holds the state).
    let snap_dir = cluster.members[lagging].data_dir().join("snap");
    let kept: u64 = std::fs::read_dir(&snap_dir)
        .expect("snap dir")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert!(
        kept < 4096,
        "{kept} bytes of snapshot files kept in {snap_dir:?}"
    );
    // And it keeps replicating after the snapshot.
    let r = c.put("snap/after", "x", None).await.expect("put");
    let after = r.header().expect("header").revision();
    wait_revision(&eps[lagging..=lagging], after).await;
    let mut lc = client(&eps[lagging]).await;
    let got = lc
        .get("snap/after", Some(GetOptions::new().with_serializable()))
        .await
        .expect("get");
    assert_eq!(got.kvs()[0].value(), b"x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_keep_serving_with_two_down() {
    let mut cluster = Cluster::start(5);
    let leader = cluster.wait_leader(None);
    let eps = cluster.endpoints();
    let others = cluster.others(leader);
    // Lose the leader and one follower: three of five are still a quorum.
    cluster.members[leader].kill9();
    cluster.members[others[0]].kill9();
    let new = cluster.wait_leader(Some(leader));
    let mut c = client(&eps[others[1]]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let rev = loop {
        match c.put("five", "v", None).await {
            Ok(r) => break r.header().expect("header").revision(),
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no write with 3 of 5: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(new != leader);
    // Both come back and catch up; all five agree.
    cluster.members[leader].restart();
    cluster.members[others[0]].restart();
    wait_revision(&eps, rev).await;
    let hashes = hash_kvs(&eps, rev).await;
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");
}
