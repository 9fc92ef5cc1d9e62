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
    /// Why ops failed, by position in `ops` (written as Jepsen's `error` key).
    errors: Mutex<Vec<(usize, String)>>,
}

impl Default for History {
    fn default() -> Self {
        History {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
        }
    }
}

impl History {
    /// Appends an event.
    pub fn push(&self, kind: &str, process: u64, f: &str, value: serde_json::Value) {
        self.push_error(kind, process, f, value, None)
    }

    /// Appends an event with the error that ended it.
    pub fn push_error(
        &self,
        kind: &str,
        process: u64,
        f: &str,
        value: serde_json::Value,
        error: Option<String>,
    ) {
        let op = Op {
            kind: kind.to_string(),
            process,
            f: f.to_string(),
            value,
            time: self.start.elapsed().as_nanos() as u64,
        };
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = error {
            let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
            errors.push((ops.len(), e));
        }
        ops.push(op);
    }

    /// The events so far.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The history as JSON lines.
    pub fn to_jsonl(&self) -> String {
        let errors: std::collections::HashMap<usize, String> = self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        let mut out = String::new();
        for (i, op) in self.ops().iter().enumerate() {
            let Ok(mut v) = serde_json::to_value(op) else {
                continue;
            };
            if let (Some(e), Some(obj)) = (errors.get(&i), v.as_object_mut()) {
                obj.insert("error".into(), e.clone().into());
            }
            out.push_str(&v.to_string());
            out.push('\n');
        }
        out
    }
}
