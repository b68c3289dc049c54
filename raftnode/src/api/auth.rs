//! The Auth service. Authentication is not implemented yet: AuthStatus truthfully reports it
//! disabled, every other Auth RPC answers `Unimplemented`.

use std::sync::Arc;

use keyhold_proto::etcdserverpb as pb;
use keyhold_proto::etcdserverpb::auth_server::Auth;
use tonic::{Request, Response, Status};

use super::current_header;
use crate::node::Node;

/// Auth service.
pub struct AuthService {
    pub(crate) node: Arc<Node>,
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_status(
        &self,
        _req: Request<pb::AuthStatusRequest>,
    ) -> Result<Response<pb::AuthStatusResponse>, Status> {
        Ok(Response::new(pb::AuthStatusResponse {
            header: current_header(&self.node),
            enabled: false,
            auth_revision: 0,
        }))
    }
}
