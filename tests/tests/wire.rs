//! The PostgreSQL wire protocol with clients nobody on the project wrote: psql (scripts, `\d`
//! catalog commands, errors), pgbench (initialisation and custom scripts in all three query
//! modes through every node), and tokio-postgres (typed parameters in binary form, errors with
//! SQLSTATE, a write on a follower read back on another node, cancel). Every cluster runs with
//! TLS and SCRAM-SHA-256, as a user's would.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use testkit::{start_cluster, TestCluster};

/// Runs a libpq program (psql, pgbench) against `tc` with `args`.
fn libpq(tc: &TestCluster, program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .envs(tc.libpq_env())
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

/// Runs a psql script file against `conn`, stopping at the first error; its output.
fn psql_file(tc: &TestCluster, conn: &str, file: &std::path::Path) -> String {
    let out = libpq(
        tc,
        "psql",
        &[
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conn,
            "-f",
            file.to_str().unwrap(),
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    stdout
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// psql through a follower: a script with DDL, writes with RETURNING, queries of many types,
/// `\d` (psql's own catalog queries), a multi-statement string that is one atomic write, and
/// errors with their SQLSTATE; every copy identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn psql_scripts_catalog_commands_and_errors() {
    let tc = start_cluster("wire_psql", 121, 3).await.unwrap();
    let (_, follower) = tc.leader_and_follower().await;
    let conn = tc.conninfo(follower);
    let dir = std::env::temp_dir().join(format!("raftpg-wire-psql-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("script.sql");
    std::fs::write(
        &script,
        r#"
CREATE TABLE players (id serial PRIMARY KEY, name text NOT NULL UNIQUE,
    joined timestamptz DEFAULT now(), rating numeric(6,2), tags text[], span interval,
    addr inet, seen daterange);
INSERT INTO players (name, rating, tags, span, addr, seen)
    VALUES ('ann', 1500.5, '{a,b}', '1 hour 30 minutes', '10.1.2.3', '[2024-01-01,2024-02-01)'),
           ('bob', 1400, NULL, NULL, NULL, NULL)
    RETURNING id, name, span;
SELECT name, rating, tags, span, addr, seen FROM players ORDER BY id;
\d players
INSERT INTO players (name) VALUES ('cid') \; INSERT INTO players (name) VALUES ('dee');
SELECT count(*) AS players FROM players;
SHOW raftpg.last_write_index;
"#,
    )
    .unwrap();
    let stdout = psql_file(&tc, &conn, &script);
    for expected in [
        "INSERT 0 2",
        " 1 | ann  | 01:30:00",
        " ann  | 1500.50 | {a,b} | 01:30:00 | 10.1.2.3 | [2024-01-01,2024-02-01)",
        "Table \"public.players\"",
        " tags   | text[]",
        " span   | interval",
        "\"players_pkey\" PRIMARY KEY, btree (id)",
        "       4\n",
        "raftpg.last_write_index",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }

    // A session's time zone, date style and search path hold for its reads and its writes.
    let out = libpq(
        &tc,
        "psql",
        &[
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &conn,
            "-c",
            "SET TimeZone = 'Asia/Tokyo'",
            "-c",
            "SET DateStyle = 'German'",
            "-c",
            "SELECT '2024-02-29 12:00:00+00'::timestamptz, '2024-02-29'::date",
            "-c",
            "CREATE SCHEMA game",
            "-c",
            "SET search_path = game, public",
            "-c",
            "CREATE TABLE events (id int PRIMARY KEY, at timestamptz)",
            "-c",
            "INSERT INTO events VALUES (1, '2024-03-01 09:00')",
            "-c",
            "SELECT id, at FROM events",
            "-c",
            "SHOW TimeZone",
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.contains("29.02.2024 21:00:00 JST|29.02.2024"),
        "{stdout}"
    );
    assert!(stdout.contains("1|01.03.2024 09:00:00 JST"), "{stdout}");
    assert!(stdout.contains("Asia/Tokyo"), "{stdout}");
    let at: Vec<String> = tc
        .column(1, "SELECT at::text FROM game.events")
        .await
        .unwrap();
    assert_eq!(
        at,
        ["2024-03-01 00:00:00+00"],
        "the literal was read in the session's zone"
    );

    // A SQL error carries its SQLSTATE, detail and position.
    let out = libpq(
        &tc,
        "psql",
        &[
            "-X",
            "-v",
            "VERBOSITY=verbose",
            "-d",
            &conn,
            "-c",
            "INSERT INTO players (name) VALUES ('ann')",
        ],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("ERROR:  23505: duplicate key value"),
        "{stderr}"
    );
    assert!(
        stderr.contains("DETAIL:  Key (name)=(ann) already exists."),
        "{stderr}"
    );
    let out = libpq(
        &tc,
        "psql",
        &["-X", "-d", &conn, "-c", "SELECT nosuch FROM players"],
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("column \"nosuch\" does not exist"),
        "{stderr}"
    );
    assert!(
        stderr.contains("LINE 1: SELECT nosuch FROM players"),
        "{stderr}"
    );

    // A query string is one write: its second statement fails, so its first did not happen
    // either, on any node.
    let out = libpq(
        &tc,
        "psql",
        &[
            "-X",
            "-d",
            &conn,
            "-c",
            "INSERT INTO players (name) VALUES ('eve'); INSERT INTO players (name) VALUES ('ann')",
        ],
    );
    assert!(!out.status.success());
    // An explicit transaction block over several queries is an interactive transaction: a
    // session that ends without COMMIT leaves nothing behind (tests/transactions.rs has more).
    let out = libpq(
        &tc,
        "psql",
        &[
            "-X",
            "-d",
            &conn,
            "-c",
            "BEGIN",
            "-c",
            "INSERT INTO players (name) VALUES ('gus')",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("INSERT 0 1"),
        "{}",
        text(&out.stdout)
    );
    // ... but BEGIN; ...; COMMIT in one string is that one write.
    let out = libpq(
        &tc,
        "psql",
        &[
            "-X",
            "-d",
            &conn,
            "-c",
            "BEGIN; INSERT INTO players (name) VALUES ('fay'); COMMIT;",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let gus: Vec<i64> = tc
        .column(1, "SELECT count(*) FROM players WHERE name = 'gus'")
        .await
        .unwrap();
    assert_eq!(gus, vec![0], "an unfinished transaction left a row");
    // psql's \copy: CSV with a header, quotes and a newline in a field; a larger text-format
    // file that takes several writes; a time word refused, not read from each node's clock.
    std::fs::write(
        dir.join("scores.csv"),
        "player,points,note\nann,10,\"first, \"\"best\"\"\"\nbob,7,\"two\nlines\"\ncid,,\n",
    )
    .unwrap();
    let tsv: String = (1..=20_000)
        .map(|i| format!("{i}\tname {i}\t2024-01-02\n"))
        .collect();
    std::fs::write(dir.join("bulk.tsv"), tsv).unwrap();
    let copy_script = format!(
        "CREATE TABLE scores (player text PRIMARY KEY, points int, note text);\n\
         \\copy scores FROM '{}' WITH (FORMAT csv, HEADER)\n\
         CREATE TABLE bulk (id int PRIMARY KEY, name text, day date);\n\
         \\copy bulk FROM '{}'\n\
         SELECT count(*), sum(id) FROM bulk;\n",
        dir.join("scores.csv").display(),
        dir.join("bulk.tsv").display()
    );
    std::fs::write(dir.join("copy.sql"), &copy_script).unwrap();
    let copy_file = dir.join("copy.sql");
    let stdout = psql_file(&tc, &conn, &copy_file);
    assert!(stdout.contains("COPY 3"), "{stdout}");
    assert!(stdout.contains("COPY 20000"), "{stdout}");
    assert!(stdout.contains(" 20000 | 200010000"), "{stdout}");
    let notes: Vec<Option<String>> = tc
        .column(1, "SELECT note FROM scores ORDER BY player")
        .await
        .unwrap();
    assert_eq!(
        notes,
        [
            Some("first, \"best\"".to_string()),
            Some("two\nlines".into()),
            None
        ]
    );
    std::fs::write(dir.join("now.tsv"), "x\tnow\n").unwrap();
    let out = libpq(
        &tc,
        "psql",
        &[
            "-X",
            "-d",
            &conn,
            "-c",
            &format!(
                "\\copy bulk (name, day) FROM '{}'",
                dir.join("now.tsv").display()
            ),
        ],
    );
    assert!(
        text(&out.stderr).contains("from the clock of each node"),
        "{}",
        text(&out.stderr)
    );
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
    for id in 1..=3 {
        let names: Vec<String> = tc
            .column(id, "SELECT name FROM players ORDER BY id")
            .await
            .unwrap();
        assert_eq!(names, ["ann", "bob", "cid", "dee", "fay"], "node {id}");
    }
    // Without TLS, or with a wrong password, nobody gets in.
    let (host, port) = tc.cluster.node(1).pg_host_port();
    let plain = format!("host={host} port={port} user=admin dbname=raftpg sslmode=disable");
    let out = libpq(&tc, "psql", &["-X", "-d", &plain, "-c", "SELECT 1"]);
    assert!(
        text(&out.stderr).contains("requires sslmode=require"),
        "{}",
        text(&out.stderr)
    );
    let out = Command::new("psql")
        .args(["-X", "-d", &tc.conninfo(1), "-c", "SELECT 1"])
        .env("PGPASSWORD", "wrong")
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains("password authentication failed for user \"admin\""),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// pgbench: tables made through raftpg, then a custom script of updates, selects and inserts
/// in the simple, extended and prepared query modes, each through another node, concurrently;
/// no failed transaction, every copy identical, and the money adds up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pgbench_in_every_query_mode_through_every_node() {
    let tc = start_cluster("wire_pgbench", 122, 3).await.unwrap();
    let out = libpq(
        &tc,
        "pgbench",
        &["-i", "-I", "dtp", "-s", "1", &tc.conninfo(1)],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let load = "INSERT INTO pgbench_branches (bid, bbalance) VALUES (1, 0); \
         INSERT INTO pgbench_tellers (tid, bid, tbalance) SELECT t, 1, 0 FROM generate_series(1, 10) t ORDER BY t; \
         INSERT INTO pgbench_accounts (aid, bid, abalance, filler) SELECT a, 1, 0, '' FROM generate_series(1, 1000) a ORDER BY a";
    let out = libpq(
        &tc,
        "psql",
        &[
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &tc.conninfo(2),
            "-c",
            load,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dir = std::env::temp_dir().join(format!("raftpg-wire-pgbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("tx.sql");
    std::fs::write(
        &script,
        "\\set aid random(1, 1000)\n\\set delta random(-500, 500)\n\
         UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;\n\
         SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n\
         INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, :aid, :delta, CURRENT_TIMESTAMP);\n",
    )
    .unwrap();
    let runs: Vec<_> = [("simple", 1), ("extended", 2), ("prepared", 3)]
        .into_iter()
        .map(|(mode, node)| {
            let args: Vec<String> = [
                "-n",
                "-M",
                mode,
                "-c",
                "4",
                "-T",
                "4",
                "-f",
                script.to_str().unwrap(),
                &tc.conninfo(node),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let env = tc.libpq_env();
            std::thread::spawn(move || {
                let out = Command::new("pgbench")
                    .args(&args)
                    .envs(env)
                    .output()
                    .unwrap();
                (mode, out)
            })
        })
        .collect();
    for run in runs {
        let (mode, out) = run.join().unwrap();
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {stdout}\n{}",
            text(&out.stderr)
        );
        assert!(
            stdout.contains("number of failed transactions: 0 (0.000%)"),
            "{mode}: {stdout}"
        );
        let done: u64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|n| n.split('/').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        assert!(done > 0, "{mode}: {stdout}");
    }
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
    let r = tc.client.check(Duration::from_secs(30)).await.unwrap();
    assert!(r.identical, "{r:?}");
    let pg = tc.pg(3).await.unwrap();
    let row = pg
        .query_one(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts)::int8, (SELECT coalesce(sum(delta), 0) FROM pgbench_history)::int8",
            &[],
        )
        .await
        .unwrap();
    let (balances, deltas): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(balances, deltas);

    // Pipelines (libpq's pipeline mode, pgbench's \startpipeline): the Executes between two
    // Syncs are one write, as they are one implicit transaction in PostgreSQL — the UPDATE sees
    // the INSERT before it, and a pipeline that fails leaves nothing behind.
    let out = libpq(
        &tc,
        "psql",
        &[
            "-X",
            "-d",
            &tc.conninfo(1),
            "-c",
            "CREATE TABLE pl (id int8 PRIMARY KEY, n int)",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::write(
        dir.join("pipe.sql"),
        "\\set id random(1, 1000000000000)\n\\startpipeline\n\
         INSERT INTO pl (id, n) VALUES (:id, 1);\n\
         UPDATE pl SET n = n + 1 WHERE id = :id;\n\
         SELECT n FROM pl WHERE id = :id;\n\\endpipeline\n",
    )
    .unwrap();
    let pipe = dir.join("pipe.sql");
    let out = libpq(
        &tc,
        "pgbench",
        &[
            "-n",
            "-M",
            "prepared",
            "-c",
            "4",
            "-T",
            "3",
            "-f",
            pipe.to_str().unwrap(),
            &tc.conninfo(2),
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.contains("number of failed transactions: 0 (0.000%)"),
        "{stdout}"
    );
    let ns: Vec<i32> = tc.column(3, "SELECT DISTINCT n FROM pl").await.unwrap();
    assert_eq!(ns, [2], "every UPDATE saw its pipeline's INSERT");
    std::fs::write(
        dir.join("pipefail.sql"),
        "\\startpipeline\nINSERT INTO pl (id, n) VALUES (-1, 1);\n\
         INSERT INTO pl (id, n) VALUES (-1, 2);\n\\endpipeline\n",
    )
    .unwrap();
    let fail = dir.join("pipefail.sql");
    let out = libpq(
        &tc,
        "pgbench",
        &[
            "-n",
            "-M",
            "extended",
            "-t",
            "1",
            "-f",
            fail.to_str().unwrap(),
            &tc.conninfo(3),
        ],
    );
    assert!(
        text(&out.stderr).contains("duplicate key value"),
        "{}",
        text(&out.stderr)
    );
    let left: Vec<i64> = tc
        .column(1, "SELECT count(*) FROM pl WHERE id = -1")
        .await
        .unwrap();
    assert_eq!(left, [0], "a failed pipeline wrote nothing");
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// tokio-postgres (binary parameters and results, prepared statements): typed values in and
/// out, errors with SQLSTATE, a follower's write read back on another node with the session's
/// own consistency, and a cancelled read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokio_postgres_typed_values_errors_and_cancel() {
    let tc = start_cluster("wire_tokio_postgres", 123, 3).await.unwrap();
    let (leader, follower) = tc.leader_and_follower().await;
    let other = (1..=3).find(|i| *i != leader && *i != follower).unwrap();
    let c = tc.wire(follower).await.unwrap();
    c.batch_execute(
        "CREATE TABLE v (id int8 PRIMARY KEY, t text, b bytea, n numeric, at timestamptz, \
         u uuid, j jsonb, arr int4[], iv interval, f float8)",
    )
    .await
    .unwrap();
    let at = std::time::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
    let u = uuid_bytes();
    let j = serde_json::json!({"k": [1, "two", null]});
    let arr: Vec<i32> = vec![3, -1, 7];
    let insert = c
        .prepare("INSERT INTO v (id, t, b, at, j, arr, f, n, u, iv) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text::numeric, $9::text::uuid, $10::text::interval) RETURNING id, t")
        .await
        .unwrap();
    for id in 1..=3i64 {
        let t = format!("row {id} ✓");
        let rows = c
            .query(
                &insert,
                &[
                    &id,
                    &t,
                    &vec![0u8, 255, id as u8],
                    &at,
                    &j,
                    &arr,
                    &1.5f64,
                    &"12.50",
                    &u,
                    &"1 day 02:00",
                ],
            )
            .await
            .unwrap();
        assert_eq!(rows[0].get::<_, i64>(0), id);
        assert_eq!(rows[0].get::<_, String>(1), t);
    }
    c.execute("INSERT INTO v (id) VALUES ($1)", &[&4i64])
        .await
        .unwrap();
    // The session reads its own writes on the node it is connected to.
    let row = c
        .query_one(
            "SELECT t, b, at, j, arr, f, n::text, u::text, iv, iv::text FROM v WHERE id = $1",
            &[&2i64],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "row 2 ✓");
    assert_eq!(row.get::<_, Vec<u8>>(1), vec![0, 255, 2]);
    assert_eq!(row.get::<_, std::time::SystemTime>(2), at);
    assert_eq!(row.get::<_, serde_json::Value>(3), j);
    assert_eq!(row.get::<_, Vec<i32>>(4), arr);
    assert_eq!(row.get::<_, f64>(5), 1.5);
    assert_eq!(row.get::<_, String>(6), "12.50");
    assert_eq!(
        row.get::<_, String>(7),
        "00112233-4455-6677-8899-aabbccddeeff"
    );
    assert_eq!(row.get::<_, String>(9), "1 day 02:00:00");
    let nulls = c
        .query_one("SELECT t, b, arr, iv FROM v WHERE id = 4", &[])
        .await
        .unwrap();
    assert_eq!(nulls.get::<_, Option<String>>(0), None);
    assert_eq!(nulls.get::<_, Option<Vec<i32>>>(2), None);

    // Errors carry PostgreSQL's SQLSTATE, from a write and from a read.
    let e = c
        .execute("INSERT INTO v (id) VALUES ($1)", &[&1i64])
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("23505"), "{e}");
    let e = c.query("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("22012"), "{e}");
    let e = c.query("SELECT * FROM nope", &[]).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42P01"), "{e}");
    let e = c
        .batch_execute("SET TimeZone = 'Mars/Olympus'")
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("22023"), "{e}");
    let e = c.batch_execute("SET work_mem = '1GB'").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{e}");
    let e = c
        .batch_execute("INSERT INTO v (id) VALUES (now()::int8)")
        .await
        .unwrap_err();
    assert!(e.code().is_some(), "{e}");

    // Another session on another node, told the first one's last write, reads it with the
    // local consistency level (at least that index).
    let index: String = c
        .query_one("SHOW raftpg.last_write_index", &[])
        .await
        .unwrap()
        .get(0);
    let d = tc.wire(other).await.unwrap();
    d.batch_execute(&format!("SET raftpg.read_consistency = 'at_least:{index}'"))
        .await
        .unwrap();
    let n: i64 = d
        .query_one("SELECT count(*) FROM v", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 4);

    // A cancelled read ends with 57014 at once, and the session goes on.
    let token = d.cancel_token();
    let tls = testkit::wire_tls(&tc.certs().unwrap().join("ca.crt")).unwrap();
    let started = Instant::now();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(tls).await
    });
    let e = d.query("SELECT pg_sleep(30)", &[]).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
    canceller.await.unwrap().unwrap();
    let one: i32 = d.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
}

fn uuid_bytes() -> String {
    "00112233-4455-6677-8899-aabbccddeeff".to_string()
}

/// psycopg 3 (Python, libpq; sends its parameters in text form with their type OIDs):
/// typed values in and out through a follower, errors with SQLSTATE, and the refusal of its
/// implicit `BEGIN` when autocommit is off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn psycopg_typed_values_and_errors() {
    let python = testkit::python_with_psycopg();
    let tc = start_cluster("wire_psycopg", 124, 3).await.unwrap();
    let (_, follower) = tc.leader_and_follower().await;
    let script = r#"
import sys, datetime, decimal, uuid
import psycopg
from psycopg.types.json import Jsonb
conninfo = sys.argv[1]
with psycopg.connect(conninfo, autocommit=True) as c:
    c.execute("CREATE TABLE p (id int8 PRIMARY KEY, t text, b bytea, n numeric, at timestamptz, u uuid, j jsonb, arr int4[], f float8, d date)")
    at = datetime.datetime(2024, 2, 29, 12, 30, 15, 123456, tzinfo=datetime.timezone.utc)
    u = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
    row = c.execute(
        "INSERT INTO p VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING *",
        (1, "héllo", b"\x00\xff", decimal.Decimal("12.50"), at, u, Jsonb({"k": [1, None]}), [3, -1], 1.5, datetime.date(2024, 1, 2)),
    ).fetchone()
    assert row == (1, "héllo", b"\x00\xff", decimal.Decimal("12.50"), at, u, {"k": [1, None]}, [3, -1], 1.5, datetime.date(2024, 1, 2)), row
    c.execute("INSERT INTO p (id) VALUES (%s)", (2,))
    got = c.execute("SELECT t, n, at, u, j, arr, d FROM p WHERE id = %s", (1,)).fetchone()
    assert got == ("héllo", decimal.Decimal("12.50"), at, u, {"k": [1, None]}, [3, -1], datetime.date(2024, 1, 2)), got
    assert c.execute("SELECT t, arr FROM p WHERE id = 2").fetchone() == (None, None)
    got = c.execute("SELECT %s::interval, ARRAY['a', NULL]::text[], int4range(1, 5)", ("1 day 2 hours",)).fetchone()
    assert got[0] == datetime.timedelta(days=1, hours=2) and got[1] == ["a", None], got
    try:
        c.execute("INSERT INTO p (id) VALUES (%s)", (1,))
        raise SystemExit("duplicate accepted")
    except psycopg.errors.UniqueViolation as e:
        assert e.sqlstate == "23505" and "already exists" in e.diag.message_detail, e
    try:
        c.execute("SELECT nosuch FROM p")
        raise SystemExit("bad column accepted")
    except psycopg.errors.UndefinedColumn as e:
        assert e.sqlstate == "42703"
    with c.cursor() as cur:
        cur.executemany("INSERT INTO p (id, t) VALUES (%s, %s)", [(10, "a"), (11, "b"), (12, "c")])
    assert c.execute("SELECT count(*) FROM p").fetchone() == (5,)
with psycopg.connect(conninfo) as c:
    # Not autocommit: psycopg opens a transaction implicitly (an interactive one, on the leader).
    assert c.execute("SELECT count(*) FROM p").fetchone() == (5,)
    c.execute("INSERT INTO p (id) VALUES (%s)", (20,))
    c.commit()
    assert c.execute("SELECT count(*) FROM p").fetchone() == (6,)
print("ok")
"#;
    let out = Command::new(python)
        .args(["-c", script, &tc.conninfo(follower)])
        .envs(tc.libpq_env())
        .output()
        .unwrap();
    assert!(
        out.status.success() && text(&out.stdout).contains("ok"),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
}

/// A node cut off from its quorum answers over the wire protocol within a bounded wait, with
/// the SQLSTATE a PostgreSQL client retries elsewhere on (57P03), never hangs; it still serves
/// a session that asked for local reads; and the same session writes again once the quorum
/// is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_without_quorum_says_so_in_time() {
    let mut tc = start_cluster("wire_no_quorum", 126, 3).await.unwrap();
    let (leader, follower) = tc.leader_and_follower().await;
    let c = tc.wire(follower).await.unwrap();
    c.batch_execute("CREATE TABLE q (id int PRIMARY KEY)")
        .await
        .unwrap();
    c.execute("INSERT INTO q VALUES (1)", &[]).await.unwrap();
    let local = tc.wire(follower).await.unwrap();
    local
        .batch_execute("SET raftpg.read_consistency = 'local'")
        .await
        .unwrap();
    let others: Vec<u64> = (1..=3).filter(|i| *i != follower).collect();
    for id in &others {
        tc.cluster.kill_node(*id);
    }
    let started = Instant::now();
    let e = c
        .execute("INSERT INTO q VALUES (2)", &[])
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("57P03"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let e = c.query("SELECT count(*) FROM q", &[]).await.unwrap_err();
    assert!(
        matches!(e.code().map(|c| c.code()), Some("57P03") | Some("57014")),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let n: i64 = local
        .query_one("SELECT count(*) FROM q", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "a local read still answers");
    for id in &others {
        tc.cluster.start_node(*id).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match c.execute("INSERT INTO q VALUES (2)", &[]).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.code().map(|c| c.code()), Some("57P03"), "{e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("no write after the quorum came back: {e}"),
        }
    }
    let n: i64 = c
        .query_one("SELECT count(*) FROM q", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let _ = leader;
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
}
