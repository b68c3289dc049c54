//! The Cluster service. MemberList is served; membership changes arrive with the multi-member
//! storage tier and answer `Unimplemented` until then.

use std::sync::Arc;

use keyhold_proto::etcdserverpb as pb;
use keyhold_proto::etcdserverpb::cluster_server::Cluster;
use tonic::{Request, Response, Status};

use super::current_header;
use crate::node::Node;

/// Cluster service.
pub struct ClusterService {
    pub(crate) node: Arc<Node>,
}

/// This member as etcd describes it.
pub fn members(node: &Node) -> Vec<pb::Member> {
    node.config
        .initial_cluster
        .iter()
        .map(|(name, urls)| {
            let id = crate::ids::member_id(urls, &node.config.cluster_token);
            let me = id == node.member_id;
            pb::Member {
                id,
                name: name.clone(),
                peer_ur_ls: urls.clone(),
                client_ur_ls: if me {
                    node.config.advertise_client_urls.clone()
                } else {
                    Vec::new()
                },
                is_learner: false,
            }
        })
        .collect()
}

#[tonic::async_trait]
impl Cluster for ClusterService {
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
