//! The gRPC frontend: the public `Write`, `Read` and `Cluster` services (client port), the
//! node-to-node `Peer` service (peer port, which also serves the public services for requests
//! other nodes forward), and the client side this node uses to reach the others ([`peers`]).
//! Everything on the peer port is authorized by [`peer_auth`]. The client port also serves the
//! standard gRPC health service ([`health`]) and server reflection (grpcurl without the .proto).
//!
//! Thin by rule: a handler decodes its request ([`convert`]), calls the [`crate::service`]
//! layer, and encodes the answer; every [`crate::service::ServiceError`] becomes a status in
//! one place ([`status`]): SQL errors carry their SQLSTATE (metadata `raftpg-sqlstate` and a
//! `SqlError` in the status details); a node that cannot serve says who leads
//! (`raftpg-leader-id`/`-addr`). No decision about a request is taken here.

pub mod auth;
pub mod cluster;
pub mod convert;
pub mod file_stream;
pub mod health;
pub mod peer;
pub mod peer_auth;
pub mod peers;
pub mod read;
pub mod status;
pub mod transaction;
pub mod write;
