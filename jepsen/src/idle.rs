//! The check of the `pg-kill-idle` nemesis: with every workload held still (no operation in
//! flight, see [`crate::common::Quiet`]) the nemesis writes a few rows of its own, SIGKILLs one
//! node's PostgreSQL (the node's supervisor restarts it) and at once reads, at `LINEARIZABLE`
//! from that very node, its own rows and every workload's acknowledged writes ([`Probe`]s).
//! Every write acknowledged before the read began must be visible: PostgreSQL may lose its last
//! commits in the crash (the applier commits with `synchronous_commit = off`), and with no new
//! write to trigger their replay a read that trusts the node's applied index would miss them.
//!
//! Each read is an `idle-read` operation in `history-idle-read.jsonl`; one that lacks an
//! acknowledged write is an anomaly.

use std::collections::BTreeSet;
use std::sync::Arc;

use raftpg_client::v1::Row;
use raftpg_client::values;
use serde_json::Value as Json;

use crate::history::{History, Op};

/// The nemesis's own table: rows written just before each kill.
pub const SCHEMA: &[&str] = &["CREATE TABLE jepsen_idle (round bigint PRIMARY KEY)"];

/// Reads of the nemesis's own rows.
pub const OWN_SQL: &str = "SELECT round FROM jepsen_idle";

/// What to read after a kill for one workload: `sql`'s first column holds one item per row;
/// `acked` lists the items the history acknowledged (the same text as the column shows).
pub struct Probe {
    pub workload: &'static str,
    pub sql: &'static str,
    pub history: Arc<History>,
    pub acked: fn(&[Op]) -> BTreeSet<String>,
}

/// The first column of every row, as text.
pub fn first_column(rows: &[Row]) -> BTreeSet<String> {
    rows.iter()
        .filter_map(|r| r.values.first().map(values::display))
        .collect()
}

/// Acknowledged items absent from `seen`.
pub fn missing<'a>(acked: &'a BTreeSet<String>, seen: &'a BTreeSet<String>) -> Vec<&'a String> {
    acked.difference(seen).collect()
}

/// Checks the idle reads: one anomaly per read that lacked acknowledged writes.
pub fn check(history: &[Op]) -> Vec<String> {
    let mut out = Vec::new();
    for op in history
        .iter()
        .filter(|o| o.f == "idle-read" && o.kind == "ok")
    {
        let v = &op.value;
        let n = v["missing_count"].as_u64().unwrap_or(0);
        if n == 0 {
            continue;
        }
        out.push(format!(
            "node {} lost acknowledged writes across a PostgreSQL crash on an idle cluster: a LINEARIZABLE read {} ms after the kill ({} failed attempts before it; cluster idle: {}) answered at applied index {} (the nemesis's last write before the kill: index {}, node had applied {}) and lacks {n} of {} acknowledged {} writes, e.g. {}",
            v["node"],
            v["read_after_ms"],
            v["failed_attempts"],
            v["idle"],
            v["applied_index"],
            v["probe_index"],
            v["node_applied_before_kill"],
            v["acked"],
            v["workload"].as_str().unwrap_or("?"),
            v["missing"],
        ));
    }
    out
}

/// The value of an `idle-read` completion.
#[allow(clippy::too_many_arguments)]
pub fn read_value(
    node: u64,
    workload: &str,
    acked: &BTreeSet<String>,
    seen: &BTreeSet<String>,
    applied_index: u64,
    probe_index: u64,
    node_applied_before_kill: u64,
    read_after_ms: u64,
    failed_attempts: u32,
    idle: bool,
) -> Json {
    let missing = missing(acked, seen);
    serde_json::json!({
        "node": node,
        "workload": workload,
        "acked": acked.len(),
        "seen": seen.len(),
        "missing_count": missing.len(),
        "missing": missing.iter().take(10).collect::<Vec<_>>(),
        "applied_index": applied_index,
        "probe_index": probe_index,
        "node_applied_before_kill": node_applied_before_kill,
        "read_after_ms": read_after_ms,
        "failed_attempts": failed_attempts,
        "idle": idle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn read(acked: &[&str], seen: &[&str]) -> Op {
        Op {
            kind: "ok".into(),
            process: crate::nemesis::NEMESIS,
            f: "idle-read".into(),
            value: read_value(2, "set", &set(acked), &set(seen), 10, 10, 10, 5, 0, true),
            time: 0,
        }
    }

    #[test]
    fn a_read_that_sees_every_acknowledged_write_passes() {
        assert!(check(&[read(&["1", "2"], &["1", "2", "3"])]).is_empty());
    }

    #[test]
    fn a_read_missing_acknowledged_writes_is_an_anomaly() {
        let out = check(&[read(&["1", "2", "3"], &["1"]), read(&["1"], &["1"])]);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out[0].contains("lacks 2 of 3"), "{}", out[0]);
        assert!(out[0].contains("\"2\""), "{}", out[0]);
    }
}
