//! What a client can do with a node, with no protocol in it: submit a write, run a read at a
//! consistency level, change the membership, ask for status, check for divergence.
//!
//! Every frontend (gRPC today, the PostgreSQL wire protocol next) decodes its request, calls a
//! method of [`Service`], and encodes the answer or the [`ServiceError`]. Everything a request
//! goes through between those — limits, the SQL gate, admission, routing to the leader, request
//! ids, proposing, waiting for the outcome, the consistency waits — is here, once.
//!
//! - [`write`]: a write becomes a log entry (on the leader) and its applied result.
//! - [`read`]: a read waits for its consistency level, then runs in one snapshot.
//! - [`txn`]: interactive transactions (`BEGIN` … `COMMIT` with round trips) on the leader;
//!   [`txn_route`]: the frontends' handle on one from any node, and transactions named by id.
//! - [`auth`]: who a request comes from ([`auth::Caller`] → a role) and who may administer.
//! - [`membership`], [`check`], [`status`], [`repair`], [`backup`]: the cluster operations.
//! - [`peers`]: how this node reaches the others ([`PeerLink`], implemented by a frontend's
//!   client side); [`Service::route`] is the one way a request finds the leader.
//! - [`node`]: [`Service`], the node's shared handles; [`types`]: requests and answers;
//!   [`error`]: [`ServiceError`].
//!
//! Inside this folder, modules import from the module that defines an item, never through
//! these re-exports (which are for the frontends), so the module graph has no cycles.
//!
//! Owns the node's shared handles ([`Service`]) and its removed marker. Keeps design.md
//! invariant 5 (bad input is refused before it enters the log) and never touches the applier's
//! PostgreSQL session: a write reaches PostgreSQL only through the log.

pub mod auth;
pub mod backup;
pub mod check;
pub mod error;
pub mod membership;
pub mod node;
pub mod peers;
pub mod read;
pub mod repair;
pub mod status;
pub mod txn;
pub mod txn_route;
pub mod types;
pub mod write;

pub use auth::Caller;
pub use error::{ErrorKind, LeaderHint, ServiceError};
pub use node::TxnLimits;
pub use node::{Limits, Route, Service, ServiceParts};
pub use peers::PeerLink;
pub use txn::{BeginRequest, TxnStatus};
pub use txn_route::{Txn, TxnRegistry};
pub use types::*;
