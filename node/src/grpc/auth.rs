//! The caller of a gRPC request, from its metadata: `raftpg-user` and `raftpg-password`
//! (credentials), or — on the peer port, where only member nodes get through — the role the
//! forwarding node authenticated (`raftpg-principal`, `raftpg-principal-admin`). The client
//! port's gate drops the latter, so a client cannot claim a role without its password. Names
//! and passwords that are not printable ASCII come as binary metadata
//! (`raftpg_proto::metadata`).

use raftpg_proto::metadata::{self, Field};
use raftpg_proto::PRINCIPAL_ADMIN_METADATA;
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
    let text = |field: Field| -> Result<Option<String>, Status> {
        let value =
            metadata::get(meta, field).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if value
            .as_ref()
            .is_some_and(|s| s.len() > CREDENTIAL_BYTES_MAX)
        {
            return Err(Status::invalid_argument(format!(
                "metadata {} is too long",
                field.text
            )));
        }
        Ok(value)
    };
    if let Some(user) = text(metadata::PRINCIPAL)? {
        let admin = meta
            .get(PRINCIPAL_ADMIN_METADATA)
            .is_some_and(|v| v.as_bytes() == b"1");
        return Ok(Caller::Node(Principal { user, admin }));
    }
    match (text(metadata::USER)?, text(metadata::PASSWORD)?) {
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
        metadata::insert(meta, metadata::PRINCIPAL, &p.user);
        meta.insert(
            PRINCIPAL_ADMIN_METADATA,
            MetadataValue::from_static(if p.admin { "1" } else { "0" }),
        );
    }
}
