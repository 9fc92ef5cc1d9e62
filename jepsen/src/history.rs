//! Operation histories in the Jepsen/Elle format: one JSON object per line with `type`
//! (`invoke`, `ok`, `fail`, `info`), `process`, `f`, `value` and `time` (ns since the start).
//!
//! `info` means the outcome is unknown (timeout, lost connection): the operation may or may not
//! have taken effect, and — as in Jepsen — the process that issued it is retired.

use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// One event of a history.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Op {
    /// `invoke`, `ok`, `fail` or `info`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The logical process (client) that issued the operation.
    pub process: u64,
    /// The operation, e.g. `add`, `read`.
    pub f: String,
    /// Its argument or result.
    pub value: serde_json::Value,
    /// Nanoseconds since the test started.
    pub time: u64,
}

/// A history being recorded by concurrent clients.
pub struct History {
    start: Instant,
    ops: Mutex<Vec<Op>>,
}

impl Default for History {
    fn default() -> Self {
        History {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
        }
    }
}

impl History {
    /// Appends an event.
    pub fn push(&self, kind: &str, process: u64, f: &str, value: serde_json::Value) {
        let op = Op {
            kind: kind.to_string(),
            process,
            f: f.to_string(),
            value,
            time: self.start.elapsed().as_nanos() as u64,
        };
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }

    /// The events so far.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The history as JSON lines.
    pub fn to_jsonl(&self) -> String {
        self.ops()
            .iter()
            .filter_map(|o| serde_json::to_string(o).ok())
            .map(|l| l + "\n")
            .collect()
    }
}
