//! The Cluster service: MemberList from raft's membership, and the membership changes
//! (MemberAdd/Remove/Update/Promote) as raft joint-consensus changes, run on the leader.

use std::sync::Arc;

use keyhold_proto::etcdserverpb as pb;
use keyhold_proto::etcdserverpb::cluster_server::Cluster;
use tonic::{Request, Response, Status};

use super::current_header;
use crate::error::Error;
use crate::membership::{self, Listed};
use crate::node::Node;
use crate::peer::wire::MembershipChange;

/// Cluster service.
pub struct ClusterService {
    pub(crate) node: Arc<Node>,
}

fn to_pb(l: Listed) -> pb::Member {
    pb::Member {
        id: l.id,
        name: l.member.name,
        peer_ur_ls: l.member.peer_urls,
        client_ur_ls: l.member.client_urls,
        is_learner: l.is_learner,
    }
}

/// The members as etcd describes them.
pub fn members(node: &Node) -> Vec<pb::Member> {
    membership::list(node).into_iter().map(to_pb).collect()
}

fn valid_peer_urls(urls: &[String]) -> Result<(), Status> {
    if urls.is_empty() || urls.iter().any(|u| crate::config::parse_url(u).is_err()) {
        return Err(Error::InvalidPeerUrls.into());
    }
    Ok(())
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        req: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        let req = req.into_inner();
        valid_peer_urls(&req.peer_ur_ls)?;
        let id = crate::ids::member_id(&req.peer_ur_ls, &self.node.config.cluster_token);
        let change = MembershipChange::Add {
            id,
            peer_urls: req.peer_ur_ls.clone(),
            learner: req.is_learner,
        };
        membership::change(&self.node, change).await?;
        Ok(Response::new(pb::MemberAddResponse {
            header: current_header(&self.node),
            member: Some(pb::Member {
                id,
                name: String::new(),
                peer_ur_ls: req.peer_ur_ls,
                client_ur_ls: Vec::new(),
                is_learner: req.is_learner,
            }),
            members: members(&self.node),
        }))
    }

    async fn member_remove(
        &self,
        req: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        let id = req.into_inner().id;
        membership::change(&self.node, MembershipChange::Remove { id }).await?;
        Ok(Response::new(pb::MemberRemoveResponse {
            header: current_header(&self.node),
            members: members(&self.node)
                .into_iter()
                .filter(|m| m.id != id)
                .collect(),
        }))
    }

    async fn member_update(
        &self,
        req: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        let req = req.into_inner();
        valid_peer_urls(&req.peer_ur_ls)?;
        let change = MembershipChange::Update {
            id: req.id,
            peer_urls: req.peer_ur_ls,
        };
        membership::change(&self.node, change).await?;
        Ok(Response::new(pb::MemberUpdateResponse {
            header: current_header(&self.node),
            members: members(&self.node),
        }))
    }

    async fn member_promote(
        &self,
        req: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        let id = req.into_inner().id;
        membership::change(&self.node, MembershipChange::Promote { id }).await?;
        Ok(Response::new(pb::MemberPromoteResponse {
            header: current_header(&self.node),
            members: members(&self.node),
        }))
    }

    async fn member_list(
        &self,
        req: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        if req.into_inner().linearizable {
            self.node.read_barrier().await?;
        }
        Ok(Response::new(pb::MemberListResponse {
            header: current_header(&self.node),
            members: members(&self.node),
        }))
    }
}
