//! Keyhold's process-level test harness and robustness suite.
//!
//! # Layout
//! - [`process`]: starts the real `keyhold-node` binary on loopback ports chosen at run time, on
//!   a temporary data dir, captures its log, kills it by PID on drop (also when a test panics);
//!   faults: kill -9, SIGTERM, SIGSTOP/SIGCONT, restart on the same data dir.
//! - [`proxy`]: starts `keyhold-proxy` in front of members; `KEYHOLD_TEST_TARGET=proxy` runs
//!   the node suite through a proxy in front of each node.
//! - [`certs`]: CA-signed test certificates (openssl CLI).
//! - [`cluster`]: N members as one cluster; partitions through the nodes' test-only transport
//!   fault switch.
//! - [`history`]: recorded operations (invoke/return times, outcomes, unknown outcomes).
//! - [`model`]: the etcd KV model (revisions included) the checker steps through.
//! - [`lin`]: a WGL linearizability checker with memoization.
//! - [`watch_check`]: watch-guarantee validators against a ground-truth history.
//! - [`robustness`]: traffic, watches, fault schedule, checks; one seed drives everything.
//!
//! The binaries are found next to the test executable's `target/<profile>` directory (or in
//! `$KEYHOLD_BIN_DIR`); `scripts/test` builds them first.

pub mod certs;
pub mod cluster;
pub mod history;
pub mod lin;
pub mod model;
pub mod process;
pub mod proxy;
pub mod robustness;
pub mod watch_check;

pub use cluster::Cluster;
pub use process::{NodeProcess, etcdctl, etcdctl_stdin, free_port};

/// The gRPC code and message of a failed `etcd-client` call (panics on success or on a
/// non-gRPC error: the caller expected etcd's status).
pub fn grpc_status<T: std::fmt::Debug>(r: Result<T, etcd_client::Error>) -> (tonic::Code, String) {
    match r {
        Err(etcd_client::Error::GRpcStatus(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected a gRPC status error, got {other:?}"),
    }
}
