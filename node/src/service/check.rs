//! Divergence detection across the cluster (`raftpg check`).
//!
//! The leader appends a `Command::Checksum` entry; every node computes its checksums while
//! applying that entry (so all of them hash the same log position, even under load); the
//! leader then collects every member's stored result and names the tables and nodes that differ
//! from the majority.

use std::collections::BTreeMap;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};

use super::error::{ErrorKind, ServiceError};
use super::node::{Route, Service};
use super::types::{CheckReport, NodeChecksums, Origin};
use crate::apply::checksums;
use crate::auth::authenticator::Principal;
use crate::command::{ApplyOutcome, Command, NodeId, TableChecksum};
use crate::sql::gate;

/// The user views and the user functions in SQL or PL/pgSQL (not an extension's), with what
/// the gate needs to check them.
const AUDIT_SQL: &str = "
SELECT 'view', schemaname::text, viewname::text, '', definition
  FROM pg_views
 WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'raftpg')
UNION ALL
SELECT 'function', n.nspname::text, p.proname::text, l.lanname::text, p.prosrc
  FROM pg_proc p
  JOIN pg_namespace n ON n.oid = p.pronamespace
  JOIN pg_language l ON l.oid = p.prolang
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'raftpg')
   AND l.lanname IN ('sql', 'plpgsql')
   AND NOT EXISTS (SELECT 1 FROM pg_depend d
                    WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
 ORDER BY 1, 2, 3";

/// How long a check waits when the request does not say.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// Longest wait a request may ask for.
const WAIT_MAX: Duration = Duration::from_secs(600);

/// The wait of a request's `timeout_ms` (0: the default).
pub fn wait_of(timeout_ms: u32) -> Duration {
    match timeout_ms {
        0 => DEFAULT_WAIT,
        ms => Duration::from_millis(ms.into()).min(WAIT_MAX),
    }
}

impl Service {
    /// Runs a check (on the leader; other nodes forward it), each node waiting up to `wait`.
    pub async fn check(
        &self,
        origin: Origin,
        principal: Option<Principal>,
        wait: Duration,
    ) -> Result<CheckReport, ServiceError> {
        self.require_admin(principal.as_ref(), "run a divergence check")?;
        if let Route::Leader(leader) = self.route(origin, Duration::from_secs(5)).await? {
            return self
                .peers
                .check(
                    &leader,
                    principal.as_ref(),
                    wait,
                    wait + Duration::from_secs(5),
                )
                .await;
        }
        let written = tokio::time::timeout(wait, self.raft.client_write(Command::Checksum))
            .await
            .map_err(|_| ServiceError::deadline("the checksum entry was not applied in time"))?;
        let resp = match written {
            Ok(r) => r,
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                return Err(ServiceError::unavailable(
                    "leadership changed; retry",
                    self.leader(),
                ))
            }
            Err(e) => return Err(ServiceError::unavailable(e.to_string(), None)),
        };
        let index = resp.log_id.index;
        let ApplyOutcome::Checksums(own) = resp.data else {
            return Err(ServiceError::internal(
                "unexpected outcome of a checksum entry",
            ));
        };
        let members: Vec<(NodeId, String)> = {
            let m = self.membership_config();
            m.membership()
                .nodes()
                .map(|(id, n)| (*id, n.peer.clone()))
                .collect()
        };
        let mut nodes = Vec::with_capacity(members.len());
        for (id, addr) in members {
            let tables = if id == self.id {
                Ok(own.clone())
            } else {
                self.member_checksums(&addr, index, wait).await
            };
            nodes.push(NodeChecksums {
                node_id: id,
                addr,
                tables,
            });
        }
        let differences = compare(&nodes);
        let missing_nodes: Vec<NodeId> = nodes
            .iter()
            .filter(|n| n.tables.is_err())
            .map(|n| n.node_id)
            .collect();
        let diverged_nodes = diverged(&nodes);
        for id in &diverged_nodes {
            let odd: Vec<String> = differences
                .iter()
                .filter(|d| d.contains(&format!("node {id} has")))
                .cloned()
                .collect();
            let told = match nodes.iter().find(|n| n.node_id == *id) {
                Some(_) if *id == self.id => self.record_diverged(index, &odd),
                Some(n) => {
                    self.peers
                        .mark_diverged(&n.addr, index, &odd, Duration::from_secs(5))
                        .await
                }
                None => Ok(()),
            };
            if let Err(e) = told {
                tracing::warn!(node = id, error = %e.message, "could not tell a node that its copy differs");
            }
        }
        let unsafe_definitions = self.audit_definitions().await;
        Ok(CheckReport {
            log_index: index,
            identical: differences.is_empty() && missing_nodes.is_empty(),
            differences,
            missing_nodes,
            diverged_nodes,
            unsafe_definitions,
            nodes,
        })
    }

    /// The user views and functions of the catalog (on this node) whose definitions the gate
    /// would refuse today: made by an older raftpg with weaker rules, or behind raftpg's back.
    /// Views and functions made through this version were checked when they were created (their
    /// definition is part of the statement), so a write using them is safe; these are not.
    async fn audit_definitions(&self) -> Vec<String> {
        let mut pooled = match self.reads.get().await {
            Ok(p) => p,
            Err(e) => return vec![format!("(could not read the definitions: {e})")],
        };
        let rows = match pooled.base_client().await {
            Ok(client) => client.query(AUDIT_SQL, &[]).await,
            Err(e) => Err(e),
        };
        pooled.release();
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => return vec![format!("(could not read the definitions: {e})")],
        };
        rows.iter()
            .filter_map(|r| {
                let (kind, schema, name, language, body): (String, String, String, String, String) =
                    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
                let checked = match kind.as_str() {
                    "view" => gate::check_view_definition(&format!("{schema}.{name}"), &body),
                    _ => gate::check_existing_function(&schema, &name, &language, &body),
                };
                checked.err().map(|r| r.message)
            })
            .collect()
    }

    /// A member's checksums at `index`; a member that is restarting or catching up gets until
    /// the deadline to answer.
    async fn member_checksums(
        &self,
        addr: &str,
        index: u64,
        wait: Duration,
    ) -> Result<Vec<TableChecksum>, String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let attempt = self
                .peers
                .table_checksums(addr, index, left, left + Duration::from_secs(2))
                .await;
            match attempt {
                Err(e)
                    if e.kind == ErrorKind::Unavailable
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other.map_err(|e| e.message),
            }
        }
    }

    /// This node's checksums from the check entry at `log_index` (waiting up to `wait` for
    /// this node to apply it).
    pub async fn table_checksums(
        &self,
        log_index: u64,
        wait: Duration,
    ) -> Result<Vec<TableChecksum>, ServiceError> {
        self.raft
            .wait(Some(wait))
            .applied_index_at_least(Some(log_index), "checksums")
            .await
            .map_err(|e| {
                ServiceError::deadline(format!(
                    "node {} did not apply index {log_index} in time: {e}",
                    self.id
                ))
            })?;
        let mut pooled = self
            .reads
            .get()
            .await
            .map_err(|e| ServiceError::unavailable(e.to_string(), None))?;
        let client = pooled
            .base_client()
            .await
            .map_err(|e| ServiceError::unavailable(format!("reading checksums: {e}"), None))?;
        checksums::read(client, log_index)
            .await
            .map_err(|e| ServiceError::unavailable(format!("reading checksums: {e}"), None))?
            .ok_or_else(|| {
                ServiceError::new(
                    ErrorKind::NotFound,
                    format!("node {} has no checksums for index {log_index}", self.id),
                )
            })
    }
}

/// The answering members' checksums, and every table name any of them has (sorted).
fn answers(nodes: &[NodeChecksums]) -> (Vec<(NodeId, &[TableChecksum])>, Vec<&str>) {
    let answered: Vec<(NodeId, &[TableChecksum])> = nodes
        .iter()
        .filter_map(|n| n.tables.as_ref().ok().map(|t| (n.node_id, t.as_slice())))
        .collect();
    let mut names: Vec<&str> = answered
        .iter()
        .flat_map(|(_, tables)| tables.iter().map(|t| t.name.as_str()))
        .collect();
    names.sort_unstable();
    names.dedup();
    (answered, names)
}

/// A member's copy of table `name`, as reported ("N rows, hash", or "absent").
fn value_of(tables: &[TableChecksum], name: &str) -> String {
    tables
        .iter()
        .find(|t| t.name == name)
        .map(|t| format!("{} rows, {}", t.rows, t.hash))
        .unwrap_or_else(|| "absent".to_string())
}

/// How many answering members hold each value of table `name`.
fn counts(answered: &[(NodeId, &[TableChecksum])], name: &str) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (_, tables) in answered {
        *counts.entry(value_of(tables, name)).or_default() += 1;
    }
    counts
}

/// One line per table whose checksum is not the same on every answering node, naming the nodes
/// that differ from the most common value.
fn compare(nodes: &[NodeChecksums]) -> Vec<String> {
    let (answered, names) = answers(nodes);
    let mut out = Vec::new();
    for name in names {
        let counts = counts(&answered, name);
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
            .filter(|(_, tables)| value_of(tables, name) != majority)
            .map(|(id, tables)| format!("node {id} has {}", value_of(tables, name)))
            .collect();
        out.push(format!("{name}: {} (majority: {majority})", odd.join("; ")));
    }
    out
}

/// The members whose copy differs, for some table, from the value a strict majority of *all*
/// members hold (with no such majority nobody is marked: the check cannot tell which copy is
/// right).
fn diverged(nodes: &[NodeChecksums]) -> Vec<NodeId> {
    let (answered, names) = answers(nodes);
    let mut out: Vec<NodeId> = Vec::new();
    for name in names {
        let counts = counts(&answered, name);
        let Some((majority, _)) = counts.iter().find(|(_, c)| **c * 2 > nodes.len()) else {
            continue;
        };
        for (id, tables) in &answered {
            if value_of(tables, name) != *majority && !out.contains(id) {
                out.push(*id);
            }
        }
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, tables: &[(&str, i64, &str)]) -> NodeChecksums {
        NodeChecksums {
            node_id: id,
            addr: String::new(),
            tables: Ok(tables
                .iter()
                .map(|(n, r, h)| TableChecksum {
                    name: n.to_string(),
                    rows: *r,
                    hash: h.to_string(),
                })
                .collect()),
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
        assert_eq!(diverged(&nodes), vec![2]);
        // Two of four do not make a majority: nobody is marked.
        let mut four = nodes.clone();
        four.push(node(4, &[("public.a", 4, "z"), ("public.b", 1, "y")]));
        assert!(diverged(&four).is_empty());
    }
}
