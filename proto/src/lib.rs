//! The `raftpg.v1` wire protocol: the public `Write`, `Read` and `Cluster` services and the
//! node-to-node `Peer` service. Generated from `raftpg/v1/raftpg.proto`.

pub mod backup;
pub mod codec;
pub mod identity;
pub mod metadata;

/// Generated code for package `raftpg.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("raftpg.v1");

    /// The encoded `FileDescriptorSet` of `raftpg.v1`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("raftpg_descriptor");
}

/// gRPC metadata key carrying the SQLSTATE of an error (e.g. `23505`).
pub const SQLSTATE_METADATA: &str = "raftpg-sqlstate";
/// gRPC metadata key carrying the log index at which a write was decided.
pub const LOG_INDEX_METADATA: &str = "raftpg-log-index";
/// gRPC metadata key carrying the id of the node believed to lead.
pub const LEADER_ID_METADATA: &str = "raftpg-leader-id";
/// gRPC metadata key carrying the public address of the node believed to lead.
pub const LEADER_ADDR_METADATA: &str = "raftpg-leader-addr";
/// gRPC metadata key set on a request that a follower forwarded to the leader (prevents
/// loops); honoured only on the peer port.
pub const FORWARDED_METADATA: &str = "raftpg-forwarded";

/// gRPC metadata key carrying the name of the role a client authenticates as.
pub const USER_METADATA: &str = "raftpg-user";
/// gRPC metadata key carrying that role's password (only over TLS: the client refuses to send
/// it in plaintext unless told to). Values that are not printable ASCII travel as binary
/// metadata (`metadata`).
pub const PASSWORD_METADATA: &str = "raftpg-password";
/// gRPC metadata key with which a node forwarding a request names the role it authenticated
/// (honoured only on the peer port, from a member's certificate).
pub const PRINCIPAL_METADATA: &str = "raftpg-principal";
/// gRPC metadata key set to `1` with [`PRINCIPAL_METADATA`] when that role administers the
/// cluster.
pub const PRINCIPAL_ADMIN_METADATA: &str = "raftpg-principal-admin";

/// PostgreSQL's `server_version_num` as PostgreSQL writes its version: `150018` → `15.18`,
/// `90624` → `9.6.24` (shared by the node's `server_version` and the CLI's status).
pub fn pg_version_words(num: u32) -> String {
    match num {
        n if n >= 100_000 => format!("{}.{}", n / 10_000, n % 10_000),
        n => format!("{}.{}.{}", n / 10_000, n / 100 % 100, n % 100),
    }
}
