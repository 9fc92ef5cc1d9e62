//! The `Cluster` service: membership changes, status, divergence checks, rebuilds, backups —
//! each handler decodes, calls [`Service`], encodes (a backup: streams the archive in parts and
//! its SHA-256 last).

use std::sync::Arc;

use raftpg_proto::backup::Checksum;
use raftpg_proto::v1::cluster_server::Cluster;
use raftpg_proto::v1::{
    AddLearnerRequest, BackupPart, BackupRequest, CheckRequest, CheckResponse, MembershipResponse,
    PromoteRequest, RebuildRequest, RebuildResponse, RemoveRequest, StatusRequest, StatusResponse,
    TransferLeaderRequest,
};
use tonic::{Request, Response, Status};

use super::auth;
use super::convert;
use super::file_stream::{stream_file, MessageStream};
use super::status::to_status;
use super::write::origin_of;
use crate::service::check::wait_of;
use crate::service::repair::rebuild_wait;
use crate::service::{MembershipChange, Service};

type BackupStream = MessageStream<BackupPart>;

/// The cluster service.
pub struct ClusterService {
    svc: Arc<Service>,
}

impl ClusterService {
    /// Creates the service.
    pub fn new(svc: Arc<Service>) -> Self {
        ClusterService { svc }
    }

    async fn change<T>(
        &self,
        req: &Request<T>,
        change: MembershipChange,
    ) -> Result<Response<MembershipResponse>, Status> {
        let principal = auth::principal(&self.svc, req).await?;
        self.svc
            .change_membership(origin_of(req), principal, change)
            .await
            .map(|o| Response::new(convert::membership_response(o)))
            .map_err(to_status)
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn add_learner(
        &self,
        req: Request<AddLearnerRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let m = req.get_ref().clone();
        let change = MembershipChange::AddLearner {
            node_id: m.node_id,
            addr: m.addr,
            wait_caught_up: m.wait_caught_up,
        };
        self.change(&req, change).await
    }

    async fn promote(
        &self,
        req: Request<PromoteRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let change = MembershipChange::Promote {
            ids: req.get_ref().node_ids.clone(),
            force: req.get_ref().force,
        };
        self.change(&req, change).await
    }

    async fn remove(
        &self,
        req: Request<RemoveRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let change = MembershipChange::Remove(req.get_ref().node_ids.clone());
        self.change(&req, change).await
    }

    async fn transfer_leader(
        &self,
        req: Request<TransferLeaderRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let change = MembershipChange::TransferLeader(req.get_ref().node_id);
        self.change(&req, change).await
    }

    async fn check(&self, req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let wait = wait_of(req.get_ref().timeout_ms);
        let principal = auth::principal(&self.svc, &req).await?;
        self.svc
            .check(origin_of(&req), principal, wait)
            .await
            .map(|r| Response::new(convert::check_response(r)))
            .map_err(to_status)
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let principal = auth::status_principal(&self.svc, &req).await?;
        self.svc
            .status(principal.as_ref(), req.get_ref().node_id)
            .await
            .map(|s| Response::new(convert::status_response(s)))
            .map_err(to_status)
    }

    async fn rebuild(
        &self,
        req: Request<RebuildRequest>,
    ) -> Result<Response<RebuildResponse>, Status> {
        let principal = auth::principal(&self.svc, &req).await?;
        let m = req.get_ref();
        let r = self
            .svc
            .rebuild(principal.as_ref(), m.node_id, rebuild_wait(m.timeout_ms))
            .await
            .map_err(to_status)?;
        Ok(Response::new(RebuildResponse {
            node_id: r.node_id,
            donor_id: r.donor_id,
            log_index: r.log_index,
            bytes: r.bytes,
            millis: r.duration.as_millis() as u64,
        }))
    }

    type BackupStream = BackupStream;

    async fn backup(&self, req: Request<BackupRequest>) -> Result<Response<BackupStream>, Status> {
        let principal = auth::principal(&self.svc, &req).await?;
        let wait = rebuild_wait(req.get_ref().timeout_ms);
        let source = self
            .svc
            .backup(principal.as_ref(), wait)
            .await
            .map_err(to_status)?;
        let header_json = serde_json::to_vec(&source.header)
            .map_err(|e| Status::internal(format!("encoding the backup header: {e}")))?;
        // The archive in pieces, the header with the first, the checksum with the last (empty).
        let mut sum = Checksum::default();
        Ok(Response::new(stream_file(
            source.archive,
            move |data, first| {
                sum.update(&data);
                BackupPart {
                    header_json: if first {
                        header_json.clone()
                    } else {
                        Vec::new()
                    },
                    sha256: if data.is_empty() {
                        sum.hex()
                    } else {
                        String::new()
                    },
                    data,
                }
            },
        )))
    }
}
