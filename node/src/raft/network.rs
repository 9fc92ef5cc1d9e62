//! The Raft transport: openraft RPCs to other nodes over gRPC (`raftpg.v1.Raft`).
//!
//! Owns one lazily connected tonic channel per target node. Each RPC is bounded by openraft's
//! `hard_ttl`. Payloads are openraft's own serde types encoded as JSON; the receiving side is
//! `grpc::raft`. Transport failures are reported as `Unreachable` (openraft backs off) and the
//! remote's Raft errors as `RemoteError`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::command::NodeAddr;
use crate::raft::snapshot_data::{SnapMeta, Snapshot, SnapshotFile};
use openraft::error::{
    NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::VoteOf;
use raftpg_proto::v1::peer_client::PeerClient;
use raftpg_proto::v1::RaftMessage;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::command::{NodeId, TypeConfig};

/// Largest Raft message accepted or sent (entries are bounded by the write request limit).
pub const RAFT_MESSAGE_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Builds connections to peers.
#[derive(Clone, Default)]
pub struct Network {
    /// The node's channels to its peers.
    pub channels: PeerChannels,
}

/// One HTTP/2 channel per peer address, shared by everything that talks to peers (replication,
/// heartbeats, openraft's leadership checks for linearizable reads — which ask for a new
/// client each time —, forwarding, read index). A channel that hit a transport error is
/// forgotten, so the next call reconnects.
#[derive(Clone, Default)]
pub struct PeerChannels {
    /// Local address connections are bound to (see [`channel`]).
    source: Option<IpAddr>,
    /// TLS settings of connections to peers (`None`: plaintext).
    tls: Option<ClientTlsConfig>,
    cache: Arc<Mutex<HashMap<String, Channel>>>,
}

impl PeerChannels {
    /// Channels whose connections leave from `source`, over TLS with `tls` when given.
    pub fn new(source: Option<IpAddr>, tls: Option<ClientTlsConfig>) -> Self {
        PeerChannels {
            source,
            tls,
            cache: Default::default(),
        }
    }

    /// The channel to `addr` (created lazily, then shared).
    pub fn get(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(addr) {
            return Ok(c.clone());
        }
        let ch = channel(addr, self.source, self.tls.clone())?;
        cache.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// Drops the channel to `addr` after transport trouble.
    pub fn forget(&self, addr: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(addr);
    }
}

/// A connection to one peer.
pub struct PeerConnection {
    target: NodeId,
    addr: String,
    channels: PeerChannels,
    client: Option<PeerClient<Channel>>,
}

/// Opens a lazy channel to a node's gRPC address. With `source`, the connection's local end is
/// bound to that address (the node's own listen address), so that traffic between two nodes
/// carries both nodes' addresses — which is what lets network faults be injected between
/// nodes that share one host (see jepsen/).
pub fn channel(
    addr: &str,
    source: Option<IpAddr>,
    tls: Option<ClientTlsConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(endpoint
        .local_address(source)
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddr) -> PeerConnection {
        PeerConnection {
            target,
            addr: node.peer.clone(),
            channels: self.channels.clone(),
            client: None,
        }
    }
}

/// Why an RPC to a peer did not get an answer.
#[derive(Debug, thiserror::Error)]
enum TransportError {
    /// The peer's address is not a valid endpoint.
    #[error("bad address {addr}: {source}")]
    BadAddress {
        addr: String,
        source: tonic::transport::Error,
    },
    /// The RPC took longer than openraft's `hard_ttl` plus the time its size allows for.
    #[error("{kind:?} to node {target} timed out after {after:?}")]
    TimedOut {
        kind: RpcKind,
        target: NodeId,
        after: Duration,
    },
    /// The call failed (connection refused or lost, or an error status from the peer).
    #[error("node {target} at {addr}: {status}")]
    Status {
        target: NodeId,
        addr: String,
        status: tonic::Status,
    },
}

impl PeerConnection {
    fn client(&mut self) -> Result<PeerClient<Channel>, TransportError> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let ch = self
            .channels
            .get(&self.addr)
            .map_err(|source| TransportError::BadAddress {
                addr: self.addr.clone(),
                source,
            })?;
        let client = PeerClient::new(ch)
            .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Sends one RPC and decodes the peer's answer, `Result<Resp, E>` as JSON. A transport
    /// failure, and an error the peer answered with, are `Unreachable` (openraft backs off).
    async fn call<Resp, E>(
        &mut self,
        kind: RpcKind,
        payload: Vec<u8>,
        data: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned + 'static,
    {
        let unreachable = |e: TransportError| RPCError::Unreachable(Unreachable::new(&e));
        let mut client = self.client().map_err(unreachable)?;
        let ttl = option.hard_ttl() + transfer_allowance(payload.len() + data.len());
        let msg = RaftMessage { payload, data };
        let fut = async {
            match kind {
                RpcKind::Append => client.append_entries(msg).await,
                RpcKind::Vote => client.vote(msg).await,
                RpcKind::Snapshot => client.install_snapshot(msg).await,
            }
        };
        let reply = match tokio::time::timeout(ttl, fut).await {
            Err(_) => {
                return Err(RPCError::Network(NetworkError::new(
                    &TransportError::TimedOut {
                        kind,
                        target: self.target,
                        after: ttl,
                    },
                )))
            }
            Ok(Err(status)) => {
                // Drop the channel on transport trouble so that the next call reconnects.
                self.client = None;
                self.channels.forget(&self.addr);
                return Err(unreachable(TransportError::Status {
                    target: self.target,
                    addr: self.addr.clone(),
                    status,
                }));
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let result: Result<Resp, E> = serde_json::from_slice(&reply.payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))
    }
}

/// The slowest link between nodes an RPC's time limit allows for (≈ 32 Mbit/s): openraft bounds
/// every AppendEntries by the heartbeat interval, which a large entry cannot meet on a real
/// network (4 MiB take ≈ 0.3 s at 100 Mbit/s) — it would be sent again and again, and nothing
/// after it would ever commit.
const LINK_BYTES_PER_SEC_MIN: f64 = 4.0 * 1024.0 * 1024.0;

/// Time added to openraft's limit of an RPC of `bytes`: the time to move them over the slowest
/// link allowed for, and as long again for the receiver to decode and store them.
fn transfer_allowance(bytes: usize) -> Duration {
    Duration::from_secs_f64(2.0 * bytes as f64 / LINK_BYTES_PER_SEC_MIN)
}

/// A request encoded for the wire.
#[allow(clippy::result_large_err)] // openraft's error type
fn encode<Req: Serialize>(req: &Req) -> Result<Vec<u8>, RPCError<TypeConfig>> {
    serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))
}

/// Largest encoded AppendEntries sent (room left for the rest of the gRPC message).
pub const APPEND_BYTES_MAX: usize = RAFT_MESSAGE_BYTES_MAX - 1024 * 1024;

/// When `entries` entries encode to `bytes`, more than `max`: how many to send instead (at
/// least one, fewer than `entries`). `None` when they fit, or when a single entry is too large
/// (it is sent as is and refused by the receiver).
fn entries_that_fit(entries: usize, bytes: usize, max: usize) -> Option<usize> {
    if bytes <= max || entries <= 1 {
        return None;
    }
    let fit = (entries as u128 * max as u128 / bytes as u128) as usize;
    Some(fit.clamp(1, entries - 1))
}

/// One piece of a snapshot sent to a follower: JSON in `RaftMessage::payload`, the bytes in
/// `RaftMessage::data`. Pieces go in order from offset 0; the receiver (`SnapshotStore::receive`)
/// writes them into its receiving file and installs the snapshot after the last one.
#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct SnapshotChunk {
    /// The sender's vote.
    pub vote: VoteOf<TypeConfig>,
    /// The snapshot's metadata with raftpg's id (which carries the archive's CRC and length).
    pub meta: SnapMeta,
    /// Where `data` starts in the archive.
    pub offset: u64,
    /// Whether this is the last piece.
    pub done: bool,
}

/// Bytes of a snapshot sent per message.
pub const SNAPSHOT_CHUNK_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, Copy)]
enum RpcKind {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetworkV2<TypeConfig> for PeerConnection {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let mut rpc = rpc;
        let mut payload = encode(&rpc)?;
        // Too many large entries for one message: send the first ones that fit and report the
        // rest as not sent yet (`PartialSuccess`); openraft sends them next. The node refuses
        // limits under which one entry alone would not fit (server::check_entry_bytes_max).
        let mut partial = None;
        while let Some(fit) = entries_that_fit(rpc.entries.len(), payload.len(), APPEND_BYTES_MAX) {
            rpc.entries.truncate(fit);
            let last = rpc.entries.last().map(|e| e.log_id);
            // The commit index sent may not run ahead of the entries sent.
            rpc.leader_commit = rpc.leader_commit.min(last);
            partial = last;
            payload = encode(&rpc)?;
        }
        let answer = self
            .call::<_, RaftError<TypeConfig>>(RpcKind::Append, payload, Vec::new(), &option)
            .await?;
        Ok(match (answer, partial) {
            (AppendEntriesResponse::Success, Some(last)) => {
                AppendEntriesResponse::PartialSuccess(Some(last))
            }
            (answer, _) => answer,
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let payload = encode(&rpc)?;
        self.call::<_, RaftError<TypeConfig>>(RpcKind::Vote, payload, Vec::new(), &option)
            .await
    }

    /// Sends the archive in [`SNAPSHOT_CHUNK_BYTES`] pieces (each bounded by `hard_ttl`), from
    /// the start; stops when `cancel` fires or the follower answers with a newer vote.
    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: Snapshot,
        cancel: impl std::future::Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let meta = SnapMeta::of(&snapshot.meta, &snapshot.snapshot.id);
        let mut file = snapshot.snapshot.file;
        let send = async {
            file.seek(std::io::SeekFrom::Start(0))
                .await
                .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
            let mut offset = 0u64;
            loop {
                let mut data = vec![0u8; SNAPSHOT_CHUNK_BYTES];
                let mut filled = 0;
                while filled < data.len() {
                    let n = file
                        .read(&mut data[filled..])
                        .await
                        .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                data.truncate(filled);
                let done = filled < SNAPSHOT_CHUNK_BYTES;
                let chunk = SnapshotChunk {
                    vote,
                    meta: meta.clone(),
                    offset,
                    done,
                };
                let payload = serde_json::to_vec(&chunk)
                    .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
                let len = data.len() as u64;
                let answer: SnapshotResponse<TypeConfig> = self
                    .call::<_, RemoteSnapshotError>(RpcKind::Snapshot, payload, data, &option)
                    .await
                    .map_err(streaming)?;
                if answer.vote != vote || done {
                    return Ok(answer);
                }
                offset += len;
            }
        };
        tokio::select! {
            sent = send => sent,
            closed = cancel => Err(StreamingError::Closed(closed)),
        }
    }
}

/// An error a follower answers a snapshot piece with (as text).
#[derive(Debug, thiserror::Error, Serialize, serde::Deserialize)]
#[error("{0}")]
pub struct RemoteSnapshotError(pub String);

/// An RPC error of a snapshot piece as the error of the whole transfer.
fn streaming(e: RPCError<TypeConfig>) -> StreamingError<TypeConfig> {
    match e {
        RPCError::Timeout(t) => StreamingError::Timeout(t),
        RPCError::Unreachable(u) => StreamingError::Unreachable(u),
        RPCError::Network(n) => StreamingError::Network(n),
        RPCError::RemoteError(r) => StreamingError::Unreachable(Unreachable::new(&r)),
    }
}

#[cfg(test)]
mod tests {
    use super::entries_that_fit;

    #[test]
    fn oversized_appends_are_split() {
        assert_eq!(entries_that_fit(100, 1000, 1000), None);
        assert_eq!(entries_that_fit(100, 4000, 1000), Some(25));
        // Always fewer than before, at least one.
        assert_eq!(entries_that_fit(2, 1001, 1000), Some(1));
        assert_eq!(entries_that_fit(1, 5000, 1000), None);
    }
}
