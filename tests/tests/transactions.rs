//! Interactive transactions (issue 21, docs/transactions.md) over the PostgreSQL wire protocol,
//! with clients nobody here wrote: tokio-postgres (extended protocol), psql (simple protocol,
//! `ON_ERROR_ROLLBACK`-free scripts), psycopg (its implicit `BEGIN`). Every test ends with every
//! copy identical: a transaction's entry replays on the followers exactly as it ran on the
//! leader — the same rows, serial ids, `now()` and random draws.

use std::process::Command;
use std::time::{Duration, Instant};

use raftpg_client::local_cluster::metrics_addr_of;
use testkit::{http_get, metric, start_cluster, start_cluster_with};

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

async fn setup(c: &tokio_postgres::Client) {
    c.batch_execute(
        "CREATE TABLE acct (id int PRIMARY KEY, bal int NOT NULL CHECK (bal >= 0));
         INSERT INTO acct VALUES (1, 100), (2, 100);
         CREATE TABLE ids (id serial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(),
                           r float8 NOT NULL DEFAULT random(), note text)",
    )
    .await
    .unwrap();
}

/// Runs `script` with psql through node `id`; its output.
fn psql_script(tc: &testkit::TestCluster, id: u64, script: &str) -> std::process::Output {
    Command::new("psql")
        .args(["-X", "-d", &tc.conninfo(id)])
        .envs(tc.libpq_env())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(script.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap()
}

/// Sends `data` through `copy` (a `COPY … FROM STDIN`); the rows it reports copied.
async fn copy_rows(c: &tokio_postgres::Client, copy: &str, data: String) -> u64 {
    use futures::SinkExt;
    let sink = c.copy_in(copy).await.unwrap();
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    sink.finish().await.unwrap()
}

/// The notes of table `ids` in node `id`'s copy, in id order.
async fn notes(tc: &testkit::TestCluster, id: u64) -> Vec<String> {
    tc.column(id, "SELECT note FROM ids ORDER BY id")
        .await
        .unwrap()
}

/// A read-then-write transaction through tokio-postgres (extended protocol) on the leader and
/// on a follower: what it read, its own writes, serial ids, `now()` (the transaction's
/// timestamp for every statement) and random draws are what every copy holds afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_then_write_transactions_through_leader_and_follower() {
    let tc = start_cluster("txn_read_write", 141, 3).await.unwrap();
    let (leader, follower) = tc.leader_and_follower().await;
    for node in [leader, follower] {
        let mut c = tc.wire(node).await.unwrap();
        if node == leader {
            setup(&c).await;
        }
        let tx = c.transaction().await.unwrap();
        let bal: i32 = tx
            .query_one("SELECT bal FROM acct WHERE id = $1 FOR UPDATE", &[&1i32])
            .await
            .unwrap()
            .get(0);
        tx.execute("UPDATE acct SET bal = $1 WHERE id = 1", &[&(bal - 10)])
            .await
            .unwrap();
        tx.execute("UPDATE acct SET bal = bal + 10 WHERE id = 2", &[])
            .await
            .unwrap();
        // A table it creates is described on its session (relayed from a follower).
        let table = format!("made_on_{node}");
        tx.batch_execute(&format!("CREATE TABLE {table} (k int)"))
            .await
            .unwrap();
        tx.execute(
            &format!("INSERT INTO {table} VALUES ($1)"),
            &[&(node as i32)],
        )
        .await
        .unwrap();
        // Its own writes are visible to it.
        let mine: i32 = tx
            .query_one("SELECT bal FROM acct WHERE id = 1", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(mine, bal - 10);
        let row = tx
            .query_one(
                "INSERT INTO ids (note) VALUES ($1) RETURNING id, at, r, now() = at",
                &[&format!("via {node}")],
            )
            .await
            .unwrap();
        let (id, r): (i32, f64) = (row.get(0), row.get(2));
        assert!(
            row.get::<_, bool>(3),
            "now() is the transaction's timestamp"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        let later: bool = tx
            .query_one("SELECT now() = at FROM ids WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert!(
            later,
            "now() stays the transaction's timestamp across statements"
        );
        tx.commit().await.unwrap();
        // Committed: every node has it (once applied there), with the values the client saw.
        for n in 1..=3 {
            let sql = format!("SELECT r FROM ids WHERE id = {id}");
            let deadline = Instant::now() + Duration::from_secs(10);
            let got: Vec<f64> = loop {
                let got: Vec<f64> = tc.column(n, &sql).await.unwrap();
                if !got.is_empty() || Instant::now() > deadline {
                    break got;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            assert_eq!(got, vec![r], "node {n}");
        }
    }
    let bals: Vec<i32> = tc
        .column(leader, "SELECT bal FROM acct ORDER BY id")
        .await
        .unwrap();
    assert_eq!(bals, vec![80, 120]);
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
}

/// Errors inside a transaction: the failed state (25P02 until ROLLBACK), ROLLBACK TO
/// SAVEPOINT leaving it, a deferred constraint failing at COMMIT, and a rolled-back
/// transaction leaving nothing behind — on every copy, sequences included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_statements_savepoints_and_rollback() {
    let tc = start_cluster("txn_errors", 142, 3).await.unwrap();
    let (leader, _) = tc.leader_and_follower().await;
    let mut c = tc.wire(leader).await.unwrap();
    setup(&c).await;
    c.batch_execute(
        "CREATE TABLE parent (id int PRIMARY KEY);
         CREATE TABLE child (id int PRIMARY KEY, p int REFERENCES parent DEFERRABLE INITIALLY DEFERRED)",
    )
    .await
    .unwrap();

    // A failed statement: everything else refused until ROLLBACK; nothing of it stays.
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO ids (note) VALUES ('gone')", &[])
        .await
        .unwrap();
    let e = tx
        .execute("UPDATE acct SET bal = bal - 1000 WHERE id = 1", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "23514");
    let e = tx.execute("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02");
    tx.rollback().await.unwrap();
    assert_eq!(
        tc.column::<i64>(leader, "SELECT count(*) FROM ids")
            .await
            .unwrap(),
        vec![0]
    );

    // Savepoints: the failed statement is undone by ROLLBACK TO, the rest commits.
    c.batch_execute("BEGIN; INSERT INTO ids (note) VALUES ('a'); SAVEPOINT s1")
        .await
        .unwrap();
    let e = c
        .batch_execute("INSERT INTO acct VALUES (1, 5)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "23505");
    c.batch_execute("ROLLBACK TO SAVEPOINT s1; INSERT INTO ids (note) VALUES ('b'); SAVEPOINT s2; INSERT INTO ids (note) VALUES ('c'); ROLLBACK TO s2; RELEASE s1")
        .await
        .unwrap();
    let e = c.batch_execute("ROLLBACK TO nosuch").await.unwrap_err();
    assert_eq!(sqlstate(&e), "3B001");
    // COMMIT of a failed transaction rolls it back.
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        tc.column::<i64>(leader, "SELECT count(*) FROM ids")
            .await
            .unwrap(),
        vec![0]
    );
    c.batch_execute("BEGIN; INSERT INTO ids (note) VALUES ('a'); SAVEPOINT s1; INSERT INTO ids (note) VALUES ('x'); ROLLBACK TO s1; INSERT INTO ids (note) VALUES ('b'); COMMIT")
        .await
        .unwrap();
    assert_eq!(notes(&tc, leader).await, vec!["a", "b"]);

    // A deferred foreign key fires at COMMIT: the COMMIT fails, nothing is written. (Its
    // entry is in the log — the leader proposes before the transaction's end runs — and every
    // copy records the failure; the serial value it drew stays drawn on every copy, checked
    // below.)
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO ids (note) VALUES ('fk')", &[])
        .await
        .unwrap();
    tx.execute("INSERT INTO child VALUES (1, 7)", &[])
        .await
        .unwrap();
    let e = tx.commit().await.unwrap_err();
    assert_eq!(sqlstate(&e), "23503");
    assert_eq!(
        tc.column::<i64>(leader, "SELECT count(*) FROM ids WHERE note = 'fk'")
            .await
            .unwrap(),
        vec![0]
    );
    // ... and satisfied before COMMIT, it commits.
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO child VALUES (1, 7)", &[])
        .await
        .unwrap();
    tx.execute("INSERT INTO parent VALUES (7)", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        tc.column::<i64>(leader, "SELECT count(*) FROM child")
            .await
            .unwrap(),
        vec![1]
    );
    // A migration: a table created in the transaction is used at once with parameters (the
    // extended protocol describes each statement first: inside the transaction it sees the
    // table). A statement PostgreSQL cannot prepare fails the transaction, as Parse does.
    let tx = c.transaction().await.unwrap();
    tx.batch_execute("CREATE TABLE migrated (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    tx.execute("INSERT INTO migrated VALUES ($1, $2)", &[&1i32, &"one"])
        .await
        .unwrap();
    let v: String = tx
        .query_one("SELECT v FROM migrated WHERE id = $1", &[&1i32])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "one");
    tx.commit().await.unwrap();
    let tx = c.transaction().await.unwrap();
    let e = tx
        .execute("INSERT INTO nosuch VALUES ($1)", &[&1i32])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42P01");
    let e = tx.execute("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02");
    tx.rollback().await.unwrap();
    assert_eq!(
        tc.column::<String>(leader, "SELECT v FROM migrated")
            .await
            .unwrap(),
        vec!["one".to_string()]
    );

    // A new serial id after all those rolled back statements is the same on every copy.
    c.batch_execute("INSERT INTO ids (note) VALUES ('after')")
        .await
        .unwrap();
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
}

/// Concurrent transfers by several clients, each a read-then-write transaction: they run one
/// at a time at their position in the log, so no update is lost and the total never changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_read_modify_write_transactions_lose_no_update() {
    let tc = start_cluster("txn_concurrent", 143, 3).await.unwrap();
    let (leader, follower) = tc.leader_and_follower().await;
    setup(&tc.wire(leader).await.unwrap()).await;
    let mut tasks = Vec::new();
    for k in 0..6u64 {
        let node = if k % 2 == 0 { leader } else { follower };
        let mut c = tc.wire(node).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            for i in 0..10 {
                let (from, to) = if (k + i) % 2 == 0 { (1, 2) } else { (2, 1) };
                let tx = c.transaction().await.unwrap();
                let bal: i32 = tx
                    .query_one("SELECT bal FROM acct WHERE id = $1", &[&from])
                    .await
                    .unwrap()
                    .get(0);
                if bal >= 3 {
                    tx.execute(
                        "UPDATE acct SET bal = $1 WHERE id = $2",
                        &[&(bal - 3), &from],
                    )
                    .await
                    .unwrap();
                    let to_bal: i32 = tx
                        .query_one("SELECT bal FROM acct WHERE id = $1", &[&to])
                        .await
                        .unwrap()
                        .get(0);
                    tx.execute(
                        "UPDATE acct SET bal = $1 WHERE id = $2",
                        &[&(to_bal + 3), &to],
                    )
                    .await
                    .unwrap();
                    tx.execute("INSERT INTO ids (note) VALUES ('transfer')", &[])
                        .await
                        .unwrap();
                }
                tx.commit().await.unwrap();
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 60);
    let sum: Vec<i64> = tc
        .column(leader, "SELECT sum(bal) FROM acct")
        .await
        .unwrap();
    assert_eq!(sum, vec![200], "the total never changes");
    // Transactions ran on top of the previous one's entry while Raft committed it (the
    // chain).
    let (_, body) = http_get(&metrics_addr_of(&tc.addr_of(leader)), "/metrics")
        .await
        .unwrap();
    let chained = metric(&body, "raftpg_transaction_begins_total{how=\"chained\"}");
    assert!(
        chained.unwrap_or(0.0) > 0.0,
        "no chained transaction:\n{body}"
    );
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
}

/// A chain whose entry below is committed by Raft while the transaction on top of it is still
/// open: the entry below is answered at once and committed in PostgreSQL later with what runs
/// on top — at the latest at the deferral bound (20 ms), when the transaction on top is rolled
/// back, the entry below committed, and the transaction on top run again on it. So a read of
/// the entry below never waits for the transaction on top to end, and that transaction still
/// commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deferred_entry_is_committed_while_the_transaction_on_top_stays_open() {
    let tc = start_cluster("txn_deferred", 148, 3).await.unwrap();
    let (leader, _) = tc.leader_and_follower().await;
    setup(&tc.wire(leader).await.unwrap()).await;
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let a = tc.wire(leader).await.unwrap();
    let b = tc.wire(leader).await.unwrap();
    let reader = tc.wire(leader).await.unwrap();
    let reruns = |body: &str| {
        metric(body, "raftpg_transaction_reruns_total{result=\"same\"}").unwrap_or(0.0)
    };
    let metrics = || async {
        http_get(&metrics_addr_of(&tc.addr_of(leader)), "/metrics")
            .await
            .unwrap()
            .1
    };
    let reruns_before = reruns(&metrics().await);

    // A's entry cannot commit while the followers are stopped; B begins on top of it. (A
    // whole `BEGIN … COMMIT` string would be one plain write, which holds the writer until
    // it is answered.)
    a.batch_execute("BEGIN; INSERT INTO ids (note) VALUES ('a')")
        .await
        .unwrap();
    for id in &followers {
        assert!(tc.cluster.signal_node(*id, libc::SIGSTOP));
    }
    let committed_a = tokio::spawn(async move { a.batch_execute("COMMIT").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let begun = tokio::time::timeout(
        Duration::from_secs(5),
        b.batch_execute("BEGIN; INSERT INTO ids (note) VALUES ('b')"),
    )
    .await;
    for id in &followers {
        assert!(tc.cluster.signal_node(*id, libc::SIGCONT));
    }
    begun
        .expect("B waited for A's commit instead of running on top of it")
        .unwrap();
    committed_a.await.unwrap().unwrap();

    // A is committed and answered; B is still open. A read of A's row waits only for the
    // deferral bound, not for B.
    let started = Instant::now();
    let n: i64 = reader
        .query_one("SELECT count(*) FROM ids WHERE note = 'a'", &[])
        .await
        .unwrap()
        .get(0);
    let waited = started.elapsed();
    assert_eq!(n, 1, "the read missed A's committed row");
    assert!(
        waited < Duration::from_millis(1500),
        "the read waited {waited:?} for the transaction on top"
    );
    // B ran again on the committed entry, and commits.
    assert!(
        reruns(&metrics().await) > reruns_before,
        "the transaction on top was not run again on the committed entry"
    );
    b.batch_execute("INSERT INTO ids (note) VALUES ('b2'); COMMIT")
        .await
        .unwrap();
    assert_eq!(notes(&tc, leader).await, vec!["a", "b", "b2"]);
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
}

/// The limits: an idle transaction is rolled back after `--txn-idle-max-ms` (its next
/// statement gets 25P03, then 25P02 until ROLLBACK), a write waiting behind it then runs, a
/// client that disconnects mid-transaction releases the writer at once, and a transaction's
/// statements may hold at most `--txn-bytes-max` bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_and_abandoned_transactions_release_the_writer() {
    let tc = start_cluster_with(
        "txn_limits",
        144,
        3,
        &[
            "--txn-idle-max-ms",
            "700",
            "--txn-time-max-ms",
            "2500",
            "--txn-bytes-max",
            "100000",
        ],
    )
    .await
    .unwrap();
    let (leader, follower) = tc.leader_and_follower().await;
    let c = tc.wire(leader).await.unwrap();
    setup(&c).await;
    c.batch_execute("BEGIN; UPDATE acct SET bal = 0 WHERE id = 1")
        .await
        .unwrap();
    // A write through another node waits behind the open transaction, then runs.
    let other = tc.wire(follower).await.unwrap();
    let started = Instant::now();
    other
        .batch_execute("UPDATE acct SET bal = bal + 1 WHERE id = 2")
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "waited only {waited:?}"
    );
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P03");
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        tc.column::<i32>(leader, "SELECT bal FROM acct ORDER BY id")
            .await
            .unwrap(),
        vec![100, 101]
    );

    // A client that goes away mid-transaction (dropping the client closes its connection).
    let gone = tc.wire(leader).await.unwrap();
    gone.batch_execute("BEGIN; UPDATE acct SET bal = 0 WHERE id = 2")
        .await
        .unwrap();
    drop(gone);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    c.batch_execute("UPDATE acct SET bal = bal + 1 WHERE id = 1")
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "the abandoned transaction held the writer for {:?}",
        started.elapsed()
    );
    assert_eq!(
        tc.column::<i32>(leader, "SELECT bal FROM acct ORDER BY id")
            .await
            .unwrap(),
        vec![101, 101]
    );

    // A statement still running at the transaction's time limit is cancelled: the writer is
    // free at the limit, not when the statement would have ended (minutes later).
    c.batch_execute("BEGIN").await.unwrap();
    let started = Instant::now();
    let e = c
        .batch_execute(
            "UPDATE acct SET bal = bal + 1 \
             WHERE (SELECT count(*) FROM generate_series(1, 4000000000)) > 0",
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "25P04", "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the statement ran {:?} past the limit",
        started.elapsed()
    );
    c.batch_execute("ROLLBACK").await.unwrap();
    let started = Instant::now();
    other
        .batch_execute("UPDATE acct SET bal = bal + 1 WHERE id = 2")
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "the writer was free only after {:?}",
        started.elapsed()
    );
    assert_eq!(
        tc.column::<i32>(leader, "SELECT bal FROM acct ORDER BY id")
            .await
            .unwrap(),
        vec![101, 102]
    );

    // A committed transaction is one log entry, which must fit in one Raft message: the
    // statement that would take a transaction past --txn-bytes-max fails it (54000).
    let note = "x".repeat(30_000);
    let insert = "INSERT INTO ids (note) VALUES ($1)";
    c.batch_execute("BEGIN").await.unwrap();
    for _ in 0..3 {
        c.execute(insert, &[&note]).await.unwrap();
    }
    let e = c.execute(insert, &[&note]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "54000", "{e}");
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.execute(insert, &[&note]).await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        tc.column::<i64>(
            leader,
            "SELECT count(*) FROM ids WHERE length(note) = 30000"
        )
        .await
        .unwrap(),
        vec![1]
    );
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
}

/// psql scripts (simple protocol) and psycopg (whose connections open a transaction
/// implicitly) through a follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn psql_and_psycopg_transactions() {
    let tc = start_cluster("txn_clients", 145, 3).await.unwrap();
    let (leader, follower) = tc.leader_and_follower().await;
    setup(&tc.wire(leader).await.unwrap()).await;
    let script = "\\set ON_ERROR_STOP 1
BEGIN;
SELECT bal FROM acct WHERE id = 1 \\gset
UPDATE acct SET bal = :bal - 5 WHERE id = 1;
INSERT INTO ids (note) VALUES ('psql') RETURNING id;
SAVEPOINT a;
\\set ON_ERROR_STOP 0
INSERT INTO acct VALUES (1, 1);
\\set ON_ERROR_STOP 1
ROLLBACK TO a;
COMMIT;
SELECT bal FROM acct WHERE id = 1;
";
    let out = Command::new("psql")
        .args(["-X", "-d", &tc.conninfo(follower), "-c", "SELECT 1"])
        .envs(tc.libpq_env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = psql_script(&tc, follower, script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(" 95\n"), "{stdout}");
    assert!(stderr.contains("duplicate key"), "{stderr}");

    let python = testkit::python_with_psycopg();
    let py = r#"
import sys
import psycopg
with psycopg.connect(sys.argv[1]) as c:
    bal = c.execute("SELECT bal FROM acct WHERE id = 2").fetchone()[0]
    c.execute("UPDATE acct SET bal = %s WHERE id = 2", (bal + 5,))
    (i,) = c.execute("INSERT INTO ids (note) VALUES ('psycopg') RETURNING id").fetchone()
    c.commit()
    try:
        c.execute("INSERT INTO acct VALUES (2, 0)")
        raise SystemExit("duplicate accepted")
    except psycopg.errors.UniqueViolation:
        c.rollback()
    with c.transaction():
        c.execute("UPDATE acct SET bal = bal - 1 WHERE id = 2")
        with c.transaction():
            c.execute("UPDATE acct SET bal = bal - 100 WHERE id = 2")
            raise psycopg.Rollback()
print("ok")
"#;
    let out = Command::new(python)
        .args(["-c", py, &tc.conninfo(follower)])
        .envs(tc.libpq_env())
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        tc.column::<i32>(leader, "SELECT bal FROM acct ORDER BY id")
            .await
            .unwrap(),
        vec![95, 104]
    );

    // COPY FROM STDIN inside a transaction block: its rows are statements of the transaction
    // (into a table it created); a COPY that fails fails the block.
    let copy_script = "\\set ON_ERROR_STOP 1
BEGIN;
CREATE TABLE copied (id int PRIMARY KEY, v text);
COPY copied FROM STDIN;
1\tone
2\ttwo
\\.
SELECT count(*) AS in_block FROM copied;
COMMIT;
BEGIN;
\\set ON_ERROR_STOP 0
COPY copied FROM STDIN;
3\tthree
1\tagain
\\.
\\set ON_ERROR_STOP 1
ROLLBACK;
";
    let out = psql_script(&tc, follower, copy_script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("in_block") && stdout.contains("        2\n"),
        "{stdout}"
    );
    assert!(stderr.contains("duplicate key"), "{stderr}");
    // A COPY of several batches (each a statement of the transaction), with tokio-postgres.
    let c = tc.wire(follower).await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    let rows: String = (10..5010)
        .map(|i| format!("{i},{}\n", "v".repeat(90)))
        .collect();
    let copy = "COPY copied (id, v) FROM STDIN WITH (FORMAT csv)";
    assert_eq!(copy_rows(&c, copy, rows).await, 5000);
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        tc.column::<i64>(leader, "SELECT count(*) FROM copied")
            .await
            .unwrap(),
        vec![5002]
    );
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
}

/// Runs transaction `id` (a transfer of 1 and a row noting it) through `node`, retrying by its
/// id (`raftpg.transaction_id`) until it is known to have committed exactly once: a retry's
/// `BEGIN` answers RP003 when an earlier attempt committed. Returns the attempts made.
async fn transfer_exactly_once(tc: &testkit::TestCluster, node: u64, id: &str) -> usize {
    let mut attempts = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "transaction {id} never settled");
        attempts += 1;
        let Ok(c) = tc.wire(node).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let begun = c
            .batch_execute(&format!("SET raftpg.transaction_id = '{id}'; BEGIN"))
            .await;
        match begun {
            Err(e) if sqlstate(&e) == "RP003" => return attempts,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Ok(()) => {}
        }
        let body = c
            .batch_execute(&format!(
                "UPDATE acct SET bal = bal + 1 WHERE id = 1; INSERT INTO ids (note) VALUES ('{id}')"
            ))
            .await;
        if body.is_ok() && c.batch_execute("COMMIT").await.is_ok() {
            return attempts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The leader killed in the middle of a transaction (nothing of it stays) and right after a
/// COMMIT was sent (through a follower, which relays it): the client retries by the
/// transaction's id and it is applied exactly once, on every copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_killed_mid_transaction_and_at_commit() {
    let mut tc = start_cluster("txn_leader_killed", 146, 3).await.unwrap();
    let (leader, _) = tc.leader_and_follower().await;
    setup(&tc.wire(leader).await.unwrap()).await;

    // Mid-transaction: the client's connection to the leader goes; nothing of it stays.
    let c = tc.wire(leader).await.unwrap();
    c.batch_execute(
        "BEGIN; UPDATE acct SET bal = 0 WHERE id = 2; INSERT INTO ids (note) VALUES ('lost')",
    )
    .await
    .unwrap();
    tc.cluster.kill_node(leader);
    assert!(c.batch_execute("COMMIT").await.is_err());
    let (second, _) = tc.leader_and_follower().await;
    assert_ne!(second, leader);
    tc.cluster.start_node(leader).unwrap();

    // At COMMIT: sent through a survivor that relays it to the leader, which is killed a few
    // milliseconds later (before or after its entry reached a majority).
    let mut committed = 0;
    for (k, delay_ms) in [0u64, 1, 2, 4].into_iter().enumerate() {
        let (leader_now, _) = tc.leader_and_follower().await;
        let via = (1..=3).find(|n| *n != leader_now).unwrap();
        // It may be the node restarted last, still starting.
        let deadline = Instant::now() + Duration::from_secs(30);
        let c = loop {
            match tc.wire(via).await {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => panic!("node {via}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let id = format!("killed-at-commit-{k}");
        c.batch_execute(&format!(
            "SET raftpg.transaction_id = '{id}'; BEGIN; UPDATE acct SET bal = bal + 1 WHERE id = 1; INSERT INTO ids (note) VALUES ('{id}')"
        ))
        .await
        .unwrap();
        let commit = tokio::spawn(async move { c.batch_execute("COMMIT").await });
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        tc.cluster.kill_node(leader_now);
        let first = commit.await.unwrap();
        tc.cluster.start_node(leader_now).unwrap();
        if let Err(e) = &first {
            let attempts = transfer_exactly_once(&tc, via, &id).await;
            eprintln!(
                "{id}: COMMIT failed ({}: {e}); settled after {attempts} more attempt(s)",
                sqlstate(e)
            );
        }
        committed += 1;
    }
    let (leader_now, _) = tc.leader_and_follower().await;
    let notes: Vec<String> = tc
        .column(leader_now, "SELECT note FROM ids ORDER BY note")
        .await
        .unwrap();
    let expected: Vec<String> = (0..committed)
        .map(|k| format!("killed-at-commit-{k}"))
        .collect();
    // Read through the wire (linearizable) so the answer includes every committed entry.
    let c = tc.wire(leader_now).await.unwrap();
    let rows = c
        .query("SELECT note FROM ids ORDER BY note", &[])
        .await
        .unwrap();
    let got: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        got, expected,
        "each transaction exactly once (direct read: {notes:?})"
    );
    let bal: i32 = c
        .query_one("SELECT bal FROM acct WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(bal, 100 + committed);
    let bal2: i32 = c
        .query_one("SELECT bal FROM acct WHERE id = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(bal2, 100, "the transaction cut off mid-way left nothing");
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
}

/// The gRPC `Transaction` service through the client library: begin on any node (a
/// follower relays), statements with their results, commit; a second `Begin` with the id of a
/// committed transaction answers ALREADY_EXISTS (RP003); an id no transaction has is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_transactions_by_id() {
    use raftpg_client::{v1::RequestId, values};
    let tc = start_cluster("txn_grpc", 147, 3).await.unwrap();
    let (leader, follower) = tc.leader_and_follower().await;
    setup(&tc.wire(leader).await.unwrap()).await;
    let via_follower = tc.client_of(&[tc.addr_of(follower)]);
    let id = RequestId {
        client_id: "grpc-test".into(),
        seq: 7,
    };
    let txn = via_follower.begin_with_id(id.clone()).await.unwrap();
    let r = txn
        .execute("SELECT bal FROM acct WHERE id = $1", vec![values::int(1)])
        .await
        .unwrap();
    assert_eq!(values::as_i64(&r.rows[0].values[0]), Some(100));
    txn.execute(
        "UPDATE acct SET bal = bal - 7 WHERE id = $1",
        vec![values::int(1)],
    )
    .await
    .unwrap();
    let e = txn
        .execute("SELECT nosuch FROM acct", vec![])
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate().as_deref(), Some("42703"));
    let e = txn.execute("SELECT 1", vec![]).await.unwrap_err();
    assert_eq!(e.sqlstate().as_deref(), Some("25P02"));
    // COMMIT of a failed transaction rolls it back.
    let c = txn.commit().await.unwrap();
    assert!(!c.committed);
    let txn = via_follower.begin_with_id(id.clone()).await.unwrap();
    txn.execute("UPDATE acct SET bal = bal - 7 WHERE id = 1", vec![])
        .await
        .unwrap();
    let c = txn.commit().await.unwrap();
    assert!(c.committed && c.log_index > 0);
    // Beginning again with that id says it committed.
    let e = match tc.client.begin_with_id(id).await {
        Ok(_) => panic!("a committed transaction's id began again"),
        Err(e) => e,
    };
    assert_eq!(e.sqlstate().as_deref(), Some("RP003"), "{e}");
    // An id no transaction has is refused (ABORTED: retry the transaction).
    let mut raw = raftpg_client::v1::transaction_client::TransactionClient::new(tc.channel(leader));
    let e = raw
        .execute(tc.request(raftpg_client::v1::TxnStatementRequest {
            txn_id: format!("{leader}.nosuch"),
            statement: Some(raftpg_client::v1::Statement {
                sql: "SELECT 1".into(),
                params: vec![],
            }),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}");
    assert_eq!(
        tc.column::<i32>(leader, "SELECT bal FROM acct WHERE id = 1")
            .await
            .unwrap(),
        vec![93]
    );
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
}

/// A `SET` inside a transaction block takes effect at once, for the transaction's own
/// statements too, stays after `COMMIT`, and is undone by a rollback of the block or to a
/// savepoint made before it, as in PostgreSQL (drivers that open a transaction before every
/// statement, such as psycopg, send their `SET`s inside one). What the transactions wrote
/// under those settings is the same on every copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settings_changed_inside_a_transaction_block() {
    let tc = start_cluster("txn_settings", 151, 3).await.unwrap();
    let (leader, follower) = tc.leader_and_follower().await;
    let c = tc.wire(follower).await.unwrap();
    c.batch_execute(
        "CREATE SCHEMA game;
         CREATE TABLE game.t (id int PRIMARY KEY, at text);
         CREATE TABLE public.t (id int PRIMARY KEY, at text)",
    )
    .await
    .unwrap();
    let show = |name: &'static str| {
        let c = &c;
        async move {
            let messages = c.simple_query(&format!("SHOW {name}")).await.unwrap();
            let row = messages.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            });
            row.unwrap_or_else(|| panic!("SHOW {name} returned no row"))
        }
    };
    let run = |sql: &'static str| {
        let c = &c;
        async move {
            c.simple_query(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        }
    };
    let midnight = "INSERT INTO t VALUES ($1, '2024-01-01 00:00:00+00'::timestamptz::text)";

    // Applied to the block's own statements, kept after COMMIT.
    run("BEGIN").await;
    run("SET search_path TO game").await;
    run("SET TIME ZONE 'Asia/Tokyo'").await;
    c.execute(midnight, &[&1i32]).await.unwrap();
    let seen: String = c
        .query_one("SELECT at FROM t WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, "2024-01-01 09:00:00+09");
    run("COMMIT").await;
    assert_eq!(show("TimeZone").await, "Asia/Tokyo");
    assert!(show("search_path").await.contains("game"));

    // Undone by ROLLBACK TO a savepoint made before it, and by ROLLBACK.
    run("BEGIN").await;
    run("SET TIME ZONE 'UTC'").await;
    run("SAVEPOINT s").await;
    run("SET search_path TO public").await;
    c.execute(midnight, &[&2i32]).await.unwrap();
    run("ROLLBACK TO SAVEPOINT s").await;
    assert!(show("search_path").await.contains("game"));
    c.execute(midnight, &[&3i32]).await.unwrap();
    run("COMMIT").await;
    assert_eq!(show("TimeZone").await, "UTC");
    run("BEGIN").await;
    run("SET TIME ZONE 'America/New_York'").await;
    c.execute(midnight, &[&4i32]).await.unwrap();
    run("ROLLBACK").await;
    assert_eq!(show("TimeZone").await, "UTC");

    // A refused SET fails the block, as any error in it does.
    run("BEGIN").await;
    let e = c
        .simple_query("SET TIME ZONE 'Not/AZone'")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "22023", "{e}");
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02", "{e}");
    run("ROLLBACK").await;
    assert_eq!(show("TimeZone").await, "UTC");

    let rows = |sql: &'static str| tc.column::<String>(leader, sql);
    assert_eq!(
        rows("SELECT id || ' ' || at FROM game.t ORDER BY id")
            .await
            .unwrap(),
        vec!["1 2024-01-01 09:00:00+09", "3 2024-01-01 00:00:00+00"]
    );
    assert!(rows("SELECT id::text FROM public.t")
        .await
        .unwrap()
        .is_empty());
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
}

/// A transaction of many megabytes is one log entry that takes longer to send and store than
/// a heartbeat interval (openraft's limit for an AppendEntries): the transport allows for its
/// size, so it commits — before, it was sent again and again and no write after it committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_larger_than_a_heartbeat_can_carry_commits() {
    let tc = start_cluster_with(
        "txn_large",
        152,
        3,
        &["--heartbeat-ms", "20", "--txn-bytes-max", "40000000"],
    )
    .await
    .unwrap();
    let (leader, follower) = tc.leader_and_follower().await;
    let c = tc.wire(leader).await.unwrap();
    c.batch_execute("CREATE TABLE bulk (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    let rows: String = (0..100_000)
        .map(|i| format!("{i}\t{}\n", "v".repeat(60)))
        .collect();
    assert_eq!(copy_rows(&c, "COPY bulk FROM STDIN", rows).await, 100_000);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), c.batch_execute("COMMIT"))
        .await
        .expect("COMMIT of the large transaction never returned")
        .unwrap();
    eprintln!("COMMIT took {:?}", started.elapsed());
    // The cluster goes on writing, and every copy has the rows.
    let other = tc.wire(follower).await.unwrap();
    other
        .batch_execute("INSERT INTO bulk VALUES (-1, 'after')")
        .await
        .unwrap();
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
    assert_eq!(
        tc.column::<i64>(follower, "SELECT count(*) FROM bulk")
            .await
            .unwrap(),
        vec![100_001]
    );
}
