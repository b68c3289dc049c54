//! Proxy tests: real `keyhold-node` members behind a real `keyhold-proxy`, driven through the
//! proxy by the `etcd-client` crate, raw tonic clients and Debian's `etcdctl`. (The whole node
//! suite also runs through a proxy: `KEYHOLD_TEST_TARGET=proxy`, see `scripts/test`.)

mod cache;
mod failover;
mod keepalive;
mod maintenance;
mod namespace;
mod ordering;
mod registration;
mod tls;
mod watch;

use std::time::Duration;

use etcd_client::Client;

/// A connected `etcd-client` for one endpoint.
pub(crate) async fn client(endpoint: &str) -> Client {
    let opts = etcd_client::ConnectOptions::new()
        .with_timeout(Duration::from_secs(15))
        .with_connect_timeout(Duration::from_secs(2));
    Client::connect([endpoint], Some(opts))
        .await
        .expect("connect")
}
