//! Cluster membership: add a learner, promote learners to voters, remove members, transfer
//! leadership, and retire a removed node.
//!
//! Changes run on the leader (other nodes forward them) through openraft's joint consensus.
//! Every call is idempotent: asking for a state the cluster is already in succeeds with
//! `log_index = 0`. A node is added only if its PostgreSQL matches the leader's (major version,
//! encoding, collation); a node that was removed is told so (`Retire`) and stops serving.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use raftpg_proto::v1::cluster_client::ClusterClient;
use raftpg_proto::v1::raft_client::RaftClient;
use raftpg_proto::v1::{
    AddLearnerRequest, Member, MembershipResponse, PromoteRequest, ReadIndexRequest, RemoveRequest,
    RetireRequest, StatusRequest, TransferLeaderRequest,
};
use raftpg_proto::FORWARDED_METADATA;
use tonic::transport::Channel;
use tonic::{Request, Status};
use tracing::{info, warn};

use crate::api::not_leader;
use crate::command::{NodeId, TypeConfig};
use crate::node::NodeContext;

/// Longest wait for a membership change (a learner catching up may take a snapshot install).
const CHANGE_WAIT: Duration = Duration::from_secs(300);

/// `None` when this node leads (serve here); otherwise a client of the leader's Cluster
/// service to forward to.
pub async fn route<T>(
    ctx: &NodeContext,
    req: &Request<T>,
) -> Result<Option<ClusterClient<Channel>>, Status> {
    if ctx.is_leader() {
        return Ok(None);
    }
    if req.metadata().get(FORWARDED_METADATA).is_some() {
        return Err(not_leader("this node is not the leader", ctx.leader()));
    }
    let Some((_, addr)) = ctx.wait_for_leader(Duration::from_secs(5)).await else {
        return Err(not_leader("no leader is known; retry", None));
    };
    Ok(Some(
        ClusterClient::new(ctx.channel_to(&addr)?).max_decoding_message_size(64 * 1024 * 1024),
    ))
}

/// A copy of `msg` for forwarding to the leader.
pub fn forwarded<T>(ctx: &NodeContext, msg: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(timeout);
    r.metadata_mut().insert(
        FORWARDED_METADATA,
        tonic::metadata::MetadataValue::from(ctx.id),
    );
    r
}

/// The current members as the API reports them.
pub fn members(ctx: &NodeContext) -> Vec<Member> {
    let m = ctx.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, node)| {
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(id).cloned())
                .flatten();
            Member {
                node_id: *id,
                addr: node.addr.clone(),
                voter: voters.contains(id),
                matched_index: matched.map(|l| l.index).unwrap_or(0),
                has_matched: matched.is_some(),
            }
        })
        .collect()
}

fn done(ctx: &NodeContext, log_index: u64, message: impl Into<String>) -> MembershipResponse {
    MembershipResponse {
        log_index,
        members: members(ctx),
        message: message.into(),
    }
}

fn change_error(
    e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>,
    ctx: &NodeContext,
) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            not_leader("leadership changed; retry", ctx.leader())
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            Status::failed_precondition(c.to_string())
        }
        RaftError::Fatal(f) => Status::unavailable(format!("raft stopped on this node: {f}")),
    }
}

async fn change(
    ctx: &NodeContext,
    changes: ChangeMembers<NodeId, BasicNode>,
) -> Result<openraft::raft::ClientWriteResponse<TypeConfig>, Status> {
    tokio::time::timeout(CHANGE_WAIT, ctx.raft.change_membership(changes, false))
        .await
        .map_err(|_| {
            Status::deadline_exceeded("the membership change did not complete in time; retry")
        })?
        .map_err(|e| change_error(e, ctx))
}

/// Adds a running node (started with `--join`) as a learner, after checking that its
/// PostgreSQL matches ours.
pub async fn add_learner(
    ctx: &NodeContext,
    req: Request<AddLearnerRequest>,
) -> Result<MembershipResponse, Status> {
    if let Some(mut leader) = route(ctx, &req).await? {
        return leader
            .add_learner(forwarded(ctx, req.into_inner(), CHANGE_WAIT))
            .await
            .map(|r| r.into_inner());
    }
    let AddLearnerRequest {
        node_id,
        addr,
        wait_caught_up,
    } = req.into_inner();
    if node_id == 0 || addr.trim().is_empty() {
        return Err(Status::invalid_argument(
            "node_id must be > 0 and addr must be host:port",
        ));
    }
    let existing = {
        let m = ctx.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&node_id).map(|n| n.addr.clone())
    };
    match existing {
        Some(a) if a == addr => {
            return Ok(done(
                ctx,
                0,
                format!("node {node_id} is already a member at {addr}"),
            ))
        }
        Some(a) => {
            return Err(Status::already_exists(format!(
                "node {node_id} is already a member at {a}; remove it before adding it at {addr}"
            )))
        }
        None => {}
    }
    // The new node must be running and compatible.
    // (A node that was just started may take a few seconds to initialize its PostgreSQL.)
    let mut client = ClusterClient::new(ctx.channel_to(&addr)?);
    let probe_deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let theirs = loop {
        let mut probe = Request::new(StatusRequest { node_id: 0 });
        probe.set_timeout(Duration::from_secs(5));
        match client.status(probe).await {
            Ok(r) => break r.into_inner(),
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    && tokio::time::Instant::now() < probe_deadline =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(s) => {
                return Err(Status::failed_precondition(format!(
                    "node {node_id} at {addr} does not answer ({}); start it with --join first",
                    s.message()
                )))
            }
        }
    };
    if theirs.node_id != node_id {
        return Err(Status::failed_precondition(format!(
            "the node at {addr} has id {}, not {node_id}",
            theirs.node_id
        )));
    }
    if theirs.removed {
        return Err(Status::failed_precondition(format!(
            "node {node_id} was removed from a cluster; wipe its data directory to add it again"
        )));
    }
    let ours = ctx.pg_identity().await?;
    let major = |v: &str| v.parse::<u64>().map(|n| n / 10_000).unwrap_or(0);
    if major(&theirs.postgres_version) != major(&ours.version)
        || theirs.encoding != ours.encoding
        || theirs.collation != ours.collation
    {
        return Err(Status::failed_precondition(format!(
            "node {node_id} runs PostgreSQL {} ({}, collation {}) but the cluster runs {} ({}, collation {}); every member needs the same major version, encoding and collation",
            theirs.postgres_version, theirs.encoding, theirs.collation, ours.version, ours.encoding, ours.collation
        )));
    }
    info!(node_id, %addr, "adding learner");
    let resp = tokio::time::timeout(
        CHANGE_WAIT,
        ctx.raft
            .add_learner(node_id, BasicNode::new(addr), wait_caught_up),
    )
    .await
    .map_err(|_| {
        Status::deadline_exceeded("the learner did not catch up in time; it keeps catching up")
    })?
    .map_err(|e| change_error(e, ctx))?;
    Ok(done(
        ctx,
        resp.log_id.index,
        format!("node {node_id} added as a learner"),
    ))
}

/// Makes learners voters.
pub async fn promote(
    ctx: &NodeContext,
    req: Request<PromoteRequest>,
) -> Result<MembershipResponse, Status> {
    if let Some(mut leader) = route(ctx, &req).await? {
        return leader
            .promote(forwarded(ctx, req.into_inner(), CHANGE_WAIT))
            .await
            .map(|r| r.into_inner());
    }
    let ids: BTreeSet<NodeId> = req.into_inner().node_ids.into_iter().collect();
    let (voters, nodes): (BTreeSet<NodeId>, BTreeSet<NodeId>) = {
        let m = ctx.raft.metrics().borrow().membership_config.clone();
        (
            m.membership().voter_ids().collect(),
            m.membership().nodes().map(|(id, _)| *id).collect(),
        )
    };
    if let Some(unknown) = ids.iter().find(|id| !nodes.contains(id)) {
        return Err(Status::not_found(format!(
            "node {unknown} is not a member; add it as a learner first"
        )));
    }
    let to_promote: BTreeSet<NodeId> = ids.difference(&voters).copied().collect();
    if to_promote.is_empty() {
        return Ok(done(ctx, 0, "already voters"));
    }
    let resp = change(ctx, ChangeMembers::AddVoterIds(to_promote.clone())).await?;
    info!(?to_promote, index = resp.log_id.index, "promoted to voters");
    Ok(done(
        ctx,
        resp.log_id.index,
        format!("promoted {to_promote:?}"),
    ))
}

/// Removes members; removed nodes are told to stop serving.
pub async fn remove(
    ctx: &NodeContext,
    req: Request<RemoveRequest>,
) -> Result<MembershipResponse, Status> {
    if let Some(mut leader) = route(ctx, &req).await? {
        return leader
            .remove(forwarded(ctx, req.into_inner(), CHANGE_WAIT))
            .await
            .map(|r| r.into_inner());
    }
    let ids: BTreeSet<NodeId> = req.into_inner().node_ids.into_iter().collect();
    let (voters, nodes): (BTreeSet<NodeId>, BTreeMap<NodeId, String>) = {
        let m = ctx.raft.metrics().borrow().membership_config.clone();
        (
            m.membership().voter_ids().collect(),
            m.membership()
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect(),
        )
    };
    let present: BTreeSet<NodeId> = ids
        .iter()
        .filter(|id| nodes.contains_key(id))
        .copied()
        .collect();
    if present.is_empty() {
        return Ok(done(ctx, 0, "not members (already removed)"));
    }
    if voters.difference(&present).next().is_none() {
        return Err(Status::failed_precondition("cannot remove every voter"));
    }
    let mut index = 0;
    let leaving_voters: BTreeSet<NodeId> = present.intersection(&voters).copied().collect();
    if !leaving_voters.is_empty() {
        index = change(ctx, ChangeMembers::RemoveVoters(leaving_voters))
            .await?
            .log_id
            .index;
    }
    let still: BTreeSet<NodeId> = {
        let m = ctx.raft.metrics().borrow().membership_config.clone();
        m.membership()
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| present.contains(id))
            .collect()
    };
    if !still.is_empty() && ctx.is_leader() {
        index = change(ctx, ChangeMembers::RemoveNodes(still))
            .await?
            .log_id
            .index;
    }
    for id in &present {
        retire_remote(ctx, *id, &nodes[id], index).await;
    }
    info!(?present, index, "removed from the cluster");
    Ok(done(ctx, index, format!("removed {present:?}")))
}

async fn retire_remote(ctx: &NodeContext, id: NodeId, addr: &str, index: u64) {
    if id == ctx.id {
        ctx.retire(index);
        return;
    }
    let result = async {
        let mut c = ClusterClient::new(ctx.channel_to(addr)?);
        let mut r = Request::new(RetireRequest { log_index: index });
        r.set_timeout(Duration::from_secs(3));
        c.retire(r).await.map(|_| ())
    }
    .await;
    if let Err(e) = result {
        warn!(node_id = id, error = %e, "could not tell the removed node; it will refuse to rejoin only when told");
    }
}

/// Hands leadership to a caught-up voter: this leader stops sending heartbeats and the target
/// starts elections until it wins (bounded).
pub async fn transfer_leader(
    ctx: &NodeContext,
    req: Request<TransferLeaderRequest>,
) -> Result<MembershipResponse, Status> {
    if let Some(mut leader) = route(ctx, &req).await? {
        return leader
            .transfer_leader(forwarded(ctx, req.into_inner(), Duration::from_secs(30)))
            .await
            .map(|r| r.into_inner());
    }
    let target = req.into_inner().node_id;
    if target == ctx.id {
        return Ok(done(ctx, 0, format!("node {target} already leads")));
    }
    let (addr, is_voter, matched, last) = {
        let m = ctx.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let addr = membership.get_node(&target).map(|n| n.addr.clone());
        let is_voter = membership.voter_ids().any(|v| v == target);
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&target).cloned())
            .flatten()
            .map(|l| l.index);
        (addr, is_voter, matched, m.last_log_index)
    };
    let Some(addr) = addr else {
        return Err(Status::not_found(format!("node {target} is not a member")));
    };
    if !is_voter {
        return Err(Status::failed_precondition(format!(
            "node {target} is a learner; promote it first"
        )));
    }
    if matched.unwrap_or(0) + 100 < last.unwrap_or(0) {
        return Err(Status::failed_precondition(format!(
            "node {target} is behind (matched {matched:?} of {last:?}); wait for it to catch up"
        )));
    }
    ctx.raft.runtime_config().heartbeat(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut client = RaftClient::new(ctx.channel_to(&addr)?);
    let mut outcome = Err(Status::deadline_exceeded(format!(
        "node {target} did not take over in time; retry"
    )));
    while tokio::time::Instant::now() < deadline {
        let mut r = Request::new(ReadIndexRequest {});
        r.set_timeout(Duration::from_secs(2));
        let _ = client.start_election(r).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let leader = ctx.raft.metrics().borrow().current_leader;
        if leader == Some(target) {
            outcome = Ok(done(ctx, 0, format!("node {target} leads now")));
            break;
        }
        if leader.is_some() && leader != Some(ctx.id) {
            outcome = Err(Status::aborted(format!(
                "node {leader:?} took over instead of {target}; retry"
            )));
            break;
        }
    }
    ctx.raft.runtime_config().heartbeat(true);
    outcome
}
