//! Read consistency: read-your-writes on any node, linearizable reads on followers under load,
//! a node cut off from the majority refusing linearizable reads, streamed large results, and
//! reads bounded in time (a stalled stream does not hold DDL up).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftpg_client::v1::read_client::ReadClient;
use raftpg_client::v1::{Consistency, QueryChunk, QueryRequest};
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
        let (stop, acked) = (stop.clone(), acked.clone());
        let w = tc.client_of(&tc.cluster.addrs());
        tokio::spawn(async move {
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
        // The CLI gives up within its --timeout and says why (issue 19: it used to keep
        // retrying without printing anything for minutes).
        if !isolate_leader {
            cli_gives_up(&tc, alone).await;
        }
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

/// `raftpg query --consistency linearizable` and `raftpg exec` against node `alone`, cut off
/// from its quorum, end within `--timeout` (+ a margin) with an error that says what happened;
/// the write's names its request id.
async fn cli_gives_up(tc: &testkit::TestCluster, alone: u64) {
    let credentials = tc
        .client_config()
        .credentials
        .expect("an authenticated cluster");
    let bin = raftpg_client::local_cluster::default_node_bin().with_file_name("raftpg");
    for args in [
        vec!["query", "--consistency", "linearizable", "SELECT 1"],
        vec!["exec", "UPDATE kv SET v = v WHERE k = 1"],
    ] {
        let started = Instant::now();
        let out = tokio::process::Command::new(&bin)
            .args(["--nodes", &tc.addr_of(alone), "--timeout", "4"])
            .arg("--certs")
            .arg(tc.certs().expect("a TLS cluster"))
            .args(&args)
            .env("RAFTPG_USER", &credentials.user)
            .env("RAFTPG_PASSWORD", &credentials.password)
            .output()
            .await
            .unwrap();
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(
            took < Duration::from_secs(12),
            "{args:?} took {took:?}: {stderr}"
        );
        assert!(stderr.contains("gave up after"), "{args:?}: {stderr}");
        if args[0] == "exec" {
            assert!(stderr.contains("request id"), "{args:?}: {stderr}");
        }
        eprintln!("{args:?} gave up in {took:?}: {}", stderr.trim());
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
    // ...the stream delivers all of it, in chunks (timeout_ms bounds the whole read: room for
    // 30 MB on a slow machine).
    let mut all = q(
        "SELECT * FROM big ORDER BY id",
        Consistency::AtLeast,
        w.log_index,
    );
    all.timeout_ms = 60_000;
    let t = Instant::now();
    let (cols, rows, applied) = c.query_stream_node(1, all).await.unwrap();
    eprintln!("streamed 150,000 rows in {:?}", t.elapsed());
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

/// The time bound of the stalled reads below (their `timeout_ms`).
const STALL_BOUND: Duration = Duration::from_secs(4);

/// Rows the stalled stream would produce if read to the end: far more than the chunk channel
/// and the HTTP/2 windows hold, so the node is left with rows it cannot send.
const STALL_SQL: &str =
    "SELECT w.id, g, repeat('x', 100) FROM wide w, generate_series(1, 5000000) g";

/// A QueryStream on node `node` (index into the addresses) that is read up to its first chunk
/// and then left unread, holding its read transaction's lock on `wide`.
async fn stalled_stream(
    tc: &testkit::TestCluster,
    node: u64,
    min_index: u64,
) -> tonic::Streaming<QueryChunk> {
    let mut client = ReadClient::new(tc.channel(node)).max_decoding_message_size(64 * 1024 * 1024);
    let mut req = q(STALL_SQL, Consistency::AtLeast, min_index);
    req.timeout_ms = STALL_BOUND.as_millis() as u32;
    let mut stream = client
        .query_stream(tc.request(req))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the stream's first chunk within 10 s")
        .unwrap()
        .expect("a first chunk");
    assert_eq!(first.columns.len(), 3);
    stream
}

/// Read sessions on node `id` holding a lock on table `wide`, read directly from PostgreSQL.
async fn reader_locks_on_wide(tc: &testkit::TestCluster, id: u64) -> i64 {
    let pg = tc.pg(id).await.unwrap();
    pg.query_one(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
         WHERE l.relation = 'public.wide'::regclass AND l.granted
           AND a.application_name = 'raftpg-reader'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Reads what is left of a stalled stream: it must end with DEADLINE_EXCEEDED before all rows.
async fn drain_stalled(node: u64, mut stream: tonic::Streaming<QueryChunk>) {
    let mut rows = 0usize;
    let ending = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => rows += chunk.rows.len(),
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await
    .expect("the rest of a stalled stream arrives within 30 s");
    let status = ending.unwrap_or_else(|| {
        panic!("node {node}: the stalled stream ended well after {rows} more rows")
    });
    assert_eq!(
        status.code(),
        Code::DeadlineExceeded,
        "node {node}: {status}"
    );
    assert!(
        rows < 5_000_000,
        "node {node}: the whole result was produced"
    );
    eprintln!("node {node}: stalled stream ended after {rows} more rows: {status}");
}

/// A QueryStream client that stops reading does not keep its read transaction: DDL through the
/// log (ALTER TABLE needs the lock every stalled stream holds, on every node, and the applier
/// waits for locks without a timeout) commits soon after the reads' bound, a write using the
/// new column commits and is applied on every node, and the stalled streams end with
/// DEADLINE_EXCEEDED. A unary read that runs too long ends the same way, and its PostgreSQL
/// statement stops with it. Read sessions carry server-side timeouts as a backstop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_stream_does_not_hold_ddl_beyond_the_read_bound() {
    let tc = start_cluster("stalled_stream", 91, 3).await.unwrap();
    let c = &tc.client;
    c.execute_one("CREATE TABLE wide (id int PRIMARY KEY)", vec![])
        .await
        .unwrap();
    let w = c
        .execute_one("INSERT INTO wide VALUES (1)", vec![])
        .await
        .unwrap();

    // The backstop: PostgreSQL itself ends read statements and idle read transactions.
    let r = c
        .query_node(
            0,
            q(
                "SELECT current_setting('statement_timeout'), current_setting('idle_in_transaction_session_timeout')",
                Consistency::Local,
                0,
            ),
        )
        .await
        .unwrap();
    for v in &r.rows[0].values {
        assert_eq!(values::as_str(v), Some("70s"), "{r:?}");
    }

    // A stalled stream on every node, each holding its lock on `wide`.
    let started = Instant::now();
    let mut stalled = Vec::new();
    for id in 1..=3u64 {
        stalled.push((id, stalled_stream(&tc, id, w.log_index).await));
    }
    for id in 1..=3u64 {
        assert!(
            reader_locks_on_wide(&tc, id).await >= 1,
            "node {id}: the stalled stream holds no lock on wide"
        );
    }

    // DDL needs every one of those locks gone (the leader's for the acknowledgement).
    let ddl = tokio::time::timeout(
        STALL_BOUND + Duration::from_secs(20),
        c.execute_one("ALTER TABLE wide ADD COLUMN extra int", vec![]),
    )
    .await
    .expect("the DDL commits within the read bound plus 20 s")
    .unwrap();
    let ddl_at = started.elapsed();
    eprintln!("DDL committed {ddl_at:?} after the streams started");
    assert!(
        ddl_at >= STALL_BOUND.saturating_sub(Duration::from_millis(200)),
        "the DDL committed after {ddl_at:?}, before the reads' bound: the stalled reads held nothing"
    );
    let canary = tokio::time::timeout(
        Duration::from_secs(15),
        c.execute_one("INSERT INTO wide (id, extra) VALUES (2, 7)", vec![]),
    )
    .await
    .expect("the canary write commits within 15 s")
    .unwrap();
    assert!(canary.log_index > ddl.log_index);
    for node in 0..3usize {
        let r = c
            .query_node(
                node,
                q(
                    "SELECT extra FROM wide WHERE id = 2",
                    Consistency::AtLeast,
                    canary.log_index,
                ),
            )
            .await
            .unwrap();
        assert_eq!(values::as_i64(&r.rows[0].values[0]), Some(7), "node {node}");
    }
    for id in 1..=3u64 {
        assert_eq!(reader_locks_on_wide(&tc, id).await, 0, "node {id}");
    }
    for (id, stream) in stalled {
        drain_stalled(id, stream).await;
    }

    // A unary read running past its bound ends with DEADLINE_EXCEEDED, and so does its
    // statement in PostgreSQL (the node closes the connection instead of reusing it).
    let mut slow = q("SELECT pg_sleep(30)::text", Consistency::Local, 0);
    slow.timeout_ms = 2_000;
    let t = Instant::now();
    let e = c.query_node(0, slow).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let pg = tc.pg(1).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running: i64 = pg
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = 'raftpg-reader' AND state = 'active' AND query LIKE '%pg_sleep(30)%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if running == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the abandoned pg_sleep still runs 10 s after its read ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The node still reads normally afterwards.
    let r = c
        .query_node(0, q("SELECT count(*) FROM wide", Consistency::Local, 0))
        .await
        .unwrap();
    assert_eq!(values::as_i64(&r.rows[0].values[0]), Some(2));
}
