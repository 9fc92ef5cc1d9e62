//! Who a certificate names: the contract between `raftpg cert` (which writes it) and the
//! nodes (which read it from a peer's verified certificate). A node certificate carries the
//! URI SAN `raftpg://node/<id>`, a client certificate `raftpg://client/<name>`; exactly one
//! `raftpg:` URI per certificate. Nothing here verifies a certificate: read the identity only
//! after TLS verified the certificate against the cluster CA. Also the other half of who a
//! client is: the role it authenticates as ([`Credentials`]).

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

/// The URI SAN prefix that names a node: `raftpg://node/<id>`.
pub const NODE_URI_PREFIX: &str = "raftpg://node/";
/// The URI SAN prefix that names a client: `raftpg://client/<name>`.
pub const CLIENT_URI_PREFIX: &str = "raftpg://client/";

/// Client and cluster names: 1 to 64 of `[A-Za-z0-9._-]`, not starting with `.` or `-` (they
/// become file names and URIs).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Who a certificate names (its one `raftpg://` URI SAN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// `raftpg://node/<id>`
    Node(u64),
    /// `raftpg://client/<name>`
    Client(String),
}

/// The identity a DER certificate names: its one `raftpg://` URI SAN. `None` if the
/// certificate does not parse, has no such URI, has more than one, or the one it has is not
/// well formed. Verifies nothing (see the module doc).
pub fn identity_of(cert_der: &[u8]) -> Option<Identity> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    identity(&cert)
}

/// The node id a DER certificate names in its URI SAN `raftpg://node/<id>`; `None` for any
/// other certificate (a client's, none, several, malformed). Verifies nothing: call it on the
/// peer's leaf certificate after TLS verified it against the cluster CA.
pub fn node_id_of(cert_der: &[u8]) -> Option<u64> {
    match identity_of(cert_der)? {
        Identity::Node(id) => Some(id),
        Identity::Client(_) => None,
    }
}

/// The client name a DER certificate names in its URI SAN `raftpg://client/<name>`; `None`
/// for any other certificate. Verifies nothing.
pub fn client_name_of(cert_der: &[u8]) -> Option<String> {
    match identity_of(cert_der)? {
        Identity::Client(name) => Some(name),
        Identity::Node(_) => None,
    }
}

fn identity(cert: &X509Certificate<'_>) -> Option<Identity> {
    let san = cert.subject_alternative_name().ok()??;
    let mut found = None;
    for g in &san.value.general_names {
        let GeneralName::URI(uri) = g else { continue };
        if !uri.starts_with("raftpg:") {
            continue;
        }
        if found.is_some() {
            return None;
        }
        found = Some(parse_identity_uri(uri)?);
    }
    found
}

fn parse_identity_uri(uri: &str) -> Option<Identity> {
    if let Some(id) = uri.strip_prefix(NODE_URI_PREFIX) {
        let canonical =
            !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) && !id.starts_with('0');
        if !canonical {
            return None;
        }
        return id.parse().ok().map(Identity::Node);
    }
    let name = uri.strip_prefix(CLIENT_URI_PREFIX)?;
    if !is_valid_name(name) {
        return None;
    }
    Some(Identity::Client(name.to_string()))
}

/// The DER of the first `CERTIFICATE` block of a PEM text.
pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    let mut rest = pem.as_bytes();
    while !rest.is_empty() {
        let (next, block) = x509_parser::pem::parse_x509_pem(rest).ok()?;
        if block.label == "CERTIFICATE" {
            return Some(block.contents);
        }
        rest = next;
    }
    None
}

/// A PostgreSQL role's name and password, as a client sends them (`raftpg-user`,
/// `raftpg-password`) and a node checks them. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The role.
    pub user: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<hidden>")
            .finish()
    }
}
