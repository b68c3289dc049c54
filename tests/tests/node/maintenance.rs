//! Maintenance and HTTP: status, hash, alarms, defragment, snapshot, /health, /version, /metrics.

use std::time::Duration;

use etcd_client::{AlarmAction, AlarmType, CompactionOptions, GetOptions};
use futures::StreamExt;
use keyhold_tests::NodeProcess;
use sha2::{Digest, Sha256};

use crate::client;

#[tokio::test]
async fn status_hash_alarm_defrag() {
    let node = NodeProcess::start();
    let mut c = client(&node).await;
    c.put("a", "1", None).await.expect("put");
    let s = c.status().await.expect("status");
    assert_eq!(s.version(), crate::expected_version());
    let member = s.header().expect("h").member_id();
    assert_eq!(s.leader(), member, "a single member leads");
    assert!(s.raft_index() >= s.raft_applied_index() && s.raft_applied_index() > 0);
    assert!(s.db_size() > 0);
    let h1 = c.hash_kv(0).await.expect("hashkv");
    let h2 = c.hash_kv(2).await.expect("hashkv");
    assert_eq!(h1.hash(), h2.hash(), "revision 2 is current");
    c.put("a", "2", None).await.expect("put");
    assert_ne!(c.hash_kv(0).await.expect("hashkv").hash(), h1.hash());
    assert_eq!(
        c.hash_kv(2).await.expect("hashkv").hash(),
        h1.hash(),
        "history hash is stable"
    );
    let alarms = c
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .expect("alarm");
    assert!(alarms.alarms().is_empty());
    c.defragment().await.expect("defrag");
    assert_eq!(c.get("a", None).await.expect("get").kvs()[0].value(), b"2");
    let members = c.member_list().await.expect("members");
    assert_eq!(members.members().len(), 1);
    assert_eq!(
        members.members()[0].client_urls(),
        [format!("http://{}", node.endpoint())]
    );
}

#[tokio::test]
async fn equal_histories_hash_equal_on_two_nodes() {
    let (a, b) = (NodeProcess::start(), NodeProcess::start());
    let mut hashes = Vec::new();
    for node in [&a, &b] {
        let mut c = client(node).await;
        for i in 0..20 {
            c.put(format!("k{}", i % 5), format!("v{i}"), None)
                .await
                .expect("put");
        }
        c.delete("k1", None).await.expect("delete");
        c.compact(10, None).await.expect("compact");
        hashes.push(c.hash_kv(0).await.expect("hashkv").hash());
    }
    assert_eq!(hashes[0], hashes[1]);
}

/// A compaction is in effect once applied; its sweep runs in the background at the flags' pace,
/// `physical` answers only once it is done, and an unfinished sweep resumes after a restart.
#[tokio::test]
async fn compaction_sweeps_in_the_background_and_physical_waits_for_it() {
    if keyhold_tests::process::target_is_etcd() {
        return; // Keyhold's flags, metric and history dump
    }
    // Steps of 10 records an hour apart: a sweep stays visibly unfinished.
    let slow = [
        "--compaction-batch-limit",
        "10",
        "--compaction-sleep-interval",
        "1h",
    ];
    let mut node = NodeProcess::start_with(&slow);
    let mut c = client(&node).await;
    for i in 0..50 {
        c.put("k", format!("v{i}"), None).await.expect("put"); // revisions 2..=51
    }
    c.compact(50, None).await.expect("compact");
    let old = c.get("k", Some(GetOptions::new().with_revision(49))).await;
    assert!(
        format!("{:?}", old.expect_err("compacted"))
            .contains("required revision has been compacted"),
        "in effect before the sweep"
    );
    wait_for_metric(&node, "keyhold_mvcc_compaction_sweep_pending", 1.0).await;
    c.compact(51, Some(CompactionOptions::new().with_physical()))
        .await
        .expect("physical compact");
    drop(c); // an open client connection holds up the node's shutdown
    node.terminate();
    assert_eq!(kept_revisions(&node), [51], "only k@51 is left");

    node.restart();
    let mut c = client(&node).await;
    for i in 0..10 {
        c.put("k", format!("w{i}"), None).await.expect("put"); // revisions 52..=61
    }
    c.compact(60, None).await.expect("compact");
    wait_for_metric(&node, "keyhold_mvcc_compaction_sweep_pending", 1.0).await;
    drop(c);
    node.terminate();
    node.set_extra_args(&[]);
    node.restart();
    wait_for_metric(&node, "keyhold_mvcc_compaction_sweep_pending", 0.0).await;
    node.terminate();
    assert_eq!(kept_revisions(&node), [60, 61]);
}

/// After a compaction, a member's store shrinks on disk to about its live data by itself: no
/// defragment, and no later write needed for the replaced files to go.
#[tokio::test]
async fn compacted_history_leaves_the_disk_without_a_defragment() {
    if keyhold_tests::process::target_is_etcd() {
        return; // etcd keeps its file size until a defragment
    }
    let node = NodeProcess::start();
    let c = client(&node).await;
    let value = vec![b'v'; 300];
    // 100,000 puts over 1,000 keys: about 35 MB of history, 0.3 MB live.
    futures::stream::iter(0..100_000)
        .for_each_concurrent(64, |i| {
            let (mut c, value) = (c.clone(), value.clone());
            async move {
                c.put(format!("k{:03}", i % 1000), value, None)
                    .await
                    .expect("put");
            }
        })
        .await;
    let mut c = c;
    let head = c
        .get("k000", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();
    c.compact(head, None).await.expect("compact");
    // The keyspaces' files (fjall's journal is a preallocated file of its own, bounded apart).
    // fjall deletes a replaced file once nothing refers to it any more: poll for the result.
    let keyspaces = node.data_dir().join("db").join("keyspaces");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let reclaimed = node.log().contains("reclaimed compacted history");
        let store = disk_usage(&keyspaces);
        if reclaimed && store < 4 << 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{store} bytes on disk for 0.3 MB of live data (reclaimed: {reclaimed})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Bytes allocated to the files under `dir`.
fn disk_usage(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry"))
        .map(|e| match e.file_type().expect("type").is_dir() {
            true => disk_usage(&e.path()),
            false => std::os::unix::fs::MetadataExt::blocks(&e.metadata().expect("metadata")) * 512,
        })
        .sum()
}

/// The revisions of the changes in the stopped node's history.
fn kept_revisions(node: &NodeProcess) -> Vec<i64> {
    let truth = keyhold_tests::watch_check::Truth::parse(&node.dump_history()).expect("dump");
    truth.events.iter().map(|e| e.revision).collect()
}

/// Polls `/metrics` until `name` reads `want` (refreshed every second), for at most 30 s.
async fn wait_for_metric(node: &NodeProcess, name: &str, want: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while node.metric(name) != Some(want) {
        assert!(
            std::time::Instant::now() < deadline,
            "{name} never read {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn snapshot_stream_ends_with_its_sha256() {
    let node = NodeProcess::start();
    let mut c = client(&node).await;
    for i in 0..200 {
        c.put(format!("s{i}"), vec![b'x'; 500], None)
            .await
            .expect("put");
    }
    let mut stream = c.snapshot().await.expect("snapshot");
    let mut chunks = Vec::new();
    while let Some(m) = stream.message().await.expect("chunk") {
        chunks.push((m.remaining_bytes(), m.blob().to_vec()));
    }
    let (last_remaining, trailer) = chunks.pop().expect("trailer");
    assert_eq!(last_remaining, 0);
    let body: Vec<u8> = chunks.iter().flat_map(|(_, b)| b.clone()).collect();
    assert!(body.len() > 200 * 500);
    assert_eq!(
        chunks.last().expect("data").0,
        0,
        "remaining_bytes counts down to 0"
    );
    assert_eq!(trailer, Sha256::digest(&body).to_vec());
}

#[tokio::test]
async fn http_health_version_metrics() {
    let node = NodeProcess::start();
    let (code, body) = node.http_get("/health").expect("health");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["health"], "true");
    let (code, body) = node.http_get("/version").expect("version");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["etcdserver"], crate::expected_version());
    let (code, body) = node.http_get("/metrics").expect("metrics");
    assert_eq!(code, 200);
    for name in [
        "etcd_mvcc_db_total_size_in_bytes",
        "etcd_server_has_leader 1",
        "etcd_server_is_leader 1",
    ] {
        assert!(body.contains(name), "metrics lack {name}:\n{body}");
    }
}
