//! Read consistency: read-your-writes on any node, linearizable reads on followers under load,
//! a node cut off from the majority refusing linearizable reads, and streamed large results.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use raftpg_client::v1::{Consistency, QueryRequest};
use testkit::{start_cluster, values};
use tonic::Code;

fn q(sql: &str, consistency: Consistency, min_index: u64) -> QueryRequest {
    QueryRequest {
        sql: sql.into(),
        consistency: consistency as i32,
        min_index,
        timeout_ms: 5_000,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_your_writes_and_linearizable_reads_on_followers() {
    let tc = start_cluster("reads", 61, 3).await.unwrap();
    let c = &tc.client;
    c.execute_one(
        "CREATE TABLE counter (id int PRIMARY KEY, n bigint NOT NULL)",
        vec![],
    )
    .await
    .unwrap();
    c.execute_one("INSERT INTO counter VALUES (1, 0)", vec![])
        .await
        .unwrap();
    let leader = c.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    let followers: Vec<usize> = (1..=3u64)
        .filter(|id| *id != leader)
        .map(|id| (id - 1) as usize)
        .collect();

    // Read-your-writes: write through node A, read AT_LEAST(index) on node B.
    for i in 1..=30i64 {
        let via = tc.node_client((i % 3 + 1) as u64);
        let w = via
            .execute_one(
                "UPDATE counter SET n = $1 WHERE id = 1",
                vec![values::int(i)],
            )
            .await
            .unwrap();
        let node = ((i + 1) % 3) as usize;
        let r = c
            .query_node(
                node,
                q(
                    "SELECT n FROM counter WHERE id = 1",
                    Consistency::AtLeast,
                    w.log_index,
                ),
            )
            .await
            .unwrap();
        assert!(r.applied_index >= w.log_index);
        assert_eq!(
            values::as_i64(&r.rows[0].values[0]),
            Some(i),
            "node {node} misses the write at {}",
            w.log_index
        );
    }

    // Linearizable reads on followers under a write load see every write acknowledged before
    // the read started.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::atomic::AtomicI64::new(30));
    let writer = {
        let (stop, acked, addrs) = (stop.clone(), acked.clone(), tc.cluster.addrs());
        tokio::spawn(async move {
            let w = raftpg_client::Client::new(&addrs).unwrap();
            let mut n = 30;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                w.execute_one(
                    "UPDATE counter SET n = $1 WHERE id = 1",
                    vec![values::int(n)],
                )
                .await
                .unwrap();
                acked.store(n, Ordering::SeqCst);
            }
        })
    };
    let mut reads = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        for &f in &followers {
            let before = acked.load(Ordering::SeqCst);
            let r = c
                .query_node(
                    f,
                    q(
                        "SELECT n FROM counter WHERE id = 1",
                        Consistency::Linearizable,
                        0,
                    ),
                )
                .await
                .unwrap();
            let seen = values::as_i64(&r.rows[0].values[0]).unwrap();
            assert!(
                seen >= before,
                "stale linearizable read on node {}: saw {seen}, {before} was acknowledged before",
                f + 1
            );
            reads += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    eprintln!("{reads} linearizable follower reads, none stale");
    assert!(reads > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_the_majority_refuses_linearizable_reads() {
    let tc = start_cluster("partitioned_read", 62, 3).await.unwrap();
    let c = &tc.client;
    c.execute_one("CREATE TABLE kv (k int PRIMARY KEY, v text)", vec![])
        .await
        .unwrap();
    c.execute_one("INSERT INTO kv VALUES (1, 'a')", vec![])
        .await
        .unwrap();
    for isolate_leader in [false, true] {
        let leader = c.wait_for_leader(Duration::from_secs(30)).await.unwrap();
        let alone = if isolate_leader {
            leader
        } else {
            (1..=3).find(|id| *id != leader).unwrap()
        };
        let others: Vec<u64> = (1..=3).filter(|id| *id != alone).collect();
        eprintln!("isolating node {alone} (leader: {isolate_leader})");
        // Let the node catch up first, so that its LOCAL read below has the table.
        let w = c
            .execute_one("UPDATE kv SET v = v WHERE k = 1", vec![])
            .await
            .unwrap();
        c.query_node(
            (alone - 1) as usize,
            q("SELECT 1", Consistency::AtLeast, w.log_index),
        )
        .await
        .unwrap();
        for id in &others {
            assert!(tc.cluster.signal_node(*id, libc::SIGSTOP));
        }
        let r = c
            .query_node(
                (alone - 1) as usize,
                q("SELECT v FROM kv WHERE k = 1", Consistency::Linearizable, 0),
            )
            .await;
        // LOCAL still answers (and says how stale it may be).
        let local = c
            .query_node(
                (alone - 1) as usize,
                q("SELECT v FROM kv WHERE k = 1", Consistency::Local, 0),
            )
            .await;
        for id in &others {
            assert!(tc.cluster.signal_node(*id, libc::SIGCONT));
        }
        if let Ok(resp) = &r {
            let st = c.member_status((alone - 1) as usize, alone).await;
            panic!("a minority node served a linearizable read: {resp:?}; its status: {st:?}");
        }
        let e = r.expect_err("a minority node must not serve a linearizable read");
        assert!(
            matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
            "{e}"
        );
        assert!(local.is_ok(), "{local:?}");
        c.wait_for_leader(Duration::from_secs(30)).await.unwrap();
        c.execute_one("UPDATE kv SET v = v || 'x' WHERE k = 1", vec![])
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_results_stream_and_unary_reads_are_bounded() {
    let tc = start_cluster("stream_read", 63, 3).await.unwrap();
    let c = &tc.client;
    c.execute_one("CREATE TABLE big (id int PRIMARY KEY, pad text)", vec![])
        .await
        .unwrap();
    let w = c
        .execute_one("INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 150000) g ORDER BY g", vec![])
        .await
        .unwrap();
    // The unary API refuses more than its row limit (100,000 by default)...
    let e = c
        .query_node(1, q("SELECT * FROM big", Consistency::AtLeast, w.log_index))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    // ...the stream delivers all of it, in chunks.
    let (cols, rows, applied) = c
        .query_stream_node(
            1,
            q(
                "SELECT * FROM big ORDER BY id",
                Consistency::AtLeast,
                w.log_index,
            ),
        )
        .await
        .unwrap();
    assert_eq!(cols.len(), 2);
    assert_eq!(rows.len(), 150_000);
    assert!(applied >= w.log_index);
    assert_eq!(values::as_i64(&rows[149_999].values[0]), Some(150_000));
    // And a stream honours max_rows.
    let mut limited = q("SELECT * FROM big", Consistency::AtLeast, w.log_index);
    limited.max_rows = 1000;
    let e = c.query_stream_node(2, limited).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
}
