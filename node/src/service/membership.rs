//! Cluster membership: add a learner, promote learners to voters, remove members, transfer
//! leadership, retire a removed node, and record members' client addresses.
//!
//! Changes run on the leader (other nodes forward them, [`Service::route`]) through openraft's
//! joint consensus. Every change is idempotent: asking for a state the cluster is already in
//! succeeds with `log_index = 0`. A node is added only if its PostgreSQL matches the leader's
//! (major version, encoding, collation); a node that was removed is told so (retire) and stops
//! serving.
//!
//! The membership stores each node's peer address (what Raft replicates to) and its client
//! address (what leader hints name). A learner's client address comes from its answer to the
//! leader's probe; the founding members publish theirs once they are members
//! ([`Service::publish_own_address`]), each only its own.

use openraft::async_runtime::WatchReceiver;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::ChangeMembers;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::error::{ErrorKind, ServiceError};
use super::node::{Route, Service};
use super::types::{MemberInfo, MembershipChange, MembershipOutcome, NodeStatus, Origin};
use crate::auth::authenticator::Principal;
use crate::command::{NodeAddr, NodeId, TypeConfig};

/// Longest wait for a membership change (a learner catching up may take a snapshot install).
const CHANGE_WAIT: Duration = Duration::from_secs(300);

/// Longest wait for a learner to apply the log up to the commit index before a promotion.
const PROMOTE_CATCH_UP_WAIT: Duration = Duration::from_secs(15);

/// Longest wait for a leadership transfer.
const TRANSFER_WAIT: Duration = Duration::from_secs(30);

/// Longest wait for a leader to be known before a change is forwarded.
const LEADER_WAIT_MAX: Duration = Duration::from_secs(5);

impl Service {
    /// Runs a membership change (on the leader; other nodes forward it).
    pub async fn change_membership(
        &self,
        origin: Origin,
        principal: Option<Principal>,
        change: MembershipChange,
    ) -> Result<MembershipOutcome, ServiceError> {
        self.require_admin(principal.as_ref(), "change the cluster's membership")?;
        let timeout = match change {
            MembershipChange::TransferLeader(_) => TRANSFER_WAIT,
            _ => CHANGE_WAIT,
        };
        if let Route::Leader(leader) = self.route(origin, LEADER_WAIT_MAX).await? {
            return self
                .peers
                .change_membership(&leader, principal.as_ref(), &change, timeout)
                .await;
        }
        match change {
            MembershipChange::AddLearner {
                node_id,
                addr,
                wait_caught_up,
            } => add_learner(self, node_id, addr, wait_caught_up).await,
            MembershipChange::Promote { ids, force } => promote(self, ids, force).await,
            MembershipChange::Remove(ids) => remove(self, ids).await,
            MembershipChange::TransferLeader(target) => transfer_leader(self, target).await,
        }
    }
}

/// The current members as this node knows them.
pub fn members(svc: &Service) -> Vec<MemberInfo> {
    let m = svc.raft.metrics().borrow_watched().clone();
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
            MemberInfo {
                node_id: *id,
                addr: node.client.clone(),
                peer_addr: node.peer.clone(),
                voter: voters.contains(id),
                matched_index: matched.map(|l| l.index),
            }
        })
        .collect()
}

fn done(svc: &Service, log_index: u64, message: impl Into<String>) -> MembershipOutcome {
    MembershipOutcome {
        log_index,
        members: members(svc),
        message: message.into(),
    }
}

fn change_error(
    e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>,
    svc: &Service,
) -> ServiceError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            ServiceError::unavailable("leadership changed; retry", svc.leader())
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            ServiceError::precondition(c.to_string())
        }
        RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)) => ServiceError::unavailable(
            "leadership changed before the change committed; it may still take effect: check the membership, then retry",
            svc.leader(),
        ),
        RaftError::APIError(ClientWriteError::PreconditionFailed(p)) => {
            ServiceError::precondition(p.to_string())
        }
        RaftError::Fatal(f) => {
            ServiceError::unavailable(format!("raft stopped on this node: {f}"), None)
        }
    }
}

async fn change(
    svc: &Service,
    changes: ChangeMembers<NodeId, NodeAddr>,
) -> Result<openraft::raft::ClientWriteResponse<TypeConfig>, ServiceError> {
    tokio::time::timeout(CHANGE_WAIT, svc.raft.change_membership(changes, false))
        .await
        .map_err(|_| {
            ServiceError::deadline("the membership change did not complete in time; retry")
        })?
        .map_err(|e| change_error(e, svc))
}

/// Adds a running node (started with `--join`) as a learner, after checking that its
/// PostgreSQL matches ours.
async fn add_learner(
    svc: &Service,
    node_id: NodeId,
    addr: String,
    wait_caught_up: bool,
) -> Result<MembershipOutcome, ServiceError> {
    if node_id == 0 {
        return Err(ServiceError::invalid("node_id must be > 0"));
    }
    check_addr(&addr)?;
    let existing = {
        let m = svc.membership_config();
        m.membership().get_node(&node_id).map(|n| n.peer.clone())
    };
    match existing {
        Some(a) if a == addr => {
            return Ok(done(
                svc,
                0,
                format!("node {node_id} is already a member at {addr}"),
            ))
        }
        Some(a) => {
            return Err(ServiceError::new(
                ErrorKind::AlreadyExists,
                format!(
                "node {node_id} is already a member at {a}; remove it before adding it at {addr}"
            ),
            ))
        }
        None => {}
    }
    let client = check_joining_node(svc, node_id, &addr).await?;
    info!(node_id, peer = %addr, %client, "adding learner");
    let node = NodeAddr {
        peer: addr.clone(),
        client,
    };
    let deadline = tokio::time::Instant::now() + CHANGE_WAIT;
    let resp = tokio::time::timeout_at(
        deadline,
        svc.raft.add_learner(node_id, node, wait_caught_up),
    )
    .await
    .map_err(|_| {
        ServiceError::deadline("the learner did not catch up in time; it keeps catching up")
    })?
    .map_err(|e| change_error(e, svc))?;
    let index = resp.log_id.index;
    if !wait_caught_up {
        return Ok(done(
            svc,
            index,
            format!("node {node_id} added as a learner"),
        ));
    }
    // openraft answers once the learner *received* the log up to the change (a snapshot
    // counts when its last chunk arrived); done means its PostgreSQL holds it.
    let applied = wait_applied(svc, node_id, &addr, index, deadline)
        .await
        .map_err(|(applied, why)| {
            ServiceError::deadline(format!(
                "node {node_id} was added as a learner at log index {index}, but its PostgreSQL had applied only up to {applied} when the wait ended ({why}); it keeps catching up: watch `raftpg status`"
            ))
        })?;
    Ok(done(
        svc,
        index,
        format!(
            "node {node_id} added as a learner; its PostgreSQL holds the log up to index {applied}"
        ),
    ))
}

/// Waits until member `node_id` (peer address `addr`) reports that its PostgreSQL applied the
/// log up to `index`, until `deadline`. Returns its applied index, or the last one seen and
/// why it is not enough.
async fn wait_applied(
    svc: &Service,
    node_id: NodeId,
    addr: &str,
    index: u64,
    deadline: tokio::time::Instant,
) -> Result<u64, (u64, String)> {
    let mut seen = (0, String::from("no answer yet"));
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(seen);
        }
        match svc
            .peers
            .status(addr, 0, left.min(Duration::from_secs(5)))
            .await
        {
            Ok(st) if st.node_id == node_id && st.applied_index >= index => {
                return Ok(st.applied_index)
            }
            Ok(st) => {
                seen = (
                    st.applied_index,
                    format!("its applier: {}", st.applier_state),
                )
            }
            Err(e) => seen.1 = format!("it did not answer: {}", e.message),
        }
        tokio::time::sleep(Duration::from_millis(100).min(left)).await;
    }
}

/// Refuses an address that is not `host:port` (a host name or IP address, and a port).
fn check_addr(addr: &str) -> Result<(), ServiceError> {
    let refuse = || {
        ServiceError::invalid(format!(
            "addr {addr:?} is not host:port (e.g. 10.0.0.7:7001 or db3.example.com:7001)"
        ))
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(refuse)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let host_ok = host.parse::<std::net::IpAddr>().is_ok()
        || (!host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }));
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(()),
        _ => Err(refuse()),
    }
}

/// Checks that the node at peer address `addr` runs, is `node_id`, was never removed, and runs
/// a PostgreSQL like ours, and returns its client address. A node that was just started may
/// take a few seconds to initialize its PostgreSQL: it gets a minute to answer.
async fn check_joining_node(
    svc: &Service,
    node_id: NodeId,
    addr: &str,
) -> Result<String, ServiceError> {
    let probe_deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let theirs: NodeStatus = loop {
        match svc.peers.status(addr, 0, Duration::from_secs(5)).await {
            Ok(s) => break s,
            Err(e)
                if e.kind == ErrorKind::Unavailable
                    && tokio::time::Instant::now() < probe_deadline =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => {
                return Err(ServiceError::precondition(format!(
                    "node {node_id} at {addr} does not answer ({}); start it with --join first",
                    e.message
                )))
            }
        }
    };
    if theirs.node_id != node_id {
        return Err(ServiceError::precondition(format!(
            "the node at {addr} has id {}, not {node_id}",
            theirs.node_id
        )));
    }
    if theirs.removed {
        return Err(ServiceError::precondition(format!(
            "node {node_id} was removed from a cluster; wipe its data directory to add it again"
        )));
    }
    let client = theirs.client_addr.clone();
    check_addr(&client)?;
    let ours = svc.pg_identity().await?;
    let theirs = theirs.identity;
    let major = |v: &str| v.parse::<u64>().map(|n| n / 10_000).unwrap_or(0);
    if major(&theirs.version) != major(&ours.version)
        || theirs.encoding != ours.encoding
        || theirs.collation != ours.collation
    {
        return Err(ServiceError::precondition(format!(
            "node {node_id} runs PostgreSQL {} ({}, collation {}) but the cluster runs {} ({}, collation {}); every member needs the same major version, encoding and collation",
            theirs.version, theirs.encoding, theirs.collation, ours.version, ours.encoding, ours.collation
        )));
    }
    Ok(client)
}

/// Makes learners voters: unless `force`, only once each has applied the log up to the commit
/// index of when this was asked (waiting at most [`PROMOTE_CATCH_UP_WAIT`]): a voter that lags
/// adds nothing to the cluster's fault tolerance until it catches up.
async fn promote(
    svc: &Service,
    ids: Vec<NodeId>,
    force: bool,
) -> Result<MembershipOutcome, ServiceError> {
    let ids: BTreeSet<NodeId> = ids.into_iter().collect();
    let (voters, nodes): (BTreeSet<NodeId>, BTreeSet<NodeId>) = {
        let m = svc.membership_config();
        (
            m.membership().voter_ids().collect(),
            m.membership().nodes().map(|(id, _)| *id).collect(),
        )
    };
    if let Some(unknown) = ids.iter().find(|id| !nodes.contains(id)) {
        return Err(ServiceError::new(
            ErrorKind::NotFound,
            format!("node {unknown} is not a member; add it as a learner first"),
        ));
    }
    let to_promote: BTreeSet<NodeId> = ids.difference(&voters).copied().collect();
    if to_promote.is_empty() {
        return Ok(done(svc, 0, "already voters"));
    }
    if !force {
        let (committed, addrs) = {
            let metrics = svc.raft.metrics().borrow_watched().clone();
            let m = metrics.membership_config.membership().clone();
            let addrs: BTreeMap<NodeId, String> = to_promote
                .iter()
                .filter_map(|id| m.get_node(id).map(|n| (*id, n.peer.clone())))
                .collect();
            (metrics.last_applied.map(|l| l.index).unwrap_or(0), addrs)
        };
        let deadline = tokio::time::Instant::now() + PROMOTE_CATCH_UP_WAIT;
        for (id, addr) in &addrs {
            if let Err((applied, why)) = wait_applied(svc, *id, addr, committed, deadline).await {
                return Err(ServiceError::precondition(format!(
                    "node {id} is not caught up: its PostgreSQL applied the log up to index {applied}, the cluster is at {committed} ({why}); wait until `raftpg status` shows it caught up, or promote it anyway with --force"
                )));
            }
        }
    }
    let resp = change(svc, ChangeMembers::AddVoterIds(to_promote.clone())).await?;
    info!(?to_promote, index = resp.log_id.index, "promoted to voters");
    Ok(done(
        svc,
        resp.log_id.index,
        format!("promoted {to_promote:?}"),
    ))
}

/// Removes members; removed nodes are told to stop serving.
async fn remove(svc: &Service, ids: Vec<NodeId>) -> Result<MembershipOutcome, ServiceError> {
    let ids: BTreeSet<NodeId> = ids.into_iter().collect();
    let (voters, nodes): (BTreeSet<NodeId>, BTreeMap<NodeId, String>) = {
        let m = svc.membership_config();
        (
            m.membership().voter_ids().collect(),
            m.membership()
                .nodes()
                .map(|(id, n)| (*id, n.peer.clone()))
                .collect(),
        )
    };
    let present: BTreeSet<NodeId> = ids
        .iter()
        .filter(|id| nodes.contains_key(id))
        .copied()
        .collect();
    if present.is_empty() {
        return Ok(done(svc, 0, "not members (already removed)"));
    }
    if voters.difference(&present).next().is_none() {
        return Err(ServiceError::precondition("cannot remove every voter"));
    }
    let mut index = 0;
    let leaving_voters: BTreeSet<NodeId> = present.intersection(&voters).copied().collect();
    if !leaving_voters.is_empty() {
        index = change(svc, ChangeMembers::RemoveVoters(leaving_voters))
            .await?
            .log_id
            .index;
    }
    let still: BTreeSet<NodeId> = {
        let m = svc.membership_config();
        m.membership()
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| present.contains(id))
            .collect()
    };
    if !still.is_empty() && svc.is_leader() {
        index = change(svc, ChangeMembers::RemoveNodes(still))
            .await?
            .log_id
            .index;
    }
    for id in &present {
        retire_remote(svc, *id, &nodes[id], index).await;
    }
    info!(?present, index, "removed from the cluster");
    Ok(done(svc, index, format!("removed {present:?}")))
}

async fn retire_remote(svc: &Service, id: NodeId, addr: &str, index: u64) {
    if id == svc.id {
        svc.retire(index);
        return;
    }
    if let Err(e) = svc.peers.retire(addr, index, Duration::from_secs(3)).await {
        warn!(node_id = id, error = %e, "could not tell the removed node; it will refuse to rejoin only when told");
    }
}

/// Hands leadership to a caught-up voter: this leader stops sending heartbeats and the target
/// starts elections until it wins (bounded).
async fn transfer_leader(svc: &Service, target: NodeId) -> Result<MembershipOutcome, ServiceError> {
    if target == svc.id {
        return Ok(done(svc, 0, format!("node {target} already leads")));
    }
    let (addr, is_voter, matched, last) = {
        let m = svc.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let addr = membership.get_node(&target).map(|n| n.peer.clone());
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
        return Err(ServiceError::new(
            ErrorKind::NotFound,
            format!("node {target} is not a member"),
        ));
    };
    if !is_voter {
        return Err(ServiceError::precondition(format!(
            "node {target} is a learner; promote it first"
        )));
    }
    if matched.unwrap_or(0) + 100 < last.unwrap_or(0) {
        return Err(ServiceError::precondition(format!(
            "node {target} is behind (matched {matched:?} of {last:?}); wait for it to catch up"
        )));
    }
    svc.raft.runtime_config().heartbeat(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut outcome = Err(ServiceError::deadline(format!(
        "node {target} did not take over in time; retry"
    )));
    while tokio::time::Instant::now() < deadline {
        let _ = svc
            .peers
            .start_election(&addr, Duration::from_secs(2))
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let leader = svc.raft.metrics().borrow_watched().current_leader;
        if leader == Some(target) {
            outcome = Ok(done(svc, 0, format!("node {target} leads now")));
            break;
        }
        if leader.is_some() && leader != Some(svc.id) {
            outcome = Err(ServiceError::new(
                ErrorKind::Aborted,
                format!("node {leader:?} took over instead of {target}; retry"),
            ));
            break;
        }
    }
    svc.raft.runtime_config().heartbeat(true);
    outcome
}

/// How often a member checks that the membership holds its client address.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// Longest wait for the leader to record a published address.
const PUBLISH_WAIT: Duration = Duration::from_secs(10);

impl Service {
    /// Records `client` as member `node_id`'s client address (on the leader). The frontend has
    /// checked that the caller is node `node_id`. Answers the log index of the change (0: it
    /// was recorded already).
    pub async fn publish_address(
        &self,
        node_id: NodeId,
        client: String,
    ) -> Result<u64, ServiceError> {
        check_addr(&client)?;
        if !self.is_leader() {
            return Err(ServiceError::unavailable(
                "this node is not the leader",
                self.leader(),
            ));
        }
        let node = {
            let m = self.membership_config();
            m.membership().get_node(&node_id).cloned()
        };
        let Some(node) = node else {
            return Err(ServiceError::new(
                ErrorKind::NotFound,
                format!("node {node_id} is not a member"),
            ));
        };
        if node.client == client {
            return Ok(0);
        }
        let node = NodeAddr {
            peer: node.peer,
            client,
        };
        // SetNodes replaces the node's entry; only the client address changes, which Raft
        // does not use, so this cannot split the cluster.
        let resp = change(
            self,
            ChangeMembers::SetNodes(BTreeMap::from([(node_id, node.clone())])),
        )
        .await?;
        info!(node_id, client = %node.client, index = resp.log_id.index, "recorded a member's client address");
        Ok(resp.log_id.index)
    }

    /// Keeps this node's client address (`--advertise`) in the membership: once a second,
    /// while this node is a member whose recorded address differs, asks the leader to record
    /// it. Runs until shutdown or removal.
    pub async fn publish_own_address(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(PUBLISH_EVERY) => {}
            }
            if self.is_removed() {
                return;
            }
            let recorded = {
                let m = self.membership_config();
                m.membership().get_node(&self.id).map(|n| n.client.clone())
            };
            let client = self.addrs.client.clone();
            if recorded.is_none_or(|c| c == client) {
                continue;
            }
            let result = if self.is_leader() {
                self.publish_address(self.id, client).await
            } else if let Some(leader) = self.leader().filter(|l| l.id != self.id) {
                self.peers
                    .publish_address(&leader, self.id, &client, PUBLISH_WAIT)
                    .await
            } else {
                continue;
            };
            if let Err(e) = result {
                debug!(error = %e.message, "publishing this node's client address; will retry");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_addr;

    #[test]
    fn addresses_are_host_and_port() {
        for good in [
            "127.0.0.1:7001",
            "[::1]:7001",
            "db3.example.com:7001",
            "node-2:1",
        ] {
            assert!(check_addr(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:99999",
            ":7001",
            "a b:1",
            "http://x:1",
            "x/y:1",
            "a..b:1",
        ] {
            assert!(check_addr(bad).is_err(), "{bad}");
        }
    }
}
