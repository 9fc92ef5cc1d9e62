//! Who a request comes from, and what that role may do to the cluster.
//!
//! A frontend hands over the caller as it saw it ([`Caller`]): credentials to check, a role a
//! member node already authenticated (a forwarded request, on the peer port), or nobody.
//! [`Service::authenticate`] turns it into the [`Principal`] the request runs as. Without
//! credentials a request is refused when the node requires authentication, and otherwise runs
//! as raftpg itself (a cluster started with `--insecure`, on a network nobody else reaches).
//! Membership changes, divergence checks and other nodes' status need an administrator
//! ([`Service::require_admin`]): a superuser or a member of `raftpg_admin`.

use super::error::{ErrorKind, ServiceError};
use super::node::Service;
use crate::auth::authenticator::{AuthError, Credentials, Principal};

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
    /// that does not require authentication).
    pub async fn authenticate(&self, caller: Caller) -> Result<Option<Principal>, ServiceError> {
        match caller {
            Caller::Node(p) => Ok(Some(p)),
            Caller::Credentials(c) => self
                .authenticator
                .authenticate(&c)
                .await
                .map(Some)
                .map_err(auth_error),
            Caller::Anonymous if self.auth_required => Err(auth_error(AuthError::Missing)),
            Caller::Anonymous => Ok(None),
        }
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
