//! [`GrpcPeers`]: the service layer's calls to other nodes ([`PeerLink`]), carried over gRPC to
//! their peer ports on the channels the Raft transport shares. Requests forwarded to the leader are marked
//! (`raftpg-forwarded`) so the leader never forwards them again; a peer's error status comes
//! back as the [`ServiceError`] it stands for ([`super::status::from_status`]). Every call is
//! bounded on this side by its timeout ([`bounded`]), whatever the peer does.

use std::time::Duration;

use raftpg_proto::v1 as pb;
use raftpg_proto::v1::cluster_client::ClusterClient;
use raftpg_proto::v1::peer_client::PeerClient;
use raftpg_proto::v1::transaction_client::TransactionClient;
use raftpg_proto::v1::write_client::WriteClient;
use raftpg_proto::FORWARDED_METADATA;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::Request;

use super::auth::forward_principal;
use super::convert;
use super::status::from_status;
use crate::apply::snapshot::SnapMeta;
use crate::auth::authenticator::Principal;
use crate::command::{NodeId, RequestId, TableChecksum};
use crate::raft::network::PeerChannels;
use crate::service::peers::PeerResult;
use crate::service::{
    Begun, CheckReport, Committed, Description, LeaderHint, MembershipChange, MembershipOutcome,
    NodeStatus, PeerLink, SavepointOp, ServiceError, TxnAnswer, TxnCall, WriteOutcome,
    WriteRequest,
};

/// How long past its timeout a call is abandoned on this side (the peer's own deadline, from
/// `grpc-timeout`, should end it first).
const CLIENT_GRACE: Duration = Duration::from_secs(1);

/// The answer of a call, bounded on this side too: `grpc-timeout` is enforced by the peer, and a
/// stopped or hung peer (or one that never finishes the TLS handshake) enforces nothing.
async fn bounded<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, ServiceError> {
    match tokio::time::timeout(timeout + CLIENT_GRACE, call).await {
        Err(_) => Err(ServiceError::deadline(format!(
            "no answer within {timeout:?}"
        ))),
        Ok(answer) => answer.map(|r| r.into_inner()).map_err(|s| from_status(&s)),
    }
}

/// Largest answer accepted from a peer's Cluster service.
const CLUSTER_ANSWER_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Calls to other nodes over gRPC.
pub struct GrpcPeers {
    /// This node's id (the value of the forwarded mark).
    id: NodeId,
    channels: PeerChannels,
}

impl GrpcPeers {
    /// Calls from node `id` over `channels`.
    pub fn new(id: NodeId, channels: PeerChannels) -> Self {
        GrpcPeers { id, channels }
    }

    fn channel(&self, addr: &str) -> Result<Channel, ServiceError> {
        self.channels
            .get(addr)
            .map_err(|e| ServiceError::internal(format!("bad peer address {addr}: {e}")))
    }

    fn cluster(&self, addr: &str) -> Result<ClusterClient<Channel>, ServiceError> {
        Ok(ClusterClient::new(self.channel(addr)?)
            .max_decoding_message_size(CLUSTER_ANSWER_BYTES_MAX))
    }

    fn peer(&self, addr: &str) -> Result<PeerClient<Channel>, ServiceError> {
        Ok(
            PeerClient::new(self.channel(addr)?)
                .max_decoding_message_size(CLUSTER_ANSWER_BYTES_MAX),
        )
    }

    /// A request bounded by `timeout`.
    fn request<T>(msg: T, timeout: Duration) -> Request<T> {
        let mut r = Request::new(msg);
        r.set_timeout(timeout);
        r
    }

    /// A request bounded by `timeout`, marked as forwarded by this node, running as
    /// `principal`.
    fn forwarded<T>(&self, msg: T, principal: Option<&Principal>, timeout: Duration) -> Request<T> {
        let mut r = Self::request(msg, timeout);
        r.metadata_mut()
            .insert(FORWARDED_METADATA, MetadataValue::from(self.id));
        forward_principal(r.metadata_mut(), principal);
        r
    }
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl PeerLink for GrpcPeers {
    fn txn_begin<'a>(
        &'a self,
        leader: &'a LeaderHint,
        principal: Option<&'a Principal>,
        request_id: Option<&'a RequestId>,
        timeout: Duration,
    ) -> PeerResult<'a, Begun> {
        Box::pin(async move {
            let mut client = TransactionClient::new(self.channel(&leader.peer_addr)?);
            let r = self.forwarded(
                pb::BeginRequest {
                    request_id: request_id.map(|r| pb::RequestId {
                        client_id: r.client_id.clone(),
                        seq: r.seq,
                    }),
                },
                principal,
                timeout,
            );
            Ok(convert::begun(bounded(timeout, client.begin(r)).await?))
        })
    }

    fn txn_call<'a>(
        &'a self,
        node: &'a LeaderHint,
        principal: Option<&'a Principal>,
        txn_id: &'a str,
        call: &'a TxnCall,
        timeout: Duration,
    ) -> PeerResult<'a, TxnAnswer> {
        Box::pin(async move {
            let mut client = TransactionClient::new(self.channel(&node.peer_addr)?)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX);
            let end = || pb::TxnEndRequest {
                txn_id: txn_id.to_string(),
            };
            match call {
                TxnCall::Execute(s) => {
                    let r = self.forwarded(
                        convert::txn_statement_request(txn_id, s),
                        principal,
                        timeout,
                    );
                    let answer = bounded(timeout, client.execute(r)).await?;
                    Ok(TxnAnswer::Rows(convert::statement_outcome(
                        answer.result.unwrap_or_default(),
                    )?))
                }
                TxnCall::Describe { sql, param_types } => {
                    let r = self.forwarded(
                        pb::TxnDescribeRequest {
                            txn_id: txn_id.to_string(),
                            sql: sql.clone(),
                            param_types: param_types.clone(),
                        },
                        principal,
                        timeout,
                    );
                    let d = bounded(timeout, client.describe(r)).await?;
                    Ok(TxnAnswer::Described(Description {
                        param_types: d.param_types,
                        columns: convert::column_infos(d.columns),
                    }))
                }
                TxnCall::Savepoint(op, name) => {
                    let op = match op {
                        SavepointOp::Define => pb::SavepointOp::Define,
                        SavepointOp::Release => pb::SavepointOp::Release,
                        SavepointOp::RollbackTo => pb::SavepointOp::RollbackTo,
                    };
                    let r = self.forwarded(
                        pb::TxnSavepointRequest {
                            txn_id: txn_id.to_string(),
                            op: op.into(),
                            name: name.clone(),
                        },
                        principal,
                        timeout,
                    );
                    bounded(timeout, client.savepoint(r)).await?;
                    Ok(TxnAnswer::Done)
                }
                TxnCall::Commit => {
                    let r = self.forwarded(end(), principal, timeout);
                    let c = bounded(timeout, client.commit(r)).await?;
                    Ok(TxnAnswer::Committed(Committed {
                        log_index: c.log_index,
                        committed: c.committed,
                    }))
                }
                TxnCall::Rollback => {
                    let r = self.forwarded(end(), principal, timeout);
                    bounded(timeout, client.rollback(r)).await?;
                    Ok(TxnAnswer::Done)
                }
            }
        })
    }

    fn execute<'a>(
        &'a self,
        leader: &'a LeaderHint,
        req: &'a WriteRequest,
        timeout: Duration,
    ) -> PeerResult<'a, WriteOutcome> {
        Box::pin(async move {
            let mut client = WriteClient::new(self.channel(&leader.peer_addr)?)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX);
            let r = self.forwarded(
                convert::execute_request(req),
                req.principal.as_ref(),
                timeout,
            );
            let answer = bounded(timeout, client.execute(r)).await?;
            convert::write_outcome(answer)
        })
    }

    fn read_index<'a>(&'a self, leader: &'a LeaderHint, timeout: Duration) -> PeerResult<'a, u64> {
        Box::pin(async move {
            let mut client = PeerClient::new(self.channel(&leader.peer_addr)?);
            let r = Self::request(pb::ReadIndexRequest {}, timeout);
            Ok(bounded(timeout, client.read_index(r)).await?.index)
        })
    }

    fn change_membership<'a>(
        &'a self,
        leader: &'a LeaderHint,
        principal: Option<&'a Principal>,
        change: &'a MembershipChange,
        timeout: Duration,
    ) -> PeerResult<'a, MembershipOutcome> {
        Box::pin(async move {
            let mut client = self.cluster(&leader.peer_addr)?;
            let answer = bounded(timeout, async move {
                match change.clone() {
                    MembershipChange::AddLearner {
                        node_id,
                        addr,
                        wait_caught_up,
                    } => {
                        let m = pb::AddLearnerRequest {
                            node_id,
                            addr,
                            wait_caught_up,
                        };
                        client
                            .add_learner(self.forwarded(m, principal, timeout))
                            .await
                    }
                    MembershipChange::Promote { ids, force } => {
                        let m = pb::PromoteRequest {
                            node_ids: ids,
                            force,
                        };
                        client.promote(self.forwarded(m, principal, timeout)).await
                    }
                    MembershipChange::Remove(node_ids) => {
                        let m = pb::RemoveRequest { node_ids };
                        client.remove(self.forwarded(m, principal, timeout)).await
                    }
                    MembershipChange::TransferLeader(node_id) => {
                        let m = pb::TransferLeaderRequest { node_id };
                        client
                            .transfer_leader(self.forwarded(m, principal, timeout))
                            .await
                    }
                }
            })
            .await?;
            Ok(convert::membership_outcome(answer))
        })
    }

    fn check<'a>(
        &'a self,
        leader: &'a LeaderHint,
        principal: Option<&'a Principal>,
        wait: Duration,
        timeout: Duration,
    ) -> PeerResult<'a, CheckReport> {
        Box::pin(async move {
            let mut client = self.cluster(&leader.peer_addr)?;
            let m = pb::CheckRequest {
                timeout_ms: millis(wait),
            };
            let answer =
                bounded(timeout, client.check(self.forwarded(m, principal, timeout))).await?;
            Ok(convert::check_report(answer))
        })
    }

    fn table_checksums<'a>(
        &'a self,
        addr: &'a str,
        log_index: u64,
        wait: Duration,
        timeout: Duration,
    ) -> PeerResult<'a, Vec<TableChecksum>> {
        Box::pin(async move {
            let mut client = self.peer(addr)?;
            let m = pb::TableChecksumsRequest {
                log_index,
                timeout_ms: millis(wait),
            };
            let tables = bounded(timeout, client.table_checksums(Self::request(m, timeout)))
                .await?
                .tables;
            Ok(tables
                .into_iter()
                .map(convert::table_checksum_from)
                .collect())
        })
    }

    fn status<'a>(
        &'a self,
        addr: &'a str,
        node_id: NodeId,
        timeout: Duration,
    ) -> PeerResult<'a, NodeStatus> {
        Box::pin(async move {
            let mut client = self.cluster(addr)?;
            let m = pb::StatusRequest { node_id };
            let answer = bounded(timeout, client.status(Self::request(m, timeout))).await?;
            Ok(convert::node_status(answer))
        })
    }

    fn retire<'a>(
        &'a self,
        addr: &'a str,
        log_index: u64,
        timeout: Duration,
    ) -> PeerResult<'a, ()> {
        Box::pin(async move {
            let mut client = self.peer(addr)?;
            let m = pb::RetireRequest { log_index };
            bounded(timeout, client.retire(Self::request(m, timeout))).await?;
            Ok(())
        })
    }

    fn start_election<'a>(&'a self, addr: &'a str, timeout: Duration) -> PeerResult<'a, ()> {
        Box::pin(async move {
            let mut client = PeerClient::new(self.channel(addr)?);
            bounded(
                timeout,
                client.start_election(Self::request(pb::ReadIndexRequest {}, timeout)),
            )
            .await?;
            Ok(())
        })
    }

    fn publish_address<'a>(
        &'a self,
        leader: &'a LeaderHint,
        node_id: NodeId,
        client_addr: &'a str,
        timeout: Duration,
    ) -> PeerResult<'a, u64> {
        Box::pin(async move {
            let mut client = self.peer(&leader.peer_addr)?;
            let m = pb::PublishAddressRequest {
                node_id,
                client_addr: client_addr.to_string(),
            };
            let answer =
                bounded(timeout, client.publish_address(Self::request(m, timeout))).await?;
            Ok(answer.log_index)
        })
    }

    fn fetch_snapshot<'a>(
        &'a self,
        addr: &'a str,
        min_index: u64,
        mut file: tokio::fs::File,
        timeout: Duration,
    ) -> PeerResult<'a, (SnapMeta, tokio::fs::File)> {
        Box::pin(async move {
            use tokio::io::AsyncWriteExt;
            let mut client = self.peer(addr)?;
            let m = pb::FetchSnapshotRequest {
                min_index,
                timeout_ms: millis(timeout),
            };
            let deadline = tokio::time::Instant::now() + timeout + CLIENT_GRACE;
            let mut parts =
                bounded(timeout, client.fetch_snapshot(Self::request(m, timeout))).await?;
            let mut meta = None;
            let stalled = || {
                ServiceError::deadline(format!("the snapshot did not arrive within {timeout:?}"))
            };
            while let Some(part) = tokio::time::timeout_at(deadline, parts.message())
                .await
                .map_err(|_| stalled())?
                .map_err(|s| from_status(&s))?
            {
                if !part.meta_json.is_empty() {
                    meta = Some(serde_json::from_slice(&part.meta_json).map_err(|e| {
                        ServiceError::internal(format!("malformed snapshot metadata: {e}"))
                    })?);
                }
                file.write_all(&part.data)
                    .await
                    .map_err(|e| ServiceError::internal(format!("writing the snapshot: {e}")))?;
            }
            file.flush()
                .await
                .map_err(|e| ServiceError::internal(format!("writing the snapshot: {e}")))?;
            let meta = meta.ok_or_else(|| {
                ServiceError::unavailable("the snapshot stream ended without metadata", None)
            })?;
            Ok((meta, file))
        })
    }

    fn mark_diverged<'a>(
        &'a self,
        addr: &'a str,
        log_index: u64,
        differences: &'a [String],
        timeout: Duration,
    ) -> PeerResult<'a, ()> {
        Box::pin(async move {
            let mut client = self.peer(addr)?;
            let m = pb::MarkDivergedRequest {
                log_index,
                differences: differences.to_vec(),
            };
            bounded(timeout, client.mark_diverged(Self::request(m, timeout))).await?;
            Ok(())
        })
    }
}
