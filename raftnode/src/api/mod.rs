//! The etcd v3 gRPC services, one file per service, all served on the client port together with
//! gRPC health.
//!
//! - [`kv`], [`watch`], [`lease`], [`maintenance`], [`cluster`], [`auth`], [`lock`],
//!   [`election`]: the services.
//! - [`waiter`]: in-server watchers for RPCs that block on changes.
//! - [`status`]: the single error → gRPC status table.
//! - [`convert`]: protobuf ↔ store conversions.

pub mod auth;
pub mod cluster;
pub mod convert;
pub mod election;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod status;
pub mod waiter;
pub mod watch;

use std::sync::Arc;

use keyhold_proto::etcdserverpb as pb;
use keyhold_store as st;

use crate::error::{Error, Result};
use crate::node::Node;

/// Extra room above `--max-request-bytes` for gRPC framing, as etcd allows (512 KiB).
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// A response header: cluster, member, term, and `revision`.
pub fn header(node: &Node, revision: i64) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader {
        cluster_id: node.cluster_id,
        member_id: node.member_id,
        revision,
        raft_term: node.term(),
    })
}

/// The status for an apply result of the wrong kind (a bug: each write request has one kind of
/// response).
pub fn unexpected(result: &st::WriteResponse) -> tonic::Status {
    tonic::Status::internal(format!("unexpected apply result {result:?}"))
}

/// A header at the store's current revision.
pub fn current_header(node: &Node) -> Option<pb::ResponseHeader> {
    header(node, node.store.current_revision().unwrap_or(1))
}

/// Write admission: alarms and the backend quota. Exceeding the quota raises NOSPACE through
/// raft (so every member refuses quota-charged writes) and fails the request.
pub async fn admit(node: &Node, cost: u64) -> Result<()> {
    match node.store.check_write_admission(cost) {
        Err(st::Error::NoSpace) => {
            let raised = node
                .store
                .alarms()
                .iter()
                .any(|a| a.alarm == st::AlarmType::NoSpace);
            if !raised {
                let alarm = st::AlarmMember {
                    member_id: node.member_id,
                    alarm: st::AlarmType::NoSpace,
                };
                tracing::warn!("backend quota exceeded; raising NOSPACE");
                node.propose(st::WriteRequest::Alarm {
                    activate: true,
                    alarm,
                })
                .await?;
            }
            Err(Error::Store(st::Error::NoSpace))
        }
        other => other.map_err(Error::Store),
    }
}

/// RPCs a learner serves (Range only when serializable, checked by the read path).
const LEARNER_ALLOWED: &[&str] = &[
    "/etcdserverpb.KV/Range",
    "/etcdserverpb.Maintenance/Status",
    "/etcdserverpb.Maintenance/Snapshot",
];

/// Checks every etcd RPC before its service sees it: `hasleader: true` metadata fails when no
/// leader is known, and learners refuse what etcd learners refuse.
async fn guard(
    axum::extract::State(node): axum::extract::State<Arc<Node>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let path = req.uri().path();
    let etcd_rpc = ["/etcdserverpb.", "/v3electionpb.", "/v3lockpb."]
        .iter()
        .any(|p| path.starts_with(p));
    if etcd_rpc {
        let require_leader = req
            .headers()
            .get("hasleader")
            .is_some_and(|v| v.as_bytes() == b"true");
        let refused = if require_leader && node.leader().is_none() {
            Some(Error::NoLeader)
        } else if !LEARNER_ALLOWED.contains(&path) && node.is_learner() {
            Some(Error::LearnerNotSupported)
        } else {
            None
        };
        if let Some(e) = refused {
            return tonic::Status::from(e).into_http::<axum::body::Body>();
        }
    }
    next.run(req).await
}

/// All gRPC services as an axum router (HTTP routes are merged in by the node).
pub fn router(node: Arc<Node>) -> axum::Router {
    use keyhold_proto::etcdserverpb::{
        auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer,
        lease_server::LeaseServer, maintenance_server::MaintenanceServer,
        watch_server::WatchServer,
    };
    use keyhold_proto::v3electionpb::election_server::ElectionServer;
    use keyhold_proto::v3lockpb::lock_server::LockServer;
    let max = node.config.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    drop(health_reporter);
    tonic::service::Routes::new(health)
        .add_service(
            KvServer::new(kv::KvService { node: node.clone() }).max_decoding_message_size(max),
        )
        .add_service(
            WatchServer::new(watch::WatchService { node: node.clone() })
                .max_decoding_message_size(max),
        )
        .add_service(
            LeaseServer::new(lease::LeaseService { node: node.clone() })
                .max_decoding_message_size(max),
        )
        .add_service(
            MaintenanceServer::new(maintenance::MaintenanceService { node: node.clone() })
                .max_decoding_message_size(max),
        )
        .add_service(
            ClusterServer::new(cluster::ClusterService { node: node.clone() })
                .max_decoding_message_size(max),
        )
        .add_service(
            AuthServer::new(auth::AuthService { node: node.clone() })
                .max_decoding_message_size(max),
        )
        .add_service(
            LockServer::new(lock::LockService { node: node.clone() })
                .max_decoding_message_size(max),
        )
        .add_service(
            ElectionServer::new(election::ElectionService { node: node.clone() })
                .max_decoding_message_size(max),
        )
        .into_axum_router()
        .layer(axum::middleware::from_fn_with_state(node, guard))
}
