//! The range cache: fresh for writes made anywhere, never behind what the proxy returned.

use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use keyhold_tests::proxy::ProxyProcess;
use keyhold_tests::{NodeProcess, etcdctl};

use super::client;

const VISIBLE_WITHIN: Duration = Duration::from_secs(5);

fn serializable() -> GetOptions {
    GetOptions::new().with_serializable()
}

/// Reads `key` (with `opts`) through `c` until `done` holds; returns how long it took.
async fn until_seen(
    c: &mut etcd_client::Client,
    key: &str,
    opts: GetOptions,
    done: impl Fn(&etcd_client::GetResponse) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let r = c.get(key, Some(opts.clone())).await.expect("get");
        if done(&r) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < VISIBLE_WITHIN,
            "write not visible through the proxy in time"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_straight_to_a_member_reach_cached_serializable_reads() {
    let node = NodeProcess::start();
    let proxy = ProxyProcess::start(&[node.client.to_string()], &[]);
    let member = node.client.to_string();
    let mut c = client(&proxy.endpoint()).await;
    c.put("k", "v1", None).await.expect("put");
    c.put("k/a", "1", None).await.expect("put");
    // Fill the cache: a point read, a prefix read and a from-key ("\0" range end) read.
    until_seen(&mut c, "k", serializable(), |r| {
        r.kvs().first().is_some_and(|kv| kv.value() == b"v1")
    })
    .await;
    let prefix = || serializable().with_prefix();
    let from_key = || serializable().with_from_key();
    assert_eq!(c.get("k/", Some(prefix())).await.expect("get").count(), 1);
    assert_eq!(c.get("k", Some(from_key())).await.expect("get").count(), 2);
    let hits_before = proxy
        .metric("keyhold_proxy_cache_hits_total")
        .unwrap_or(0.0);
    for _ in 0..5 {
        let r = c.get("k", Some(serializable())).await.expect("get");
        assert_eq!(r.kvs()[0].value(), b"v1");
    }
    let hits = proxy
        .metric("keyhold_proxy_cache_hits_total")
        .unwrap_or(0.0);
    assert!(
        hits >= hits_before + 5.0,
        "repeated serializable reads are cache hits ({hits_before} → {hits})"
    );

    // Writes that bypass the proxy: etcdctl straight to the member.
    for args in [["put", "k", "v2"], ["put", "k/b", "2"], ["put", "zz", "3"]] {
        let out = etcdctl(&member, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let took = until_seen(&mut c, "k", serializable(), |r| r.kvs()[0].value() == b"v2").await;
    eprintln!("a direct write reached the proxy's serializable reads after {took:?}");
    until_seen(&mut c, "k/", prefix(), |r| r.count() == 2).await;
    until_seen(&mut c, "k", from_key(), |r| r.count() == 4).await;
    // Never stale again.
    for _ in 0..50 {
        let r = c.get("k", Some(serializable())).await.expect("get");
        assert_eq!(
            r.kvs()[0].value(),
            b"v2",
            "stale read after the write was seen"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reads_its_own_writes_through_the_cache() {
    let node = NodeProcess::start();
    let proxy = ProxyProcess::start(&[node.client.to_string()], &[]);
    let mut c = client(&proxy.endpoint()).await;
    c.put("mine", "0", None).await.expect("put");
    for i in 1..=50 {
        // Warm the entry, write through the proxy, read at once: never the old value.
        let _ = c.get("mine", Some(serializable())).await.expect("get");
        let put = c.put("mine", format!("{i}"), None).await.expect("put");
        let r = c.get("mine", Some(serializable())).await.expect("get");
        assert_eq!(r.kvs()[0].value(), format!("{i}").as_bytes());
        assert!(
            r.header().expect("header").revision() >= put.header().expect("header").revision(),
            "a read never reports a revision older than the client's write"
        );
    }
}
