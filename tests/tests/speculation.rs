//! The leader executes its entries while Raft replicates them and keeps what it executed only
//! when Raft commits that very entry at that position (docs/write-path.md, "execute now, keep
//! if committed here"). Here the entry never commits: the leader is killed after executing it,
//! or paused while the other nodes (restarted without the entry) elect a new leader that
//! writes at the same index. Either
//! way the copies stay identical (rows, sequences, roles), the stranded write is applied at
//! most once, and sequences go on from the same value on every node.

use std::time::{Duration, Instant};

use raftpg_client::local_cluster::metrics_addr_of;
use testkit::{http_get, metric, start_cluster_with, values, TestCluster};

const DDL: &str = "CREATE TABLE spec (id serial PRIMARY KEY, v text NOT NULL)";
const INSERT: &str = "INSERT INTO spec (v) VALUES ($1)";

/// Whether node `id`'s PostgreSQL holds, within 15 s, an uncommitted insert into `spec`: the
/// leader executed an entry Raft has not committed.
async fn speculating(tc: &TestCluster, id: u64) -> bool {
    let pg = tc.pg(id).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let n: i64 = pg
            .query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
                  WHERE c.relname = 'spec' AND l.mode = 'RowExclusiveLock' AND l.granted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Node `id`'s count of speculations that ended `outcome`.
async fn speculations(tc: &TestCluster, id: u64, outcome: &str) -> f64 {
    let (_, text) = http_get(&metrics_addr_of(&tc.addr_of(id)), "/metrics")
        .await
        .unwrap();
    metric(
        &text,
        &format!("raftpg_speculations_total{{outcome=\"{outcome}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_entry_executed_but_never_committed_leaves_no_trace() {
    // Speculations wait long enough here that only the committed log can end them.
    let mut tc = start_cluster_with(
        "speculation",
        132,
        3,
        &["--speculation-wait-max-ms", "120000"],
    )
    .await
    .unwrap();
    let c = tc.client_of(&(1..=3).map(|id| tc.addr_of(id)).collect::<Vec<_>>());
    c.execute_one(DDL, vec![]).await.unwrap();
    c.execute_one(INSERT, vec![values::text("before")])
        .await
        .unwrap();
    let leader = c.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    assert!(
        speculations(&tc, leader, "kept").await >= 1.0,
        "the leader kept no speculation of its writes"
    );

    // A write that fails deterministically (here a duplicate key) is an outcome like any
    // other: its speculation holds the error (the write's savepoint rolled back) and is kept,
    // and every node records the same error.
    let kept_before = speculations(&tc, leader, "kept").await;
    for _ in 0..3 {
        let e = c
            .execute_one("INSERT INTO spec (id, v) VALUES (1, 'dup')", vec![])
            .await
            .unwrap_err();
        assert_eq!(e.sqlstate().as_deref(), Some("23505"), "{e}");
    }
    assert!(
        speculations(&tc, leader, "kept").await > kept_before,
        "no speculation of a failing write was kept"
    );
    tc.assert_identical(&[1, 2, 3]).await.unwrap();

    for round in ["killed", "overwritten"] {
        // The leader speculates only outside the careful batches that follow an abandoned fast
        // run (16, `CAREFUL_BATCHES_AFTER_ABANDON`), such as the one a retried duplicate of the
        // previous round's stranded write causes: let them pass, one write per batch.
        for _ in 0..17 {
            c.execute_one(INSERT, vec![values::text("settle")])
                .await
                .unwrap();
        }
        let leader = c.wait_for_leader(Duration::from_secs(30)).await.unwrap();
        let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
        eprintln!("round {round}: leader {leader}");
        // The followers stop: the leader's next entry cannot commit.
        for id in &others {
            assert!(tc.cluster.signal_node(*id, libc::SIGSTOP));
        }
        let stranded = {
            let cl = tc.node_client(leader);
            tokio::spawn(async move {
                tokio::time::timeout(
                    Duration::from_secs(60),
                    cl.execute_one(INSERT, vec![values::text(round)]),
                )
                .await
            })
        };
        let executed = speculating(&tc, leader).await;
        let dropped_before = speculations(&tc, leader, "dropped").await;
        match round {
            // The followers may still read the entry from their sockets when they resume, and
            // then commit it: the stranded write is kept or lost, never applied twice.
            "killed" => {
                tc.cluster.kill_node(leader);
                for id in &others {
                    assert!(tc.cluster.signal_node(*id, libc::SIGCONT));
                }
            }
            // The followers die with the entry unread in their sockets and come back while the
            // old leader is paused: they elect a leader that writes other entries at its index.
            _ => {
                assert!(tc.cluster.signal_node(leader, libc::SIGSTOP));
                for id in &others {
                    tc.cluster.kill_node(*id);
                    tc.cluster.start_node(*id).unwrap();
                }
            }
        }
        assert!(
            executed,
            "round {round}: the leader did not execute the entry"
        );
        // The other two elect a leader and write at the index the stranded entry had.
        let addrs: Vec<String> = others.iter().map(|id| tc.addr_of(*id)).collect();
        let two = tc.client_of(&addrs);
        let after = format!("after {round}");
        two.execute_one(INSERT, vec![values::text(&after)])
            .await
            .unwrap();
        match round {
            "killed" => tc.cluster.start_node(leader).unwrap(),
            _ => assert!(tc.cluster.signal_node(leader, libc::SIGCONT)),
        }
        tc.assert_identical(&[1, 2, 3]).await.unwrap();
        if round == "overwritten" {
            // The old leader rolled its speculation back when the committed log differed.
            let deadline = Instant::now() + Duration::from_secs(30);
            while speculations(&tc, leader, "dropped").await <= dropped_before {
                assert!(
                    Instant::now() < deadline,
                    "node {leader} never dropped its speculation"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Never acknowledged by a majority before the switch; a retry with its request id on
        // the new leader may still apply it, once.
        let outcome = stranded.await.unwrap();
        let rows: Vec<String> = tc
            .column(
                others[0],
                &format!("SELECT v FROM spec WHERE v = '{round}'"),
            )
            .await
            .unwrap();
        match &outcome {
            Ok(Ok(_)) => assert_eq!(rows.len(), 1, "round {round}: {rows:?}"),
            _ => assert!(rows.len() <= 1, "round {round}: {rows:?}"),
        }
        eprintln!(
            "round {round}: stranded write {}; rows with it: {}",
            match &outcome {
                Ok(Ok(_)) => "acknowledged (retried on the new leader)".to_string(),
                Ok(Err(e)) => format!("failed: {e}"),
                Err(_) => "timed out".to_string(),
            },
            rows.len()
        );
    }
    // The sequence goes on from the same value everywhere: the next id is one past the
    // largest, on every node.
    c.execute_one(INSERT, vec![values::text("last")])
        .await
        .unwrap();
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
    for id in 1..=3 {
        let ids: Vec<i32> = tc
            .column(id, "SELECT id FROM spec ORDER BY id")
            .await
            .unwrap();
        let last: Vec<i32> = tc
            .column(id, "SELECT id FROM spec WHERE v = 'last'")
            .await
            .unwrap();
        assert_eq!(last, vec![*ids.iter().max().unwrap()], "node {id}: {ids:?}");
    }
}
