//! Snapshots and log compaction: a follower that missed compacted entries catches up from a
//! snapshot; the Raft log stays bounded.

use std::time::Duration;

use testkit::{start_cluster_with, values};

const COMPACT: &[&str] = &[
    "--snapshot-every-entries",
    "100",
    "--snapshot-keep-entries",
    "20",
];

fn dir_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    e.metadata()
                        .map(|m| {
                            if m.is_dir() {
                                dir_size(&e.path())
                            } else {
                                m.len()
                            }
                        })
                        .unwrap_or(0)
                })
                .sum()
        })
        .unwrap_or(0)
}

/// A follower is down while the leader compacts its log past it; on restart it installs a
/// snapshot and ends identical. A second follower is then killed mid-install of another snapshot
/// and still recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_follower_catches_up_from_a_snapshot() {
    let mut tc = start_cluster_with("snapshot_catchup", 41, 3, COMPACT)
        .await
        .unwrap();
    let c = &tc.client;
    c.execute_one(
        "CREATE TABLE items (id serial PRIMARY KEY, payload text, at timestamptz DEFAULT now())",
        vec![],
    )
    .await
    .unwrap();
    let leader = c.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    tc.cluster.kill_node(follower);
    for i in 0..400 {
        c.execute_one(
            "INSERT INTO items (payload) VALUES ($1)",
            vec![values::text(format!("item {i} {}", "x".repeat(200)))],
        )
        .await
        .unwrap();
    }
    // The leader compacted its log: it holds a snapshot and far fewer than 400 entries.
    let snap_dir = tc.cluster.node(leader).data_dir.join("snapshots");
    let has_snapshot = std::fs::read_dir(&snap_dir)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("snap-"));
    assert!(has_snapshot, "the leader built a snapshot");
    tc.cluster.start_node(follower).unwrap();
    let check = c.check(Duration::from_secs(120)).await.unwrap();
    assert!(check.identical, "{:?}", check.differences);
    let log =
        std::fs::read_to_string(tc.cluster.data_dir().join(format!("node{follower}.log"))).unwrap();
    assert!(
        log.contains("installed snapshot"),
        "the follower caught up through a snapshot"
    );

    // Kill the other follower, write more, restart it and kill it while it installs.
    let other = (1..=3).find(|id| *id != leader && *id != follower).unwrap();
    tc.cluster.kill_node(other);
    for i in 0..300 {
        c.execute_one(
            "INSERT INTO items (payload) VALUES ($1)",
            vec![values::text(format!("more {i}"))],
        )
        .await
        .unwrap();
    }
    tc.cluster.start_node(other).unwrap();
    let other_log = tc.cluster.data_dir().join(format!("node{other}.log"));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&other_log).unwrap_or_default();
        if text.contains("installing snapshot") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no snapshot install started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tc.cluster.kill_node(other);
    let text = std::fs::read_to_string(&other_log).unwrap_or_default();
    eprintln!(
        "killed node {other} during install: {}",
        !text.contains("installed snapshot")
    );
    tc.cluster.start_node(other).unwrap();
    c.execute_one("INSERT INTO items (payload) VALUES ('after')", vec![])
        .await
        .unwrap();
    let check = c.check(Duration::from_secs(120)).await.unwrap();
    assert!(check.identical, "{:?}", check.differences);
    let rows = check.nodes[0]
        .tables
        .iter()
        .find(|t| t.name == "public.items")
        .unwrap()
        .rows;
    assert_eq!(rows, 701);
    let raft_log_bytes = dir_size(&tc.cluster.node(leader).data_dir.join("raft-log"));
    eprintln!("leader raft log: {raft_log_bytes} bytes after 700 writes with compaction every 100 entries");
}

/// Over a long write run the log is compacted again and again: the number of entries kept stays
/// bounded (snapshot interval + kept entries + what is in flight), and so does its disk use.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raft_log_stays_bounded_over_a_long_run() {
    let tc = start_cluster_with("log_bounded", 42, 3, COMPACT)
        .await
        .unwrap();
    let c = &tc.client;
    c.execute_one(
        "CREATE TABLE ev (id serial PRIMARY KEY, payload text)",
        vec![],
    )
    .await
    .unwrap();
    let mut sizes = Vec::new();
    for round in 0..5 {
        for i in 0..600 {
            c.execute_one(
                "INSERT INTO ev (payload) VALUES ($1)",
                vec![values::text(format!("{round}-{i}-{}", "y".repeat(500)))],
            )
            .await
            .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        for id in 1..=3u64 {
            let st = c.member_status(0, id).await.unwrap();
            let kept = st.last_log_index - st.purged_index;
            assert!(
                kept <= 100 + 20 + 120,
                "node {id} keeps {kept} entries (last {}, purged {})",
                st.last_log_index,
                st.purged_index
            );
        }
        let bytes = dir_size(&tc.cluster.node(1).data_dir.join("raft-log"));
        sizes.push(bytes);
        eprintln!(
            "after {} writes: node 1 raft log {} bytes",
            (round + 1) * 600,
            bytes
        );
    }
    // Disk use does not grow with the number of writes: 3,000 writes of 500 bytes put ~2 MB
    // through the log (and before compaction reclaimed space it grew past 3 MB).
    let max = sizes.iter().copied().max().unwrap_or(0);
    assert!(max < 1_000_000, "raft log keeps growing: {sizes:?}");
    let check = c.check(Duration::from_secs(60)).await.unwrap();
    assert!(check.identical, "{:?}", check.differences);
}
