//! The caller of a gRPC request, from its metadata: `raftpg-user` and `raftpg-password`
//! (credentials), or — on the peer port, where only member nodes get through — the role the
//! forwarding node authenticated (`raftpg-principal`, `raftpg-principal-admin`). The client
//! port's gate drops the latter, so a client cannot claim a role without its password.

use raftpg_proto::{
    PASSWORD_METADATA, PRINCIPAL_ADMIN_METADATA, PRINCIPAL_METADATA, USER_METADATA,
};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Status};

use super::peer_auth::FromPeer;
use super::status::to_status;
use crate::auth::authenticator::{Credentials, Principal, CREDENTIAL_BYTES_MAX};
use crate::service::{Caller, Service};

/// The role `request` runs as (see `service::auth`). A request from a member node (peer
/// port) without a forwarded role is the node's own (a status probe, say) and runs as raftpg.
pub async fn principal<T>(
    svc: &Service,
    request: &Request<T>,
) -> Result<Option<Principal>, Status> {
    principal_of(svc, request, false).await
}

/// [`principal`] for a status request (see `Service::authenticate`).
pub async fn status_principal<T>(
    svc: &Service,
    request: &Request<T>,
) -> Result<Option<Principal>, Status> {
    principal_of(svc, request, true).await
}

async fn principal_of<T>(
    svc: &Service,
    request: &Request<T>,
    for_status: bool,
) -> Result<Option<Principal>, Status> {
    let caller = caller_of(request.metadata())?;
    if matches!(caller, Caller::Anonymous) && request.extensions().get::<FromPeer>().is_some() {
        return Ok(None);
    }
    svc.authenticate(caller, for_status)
        .await
        .map_err(to_status)
}

/// The caller named by `meta`.
pub fn caller_of(meta: &MetadataMap) -> Result<Caller, Status> {
    let text = |key: &str| -> Result<Option<String>, Status> {
        match meta.get(key) {
            None => Ok(None),
            Some(v) => {
                let s = v.to_str().map_err(|_| {
                    Status::invalid_argument(format!("metadata {key} must be ASCII text"))
                })?;
                if s.len() > CREDENTIAL_BYTES_MAX {
                    return Err(Status::invalid_argument(format!(
                        "metadata {key} is too long"
                    )));
                }
                Ok(Some(s.to_string()))
            }
        }
    };
    if let Some(user) = text(PRINCIPAL_METADATA)? {
        let admin = text(PRINCIPAL_ADMIN_METADATA)?.as_deref() == Some("1");
        return Ok(Caller::Node(Principal { user, admin }));
    }
    match (text(USER_METADATA)?, text(PASSWORD_METADATA)?) {
        (Some(user), Some(password)) => Ok(Caller::Credentials(Credentials { user, password })),
        (None, None) => Ok(Caller::Anonymous),
        _ => Err(Status::invalid_argument(
            "send both raftpg-user and raftpg-password, or neither",
        )),
    }
}

/// Marks a request forwarded by this node as running as `principal`.
pub fn forward_principal(meta: &mut MetadataMap, principal: Option<&Principal>) {
    if let Some(p) = principal {
        if let Ok(v) = MetadataValue::try_from(p.user.as_str()) {
            meta.insert(PRINCIPAL_METADATA, v);
            meta.insert(
                PRINCIPAL_ADMIN_METADATA,
                MetadataValue::from_static(if p.admin { "1" } else { "0" }),
            );
        }
    }
}
