//! Membership changes under load: grow 3 -> 5 with new nodes seeded by snapshots (the log is
//! compacted), shrink back to 3 removing the old leader, replace a wiped node, transfer
//! leadership. No acknowledged write may be lost and every member must end identical.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftpg_client::{Client, LocalCluster};
use testkit::{check_load, start_cluster_with, values, write_load};
use tonic::Code;

const COMPACT: &[&str] = &[
    "--snapshot-every-entries",
    "200",
    "--snapshot-keep-entries",
    "50",
];
const LOAD_DDL: &str =
    "CREATE TABLE load (id serial PRIMARY KEY, k bigint NOT NULL UNIQUE, w int NOT NULL)";

fn log_line(path: &std::path::Path, needle: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|l| l.contains(needle))
        .map(str::to_string)
}

/// Inserts `n` rows into `t`, one write (one log entry) after the other.
async fn insert_rows(c: &Client, prefix: &str, n: usize) {
    for i in 0..n {
        c.execute_one(
            "INSERT INTO t (v) VALUES ($1)",
            vec![values::text(format!("{prefix}{i}"))],
        )
        .await
        .unwrap();
    }
}

/// Node `id` loses its disk: killed, wiped, removed from the cluster.
async fn lose(cluster: &mut LocalCluster, c: &Client, id: u64) {
    cluster.kill_node(id);
    cluster.wipe_node(id).unwrap();
    c.remove(&[id]).await.unwrap();
}

/// Starts node `id` empty under the same id and address and adds it back: a learner caught up
/// within 60 s, then a voter; the cluster check then finds three identical copies.
async fn add_back(cluster: &mut LocalCluster, c: &Client, id: u64, addr: &str, peer_addr: &str) {
    cluster.start_joining_node(id, addr).unwrap();
    tokio::time::timeout(Duration::from_secs(60), c.add_learner(id, peer_addr, true))
        .await
        .unwrap_or_else(|_| panic!("node {id} never caught up"))
        .unwrap();
    c.promote(&[id]).await.unwrap();
    let check = c.check(Duration::from_secs(120)).await.unwrap();
    assert!(
        check.identical,
        "{:?} {:?}",
        check.differences, check.missing_nodes
    );
    assert_eq!(check.nodes.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grow_to_five_and_shrink_to_three_under_load() {
    let mut tc = start_cluster_with("grow_shrink", 51, 3, COMPACT)
        .await
        .unwrap();
    tc.client.execute_one(LOAD_DDL, vec![]).await.unwrap();
    let all_addrs: Vec<String> = (1..=5).map(|id| tc.addr_of(id)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(write_load(
        all_addrs.clone(),
        tc.client_config(),
        "load",
        4,
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Grow: nodes 4 and 5 join empty; the log has been compacted, so they need a snapshot.
    let t0 = Instant::now();
    for id in [4, 5] {
        tc.cluster.start_joining_node(id, &tc.addr_of(id)).unwrap();
        let r = tc
            .client
            .add_learner(id, &tc.peer_addr_of(id), true)
            .await
            .unwrap();
        assert!(
            r.members.iter().any(|m| m.node_id == id && !m.voter),
            "{r:?}"
        );
        // Done means done: when the add returns, the learner's PostgreSQL holds the log up to
        // the change (through a snapshot: the log was compacted).
        let log = tc.cluster.data_dir().join(format!("node{id}.log"));
        assert!(
            log_line(&log, "installed snapshot").is_some(),
            "node {id}: the add returned before its snapshot was installed: {}",
            r.message
        );
        let applied: i64 = tc
            .pg(id)
            .await
            .unwrap()
            .query_one("SELECT log_index FROM raftpg.applied", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            applied as u64 >= r.log_index,
            "node {id} applied {applied} < {} when the add returned",
            r.log_index
        );
        assert!(
            r.message.contains("holds the log up to index"),
            "{}",
            r.message
        );
        // Idempotent: adding again is a no-op.
        assert_eq!(
            tc.client
                .add_learner(id, &tc.peer_addr_of(id), true)
                .await
                .unwrap()
                .log_index,
            0
        );
    }
    let r = tc.client.promote(&[4, 5]).await.unwrap();
    assert_eq!(r.members.iter().filter(|m| m.voter).count(), 5, "{r:?}");
    assert_eq!(
        tc.client.promote(&[4, 5]).await.unwrap().log_index,
        0,
        "promote is idempotent"
    );
    let grow_secs = t0.elapsed().as_secs_f64();
    for id in [4u64, 5] {
        let log = tc.cluster.data_dir().join(format!("node{id}.log"));
        let deadline = Instant::now() + Duration::from_secs(60);
        let installed = loop {
            if let Some(line) = log_line(&log, "installed snapshot") {
                break line;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} was not seeded by a snapshot"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        eprintln!("node {id}: {installed}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Shrink: remove the old leader and another founding node.
    let old_leader = tc
        .client
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    let other = (1..=3).find(|id| *id != old_leader).unwrap();
    let r = tc.client.remove(&[old_leader, other]).await.unwrap();
    assert_eq!(r.members.len(), 3, "{r:?}");
    assert!(r
        .members
        .iter()
        .all(|m| m.node_id != old_leader && m.node_id != other));
    assert_eq!(
        tc.client.remove(&[old_leader]).await.unwrap().log_index,
        0,
        "remove is idempotent"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let report = load.await.unwrap();

    // A removed node refuses writes and reads with a clear error.
    let removed = raftpg_client::Client::with_config(
        &[tc.cluster.node(old_leader).addr.clone()],
        raftpg_client::ClientConfig {
            attempts_max: 1,
            ..tc.client_config()
        },
    )
    .unwrap();
    let e = removed
        .execute_one("INSERT INTO load (k, w) VALUES (-1, -1)", vec![])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.to_string().contains("removed"), "{e}");

    let members: Vec<u64> = r.members.iter().map(|m| m.node_id).collect();
    let check = tc.client.check(Duration::from_secs(120)).await.unwrap();
    assert!(
        check.identical,
        "{:?} {:?}",
        check.differences, check.missing_nodes
    );
    assert_eq!(check.nodes.len(), 3);
    for id in &members {
        check_load(&tc, *id, "load", &report).await.unwrap();
    }
    let snap_bytes: u64 = std::fs::read_dir(tc.cluster.node(4).data_dir.join("snapshots"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("snap-"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    eprintln!(
        "grow/shrink: acked {}, unknown {}, failed {}, lost 0; grow took {grow_secs:.1} s; snapshot {} bytes",
        report.acked.len(),
        report.unknown.len(),
        report.failed.len(),
        snap_bytes
    );
    assert!(report.acked.len() > 100, "the load made progress");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wiped_node_is_replaced_and_leadership_transfers() {
    let mut tc = start_cluster_with("replace", 52, 3, COMPACT).await.unwrap();
    let c = &tc.client;
    c.execute_one("CREATE TABLE t (id serial PRIMARY KEY, v text)", vec![])
        .await
        .unwrap();
    insert_rows(c, "v", 250).await;
    let leader = c.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    let victim = (1..=3).find(|id| *id != leader).unwrap();
    lose(&mut tc.cluster, c, victim).await;
    insert_rows(c, "w", 50).await;
    let (addr, peer_addr) = (tc.addr_of(victim), tc.peer_addr_of(victim));
    add_back(&mut tc.cluster, c, victim, &addr, &peer_addr).await;

    // Leadership moves to the re-added node; writes go on.
    let r = c.transfer_leader(victim).await.unwrap();
    assert!(r.message.contains("leads"), "{r:?}");
    assert_eq!(
        c.wait_for_leader(Duration::from_secs(30)).await.unwrap(),
        victim
    );
    c.execute_one("INSERT INTO t (v) VALUES ('after transfer')", vec![])
        .await
        .unwrap();
    let e = c.transfer_leader(42).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let check = c.check(Duration::from_secs(60)).await.unwrap();
    assert!(check.identical, "{:?}", check.differences);
}

/// A node whose PostgreSQL has another collation (here: an existing server reached with
/// --pg-url, initialized with locale C) is refused when it is added.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_a_different_collation_is_refused() {
    let mut tc = start_cluster_with("incompatible", 53, 3, &[])
        .await
        .unwrap();
    let pg = testkit::StandalonePostgres::start(
        &tc.cluster.data_dir().join("other-pg"),
        &["--locale=C", "--encoding=UTF8"],
    )
    .unwrap();
    tc.cluster
        .add_extra_args(4, vec!["--pg-url".into(), pg.url()]);
    tc.cluster.start_joining_node(4, &tc.addr_of(4)).unwrap();
    let e = tc
        .client
        .add_learner(4, &tc.peer_addr_of(4), true)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("collation"), "{e}");
    let st = tc.client.status_of(0).await.unwrap();
    assert_eq!(st.members.len(), 3, "the node was not added");
    tc.cluster.stop_node(4);
}

/// `promote` refuses a learner whose PostgreSQL has not applied the log up to the commit index
/// (it waits a little first), says why, and goes ahead when forced or once it caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_learner_is_promoted_only_when_caught_up_or_forced() {
    let mut tc = start_cluster_with("promote_lag", 54, 3, &[]).await.unwrap();
    tc.client
        .execute_one("CREATE TABLE t (id int PRIMARY KEY)", vec![])
        .await
        .unwrap();
    for id in [4, 5] {
        tc.cluster.start_joining_node(id, &tc.addr_of(id)).unwrap();
        tc.client
            .add_learner(id, &tc.peer_addr_of(id), true)
            .await
            .unwrap();
    }
    // Node 4 stops (SIGSTOP) and misses writes.
    assert!(tc.cluster.signal_node(4, libc::SIGSTOP));
    for i in 0..20 {
        tc.client
            .execute_one(&format!("INSERT INTO t VALUES ({i})"), vec![])
            .await
            .unwrap();
    }
    let t0 = Instant::now();
    let e = tc.client.promote(&[4]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("not caught up"), "{e}");
    assert!(e.to_string().contains("--force"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(40), "{:?}", t0.elapsed());
    // Node 5 is caught up: promoted at once.
    let r = tc.client.promote(&[5]).await.unwrap();
    assert!(r.members.iter().any(|m| m.node_id == 5 && m.voter), "{r:?}");
    // Forced: node 4 becomes a voter while stopped (4 of 5 voters still answer).
    let r = tc.client.promote_with(&[4], true).await.unwrap();
    assert!(r.members.iter().any(|m| m.node_id == 4 && m.voter), "{r:?}");
    assert!(tc.cluster.signal_node(4, libc::SIGCONT));
    let last = tc
        .client
        .execute_one("INSERT INTO t VALUES (100)", vec![])
        .await
        .unwrap()
        .log_index;
    // `raftpg member wait 4`: returns once it applied the log up to the commit index.
    let reached = raftpg_client::progress::wait_caught_up(&tc.client, 4, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(reached >= last, "node 4 reached {reached} < {last}");
    tc.assert_identical(&[1, 2, 3, 4, 5]).await.unwrap();
}

/// A node re-added empty catches up from the log while the leader is a node that was itself
/// removed and re-added earlier. Catching up, the new node appends the old entries in chunks,
/// and after the chunk holding the membership without the leader it still has to accept that
/// leader's next AppendEntries (found by the jepsen membership run: the node refused the
/// leader as "not a member" for good and never became a voter).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_catching_up_from_the_log_follows_a_leader_its_old_entries_exclude() {
    let mut tc = start_cluster_with("rejoin_log", 133, 3, &[]).await.unwrap();
    let addrs: Vec<String> = (1..=3).map(|id| tc.addr_of(id)).collect();
    let c = tc.client_of(&addrs);
    c.execute_one("CREATE TABLE t (id serial PRIMARY KEY, v text)", vec![])
        .await
        .unwrap();
    let leader = c.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    let first = (1..=3).find(|id| *id != leader).unwrap();
    lose(&mut tc.cluster, &c, first).await;
    // More entries than one AppendEntries carries (512) between the membership without
    // `first` and the one that adds it back (one writer: concurrent writes share entries).
    insert_rows(&c, "w", 600).await;
    let (addr, peer_addr) = (tc.addr_of(first), tc.peer_addr_of(first));
    add_back(&mut tc.cluster, &c, first, &addr, &peer_addr).await;
    c.transfer_leader(first).await.unwrap();
    assert_eq!(
        c.wait_for_leader(Duration::from_secs(30)).await.unwrap(),
        first
    );

    // Now another node is lost and re-added; the log was never compacted, so it catches up
    // from index 1, through the entries that exclude its leader.
    let second = (1..=3).find(|id| *id != first).unwrap();
    lose(&mut tc.cluster, &c, second).await;
    let (addr, peer_addr) = (tc.addr_of(second), tc.peer_addr_of(second));
    add_back(&mut tc.cluster, &c, second, &addr, &peer_addr).await;
}
