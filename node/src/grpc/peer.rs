//! The node-to-node `Peer` gRPC service, served only on the peer port: openraft's RPCs from
//! other nodes (see `raft::network`), read-index requests for linearizable reads served by
//! followers, leadership hand-off, divergence-check checksums, retirement, and members
//! publishing their client addresses. Every RPC is authorized by [`PeerAuth`].

use std::sync::Arc;

use openraft::raft::{AppendEntriesRequest, VoteRequest};
use raftpg_proto::v1::peer_server::Peer as PeerApi;
use raftpg_proto::v1::{
    FetchSnapshotRequest, MarkDivergedRequest, MarkDivergedResponse, PublishAddressRequest,
    PublishAddressResponse, RaftMessage, ReadIndexRequest, ReadIndexResponse, RetireRequest,
    RetireResponse, SnapshotPart, TableChecksumsRequest, TableChecksumsResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use super::convert;
use super::file_stream::{stream_file, MessageStream};
use super::peer_auth::{speaks_for, PeerAuth};
use super::status::to_status;
use crate::command::TypeConfig;
use crate::raft::append_check::check_append_entries;
use crate::service::check::wait_of;
use crate::service::repair::rebuild_wait;
use crate::service::Service;

/// Longest wait for a quorum to confirm a read index asked by a follower.
const READ_INDEX_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the peer RPCs.
pub struct PeerService {
    svc: Arc<Service>,
    auth: PeerAuth,
}

impl PeerService {
    /// Creates the service; `auth` says who may call it.
    pub fn new(svc: Arc<Service>, auth: PeerAuth) -> Self {
        PeerService { svc, auth }
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
impl PeerApi for PeerService {
    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let caller = self.auth.caller(&self.svc, &req)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req.get_ref())?;
        speaks_for(caller, Some(rpc.vote.leader_id().node_id))?;
        check_append_entries(&rpc).map_err(|e| Status::invalid_argument(e.to_string()))?;
        encode(&self.svc.raft().append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let caller = self.auth.caller(&self.svc, &req)?;
        let rpc: VoteRequest<TypeConfig> = decode(req.get_ref())?;
        speaks_for(caller, Some(rpc.vote.leader_id().node_id))?;
        encode(&self.svc.raft().vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let caller = self.auth.caller(&self.svc, &req)?;
        let chunk: crate::raft::network::SnapshotChunk = decode(req.get_ref())?;
        speaks_for(caller, Some(chunk.vote.leader_id().node_id))?;
        let data = req.into_inner().data;
        encode(&self.svc.install_snapshot_chunk(chunk, &data).await)
    }

    async fn start_election(
        &self,
        req: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        self.auth.caller(&self.svc, &req)?;
        self.svc
            .raft()
            .trigger()
            .elect(false)
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

    async fn table_checksums(
        &self,
        req: Request<TableChecksumsRequest>,
    ) -> Result<Response<TableChecksumsResponse>, Status> {
        self.auth.caller(&self.svc, &req)?;
        let req = req.into_inner();
        let tables = self
            .svc
            .table_checksums(req.log_index, wait_of(req.timeout_ms))
            .await
            .map_err(to_status)?;
        Ok(Response::new(TableChecksumsResponse {
            node_id: self.svc.id(),
            tables: tables.into_iter().map(convert::table_checksum).collect(),
        }))
    }

    async fn retire(
        &self,
        req: Request<RetireRequest>,
    ) -> Result<Response<RetireResponse>, Status> {
        self.auth.caller(&self.svc, &req)?;
        self.svc.retire(req.get_ref().log_index);
        Ok(Response::new(RetireResponse {}))
    }

    async fn publish_address(
        &self,
        req: Request<PublishAddressRequest>,
    ) -> Result<Response<PublishAddressResponse>, Status> {
        let caller = self.auth.caller(&self.svc, &req)?;
        let req = req.into_inner();
        speaks_for(caller, Some(req.node_id))?;
        self.svc
            .publish_address(req.node_id, req.client_addr)
            .await
            .map(|log_index| Response::new(PublishAddressResponse { log_index }))
            .map_err(to_status)
    }

    type FetchSnapshotStream = SnapshotStream;

    async fn fetch_snapshot(
        &self,
        req: Request<FetchSnapshotRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        self.auth.caller(&self.svc, &req)?;
        let req = req.into_inner();
        let wait = rebuild_wait(req.timeout_ms);
        let snapshot = self
            .svc
            .snapshot_covering(req.min_index, wait)
            .await
            .map_err(to_status)?;
        let meta = crate::apply::snapshot::SnapMeta::of(&snapshot.meta, &snapshot.snapshot.id);
        let meta_json = serde_json::to_vec(&meta)
            .map_err(|e| Status::internal(format!("encoding snapshot metadata: {e}")))?;
        // The archive in pieces, the metadata with the first.
        Ok(Response::new(stream_file(
            snapshot.snapshot.file,
            move |data, first| SnapshotPart {
                meta_json: if first { meta_json.clone() } else { Vec::new() },
                data,
            },
        )))
    }

    async fn mark_diverged(
        &self,
        req: Request<MarkDivergedRequest>,
    ) -> Result<Response<MarkDivergedResponse>, Status> {
        self.auth.caller(&self.svc, &req)?;
        let req = req.into_inner();
        self.svc
            .mark_diverged(req.log_index, &req.differences)
            .map_err(to_status)?;
        Ok(Response::new(MarkDivergedResponse {}))
    }
}

type SnapshotStream = MessageStream<SnapshotPart>;
