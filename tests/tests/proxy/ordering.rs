//! `--serializable-ordering`: a serializable read never goes back in revision when the proxy
//! moves to a member that lags behind what it already answered.

use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use keyhold_tests::Cluster;
use keyhold_tests::cluster::FAST_ELECTION;
use keyhold_tests::proxy::ProxyProcess;

use super::client;

/// Five members: the leader, `fresh` (the proxies' first endpoint), `lagging` (cut off from
/// everyone: its serializable answers stay old), and two more that keep a quorum when `fresh`
/// stops answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_reads_never_go_back_across_a_member_switch() {
    let cluster = tokio::task::block_in_place(|| Cluster::start_with(5, FAST_ELECTION, &[]));
    let leader = tokio::task::block_in_place(|| cluster.wait_leader(None));
    let followers = cluster.others(leader);
    let (fresh, lagging, spare) = (followers[0], followers[1], followers[2]);
    let ep = |i: usize| cluster.members[i].client.to_string();
    let endpoints = [ep(fresh), ep(lagging), ep(spare)];
    let ordered = ProxyProcess::start(&endpoints, &["--serializable-ordering"]);
    // No cache on the contrast proxy: its cache feed would notice the lagging member has no
    // leader and move away from it, so the stale read would depend on timing.
    let plain = ProxyProcess::start(&endpoints, &["--cache-bytes", "0"]);

    tokio::task::block_in_place(|| cluster.isolate(lagging));
    let mut written = 0;
    for proxy in [&ordered, &plain] {
        let mut c = client(&proxy.endpoint()).await;
        for i in 0..5 {
            let r = c.put("k", format!("v{i}"), None).await.expect("put");
            written = written.max(r.header().expect("header").revision());
        }
        // The proxy has now answered at `written` (its observed revision).
        let r = c.get("k", None).await.expect("get");
        assert_eq!(r.kvs()[0].value(), b"v4");
    }

    // `fresh` stops answering: both proxies move on to `lagging`, next in their list.
    cluster.members[fresh].pause();
    let unhealthy = format!(
        "keyhold_proxy_endpoint_healthy{{endpoint=\"http://{}\"}}",
        ep(fresh)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    for proxy in [&ordered, &plain] {
        while proxy.metric(&unhealthy) != Some(0.0) {
            assert!(
                Instant::now() < deadline,
                "the proxy never noticed the pause"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let serializable = || Some(GetOptions::new().with_serializable());
    let mut c = client(&ordered.endpoint()).await;
    for _ in 0..10 {
        let r = c.get("k", serializable()).await.expect("get");
        let rev = r.header().expect("header").revision();
        assert!(rev >= written, "ordered proxy went back: {rev} < {written}");
        assert_eq!(r.kvs()[0].value(), b"v4");
    }
    // Without the flag the same read comes from the lagging member: the test can fail.
    let mut c = client(&plain.endpoint()).await;
    let r = c.get("k", serializable()).await.expect("get");
    assert!(
        r.header().expect("header").revision() < written,
        "the plain proxy was expected to answer from the lagging member"
    );
    cluster.members[fresh].resume();
    tokio::task::block_in_place(|| cluster.heal());
}
