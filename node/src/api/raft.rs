//! The internal `Raft` gRPC service: receives openraft RPCs from other nodes (see `network`)
//! and answers read-index requests for linearizable reads served by followers.

use std::sync::Arc;

use crate::read_index::ReadIndexError;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use raftpg_proto::v1::raft_server::Raft as RaftApi;
use raftpg_proto::v1::{RaftMessage, ReadIndexRequest, ReadIndexResponse};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use crate::api::not_leader;
use crate::command::{NodeId, TypeConfig};
use crate::node::NodeContext;

/// Serves openraft's RPCs.
pub struct RaftService {
    ctx: Arc<NodeContext>,
}

impl RaftService {
    /// Creates the service.
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        RaftService { ctx }
    }
}

fn decode<T: DeserializeOwned>(msg: &RaftMessage) -> Result<T, Status> {
    serde_json::from_slice(&msg.payload)
        .map_err(|e| Status::invalid_argument(format!("malformed raft message: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Response<RaftMessage>, Status> {
    let payload =
        serde_json::to_vec(v).map_err(|e| Status::internal(format!("encoding raft reply: {e}")))?;
    Ok(Response::new(RaftMessage {
        payload,
        data: Vec::new(),
    }))
}

#[tonic::async_trait]
impl RaftApi for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req.get_ref())?;
        encode(&self.ctx.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<NodeId> = decode(req.get_ref())?;
        encode(&self.ctx.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let mut rpc: InstallSnapshotRequest<TypeConfig> = decode(req.get_ref())?;
        rpc.data = req.into_inner().data;
        encode(&self.ctx.raft.install_snapshot(rpc).await)
    }

    async fn start_election(
        &self,
        _req: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        self.ctx
            .raft
            .trigger()
            .elect()
            .await
            .map_err(|e| Status::unavailable(format!("raft stopped: {e}")))?;
        Ok(Response::new(ReadIndexResponse { index: 0 }))
    }

    async fn read_index(
        &self,
        _req: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        let confirmed = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            self.ctx.read_index.read_index(&self.ctx.raft),
        )
        .await
        .map_err(|_| Status::unavailable("leadership not confirmed by a quorum in time"))?;
        match confirmed {
            Ok(index) => Ok(Response::new(ReadIndexResponse { index })),
            Err(ReadIndexError::NotLeader) => {
                Err(not_leader("this node is not the leader", self.ctx.leader()))
            }
            Err(ReadIndexError::Unconfirmed(e)) => Err(Status::unavailable(format!(
                "cannot confirm leadership: {e}"
            ))),
        }
    }
}
