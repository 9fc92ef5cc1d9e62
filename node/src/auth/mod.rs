//! Who a request comes from: clients authenticate with a PostgreSQL role's name and password,
//! checked against the role's SCRAM-SHA-256 verifier ([`authenticator`], [`scram`]). Roles are
//! ordinary replicated writes (`CREATE ROLE … PASSWORD …`, the password turned into its
//! verifier on the leader by the SQL gate), so every node checks against the same verifiers.
//! Protocol-free: the gRPC frontend reads the credentials from metadata, the wire protocol
//! will run a SCRAM exchange against the same verifiers.

pub mod authenticator;
pub mod scram;
