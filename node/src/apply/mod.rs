//! The apply path: committed log entries become PostgreSQL transactions, in log order, the same
//! on every node.
//!
//! - [`state_machine`]: openraft's state machine; takes committed entries in order, hands them
//!   to the applier, answers the waiting writes, builds and installs snapshots.
//! - [`applier`]: the one PostgreSQL session that applies entries (savepoint per write,
//!   deterministic inputs, exactly-once check, `raftpg.end_write`).
//! - [`request_log`]: outcomes of requests with a request id (exactly-once retries).
//! - [`checksums`]: per-table checksums at one log position (`raftpg check`).
//! - [`roles`]: the user roles' state, recorded with every batch so that it travels with
//!   snapshots, and made this node's roles after an install.
//! - [`limits`]: the apply path's limits.
//! - [`snapshot`]: `pg_dump` snapshots, their transfer and restore, and the purge limit.
//! - [`restore`]: seeding a new node from a backup (`--restore-from`).
//!
//! Keeps design.md invariants 1 (the applied index commits with the effects, so a crash
//! resumes exactly after the last applied entry), 2 (same entries, same order, same result:
//! one applier session with fixed settings) and 3 (a deterministic error is the write's result,
//! an environmental one is retried and never recorded), and exactly-once retries. Never decides
//! whether SQL may enter the log (that is [`crate::sql`], on the leader, before proposing).

pub mod applier;
pub mod checksums;
pub mod limits;
pub mod request_log;
pub mod restore;
pub mod roles;
pub mod snapshot;
pub mod state_machine;
