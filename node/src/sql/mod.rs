//! The SQL gate, on the leader before anything enters the log: which statements may be
//! replicated (their effects must be the same on every node) and the rewrites that make them so.
//!
//! - [`catalog`]: every function PostgreSQL and the allowed extensions ship, classified
//!   (`functions.tsv`): what writes and reads may call.
//! - [`gate`]: parses each write, refuses what could diverge or escape (per-node state,
//!   session settings, raftpg's own schema), and rewrites non-deterministic calls into the
//!   entry's deterministic inputs.
//! - [`refusal`]: why a statement was refused (SQLSTATE and message).
//! - [`roles`]: role statements — passwords become SCRAM-SHA-256 verifiers here; no
//!   superusers; raftpg's own and PostgreSQL's predefined roles are out of reach.
//! - [`time_literals`]: `'now'`, `'today'`, … become explicit casts of the entry's time.
//! - [`session_rules`]: the settings a write may change and the guard functions the applier
//!   installs to check, at each write's end, that nothing else changed.
//!
//! Pure functions of the SQL text (plus the allowlists): no I/O, no Raft, no PostgreSQL
//! connection.

pub mod catalog;
pub mod gate;
pub mod refusal;
pub mod roles;
pub mod session_rules;
pub mod time_literals;
