//! Failover: the member the proxy uses dies (kill -9) or stops answering (SIGSTOP: to the
//! proxy, a partition from that member) while clients read, write, watch and keep a lease alive
//! through the proxy.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{GetOptions, PutOptions, WatchOptions};
use keyhold_tests::Cluster;
use keyhold_tests::cluster::FAST_ELECTION;
use keyhold_tests::proxy::ProxyProcess;

use super::client;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_proxys_member_keeps_reads_watches_and_leases_going() {
    failover(Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_member_behind_the_proxy_keeps_reads_watches_and_leases_going() {
    failover(Fault::Pause).await;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Pause,
}

async fn failover(fault: Fault) {
    let mut cluster = tokio::task::block_in_place(|| Cluster::start_with(3, FAST_ELECTION, &[]));
    let endpoints: Vec<String> = cluster
        .members
        .iter()
        .map(|m| m.client.to_string())
        .collect();
    // The proxy prefers its first endpoint: member 0 is the one to kill.
    let proxy = ProxyProcess::start(&endpoints, &[]);
    let mut c = client(&proxy.endpoint()).await;

    let lease = c.lease_grant(5, None).await.expect("grant").id();
    c.put("leased", "v", Some(PutOptions::new().with_lease(lease)))
        .await
        .expect("put");
    let mut watch = c
        .watch("seq/", Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch");
    assert!(
        watch
            .message()
            .await
            .expect("ok")
            .expect("created")
            .created()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let reads_ok = Arc::new(AtomicUsize::new(0));
    let keeper = {
        let (endpoint, stop) = (proxy.endpoint(), stop.clone());
        tokio::spawn(async move {
            let mut c = client(&endpoint).await;
            let mut session = None;
            while !stop.load(Ordering::Relaxed) {
                if session.is_none() {
                    session = c.lease_keep_alive(lease).await.ok();
                }
                if let Some((k, answers)) = session.as_mut() {
                    let ok = k.keep_alive().await.is_ok()
                        && matches!(answers.message().await, Ok(Some(a)) if a.ttl() > 0);
                    if !ok {
                        session = None;
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let reader = {
        let (endpoint, stop, reads_ok) = (proxy.endpoint(), stop.clone(), reads_ok.clone());
        tokio::spawn(async move {
            let mut c = client(&endpoint).await;
            while !stop.load(Ordering::Relaxed) {
                let opts = GetOptions::new().with_serializable();
                if c.get("leased", Some(opts)).await.is_ok() {
                    reads_ok.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Writes before, during and after the kill; each key once (unknown outcomes allowed).
    let mut acked = Vec::new();
    for i in 0..60 {
        if i == 20 {
            tokio::task::block_in_place(|| match fault {
                Fault::Kill => cluster.members[0].kill9(),
                Fault::Pause => cluster.members[0].pause(),
            });
        }
        if let Ok(r) = c.put(format!("seq/{i:03}"), "x", None).await {
            acked.push(r.header().expect("header").revision());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reads_before_end = reads_ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(6)).await; // longer than the lease TTL
    stop.store(true, Ordering::Relaxed);
    let _ = keeper.await;
    let _ = reader.await;
    assert!(
        reads_ok.load(Ordering::Relaxed) > reads_before_end,
        "reads continue after the kill"
    );

    // The lease outlived the fault (5 s TTL, kept alive through the proxy throughout).
    let leased = c.get("leased", None).await.expect("get");
    assert_eq!(
        leased.count(),
        1,
        "lease kept alive across the member's death"
    );

    // The watch saw every committed write exactly once, in order, with no second `created`.
    let truth = c
        .get("seq/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get");
    let mut want: Vec<i64> = truth.kvs().iter().map(|kv| kv.mod_revision()).collect();
    want.sort_unstable();
    assert!(
        acked.iter().all(|r| want.contains(r)),
        "every acknowledged write is there"
    );
    let mut got = Vec::new();
    while got.len() < want.len() {
        let r = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("events in time")
            .expect("ok")
            .expect("msg");
        assert!(!r.created(), "no second created after the failover");
        assert!(!r.canceled(), "watch not cancelled: {}", r.cancel_reason());
        got.extend(
            r.events()
                .iter()
                .map(|e| e.kv().expect("kv").mod_revision()),
        );
    }
    assert_eq!(got, want, "no gap, no duplicate, in order");
    // And that was a failover: member 0 is marked down and the shared watch moved.
    let m0 = format!(
        "keyhold_proxy_endpoint_healthy{{endpoint=\"http://{}\"}}",
        endpoints[0]
    );
    assert_eq!(
        proxy.metric(&m0),
        Some(0.0),
        "member 0 is down in the proxy's view"
    );
    assert!(
        proxy
            .metric("keyhold_proxy_watch_resumes_total")
            .unwrap_or(0.0)
            >= 1.0
    );
    if fault == Fault::Pause {
        cluster.members[0].resume();
    }
}
