//! raftpg client library: talks to any node of a raftpg cluster over gRPC.
//!
//! - [`Client`] sends writes and reads to the cluster: it starts at any node, prefers the node
//!   that leads once it learns it (from `raftpg-leader-addr`), and moves to another node when one
//!   is unreachable or not leading. Every write carries a request id `(client_id, seq)`.
//! - [`LocalCluster`] starts and supervises a cluster of `raftpg-node` processes on this machine
//!   (used by the CLI's `cluster`/`demo` commands and by the integration tests).
//! - [`values`] builds and prints typed values.

pub mod backup;
pub mod bench;
pub mod cert;
pub mod chart;
pub mod local_cluster;
pub mod pg_wire;
pub mod progress;
pub mod values;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

pub use local_cluster::{LocalCluster, LocalClusterSpec};
use prost::Message;
pub use raftpg_proto::backup::{BackupError, BackupHeader};
use raftpg_proto::v1::cluster_client::ClusterClient;
use raftpg_proto::v1::read_client::ReadClient;
use raftpg_proto::v1::transaction_client::TransactionClient;
use raftpg_proto::v1::write_client::WriteClient;
use raftpg_proto::v1::{
    Consistency, ExecuteRequest, ExecuteResponse, QueryRequest, QueryResponse, RequestId, SqlError,
    Statement, StatusRequest, StatusResponse, Value,
};
pub use raftpg_proto::{pg_version_words, v1};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// The longest a backup stream may pause between two parts.
pub const BACKUP_STALL: Duration = Duration::from_secs(120);

/// Errors returned by the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The cluster answered with an error (a SQL error carries its SQLSTATE).
    #[error("{}", describe_status(.0))]
    Status(Status),
    /// A node address could not be parsed.
    #[error("invalid node address {0:?}")]
    BadAddress(String),
    /// No node list was given.
    #[error("no node addresses given")]
    NoNodes,
    /// The call's total deadline passed (or its attempts ran out) while it kept failing in a
    /// way worth retrying; `last` is the last failure.
    #[error("gave up after {attempts} attempt(s) in {:.1} s{}: {last}{}", .elapsed.as_secs_f64(), tried(.unreachable), outcome_hint(.request, .last))]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: Duration,
        /// Node addresses that gave no answer (unreachable, or silent until the deadline) at
        /// the last try of each.
        unreachable: Vec<String>,
        /// The write's request id (`client:seq`), when the call was a write.
        request: Option<String>,
        /// The last failure.
        last: Box<ClientError>,
    },
    /// An empty user name or password.
    #[error("the user name and password must not be empty")]
    BadCredentials,
    /// A backup could not be written, or its stream was corrupt.
    #[error(transparent)]
    Backup(#[from] raftpg_proto::backup::BackupError),
    /// A backup stream stopped sending.
    #[error("{0}")]
    Stalled(String),
}

fn tried(unreachable: &[String]) -> String {
    match unreachable {
        [] => String::new(),
        nodes => format!(" (no answer from {})", nodes.join(", ")),
    }
}

/// What a write that gave up should do next: its outcome is unknown unless the last failure
/// says it certainly did not happen.
fn outcome_hint(request: &Option<String>, last: &ClientError) -> String {
    let certainly_not_applied = last.code() == Code::Unavailable;
    match request {
        Some(id) if !certainly_not_applied => format!(
            "; the write's outcome is unknown: send it again with request id {id} to learn it (it is never applied twice)"
        ),
        _ => String::new(),
    }
}

fn describe_status(s: &Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

impl ClientError {
    /// The gRPC status, if the error came from the cluster (the last one, for a call that
    /// gave up).
    pub fn status(&self) -> Option<&Status> {
        match self {
            ClientError::Status(s) => Some(s),
            ClientError::GaveUp { last, .. } => last.status(),
            _ => None,
        }
    }

    /// The gRPC code (UNKNOWN for local errors).
    pub fn code(&self) -> Code {
        self.status().map(|s| s.code()).unwrap_or(Code::Unknown)
    }

    /// The SQLSTATE of a SQL error or refusal.
    pub fn sqlstate(&self) -> Option<String> {
        let s = self.status()?;
        if let Ok(e) = SqlError::decode(s.details()) {
            if !e.sqlstate.is_empty() {
                return Some(e.sqlstate);
            }
        }
        s.metadata()
            .get(raftpg_proto::SQLSTATE_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// The structured SQL error, if any.
    pub fn sql_error(&self) -> Option<SqlError> {
        SqlError::decode(self.status()?.details()).ok()
    }

    /// Whether the request may be sent again as is: the cluster could not take it (UNAVAILABLE:
    /// no leader, node down, leader changed), or its outcome is unknown (deadline, broken
    /// connection). Writes carry a request id, so a write that did commit the first time is
    /// answered with its recorded result instead of being applied twice.
    fn retry_safe(&self) -> bool {
        match self.status() {
            Some(s) => matches!(
                s.code(),
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Unknown
                    | Code::Cancelled
                    | Code::Aborted
            ),
            None => false,
        }
    }
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Deadline of one attempt.
    pub attempt_timeout: Duration,
    /// Most attempts per call (across nodes).
    pub attempts_max: u32,
    /// Pause between attempts (doubles, up to 1 s).
    pub retry_backoff: Duration,
    /// TLS to the nodes (`None`: plaintext, for nodes started without `--tls-dir`).
    pub tls: Option<ClientTls>,
    /// The role to authenticate as (sent with every request as `raftpg-user` and
    /// `raftpg-password` metadata; `None`: anonymous, for nodes that allow it).
    pub credentials: Option<Credentials>,
    /// The longest a call may take across all its attempts; then it fails with
    /// [`ClientError::GaveUp`] and the last error.
    pub total_timeout: Duration,
}

pub use raftpg_proto::identity::Credentials;

/// TLS settings of a client: the cluster CA, and optionally a client certificate.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// The cluster CA (PEM), which must have signed the nodes' certificates.
    pub ca_pem: String,
    /// A client certificate and its key (PEM), presented to the nodes.
    pub identity: Option<(String, String)>,
}

impl ClientTls {
    /// Reads the CA, and the client certificate `name` when given, from a `raftpg cert`
    /// directory.
    pub fn from_dir(dir: &std::path::Path, name: Option<&str>) -> std::io::Result<Self> {
        let ca_pem = std::fs::read_to_string(dir.join(cert::CA_CERT))?;
        let identity = match name {
            Some(n) => Some((
                std::fs::read_to_string(dir.join(cert::client_cert_file(n)))?,
                std::fs::read_to_string(dir.join(cert::client_key_file(n)))?,
            )),
            None => None,
        };
        Ok(ClientTls { ca_pem, identity })
    }

    fn config(&self) -> tonic::transport::ClientTlsConfig {
        let mut c = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = &self.identity {
            c = c.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        c
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            attempt_timeout: Duration::from_secs(10),
            attempts_max: 20,
            retry_backoff: Duration::from_millis(50),
            tls: None,
            credentials: None,
            total_timeout: Duration::from_secs(60),
        }
    }
}

/// A client of a raftpg cluster.
pub struct Client {
    addrs: Vec<String>,
    channels: Vec<Channel>,
    preferred: AtomicUsize,
    config: ClientConfig,
    client_id: String,
    next_seq: AtomicU64,
}

/// A lazily connecting channel to the node at `addr` (`host:port`), over TLS when `tls` is
/// given (for raw gRPC clients of the generated API).
pub fn channel(addr: &str, tls: Option<&ClientTls>) -> Result<Channel, ClientError> {
    let bad = |_| ClientError::BadAddress(addr.to_string());
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(bad)?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.config()).map_err(bad)?;
    }
    Ok(endpoint
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect_lazy())
}

impl Client {
    /// A client for the nodes at `addrs` (`host:port`); connects lazily.
    pub fn new<S: AsRef<str>>(addrs: &[S]) -> Result<Self, ClientError> {
        Self::with_config(addrs, ClientConfig::default())
    }

    /// Like [`Client::new`] with explicit settings.
    pub fn with_config<S: AsRef<str>>(
        addrs: &[S],
        config: ClientConfig,
    ) -> Result<Self, ClientError> {
        if addrs.is_empty() {
            return Err(ClientError::NoNodes);
        }
        if let Some(c) = &config.credentials {
            if c.user.is_empty() || c.password.is_empty() {
                return Err(ClientError::BadCredentials);
            }
        }
        let addrs: Vec<String> = addrs
            .iter()
            .map(|a| a.as_ref().trim().to_string())
            .collect();
        let channels = addrs
            .iter()
            .map(|a| channel(a, config.tls.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Client {
            addrs,
            channels,
            preferred: AtomicUsize::new(0),
            config,
            client_id: uuid::Uuid::new_v4().to_string(),
            next_seq: AtomicU64::new(1),
        })
    }

    /// A request carrying this client's credentials.
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(c) = &self.config.credentials {
            // Text metadata when they travel as text, else binary (`raftpg_proto::metadata`).
            let meta = r.metadata_mut();
            raftpg_proto::metadata::insert(meta, raftpg_proto::metadata::USER, &c.user);
            raftpg_proto::metadata::insert(meta, raftpg_proto::metadata::PASSWORD, &c.password);
        }
        r
    }

    /// The node addresses this client knows.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// Picks the node for the next attempt of a call after node `tried` failed with `s`: the
    /// leader it names if this call has not tried that node yet, else the next node this call
    /// has not tried (all tried: start over). Two nodes that name each other (removed nodes
    /// with a stale view, say) cannot keep the call away from the others.
    fn next_node(&self, s: Option<&Status>, tried: usize, visited: &mut [bool]) {
        let n = self.addrs.len();
        let hinted = s
            .and_then(|s| s.metadata().get(raftpg_proto::LEADER_ADDR_METADATA))
            .and_then(|v| v.to_str().ok())
            .and_then(|addr| self.addrs.iter().position(|a| a == addr))
            .filter(|h| !visited[*h]);
        let next = hinted.unwrap_or_else(|| {
            (1..=n)
                .map(|k| (tried + k) % n)
                .find(|j| !visited[*j])
                .unwrap_or_else(|| {
                    visited.fill(false);
                    (tried + 1) % n
                })
        });
        self.preferred.store(next, Ordering::Relaxed);
    }

    async fn backoff(&self, attempt: u32) {
        let ms = self.config.retry_backoff.as_millis() as u64 * (1u64 << attempt.min(5));
        tokio::time::sleep(Duration::from_millis(ms.min(1000))).await;
    }

    /// Runs `call` against the preferred node, moving to the hinted leader or the next node and
    /// backing off while `retry` says the failure may be retried, at most `attempts_max` times.
    async fn with_retries<T, F, Fut>(
        &self,
        retry: fn(&ClientError) -> bool,
        request: Option<String>,
        total: Duration,
        call: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(usize) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let started = std::time::Instant::now();
        let deadline = started + total;
        let mut attempt = 0;
        let mut visited = vec![false; self.channels.len()];
        let mut unreachable: Vec<String> = Vec::new();
        loop {
            let i = self.preferred.load(Ordering::Relaxed) % self.channels.len();
            visited[i] = true;
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let outcome = match tokio::time::timeout(left, call(i)).await {
                Ok(o) => o,
                Err(_) => Err(ClientError::Status(Status::deadline_exceeded(format!(
                    "no answer from {} within the call's deadline",
                    self.addrs[i]
                )))),
            };
            match outcome {
                Ok(r) => return Ok(r),
                Err(e) => {
                    attempt += 1;
                    let addr = &self.addrs[i];
                    let reached = e.status().is_some_and(|s| {
                        !s.message().contains("transport error")
                            && !s.message().contains("tcp connect error")
                            && s.code() != Code::DeadlineExceeded
                    });
                    unreachable.retain(|a| a != addr);
                    if !reached {
                        unreachable.push(addr.clone());
                    }
                    if !retry(&e) {
                        return Err(e);
                    }
                    if attempt >= self.config.attempts_max || std::time::Instant::now() >= deadline
                    {
                        return Err(ClientError::GaveUp {
                            attempts: attempt,
                            elapsed: started.elapsed(),
                            unreachable,
                            request,
                            last: Box::new(e),
                        });
                    }
                    self.next_node(e.status(), i, &mut visited);
                    self.backoff(attempt).await;
                }
            }
        }
    }

    /// Executes statements as one atomic write; retries on another node while the write
    /// certainly did not happen (no leader, node down, leader changed).
    pub async fn execute(
        &self,
        statements: Vec<Statement>,
    ) -> Result<ExecuteResponse, ClientError> {
        let id = RequestId {
            client_id: self.client_id.clone(),
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
        };
        self.execute_with_id(statements, id).await
    }

    /// Executes statements under a request id chosen by the caller: sending the same id again
    /// (from any client, after any failure) is answered with the first outcome and never
    /// applied twice, as long as the cluster retains the id (`--request-retention-writes`).
    pub async fn execute_with_id(
        &self,
        statements: Vec<Statement>,
        id: RequestId,
    ) -> Result<ExecuteResponse, ClientError> {
        let request = ExecuteRequest {
            statements,
            request_id: Some(id),
        };
        let id_text = request
            .request_id
            .as_ref()
            .map(|id| format!("{}:{}", id.client_id, id.seq));
        let request = &request;
        self.with_retries(
            ClientError::retry_safe,
            id_text,
            self.config.total_timeout,
            |i| async move {
                let mut c = WriteClient::new(self.channels[i].clone())
                    .max_decoding_message_size(usize::MAX);
                let mut req = self.request(request.clone());
                req.set_timeout(self.config.attempt_timeout);
                c.execute(req)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(ClientError::Status)
            },
        )
        .await
    }

    /// Begins an interactive transaction (retried on another node while none began); every
    /// later call of it goes to the node that answered (which relays to the leader). Its
    /// request id is fresh; see [`Client::begin_with_id`].
    pub async fn begin(&self) -> Result<Transaction<'_>, ClientError> {
        let id = RequestId {
            client_id: self.client_id.clone(),
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
        };
        self.begin_with_id(id).await
    }

    /// Begins an interactive transaction under a request id chosen by the caller: a `Begin`
    /// with the id of a transaction that committed fails with ALREADY_EXISTS (SQLSTATE RP003),
    /// which is how a client that lost `Commit`'s answer learns that it committed.
    pub async fn begin_with_id(&self, id: RequestId) -> Result<Transaction<'_>, ClientError> {
        let request = &v1::BeginRequest {
            request_id: Some(id),
        };
        let (node, begun) = self
            .with_retries(
                ClientError::retry_safe,
                None,
                self.config.total_timeout,
                |i| async move {
                    let mut c = TransactionClient::new(self.channels[i].clone());
                    let mut req = self.request(request.clone());
                    req.set_timeout(self.config.attempt_timeout);
                    c.begin(req)
                        .await
                        .map(|r| (i, r.into_inner()))
                        .map_err(ClientError::Status)
                },
            )
            .await?;
        Ok(Transaction {
            client: self,
            node,
            txn_id: begun.txn_id,
            request_id: begun.request_id.unwrap_or_default(),
        })
    }

    /// Executes one statement with parameters.
    pub async fn execute_one(
        &self,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<ExecuteResponse, ClientError> {
        self.execute(vec![Statement {
            sql: sql.to_string(),
            params,
        }])
        .await
    }

    /// Runs a read on the preferred node (moving on when it is unreachable).
    pub async fn query(&self, request: QueryRequest) -> Result<QueryResponse, ClientError> {
        let request = &request;
        self.with_retries(
            ClientError::retry_safe,
            None,
            self.config.total_timeout,
            |i| async move { self.query_node(i, request.clone()).await },
        )
        .await
    }

    /// Runs a read on the node at position `node` of the address list (no retry elsewhere).
    pub async fn query_node(
        &self,
        node: usize,
        request: QueryRequest,
    ) -> Result<QueryResponse, ClientError> {
        let ch = self.channels.get(node).ok_or(ClientError::NoNodes)?.clone();
        let mut c = ReadClient::new(ch).max_decoding_message_size(usize::MAX);
        let mut req = self.request(request);
        req.set_timeout(self.config.attempt_timeout);
        c.query(req)
            .await
            .map(|r| r.into_inner())
            .map_err(ClientError::Status)
    }

    /// Runs a streamed read on the node at position `node`, returning all chunks' rows.
    pub async fn query_stream_node(
        &self,
        node: usize,
        request: QueryRequest,
    ) -> Result<(Vec<v1::Column>, Vec<v1::Row>, u64), ClientError> {
        let ch = self.channels.get(node).ok_or(ClientError::NoNodes)?.clone();
        let mut c = ReadClient::new(ch).max_decoding_message_size(64 * 1024 * 1024);
        let mut stream = c
            .query_stream(self.request(request))
            .await
            .map_err(ClientError::Status)?
            .into_inner();
        let (mut columns, mut rows, mut applied) = (Vec::new(), Vec::new(), 0);
        while let Some(chunk) = stream.message().await.map_err(ClientError::Status)? {
            if !chunk.columns.is_empty() {
                columns = chunk.columns;
                applied = chunk.applied_index;
            }
            rows.extend(chunk.rows);
        }
        Ok((columns, rows, applied))
    }

    /// A simple read of `sql` at `consistency`.
    pub async fn query_sql(
        &self,
        sql: &str,
        params: Vec<Value>,
        consistency: Consistency,
    ) -> Result<QueryResponse, ClientError> {
        self.query(QueryRequest {
            sql: sql.to_string(),
            params,
            consistency: consistency as i32,
            ..Default::default()
        })
        .await
    }

    /// The status of the node at position `node`.
    pub async fn status_of(&self, node: usize) -> Result<StatusResponse, ClientError> {
        let ch = self.channels.get(node).ok_or(ClientError::NoNodes)?.clone();
        let mut c = ClusterClient::new(ch);
        let mut req = self.request(StatusRequest { node_id: 0 });
        req.set_timeout(Duration::from_secs(2));
        c.status(req)
            .await
            .map(|r| r.into_inner())
            .map_err(ClientError::Status)
    }

    /// Runs a divergence check (`Cluster.Check`): every node checksums its copy at one log
    /// position; the answer names tables and nodes that differ.
    pub async fn check(&self, timeout: Duration) -> Result<v1::CheckResponse, ClientError> {
        let msg = v1::CheckRequest {
            timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
        };
        self.cluster_call(
            timeout + Duration::from_secs(10),
            msg,
            |mut c, r| async move { c.check(r).await },
        )
        .await
    }

    /// Calls a Cluster RPC on the preferred node, moving on while the cluster is unavailable.
    async fn cluster_call<M, T, F, Fut>(
        &self,
        timeout: Duration,
        msg: M,
        call: F,
    ) -> Result<T, ClientError>
    where
        M: Clone,
        F: Fn(ClusterClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let (msg, call) = (&msg, &call);
        self.with_retries(
            |e| e.code() == Code::Unavailable,
            None,
            // A call that asks for a long wait (a check, a learner catching up) gets it.
            self.config
                .total_timeout
                .max(timeout + Duration::from_secs(5)),
            |i| async move {
                let c = ClusterClient::new(self.channels[i].clone())
                    .max_decoding_message_size(usize::MAX);
                let mut request = self.request(msg.clone());
                request.set_timeout(timeout);
                call(c, request)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(ClientError::Status)
            },
        )
        .await
    }

    /// Adds a running node (started with `--join`) as a learner; with `wait`, returns once it
    /// has caught up.
    pub async fn add_learner(
        &self,
        node_id: u64,
        addr: &str,
        wait: bool,
    ) -> Result<v1::MembershipResponse, ClientError> {
        let msg = v1::AddLearnerRequest {
            node_id,
            addr: addr.to_string(),
            wait_caught_up: wait,
        };
        self.cluster_call(Duration::from_secs(300), msg, |mut c, r| async move {
            c.add_learner(r).await
        })
        .await
    }

    /// Makes learners voters (refused for a learner that lags; see [`Client::promote_with`]).
    pub async fn promote(&self, node_ids: &[u64]) -> Result<v1::MembershipResponse, ClientError> {
        self.promote_with(node_ids, false).await
    }

    /// Makes learners voters; with `force` even learners that have not applied the log up to
    /// the commit index.
    pub async fn promote_with(
        &self,
        node_ids: &[u64],
        force: bool,
    ) -> Result<v1::MembershipResponse, ClientError> {
        let msg = v1::PromoteRequest {
            node_ids: node_ids.to_vec(),
            force,
        };
        self.cluster_call(Duration::from_secs(300), msg, |mut c, r| async move {
            c.promote(r).await
        })
        .await
    }

    /// Removes members.
    pub async fn remove(&self, node_ids: &[u64]) -> Result<v1::MembershipResponse, ClientError> {
        let msg = v1::RemoveRequest {
            node_ids: node_ids.to_vec(),
        };
        self.cluster_call(Duration::from_secs(300), msg, |mut c, r| async move {
            c.remove(r).await
        })
        .await
    }

    /// Moves leadership to `node_id`.
    pub async fn transfer_leader(
        &self,
        node_id: u64,
    ) -> Result<v1::MembershipResponse, ClientError> {
        let msg = v1::TransferLeaderRequest { node_id };
        self.cluster_call(Duration::from_secs(40), msg, |mut c, r| async move {
            c.transfer_leader(r).await
        })
        .await
    }

    /// Rebuilds member `node_id` from a fresh snapshot of the leader (`Cluster.Rebuild`),
    /// sent to that node at the client address the membership records for it; waits up to
    /// `timeout`.
    pub async fn rebuild(
        &self,
        node_id: u64,
        timeout: Duration,
    ) -> Result<v1::RebuildResponse, ClientError> {
        let addr = self
            .status_all()
            .await
            .into_iter()
            .flatten()
            .find_map(|st| {
                st.members
                    .into_iter()
                    .find(|m| m.node_id == node_id && !m.addr.is_empty())
                    .map(|m| m.addr)
            })
            .ok_or_else(|| {
                ClientError::BadAddress(format!(
                    "node {node_id}: not a member with a known client address"
                ))
            })?;
        let ch = channel(&addr, self.config.tls.as_ref())?;
        let mut c = ClusterClient::new(ch);
        let mut req = self.request(v1::RebuildRequest {
            node_id,
            timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
        });
        req.set_timeout(timeout + Duration::from_secs(10));
        c.rebuild(req)
            .await
            .map(|r| r.into_inner())
            .map_err(ClientError::Status)
    }

    /// Writes a backup of the user database to `path` (`raftpg_proto::backup` format) from
    /// member `from`, or by default from the most caught-up healthy follower this client
    /// reaches (the leader only when no follower will do). The node prepares the copy within
    /// `prepare` (apply up to the commit index, build a snapshot); the stream then may pause at
    /// most [`BACKUP_STALL`] between parts. Returns the header written and the node's id.
    pub async fn backup(
        &self,
        path: &std::path::Path,
        from: Option<u64>,
        prepare: Duration,
    ) -> Result<raftpg_proto::backup::BackupHeader, ClientError> {
        use raftpg_proto::backup::{BackupError, BackupHeader, BackupWriter};
        let channel = self.backup_source(from).await?;
        let mut c = ClusterClient::new(channel);
        let mut req = self.request(v1::BackupRequest {
            timeout_ms: u32::try_from(prepare.as_millis()).unwrap_or(u32::MAX),
        });
        // The deadline covers the whole stream; stalls are bounded per part below.
        req.set_timeout(prepare + Duration::from_secs(24 * 3600));
        let mut parts = tokio::time::timeout(prepare + Duration::from_secs(10), c.backup(req))
            .await
            .map_err(|_| {
                ClientError::Stalled(format!("the node prepared no backup within {prepare:?}"))
            })?
            .map_err(ClientError::Status)?
            .into_inner();
        let mut writer = BackupWriter::create(path)?;
        let mut header: Option<BackupHeader> = None;
        loop {
            let part = tokio::time::timeout(BACKUP_STALL, parts.message())
                .await
                .map_err(|_| {
                    ClientError::Stalled(format!(
                        "the backup stream sent nothing for {BACKUP_STALL:?} after {} bytes",
                        writer.bytes()
                    ))
                })?
                .map_err(ClientError::Status)?;
            let Some(part) = part else {
                return Err(
                    BackupError::Stream("the stream ended without a checksum".into()).into(),
                );
            };
            if !part.header_json.is_empty() {
                header =
                    Some(serde_json::from_slice(&part.header_json).map_err(|e| {
                        BackupError::Stream(format!("unreadable backup header: {e}"))
                    })?);
            }
            writer.write(&part.data)?;
            if !part.sha256.is_empty() {
                let header = header
                    .ok_or_else(|| BackupError::Stream("the stream sent no header".into()))?;
                return Ok(writer.finish(header, &part.sha256)?);
            }
        }
    }

    /// The channel to the node a backup is taken from (see [`Client::backup`]).
    async fn backup_source(&self, from: Option<u64>) -> Result<Channel, ClientError> {
        let statuses = self.status_all().await;
        if let Some(id) = from {
            if let Some(i) = statuses
                .iter()
                .position(|s| s.as_ref().is_ok_and(|s| s.node_id == id))
            {
                return Ok(self.channels[i].clone());
            }
            let addr = statuses
                .iter()
                .flatten()
                .find_map(|st| {
                    st.members
                        .iter()
                        .find(|m| m.node_id == id && !m.addr.is_empty())
                        .map(|m| m.addr.clone())
                })
                .ok_or_else(|| {
                    ClientError::BadAddress(format!(
                        "node {id}: not a member with a known client address"
                    ))
                })?;
            return channel(&addr, self.config.tls.as_ref());
        }
        let healthy = |s: &StatusResponse| s.postgres_up && s.diverged.is_empty() && !s.removed;
        let best = statuses
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().ok().map(|s| (i, s)))
            .filter(|(_, s)| healthy(s) && (s.role == "follower" || s.role == "leader"))
            .max_by_key(|(_, s)| (s.role == "follower", s.applied_index));
        match best {
            Some((i, _)) => Ok(self.channels[i].clone()),
            None => Err(statuses
                .into_iter()
                .find_map(Result::err)
                .unwrap_or(ClientError::NoNodes)),
        }
    }

    /// The status of cluster member `member`, asked through the node at position `via`.
    pub async fn member_status(
        &self,
        via: usize,
        member: u64,
    ) -> Result<StatusResponse, ClientError> {
        let ch = self.channels.get(via).ok_or(ClientError::NoNodes)?.clone();
        let mut c = ClusterClient::new(ch);
        let mut req = self.request(StatusRequest { node_id: member });
        req.set_timeout(Duration::from_secs(3));
        c.status(req)
            .await
            .map(|r| r.into_inner())
            .map_err(ClientError::Status)
    }

    /// The status of every node (an error for nodes that do not answer).
    pub async fn status_all(&self) -> Vec<Result<StatusResponse, ClientError>> {
        let mut out = Vec::with_capacity(self.addrs.len());
        for i in 0..self.addrs.len() {
            out.push(self.status_of(i).await);
        }
        out
    }

    /// Waits until some node reports itself leading with a committed log; returns its id.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<u64, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            for st in self.status_all().await.into_iter().flatten() {
                if st.role == "leader" && st.committed_index > 0 {
                    if let Some(pos) = self.addrs.iter().position(|a| *a == st.leader_addr) {
                        self.preferred.store(pos, Ordering::Relaxed);
                    }
                    return Ok(st.node_id);
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ClientError::Status(Status::unavailable(format!(
                    "no leader within {timeout:?}"
                ))));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// An interactive transaction begun by [`Client::begin`]. Its calls are not retried: a
/// failure of a statement leaves it in the failed state (roll it back), ABORTED (40001) means
/// run it again, and a `Commit` without an answer is settled by beginning again with the same
/// request id ([`Client::begin_with_id`]).
pub struct Transaction<'a> {
    client: &'a Client,
    node: usize,
    txn_id: String,
    /// Its request id.
    pub request_id: RequestId,
}

impl Transaction<'_> {
    fn service(&self) -> TransactionClient<Channel> {
        TransactionClient::new(self.client.channels[self.node].clone())
            .max_decoding_message_size(usize::MAX)
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = self.client.request(msg);
        r.set_timeout(self.client.config.attempt_timeout);
        r
    }

    /// Runs one statement in the transaction and returns its result.
    pub async fn execute(
        &self,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<v1::StatementResult, ClientError> {
        let req = self.request(v1::TxnStatementRequest {
            txn_id: self.txn_id.clone(),
            statement: Some(Statement {
                sql: sql.to_string(),
                params,
            }),
        });
        self.service()
            .execute(req)
            .await
            .map(|r| r.into_inner().result.unwrap_or_default())
            .map_err(ClientError::Status)
    }

    /// Commits: answers once a majority committed the transaction's entry.
    pub async fn commit(self) -> Result<v1::CommitResponse, ClientError> {
        let req = self.request(v1::TxnEndRequest {
            txn_id: self.txn_id.clone(),
        });
        self.service()
            .commit(req)
            .await
            .map(|r| r.into_inner())
            .map_err(ClientError::Status)
    }

    /// Rolls back.
    pub async fn rollback(self) -> Result<(), ClientError> {
        let req = self.request(v1::TxnEndRequest {
            txn_id: self.txn_id.clone(),
        });
        self.service()
            .rollback(req)
            .await
            .map(|_| ())
            .map_err(ClientError::Status)
    }
}
