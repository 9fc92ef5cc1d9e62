//! Copies that never diverge: exactly-once retries under leader kills, and `raftpg check`
//! finding a divergence made on purpose.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raftpg_client::v1::write_client::WriteClient;
use raftpg_client::v1::{ExecuteRequest, RequestId, Statement};
use raftpg_client::{Client, ClientConfig};
use testkit::{start_cluster, values};

/// `raftpg check` reports identical copies, then names the table and node of a divergence
/// created by writing directly to one node's PostgreSQL; the CLI exits non-zero; a role
/// or a privilege changed on one node is a divergence too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_finds_a_divergence_and_names_table_and_node() {
    let tc = start_cluster("check", 21, 3).await.unwrap();
    let c = &tc.client;
    c.execute_one(
        "CREATE TABLE scores (id serial PRIMARY KEY, player text, points int)",
        vec![],
    )
    .await
    .unwrap();
    c.execute_one("CREATE TABLE quiet (id int PRIMARY KEY)", vec![])
        .await
        .unwrap();
    for i in 0..20 {
        c.execute_one(
            "INSERT INTO scores (player, points) VALUES ($1, $2)",
            vec![values::text(format!("p{i}")), values::int(i)],
        )
        .await
        .unwrap();
    }
    let r = c.check(Duration::from_secs(30)).await.unwrap();
    assert!(r.identical, "{r:?}");
    assert_eq!(r.nodes.len(), 3);
    let scores = r.nodes[0]
        .tables
        .iter()
        .find(|t| t.name == "public.scores")
        .unwrap();
    assert_eq!(scores.rows, 20);
    assert!(
        r.nodes[0]
            .tables
            .iter()
            .any(|t| t.name == "sequence public.scores_id_seq" && t.hash == "20/true"),
        "{r:?}"
    );

    // Diverge node 2 behind raftpg's back.
    let pg = tc.pg(2).await.unwrap();
    pg.execute("UPDATE scores SET points = points + 1 WHERE id = 7", &[])
        .await
        .unwrap();
    let r = c.check(Duration::from_secs(30)).await.unwrap();
    assert!(!r.identical);
    assert_eq!(r.differences.len(), 1, "{r:?}");
    assert!(
        r.differences[0].starts_with("public.scores: node 2 has"),
        "{:?}",
        r.differences
    );

    // The CLI prints the report and exits 1.
    let credentials = tc
        .client_config()
        .credentials
        .expect("an authenticated cluster");
    let bin = raftpg_client::local_cluster::default_node_bin().with_file_name("raftpg");
    let out = std::process::Command::new(bin)
        .args(["--nodes", &tc.cluster.addrs().join(","), "check"])
        .arg("--certs")
        .arg(tc.certs().expect("a TLS cluster"))
        .env("RAFTPG_USER", &credentials.user)
        .env("RAFTPG_PASSWORD", &credentials.password)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("DIVERGENCE public.scores: node 2"),
        "{stdout}"
    );

    // Roles are part of every copy: a role changed behind raftpg's back on node 3 alone is a
    // divergence named "roles" (the tables' one is still there).
    c.execute_one(
        "CREATE ROLE checked_role LOGIN PASSWORD 'pw-checked'",
        vec![],
    )
    .await
    .unwrap();
    let r = c.check(Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.differences.len(), 1, "{r:?}");
    changed_behind_raftpg(
        &tc,
        3,
        "ALTER ROLE checked_role CONNECTION LIMIT 7",
        2,
        "roles",
    )
    .await;
    // So are privileges: a grant made on node 1 alone.
    changed_behind_raftpg(
        &tc,
        1,
        "GRANT SELECT ON quiet TO checked_role",
        3,
        "privileges",
    )
    .await;
}

/// Issue 18: a node whose copy was changed behind raftpg's back (as a superuser, directly in
/// its PostgreSQL) is found by `raftpg check`, told, and refuses reads (XX001) unless a read
/// asks for its copy; `raftpg member rebuild` re-seeds it from the leader's snapshot while a
/// writer keeps writing through the cluster; afterwards the copies are identical, the node
/// serves reads again, and it stays healthy across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_diverged_node_is_detected_fenced_and_rebuilt_while_the_cluster_serves() {
    let mut tc = start_cluster("rebuild", 23, 3).await.unwrap();
    let c = tc.client_of(&tc.cluster.addrs());
    c.execute_one("CREATE TABLE items (id int PRIMARY KEY, v text)", vec![])
        .await
        .unwrap();
    c.execute_one(
        "INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 5000) g ORDER BY g",
        vec![],
    )
    .await
    .unwrap();
    let (leader, odd) = tc.leader_and_follower().await;
    // Every node holds the rows before one is changed behind raftpg's back.
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
    let pg = tc.pg(odd).await.unwrap();
    pg.batch_execute("DELETE FROM items WHERE id % 100 = 0; UPDATE items SET v = 'x' WHERE id = 7")
        .await
        .unwrap();

    let r = c.check(Duration::from_secs(30)).await.unwrap();
    assert!(!r.identical, "{r:?}");
    assert_eq!(r.diverged_nodes, vec![odd], "{r:?}");
    let st = c.member_status(0, odd).await.unwrap();
    assert!(!st.diverged.is_empty(), "{st:?}");
    let read = |allow_diverged: bool| raftpg_client::v1::QueryRequest {
        sql: "SELECT count(*) FROM items".into(),
        consistency: raftpg_client::v1::Consistency::Local as i32,
        timeout_ms: 5_000,
        allow_diverged,
        ..Default::default()
    };
    let e = c
        .query_node((odd - 1) as usize, read(false))
        .await
        .expect_err("a diverged node must not serve reads");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert_eq!(e.sqlstate().as_deref(), Some("XX001"), "{e}");
    let bad = c.query_node((odd - 1) as usize, read(true)).await.unwrap();
    assert_eq!(values::as_i64(&bad.rows[0].values[0]), Some(4950));
    // The same over the PostgreSQL protocol: refused with XX001 unless the session asks.
    let wire = tc.wire(odd).await.unwrap();
    let e = wire
        .simple_query("SELECT count(*) FROM items")
        .await
        .expect_err("a diverged node must not serve reads over the wire");
    assert_eq!(e.code().map(|c| c.code()), Some("XX001"), "{e}");
    wire.batch_execute("SET raftpg.allow_diverged_reads = on")
        .await
        .unwrap();
    let n: i64 = wire
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 4950);

    // On an idle cluster the leader's snapshot is at exactly the odd node's applied index: the
    // rebuild must still replace the copy (it did not, at first).
    let r = c.rebuild(odd, Duration::from_secs(120)).await.unwrap();
    assert_eq!(r.donor_id, leader);
    let r = c.check(Duration::from_secs(30)).await.unwrap();
    assert!(r.identical, "{r:?}");
    // Diverge it again, then rebuild while a writer keeps writing.
    // (The rebuild replaced the database: connect again.)
    tc.pg(odd)
        .await
        .unwrap()
        .batch_execute("DELETE FROM items WHERE id % 99 = 0")
        .await
        .unwrap();
    let r = c.check(Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.diverged_nodes, vec![odd], "{r:?}");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let c = tc.client_of(&tc.cluster.addrs());
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                c.execute_one(
                    "INSERT INTO items VALUES ($1, 'during')",
                    vec![values::int(100_000 + n)],
                )
                .await
                .expect("writes go on during the rebuild");
            }
            n
        })
    };
    let credentials = tc
        .client_config()
        .credentials
        .expect("an authenticated cluster");
    let bin = raftpg_client::local_cluster::default_node_bin().with_file_name("raftpg");
    let out = tokio::process::Command::new(bin)
        .args([
            "--nodes",
            &tc.cluster.addrs().join(","),
            "member",
            "rebuild",
        ])
        .arg(odd.to_string())
        .arg("--certs")
        .arg(tc.certs().expect("a TLS cluster"))
        .env("RAFTPG_USER", &credentials.user)
        .env("RAFTPG_PASSWORD", &credentials.password)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("node {odd} rebuilt from node {leader}")),
        "{stdout}"
    );
    assert!(stdout.contains("copies are identical"), "{stdout}");
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    eprintln!("{written} writes during the rebuild");
    assert!(written > 0);

    let r = c.check(Duration::from_secs(30)).await.unwrap();
    assert!(r.identical, "{r:?}");
    assert!(c.member_status(0, odd).await.unwrap().diverged.is_empty());
    let good = c.query_node((odd - 1) as usize, read(false)).await.unwrap();
    assert!(values::as_i64(&good.rows[0].values[0]).unwrap() >= 5000);
    // The rebuilt node survives a restart with its new copy; restarted with --auto-rebuild,
    // it rebuilds itself as soon as a check finds it different.
    tc.cluster.stop_node(odd);
    tc.cluster
        .add_extra_args(odd, vec!["--auto-rebuild".into()]);
    tc.cluster.start_node(odd).unwrap();
    c.execute_one("INSERT INTO items VALUES (0, 'after')", vec![])
        .await
        .unwrap();
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
    tc.pg(odd)
        .await
        .unwrap()
        .batch_execute("UPDATE items SET v = 'changed' WHERE id < 10")
        .await
        .unwrap();
    let r = c.check(Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.diverged_nodes, vec![odd], "{r:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let st = c.member_status(0, odd).await.unwrap();
        if st.diverged.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no automatic rebuild: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = c.check(Duration::from_secs(30)).await.unwrap();
    assert!(r.identical, "{r:?}");
}

/// Runs `sql` directly on node `id`'s PostgreSQL, then requires `raftpg check` to report
/// `differences` differences, one of them `what` on that node.
async fn changed_behind_raftpg(
    tc: &testkit::TestCluster,
    id: u64,
    sql: &str,
    differences: usize,
    what: &str,
) {
    tc.pg(id).await.unwrap().execute(sql, &[]).await.unwrap();
    let r = tc.client.check(Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.differences.len(), differences, "{r:?}");
    let prefix = format!("{what}: node {id}");
    assert!(
        r.differences.iter().any(|d| d.starts_with(&prefix)),
        "{:?}",
        r.differences
    );
}

/// Writes carry request ids; the leader is killed twice mid-load and the client retries across
/// lost connections and timeouts: every acknowledged request is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retried_requests_apply_exactly_once_across_leader_kills() {
    let mut tc = start_cluster("exactly_once", 22, 3).await.unwrap();
    tc.client
        .execute_one(
            "CREATE TABLE once (id serial, token text NOT NULL, w int)",
            vec![],
        )
        .await
        .unwrap();

    // The same request id sent twice is applied once and answered with the first result.
    let mut raw = WriteClient::new(tc.channel(1));
    let req = ExecuteRequest {
        statements: vec![Statement {
            // A second execution would return the next serial id and another random draw.
            sql: "INSERT INTO once (token, w) VALUES ('dup', -1) RETURNING id, random()".into(),
            params: vec![],
        }],
        request_id: Some(RequestId {
            client_id: "test-client".into(),
            seq: 1,
        }),
    };
    let first = raw
        .execute(tc.request(req.clone()))
        .await
        .unwrap()
        .into_inner();
    let second = raw.execute(tc.request(req)).await.unwrap().into_inner();
    assert_eq!(first.results, second.results);
    assert!(
        second.log_index > first.log_index,
        "the retry is a new entry that is not applied"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<BTreeMap<String, bool>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..6 {
        let addrs = tc.cluster.addrs();
        let config = tc.client_config();
        let stop = stop.clone();
        let outcomes = outcomes.clone();
        tasks.push(tokio::spawn(async move {
            let client = Client::with_config(
                &addrs,
                ClientConfig {
                    attempt_timeout: Duration::from_secs(3),
                    attempts_max: 100,
                    ..config
                },
            )
            .unwrap();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let token = format!("w{w}-{n}");
                n += 1;
                let r = client
                    .execute_one(
                        "INSERT INTO once (token, w) VALUES ($1, $2)",
                        vec![values::text(token.clone()), values::int(w)],
                    )
                    .await;
                outcomes.lock().unwrap().insert(token, r.is_ok());
            }
        }));
    }
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let leader = tc
            .client
            .wait_for_leader(Duration::from_secs(30))
            .await
            .unwrap();
        tc.cluster.kill_node(leader);
        tokio::time::sleep(Duration::from_secs(3)).await;
        tc.cluster.start_node(leader).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let outcomes = outcomes.lock().unwrap().clone();
    let acked = outcomes.values().filter(|ok| **ok).count();
    eprintln!("requests {}, acknowledged {acked}", outcomes.len());
    assert!(acked > 50, "the load made progress");
    let check = tc.client.check(Duration::from_secs(60)).await.unwrap();
    assert!(check.identical, "{:?}", check.differences);
    for id in 1..=3 {
        let pg = tc.pg(id).await.unwrap();
        let rows = pg
            .query("SELECT token, count(*) FROM once GROUP BY token", &[])
            .await
            .unwrap();
        let counts: BTreeMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(
            counts.get("dup"),
            Some(&1),
            "node {id}: a duplicate request id was applied twice"
        );
        for (token, ok) in &outcomes {
            let n = counts.get(token).copied().unwrap_or(0);
            if *ok {
                assert_eq!(
                    n, 1,
                    "node {id}: acknowledged request {token} applied {n} times"
                );
            } else {
                assert!(n <= 1, "node {id}: request {token} applied {n} times");
            }
        }
        assert!(
            counts
                .keys()
                .all(|t| t == "dup" || outcomes.contains_key(t)),
            "node {id}: phantom rows"
        );
    }
}
