//! How this node reaches the other nodes (at their peer addresses): forwarding a request to the leader, asking the leader
//! for a read index, probing, telling and asking members. The service layer decides *when* to
//! call another node ([`super::node::Service::route`]); a [`PeerLink`] only carries the call.
//! The implementation lives with a frontend's client side (`grpc::peers`), so this layer stays
//! free of any protocol.
//!
//! Every call is bounded by the `timeout` it is given. A peer's error comes back as the
//! [`ServiceError`] the peer answered with (kind, SQLSTATE, leader hint, log index intact), or
//! as [`ErrorKind::Unavailable`](super::error::ErrorKind::Unavailable) without a leader hint
//! when the peer could not be reached.

use std::time::Duration;

use futures::future::BoxFuture;

use super::error::{LeaderHint, ServiceError};
use super::types::{
    Begun, CheckReport, MembershipChange, MembershipOutcome, NodeStatus, TxnAnswer, TxnCall,
    WriteOutcome, WriteRequest,
};
use crate::apply::snapshot::SnapMeta;
use crate::auth::authenticator::Principal;
use crate::command::{NodeId, RequestId, TableChecksum};

/// A peer call's answer.
pub type PeerResult<'a, T> = BoxFuture<'a, Result<T, ServiceError>>;

/// Calls to other nodes. See the module doc.
pub trait PeerLink: Send + Sync {
    /// Runs a write on the leader (marked as forwarded: the leader will not forward it again;
    /// as the request's principal).
    fn execute<'a>(
        &'a self,
        leader: &'a LeaderHint,
        req: &'a WriteRequest,
        timeout: Duration,
    ) -> PeerResult<'a, WriteOutcome>;

    /// Asks the leader for a read index confirmed by its quorum.
    fn read_index<'a>(&'a self, leader: &'a LeaderHint, timeout: Duration) -> PeerResult<'a, u64>;

    /// Runs a membership change on the leader (marked as forwarded, as `principal`).
    fn change_membership<'a>(
        &'a self,
        leader: &'a LeaderHint,
        principal: Option<&'a Principal>,
        change: &'a MembershipChange,
        timeout: Duration,
    ) -> PeerResult<'a, MembershipOutcome>;

    /// Runs a divergence check on the leader (marked as forwarded, as `principal`); `wait` is
    /// the check's own bound.
    fn check<'a>(
        &'a self,
        leader: &'a LeaderHint,
        principal: Option<&'a Principal>,
        wait: Duration,
        timeout: Duration,
    ) -> PeerResult<'a, CheckReport>;

    /// The checksums the node at `addr` computed at `log_index` (it waits up to `wait` to
    /// apply that index).
    fn table_checksums<'a>(
        &'a self,
        addr: &'a str,
        log_index: u64,
        wait: Duration,
        timeout: Duration,
    ) -> PeerResult<'a, Vec<TableChecksum>>;

    /// The status of the node at `addr`; `node_id` 0 asks whichever node answers there.
    fn status<'a>(
        &'a self,
        addr: &'a str,
        node_id: NodeId,
        timeout: Duration,
    ) -> PeerResult<'a, NodeStatus>;

    /// Tells the node at `addr` that the cluster removed it at `log_index`.
    fn retire<'a>(&'a self, addr: &'a str, log_index: u64, timeout: Duration)
        -> PeerResult<'a, ()>;

    /// Asks the node at `addr` to start an election now (leadership transfer).
    fn start_election<'a>(&'a self, addr: &'a str, timeout: Duration) -> PeerResult<'a, ()>;

    /// Streams a snapshot covering at least `min_index` from the node at `addr` into `file`;
    /// answers its metadata and the file (for a rebuild, see `service::repair`).
    fn fetch_snapshot<'a>(
        &'a self,
        addr: &'a str,
        min_index: u64,
        file: tokio::fs::File,
        timeout: Duration,
    ) -> PeerResult<'a, (SnapMeta, tokio::fs::File)>;

    /// Tells the node at `addr` that the check at `log_index` found its copy different.
    fn mark_diverged<'a>(
        &'a self,
        addr: &'a str,
        log_index: u64,
        differences: &'a [String],
        timeout: Duration,
    ) -> PeerResult<'a, ()>;

    /// Begins an interactive transaction on the leader (marked as forwarded, as `principal`).
    fn txn_begin<'a>(
        &'a self,
        leader: &'a LeaderHint,
        principal: Option<&'a Principal>,
        request_id: Option<&'a RequestId>,
        timeout: Duration,
    ) -> PeerResult<'a, Begun>;

    /// A call on transaction `txn_id`, running on `node` (marked as forwarded, as
    /// `principal`).
    fn txn_call<'a>(
        &'a self,
        node: &'a LeaderHint,
        principal: Option<&'a Principal>,
        txn_id: &'a str,
        call: &'a TxnCall,
        timeout: Duration,
    ) -> PeerResult<'a, TxnAnswer>;

    /// Asks the leader to record `client_addr` as this node's (`node_id`) client address;
    /// answers the log index of the change.
    fn publish_address<'a>(
        &'a self,
        leader: &'a LeaderHint,
        node_id: NodeId,
        client_addr: &'a str,
        timeout: Duration,
    ) -> PeerResult<'a, u64>;
}
