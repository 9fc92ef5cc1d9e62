//! Consensus plumbing: everything between "a write was accepted by this node" and "a log entry
//! is committed by a majority", and nothing about SQL.
//!
//! - [`log_store`]: the Raft log in RocksDB (vote, entries, purge point); durable before
//!   acknowledged, and never purged ahead of a durable snapshot.
//! - [`network`]: openraft's RPCs to peers over gRPC.
//! - [`append_check`]: what an incoming AppendEntries must satisfy before openraft sees it.
//! - [`proposer`]: group commit — the leader's concurrent writes share one entry, stamped with
//!   the entry's deterministic time and seed.
//! - [`clock`]: the entry clock; timestamps never go backwards along the log.
//! - [`read_index`]: coalesced leadership confirmations for linearizable reads.
//! - [`snapshot_data`]: a snapshot's metadata and archive as they travel between nodes.
//!
//! Never touches PostgreSQL: what an entry means is the business of [`crate::apply`].

pub mod append_check;
pub mod clock;
pub mod log_store;
pub mod network;
pub mod proposer;
pub mod read_index;
pub mod snapshot_data;
