//! Divergence detection: per-table checksums of the user database, computed by the applier at
//! one exact log position (a `Command::Checksum` entry), so that every node hashes the same
//! logical state even while writes continue.
//!
//! Owns the table `raftpg.checksums` (the last results, by log index). Checksums are
//! order-independent (count, sum and xor of a 64-bit hash of each row's text form), so they do
//! not depend on physical row order and need constant memory; sequences are compared by
//! `last_value/is_called`, and the user roles (`raftpg.role_state()`: attributes, verifiers,
//! memberships; cluster-wide objects that are part of every copy since issue 16) by the hash of
//! their state, as one entry named `roles` (no table's name lacks a schema), and the owners and
//! privileges of the user's schemas, relations, columns, functions and default privileges as
//! one entry named `privileges` (reads and writes run as roles, so a grant that differs
//! between nodes gives different answers). An ACL PostgreSQL keeps as NULL (the default) and
//! the same default written out — as a restored snapshot may have it — hash the same.

use crate::command::TableChecksum;

/// Creates the table (idempotent).
pub const BOOTSTRAP_SQL: &str = "
    CREATE TABLE IF NOT EXISTS raftpg.checksums (
        log_index bigint NOT NULL,
        name      text   NOT NULL,
        rows      bigint NOT NULL,
        hash      text   NOT NULL,
        PRIMARY KEY (log_index, name)
    );
";

/// How many checks are kept.
const CHECKS_KEPT: i64 = 16;

/// Computes the checksums of every user table and sequence (inside the caller's transaction).
pub async fn compute(
    client: &tokio_postgres::Client,
) -> Result<Vec<TableChecksum>, tokio_postgres::Error> {
    let mut out = Vec::new();
    let tables = client
        .query(
            "SELECT n FROM (SELECT format('%I.%I', schemaname, tablename) AS n FROM pg_tables
                            WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'raftpg')) t
             ORDER BY n COLLATE \"C\"",
            &[],
        )
        .await?;
    for t in tables {
        let name: String = t.get(0);
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(sum(h::numeric), 0)::text || ':' || coalesce(bit_xor(h), 0)::text
                     FROM (SELECT hashtextextended(x::text, 0) AS h FROM {name} x) s"
                ),
                &[],
            )
            .await?;
        out.push(TableChecksum {
            name,
            rows: row.get(0),
            hash: row.get(1),
        });
    }
    let seqs = client
        .query(
            "SELECT n FROM (SELECT format('%I.%I', schemaname, sequencename) AS n FROM pg_sequences
                            WHERE schemaname <> 'raftpg') t
             ORDER BY n COLLATE \"C\"",
            &[],
        )
        .await?;
    for s in seqs {
        let name: String = s.get(0);
        let row = client
            .query_one(
                &format!("SELECT last_value::text || '/' || is_called::text FROM {name}"),
                &[],
            )
            .await?;
        out.push(TableChecksum {
            name: format!("sequence {name}"),
            rows: 0,
            hash: row.get(0),
        });
    }
    let roles = client
        .query_one(
            "SELECT jsonb_array_length(s->'roles')::bigint, md5(s::text) FROM raftpg.role_state() s",
            &[],
        )
        .await?;
    out.push(TableChecksum {
        name: "roles".to_string(),
        rows: roles.get(0),
        hash: roles.get(1),
    });
    let privileges = client.query_one(PRIVILEGES_SQL, &[]).await?;
    out.push(TableChecksum {
        name: "privileges".to_string(),
        rows: privileges.get(0),
        hash: privileges.get(1),
    });
    Ok(out)
}

/// One line per user object (owner and sorted ACL, NULL read as the default), their count and
/// the md5 of the sorted lines.
const PRIVILEGES_SQL: &str = r#"
    WITH user_ns AS (
        SELECT oid, nspname, nspowner, nspacl FROM pg_catalog.pg_namespace
        WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'raftpg')
          AND nspname NOT LIKE 'pg\_toast%' AND nspname NOT LIKE 'pg\_temp\_%'
    ), lines AS (
        SELECT format('schema %I owner %s acl %s', n.nspname, pg_catalog.pg_get_userbyid(n.nspowner),
                      (SELECT string_agg(a::text, ',' ORDER BY a::text COLLATE "C")
                       FROM unnest(coalesce(n.nspacl, pg_catalog.acldefault('n', n.nspowner))) a)) AS line
        FROM user_ns n
        UNION ALL
        SELECT format('relation %I.%I owner %s acl %s', n.nspname, c.relname,
                      pg_catalog.pg_get_userbyid(c.relowner),
                      (SELECT string_agg(a::text, ',' ORDER BY a::text COLLATE "C")
                       FROM unnest(coalesce(c.relacl, pg_catalog.acldefault(
                           CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END::"char", c.relowner))) a))
        FROM pg_catalog.pg_class c JOIN user_ns n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
        UNION ALL
        SELECT format('column %I.%I.%I acl %s', n.nspname, c.relname, a.attname,
                      (SELECT string_agg(x::text, ',' ORDER BY x::text COLLATE "C")
                       FROM unnest(a.attacl) x))
        FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
        JOIN user_ns n ON n.oid = c.relnamespace
        WHERE a.attacl IS NOT NULL AND cardinality(a.attacl) > 0 AND NOT a.attisdropped
        UNION ALL
        SELECT format('function %I.%I(%s) owner %s acl %s', n.nspname, p.proname,
                      pg_catalog.pg_get_function_identity_arguments(p.oid),
                      pg_catalog.pg_get_userbyid(p.proowner),
                      (SELECT string_agg(a::text, ',' ORDER BY a::text COLLATE "C")
                       FROM unnest(coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))) a))
        FROM pg_catalog.pg_proc p JOIN user_ns n ON n.oid = p.pronamespace
        UNION ALL
        SELECT format('default %s %s %s acl %s', pg_catalog.pg_get_userbyid(d.defaclrole),
                      coalesce((SELECT nspname FROM pg_catalog.pg_namespace WHERE oid = d.defaclnamespace), '*'),
                      d.defaclobjtype,
                      (SELECT string_agg(a::text, ',' ORDER BY a::text COLLATE "C")
                       FROM unnest(d.defaclacl) a))
        FROM pg_catalog.pg_default_acl d
    )
    SELECT count(*)::bigint, coalesce(md5(string_agg(line, E'
' ORDER BY line COLLATE "C")), '')
    FROM lines"#;

/// Stores the checksums computed at `index` (inside the apply transaction), keeping the last
/// few checks.
pub async fn store(
    client: &tokio_postgres::Client,
    index: u64,
    sums: &[TableChecksum],
) -> Result<(), tokio_postgres::Error> {
    let index = i64::try_from(index).unwrap_or(i64::MAX);
    for s in sums {
        client
            .execute(
                "INSERT INTO raftpg.checksums (log_index, name, rows, hash) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (log_index, name) DO UPDATE SET rows = EXCLUDED.rows, hash = EXCLUDED.hash",
                &[&index, &s.name, &s.rows, &s.hash],
            )
            .await?;
    }
    client
        .execute(
            "DELETE FROM raftpg.checksums WHERE log_index < (
                 SELECT coalesce(min(log_index), 0) FROM (
                     SELECT DISTINCT log_index FROM raftpg.checksums ORDER BY log_index DESC LIMIT $1) k)",
            &[&CHECKS_KEPT],
        )
        .await?;
    Ok(())
}

/// The checksums this node stored for the check at `index`, or `None` if it has none.
pub async fn read(
    client: &tokio_postgres::Client,
    index: u64,
) -> Result<Option<Vec<TableChecksum>>, tokio_postgres::Error> {
    let idx = i64::try_from(index).unwrap_or(i64::MAX);
    let has = client
        .query_opt(
            "SELECT 1 FROM raftpg.checksums WHERE log_index = $1 LIMIT 1",
            &[&idx],
        )
        .await?
        .is_some();
    let applied: i64 = client
        .query_one("SELECT log_index FROM raftpg.applied", &[])
        .await?
        .get(0);
    if !has && applied < idx {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT name, rows, hash FROM raftpg.checksums WHERE log_index = $1 ORDER BY name COLLATE \"C\"",
            &[&idx],
        )
        .await?;
    Ok(Some(
        rows.iter()
            .map(|r| TableChecksum {
                name: r.get(0),
                rows: r.get(1),
                hash: r.get(2),
            })
            .collect(),
    ))
}
