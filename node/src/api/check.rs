//! `Cluster.Check` and `Cluster.TableChecksums`: divergence detection across the cluster.
//!
//! The leader appends a `Command::Checksum` entry; every node computes its checksums while
//! applying that entry (so all of them hash the same log position, even under load); the
//! leader then collects every member's stored result and names the tables and nodes that differ
//! from the majority.

use std::collections::BTreeMap;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use raftpg_proto::v1::cluster_client::ClusterClient;
use raftpg_proto::v1::{
    CheckRequest, CheckResponse, NodeChecksums, TableChecksum, TableChecksumsRequest,
    TableChecksumsResponse,
};
use tonic::{Request, Status};

use crate::api::membership::{forwarded, route};
use crate::api::not_leader;
use crate::checksums;
use crate::command::{ApplyOutcome, Command};
use crate::node::NodeContext;

const DEFAULT_WAIT: Duration = Duration::from_secs(30);

fn wait_of(ms: u32) -> Duration {
    match ms {
        0 => DEFAULT_WAIT,
        ms => Duration::from_millis(ms.into()).min(Duration::from_secs(600)),
    }
}

fn to_proto(t: &crate::command::TableChecksum) -> TableChecksum {
    TableChecksum {
        name: t.name.clone(),
        rows: t.rows,
        hash: t.hash.clone(),
    }
}

/// Runs a check (on the leader; other nodes forward it).
pub async fn check(ctx: &NodeContext, req: Request<CheckRequest>) -> Result<CheckResponse, Status> {
    let wait = wait_of(req.get_ref().timeout_ms);
    if let Some(mut leader) = route(ctx, &req).await? {
        return leader
            .check(forwarded(
                ctx,
                req.into_inner(),
                wait + Duration::from_secs(5),
            ))
            .await
            .map(|r| r.into_inner());
    }
    let written = tokio::time::timeout(wait, ctx.raft.client_write(Command::Checksum))
        .await
        .map_err(|_| Status::deadline_exceeded("the checksum entry was not applied in time"))?;
    let resp = match written {
        Ok(r) => r,
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
            return Err(not_leader("leadership changed; retry", ctx.leader()))
        }
        Err(e) => return Err(Status::unavailable(e.to_string())),
    };
    let index = resp.log_id.index;
    let ApplyOutcome::Checksums(own) = resp.data else {
        return Err(Status::internal("unexpected outcome of a checksum entry"));
    };
    let members: Vec<(u64, String)> = {
        let m = ctx.raft.metrics().borrow().membership_config.clone();
        m.membership()
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect()
    };
    let mut nodes = Vec::with_capacity(members.len());
    for (id, addr) in members {
        if id == ctx.id {
            nodes.push(NodeChecksums {
                node_id: id,
                addr,
                ok: true,
                error: String::new(),
                tables: own.iter().map(to_proto).collect(),
            });
            continue;
        }
        // A member that is restarting or catching up gets until the deadline to answer.
        let deadline = tokio::time::Instant::now() + wait;
        let answer = loop {
            let attempt = async {
                let mut client = ClusterClient::new(ctx.channel_to(&addr)?);
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let mut r = Request::new(TableChecksumsRequest {
                    log_index: index,
                    timeout_ms: u32::try_from(left.as_millis()).unwrap_or(u32::MAX),
                });
                r.set_timeout(left + Duration::from_secs(2));
                client.table_checksums(r).await.map(|r| r.into_inner())
            }
            .await;
            match attempt {
                Err(s)
                    if s.code() == tonic::Code::Unavailable
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => break other,
            }
        };
        nodes.push(match answer {
            Ok(r) => NodeChecksums {
                node_id: id,
                addr,
                ok: true,
                error: String::new(),
                tables: r.tables,
            },
            Err(s) => NodeChecksums {
                node_id: id,
                addr,
                ok: false,
                error: s.message().to_string(),
                tables: Vec::new(),
            },
        });
    }
    let differences = compare(&nodes);
    let missing_nodes: Vec<u64> = nodes.iter().filter(|n| !n.ok).map(|n| n.node_id).collect();
    Ok(CheckResponse {
        log_index: index,
        identical: differences.is_empty() && missing_nodes.is_empty(),
        differences,
        missing_nodes,
        nodes,
    })
}

/// One line per table whose checksum is not the same on every answering node, naming the nodes
/// that differ from the most common value.
fn compare(nodes: &[NodeChecksums]) -> Vec<String> {
    let answered: Vec<&NodeChecksums> = nodes.iter().filter(|n| n.ok).collect();
    let mut names: Vec<&str> = answered
        .iter()
        .flat_map(|n| n.tables.iter().map(|t| t.name.as_str()))
        .collect();
    names.sort_unstable();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        let value_of = |n: &NodeChecksums| {
            n.tables
                .iter()
                .find(|t| t.name == name)
                .map(|t| format!("{} rows, {}", t.rows, t.hash))
                .unwrap_or_else(|| "absent".to_string())
        };
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for n in &answered {
            *counts.entry(value_of(n)).or_default() += 1;
        }
        if counts.len() <= 1 {
            continue;
        }
        let majority = counts
            .iter()
            .max_by_key(|(_, c)| **c)
            .map(|(v, _)| v.clone())
            .unwrap_or_default();
        let odd: Vec<String> = answered
            .iter()
            .filter(|n| value_of(n) != majority)
            .map(|n| format!("node {} has {}", n.node_id, value_of(n)))
            .collect();
        out.push(format!("{name}: {} (majority: {majority})", odd.join("; ")));
    }
    out
}

/// This node's checksums from the check entry at `log_index`.
pub async fn table_checksums(
    ctx: &NodeContext,
    req: TableChecksumsRequest,
) -> Result<TableChecksumsResponse, Status> {
    let wait = wait_of(req.timeout_ms);
    ctx.raft
        .wait(Some(wait))
        .applied_index_at_least(Some(req.log_index), "checksums")
        .await
        .map_err(|e| {
            Status::deadline_exceeded(format!(
                "node {} did not apply index {} in time: {e}",
                ctx.id, req.log_index
            ))
        })?;
    let mut pooled = ctx
        .reads
        .get()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let sums = checksums::read(pooled.client(), req.log_index)
        .await
        .map_err(|e| Status::unavailable(format!("reading checksums: {e}")))?
        .ok_or_else(|| {
            Status::not_found(format!(
                "node {} has no checksums for index {}",
                ctx.id, req.log_index
            ))
        })?;
    Ok(TableChecksumsResponse {
        node_id: ctx.id,
        tables: sums.iter().map(to_proto).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, tables: &[(&str, i64, &str)]) -> NodeChecksums {
        NodeChecksums {
            node_id: id,
            addr: String::new(),
            ok: true,
            error: String::new(),
            tables: tables
                .iter()
                .map(|(n, r, h)| TableChecksum {
                    name: n.to_string(),
                    rows: *r,
                    hash: h.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn names_the_odd_node_and_table() {
        let nodes = vec![
            node(1, &[("public.a", 3, "x"), ("public.b", 1, "y")]),
            node(2, &[("public.a", 4, "z"), ("public.b", 1, "y")]),
            node(3, &[("public.a", 3, "x"), ("public.b", 1, "y")]),
        ];
        let d = compare(&nodes);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].starts_with("public.a: node 2 has 4 rows, z"), "{d:?}");
        assert!(compare(&nodes[..1]).is_empty());
    }
}
