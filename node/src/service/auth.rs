//! Who a request comes from, and what that role may do to the cluster.
//!
//! A frontend hands over the caller as it saw it ([`Caller`]): credentials to check, a role a
//! member node already authenticated (a forwarded request, on the peer port), or nobody.
//! [`Service::authenticate`] turns it into the [`Principal`] the request runs as. Without
//! credentials a request is refused when the node requires authentication, and otherwise runs
//! as raftpg itself (a cluster started with `--insecure`, on a network nobody else reaches).
//! Membership changes, divergence checks and other nodes' status need an administrator
//! ([`Service::require_admin`]): a superuser or a member of `raftpg_admin`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, info};

use super::error::{ErrorKind, ServiceError};
use super::node::Service;
use super::types::{Origin, WriteRequest, WriteStatement};
use crate::auth::authenticator::{AuthError, Credentials, Principal};
use crate::auth::scram::Verifier;
use crate::command::RequestId;

/// The caller of a request, as its frontend saw it.
#[derive(Clone, Debug)]
pub enum Caller {
    /// No credentials.
    Anonymous,
    /// A user name and password to check.
    Credentials(Credentials),
    /// A role a member node authenticated before forwarding the request here.
    Node(Principal),
}

impl Service {
    /// The role a request runs as (`None`: raftpg itself, for an anonymous request on a node
    /// that does not require authentication). `for_status`: a status request, which a recent
    /// match of the password may authenticate without reading the roles again (so that a node
    /// whose PostgreSQL is out can still say so).
    pub async fn authenticate(
        &self,
        caller: Caller,
        for_status: bool,
    ) -> Result<Option<Principal>, ServiceError> {
        match caller {
            Caller::Node(p) => Ok(Some(p)),
            Caller::Credentials(c) => self
                .authenticator
                .authenticate(&c, for_status)
                .await
                .map(Some)
                .map_err(auth_error),
            Caller::Anonymous if self.auth_required => Err(auth_error(AuthError::Missing)),
            Caller::Anonymous => Ok(None),
        }
    }

    /// Whether requests must authenticate (the node runs with TLS; `--insecure` does not).
    pub fn auth_required(&self) -> bool {
        self.auth_required
    }

    /// For a frontend that runs the password exchange itself (the wire protocol's SCRAM): the
    /// verifier of `user`'s password and the principal a successful exchange authenticates.
    pub async fn login_verifier(&self, user: &str) -> Result<(Verifier, Principal), ServiceError> {
        self.authenticator
            .login_verifier(user)
            .await
            .map_err(auth_error)
    }

    /// Refuses a cluster operation to a role that does not administer the cluster.
    pub fn require_admin(
        &self,
        principal: Option<&Principal>,
        what: &str,
    ) -> Result<(), ServiceError> {
        match principal {
            Some(p) if !p.admin => Err(ServiceError {
                sqlstate: Some("42501".into()),
                ..ServiceError::new(
                    ErrorKind::PermissionDenied,
                    format!(
                        "role \"{}\" may not {what}: that needs a member of raftpg_admin (GRANT raftpg_admin TO {})",
                        p.user, p.user
                    ),
                )
            }),
            _ => Ok(()),
        }
    }
}

/// How often a node looks whether the first administrator exists (until it does).
const FIRST_ADMIN_EVERY: Duration = Duration::from_millis(200);

impl Service {
    /// Creates the cluster's first administrator (see `--admin-password-file`) once: while
    /// the role does not exist here, the leader writes `CREATE ROLE … LOGIN CREATEROLE
    /// PASSWORD …` and `GRANT raftpg_admin TO …` as one write (the gate turns the password into
    /// its verifier), with a fixed request id so that two leaders in a row create it once.
    /// Returns when the role exists here, when the write is settled, or at shutdown; then the
    /// authenticator stops answering "not created yet" for it.
    pub async fn create_first_admin(
        self: Arc<Self>,
        credentials: Credentials,
        shutdown: watch::Receiver<bool>,
    ) {
        self.create_first_admin_until_settled(credentials, shutdown)
            .await;
        self.authenticator.first_admin_settled();
    }

    async fn create_first_admin_until_settled(
        &self,
        credentials: Credentials,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let ident = format!("\"{}\"", credentials.user.replace('"', "\"\""));
        let literal = format!("'{}'", credentials.password.replace('\'', "''"));
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(FIRST_ADMIN_EVERY) => {}
            }
            match self.role_exists(&credentials.user).await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    debug!(error = %e.message, "looking for the first administrator");
                    continue;
                }
            }
            if !self.is_leader() {
                continue;
            }
            let statement = |sql: String| WriteStatement {
                sql,
                params: Ok(Vec::new()),
            };
            let req = WriteRequest {
                statements: vec![
                    statement(format!(
                        "CREATE ROLE {ident} LOGIN CREATEROLE PASSWORD {literal}"
                    )),
                    statement(format!("GRANT raftpg_admin TO {ident}")),
                ],
                request_id: Some(RequestId {
                    client_id: "raftpg-first-admin".into(),
                    seq: 1,
                }),
                encoded_bytes: 0,
                origin: Origin::Client,
                principal: None,
            };
            match self.write(req).await {
                Ok(o) => {
                    info!(user = %credentials.user, log_index = o.log_index, "created the first administrator");
                    return;
                }
                Err(e) if e.sqlstate.as_deref() == Some("42710") => return,
                Err(e) => {
                    debug!(error = %e.message, "creating the first administrator; will retry")
                }
            }
        }
    }

    /// Whether role `name` exists on this node.
    async fn role_exists(&self, name: &str) -> Result<bool, ServiceError> {
        let unavailable =
            |e: &dyn std::fmt::Display| ServiceError::unavailable(e.to_string(), None);
        let mut pooled = self.reads.get().await.map_err(|e| unavailable(&e))?;
        let row = pooled
            .base_client()
            .await
            .map_err(|e| ServiceError::unavailable(format!("PostgreSQL: {e}"), None))?
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1",
                &[&name],
            )
            .await
            .map_err(|e| unavailable(&e))?;
        pooled.release();
        Ok(row.is_some())
    }
}

/// The service error of an authentication failure (28000 / 28P01, or unavailable).
fn auth_error(e: AuthError) -> ServiceError {
    match e.sqlstate() {
        Some(state) => ServiceError {
            sqlstate: Some(state.into()),
            ..ServiceError::new(ErrorKind::Unauthenticated, e.to_string())
        },
        None => ServiceError::unavailable(e.to_string(), None),
    }
}
