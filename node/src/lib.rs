//! raftpg-node: one member of a raftpg cluster — several PostgreSQL servers that behave as one
//! database. SQL writes become entries of a Raft log kept in RocksDB and are applied in log order
//! to each node's local PostgreSQL. See `docs/architecture.md` for the tour and
//! `../shared/design.md` for the invariants.
//!
//! The write path, through the modules:
//!
//! ```text
//!  client ──gRPC──▶ grpc::write ──▶ service::write ──(follower)──▶ PeerLink ──▶ leader's grpc::write
//!                                   │ limits, sql::gate, route
//!                                   ▼ (leader)
//!                          raft::proposer ──▶ openraft ──▶ raft::log_store (RocksDB, fsync)
//!                                   │                └───▶ raft::network ──▶ followers
//!                                   ▼ committed by a majority, on every node in log order
//!                          apply::state_machine ──▶ apply::applier ──▶ local PostgreSQL
//!                                   │ (leader) the write's outcome
//!                                   ▼
//!  client ◀──gRPC── grpc::write ◀── service::write
//! ```
//!
//! A read: `grpc::read` → `service::read` (consistency wait; `raft::read_index` for
//! linearizable reads) → a `pg::read_pool` connection, one `REPEATABLE READ` snapshot.
//!
//! Modules, in the order a write meets them:
//!
//! - [`grpc`]: the gRPC frontend (decode, call the service layer, encode).
//! - [`wire`]: the PostgreSQL wire protocol frontend (psql, drivers), over the same service
//!   layer.
//! - [`auth`]: who a request comes from (PostgreSQL roles, SCRAM-SHA-256 verifiers).
//! - [`service`]: what a client can do, with no protocol in it: limits, routing to the
//!   leader, proposing and waiting, the consistency levels of reads.
//! - [`sql`]: the leader-side SQL gate and rewrite.
//! - [`raft`]: proposer, log store, peer network, read index.
//! - [`command`]: the log format (what an entry holds) and openraft's type config.
//! - [`apply`]: state machine and applier: committed entries become PostgreSQL transactions.
//! - [`pg`]: the PostgreSQL supervisor, read pool, value codecs and SQLSTATE classes.
//! - [`http`]: the operators' HTTP frontend (Prometheus metrics, health probes);
//!   [`metrics`]: the collectors.
//! - [`server`]: start-up and shutdown wiring; [`config`]: flags and environment; [`tls`]:
//!   the node's certificates.
//!
//! Dependencies go one way (no cycles between files or folders; `tests/module_graph.rs`).

pub mod apply;
pub mod auth;
pub mod command;
pub mod config;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod pg;
pub mod raft;
pub mod server;
pub mod service;
pub mod sql;
pub mod tls;
pub mod wire;
