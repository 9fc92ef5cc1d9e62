//! The fuzz corpus as a regression test (issue 16): every input committed under
//! `node/fuzz/corpus/<target>/` goes through the same code as the fuzz target
//! (`node/fuzz/fuzz_targets/common.rs`, included below), on stable, in seconds. A panic is a
//! regression. The corpus is grown by `cargo +nightly fuzz run` and minimized with
//! `cargo fuzz cmin` (docs/security.md, "Fuzzing").

use std::path::PathBuf;

#[path = "../fuzz/fuzz_targets/common.rs"]
mod common;

/// Feeds each file of `corpus/<target>` to `run`; returns how many there were.
fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a corpus entry").path())
        .collect();
    files.sort();
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{target}: {} panicked", f.display());
    }
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    files.len()
}

#[test]
fn sql_gate_corpus() {
    replay("sql_gate", common::sql_gate);
}

#[test]
fn proto_decode_corpus() {
    replay("proto_decode", common::proto_decode);
}

#[test]
fn raft_decode_corpus() {
    replay("raft_decode", common::raft_decode);
}

#[test]
fn values_corpus() {
    replay("values", common::values);
}

#[test]
fn wire_messages_corpus() {
    replay("wire_messages", common::wire_messages);
}

/// Finding F1 of the fuzzing (docs/security.md, fixed by `command::float8`): a float8
/// parameter (or result) that is NaN or ±Infinity was serialized into the log (and the request
/// log) as JSON `null`, which did not decode back: the entry could not be read from the log
/// store nor decoded by a follower.
#[test]
fn non_finite_float_survives_the_log() {
    use raftpg_node::command::SqlValue;
    for f in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let json = serde_json::to_vec(&SqlValue::Float64(f)).expect("encodes");
        let back: Result<SqlValue, _> = serde_json::from_slice(&json);
        assert!(
            matches!(back, Ok(SqlValue::Float64(g)) if g.to_bits() == f.to_bits() || (g.is_nan() && f.is_nan())),
            "{f} in the log: {} decodes as {back:?}",
            String::from_utf8_lossy(&json)
        );
    }
}
