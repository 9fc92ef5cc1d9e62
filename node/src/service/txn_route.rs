//! Where an interactive transaction runs, seen from any node: the frontends' handle ([`Txn`])
//! and the calls that name a transaction by id (the gRPC `Transaction` service, and followers
//! relaying their clients' transactions).
//!
//! A transaction runs on the node that led when it began, for its whole life
//! ([`super::txn::LocalTxn`]). On any other node, [`Txn`] relays each call to that node over the
//! peer link, marked as forwarded; if that node no longer leads, the transaction fails there
//! (40001) and the client retries it.
//!
//! Defines the registry of transactions driven by id (held by the frontend that serves them,
//! [`TxnRegistry`]) (`<node id>.<uuid>`: the node that runs it
//! and an unguessable part), each bound to the role that began it. Invariants: only the role
//! that began a transaction may use its id; an id names a transaction on the node its prefix
//! names, nowhere else; registry entries of ended transactions are purged at the next `Begin`
//! (the registry holds at most the one running transaction and those ended since).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::error::{ErrorKind, LeaderHint, ServiceError};
use super::node::{Route, Service};
use super::txn::{BeginRequest, LocalTxn, TxnStatus};
use super::types::{
    Begun, Committed, Description, Origin, SavepointOp, TxnAnswer, TxnCall, WriteStatement,
};
use crate::auth::authenticator::Principal;
use crate::command::{NodeId, RequestId, StatementOutcome};

/// The registry of transactions driven by id (see the module doc).
#[derive(Default)]
pub struct TxnRegistry {
    open: Mutex<HashMap<String, Registered>>,
}

/// A transaction in the registry: the role that began it (`None`: raftpg itself) and the
/// transaction.
type Registered = (Option<String>, Arc<LocalTxn>);

/// A frontend's interactive transaction: run here, or relayed to the node running it.
///
/// It opens lazily, at its first statement, savepoint or `Describe` (with the statements
/// `first` before that one): `BEGIN` costs no round trip and holds no writer, and a
/// transaction that runs nothing never takes the writer. So the leader is found, the writer
/// taken and the transaction's timestamp (`now()`) drawn at the first statement, and a
/// failure to open (no leader, the writer busy too long) is that statement's error: the
/// transaction is then failed, as after any error.
pub struct Txn {
    svc: Arc<Service>,
    /// What opens it (its request id already set).
    begin: BeginRequest,
    /// Statements run first when it opens (the session's settings, and the ones it changed
    /// before that).
    first: Mutex<Vec<WriteStatement>>,
    place: tokio::sync::OnceCell<Place>,
    /// Where it is while not open yet.
    unopened: Mutex<TxnStatus>,
    request_id: RequestId,
}

enum Place {
    Here(LocalTxn),
    There(Remote),
}

/// A transaction running on another node.
struct Remote {
    svc: Arc<Service>,
    node: LeaderHint,
    txn_id: String,
    principal: Option<Principal>,
    /// As this node saw it from the answers (for the client's `ReadyForQuery`).
    status: Mutex<TxnStatus>,
}

impl Service {
    /// An interactive transaction for a frontend, opened at its first use (see [`Txn`]): here
    /// when this node leads then, else on the leader (relayed for its whole life). `first`:
    /// statements it runs first (the session's settings).
    pub fn begin(self: &Arc<Self>, mut req: BeginRequest, first: Vec<WriteStatement>) -> Txn {
        let request_id = req
            .request_id
            .get_or_insert_with(|| RequestId {
                client_id: format!("txn-{}-{}", self.id, uuid::Uuid::new_v4()),
                seq: 1,
            })
            .clone();
        Txn {
            svc: self.clone(),
            begin: req,
            first: Mutex::new(first),
            place: tokio::sync::OnceCell::new(),
            unopened: Mutex::new(TxnStatus::Active),
            request_id,
        }
    }

    /// Opens the transaction `req` asks for: here when this node leads, else on the leader.
    async fn open_txn(self: &Arc<Self>, req: &BeginRequest) -> Result<Place, ServiceError> {
        let wait = self
            .limits
            .write_timeout
            .min(std::time::Duration::from_secs(5));
        match self.route(req.origin, wait).await? {
            Route::Here => Ok(Place::Here(self.begin_here(req.clone()).await?)),
            Route::Leader(leader) => {
                let begun = self.begin_on(&leader, req).await?;
                Ok(Place::There(Remote {
                    svc: self.clone(),
                    node: leader,
                    txn_id: begun.txn_id,
                    principal: req.principal.clone(),
                    status: Mutex::new(TxnStatus::Active),
                }))
            }
        }
    }

    /// `Begin` of a transaction driven by id: runs it here when this node leads (registered
    /// under a new id), else on the leader.
    pub async fn txn_open(
        self: &Arc<Self>,
        registry: &TxnRegistry,
        req: BeginRequest,
    ) -> Result<Begun, ServiceError> {
        let wait = self
            .limits
            .write_timeout
            .min(std::time::Duration::from_secs(5));
        if let Route::Leader(leader) = self.route(req.origin, wait).await? {
            return self.begin_on(&leader, &req).await;
        }
        let user = req.principal.as_ref().map(|p| p.user.clone());
        let local = self.begin_here(req).await?;
        let begun = Begun {
            txn_id: format!("{}.{}", self.id, uuid::Uuid::new_v4().simple()),
            request_id: local.request_id().clone(),
            node: self.id,
        };
        let mut open = registry.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|_, (_, t)| !t.is_ended());
        open.insert(begun.txn_id.clone(), (user, Arc::new(local)));
        Ok(begun)
    }

    /// A call on the transaction `txn_id` (see [`TxnCall`]), here or on the node running it.
    pub async fn txn_call(
        self: &Arc<Self>,
        registry: &TxnRegistry,
        txn_id: &str,
        principal: Option<&Principal>,
        origin: Origin,
        call: TxnCall,
    ) -> Result<TxnAnswer, ServiceError> {
        let node: NodeId = txn_id
            .split_once('.')
            .and_then(|(n, _)| n.parse().ok())
            .ok_or_else(|| {
                ServiceError::refused(
                    ErrorKind::InvalidArgument,
                    "22023",
                    format!("\"{txn_id}\" is not a transaction id"),
                )
            })?;
        if node != self.id {
            if origin == Origin::Forwarded {
                return Err(not_open(txn_id, self.id));
            }
            let hint = self
                .member_hint(node)
                .ok_or_else(|| not_open(txn_id, node))?;
            return self
                .peers
                .txn_call(&hint, principal, txn_id, &call, self.txn_call_timeout())
                .await;
        }
        let user = principal.map(|p| p.user.clone());
        let txn = {
            let open = registry.open.lock().unwrap_or_else(|p| p.into_inner());
            match open.get(txn_id) {
                Some((owner, t)) if *owner == user => t.clone(),
                _ => return Err(not_open(txn_id, self.id)),
            }
        };
        let ends = matches!(call, TxnCall::Commit | TxnCall::Rollback);
        let answer = run_local(&txn, call).await;
        if ends {
            let mut open = registry.open.lock().unwrap_or_else(|p| p.into_inner());
            open.remove(txn_id);
        }
        answer
    }

    /// Begins the transaction `req` asks for on `leader` (relayed, as the request's role).
    async fn begin_on(
        &self,
        leader: &LeaderHint,
        req: &BeginRequest,
    ) -> Result<Begun, ServiceError> {
        self.peers
            .txn_begin(
                leader,
                req.principal.as_ref(),
                req.request_id.as_ref(),
                self.limits.write_timeout,
            )
            .await
    }

    /// How a member is reached, from the membership.
    fn member_hint(&self, node: NodeId) -> Option<LeaderHint> {
        let m = self.membership_config();
        let addr = m.membership().get_node(&node)?;
        Some(LeaderHint {
            id: node,
            addr: addr.client.clone(),
            peer_addr: addr.peer.clone(),
        })
    }

    /// Bound of one relayed call (a COMMIT waits up to the write timeout on the leader).
    fn txn_call_timeout(&self) -> std::time::Duration {
        self.limits.write_timeout + std::time::Duration::from_secs(1)
    }
}

async fn run_local(txn: &LocalTxn, call: TxnCall) -> Result<TxnAnswer, ServiceError> {
    match call {
        TxnCall::Execute(stmt) => txn.execute(stmt).await.map(TxnAnswer::Rows),
        TxnCall::Describe { sql, param_types } => txn
            .describe(sql, param_types)
            .await
            .map(TxnAnswer::Described),
        TxnCall::Savepoint(op, name) => match op {
            SavepointOp::Define => txn.savepoint(&name).await,
            SavepointOp::Release => txn.release(&name).await,
            SavepointOp::RollbackTo => txn.rollback_to(&name).await,
        }
        .map(|()| TxnAnswer::Done),
        TxnCall::Commit => txn.commit().await.map(TxnAnswer::Committed),
        TxnCall::Rollback => {
            txn.rollback().await;
            Ok(TxnAnswer::Done)
        }
    }
}

fn not_open(txn_id: &str, node: NodeId) -> ServiceError {
    ServiceError::refused(
        ErrorKind::Aborted,
        "40001",
        format!(
            "transaction {txn_id} is not open on node {node} (it ended, or leadership changed); retry the transaction"
        ),
    )
}

impl Txn {
    /// The transaction's request id.
    pub fn request_id(&self) -> &RequestId {
        &self.request_id
    }

    fn unopened(&self) -> TxnStatus {
        *self.unopened.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_unopened(&self, s: TxnStatus) {
        *self.unopened.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Where it runs, opening it first if it is not open yet (then its `first` statements
    /// run). A failure to open fails the transaction.
    async fn opened(&self) -> Result<&Place, ServiceError> {
        if self.unopened() != TxnStatus::Active {
            return Err(super::txn::in_failed_txn());
        }
        let opened = self
            .place
            .get_or_try_init(|| async {
                let place = self.svc.open_txn(&self.begin).await?;
                let first = self.first.lock().unwrap_or_else(|p| p.into_inner()).clone();
                for stmt in first {
                    if let Err(e) = place.execute(stmt).await {
                        place.rollback().await;
                        return Err(e);
                    }
                }
                Ok(place)
            })
            .await;
        if opened.is_err() {
            self.set_unopened(TxnStatus::Failed);
        }
        opened
    }

    /// Opens it now (see [`Txn`]); an error fails it.
    pub async fn open(&self) -> Result<(), ServiceError> {
        self.opened().await.map(|_| ())
    }

    /// Where the transaction is.
    pub async fn status(&self) -> TxnStatus {
        match self.place.get() {
            Some(p) => p.status().await,
            None => self.unopened(),
        }
    }

    /// Why a statement would be refused now (see [`LocalTxn::refusal`]).
    pub async fn refusal(&self) -> Option<ServiceError> {
        match self.place.get() {
            Some(p) => p.refusal().await,
            None => match self.unopened() {
                TxnStatus::Active => None,
                _ => Some(super::txn::in_failed_txn()),
            },
        }
    }

    /// Puts the transaction in the failed state.
    pub async fn mark_failed(&self) {
        match self.place.get() {
            Some(p) => p.mark_failed().await,
            None => self.set_unopened(TxnStatus::Failed),
        }
    }

    /// Runs a statement.
    pub async fn execute(&self, stmt: WriteStatement) -> Result<StatementOutcome, ServiceError> {
        self.opened().await?.execute(stmt).await
    }

    /// Runs `stmt`, a `SET LOCAL` of a session setting changed inside the transaction block: at
    /// once when the transaction is open, else when it opens, after its `first` statements (a
    /// block that only changes settings still takes no writer and proposes nothing).
    pub async fn set_local(&self, stmt: WriteStatement) -> Result<(), ServiceError> {
        if self.place.get().is_none() {
            if self.unopened() != TxnStatus::Active {
                return Err(super::txn::in_failed_txn());
            }
            self.first
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(stmt);
            return Ok(());
        }
        self.execute(stmt).await.map(|_| ())
    }

    /// What PostgreSQL infers for `sql` inside the transaction (it sees what the transaction
    /// created). An error fails the transaction, as PostgreSQL's `Parse` does.
    pub async fn describe(
        &self,
        sql: &str,
        param_types: &[u32],
    ) -> Result<Description, ServiceError> {
        self.opened().await?.describe(sql, param_types).await
    }

    /// A savepoint command.
    pub async fn savepoint_op(&self, op: SavepointOp, name: &str) -> Result<(), ServiceError> {
        self.opened().await?.savepoint_op(op, name).await
    }

    /// `COMMIT` (a failed transaction is rolled back; see [`Committed::committed`]). One that
    /// never opened commits nothing.
    pub async fn commit(&self) -> Result<Committed, ServiceError> {
        match self.place.get() {
            Some(p) => p.commit().await,
            None => {
                let committed = self.unopened() == TxnStatus::Active;
                self.set_unopened(TxnStatus::Ended);
                Ok(Committed {
                    log_index: 0,
                    committed,
                })
            }
        }
    }

    /// `ROLLBACK`.
    pub async fn rollback(&self) {
        match self.place.get() {
            Some(p) => p.rollback().await,
            None => self.set_unopened(TxnStatus::Ended),
        }
    }
}

impl Place {
    async fn status(&self) -> TxnStatus {
        match self {
            Place::Here(t) => t.status().await,
            Place::There(r) => r.status(),
        }
    }

    async fn refusal(&self) -> Option<ServiceError> {
        match self {
            Place::Here(t) => t.refusal().await,
            Place::There(r) => match r.status() {
                TxnStatus::Active => None,
                _ => Some(super::txn::in_failed_txn()),
            },
        }
    }

    async fn mark_failed(&self) {
        match self {
            Place::Here(t) => t.mark_failed().await,
            Place::There(r) => r.set(TxnStatus::Failed),
        }
    }

    async fn execute(&self, stmt: WriteStatement) -> Result<StatementOutcome, ServiceError> {
        match self {
            Place::Here(t) => t.execute(stmt).await,
            Place::There(r) => match r.call(TxnCall::Execute(stmt)).await? {
                TxnAnswer::Rows(o) => Ok(o),
                other => Err(unexpected(other)),
            },
        }
    }

    async fn describe(&self, sql: &str, param_types: &[u32]) -> Result<Description, ServiceError> {
        match self {
            Place::Here(t) => t.describe(sql.to_string(), param_types.to_vec()).await,
            Place::There(r) => match r
                .call(TxnCall::Describe {
                    sql: sql.to_string(),
                    param_types: param_types.to_vec(),
                })
                .await?
            {
                TxnAnswer::Described(d) => Ok(d),
                other => Err(unexpected(other)),
            },
        }
    }

    async fn savepoint_op(&self, op: SavepointOp, name: &str) -> Result<(), ServiceError> {
        match self {
            Place::Here(t) => match op {
                SavepointOp::Define => t.savepoint(name).await,
                SavepointOp::Release => t.release(name).await,
                SavepointOp::RollbackTo => t.rollback_to(name).await,
            },
            Place::There(r) => {
                r.call(TxnCall::Savepoint(op, name.to_string())).await?;
                if op == SavepointOp::RollbackTo {
                    r.set(TxnStatus::Active);
                }
                Ok(())
            }
        }
    }

    async fn commit(&self) -> Result<Committed, ServiceError> {
        match self {
            Place::Here(t) => t.commit().await,
            Place::There(r) if r.status() != TxnStatus::Active => {
                let _ = r.call(TxnCall::Rollback).await;
                r.set(TxnStatus::Ended);
                Ok(Committed {
                    log_index: 0,
                    committed: false,
                })
            }
            Place::There(r) => {
                let answer = r.call(TxnCall::Commit).await;
                r.set(TxnStatus::Ended);
                match answer? {
                    TxnAnswer::Committed(c) => Ok(c),
                    other => Err(unexpected(other)),
                }
            }
        }
    }

    async fn rollback(&self) {
        match self {
            Place::Here(t) => t.rollback().await,
            Place::There(r) => {
                if r.status() != TxnStatus::Ended {
                    let _ = r.call(TxnCall::Rollback).await;
                    r.set(TxnStatus::Ended);
                }
            }
        }
    }
}

impl Remote {
    fn status(&self) -> TxnStatus {
        *self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, s: TxnStatus) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Relays a call; an error fails the transaction here too (the leader's state says the
    /// same, or the transaction is gone there).
    async fn call(&self, call: TxnCall) -> Result<TxnAnswer, ServiceError> {
        let answer = self
            .svc
            .peers
            .txn_call(
                &self.node,
                self.principal.as_ref(),
                &self.txn_id,
                &call,
                self.svc.txn_call_timeout(),
            )
            .await;
        if answer.is_err() && self.status() == TxnStatus::Active {
            self.set(TxnStatus::Failed);
        }
        answer
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        if self.status() == TxnStatus::Ended {
            return;
        }
        // Tell the leader now rather than leave the writer held until its idle limit.
        let (svc, node, txn_id, principal) = (
            self.svc.clone(),
            self.node.clone(),
            self.txn_id.clone(),
            self.principal.clone(),
        );
        tokio::spawn(async move {
            let timeout = svc.txn_call_timeout();
            let _ = svc
                .peers
                .txn_call(
                    &node,
                    principal.as_ref(),
                    &txn_id,
                    &TxnCall::Rollback,
                    timeout,
                )
                .await;
        });
    }
}

fn unexpected(a: TxnAnswer) -> ServiceError {
    ServiceError::internal(format!("unexpected answer to a transaction call: {a:?}"))
}
