//! Maintenance and HTTP: status, hash, alarms, defragment, snapshot, /health, /version, /metrics.

use etcd_client::{AlarmAction, AlarmType};
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
