//! What a statement sent over the wire protocol is, before anything runs: a query (run as a
//! read), something the session answers itself (`SET`, `SHOW` of a session setting,
//! transaction control), or a write (everything else; the SQL gate decides on the leader).
//!
//! Owns the split of a simple-query string into its statements (PostgreSQL's own grammar,
//! libpg_query) and each statement's command tag, as PostgreSQL would report it.

use pg_query::protobuf::{a_const, node::Node as N, Node, TransactionStmtKind, VariableSetKind};

pub use crate::service::SavepointOp;
use crate::sql::gate;

use super::copy::{self, CopyIn};

/// One statement of a query string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    /// Its text, exactly as sent.
    pub sql: String,
    /// Where the statement starts in the query string, in characters (for error positions).
    pub offset: usize,
    /// What it is.
    pub kind: Kind,
}

/// What a statement is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A query: runs as a read on this node.
    Read {
        /// Its command tag's word (`SELECT`, `SHOW`, `EXPLAIN`).
        tag: String,
    },
    /// Anything else: a write through the log.
    Write {
        /// Its command tag without a row count (`INSERT`, `CREATE TABLE`, ...).
        tag: String,
    },
    /// `SET name TO value` for the session (`value` `None`: `RESET` or `TO DEFAULT`).
    Set {
        /// The setting's name, lower case.
        name: String,
        /// The value's text.
        value: Option<String>,
    },
    /// `RESET ALL` / `DISCARD ALL`: every session setting back to its start value.
    ResetAll {
        /// `RESET` or `DISCARD ALL`.
        tag: String,
    },
    /// `SHOW name`, answered by the session when it owns the setting (else run as a read).
    Show {
        /// The setting's name, lower case.
        name: String,
    },
    /// `BEGIN` / `START TRANSACTION`.
    Begin,
    /// `COMMIT` / `END` (`commit` true) or `ROLLBACK` / `ABORT`.
    End {
        /// Commit (or roll back).
        commit: bool,
    },
    /// `SAVEPOINT name`, `RELEASE SAVEPOINT name`, `ROLLBACK TO SAVEPOINT name`.
    Savepoint {
        /// Which of the three.
        op: SavepointOp,
        /// The savepoint's name (an identifier: folded to lower case unless quoted).
        name: String,
    },
    /// `SET TRANSACTION …`: raftpg's transactions are serializable whatever the level asked
    /// for (they run alone at their position in the log).
    SetTransaction,
    /// Transaction control raftpg cannot do (two-phase commit) or not outside a transaction
    /// block.
    InTransactionOnly {
        /// The statement's name, for the message.
        what: String,
    },
    /// `COPY … FROM STDIN`: rows the client streams, written as `INSERT`s.
    CopyIn(Box<CopyIn>),
    /// A statement refused before anything runs.
    Refused {
        /// Its SQLSTATE.
        sqlstate: &'static str,
        /// Why.
        message: String,
    },
}

/// Why a query string could not be split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError(pub String);

/// Splits a query string into its statements (none for an empty string).
pub fn split(query: &str) -> Result<Vec<Statement>, SyntaxError> {
    let parsed = pg_query::parse(query, 0).map_err(|e| match e {
        pg_query::Error::Parse(m) => SyntaxError(m),
        other => SyntaxError(other.to_string()),
    })?;
    let mut out = Vec::new();
    for raw in &parsed.protobuf.stmts {
        let start = usize::try_from(raw.stmt_location).unwrap_or(0);
        let end = match usize::try_from(raw.stmt_len).unwrap_or(0) {
            0 => query.len(),
            n => start + n,
        };
        let sql = query.get(start..end).unwrap_or(query).trim().to_string();
        let node = raw.stmt.as_ref().and_then(|n| n.node.as_ref());
        let kind = classify(&sql, node);
        let at = start + leading_space(query.get(start..end).unwrap_or(""));
        out.push(Statement {
            sql,
            offset: query.get(..at).map_or(0, |q| q.chars().count()),
            kind,
        });
    }
    Ok(out)
}

fn leading_space(s: &str) -> usize {
    s.len() - s.trim_start().len()
}

fn classify(sql: &str, node: Option<&N>) -> Kind {
    match node {
        Some(N::VariableSetStmt(s)) if !s.is_local => set_kind(s),
        Some(N::VariableShowStmt(s)) => Kind::Show {
            name: s.name.to_ascii_lowercase(),
        },
        Some(N::TransactionStmt(t)) => match TransactionStmtKind::try_from(t.kind) {
            Ok(TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart) => {
                Kind::Begin
            }
            Ok(TransactionStmtKind::TransStmtCommit) => Kind::End { commit: true },
            Ok(TransactionStmtKind::TransStmtRollback) => Kind::End { commit: false },
            Ok(TransactionStmtKind::TransStmtSavepoint) => Kind::Savepoint {
                op: SavepointOp::Define,
                name: t.savepoint_name.clone(),
            },
            Ok(TransactionStmtKind::TransStmtRelease) => Kind::Savepoint {
                op: SavepointOp::Release,
                name: t.savepoint_name.clone(),
            },
            Ok(TransactionStmtKind::TransStmtRollbackTo) => Kind::Savepoint {
                op: SavepointOp::RollbackTo,
                name: t.savepoint_name.clone(),
            },
            _ => Kind::InTransactionOnly {
                what: first_words(sql, 2),
            },
        },
        Some(N::CopyStmt(c)) if copy::copy_in(c).is_some() => match copy::copy_in(c) {
            Some(Ok(c)) => Kind::CopyIn(Box::new(c)),
            Some(Err(message)) => Kind::Refused {
                sqlstate: "0A000",
                message,
            },
            None => Kind::Write { tag: "COPY".into() },
        },
        Some(N::DiscardStmt(_)) => Kind::ResetAll {
            tag: first_words(sql, 2).to_ascii_uppercase(),
        },
        // The kind decides here; the read's own check (role escapes included) runs when it is
        // admitted.
        Some(node) if gate::is_query(node) => Kind::Read {
            tag: match node {
                N::ExplainStmt(_) => "EXPLAIN",
                _ => "SELECT",
            }
            .to_string(),
        },
        Some(node) => Kind::Write {
            tag: command_tag(node, sql),
        },
        None => Kind::Write {
            tag: first_words(sql, 1).to_ascii_uppercase(),
        },
    }
}

fn set_kind(s: &pg_query::protobuf::VariableSetStmt) -> Kind {
    let name = s.name.to_ascii_lowercase();
    match VariableSetKind::try_from(s.kind) {
        Ok(VariableSetKind::VarResetAll) => Kind::ResetAll {
            tag: "RESET".into(),
        },
        Ok(VariableSetKind::VarReset | VariableSetKind::VarSetDefault) => {
            Kind::Set { name, value: None }
        }
        Ok(VariableSetKind::VarSetValue) => Kind::Set {
            name,
            value: Some(s.args.iter().map(const_text).collect::<Vec<_>>().join(", ")),
        },
        _ if s.name.eq_ignore_ascii_case("transaction") => Kind::SetTransaction,
        _ => Kind::InTransactionOnly {
            what: format!("SET {}", s.name),
        },
    }
}

/// The text of a constant in a `SET` (a string, a number, a keyword).
fn const_text(n: &Node) -> String {
    match &n.node {
        Some(N::AConst(c)) => match &c.val {
            Some(a_const::Val::Sval(s)) => s.sval.clone(),
            Some(a_const::Val::Ival(i)) => i.ival.to_string(),
            Some(a_const::Val::Fval(f)) => f.fval.clone(),
            Some(a_const::Val::Boolval(b)) => b.boolval.to_string(),
            Some(a_const::Val::Bsval(b)) => b.bsval.clone(),
            None => String::new(),
        },
        Some(N::TypeCast(c)) => c.arg.as_deref().map(const_text).unwrap_or_default(),
        _ => String::new(),
    }
}

/// The first `n` words of `sql`, upper case.
fn first_words(sql: &str, n: usize) -> String {
    sql.split_whitespace()
        .take(n)
        .collect::<Vec<_>>()
        .join(" ")
        .trim_end_matches(';')
        .to_ascii_uppercase()
}

/// The command tag PostgreSQL reports for a write (without its row count).
fn command_tag(node: &N, sql: &str) -> String {
    let tag = match node {
        N::InsertStmt(_) => "INSERT",
        N::UpdateStmt(_) => "UPDATE",
        N::DeleteStmt(_) => "DELETE",
        N::MergeStmt(_) => "MERGE",
        N::SelectStmt(_) => "SELECT",
        N::CreateTableAsStmt(_) => "SELECT",
        N::CreateStmt(_) => "CREATE TABLE",
        N::IndexStmt(_) => "CREATE INDEX",
        N::ViewStmt(_) => "CREATE VIEW",
        N::CreateSeqStmt(_) => "CREATE SEQUENCE",
        N::AlterSeqStmt(_) => "ALTER SEQUENCE",
        N::CreateSchemaStmt(_) => "CREATE SCHEMA",
        N::CreateEnumStmt(_) | N::CompositeTypeStmt(_) | N::CreateRangeStmt(_) => "CREATE TYPE",
        N::CreateDomainStmt(_) => "CREATE DOMAIN",
        N::CreateFunctionStmt(f) if f.is_procedure => "CREATE PROCEDURE",
        N::CreateFunctionStmt(_) => "CREATE FUNCTION",
        N::CreateTrigStmt(_) => "CREATE TRIGGER",
        N::CreateExtensionStmt(_) => "CREATE EXTENSION",
        N::CreateRoleStmt(_) => "CREATE ROLE",
        N::AlterRoleStmt(_) => "ALTER ROLE",
        N::DropRoleStmt(_) => "DROP ROLE",
        N::GrantStmt(g) if g.is_grant => "GRANT",
        N::GrantStmt(_) => "REVOKE",
        N::GrantRoleStmt(g) if g.is_grant => "GRANT ROLE",
        N::GrantRoleStmt(_) => "REVOKE ROLE",
        N::TruncateStmt(_) => "TRUNCATE TABLE",
        N::DoStmt(_) => "DO",
        N::CallStmt(_) => "CALL",
        N::CommentStmt(_) => "COMMENT",
        N::CreatePolicyStmt(_) => "CREATE POLICY",
        N::CopyStmt(_) => "COPY",
        N::VariableSetStmt(_) => "SET",
        // DROP x, ALTER x, and the rest: the statement's own words.
        _ => return keyword_tag(sql),
    };
    tag.to_string()
}

/// A tag from the statement's leading keywords: the verb and the object's kind (`DROP TABLE`,
/// `ALTER TABLE`, `DROP MATERIALIZED VIEW`), skipping modifiers (`IF EXISTS`, `OR REPLACE`).
fn keyword_tag(sql: &str) -> String {
    const MODIFIERS: [&str; 9] = [
        "IF",
        "EXISTS",
        "OR",
        "REPLACE",
        "UNIQUE",
        "CONCURRENTLY",
        "TEMP",
        "TEMPORARY",
        "UNLOGGED",
    ];
    // Object kinds of two words.
    const FIRST_OF_TWO: [&str; 5] = ["MATERIALIZED", "FOREIGN", "EVENT", "TEXT", "ACCESS"];
    let mut words = sql
        .split_whitespace()
        .map(|w| w.trim_end_matches(';').to_ascii_uppercase());
    let mut tag: Vec<String> = words.next().into_iter().collect();
    let mut rest = words.filter(|w| !MODIFIERS.contains(&w.as_str()));
    if let Some(kind) = rest.next() {
        let two = FIRST_OF_TWO.contains(&kind.as_str());
        tag.push(kind);
        if two {
            tag.extend(rest.next());
        }
    }
    tag.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(q: &str) -> Vec<Kind> {
        split(q).unwrap().into_iter().map(|s| s.kind).collect()
    }

    #[test]
    fn splits_and_classifies() {
        let s = split("SELECT 1; INSERT INTO t VALUES (1);  SET DateStyle = ISO, MDY").unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].sql, "SELECT 1");
        assert_eq!(s[1].sql, "INSERT INTO t VALUES (1)");
        assert_eq!(s[1].offset, 10);
        assert_eq!(
            s[2].kind,
            Kind::Set {
                name: "datestyle".into(),
                // The grammar folds unquoted words to lower case; the setting reads either.
                value: Some("iso, mdy".into())
            }
        );
        assert_eq!(
            s[0].kind,
            Kind::Read {
                tag: "SELECT".into()
            }
        );
        assert!(split("").unwrap().is_empty());
        assert!(split("SELEC 1").is_err());
    }

    #[test]
    fn transaction_control_and_settings() {
        assert_eq!(kinds("BEGIN"), vec![Kind::Begin]);
        assert_eq!(kinds("commit"), vec![Kind::End { commit: true }]);
        assert_eq!(kinds("ABORT"), vec![Kind::End { commit: false }]);
        assert_eq!(
            kinds("RESET TimeZone"),
            vec![Kind::Set {
                name: "timezone".into(),
                value: None
            }]
        );
        assert_eq!(
            kinds("SET TIME ZONE 'UTC'"),
            vec![Kind::Set {
                name: "timezone".into(),
                value: Some("UTC".into())
            }]
        );
        assert_eq!(
            kinds("SET extra_float_digits = 3"),
            vec![Kind::Set {
                name: "extra_float_digits".into(),
                value: Some("3".into())
            }]
        );
        assert!(matches!(
            kinds("SET LOCAL work_mem = '1MB'")[0],
            Kind::Write { .. }
        ));
        assert_eq!(
            kinds("SAVEPOINT A; RELEASE SAVEPOINT \"B\"; ROLLBACK TO c; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            vec![
                Kind::Savepoint {
                    op: SavepointOp::Define,
                    name: "a".into()
                },
                Kind::Savepoint {
                    op: SavepointOp::Release,
                    name: "B".into()
                },
                Kind::Savepoint {
                    op: SavepointOp::RollbackTo,
                    name: "c".into()
                },
                Kind::SetTransaction,
            ]
        );
        assert_eq!(
            kinds("SHOW TimeZone"),
            vec![Kind::Show {
                name: "timezone".into()
            }]
        );
        assert_eq!(
            kinds("DISCARD ALL"),
            vec![Kind::ResetAll {
                tag: "DISCARD ALL".into()
            }]
        );
    }

    #[test]
    fn command_tags() {
        let tag = |q: &str| match &kinds(q)[0] {
            Kind::Write { tag } => tag.clone(),
            k => panic!("{k:?}"),
        };
        assert_eq!(tag("insert into t values (1)"), "INSERT");
        assert_eq!(tag("CREATE TABLE t (a int)"), "CREATE TABLE");
        assert_eq!(tag("create unique index i on t (a)"), "CREATE INDEX");
        assert_eq!(tag("DROP TABLE IF EXISTS t"), "DROP TABLE");
        assert_eq!(tag("drop index i"), "DROP INDEX");
        assert_eq!(tag("ALTER TABLE t ADD COLUMN b int"), "ALTER TABLE");
        assert_eq!(
            tag("CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'"),
            "CREATE FUNCTION"
        );
        assert_eq!(tag("SELECT nextval('s') FOR UPDATE"), "SELECT");
        assert_eq!(tag("DROP MATERIALIZED VIEW v"), "DROP MATERIALIZED VIEW");
    }
}
