//! Lease keepalive coalescing.

use std::time::Duration;

use keyhold_proto::etcdserverpb::LeaseKeepAliveRequest;
use keyhold_proto::etcdserverpb::lease_client::LeaseClient;
use keyhold_tests::NodeProcess;
use keyhold_tests::proxy::ProxyProcess;
use tokio_stream::StreamExt;

use super::client;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_one_renewal_and_a_lease_ends_one_ttl_after_its_last_client() {
    let node = NodeProcess::start();
    let proxy = ProxyProcess::start(&[node.client.to_string()], &[]);
    let mut c = client(&proxy.endpoint()).await;
    let lease = c.lease_grant(30, None).await.expect("grant").id();
    // Ten clients keep the same lease alive every 100 ms for 2 s.
    let mut keepers = Vec::new();
    for _ in 0..10 {
        let endpoint = proxy.endpoint();
        keepers.push(tokio::spawn(async move {
            let mut c = client(&endpoint).await;
            let (mut k, mut answers) = c.lease_keep_alive(lease).await.expect("keepalive");
            let mut ttls = Vec::new();
            for _ in 0..20 {
                k.keep_alive().await.expect("send");
                let a = answers.message().await.expect("ok").expect("answer");
                ttls.push(a.ttl());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ttls
        }));
    }
    for k in keepers {
        let ttls = k.await.expect("keeper");
        assert!(
            ttls.iter().all(|&t| (20..=30).contains(&t)),
            "true TTLs: {ttls:?}"
        );
    }
    let renewals = proxy
        .metric("keyhold_proxy_keepalive_renewals_total")
        .unwrap_or(0.0);
    assert!(
        (1.0..=3.0).contains(&renewals),
        "200 client keepalives over 2 s of a 30 s lease: {renewals} upstream renewals"
    );

    // A client that sends one keepalive and half-closes gets its answer.
    let mut raw = LeaseClient::connect(format!("http://{}", proxy.endpoint()))
        .await
        .expect("connect");
    let once = tokio_stream::iter([LeaseKeepAliveRequest { id: lease }]);
    let mut answers = raw
        .lease_keep_alive(once)
        .await
        .expect("keepalive")
        .into_inner();
    let a = tokio::time::timeout(Duration::from_secs(5), answers.next())
        .await
        .expect("answered in time")
        .expect("an answer")
        .expect("ok");
    assert_eq!(a.id, lease);
    assert!(a.ttl > 0);

    // A short lease kept alive through the proxy expires about one TTL after its client stops.
    let short = c.lease_grant(2, None).await.expect("grant").id();
    c.put(
        "short",
        "v",
        Some(etcd_client::PutOptions::new().with_lease(short)),
    )
    .await
    .expect("put");
    let (mut k, mut answers) = c.lease_keep_alive(short).await.expect("keepalive");
    for _ in 0..6 {
        k.keep_alive().await.expect("send");
        let a = answers.message().await.expect("ok").expect("answer");
        assert!(a.ttl() >= 1, "a kept lease is alive: {a:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop((k, answers));
    let stopped = std::time::Instant::now();
    let mut direct = client(&node.client.to_string()).await;
    loop {
        let r = direct.get("short", None).await.expect("get");
        if r.count() == 0 {
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(5),
            "the proxy kept renewing a lease nobody keeps alive"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "lease gone {:?} after its last keepalive",
        stopped.elapsed()
    );
}
