//! The internal `Raft` gRPC service: receives openraft RPCs from other nodes (see `raft::network`)
//! and answers read-index requests for linearizable reads served by followers.

use std::sync::Arc;

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use raftpg_proto::v1::raft_server::Raft as RaftApi;
use raftpg_proto::v1::{RaftMessage, ReadIndexRequest, ReadIndexResponse};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use super::peer_auth::{speaks_for, PeerAuth};
use super::status::to_status;
use crate::command::{NodeId, TypeConfig};
use crate::service::Service;

/// Longest wait for a quorum to confirm a read index asked by a follower.
const READ_INDEX_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves openraft's RPCs.
pub struct RaftService {
    svc: Arc<Service>,
    auth: PeerAuth,
}

impl RaftService {
    /// Creates the service; `auth` says who may call it.
    pub fn new(svc: Arc<Service>, auth: PeerAuth) -> Self {
        RaftService { svc, auth }
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

/// Refuses an AppendEntries that no correct leader sends and that openraft 0.9 does not check
/// itself (it asserts them, and its core stops when the assertion fails): entries that do not
/// follow `prev_log_id` one index after another, or whose terms go backwards or beyond the
/// sender's vote.
fn check_append_entries(rpc: &AppendEntriesRequest<TypeConfig>) -> Result<(), Status> {
    let malformed = |why: &str| Status::invalid_argument(format!("malformed AppendEntries: {why}"));
    let first_index = rpc.prev_log_id.map_or(0, |l| l.index + 1);
    let mut last_term = rpc.prev_log_id.map_or(0, |l| l.leader_id.term);
    for (index, e) in (first_index..).zip(&rpc.entries) {
        if e.log_id.index != index {
            return Err(malformed(
                "entries do not follow prev_log_id one index after another",
            ));
        }
        let term = e.log_id.leader_id.term;
        if term < last_term || term > rpc.vote.leader_id().term {
            return Err(malformed(
                "entry terms go backwards or beyond the sender's vote",
            ));
        }
        last_term = term;
    }
    Ok(())
}

#[tonic::async_trait]
impl RaftApi for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let caller = self.auth.caller(&self.svc, &req)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req.get_ref())?;
        speaks_for(caller, rpc.vote.leader_id().voted_for())?;
        check_append_entries(&rpc)?;
        encode(&self.svc.raft().append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let caller = self.auth.caller(&self.svc, &req)?;
        let rpc: VoteRequest<NodeId> = decode(req.get_ref())?;
        speaks_for(caller, rpc.vote.leader_id().voted_for())?;
        encode(&self.svc.raft().vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let caller = self.auth.caller(&self.svc, &req)?;
        let mut rpc: InstallSnapshotRequest<TypeConfig> = decode(req.get_ref())?;
        speaks_for(caller, rpc.vote.leader_id().voted_for())?;
        rpc.data = req.into_inner().data;
        encode(&self.svc.raft().install_snapshot(rpc).await)
    }

    async fn start_election(
        &self,
        req: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        self.auth.caller(&self.svc, &req)?;
        self.svc
            .raft()
            .trigger()
            .elect()
            .await
            .map_err(|e| Status::unavailable(format!("raft stopped: {e}")))?;
        Ok(Response::new(ReadIndexResponse { index: 0 }))
    }

    async fn read_index(
        &self,
        req: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        self.auth.caller(&self.svc, &req)?;
        self.svc
            .confirm_read_index(READ_INDEX_WAIT)
            .await
            .map(|index| Response::new(ReadIndexResponse { index }))
            .map_err(to_status)
    }
}
