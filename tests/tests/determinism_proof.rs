//! The proof that writes cannot diverge, generated from PostgreSQL's own catalog instead of
//! examples (issue 18): for every function of `pg_proc` that is not immutable (PostgreSQL's and
//! the allowed extensions'), every non-immutable operator and cast, every system relation of
//! `pg_catalog` and `information_schema`, and every system column, a write that stores its
//! value in a table — on a 3-node cluster where one node's PostgreSQL crashed, one node
//! restarted, and one node's tables were rewritten and analyzed behind raftpg's back (so
//! object ids, physical row positions, sizes and statistics differ). Each write must be refused
//! or store the same value on every node (read from each node's PostgreSQL directly).
//!
//! `RAFTPG_REGENERATE=1` rewrites the verdict table in `docs/determinism-proof.md`.

use std::collections::BTreeMap;
use std::time::Duration;

use raftpg_node::sql::catalog;
use testkit::start_cluster;

/// A sample value for an argument of type `t` (as `format_type` prints it), or `None` when no
/// value of the type can be written (internal types: the call is refused by name anyway).
fn sample(t: &str) -> String {
    let lit = |v: &str| format!("'{v}'::{t}");
    match t {
        "integer" | "smallint" | "bigint" => lit("1"),
        "oid" => "'proof_src'::regclass".into(),
        "regclass" => lit("proof_src"),
        "regtype" => lit("integer"),
        "regproc" => lit("lower"),
        "regprocedure" => lit("lower(text)"),
        "regoper" => lit("||/"),
        "regoperator" => lit("+(integer,integer)"),
        "regnamespace" => lit("public"),
        "regrole" => lit("pg_monitor"),
        "regconfig" => lit("english"),
        "regdictionary" => lit("simple"),
        "regcollation" => lit("\"C\""),
        "text" | "character varying" | "name" | "character" | "citext" => lit("proof"),
        "\"char\"" => lit("r"),
        "boolean" => lit("true"),
        "double precision" | "real" | "numeric" => lit("1.5"),
        "money" => lit("1.50"),
        "timestamp with time zone" => lit("2020-01-02 03:04:05+00"),
        "timestamp without time zone" => lit("2020-01-02 03:04:05"),
        "date" => lit("2020-01-02"),
        "time without time zone" => lit("03:04:05"),
        "time with time zone" => lit("03:04:05+00"),
        "interval" => lit("1 day"),
        "bytea" => lit("\\x0102"),
        "json" | "jsonb" => lit("{\"a\": 1}"),
        "jsonpath" => lit("$.a"),
        "xml" => lit("<a>1</a>"),
        "uuid" => lit("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        "inet" => lit("127.0.0.1"),
        "cidr" => lit("127.0.0.0/8"),
        "macaddr" => lit("08:00:2b:01:02:03"),
        "macaddr8" => lit("08:00:2b:01:02:03:04:05"),
        "tsvector" => lit("a b"),
        "tsquery" => lit("a"),
        "pg_lsn" => lit("0/16"),
        "xid" | "xid8" | "cid" => lit("1"),
        "tid" => lit("(0,1)"),
        "bit" | "bit varying" => lit("1"),
        "point" => lit("(1,2)"),
        "box" => lit("(0,0),(1,1)"),
        "lseg" => lit("[(0,0),(1,1)]"),
        "line" => lit("{1,-1,0}"),
        "path" => lit("[(0,0),(1,1)]"),
        "polygon" => lit("((0,0),(1,1),(1,0))"),
        "circle" => lit("<(0,0),1>"),
        "aclitem" => lit("=r/raftpg"),
        "int4range" | "anyrange" | "anycompatiblerange" => "int4range(1, 3)".into(),
        "anymultirange" | "anycompatiblemultirange" => "int4multirange(int4range(1, 3))".into(),
        "anyelement" | "anycompatible" | "anynonarray" | "anycompatiblenonarray" | "\"any\"" => {
            "1::integer".into()
        }
        "anyarray" | "anycompatiblearray" => "ARRAY[1, 2]::integer[]".into(),
        "anyenum" => "'b'::proof_mood".into(),
        "record" => "ROW(1, 'a'::text)".into(),
        t if t.ends_with("[]") => format!("'{{}}'::{t}"),
        t => format!("NULL::{t}"),
    }
}

/// One function to prove, from the live catalog.
struct Function {
    owner: String,
    schema: String,
    name: String,
    args: Vec<String>,
    kind: char,
    signature: String,
}

/// Non-immutable functions of PostgreSQL and the allowed extensions.
const FUNCTIONS_SQL: &str = "
SELECT CASE WHEN e.extname IS NOT NULL THEN 'ext:' || e.extname ELSE n.nspname END,
       n.nspname::text, p.proname::text, oidvectortypes(p.proargtypes), p.prokind::text
  FROM pg_proc p
  JOIN pg_namespace n ON n.oid = p.pronamespace
  LEFT JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
  LEFT JOIN pg_extension e ON e.oid = d.refobjid
 WHERE (n.nspname IN ('pg_catalog', 'information_schema') OR e.extname IS NOT NULL)
   AND p.provolatile <> 'i'
 ORDER BY 1, 3, 4";

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The write that stores the value of `f` called with sample arguments, or `None` for window
/// functions (they need OVER and are covered by the same function's other forms).
fn write_for(f: &Function) -> Option<String> {
    // Arguments whose sample must be a particular word for the call to mean anything.
    let special = |i: usize, t: &str| -> Option<String> {
        let text = matches!(t, "text" | "name");
        match (f.name.as_str(), i) {
            ("nextval" | "currval" | "setval" | "pg_sequence_last_value", 0) => {
                Some("'proof_seq'::regclass".into())
            }
            ("pg_sequence_parameters", 0) => Some("'proof_seq'::regclass".into()),
            ("date_part" | "extract" | "date_trunc", 0) if text => Some("'day'::text".into()),
            ("date_trunc", 2) if text => Some("'Europe/Paris'::text".into()),
            ("convert" | "convert_from" | "convert_to" | "pg_char_to_encoding", _) if text => {
                Some(format!("'UTF8'::{t}"))
            }
            ("to_char", 1) => Some(match f.args[0].as_str() {
                t if t.starts_with("time") || t == "date" => {
                    "'YYYY-MM-DD HH24:MI:SS TZ Day Month'::text".into()
                }
                "interval" => "'DD HH24:MI:SS'::text".into(),
                _ => "'L9,999.99'::text".into(),
            }),
            ("ts_headline", 2) => Some("'MaxWords=5, MinWords=1'::text".into()),
            ("ts_parse" | "ts_token_type", 0) if text => Some("'default'::text".into()),
            ("pg_get_serial_sequence", 0) => Some("'proof'::text".into()),
            ("pg_get_serial_sequence", 1) => Some("'id'::text".into()),
            ("to_regprocedure", 0) => Some("'lower(text)'::text".into()),
            ("to_regoperator", 0) => Some("'+(integer,integer)'::text".into()),
            ("length", 1) => Some("'UTF8'::name".into()),
            ("make_timestamptz", 6) => Some("'Europe/Paris'::text".into()),
            ("json_populate_record" | "json_populate_recordset", 0)
            | ("jsonb_populate_record" | "jsonb_populate_recordset", 0) => {
                Some("NULL::proof_src".into())
            }
            // has_*_privilege(user?, object, privilege): an object of the kind that exists.
            (n, _) if n.starts_with("has_") && n.ends_with("_privilege") => {
                let kind = &n["has_".len()..n.len() - "_privilege".len()];
                let last = i + 1 == f.args.len();
                let object_at = if f.args.len() == 3 + usize::from(kind == "column") {
                    1
                } else {
                    0
                };
                let (object, column, privilege) = match kind {
                    "table" | "any_column" => ("proof_src", "", "SELECT"),
                    "column" => ("proof_src", "v", "SELECT"),
                    "database" => ("raftpg", "", "CONNECT"),
                    "schema" => ("public", "", "USAGE"),
                    "function" => ("lower(text)", "", "EXECUTE"),
                    "language" => ("plpgsql", "", "USAGE"),
                    "sequence" => ("proof_seq", "", "USAGE"),
                    "type" => ("integer", "", "USAGE"),
                    "tablespace" => ("pg_default", "", "CREATE"),
                    "parameter" => ("work_mem", "", "SET"),
                    _ => ("proof", "", "USAGE"),
                };
                if last {
                    Some(format!("'{privilege}'::text"))
                } else if i < object_at && text {
                    Some(format!("'pg_monitor'::{t}"))
                } else if i == object_at && text {
                    Some(format!("'{object}'::{t}"))
                } else if i == object_at + 1 && kind == "column" && text {
                    Some(format!("'{column}'::{t}"))
                } else {
                    None
                }
            }
            ("to_timestamp" | "to_date", 0) if text => Some("'2020-01-02 03:04'::text".into()),
            ("to_timestamp" | "to_date", 1) => Some("'YYYY-MM-DD HH24:MI'::text".into()),
            ("to_number", 0) => Some("'1,234.5'::text".into()),
            ("to_number", 1) => Some("'9,999.9'::text".into()),
            ("timezone", 0) if text => Some("'Europe/Paris'::text".into()),
            _ => None,
        }
    };
    let args: Vec<String> = f
        .args
        .iter()
        .enumerate()
        .map(|(i, t)| match t.as_str() {
            _ if special(i, t).is_some() => special(i, t).unwrap_or_default(),
            "internal" | "cstring" | "trigger" | "event_trigger" | "language_handler"
            | "fdw_handler" | "index_am_handler" | "table_am_handler" | "tsm_handler" => {
                "NULL".to_string()
            }
            t => sample(t),
        })
        .collect();
    let call = format!(
        "{}.{}({})",
        quote_ident(&f.schema),
        quote_ident(&f.name),
        args.join(", ")
    );
    let value = match f.kind {
        'w' => return None,
        'a' => format!("(SELECT ({call})::text)"),
        _ => format!("(SELECT string_agg(x::text, '|' ORDER BY x::text) FROM {call} AS x)"),
    };
    Some(format!(
        "INSERT INTO proof (entry, v) VALUES ('{}', {value})",
        f.signature.replace('\'', "''")
    ))
}

/// What happened to one write.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// Refused by the gate, before the log.
    Refused(String),
    /// Entered the log and failed with the same SQL error on every node (nothing stored).
    Failed(String),
    /// Stored.
    Stored,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_non_immutable_function_relation_and_system_column_is_refused_or_identical() {
    let mut tc = start_cluster("determinism_proof", 127, 3).await.unwrap();
    let c = tc.client_of(&tc.cluster.addrs());
    let mut setup = vec![
        "CREATE TABLE proof_src (id int PRIMARY KEY, v text)".to_string(),
        "CREATE TABLE proof (id serial PRIMARY KEY, entry text NOT NULL, v text)".into(),
        "CREATE TYPE proof_mood AS ENUM ('a', 'b', 'c')".into(),
        "CREATE SEQUENCE proof_seq".into(),
        "INSERT INTO proof_src SELECT g, repeat('x', g % 50) FROM generate_series(1, 2000) g ORDER BY g".into(),
        "DELETE FROM proof_src WHERE id % 3 = 0".into(),
        "COMMENT ON TABLE proof_src IS 'the source'".into(),
    ];
    for ext in catalog::EXTENSIONS_ALLOWED {
        if *ext != "plpgsql" {
            setup.push(format!("CREATE EXTENSION IF NOT EXISTS \"{ext}\""));
        }
    }
    for sql in &setup {
        c.execute_one(sql, vec![])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    // Make the nodes differ physically: node 2's PostgreSQL crashes (its object id counter
    // jumps ahead), node 3 restarts, node 1's tables are rewritten and analyzed behind raftpg's
    // back (row positions, file nodes and statistics change).
    assert!(tc.cluster.kill_postgres(2));
    tc.cluster.stop_node(3);
    tc.cluster.start_node(3).unwrap();
    c.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    let node1 = tc.pg(1).await.unwrap();
    for sql in ["VACUUM FULL proof_src", "ANALYZE proof_src"] {
        node1.batch_execute(sql).await.unwrap();
    }
    for sql in [
        "CREATE TABLE proof_after (id int PRIMARY KEY, t text)",
        "INSERT INTO proof_after SELECT g, md5(g::text) FROM generate_series(1, 500) g ORDER BY g",
        "UPDATE proof_src SET v = v || 'y' WHERE id % 7 = 0",
    ] {
        c.execute_one(sql, vec![])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    // Every entry to prove: (kind, name, verdict of the classification, write).
    let pg = tc.pg(1).await.unwrap();
    let mut entries: Vec<(String, String, String, Option<String>)> = Vec::new();
    for r in pg.query(FUNCTIONS_SQL, &[]).await.unwrap() {
        let args: String = r.get(3);
        let f = Function {
            owner: r.get(0),
            schema: r.get(1),
            name: r.get(2),
            args: if args.is_empty() {
                Vec::new()
            } else {
                args.split(", ").map(str::to_string).collect()
            },
            kind: r.get::<_, String>(4).chars().next().unwrap_or('f'),
            signature: String::new(),
        };
        let signature = format!("{}({})", f.name, f.args.join(", "));
        let f = Function { signature, ..f };
        let verdict = catalog::all()
            .find(|c| c.owner == f.owner && c.signature == f.signature)
            .map(|c| c.verdict.as_str().to_string())
            .unwrap_or_else(|| "unclassified".into());
        let owner = f.owner.clone();
        entries.push((
            format!("function ({owner})"),
            f.signature.clone(),
            verdict,
            write_for(&f),
        ));
    }
    // Non-immutable operators and casts, applied to sample values.
    for r in pg
        .query(
            "SELECT o.oprname::text, format_type(o.oprleft, NULL), format_type(o.oprright, NULL)
               FROM pg_operator o JOIN pg_proc p ON p.oid = o.oprcode
              WHERE p.provolatile <> 'i' AND o.oprleft <> 0
              ORDER BY 1, 2, 3",
            &[],
        )
        .await
        .unwrap()
    {
        let (op, l, rt): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let name = format!("{l} {op} {rt}");
        let sql = format!(
            "INSERT INTO proof (entry, v) VALUES ('{}', (({} OPERATOR(pg_catalog.{op}) {}))::text)",
            name,
            sample(&l),
            sample(&rt)
        );
        entries.push(("operator".into(), name, "—".into(), Some(sql)));
    }
    for r in pg
        .query(
            "SELECT format_type(c.castsource, NULL), format_type(c.casttarget, NULL)
               FROM pg_cast c JOIN pg_proc p ON p.oid = c.castfunc
              WHERE p.provolatile <> 'i' ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
    {
        let (from, to): (String, String) = (r.get(0), r.get(1));
        let name = format!("{from} → {to}");
        let sql = format!(
            "INSERT INTO proof (entry, v) VALUES ('{}', (CAST({} AS {to}))::text)",
            name,
            sample(&from)
        );
        entries.push(("cast".into(), name, "—".into(), Some(sql)));
    }
    // System relations: their whole content.
    for r in pg
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname IN ('pg_catalog', 'information_schema') AND c.relkind IN ('r', 'v')
              ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
    {
        let (schema, rel): (String, String) = (r.get(0), r.get(1));
        let name = format!("{schema}.{rel}");
        let sql = format!(
            "INSERT INTO proof (entry, v) SELECT '{name}', md5(string_agg(x::text, '|' ORDER BY x::text)) FROM {schema}.{rel} AS x ORDER BY 1"
        );
        entries.push(("relation".into(), name, "—".into(), Some(sql)));
    }
    // System columns of a user table.
    for col in ["ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"] {
        let sql = format!(
            "INSERT INTO proof (entry, v) SELECT 'column {col}', string_agg({col}::text, '|' ORDER BY id) FROM proof_src ORDER BY 1"
        );
        entries.push(("system column".into(), col.into(), "—".into(), Some(sql)));
    }

    // Run them all.
    let mut outcomes: Vec<Outcome> = Vec::new();
    for (_, _, _, sql) in &entries {
        let Some(sql) = sql else {
            outcomes.push(Outcome::Refused(
                "window function (not callable alone)".into(),
            ));
            continue;
        };
        let outcome = match c.execute_one(sql, vec![]).await {
            Ok(_) => Outcome::Stored,
            Err(e) => {
                let state = e.sqlstate().unwrap_or_else(|| format!("{:?}", e.code()));
                match e.sql_error().map(|s| s.log_index).unwrap_or(0) {
                    0 => Outcome::Refused(state),
                    _ => Outcome::Failed(state),
                }
            }
        };
        outcomes.push(outcome);
    }
    // The last write, so every node has applied everything before we compare.
    let last = c
        .execute_one("INSERT INTO proof (entry, v) VALUES ('end', 'end')", vec![])
        .await
        .unwrap();
    let mut stored: Vec<BTreeMap<String, Option<String>>> = Vec::new();
    for id in 1..=3u64 {
        let node_pg = tc.pg(id).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let applied: i64 = node_pg
                .query_one("SELECT log_index FROM raftpg.applied", &[])
                .await
                .map(|r| r.get(0))
                .unwrap_or(0);
            if applied as u64 >= last.log_index {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node {id} stopped applying at {applied}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rows = node_pg
            .query("SELECT entry, v FROM proof", &[])
            .await
            .unwrap();
        stored.push(rows.iter().map(|r| (r.get(0), r.get(1))).collect());
    }

    // Verdicts.
    let mut table =
        String::from("| kind | entry | classification | outcome |\n|---|---|---|---|\n");
    let mut diverged = Vec::new();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for ((kind, name, verdict, _), outcome) in entries.iter().zip(&outcomes) {
        let key = match kind.as_str() {
            "relation" => name.clone(),
            "system column" => format!("column {name}"),
            _ => name.clone(),
        };
        let text = match outcome {
            Outcome::Refused(s) => format!("refused ({s})"),
            Outcome::Failed(s) => format!("failed on every node ({s})"),
            Outcome::Stored => {
                let values: Vec<Option<&Option<String>>> =
                    stored.iter().map(|m| m.get(&key)).collect();
                if values.iter().all(|v| *v == values[0]) {
                    "identical".to_string()
                } else {
                    diverged.push(format!("{kind} {name}: {values:?}"));
                    "DIVERGED".to_string()
                }
            }
        };
        *counts
            .entry(match outcome {
                Outcome::Refused(_) => "refused",
                Outcome::Failed(_) => "failed",
                Outcome::Stored => "stored",
            })
            .or_default() += 1;
        table.push_str(&format!(
            "| {kind} | `{}` | {verdict} | {text} |\n",
            name.replace('|', "\\|")
        ));
    }
    eprintln!("{} entries: {counts:?}", entries.len());
    if std::env::var_os("RAFTPG_REGENERATE").is_some() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/determinism-proof.md");
        let doc = format!(
            "# The determinism proof: every non-immutable entry of PostgreSQL's catalog\n\n\
             Generated by `tests/tests/determinism_proof.rs` (`RAFTPG_REGENERATE=1`) on a 3-node \
             cluster where one node's PostgreSQL crashed, one node restarted and one node's tables \
             were rewritten and analyzed outside raftpg. Each entry is a write storing the value \
             in a table: it must be refused (before the log), fail with the same error on every \
             node, or store the same value on every node (read from each node's PostgreSQL). \
             The classification column is `node/src/sql/functions.tsv` (see docs/determinism.md).\n\n\
             {} entries: {counts:?}.\n\n{table}",
            entries.len()
        );
        std::fs::write(&path, doc).unwrap();
    }
    assert!(
        diverged.is_empty(),
        "{} writes stored values that differ between nodes:\n{}",
        diverged.len(),
        diverged.join("\n")
    );
    tc.assert_identical(&[1, 2, 3]).await.unwrap();

    // Reads may call per-node functions, but not leave state in the pooled connection.
    let read = |sql: &str| raftpg_client::v1::QueryRequest {
        sql: sql.into(),
        consistency: raftpg_client::v1::Consistency::Local as i32,
        timeout_ms: 5_000,
        ..Default::default()
    };
    let e = c
        .query_node(1, read("SELECT pg_advisory_lock(42)::text"))
        .await
        .expect_err("a read taking a session-level advisory lock");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    c.query_node(
        1,
        read("SELECT pg_relation_size('proof')::text, pg_backend_pid()"),
    )
    .await
    .unwrap();

    // A trigger function is checked as the catalog holds it when a trigger is created: one
    // made behind raftpg's back (as by an older version's weaker rules) is refused, one made
    // through raftpg is not.
    for id in 1..=3u64 {
        tc.pg(id)
            .await
            .unwrap()
            .batch_execute(
                "CREATE FUNCTION public.legacy_stamp() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN NEW.v := pg_backend_pid()::text; RETURN NEW; END $$",
            )
            .await
            .unwrap();
    }
    let e = c
        .execute_one(
            "CREATE TRIGGER stamp BEFORE INSERT ON proof_src FOR EACH ROW EXECUTE FUNCTION legacy_stamp()",
            vec![],
        )
        .await
        .expect_err("a trigger running a per-node function");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.to_string().contains("pg_backend_pid"), "{e}");
    // And `raftpg check` names it among the definitions the gate would refuse today.
    let r = c.check(Duration::from_secs(60)).await.unwrap();
    assert!(
        r.unsafe_definitions
            .iter()
            .any(|d| d.contains("legacy_stamp") && d.contains("pg_backend_pid")),
        "{r:?}"
    );
    assert_eq!(r.unsafe_definitions.len(), 1, "{:?}", r.unsafe_definitions);
    c.execute_one(
        "CREATE FUNCTION upper_v() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN NEW.v := upper(NEW.v); RETURN NEW; END $$",
        vec![],
    )
    .await
    .unwrap();
    c.execute_one(
        "CREATE TRIGGER upper_v BEFORE INSERT ON proof_src FOR EACH ROW EXECUTE FUNCTION upper_v()",
        vec![],
    )
    .await
    .unwrap();
}
