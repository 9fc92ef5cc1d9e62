//! The *set* workload and its checker: clients add unique integers (one INSERT each, through the
//! write API with request ids); at the end every node's copy is read. Anomalies:
//! - **lost**: an add acknowledged `ok` is missing from a node's copy;
//! - **phantom**: a value present that no process ever tried to add;
//! - **failed-but-present**: an add that definitely failed (`fail`) is present;
//! - **divergent**: two nodes hold different sets.
//!
//! `info` adds (outcome unknown) may or may not be present.

use std::collections::{BTreeMap, BTreeSet};

use crate::history::Op;

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
pub fn check(history: &[Op], finals: &BTreeMap<u64, BTreeSet<i64>>) -> SetResult {
    let mut attempted = BTreeSet::new();
    let (mut ok, mut fail, mut info) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for op in history.iter().filter(|o| o.f == "add") {
        let Some(v) = op.value.as_i64() else { continue };
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
    for (node, set) in finals {
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
                    "nodes {first_node} and {node} diverge: {} vs {} values",
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

    fn op(kind: &str, v: i64) -> Op {
        Op {
            kind: kind.into(),
            process: 0,
            f: "add".into(),
            value: v.into(),
            time: 0,
        }
    }

    fn history() -> Vec<Op> {
        vec![
            op("invoke", 1),
            op("ok", 1),
            op("invoke", 2),
            op("info", 2),
            op("invoke", 3),
            op("fail", 3),
        ]
    }

    #[test]
    fn a_correct_history_has_no_anomaly() {
        let finals = BTreeMap::from([(1, BTreeSet::from([1, 2])), (2, BTreeSet::from([1, 2]))]);
        assert!(check(&history(), &finals).anomalies.is_empty());
        let finals = BTreeMap::from([(1, BTreeSet::from([1])), (2, BTreeSet::from([1]))]);
        assert!(
            check(&history(), &finals).anomalies.is_empty(),
            "an info add may be absent"
        );
    }

    #[test]
    fn known_bad_histories_are_caught() {
        let lost = BTreeMap::from([(1, BTreeSet::from([2]))]);
        assert!(check(&history(), &lost).anomalies[0].contains("lost"));
        let phantom = BTreeMap::from([(1, BTreeSet::from([1, 99]))]);
        assert!(check(&history(), &phantom).anomalies[0].contains("phantom"));
        let failed = BTreeMap::from([(1, BTreeSet::from([1, 3]))]);
        assert!(check(&history(), &failed).anomalies[0].contains("failed"));
        let diverged = BTreeMap::from([(1, BTreeSet::from([1, 2])), (2, BTreeSet::from([1]))]);
        assert!(check(&history(), &diverged)
            .anomalies
            .iter()
            .any(|a| a.contains("diverge")));
    }
}
