//! Integration tests of a single `keyhold-node` process, driven by third-party clients: the
//! `etcd-client` crate and Debian's `etcdctl` 3.4. Each test starts its own node on ports chosen
//! at run time. Expected answers are etcd's (codes, messages, revision rules).

mod coordination;
mod durability;
mod errors;
mod etcdctl;
mod kv;
mod lease;
mod maintenance;
mod quota;
mod txn;
mod watch;

use std::time::Duration;

use etcd_client::Client;
use keyhold_tests::NodeProcess;

/// A connected `etcd-client` for `node`.
pub(crate) async fn client(node: &NodeProcess) -> Client {
    let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(10));
    Client::connect([node.endpoint()], Some(opts))
        .await
        .expect("connect")
}

/// The etcd version the node under test reports: Keyhold reports etcd 3.7's; the reference
/// etcd (`KEYHOLD_TEST_TARGET=etcd`) is Debian's 3.4.23.
pub(crate) fn expected_version() -> &'static str {
    if keyhold_tests::process::target_is_etcd() {
        "3.4.23"
    } else {
        "3.7.0"
    }
}

/// The gRPC code and message of a failed call.
pub(crate) use keyhold_tests::grpc_status as status;
