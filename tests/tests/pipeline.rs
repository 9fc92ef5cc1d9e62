//! The pipelined apply path: many concurrent entries — successes, SQL errors, entries that fail
//! on the node's side after PostgreSQL ran them (too many rows), and retried request ids — end
//! exactly as if applied one at a time: the right outcome for each, identical copies and
//! sequences on every node.

use std::collections::BTreeSet;
use std::sync::Arc;

use raftpg_client::v1::{Consistency, RequestId, Statement};
use testkit::{start_cluster_with, values};
use tonic::Code;

fn stmt(sql: &str, params: Vec<raftpg_client::v1::Value>) -> Statement {
    Statement {
        sql: sql.into(),
        params,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_mixed_entries_apply_as_if_one_at_a_time() {
    let tc = Arc::new(
        start_cluster_with("pipeline", 71, 3, &["--write-result-rows-max", "5"])
            .await
            .unwrap(),
    );
    let c = &tc.client;
    c.execute_one(
        "CREATE TABLE items (id serial PRIMARY KEY, k int NOT NULL UNIQUE, note text)",
        vec![],
    )
    .await
    .unwrap();
    const INSERT: &str = "INSERT INTO items (k, note) VALUES ($1, 'one') RETURNING id";
    // With $2 = 2 it returns 3 rows (fine), with $2 = 9 ten (more than 5: 54000).
    const MANY: &str = "INSERT INTO items (k, note) SELECT $1 + g, 'many' FROM generate_series(0, $2) g ORDER BY g RETURNING id";
    // Once successfully, so that every node has it prepared (only prepared statements are
    // pipelined).
    c.execute(vec![stmt(MANY, vec![values::int(0), values::int(2)])])
        .await
        .unwrap();

    let mut rounds = 0;
    let mut expected: BTreeSet<i64> = BTreeSet::from([0, 1, 2]);
    loop {
        rounds += 1;
        let base = rounds * 1_000_000;
        let mut tasks = Vec::new();
        for t in 0..16i64 {
            let tc = tc.clone();
            tasks.push(tokio::spawn(async move {
                let c = &tc.client;
                let mut ok = Vec::new();
                for i in 0..25i64 {
                    let k = base + t * 10_000 + i * 100;
                    match i % 5 {
                        // Fails after PostgreSQL ran it: 10 rows > 5 (54000), nothing kept.
                        1 => {
                            let e = c
                                .execute(vec![stmt(MANY, vec![values::int(k), values::int(9)])])
                                .await
                                .unwrap_err();
                            assert_eq!(e.sqlstate().as_deref(), Some("54000"), "{e}");
                        }
                        4 => {
                            c.execute(vec![stmt(MANY, vec![values::int(k), values::int(2)])])
                                .await
                                .unwrap();
                            ok.extend([k, k + 1, k + 2]);
                        }
                        // A SQL error in PostgreSQL: the key exists.
                        2 if !ok.is_empty() => {
                            let e = c
                                .execute(vec![stmt(INSERT, vec![values::int(ok[0])])])
                                .await
                                .unwrap_err();
                            assert_eq!(e.code(), Code::AlreadyExists, "{e}");
                        }
                        // The same request id twice: applied once, the same answer twice.
                        3 => {
                            let id = RequestId {
                                client_id: format!("pipeline-{base}-{t}"),
                                seq: i as u64,
                            };
                            let s = vec![stmt(INSERT, vec![values::int(k)])];
                            let first = c.execute_with_id(s.clone(), id.clone()).await.unwrap();
                            let again = c.execute_with_id(s, id).await.unwrap();
                            assert_eq!(first.results, again.results);
                            ok.push(k);
                        }
                        _ => {
                            c.execute(vec![stmt(INSERT, vec![values::int(k)])])
                                .await
                                .unwrap();
                            ok.push(k);
                        }
                    }
                }
                ok
            }));
        }
        for t in tasks {
            expected.extend(t.await.unwrap());
        }
        // The path this test is about must have been taken (runs of several entries, one of
        // which failed after it ran); with 16 concurrent clients it nearly always is.
        let logs: String = (1..=3)
            .map(|i| {
                std::fs::read_to_string(tc.cluster.data_dir().join(format!("node{i}.log")))
                    .unwrap_or_default()
            })
            .collect();
        if logs.contains("re-applying the batch entry by entry") || rounds == 5 {
            assert!(
                logs.contains("re-applying the batch entry by entry"),
                "no pipelined run was abandoned in {rounds} rounds"
            );
            break;
        }
    }

    let sums = tc.assert_identical(&[1, 2, 3]).await.unwrap();
    let pg = tc.pg(2).await.unwrap();
    let rows = pg.query("SELECT k FROM items", &[]).await.unwrap();
    let held: BTreeSet<i64> = rows.iter().map(|r| r.get::<_, i32>(0) as i64).collect();
    assert_eq!(held, expected, "exactly the acknowledged inserts are kept");
    let ids = pg
        .query_one("SELECT count(DISTINCT id) = count(*) FROM items", &[])
        .await
        .unwrap();
    assert!(ids.get::<_, bool>(0));
    drop(pg);
    println!("{} rows, {} rounds, checksums {sums:?}", held.len(), rounds);
}

/// Concurrent writes share Raft entries (the proposer's group commit), and each still gets its
/// own outcome: its RETURNING rows, its SQL error, its own random draws, and for a request id
/// sent several times at once one application and the same answer for every copy. Every node
/// ends identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_share_entries_each_with_its_own_outcome() {
    let tc = Arc::new(start_cluster_with("batch", 72, 3, &[]).await.unwrap());
    let c = &tc.client;
    // The writes of one entry share its seed: each must still draw its own uuid (a clash
    // would fail the insert with 23505).
    c.execute_one(
        "CREATE TABLE b (id bigserial PRIMARY KEY, k int NOT NULL UNIQUE,
                         u uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
                         r float8 NOT NULL DEFAULT random(), at timestamptz NOT NULL DEFAULT now())",
        vec![],
    )
    .await
    .unwrap();
    const INSERT: &str = "INSERT INTO b (k) VALUES ($1) RETURNING k";
    let mut tasks = Vec::new();
    for t in 0..48i64 {
        let tc = tc.clone();
        tasks.push(tokio::spawn(async move {
            let c = &tc.client;
            let (mut kept, mut indexes, mut writes) = (Vec::new(), Vec::new(), 0);
            for i in 0..20i64 {
                let k = t * 1_000 + i;
                let s = vec![stmt(INSERT, vec![values::int(k)])];
                match i % 6 {
                    // A key that exists: a SQL error for this write only.
                    5 => {
                        let e = c
                            .execute(vec![stmt(INSERT, vec![values::int(k - 1)])])
                            .await
                            .unwrap_err();
                        assert_eq!(e.sqlstate().as_deref(), Some("23505"), "{e}");
                    }
                    // The same request id three times at once: applied once, one answer.
                    3 => {
                        let id = RequestId {
                            client_id: format!("batch-{t}"),
                            seq: i as u64,
                        };
                        let (a, b, d) = tokio::join!(
                            c.execute_with_id(s.clone(), id.clone()),
                            c.execute_with_id(s.clone(), id.clone()),
                            c.execute_with_id(s, id)
                        );
                        let (a, b, d) = (a.unwrap(), b.unwrap(), d.unwrap());
                        assert_eq!(a.results, b.results);
                        assert_eq!(a.results, d.results);
                        kept.push(k);
                        writes += 1;
                        indexes.push(a.log_index);
                    }
                    _ => {
                        let r = c.execute(s).await.unwrap();
                        let returned = &r.results[0].rows[0].values[0];
                        assert_eq!(returned, &values::int(k), "each write gets its own rows");
                        kept.push(k);
                        writes += 1;
                        indexes.push(r.log_index);
                    }
                }
            }
            (kept, indexes, writes)
        }));
    }
    let (mut expected, mut indexes, mut writes) = (BTreeSet::new(), BTreeSet::new(), 0);
    for t in tasks {
        let (k, i, w) = t.await.unwrap();
        expected.extend(k);
        indexes.extend(i);
        writes += w;
    }
    assert!(
        indexes.len() < writes,
        "{writes} concurrent writes took {} log entries: none were proposed together",
        indexes.len()
    );
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
    let pg = tc.pg(3).await.unwrap();
    let rows = pg.query("SELECT k FROM b", &[]).await.unwrap();
    let held: BTreeSet<i64> = rows.iter().map(|r| r.get::<_, i32>(0) as i64).collect();
    assert_eq!(held, expected, "exactly the acknowledged inserts are kept");
    let distinct = pg
        .query_one(
            "SELECT count(DISTINCT u) = count(*) AND count(DISTINCT r) = count(*) FROM b",
            &[],
        )
        .await
        .unwrap();
    assert!(
        distinct.get::<_, bool>(0),
        "random draws repeat within an entry"
    );
    println!("{writes} writes in {} entries", indexes.len());
}

/// Request records expire by write count, not by log entries: writes proposed together share
/// an entry, and the retention must bound the records kept whatever the batching. A retry
/// within the retention is answered from the record; after more writes than the retention it
/// is a new write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_records_expire_after_the_retention_counted_in_writes() {
    let tc = Arc::new(
        start_cluster_with("retention", 73, 3, &["--request-retention-writes", "40"])
            .await
            .unwrap(),
    );
    let c = &tc.client;
    c.execute_one("CREATE TABLE r (id bigserial PRIMARY KEY, k int)", vec![])
        .await
        .unwrap();
    let id = RequestId {
        client_id: "retention-test".into(),
        seq: 1,
    };
    let insert = vec![stmt("INSERT INTO r (k) VALUES (1)", vec![])];
    c.execute_with_id(insert.clone(), id.clone()).await.unwrap();
    c.execute_with_id(insert.clone(), id.clone()).await.unwrap();
    // Counted through the read API at LINEARIZABLE: it sees every acknowledged write, whichever
    // node answers.
    let count = |tc: Arc<testkit::TestCluster>| async move {
        let r = tc
            .client
            .query_sql(
                "SELECT count(*) FROM r WHERE k = 1",
                vec![],
                Consistency::Linearizable,
            )
            .await
            .unwrap();
        values::as_i64(&r.rows[0].values[0]).unwrap()
    };
    assert_eq!(
        count(tc.clone()).await,
        1,
        "a retry within the retention is not applied"
    );
    // 64 concurrent writes: far fewer log entries than writes.
    let mut tasks = Vec::new();
    for i in 0..64i64 {
        let tc = tc.clone();
        tasks.push(tokio::spawn(async move {
            tc.client
                .execute(vec![stmt(
                    "INSERT INTO r (k) VALUES ($1)",
                    vec![values::int(100 + i)],
                )])
                .await
                .unwrap()
                .log_index
        }));
    }
    let mut entries = BTreeSet::new();
    for t in tasks {
        entries.insert(t.await.unwrap());
    }
    c.execute_with_id(insert, id).await.unwrap();
    assert_eq!(
        count(tc.clone()).await,
        2,
        "after 64 writes in {} entries the record (retention 40 writes) has expired",
        entries.len()
    );
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
}
