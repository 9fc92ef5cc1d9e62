//! `Cluster.Status`: this node's view of the cluster (role, term, leader, log positions,
//! members and their replication progress, PostgreSQL and applier health).

use std::sync::Arc;

use openraft::ServerState;
use raftpg_proto::v1::cluster_client::ClusterClient;
use raftpg_proto::v1::cluster_server::Cluster;
use raftpg_proto::v1::{
    AddLearnerRequest, CheckRequest, CheckResponse, MembershipResponse, PromoteRequest,
    RemoveRequest, RetireRequest, RetireResponse, StatusRequest, StatusResponse,
    TableChecksumsRequest, TableChecksumsResponse, TransferLeaderRequest,
};
use tonic::{Request, Response, Status};

use crate::node::NodeContext;
use crate::postgres::PgHealth;

/// The cluster service.
pub struct ClusterService {
    ctx: Arc<NodeContext>,
}

impl ClusterService {
    /// Creates the service.
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        ClusterService { ctx }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn add_learner(
        &self,
        req: Request<AddLearnerRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        super::membership::add_learner(&self.ctx, req)
            .await
            .map(Response::new)
    }

    async fn promote(
        &self,
        req: Request<PromoteRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        super::membership::promote(&self.ctx, req)
            .await
            .map(Response::new)
    }

    async fn remove(
        &self,
        req: Request<RemoveRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        super::membership::remove(&self.ctx, req)
            .await
            .map(Response::new)
    }

    async fn transfer_leader(
        &self,
        req: Request<TransferLeaderRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        super::membership::transfer_leader(&self.ctx, req)
            .await
            .map(Response::new)
    }

    async fn retire(
        &self,
        req: Request<RetireRequest>,
    ) -> Result<Response<RetireResponse>, Status> {
        self.ctx.retire(req.get_ref().log_index);
        Ok(Response::new(RetireResponse {}))
    }

    async fn check(&self, req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        super::check::check(&self.ctx, req).await.map(Response::new)
    }

    async fn table_checksums(
        &self,
        req: Request<TableChecksumsRequest>,
    ) -> Result<Response<TableChecksumsResponse>, Status> {
        super::check::table_checksums(&self.ctx, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let wanted = req.get_ref().node_id;
        if wanted != 0 && wanted != self.ctx.id {
            let m = self.ctx.raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            let Some(node) = membership.get_node(&wanted) else {
                let ids: Vec<String> = membership.nodes().map(|(id, _)| id.to_string()).collect();
                return Err(Status::not_found(format!(
                    "node {wanted} is not a member of this cluster (members: {})",
                    ids.join(", ")
                )));
            };
            let mut client = ClusterClient::new(self.ctx.channel_to(&node.addr)?);
            let mut fwd = Request::new(StatusRequest { node_id: wanted });
            fwd.set_timeout(std::time::Duration::from_secs(2));
            return client.status(fwd).await.map_err(|s| {
                Status::unavailable(format!(
                    "node {wanted} at {} did not answer: {}",
                    node.addr,
                    s.message()
                ))
            });
        }
        let committed = self
            .ctx
            .raft
            .with_raft_state(|st| st.committed.map(|l| l.index))
            .await
            .map_err(|e| Status::unavailable(format!("raft stopped: {e}")))?;
        let m = self.ctx.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let members = super::membership::members(&self.ctx);
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let leader_addr = m
            .current_leader
            .and_then(|l| membership.get_node(&l).map(|n| n.addr.clone()))
            .unwrap_or_default();
        let health = self.ctx.pg_health.borrow().clone();
        let identity = self
            .ctx
            .pg_identity()
            .await
            .unwrap_or(crate::node::PgIdentity {
                version: String::new(),
                encoding: String::new(),
                collation: String::new(),
            });
        Ok(Response::new(StatusResponse {
            node_id: self.ctx.id,
            role: role.into(),
            term: m.current_term,
            leader_id: m.current_leader.unwrap_or(0),
            has_leader: m.current_leader.is_some(),
            leader_addr,
            last_log_index: m.last_log_index.unwrap_or(0),
            committed_index: committed.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            members,
            postgres_up: health == PgHealth::Up,
            applier_state: match health {
                PgHealth::Up => self.ctx.applier.get(),
                other => format!("postgres {other:?}; applier: {}", self.ctx.applier.get()),
            },
            postgres_version: identity.version,
            encoding: identity.encoding,
            collation: identity.collation,
            removed: self.ctx.is_removed(),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
        }))
    }
}
