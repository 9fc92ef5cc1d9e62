//! Certificates for TLS between nodes and for clients (`raftpg cert`, issue 16).
//!
//! One directory holds a cluster's certificates. All keys are ECDSA P-256 (signed with
//! SHA-256); every file is PEM; every `.key` file is PKCS#8 and has mode 0600; a directory this
//! module creates has mode 0700.
//!
//! | file | what | made by |
//! | --- | --- | --- |
//! | `ca.crt` | the cluster CA: self-signed, `CA:true, pathlen:0` (critical), key usage `keyCertSign, cRLSign`, CN `raftpg cluster CA <cluster-name>`. The one trust anchor of nodes and clients. | [`init_ca`] (`raftpg cert init`) |
//! | `ca.key` | the CA's private key; needed only to issue certificates, not by a running node | [`init_ca`] |
//! | `node-<N>.crt`, `node-<N>.key` | node `N`: signed by the CA, extended key usages `serverAuth` and `clientAuth` (a node is server and client on the peer port), key usage `digitalSignature`, CN `raftpg node <N>`; SANs: each host as a DNS name or an IP address, and the URI `raftpg://node/<N>` | [`issue_node`] (`raftpg cert node`) |
//! | `client-<NAME>.crt`, `client-<NAME>.key` | client `NAME`: signed by the CA, extended key usage `clientAuth` only, CN `NAME`, SAN URI `raftpg://client/<NAME>` | [`issue_client`] (`raftpg cert client`) |
//!
//! [`ensure_cluster`] (`raftpg cert cluster`) makes a local cluster's set: the CA if missing,
//! `node-1` … `node-N` for the given hosts (127.0.0.1 and localhost by default) and the client
//! `admin`, keeping every file that is still good (see its doc).
//!
//! ## The identities: the contract with the node
//! A certificate's identity is its one `raftpg://` URI SAN, never its CN or its hosts:
//! - `raftpg://node/<N>` names node id `N` (decimal, no sign, no leading zero, `N > 0`).
//!   [`node_id_of`] reads it. On the peer port the node verifies the peer's chain against
//!   `ca.crt` (rustls' `WebPkiClientVerifier`/`WebPkiServerVerifier`) and then takes the peer's
//!   node id from the leaf with [`node_id_of`]; a certificate without one — a client
//!   certificate of the same CA, which has `clientAuth` too — is not a node and must be refused.
//! - `raftpg://client/<NAME>` names client `NAME` ([`client_name_of`]).
//!
//! A certificate with more than one `raftpg://` URI, or one that does not parse, has no
//! identity. These functions do not verify anything: call them only on a certificate that
//! the TLS layer has verified against the cluster CA.
//!
//! The node's files, in one place: [`NodeFiles::in_dir`] (`ca.crt`, `node-<N>.crt`,
//! `node-<N>.key`), as tonic's `Certificate::from_pem` / `Identity::from_pem` take them.
//! A leaf file holds the leaf only (no chain): there is no intermediate CA.
//!
//! Validity starts one hour before issue (clock skew between machines) and lasts the given
//! number of days; a leaf never outlives its CA (its end is cut to the CA's). Serial numbers
//! are 16 random bytes. Replacing the CA (`init --force`) leaves the existing leaves unusable:
//! issue them again.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

/// The CA certificate's file name in the directory.
pub const CA_CERT: &str = "ca.crt";
/// The CA key's file name in the directory.
pub const CA_KEY: &str = "ca.key";
pub use raftpg_proto::identity::{
    client_name_of, identity_of, node_id_of, pem_to_der, Identity, CLIENT_URI_PREFIX,
    NODE_URI_PREFIX,
};
/// Default validity of the CA, in days.
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default validity of a node or client certificate, in days.
pub const DEFAULT_LEAF_DAYS: u32 = 825;
/// Default cluster name (in the CA's name).
pub const DEFAULT_CLUSTER_NAME: &str = "raftpg";
/// The client certificate [`ensure_cluster`] makes.
pub const ADMIN_CLIENT: &str = "admin";
/// The hosts [`ensure_cluster`] names when given none.
pub const LOCAL_HOSTS: [&str; 2] = ["127.0.0.1", "localhost"];
/// Longest validity accepted, in days (100 years).
pub const MAX_DAYS: u32 = 36_500;

/// What went wrong making or reading certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file would be overwritten.
    #[error("{0} already exists (pass --force to replace it)")]
    Exists(PathBuf),
    /// The directory has no CA (or only half of one).
    #[error("no CA in {dir}: {CA_CERT} and {CA_KEY} are needed (create them with `raftpg cert init --dir {dir}`)", dir = .0.display())]
    NoCa(PathBuf),
    /// The CA files do not make a usable CA.
    #[error("{path}: not a usable CA: {reason}")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A host is neither an IP address nor a DNS name.
    #[error("invalid host {0:?}: give an IP address or a DNS name, without a port")]
    BadHost(String),
    /// No host was given for a node certificate.
    #[error("a node certificate needs at least one host")]
    NoHosts,
    /// A node id of 0.
    #[error("invalid node id 0: node ids are > 0")]
    BadNodeId,
    /// A client or cluster name with characters outside `[A-Za-z0-9._-]`.
    #[error("invalid name {0:?}: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with . or -)")]
    BadName(String),
    /// A validity out of range.
    #[error("invalid validity of {0} days: give 1 to {MAX_DAYS}")]
    BadDays(u32),
    /// The CA expires before the new certificate would start.
    #[error("the CA has expired: make a new one (`raftpg cert init --force`)")]
    CaExpired,
    /// rcgen refused to make a certificate.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct CertAndKey {
    /// The certificate (PEM, one `CERTIFICATE` block).
    pub cert_pem: String,
    /// The private key (PEM, PKCS#8 `PRIVATE KEY`).
    pub key_pem: String,
}

impl std::fmt::Debug for CertAndKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAndKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[elided]")
            .finish()
    }
}

/// A loaded CA that can sign certificates.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// The CA's end of validity, Unix seconds.
    not_after: i64,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("issuer", &self.issuer)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl Ca {
    /// A CA from its certificate and key (PEM). The certificate must be a CA certificate whose
    /// public key is the key's.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, String> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| format!("key: {e}"))?;
        let der = pem_to_der(cert_pem).ok_or("certificate: no PEM CERTIFICATE block")?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| format!("certificate: {e}"))?;
        if !cert.is_ca() {
            return Err("certificate: not a CA (no basicConstraints CA:true)".into());
        }
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err("the key is not the certificate's".into());
        }
        let not_after = cert.validity().not_after.timestamp();
        let issuer =
            Issuer::from_ca_cert_der(&der.into(), key).map_err(|e| format!("certificate: {e}"))?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            issuer,
            not_after,
        })
    }

    /// Loads `DIR/ca.crt` and `DIR/ca.key`.
    pub fn load(dir: &Path) -> Result<Ca, CertError> {
        let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
        if !cert_path.exists() || !key_path.exists() {
            return Err(CertError::NoCa(dir.to_path_buf()));
        }
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        Ca::from_pem(&cert_pem, &key_pem).map_err(|reason| CertError::BadCa {
            path: cert_path,
            reason,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
}

/// The files a node reads: `DIR/ca.crt`, `DIR/node-<N>.crt`, `DIR/node-<N>.key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFiles {
    /// The cluster CA certificate (trust anchor for peers and clients).
    pub ca: PathBuf,
    /// The node's certificate (its identity as server and as client on the peer port).
    pub cert: PathBuf,
    /// The node's private key.
    pub key: PathBuf,
}

impl NodeFiles {
    /// The paths for node `id` in `dir`.
    pub fn in_dir(dir: &Path, id: u64) -> NodeFiles {
        NodeFiles {
            ca: dir.join(CA_CERT),
            cert: dir.join(node_cert_file(id)),
            key: dir.join(node_key_file(id)),
        }
    }
}

/// `node-<id>.crt`
pub fn node_cert_file(id: u64) -> String {
    format!("node-{id}.crt")
}

/// `node-<id>.key`
pub fn node_key_file(id: u64) -> String {
    format!("node-{id}.key")
}

/// `client-<name>.crt`
pub fn client_cert_file(name: &str) -> String {
    format!("client-{name}.crt")
}

/// `client-<name>.key`
pub fn client_key_file(name: &str) -> String {
    format!("client-{name}.key")
}

/// A new self-signed cluster CA valid for `days`.
pub fn new_ca(cluster_name: &str, days: u32) -> Result<CertAndKey, CertError> {
    check_name(cluster_name)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    set_validity(&mut params, days, None)?;
    params.distinguished_name = dn(&format!("raftpg cluster CA {cluster_name}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A new certificate for node `id` reachable at `hosts` (IP addresses or DNS names), signed by
/// `ca`, valid for `days` (at most until the CA's end).
pub fn new_node_cert(
    ca: &Ca,
    id: u64,
    hosts: &[String],
    days: u32,
) -> Result<CertAndKey, CertError> {
    if id == 0 {
        return Err(CertError::BadNodeId);
    }
    let hosts = parse_hosts(hosts)?;
    if hosts.is_empty() {
        return Err(CertError::NoHosts);
    }
    let mut sans = hosts;
    sans.push(SanType::URI(ia5(&format!("{NODE_URI_PREFIX}{id}"))?));
    leaf(
        ca,
        &format!("raftpg node {id}"),
        sans,
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        days,
    )
}

/// A new certificate for client `name`, signed by `ca`, valid for `days` (at most until the
/// CA's end).
pub fn new_client_cert(ca: &Ca, name: &str, days: u32) -> Result<CertAndKey, CertError> {
    check_name(name)?;
    let sans = vec![SanType::URI(ia5(&format!("{CLIENT_URI_PREFIX}{name}"))?)];
    leaf(
        ca,
        name,
        sans,
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        days,
    )
}

fn leaf(
    ca: &Ca,
    common_name: &str,
    sans: Vec<SanType>,
    ekus: Vec<ExtendedKeyUsagePurpose>,
    days: u32,
) -> Result<CertAndKey, CertError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    set_validity(&mut params, days, Some(ca.not_after))?;
    params.distinguished_name = dn(common_name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = ekus;
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    let cert = params.signed_by(&key, &ca.issuer)?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Creates the cluster CA in `dir` (`ca.crt`, `ca.key`), creating `dir` (mode 0700) if needed.
/// Refuses ([`CertError::Exists`]) if either file exists, unless `force`.
/// Returns the paths written (certificate, key).
pub fn init_ca(
    dir: &Path,
    cluster_name: &str,
    days: u32,
    force: bool,
) -> Result<(PathBuf, PathBuf), CertError> {
    let paths = (dir.join(CA_CERT), dir.join(CA_KEY));
    let ck = new_ca(cluster_name, days)?;
    write_pair(dir, &paths, &ck, force)?;
    Ok(paths)
}

/// Issues node `id`'s certificate from the CA in `dir` and writes `node-<id>.crt/.key` there.
/// Refuses ([`CertError::Exists`]) if either file exists, unless `force`.
/// Returns the paths written (certificate, key).
pub fn issue_node(
    dir: &Path,
    id: u64,
    hosts: &[String],
    days: u32,
    force: bool,
) -> Result<(PathBuf, PathBuf), CertError> {
    let ca = Ca::load(dir)?;
    let paths = (dir.join(node_cert_file(id)), dir.join(node_key_file(id)));
    let ck = new_node_cert(&ca, id, hosts, days)?;
    write_pair(dir, &paths, &ck, force)?;
    Ok(paths)
}

/// Issues client `name`'s certificate from the CA in `dir` and writes `client-<name>.crt/.key`
/// there. Refuses ([`CertError::Exists`]) if either file exists, unless `force`.
/// Returns the paths written (certificate, key).
pub fn issue_client(
    dir: &Path,
    name: &str,
    days: u32,
    force: bool,
) -> Result<(PathBuf, PathBuf), CertError> {
    check_name(name)?;
    let ca = Ca::load(dir)?;
    let paths = (
        dir.join(client_cert_file(name)),
        dir.join(client_key_file(name)),
    );
    let ck = new_client_cert(&ca, name, days)?;
    write_pair(dir, &paths, &ck, force)?;
    Ok(paths)
}

/// What [`ensure_cluster`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClusterCerts {
    /// Whether it created the CA.
    pub created_ca: bool,
    /// Certificates it wrote (with their keys beside them).
    pub issued: Vec<PathBuf>,
    /// Certificates it kept as they were.
    pub kept: Vec<PathBuf>,
}

/// Makes the certificates of a local cluster of `nodes` nodes in `dir`: the CA if missing
/// (named after `cluster_name`, [`DEFAULT_CA_DAYS`]), `node-1` … `node-<nodes>` for `hosts`
/// ([`LOCAL_HOSTS`] if empty) and the client [`ADMIN_CLIENT`] ([`DEFAULT_LEAF_DAYS`] each).
///
/// Safe to run again: an existing leaf is kept if its key is there and matches, it is signed
/// by this CA, names the right identity, covers every host asked for and is valid for at least
/// another day; otherwise it is issued again. A directory with half a CA (one of `ca.crt`,
/// `ca.key`) or a CA that does not load is an error, never replaced.
pub fn ensure_cluster(
    dir: &Path,
    nodes: u64,
    hosts: &[String],
    cluster_name: &str,
) -> Result<ClusterCerts, CertError> {
    let hosts: Vec<String> = if hosts.is_empty() {
        LOCAL_HOSTS.iter().map(|h| h.to_string()).collect()
    } else {
        hosts.to_vec()
    };
    parse_hosts(&hosts)?;
    check_name(cluster_name)?;
    let mut out = ClusterCerts::default();
    let (ca_cert, ca_key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    match (ca_cert.exists(), ca_key.exists()) {
        (false, false) => {
            init_ca(dir, cluster_name, DEFAULT_CA_DAYS, false)?;
            out.created_ca = true;
        }
        (true, true) => {}
        _ => return Err(CertError::NoCa(dir.to_path_buf())),
    }
    let ca = Ca::load(dir)?;
    let ca_der = pem_to_der(ca.cert_pem()).ok_or_else(|| CertError::BadCa {
        path: ca_cert.clone(),
        reason: "no PEM CERTIFICATE block".into(),
    })?;
    for id in 1..=nodes {
        let paths = (dir.join(node_cert_file(id)), dir.join(node_key_file(id)));
        let want = Wanted::Node(id, &hosts);
        if !out.created_ca && still_good(&paths, &ca_der, &want) {
            out.kept.push(paths.0);
        } else {
            let ck = new_node_cert(&ca, id, &hosts, DEFAULT_LEAF_DAYS)?;
            write_pair(dir, &paths, &ck, true)?;
            out.issued.push(paths.0);
        }
    }
    let paths = (
        dir.join(client_cert_file(ADMIN_CLIENT)),
        dir.join(client_key_file(ADMIN_CLIENT)),
    );
    if !out.created_ca && still_good(&paths, &ca_der, &Wanted::Client(ADMIN_CLIENT)) {
        out.kept.push(paths.0);
    } else {
        let ck = new_client_cert(&ca, ADMIN_CLIENT, DEFAULT_LEAF_DAYS)?;
        write_pair(dir, &paths, &ck, true)?;
        out.issued.push(paths.0);
    }
    Ok(out)
}

enum Wanted<'a> {
    Node(u64, &'a [String]),
    Client(&'a str),
}

/// Whether the leaf at `paths` can be kept (see [`ensure_cluster`]).
fn still_good(paths: &(PathBuf, PathBuf), ca_der: &[u8], want: &Wanted<'_>) -> bool {
    let (Ok(cert_pem), Ok(key_pem)) = (fs::read_to_string(&paths.0), fs::read_to_string(&paths.1))
    else {
        return false;
    };
    let (Some(der), Ok(key)) = (pem_to_der(&cert_pem), KeyPair::from_pem(&key_pem)) else {
        return false;
    };
    let (Ok((_, cert)), Ok((_, ca))) = (
        x509_parser::parse_x509_certificate(&der),
        x509_parser::parse_x509_certificate(ca_der),
    ) else {
        return false;
    };
    if cert.public_key().raw != key.subject_public_key_info().as_slice()
        || cert.issuer() != ca.subject()
        || cert.verify_signature(Some(ca.public_key())).is_err()
    {
        return false;
    }
    let now = unix_now();
    let v = cert.validity();
    if v.not_before.timestamp() > now || v.not_after.timestamp() < now + 86_400 {
        return false;
    }
    match want {
        Wanted::Node(id, hosts) => {
            identity_of(&der) == Some(Identity::Node(*id)) && covers_hosts(&cert, hosts)
        }
        Wanted::Client(name) => identity_of(&der) == Some(Identity::Client(name.to_string())),
    }
}

fn covers_hosts(cert: &X509Certificate<'_>, hosts: &[String]) -> bool {
    let Ok(wanted) = parse_hosts(hosts) else {
        return false;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    wanted.iter().all(|w| {
        san.value.general_names.iter().any(|g| match (w, g) {
            (SanType::DnsName(d), GeneralName::DNSName(n)) => d.as_str().eq_ignore_ascii_case(n),
            (SanType::IpAddress(ip), GeneralName::IPAddress(b)) => ip_bytes(ip) == *b,
            _ => false,
        })
    })
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Parses hosts into SANs: an IP literal (`[...]` allowed for IPv6) becomes an IP address
/// SAN, anything else must be a DNS name (letters, digits, `-`, labels of 1 to 63 separated by
/// dots; written in lower case without a final dot). Duplicates are dropped.
fn parse_hosts(hosts: &[String]) -> Result<Vec<SanType>, CertError> {
    let mut out = Vec::new();
    for raw in hosts {
        let h = raw.trim();
        let unbracketed = h
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .unwrap_or(h);
        let san = if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            SanType::IpAddress(ip)
        } else if is_dns_name(h) {
            // Lower case, without a final dot: as TLS clients compare them.
            let name = h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase();
            SanType::DnsName(ia5(&name)?)
        } else {
            return Err(CertError::BadHost(raw.clone()));
        };
        if !out.contains(&san) {
            out.push(san);
        }
    }
    Ok(out)
}

fn is_dns_name(h: &str) -> bool {
    let h = h.strip_suffix('.').unwrap_or(h);
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        // All digits and dots would be a mistyped IPv4 address.
        && !h.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// Client and cluster names: 1 to 64 of `[A-Za-z0-9._-]`, not starting with `.` or `-` (they
/// become file names and URIs).
fn check_name(name: &str) -> Result<(), CertError> {
    if raftpg_proto::identity::is_valid_name(name) {
        Ok(())
    } else {
        Err(CertError::BadName(name.to_string()))
    }
}

fn ia5(s: &str) -> Result<Ia5String, CertError> {
    Ok(Ia5String::try_from(s.to_string())?)
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn random_serial() -> SerialNumber {
    let mut bytes = *uuid::Uuid::new_v4().as_bytes();
    // Positive and 16 bytes long when encoded.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Sets the validity: from an hour ago for `days`, cut to `ca_not_after` (Unix seconds) if
/// given.
fn set_validity(
    params: &mut CertificateParams,
    days: u32,
    ca_not_after: Option<i64>,
) -> Result<(), CertError> {
    if days == 0 || days > MAX_DAYS {
        return Err(CertError::BadDays(days));
    }
    let now = unix_now();
    let start = now - 3600;
    let mut end = now + i64::from(days) * 86_400;
    if let Some(ca_end) = ca_not_after {
        if ca_end <= now {
            return Err(CertError::CaExpired);
        }
        end = end.min(ca_end);
    }
    // rcgen's date type (from `time`) plus a std Duration: no `time` dependency of our own.
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(start.max(0) as u64);
    params.not_after = epoch + Duration::from_secs(end.max(0) as u64);
    Ok(())
}

fn read(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a certificate (0644) and its key (0600) through temporary files renamed into place,
/// creating `dir` (0700) if missing. Refuses if either exists, unless `force`.
fn write_pair(
    dir: &Path,
    (cert_path, key_path): &(PathBuf, PathBuf),
    ck: &CertAndKey,
    force: bool,
) -> Result<(), CertError> {
    if !force {
        for p in [cert_path, key_path] {
            if p.exists() {
                return Err(CertError::Exists(p.clone()));
            }
        }
    }
    create_dir(dir)?;
    let cert_tmp = staged(cert_path, ck.cert_pem.as_bytes(), 0o644)?;
    let key_tmp = staged(key_path, ck.key_pem.as_bytes(), 0o600)?;
    rename(&key_tmp, key_path)?;
    rename(&cert_tmp, cert_path)?;
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Writes `bytes` to `<path>.tmp` with `mode` (set at creation, so a key is never readable by
/// others) and returns that path.
fn staged(path: &Path, bytes: &[u8], mode: u32) -> Result<PathBuf, CertError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let io = |source| CertError::Io {
        path: tmp.clone(),
        source,
    };
    if let Err(e) = fs::remove_file(&tmp) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(io(e));
        }
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(tmp)
}

fn rename(from: &Path, to: &Path) -> Result<(), CertError> {
    fs::rename(from, to).map_err(|source| CertError::Io {
        path: to.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    use std::os::unix::fs::PermissionsExt;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            let p = std::env::temp_dir().join(format!(
                "raftpg-cert-test-{}-{}",
                std::process::id(),
                uuid::Uuid::new_v4()
            ));
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from(pem_to_der(pem).expect("a CERTIFICATE block"))
    }

    fn test_ca() -> (CertAndKey, Ca) {
        let ck = new_ca("test", 30).unwrap();
        let ca = Ca::from_pem(&ck.cert_pem, &ck.key_pem).unwrap();
        (ck, ca)
    }

    /// Verifies `leaf` against `ca` as rustls does (webpki), for `usage`.
    fn webpki_verify(
        ca_pem: &str,
        leaf_pem: &str,
        usage: webpki::KeyUsage,
    ) -> Result<(), webpki::Error> {
        let ca_der = der(ca_pem);
        let anchor = webpki::anchor_from_trusted_cert(&ca_der)?;
        let leaf_der = der(leaf_pem);
        let ee = webpki::EndEntityCert::try_from(&leaf_der)?;
        ee.verify_for_usage(
            &[webpki::ring::ECDSA_P256_SHA256],
            &[anchor],
            &[],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .map(|_| ())
    }

    fn valid_for(leaf_pem: &str, name: &'static str) -> bool {
        let leaf_der = der(leaf_pem);
        let ee = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
        ee.verify_is_valid_for_subject_name(&ServerName::try_from(name).unwrap())
            .is_ok()
    }

    fn hosts(h: &[&str]) -> Vec<String> {
        h.iter().map(|s| s.to_string()).collect()
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn ca_is_a_self_signed_constrained_ca() {
        let (ck, _) = test_ca();
        let d = der(&ck.cert_pem);
        let (_, c) = x509_parser::parse_x509_certificate(&d).unwrap();
        assert_eq!(c.subject().to_string(), "CN=raftpg cluster CA test");
        assert_eq!(c.issuer(), c.subject());
        c.verify_signature(None).unwrap();
        let bc = c.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, Some(0));
        let ku = c.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
        assert!(c.extended_key_usage().unwrap().is_none());
        assert_eq!(identity_of(&d), None);
        // The key is the certificate's, and valid ~30 days from an hour ago.
        let key = KeyPair::from_pem(&ck.key_pem).unwrap();
        assert_eq!(c.public_key().raw, key.subject_public_key_info().as_slice());
        let v = c.validity();
        let now = unix_now();
        assert!((now - 3700..=now - 3500).contains(&v.not_before.timestamp()));
        assert!((v.not_after.timestamp() - (now + 30 * 86_400)).abs() < 100);
    }

    #[test]
    fn node_cert_verifies_against_the_ca_and_names_its_id() {
        let (ck, ca) = test_ca();
        let node = new_node_cert(
            &ca,
            7,
            &hosts(&[
                "10.1.2.3",
                "db-7.example.com",
                "[::1]",
                "localhost",
                "10.1.2.3",
            ]),
            825,
        )
        .unwrap();
        // What rustls will check, both ways round on the peer port.
        webpki_verify(
            &ck.cert_pem,
            &node.cert_pem,
            webpki::KeyUsage::server_auth(),
        )
        .unwrap();
        webpki_verify(
            &ck.cert_pem,
            &node.cert_pem,
            webpki::KeyUsage::client_auth(),
        )
        .unwrap();
        for name in ["10.1.2.3", "db-7.example.com", "::1", "localhost"] {
            assert!(valid_for(&node.cert_pem, name), "{name}");
        }
        for name in ["10.1.2.4", "example.com", "127.0.0.1"] {
            assert!(!valid_for(&node.cert_pem, name), "{name}");
        }

        let d = der(&node.cert_pem);
        let (_, c) = x509_parser::parse_x509_certificate(&d).unwrap();
        let ca_der = der(&ck.cert_pem);
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(c.issuer(), ca_cert.subject());
        c.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(c.subject().to_string(), "CN=raftpg node 7");
        assert!(!c.is_ca());
        let san: Vec<String> = c
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|g| g.to_string())
            .collect();
        assert_eq!(
            san,
            [
                "IPAddress(0a:01:02:03)",
                "DNSName(db-7.example.com)",
                "IPAddress(00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:01)",
                "DNSName(localhost)",
                "URI(raftpg://node/7)"
            ]
        );
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth && !eku.any && eku.other.is_empty());
        assert!(c.key_usage().unwrap().unwrap().value.digital_signature());
        assert_eq!(node_id_of(&d), Some(7));
        assert_eq!(client_name_of(&d), None);
        assert_eq!(identity_of(&d), Some(Identity::Node(7)));
        let key = KeyPair::from_pem(&node.key_pem).unwrap();
        assert_eq!(c.public_key().raw, key.subject_public_key_info().as_slice());
    }

    #[test]
    fn client_cert_is_client_only_and_names_the_client() {
        let (ck, ca) = test_ca();
        let client = new_client_cert(&ca, "app-1", 825).unwrap();
        webpki_verify(
            &ck.cert_pem,
            &client.cert_pem,
            webpki::KeyUsage::client_auth(),
        )
        .unwrap();
        assert!(webpki_verify(
            &ck.cert_pem,
            &client.cert_pem,
            webpki::KeyUsage::server_auth()
        )
        .is_err());
        let d = der(&client.cert_pem);
        let (_, c) = x509_parser::parse_x509_certificate(&d).unwrap();
        assert_eq!(c.subject().to_string(), "CN=app-1");
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        // A client certificate of the same CA is not a node.
        assert_eq!(node_id_of(&d), None);
        assert_eq!(client_name_of(&d).as_deref(), Some("app-1"));
    }

    #[test]
    fn a_certificate_of_another_ca_does_not_verify() {
        let (ck, _) = test_ca();
        let (_, other) = test_ca();
        let node = new_node_cert(&other, 1, &hosts(&["127.0.0.1"]), 10).unwrap();
        assert!(webpki_verify(
            &ck.cert_pem,
            &node.cert_pem,
            webpki::KeyUsage::client_auth()
        )
        .is_err());
        let d = der(&node.cert_pem);
        let (_, c) = x509_parser::parse_x509_certificate(&d).unwrap();
        let ca_der = der(&ck.cert_pem);
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert!(c.verify_signature(Some(ca_cert.public_key())).is_err());
    }

    #[test]
    fn a_leaf_never_outlives_its_ca() {
        let ck = new_ca("short", 2).unwrap();
        let ca = Ca::from_pem(&ck.cert_pem, &ck.key_pem).unwrap();
        let node = new_node_cert(&ca, 1, &hosts(&["localhost"]), 825).unwrap();
        let (a, b) = (der(&ck.cert_pem), der(&node.cert_pem));
        let ca_end = x509_parser::parse_x509_certificate(&a)
            .unwrap()
            .1
            .validity()
            .not_after;
        let end = x509_parser::parse_x509_certificate(&b)
            .unwrap()
            .1
            .validity()
            .not_after;
        assert_eq!(end, ca_end);
    }

    /// A self-signed certificate with these URI SANs (`node_id_of` verifies nothing).
    fn with_uris(uris: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris.iter().map(|u| SanType::URI(ia5(u).unwrap())).collect();
        params
            .subject_alt_names
            .push(SanType::DnsName(ia5("localhost").unwrap()));
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn node_id_of_reads_only_one_well_formed_node_uri() {
        assert_eq!(node_id_of(&with_uris(&["raftpg://node/1"])), Some(1));
        assert_eq!(
            node_id_of(&with_uris(&["raftpg://node/18446744073709551615"])),
            Some(u64::MAX)
        );
        // Other URIs are ignored.
        assert_eq!(
            node_id_of(&with_uris(&["https://example.com/", "raftpg://node/3"])),
            Some(3)
        );
        for bad in [
            &[][..],
            &["raftpg://node/0"],
            &["raftpg://node/01"],
            &["raftpg://node/+1"],
            &["raftpg://node/-1"],
            &["raftpg://node/"],
            &["raftpg://node/1/"],
            &["raftpg://node/1 "],
            &["raftpg://node/18446744073709551616"],
            &["raftpg://nodes/1"],
            &["RAFTPG://node/1"],
            &["raftpg://node/1", "raftpg://node/2"],
            &["raftpg://node/1", "raftpg://node/1"],
            &["raftpg://node/1", "raftpg://client/admin"],
            &["raftpg://client/admin"],
            &["raftpg:node/1"],
        ] {
            assert_eq!(node_id_of(&with_uris(bad)), None, "{bad:?}");
        }
        assert_eq!(
            client_name_of(&with_uris(&["raftpg://client/admin"])).as_deref(),
            Some("admin")
        );
        assert_eq!(client_name_of(&with_uris(&["raftpg://client/../x"])), None);
        assert_eq!(node_id_of(b"not a certificate"), None);
        assert_eq!(node_id_of(&[]), None);
    }

    #[test]
    fn bad_input_is_refused() {
        let (_, ca) = test_ca();
        let e = |r: Result<CertAndKey, CertError>| r.unwrap_err().to_string();
        assert!(matches!(
            new_node_cert(&ca, 0, &hosts(&["localhost"]), 1),
            Err(CertError::BadNodeId)
        ));
        assert!(matches!(
            new_node_cert(&ca, 1, &[], 1),
            Err(CertError::NoHosts)
        ));
        for h in [
            "127.0.0.1:7001",
            "",
            "a b",
            "-a.com",
            "a..com",
            "http://x",
            "999.1.1.1",
            "[localhost]",
        ] {
            assert!(
                matches!(
                    new_node_cert(&ca, 1, &hosts(&[h]), 1),
                    Err(CertError::BadHost(_))
                ),
                "{h:?}"
            );
        }
        for n in ["", "../x", "a/b", ".hidden", "-x", "é", &"x".repeat(65)] {
            assert!(
                matches!(new_client_cert(&ca, n, 1), Err(CertError::BadName(_))),
                "{n:?}"
            );
        }
        assert!(matches!(new_ca("a b", 1), Err(CertError::BadName(_))));
        assert!(e(new_client_cert(&ca, "x", 0)).contains("0 days"));
        assert!(matches!(
            new_ca("x", MAX_DAYS + 1),
            Err(CertError::BadDays(_))
        ));
        // Half a CA, or a leaf given as CA.
        let node = new_node_cert(&ca, 1, &hosts(&["localhost"]), 1).unwrap();
        assert!(Ca::from_pem(&node.cert_pem, &node.key_pem)
            .unwrap_err()
            .contains("not a CA"));
        let other = new_ca("other", 1).unwrap();
        let mine = new_ca("mine", 1).unwrap();
        assert!(Ca::from_pem(&mine.cert_pem, &other.key_pem)
            .unwrap_err()
            .contains("not the certificate's"));
    }

    #[test]
    fn files_modes_and_refusing_to_overwrite() {
        let t = TempDir::new();
        let dir = t.0.join("certs");
        assert!(matches!(
            issue_node(&dir, 1, &hosts(&["localhost"]), 1, false),
            Err(CertError::NoCa(_))
        ));
        let (crt, key) = init_ca(&dir, "files", 10, false).unwrap();
        assert_eq!(
            (crt.clone(), key.clone()),
            (dir.join("ca.crt"), dir.join("ca.key"))
        );
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&crt) & 0o600, 0o600);
        let before = fs::read_to_string(&crt).unwrap();
        let err = init_ca(&dir, "files", 10, false).unwrap_err();
        assert!(matches!(&err, CertError::Exists(p) if *p == crt), "{err}");
        assert!(err.to_string().contains("--force"));
        assert_eq!(fs::read_to_string(&crt).unwrap(), before);
        // Half a CA is refused as well.
        fs::remove_file(&crt).unwrap();
        assert!(matches!(
            init_ca(&dir, "files", 10, false),
            Err(CertError::Exists(p)) if p == key
        ));
        init_ca(&dir, "files", 10, true).unwrap();
        assert_ne!(fs::read_to_string(&crt).unwrap(), before);
        assert_eq!(mode(&key), 0o600);

        let (ncrt, nkey) = issue_node(&dir, 2, &hosts(&["127.0.0.1"]), 5, false).unwrap();
        assert_eq!(ncrt, NodeFiles::in_dir(&dir, 2).cert);
        assert_eq!(nkey, NodeFiles::in_dir(&dir, 2).key);
        assert_eq!(mode(&nkey), 0o600);
        assert!(matches!(
            issue_node(&dir, 2, &hosts(&["127.0.0.1"]), 5, false),
            Err(CertError::Exists(_))
        ));
        issue_node(&dir, 2, &hosts(&["127.0.0.1"]), 5, true).unwrap();
        let ca_pem = fs::read_to_string(&crt).unwrap();
        let node_pem = fs::read_to_string(&ncrt).unwrap();
        webpki_verify(&ca_pem, &node_pem, webpki::KeyUsage::server_auth()).unwrap();
        assert_eq!(node_id_of(&der(&node_pem)), Some(2));

        let (ccrt, ckey) = issue_client(&dir, "ops", 5, false).unwrap();
        assert_eq!(ccrt, dir.join("client-ops.crt"));
        assert_eq!(mode(&ckey), 0o600);
        assert!(matches!(
            issue_client(&dir, "ops", 5, false),
            Err(CertError::Exists(_))
        ));
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn ensure_cluster_makes_keeps_and_reissues() {
        let t = TempDir::new();
        let dir = t.0.clone();
        let r = ensure_cluster(&dir, 3, &[], "local").unwrap();
        assert!(r.created_ca);
        assert_eq!(r.issued.len(), 4);
        assert!(r.kept.is_empty());
        let ca_pem = fs::read_to_string(dir.join(CA_CERT)).unwrap();
        for id in 1..=3 {
            let f = NodeFiles::in_dir(&dir, id);
            let pem = fs::read_to_string(&f.cert).unwrap();
            webpki_verify(&ca_pem, &pem, webpki::KeyUsage::server_auth()).unwrap();
            assert!(valid_for(&pem, "127.0.0.1") && valid_for(&pem, "localhost"));
            assert_eq!(node_id_of(&der(&pem)), Some(id));
            assert_eq!(mode(&f.key), 0o600);
        }
        let admin = fs::read_to_string(dir.join("client-admin.crt")).unwrap();
        webpki_verify(&ca_pem, &admin, webpki::KeyUsage::client_auth()).unwrap();
        assert_eq!(client_name_of(&der(&admin)).as_deref(), Some("admin"));

        // Again: everything kept, nothing rewritten.
        let node1 = fs::read_to_string(dir.join("node-1.crt")).unwrap();
        let r = ensure_cluster(&dir, 3, &[], "local").unwrap();
        assert!(!r.created_ca && r.issued.is_empty());
        assert_eq!(r.kept.len(), 4);
        assert_eq!(fs::read_to_string(dir.join("node-1.crt")).unwrap(), node1);

        // One more node, a lost key, a host not covered: only those are issued.
        fs::remove_file(dir.join("node-2.key")).unwrap();
        let r = ensure_cluster(&dir, 4, &hosts(&["127.0.0.1"]), "local").unwrap();
        assert_eq!(r.issued, [dir.join("node-2.crt"), dir.join("node-4.crt")]);
        let r = ensure_cluster(&dir, 4, &hosts(&["127.0.0.2"]), "local").unwrap();
        assert_eq!(r.issued.len(), 4);
        assert_eq!(r.kept, [dir.join("client-admin.crt")]);

        // A new CA: every leaf is issued again, from it.
        init_ca(&dir, "local", 10, true).unwrap();
        let r = ensure_cluster(&dir, 4, &hosts(&["127.0.0.2"]), "local").unwrap();
        assert!(!r.created_ca);
        assert_eq!(r.issued.len(), 5);
        let ca_pem = fs::read_to_string(dir.join(CA_CERT)).unwrap();
        let pem = fs::read_to_string(dir.join("node-4.crt")).unwrap();
        webpki_verify(&ca_pem, &pem, webpki::KeyUsage::client_auth()).unwrap();

        // Half a CA is an error, not replaced.
        fs::remove_file(dir.join(CA_KEY)).unwrap();
        assert!(matches!(
            ensure_cluster(&dir, 1, &[], "local"),
            Err(CertError::NoCa(_))
        ));
        assert!(!dir.join(CA_KEY).exists());
    }
}
