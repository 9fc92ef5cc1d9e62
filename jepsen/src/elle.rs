//! Elle-style checker for the *list-append* workload (being written; see issue 6).

use crate::history::Op;

/// Checks a list-append history; returns one line per anomaly.
pub fn check(_history: &[Op]) -> Vec<String> {
    Vec::new()
}
