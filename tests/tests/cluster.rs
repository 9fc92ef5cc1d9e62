//! End-to-end tests of the core: real node processes, real PostgreSQL, real RocksDB, real gRPC
//! over loopback TCP, processes killed with SIGKILL. Each test asserts what would break.

use std::time::Duration;

use raftpg_client::v1::{Consistency, QueryRequest, Statement};
use testkit::{start_cluster, values, LoadRun};
use tonic::Code;

const LOAD_TABLE_DDL: &str =
    "CREATE TABLE load (id serial PRIMARY KEY, k bigint NOT NULL UNIQUE, w int NOT NULL)";

fn stmt(sql: &str, params: Vec<raftpg_client::v1::Value>) -> Statement {
    Statement {
        sql: sql.into(),
        params,
    }
}

/// Writes through every node, RETURNING serial ids, typed values; all copies identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_through_every_node_leave_identical_copies() {
    let tc = start_cluster("writes_identical", 11, 3).await.unwrap();
    tc.client
        .execute_one(
            "CREATE TABLE players (id serial PRIMARY KEY, name text NOT NULL, via int)",
            vec![],
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    let mut last_index = 0;
    for round in 0..10 {
        for node in 1..=3u64 {
            let c = tc.node_client(node);
            let r = c
                .execute_one(
                    "INSERT INTO players (name, via) VALUES ($1, $2) RETURNING id",
                    vec![
                        values::text(format!("p{round}-{node}")),
                        values::int(node as i64),
                    ],
                )
                .await
                .unwrap();
            assert!(r.log_index > last_index, "log index must grow");
            last_index = r.log_index;
            assert_eq!(r.results[0].rows_affected, 1);
            ids.push(values::as_i64(&r.results[0].rows[0].values[0]).unwrap());
        }
    }
    assert_eq!(
        ids,
        (1..=30).collect::<Vec<i64>>(),
        "serial ids are handed out in log order"
    );

    // Several statements are one atomic entry; every supported type round-trips.
    tc.client
        .execute_one(
            "CREATE TABLE typed (b bool, i int4, n numeric, f float8, t text, by bytea, ts timestamptz, d date, u uuid, j jsonb)",
            vec![],
        )
        .await
        .unwrap();
    let r = tc
        .client
        .execute(vec![
            stmt(
                "INSERT INTO typed VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING *",
                vec![
                    values::boolean(true),
                    values::int(42),
                    values::numeric("-1234.5600"),
                    values::float(2.5),
                    values::text("héllo"),
                    values::bytes(vec![0u8, 1, 255]),
                    raftpg_client::v1::Value {
                        kind: Some(raftpg_client::v1::value::Kind::TimestamptzMicros(
                            1_700_000_000_123_456,
                        )),
                    },
                    raftpg_client::v1::Value {
                        kind: Some(raftpg_client::v1::value::Kind::DateDays(19_000)),
                    },
                    values::uuid("6f1c7a52-3d0e-4e57-9b43-8f3c2d1e0a99"),
                    values::jsonb(r#"{"level": 3}"#),
                ],
            ),
            stmt(
                "UPDATE players SET name = name || '!' WHERE id <= $1",
                vec![values::int(5)],
            ),
        ])
        .await
        .unwrap();
    assert_eq!(r.results.len(), 2);
    assert_eq!(r.results[1].rows_affected, 5);
    let row: Vec<String> = r.results[0].rows[0]
        .values
        .iter()
        .map(values::display)
        .collect();
    assert_eq!(
        row,
        vec![
            "true",
            "42",
            "-1234.5600",
            "2.5",
            "héllo",
            "\\x0001ff",
            "1700000000123456µs",
            "day 19000",
            "6f1c7a52-3d0e-4e57-9b43-8f3c2d1e0a99",
            r#"{"level": 3}"#
        ]
    );
    let sums = tc.assert_identical(&[1, 2, 3]).await.unwrap();
    assert_eq!(
        sums.get("public.players").map(|s| s.starts_with("30 rows")),
        Some(true),
        "{sums:?}"
    );
    assert_eq!(
        sums.get("sequence public.players_id_seq")
            .map(String::as_str),
        Some("30")
    );

    // Reads: each node serves its own copy; AT_LEAST gives read-your-writes on any node.
    for node in 0..3 {
        let q = tc
            .client
            .query_node(
                node,
                QueryRequest {
                    sql: "SELECT count(*) FROM players WHERE name LIKE '%!'".into(),
                    consistency: Consistency::AtLeast as i32,
                    min_index: r.log_index,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(values::as_i64(&q.rows[0].values[0]), Some(5));
        assert!(q.applied_index >= r.log_index);
    }
    let q = tc
        .client
        .query_sql(
            "SELECT count(*) FROM players",
            vec![],
            Consistency::Linearizable,
        )
        .await
        .unwrap();
    assert_eq!(values::as_i64(&q.rows[0].values[0]), Some(30));
}

/// SQL errors are deterministic results: the right SQLSTATE, no effects anywhere, no stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sql_errors_return_sqlstate_and_leave_copies_identical() {
    let tc = start_cluster("sql_errors", 12, 3).await.unwrap();
    tc.client
        .execute_one(
            "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL CHECK (balance >= 0))",
            vec![],
        )
        .await
        .unwrap();
    tc.client
        .execute_one("INSERT INTO accounts VALUES (1, 100)", vec![])
        .await
        .unwrap();

    let e = tc
        .client
        .execute_one("INSERT INTO accounts VALUES (1, 5)", vec![])
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate().as_deref(), Some("23505"), "{e}");
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(
        e.sql_error().unwrap().log_index > 0,
        "a constraint violation is decided by applying the entry"
    );

    let e = tc
        .client
        .execute_one("INSERT INTO accounts VALUS (2, 5)", vec![])
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate().as_deref(), Some("42601"), "{e}");
    assert_eq!(e.code(), Code::InvalidArgument);

    // A failing second statement rolls back the first: the entry is atomic on every node.
    let e = tc
        .client
        .execute(vec![
            stmt(
                "UPDATE accounts SET balance = balance - 50 WHERE id = 1",
                vec![],
            ),
            stmt(
                "UPDATE accounts SET balance = balance - 500 WHERE id = 1",
                vec![],
            ),
        ])
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate().as_deref(), Some("23514"), "{e}");
    assert_eq!(e.sql_error().unwrap().statement_index, 1);

    let e = tc
        .client
        .execute_one("SELECT 1/0", vec![])
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate().as_deref(), Some("22012"), "{e}");
    let e = tc
        .client
        .execute_one("INSERT INTO nope VALUES (1)", vec![])
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate().as_deref(), Some("42P01"), "{e}");

    // The cluster keeps serving.
    tc.client
        .execute_one(
            "UPDATE accounts SET balance = balance - 30 WHERE id = 1",
            vec![],
        )
        .await
        .unwrap();
    let sums = tc.assert_identical(&[1, 2, 3]).await.unwrap();
    let pg = tc.pg(2).await.unwrap();
    let bal: i32 = pg
        .query_one("SELECT balance FROM accounts WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(bal, 70, "only the successful writes took effect ({sums:?})");
}

/// Bad input gets a precise status and never hurts a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_clear_errors_and_the_node_keeps_serving() {
    let tc = start_cluster("bad_input", 13, 3).await.unwrap();
    let c = &tc.client;
    c.execute_one(
        "CREATE TABLE t (id int PRIMARY KEY, v text, at interval)",
        vec![],
    )
    .await
    .unwrap();

    // Malformed SQL is refused at the leader, before the log.
    let e = c.execute_one("SELEC 1", vec![]).await.unwrap_err();
    assert_eq!(
        (e.code(), e.sqlstate().as_deref()),
        (Code::InvalidArgument, Some("42601")),
        "{e}"
    );
    assert_eq!(
        e.sql_error().unwrap().log_index,
        0,
        "refused before entering the log"
    );
    let e = c.execute_one("", vec![]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = c.execute(vec![]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // Statements that cannot be replicated are refused with the reason.
    for sql in [
        "BEGIN",
        "COMMIT",
        "SET statement_timeout = 1",
        "VACUUM t",
        "CREATE TEMP TABLE x (a int)",
        "INSERT INTO t VALUES (1, 'a'); INSERT INTO t VALUES (2, 'b')",
        "UPDATE raftpg.applied SET log_index = 0",
    ] {
        let e = c.execute_one(sql, vec![]).await.unwrap_err();
        assert!(matches!(e.code(), Code::InvalidArgument), "{sql}: {e}");
        assert!(e.sqlstate().is_some(), "{sql}: {e}");
    }

    // Wrong parameter types and counts.
    let e = c
        .execute_one(
            "INSERT INTO t (id, v) VALUES ($1, $2)",
            vec![values::text("x"), values::text("y")],
        )
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.sqlstate().as_deref()),
        (Code::InvalidArgument, Some("42804")),
        "{e}"
    );
    let e = c
        .execute_one(
            "INSERT INTO t (id, v) VALUES ($1, $2)",
            vec![values::int(1)],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = c
        .execute_one("INSERT INTO t (id) VALUES ($1)", vec![values::int(1 << 40)])
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate().as_deref(), Some("42804"), "{e}");
    let e = c
        .execute_one(
            "INSERT INTO t (id) VALUES ($1)",
            vec![raftpg_client::v1::Value { kind: None }],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = c
        .execute_one(
            "INSERT INTO t (id, v) VALUES (1, $1::uuid::text)",
            vec![values::uuid("not-a-uuid")],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = c
        .execute_one(
            "INSERT INTO t (id, v) VALUES (1, $1)",
            vec![values::numeric("12x")],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // Every result type comes back: one raftpg has no kind for in PostgreSQL's text form,
    // with its type, from a write's RETURNING and from a read.
    let r = c
        .execute_one(
            "INSERT INTO t VALUES (7, 'x', '1 day 02:00') RETURNING at",
            vec![],
        )
        .await
        .unwrap();
    let value = &r.results[0].rows[0].values[0];
    assert!(
        matches!(&value.kind, Some(raftpg_client::v1::value::Kind::PgText(t)) if t.text == "1 day 02:00:00" && t.type_oid == 1186),
        "{value:?}"
    );
    let rows = c
        .query(QueryRequest {
            sql: "SELECT at, ARRAY[at, NULL], pg_sleep(0) FROM t WHERE id = 7".into(),
            consistency: Consistency::Linearizable as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let shown: Vec<String> = rows.rows[0].values.iter().map(values::display).collect();
    assert_eq!(shown, ["1 day 02:00:00", "{\"1 day 02:00:00\",NULL}", ""]);
    // A statement PostgreSQL cannot nest in a query (CALL with an INOUT value) cannot have
    // its column printed: a clear error, and the write does not happen.
    c.execute_one(
        "CREATE PROCEDURE twice(INOUT x interval) LANGUAGE plpgsql AS $$ BEGIN x := x * 2; END $$",
        vec![],
    )
    .await
    .unwrap();
    let e = c
        .execute_one("CALL twice('1 day')", vec![])
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.sqlstate().as_deref()),
        (Code::Unimplemented, Some("0A000")),
        "{e}"
    );

    // A write through a follower gets the leader's result as the leader sent it: a numeric of
    // 1001 digits is a valid result, though too long for a parameter.
    let (_, follower) = tc.leader_and_follower().await;
    let r = tc
        .node_client(follower)
        .execute_one(
            "INSERT INTO t (id, v) VALUES (40, repeat('9', 1001)) RETURNING v::numeric",
            vec![],
        )
        .await
        .unwrap();
    let value = &r.results[0].rows[0].values[0];
    assert!(
        matches!(&value.kind, Some(raftpg_client::v1::value::Kind::Numeric(n)) if n.len() == 1001),
        "{value:?}"
    );

    // float8 NaN and ±Infinity are values like any other: through the log (and the request
    // log) and back, the same on every node.
    c.execute_one("CREATE TABLE f (id int PRIMARY KEY, x float8)", vec![])
        .await
        .unwrap();
    for (id, x) in [(1, f64::NAN), (2, f64::INFINITY), (3, f64::NEG_INFINITY)] {
        let r = c
            .execute_one(
                "INSERT INTO f VALUES ($1, $2) RETURNING x",
                vec![values::int(id), values::float(x)],
            )
            .await
            .unwrap();
        assert_eq!(
            format!("{:?}", r.results[0].rows[0].values[0].kind),
            format!("{:?}", Some(raftpg_client::v1::value::Kind::Float64(x))),
        );
    }

    // Oversized requests.
    let big = "x".repeat(5 * 1024 * 1024);
    let e = c
        .execute_one(
            "INSERT INTO t (id, v) VALUES (2, $1)",
            vec![values::text(big.clone())],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    // The request's limits come first: an oversized write with a bad parameter is refused as
    // oversized, and bad SQL is reported before a bad parameter of a later statement.
    let e = c
        .execute(vec![
            stmt(
                "INSERT INTO t (id, v) VALUES (2, $1)",
                vec![values::text(big.clone())],
            ),
            stmt(
                "INSERT INTO t (id, v) VALUES (3, $1)",
                vec![values::numeric("12x")],
            ),
        ])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    let e = c
        .execute(vec![
            stmt("SELEC 1", vec![]),
            stmt(
                "INSERT INTO t (id, v) VALUES (3, $1)",
                vec![values::numeric("12x")],
            ),
        ])
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate().as_deref(), Some("42601"), "{e}");
    let e = c
        .query_sql(
            "SELECT $1::text",
            vec![values::text(big)],
            Consistency::Local,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");

    // A read that tries to write.
    for sql in [
        "INSERT INTO t VALUES (3, 'r')",
        "SELECT * FROM t FOR UPDATE",
        "SET work_mem = '1GB'",
    ] {
        let e = c
            .query_sql(sql, vec![], Consistency::Local)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{sql}: {e}");
        assert!(e.to_string().contains("Write.Execute"), "{e}");
    }
    let e = c
        .query_sql(
            "WITH x AS (INSERT INTO t VALUES (4, 'cte') RETURNING id) SELECT * FROM x",
            vec![],
            Consistency::Local,
        )
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate().as_deref(), Some("25006"), "{e}");
    let e = c
        .query_sql("SELECT nextval('t_seq_nope')", vec![], Consistency::Local)
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate().as_deref(), Some("42P01"), "{e}");

    // A membership change naming a bad address, and a request that is not protobuf at all,
    // are the sender's errors.
    let e = c.add_learner(4, "not an address", false).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let addr = tc.addr_of(1);
    for path in [
        "/raftpg.v1.Write/Execute",
        "/raftpg.v1.Read/Query",
        "/raftpg.v1.Cluster/AddLearner",
    ] {
        let e = raw_call(&tc, &addr, path, vec![0xff, 0xff, 0xff, 0x0f])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{path}: {e}");
        assert!(e.message().starts_with("malformed message"), "{path}: {e}");
    }

    // A call naming an unknown node.
    let e = c.member_status(0, 42).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert!(c.member_status(0, 3).await.unwrap().node_id == 3);

    // Everything still works and nothing above left a trace.
    c.execute_one(
        "INSERT INTO t (id, v) VALUES ($1, $2)",
        vec![values::int(9), values::text("ok")],
    )
    .await
    .unwrap();
    let sums = tc.assert_identical(&[1, 2, 3]).await.unwrap();
    // Rows 7 (RETURNING an interval), 40 (written through a follower) and 9.
    assert!(sums["public.t"].starts_with("3 rows"), "{sums:?}");
}

/// kill -9 the leader under load: a new leader, writes continue, nothing acknowledged lost,
/// the old leader catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_under_load_loses_no_acknowledged_write() {
    let mut tc = start_cluster("leader_kill", 14, 3).await.unwrap();
    tc.client.execute_one(LOAD_TABLE_DDL, vec![]).await.unwrap();
    let load = LoadRun::start(&tc, "load", 6);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let old = tc
        .client
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    tc.cluster.kill_node(old);
    let survivors: Vec<String> = tc
        .cluster
        .nodes()
        .iter()
        .filter(|n| n.id != old)
        .map(|n| n.addr.clone())
        .collect();
    let c2 = tc.client_of(&survivors);
    let new = c2.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    assert_ne!(new, old);
    tokio::time::sleep(Duration::from_secs(4)).await;
    tc.cluster.start_node(old).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    load.finish(&tc, &[1, 2, 3]).await;
}

/// kill -9 a node's PostgreSQL mid-load (follower, then leader): the node restarts it, resumes
/// after its last applied entry, and ends identical, serial ids included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_killed_mid_load_resumes_exactly() {
    let tc = start_cluster("pg_kill", 15, 3).await.unwrap();
    tc.client.execute_one(LOAD_TABLE_DDL, vec![]).await.unwrap();
    let load = LoadRun::start(&tc, "load", 6);
    let (leader, follower) = tc.leader_and_follower().await;
    for victim in [follower, follower, leader] {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pid = tc.cluster.node(victim).postgres_pid();
        assert!(
            tc.cluster.kill_postgres(victim),
            "node {victim} has a running PostgreSQL"
        );
        // The supervisor must bring up a new postmaster.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let now = tc.cluster.node(victim).postgres_pid();
            if now.is_some() && now != pid {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "PostgreSQL of node {victim} was not restarted"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Identical tables *and* sequence positions: a sequence that skipped values after crash
    // recovery would show up in the comparison and in the ids.
    load.finish(&tc, &[1, 2, 3]).await;
    let st = tc.client.status_of((follower - 1) as usize).await.unwrap();
    assert!(st.postgres_up, "{st:?}");
}

/// Sequences created, renamed and used between crashes of PostgreSQL are put back where the
/// last committed batch left them: the positions recorded with every batch follow the
/// sequences' current names (raftpg.sequence_positions() caches the list of sequences and DDL
/// must clear it; a stale name would leave the renamed sequence 32 values ahead after crash
/// recovery on that node only, and its next id would differ).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn renamed_and_new_sequences_are_restored_after_a_postgres_crash() {
    let tc = start_cluster("seq_rename", 134, 3).await.unwrap();
    let c = &tc.client;
    let run = |sql: &'static str| async move { c.execute_one(sql, vec![]).await.unwrap() };
    run("CREATE SEQUENCE s1").await;
    run("CREATE TABLE x (n serial PRIMARY KEY, v bigint NOT NULL)").await;
    for _ in 0..3 {
        run("INSERT INTO x (v) VALUES (nextval('s1'))").await;
    }
    run("ALTER SEQUENCE s1 RENAME TO s2").await;
    for _ in 0..3 {
        run("INSERT INTO x (v) VALUES (nextval('s2'))").await;
    }
    run("CREATE SEQUENCE s3 START 100").await;
    run("INSERT INTO x (v) VALUES (nextval('s2'))").await;
    let (leader, follower) = tc.leader_and_follower().await;
    for victim in [follower, leader] {
        let pid = tc.cluster.node(victim).postgres_pid();
        assert!(tc.cluster.kill_postgres(victim));
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while tc.cluster.node(victim).postgres_pid() == pid
            || tc.cluster.node(victim).postgres_pid().is_none()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "PostgreSQL of node {victim} was not restarted"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for _ in 0..3 {
            run("INSERT INTO x (v) VALUES (nextval('s2')), (nextval('s3'))").await;
        }
    }
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
    for id in 1..=3 {
        let v: Vec<i64> = tc.column(id, "SELECT v FROM x ORDER BY n").await.unwrap();
        assert_eq!(
            v,
            vec![1, 2, 3, 4, 5, 6, 7, 8, 100, 9, 101, 10, 102, 11, 103, 12, 104, 13, 105],
            "node {id}"
        );
    }
}

/// kill -9 node processes under load (entries committed but not yet applied die with them):
/// on restart nothing is applied twice or skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_killed_between_commit_and_apply_applies_everything_once() {
    let mut tc = start_cluster("node_kill", 16, 3).await.unwrap();
    tc.client.execute_one(LOAD_TABLE_DDL, vec![]).await.unwrap();
    let load = LoadRun::start(&tc, "load", 6);
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let leader = tc
            .client
            .wait_for_leader(Duration::from_secs(30))
            .await
            .unwrap();
        // Alternate between a follower and the leader.
        let victim = if round % 2 == 0 {
            (1..=3).find(|id| *id != leader).unwrap()
        } else {
            leader
        };
        tc.cluster.kill_node(victim);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tc.cluster.start_node(victim).unwrap();
    }
    // And a graceful stop/start (SIGTERM) of one node.
    tc.cluster.stop_node(2);
    assert!(
        tc.cluster.node(2).postgres_pid().is_none(),
        "SIGTERM stops the node's PostgreSQL too"
    );
    tc.cluster.start_node(2).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    load.finish(&tc, &[1, 2, 3]).await;
}

/// Sends `body` as the request message of the gRPC method `path` on `addr` of `tc` (over its
/// TLS), as it is (no protobuf encoding), and returns the raw answer.
async fn raw_call(
    tc: &testkit::TestCluster,
    addr: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let certs = tc.certs().expect("a TLS cluster");
    let ca = std::fs::read_to_string(certs.join("ca.crt")).expect("the CA");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca));
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("an address")
        .tls_config(tls)
        .expect("TLS settings")
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(path).expect("a path");
    grpc.unary(tc.request(body), path, RawCodec)
        .await
        .map(|r| r.into_inner())
}

/// A codec that sends and receives message bytes as they are.
#[derive(Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}
