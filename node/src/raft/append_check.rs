//! The checks an incoming AppendEntries must pass before openraft sees it (openraft 0.9
//! asserted these properties instead of checking them, and its core stopped when an assertion
//! failed; they stay checked here whatever the version does). Used by the peer service and by the `raft_decode` fuzz target.

use openraft::raft::AppendEntriesRequest;

use crate::command::TypeConfig;

/// Why an AppendEntries was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed AppendEntries: {0}")]
pub struct MalformedAppend(pub &'static str);

/// Refuses an AppendEntries that no correct leader sends and that openraft 0.9 does not check
/// itself (it asserts them, and its core stops when the assertion fails): entries that do not
/// follow `prev_log_id` one index after another, or whose terms go backwards or beyond the
/// sender's vote.
pub fn check_append_entries(rpc: &AppendEntriesRequest<TypeConfig>) -> Result<(), MalformedAppend> {
    let malformed = MalformedAppend;
    let first_index = rpc.prev_log_id.map_or(0, |l| l.index + 1);
    let mut last_term = rpc.prev_log_id.map_or(0, |l| l.leader_id.term);
    for (index, e) in (first_index..).zip(&rpc.entries) {
        if e.log_id.index != index {
            return Err(malformed(
                "entries do not follow prev_log_id one index after another",
            ));
        }
        let term = e.log_id.leader_id.term;
        if term < last_term || term > rpc.vote.leader_id().term {
            return Err(malformed(
                "entry terms go backwards or beyond the sender's vote",
            ));
        }
        last_term = term;
    }
    Ok(())
}
