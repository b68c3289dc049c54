//! The etcd services the proxy relays as they are: Cluster, Maintenance, Auth, Election and
//! Lock. (KV, Watch and Lease add caching and coalescing: `kv.rs`, `watch.rs`, `lease.rs`.)

use std::sync::Arc;

use keyhold_proto::etcdserverpb as pb;
use keyhold_proto::etcdserverpb::auth_client::AuthClient;
use keyhold_proto::etcdserverpb::cluster_client::ClusterClient;
use keyhold_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keyhold_proto::v3electionpb as el;
use keyhold_proto::v3electionpb::election_client::ElectionClient;
use keyhold_proto::v3lockpb as lk;
use keyhold_proto::v3lockpb::lock_client::LockClient;

use crate::forward::{server_stream, unary};
use crate::upstream::Retry::{Immutable, Mutable};
use crate::upstream::Upstream;

/// Cluster: membership changes relayed; MemberList answers with this proxy when
/// `--advertise-client-url` is set (so clients syncing endpoints stay on the proxy).
pub struct ClusterService {
    pub upstream: Arc<Upstream>,
    pub advertise_client_url: Option<String>,
    /// With `--resolver-prefix`: MemberList lists every proxy registered under it.
    pub resolver_prefix: Option<String>,
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    unary!(
        member_add,
        pb::MemberAddRequest,
        pb::MemberAddResponse,
        ClusterClient,
        Mutable
    );
    unary!(
        member_remove,
        pb::MemberRemoveRequest,
        pb::MemberRemoveResponse,
        ClusterClient,
        Mutable
    );
    unary!(
        member_update,
        pb::MemberUpdateRequest,
        pb::MemberUpdateResponse,
        ClusterClient,
        Mutable
    );
    unary!(
        member_promote,
        pb::MemberPromoteRequest,
        pb::MemberPromoteResponse,
        ClusterClient,
        Mutable
    );

    async fn member_list(
        &self,
        request: tonic::Request<pb::MemberListRequest>,
    ) -> Result<tonic::Response<pb::MemberListResponse>, tonic::Status> {
        let (meta, _, message) = request.into_parts();
        let mut answer = self
            .upstream
            .call(Immutable, |channel| {
                let req = crate::upstream::forward(&meta, message);
                async move {
                    ClusterClient::new(channel)
                        .member_list(req)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
        if let Some(prefix) = &self.resolver_prefix {
            let registered = crate::registration::list(&self.upstream, prefix).await?;
            answer.members = registered
                .into_iter()
                .map(|(name, url)| pb::Member {
                    id: proxy_member_id(&url),
                    name,
                    client_ur_ls: vec![url],
                    ..Default::default()
                })
                .collect();
        } else if let Some(url) = &self.advertise_client_url {
            answer.members = vec![pb::Member {
                id: proxy_member_id(url),
                name: hostname(),
                client_ur_ls: vec![url.clone()],
                ..Default::default()
            }];
        }
        Ok(tonic::Response::new(answer))
    }
}

/// A stable member ID for a proxy: FNV-1a of its advertised URL.
fn proxy_member_id(url: &str) -> u64 {
    url.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// This machine's host name (the name a proxy registers and reports).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "keyhold-proxy".into())
}

/// Maintenance: relayed to the member the proxy currently uses (the answer's header names it),
/// except MoveLeader, which goes to the leader.
pub struct MaintenanceService {
    pub upstream: Arc<Upstream>,
}

/// How long the leader search waits for each member's Status.
const LEADER_STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl MaintenanceService {
    /// The channel of the member that reports itself as leader.
    async fn leader(
        &self,
        meta: &tonic::metadata::MetadataMap,
    ) -> Result<tonic::transport::Channel, tonic::Status> {
        for channel in self.upstream.reachable_channels() {
            let req = crate::upstream::forward(meta, pb::StatusRequest {});
            let mut client = MaintenanceClient::new(channel.clone());
            if let Ok(Ok(answer)) =
                tokio::time::timeout(LEADER_STATUS_TIMEOUT, client.status(req)).await
            {
                let answer = answer.into_inner();
                if answer.leader != 0
                    && answer.header.as_ref().map(|h| h.member_id) == Some(answer.leader)
                {
                    return Ok(channel);
                }
            }
        }
        Err(tonic::Status::unavailable("etcdserver: no leader"))
    }
}

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for MaintenanceService {
    unary!(
        alarm,
        pb::AlarmRequest,
        pb::AlarmResponse,
        MaintenanceClient,
        Mutable
    );
    unary!(
        status,
        pb::StatusRequest,
        pb::StatusResponse,
        MaintenanceClient,
        Immutable
    );
    unary!(
        defragment,
        pb::DefragmentRequest,
        pb::DefragmentResponse,
        MaintenanceClient,
        Mutable
    );
    unary!(
        hash,
        pb::HashRequest,
        pb::HashResponse,
        MaintenanceClient,
        Immutable
    );
    unary!(
        hash_kv,
        pb::HashKvRequest,
        pb::HashKvResponse,
        MaintenanceClient,
        Immutable
    );

    /// MoveLeader goes to the leader, the only member that may hand leadership on (others
    /// answer "not leader", as in etcd): the proxy finds it from its members' Status answers.
    async fn move_leader(
        &self,
        request: tonic::Request<pb::MoveLeaderRequest>,
    ) -> Result<tonic::Response<pb::MoveLeaderResponse>, tonic::Status> {
        let (meta, _, message) = request.into_parts();
        let leader = self.leader(&meta).await?;
        let answer = MaintenanceClient::new(leader)
            .move_leader(crate::upstream::forward(&meta, message))
            .await?;
        Ok(tonic::Response::new(answer.into_inner()))
    }
    unary!(
        downgrade,
        pb::DowngradeRequest,
        pb::DowngradeResponse,
        MaintenanceClient,
        Mutable
    );
    server_stream!(
        snapshot,
        pb::SnapshotRequest,
        pb::SnapshotResponse,
        MaintenanceClient
    );
}

/// Auth: relayed (tokens travel in the forwarded metadata).
pub struct AuthService {
    pub upstream: Arc<Upstream>,
}

#[tonic::async_trait]
impl pb::auth_server::Auth for AuthService {
    unary!(
        auth_enable,
        pb::AuthEnableRequest,
        pb::AuthEnableResponse,
        AuthClient,
        Mutable
    );
    unary!(
        auth_disable,
        pb::AuthDisableRequest,
        pb::AuthDisableResponse,
        AuthClient,
        Mutable
    );
    unary!(
        auth_status,
        pb::AuthStatusRequest,
        pb::AuthStatusResponse,
        AuthClient,
        Immutable
    );
    unary!(
        authenticate,
        pb::AuthenticateRequest,
        pb::AuthenticateResponse,
        AuthClient,
        Immutable
    );
    unary!(
        user_add,
        pb::AuthUserAddRequest,
        pb::AuthUserAddResponse,
        AuthClient,
        Mutable
    );
    unary!(
        user_get,
        pb::AuthUserGetRequest,
        pb::AuthUserGetResponse,
        AuthClient,
        Immutable
    );
    unary!(
        user_list,
        pb::AuthUserListRequest,
        pb::AuthUserListResponse,
        AuthClient,
        Immutable
    );
    unary!(
        user_delete,
        pb::AuthUserDeleteRequest,
        pb::AuthUserDeleteResponse,
        AuthClient,
        Mutable
    );
    unary!(
        user_change_password,
        pb::AuthUserChangePasswordRequest,
        pb::AuthUserChangePasswordResponse,
        AuthClient,
        Mutable
    );
    unary!(
        user_grant_role,
        pb::AuthUserGrantRoleRequest,
        pb::AuthUserGrantRoleResponse,
        AuthClient,
        Mutable
    );
    unary!(
        user_revoke_role,
        pb::AuthUserRevokeRoleRequest,
        pb::AuthUserRevokeRoleResponse,
        AuthClient,
        Mutable
    );
    unary!(
        role_add,
        pb::AuthRoleAddRequest,
        pb::AuthRoleAddResponse,
        AuthClient,
        Mutable
    );
    unary!(
        role_get,
        pb::AuthRoleGetRequest,
        pb::AuthRoleGetResponse,
        AuthClient,
        Immutable
    );
    unary!(
        role_list,
        pb::AuthRoleListRequest,
        pb::AuthRoleListResponse,
        AuthClient,
        Immutable
    );
    unary!(
        role_delete,
        pb::AuthRoleDeleteRequest,
        pb::AuthRoleDeleteResponse,
        AuthClient,
        Mutable
    );
    unary!(
        role_grant_permission,
        pb::AuthRoleGrantPermissionRequest,
        pb::AuthRoleGrantPermissionResponse,
        AuthClient,
        Mutable
    );
    unary!(
        role_revoke_permission,
        pb::AuthRoleRevokePermissionRequest,
        pb::AuthRoleRevokePermissionResponse,
        AuthClient,
        Mutable
    );
}

/// Election: relayed.
pub struct ElectionService {
    pub upstream: Arc<Upstream>,
}

#[tonic::async_trait]
impl el::election_server::Election for ElectionService {
    unary!(
        campaign,
        el::CampaignRequest,
        el::CampaignResponse,
        ElectionClient,
        Mutable
    );
    unary!(
        proclaim,
        el::ProclaimRequest,
        el::ProclaimResponse,
        ElectionClient,
        Mutable
    );
    unary!(
        leader,
        el::LeaderRequest,
        el::LeaderResponse,
        ElectionClient,
        Immutable
    );
    unary!(
        resign,
        el::ResignRequest,
        el::ResignResponse,
        ElectionClient,
        Mutable
    );
    server_stream!(
        observe,
        el::LeaderRequest,
        el::LeaderResponse,
        ElectionClient
    );
}

/// Lock: relayed.
pub struct LockService {
    pub upstream: Arc<Upstream>,
}

#[tonic::async_trait]
impl lk::lock_server::Lock for LockService {
    unary!(lock, lk::LockRequest, lk::LockResponse, LockClient, Mutable);
    unary!(
        unlock,
        lk::UnlockRequest,
        lk::UnlockResponse,
        LockClient,
        Mutable
    );
}
