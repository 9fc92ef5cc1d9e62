//! [`Authenticator`]: who a request comes from. Checks a user name and password against the
//! role's SCRAM-SHA-256 verifier in this node's `pg_authid` — the roles are replicated through
//! the log, so every node holds the same verifiers — and says whether the role may administer
//! the cluster (a superuser, or a member of `raftpg_admin`).
//!
//! Owns a small cache so that a request does not cost a catalog lookup and 4096 HMACs: for
//! each user, the `pg_authid` row it read and a keyed digest of the last password that
//! matched it, both trusted for [`CACHE_TTL`]. A password change, `NOLOGIN`, `VALID UNTIL` or
//! `DROP ROLE` therefore takes effect on every node within that time. When the row is read
//! again and the verifier is the same, a password that matched it still matches without the
//! HMACs again (at 128 clients of one role, every expiry used to start 128 concurrent key
//! derivations on the node). The cache holds at most [`CACHE_USERS_MAX`] users (it is emptied
//! when full) and never a password.
//!
//! A status request may use a password that matched within [`STALE_MAX`] without looking again
//! (`allow_stale`), so that a node whose PostgreSQL is down or frozen can still tell its status
//! to the clients that were using it; everything else needs a fresh lookup, which gives up
//! after [`LOOKUP_WAIT`] (the node then answers UNAVAILABLE and the client goes elsewhere).
//!
//! A new cluster creates its first administrator (`--admin-password-file`) through the log a
//! moment after its first leader is elected. Until this node has seen that role, for at most
//! [`FIRST_ADMIN_WAIT`] after it started, a request naming it is answered "not yet, retry"
//! (UNAVAILABLE; `57P03` on the wire protocol) rather than "role does not exist" (`28000`),
//! which clients do not retry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::scram::Verifier;
use crate::pg::read_pool::ReadPool;

/// How long a looked-up role (and a password that matched it) is trusted.
pub const CACHE_TTL: Duration = Duration::from_secs(2);

/// Longest wait for the roles to be read.
pub const LOOKUP_WAIT: Duration = Duration::from_secs(2);

/// How old a matched password may be to be accepted while the roles cannot be read.
pub const STALE_MAX: Duration = Duration::from_secs(600);

/// How long after start a missing first administrator means "not created yet" (see the module
/// doc); past it, or once the role was seen, a missing role is `28000` as for any other.
pub const FIRST_ADMIN_WAIT: Duration = Duration::from_secs(60);

/// Most users in the cache.
const CACHE_USERS_MAX: usize = 10_000;

/// Longest user name or password accepted (PostgreSQL's names are at most 63 bytes).
pub const CREDENTIAL_BYTES_MAX: usize = 1024;

/// The role a request runs as, once authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The role's name.
    pub user: String,
    /// A superuser or a member of `raftpg_admin`: may change membership, run checks, see
    /// every node's status.
    pub admin: bool,
}

pub use raftpg_proto::identity::Credentials;

/// Why a request was not authenticated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials where they are required.
    #[error(
        "authentication required: send a user name and password (raftpg-user, raftpg-password)"
    )]
    Missing,
    /// No such role (SQLSTATE 28000).
    #[error("role \"{0}\" does not exist")]
    UnknownUser(String),
    /// The role may not log in (NOLOGIN), or has no SCRAM-SHA-256 password (28000).
    #[error("role \"{0}\" is not permitted to log in")]
    CannotLogin(String),
    /// Wrong password, or the password expired (VALID UNTIL) (28P01).
    #[error("password authentication failed for user \"{0}\"")]
    WrongPassword(String),
    /// The roles could not be read (PostgreSQL down or busy); nothing was decided.
    #[error("cannot check credentials now: {0}")]
    Unavailable(String),
    /// The cluster's first administrator is not created yet (retry shortly).
    #[error(
        "role \"{0}\" is the cluster's first administrator and is not created yet; retry shortly"
    )]
    FirstAdminPending(String),
}

impl AuthError {
    /// The SQLSTATE PostgreSQL reports for this failure.
    pub fn sqlstate(&self) -> Option<&'static str> {
        match self {
            AuthError::Missing | AuthError::UnknownUser(_) | AuthError::CannotLogin(_) => {
                Some("28000")
            }
            AuthError::WrongPassword(_) => Some("28P01"),
            AuthError::Unavailable(_) | AuthError::FirstAdminPending(_) => None,
        }
    }
}

/// A role as `pg_authid` describes it.
#[derive(Clone, Debug)]
struct Role {
    verifier: Option<Verifier>,
    can_login: bool,
    expired: bool,
    admin: bool,
}

struct Cached {
    role: Option<Role>,
    read_at: Instant,
    /// Keyed digest of the last password that matched `role`'s verifier.
    matched: Option<[u8; 32]>,
}

/// Checks credentials against this node's roles. See the module doc.
pub struct Authenticator {
    pool: Arc<ReadPool>,
    cache: Mutex<HashMap<String, Cached>>,
    /// Key of the password digests in the cache (random per process).
    key: [u8; 32],
    /// The first administrator this node expects, until it is seen or its deadline passes.
    first_admin: Mutex<Option<(String, Instant)>>,
}

/// The role named `$1`: its verifier, whether it may log in, whether its password expired,
/// whether it administers the cluster.
const ROLE_SQL: &str = "
    SELECT r.rolpassword, r.rolcanlogin,
           coalesce(r.rolvaliduntil < now(), false),
           r.rolsuper OR CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'raftpg_admin')
                              THEN pg_catalog.pg_has_role(r.oid, 'raftpg_admin', 'MEMBER') ELSE false END
    FROM pg_catalog.pg_authid r WHERE r.rolname = $1";

impl Authenticator {
    /// An authenticator reading roles through `pool`.
    pub fn new(pool: Arc<ReadPool>) -> Self {
        let mut key = [0u8; 32];
        for (i, b) in uuid::Uuid::new_v4()
            .as_bytes()
            .iter()
            .chain(uuid::Uuid::new_v4().as_bytes())
            .enumerate()
        {
            key[i] = *b;
        }
        Authenticator {
            pool,
            cache: Mutex::new(HashMap::new()),
            key,
            first_admin: Mutex::new(None),
        }
    }

    /// Expects role `user` to be created by the log shortly (see the module doc).
    pub fn expect_first_admin(&self, user: &str) {
        if let Ok(mut f) = self.first_admin.lock() {
            *f = Some((user.to_string(), Instant::now() + FIRST_ADMIN_WAIT));
        }
    }

    /// No longer expects a first administrator (it exists, or creating it is settled).
    pub fn first_admin_settled(&self) {
        if let Ok(mut f) = self.first_admin.lock() {
            *f = None;
        }
    }

    /// The error for `user`, which has no role here: not created yet if it is the expected
    /// first administrator, else unknown.
    fn missing(&self, user: &str) -> AuthError {
        let pending = self.first_admin.lock().is_ok_and(|f| {
            f.as_ref()
                .is_some_and(|(name, until)| name == user && Instant::now() < *until)
        });
        match pending {
            true => AuthError::FirstAdminPending(user.to_string()),
            false => AuthError::UnknownUser(user.to_string()),
        }
    }

    /// Notes that `user` has a role here (the first administrator, once seen, is settled).
    fn seen(&self, user: &str) {
        if let Ok(mut f) = self.first_admin.lock() {
            if f.as_ref().is_some_and(|(name, _)| name == user) {
                *f = None;
            }
        }
    }

    /// The principal `credentials` name, if the password is right; with `allow_stale`, a
    /// match within [`STALE_MAX`] will do (see the module doc).
    pub async fn authenticate(
        &self,
        credentials: &Credentials,
        allow_stale: bool,
    ) -> Result<Principal, AuthError> {
        let user = &credentials.user;
        let digest = self.digest(&credentials.password);
        if allow_stale {
            if let Some(p) = self.stale(user, digest) {
                return Ok(p);
            }
        }
        let cached = self.cached(user);
        // `fresh`: the role was just read (and must be remembered).
        let (role, matched, fresh) = match cached {
            Some((role, matched)) => (role, matched == Some(digest), false),
            None => match tokio::time::timeout(LOOKUP_WAIT, self.read_role(user)).await {
                Ok(Ok(role)) => {
                    let matched = role
                        .as_ref()
                        .is_some_and(|r| self.matched_before(user, r, digest));
                    (role, matched, true)
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(AuthError::Unavailable("reading the roles timed out".into())),
            },
        };
        let Some(role) = role else {
            let missing = self.missing(user);
            if matches!(missing, AuthError::UnknownUser(_)) {
                // (Not while it is expected: it would hide the role once created.)
                self.remember(user, None, None);
            }
            return Err(missing);
        };
        self.seen(user);
        let principal = Principal {
            user: user.clone(),
            admin: role.admin,
        };
        if !role.can_login {
            self.remember(user, Some(role), None);
            return Err(AuthError::CannotLogin(user.clone()));
        }
        if matched && !fresh {
            return Ok(principal);
        }
        if matched {
            if role.expired {
                self.remember(user, Some(role), None);
                return Err(AuthError::WrongPassword(user.clone()));
            }
            self.remember(user, Some(role), Some(digest));
            return Ok(principal);
        }
        let Some(verifier) = role.verifier.clone() else {
            self.remember(user, Some(role), None);
            return Err(AuthError::CannotLogin(user.clone()));
        };
        let password = credentials.password.clone();
        // 4096 HMACs: off the async workers.
        let ok = tokio::task::spawn_blocking(move || verifier.matches(&password))
            .await
            .unwrap_or(false);
        if !ok || role.expired {
            self.remember(user, Some(role), None);
            return Err(AuthError::WrongPassword(user.clone()));
        }
        self.remember(user, Some(role), Some(digest));
        Ok(principal)
    }

    /// The verifier a password exchange for `user` must be checked against (the wire protocol
    /// runs SCRAM itself, so the password never reaches the node), and the principal a
    /// successful exchange authenticates. Refused like a wrong password when the role may not
    /// log in, has no SCRAM-SHA-256 password, or its password expired.
    pub async fn login_verifier(&self, user: &str) -> Result<(Verifier, Principal), AuthError> {
        let role = match self.cached(user) {
            Some((role, _)) => role,
            None => {
                // Not remembered: that would drop the digest a gRPC client's password matched.
                tokio::time::timeout(LOOKUP_WAIT, self.read_role(user))
                    .await
                    .map_err(|_| AuthError::Unavailable("reading the roles timed out".into()))??
            }
        };
        let Some(role) = role else {
            return Err(self.missing(user));
        };
        self.seen(user);
        if !role.can_login {
            return Err(AuthError::CannotLogin(user.to_string()));
        }
        let verifier = role
            .verifier
            .clone()
            .ok_or_else(|| AuthError::CannotLogin(user.to_string()))?;
        if role.expired {
            return Err(AuthError::WrongPassword(user.to_string()));
        }
        Ok((
            verifier,
            Principal {
                user: user.to_string(),
                admin: role.admin,
            },
        ))
    }

    /// The principal of `user` if `digest` matched its role within [`STALE_MAX`] (for status
    /// requests only).
    fn stale(&self, user: &str, digest: [u8; 32]) -> Option<Principal> {
        let cache = self.cache.lock().ok()?;
        let c = cache.get(user)?;
        let role = c.role.as_ref()?;
        (c.matched == Some(digest) && c.read_at.elapsed() < STALE_MAX && role.can_login).then(
            || Principal {
                user: user.to_string(),
                admin: role.admin,
            },
        )
    }

    /// Whether the password of `digest` matched `user`'s verifier when it was last read, and
    /// `role` (just read) has the same verifier: then it still matches.
    fn matched_before(&self, user: &str, role: &Role, digest: [u8; 32]) -> bool {
        let Ok(cache) = self.cache.lock() else {
            return false;
        };
        cache.get(user).is_some_and(|c| {
            c.matched == Some(digest)
                && role.verifier.is_some()
                && c.role.as_ref().map(|r| &r.verifier) == Some(&role.verifier)
        })
    }

    fn digest(&self, password: &str) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(password.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The cached role of `user` (and the digest that matched it) while fresh.
    #[allow(clippy::type_complexity)]
    fn cached(&self, user: &str) -> Option<(Option<Role>, Option<[u8; 32]>)> {
        let cache = self.cache.lock().ok()?;
        let c = cache.get(user)?;
        (c.read_at.elapsed() < CACHE_TTL).then(|| (c.role.clone(), c.matched))
    }

    fn remember(&self, user: &str, role: Option<Role>, matched: Option<[u8; 32]>) {
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        let read_at = match cache.get(user) {
            Some(c) if c.read_at.elapsed() < CACHE_TTL => c.read_at,
            _ => Instant::now(),
        };
        if cache.len() >= CACHE_USERS_MAX && !cache.contains_key(user) {
            cache.clear();
        }
        cache.insert(
            user.to_string(),
            Cached {
                role,
                read_at,
                matched,
            },
        );
    }

    async fn read_role(&self, user: &str) -> Result<Option<Role>, AuthError> {
        let unavailable = |e: &dyn std::fmt::Display| AuthError::Unavailable(e.to_string());
        let mut pooled = self.pool.get().await.map_err(|e| unavailable(&e))?;
        let row = pooled
            .base_client()
            .await
            .map_err(|e| unavailable(&e))?
            .query_opt(ROLE_SQL, &[&user])
            .await
            .map_err(|e| unavailable(&e))?;
        pooled.release();
        Ok(row.map(|r| {
            let password: Option<String> = r.get(0);
            Role {
                verifier: password.as_deref().and_then(Verifier::parse),
                can_login: r.get(1),
                expired: r.get(2),
                admin: r.get(3),
            }
        }))
    }
}
