//! Linearizability checker for the *register* workload (being written; see issue 6).

use crate::history::Op;

/// Checks a register history; returns one line per anomaly.
pub fn check(_history: &[Op]) -> Vec<String> {
    Vec::new()
}
