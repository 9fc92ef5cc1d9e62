//! The *set* workload and its checker: clients add unique integers through every node (one
//! `INSERT ... RETURNING id` each, with a `bigserial` id, through the write API with request ids);
//! at the end every node's copy is read. Anomalies:
//! - **lost**: an add acknowledged `ok` is missing from a node's copy;
//! - **phantom**: a value present that no process ever tried to add;
//! - **failed-but-present**: an add that definitely failed (`fail`) is present;
//! - **id mismatch**: the serial id a node holds for a value differs from the id the
//!   acknowledgement returned (ids must be identical everywhere);
//! - **divergent**: two nodes hold different sets or ids.
//!
//! `info` adds (outcome unknown) may or may not be present.

use std::collections::{BTreeMap, BTreeSet};

use raftpg_client::values;

use crate::common::{complete_write, final_reads, Env, Outcome, Process};
use crate::history::Op;

/// Tables of this workload.
pub const SCHEMA: &[&str] =
    &["CREATE TABLE set_items (id bigserial PRIMARY KEY, v bigint NOT NULL UNIQUE)"];

/// One client process: adds `slot * 10^9 + n` for n = 1, 2, ...
pub async fn client(env: Env, slot: u64) {
    let mut p = Process::new(slot, env.clients);
    let mut client = env.client(slot);
    let mut n: i64 = 0;
    while !env.stopped() {
        let _op = env.op().await;
        n += 1;
        let v = (slot as i64) * 1_000_000_000 + n;
        env.history.push("invoke", p.id, "add", v.into());
        let r = client
            .execute_one(
                "INSERT INTO set_items (v) VALUES ($1) RETURNING id",
                vec![values::int(v)],
            )
            .await;
        if complete_write(&env, &mut p, "add", v.into(), r, |r| {
            let id = r
                .results
                .first()
                .and_then(|s| s.rows.first())
                .and_then(|row| row.values.first())
                .and_then(values::as_i64);
            serde_json::json!([v, id])
        }) {
            client = env.client(slot);
        }
    }
}

/// Values of acknowledged adds (for the idle reads of the pg-kill-idle nemesis).
pub fn acked(ops: &[Op]) -> BTreeSet<String> {
    ops.iter()
        .filter(|o| o.f == "add" && o.kind == "ok")
        .filter_map(|o| o.value.get(0).and_then(|v| v.as_i64()))
        .map(|v| v.to_string())
        .collect()
}

/// Reads every node's copy and checks the history against them.
pub async fn check_run(
    env: &Env,
    admin: &raftpg_client::Client,
    marker: u64,
) -> anyhow::Result<Outcome> {
    let rows = final_reads(
        admin,
        env.addrs.len(),
        "SELECT v, id FROM set_items",
        marker,
    )
    .await?;
    let finals = rows
        .into_iter()
        .map(|(node, rows)| {
            let set = rows
                .iter()
                .filter_map(|r| {
                    Some((values::as_i64(&r.values[0])?, values::as_i64(&r.values[1])?))
                })
                .collect();
            (node, set)
        })
        .collect();
    let ops = env.history.ops();
    let r = check(&ops, &finals);
    Ok(Outcome::of(&ops, r.anomalies))
}

/// What the checker found.
#[derive(Debug, Default, PartialEq)]
pub struct SetResult {
    /// Adds by outcome.
    pub ok: usize,
    /// Definitely failed adds.
    pub fail: usize,
    /// Adds with unknown outcome.
    pub info: usize,
    /// One line per anomaly.
    pub anomalies: Vec<String>,
}

/// Checks a set history against the final contents of each node.
pub fn check(history: &[Op], finals: &BTreeMap<u64, BTreeMap<i64, i64>>) -> SetResult {
    let mut attempted = BTreeSet::new();
    let (mut ok, mut fail, mut info) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let mut ids = BTreeMap::new();
    for op in history.iter().filter(|o| o.f == "add") {
        let (v, id) = match &op.value {
            serde_json::Value::Array(a) => (
                a.first().and_then(|v| v.as_i64()),
                a.get(1).and_then(|v| v.as_i64()),
            ),
            v => (v.as_i64(), None),
        };
        let Some(v) = v else { continue };
        if let (Some(id), "ok") = (id, op.kind.as_str()) {
            ids.insert(v, id);
        }
        match op.kind.as_str() {
            "invoke" => {
                attempted.insert(v);
            }
            "ok" => {
                ok.insert(v);
            }
            "fail" => {
                fail.insert(v);
            }
            "info" => {
                info.insert(v);
            }
            _ => {}
        }
    }
    let mut anomalies = Vec::new();
    for (node, copy) in finals {
        let set: &BTreeSet<i64> = &copy.keys().copied().collect();
        let mismatched: Vec<_> = ids
            .iter()
            .filter_map(|(v, id)| {
                copy.get(v)
                    .filter(|held| *held != id)
                    .map(|held| (v, id, held))
            })
            .take(5)
            .collect();
        if !mismatched.is_empty() {
            anomalies.push(format!(
                "node {node}: ids differ from the acknowledged ones (value, acked id, held id), e.g. {mismatched:?}"
            ));
        }
        let lost: Vec<_> = ok.difference(set).take(5).collect();
        if !lost.is_empty() {
            anomalies.push(format!(
                "node {node}: lost acknowledged adds, e.g. {lost:?}"
            ));
        }
        let phantom: Vec<_> = set.difference(&attempted).take(5).collect();
        if !phantom.is_empty() {
            anomalies.push(format!(
                "node {node}: phantom values never added, e.g. {phantom:?}"
            ));
        }
        let resurrected: Vec<_> = fail.intersection(set).take(5).collect();
        if !resurrected.is_empty() {
            anomalies.push(format!(
                "node {node}: adds that failed are present, e.g. {resurrected:?}"
            ));
        }
    }
    let mut sets = finals.iter();
    if let Some((first_node, first)) = sets.next() {
        for (node, set) in sets {
            if set != first {
                anomalies.push(format!(
                    "nodes {first_node} and {node} diverge: {} vs {} values (or different ids)",
                    first.len(),
                    set.len()
                ));
            }
        }
    }
    SetResult {
        ok: ok.len(),
        fail: fail.len(),
        info: info.len(),
        anomalies,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: &str, value: serde_json::Value) -> Op {
        Op {
            kind: kind.into(),
            process: 0,
            f: "add".into(),
            value,
            time: 0,
        }
    }

    /// 1 acknowledged with id 10, 2 unknown, 3 failed.
    fn history() -> Vec<Op> {
        vec![
            op("invoke", 1.into()),
            op("ok", serde_json::json!([1, 10])),
            op("invoke", 2.into()),
            op("info", 2.into()),
            op("invoke", 3.into()),
            op("fail", 3.into()),
        ]
    }

    fn copy(pairs: &[(i64, i64)]) -> BTreeMap<i64, i64> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn a_correct_history_has_no_anomaly() {
        let finals = BTreeMap::from([
            (1, copy(&[(1, 10), (2, 11)])),
            (2, copy(&[(1, 10), (2, 11)])),
        ]);
        assert!(check(&history(), &finals).anomalies.is_empty());
        let finals = BTreeMap::from([(1, copy(&[(1, 10)])), (2, copy(&[(1, 10)]))]);
        assert!(
            check(&history(), &finals).anomalies.is_empty(),
            "an info add may be absent"
        );
    }

    #[test]
    fn known_bad_histories_are_caught() {
        let lost = BTreeMap::from([(1, copy(&[(2, 11)]))]);
        assert!(check(&history(), &lost).anomalies[0].contains("lost"));
        let phantom = BTreeMap::from([(1, copy(&[(1, 10), (99, 12)]))]);
        assert!(check(&history(), &phantom).anomalies[0].contains("phantom"));
        let failed = BTreeMap::from([(1, copy(&[(1, 10), (3, 11)]))]);
        assert!(check(&history(), &failed).anomalies[0].contains("failed"));
        let wrong_id = BTreeMap::from([(1, copy(&[(1, 11)]))]);
        assert!(check(&history(), &wrong_id).anomalies[0].contains("ids differ"));
        let diverged = BTreeMap::from([(1, copy(&[(1, 10), (2, 11)])), (2, copy(&[(1, 10)]))]);
        assert!(check(&history(), &diverged)
            .anomalies
            .iter()
            .any(|a| a.contains("diverge")));
        let diverged_ids = BTreeMap::from([
            (1, copy(&[(1, 10), (2, 11)])),
            (2, copy(&[(1, 10), (2, 12)])),
        ]);
        assert!(check(&history(), &diverged_ids)
            .anomalies
            .iter()
            .any(|a| a.contains("diverge")));
    }
}
