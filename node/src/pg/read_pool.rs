//! Connections for reads, separate from the applier's (design.md invariant 4: reads never block
//! behind or interfere with the applier, and never write).
//!
//! Owns up to `connections_max` PostgreSQL connections as the read-only role. A caller waits at
//! most `wait_max` for a free connection. Connections found closed are dropped and replaced.
//!
//! **A connection goes back to the pool only when its borrower says it is clean**
//! ([`PooledClient::release`]): no statement of it still running, no transaction left open
//! except one whose `ROLLBACK` is already queued. A borrower that is dropped without releasing
//! (deadline hit, client gone, rows left unread) closes the connection at once: its PostgreSQL
//! session ends, so a read transaction never outlives its request and never holds locks that
//! the applier's DDL waits for (the applier runs without `lock_timeout`, by design).
//!
//! Each connection keeps the statements prepared on it ([`StatementCache`], bounded), so a read
//! that comes again costs no `Parse` round trip, and knows what it set at session level
//! ([`ConnState`]): a direct read (`service::read`) runs as its role with its settings set on
//! the session, so that the next read with the same ones sends nothing but its query.
//! **Whoever borrows a connection for anything else starts it with [`PooledClient::base_client`]**,
//! which puts the session back to raftpg_reader and the base settings.
//!
//! Every read session also carries server-side time limits as a backstop
//! ([`READ_DURATION_MAX`] plus slack), should a transaction escape the node's own deadline.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

/// Longest time one read (consistency wait, query and sending its rows) may take, however
/// slowly its client reads. A request's `timeout_ms` can only shorten it.
pub const READ_DURATION_MAX: Duration = Duration::from_secs(60);

/// How much later than [`READ_DURATION_MAX`] PostgreSQL itself ends a read statement or an idle
/// read transaction: the node's own deadline comes first; this only catches what escapes it.
const BACKSTOP_SLACK: Duration = Duration::from_secs(10);

/// How often PostgreSQL checks, while it runs a read, whether the node closed the connection
/// (so a query abandoned by a discarded connection stops within this, not at its end).
const CLIENT_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Why a read connection could not be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// All connections busy for longer than the wait limit.
    #[error("all {0} read connections are busy")]
    Busy(usize),
    /// PostgreSQL refused or is down.
    #[error("cannot connect to PostgreSQL for reading: {0}")]
    Connect(#[from] tokio_postgres::Error),
}

/// One open read session: the client half, the task driving its socket, and what it knows of
/// its session.
struct Conn {
    client: tokio_postgres::Client,
    /// Aborting it closes the socket; PostgreSQL then ends the session (and its transaction).
    io: JoinHandle<()>,
    state: ConnState,
}

/// The session settings a read may change (name, the value every read connection has when
/// it is not changed): `service::types::SESSION_SETTINGS` names the same.
pub const SESSION_BASE: &[(&str, &str)] = &[
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("search_path", "public"),
    ("bytea_output", "hex"),
];

/// What one read connection knows of its PostgreSQL session.
#[derive(Default)]
pub struct ConnState {
    /// The statements prepared on it.
    pub statements: StatementCache,
    /// The token it found in `raftpg.incarnation` (`apply::state_machine::Held`): this session
    /// runs in the PostgreSQL incarnation the token was written in (or in a later one after a
    /// clean restart).
    pub incarnation: Option<i64>,
    /// The role and settings set on the session (`None`: the base ones).
    pub session: Option<SessionState>,
}

/// A role and settings set at session level on a read connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionState {
    /// The role (`None`: raftpg_reader itself).
    pub role: Option<String>,
    /// One value per [`SESSION_BASE`] entry, in its order.
    pub values: Vec<String>,
}

impl SessionState {
    /// The state a read as `role` with `settings` runs in; `None` when it is the base one.
    /// `Err` names a setting that is not one of [`SESSION_BASE`].
    pub fn wanted<'a>(
        role: Option<&str>,
        settings: &'a [(String, String)],
    ) -> Result<Option<Self>, &'a str> {
        if role.is_none() && settings.is_empty() {
            return Ok(None);
        }
        let mut values: Vec<String> = SESSION_BASE.iter().map(|(_, v)| v.to_string()).collect();
        for (name, value) in settings {
            let Some(i) = SESSION_BASE
                .iter()
                .position(|(n, _)| n.eq_ignore_ascii_case(name))
            else {
                return Err(name);
            };
            values[i] = value.clone();
        }
        let state = SessionState {
            role: role.map(str::to_string),
            values,
        };
        let base = state.role.is_none()
            && state
                .values
                .iter()
                .zip(SESSION_BASE)
                .all(|(v, (_, b))| v == b);
        Ok((!base).then_some(state))
    }

    /// The parameters of [`switch_sql`] that set this state (`none` resets the role).
    pub fn switch_params(state: Option<&Self>) -> Vec<String> {
        let role = state
            .and_then(|s| s.role.clone())
            .unwrap_or_else(|| "none".into());
        let values = match state {
            Some(s) => s.values.clone(),
            None => SESSION_BASE.iter().map(|(_, v)| v.to_string()).collect(),
        };
        std::iter::once(role).chain(values).collect()
    }
}

/// One statement that sets a session's role and every [`SESSION_BASE`] setting at session
/// level (`$1` the role, then the values in order), all or nothing.
pub fn switch_sql() -> String {
    let settings: Vec<String> = SESSION_BASE
        .iter()
        .enumerate()
        .map(|(i, (n, _))| format!("pg_catalog.set_config('{n}', ${}, false)", i + 2))
        .collect();
    format!(
        "SELECT pg_catalog.set_config('role', $1, false), {}",
        settings.join(", ")
    )
}

/// Puts a session back to raftpg_reader and the base settings (one implicit transaction: all
/// or nothing).
fn base_session_sql() -> String {
    let mut sql = String::from("SET ROLE NONE");
    for (name, value) in SESSION_BASE {
        sql.push_str(&format!("; SET {name} = '{value}'"));
    }
    sql
}

impl ConnState {
    /// Puts the session back to raftpg_reader and the base settings, if a read changed them.
    pub async fn to_base(
        &mut self,
        client: &tokio_postgres::Client,
    ) -> Result<(), tokio_postgres::Error> {
        if self.session.is_none() {
            return Ok(());
        }
        client.batch_execute(&base_session_sql()).await?;
        self.session = None;
        Ok(())
    }
}

impl Conn {
    /// Ends the session now, whatever it is doing.
    fn close(self) {
        self.io.abort();
    }
}

/// Most statements kept prepared on one read connection.
pub const STATEMENTS_PER_CONNECTION_MAX: usize = 256;

/// Statements prepared on one connection, keyed by what their user says identifies them (the
/// SQL text with everything that changes how PostgreSQL parses it: the role, the settings, the
/// parameter types). Each entry is a statement as prepared and the one that runs it (the same,
/// or a form that returns some columns as text), with the schema epoch it was prepared in: an
/// entry of another epoch is never handed out (the schema may have changed since, in ways a
/// prepared statement does not notice). At most [`STATEMENTS_PER_CONNECTION_MAX`]; the oldest
/// goes first (dropping a statement closes it on the server).
#[derive(Default)]
pub struct StatementCache {
    entries: std::collections::HashMap<String, CachedStatements>,
    order: std::collections::VecDeque<String>,
}

/// One entry of a [`StatementCache`].
struct CachedStatements {
    prepared: tokio_postgres::Statement,
    run: tokio_postgres::Statement,
    epoch: u64,
}

impl StatementCache {
    /// The statements stored under `key` if they were prepared in schema epoch `epoch`.
    pub fn get(
        &mut self,
        key: &str,
        epoch: u64,
    ) -> Option<(tokio_postgres::Statement, tokio_postgres::Statement)> {
        match self.entries.get(key) {
            Some(e) if e.epoch == epoch => Some((e.prepared.clone(), e.run.clone())),
            Some(_) => {
                self.remove(key);
                None
            }
            None => None,
        }
    }

    /// Stores statements prepared in schema epoch `epoch` under `key`, making room if needed.
    pub fn insert(
        &mut self,
        key: String,
        prepared: tokio_postgres::Statement,
        run: tokio_postgres::Statement,
        epoch: u64,
    ) {
        let entry = CachedStatements {
            prepared,
            run,
            epoch,
        };
        if let Some(old) = self.entries.get_mut(&key) {
            *old = entry;
            return;
        }
        while self.entries.len() >= STATEMENTS_PER_CONNECTION_MAX {
            match self.order.pop_front() {
                Some(old) => {
                    self.entries.remove(&old);
                }
                None => break,
            }
        }
        self.order.push_back(key.clone());
        self.entries.insert(key, entry);
    }

    /// Forgets the statements under `key` (PostgreSQL can no longer run them as prepared).
    pub fn remove(&mut self, key: &str) {
        if self.entries.remove(key).is_some() {
            self.order.retain(|k| k != key);
        }
    }
}

/// A bounded pool of read connections.
pub struct ReadPool {
    config: tokio_postgres::Config,
    idle: Mutex<Vec<Conn>>,
    permits: std::sync::Arc<Semaphore>,
    connections_max: usize,
    wait_max: Duration,
}

/// A connection lent by the pool. Returned to it by [`PooledClient::release`]; dropped without
/// it, the connection is closed (its state is unknown).
pub struct PooledClient {
    pool: std::sync::Arc<ReadPool>,
    conn: Option<Conn>,
    clean: bool,
    _permit: OwnedSemaphorePermit,
}

impl ReadPool {
    /// Creates an empty pool; connections are opened on demand.
    pub fn new(config: tokio_postgres::Config, connections_max: usize, wait_max: Duration) -> Self {
        let connections_max = connections_max.max(1);
        ReadPool {
            config,
            idle: Mutex::new(Vec::new()),
            permits: std::sync::Arc::new(Semaphore::new(connections_max)),
            connections_max,
            wait_max,
        }
    }

    /// Borrows a connection, waiting at most the pool's wait limit.
    pub async fn get(self: &std::sync::Arc<Self>) -> Result<PooledClient, PoolError> {
        let permit = tokio::time::timeout(self.wait_max, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| PoolError::Busy(self.connections_max))?
            .map_err(|_| PoolError::Busy(self.connections_max))?;
        let conn = match self.take_idle() {
            Some(c) => c,
            None => self.connect().await?,
        };
        Ok(PooledClient {
            pool: self.clone(),
            conn: Some(conn),
            clean: false,
            _permit: permit,
        })
    }

    /// The most recently returned idle connection that is still open.
    fn take_idle(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop() {
            if !c.client.is_closed() {
                return Some(c);
            }
            c.close();
        }
        None
    }

    /// Opens a read session with the fixed session settings and the backstop time limits.
    async fn connect(&self) -> Result<Conn, PoolError> {
        let (client, connection) = self.config.connect(tokio_postgres::NoTls).await?;
        let io = tokio::spawn(async move {
            // Errors surface to the client half as a closed connection.
            let _ = connection.await;
        });
        let conn = Conn {
            client,
            io,
            state: ConnState::default(),
        };
        if let Err(e) = conn.client.batch_execute(&session_settings_sql()).await {
            conn.close();
            return Err(e.into());
        }
        // Best effort: PostgreSQL before 14 lacks this setting; the backstop above still holds.
        let _ = conn
            .client
            .batch_execute(&format!(
                "SET client_connection_check_interval = {}",
                CLIENT_CHECK_INTERVAL.as_millis()
            ))
            .await;
        Ok(conn)
    }
}

/// The session settings of every read connection: the base output formats
/// ([`SESSION_BASE`]), read-only `REPEATABLE READ` transactions (also for a statement outside
/// a transaction block: a direct read's function calls see one snapshot), and the server-side
/// backstop that ends any read statement or idle read transaction some time after the node's
/// own deadline ([`READ_DURATION_MAX`]) should have ended it.
fn session_settings_sql() -> String {
    let backstop_ms = (READ_DURATION_MAX + BACKSTOP_SLACK).as_millis();
    format!(
        "{}; SET default_transaction_read_only = on; \
         SET default_transaction_isolation = 'repeatable read'; \
         SET statement_timeout = {backstop_ms}; \
         SET idle_in_transaction_session_timeout = {backstop_ms}",
        base_session_sql()
    )
}

impl PooledClient {
    /// The connection, its session put back to raftpg_reader and the base settings.
    pub async fn base_client(
        &mut self,
    ) -> Result<&mut tokio_postgres::Client, tokio_postgres::Error> {
        let (client, state) = self.parts();
        state.to_base(client).await?;
        Ok(client)
    }

    /// The connection and what it knows of its session, as it is (a read's own business).
    pub fn parts(&mut self) -> (&mut tokio_postgres::Client, &mut ConnState) {
        // Set in `get` and only taken in `drop`.
        let conn = self
            .conn
            .as_mut()
            .expect("a pooled client holds a connection until dropped");
        (&mut conn.client, &mut conn.state)
    }

    /// Returns the connection to the pool. Call only when every statement sent on it has
    /// completed (its transaction committed, rolled back, or dropped with its `ROLLBACK`
    /// queued); otherwise just drop the borrower and the connection is closed.
    pub fn release(mut self) {
        self.clean = true;
    }
}

impl Drop for PooledClient {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.clean && !conn.client.is_closed() {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(conn);
        } else {
            conn.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backstop_comes_after_the_node_deadline() {
        let sql = session_settings_sql();
        let backstop = (READ_DURATION_MAX + BACKSTOP_SLACK).as_millis();
        assert!(backstop > READ_DURATION_MAX.as_millis());
        assert!(sql.contains(&format!("SET statement_timeout = {backstop}")));
        assert!(sql.contains(&format!(
            "SET idle_in_transaction_session_timeout = {backstop}"
        )));
        assert!(sql.contains("default_transaction_read_only = on"));
        assert!(sql.contains("SET TimeZone = 'UTC'"));
    }

    #[test]
    fn session_states_name_only_what_differs_from_the_base() {
        assert_eq!(SessionState::wanted(None, &[]), Ok(None));
        let utc = [("timezone".to_string(), "UTC".to_string())];
        assert_eq!(SessionState::wanted(None, &utc), Ok(None));
        let berlin = [("TimeZone".to_string(), "Europe/Berlin".to_string())];
        let s = SessionState::wanted(None, &berlin).unwrap().unwrap();
        assert_eq!(s.values[0], "Europe/Berlin");
        let params = SessionState::switch_params(Some(&s));
        assert_eq!(params[0], "none");
        assert_eq!(params.len(), SESSION_BASE.len() + 1);
        let bob = SessionState::wanted(Some("bob"), &[]).unwrap().unwrap();
        assert_eq!(SessionState::switch_params(Some(&bob))[0], "bob");
        assert_eq!(
            SessionState::switch_params(None)[1..],
            SESSION_BASE
                .iter()
                .map(|(_, v)| v.to_string())
                .collect::<Vec<_>>()[..]
        );
        let odd = [("work_mem".to_string(), "1MB".to_string())];
        assert_eq!(SessionState::wanted(None, &odd), Err("work_mem"));
        assert!(switch_sql().contains("set_config('bytea_output', $6, false)"));
    }
}
