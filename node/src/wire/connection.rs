//! One client connection: TLS negotiation, startup, authentication, then the message loop
//! that hands each message to the [`Session`].
//!
//! Owns the connection's socket and its limits: the largest message a client may send, the
//! time the startup may take. Authentication is SCRAM-SHA-256 against the role's verifier in
//! this node's `pg_authid` (the roles are replicated through the log), with channel binding
//! (`SCRAM-SHA-256-PLUS`) over TLS; a node that requires authentication refuses connections
//! without TLS. On an `--insecure` node a role logs in without a password (`trust`), and the
//! role `raftpg` stands for raftpg itself, as an anonymous gRPC request does there.
//! Bad protocol input ends the connection with an error; it never reaches the node.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Buf;
use pgwire::api::auth::sasl::scram::{ScramSecret, ScramServerAuth};
use pgwire::api::PgWireConnectionState;
use pgwire::error::PgWireError;
use pgwire::messages::response::{ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus,
    PasswordMessageFamily, SecretKey, Startup,
};
use pgwire::messages::{PgWireBackendMessage as B, PgWireFrontendMessage as F};
use pgwire::tokio::server::negotiate_tls;
use tokio::net::TcpStream;
use tracing::{debug, info_span, Instrument};

use crate::auth::authenticator::Principal;
use crate::service::{ErrorKind, Service, ServiceError};

use super::cancel::Registry;
use super::error;
use super::session::Session;
use super::settings::Settings;
use super::stream::Wire;
use super::WireConfig;

/// Longest time from accepting a connection to the end of its authentication.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one accepted connection until the client leaves.
pub async fn serve(
    svc: Arc<Service>,
    cfg: Arc<WireConfig>,
    registry: Arc<Registry>,
    tcp: TcpStream,
) -> io::Result<()> {
    let peer = tcp.peer_addr().ok();
    let span = info_span!("wire", node = svc.id(), peer = ?peer, user = tracing::field::Empty);
    async move {
        let started = tokio::time::timeout(STARTUP_TIMEOUT, start(&svc, &cfg, &registry, tcp));
        let Ok(started) = started.await else {
            debug!("startup timed out");
            return Ok(());
        };
        let Some((mut wire, mut session, _registered)) = started? else {
            return Ok(());
        };
        message_loop(&mut wire, &mut session).await
    }
    .instrument(span)
    .await
}

/// TLS, startup and authentication. `None`: the connection ended (a cancel request, a refusal
/// already sent).
async fn start(
    svc: &Arc<Service>,
    cfg: &WireConfig,
    registry: &Arc<Registry>,
    tcp: TcpStream,
) -> io::Result<Option<(Wire, Session, super::cancel::Registered)>> {
    let Some(framed) = negotiate_tls::<()>(tcp, cfg.tls.clone()).await? else {
        return Ok(None);
    };
    let mut wire = Wire::new(framed, cfg.message_bytes_max);
    let startup = match wire.next().await {
        Some(Ok(F::Startup(s))) => s,
        Some(Ok(F::CancelRequest(c))) => {
            if let Some(secret) = c.secret_key.as_i32() {
                registry.cancel(c.pid, secret);
            }
            return Ok(None);
        }
        Some(Ok(_)) | Some(Err(_)) | None => return Ok(None),
    };
    if startup.protocol_number_major != 3 {
        wire.fatal(
            "0A000",
            format!(
                "unsupported frontend protocol {}.{}: server supports 3.0",
                startup.protocol_number_major, startup.protocol_number_minor
            ),
        )
        .await?;
        return Ok(None);
    }
    if startup.protocol_number_minor > 0 {
        let unknown: Vec<String> = startup
            .parameters
            .keys()
            .filter(|k| k.starts_with("_pq_."))
            .cloned()
            .collect();
        wire.feed(B::NegotiateProtocolVersion(NegotiateProtocolVersion::new(
            0, unknown,
        )))
        .await?;
    }
    let Some(user) = startup
        .parameters
        .get("user")
        .cloned()
        .filter(|u| !u.is_empty())
    else {
        wire.fatal(
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )
        .await?;
        return Ok(None);
    };
    tracing::Span::current().record("user", user.as_str());
    if startup.parameters.contains_key("replication") {
        wire.fatal("0A000", "raftpg does not serve replication connections")
            .await?;
        return Ok(None);
    }
    if svc.auth_required() && !wire.is_secure() {
        wire.fatal(
            "28000",
            format!(
                "connection without TLS refused for user \"{user}\": this raftpg node requires sslmode=require (or verify-full with the cluster CA)"
            ),
        )
        .await?;
        return Ok(None);
    }
    wire.set_state(PgWireConnectionState::AuthenticationInProgress);
    let principal = match authenticate(svc, cfg, &mut wire, &user).await? {
        Login::Done(p) => p,
        Login::Refused => return Ok(None),
    };
    let mut settings = Settings::new(&user, &cfg.server_version);
    for (name, value) in startup_settings(&startup) {
        let value = match Settings::checked_by_postgres(&name) {
            true => match svc.check_setting(&name, &value).await {
                Ok(v) => v,
                Err(e) => {
                    wire.fatal(error::sqlstate(&e, error::Op::Read), e.message.clone())
                        .await?;
                    return Ok(None);
                }
            },
            false => value,
        };
        if let Err(e) = settings.startup(&name, &value) {
            wire.fatal(error::sqlstate(&e, error::Op::Read), e.message.clone())
                .await?;
            return Ok(None);
        }
    }
    let registered = registry.register();
    let (pid, secret) = registered.key();
    wire.feed(B::Authentication(Authentication::Ok)).await?;
    for (k, v) in settings.reported() {
        wire.feed(B::ParameterStatus(ParameterStatus::new(k, v)))
            .await?;
    }
    wire.feed(B::BackendKeyData(BackendKeyData::new(
        pid,
        SecretKey::I32(secret),
    )))
    .await?;
    wire.feed(B::ReadyForQuery(ReadyForQuery::new(
        TransactionStatus::Idle,
    )))
    .await?;
    wire.flush().await?;
    wire.set_state(PgWireConnectionState::ReadyForQuery);
    let session = Session::new(svc.clone(), principal, settings, registered.signal.clone());
    Ok(Some((wire, session, registered)))
}

/// The settings a startup message asks for: its parameters other than `user`, `database`
/// and `options`, and the `-c name=value` (or `--name=value`) pairs of `options`.
pub fn startup_settings(s: &Startup) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (k, v) in &s.parameters {
        match k.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                let mut words = v.split_whitespace();
                while let Some(w) = words.next() {
                    let pair = match w {
                        "-c" => words.next().map(str::to_string),
                        w => w
                            .strip_prefix("--")
                            .or_else(|| w.strip_prefix("-c"))
                            .map(str::to_string),
                    };
                    if let Some((name, value)) = pair.as_deref().and_then(|p| p.split_once('=')) {
                        out.push((name.replace('-', "_"), value.to_string()));
                    }
                }
            }
            k if k.starts_with("_pq_.") => {}
            _ => out.push((k.clone(), v.clone())),
        }
    }
    out
}

enum Login {
    /// Authenticated as this principal (`None`: raftpg itself, on an `--insecure` node).
    Done(Option<Principal>),
    /// Refused; the error was sent.
    Refused,
}

/// Authenticates `user`: SCRAM-SHA-256 against the role's verifier, or trust on an
/// `--insecure` node.
async fn authenticate(
    svc: &Arc<Service>,
    cfg: &WireConfig,
    wire: &mut Wire,
    user: &str,
) -> io::Result<Login> {
    let refused = |e: &ServiceError| match e.kind {
        ErrorKind::Unavailable => (
            "57P03".to_string(),
            format!(
                "the database system cannot check credentials now: {}",
                e.message
            ),
        ),
        _ => (
            "28P01".to_string(),
            format!("password authentication failed for user \"{user}\""),
        ),
    };
    if !svc.auth_required() {
        if user == "raftpg" {
            return Ok(Login::Done(None));
        }
        // trust: the role must exist and may log in, no password asked.
        return match svc.login_verifier(user).await {
            Ok((_, p)) => Ok(Login::Done(Some(p))),
            Err(e) if e.kind == ErrorKind::Unavailable => {
                let (code, m) = refused(&e);
                wire.fatal(&code, m).await?;
                Ok(Login::Refused)
            }
            Err(e) => {
                wire.fatal("28000", e.message).await?;
                Ok(Login::Refused)
            }
        };
    }
    let (verifier, principal) = match svc.login_verifier(user).await {
        Ok(v) => v,
        Err(e) => {
            debug!(error = %e, "login refused");
            let (code, m) = refused(&e);
            wire.fatal(&code, m).await?;
            return Ok(Login::Refused);
        }
    };
    let scram = match wire.is_secure() {
        true => cfg.scram_tls.clone(),
        false => ScramServerAuth::new(),
    };
    let mut mechanisms = vec!["SCRAM-SHA-256".to_string()];
    if scram.supports_channel_binding() {
        mechanisms.insert(0, "SCRAM-SHA-256-PLUS".to_string());
    }
    wire.feed(B::Authentication(Authentication::SASL(mechanisms.clone())))
        .await?;
    wire.flush().await?;
    let wrong = format!("password authentication failed for user \"{user}\"");
    let Some((method, first)) = next_password_message(wire).await.and_then(initial_response) else {
        wire.fatal("28P01", wrong.clone()).await?;
        return Ok(Login::Refused);
    };
    if !mechanisms.contains(&method) {
        wire.fatal("28P01", wrong.clone()).await?;
        return Ok(Login::Refused);
    }
    let secret = ScramSecret::Verifier {
        salt: verifier.salt.clone(),
        iterations: verifier.iterations as usize,
        stored_key: verifier.stored_key.to_vec(),
        server_key: verifier.server_key.to_vec(),
    };
    let Ok((server_first, waiting)) = scram.on_client_first_message_with_secret(&first, secret)
    else {
        wire.fatal("28P01", wrong.clone()).await?;
        return Ok(Login::Refused);
    };
    wire.feed(B::Authentication(Authentication::SASLContinue(
        server_first.into_bytes().into(),
    )))
    .await?;
    wire.flush().await?;
    let Some(last) = next_password_message(wire).await else {
        return Ok(Login::Refused);
    };
    let final_data = match last {
        PasswordMessageFamily::Raw(body) => body.freeze(),
        _ => {
            wire.fatal("28P01", wrong.clone()).await?;
            return Ok(Login::Refused);
        }
    };
    match waiting.on_client_final_message(&final_data) {
        Ok(server_final) => {
            wire.feed(B::Authentication(Authentication::SASLFinal(
                server_final.into_bytes().into(),
            )))
            .await?;
            Ok(Login::Done(Some(principal)))
        }
        Err(_) => {
            wire.fatal("28P01", wrong.clone()).await?;
            Ok(Login::Refused)
        }
    }
}

async fn next_password_message(wire: &mut Wire) -> Option<PasswordMessageFamily> {
    match wire.next().await {
        Some(Ok(F::PasswordMessageFamily(p))) => Some(p),
        _ => None,
    }
}

/// The mechanism and data of a `SASLInitialResponse`, checked (a malformed one is `None`).
pub fn initial_response(p: PasswordMessageFamily) -> Option<(String, Vec<u8>)> {
    let PasswordMessageFamily::Raw(mut body) = p else {
        return None;
    };
    let nul = body.iter().position(|b| *b == 0)?;
    let method = String::from_utf8(body.split_to(nul).to_vec()).ok()?;
    body.advance(1);
    if body.len() < 4 {
        return None;
    }
    let len = body.get_i32();
    if len < 0 || len as usize != body.len() {
        return None;
    }
    Some((method, body.to_vec()))
}

/// Hands messages to the session until the client leaves or breaks the protocol.
async fn message_loop(wire: &mut Wire, session: &mut Session) -> io::Result<()> {
    loop {
        let msg = match wire.next().await {
            None => return Ok(()),
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                let (code, m) = match &e {
                    PgWireError::MessageTooLarge(max, got) => (
                        "54000",
                        format!("message of {got} bytes exceeds the limit of {max} bytes"),
                    ),
                    other => ("08P01", format!("invalid frontend message: {other}")),
                };
                let _ = wire.fatal(code, m).await;
                return Ok(());
            }
        };
        let extended = msg.is_extended_query();
        if extended && session.skipping() && !matches!(msg, F::Sync(_)) {
            continue;
        }
        match msg {
            F::Query(q) => session.query(wire, &q.query).await?,
            F::Parse(m) => session.parse(wire, m).await?,
            F::Bind(m) => session.bind(wire, m).await?,
            F::Describe(m) => session.describe(wire, m).await?,
            F::Execute(m) => session.execute(wire, m).await?,
            F::Close(m) => session.close(wire, m).await?,
            F::Sync(_) => session.sync(wire).await?,
            F::Flush(_) => session.flush(wire).await?,
            F::Terminate(_) => return Ok(()),
            // What a client still sends of a COPY that ended with an error: dropped, as
            // PostgreSQL does.
            F::CopyData(_) | F::CopyDone(_) | F::CopyFail(_) => {}
            _ => {
                let _ = wire
                    .fatal("08P01", "unexpected message in this state")
                    .await;
                return Ok(());
            }
        }
    }
}
