//! The *exactly-once* workload: each operation inserts a row naming its request (`rid`) into
//! `eo_log`, a table with **no** uniqueness on `rid`, under an explicit request id. When the
//! outcome is unknown the process is retired and a fresh process retries the *same* request id
//! through a fresh client (up to [`RETRIES`] times), exactly what an application does after a
//! timeout. Only the cluster's request-id deduplication stands between a retry and a second row.
//! Anomalies, per node's final copy: a rid present more than once (applied twice), an
//! acknowledged rid missing, a rid never sent, a rid present whose every attempt definitely
//! failed; nodes that differ.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use raftpg_client::v1::{RequestId, Statement};
use raftpg_client::values;
use serde_json::Value as Json;

use crate::common::{classify, final_reads, Env, Failure, Outcome, Process};
use crate::history::Op;

/// Tables of this workload.
pub const SCHEMA: &[&str] = &["CREATE TABLE eo_log (n bigserial PRIMARY KEY, rid text NOT NULL)"];

/// Retries of a request whose outcome was unknown.
pub const RETRIES: u32 = 3;

/// One client process.
pub async fn client(env: Env, slot: u64) {
    let mut p = Process::new(slot, env.clients);
    let mut client = env.client(slot);
    let client_id = format!("jepsen-eo-{}-{slot}", env.seed);
    let mut seq = 0u64;
    while !env.stopped() {
        let _op = env.op().await;
        seq += 1;
        let rid = format!("{slot}-{seq}");
        let statement = Statement {
            sql: "INSERT INTO eo_log (rid) VALUES ($1)".into(),
            params: vec![values::text(rid.clone())],
        };
        let id = RequestId {
            client_id: client_id.clone(),
            seq,
        };
        for attempt in 0..=RETRIES {
            env.history
                .push("invoke", p.id, "insert", Json::from(rid.clone()));
            match client
                .execute_with_id(vec![statement.clone()], id.clone())
                .await
            {
                Ok(_) => {
                    env.history
                        .push("ok", p.id, "insert", Json::from(rid.clone()));
                    break;
                }
                Err(e) if classify(&e) == Failure::Fail => {
                    env.history.push_error(
                        "fail",
                        p.id,
                        "insert",
                        Json::from(rid.clone()),
                        Some(e.to_string()),
                    );
                    break;
                }
                Err(e) => {
                    env.history.push_error(
                        "info",
                        p.id,
                        "insert",
                        Json::from(rid.clone()),
                        Some(e.to_string()),
                    );
                    p.retire();
                    client = env.client(slot + attempt as u64 + 1);
                    if env.stopped() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    }
}

/// Acknowledged request ids (for the idle reads of the pg-kill-idle nemesis).
pub fn acked(ops: &[Op]) -> BTreeSet<String> {
    ops.iter()
        .filter(|o| o.f == "insert" && o.kind == "ok")
        .filter_map(|o| o.value.as_str().map(str::to_string))
        .collect()
}

/// Checks a history against each node's final copy (rid → number of rows).
pub fn check(history: &[Op], finals: &BTreeMap<u64, BTreeMap<String, usize>>) -> Vec<String> {
    let mut sent = BTreeSet::new();
    let mut acked = BTreeSet::new();
    let mut maybe = BTreeSet::new(); // some attempt ok or info
    for op in history.iter().filter(|o| o.f == "insert") {
        let Some(rid) = op.value.as_str() else {
            continue;
        };
        match op.kind.as_str() {
            "invoke" => {
                sent.insert(rid.to_string());
            }
            "ok" => {
                acked.insert(rid.to_string());
                maybe.insert(rid.to_string());
            }
            "info" => {
                maybe.insert(rid.to_string());
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (node, copy) in finals {
        let twice: Vec<_> = copy.iter().filter(|(_, n)| **n > 1).take(5).collect();
        if !twice.is_empty() {
            out.push(format!(
                "node {node}: requests applied more than once (rid, rows), e.g. {twice:?}"
            ));
        }
        let lost: Vec<_> = acked
            .iter()
            .filter(|r| !copy.contains_key(*r))
            .take(5)
            .collect();
        if !lost.is_empty() {
            out.push(format!(
                "node {node}: acknowledged requests missing, e.g. {lost:?}"
            ));
        }
        let phantom: Vec<_> = copy.keys().filter(|r| !sent.contains(*r)).take(5).collect();
        if !phantom.is_empty() {
            out.push(format!(
                "node {node}: rows of requests never sent, e.g. {phantom:?}"
            ));
        }
        let failed: Vec<_> = copy
            .keys()
            .filter(|r| sent.contains(*r) && !maybe.contains(*r))
            .take(5)
            .collect();
        if !failed.is_empty() {
            out.push(format!(
                "node {node}: requests that failed are present, e.g. {failed:?}"
            ));
        }
    }
    let mut copies = finals.iter();
    if let Some((n0, c0)) = copies.next() {
        for (n, c) in copies {
            if c != c0 {
                out.push(format!(
                    "nodes {n0} and {n} diverge: {} vs {} requests",
                    c0.len(),
                    c.len()
                ));
            }
        }
    }
    out
}

/// Reads every node's copy and checks the history.
pub async fn check_run(
    env: &Env,
    admin: &raftpg_client::Client,
    marker: u64,
) -> anyhow::Result<Outcome> {
    let rows = final_reads(admin, env.addrs.len(), "SELECT rid FROM eo_log", marker).await?;
    let finals = rows
        .into_iter()
        .map(|(node, rows)| {
            let mut copy: BTreeMap<String, usize> = BTreeMap::new();
            for r in &rows {
                if let Some(rid) = values::as_str(&r.values[0]) {
                    *copy.entry(rid.to_string()).or_default() += 1;
                }
            }
            (node, copy)
        })
        .collect();
    let ops = env.history.ops();
    let lines = check(&ops, &finals);
    Ok(Outcome::of(&ops, lines))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: &str, rid: &str) -> Op {
        Op {
            kind: kind.into(),
            process: 0,
            f: "insert".into(),
            value: rid.into(),
            time: 0,
        }
    }

    fn history() -> Vec<Op> {
        // a: ok; b: info then retried ok; c: info only; d: failed.
        [
            ("invoke", "a"),
            ("ok", "a"),
            ("invoke", "b"),
            ("info", "b"),
            ("invoke", "b"),
            ("ok", "b"),
            ("invoke", "c"),
            ("info", "c"),
            ("invoke", "d"),
            ("fail", "d"),
        ]
        .iter()
        .map(|(k, r)| op(k, r))
        .collect()
    }

    fn copy(rids: &[(&str, usize)]) -> BTreeMap<String, usize> {
        rids.iter().map(|(r, n)| (r.to_string(), *n)).collect()
    }

    #[test]
    fn a_correct_history_passes() {
        let f = BTreeMap::from([
            (1, copy(&[("a", 1), ("b", 1)])),
            (2, copy(&[("a", 1), ("b", 1)])),
        ]);
        assert!(check(&history(), &f).is_empty());
        let f = BTreeMap::from([(1, copy(&[("a", 1), ("b", 1), ("c", 1)]))]);
        assert!(
            check(&history(), &f).is_empty(),
            "an unknown request may be applied"
        );
    }

    #[test]
    fn double_applies_and_losses_are_caught() {
        let twice = BTreeMap::from([(1, copy(&[("a", 1), ("b", 2)]))]);
        assert!(check(&history(), &twice)[0].contains("more than once"));
        let lost = BTreeMap::from([(1, copy(&[("a", 1)]))]);
        assert!(check(&history(), &lost)[0].contains("missing"));
        let phantom = BTreeMap::from([(1, copy(&[("a", 1), ("b", 1), ("z", 1)]))]);
        assert!(check(&history(), &phantom)[0].contains("never sent"));
        let failed = BTreeMap::from([(1, copy(&[("a", 1), ("b", 1), ("d", 1)]))]);
        assert!(check(&history(), &failed)[0].contains("failed"));
        let diverged = BTreeMap::from([
            (1, copy(&[("a", 1), ("b", 1)])),
            (2, copy(&[("a", 1), ("b", 1), ("c", 1)])),
        ]);
        assert!(check(&history(), &diverged)[0].contains("diverge"));
    }
}
