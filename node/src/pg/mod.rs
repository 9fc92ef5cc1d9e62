//! This node's PostgreSQL: starting and supervising it, the read connections, and how its
//! values and errors are understood.
//!
//! - [`supervisor`]: the embedded PostgreSQL (initdb, start, restart on crash, stop) or the
//!   endpoints of an external one.
//! - [`describe`]: what PostgreSQL infers for a statement (`Describe`).
//! - [`read_pool`]: bounded pool of read-only connections (role `raftpg_reader`).
//! - [`values`]: SQL values as they travel in the log and in results.
//! - [`results`]: result columns of every type (decoded, or printed as text by PostgreSQL).
//! - [`sqlstate`]: which errors are a write's own and which are this node's environment.
//!
//! Knows nothing of Raft; never writes user data (only the applier does, in log order).

pub mod describe;
pub mod read_pool;
pub mod results;
pub mod sqlstate;
pub mod supervisor;
pub mod values;
