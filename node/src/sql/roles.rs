//! Role statements: `CREATE ROLE/USER`, `ALTER ROLE/USER`, `DROP ROLE/USER` and role
//! membership (`GRANT r TO u`, `REVOKE r FROM u`) are replicated writes, so every node holds
//! the same roles and the same password verifiers.
//!
//! Rules, applied on the leader before the statement enters the log:
//! - A password is turned into its SCRAM-SHA-256 verifier here, once (random salt): the log,
//!   every node's `pg_authid` and every snapshot hold the verifier, never the password.
//!   PostgreSQL stores a password that already is a SCRAM-SHA-256 verifier as given; an MD5
//!   hash is refused (raftpg authenticates with SCRAM-SHA-256 only).
//! - No `SUPERUSER` or `REPLICATION`: a superuser can read and run what is local to one node
//!   (its files, its programs), which would make the copies differ, and could undo every
//!   privilege check; replication is each node's own business.
//! - raftpg's own roles (`raftpg`, `raftpg_reader`, `raftpg_admin`) cannot be created, altered,
//!   renamed or dropped (`raftpg_admin` may be granted and revoked: that is how a role becomes
//!   an administrator of the cluster), and PostgreSQL's predefined `pg_*` roles (which reach
//!   node-local files, programs and backends) cannot be granted.

use pg_query::protobuf::node::Node as NodeEnum;
use pg_query::protobuf::{DefElem, Node};

use super::refusal::{refuse, Refusal};
use crate::auth::scram;

/// The role that administers the cluster (membership, checks, every node's status).
pub const ADMIN_ROLE: &str = "raftpg_admin";

/// raftpg's own roles.
const OWN_ROLES: &[&str] = &["raftpg", "raftpg_reader", ADMIN_ROLE];

const FEATURE_NOT_SUPPORTED: &str = "0A000";
const INSUFFICIENT_PRIVILEGE: &str = "42501";
const INVALID_PASSWORD: &str = "28P01";

/// Checks a role statement (see the module doc) and returns it with its password replaced by
/// a verifier, when it has one; `Ok(None)` for any other statement or when nothing changes.
pub fn prepare(sql: &str, stmt: &NodeEnum) -> Result<Option<String>, Refusal> {
    let (name, options): (Option<&str>, &[Node]) = match stmt {
        NodeEnum::CreateRoleStmt(s) => (Some(s.role.as_str()), &s.options),
        NodeEnum::AlterRoleStmt(s) => (role_spec_name(s.role.as_ref()), &s.options),
        NodeEnum::AlterRoleSetStmt(s) => (role_spec_name(s.role.as_ref()), &[]),
        NodeEnum::DropRoleStmt(s) => {
            for r in &s.roles {
                check_not_own(role_name(r))?;
            }
            return Ok(None);
        }
        NodeEnum::GrantRoleStmt(s) => {
            for r in &s.granted_roles {
                let granted = role_name(r).or_else(|| access_priv_name(r));
                if granted.is_some_and(|g| g.starts_with("pg_")) {
                    return Err(refuse(
                        INSUFFICIENT_PRIVILEGE,
                        "PostgreSQL's predefined roles (pg_*) reach node-local files, programs and backends and cannot be granted",
                    ));
                }
            }
            for r in &s.grantee_roles {
                check_not_own(role_name(r))?;
            }
            return Ok(None);
        }
        NodeEnum::RenameStmt(s)
            if s.rename_type == pg_query::protobuf::ObjectType::ObjectRole as i32 =>
        {
            check_not_own(Some(s.subname.as_str()))?;
            check_not_own(Some(s.newname.as_str()))?;
            return Ok(None);
        }
        _ => return Ok(None),
    };
    check_not_own(name)?;
    if let NodeEnum::AlterRoleSetStmt(_) = stmt {
        return Err(refuse(
            FEATURE_NOT_SUPPORTED,
            "ALTER ROLE ... SET is not supported: per-role settings would apply to raftpg's own sessions; use SET LOCAL inside the write",
        ));
    }
    let mut password = None;
    for o in options {
        let Some(NodeEnum::DefElem(d)) = &o.node else {
            continue;
        };
        match d.defname.as_str() {
            "superuser" if is_true(d) => {
                return Err(refuse(
                    INSUFFICIENT_PRIVILEGE,
                    "a superuser could read and run what is local to one node and undo every privilege check; give the role CREATEROLE and membership in raftpg_admin instead",
                ))
            }
            "isreplication" if is_true(d) => {
                return Err(refuse(
                    FEATURE_NOT_SUPPORTED,
                    "REPLICATION is each node's own business; raftpg replicates through its log",
                ))
            }
            "password" => password = Some(d),
            _ => {}
        }
    }
    match password {
        Some(d) => rewrite_password(sql, d),
        None => Ok(None),
    }
}

/// Replaces the password literal of option `d` with its verifier.
fn rewrite_password(sql: &str, d: &DefElem) -> Result<Option<String>, Refusal> {
    let plain = match d.arg.as_deref().and_then(|a| a.node.as_ref()) {
        Some(NodeEnum::String(s)) => s.sval.clone(),
        // PASSWORD NULL: no password.
        _ => return Ok(None),
    };
    if scram::is_verifier(&plain) {
        return Ok(None);
    }
    if plain.len() == 35
        && plain.starts_with("md5")
        && plain[3..].bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(refuse(
            INVALID_PASSWORD,
            "MD5 password hashes are not accepted: raftpg authenticates with SCRAM-SHA-256; give the password itself (raftpg stores only its SCRAM-SHA-256 verifier) or a SCRAM-SHA-256 verifier",
        ));
    }
    if plain.is_empty() {
        return Err(refuse(INVALID_PASSWORD, "empty passwords are not allowed"));
    }
    let (start, end) = password_literal_span(sql, d.location).ok_or_else(|| {
        refuse(
            FEATURE_NOT_SUPPORTED,
            "raftpg could not find the password in this statement to replace it with its verifier; write it as PASSWORD 'text'",
        )
    })?;
    let verifier = scram::make_verifier(&plain);
    Ok(Some(format!(
        "{}'{verifier}'{}",
        &sql[..start],
        &sql[end..]
    )))
}

/// The byte span of the first string literal at or after byte `from` (the PASSWORD option).
fn password_literal_span(sql: &str, from: i32) -> Option<(usize, usize)> {
    let from = usize::try_from(from).ok()?;
    let scanned = pg_query::scan(sql).ok()?;
    scanned.tokens.iter().find_map(|t| {
        let (start, end) = (usize::try_from(t.start).ok()?, usize::try_from(t.end).ok()?);
        let text = sql.get(start..end)?;
        let literal = text.starts_with('\'')
            || text.starts_with("E'")
            || text.starts_with("e'")
            || text.starts_with("U&'")
            || text.starts_with("u&'")
            || text.starts_with('$');
        (start >= from && literal).then_some((start, end))
    })
}

fn is_true(d: &DefElem) -> bool {
    match d.arg.as_deref().and_then(|a| a.node.as_ref()) {
        Some(NodeEnum::Boolean(b)) => b.boolval,
        Some(NodeEnum::Integer(i)) => i.ival != 0,
        _ => true,
    }
}

fn check_not_own(name: Option<&str>) -> Result<(), Refusal> {
    match name {
        Some(n) if OWN_ROLES.contains(&n) => Err(refuse(
            INSUFFICIENT_PRIVILEGE,
            format!("the role {n} belongs to raftpg and cannot be created, changed or dropped by a write"),
        )),
        _ => Ok(()),
    }
}

fn role_spec_name(r: Option<&pg_query::protobuf::RoleSpec>) -> Option<&str> {
    r.map(|r| r.rolename.as_str())
}

fn role_name(n: &Node) -> Option<&str> {
    match &n.node {
        Some(NodeEnum::RoleSpec(r)) => Some(r.rolename.as_str()),
        _ => None,
    }
}

fn access_priv_name(n: &Node) -> Option<&str> {
    match &n.node {
        Some(NodeEnum::AccessPriv(a)) => Some(a.priv_name.as_str()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(sql: &str) -> Result<Option<String>, Refusal> {
        let parsed = pg_query::parse(sql, 0).unwrap();
        let stmt = parsed.protobuf.stmts[0]
            .stmt
            .as_ref()
            .unwrap()
            .node
            .as_ref()
            .unwrap()
            .clone();
        prepare(sql, &stmt)
    }

    #[test]
    fn passwords_become_verifiers() {
        for sql in [
            "CREATE ROLE bob LOGIN PASSWORD 'hunter2'",
            "CREATE USER bob WITH ENCRYPTED PASSWORD 'hunter2' VALID UNTIL 'infinity'",
            "ALTER ROLE bob PASSWORD 'hunter2'",
            "ALTER USER bob WITH PASSWORD E'hunter2'",
            "CREATE ROLE bob LOGIN PASSWORD $p$hunter2$p$",
        ] {
            let out = run(sql).unwrap().unwrap_or_else(|| panic!("{sql}"));
            assert!(!out.contains("hunter2"), "{out}");
            let start = out.find("'SCRAM-SHA-256$").unwrap() + 1;
            let end = start + out[start..].find('\'').unwrap();
            let v = scram::Verifier::parse(&out[start..end]).unwrap();
            assert!(v.matches("hunter2"), "{sql}");
            assert!(pg_query::parse(&out, 0).is_ok(), "{out}");
        }
        // A verifier stays; no password, no change.
        let v = scram::make_verifier("x");
        assert_eq!(
            run(&format!("CREATE ROLE bob PASSWORD '{v}'")).unwrap(),
            None
        );
        assert_eq!(run("CREATE ROLE bob LOGIN").unwrap(), None);
        assert_eq!(run("ALTER ROLE bob PASSWORD NULL").unwrap(), None);
    }

    #[test]
    fn refused() {
        for sql in [
            "CREATE ROLE bob SUPERUSER",
            "ALTER ROLE bob SUPERUSER",
            "CREATE ROLE bob REPLICATION",
            "CREATE ROLE bob PASSWORD 'md5c2a9c5ab6fb3ebd5c6e5a0f1a9b0a6e1'",
            "CREATE ROLE bob PASSWORD ''",
            "CREATE ROLE raftpg_admin",
            "DROP ROLE raftpg_admin",
            "ALTER ROLE raftpg_admin LOGIN",
            "ALTER ROLE bob RENAME TO raftpg_admin",
            "GRANT pg_read_server_files TO bob",
            "GRANT pg_execute_server_program TO bob",
            "ALTER ROLE bob SET work_mem = '1MB'",
        ] {
            assert!(run(sql).is_err(), "{sql}");
        }
        for sql in [
            "CREATE ROLE bob NOSUPERUSER CREATEROLE",
            "GRANT raftpg_admin TO bob",
            "REVOKE raftpg_admin FROM bob",
            "DROP ROLE bob",
            "GRANT alice TO bob",
        ] {
            assert!(run(sql).is_ok(), "{sql}");
        }
    }
}
