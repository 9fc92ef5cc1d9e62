//! What a SQLSTATE means to raftpg: whether an error is the write's own (the same on every
//! node, recorded as its outcome) or this node's environment (retried, never recorded), and
//! raftpg's own codes.

/// SQLSTATE raised by the entry setup for a live duplicate request id: the entry stops before
/// any of its statements runs, on every node alike.
pub const DUPLICATE_SQLSTATE: &str = "RP001";

/// SQLSTATE raised by `raftpg.end_write` when a write left the session changed (a setting, the
/// role, a temporary table): the write's result, on every node alike.
pub const SESSION_CHANGED_SQLSTATE: &str = "RP002";

/// Whether a SQLSTATE is raised the same way on every node for the same entry and state.
/// Unknown classes are treated as environmental: retrying is safe, recording is not.
///
/// Deterministic: data (22), integrity (23), syntax and access (42), PL/pgSQL conditions (20
/// case not found, 24/34 cursors, P0), invalid transaction state (25, e.g. `VACUUM` inside a
/// function; except 25P02/25P03, which only follow another error or a timeout), the other
/// classes a statement raises from its own input, and `XX000` (PostgreSQL's "should not
/// happen" errors: reachable from odd input, e.g. `interval(interval '1 day', 77)`, and then
/// the same on every node; node-local corruption has codes of its own, XX001/XX002, which stay
/// environmental). Environmental: connection (08), resources (53), operator intervention and
/// cancels (57), system (58), configuration (F0), corruption (XX001, XX002), transaction
/// rollbacks (40: deadlocks and serialization failures depend on concurrent readers).
pub fn is_deterministic(code: &str) -> bool {
    const CLASSES: [&str; 25] = [
        "09", "0A", "0B", "0F", "0L", "0P", "0Z", "20", "21", "22", "23", "24", "25", "26", "27",
        "2B", "2D", "2F", "34", "38", "39", "3B", "3D", "3F", "42",
    ];
    const MORE_CLASSES: [&str; 3] = ["44", "54", "P0"];
    const CODES: [&str; 3] = ["55000", "XX000", SESSION_CHANGED_SQLSTATE];
    const NOT: [&str; 2] = ["25P02", "25P03"];
    !NOT.contains(&code)
        && (CLASSES
            .iter()
            .chain(&MORE_CLASSES)
            .any(|c| code.starts_with(c))
            || CODES.contains(&code))
}

#[cfg(test)]
mod tests {
    #[test]
    fn deterministic_classes() {
        for code in [
            "23503", "22012", "42P01", "P0001", "20000", "24000", "25001", "RP002", "55000",
            "0A000", "XX000",
        ] {
            assert!(super::is_deterministic(code), "{code}");
        }
        for code in [
            "08006", "53100", "57014", "58030", "XX001", "XX002", "40P01", "40001", "25P02",
            "25P03", "55P03", "F0000",
        ] {
            assert!(!super::is_deterministic(code), "{code}");
        }
    }
}
