//! `keyhold-node`: an etcd v3 compatible storage node.
//!
//! # Layout
//! - [`config`]: flags (etcd names, `KEYHOLD_*` env vars), validated once.
//! - [`node`]: composes the store, openraft, the gRPC/HTTP server and background drivers; the
//!   ordered shutdown path.
//! - [`raft`]: openraft types, the raft log (segmented WAL files), the state machine, the peer
//!   network.
//! - [`api`]: one file per etcd gRPC service, the error → status table, response headers.
//! - [`http`]: `/metrics`, `/health`, `/version` on the client port.
//! - [`peer`]: the QUIC peer plane (raft, forwarded requests, snapshots).
//! - [`membership`]: etcd's member operations on raft membership.
//! - [`ids`]: member and cluster IDs derived as etcd derives them.
//! - [`clock`]: the monotonic clock handed to the store.
//! - [`failpoints`]: test-only faults (cargo feature `failpoints`).

pub mod api;
pub mod clock;
pub mod config;
pub mod error;
pub mod failpoints;
pub mod http;
pub mod ids;
pub mod membership;
pub mod node;
pub mod peer;
pub mod probe;
pub mod raft;
pub mod writeback;
