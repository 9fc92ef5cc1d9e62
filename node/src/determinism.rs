//! The leader-side SQL gate: parses each statement with PostgreSQL's own grammar (libpg_query)
//! and refuses, before anything enters the log, what cannot be replicated as a statement.
//!
//! Owns the rules of what SQL a log entry may carry (design.md invariant 2 and "Traps we know
//! about") and what SQL a read may run (invariant 4). Every refusal says why and what to do
//! instead. This is the first layer; `docs/determinism.md` lists the classes. Runs only on the
//! leader (and on the receiving node for reads); followers apply what the log says.

use pg_query::NodeEnum;

/// Why a statement was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// SQLSTATE reported with the refusal.
    pub sqlstate: &'static str,
    /// What is wrong and what to do instead.
    pub message: String,
}

fn refuse(sqlstate: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        sqlstate,
        message: message.into(),
    }
}

const SYNTAX_ERROR: &str = "42601";
const FEATURE_NOT_SUPPORTED: &str = "0A000";
const INSUFFICIENT_PRIVILEGE: &str = "42501";
const READ_ONLY: &str = "25006";

/// Parses `sql` and returns its single statement.
fn parse_one(sql: &str) -> Result<NodeEnum, Refusal> {
    first_statement(parse(sql)?)
}

fn first_statement(parsed: pg_query::ParseResult) -> Result<NodeEnum, Refusal> {
    parsed
        .protobuf
        .stmts
        .into_iter()
        .next()
        .and_then(|raw| raw.stmt)
        .and_then(|node| node.node)
        .ok_or_else(|| refuse(SYNTAX_ERROR, "empty statement"))
}

/// Parses `sql`, requiring exactly one statement that does not touch raftpg's own schema.
fn parse(sql: &str) -> Result<pg_query::ParseResult, Refusal> {
    let parsed = pg_query::parse(sql, 0).map_err(|e| match e {
        pg_query::Error::Parse(m) => refuse(SYNTAX_ERROR, m),
        other => refuse(SYNTAX_ERROR, other.to_string()),
    })?;
    if parsed.protobuf.stmts.len() != 1 {
        return Err(refuse(
            SYNTAX_ERROR,
            format!(
                "each statement must hold exactly one SQL command (found {}); send several statements in one request to run them atomically",
                parsed.protobuf.stmts.len()
            ),
        ));
    }
    // Refuse any reference to raftpg's own bookkeeping (raftpg.applied must only change with
    // the log position).
    if parsed.tables().iter().any(|t| t.starts_with("raftpg.")) {
        return Err(refuse(
            INSUFFICIENT_PRIVILEGE,
            "the schema raftpg holds raftpg's own bookkeeping and cannot be used by statements",
        ));
    }
    Ok(parsed)
}

/// Functions whose result differs between nodes or between runs. Until the leader rewrites
/// them into deterministic equivalents (time from the entry's timestamp, randomness from its
/// seed), a write that calls them, directly or in a column DEFAULT, is refused.
const NON_DETERMINISTIC_FUNCTIONS: &[&str] = &[
    "now",
    "transaction_timestamp",
    "statement_timestamp",
    "clock_timestamp",
    "timeofday",
    "random",
    "random_normal",
    "setseed",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "pg_backend_pid",
    "txid_current",
    "txid_current_if_assigned",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    "inet_server_addr",
    "inet_server_port",
    "inet_client_addr",
    "inet_client_port",
    "pg_postmaster_start_time",
    "pg_conf_load_time",
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_advisory_lock",
    "pg_advisory_xact_lock",
    "pg_try_advisory_lock",
    "pg_try_advisory_xact_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock_shared",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_stat_file",
    "lo_import",
    "lo_export",
    "dblink",
    "dblink_exec",
    "pg_notify",
    "set_config",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "version",
    "current_setting",
];

/// Checks one statement of a write entry.
pub fn check_write(sql: &str) -> Result<(), Refusal> {
    let parsed = parse(sql)?;
    for f in parsed.functions() {
        let name = f.rsplit('.').next().unwrap_or(&f).to_ascii_lowercase();
        if NON_DETERMINISTIC_FUNCTIONS.contains(&name.as_str()) {
            return Err(refuse(
                FEATURE_NOT_SUPPORTED,
                format!(
                    "{name}() gives a different result on each node, so it cannot be replicated as a statement; compute the value in the client and bind it as a parameter"
                ),
            ));
        }
    }
    if parsed
        .protobuf
        .nodes()
        .iter()
        .any(|(n, ..)| matches!(n, pg_query::NodeRef::SqlvalueFunction(_)))
    {
        return Err(refuse(
            FEATURE_NOT_SUPPORTED,
            "CURRENT_TIMESTAMP/CURRENT_DATE/LOCALTIMESTAMP/... differ on each node, so they cannot be replicated as a statement; bind the value as a parameter",
        ));
    }
    let stmt = first_statement(parsed)?;
    let why: Option<&str> = match &stmt {
        NodeEnum::TransactionStmt(_) => Some(
            "explicit transaction control (BEGIN/COMMIT/ROLLBACK/SAVEPOINT) is not allowed: every request already runs as one atomic transaction",
        ),
        NodeEnum::VariableSetStmt(s) if !s.is_local => {
            Some("session-level SET would leak into the shared applier session; use SET LOCAL inside the request")
        }
        NodeEnum::DiscardStmt(_) | NodeEnum::PrepareStmt(_) | NodeEnum::ExecuteStmt(_) | NodeEnum::DeallocateStmt(_) => {
            Some("session state (PREPARE/EXECUTE/DISCARD) is not replicated; send the statement itself with bound parameters")
        }
        NodeEnum::ListenStmt(_) | NodeEnum::UnlistenStmt(_) => Some("LISTEN/UNLISTEN are session state and are not replicated"),
        NodeEnum::DeclareCursorStmt(_) | NodeEnum::FetchStmt(_) | NodeEnum::ClosePortalStmt(_) => {
            Some("cursors are session state; use a query through the read API")
        }
        NodeEnum::VacuumStmt(_) | NodeEnum::CheckPointStmt(_) => {
            Some("VACUUM/ANALYZE/CHECKPOINT are maintenance each node runs on its own, not replicated writes")
        }
        NodeEnum::CreatedbStmt(_) | NodeEnum::DropdbStmt(_) | NodeEnum::AlterDatabaseStmt(_) => {
            Some("databases are managed by raftpg; create schemas instead of databases")
        }
        NodeEnum::AlterSystemStmt(_) | NodeEnum::LoadStmt(_) => Some("node configuration is not replicated through SQL"),
        NodeEnum::CreateTableSpaceStmt(_) | NodeEnum::DropTableSpaceStmt(_) => {
            Some("tablespaces name node-local directories and are not supported")
        }
        NodeEnum::CopyStmt(_) => Some("COPY is not supported: send INSERT statements (several per request) instead"),
        NodeEnum::IndexStmt(s) if s.concurrent => {
            Some("CREATE INDEX CONCURRENTLY cannot run in a transaction; use CREATE INDEX")
        }
        NodeEnum::ReindexStmt(_) => Some("REINDEX is node-local maintenance and is not replicated"),
        NodeEnum::CreateStmt(s) if s.relation.as_ref().is_some_and(|r| r.relpersistence == "t") => {
            Some("temporary tables are session state; use a regular table")
        }
        NodeEnum::SelectStmt(s) if s.into_clause.as_ref().is_some_and(|i| {
            i.rel.as_ref().is_some_and(|r| r.relpersistence == "t")
        }) => Some("temporary tables are session state; use a regular table"),
        _ => None,
    };
    match why {
        Some(m) => Err(refuse(FEATURE_NOT_SUPPORTED, m)),
        None => Ok(()),
    }
}

/// Checks the SQL of a read: only queries are allowed.
pub fn check_read(sql: &str) -> Result<(), Refusal> {
    let stmt = parse_one(sql)?;
    let ok = match &stmt {
        NodeEnum::SelectStmt(s) => s.into_clause.is_none() && s.locking_clause.is_empty(),
        NodeEnum::ExplainStmt(s) => !s.options.iter().any(|o| {
            matches!(&o.node, Some(NodeEnum::DefElem(d)) if d.defname.eq_ignore_ascii_case("analyze"))
        }),
        NodeEnum::VariableShowStmt(_) => true,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(refuse(
            READ_ONLY,
            "the read API runs queries only (SELECT, VALUES, TABLE, WITH ... SELECT, EXPLAIN, SHOW) without FOR UPDATE/SHARE or INTO; send writes to Write.Execute",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes() {
        assert!(check_write("INSERT INTO t VALUES (1)").is_ok());
        assert!(check_write("CREATE TABLE t (id serial primary key)").is_ok());
        assert!(check_write("SET LOCAL work_mem = '64MB'").is_ok());
        assert_eq!(
            check_write("INSRT INTO t").unwrap_err().sqlstate,
            SYNTAX_ERROR
        );
        assert_eq!(
            check_write("BEGIN").unwrap_err().sqlstate,
            FEATURE_NOT_SUPPORTED
        );
        assert_eq!(
            check_write("COMMIT").unwrap_err().sqlstate,
            FEATURE_NOT_SUPPORTED
        );
        assert_eq!(
            check_write("SET work_mem = '1MB'").unwrap_err().sqlstate,
            FEATURE_NOT_SUPPORTED
        );
        assert_eq!(
            check_write("VACUUM t").unwrap_err().sqlstate,
            FEATURE_NOT_SUPPORTED
        );
        assert_eq!(
            check_write("CREATE TEMP TABLE x (a int)")
                .unwrap_err()
                .sqlstate,
            FEATURE_NOT_SUPPORTED
        );
        assert_eq!(
            check_write("CREATE INDEX CONCURRENTLY i ON t (a)")
                .unwrap_err()
                .sqlstate,
            FEATURE_NOT_SUPPORTED
        );
        assert_eq!(
            check_write("SELECT 1; SELECT 2").unwrap_err().sqlstate,
            SYNTAX_ERROR
        );
        assert_eq!(
            check_write("UPDATE raftpg.applied SET log_index = 0")
                .unwrap_err()
                .sqlstate,
            INSUFFICIENT_PRIVILEGE
        );
    }

    #[test]
    fn reads() {
        assert!(check_read("SELECT * FROM t WHERE id = $1").is_ok());
        assert!(check_read("WITH x AS (SELECT 1) SELECT * FROM x").is_ok());
        assert!(check_read("SHOW server_version").is_ok());
        assert_eq!(
            check_read("INSERT INTO t VALUES (1)").unwrap_err().sqlstate,
            READ_ONLY
        );
        assert_eq!(
            check_read("SELECT * FROM t FOR UPDATE")
                .unwrap_err()
                .sqlstate,
            READ_ONLY
        );
        assert_eq!(
            check_read("SET statement_timeout = 1")
                .unwrap_err()
                .sqlstate,
            READ_ONLY
        );
        assert_eq!(
            check_read("EXPLAIN ANALYZE DELETE FROM t")
                .unwrap_err()
                .sqlstate,
            READ_ONLY
        );
    }
}
