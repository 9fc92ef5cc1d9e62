//! Deterministic SQL: rewritten time and randomness functions leave identical copies (checked
//! with `raftpg check`), refused classes say why, and a follower whose PostgreSQL is frozen for
//! a while under load catches up to an identical copy.

use std::time::Duration;

use raftpg_client::v1::Statement;
use testkit::{start_cluster, values, LoadRun};
use tonic::Code;

fn stmt(sql: &str) -> Statement {
    Statement {
        sql: sql.into(),
        params: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rewritten_functions_leave_identical_copies() {
    let tc = start_cluster("rewrites", 31, 3).await.unwrap();
    let c = &tc.client;
    c.execute_one(
        "CREATE TABLE events (
            id serial PRIMARY KEY,
            at timestamptz NOT NULL DEFAULT now(),
            day date DEFAULT CURRENT_DATE,
            token uuid NOT NULL DEFAULT gen_random_uuid(),
            r float8 NOT NULL DEFAULT random(),
            note text)",
        vec![],
    )
    .await
    .unwrap();
    // Defaults, single-row.
    let a = c
        .execute_one(
            "INSERT INTO events (note) VALUES ('a') RETURNING at, token::text, r",
            vec![],
        )
        .await
        .unwrap();
    // Explicit calls, multi-row VALUES and INSERT ... SELECT ... ORDER BY, several per entry.
    let b = c
        .execute(vec![
            stmt("INSERT INTO events (at, token, r, note) VALUES (clock_timestamp(), uuid_generate_v4(), random(), 'b1'), (statement_timestamp(), gen_random_uuid(), random(), 'b2') RETURNING at, token::text, r"),
            stmt("INSERT INTO events (note) SELECT 'g' || g FROM generate_series(1, 20) g ORDER BY g RETURNING token::text, r"),
            stmt("INSERT INTO events (at, note) VALUES (CURRENT_TIMESTAMP, 'c'), (LOCALTIMESTAMP, 'd'), (transaction_timestamp(), 'e') RETURNING at"),
        ])
        .await
        .unwrap();
    let time_a = a.results[0].rows[0].values[0].clone();
    let time_b = b.results[0].rows[0].values[0].clone();
    assert_ne!(time_a, time_b, "each entry has its own timestamp");
    let entry_times: std::collections::BTreeSet<String> = b.results[0]
        .rows
        .iter()
        .chain(b.results[2].rows.iter())
        .map(|r| values::display(&r.values[0]))
        .collect();
    assert_eq!(
        entry_times.len(),
        1,
        "every time function in one entry gives the entry's timestamp: {entry_times:?}"
    );
    let tokens: std::collections::BTreeSet<String> = b.results[1]
        .rows
        .iter()
        .map(|r| values::display(&r.values[0]))
        .collect();
    assert_eq!(tokens.len(), 20, "uuids are distinct per row");
    let randoms: std::collections::BTreeSet<String> = b.results[1]
        .rows
        .iter()
        .map(|r| values::display(&r.values[1]))
        .collect();
    assert_eq!(randoms.len(), 20, "random() is distinct per row");
    // The clock follows the leader's wall clock.
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    match a.results[0].rows[0].values[0].kind {
        Some(raftpg_client::v1::value::Kind::TimestamptzMicros(t)) => {
            assert!((now_us - t).abs() < 60_000_000, "{t} vs {now_us}")
        }
        ref other => panic!("{other:?}"),
    }
    // A function created through raftpg may use raftpg.now() explicitly.
    c.execute_one("CREATE FUNCTION stamp(n text) RETURNS text LANGUAGE sql AS $$ SELECT n || '@' || raftpg.now()::text $$", vec![])
        .await
        .unwrap();
    c.execute_one("INSERT INTO events (note) VALUES (stamp('f'))", vec![])
        .await
        .unwrap();

    let check = c.check(Duration::from_secs(60)).await.unwrap();
    assert!(check.identical, "{:?}", check.differences);
    // And the returned values are what every node stored.
    for id in 1..=3 {
        let pg = tc.pg(id).await.unwrap();
        let row = pg
            .query_one("SELECT token::text FROM events WHERE note = 'a'", &[])
            .await
            .unwrap();
        let token: String = row.get(0);
        assert_eq!(
            token,
            values::display(&a.results[0].rows[0].values[1]),
            "node {id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_classes_say_why_and_the_cluster_keeps_serving() {
    let tc = start_cluster("refusals", 32, 3).await.unwrap();
    let c = &tc.client;
    c.execute_one(
        "CREATE TABLE t (id int PRIMARY KEY, v text, r float8)",
        vec![],
    )
    .await
    .unwrap();
    let cases = [
        ("BEGIN", "transaction"),
        ("SAVEPOINT x", "transaction"),
        ("SET search_path = x", "SET LOCAL"),
        ("PREPARE p AS SELECT 1", "PREPARE"),
        ("CREATE TEMP TABLE tt (a int)", "temporary"),
        ("LISTEN ch", "LISTEN"),
        ("SELECT pg_advisory_lock(7)", "pg_advisory_lock"),
        ("DECLARE c CURSOR FOR SELECT 1", "cursors"),
        ("VACUUM t", "VACUUM"),
        ("CREATE INDEX CONCURRENTLY i ON t (v)", "CONCURRENTLY"),
        ("CREATE DATABASE other", "databases"),
        ("ALTER SYSTEM SET work_mem = '1MB'", "configuration"),
        ("COPY t FROM '/etc/passwd'", "COPY"),
        (
            "INSERT INTO t VALUES (pg_backend_pid(), 'x', 0)",
            "pg_backend_pid",
        ),
        (
            "INSERT INTO t VALUES (txid_current(), 'x', 0)",
            "txid_current",
        ),
        (
            "INSERT INTO t (id, v) VALUES (1, inet_server_addr()::text)",
            "inet_server_addr",
        ),
        ("CREATE SEQUENCE s CACHE 10", "CACHE"),
        ("UPDATE t SET r = random()", "per row"),
        ("INSERT INTO t SELECT * FROM t", "ORDER BY"),
        (
            "DELETE FROM t WHERE id IN (SELECT id FROM t LIMIT 1)",
            "ORDER BY",
        ),
        (
            "CREATE FUNCTION f() RETURNS float8 LANGUAGE sql VOLATILE AS $$ SELECT random() $$",
            "deterministic",
        ),
    ];
    for (sql, why) in cases {
        let e = c.execute_one(sql, vec![]).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{sql}: {e}");
        assert!(e.to_string().contains(why), "{sql}: {e}");
        assert!(e.sqlstate().is_some(), "{sql}");
    }
    c.execute_one(
        "INSERT INTO t SELECT g, 'v', 0 FROM generate_series(1, 5) g ORDER BY g",
        vec![],
    )
    .await
    .unwrap();
    let check = c.check(Duration::from_secs(60)).await.unwrap();
    assert!(check.identical, "{:?}", check.differences);
}

/// A follower's PostgreSQL is frozen (SIGSTOP of its whole process group) for a while under load,
/// then resumed: the follower catches up, the copies are identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_postgres_frozen_under_load_catches_up() {
    let tc = start_cluster("pg_frozen", 33, 3).await.unwrap();
    tc.client
        .execute_one(
            "CREATE TABLE load (id serial PRIMARY KEY, k bigint NOT NULL UNIQUE, w int NOT NULL)",
            vec![],
        )
        .await
        .unwrap();
    let load = LoadRun::start(&tc, "load", 4);
    let (leader, follower) = tc.leader_and_follower().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(tc.cluster.signal_postgres(follower, libc::SIGSTOP));
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = tc.client.status_of((follower - 1) as usize).await.unwrap();
    let leader_st = tc.client.status_of((leader - 1) as usize).await.unwrap();
    assert!(tc.cluster.signal_postgres(follower, libc::SIGCONT));
    assert!(
        during.applied_index < leader_st.applied_index,
        "the frozen follower fell behind: {during:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.finish(&tc, &[1, 2, 3]).await;
    let check = tc.client.check(Duration::from_secs(60)).await.unwrap();
    assert!(check.identical, "{:?}", check.differences);
}

/// Entry timestamps never go backwards along the log, even when a leader whose clock is an
/// hour behind takes over from one whose clock is an hour ahead right after restarting (it
/// applied nothing since its start, so it had observed no timestamp): `now()` of later writes
/// is never earlier than that of earlier ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timestamps_never_go_back_when_a_restarted_node_takes_over_from_a_skewed_leader() {
    const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    assert!(
        std::path::Path::new(FAKETIME_LIB).exists(),
        "{FAKETIME_LIB} missing (apt-get install faketime)"
    );
    let ahead = vec![
        ("LD_PRELOAD".to_string(), FAKETIME_LIB.to_string()),
        ("FAKETIME".to_string(), "+1h".to_string()),
    ];
    let mut tc = testkit::start_cluster_env("clock_skew", 34, 3, &[], vec![ahead])
        .await
        .unwrap();
    let c = &tc.client;
    c.wait_for_leader(Duration::from_secs(60)).await.unwrap();
    // Node 1 (an hour ahead) leads and writes.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let _ = c.transfer_leader(1).await;
        if c.status_of(0).await.is_ok_and(|s| s.leader_id == 1) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "node 1 never led");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    c.execute_one(
        "CREATE TABLE ev (n int PRIMARY KEY, at timestamptz DEFAULT now())",
        vec![],
    )
    .await
    .unwrap();
    for n in 1..=3 {
        let r = c
            .execute_one("INSERT INTO ev (n) VALUES ($1)", vec![values::int(n)])
            .await
            .unwrap();
        assert_eq!(r.leader_id, 1);
    }
    // Nodes 2 and 3 restart (they observe nothing: everything is applied already), then the
    // skewed leader dies and one of them takes over.
    for id in [2, 3] {
        tc.cluster.kill_node(id);
        tc.cluster.start_node(id).unwrap();
    }
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
    tc.cluster.kill_node(1);
    let r = c
        .execute_one("INSERT INTO ev (n) VALUES (4)", vec![])
        .await
        .unwrap();
    assert_ne!(r.leader_id, 1);
    let pg = tc.pg(r.leader_id).await.unwrap();
    let rows = pg
        .query("SELECT n, at FROM ev ORDER BY n", &[])
        .await
        .unwrap();
    let ats: Vec<std::time::SystemTime> = rows.iter().map(|r| r.get(1)).collect();
    assert!(
        ats.windows(2).all(|w| w[0] <= w[1]),
        "now() went backwards along the log: {ats:?}"
    );
}
