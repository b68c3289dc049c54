//! Multi-member tests: real `keyhold-node` processes forming 3-member clusters over QUIC on
//! loopback, driven by the `etcd-client` crate and Debian's `etcdctl`. Partitions use the
//! nodes' test-only transport fault switch (the `failpoints` build `scripts/test` makes).

mod faults;
mod membership;
mod replication;
mod security;

use std::time::Duration;

use etcd_client::Client;

/// A connected `etcd-client` for one endpoint (no client-side failover, so the test decides
/// which member serves the request).
pub(crate) async fn client(endpoint: &str) -> Client {
    let opts = etcd_client::ConnectOptions::new()
        .with_timeout(Duration::from_secs(15))
        .with_connect_timeout(Duration::from_secs(2));
    Client::connect([endpoint], Some(opts))
        .await
        .expect("connect")
}

/// HashKV of every listed member at `revision`: `(hash, hash_revision)` per member.
pub(crate) async fn hash_kvs(endpoints: &[String], revision: i64) -> Vec<(u32, i64)> {
    let mut out = Vec::new();
    for e in endpoints {
        let c = client(e).await;
        let r = c
            .maintenance_client()
            .hash_kv(revision)
            .await
            .expect("hash_kv");
        out.push((r.hash(), r.hash_revision()));
    }
    out
}

/// Waits until every listed member has applied up to `revision` (serializable reads see it).
pub(crate) async fn wait_revision(endpoints: &[String], revision: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for e in endpoints {
        let mut c = client(e).await;
        loop {
            let r = c
                .get(
                    "any",
                    Some(etcd_client::GetOptions::new().with_serializable()),
                )
                .await;
            if let Ok(r) = r
                && r.header().expect("header").revision() >= revision
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{e} did not reach revision {revision}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The gRPC code and message of a failed call.
pub(crate) use keyhold_tests::grpc_status as status;
