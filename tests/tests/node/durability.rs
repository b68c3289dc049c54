//! Durability: kill -9 under a write load loses no acknowledged write; revisions and watches
//! resume after restart; SIGTERM shuts down cleanly.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{GetOptions, WatchOptions};
use keyhold_tests::NodeProcess;

use crate::client;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_under_load_keeps_every_acknowledged_write() {
    let mut node = NodeProcess::start();
    let acked: Arc<Mutex<Vec<(String, String, i64)>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut c = client(&node).await;
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let (k, v) = (format!("load/{w}/{}", i % 50), format!("{w}-{i}"));
                match c.put(k.clone(), v.clone(), None).await {
                    Ok(r) => {
                        acked
                            .lock()
                            .expect("lock")
                            .push((k, v, r.header().expect("h").revision()))
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    // Let the load run until a few hundred writes are acknowledged, then kill -9 mid-load.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while acked.lock().expect("lock").len() < 300 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "load made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.kill9();
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().expect("lock").clone();
    node.restart();
    let mut c = client(&node).await;
    // The latest acknowledged value of every key is there (or a later, unacknowledged one from
    // the same writer, which can only have a higher revision).
    let mut latest = std::collections::BTreeMap::new();
    for (k, v, rev) in &acked {
        let e = latest.entry(k.clone()).or_insert((v.clone(), *rev));
        if *rev > e.1 {
            *e = (v.clone(), *rev);
        }
    }
    let all = c
        .get("load/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get");
    let stored: std::collections::BTreeMap<String, i64> = all
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.mod_revision(),
            )
        })
        .collect();
    for (k, (_, rev)) in &latest {
        let got = stored
            .get(k)
            .unwrap_or_else(|| panic!("acknowledged key {k} lost"));
        assert!(
            *got >= *rev,
            "{k}: acknowledged revision {rev}, found {got}"
        );
    }
    let max_acked = acked.iter().map(|a| a.2).max().expect("some writes");
    let r = c.put("after", "restart", None).await.expect("put");
    assert!(
        r.header().expect("h").revision() > max_acked,
        "revisions continue after restart"
    );
    // A watch from revision 2 replays every acknowledged write, at its revision.
    let mut w = c
        .watch(
            "load/",
            Some(WatchOptions::new().with_prefix().with_start_revision(2)),
        )
        .await
        .expect("watch");
    assert!(w.message().await.expect("ok").expect("created").created());
    let mut seen = std::collections::BTreeMap::new();
    while seen.len() < acked.len() {
        let r = tokio::time::timeout(Duration::from_secs(10), w.message())
            .await
            .expect("replay in time");
        let Some(r) = r.expect("ok") else { break };
        for e in r.events() {
            let kv = e.kv().expect("kv");
            seen.insert(
                kv.mod_revision(),
                String::from_utf8_lossy(kv.value()).into_owned(),
            );
        }
        if seen.keys().next_back().is_some_and(|r| *r >= max_acked) {
            break;
        }
    }
    for (_, v, rev) in &acked {
        assert_eq!(
            seen.get(rev),
            Some(v),
            "acknowledged write at revision {rev} missing from replay"
        );
    }
}

#[tokio::test]
async fn sigterm_is_a_clean_shutdown() {
    let mut node = NodeProcess::start();
    {
        let mut c = client(&node).await;
        c.put("durable", "yes", None).await.expect("put");
        let mut w = c.watch("durable", None).await.expect("watch");
        w.message().await.expect("ok").expect("created");
        let clean = node.terminate();
        // etcd 3.4 dies by the signal; keyhold-node shuts down in order and exits 0.
        assert!(
            clean || keyhold_tests::process::target_is_etcd(),
            "exit status 0 on SIGTERM, even with an open watch:\n{}",
            node.log()
        );
    }
    node.restart();
    let mut c = client(&node).await;
    assert_eq!(
        c.get("durable", None).await.expect("get").kvs()[0].value(),
        b"yes"
    );
}
