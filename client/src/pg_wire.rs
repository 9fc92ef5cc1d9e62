//! Connecting to a raftpg node's PostgreSQL wire protocol port with tokio-postgres: TLS that
//! verifies the node with the cluster's CA, and SCRAM as a role (what `raftpg bench --protocol
//! pg` and the tests use; applications use their own PostgreSQL driver the same way).

use std::path::Path;
use std::time::Duration;

/// TLS for tokio-postgres that trusts the CA certificate(s) in `ca` (PEM).
pub fn tls(ca: &Path) -> anyhow::Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    // ring, the provider the nodes use.
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Connects to the wire port at `host:port` as `user` (with `password`), over TLS verified
/// with `ca` when given, else in plaintext (an `--insecure` node).
pub async fn connect(
    host: &str,
    port: u16,
    user: &str,
    password: Option<&str>,
    ca: Option<&Path>,
) -> anyhow::Result<tokio_postgres::Client> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(host)
        .port(port)
        .user(user)
        .dbname("raftpg")
        .connect_timeout(Duration::from_secs(10));
    if let Some(p) = password {
        cfg.password(p);
    }
    let client = match ca {
        Some(ca) => {
            cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
            let (client, conn) = cfg.connect(tls(ca)?).await?;
            tokio::spawn(conn);
            client
        }
        None => {
            let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            client
        }
    };
    Ok(client)
}
